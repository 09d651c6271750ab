"""ClickHouse storage through clickhouse-connect: the only module that imports it.

The DSN picks the engine: `chdb:///path` is ClickHouse embedded in this process (one process
owns the directory), `http(s)://user:pass@host:8123` a ClickHouse server. With a cluster name
the DDL is `ON CLUSTER`, tables are Replicated*MergeTree with a Distributed table in front.

Windows are keyed by (host_id, gpu_uuid, window_start_ms) in ReplacingMergeTree tables and
read with FINAL, so a batch stored twice (a resend after a lost acknowledgement) counts once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import clickhouse_connect
import pyarrow as pa

log = logging.getLogger(__name__)

U32 = "UInt32 CODEC(T64, ZSTD(3))"

GPU_WINDOW_COLUMNS = f"""
    host_id LowCardinality(String) CODEC(ZSTD(3)),
    gpu_uuid LowCardinality(String) CODEC(ZSTD(3)),
    window_start_ms Int64 CODEC(DoubleDelta, ZSTD(3)),
    window_ms {U32},
    sample_count {U32},
    covered_ms {U32},
    busy_ms {U32},
    active_ms UInt32 ALIAS busy_ms,
    idle_held_ms {U32},
    idle_free_ms {U32},
    unmonitored_ms {U32},
    util_min_pct UInt8 CODEC(ZSTD(3)),
    util_max_pct UInt8 CODEC(ZSTD(3)),
    util_hist Array(UInt16) CODEC(ZSTD(3)),
    mem_used_max_bytes UInt64 CODEC(T64, ZSTD(3)),
    power_mean_mw {U32},
    power_max_mw {U32},
    energy_mj UInt64 CODEC(T64, ZSTD(3)),
    temp_max_c UInt8 CODEC(ZSTD(3)),
    gpm_covered_ms {U32},
    sm_active_ms {U32},
    sm_occupancy_ms {U32},
    tensor_active_ms {U32},
    dram_active_ms {U32}
"""

PROC_WINDOW_COLUMNS = f"""
    host_id LowCardinality(String) CODEC(ZSTD(3)),
    gpu_uuid LowCardinality(String) CODEC(ZSTD(3)),
    window_start_ms Int64 CODEC(DoubleDelta, ZSTD(3)),
    pid UInt32 CODEC(ZSTD(3)),
    proc_start_ms Int64 CODEC(ZSTD(3)),
    held_ms {U32},
    busy_ms {U32},
    mem_max_bytes UInt64 CODEC(T64, ZSTD(3))
"""

TABLES = {
    # name: (columns, engine, order by, version column, partitioned by window time)
    "gpu_windows": (GPU_WINDOW_COLUMNS, "ReplacingMergeTree", "(host_id, gpu_uuid, window_start_ms)", "", True),
    "proc_windows": (PROC_WINDOW_COLUMNS, "ReplacingMergeTree",
                     "(host_id, gpu_uuid, window_start_ms, pid, proc_start_ms)", "", True),
    "processes": ("""
        host_id LowCardinality(String), pid UInt32, start_ms Int64, command String,
        container_id String, pod_uid String, tags Map(LowCardinality(String), String), last_seen_ms Int64
    """, "ReplacingMergeTree", "(host_id, pid, start_ms)", "last_seen_ms", False),
    "hosts": ("""
        host_id String, hostname String, provider LowCardinality(String), region LowCardinality(String),
        instance_type LowCardinality(String), gpu_count UInt32, tags Map(LowCardinality(String), String),
        agent_version LowCardinality(String), updated_ms Int64
    """, "ReplacingMergeTree", "host_id", "updated_ms", False),
    "gpus": ("""
        host_id LowCardinality(String), uuid String, gpu_index UInt32, name LowCardinality(String),
        mem_total_bytes UInt64, util_method LowCardinality(String), mig Bool,
        first_window_ms Int64, parent_uuid String, share Float32
    """, "MergeTree", "(host_id, uuid)", "", False),
    "agent_batches": ("""
        agent_id LowCardinality(String), host_id LowCardinality(String), agent_epoch UInt64, seq UInt64,
        received_ms Int64, windows UInt32, proc_windows UInt32, dropped_windows UInt64
    """, "MergeTree", "(agent_id, seq)", "", False),
}


PARTITION_FUNCTIONS = {"month": "toYYYYMM", "week": "toMonday", "day": "toYYYYMMDD"}


@dataclass(frozen=True)
class StoreOptions:
    database: str = "gpuledger"
    cluster: str = ""
    ttl_days: int = 0
    partition_by: str = "month"  # month | week | day: how window tables are partitioned


class StoreError(RuntimeError):
    """Raised for store failures; `retryable` tells a passing fault from a permanent one."""

    def __init__(self, msg: str, retryable: bool) -> None:
        super().__init__(msg)
        self.retryable = retryable


def _is_retryable(exc: Exception) -> bool:
    text = str(exc).lower()
    permanent = ("syntax error", "unknown identifier", "type mismatch", "cannot parse", "no such column",
                 "illegal type", "unknown table", "too many partitions")
    return not any(p in text for p in permanent)


def normalize_chdb_dsn(dsn: str) -> str:
    """chdb://relative/dir -> chdb:///absolute/dir (clickhouse-connect reads chdb://host/db otherwise)."""
    from pathlib import Path

    path = dsn[len("chdb://"):]
    if path in ("memory", ":memory:") or path.startswith("memory/"):
        return dsn
    p = Path(path).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return f"chdb://{p}"


