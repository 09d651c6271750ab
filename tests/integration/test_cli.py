"""The CLI as users run it: reports over a live collector, --help, the demo."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.demo import run_fleet

runner = CliRunner()


def test_idle_json_and_csv_over_a_live_collector(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", n_hosts=2, hours=1.0, seed=3)
    since, until = str(run.start_us // 1_000_000), str(run.end_us // 1_000_000)
    from datetime import UTC, datetime

    iso = lambda s: datetime.fromtimestamp(int(s), UTC).isoformat()  # noqa: E731
    res = runner.invoke(app, ["idle", "--collector", collector.address, "--since", iso(since), "--until", iso(until),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["host"] for r in rows} == {"sim-000-p5.48xlarge", "sim-001-p4d.24xlarge"}
    for r in rows:
        for key in ("host", "instance_type", "gpus", "active_hours", "idle_held_hours", "idle_free_hours",
                    "unmonitored_hours", "mean_util_pct", "cost", "idle_cost", "idle_share", "currency"):
            assert key in r
        assert r["gpus"] == 8 and r["currency"] == "USD"
        assert r["active_hours"] + r["idle_held_hours"] + r["idle_free_hours"] + r["unmonitored_hours"] == \
            __import__("pytest").approx(8.0, rel=1e-6)
    res = runner.invoke(app, ["idle", "--collector", collector.address, "--since", iso(since), "--until", iso(until),
                              "--by", "gpu", "--format", "csv"])
    assert res.exit_code == 0
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("host,gpu_uuid,instance_type,gpus") and len(lines) == 1 + 16
    res = runner.invoke(app, ["cost", "--by", "team", "--collector", collector.address, "--since", iso(since),
                              "--until", iso(until), "--format", "json"])
    assert res.exit_code == 0
    by_team = json.loads(res.stdout)
    total = sum(r["cost"] for r in by_team)
    assert total == __import__("pytest").approx(sum(r["cost"] for r in rows), rel=1e-6)


def test_bad_time_and_unreachable_collector_are_clear_errors():
    res = runner.invoke(app, ["idle", "--since", "yesterday-ish", "--collector", "127.0.0.1:1"])
    assert res.exit_code == 2 and "cannot read 'yesterday-ish' as a time" in res.output
    res = runner.invoke(app, ["idle", "--since", "1h", "--collector", "127.0.0.1:1"])
    assert res.exit_code == 1 and "collector at 127.0.0.1:1: UNAVAILABLE" in res.output


def test_every_command_has_help_with_examples():
    for cmd in (["collector", "serve"], ["agent", "run"], ["agent", "replay"], ["agent", "probe"], ["idle"], ["cost"],
                ["pricing"], ["demo"], ["export", "focus"], ["collector", "add-agent"], ["collector", "query-token"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.output, cmd


def test_collector_refuses_non_loopback_without_tls():
    res = runner.invoke(app, ["collector", "serve", "--listen", "0.0.0.0:4700", "--data-dir", "/nonexistent/x"])
    assert res.exit_code == 2 and "not a loopback address" in res.output


def test_demo_runs_end_to_end(tmp_path):
    res = runner.invoke(app, ["demo", "--hosts", "2", "--hours", "1", "--data-dir", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "Idle waste by host" in res.output and "sim-000-p5.48xlarge" in res.output
    assert "Cost by team" in res.output and "data lives in" in res.output
    assert (tmp_path / "demo" / "chdb").is_dir()
