"""Run cost onto a real MLflow server, end to end: MLflow runs created first, simulated training
processes carrying their MLFLOW_RUN_ID through real agents and gRPC into the collector, the
tracker job writing each run's cost on it (live, then final), equal to `cost --by run` to the
cent; `gpuledger runs`, cost per successful deployment, and an estimate written as a run."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.collector.alerting import build_jobs
from gpuledger.collector.runs import RunCostSync, cost_per_successful_deployment
from gpuledger.config import CollectorConfig, MlflowConfig
from gpuledger.demo_workflow import (
    create_mlflow_runs,
    finish_mlflow_runs,
    plan_runs,
    run_workflow_fleet,
    workflow_hosts,
)
from gpuledger.integrations.mlflow import MlflowClient
from tests.integration.mlflow_server import mlflow_server  # noqa: F401  (session fixture)
from tests.integration.test_endpoints import past_start

runner = CliRunner()


def test_run_cost_on_mlflow_equals_cost_by_run_to_the_cent(collector, tmp_path, mlflow_server):  # noqa: F811
    client = MlflowClient.from_env(env=mlflow_server.env())
    start_us = past_start(10, 3.0)
    start_ms = start_us // 1000
    planned = plan_runs(2.0, seed=5)
    assert {p.outcome for p in planned} == {"FINISHED", "FAILED"}
    name = f"finetune-{uuid.uuid4().hex[:8]}"
    exp_id, runs = create_mlflow_runs(client, planned, start_ms, experiment=name)
    fleet = run_workflow_fleet(collector.address, tmp_path / "spool", 2.0, start_us=start_us, runs=runs,
                               hosts=[workflow_hosts(runs)[2]], scrape="direct")
    since, until = fleet.start_us // 1000, fleet.end_us // 1000
    table, _ = fetch_report(collector.address, "cost", since, until, "run")
    by_run = {r["run"]: r for r in table.to_pylist()}
    ids = [r.run_id for _, r in runs]
    assert set(ids) <= set(by_run)

    # the collector's job, built from its config as `collector serve` builds it
    cfg = CollectorConfig(tracker_sync_s=300).validate()
    jobs, parts = build_jobs(collector.store, collector.pricing, collector.rules, cfg, collector.clock,
                             mlflow_cfg=MlflowConfig(tracking_uri=mlflow_server.url), env=mlflow_server.env())
    sync = parts["tracker_sync"]
    assert [j.name for j in jobs.jobs] == ["tracker_sync"] and sync.final_after_ms == 600_000
    now_ms = int(time.time() * 1000)
    assert sync.sync(now_ms) == len(runs)
    for rid in ids:
        got, want = client.get_run(rid), by_run[rid]
        assert round(got.metrics["gpuledger.cost"], 2) == round(want["cost"], 2) > 0
        for k in ("gpu_hours", "active_hours", "idle_held_hours", "idle_share"):
            assert got.metrics[f"gpuledger.{k}"] == pytest.approx(want[k], rel=1e-9, abs=1e-12)
        assert got.tags["gpuledger.cost_status"] == "live" and got.tags["gpuledger.currency"] == "USD"
        assert got.tags["gpuledger.price_source"].startswith("instance_price/gpu_count: public on-demand list prices")
    assert sync.sync(now_ms + 60_000) == 0  # nothing changed: nothing written

    best = finish_mlflow_runs(client, runs, start_ms)
    assert sync.sync(now_ms + 601_000) == len(runs)  # ended and quiet for final_after: final
    for (p, r) in runs:
        got = client.get_run(r.run_id)
        assert got.status == p.outcome and got.tags["gpuledger.cost_status"] == "final"
        assert round(got.metrics["gpuledger.cost"], 2) == round(by_run[r.run_id]["cost"], 2)
    assert sync.stats.finalized == len(runs) and sync.stats.errors == 0

    # cost per successful deployment: the experiment's runs (failed ones included) / deployments
    n_deployed = len(client.deployments())  # other tests on this server may have deployed models too
    total = sum(by_run[rid]["cost"] for rid in ids)
    value, reason = cost_per_successful_deployment(collector.store, collector.pricing, since, until, now_ms,
                                                   MlflowConfig(tracking_uri=mlflow_server.url), client=client)
    assert value == pytest.approx(total / n_deployed, rel=1e-9), reason
    assert f"over {len(runs)} runs" in reason or n_deployed > 1

    env = mlflow_server.env()
    window = ["--collector", collector.address, "--since", str(_iso(since)), "--until", str(_iso(until))]
    res = runner.invoke(app, ["runs", "--experiment", name, "--format", "json", *window], env=env)
    assert res.exit_code == 0, res.output
    rows = {r["run"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(ids)
    for p, r in runs:
        assert rows[r.run_id]["status"] == p.outcome and rows[r.run_id]["name"] == p.name
        assert rows[r.run_id]["cost"] == pytest.approx(by_run[r.run_id]["cost"])
    res = runner.invoke(app, ["runs", "--successful", "--format", "json", *window], env=env)
    assert res.exit_code == 0, res.output
    split = {r["group"]: r for r in json.loads(res.stdout)}
    assert split["led to a deployment"]["cost"] == pytest.approx(by_run[best]["cost"])
    assert split["led to a deployment"]["cost"] + split["did not"]["cost"] == pytest.approx(total)
    assert split["did not"]["statuses"].startswith("FAILED")

    # an estimate from similar runs, written onto a new run as tags
    res = runner.invoke(app, ["estimate", "--like", f"experiment={name}", "--mlflow-experiment", f"{name}-budget",
                              "--format", "json", *window], env=env)
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout.split("\nestimate written")[0])[0]
    assert est["runs"] == len(runs)
    new = client.search_runs(experiment_names=[f"{name}-budget"])
    assert len(new) == 1 and new[0].tags["gpuledger.estimate"] == f"{round(est['cost'], 2)} USD"
    assert float(new[0].tags["gpuledger.estimate.p90_cost"]) == pytest.approx(est["p90_cost"])


def test_a_tracker_that_is_down_is_counted_and_no_mlflow_is_said(collector, tmp_path):
    start_us = past_start(10, 3.0)
    planned = plan_runs(1.0, seed=2)[:2]
    from gpuledger.agent.simulate import SimRun

    runs = [(p, SimRun(uuid.uuid4().hex, p.start_s, p.end_s, "9")) for p in planned]
    run_workflow_fleet(collector.address, tmp_path / "spool", 1.0, start_us=start_us, runs=runs,
                       hosts=[workflow_hosts(runs)[2]], scrape="direct")
    down = MlflowClient("http://127.0.0.1:9", timeout_s=1.0)  # nothing listens there
    sync = RunCostSync(collector.store, collector.pricing, collector.rules, mlflow=down)
    assert sync.sync(int(time.time() * 1000)) == 0
    assert sync.stats.errors == len(runs) and "run " in sync.stats.last_error
    value, reason = cost_per_successful_deployment(collector.store, collector.pricing, 0, 1, 2, MlflowConfig())
    assert value is None and "MLflow is not configured" in reason


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_workflow_demo_writes_cost_onto_a_local_mlflow(collector, tmp_path, monkeypatch):
    from gpuledger.demo_workflow import workflow_demo
    from tests.integration.mlflow_server import mlflow_command

    cmd = mlflow_command()
    if cmd is None or len(cmd) != 1:
        pytest.skip("mlflow is not installed as an executable (set GPULEDGER_TEST_MLFLOW to it)")
    monkeypatch.setenv("GPULEDGER_MLFLOW", cmd[0])
    lines: list[str] = []
    fleet = workflow_demo(collector, tmp_path, 1.0, seed=3, start_us=past_start(10, 2.0), mlflow=True,
                          echo=lines.append, scrape="direct")
    text = "\n".join(lines)
    assert "MLflow on http://127.0.0.1:" in text and "cost written onto" in text
    assert f"cost written onto {len(fleet.runs)} MLflow runs" in text
    assert "Inference endpoints (gpuledger endpoints):" in text and "chat-dev" in text
    assert "Runs of sim-finetune, the 10 most expensive" in text and f"{len(fleet.runs)} runs, " in text
    assert "cost per successful deployment: " in text and "/ 1 deployment(s)" in text
