"""An elastic fleet end to end: hosts stopping, restarting, terminated, an agent killed on a host that
stays up, a clock 4 minutes ahead. Real agents, spools, gRPC and chDB; the collector's report must
match the simulator's ground truth within 0.5 % in every state, unmonitored included."""

from __future__ import annotations

import pytest

from gpuledger.agent.simulate import elastic_fleet, simulated_fleet
from gpuledger.clock import WallClock
from gpuledger.collector.reports import cost_rows, idle_rows
from gpuledger.demo import run_fleet

HOURS = 4.0


def test_an_elastic_fleet_matches_its_ground_truth(collector, tmp_path):
    hosts = elastic_fleet(HOURS) + simulated_fleet(2, seed=3)
    w = 10_000_000
    # the fleet ends 10 minutes ago, so that the host 4 minutes ahead has delivered all it measured
    start_us = (WallClock().now_us() - int((HOURS * 3600 + 600) * 1e6)) // w * w
    run = run_fleet(collector.address, tmp_path / "spool", 0, HOURS, start_us=start_us, tick_s=60, flush_s=300,
                    hosts=hosts)
    since, until = run.start_us // 1000, run.end_us // 1000 + 300_000  # past the clock that runs ahead
    rows = {r["host"]: r for r in idle_rows(collector.store, collector.pricing, since, until, "host", {})}
    truth = run.truth()
    assert set(rows) == set(truth)
    for host, t in truth.items():
        r = rows[host]
        for col, secs in (("active_hours", t.active_s), ("idle_held_hours", t.idle_held_s),
                          ("idle_free_hours", t.idle_free_s), ("unmonitored_hours", t.unmonitored_s)):
            assert r[col] * 3600 == pytest.approx(secs, rel=0.005, abs=2.0), (host, col)
        assert r["gpu_hours"] * 3600 == pytest.approx(t.total_s(), rel=0.005), host
    span = HOURS * 3600
    # the spot instance was terminated at 60 %: nothing after it, and it says so
    spot = rows["sim-elastic-spot"]
    assert spot["state"] == "stopped" and spot["state_since_ms"] == since + int(span * 0.6) * 1000
    assert spot["gpu_hours"] == pytest.approx(4 * span * 0.6 / 3600, rel=1e-6)
    # the endpoint scaled to zero twice: up 20 % + 25 % + 15 % of the span
    assert rows["sim-elastic-endpoint"]["gpu_hours"] == pytest.approx(span * 0.6 / 3600, rel=1e-3)
    # the killed agent's 10 minutes are unmonitored, never idle, and so is what it had not spooled when it died
    # (at most one flush interval, 300 s here, and the 2 s it waits for late samples)
    crash = rows["sim-elastic-crash"]
    assert 600 <= crash["unmonitored_hours"] * 3600 <= 600 + 300 + 2 + 10
    assert crash["gpu_hours"] == pytest.approx(span / 3600, rel=1e-6)
    # the host whose clock runs ahead neither loses time nor lends any to the others
    assert rows["sim-elastic-ahead"]["gpu_hours"] == pytest.approx(span / 3600, rel=1e-6)
    for host in ("sim-000-p5.48xlarge", "sim-001-p4d.24xlarge"):
        assert rows[host]["gpu_hours"] == pytest.approx(8 * span / 3600, rel=1e-6)
    # the cost report splits exactly the same money
    total_cost = sum(r["cost"] for r in cost_rows(collector.store, collector.pricing, since, until, "team", {}))
    assert total_cost == pytest.approx(sum(r["cost"] for r in rows.values()), rel=1e-9)
