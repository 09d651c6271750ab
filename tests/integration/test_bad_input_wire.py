"""Bad input over a real socket: refused precisely, nothing of it stored, and nobody else disturbed.

One agent streams good and bad batches interleaved on one stream while a second agent (another host)
streams good batches on its own stream at the same time. Every bad batch gets a non-retryable
INVALID_ARGUMENT (RESOURCE_EXHAUSTED for size) naming the problem, the collector keeps serving, the
store holds exactly the good batches' rows (per host, per table), and the other agent loses nothing.
"""

from __future__ import annotations

import threading

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import INVALID_ARGUMENT, OK, RESOURCE_EXHAUSTED, Collector
from gpuledger.schema import from_ipc, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb
from tests.helpers import aligned_start_us, replace_gpu_column, sim_batch
from tests.integration.streams import send_batches

HOST_A, HOST_B = "wire-agent-a", "wire-agent-b"
MINUTE_US = 60_000_000
PROFILES = ("training", "notebook")  # two GPUs, with process rows


def _good(host: str, seq: int, start_us: int, minutes: float = 1.0, profiles=PROFILES) -> pb.WindowBatch:
    return sim_batch(seq=seq, host_id=host, start_us=start_us, minutes=minutes, profiles=profiles)


def _keys(b: pb.WindowBatch) -> set[tuple[str, int]]:
    t = from_ipc(b.gpu_windows_arrow)
    return set(zip(t.column("gpu_uuid").to_pylist(), t.column("window_start_ms").to_pylist(), strict=True))


def _with_body(b: pb.WindowBatch, body: bytes) -> pb.WindowBatch:
    out = pb.WindowBatch()
    out.CopyFrom(b)
    out.gpu_windows_arrow = body
    return out


def _set(b: pb.WindowBatch, fn) -> pb.WindowBatch:
    fn(b)
    return b


def _float_busy(b: pb.WindowBatch) -> pb.WindowBatch:
    t = from_ipc(b.gpu_windows_arrow)
    i = t.schema.get_field_index("busy_ms")
    col = pa.array([float("nan")] + [float(x) for x in t.column("busy_ms").to_pylist()[1:]], pa.float64())
    return _with_body(b, to_ipc(t.set_column(i, pa.field("busy_ms", pa.float64()), col)))


def _hist_of_nine(b: pb.WindowBatch) -> pb.WindowBatch:
    t = from_ipc(b.gpu_windows_arrow)
    hist = t.column("util_hist").to_pylist()
    hist[-1] = hist[-1][:9]
    return replace_gpu_column(b, "util_hist", hist)


def _unknown_process(b: pb.WindowBatch) -> pb.WindowBatch:
    del b.processes[0]
    return b


def _five_thousand_gpus(b: pb.WindowBatch) -> pb.WindowBatch:
    b.gpus.extend(pb.GpuInfo(uuid=f"GPU-rejected-{i:05d}", index=i, name="never stored") for i in range(5000))
    return b


def _future(b: pb.WindowBatch) -> pb.WindowBatch:
    n = from_ipc(b.gpu_windows_arrow).num_rows
    return replace_gpu_column(b, "window_start_ms", [4_102_444_800_000 + 10_000 * i for i in range(n)])


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def _n(b):
    return from_ipc(b.gpu_windows_arrow).num_rows


