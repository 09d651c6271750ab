"""Validation: every problem is named; a good batch passes."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from gpuledger.collector.validate import Invalid, Limits, TooLarge, validate
from gpuledger.schema import from_ipc, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb
from tests.helpers import replace_gpu_column, sim_batch

NOW = lambda: int(time.time() * 1000)  # noqa: E731


def test_good_batch_passes():
    b = sim_batch()
    v = validate(b, NOW())
    assert v.gpu.num_rows == 2 * 12 and v.proc.num_rows > 0


def _n(b):
    return from_ipc(b.gpu_windows_arrow).num_rows


@pytest.mark.parametrize("column, mutate, message", [
    ("util_max_pct", lambda n: [101] * n, r"gpu_windows\.util_max_pct: 101 exceeds 100 at row 0"),
    ("busy_ms", lambda n: [10_001] + [0] * (n - 1), r"gpu_windows\.busy_ms\+idle_held_ms\+idle_free_ms\+unmonitored_ms"),
    ("window_ms", lambda n: [0] * n, r"gpu_windows\.window_ms: 0 at row 0"),
    ("window_start_ms", lambda n: [4_102_444_800_000] * n, r"gpu_windows\.window_start_ms: .* in the future"),
    ("window_start_ms", lambda n: [1_700_000_000_001] * n, r"not a multiple of window_ms"),
    ("gpu_uuid", lambda n: ["GPU-unknown"] * n, r"gpu_windows\.gpu_uuid: 'GPU-unknown' at row 0 is not in gpus"),
    ("sample_count", lambda n: [7] * n, r"gpu_windows\.util_hist: sums to \d+, sample_count is 7"),
])
def test_bad_columns_are_named(column, mutate, message):
    b = sim_batch()
    bad = replace_gpu_column(b, column, mutate(_n(b)))
    with pytest.raises(Invalid, match=message):
        validate(bad, NOW())


def test_schema_mismatch_names_the_column():
    b = sim_batch()
    t = from_ipc(b.gpu_windows_arrow)
    t = t.set_column(t.schema.get_field_index("busy_ms"), "busy_ms", t.column("busy_ms").cast(pa.float64()))
    b.gpu_windows_arrow = to_ipc(t)
    with pytest.raises(Invalid, match=r"gpu_windows\.busy_ms: type double, expected uint32"):
        validate(b, NOW())
    b2 = sim_batch()
    b2.gpu_windows_arrow = to_ipc(from_ipc(b2.gpu_windows_arrow).drop_columns(["energy_mj"]))
    with pytest.raises(Invalid, match=r"gpu_windows\.energy_mj: missing"):
        validate(b2, NOW())


def test_garbage_body_and_headers():
    b = sim_batch()
    b.gpu_windows_arrow = b"not arrow at all"
    with pytest.raises(Invalid, match="gpu_windows: not an Arrow IPC stream"):
        validate(b, NOW())
    for field, value, msg in (("agent_id", "", "agent_id: required"), ("seq", 0, "seq: must be >= 1")):
        b = sim_batch()
        setattr(b, field, value)
        with pytest.raises(Invalid, match=msg):
            validate(b, NOW())
    b = sim_batch()
    b.host.host_id = "x" * 500
    with pytest.raises(Invalid, match="host.host_id: 500 characters, at most 128"):
        validate(b, NOW())
    b = sim_batch()
    b.host.tags["team"] = "a\x00b"
    with pytest.raises(Invalid, match=r"host.tags\[team\]: contains control characters"):
        validate(b, NOW())


def test_process_rows_must_reference_known_processes():
    b = sim_batch()
    del b.processes[:]
    with pytest.raises(Invalid, match=r"proc_windows\.\(pid, proc_start_ms\).*not in processes"):
        validate(b, NOW())


def test_too_many_gpus_is_too_large():
    b = sim_batch()
    for i in range(2000):
        b.gpus.add(uuid=f"GPU-extra-{i}")
    with pytest.raises(TooLarge, match="gpus: 2002 GPUs in one batch, at most 1024"):
        validate(b, NOW(), Limits())


def test_duplicate_window_in_one_batch():
    b = sim_batch()
    t = from_ipc(b.gpu_windows_arrow)
    b.gpu_windows_arrow = to_ipc(pa.concat_tables([t, t.slice(0, 1)]))
    with pytest.raises(Invalid, match="duplicate window"):
        validate(b, NOW())


def test_unparseable_message_is_invalid_at_ingest():
    from concurrent import futures  # noqa: F401

    from gpuledger.collector.server import INVALID_ARGUMENT, Ingest

    ingest = Ingest(writer=None, limits=Limits(), clock=type("C", (), {"now_us": lambda self: NOW() * 1000})(),
                    max_batch_bytes=1 << 20)
    ack = ingest.handle(b"\xff\xff\xff garbage").result()
    assert ack.code == INVALID_ARGUMENT and "not a gpuledger.v1.WindowBatch" in ack.message
    assert isinstance(ack, pb.Ack)
