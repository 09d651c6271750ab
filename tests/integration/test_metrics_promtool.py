"""promtool on what the daemons expose and on the shipped alert rules.

promtool comes with the Debian package `prometheus`; without it the tests that run it skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from gpuledger.metrics import agent_registry, collector_registry, serve
from tests.helpers import replace_gpu_column, sim_batch
from tests.integration.streams import send_batches
from tests.unit.test_metrics_gpu import Host

PROMTOOL = shutil.which("promtool")
RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)")

# promtool's lint flags dcgm-exporter's own label names (modelName is camelCase); gpuledger keeps
# them so that dashboards and rules written for dcgm-exporter match. Nothing else may be flagged.
DCGM_LINT = "label names should be written in 'snake_case' not 'camelCase'"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def fetch(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.fixture
def expositions(collector, tmp_path):
    """The text both daemons serve over HTTP after real traffic: a collector that stored one batch
    and rejected one, an agent over the fake NVML (a pod's process, a MIG instance, unallocated
    slices, a GPU without GPM)."""
    bad = replace_gpu_column(sim_batch(seq=2), "util_max_pct", [101] * 24)
    send_batches(collector.address, [sim_batch(seq=1).SerializeToString(), bad.SerializeToString()])
    host = Host(tmp_path)
    texts = {}
    servers = []
    try:
        agent_reg = agent_registry(host.agent, host.spool, host.shipper)
        host.run(30)
        for name, reg in (("collector", collector_registry(collector)), ("agent", agent_reg)):
            server, port = serve(reg, "127.0.0.1:0")
            servers.append(server)
            texts[name] = fetch(port)
        yield texts
    finally:
        for s in servers:
            s.shutdown()
        host.close()


@needs_promtool
def test_promtool_check_metrics_on_both_daemons(expositions):
    r = promtool("check", "metrics", stdin=expositions["collector"])
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    r = promtool("check", "metrics", stdin=expositions["agent"])
    findings = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: lint findings only, the text parsed
    flagged = set()
    for ln in findings:
        family, _, problem = ln.partition(" ")
        assert problem == DCGM_LINT, ln
        flagged.add(family)
    # exactly the families that carry dcgm-exporter's labels
    assert flagged and all(f.startswith("DCGM_FI_") or f == "gpuledger_gpu_state_seconds_total" for f in flagged)
    assert "DCGM_FI_DEV_GPU_UTIL" in flagged


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules():
    r = promtool("check", "rules", str(RULES_DIR / "gpuledger-rules.yml"))
    assert r.returncode == 0 and "SUCCESS: 15 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", "gpuledger-rules.test.yml"], cwd=RULES_DIR,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_alert_rules_read_only_series_the_daemons_expose(expositions):
    """Every gpuledger metric and label value a rule selects is one the daemons serve."""
    exposed: dict[str, list[dict[str, str]]] = {}
    sample = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$')
    for text in expositions.values():
        for ln in text.splitlines():
            m = sample.match(ln)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                exposed.setdefault(m.group(1), []).append(labels)
    rules = (RULES_DIR / "gpuledger-rules.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.+)$", rules, flags=re.M)
    assert len(exprs) == 15
    used = set()
    for expr in exprs:
        for name, matchers in re.findall(r"(gpuledger_\w+)(?:\{([^}]*)\})?", expr):
            used.add(name)
            assert name in exposed, (name, expr)
            for key, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
                pat = re.compile(value if op == "=~" else re.escape(value))
                assert any(pat.fullmatch(lab.get(key, "")) for lab in exposed[name]), (name, key, value)
    assert {"gpuledger_collector_agent_last_batch_timestamp_seconds", "gpuledger_collector_serving",
            "gpuledger_agent_spool_pending_windows", "gpuledger_gpu_state_seconds_total",
            "gpuledger_collector_insert_seconds_bucket"} <= used