# (what is wrong, how to break a good batch, expected ack code, substring the ack must name)
BAD = [
    ("utilization over 100", lambda b: replace_gpu_column(b, "util_max_pct", [101] * _n(b)), INVALID_ARGUMENT,
     "gpu_windows.util_max_pct: 101 exceeds 100"),
    ("states not adding up", lambda b: replace_gpu_column(
        b, "idle_free_ms", [v + 1 for v in from_ipc(b.gpu_windows_arrow).column("idle_free_ms").to_pylist()]),
     INVALID_ARGUMENT, "busy_ms+idle_held_ms+idle_free_ms+unmonitored_ms"),
    ("NaN in an integer column", _float_busy, INVALID_ARGUMENT, "gpu_windows.busy_ms: type double, expected uint32"),
    ("garbage Arrow body", lambda b: _with_body(b, b"\x00garbage\xff" * 40), INVALID_ARGUMENT,
     "gpu_windows: not an Arrow IPC stream"),
    ("oversized tag", lambda b: _set(b, lambda m: m.host.tags.__setitem__("team", "t" * 300)), INVALID_ARGUMENT,
     "host.tags[team]: 300 characters, at most 256"),
    ("row of an undeclared process", _unknown_process, INVALID_ARGUMENT, "proc_windows.(pid, proc_start_ms)"),
    ("5,000 GPUs", _five_thousand_gpus, RESOURCE_EXHAUSTED, "gpus: 5002 GPUs in one batch, at most 1024"),
    ("window in 2100", _future, INVALID_ARGUMENT, "gpu_windows.window_start_ms: 4102444800000 is in the future"),
    ("histogram of 9 buckets", _hist_of_nine, INVALID_ARGUMENT, "gpu_windows.util_hist: 10 buckets expected"),
    ("unknown protobuf field", lambda b: pb.WindowBatch.FromString(b.SerializeToString() + _varint(4234 << 3) + b"\x01"),
     INVALID_ARGUMENT, "batch: unknown field number 4234 "),
    ("control character in host_id", lambda b: _set(b, lambda m: setattr(m.host, "host_id", HOST_A + "\n")),
     INVALID_ARGUMENT, "host.host_id: contains control characters"),
]


def _counts(store) -> dict[str, dict]:
    """Per host: rows and distinct keys of every table the ingest path writes."""
    q = store.query_rows
    out: dict[str, dict] = {}
    for host, rows, keys in q("SELECT host_id, count(), uniqExact(gpu_uuid, window_start_ms) "
                              "FROM gpuledger.gpu_windows GROUP BY host_id"):
        out.setdefault(host, {})["gpu_windows"] = (rows, keys)
    for host, rows in q("SELECT host_id, count() FROM gpuledger.proc_windows GROUP BY host_id"):
        out.setdefault(host, {})["proc_windows"] = rows
    for host, seqs in q("SELECT host_id, groupArray(seq) FROM gpuledger.agent_batches GROUP BY host_id"):
        out.setdefault(host, {})["seqs"] = sorted(seqs)
    for host, uuids in q("SELECT host_id, groupUniqArray(uuid) FROM gpuledger.gpus GROUP BY host_id"):
        out.setdefault(host, {})["gpus"] = sorted(uuids)
    for host, procs in q("SELECT host_id, groupUniqArray((pid, start_ms)) FROM gpuledger.processes GROUP BY host_id"):
        out.setdefault(host, {})["processes"] = sorted(tuple(p) for p in procs)
    for (host,) in q("SELECT host_id FROM gpuledger.hosts"):
        out.setdefault(host, {})["host_row"] = True
    return out


def _expected(batches: list[pb.WindowBatch]) -> dict:
    keys = set().union(*(_keys(b) for b in batches))
    return {"gpu_windows": (len(keys), len(keys)),
            "proc_windows": sum(from_ipc(b.proc_windows_arrow).num_rows for b in batches),
            "seqs": sorted(b.seq for b in batches),
            "gpus": sorted({g.uuid for b in batches for g in b.gpus}),
            "processes": sorted({(p.pid, p.start_ms) for b in batches for p in b.processes}),
            "host_row": True}


def _serving(address: str) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return [stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                for s in ("", "gpuledger.v1.Telemetry", "gpuledger.v1.Query")]


SERVING = [health_pb2.HealthCheckResponse.SERVING] * 3


