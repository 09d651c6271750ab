"""Builds a Collector from its config: store, pricing, limits, security, coverage rules."""

from __future__ import annotations

from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store, StoreOptions
from gpuledger.collector.validate import Limits
from gpuledger.config import CollectorConfig


def store_options(cfg: CollectorConfig) -> StoreOptions:
    return StoreOptions(database=cfg.database, cluster=cfg.cluster, ttl_days=cfg.ttl_days,
                        partition_by=cfg.partition_by, batch_log_days=cfg.batch_log_days,
                        readers=cfg.report_workers + 1, report_memory_bytes=cfg.report_memory_mb << 20,
                        report_threads=cfg.report_threads)


def coverage_rules(cfg: CollectorConfig) -> CoverageRules:
    return CoverageRules(grace_ms=int(cfg.silence_grace_s * 1000), horizon_ms=int(cfg.silence_horizon_s * 1000))


def build_collector(cfg: CollectorConfig, config_path: str | None = None) -> Collector:
    from gpuledger.security import collector_security

    auth, creds, note = collector_security(cfg)
    pricing = Pricing.default(cfg.pricing_file or None)
    store = Store(cfg.store_dsn(), store_options(cfg))
    limits = Limits(max_batch_rows=cfg.max_batch_rows, max_gpus=cfg.max_gpus_per_batch,
                    max_future_ms=int(cfg.max_future_s * 1000),
                    retention_ms=cfg.ttl_days * 86_400_000 if cfg.ttl_days else 0)
    collector = Collector(store, pricing, listen=cfg.listen, limits=limits, max_batch_bytes=cfg.max_batch_bytes,
                          insert_max_rows=cfg.insert_max_rows, insert_max_wait_s=cfg.insert_max_wait_s,
                          max_pending_rows=cfg.max_pending_rows, auth=auth, server_credentials=creds,
                          max_streams=cfg.max_streams, max_streams_per_agent=cfg.max_streams_per_agent,
                          stream_idle_timeout_s=cfg.stream_idle_timeout_s, report_workers=cfg.report_workers,
                          backfill_hours=cfg.backfill_hours, coverage=coverage_rules(cfg),
                          seal_interval_s=cfg.seal_interval_s, seal_settle_s=cfg.seal_settle_s,
                          run_sealer=cfg.run_sealer)
    collector.security_note = note
    from gpuledger.collector.alerting import attach_jobs

    attach_jobs(collector, cfg, config_path)  # alert rules, run cost onto MLflow / W&B runs
    return collector