def open_client(dsn: str):
    """A clickhouse-connect client for a DSN: chdb://PATH or http(s)://[user:pass@]host:port[/db]."""
    u = urlparse(dsn)
    if u.scheme == "chdb":
        return clickhouse_connect.get_client(dsn=normalize_chdb_dsn(dsn))
    if u.scheme in ("http", "https"):
        return clickhouse_connect.get_client(dsn=dsn)
    raise ValueError(f"store DSN {dsn!r}: scheme must be chdb, http or https")


class Store:
    def __init__(self, dsn: str, options: StoreOptions = StoreOptions(), client=None) -> None:
        self.dsn = dsn
        self.opt = options
        self.db = options.database
        self.embedded = dsn.startswith("chdb:")
        self._lock = threading.RLock()  # one embedded engine: serialize its use
        self.client = client or open_client(dsn)
        self.insert_seconds = 0.0
        self.inserts = 0
        self.create_schema()

    # ------------------------------------------------------------------ DDL
    def _ddl_for(self, name: str) -> list[str]:
        cols, engine, order, version, partitioned = TABLES[name]
        on_cluster = f" ON CLUSTER '{self.opt.cluster}'" if self.opt.cluster else ""
        local = f"{name}_local" if self.opt.cluster else name
        eng = engine + (f"({version})" if version else "")
        if self.opt.cluster:
            args = f"'/clickhouse/tables/{{shard}}/{self.db}/{local}', '{{replica}}'" + (f", {version}" if version else "")
            eng = f"Replicated{engine}({args})"
        parts = [f"CREATE TABLE IF NOT EXISTS {self.db}.{local}{on_cluster} ({cols}) ENGINE = {eng}"]
        if partitioned:
            fn = PARTITION_FUNCTIONS[self.opt.partition_by]
            parts.append(f"PARTITION BY {fn}(toDateTime(intDiv(window_start_ms, 1000)))")
        parts.append(f"ORDER BY {order}")
        if partitioned and self.opt.ttl_days:
            parts.append(f"TTL toDateTime(intDiv(window_start_ms, 1000)) + INTERVAL {int(self.opt.ttl_days)} DAY")
        stmts = [" ".join(parts)]
        if self.opt.cluster:
            stmts.append(f"CREATE TABLE IF NOT EXISTS {self.db}.{name}{on_cluster} AS {self.db}.{local} "
                         f"ENGINE = Distributed('{self.opt.cluster}', '{self.db}', '{local}', rand())")
        return stmts

    def create_schema(self) -> None:
        on_cluster = f" ON CLUSTER '{self.opt.cluster}'" if self.opt.cluster else ""
        with self._lock:
            self.client.command(f"CREATE DATABASE IF NOT EXISTS {self.db}{on_cluster}")
            for name in TABLES:
                for stmt in self._ddl_for(name):
                    self.client.command(stmt)

    # ------------------------------------------------------------------ writes
    def insert(self, tables: dict[str, pa.Table]) -> None:
        """Insert one group commit: the windows first, then the facts about hosts, GPUs and processes,
        the batch log last. A failure part-way leaves no facts without their windows; a retry
        re-inserts the windows, which the ReplacingMergeTree tables count once."""
        t0 = time.perf_counter()
        with self._lock:
            try:
                for name in ("gpu_windows", "proc_windows", "processes", "hosts", "gpus", "agent_batches"):
                    t = tables.get(name)
                    if t is not None and t.num_rows:
                        self.client.insert_arrow(f"{self.db}.{name}", t)
            except Exception as e:  # clickhouse-connect raises several types; sort them here
                raise StoreError(f"insert failed: {e}", _is_retryable(e)) from e
        self.insert_seconds += time.perf_counter() - t0
        self.inserts += 1

    # ------------------------------------------------------------------ reads
    def query_arrow(self, sql: str, parameters: dict | None = None) -> pa.Table:
        with self._lock:
            return self.client.query_arrow(sql, parameters=parameters or {})

    def query_rows(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        with self._lock:
            return self.client.query(sql, parameters=parameters or {}).result_rows

    def command(self, sql: str):
        with self._lock:
            return self.client.command(sql)

    def stored_bytes(self, table: str = "gpu_windows") -> tuple[int, int, int]:
        """(rows, compressed bytes, uncompressed bytes) of the active parts of a table."""
        rows = self.query_rows(
            "SELECT sum(rows), sum(data_compressed_bytes), sum(data_uncompressed_bytes) FROM system.parts "
            "WHERE database = {db:String} AND table = {t:String} AND active",
            {"db": self.db, "t": table})
        r = rows[0]
        return int(r[0] or 0), int(r[1] or 0), int(r[2] or 0)

    def optimize(self, table: str = "gpu_windows") -> None:
        self.command(f"OPTIMIZE TABLE {self.db}.{table} FINAL")

    def close(self) -> None:
        with self._lock:
            try:
                self.client.close()
            except Exception:  # closing twice, or an engine already gone
                pass
