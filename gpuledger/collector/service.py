"""Builds a Collector from its config: store, pricing, limits, security."""

from __future__ import annotations

from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store, StoreOptions
from gpuledger.collector.validate import Limits
from gpuledger.config import CollectorConfig


def build_collector(cfg: CollectorConfig) -> Collector:
    from gpuledger.security import collector_security

    auth, creds, note = collector_security(cfg)
    pricing = Pricing.default(cfg.pricing_file or None)
    dsn = cfg.store_dsn()
    if dsn.startswith("chdb://"):
        from pathlib import Path

        Path(dsn[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
    store = Store(dsn, StoreOptions(database=cfg.database, cluster=cfg.cluster, ttl_days=cfg.ttl_days,
                                    partition_by=cfg.partition_by))
    limits = Limits(max_batch_rows=cfg.max_batch_rows, max_gpus=cfg.max_gpus_per_batch,
                    max_future_ms=int(cfg.max_future_s * 1000),
                    retention_ms=cfg.ttl_days * 86_400_000 if cfg.ttl_days else 0)
    collector = Collector(store, pricing, listen=cfg.listen, limits=limits, max_batch_bytes=cfg.max_batch_bytes,
                     insert_max_rows=cfg.insert_max_rows, insert_max_wait_s=cfg.insert_max_wait_s,
                     max_pending_rows=cfg.max_pending_rows, auth=auth, server_credentials=creds,
                     max_streams=cfg.max_streams)
    collector.security_note = note
    return collector
