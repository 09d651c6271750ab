"""Imported cost data in the store: cloud bills and AI API spend beside the telemetry.

Storage (tables in store.TABLES):
  bill_rows       the normalized rows of bills.BILL_SCHEMA, plus the import they came with
  api_spend_rows  the normalized rows of apispend.API_SPEND_SCHEMA, plus their import
  import_slices   (kind, slice_key) -> import_id: the import that currently stands for a slice

An import is one client stream (Admin.Import): every file of one delivery. The client parses the
files (bills.py, apispend.py) and sends Arrow chunks; `Importer` checks each chunk against the
schema this collector knows, refuses rows it cannot store (naming file, line and column), and
inserts the rest under the import's id. Nothing counts until the final chunk: `Importer.commit`
then writes one import_slices row per slice the import stored rows for, and from that moment
reports read those slices from this import only (`current_sql`). Re-importing a file, or a newer
export of the same period, replaces its slices and never doubles; slices it does not cover keep
their earlier rows. An import that fails or ends without its final chunk changes nothing (its rows
are deleted). The highest import id wins a slice (ids grow with the collector's clock), so two
imports of the same slice racing each other settle on the later one whatever order they finish
in. Rows of replaced imports are deleted in the background (a ClickHouse mutation); reports never
depend on that.

Reads for reports:
  `BillPrices`     the bill's price per instance-hour of each GPU instance and month
                   (effective cost by default, or billed), keyed by the instance id inside the
                   bill's ResourceId (`bills.instance_key`) and by a `gpuledger_host` tag;
  `report_pricing` the collector's Pricing with the bill prices in front: for a host whose
                   instance id (HostFacts.instance_id, from the agent) is billed in a month, the
                   bill's price replaces the catalog / override price for that month in every
                   report (price method "bill_effective/gpu_count" or "bill_billed/gpu_count",
                   the source names the bill files); other hosts and months keep their price;
  `bill_groups`    the bill's cost in a range (rows prorated by the overlap of their charge
                   period), grouped by kind (GPU instance, AI service, other), resource and tags;
  `api_spend`      the API spend in a range (reported cost rows; priced usage only for days
                   without a reported cost), grouped by vendor, team, model and line item;
  `spend_columns`  the API and unwatched-GPU spend per label, for `gpuledger cost --by ...`.

A GPU instance in the bill is *watched* when an agent reports its instance id (or the bill tags it
`gpuledger_host=<host_id>`); one no agent reports is *unwatched* GPU spend. Managed AI services
that bill GPU instance types (SageMaker `ml.*`) are AI services, not GPU instances: no agent can
run there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpuledger.collector.apispend import API_SPEND_SCHEMA
from gpuledger.collector.bills import BILL_SCHEMA, instance_key
from gpuledger.collector.pricing import Price
from gpuledger.collector.store import Store, StoreError
from gpuledger.v1 import telemetry_pb2 as pb

log = logging.getLogger("gpuledger.billing")

KINDS = {"bill": ("bill_rows", BILL_SCHEMA), "api_spend": ("api_spend_rows", API_SPEND_SCHEMA)}
MAX_CHUNK_ROWS = 2_000_000
MAX_SLICES = 200_000
MAX_REFUSALS_KEPT = 1000  # per import, in the reply (every refused row is counted)
FLUSH_ROWS = 262_144  # rows gathered before one insert (fewer, larger inserts; memory stays bounded)
FLUSH_BYTES = 64 << 20
HOST_TAG = "gpuledger_host"  # a bill tag naming the agent's host_id of an instance
HOUR_UNITS = ("hours", "hour", "hrs", "hr", "h", "instance-hours", "instance hours")
MS_PER_HOUR = 3_600_000.0
_PERIOD = re.compile(r"^\d{4}-\d{2}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ImportRefused(ValueError):
    """The import as a whole cannot be stored (the message names the file and field)."""


# ----------------------------------------------------------------------------- import ids

_id_lock = threading.Lock()
_last_id = 0


def new_import_id(now_us: int) -> int:
    """Increasing ids from the collector's clock (microseconds), unique within this process."""
    global _last_id
    with _id_lock:
        _last_id = max(int(now_us), _last_id + 1)
        return _last_id


# ----------------------------------------------------------------------------- storing an import


@dataclass
class _FileTally:
    stored: int = 0
    refused: int = 0


