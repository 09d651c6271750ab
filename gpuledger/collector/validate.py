"""Validation of every incoming batch. A failure names the field and, where it helps, the row.

Everything is checked before anything is stored, so a rejected batch is never half-stored. What
can be computed from one batch alone is computed here too, off the single writer's thread: each
GPU's first window, and who pays for each GPU window's time (`attribute`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import unknown_fields

from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA, GPU_WINDOW_SCHEMA, HIST_BUCKETS, PROC_WINDOW_SCHEMA
from gpuledger.v1 import telemetry_pb2 as pb

MAX_ID = 128
MAX_STR = 256
MAX_TAGS = 64
# bidirectional-text controls: they can make a report display something else than it holds
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class Invalid(ValueError):
    """A permanent problem with a batch: answered with INVALID_ARGUMENT."""


class TooLarge(ValueError):
    """A batch over a size limit: answered with RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class Limits:
    max_batch_rows: int = 200_000
    max_gpus: int = 1024
    max_processes: int = 100_000
    max_future_ms: int = 300_000
    retention_ms: int = 0  # 0: no lower bound on window start
    max_months: int = 3  # distinct calendar months (store partitions) one batch may touch


@dataclass
class Valid:
    batch: pb.WindowBatch
    gpu: pa.Table
    proc: pa.Table  # with active_attr_us, held_attr_us (see attribute)
    first_window_ms: dict  # per GPU UUID: its earliest window in this batch
    endpoint: pa.Table | None = None
    warnings: list = None  # accepted, with a note the agent is told in its acknowledgement
    session_start_ms: int | None = None  # the batch's, once bounded by the ingest (None: as sent)
    declared_first: dict | None = None  # per GPU: first_window_ms as declared, once bounded by the ingest

    def __post_init__(self) -> None:
        if self.warnings is None:
            self.warnings = []
        if self.endpoint is None:
            self.endpoint = ENDPOINT_WINDOW_SCHEMA.empty_table()

    @property
    def rows(self) -> int:
        return self.gpu.num_rows + self.proc.num_rows + self.endpoint.num_rows


def window_grids(v: Valid) -> dict:
    """(gpu, window_ms) -> (sorted window starts, window_ms) of a batch; computed once per batch (the ingest's
    overlap check and the session rows both use it)."""
    cached = getattr(v, "_grids_cache", None)
    if cached is not None:
        return cached
    out = {}
    if v.gpu.num_rows:
        enc = pc.dictionary_encode(v.gpu.column("gpu_uuid")).combine_chunks()
        names = enc.dictionary.to_pylist()
        g = enc.indices.to_numpy().astype(np.int64)
        w = v.gpu.column("window_ms").to_numpy().astype(np.int64)
        s = v.gpu.column("window_start_ms").to_numpy()
        order = np.lexsort((s, w, g))
        g, w, s = g[order], w[order], s[order]
        cut = np.flatnonzero((np.diff(g) != 0) | (np.diff(w) != 0)) + 1
        for a, b in zip(np.concatenate(([0], cut)), np.concatenate((cut, [g.size])), strict=True):
            if b > a:
                out[(names[g[a]], int(w[a]))] = (s[a:b], int(w[a]))
    v._grids_cache = out
    return out


def clip(value: str, limit: int = 80) -> str:
    """An untrusted string fit for a log line or an error message: at most `limit` characters."""
    value = str(value)
    return value if len(value) <= limit else f"{value[:limit]}...({len(value)} chars)"


_CHECKED: set[bytes] = set()  # sub-messages (host, GPU, process facts) whose strings passed the checks
_CHECKED_MAX = 200_000


def _check_once(msg, check) -> None:
    """Run `check()` on facts an agent repeats in every batch only the first time these exact bytes come."""
    key = type(msg).__name__.encode() + msg.SerializeToString(deterministic=True)
    if key in _CHECKED:
        return
    check()
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED.add(key)


def _check_str(value: str, field: str, limit: int = MAX_STR, required: bool = False) -> None:
    if required and not value:
        raise Invalid(f"{field}: required")
    if len(value) > limit:
        raise Invalid(f"{field}: {len(value)} characters, at most {limit}")
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in _BIDI for c in value):
        raise Invalid(f"{field}: contains control characters")


