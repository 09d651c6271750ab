"""The `prices` table: the price in force for every known GPU, written by the collector so SQL can join it.

Prices are applied in Python (pricing.py: catalog, overrides, OpenCost rows, MIG shares), so a BI tool
reading the store (Grafana's ClickHouse data source) cannot price GPU time by itself. This module
resolves, with the same `allocation.Prices` lookup every report uses, each GPU's per-GPU-hour price in
each price segment (between two instants at which some price changes) and writes one row per GPU
and segment:

    host_id, gpu_uuid, from_ms, until_ms, per_gpu_hour, currency, method, source, version_ms

`from_ms` <= t < `until_ms` (the last segment ends at 2^63-1). A rewrite happens only when the rows
change (a new host or GPU, a price reloaded); every rewrite carries a new `version_ms` and deletes the
older versions, so a query reads the newest version:

    ... JOIN (SELECT * FROM gpuledger.prices WHERE version_ms = (SELECT max(version_ms) FROM gpuledger.prices))

An unpriced GPU (no catalog row for its instance type) has no row: SQL shows its time unpriced, as the
reports do. Cost of a state = state ms / 3,600,000 x per_gpu_hour, summed over segments.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from gpuledger.collector import allocation
from gpuledger.collector.allocation import Periods
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store

OPEN_END_MS = (1 << 63) - 1

SCHEMA = pa.schema([("host_id", pa.string()), ("gpu_uuid", pa.string()), ("from_ms", pa.int64()),
                    ("until_ms", pa.int64()), ("per_gpu_hour", pa.float64()), ("currency", pa.string()),
                    ("method", pa.string()), ("source", pa.string()), ("version_ms", pa.int64())])


def price_rows(store: Store, pricing: Pricing) -> list[dict]:
    """One row per (GPU, price segment), priced exactly as the reports price it."""
    bps = tuple(pricing.breakpoints())
    periods = Periods(0, OPEN_END_MS, 0, 0, bps)
    hosts = allocation.load_hosts(store)
    prices = allocation.Prices(pricing, hosts, allocation.load_shares(store), periods)
    gpus = store.query_rows(f"SELECT DISTINCT host_id, uuid FROM {store.db}.gpus ORDER BY host_id, uuid")
    edges = (0, *bps, OPEN_END_MS)
    out = []
    for host_id, uuid in gpus:
        for seg in range(len(edges) - 1):
            p = prices(host_id, uuid, seg)
            if p is None:
                continue
            out.append({"host_id": host_id, "gpu_uuid": uuid, "from_ms": edges[seg], "until_ms": edges[seg + 1],
                        "per_gpu_hour": p.per_gpu_hour, "currency": p.currency, "method": p.method,
                        "source": p.source})
    return out


class PriceTable:
    """Keeps `prices` current: `refresh(now_ms)` rewrites it when the rows differ from the last written."""

    def __init__(self, store: Store, pricing: Pricing) -> None:
        self.store = store
        self.pricing = pricing
        self._digest = ""
        self.writes = 0

    def refresh(self, now_ms: int) -> bool:
        rows = price_rows(self.store, self.pricing)
        digest = hashlib.sha256(repr(rows).encode()).hexdigest()
        if digest == self._digest:
            return False
        table = pa.Table.from_pylist([{**r, "version_ms": now_ms} for r in rows], schema=SCHEMA)
        if table.num_rows:
            self.store.insert_table("prices", table)
        self.store.command(f"ALTER TABLE {self.store.local('prices')}{self.store.on_cluster} DELETE WHERE version_ms < {{v:Int64}}",
                           {"v": now_ms}, {"mutations_sync": 1})
        self._digest = digest
        self.writes += 1
        return True