class Importer:
    """One import: `add` each chunk, then `commit` (or `abort`). Blocking; run off the event loop."""

    def __init__(self, store: Store, now_us: int, max_refusals: int = MAX_REFUSALS_KEPT) -> None:
        self.store = store
        self.import_id = new_import_id(now_us)
        self.committed_ms = int(now_us) // 1000
        self.kind = ""
        self.max_refusals = max_refusals
        self.files: dict[str, _FileTally] = {}
        self.refusals: list[pb.ImportIssue] = []
        self.slice_rows: dict[str, int] = defaultdict(int)
        self.slice_files: dict[str, set[str]] = defaultdict(set)
        self.declared: set[str] = set()
        self.warnings: list[str] = []
        self.rows_stored = 0
        self.inserted = False
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    # -- checks
    def _refuse_row(self, file: str, line: int, column: str, value, message: str) -> None:
        if len(self.refusals) < self.max_refusals:
            self.refusals.append(pb.ImportIssue(file=file, line=int(line), column=column,
                                                value="" if value is None else str(value)[:200], message=message,
                                                refused=True))

    def _conform(self, table: pa.Table, schema: pa.Schema, file: str) -> pa.Table:
        """The body in this collector's schema: known columns cast to their type, nullable ones an older
        client lacks as nulls; unknown ones (a newer client) dropped and named in the warnings."""
        extra = [c for c in table.column_names if c not in schema.names]
        if extra:
            note = f"{file}: column(s) {', '.join(sorted(extra)[:10])} unknown to this collector: ignored"
            if note not in self.warnings:
                self.warnings.append(note)
        cols = []
        for f in schema:
            if f.name in table.column_names:
                col = table.column(f.name)
                if pa.types.is_dictionary(col.type) and col.type.value_type == f.type:
                    cols.append(col)  # a dictionary-encoded text column: stored as it is (LowCardinality-friendly)
                    continue
                if col.type != f.type:
                    try:
                        col = col.cast(f.type)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                        raise ImportRefused(f"{file}: column {f.name}: type {col.type} cannot be stored as {f.type} "
                                            f"({e})") from e
            elif f.nullable:
                col = pa.nulls(table.num_rows, f.type)
            else:
                raise ImportRefused(f"{file}: column {f.name} is missing; this collector needs it (a client older "
                                    "than the collector's schema? upgrade the client)")
            cols.append(col)
        return pa.Table.from_arrays(cols, schema=pa.schema([f.with_nullable(True).with_type(c.type)
                                                            for f, c in zip(schema, cols, strict=True)]))

    def _row_checks(self, t: pa.Table, schema: pa.Schema, file: str) -> np.ndarray:
        """Rows that can be stored; every other row is refused with its line and column."""
        n = t.num_rows
        bad = np.zeros(n, bool)
        lines = t.column("row_number").fill_null(0).to_numpy(zero_copy_only=False)
        reasons: list[tuple[np.ndarray, str, pa.ChunkedArray | None, str]] = []
        for f in schema:
            if not f.nullable and t.column(f.name).null_count:
                reasons.append((_mask(pc.is_null(t.column(f.name))), f.name, None, "empty; this column is required"))
        money = ("billed_cost", "effective_cost", "list_cost") if self.kind == "bill" else ("cost",)
        for name in money:
            col = t.column(name)
            reasons.append((_mask(pc.and_(pc.is_valid(col), pc.invert(pc.is_finite(col)))), name, col,
                            "not a finite amount"))
        if self.kind == "bill":
            period = _plain(t.column("billing_period"))
            reasons.append((_mask(pc.invert(pc.fill_null(pc.match_substring_regex(period, _PERIOD.pattern), True))),
                            "billing_period", period, "not YYYY-MM"))
            want = pc.binary_join_element_wise(_plain(t.column("provider")), _plain(t.column("billing_account_id")),
                                               period, "|")
        else:
            day = pc.strftime(pc.cast(t.column("bucket_start_ms"), pa.timestamp("ms", tz="UTC")), "%Y-%m-%d")
            want = pc.binary_join_element_wise(_plain(t.column("vendor")), _plain(t.column("endpoint")), day, "|")
            ends = t.column("bucket_end_ms")
            reasons.append((_mask(pc.less(ends, t.column("bucket_start_ms"))), "bucket_end_ms", ends,
                            "before bucket_start_ms"))
        key = _plain(t.column("slice_key"))
        reasons.append((_mask(pc.and_(pc.is_valid(want), pc.not_equal(key, want))), "slice_key", key,
                        "does not match the row's own " + ("provider|billing_account_id|billing_period"
                                                            if self.kind == "bill" else "vendor|endpoint|day")))
        for mask, column, values, message in reasons:
            for i in np.flatnonzero(mask & ~bad):
                self._refuse_row(file, lines[i], column, None if values is None else values[int(i)].as_py(), message)
            bad |= mask
        return ~bad

    # -- the stream
    def add(self, chunk: pb.ImportChunk) -> None:
        kind = chunk.kind
        if kind not in KINDS:
            raise ImportRefused(f"kind: {kind!r} is not bill or api_spend")
        if self.kind and kind != self.kind:
            raise ImportRefused(f"kind: {kind!r} after {self.kind!r}: one import holds one kind")
        self.kind = kind
        file = chunk.file_name.rsplit("/", 1)[-1]
        if not file or len(file) > 256:
            raise ImportRefused("file_name: required, at most 256 characters")
        tally = self.files.setdefault(file, _FileTally())
        for k in chunk.slice_keys:
            if len(k) > 512:
                raise ImportRefused(f"{file}: slice_keys: a key longer than 512 characters")
        self.declared.update(chunk.slice_keys)
        if len(self.declared) > MAX_SLICES:
            raise ImportRefused(f"slice_keys: more than {MAX_SLICES} slices in one import")
        tally.refused += chunk.refused_rows
        for issue in chunk.issues:
            if issue.refused and len(self.refusals) < self.max_refusals:
                self.refusals.append(issue)
        if not chunk.arrow:
            return
        table_name, schema = KINDS[kind]
        try:
            body = pa.ipc.open_stream(pa.py_buffer(chunk.arrow)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ImportRefused(f"{file}: arrow: not an Arrow IPC stream ({e})") from e
        if body.num_rows > MAX_CHUNK_ROWS:
            raise ImportRefused(f"{file}: arrow: {body.num_rows} rows in one chunk (at most {MAX_CHUNK_ROWS})")
        if body.num_rows == 0:
            return
        t = self._conform(body, schema, file)
        keys = pc.unique(_plain(t.column("slice_key")).drop_null()).to_pylist()
        undeclared = [k for k in keys if k not in self.declared]
        if undeclared:
            raise ImportRefused(f"{file}: slice_key {undeclared[0]!r} of a row is not among the chunk's slice_keys")
        names = pc.unique(_plain(t.column("source_file")).drop_null()).to_pylist()
        if any(n != file for n in names):
            raise ImportRefused(f"{file}: source_file {next(n for n in names if n != file)!r} differs from the "
                                "chunk's file_name")
        ok = self._row_checks(t, schema, file)
        tally.refused += int((~ok).sum())
        if not ok.all():
            t = t.filter(pa.array(ok))
        if t.num_rows == 0:
            return
        t = t.append_column("import_id", pa.array(np.full(t.num_rows, self.import_id, np.int64)))
        self._pending.append(t)
        self._pending_rows += t.num_rows
        self._pending_bytes += t.nbytes
        if self._pending_rows >= FLUSH_ROWS or self._pending_bytes >= FLUSH_BYTES:
            self._flush()
        tally.stored += t.num_rows
        self.rows_stored += t.num_rows
        counts = pc.value_counts(_plain(t.column("slice_key"))).to_pylist()
        for c in counts:
            self.slice_rows[c["values"]] += int(c["counts"])
            self.slice_files[c["values"]].add(file)

    def _flush(self) -> None:
        """Insert the rows gathered so far (chunks with different dictionaries are unified first)."""
        if not self._pending:
            return
        parts, self._pending = self._pending, []
        self._pending_rows = self._pending_bytes = 0
        self.inserted = True
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        self.store.insert_table(KINDS[self.kind][0], table.unify_dictionaries().combine_chunks())

    def commit(self) -> pb.ImportReply:
        """Make the import count: its slices now read from it alone."""
        self._flush()
        slices = sorted(self.slice_rows)
        if slices:
            self._warn_dropped_parts(slices)
            self.store.insert_table("import_slices", pa.table({
                "kind": pa.array([self.kind] * len(slices)), "slice_key": pa.array(slices),
                "import_id": pa.array([self.import_id] * len(slices), pa.int64()),
                "committed_ms": pa.array([self.committed_ms] * len(slices), pa.int64()),
                "rows": pa.array([self.slice_rows[s] for s in slices], pa.uint64()),
                "files": pa.array([sorted(self.slice_files[s]) for s in slices], pa.list_(pa.string()))}))
            self._drop_older(slices)
        files = []
        for name, tally in self.files.items():
            files.append(pb.ImportFile(file_name=name, rows_stored=tally.stored, rows_refused=tally.refused,
                                       refusals=[r for r in self.refusals if r.file == name]))
        return pb.ImportReply(rows_stored=self.rows_stored, slices_replaced=slices, files=files,
                              warnings=self.warnings, import_id=self.import_id)

    def _warn_dropped_parts(self, slices: list[str]) -> None:
        """Say so when a slice was last imported from files this import does not hold: their rows of that
        slice stop counting (the parts of one delivery belong in one import)."""
        rows = self.store.query_rows(
            f"""SELECT slice_key, argMax(files, import_id) FROM {self.store.db}.import_slices
                WHERE kind = {{kind:String}} AND slice_key IN {{slices:Array(String)}} GROUP BY slice_key""",
            {"kind": self.kind, "slices": slices})
        mine = set(self.files)
        gone: dict[tuple, list[str]] = defaultdict(list)
        for key, files in rows:
            missing = tuple(sorted(set(files) - mine))
            if missing:
                gone[missing].append(key)
        for files, keys in gone.items():
            self.warnings.append(f"{len(keys)} slice(s) ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}) were "
                                 f"last imported from {', '.join(files[:5])}, not in this import: their rows there no "
                                 "longer count (import all parts of one delivery together)")

    def abort(self) -> None:
        """Forget the rows of an import that did not finish (they never counted)."""
        self._pending = []
        if self.inserted and self.kind:
            self._mutate(f"import_id = {int(self.import_id)}")

    def _drop_older(self, slices: list[str]) -> None:
        self._mutate(f"slice_key IN {{slices:Array(String)}} AND import_id < {int(self.import_id)}", {"slices": slices})

    def _mutate(self, where: str, params: dict | None = None) -> None:
        table = KINDS[self.kind][0]
        opt = self.store.opt
        local = f"{table}_local" if opt.cluster else table
        on_cluster = f" ON CLUSTER '{opt.cluster}'" if opt.cluster else ""
        try:
            self.store.command(f"ALTER TABLE {self.store.db}.{local}{on_cluster} DELETE WHERE {where}", params or {},
                               {"mutations_sync": 0})
        except StoreError as e:  # rows no import_slices row points at never count: cleaning up can wait
            log.warning("import %d: removing replaced rows failed (they do not count): %s", self.import_id, e)


def _plain(col):
    """A dictionary-encoded column as plain values (for computing checks on it)."""
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def _mask(b) -> np.ndarray:
    if isinstance(b, pa.ChunkedArray):
        b = b.combine_chunks()
    return pc.cast(pc.fill_null(b, False), pa.int8()).to_numpy(zero_copy_only=False).astype(bool)


async def serve_import(store: Store, now_us: int, request_iterator, context) -> pb.ImportReply:
    """Admin.Import: store the chunks as they arrive (one at a time: memory stays at one chunk), commit
    on the final one. A refused import or a failure aborts it: nothing of it counts."""
    loop = asyncio.get_running_loop()
    imp = Importer(store, now_us)
    try:
        final = False
        async for chunk in request_iterator:
            if final:
                raise ImportRefused("final: a chunk came after the final one")
            await loop.run_in_executor(None, imp.add, chunk)
            final = chunk.final
        if not final:
            raise ImportRefused("final: the stream ended without its final chunk; nothing was imported")
        return await loop.run_in_executor(None, imp.commit)
    except ImportRefused as e:
        await loop.run_in_executor(None, imp.abort)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except StoreError as e:
        await loop.run_in_executor(None, imp.abort)
        await context.abort(grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.INTERNAL,
                            f"store: {e}; nothing was imported")
    except asyncio.CancelledError:  # the client went away: nothing of this import counts
        await asyncio.shield(loop.run_in_executor(None, imp.abort))
        raise


# ----------------------------------------------------------------------------- reading the current rows


def current_sql(store: Store, kind: str) -> str:
    """A subquery of the rows that count: each slice from its newest committed import."""
    table = KINDS[kind][0]
    glob = "GLOBAL " if store.opt.cluster else ""
    return (f"(SELECT * FROM {store.db}.{table} WHERE (slice_key, import_id) {glob}IN "
            f"(SELECT slice_key, max(import_id) FROM {store.db}.import_slices WHERE kind = '{kind}' "
            "GROUP BY slice_key))")


def _overlap_sql(start: str, end: str) -> str:
    """Fraction of a row's [start, end) inside [{since}, {until}); a row without a period counts whole
    when it starts inside."""
    return (f"if(ifNull({end}, 0) > {start}, greatest(0, least({end}, {{until:Int64}}) - greatest({start}, "
            f"{{since:Int64}})) / ({end} - {start}), if({start} >= {{since:Int64}} AND {start} < {{until:Int64}}, "
            "1, 0))")


_IN_RANGE = ("charge_period_start_ms < {until:Int64} AND greatest(ifNull(charge_period_end_ms, 0), "
             "charge_period_start_ms + 1) > {since:Int64}")
_KIND = ("multiIf(is_gpu_instance AND NOT startsWith(ifNull(instance_type, ''), 'ml.') AND "
         "ifNull(service_category, '') != 'AI and Machine Learning', 'gpu_instance', ai_related, 'ai_service', "
         "'other')")
_HOURS = (f"if(charge_category = 'Usage' AND lower(ifNull(consumed_unit, '')) IN {HOUR_UNITS!r}, "
          "ifNull(consumed_quantity, 0), 0)")


def _cost_col(basis: str) -> str:
    if basis not in ("effective", "billed"):
        raise ValueError(f"basis: {basis!r} is not effective or billed")
    return "effective_cost" if basis == "effective" else "billed_cost"


def has_bill(store: Store) -> bool:
    return bool(store.report_rows(f"SELECT count() FROM {store.db}.import_slices WHERE kind = 'bill'")[0][0])


# ----------------------------------------------------------------------------- the bill as a price input


@dataclass(frozen=True)
class BillPrice:
    per_instance_hour: float
    currency: str
    gpu_count: int  # 0: unknown (the host's own count is used)
    instance_type: str
    source: str


def _month_start(ms: int) -> int:
    d = datetime.fromtimestamp(ms / 1000, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp() * 1000)


def _next_month(ms: int) -> int:
    d = datetime.fromtimestamp(ms / 1000, UTC)
    return int(datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC).timestamp() * 1000)


