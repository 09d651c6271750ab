"""ClickHouse storage through clickhouse-connect: the only module that imports it.

The DSN picks the engine: `chdb:///path` is ClickHouse embedded in this process (one process
owns the directory), `http(s)://user:pass@host:8123` a ClickHouse server. With a cluster name
the DDL is `ON CLUSTER`, tables are Replicated*MergeTree with a Distributed table in front.

Tables (all in one database):
- gpu_windows, proc_windows: the raw 10 s windows, ReplacingMergeTree keyed by (host, GPU, window
  start [, process]): a batch stored twice (a resend after a lost acknowledgement) counts once when
  read with FINAL. Process windows carry who pays for their GPU window's time, computed at ingest
  (`active_attr_us`, `held_attr_us`), so reports never join process windows to GPU windows.
- processes, hosts, gpus: facts, written when new or changed.
- sessions: per agent run (host, epoch, session start) and GPU: the first and last window, the
  stop, the last batch received, the windows its spool dropped (min/max aggregates, so resends
  change nothing). Coverage reads it.
- host_events: retirements.
- gpu_hours, alloc_hours, endpoint_use: rollups built from FINAL data by the sealer (rollup.py), with
  rollup_marks / rollup_built telling reports which host-hours are current.
- agent_batches: a log of received batches, kept `batch_log_days`.
- bill_rows, api_spend_rows, import_slices: imported cloud bills and AI API spend (billing.py);
  import_slices says which import currently stands for each slice.

Reads for reports go through their own connections (a small pool), never the writer's: a long
report does not stall ingest.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import clickhouse_connect
import pyarrow as pa

log = logging.getLogger(__name__)

U32 = "UInt32 CODEC(T64, ZSTD(3))"
U64 = "UInt64 CODEC(T64, ZSTD(3))"
LC = "LowCardinality(String) CODEC(ZSTD(3))"
TS = "Int64 CODEC(DoubleDelta, ZSTD(3))"

GPU_WINDOW_COLUMNS = f"""
    host_id {LC},
    gpu_uuid {LC},
    window_start_ms {TS},
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
    mem_used_max_bytes {U64},
    power_mean_mw {U32},
    power_max_mw {U32},
    energy_mj {U64},
    temp_max_c UInt8 CODEC(ZSTD(3)),
    gpm_covered_ms {U32},
    sm_active_ms {U32},
    sm_occupancy_ms {U32},
    tensor_active_ms {U32},
    dram_active_ms {U32},
    INDEX ts_minmax window_start_ms TYPE minmax GRANULARITY 1
"""

PROC_WINDOW_COLUMNS = f"""
    host_id {LC},
    gpu_uuid {LC},
    window_start_ms {TS},
    pid UInt32 CODEC(ZSTD(3)),
    proc_start_ms Int64 CODEC(ZSTD(3)),
    held_ms {U32},
    busy_ms {U32},
    mem_max_bytes {U64},
    active_attr_us {U32},
    held_attr_us {U32},
    INDEX ts_minmax window_start_ms TYPE minmax GRANULARITY 1
"""

ENDPOINT_WINDOW_COLUMNS = f"""
    host_id {LC},
    endpoint {LC},
    server {LC},
    window_start_ms {TS},
    window_ms {U32},
    scraped_ms {U32},
    requests {U64},
    prompt_tokens {U64},
    generation_tokens {U64},
    running_max {U32},
    scrape_errors {U32}
