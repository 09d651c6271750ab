"""Bad input, property-based: every mutation of a valid batch is refused, and the refusal names the field.

Valid batches come from the real pipeline (simulator -> windower -> encode_batch), built once. Each
mutation kind is a hypothesis strategy that returns the mutated batch, the exception class the collector
must raise (Invalid -> INVALID_ARGUMENT, TooLarge -> RESOURCE_EXHAUSTED) and a substring that names the
offending field. The property: `validate()` raises exactly that class with that name in its message;
it never passes and never raises anything else. Whole-message garbage goes through `Ingest.handle`,
which must answer with a non-retryable INVALID_ARGUMENT ack instead of raising.

The tests at the end pin bugs these properties found (int64 overflow of a window's end, column names
that are not UTF-8, process windows outside the batch's GPU windows, batches spanning hundreds of
months, corrupt Arrow bodies that crashed the process): all fixed, kept as regression tests.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuledger.agent.runtime import encode_batch, gpu_infos, host_facts
from gpuledger.agent.simulate import GPU_MODELS, PROFILES, SimGpu, SimulatedSource
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock
from gpuledger.collector.server import INVALID_ARGUMENT, RESOURCE_EXHAUSTED, Ingest
from gpuledger.collector.validate import Invalid, Limits, TooLarge, validate
from gpuledger.config import AgentConfig
from gpuledger.schema import GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA, from_ipc, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb
from tests.helpers import sim_batch

NOW_MS = int(time.time() * 1000)
FAST = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
U32 = 1 << 32

GPU_DURATIONS = ("window_ms", "covered_ms", "busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms",
                 "gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms", "tensor_active_ms", "dram_active_ms")
STATE_COLUMNS = ("covered_ms", "busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")
GPU_NUMERIC = [f.name for f in GPU_WINDOW_SCHEMA if pa.types.is_integer(f.type)]
PROC_NUMERIC = [f.name for f in PROC_WINDOW_SCHEMA if pa.types.is_integer(f.type)]
ROOT_FIELDS = {"gpu_windows": GPU_WINDOW_SCHEMA, "proc_windows": PROC_WINDOW_SCHEMA}
MSG_PREFIXES = ("batch", "agent_id", "seq", "host", "gpus", "processes", "gpu_windows", "proc_windows")


# ----------------------------------------------------------------------------- valid bases, built once


@functools.cache
def _bases() -> tuple[bytes, ...]:
    """Serialized valid batches with process rows: different GPU mixes and lengths."""
    out = (sim_batch(seq=3, host_id="h-base-1", profiles=("training", "notebook", "inference"), minutes=1.0),
           sim_batch(seq=9, host_id="h-base-2", profiles=("notebook", "idle"), minutes=0.5))
    for b in out:
        v = validate(b, NOW_MS)
        assert v.proc.num_rows > 0 and len(b.processes) > 0
    return tuple(b.SerializeToString() for b in out)


def base(draw) -> pb.WindowBatch:
    return pb.WindowBatch.FromString(draw(st.sampled_from(_bases())))


def gpu_t(b: pb.WindowBatch) -> pa.Table:
    return from_ipc(b.gpu_windows_arrow)


def proc_t(b: pb.WindowBatch) -> pa.Table:
    return from_ipc(b.proc_windows_arrow)


def set_column(t: pa.Table, name: str, values, typ: pa.DataType | None = None) -> pa.Table:
    i = t.schema.get_field_index(name)
    arr = pa.array(values, typ or t.schema.field(i).type)
    return t.set_column(i, pa.field(name, arr.type), arr)


def set_cell(t: pa.Table, name: str, row: int, value) -> pa.Table:
    values = t.column(name).to_pylist()
    values[row] = value
    return set_column(t, name, values)


def put(b: pb.WindowBatch, field: str, t: pa.Table) -> pb.WindowBatch:
    setattr(b, f"{field}_arrow", to_ipc(t))
    return b


def body_of(b: pb.WindowBatch, field: str) -> pa.Table:
    return gpu_t(b) if field == "gpu_windows" else proc_t(b)


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        low, v = v & 0x7F, v >> 7
        out.append(low | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field_bytes(number: int, wire_type: int, payload: int) -> bytes:
    """Raw protobuf bytes of one field: varint, fixed64, length-delimited or fixed32."""
    key = varint((number << 3) | wire_type)
    if wire_type == 0:
        return key + varint(payload)
    if wire_type == 1:
        return key + payload.to_bytes(8, "little")
    if wire_type == 2:
        data = payload.to_bytes(4, "little")
        return key + varint(len(data)) + data
    return key + payload.to_bytes(4, "little")


# ----------------------------------------------------------------------------- mutation kinds
# each returns (batch, exception class, substring the message must contain, limits)


@st.composite
def util_hist_wrong_length(draw):
    b = base(draw)
    t = gpu_t(b)
    row = draw(st.integers(0, t.num_rows - 1))
    hist = t.column("util_hist").to_pylist()
    hist[row] = draw(st.one_of(
        st.none(),
        st.lists(st.integers(0, 65535), max_size=25).filter(lambda h: len(h) != 10)))
    return put(b, "gpu_windows", set_column(t, "util_hist", hist)), Invalid, "gpu_windows.util_hist", Limits()


@st.composite
def rows_reference_missing(draw):
    """Rows whose GPU or process the batch does not declare."""
    b = base(draw)
    uuids = {g.uuid for g in b.gpus}
    kind = draw(st.sampled_from(["gpu_row", "proc_row_gpu", "proc_row_pid", "proc_row_start", "drop_gpu_info",
                                 "drop_process_info"]))
    if kind == "gpu_row":
        t = gpu_t(b)
        row = draw(st.integers(0, t.num_rows - 1))
        stranger = draw(st.text(max_size=40).filter(lambda s: s not in uuids))
        return put(b, "gpu_windows", set_cell(t, "gpu_uuid", row, stranger)), Invalid, "gpu_windows.gpu_uuid", \
            Limits()
    if kind == "drop_gpu_info":
        del b.gpus[draw(st.integers(0, len(b.gpus) - 1))]
        return b, Invalid, "gpu_windows.gpu_uuid", Limits()
    t = proc_t(b)
    row = draw(st.integers(0, t.num_rows - 1))
    known = {(p.pid, p.start_ms) for p in b.processes}
    if kind == "proc_row_gpu":
        stranger = draw(st.text(max_size=40).filter(lambda s: s not in uuids))
        return put(b, "proc_windows", set_cell(t, "gpu_uuid", row, stranger)), Invalid, "proc_windows.gpu_uuid", \
            Limits()
    expect = "proc_windows.(pid, proc_start_ms)"
    pid, start = t.column("pid")[row].as_py(), t.column("proc_start_ms")[row].as_py()
    if kind == "drop_process_info":  # the process a row names is not declared
        keep = [p for p in b.processes if (p.pid, p.start_ms) != (pid, start)]
        del b.processes[:]
        b.processes.extend(keep)
        return b, Invalid, expect, Limits()
    if kind == "proc_row_pid":
        pid = draw(st.integers(0, U32 - 1).filter(lambda p: (p, start) not in known))
        t = set_cell(t, "pid", row, pid)
    else:
        start = draw(st.integers(-(1 << 63), (1 << 63) - 1).filter(lambda s: (pid, s) not in known))
        t = set_cell(t, "proc_start_ms", row, start)
    return put(b, "proc_windows", t), Invalid, expect, Limits()


@st.composite
def float_where_integer(draw):
    """A float column (NaN, infinities, anything) where the schema has an integer: a schema error."""
    b = base(draw)
    field = draw(st.sampled_from(list(ROOT_FIELDS)))
    t = body_of(b, field)
    col = draw(st.sampled_from(GPU_NUMERIC if field == "gpu_windows" else PROC_NUMERIC))
    typ = draw(st.sampled_from([pa.float64(), pa.float32()]))
    special = st.sampled_from([float("nan"), float("inf"), float("-inf")])
    values = t.column(col).to_numpy().astype(np.float64).tolist()
    row = draw(st.integers(0, t.num_rows - 1))
    values[row] = draw(st.one_of(special, st.floats(allow_nan=True, allow_infinity=True, width=32)))
    return put(b, field, set_column(t, col, values, typ)), Invalid, f"{field}.{col}: type", Limits()


@st.composite
def raw_float_body(draw):
    """An Arrow body that is just raw floats (NaN, inf, ...), not an IPC stream."""
    b = base(draw)
    field = draw(st.sampled_from(list(ROOT_FIELDS)))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64))
    setattr(b, f"{field}_arrow", np.asarray(values, dtype).tobytes())
    return b, Invalid, f"{field}:", Limits()


@st.composite
def garbage_body(draw):
    b = base(draw)
    field = draw(st.sampled_from(list(ROOT_FIELDS)))
    setattr(b, f"{field}_arrow", draw(st.binary(min_size=1, max_size=4096)))
    return b, Invalid, f"{field}:", Limits()


@st.composite
def negative_duration(draw):
    """A duration below zero: as a signed column (schema error) or wrapped into uint32."""
    b = base(draw)
    field = draw(st.sampled_from(list(ROOT_FIELDS)))
    t = body_of(b, field)
    col = draw(st.sampled_from(GPU_DURATIONS if field == "gpu_windows" else ("held_ms", "busy_ms")))
    row = draw(st.integers(0, t.num_rows - 1))
    minus = draw(st.integers(1, 3_600_000))
    values = t.column(col).to_pylist()
    if draw(st.booleans()):
        values[row] = -minus
        t = set_column(t, col, values, draw(st.sampled_from([pa.int32(), pa.int64()])))
        return put(b, field, t), Invalid, f"{field}.{col}: type int", Limits()
    values[row] = U32 - minus  # what -minus becomes when forced into uint32
    return put(b, field, set_column(t, col, values)), Invalid, f"{field}.", Limits(), col


@st.composite
def negative_window_start(draw):
    b = base(draw)
    t = gpu_t(b)
    row = draw(st.integers(0, t.num_rows - 1))
    win = t.column("window_ms")[row].as_py()
    start = draw(st.one_of(st.integers(1, 1 << 40).map(lambda k: -k * win), st.integers(-(1 << 62), -1)))
    return put(b, "gpu_windows", set_cell(t, "window_start_ms", row, start)), Invalid, \
        "gpu_windows.window_start_ms", Limits()


@st.composite
def states_do_not_add_up(draw):
    b = base(draw)
    t = gpu_t(b)
    col = draw(st.sampled_from(STATE_COLUMNS))
    row = draw(st.integers(0, t.num_rows - 1))
    delta = draw(st.integers(-20_000, 20_000).filter(bool))
    t = set_cell(t, col, row, (t.column(col)[row].as_py() + delta) % U32)
    return put(b, "gpu_windows", t), Invalid, "gpu_windows.", Limits(), col


@st.composite
def utilization_over_100(draw):
    b = base(draw)
    t = gpu_t(b)
    sampled = [i for i, n in enumerate(t.column("sample_count").to_pylist()) if n > 0]
    if draw(st.booleans()) or not sampled:
        row = draw(st.integers(0, t.num_rows - 1))
        return put(b, "gpu_windows", set_cell(t, "util_max_pct", row, draw(st.integers(101, 255)))), Invalid, \
            "gpu_windows.util_max_pct", Limits()
    row = draw(st.sampled_from(sampled))
    lo = t.column("util_max_pct")[row].as_py() + 1
    return put(b, "gpu_windows", set_cell(t, "util_min_pct", row, draw(st.integers(lo, 255)))), Invalid, \
        "gpu_windows.util_min_pct", Limits()


@st.composite
def far_future(draw):
    """Windows that end after the collector's clock plus max_future_ms (up to 2^62 ms, no overflow)."""
    b = base(draw)
    t = gpu_t(b)
    limits = Limits(max_future_ms=draw(st.integers(0, 86_400_000)))
    row = draw(st.integers(0, t.num_rows - 1))
    win = t.column("window_ms")[row].as_py()
    first = (NOW_MS + limits.max_future_ms) // win + 1  # first aligned start that ends too late
    start = draw(st.one_of(st.integers(first, (1 << 62) // win).map(lambda k: k * win),
                           st.integers(first * win, 1 << 62)))
    return put(b, "gpu_windows", set_cell(t, "window_start_ms", row, start)), Invalid, \
        "gpu_windows.window_start_ms", limits


@st.composite
def older_than_retention(draw):
    b = base(draw)
    t = gpu_t(b)
    limits = Limits(retention_ms=draw(st.integers(86_400_000, 400 * 86_400_000)))
    row = draw(st.integers(0, t.num_rows - 1))
    win = t.column("window_ms")[row].as_py()
    start = ((NOW_MS - limits.retention_ms) // win - draw(st.integers(1, 10_000_000))) * win
    return put(b, "gpu_windows", set_cell(t, "window_start_ms", row, start)), Invalid, \
        "gpu_windows.window_start_ms", limits


def _string_fields(b: pb.WindowBatch) -> list[tuple[str, int, object]]:
    """(name in the collector's message, length limit, setter) of every checked string."""
    out = [("agent_id", 128, lambda v: setattr(b, "agent_id", v)),
           ("host.host_id", 128, lambda v: setattr(b.host, "host_id", v))]
    for name in ("hostname", "provider", "region", "instance_type", "agent_version"):
        out.append((f"host.{name}", 256, lambda v, n=name: setattr(b.host, n, v)))
    out.append(("host.tags[team]", 256, lambda v: b.host.tags.__setitem__("team", v)))
    out.append(("host.tags key", 64, lambda v: b.host.tags.__setitem__(v, "x")))
    for i, g in enumerate(b.gpus):
        for name, limit in (("uuid", 128), ("name", 256), ("util_method", 32)):
            out.append((f"gpus[{i}].{name}", limit, lambda v, g=g, n=name: setattr(g, n, v)))
    for i, p in enumerate(b.processes):
        for name, limit in (("command", 256), ("container_id", 128), ("pod_uid", 128)):
            out.append((f"processes[{i}].{name}", limit, lambda v, p=p, n=name: setattr(p, n, v)))
        out.append((f"processes[{i}].tags[team]", 256, lambda v, p=p: p.tags.__setitem__("team", v)))
        out.append((f"processes[{i}].tags key", 64, lambda v, p=p: p.tags.__setitem__(v, "x")))
    return out


@st.composite
def oversized_string(draw):
    b = base(draw)
    name, limit, setter = draw(st.sampled_from(_string_fields(b)))
    setter(draw(st.text(min_size=limit + 1, max_size=limit + 200)))
    return b, Invalid, f"{name}:", Limits()


@st.composite
def control_characters(draw):
    b = base(draw)
    name, limit, setter = draw(st.sampled_from(_string_fields(b)))
    ctrl = draw(st.text(st.characters(max_codepoint=31), min_size=1, max_size=3))
    # printable text before the control characters; surrogates (category Cs) are no text protobuf can encode
    head = draw(st.text(st.characters(min_codepoint=32, exclude_categories=("Cs",)), max_size=min(limit - len(ctrl), 20)))
    setter(head + ctrl)
    return b, Invalid, f"{name}:", Limits()


@st.composite
def too_many_tags(draw):
    b = base(draw)
    target, name = draw(st.sampled_from([(b.host, "host.tags"), (b.processes[0], "processes[0].tags")]))
    for i in range(draw(st.integers(65, 200))):
        target.tags[f"k{i}"] = "v"
    return b, Invalid, f"{name}: ", Limits()


@st.composite
def too_large(draw):
    """Thousands of GPUs, too many processes or rows in one batch: RESOURCE_EXHAUSTED material."""
    b = base(draw)
    kind = draw(st.sampled_from(["gpus", "processes", "rows"]))
    if kind == "gpus":
        n = draw(st.integers(1025, 5000))
        b.gpus.extend(pb.GpuInfo(uuid=f"GPU-extra-{i}", index=i) for i in range(n))
        return b, TooLarge, f"gpus: {len(b.gpus)} GPUs in one batch", Limits()
    if kind == "processes":
        limits = Limits(max_processes=draw(st.integers(0, len(b.processes) - 1)))
        return b, TooLarge, f"processes: {len(b.processes)}, at most", limits
    rows = gpu_t(b).num_rows + proc_t(b).num_rows
    return b, TooLarge, f"gpu_windows: {rows} rows", Limits(max_batch_rows=draw(st.integers(1, rows - 1)))


@st.composite
def gpu_count_over_limit(draw):
    b = base(draw)
    b.host.gpu_count = draw(st.integers(1025, U32 - 1))
    return b, Invalid, "host.gpu_count", Limits()


_MESSAGES = {"batch": pb.WindowBatch, "host": pb.HostFacts, "gpus": pb.GpuInfo, "processes": pb.ProcessInfo}
KNOWN_FIELDS = {k: max(f.number for f in m.DESCRIPTOR.fields) for k, m in _MESSAGES.items()}
_FD = pb.WindowBatch.DESCRIPTOR.fields[0].__class__
_VARINT = {_FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_BOOL, _FD.TYPE_ENUM}
_LEN = {_FD.TYPE_STRING, _FD.TYPE_BYTES, _FD.TYPE_MESSAGE}
# WindowBatch's singular fields by wire type: a known number with another wire type is unknown data too
BATCH_WIRE = {f.number: 0 if f.type in _VARINT else 2 for f in pb.WindowBatch.DESCRIPTOR.fields
              if (f.type in _VARINT or f.type in _LEN) and not f.is_repeated}


@st.composite
def unknown_protobuf_field(draw):
    b = base(draw)
    where = draw(st.sampled_from(list(KNOWN_FIELDS)))
    wire = draw(st.sampled_from([0, 1, 2, 5]))
    payload = draw(st.integers(0, U32 - 1))
    if where == "batch" and draw(st.booleans()):
        number = draw(st.sampled_from(sorted(BATCH_WIRE)))
        wire = draw(st.sampled_from([w for w in (0, 1, 5) if w != BATCH_WIRE[number]]))
    else:
        number = draw(st.integers(KNOWN_FIELDS[where] + 1, (1 << 29) - 1))
    extra = field_bytes(number, wire, payload)
    if where == "batch":
        out = pb.WindowBatch.FromString(b.SerializeToString() + extra)
        return out, Invalid, f"batch: unknown field number {number} ", Limits()
    if where == "host":
        b.host.MergeFromString(extra)
        return b, Invalid, f"host: unknown field number {number} ", Limits()
    items = b.gpus if where == "gpus" else b.processes
    i = draw(st.integers(0, len(items) - 1))
    items[i].MergeFromString(extra)
    return b, Invalid, f"{where}[{i}]: unknown field number {number} ", Limits()


MUTATIONS = {
    "util_hist_wrong_length": util_hist_wrong_length(),
    "rows_reference_missing_gpu_or_process": rows_reference_missing(),
    "float_where_integer": float_where_integer(),
    "raw_float_body": raw_float_body(),
    "garbage_arrow_body": garbage_body(),
    "negative_duration": negative_duration(),
    "negative_window_start": negative_window_start(),
    "states_do_not_add_up": states_do_not_add_up(),
    "utilization_over_100": utilization_over_100(),
    "far_future": far_future(),
    "older_than_retention": older_than_retention(),
    "oversized_string": oversized_string(),
    "control_characters": control_characters(),
    "too_many_tags": too_many_tags(),
    "too_large": too_large(),
    "gpu_count_over_limit": gpu_count_over_limit(),
    "unknown_protobuf_field": unknown_protobuf_field(),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
@FAST
@given(data=st.data())
def test_every_mutation_is_refused_and_names_the_field(kind, data):
    mutated = data.draw(MUTATIONS[kind], label=kind)
    batch, exc, expect, limits = mutated[:4]
    also = mutated[4] if len(mutated) > 4 else None
    try:
        validate(batch, NOW_MS, limits)
    except (Invalid, TooLarge) as e:
        assert type(e) is exc, f"{kind}: {type(e).__name__} ({e}), expected {exc.__name__}"
        assert expect in str(e), f"{kind}: {e!r} does not name {expect!r}"
        if also is not None:
            assert also in str(e), f"{kind}: {e!r} does not name {also!r}"
    else:
        pytest.fail(f"{kind}: a mutated batch passed validation")


# ----------------------------------------------------------------------------- whole messages, via Ingest


class _NoWriter:
    """Ingest hands only valid batches to its writer; here there must be none."""

    def submit(self, item):
        raise AssertionError(f"garbage passed validation: {item.batch!r:.200}")


def _ingest(max_batch_bytes: int = 16 << 20) -> Ingest:
    return Ingest(_NoWriter(), Limits(), SimClock(NOW_MS * 1000), max_batch_bytes)


def _assert_refused(ack: pb.Ack, code: int = INVALID_ARGUMENT) -> None:
    assert ack.code == code, ack
    assert not ack.retryable
    assert ack.message.split(":")[0].split(".")[0].split("[")[0] in MSG_PREFIXES, ack.message


@FAST
@given(raw=st.binary(max_size=8192))
def test_garbage_messages_are_answered_not_raised(raw):
    _assert_refused(_ingest().handle(raw).result(timeout=1))


@FAST
@given(data=st.data())
def test_truncated_or_corrupted_messages_are_invalid(data):
    raw = data.draw(st.sampled_from(_bases()))
    b = pb.WindowBatch.FromString(raw)
    end = raw.find(b.gpu_windows_arrow) + len(b.gpu_windows_arrow)  # cut before the GPU body is whole
    cut = raw[:data.draw(st.integers(0, end - 1))]
    raw = cut + data.draw(st.binary(max_size=64))  # and maybe noise after the cut
    _assert_refused(_ingest().handle(raw).result(timeout=1))


@FAST
@given(data=st.data())
def test_oversized_messages_are_resource_exhausted_and_not_retryable(data):
    raw = data.draw(st.sampled_from(_bases()))
    limit = data.draw(st.integers(1, len(raw) - 1))
    ack = _ingest(limit).handle(raw).result(timeout=1)
    _assert_refused(ack, RESOURCE_EXHAUSTED)
    assert ack.message == f"batch: {len(raw)} bytes, at most {limit}"


def test_thousands_of_gpus_are_resource_exhausted_at_ingest():
    b = pb.WindowBatch.FromString(_bases()[0])
    b.gpus.extend(pb.GpuInfo(uuid=f"GPU-{i:05d}", index=i) for i in range(5000))
    ack = _ingest().handle(b.SerializeToString()).result(timeout=1)
    _assert_refused(ack, RESOURCE_EXHAUSTED)
    assert ack.seq == b.seq and ack.message.startswith("gpus: 5003 GPUs in one batch, at most 1024")


# ----------------------------------------------------------------------------- valid batches pass


@st.composite
def simulated_batch(draw):
    """A batch straight from the agent's pipeline with random simulator settings."""
    n_gpus = draw(st.integers(1, 8))
    window_s = draw(st.sampled_from([1, 5, 10, 15, 30, 60]))
    minutes = draw(st.floats(0.1, 3.0))
    hours_ago = draw(st.floats(0.05, 96.0))
    start_us = int((NOW_MS - hours_ago * 3_600_000) * 1000) + draw(st.integers(0, 10_000_000))
    specs = []
    for _ in range(n_gpus):
        outage = None
        if draw(st.booleans()):
            a = draw(st.floats(0, minutes * 60))
            outage = (a, a + draw(st.floats(0.5, 120.0)))
        specs.append(SimGpu(draw(st.sampled_from(PROFILES)), team=draw(st.sampled_from(["ml", "research", "ü"])),
                            outage=outage))
    host_id = draw(st.text(st.characters(min_codepoint=32, exclude_categories=("Cs", "Cc", "Cf")), min_size=1, max_size=128))
    src = SimulatedSource(host_id, draw(st.sampled_from(sorted(GPU_MODELS))), specs, start_us,
                          seed=draw(st.integers(0, 2**32)),
                          sample_period_us=draw(st.sampled_from([None, 100_000, 166_667, 1_000_000])))
    w = Windower(src.gpus(), window_s, 0.0, start_us=start_us)
    end = start_us + int(minutes * 60e6)
    w.add(src.poll(end))
    closed = w.close(end, final=True)
    cfg = AgentConfig(host_id=host_id, provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                      tags={"team": "ml"})
    raw = encode_batch(host_id, 1, draw(st.integers(1, 2**63)), host_facts(cfg, src.gpus()), gpu_infos(src.gpus()),
                       closed, 0, NOW_MS)
    return pb.WindowBatch.FromString(raw), closed


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sim=simulated_batch())
def test_batches_from_random_simulator_settings_pass(sim):
    batch, closed = sim
    v = validate(batch, NOW_MS)
    assert v.gpu.num_rows == closed.gpu.num_rows > 0
    assert v.proc.num_rows == closed.proc.num_rows
    got = []  # the same batch also passes the whole-message path, up to the writer

    class Keep:
        def submit(self, item):
            got.append(item)
            return None  # "queue full": answered retryable, nothing else needed here

    ack = Ingest(Keep(), Limits(), SimClock(NOW_MS * 1000), 16 << 20).handle(batch.SerializeToString()).result()
    assert len(got) == 1 and ack.code == RESOURCE_EXHAUSTED and ack.retryable


# ----------------------------------------------------------------------------- bugs these tests found (fixed)


def _one_window_batch(start_ms: int) -> pb.WindowBatch:
    b = pb.WindowBatch.FromString(_bases()[0])
    t = gpu_t(b).slice(0, 1)
    b.gpu_windows_arrow = to_ipc(set_column(t, "window_start_ms", [start_ms]))
    b.proc_windows_arrow = b""
    del b.processes[:]
    return b


def test_window_start_near_int64_max_is_in_the_future():
    b = _one_window_batch((2**63 - 1) // 10_000 * 10_000)
    with pytest.raises(Invalid, match=r"gpu_windows\.window_start_ms: .* in the future"):
        validate(b, NOW_MS)


def test_column_name_that_is_not_utf8_is_invalid():
    b = pb.WindowBatch.FromString(_bases()[0])
    body = bytearray(b.gpu_windows_arrow)
    i = body.find(b"energy_mj")
    body[i + 3] = 0xFF  # "ene\xffgy_mj": same length, not UTF-8
    b.gpu_windows_arrow = bytes(body)
    with pytest.raises(Invalid, match=r"^gpu_windows"):
        validate(b, NOW_MS)


@pytest.mark.parametrize("start", [-10_000, 4_102_444_800_000])
def test_process_window_without_its_gpu_window_is_invalid(start):
    b = pb.WindowBatch.FromString(_bases()[0])
    t = proc_t(b)
    b.proc_windows_arrow = to_ipc(set_cell(t, "window_start_ms", 0, start))
    with pytest.raises(Invalid, match=r"proc_windows\.window_start_ms"):
        validate(b, NOW_MS)


def test_batch_spanning_hundreds_of_months_is_invalid():
    b = _one_window_batch(0)
    t = gpu_t(b)
    month = 31 * 86_400_000 // 10_000 * 10_000
    b.gpu_windows_arrow = to_ipc(set_column(pa.concat_tables([t] * 150), "window_start_ms",
                                            [i * month for i in range(150)]))
    with pytest.raises(Invalid, match=r"gpu_windows\.window_start_ms"):
        validate(b, NOW_MS)


FUZZ = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {root!r})
    from gpuledger.collector.validate import Invalid, TooLarge, validate
    from gpuledger.v1 import telemetry_pb2 as pb
    from tests.helpers import sim_batch
    b = sim_batch(start_us=1_767_225_600_000_000)  # fixed: the same bytes every run
    bad = {{}}
    for field in ("gpu_windows_arrow", "proc_windows_arrow"):
        body, rng = getattr(b, field), random.Random(1)
        for _ in range({n}):
            flipped = bytearray(body)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            m = pb.WindowBatch()
            m.CopyFrom(b)
            setattr(m, field, bytes(flipped))
            try:
                validate(m, 1_767_232_800_000)
            except (Invalid, TooLarge):
                pass
            except Exception as e:  # anything else is a bug
                bad[type(e).__name__] = bad.get(type(e).__name__, 0) + 1
    print(bad)
    sys.exit(1 if bad else 0)
""")


def test_corrupted_arrow_bodies_never_crash_the_validator():
    """Runs in a child process: the failure mode is a segmentation fault."""
    root = str(Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, "-c", FUZZ.format(root=root, n=2500)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout[-500:]} {res.stderr[-500:]}"
