"""The alert sender against a real Prometheus Alertmanager (Debian package prometheus-alertmanager),
started by the test on 127.0.0.1 with clustering off; skips when the binary is not installed.

Alertmanager judges endsAt by its own clock, so the injected times here start from the machine's
current time; only states are asserted, never times."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from gpuledger.collector.alerts import AlertEvaluator, AlertmanagerSender, Fact, Facts
from gpuledger.config import AlertRuleConfig

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.fixture
def alertmanager(tmp_path):
    if BINARY is None:
        pytest.skip("Alertmanager not installed (Debian: apt-get install prometheus-alertmanager)")
    (tmp_path / "am.yml").write_text("route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([BINARY, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_real_alertmanager_takes_firing_and_resolved_alerts(alertmanager):
    silent = {"gpu-node-07": 1800.0}
    ev = AlertEvaluator([AlertRuleConfig(kind="agent_silent", threshold=600.0, name="AgentSilent",
                                         labels={"severity": "page"})],
                        Facts(agent_silent=lambda now: [Fact({"host": h}, v) for h, v in silent.items()]),
                        AlertmanagerSender(alertmanager + "/api/v2/alerts"), repeat_s=300.0,
                        generator_url="http://gpuledger.internal/agents")

    def active():
        with urllib.request.urlopen(alertmanager + "/api/v2/alerts") as r:
            return [(a["labels"], a["status"]["state"], a["generatorURL"]) for a in json.load(r)]

    ev.evaluate(int(time.time() * 1000))
    assert ev.stats.sent == 1
    assert active() == [({"alertname": "AgentSilent", "severity": "page", "host": "gpu-node-07"}, "active",
                         "http://gpuledger.internal/agents")]
    silent.clear()
    time.sleep(0.01)
    ev.evaluate(int(time.time() * 1000))
    assert ev.stats.sent == 2 and active() == []
