"""Regressions for defects a code review found: each test failed before its fix.

Batches are built through the real windower and encoder from hand-made utilization readings,
then stored through the collector's writer into chDB, and read back through the reports.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from gpuledger.agent.runtime import Agent, encode_batch, gpu_infos, host_facts
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.source import GpuFacts, ProcessIdentity, ProcReadings, Readings, UtilReadings
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock, WallClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.reports import cost_rows, idle_rows
from gpuledger.collector.server import Collector
from gpuledger.collector.validate import validate
from gpuledger.collector.writer import Writer
from gpuledger.config import AgentConfig
from gpuledger.v1 import telemetry_pb2 as pb

NOW_MS = int(time.time() * 1000)
BASE = (NOW_MS - 3_600_000) // 10_000 * 10_000  # an hour ago, on a window boundary


def util(gi, t0_ms, t1_ms, pct, held=1):
    t = np.arange(t0_ms, t1_ms, 1000, dtype=np.int64) * 1000
    return UtilReadings(np.full(t.size, gi, np.int32), t, t + 1_000_000, np.full(t.size, pct, np.float32),
                        np.full(t.size, held, np.uint8))


def batch(host, gpus, readings, start_ms, end_ms, seq=1, first_windows=None):
    w = Windower(gpus, 10.0, 0.0, start_us=start_ms * 1000, kernels="numpy")
    w.add(Readings(util=readings))
    closed = w.close(end_ms * 1000)
    cfg = AgentConfig(host_id=host, provider="aws", region="us-east-1", instance_type="g5.12xlarge")
    raw = encode_batch(host, 1, seq, host_facts(cfg, gpus), gpu_infos(gpus, first_windows), closed, 0, NOW_MS)
    return pb.WindowBatch.FromString(raw)


def ingest(store, batches):
    """Store batches as received at NOW_MS by the collector's clock."""
    writer = Writer(store, SimClock(NOW_MS * 1000), 10**6, 0.01, 10**7)
    for b in batches:
        assert writer._insert([validate(b, NOW_MS)]) is None


A = GpuFacts("GPU-A", 0, "A10G", 1, "samples")
B = GpuFacts("GPU-B", 0, "A10G", 1, "samples")


def _secs(row, key):
    return row[key] * 3600


def test_a_replaced_gpu_is_not_counted_twice(store):
    # one slot: GPU-A for 100 s, then GPU-B (a replacement, new UUID) for the next 100 s
    ingest(store, [batch("h1", [A], util(0, BASE, BASE + 100_000, 100), BASE, BASE + 100_000, 1, {"GPU-A": BASE}),
                   batch("h1", [B], util(0, BASE + 100_000, BASE + 200_000, 100), BASE + 100_000, BASE + 200_000, 2,
                         {"GPU-B": BASE + 100_000})])
    rows = {r["gpu_uuid"]: r for r in idle_rows(store, Pricing.default(), 0, NOW_MS, "gpu", {}, now_ms=NOW_MS)}
    assert _secs(rows["GPU-A"], "gpu_hours") == pytest.approx(100) and rows["GPU-A"]["unmonitored_hours"] == 0
    assert _secs(rows["GPU-B"], "gpu_hours") == pytest.approx(100) and rows["GPU-B"]["unmonitored_hours"] == 0