"""

_MIN = "SimpleAggregateFunction(min, Int64)"
_MAX = "SimpleAggregateFunction(max, Int64)"


@dataclass(frozen=True)
class Table:
    columns: str
    engine: str  # MergeTree family name without Replicated
    order_by: str
    version: str = ""  # version column of a ReplacingMergeTree
    partition: str = ""  # expression; {fn} is replaced by the partition function
    ttl_column: str = ""  # ms column the retention applies to
    ttl: str = ""  # "windows" (collector.ttl_days: every time series, rollups with their windows) or "batches"


TABLES: dict[str, Table] = {
    "gpu_windows": Table(GPU_WINDOW_COLUMNS, "ReplacingMergeTree", "(host_id, gpu_uuid, window_start_ms)",
                         partition="{fn}(toDateTime(intDiv(window_start_ms, 1000)))", ttl_column="window_start_ms",
                         ttl="windows"),
    "proc_windows": Table(PROC_WINDOW_COLUMNS, "ReplacingMergeTree",
                          "(host_id, gpu_uuid, window_start_ms, pid, proc_start_ms)",
                          partition="{fn}(toDateTime(intDiv(window_start_ms, 1000)))", ttl_column="window_start_ms",
                          ttl="windows"),
    "endpoint_windows": Table(ENDPOINT_WINDOW_COLUMNS, "ReplacingMergeTree", "(host_id, endpoint, window_start_ms)",
                              partition="{fn}(toDateTime(intDiv(window_start_ms, 1000)))",
                              ttl_column="window_start_ms", ttl="windows"),
    "processes": Table("""
        host_id LowCardinality(String), pid UInt32, start_ms Int64, command String,
        container_id String, pod_uid String, tags Map(LowCardinality(String), String), last_seen_ms Int64
    """, "ReplacingMergeTree", "(host_id, pid, start_ms)", "last_seen_ms", ttl_column="last_seen_ms", ttl="windows"),
    "hosts": Table("""
        host_id String, hostname String, provider LowCardinality(String), region LowCardinality(String),
        instance_type LowCardinality(String), gpu_count UInt32, tags Map(LowCardinality(String), String),
        agent_version LowCardinality(String), updated_ms Int64, instance_id String DEFAULT ''
    """, "ReplacingMergeTree", "host_id", "updated_ms"),
    "gpus": Table("""
        host_id LowCardinality(String), uuid String, gpu_index UInt32, name LowCardinality(String),
        mem_total_bytes UInt64, util_method LowCardinality(String), mig Bool,
        first_window_ms Int64, parent_uuid String, share Float32
    """, "MergeTree", "(host_id, uuid)"),
    "sessions": Table(f"""
        host_id LowCardinality(String), agent_epoch UInt64, session_start_ms Int64,
        gpu_uuid LowCardinality(String), window_ms UInt32,
        first_window_ms {_MIN}, last_end_ms {_MAX}, declared_first_ms {_MIN},
        stopped_ms {_MAX}, received_ms {_MAX}, dropped_windows SimpleAggregateFunction(max, UInt64)
    """, "AggregatingMergeTree", "(host_id, agent_epoch, session_start_ms, gpu_uuid, window_ms)",
                      ttl_column="received_ms", ttl="windows"),
    "host_events": Table("""
        host_id String, kind LowCardinality(String), at_ms Int64, recorded_ms Int64, note String
    """, "ReplacingMergeTree", "(host_id, kind, at_ms)", "recorded_ms", ttl_column="at_ms", ttl="windows"),
    "gpu_hours": Table(f"""
        host_id {LC}, hour_ms Int64, gpu_uuid {LC},
        busy_ms UInt64, idle_held_ms UInt64, idle_free_ms UInt64, unmonitored_ms UInt64, window_ms UInt64,
        windows UInt32, energy_mj UInt64, power_mw_ms UInt64, power_max_mw UInt32, mem_used_max_bytes UInt64,
        temp_max_c UInt8, gpm_covered_ms UInt64, sm_active_ms UInt64, tensor_active_ms UInt64,
        dram_active_ms UInt64, built_us Int64
    """, "ReplacingMergeTree", "(host_id, hour_ms, gpu_uuid)", "built_us", ttl_column="hour_ms", ttl="windows"),
    "alloc_hours": Table(f"""
        host_id {LC}, hour_ms Int64, gpu_uuid {LC}, pid UInt32, proc_start_ms Int64,
        active_attr_us UInt64, held_attr_us UInt64, busy_ms UInt64, held_ms UInt64, built_us Int64
    """, "ReplacingMergeTree", "(host_id, hour_ms, gpu_uuid, pid, proc_start_ms)", "built_us", ttl_column="hour_ms",
                         ttl="windows"),
    # per endpoint and 10 s window (scale-to-zero replays need the window): the held and busy ms and the
    # attributed µs of the processes tagged with the endpoint, summed per host, sealed like the hourly rollups
    "endpoint_use": Table(f"""
        host_id {LC}, hour_ms Int64, endpoint String, window_start_ms Int64, held_ms UInt64, busy_ms UInt64,
        attr_us UInt64, active_attr_us UInt64, serving_attr_us UInt64, built_us Int64
    """, "ReplacingMergeTree", "(endpoint, hour_ms, host_id, window_start_ms)", "built_us", ttl_column="hour_ms",
                          ttl="windows"),
    "rollup_marks": Table(f"host_id LowCardinality(String), hour_ms Int64, mark_us {_MAX}",
                          "AggregatingMergeTree", "(host_id, hour_ms)", ttl_column="hour_ms", ttl="windows"),
    "rollup_built": Table(f"host_id LowCardinality(String), hour_ms Int64, built_us {_MAX}",
                          "AggregatingMergeTree", "(host_id, hour_ms)", ttl_column="hour_ms", ttl="windows"),
    # the price in force per GPU and price segment, for SQL readers (price_table.py writes it)
    "prices": Table("""
        host_id String, gpu_uuid String, from_ms Int64, until_ms Int64, per_gpu_hour Float64,
        currency LowCardinality(String), method LowCardinality(String), source String, version_ms Int64
    """, "MergeTree", "(host_id, gpu_uuid, from_ms, version_ms)"),
    # alert states written by the collector's alert job (alerting.py), read by the "alerts" report
    "alerts": Table("""
        alertname LowCardinality(String), alert_key String, labels Map(String, String),
        state LowCardinality(String), active_since_ms Int64, updated_ms Int64, value String, summary String,
        description String
    """, "ReplacingMergeTree", "(alertname, alert_key, active_since_ms)", "updated_ms", ttl_column="updated_ms",
                   ttl="windows"),
    # imported cost data (billing.py): rows of every import; only each slice's newest import counts
    "bill_rows": Table(f"""
        source_file {LC}, row_number Int64, format LowCardinality(String), provider LowCardinality(String),
        billing_account_id String, sub_account_id Nullable(String), billing_period LowCardinality(String),
        slice_key String, charge_period_start_ms Int64, charge_period_end_ms Nullable(Int64),
        charge_category LowCardinality(String), charge_class LowCardinality(Nullable(String)),
        service_category LowCardinality(Nullable(String)), service_name LowCardinality(Nullable(String)),
        sku_id Nullable(String), usage_type LowCardinality(Nullable(String)), charge_description Nullable(String),
        resource_id Nullable(String), region LowCardinality(Nullable(String)),
        instance_type LowCardinality(Nullable(String)), is_gpu_instance Bool, gpu_count Nullable(Int32),
        gpu_model LowCardinality(Nullable(String)), billed_cost Float64, effective_cost Float64,
        list_cost Nullable(Float64), currency LowCardinality(String), consumed_quantity Nullable(Float64),
        consumed_unit LowCardinality(Nullable(String)), pricing_quantity Nullable(Float64),
        pricing_unit LowCardinality(Nullable(String)), tags Map(String, String), ai_related Bool,
        team LowCardinality(Nullable(String)), project LowCardinality(Nullable(String)),
        phase LowCardinality(Nullable(String)), workload LowCardinality(Nullable(String)), import_id Int64
    """, "MergeTree", "(slice_key, import_id, charge_period_start_ms)"),
    "api_spend_rows": Table(f"""
        source_file {LC}, row_number Int64, vendor LowCardinality(String), endpoint LowCardinality(String),
        bucket_start_ms Int64, bucket_end_ms Int64, slice_key String, project_id Nullable(String),
        workspace_id Nullable(String), api_key_id Nullable(String), user_id Nullable(String),
        model LowCardinality(Nullable(String)), line_item Nullable(String), cost_type LowCardinality(Nullable(String)),
        token_type LowCardinality(Nullable(String)), service_tier LowCardinality(Nullable(String)),
        batch Nullable(Bool), input_tokens Nullable(Int64), output_tokens Nullable(Int64),
        cached_input_tokens Nullable(Int64), cache_creation_tokens Nullable(Int64), requests Nullable(Int64),
        quantity Nullable(Float64), quantity_unit LowCardinality(Nullable(String)), cost Nullable(Float64),
        currency LowCardinality(Nullable(String)), cost_basis LowCardinality(String),
        team LowCardinality(Nullable(String)), application LowCardinality(Nullable(String)), import_id Int64
    """, "MergeTree", "(slice_key, import_id, bucket_start_ms)"),
    # which import each slice's rows come from: the highest import_id wins (billing.py)
    "import_slices": Table("""
        kind LowCardinality(String), slice_key String, import_id Int64, committed_ms Int64, rows UInt64,
        files Array(String)
    """, "ReplacingMergeTree", "(kind, slice_key)", "import_id"),
    "agent_batches": Table("""
        agent_id LowCardinality(String), host_id LowCardinality(String), agent_epoch UInt64, seq UInt64,
        received_ms Int64, windows UInt32, proc_windows UInt32, dropped_windows UInt64
    """, "MergeTree", "(agent_id, seq)", partition="toYYYYMM(toDateTime(intDiv(received_ms, 1000)))",
                           ttl_column="received_ms", ttl="batches"),
}

# group commit order: windows before the facts about them; the rollup marks last, once the windows are in
# (see rollup.py)
INSERT_ORDER = ("gpu_windows", "proc_windows", "endpoint_windows", "processes", "hosts", "gpus", "sessions",
                "agent_batches", "rollup_marks")

PARTITION_FUNCTIONS = {"month": "toYYYYMM", "week": "toMonday", "day": "toYYYYMMDD"}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# ClickHouse error codes that mean the data or the schema is wrong: retrying cannot help. Everything
# else (connection, timeout, memory, too many parts, read-only replica) is a passing fault.
PERMANENT_CODES = frozenset({
    6,  # CANNOT_PARSE_TEXT
    8,  # THERE_IS_NO_COLUMN
    15,  # DUPLICATE_COLUMN
    16,  # NO_SUCH_COLUMN_IN_TABLE
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    41,  # CANNOT_PARSE_DATETIME
    43,  # ILLEGAL_TYPE_OF_ARGUMENT
    44,  # ILLEGAL_COLUMN
    47,  # UNKNOWN_IDENTIFIER
    50,  # UNKNOWN_TYPE
    53,  # TYPE_MISMATCH
    60,  # UNKNOWN_TABLE
    62,  # SYNTAX_ERROR
    70,  # CANNOT_CONVERT_TYPE
    81,  # UNKNOWN_DATABASE
    117,  # INCORRECT_DATA
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    497,  # ACCESS_DENIED
    516,  # AUTHENTICATION_FAILED
    565,  # TOO_MANY_PARTITIONS
})
_CODE = re.compile(r"\bCode: (\d+)\b")


def error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code of an exception raised by clickhouse-connect, if it carries one."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return code
    m = _CODE.search(str(exc))
    return int(m.group(1)) if m else None


def is_retryable(exc: BaseException) -> bool:
    code = error_code(exc)
    return code is None or code not in PERMANENT_CODES


@dataclass(frozen=True)
class StoreOptions:
    database: str = "gpuledger"
    cluster: str = ""
    ttl_days: int = 0  # raw windows; 0 keeps them
    partition_by: str = "month"  # month | week | day: how window tables are partitioned
    batch_log_days: int = 30  # agent_batches
    readers: int = 2  # connections for reports (and the sealer), apart from the writer's
    report_memory_bytes: int = 2 << 30  # per report query; group-by and sort spill to disk above half
    report_threads: int = 0  # ClickHouse max_threads for reports; 0: its default (the cores)


class StoreError(RuntimeError):
    """Raised for store failures; `retryable` tells a passing fault from a permanent one."""

    def __init__(self, msg: str, retryable: bool) -> None:
        super().__init__(msg)
        self.retryable = retryable


def normalize_chdb_dsn(dsn: str) -> str:
    """chdb://relative/dir -> chdb:///absolute/dir (clickhouse-connect reads chdb://host/db otherwise).
    The directory is created private (0700): it holds every process's command line and tags."""
    import os
    from pathlib import Path

    path = dsn[len("chdb://"):]
    if path in ("memory", ":memory:") or path.startswith("memory/"):
        return dsn
    p = Path(path).resolve()
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(p, 0o700)
    except OSError as e:  # not ours to change (a mounted volume): say so, go on
        log.warning("store directory %s: cannot make it private (%s)", p, e)
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
        if not IDENTIFIER.match(options.database):
            raise ValueError(f"collector.database: {options.database!r} is not an identifier (letters, digits, _; "
                             "not starting with a digit)")
        if options.cluster and not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$", options.cluster):
            raise ValueError(f"collector.cluster: {options.cluster!r} is not an identifier")
        self.dsn = dsn
        self.opt = options
        self.db = options.database
        self.embedded = dsn.startswith("chdb:")
        self._lock = threading.RLock()  # the writer's connection: one statement at a time
        self.client = client or open_client(dsn)
        self._readers: queue.Queue = queue.Queue()
        self._own_readers = client is None
        for _ in range(max(1, options.readers) if client is None else 1):
            self._readers.put(open_client(dsn) if client is None else client)
        self._reader_lock = threading.Lock() if client is not None else None  # a shared client: serialize
        self.insert_seconds = 0.0
        self.inserts = 0
        self.create_schema()

    # ------------------------------------------------------------------ DDL
    def _ddl_for(self, name: str) -> list[str]:
        t = TABLES[name]
        on_cluster = f" ON CLUSTER '{self.opt.cluster}'" if self.opt.cluster else ""
        local = f"{name}_local" if self.opt.cluster else name
        eng = t.engine + (f"({t.version})" if t.version else "")
        if self.opt.cluster:
            args = f"'/clickhouse/tables/{{shard}}/{self.db}/{local}', '{{replica}}'" + (
                f", {t.version}" if t.version else "")
            eng = f"Replicated{t.engine}({args})"
        parts = [f"CREATE TABLE IF NOT EXISTS {self.db}.{local}{on_cluster} ({t.columns}) ENGINE = {eng}"]
        if t.partition:
            parts.append(f"PARTITION BY {t.partition.format(fn=PARTITION_FUNCTIONS[self.opt.partition_by])}")
        parts.append(f"ORDER BY {t.order_by}")
        days = {"windows": self.opt.ttl_days, "batches": self.opt.batch_log_days}.get(t.ttl, 0)
        if days:
            parts.append(f"TTL toDateTime(intDiv({t.ttl_column}, 1000)) + INTERVAL {int(days)} DAY")
        stmts = [" ".join(parts)]
        if self.opt.cluster:
            # windows of one host stay on one shard, so its FINAL reads and rollups are shard-local
            shard_key = "cityHash64(host_id)" if "host_id" in t.columns else "rand()"
            stmts.append(f"CREATE TABLE IF NOT EXISTS {self.db}.{name}{on_cluster} AS {self.db}.{local} "
                         f"ENGINE = Distributed('{self.opt.cluster}', '{self.db}', '{local}', {shard_key})")
        return stmts

    def ddl(self) -> list[str]:
        on_cluster = f" ON CLUSTER '{self.opt.cluster}'" if self.opt.cluster else ""
        out = [f"CREATE DATABASE IF NOT EXISTS {self.db}{on_cluster}"]
        for name in TABLES:
            out += self._ddl_for(name)
        # columns added after the first release: existing stores gain them (on a cluster, the local tables
        # and the Distributed tables in front of them)
        added = [("hosts", "instance_id String DEFAULT ''"), ("proc_windows", f"active_attr_us {U32}"),
                 ("proc_windows", f"held_attr_us {U32}"),
                 ("sessions", "dropped_windows SimpleAggregateFunction(max, UInt64) DEFAULT 0")]
        for table, col in added:
            names = [f"{table}_local", table] if self.opt.cluster else [table]
            for name in names:
                out.append(f"ALTER TABLE {self.db}.{name}{on_cluster} ADD COLUMN IF NOT EXISTS {col}")
        return out

    def local(self, table: str) -> str:
        """The table that holds the rows (on a cluster, the shard-local one), for mutations."""
        return f"{self.db}.{table}_local" if self.opt.cluster else f"{self.db}.{table}"

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER '{self.opt.cluster}'" if self.opt.cluster else ""

    def create_schema(self) -> None:
        with self._lock:
            for stmt in self.ddl():
                try:
                    self.client.command(stmt)
                except Exception as e:
                    raise StoreError(f"creating the schema failed: {e}", is_retryable(e)) from e

    # ------------------------------------------------------------------ writes
    def insert(self, tables: dict[str, pa.Table]) -> None:
        """Insert one group commit in INSERT_ORDER. A failure part-way leaves no facts without their windows
        and no rollup mark before its windows; a retry re-inserts the windows, which the ReplacingMergeTree
        tables count once."""
        t0 = time.perf_counter()
        # on a cluster, an insert into a Distributed table returns only once every shard has it: an
        # acknowledgement still means stored
        settings = {"insert_distributed_sync": 1} if self.opt.cluster else None
        with self._lock:
            try:
                for name in INSERT_ORDER:
                    t = tables.get(name)
                    if t is not None and t.num_rows:
                        self.client.insert_arrow(f"{self.db}.{name}", t, settings=settings)
            except Exception as e:  # clickhouse-connect raises several types; sort them by error code
                raise StoreError(f"insert failed: {e}", is_retryable(e)) from e
        self.insert_seconds += time.perf_counter() - t0
        self.inserts += 1

    def insert_table(self, name: str, table: pa.Table) -> None:
        settings = {"insert_distributed_sync": 1} if self.opt.cluster else None
        with self._lock:
            try:
                self.client.insert_arrow(f"{self.db}.{name}", table, settings=settings)
            except Exception as e:
                raise StoreError(f"insert into {name} failed: {e}", is_retryable(e)) from e

    # ------------------------------------------------------------------ reads
    def report_settings(self) -> dict:
        s = {"max_memory_usage": int(self.opt.report_memory_bytes),
             "max_bytes_before_external_group_by": int(self.opt.report_memory_bytes) // 2,
             "max_bytes_before_external_sort": int(self.opt.report_memory_bytes) // 2,
             "join_algorithm": "grace_hash,parallel_hash,hash"}
        if self.opt.report_threads:
            s["max_threads"] = int(self.opt.report_threads)
        return s

    @contextmanager
    def reader(self):
        """A connection of the readers' pool (blocks while all are busy)."""
        client = self._readers.get()
        try:
            if self._reader_lock is not None:
                with self._reader_lock:
                    yield client
            else:
                yield client
        finally:
            self._readers.put(client)

    def query_arrow(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> pa.Table:
        with self.reader() as c:
            return c.query_arrow(sql, parameters=parameters or {}, settings=settings or {})

    def query_rows(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> list[tuple]:
        with self.reader() as c:
            return c.query(sql, parameters=parameters or {}, settings=settings or {}).result_rows

    def report_rows(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        """A report query: bounded memory (spills to disk), on a reader connection."""
        return self.query_rows(sql, parameters, self.report_settings())

    def command(self, sql: str, parameters: dict | None = None, settings: dict | None = None):
        """A statement on a reader connection (INSERT ... SELECT of the sealer, maintenance)."""
        with self.reader() as c:
            try:
                return c.command(sql, parameters=parameters or {}, settings=settings or {})
            except Exception as e:
                raise StoreError(f"{sql.split(None, 1)[0]} failed: {e}", is_retryable(e)) from e

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
        clients = [self.client]
        while True:
            try:
                clients.append(self._readers.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            for c in dict.fromkeys(clients):  # a shared client once
                try:
                    c.close()
                except Exception:  # closing twice, or an engine already gone
                    pass