def _check_tags(tags, field: str) -> None:
    if len(tags) > MAX_TAGS:
        raise Invalid(f"{field}: {len(tags)} tags, at most {MAX_TAGS}")
    for k, v in tags.items():
        _check_str(k, f"{field} key", 64, required=True)
        _check_str(v, f"{field}[{k}]")


def _decode(body: bytes, schema: pa.Schema, field: str, allow_empty: bool) -> pa.Table:
    if not body:
        if allow_empty:
            return schema.empty_table()
        raise Invalid(f"{field}: empty")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise Invalid(f"{field}: not an Arrow IPC stream ({e})") from e
    try:
        names = [f.name for f in table.schema]  # a column name that is not UTF-8 fails here
    except UnicodeDecodeError as e:
        raise Invalid(f"{field}: column name is not UTF-8") from e
    if table.schema != schema:
        want = {f.name: f.type for f in schema}
        got = {f.name: f.type for f in table.schema}
        for name, typ in want.items():
            if name not in got:
                raise Invalid(f"{field}.{name}: missing")
            if got[name] != typ:
                raise Invalid(f"{field}.{name}: type {got[name]}, expected {typ}")
        extra = [n for n in got if n not in want]
        if extra:
            raise Invalid(f"{field}.{extra[0]}: unknown column")
        raise Invalid(f"{field}: columns out of order ({', '.join(names)})")
    try:  # offsets and lengths: a corrupt body must not reach the compute kernels
        table.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as e:
        raise Invalid(f"{field}: corrupt Arrow body ({e})") from e
    return table


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_unknown(msg, field: str) -> None:
    """v1 is strict: a field this collector does not know is an error, not silently dropped data."""
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        raise Invalid(f"{field}: unknown field number {unknown[0].field_number} (this collector speaks "
                      f"gpuledger.v1; upgrade it before the agents)")