def test_missing_time_is_priced_in_its_own_price_period(store):
    # h1 reports for 100 s then goes silent exactly when its price rises 100x; h2 goes on 300 s more
    ingest(store, [batch("h1", [A], util(0, BASE, BASE + 100_000, 0, 0), BASE, BASE + 100_000, 1),
                   batch("h2", [B], util(0, BASE, BASE + 400_000, 0, 0), BASE, BASE + 400_000, 1)])
    p = Pricing()
    p.set_gpu_price("host", "h1", 1.0)
    p.set_gpu_price("host", "h1", 100.0, effective_from=datetime.fromtimestamp((BASE + 100_000) / 1000, UTC))
    p.set_gpu_price("host", "h2", 1.0)
    # five minutes after its last batch arrived, h1's silence is unmonitored on its own timeline
    h1 = next(r for r in idle_rows(store, p, BASE, BASE + 400_000, "host", {}, now_ms=NOW_MS + 300_000)
              if r["host"] == "h1")
    assert h1["state"] == "silent" and h1["state_since_ms"] == BASE + 100_000
    assert _secs(h1, "unmonitored_hours") == pytest.approx(300)
    assert h1["unmonitored_cost"] == pytest.approx(300 / 3600 * 100)
    assert h1["idle_cost"] == pytest.approx(100 / 3600 * 1)


@pytest.mark.parametrize("since_off, until_off", [(0, 600_000), (5_000, 600_000), (5_000, 595_000), (9_999, 600_000)])
def test_an_unaligned_range_invents_no_unmonitored_time(store, since_off, until_off):
    ingest(store, [batch("h1", [A], util(0, BASE, BASE + 600_000, 100), BASE, BASE + 600_000, 1, {"GPU-A": BASE})])
    r = idle_rows(store, Pricing.default(), BASE + since_off, BASE + until_off, "gpu", {}, now_ms=NOW_MS)[0]
    assert r["unmonitored_hours"] == 0
    assert r["active_hours"] == r["gpu_hours"]


def test_an_agent_restarted_inside_a_window_keeps_what_it_measured(tmp_path):
    start = BASE * 1000
    cfg = AgentConfig(host_id="restart-in-window", flush_s=10)
    spool = Spool(tmp_path / "spool", fsync=False)
    clock = SimClock(start)
    agent = Agent(cfg, SimulatedSource(cfg.host_id, "T4", [SimGpu("training")], start), clock, spool, start_us=start)
    for _ in range(14):  # 14 s: one whole window and 4 s of the next
        clock.advance(1)
        agent.step()
    agent.close()  # graceful stop: the partial window [10 s, 20 s) is closed and spooled
    spool.close()
    clock.advance(2)
    spool2 = Spool(tmp_path / "spool", fsync=False)
    agent2 = Agent(cfg, SimulatedSource(cfg.host_id, "T4", [SimGpu("training")], clock.now_us()), clock, spool2)
    assert agent2.windower.closed_until_us == start + 20_000_000  # it will not emit [10 s, 20 s) again
    for _ in range(20):
        clock.advance(1)
        agent2.step()
    agent2.close()
    starts = []
    for rec in spool2.pending():
        b = pb.WindowBatch.FromString(spool2.read(rec))
        from gpuledger.schema import from_ipc

        if b.stopped_ms and not b.gpu_windows_arrow:  # each run's stop batch
            continue
        starts += from_ipc(b.gpu_windows_arrow).column("window_start_ms").to_pylist()
    assert len(starts) == len(set(starts))  # every window once across the restart
    assert (start + 10_000_000) // 1000 in starts and (start + 20_000_000) // 1000 in starts


def test_process_keys_do_not_grow_while_a_process_runs():
    facts = [A]
    w = Windower(facts, 10.0, 2.0, start_us=BASE * 1000, kernels="numpy")
    for k in range(2000):  # 2000 one-second polls, each from a new short-lived process beside a long one
        t0, t1 = (BASE + k * 1000) * 1000, (BASE + (k + 1) * 1000) * 1000
        procs = [ProcessIdentity(pid=1, start_ms=1), ProcessIdentity(pid=1000 + k, start_ms=BASE + k * 1000)]
        w.add(Readings(util=util(0, BASE + k * 1000, BASE + (k + 1) * 1000, 50),
                       procs=ProcReadings(np.zeros(2, np.int32), np.array([0, 1], np.int32), np.array([t0, t0]),
                                          np.array([t1, t1]), np.array([25.0, 25.0], np.float32),
                                          np.array([1e9, 1e9])),
                       processes=procs))
        w.close(t1)
    # the long process plus the short ones of the open window and the lateness (12 s): not 2000
    assert len(w._proc_key_list) <= 14 and len(w._identities) <= 14