def test_interleaved_bad_batches_are_refused_and_the_other_agent_loses_nothing(collector):
    store = collector.store
    t0 = aligned_start_us(hours_ago=6.0)
    # host A has history before the bad stream starts: the counts must not move from it except by good batches
    first = _good(HOST_A, 1, t0)
    assert [a.code for a in send_batches(collector.address, [first.SerializeToString()])] == [OK]
    before = _counts(store)
    assert before == {HOST_A: _expected([first])}

    # agent A: good, bad, good, bad, ... and a final good one; every batch's windows are its own minute
    stream_a, good_a, expect = [], [first], []
    seq = 1
    for i, (what, breaker, code, names) in enumerate(BAD):
        seq += 1
        g = _good(HOST_A, seq, t0 + (2 * i + 1) * MINUTE_US)
        stream_a.append(g.SerializeToString())
        good_a.append(g)
        expect.append(("good", OK, ""))
        seq += 1
        bad = breaker(_good(HOST_A, seq, t0 + (2 * i + 2) * MINUTE_US))
        stream_a.append(bad.SerializeToString())
        expect.append((what, code, names))
    stream_a.append(b"\x0a\xff\xff\xff\x0f not protobuf")  # garbage whole message: no seq to echo
    expect.append(("garbage message", INVALID_ARGUMENT, "batch: not a gpuledger.v1.WindowBatch"))
    seq += 1
    last = _good(HOST_A, seq, t0 + 200 * MINUTE_US)
    stream_a.append(last.SerializeToString())
    good_a.append(last)
    expect.append(("good", OK, ""))

    # agent B: another host, its own stream, at the same time
    good_b = [_good(HOST_B, s, t0 + s * MINUTE_US, profiles=("inference", "training", "idle")) for s in range(1, 31)]
    acks_b: list = []
    go = threading.Barrier(2)

    def agent_b():
        go.wait()
        acks_b.extend(send_batches(collector.address, [b.SerializeToString() for b in good_b]))

    tb = threading.Thread(target=agent_b)
    tb.start()
    go.wait()
    acks_a = send_batches(collector.address, stream_a)
    tb.join(timeout=120)

    assert len(acks_a) == len(stream_a)
    for ack, raw, (what, code, names) in zip(acks_a, stream_a, expect, strict=True):
        assert ack.code == code, (what, ack)
        if code == OK:
            m = pb.WindowBatch.FromString(raw)
            assert ack.seq == m.seq and ack.stored_windows == len(_keys(m)), what
        else:
            assert not ack.retryable, (what, ack)
            assert names in ack.message, (what, ack.message)
            assert ack.seq == (0 if what == "garbage message" else pb.WindowBatch.FromString(raw).seq), what
    assert [a.code for a in acks_b] == [OK] * len(good_b)
    assert [a.seq for a in acks_b] == [b.seq for b in good_b]

    # the collector keeps serving: healthy, and a new stream from A is acknowledged
    assert _serving(collector.address) == SERVING
    seq += 1
    after_all = _good(HOST_A, seq, t0 + 300 * MINUTE_US)
    assert [a.code for a in send_batches(collector.address, [after_all.SerializeToString()])] == [OK]
    good_a.append(after_all)

    # exactly the good batches are stored: every table, per host; nothing of a bad batch
    after = _counts(store)
    assert after == {HOST_A: _expected(good_a), HOST_B: _expected(good_b)}
    stored_a = set(store.query_rows("SELECT gpu_uuid, window_start_ms FROM gpuledger.gpu_windows "
                                    "WHERE host_id = {h:String}", {"h": HOST_A}))
    assert stored_a == set().union(*(_keys(b) for b in good_a))
    stats = collector.ingest.stats
    invalid = sum(code == INVALID_ARGUMENT for _, _, code, _ in BAD) + 1  # and the garbage message
    assert stats.rejected == {"invalid": invalid, "too_large": 1}


def _big(host: str, seq: int, start_us: int, minutes: float) -> pb.WindowBatch:
    return _good(host, seq, start_us, minutes=minutes, profiles=("training",) * 8)