def validate(batch: pb.WindowBatch, now_ms: int, limits: Limits = Limits()) -> Valid:
    _check_unknown(batch, "batch")
    _check_unknown(batch.host, "host")
    for i, g in enumerate(batch.gpus):
        _check_unknown(g, f"gpus[{i}]")
    for i, p in enumerate(batch.processes):
        _check_unknown(p, f"processes[{i}]")
    _check_str(batch.agent_id, "agent_id", MAX_ID, required=True)
    if batch.seq == 0:
        raise Invalid("seq: must be >= 1")
    if batch.session_start_ms < 0:
        raise Invalid(f"session_start_ms: {batch.session_start_ms} is negative")
    if batch.session_start_ms > now_ms + limits.max_future_ms:
        raise Invalid(f"session_start_ms: {batch.session_start_ms} is in the future (collector clock {now_ms})")
    if batch.stopped_ms:
        if batch.stopped_ms < 0 or batch.stopped_ms > now_ms + limits.max_future_ms:
            raise Invalid(f"stopped_ms: {batch.stopped_ms} is negative or in the future (collector clock {now_ms})")
        if batch.stopped_ms < batch.session_start_ms:
            raise Invalid(f"stopped_ms: {batch.stopped_ms} is before session_start_ms {batch.session_start_ms}")
    h = batch.host

    def check_host() -> None:
        _check_str(h.host_id, "host.host_id", MAX_ID, required=True)
        for name in ("hostname", "provider", "region", "instance_type", "agent_version", "instance_id"):
            _check_str(getattr(h, name), f"host.{name}")
        _check_tags(h.tags, "host.tags")

    _check_once(h, check_host)
    if h.gpu_count > limits.max_gpus:
        raise Invalid(f"host.gpu_count: {h.gpu_count}, at most {limits.max_gpus}")
    if len(batch.gpus) > limits.max_gpus:
        raise TooLarge(f"gpus: {len(batch.gpus)} GPUs in one batch, at most {limits.max_gpus}")
    uuids = set()
    for i, g in enumerate(batch.gpus):
        _check_once(g, lambda g=g, i=i: (_check_str(g.uuid, f"gpus[{i}].uuid", MAX_ID, required=True),
                                         _check_str(g.name, f"gpus[{i}].name"),
                                         _check_str(g.util_method, f"gpus[{i}].util_method", 32)))
        if g.first_window_ms < 0:  # an old one is fine: reports start at the later of it and `since`
            raise Invalid(f"gpus[{i}].first_window_ms: {g.first_window_ms} is negative")
        if not (0.0 <= g.share <= 1.0):
            raise Invalid(f"gpus[{i}].share: {g.share} is not between 0 and 1")
        if g.uuid in uuids:
            raise Invalid(f"gpus[{i}].uuid: duplicate {g.uuid!r}")
        uuids.add(g.uuid)
    if len(batch.processes) > limits.max_processes:
        raise TooLarge(f"processes: {len(batch.processes)}, at most {limits.max_processes}")
    procs = set()
    for i, p in enumerate(batch.processes):
        _check_once(p, lambda p=p, i=i: (_check_str(p.command, f"processes[{i}].command"),
                                         _check_str(p.container_id, f"processes[{i}].container_id", MAX_ID),
                                         _check_str(p.pod_uid, f"processes[{i}].pod_uid", MAX_ID),
                                         _check_tags(p.tags, f"processes[{i}].tags")))
        procs.add((p.pid, p.start_ms))

    stop_only = bool(batch.stopped_ms) and not batch.gpu_windows_arrow and not batch.proc_windows_arrow
    gpu = _decode(batch.gpu_windows_arrow, GPU_WINDOW_SCHEMA, "gpu_windows", allow_empty=stop_only)
    proc = _decode(batch.proc_windows_arrow, PROC_WINDOW_SCHEMA, "proc_windows", allow_empty=True)
    endpoint = _decode(batch.endpoint_windows_arrow, ENDPOINT_WINDOW_SCHEMA, "endpoint_windows", allow_empty=True)
    if gpu.num_rows + proc.num_rows + endpoint.num_rows > limits.max_batch_rows:
        raise TooLarge(f"gpu_windows: {gpu.num_rows + proc.num_rows + endpoint.num_rows} rows, at most "
                       f"{limits.max_batch_rows}")
    if endpoint.num_rows:
        _validate_endpoint(endpoint, now_ms, limits)
    if stop_only:
        return Valid(batch, gpu, attribute(proc, gpu), {}, endpoint)
    if gpu.num_rows == 0:
        raise Invalid("gpu_windows: no rows")
    _validate_gpu(gpu, uuids, now_ms, limits)
    if batch.session_start_ms:
        ends = _col(gpu, "window_start_ms") + _col(gpu, "window_ms").astype(np.int64)
        before = ends <= batch.session_start_ms
        if before.any():
            r = _first_bad(before)
            raise Invalid(f"gpu_windows.window_start_ms: window at row {r} ends at {int(ends[r])}, before the "
                          f"batch's session_start_ms {batch.session_start_ms}")
    if batch.stopped_ms:
        starts = _col(gpu, "window_start_ms")
        after = starts >= batch.stopped_ms
        if after.any():
            r = _first_bad(after)
            raise Invalid(f"gpu_windows.window_start_ms: window at row {r} starts at {int(starts[r])}, after the "
                          f"batch's stopped_ms {batch.stopped_ms}")
    firsts = gpu.group_by("gpu_uuid").aggregate([("window_start_ms", "min")])
    earliest = dict(zip(firsts.column("gpu_uuid").to_pylist(), firsts.column("window_start_ms_min").to_pylist(),
                        strict=True))
    for i, g in enumerate(batch.gpus):
        if g.first_window_ms and g.uuid in earliest and g.first_window_ms > earliest[g.uuid]:
            raise Invalid(f"gpus[{i}].first_window_ms: {g.first_window_ms} is after this GPU's window "
                          f"{earliest[g.uuid]} in the same batch")
    if proc.num_rows:
        _validate_proc(proc, gpu, uuids, procs)
    return Valid(batch, gpu, attribute(proc, gpu), earliest, endpoint)


def _col(t: pa.Table, name: str) -> np.ndarray:
    c = t.column(name)
    if c.null_count:
        raise Invalid(f"{name}: null at row {_first_bad(np.asarray(c.is_null()))}")
    return c.to_numpy()