def test_an_oversized_batch_is_split_and_nothing_else_waits(store, tmp_path):
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", max_batch_bytes=20_000)
    c.start()
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        b1 = batch("big-h", [A], util(0, BASE, BASE + 60_000, 50), BASE, BASE + 60_000, 1)
        b2 = batch("big-h", [A], util(0, BASE + 60_000, BASE + 3_660_000, 50), BASE + 60_000, BASE + 3_660_000, 2)
        b3 = batch("big-h", [A], util(0, BASE + 3_660_000, BASE + 3_720_000, 50), BASE + 3_660_000,
                   BASE + 3_720_000, 3)
        assert b2.ByteSize() > 20_000 > b1.ByteSize()
        for b in (b1, b2, b3):
            spool.append(b.SerializeToString(), 1, seq=b.seq)
        sh = Shipper(c.address, spool, ack_timeout_s=5).start()
        assert sh.drain(30)
        sh.close()
        # the shipper learned the collector's limit and split the batch: nothing dead-lettered, nothing lost
        assert sh.max_batch_bytes == 20_000 and sh.stats.split == 1
        assert (sh.stats.rejected, spool.dead_lettered) == (0, 0)
        assert b"replaced by seq 4.." in (tmp_path / "spool" / "deadletter.log").read_bytes()
        seqs = [r[0] for r in store.query_rows("SELECT seq FROM gpuledger.agent_batches ORDER BY seq")]
        assert seqs[:2] == [1, 3] and len(seqs) > 3
        assert store.query_rows("SELECT count() FROM gpuledger.gpu_windows FINAL WHERE host_id = 'big-h'")[0][0] == 372
    finally:
        c.stop(grace_s=1)


def test_a_batch_refused_by_the_transport_is_split_not_resent_forever(tmp_path):
    """An older collector that does not say its limit: gRPC itself refuses the message and ends the
    stream with no acknowledgement. The shipper learns a smaller limit and splits the batch."""
    from concurrent import futures

    import grpc

    received = []

    def stream(requests, context):
        for raw in requests:
            b = pb.WindowBatch.FromString(raw)
            received.append(len(raw))
            yield pb.Ack(seq=b.seq, code=0, stored_windows=1)

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 30_000)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gpuledger.v1.Telemetry", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream, request_deserializer=None,
                                                        response_serializer=pb.Ack.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        big = batch("old-c", [A], util(0, BASE, BASE + 3_600_000, 50), BASE, BASE + 3_600_000, 1)
        small = batch("old-c", [A], util(0, BASE + 3_600_000, BASE + 3_660_000, 50), BASE + 3_600_000,
                      BASE + 3_660_000, 2)
        assert big.ByteSize() > 30_000
        spool.append(big.SerializeToString(), 360, seq=1)
        spool.append(small.SerializeToString(), 6, seq=2)
        sh = Shipper(f"127.0.0.1:{port}", spool, ack_timeout_s=5, backoff_initial_s=0.05, backoff_max_s=0.1).start()
        assert sh.drain(30)
        sh.close()
        assert sh.stats.split >= 1 and spool.dead_lettered == 0
        assert max(received) <= 30_000 and len(received) >= 3
        assert sh.stats.sent < 20  # no endless resending
    finally:
        server.stop(0)


def test_cost_allocation_still_adds_up(store):
    ingest(store, [batch("h1", [A], util(0, BASE, BASE + 100_000, 100), BASE, BASE + 100_000, 1),
                   batch("h2", [B], util(0, BASE, BASE + 300_000, 0, 0), BASE, BASE + 300_000, 1)])
    p = Pricing.default()
    total_idle = sum(r["cost"] for r in idle_rows(store, p, BASE, BASE + 300_000, "host", {}, now_ms=NOW_MS))
    total_cost = sum(r["cost"] for r in cost_rows(store, p, BASE, BASE + 300_000, "team", {}, now_ms=NOW_MS))
    assert total_cost == pytest.approx(total_idle)


