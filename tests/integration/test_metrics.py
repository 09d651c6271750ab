"""Both daemons expose Prometheus metrics and the standard gRPC health service."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig
from gpuledger.metrics import agent_registry, collector_registry, serve
from tests.helpers import aligned_start_us, replace_gpu_column, sim_batch
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
        assert m["gpuledger_agent_batches_spooled_total"] == agent.batches_spooled == 11  # 10 + the closing one
        assert m["gpuledger_agent_batches_acked_total"] == 11
        assert m["gpuledger_agent_windows_acked_total"] == 120
        assert m["gpuledger_agent_windows_dropped_total"] == 0
        assert m["gpuledger_agent_spool_pending_windows"] == 0
    finally:
        server.shutdown()
        sh.close()