def _validate_gpu(t: pa.Table, uuids: set, now_ms: int, limits: Limits) -> None:
    f = "gpu_windows."
    unknown = pc.invert(pc.is_in(t.column("gpu_uuid"), value_set=pa.array(sorted(uuids), pa.string())))
    if pc.any(unknown).as_py():
        row = _first_bad(np.asarray(unknown))
        raise Invalid(f"{f}gpu_uuid: {clip(t.column('gpu_uuid')[row].as_py())!r} at row {row} is not in gpus")
    start = _col(t, "window_start_ms")
    win = _col(t, "window_ms").astype(np.int64)
    if (win == 0).any():
        raise Invalid(f"{f}window_ms: 0 at row {_first_bad(win == 0)}")
    if (win > 3_600_000).any():
        raise Invalid(f"{f}window_ms: over one hour at row {_first_bad(win > 3_600_000)}")
    if (start % win != 0).any():
        raise Invalid(f"{f}window_start_ms: not a multiple of window_ms at row {_first_bad(start % win != 0)}")
    if (start < 0).any():
        raise Invalid(f"{f}window_start_ms: negative at row {_first_bad(start < 0)}")
    future = start > now_ms + limits.max_future_ms - win  # no start + win: it could overflow int64
    if future.any():
        raise Invalid(f"{f}window_start_ms: {int(start[_first_bad(future)])} is in the future "
                      f"(collector clock {now_ms}) at row {_first_bad(future)}")
    if limits.retention_ms:
        old = start < now_ms - limits.retention_ms
        if old.any():
            raise Invalid(f"{f}window_start_ms: older than retention at row {_first_bad(old)}")
    months = np.unique(start.astype("datetime64[ms]").astype("datetime64[M]"))
    if months.size > limits.max_months:
        raise Invalid(f"{f}window_start_ms: the batch spans {months.size} calendar months ({months[0]} to "
                      f"{months[-1]}), at most {limits.max_months}")
    cols = {n: _col(t, n).astype(np.int64) for n in ("covered_ms", "busy_ms", "idle_held_ms", "idle_free_ms",
                                                     "unmonitored_ms", "sample_count")}
    total = cols["busy_ms"] + cols["idle_held_ms"] + cols["idle_free_ms"] + cols["unmonitored_ms"]
    bad = total != win
    if bad.any():
        r = _first_bad(bad)
        raise Invalid(f"{f}busy_ms+idle_held_ms+idle_free_ms+unmonitored_ms: {int(total[r])} != window_ms "
                      f"{int(win[r])} at row {r}")
    bad = cols["covered_ms"] != cols["busy_ms"] + cols["idle_held_ms"] + cols["idle_free_ms"]
    if bad.any():
        raise Invalid(f"{f}covered_ms: != busy_ms+idle_held_ms+idle_free_ms at row {_first_bad(bad)}")
    umax = _col(t, "util_max_pct")
    umin = _col(t, "util_min_pct")
    if (umax > 100).any():
        r = _first_bad(umax > 100)
        raise Invalid(f"{f}util_max_pct: {int(umax[r])} exceeds 100 at row {r}")
    bad = (cols["sample_count"] > 0) & (umin > umax)
    if bad.any():
        raise Invalid(f"{f}util_min_pct: above util_max_pct at row {_first_bad(bad)}")
    hist = t.column("util_hist").combine_chunks()
    lengths = pc.list_value_length(hist).to_numpy(zero_copy_only=False)
    if hist.null_count or (lengths != HIST_BUCKETS).any():
        r = _first_bad((lengths != HIST_BUCKETS) | np.asarray(hist.is_null()))
        raise Invalid(f"{f}util_hist: {HIST_BUCKETS} buckets expected at row {r}")
    sums = hist.flatten().to_numpy().astype(np.int64).reshape(-1, HIST_BUCKETS).sum(axis=1)
    bad = sums != cols["sample_count"]
    if bad.any():
        raise Invalid(f"{f}util_hist: sums to {int(sums[_first_bad(bad)])}, sample_count is "
                      f"{int(cols['sample_count'][_first_bad(bad)])} at row {_first_bad(bad)}")
    for name in ("gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms", "tensor_active_ms", "dram_active_ms"):
        v = _col(t, name).astype(np.int64)
        if (v > win).any():
            raise Invalid(f"{f}{name}: exceeds window_ms at row {_first_bad(v > win)}")
    codes = pc.dictionary_encode(t.column("gpu_uuid")).combine_chunks().indices.to_numpy().astype(np.int64)
    order = np.lexsort((start, codes))
    c, s_, w_ = codes[order], start[order], win[order]
    same = c[1:] == c[:-1]
    dup = same & (s_[1:] == s_[:-1])
    if dup.any():
        r = int(order[1:][dup][0])
        raise Invalid(f"{f}(gpu_uuid, window_start_ms): duplicate window at row {r} "
                      f"({clip(t.column('gpu_uuid')[r].as_py())}, {int(start[r])})")
    overlap = same & (s_[1:] < s_[:-1] + w_[:-1])
    if overlap.any():
        j = int(np.flatnonzero(overlap)[0])
        a, b = int(order[j]), int(order[j + 1])
        raise Invalid(f"{f}window_start_ms: window at row {b} ({int(start[b])}, {int(win[b])} ms) overlaps the "
                      f"window at row {a} ({int(start[a])}, {int(win[a])} ms) of GPU "
                      f"{clip(t.column('gpu_uuid')[a].as_py())}")