def test_the_writer_refuses_work_once_closing_and_answers_everything_queued(store):
    writer = Writer(store, WallClock(), 10**6, 0.01, 10**7)
    writer.start()
    v = validate(batch("closing-h", [A], util(0, BASE, BASE + 60_000, 50), BASE, BASE + 60_000, 1), NOW_MS)
    fut = writer.submit(v)
    writer.close()
    assert fut.done() and fut.exception() is None  # queued before close: committed
    assert writer.submit(v) is None  # after close: refused, so the agent keeps it spooled and retries


def test_a_segment_dropped_under_the_shipper_does_not_break_the_stream(collector, tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False, segment_bytes=4096)  # one batch per segment
    for seq in (1, 2, 3):
        b = batch("vanish-h", [A], util(0, BASE + seq * 60_000, BASE + (seq + 1) * 60_000, 50),
                  BASE + seq * 60_000, BASE + (seq + 1) * 60_000, seq)
        spool.append(b.SerializeToString(), 6, seq=seq)
    segments = {r.segment for r in spool.pending()}
    assert len(segments) == 3
    spool.pending()[0].segment.unlink()  # gone under the shipper, as when a full disk drops it
    sh = Shipper(collector.address, spool, ack_timeout_s=5).start()
    assert sh.drain(20), sh.stats
    sh.close()
    assert sh.stats.acked == 2 and sh.stats.reconnects == 0  # the stream went on past the missing batch
    seqs = [r[0] for r in collector.store.query_rows("SELECT seq FROM gpuledger.agent_batches ORDER BY seq")]
    assert seqs == [2, 3]


# ----------------------------------------------------------------------------- second review


C = GpuFacts("GPU-C", 0, "A10G", 1, "samples")


def test_a_silent_host_counts_only_the_gpus_it_last_had(store):
    ingest(store, [batch("h1", [A], util(0, BASE, BASE + 100_000, 100), BASE, BASE + 100_000, 1, {"GPU-A": BASE}),
                   batch("h1", [B], util(0, BASE + 100_000, BASE + 200_000, 100), BASE + 100_000, BASE + 200_000,
                         2, {"GPU-B": BASE + 100_000}),
                   batch("h2", [C], util(0, BASE, BASE + 600_000, 100), BASE, BASE + 600_000, 1, {"GPU-C": BASE})])
    for f in ({}, {"host": "h1"}):
        # silent for 10 minutes by the collector's clock: its last GPU is unmonitored from its last window on
        rows = [r for r in idle_rows(store, Pricing.default(), BASE + 300_000, BASE + 600_000, "gpu", f,
                                     now_ms=NOW_MS + 600_000) if r["host"] == "h1"]
        assert {r["gpu_uuid"]: round(_secs(r, "unmonitored_hours")) for r in rows} == {"GPU-B": 300}


def test_a_price_change_between_window_edges_invents_no_unmonitored_time(store):
    ingest(store, [batch("h2", [C], util(0, BASE, BASE + 600_000, 100), BASE, BASE + 600_000, 1, {"GPU-C": BASE})])
    p = Pricing()
    p.set_gpu_price("host", "h2", 1.0)
    p.set_gpu_price("host", "h2", 2.0, effective_from=datetime.fromtimestamp((BASE + 305_000) / 1000, UTC))
    r = idle_rows(store, p, BASE, BASE + 600_000, "host", {}, now_ms=NOW_MS)[0]
    assert r["unmonitored_hours"] == 0 and _secs(r, "gpu_hours") == pytest.approx(600)
    assert r["cost"] == pytest.approx(310 / 3600 * 1.0 + 290 / 3600 * 2.0)  # the window at 300 s is priced whole


