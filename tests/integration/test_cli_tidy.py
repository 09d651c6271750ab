"""The CLI's defects from the install review, one test each: version, help text, exit codes,
`cost --by` keys, the demo's data directory guard, completion, private token files."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from gpuledger import __version__
from gpuledger.cli import DEMO_MARKER, app
from gpuledger.demo import run_fleet
from gpuledger.security import hash_token

runner = CliRunner()
UNREACHABLE = "127.0.0.1:1"


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def test_version_prints_the_version_and_exits_0():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == __version__


def test_help_text_keeps_brackets_and_example_lines():
    res = runner.invoke(app, ["agent", "run", "--help"])
    assert res.exit_code == 0
    assert "TOML config file ([agent] section)." in res.stdout
    res = runner.invoke(app, ["collector", "serve", "--help"])
    assert "TOML config file ([collector] section)." in res.stdout
    res = runner.invoke(app, ["pricing", "--help"])
    lines = res.stdout.splitlines()
    assert any(ln.strip().startswith('[[instance]]  provider="aws"') for ln in lines), res.stdout
    assert any(ln.strip().startswith('[[gpu]]       host_id="dgx-01"') for ln in lines), res.stdout
    # examples stay one per line instead of being rewrapped into a paragraph
    res = runner.invoke(app, ["idle", "--help"])
    assert "\n    gpuledger idle --since 7d\n" in res.stdout


@pytest.mark.parametrize("level", ["bogus", "verbose", ""])
def test_unknown_log_level_exits_2(level):
    res = runner.invoke(app, ["--log-level", level, "pricing", "--format", "csv"])
    assert res.exit_code == 2
    assert "--log-level" in res.output


def test_log_level_is_case_insensitive():
    res = runner.invoke(app, ["--log-level", "DEBUG", "pricing", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("provider,") or "," in res.stdout.splitlines()[0]


def test_reversed_range_exits_2_before_asking_the_collector():
    res = runner.invoke(app, ["idle", "--since", "1h", "--until", "2h", "--collector", UNREACHABLE])
    assert res.exit_code == 2
    assert "--since (1h) must be before --until (2h)" in res.output
    res = runner.invoke(app, ["cost", "--since", "2026-11-02", "--until", "2026-11-01", "--collector", UNREACHABLE])
    assert res.exit_code == 2


@pytest.mark.parametrize("args", [
    ["idle", "--format", "xml"],
    ["idle", "--by", "team"],
    ["idle", "--since", "yesterday-ish"],
    ["export", "focus", "--format", "xlsx"],
])
def test_bad_input_exits_2(args):
    res = runner.invoke(app, [*args, "--collector", UNREACHABLE])
    assert res.exit_code == 2, res.output


@pytest.mark.parametrize("args", [
    ["cost", "--by", "team"],
    ["report", "html", "-o", "unused.html"],
    ["bill", "import", "unused.csv"],
    ["baseline"],
    ["collector", "retire", "some-host"],
])
def test_a_missing_ca_certificate_exits_2_naming_it(args, tmp_path):
    ca = tmp_path / "no-such-ca.pem"
    res = runner.invoke(app, [*args, "--ca-file", str(ca), "--collector", UNREACHABLE])
    assert res.exit_code == 2, res.output
    assert f"CA certificate {ca}: No such file or directory" in res.output


def test_unreachable_collector_exits_1():
    res = runner.invoke(app, ["cost", "--by", "team", "--since", "1h", "--collector", UNREACHABLE])
    assert res.exit_code == 1
    assert "UNAVAILABLE" in res.output


def test_store_failure_exits_1_and_config_error_exits_2(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    res = runner.invoke(app, ["collector", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(blocker)])
    assert res.exit_code == 1, res.output
    assert "store chdb://" in res.output
    bad = tmp_path / "c.toml"
    bad.write_text("[collector]\nlisten = 'nohostport'\n")
    res = runner.invoke(app, ["collector", "serve", "--config", str(bad)])
    assert res.exit_code == 2 and "collector.listen" in res.output


@pytest.fixture
def fleet(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", n_hosts=2, hours=0.5, seed=3)
    return collector.address, _iso(run.start_us), _iso(run.end_us)


def test_cost_by_a_typo_exits_2_naming_the_known_and_seen_keys(fleet):
    address, since, until = fleet
    res = runner.invoke(app, ["cost", "--by", "teem", "--collector", address, "--since", since, "--until", until])
    assert res.exit_code == 2, res.output
    assert "--by 'teem' is not a known key (team, project, phase, workload, experiment, run, endpoint, " \
           "slurm_job, slurm_account, host, process)" in res.output
    # the keys the range carries: host tags (team, cloud_account) and process tags (project, workload, ...)
    seen = res.output.split("tag keys in this range: ")[1]
    assert "cloud_account" in seen and "team" in seen and "workload" in seen


def test_cost_by_a_tag_key_the_data_carries_is_accepted(fleet):
    address, since, until = fleet
    # cloud_account is no finance name: a host tag key of the simulated agents' configs
    res = runner.invoke(app, ["cost", "--by", "cloud_account", "--collector", address, "--since", since,
                              "--until", until, "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["cloud_account"] for r in rows} >= {"aws-prod"}
    # a known name is accepted even where no row carries it
    res = runner.invoke(app, ["cost", "--by", "slurm_job", "--collector", address, "--since", since, "--until",
                              until, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert {r["slurm_job"] for r in json.loads(res.stdout)} <= {"(untagged)", "(unattributed)"}


def test_cost_by_a_key_the_collector_refuses_exits_2(fleet):
    address, since, until = fleet
    res = runner.invoke(app, ["cost", "--by", "a b", "--collector", address, "--since", since, "--until", until])
    assert res.exit_code == 2
    assert "INVALID_ARGUMENT" in res.output


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = runner.invoke(app, ["demo", "--hosts", "1", "--hours", "0.1", "--data-dir", str(mine)])
    assert res.exit_code == 2
    assert "was not made by gpuledger demo" in res.output
    assert (mine / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = runner.invoke(app, ["demo", "--data-dir", str(a_file)])
    assert res.exit_code == 2 and a_file.read_text() == "x"


def test_demo_reuses_its_own_directory(tmp_path):
    d = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--hosts", "1", "--hours", "0.1", "--data-dir", str(d)])
    assert res.exit_code == 0, res.output
    assert (d / DEMO_MARKER).is_file()
    (d / "leftover").write_text("from the first run")
    res = runner.invoke(app, ["demo", "--hosts", "1", "--hours", "0.1", "--data-dir", str(d)])
    assert res.exit_code == 0, res.output
    assert not (d / "leftover").exists() and (d / DEMO_MARKER).is_file()


def test_shell_completion_is_offered():
    res = runner.invoke(app, ["--help"])
    assert "--install-completion" in res.stdout and "--show-completion" in res.stdout
    res = runner.invoke(app, ["--show-completion", "bash"], prog_name="gpuledger")
    assert res.exit_code == 0, res.output
    assert "_GPULEDGER_COMPLETE=complete_bash" in res.stdout


def test_tokens_are_written_mode_600(tmp_path):
    tokens = tmp_path / "agent-tokens"
    tokens.write_text("")
    tokens.chmod(0o644)  # made by hand, too open: narrowed when the hash is appended
    out = tmp_path / "node.token"
    res = runner.invoke(app, ["collector", "add-agent", "gpu-node-01", "--tokens-file", str(tokens), "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and stat.S_IMODE(tokens.stat().st_mode) == 0o600
    token = out.read_text().strip()
    assert token not in res.stdout
    assert tokens.read_text() == f"gpu-node-01 {hash_token(token)}\n"
    q = tmp_path / "query.token"
    qout = tmp_path / "mine.token"
    res = runner.invoke(app, ["collector", "query-token", "--file", str(q), "--out", str(qout)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(q.stat().st_mode) == 0o600 and stat.S_IMODE(qout.stat().st_mode) == 0o600
    assert q.read_text() == hash_token(qout.read_text().strip()) + "\n"
    res = runner.invoke(app, ["collector", "add-agent", "gpu-node-01", "--tokens-file", str(tokens)])
    assert res.exit_code == 2 and "already has a token" in res.output


def test_agent_run_config_errors_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    f = tmp_path / "agent.toml"
    # pod labels need the Kubernetes API, and this is no pod: a config error, named
    f.write_text('[agent]\npod_resources_socket = "kubelet.sock"\npod_label_allowlist = ["team"]\n'
                 f'spool_dir = "{tmp_path / "spool"}"\n')
    res = runner.invoke(app, ["agent", "run", "--config", str(f)])
    assert res.exit_code == 2, res.output
    assert "agent.kube_api_url" in res.output
    f.write_text('[agent]\npod_label_allowlist = ["team"]\n')
    res = runner.invoke(app, ["agent", "run", "--config", str(f)])
    assert res.exit_code == 2 and "agent.pod_label_allowlist: needs agent.pod_resources_socket" in res.output