def _validate_endpoint(t: pa.Table, now_ms: int, limits: Limits) -> None:
    f = "endpoint_windows."
    for name in ("endpoint", "server"):
        col = t.column(name)
        if col.null_count:
            raise Invalid(f"{f}{name}: null at row {_first_bad(np.asarray(col.is_null()))}")
        lengths = pc.utf8_length(col).to_numpy(zero_copy_only=False)
        bad = (lengths == 0) | (lengths > MAX_ID)
        if bad.any():
            raise Invalid(f"{f}{name}: empty or over {MAX_ID} characters at row {_first_bad(bad)}")
        for v in pc.unique(col).to_pylist():
            _check_str(v, f"{f}{name}", MAX_ID)
    start = _col(t, "window_start_ms")
    win = _col(t, "window_ms").astype(np.int64)
    if (win == 0).any() or (win > 3_600_000).any():
        raise Invalid(f"{f}window_ms: 0 or over one hour at row {_first_bad((win == 0) | (win > 3_600_000))}")
    if (start < 0).any() or (start % win != 0).any():
        raise Invalid(f"{f}window_start_ms: negative or not a multiple of window_ms at row "
                      f"{_first_bad((start < 0) | (start % win != 0))}")
    future = start > now_ms + limits.max_future_ms - win
    if future.any():
        raise Invalid(f"{f}window_start_ms: in the future (collector clock {now_ms}) at row {_first_bad(future)}")
    scraped = _col(t, "scraped_ms").astype(np.int64)
    if (scraped > win).any():
        raise Invalid(f"{f}scraped_ms: exceeds window_ms at row {_first_bad(scraped > win)}")
    key = pa.table({"e": t.column("endpoint"), "s": t.column("window_start_ms")})
    if key.group_by(["e", "s"]).aggregate([]).num_rows != t.num_rows:
        raise Invalid(f"{f}(endpoint, window_start_ms): duplicate window in one batch")