def test_focus_export_keeps_outages_and_adds_up_to_the_idle_report(store):
    from gpuledger.collector.reports import focus_rows

    hour = 3_600_000
    t0 = (NOW_MS - 5 * hour) // hour * hour
    ingest(store, [batch("solo", [A], util(0, t0, t0 + 600_000, 50), t0, t0 + 600_000, 1, {"GPU-A": t0}),
                   batch("solo", [A], util(0, t0 + 2 * hour, t0 + 2 * hour + 600_000, 50), t0 + 2 * hour,
                         t0 + 2 * hour + 600_000, 2, {"GPU-A": t0})])
    p = Pricing.default()
    idle = idle_rows(store, p, t0, t0 + 3 * hour, "host", {}, now_ms=NOW_MS)[0]
    rows = focus_rows(store, p, t0, t0 + 3 * hour, "hour", now_ms=NOW_MS)
    assert sum(r["ConsumedQuantity"] for r in rows) == pytest.approx(idle["gpu_hours"])
    assert sum(r["BilledCost"] for r in rows) == pytest.approx(idle["cost"])
    hour1 = [r for r in rows if r["ChargePeriodStart"] == _iso_ms(t0 + hour)]
    assert [r["x_GpuState"] for r in hour1] == ["unmonitored"]  # nobody reported: still there, unmonitored
    assert hour1[0]["ConsumedQuantity"] == pytest.approx(1.0)


def _iso_ms(ms):
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_an_old_first_window_is_not_a_reason_to_reject(store):
    from gpuledger.collector.validate import Limits

    b = batch("old-agent", [A], util(0, BASE, BASE + 60_000, 50), BASE, BASE + 60_000, 1,
              {"GPU-A": NOW_MS - 400 * 86_400_000})
    assert validate(b, NOW_MS, Limits(retention_ms=30 * 86_400_000)).gpu.num_rows == 6


def test_an_explicit_start_ignores_where_an_earlier_run_stopped(tmp_path):
    # replay of an older log into a spool that already holds a newer one
    cfg = AgentConfig(host_id="replayer")
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.note_windows(["GPU-A"], BASE, BASE + 600_000)
    older = BASE * 1000 - 86_400_000_000
    agent = Agent(cfg, SimulatedSource("replayer", "T4", [SimGpu("training")], older), SimClock(older), spool,
                  start_us=older)
    assert agent.windower.closed_until_us == older
    # and a live agent never trusts a closed_until in its future (a clock that was ahead)
    spool.note_windows(["GPU-A"], BASE, NOW_MS + 86_400_000)
    live = Agent(cfg, SimulatedSource("replayer", "T4", [SimGpu("training")], BASE * 1000), WallClock(), spool)
    assert live.windower.closed_until_us is None  # it starts from its first readings, as a fresh agent


def test_a_dead_letter_stays_dead_after_a_restart(tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.append(b"bad", 1)
    spool.append(b"good", 1)
    spool.dead_letter(1, "invalid")
    spool.close()
    again = Spool(tmp_path / "spool", fsync=False)
    assert [r.seq for r in again.pending()] == [2] and again.dead_lettered == 1


def test_a_full_disk_of_other_files_loses_at_most_one_segment_and_never_raises(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount permission)")
    spool = None
    try:
        spool = Spool(disk / "spool", fsync=False, segment_bytes=4096)
        for _ in range(40):
            spool.append(b"x" * 1000, 6)
        segments, records = len(spool._segments()), spool.pending_count()
        fd = os.open(disk / "other-program.log", os.O_WRONLY | os.O_CREAT)  # another program fills the disk
        try:
            while os.write(fd, b"\0" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        spool.ack(1)  # the shipper's call: must not raise, and must not empty the spool
        assert len(spool._segments()) >= segments - 1
        assert spool.pending_count() >= records - 1 - 4  # the acked batch, at most one segment dropped
    finally:
        (disk / "other-program.log").unlink(missing_ok=True)
        if spool is not None:
            spool.close()
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