def test_oversized_messages_get_resource_exhausted_and_the_collector_keeps_serving(store):
    limit = 1 << 20
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_batch_bytes=limit)
    c.start()
    try:
        t0 = aligned_start_us(hours_ago=30.0)
        small1 = _good(HOST_A, 1, t0)
        over = _big(HOST_A, 2, t0 + 10 * MINUTE_US, minutes=140)  # over max_batch_bytes, under gRPC's own limit
        small2 = _good(HOST_A, 3, t0 + 200 * MINUTE_US)
        raw_over = over.SerializeToString()
        assert limit < len(raw_over) < limit + (1 << 20)
        acks = send_batches(c.address, [small1.SerializeToString(), raw_over, small2.SerializeToString()])
        assert [a.code for a in acks] == [OK, RESOURCE_EXHAUSTED, OK]
        assert not acks[1].retryable  # resending the same bytes would fail forever: dead-letter it
        assert acks[1].message == f"batch: {len(raw_over)} bytes, at most {limit}"

        # far over: gRPC itself refuses the message and ends that stream; the server lives on
        huge = _big(HOST_A, 4, t0 + 400 * MINUTE_US, minutes=300).SerializeToString()
        assert len(huge) > limit + (1 << 20)
        with pytest.raises(grpc.RpcError) as err:
            send_batches(c.address, [huge])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _serving(c.address) == SERVING
        small3 = _good(HOST_A, 5, t0 + 800 * MINUTE_US)
        assert [a.code for a in send_batches(c.address, [small3.SerializeToString()])] == [OK]

        assert _counts(store) == {HOST_A: _expected([small1, small2, small3])}
    finally:
        c.stop(grace_s=1)


def test_a_column_name_that_is_not_utf8_is_answered_and_the_stream_goes_on(collector):
    t0 = aligned_start_us(hours_ago=8.0)
    g1, bad, g2 = (_good(HOST_A, s, t0 + s * MINUTE_US) for s in (1, 2, 3))
    body = bytearray(bad.gpu_windows_arrow)
    i = body.find(b"energy_mj")
    body[i + 3] = 0xFF
    bad.gpu_windows_arrow = bytes(body)
    acks = send_batches(collector.address, [g1.SerializeToString(), bad.SerializeToString(), g2.SerializeToString()])
    assert [(a.seq, a.code) for a in acks] == [(1, OK), (2, INVALID_ARGUMENT), (3, OK)]


def test_a_batch_spanning_hundreds_of_months_is_refused_without_poisoning_others(collector):
    t0 = aligned_start_us(hours_ago=10.0)
    bad = _good(HOST_A, 1, t0, minutes=0.2, profiles=("idle",))
    t = from_ipc(bad.gpu_windows_arrow).slice(0, 1)
    month = 31 * 86_400_000 // 10_000 * 10_000
    t = pa.concat_tables([t] * 150)
    t = t.set_column(1, "window_start_ms", pa.array([i * month for i in range(150)], pa.int64()))
    bad = _with_body(bad, to_ipc(t))
    bad.proc_windows_arrow = b""
    del bad.processes[:]
    good_b = [_good(HOST_B, s, t0 + s * MINUTE_US) for s in range(1, 11)]
    acks_b: list = []
    tb = threading.Thread(target=lambda: acks_b.extend(
        send_batches(collector.address, [b.SerializeToString() for b in good_b])))
    tb.start()
    acks_a = send_batches(collector.address, [bad.SerializeToString()])
    tb.join(timeout=60)
    assert acks_a[0].code == INVALID_ARGUMENT and not acks_a[0].retryable
    assert "gpu_windows.window_start_ms" in acks_a[0].message
    assert [a.code for a in acks_b] == [OK] * len(good_b)
    assert _counts(collector.store) == {HOST_B: _expected(good_b)}

