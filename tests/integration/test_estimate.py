"""`gpuledger estimate` over a live collector: similar past runs (percentiles of `cost --by run`),
a plan priced from the catalog, the team's measured idle share, and clear errors."""

from __future__ import annotations

import json
import uuid

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from gpuledger.agent.simulate import SimRun
from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.demo_workflow import plan_runs, run_workflow_fleet, workflow_hosts
from tests.integration.test_endpoints import past_start

runner = CliRunner()


def test_estimates_from_similar_runs_and_from_a_plan(collector, tmp_path):
    start_us = past_start(10, 3.0)
    planned = plan_runs(2.0, seed=11)
    runs = [(p, SimRun(uuid.uuid4().hex, p.start_s, p.end_s, "42")) for p in planned]
    run_workflow_fleet(collector.address, tmp_path / "spool", 2.0, start_us=start_us, runs=runs,
                       hosts=[workflow_hosts(runs)[2]], scrape="direct")
    since, until = start_us // 1000, start_us // 1000 + 2 * 3_600_000
    by_run = {r["run"]: r for r in fetch_report(collector.address, "cost", since, until, "run")[0].to_pylist()}
    costs = [by_run[r.run_id]["cost"] for _, r in runs]
    hours = [by_run[r.run_id]["gpu_hours"] for _, r in runs]
    team = {r["team"]: r for r in fetch_report(collector.address, "cost", since, until, "team")[0].to_pylist()}
    share = team["research"]["idle_share"]
    assert 0 < share < 1

    (est,) = fetch_report(collector.address, "estimate", since, until, "", {"like_experiment": "42"})[0].to_pylist()
    assert est["runs"] == len(runs) and est["team"] == "team research"
    assert est["p50_cost"] == pytest.approx(np.percentile(costs, 50)) and est["cost"] == est["p50_cost"]
    assert est["p90_cost"] == pytest.approx(np.percentile(costs, 90))
    assert est["p90_gpu_hours"] == pytest.approx(np.percentile(hours, 90))
    assert est["team_idle_share"] == pytest.approx(share)
    assert est["expected_idle_cost"] == pytest.approx(est["cost"] * share)

    one = runs[0][1].run_id
    (like,) = fetch_report(collector.address, "estimate", since, until, "", {"like_run": one})[0].to_pylist()
    assert like["p90_cost"] == pytest.approx(est["p90_cost"]) and like["like_run_cost"] == pytest.approx(by_run[one]["cost"])

    (plan,) = fetch_report(collector.address, "estimate", since, until, "",
                           {"instance_type": "p5.48xlarge", "gpus": "8", "hours": "10", "team": "research"})[0].to_pylist()
    assert plan["cost"] == pytest.approx(55.04 * 10) and plan["gpu_hours"] == 80
    assert plan["expected_idle_cost"] == pytest.approx(550.4 * share)
    assert "aws/us-east-1/p5.48xlarge" in plan["basis"]

    res = runner.invoke(app, ["estimate", "--instance-type", "g5.12xlarge", "--gpus", "4", "--hours", "3",
                              "--collector", collector.address, "--since", "1d", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["cost"] == pytest.approx(5.672 * 3)

    for filters, msg in (({"instance_type": "h9000.huge", "gpus": "1", "hours": "1"}, "'h9000.huge' is not in the price"),
                         ({"instance_type": "p5.48xlarge"}, "needs gpus and hours"),
                         ({"like_experiment": "404"}, "experiment '404': no priced run"),
                         ({"like_run": "nope"}, "like_run: no process carried run 'nope'"),
                         ({}, "give exactly one of")):
        with pytest.raises(grpc.RpcError) as e:
            fetch_report(collector.address, "estimate", since, until, "", filters)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details(), e.value.details()
    res = runner.invoke(app, ["estimate", "--like", "project=x", "--collector", collector.address])
    assert res.exit_code == 2 and "must be experiment=X" in res.output