def _largest_remainder(exact: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Round non-negative parts to integers so that each group's parts sum to the rounded group total
    (Hamilton's method: floors, then one more unit to the largest fractional parts)."""
    floor = np.floor(exact)
    frac = exact - floor
    target = np.rint(np.bincount(group, weights=exact, minlength=n_groups))
    deficit = (target - np.bincount(group, weights=floor, minlength=n_groups)).astype(np.int64)
    order = np.lexsort((-frac, group))
    g_sorted = group[order]
    first = np.searchsorted(g_sorted, g_sorted, side="left")
    rank = np.arange(order.size) - first
    out = floor.astype(np.int64)
    out[order] += (rank < deficit[g_sorted]).astype(np.int64)
    return out


def attribute(proc: pa.Table, gpu: pa.Table) -> pa.Table:
    """Who pays for each GPU window's time, per process window (known when the batch arrives).

    Active time (busy_ms of the GPU window) is split among its processes by their busy share, or by
    held share when no process reported utilization; idle-held time by held share. In microseconds,
    rounded so that the parts add up exactly to the GPU window's time. What no process accounts for
    (a GPU window without process windows) is the host owner's, decided at report time."""
    n = proc.num_rows
    if n == 0:
        return proc.append_column("active_attr_us", pa.array([], pa.uint32())).append_column(
            "held_attr_us", pa.array([], pa.uint32()))
    codes_g = pc.index_in(gpu.column("gpu_uuid"), value_set=pc.unique(gpu.column("gpu_uuid")))
    values = pc.unique(gpu.column("gpu_uuid"))
    gkey = codes_g.to_numpy(zero_copy_only=False).astype(np.int64) * (1 << 42) + gpu.column(
        "window_start_ms").to_numpy().astype(np.int64)
    pkey = pc.index_in(proc.column("gpu_uuid"), value_set=values).to_numpy(zero_copy_only=False).astype(
        np.int64) * (1 << 42) + proc.column("window_start_ms").to_numpy().astype(np.int64)
    order = np.argsort(gkey, kind="stable")
    pos = np.searchsorted(gkey[order], pkey)
    gi = order[np.minimum(pos, order.size - 1)]  # validated: every process window has its GPU window
    ng = gpu.num_rows
    held = proc.column("held_ms").to_numpy().astype(np.float64)
    busy = proc.column("busy_ms").to_numpy().astype(np.float64)
    busy_total = np.bincount(gi, weights=busy, minlength=ng)
    held_total = np.bincount(gi, weights=held, minlength=ng)
    g_busy = gpu.column("busy_ms").to_numpy().astype(np.float64)[gi]
    g_held = gpu.column("idle_held_ms").to_numpy().astype(np.float64)[gi]
    with np.errstate(invalid="ignore", divide="ignore"):
        share_a = np.where(busy_total[gi] > 0, busy / np.maximum(busy_total[gi], 1), held / np.maximum(
            held_total[gi], 1))
        share_h = held / np.maximum(held_total[gi], 1)
    active = _largest_remainder(g_busy * 1000.0 * share_a, gi, ng)
    idle = _largest_remainder(g_held * 1000.0 * share_h, gi, ng)
    return proc.append_column("active_attr_us", pa.array(active.astype(np.uint32), pa.uint32())).append_column(
        "held_attr_us", pa.array(idle.astype(np.uint32), pa.uint32()))


def _validate_proc(t: pa.Table, gpu: pa.Table, uuids: set, procs: set) -> None:
    f = "proc_windows."
    unknown = pc.invert(pc.is_in(t.column("gpu_uuid"), value_set=pa.array(sorted(uuids), pa.string())))
    if pc.any(unknown).as_py():
        raise Invalid(f"{f}gpu_uuid: not in gpus at row {_first_bad(np.asarray(unknown))}")
    pid = _col(t, "pid")
    pstart = _col(t, "proc_start_ms")
    # a batch names few processes: look each distinct (pid, start) up once
    if len(pid) <= 4096:
        pairs = set(zip(pid.tolist(), pstart.tolist(), strict=True))
    else:  # a hash group-by, not a Python pass over every row
        uniq = pa.table({"p": t.column("pid"), "s": t.column("proc_start_ms")}).group_by(["p", "s"]).aggregate([])
        pairs = set(zip(uniq.column("p").to_pylist(), uniq.column("s").to_pylist(), strict=True))
    unknown = [pair for pair in pairs if pair not in procs]
    if unknown:
        bad = np.zeros(len(pid), bool)
        for p, st in unknown[:100]:
            bad |= (pid == p) & (pstart == st)
        r = _first_bad(bad)
        raise Invalid(f"{f}(pid, proc_start_ms): ({int(pid[r])}, {int(pstart[r])}) at row {r} not in processes")
    held = _col(t, "held_ms").astype(np.int64)
    busy = _col(t, "busy_ms").astype(np.int64)
    win = int(_col(gpu, "window_ms").max())
    if (held > win).any():
        raise Invalid(f"{f}held_ms: exceeds window_ms at row {_first_bad(held > win)}")
    if (busy > held).any():
        raise Invalid(f"{f}busy_ms: exceeds held_ms at row {_first_bad(busy > held)}")
    start = _col(t, "window_start_ms")
    if (start % win != 0).any():
        raise Invalid(f"{f}window_start_ms: not a multiple of window_ms at row {_first_bad(start % win != 0)}")
    # every process window must fall in one of the batch's GPU windows
    order = pa.array(sorted(uuids), pa.string())
    gpu_key = pc.index_in(gpu.column("gpu_uuid"), value_set=order).to_numpy(zero_copy_only=False).astype(np.int64) \
        * (1 << 42) + _col(gpu, "window_start_ms") // win
    proc_key = pc.index_in(t.column("gpu_uuid"), value_set=order).to_numpy(zero_copy_only=False).astype(np.int64) \
        * (1 << 42) + start // win
    orphan = ~np.isin(proc_key, gpu_key)
    if orphan.any():
        r = _first_bad(orphan)
        raise Invalid(f"{f}window_start_ms: {int(start[r])} for GPU {clip(t.column('gpu_uuid')[r].as_py())!r} at row {r} "
                      "has no GPU window in this batch")