def _yyyymm_ms(yyyymm: int) -> int:
    return int(datetime(yyyymm // 100, yyyymm % 100, 1, tzinfo=UTC).timestamp() * 1000)


@dataclass
class BillPrices:
    """Per (instance key or host tag, month start ms): the bill's price per instance-hour."""

    prices: dict[tuple[str, int], BillPrice] = field(default_factory=dict)
    basis: str = "effective"
    files: tuple[str, ...] = ()

    @classmethod
    def load(cls, store: Store, since: int, until: int, basis: str = "effective") -> BillPrices:
        """The prices of every GPU instance billed in the months [since, until) touches: the month's
        cost of the instance (all its rows) over its instance-hours (Usage rows in an hour unit, or the
        distinct charge periods of its Usage rows where the bill gives no hour unit)."""
        cost = _cost_col(basis)
        lo, hi = _month_start(since), _next_month(max(since, until - 1))
        rows = store.report_rows(
            f"""SELECT ifNull(resource_id, ''), tags['{HOST_TAG}'] AS host,
                       toYYYYMM(toDateTime(intDiv(charge_period_start_ms, 1000), 'UTC')) AS month,
                       sum({cost}), sum({_HOURS}),
                       arraySum(x -> (x.2 - x.1), groupUniqArrayIf((charge_period_start_ms,
                           ifNull(charge_period_end_ms, charge_period_start_ms)), charge_category = 'Usage')),
                       anyIf(instance_type, instance_type IS NOT NULL), max(ifNull(gpu_count, 0)), any(currency),
                       groupUniqArray(source_file)
                FROM {current_sql(store, 'bill')}
                WHERE {_KIND} = 'gpu_instance' AND charge_period_start_ms >= {{lo:Int64}}
                      AND charge_period_start_ms < {{hi:Int64}}
                      AND (ifNull(resource_id, '') != '' OR tags['{HOST_TAG}'] != '')
                GROUP BY resource_id, host, month""", {"lo": lo, "hi": hi})
        out: dict[tuple[str, int], BillPrice] = {}
        files: set[str] = set()
        for rid, host, month, total, hours_q, dur_ms, itype, gpus, currency, names in rows:
            hours = float(hours_q) if hours_q and hours_q > 0 else float(dur_ms or 0) / MS_PER_HOUR
            if hours <= 0:
                continue
            files.update(names)
            p = BillPrice(float(total) / hours, currency or "USD", int(gpus or 0), itype or "",
                          "bill " + ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else ""))
            m = _yyyymm_ms(int(month))
            if rid:
                out[("id:" + instance_key(rid), m)] = p
            if host:
                out.setdefault(("host:" + host, m), p)
        return cls(out, basis, tuple(sorted(files)))

    def lookup(self, instance_id: str, host_id: str, at_ms: int) -> BillPrice | None:
        m = _month_start(at_ms)
        if instance_id:
            p = self.prices.get(("id:" + instance_key(instance_id), m))
            if p is not None:
                return p
        return self.prices.get(("host:" + host_id, m)) if host_id else None

    def edges(self, since: int, until: int) -> list[int]:
        """Month starts strictly inside (since, until) where a bill price may start or end."""
        months = {m for _, m in self.prices}
        out = []
        for m in sorted(months | {_next_month(m) for m in months}):
            if since < m < until:
                out.append(m)
        return out

    def __bool__(self) -> bool:
        return bool(self.prices)


class BillPricing:
    """A Pricing with the bill in front: `price()` answers the bill's price per GPU-hour for a billed
    instance and month, and asks the wrapped Pricing otherwise. Everything else is the wrapped one's."""

    def __init__(self, base, bill: BillPrices, since: int, until: int) -> None:
        self.base = base
        self.bill = bill
        self._edges = bill.edges(since, until)
        self.sources = list(base.sources) + ([f"bill {bill.basis} prices ({', '.join(bill.files[:3])}"
                                              f"{' ...' if len(bill.files) > 3 else ''})"] if bill else [])

    def __getattr__(self, name):
        return getattr(self.base, name)

    def price(self, provider: str, region: str, instance_type: str, gpu_count: int, host_id: str, at_ms: int, *,
              tags=None, instance_id: str = "") -> Price | None:
        bp = self.bill.lookup(instance_id, host_id, at_ms)
        if bp is not None:
            gpus = bp.gpu_count or gpu_count or 1
            return Price(bp.per_instance_hour / gpus, bp.currency, f"bill_{self.bill.basis}/gpu_count", bp.source)
        return self.base.price(provider, region, instance_type, gpu_count, host_id, at_ms, tags=tags,
                               instance_id=instance_id)

    def breakpoints(self) -> list[int]:
        return sorted(set(self.base.breakpoints()) | set(self._edges))


def report_pricing(store: Store, pricing, since: int, until: int, basis: str = "effective"):
    """The pricing a report over [since, until) uses: the bill's prices in front where a bill is imported."""
    base = pricing.base if isinstance(pricing, BillPricing) else pricing
    bill = BillPrices.load(store, since, until, basis)
    return BillPricing(base, bill, since, until) if bill else base


# ----------------------------------------------------------------------------- the bill in a range


@dataclass
class BillGroup:
    kind: str              # gpu_instance | ai_service | other
    resource_id: str       # GPU instances only
    host_tag: str          # the gpuledger_host tag of a GPU instance
    team: str
    project: str
    phase: str
    workload: str
    currency: str
    instance_type: str
    gpu_count: int
    service: str
    cost: float            # prorated to the range, on the basis asked
    positive_cost: float   # of the rows with a positive cost (tagging shares)
    hours: float           # instance-hours (GPU instances)
    rows: int


def bill_groups(store: Store, since: int, until: int, basis: str = "effective") -> list[BillGroup]:
    cost = _cost_col(basis)
    f = _overlap_sql("charge_period_start_ms", "charge_period_end_ms")
    rows = store.report_rows(
        f"""SELECT kind, rid, host, team, project, phase, workload, currency, any(itype), max(gpus),
                   any(service), sum(c * f), sumIf(c * f, c > 0), sum(hq * f),
                   arraySum(x -> (least(x.2, {{until:Int64}}) - greatest(x.1, {{since:Int64}})),
                            groupUniqArrayIf((s, e), usage AND e > s)) / {MS_PER_HOUR}, count()
            FROM (SELECT {_KIND} AS kind, if(kind = 'gpu_instance', ifNull(resource_id, ''), '') AS rid,
                         if(kind = 'gpu_instance', tags['{HOST_TAG}'], '') AS host, ifNull(team, '') AS team,
                         ifNull(project, '') AS project, ifNull(phase, '') AS phase,
                         ifNull(workload, '') AS workload, currency, ifNull(instance_type, '') AS itype,
                         ifNull(gpu_count, 0) AS gpus, ifNull(service_name, '') AS service, {cost} AS c, {f} AS f,
                         {_HOURS} AS hq, charge_category = 'Usage' AS usage, charge_period_start_ms AS s,
                         ifNull(charge_period_end_ms, charge_period_start_ms) AS e
                  FROM {current_sql(store, 'bill')} WHERE {_IN_RANGE})
            GROUP BY kind, rid, host, team, project, phase, workload, currency""",
        {"since": since, "until": until})
    out = []
    for kind, rid, host, team, project, phase, workload, currency, itype, gpus, service, c, pos, hq, hd, n in rows:
        hours = float(hq) if hq and hq > 0 else max(0.0, float(hd or 0))
        out.append(BillGroup(kind, rid, host, team, project, phase, workload, currency, itype, int(gpus or 0),
                             service, float(c or 0), float(pos or 0), hours if kind == "gpu_instance" else 0.0,
                             int(n)))
    return out


@dataclass
class BilledInstance:
    """One GPU instance of the bill in a range, and the host that watches it (if any)."""

    resource_id: str
    key: str               # instance key (bills.instance_key) or host tag
    host_id: str           # "" when no agent reports it
    instance_type: str
    gpu_count: int
    cost: float
    hours: float           # billed instance-hours in the range
    currency: str
    teams: dict = field(default_factory=dict)   # team -> cost
    groups: list = field(default_factory=list)

    @property
    def billed_gpu_hours(self) -> float:
        return self.hours * (self.gpu_count or 0)

    @property
    def price_per_instance_hour(self) -> float | None:
        return self.cost / self.hours if self.hours else None


def billed_instances(groups: list[BillGroup], hosts: dict) -> list[BilledInstance]:
    """The GPU instances of the bill, matched to hosts by instance id, else by the gpuledger_host tag."""
    by_key = {instance_key(h.instance_id): h.host_id for h in hosts.values() if h.instance_id}
    out: dict[str, BilledInstance] = {}
    for g in groups:
        if g.kind != "gpu_instance":
            continue
        key = instance_key(g.resource_id) if g.resource_id else ""
        ident = key or (f"host:{g.host_tag}" if g.host_tag else f"(no resource id) {g.instance_type}")
        inst = out.get(ident)
        if inst is None:
            host = by_key.get(key, "") if key else ""
            if not host and g.host_tag in hosts:
                host = g.host_tag
            inst = out[ident] = BilledInstance(g.resource_id or ident, ident, host, g.instance_type, g.gpu_count,
                                               0.0, 0.0, g.currency)
        inst.cost += g.cost
        inst.hours += g.hours
        inst.gpu_count = inst.gpu_count or g.gpu_count
        inst.instance_type = inst.instance_type or g.instance_type
        inst.teams[g.team] = inst.teams.get(g.team, 0.0) + g.cost
        inst.groups.append(g)
    return sorted(out.values(), key=lambda i: (-i.cost, i.resource_id))


# ----------------------------------------------------------------------------- API spend in a range


@dataclass
class ApiGroup:
    vendor: str
    endpoint: str
    team: str
    application: str
    model: str
    line_item: str
    currency: str
    cost: float


REPORTED_ENDPOINTS = ("costs", "cost_report")


def api_spend(store: Store, since: int, until: int) -> list[ApiGroup]:
    """The API spend in the range: the vendors' reported cost rows; priced usage rows only for the
    vendor-days without a reported cost (never both: they are the same money). Anthropic's per-key split
    rows (cost_by_api_key) re-share reported amounts and are not added."""
    f = _overlap_sql("bucket_start_ms", "bucket_end_ms")
    rows = store.report_rows(
        f"""SELECT vendor, endpoint, cost_basis, toDate(toDateTime(intDiv(bucket_start_ms, 1000), 'UTC')) AS day,
                   ifNull(team, ''), ifNull(application, ''), ifNull(model, ''), ifNull(line_item, ''),
                   ifNull(currency, 'USD'), sum(cost * {f})
            FROM {current_sql(store, 'api_spend')}
            WHERE cost IS NOT NULL AND bucket_start_ms < {{until:Int64}} AND bucket_end_ms > {{since:Int64}}
            GROUP BY vendor, endpoint, cost_basis, day, team, application, model, line_item, currency""",
        {"since": since, "until": until})
    reported_days = {(r[0], r[3]) for r in rows if r[1] in REPORTED_ENDPOINTS}
    out = []
    for vendor, endpoint, basis, day, team, app, model, item, currency, cost in rows:
        if endpoint in REPORTED_ENDPOINTS or (basis == "usage x price" and endpoint != "cost_by_api_key"
                                              and (vendor, day) not in reported_days):
            out.append(ApiGroup(vendor, endpoint, team, app, model, item, currency, float(cost or 0)))
    return out


# ----------------------------------------------------------------------------- cost report columns


def _label_of(by: str, team: str, project: str, phase: str, workload: str, tags: dict) -> str:
    known = {"team": team, "project": project, "phase": phase, "workload": workload}
    if by in known:
        return known[by]
    return str(tags.get(by, ""))


def spend_columns(store: Store, rows: list[dict], by: str, since: int, until: int, hosts: dict | None = None) -> \
        list[dict]:
    """The cost report's rows with `api_cost` and `unwatched_gpu_cost` per label (0 where none), and
    rows for labels that only API or unwatched spend has. API spend is labelled by its mapped team (or
    application for `--by project`); unwatched GPU instances by their bill tags (team, project,
    phase, workload columns, else the tag of that key), by resource id for `--by host`."""
    from gpuledger.collector import allocation

    api: dict[str, float] = defaultdict(float)
    unwatched: dict[str, float] = defaultdict(float)
    if by != "process":
        for g in api_spend(store, since, until):
            label = g.team if by == "team" else g.application if by == "project" else ""
            api[label or "(untagged)"] += g.cost
        hosts = allocation.load_hosts(store) if hosts is None else hosts
        groups = bill_groups(store, since, until)
        tags = _group_tags(store, since, until) if by not in ("team", "project", "phase", "workload", "host") else {}
        for inst in billed_instances(groups, hosts):
            if inst.host_id:
                continue
            for g in inst.groups:
                label = inst.resource_id if by == "host" else _label_of(
                    by, g.team, g.project, g.phase, g.workload, tags.get(g.resource_id, {}))
                unwatched[label or "(untagged)"] += g.cost
    seen = set()
    for r in rows:
        label = str(r.get(by))
        seen.add(label)
        r["api_cost"] = api.get(label, 0.0)
        r["unwatched_gpu_cost"] = unwatched.get(label, 0.0)
        r["total_cost"] = (r.get("cost") or 0.0) + r["api_cost"] + r["unwatched_gpu_cost"]
    extra = []
    for label in sorted(set(api) | set(unwatched)):
        if label in seen:
            continue
        a, u = api.get(label, 0.0), unwatched.get(label, 0.0)
        extra.append({by: label, "cost": 0.0, "api_cost": a, "unwatched_gpu_cost": u, "total_cost": a + u})
    extra.sort(key=lambda r: -r["total_cost"])
    return rows + extra


def _group_tags(store: Store, since: int, until: int) -> dict[str, dict]:
    """Tags of the GPU instances billed in the range (by resource id), for grouping by any tag key."""
    rows = store.report_rows(
        f"""SELECT ifNull(resource_id, ''), any(tags) FROM {current_sql(store, 'bill')}
            WHERE {_IN_RANGE} AND {_KIND} = 'gpu_instance' GROUP BY resource_id""", {"since": since, "until": until})
    return {r[0]: dict(r[1]) for r in rows}


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
