"""End to end over real sockets: simulated agents -> gRPC -> collector -> chDB -> priced report."""

from __future__ import annotations

import pytest

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.spool import Spool
from gpuledger.client import fetch_report
from gpuledger.clock import SimClock
from gpuledger.collector.reports import idle_rows
from gpuledger.collector.server import INVALID_ARGUMENT, OK
from gpuledger.config import AgentConfig
from gpuledger.demo import run_fleet
from gpuledger.schema import from_ipc
from tests.helpers import aligned_start_us, replace_gpu_column, sim_batch
from tests.integration.streams import send_batches

HOURS = 4.0


def test_fleet_matches_ground_truth_and_every_window_arrives_once(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", n_hosts=4, hours=HOURS, seed=11, tick_s=60,
                    flush_s=300)
    since, until = run.start_us // 1000, run.end_us // 1000
    # the report as the CLI gets it: over the Query service
    table, reply = fetch_report(collector.address, "idle", since, until, "host")
    rows = {r["host"]: r for r in table.to_pylist()}
    truth = run.truth()
    assert set(rows) == set(truth)
    for host, t in truth.items():
        r = rows[host]
        assert r["active_hours"] == pytest.approx(t.active_s / 3600, rel=0.005)
        assert r["idle_held_hours"] == pytest.approx(t.idle_held_s / 3600, rel=0.005, abs=1e-3)
        assert r["idle_free_hours"] == pytest.approx(t.idle_free_s / 3600, rel=0.005, abs=1e-3)
        # the simulator's outage (host 1, GPU 0, 20 min) is unmonitored, never idle
        assert r["unmonitored_hours"] == pytest.approx(t.unmonitored_s / 3600, rel=0.005, abs=0.01)
        hourly = {"p5.48xlarge": 55.04, "p4d.24xlarge": 21.957642, "g5.12xlarge": 5.672, "g6e.12xlarge": 10.49264}
        gpus = len(next(s for s in run.sources if s.host_id == host).gpus())
        assert r["gpu_hours"] == pytest.approx(gpus * HOURS, rel=1e-4)
        assert r["cost"] == pytest.approx(hourly[r["instance_type"]] * HOURS, rel=1e-4)
        idle_truth = (t.idle_held_s + t.idle_free_s) / 3600 * hourly[r["instance_type"]] / gpus
        assert r["idle_cost"] == pytest.approx(idle_truth, rel=0.005)
    assert rows["sim-001-p4d.24xlarge"]["unmonitored_hours"] == pytest.approx(1200 / 3600, rel=0.01)
    # exactly once: as many stored windows as the agents sampled, none twice
    sampled = sum(a.windows_sampled for a in run.agents)
    stored = collector.store.query_rows("SELECT count(), uniqExact(host_id, gpu_uuid, window_start_ms) "
                                        "FROM gpuledger.gpu_windows FINAL")[0]
    assert stored == (sampled, sampled)
    assert sum(sh.stats.acked_windows for sh in run.shippers) == sampled


def _totals(store):
    return store.query_rows("SELECT count(), sum(busy_ms), sum(idle_held_ms), sum(energy_mj) "
                            "FROM gpuledger.gpu_windows FINAL")[0]


def test_resent_batch_changes_no_figure(collector):
    b = sim_batch(seq=1).SerializeToString()
    acks = send_batches(collector.address, [b])
    assert [(a.seq, a.code) for a in acks] == [(1, OK)]
    before = _totals(collector.store)
    report_before = idle_rows(collector.store, collector.pricing, 0, 4_102_444_800_000, "host", {})
    acks = send_batches(collector.address, [b, b])  # the ack was lost: the agent sends it again, twice
    assert [a.code for a in acks] == [OK, OK]
    assert _totals(collector.store) == before
    assert idle_rows(collector.store, collector.pricing, 0, 4_102_444_800_000, "host", {}) == report_before


def test_malformed_batch_is_rejected_and_the_stream_goes_on(collector):
    start = aligned_start_us()
    good1 = sim_batch(seq=1, start_us=start)
    bad = replace_gpu_column(sim_batch(seq=2, start_us=start + 120_000_000), "util_max_pct", [150] * 24)
    good3 = sim_batch(seq=3, start_us=start + 240_000_000)
    acks = send_batches(collector.address, [good1.SerializeToString(), bad.SerializeToString(),
                                            good3.SerializeToString()])
    assert [(a.seq, a.code) for a in acks] == [(1, OK), (2, INVALID_ARGUMENT), (3, OK)]
    assert "util_max_pct" in acks[1].message and not acks[1].retryable
    # nothing of the bad batch is stored; both good ones are
    stored = {r[0] for r in collector.store.query_rows(
        "SELECT DISTINCT window_start_ms FROM gpuledger.gpu_windows FINAL")}
    expected = set(from_ipc(good1.gpu_windows_arrow).column("window_start_ms").to_pylist()) | set(
        from_ipc(good3.gpu_windows_arrow).column("window_start_ms").to_pylist())
    assert stored == expected and len(expected) == 24


def test_agent_dead_letters_a_rejected_batch(collector, tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    bad = replace_gpu_column(sim_batch(seq=1), "util_max_pct", [150] * 24)
    spool.append(bad.SerializeToString(), 24, seq=1)
    spool.append(sim_batch(seq=2).SerializeToString(), 24, seq=2)
    sh = Shipper(collector.address, spool).start()
    assert sh.drain(30)
    sh.close()
    assert (sh.stats.rejected, sh.stats.acked, spool.dead_lettered) == (1, 1, 1)
    assert b"util_max_pct" in (tmp_path / "spool" / "deadletter.log").read_bytes()


def test_agent_restart_delivers_the_spool(collector, tmp_path):
    start = aligned_start_us(hours_ago=3)
    cfg = AgentConfig(host_id="restart-host", provider="aws", region="us-east-1", instance_type="g5.12xlarge",
                      collector="127.0.0.1:1", spool_dir=str(tmp_path / "spool"), flush_s=60)
    clock = SimClock(start)
    src = SimulatedSource(cfg.host_id, "A10G", [SimGpu("inference"), SimGpu("idle")], start)
    spool = Spool(cfg.spool_dir, fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=start)
    for _ in range(30):  # 30 min, no collector reachable: everything stays in the spool
        clock.advance(60)
        agent.step()
    agent.close()
    spool.close()
    spooled = agent.windows_sampled
    assert spooled == 2 * 180
    # a new agent process opens the same spool and reaches the collector
    spool2 = Spool(cfg.spool_dir, fsync=False)
    assert spool2.pending_windows() == spooled and spool2.epoch == spool.epoch + 1
    sh = Shipper(collector.address, spool2).start()
    assert sh.drain(30)
    sh.close()
    n = collector.store.query_rows("SELECT count() FROM gpuledger.gpu_windows FINAL WHERE host_id = 'restart-host'")
    assert n[0][0] == spooled
    assert spool2.pending_count() == 0 and not list((tmp_path / "spool").glob("*.seg"))[1:]
