"""Every fault an automated test: inject it, then check the stored figures.

Promise: no acknowledged window is ever lost, none is stored twice, and time without data is
reported as unmonitored, never as idle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.reports import idle_rows
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.config import AgentConfig
from tests.helpers import aligned_start_us
from tests.integration.faults import CollectorProcess, FaultyStore, TcpProxy, free_port, gpuledger_cmd

PROFILES = ("training", "notebook", "inference", "idle")


class SimHost:
    """One simulated host: SimClock-driven agent + spool + shipper to `target`."""

    def __init__(self, tmp, name, target, start, *, ack_timeout_s=30.0, backoff_max_s=0.5, spool_kw=None,
                 flush_s=60.0):
        self.cfg = AgentConfig(host_id=name, provider="aws", region="us-east-1", instance_type="g6e.12xlarge",
                               collector=target, spool_dir=str(tmp / name), flush_s=flush_s, tick_s=10)
        self.clock = SimClock(start)
        self.source = SimulatedSource(name, "L40S", [SimGpu(p) for p in PROFILES], start, seed=len(name))
        self.spool = Spool(self.cfg.spool_dir, fsync=False, **(spool_kw or {}))
        self.agent = Agent(self.cfg, self.source, self.clock, self.spool, start_us=start)
        self.shipper = Shipper(target, self.spool, ack_timeout_s=ack_timeout_s, backoff_initial_s=0.05,
                               backoff_max_s=backoff_max_s)

    def run(self, minutes: int, tick_s: int = 60, pace_s: float = 0.0) -> None:
        for _ in range(int(minutes * 60 / tick_s)):
            self.clock.advance(tick_s)
            self.agent.step()
            if pace_s:
                time.sleep(pace_s)


def stored(store: Store, host: str | None = None) -> tuple[int, int]:
    where = "WHERE host_id = {h:String}" if host else ""
    r = store.query_rows(f"SELECT count(), uniqExact(host_id, gpu_uuid, window_start_ms) FROM gpuledger.gpu_windows "
                         f"{where}", {"h": host} if host else {})[0]
    final = store.query_rows(f"SELECT count() FROM gpuledger.gpu_windows FINAL {where}", {"h": host} if host else {})
    return int(final[0][0]), int(r[1])


def test_collector_away_then_back(tmp_path, store):
    port = free_port()
    address = f"127.0.0.1:{port}"
    start = aligned_start_us(hours_ago=4)
    hosts = [SimHost(tmp_path, f"away-{i}", address, start) for i in range(2)]
    for h in hosts:
        h.shipper.start()
        h.run(minutes=90)  # the collector is not there: the agents spool and back off
    assert all(h.spool.pending_count() > 0 and h.shipper.stats.acked == 0 for h in hosts)
    assert all(h.shipper.stats.reconnects > 0 for h in hosts)
    c = Collector(store, Pricing.default(), listen=address)
    c.start()
    try:
        for h in hosts:
            h.run(minutes=30)
            h.agent.close()
            assert h.shipper.drain(60), h.shipper.stats
            h.shipper.close()
        for h in hosts:
            assert stored(store, h.cfg.host_id) == (h.agent.windows_sampled, h.agent.windows_sampled)
            assert h.agent.windows_sampled == 4 * 120 * 6
    finally:
        c.stop(grace_s=1)


def test_collector_sigkill_during_inserts_loses_no_acked_window(tmp_path):
    port = free_port()
    data = tmp_path / "collector"
    col = CollectorProcess(data, port).start()
    start = aligned_start_us(hours_ago=10)
    hosts = [SimHost(tmp_path, f"kill-{i}", col.address, start, flush_s=30, ack_timeout_s=5) for i in range(3)]
    for h in hosts:
        h.shipper.start()
    threads = [threading.Thread(target=h.run, args=(480,), kwargs={"pace_s": 0.004}) for h in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(h.shipper.stats.acked for h in hosts) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    acked_before_kill = sum(h.shipper.stats.acked_windows for h in hosts)
    assert acked_before_kill > 0
    assert col.kill(signal.SIGKILL) == -signal.SIGKILL  # mid-stream: more batches are in flight
    time.sleep(0.5)
    col = CollectorProcess(data, port).start()  # same data directory, same port
    for t in threads:
        t.join()
    for h in hosts:
        h.agent.close()
        assert h.shipper.drain(120), h.shipper.stats
        h.shipper.close()
    assert col.kill(signal.SIGTERM) == 0
    s = Store(f"chdb://{data / 'chdb'}")
    try:
        for h in hosts:
            assert stored(s, h.cfg.host_id) == (h.agent.windows_sampled, h.agent.windows_sampled)
        total = sum(h.agent.windows_sampled for h in hosts)
        assert total == 3 * 480 * 6 * 4
        raw = s.query_rows("SELECT count() FROM gpuledger.gpu_windows")[0][0]
        assert raw >= total  # resent batches may be stored twice physically; FINAL counts each once
    finally:
        s.close()


def test_agent_sigkill_then_restart_replays_spool_and_reports_gap_as_unmonitored(tmp_path, store):
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "GPULEDGER_AGENT_HOST_ID": "killed-agent", "GPULEDGER_AGENT_WINDOW_S": "1",
           "GPULEDGER_AGENT_TICK_S": "0.2", "GPULEDGER_AGENT_FLUSH_S": "0.5", "GPULEDGER_AGENT_LATENESS_S": "0.3",
           "GPULEDGER_AGENT_BACKOFF_MAX_S": "0.3", "GPULEDGER_AGENT_INSTANCE_TYPE": "g5.12xlarge",
           "GPULEDGER_AGENT_PROVIDER": "aws", "GPULEDGER_AGENT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"}
    spool = tmp_path / "spool"
    args = gpuledger_cmd("agent", "run", "--simulate", "--sim-profile", "inference", "--sim-gpus", "2",
                         "--sim-model", "A10G", "--collector", address, "--spool-dir", str(spool))
    log = open(tmp_path / "agent.log", "ab")
    t_start = time.time()
    a1 = subprocess.Popen(args, env=env, stdout=log, stderr=log)
    time.sleep(6)  # no collector yet: everything goes to the spool
    t_kill = time.time()
    a1.send_signal(signal.SIGKILL)
    a1.wait(timeout=10)
    assert any(spool.glob("*.seg"))
    c = Collector(store, Pricing.default(), listen=address)
    c.start()
    try:
        time.sleep(3)  # the agent is dead for these seconds
        t_restart = time.time()
        a2 = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        time.sleep(6)
        a2.send_signal(signal.SIGTERM)  # graceful: closes the open window into the spool, drains
        assert a2.wait(timeout=30) == 0
        t_end = time.time()
        starts = [r[0] / 1000 for r in store.query_rows(
            "SELECT DISTINCT window_start_ms FROM gpuledger.gpu_windows FINAL WHERE host_id = 'killed-agent' "
            "ORDER BY 1")]
        # windows spooled by the killed agent were replayed after the restart
        before = [s for s in starts if s < t_kill]
        assert len(before) >= (t_kill - t_start) - 4  # minus start-up, the open window and the unflushed ones
        # SIGTERM closed the open window into the spool and shipped it before exiting
        assert starts[-1] >= t_end - 3
        # nothing is stored for the time the agent was dead (a window closed at most as the kill came)
        assert not [s for s in starts if t_kill + 1 < s < t_restart - 1]
        since, until = int(starts[0] * 1000), int(t_end * 1000) // 1000 * 1000
        row = idle_rows(store, c.pricing, since, until, "host", {})[0]
        gap_gpu_h = 2 * (t_restart - t_kill) / 3600
        assert row["unmonitored_hours"] >= gap_gpu_h * 0.9  # the dead time is unmonitored...
        # ...and never idle: the inference profile holds its GPUs, so no idle-free time at all
        assert row["idle_free_hours"] == 0
        total = row["active_hours"] + row["idle_held_hours"] + row["idle_free_hours"] + row["unmonitored_hours"]
        # the SIGTERM is a stop on purpose: expected time ends there, not at the end of the last window
        assert row["state"] == "stopped"
        stop = min(until, row["state_since_ms"])
        assert stop > until - 2000
        assert total == pytest.approx(2 * (stop - since) / 3.6e6, rel=0.01)
        assert stored(store, "killed-agent")[0] == stored(store, "killed-agent")[1]
    finally:
        c.stop(grace_s=1)


def test_connection_cut_and_stalled_mid_stream(tmp_path, collector):
    proxy = TcpProxy(collector.port)
    start = aligned_start_us(hours_ago=6)
    h = SimHost(tmp_path, "cut-host", proxy.address, start, flush_s=30, ack_timeout_s=1.0)
    h.shipper.start()
    try:
        t = threading.Thread(target=h.run, args=(300,), kwargs={"pace_s": 0.005})
        t.start()
        for _ in range(3):
            time.sleep(0.4)
            proxy.cut()  # the connection drops: RST mid-stream
        time.sleep(0.3)
        proxy.stalled.set()  # the connection hangs: no bytes either way
        time.sleep(2.5)
        proxy.stalled.clear()
        t.join()
        h.agent.close()
        assert h.shipper.drain(60), h.shipper.stats
        h.shipper.close()
        assert proxy.connections >= 4
        assert stored(collector.store, "cut-host") == (h.agent.windows_sampled, h.agent.windows_sampled)
        assert h.agent.windows_sampled == 300 * 6 * 4
    finally:
        proxy.close()


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_spool_disk_full_drops_oldest_and_counts(tmp_path, collector):
    spool_dir = tmp_path / "small-disk"
    if not _mount_tmpfs(spool_dir, "256k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount permission)")
    try:
        port = free_port()
        start = aligned_start_us(hours_ago=8)
        h = SimHost(tmp_path, "full-host", f"127.0.0.1:{port}", start, flush_s=60,
                    spool_kw={"segment_bytes": 32 * 1024})
        h.spool = Spool(spool_dir, fsync=False, segment_bytes=32 * 1024)  # the real disk limit, not max_bytes
        h.agent.spool = h.spool
        h.run(minutes=360)  # 6 h with no collector: the 256 kB disk fills up
        assert h.spool.dropped_windows > 0
        h.agent.close()
        assert h.agent.windows_sampled == 360 * 6 * 4  # sampling never stopped
        dropped = h.spool.dropped_windows
        sh = Shipper(collector.address, h.spool)
        sh.start()
        assert sh.drain(60)
        sh.close()
        n, uniq = stored(collector.store, "full-host")
        assert n == uniq == h.agent.windows_sampled - dropped
        row = idle_rows(collector.store, collector.pricing, start // 1000, start // 1000 + 6 * 3_600_000, "host",
                        {})[0]
        assert row["dropped_windows"] == dropped  # the count reached the collector and the report
        assert row["unmonitored_hours"] == pytest.approx(dropped * 10 / 3600, rel=0.01)
    finally:
        if "h" in locals():
            h.spool.close()
        if subprocess.run(["umount", str(spool_dir)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(spool_dir)], capture_output=True)


def test_spool_size_limit_drops_oldest_and_counts(tmp_path, collector):
    start = aligned_start_us(hours_ago=8)
    h = SimHost(tmp_path, "limit-host", f"127.0.0.1:{free_port()}", start, flush_s=60,
                spool_kw={"max_bytes": 128 * 1024, "segment_bytes": 16 * 1024})
    h.run(minutes=240)
    h.agent.close()
    assert h.spool.dropped_windows > 0 and h.spool.bytes_used() <= 128 * 1024
    sh = Shipper(collector.address, h.spool).start()
    assert sh.drain(60)
    sh.close()
    assert stored(collector.store, "limit-host")[0] == h.agent.windows_sampled - h.spool.dropped_windows


@pytest.fixture
def faulty_collector(tmp_path):
    s = FaultyStore(f"chdb://{tmp_path / 'chdb'}")
    c = Collector(s, Pricing.default(), listen="127.0.0.1:0", max_pending_rows=300, insert_max_wait_s=0.01)
    c.writer.retry_backoff_s = 0.01
    c.start()
    yield c
    c.stop(grace_s=1)
    s.close()


def test_store_failing_retryable_then_recovering(tmp_path, faulty_collector):
    c, s = faulty_collector, faulty_collector.store
    s.fail_next = 10  # more than the writer's own retries: the agents must resend
    start = aligned_start_us(hours_ago=3)
    h = SimHost(tmp_path, "flaky-store", c.address, start, flush_s=60)
    h.shipper.start()
    h.run(minutes=60)
    h.agent.close()
    assert h.shipper.drain(60), h.shipper.stats
    h.shipper.close()
    assert s.failures == 10 and c.writer.store_errors_retryable == 10
    assert h.shipper.stats.retried > 0  # the agent was told to resend, and did
    assert stored(s, "flaky-store") == (h.agent.windows_sampled, h.agent.windows_sampled)


def test_permanent_store_error_is_told_apart_and_keeps_data(tmp_path, faulty_collector):
    from grpc_health.v1 import health_pb2

    c, s = faulty_collector, faulty_collector.store
    s.fail_next, s.fail_retryable = 10_000, False  # broken until an operator fixes it
    start = aligned_start_us(hours_ago=3)
    h = SimHost(tmp_path, "broken-store", c.address, start, flush_s=60)
    h.run(minutes=2)
    h.agent.flush()
    h.shipper.start()
    deadline = time.monotonic() + 20
    while h.shipper.stats.retried == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.writer.store_errors_permanent >= 1 and c.writer.store_errors_retryable == 0  # no blind retries
    assert "permanent error, operator action needed" in h.shipper.stats.last_error
    assert c.health._server_status.get("gpuledger.v1.Telemetry") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert h.shipper.stats.rejected == 0  # valid data is never dead-lettered for a store fault
    assert stored(s, "broken-store")[0] == 0
    s.fail_next = 0  # the operator fixed the store
    assert h.shipper.drain(30)
    h.shipper.close()
    assert stored(s, "broken-store")[0] == h.agent.windows_sampled
    status = c.health._server_status.get("gpuledger.v1.Telemetry")
    assert status == health_pb2.HealthCheckResponse.SERVING  # back once an insert succeeded


def test_slow_store_applies_backpressure_and_nothing_is_lost(tmp_path, faulty_collector):
    c, s = faulty_collector, faulty_collector.store
    s.slow_s = 0.15
    start = aligned_start_us(hours_ago=5)
    hosts = [SimHost(tmp_path, f"slow-{i}", c.address, start, flush_s=60) for i in range(3)]
    for h in hosts:
        h.run(minutes=120)  # a backlog of 120 batches each
        h.shipper.start()
    for h in hosts:
        h.agent.close()
        assert h.shipper.drain(120), h.shipper.stats
        h.shipper.close()
    assert c.ingest.stats.deferred > 0  # RESOURCE_EXHAUSTED answered while the writer was behind
    assert sum(h.shipper.stats.retried for h in hosts) > 0
    for h in hosts:
        assert stored(s, h.cfg.host_id) == (h.agent.windows_sampled, h.agent.windows_sampled)


def test_collector_sigterm_finishes_in_flight_inserts(tmp_path):
    port = free_port()
    data = tmp_path / "collector"
    col = CollectorProcess(data, port).start()
    start = aligned_start_us(hours_ago=3)
    h = SimHost(tmp_path, "term-host", col.address, start, flush_s=60)
    h.run(minutes=120)
    h.agent.close()
    h.shipper.start()
    deadline = time.monotonic() + 30
    while h.shipper.stats.acked < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert col.kill(signal.SIGTERM) == 0
    h.shipper.close()
    acked = h.shipper.stats.acked_windows
    s = Store(f"chdb://{data / 'chdb'}")
    try:
        n = stored(s, "term-host")[0]
        assert n >= acked  # every acknowledged window is stored
    finally:
        s.close()
