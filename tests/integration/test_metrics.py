"""Both daemons expose Prometheus metrics and the standard gRPC health service."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuledger import __version__
from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.config import AgentConfig
from gpuledger.metrics import agent_registry, collector_registry, serve
from tests.helpers import aligned_start_us, replace_gpu_column, sim_batch
from tests.integration.faults import FaultyStore
from tests.integration.streams import send_batches


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_collector_metrics_and_health(collector):
    server, port = serve(collector_registry(collector), "127.0.0.1:0")
    try:
        bad = replace_gpu_column(sim_batch(seq=2), "util_max_pct", [101] * 24)
        send_batches(collector.address, [sim_batch(seq=1).SerializeToString(), bad.SerializeToString()])
        m = _scrape(port)
        assert m["gpuledger_collector_batches_stored_total"] == 1
        assert m["gpuledger_collector_windows_stored_total"] == 24
        assert m['gpuledger_collector_batches_rejected_total{reason="invalid"}'] == 1
        assert m['gpuledger_collector_insert_seconds_count'] >= 1
        assert m["gpuledger_collector_pending_rows"] == 0
        assert m["gpuledger_collector_pending_rows_limit"] == collector.writer.max_pending_rows
        assert m['gpuledger_collector_serving{service="gpuledger.v1.Telemetry"}'] == 1
        assert m['gpuledger_collector_serving{service="gpuledger.v1.Query"}'] == 1
        # when the store received the agent's latest batch, from its batch log
        received = collector.store.query_rows("SELECT max(received_ms) FROM gpuledger.agent_batches "
                                              "WHERE agent_id = 'h1'")[0][0]
        assert m['gpuledger_collector_agent_last_batch_timestamp_seconds{agent_id="h1",host_id="h1"}'] == \
            received / 1000
        build = [k for k in m if k.startswith("gpuledger_build_info{")]
        assert len(build) == 1 and 'daemon="collector"' in build[0] and 'store="chdb"' in build[0]
        assert f'version="{__version__}"' in build[0] and m[build[0]] == 1
    finally:
        server.shutdown()
    with grpc.insecure_channel(collector.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "gpuledger.v1.Telemetry", "gpuledger.v1.Query"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_agent_metrics(collector, tmp_path):
    start = aligned_start_us(hours_ago=1)
    cfg = AgentConfig(host_id="metrics-host", collector=collector.address, flush_s=60)
    spool = Spool(tmp_path / "spool", fsync=False)
    clock = SimClock(start)
    agent = Agent(cfg, SimulatedSource(cfg.host_id, "T4", [SimGpu("training")] * 2, start), clock, spool,
                  start_us=start)
    for _ in range(10):
        clock.advance(60)
        agent.step()
    agent.close()
    sh = Shipper(collector.address, spool).start()
    assert sh.drain(30)
    server, port = serve(agent_registry(agent, spool, sh), "127.0.0.1:0")
    try:
        m = _scrape(port)
        assert m["gpuledger_agent_windows_sampled_total"] == 2 * 60
        # ten flushes, the window close() closed, and close()'s stop batch (no windows, stopped_ms set)
        assert m["gpuledger_agent_batches_spooled_total"] == agent.batches_spooled == 10 + 1 + 1
        assert m["gpuledger_agent_batches_acked_total"] == 12
        assert m["gpuledger_agent_windows_acked_total"] == 120  # the stop batch carries none
        stored = collector.store.query_rows("SELECT windows FROM gpuledger.agent_batches "
                                            "WHERE agent_id = 'metrics-host' ORDER BY seq")
        assert [w for (w,) in stored][-1] == 0 and sum(w > 0 for (w,) in stored) == 11
        assert collector.store.query_rows("SELECT max(stopped_ms) FROM gpuledger.sessions "
                                          "WHERE host_id = 'metrics-host'")[0][0] == clock.now_us() // 1000
        assert m["gpuledger_agent_windows_dropped_total"] == 0
        assert m["gpuledger_agent_spool_pending_windows"] == 0
    finally:
        server.shutdown()
        sh.close()


def test_an_agent_stopped_on_purpose_is_not_silent_a_killed_one_is(collector, tmp_path):
    """Real agents ship to a real collector: the one whose latest run ended with close() (its stop batch
    stored) has no last-batch series, so GpuledgerAgentSilent cannot fire for it; the one killed
    keeps its series; a restart of the stopped one brings its series back."""
    start = aligned_start_us(hours_ago=1)
    clock = SimClock(start)
    hosts = {}
    for host_id in ("stopped-host", "killed-host"):
        cfg = AgentConfig(host_id=host_id, collector=collector.address, flush_s=60)
        spool = Spool(tmp_path / host_id, fsync=False)
        agent = Agent(cfg, SimulatedSource(host_id, "T4", [SimGpu("training")], start), clock, spool, start_us=start)
        hosts[host_id] = (cfg, spool, agent, Shipper(collector.address, spool).start())
    reg = collector_registry(collector, agents_refresh_s=0)

    def step_all(minutes: int) -> None:
        for _ in range(minutes):
            clock.advance(60)
            for _, _, agent, _ in hosts.values():
                agent.step()

    def last_batch() -> dict[str, float]:
        assert all(sh.drain(30) for *_, sh in hosts.values())
        m = scrape_registry(reg)
        assert m["gpuledger_collector_agent_last_batch_query_errors_total"] == 0
        return {k.split('agent_id="')[1].split('"')[0]: v for k, v in m.items() if "last_batch_timestamp" in k}

    def received(host_id: str) -> float:
        return collector.store.query_rows("SELECT max(received_ms) FROM gpuledger.sessions WHERE host_id = "
                                          "{h:String}", {"h": host_id})[0][0] / 1000

    try:
        step_all(3)
        assert last_batch() == {"stopped-host": received("stopped-host"), "killed-host": received("killed-host")}
        hosts["stopped-host"][2].close()  # SIGTERM: the stop batch is spooled and shipped
        step_all(2)  # the killed host's agent keeps shipping for two more minutes, then dies
        assert last_batch() == {"killed-host": received("killed-host")}
        assert collector.store.query_rows("SELECT max(stopped_ms) FROM gpuledger.sessions WHERE host_id = "
                                          "'stopped-host'")[0][0] == (start + 3 * 60_000_000) // 1000
        # the killed agent sends nothing more and no stop: its series stays at its last batch
        before = received("killed-host")
        clock.advance(600)
        assert last_batch() == {"killed-host": before}
        # the stopped host's agent starts again: a new run without a stop, its series is back
        cfg, spool, _, _ = hosts["stopped-host"]
        again = Agent(cfg, SimulatedSource(cfg.host_id, "T4", [SimGpu("training")], clock.now_us()), clock, spool)
        assert again.session_start_ms > start // 1000
        for _ in range(2):
            clock.advance(60)
            again.step()
        again.flush()
        assert last_batch() == {"stopped-host": received("stopped-host"), "killed-host": before}
    finally:
        for _, spool, _, sh in hosts.values():
            sh.close()
            spool.close()


def test_agents_last_batch_follows_the_store_and_retires_silent_agents(store):
    clock = SimClock(aligned_start_us(hours_ago=0))
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", clock=clock)
    c.start()
    try:
        reg = collector_registry(c, agents_refresh_s=0)
        assert not [k for k in scrape_registry(reg) if "last_batch_timestamp" in k]  # no agent yet
        send_batches(c.address, [sim_batch(seq=1, host_id="a1").SerializeToString()])
        t1 = clock.now_us() / 1e6
        clock.advance(3600)
        send_batches(c.address, [sim_batch(seq=1, host_id="a2").SerializeToString()])
        m = scrape_registry(reg)
        assert m['gpuledger_collector_agent_last_batch_timestamp_seconds{agent_id="a1",host_id="a1"}'] == t1
        assert m['gpuledger_collector_agent_last_batch_timestamp_seconds{agent_id="a2",host_id="a2"}'] == t1 + 3600
        clock.advance(7 * 86400 - 1800)  # a1 silent for 7 days and a half hour: retired; a2 not yet
        m = scrape_registry(reg)
        assert [k for k in m if "last_batch_timestamp" in k] == \
            ['gpuledger_collector_agent_last_batch_timestamp_seconds{agent_id="a2",host_id="a2"}']
        assert m["gpuledger_collector_agent_last_batch_query_errors_total"] == 0
    finally:
        c.stop(grace_s=1)


def test_store_failing_shows_in_serving_and_errors(tmp_path):
    s = FaultyStore(f"chdb://{tmp_path / 'chdb'}")
    c = Collector(s, Pricing.default(), listen="127.0.0.1:0", insert_max_wait_s=0.01)
    c.writer.retry_backoff_s = 0.01
    c.start()
    try:
        reg = collector_registry(c, agents_refresh_s=0)
        s.fail_next, s.fail_retryable = 1, False  # the store refuses the next insert permanently
        acks = send_batches(c.address, [sim_batch(seq=1, host_id="b1").SerializeToString()])
        assert acks[0].code == grpc.StatusCode.INTERNAL.value[0]
        m = scrape_registry(reg)
        assert m['gpuledger_collector_serving{service="gpuledger.v1.Telemetry"}'] == 0
        assert m['gpuledger_collector_serving{service="gpuledger.v1.Query"}'] == 1
        assert m['gpuledger_collector_store_errors_total{kind="permanent"}'] == 1
        assert not [k for k in m if "last_batch_timestamp" in k]  # nothing of b1 was stored
        acks = send_batches(c.address, [sim_batch(seq=1, host_id="b1").SerializeToString()])  # fixed: resent
        assert acks[0].code == 0
        m = scrape_registry(reg)
        assert m['gpuledger_collector_serving{service="gpuledger.v1.Telemetry"}'] == 1
        assert m['gpuledger_collector_store_errors_total{kind="permanent"}'] == 1
        assert 'gpuledger_collector_agent_last_batch_timestamp_seconds{agent_id="b1",host_id="b1"}' in m
        assert m["gpuledger_collector_insert_seconds_count"] == 2  # the failed insert and the good one
    finally:
        c.stop(grace_s=1)
        s.close()


def scrape_registry(reg) -> dict[str, float]:
    from prometheus_client import generate_latest

    out = {}
    for line in generate_latest(reg).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
