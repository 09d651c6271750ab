"""Alerts from the collector's reports to a live Alertmanager-style receiver: a development endpoint
that idles all night holds its GPU (GpuIdleHeld, EndpointIdle), an agent falls silent (AgentSilent);
each fires once, is not re-sent while firing, resolves once; `gpuledger alerts` shows the states;
the collector runs the job on its own thread and stops it with itself."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.spool import Spool
from gpuledger.cli import app
from gpuledger.clock import SimClock
from gpuledger.collector.alerting import alert_rows, attach_jobs, build_jobs, wait_until
from gpuledger.config import AgentConfig, CollectorConfig
from gpuledger.demo_workflow import run_workflow_fleet, workflow_hosts
from tests.integration.test_endpoints import past_start

HOUR_MS = 3_600_000


class Receiver:
    """A real HTTP receiver of Alertmanager's POST /api/v2/alerts (a JSON array of alerts)."""

    def __init__(self) -> None:
        self.posts: list[list[dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/v2/alerts"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        return [a for p in self.posts for a in p]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


RULES = [{"kind": "gpu_idle_held", "threshold": "2h"}, {"kind": "endpoint_idle", "threshold": 0.8},
         {"kind": "agent_silent", "threshold": "10m"}, {"kind": "unwatched_gpu_spend", "threshold": 100.0}]


def silent_host(collector, tmp_path, start_us: int) -> None:
    """A host whose agent sent ten minutes of windows and then nothing (no stop: killed, host lost)."""
    src = SimulatedSource("h-silent", "T4", [SimGpu("training")], start_us, seed=3)
    clock = SimClock(start_us)
    cfg = AgentConfig(host_id="h-silent", provider="aws", region="us-east-1", instance_type="g4dn.xlarge",
                      spool_dir=str(tmp_path / "silent"), collector=collector.address).validate()
    spool = Spool(cfg.spool_dir, fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=start_us)
    for _ in range(61):
        clock.advance(10.0)
        agent.step()
    agent.flush()
    sh = Shipper(collector.address, spool).start()
    assert sh.drain(60)
    sh.close()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_alerts_fire_once_resolve_once_and_show_in_the_report(collector, tmp_path, receiver):
    start_us = past_start(5, 5.0)  # the dev endpoint from 05:00 UTC: idle until its traffic starts at 09:00
    run_workflow_fleet(collector.address, tmp_path / "spool", 4.5, start_us=start_us, runs=[],
                       hosts=[workflow_hosts([])[1]], scrape="direct")
    t1 = start_us // 1000 + 3 * HOUR_MS  # 08:00
    silent_host(collector, tmp_path, t1 * 1000 - 10 * 60 * 1_000_000)  # windows 07:50-08:00, then silence
    cfg = CollectorConfig(alerts=RULES, alert_webhook_url=receiver.url).validate()
    jobs, parts = build_jobs(collector.store, collector.pricing, collector.rules, cfg, collector.clock)
    job = parts["alerts"]

    job(t1)
    fired = receiver.alerts()
    names = sorted(a["labels"]["alertname"] for a in fired)
    assert names == ["EndpointIdle", "GpuIdleHeld"], fired
    gpu = next(a for a in fired if a["labels"]["alertname"] == "GpuIdleHeld")
    assert gpu["labels"]["host"] == "sim-inf-001-g6.xlarge" and gpu["startsAt"] == _iso(t1)
    assert gpu["annotations"]["summary"] == "GPU held idle for 3h (threshold 2h)"
    ep = next(a for a in fired if a["labels"]["alertname"] == "EndpointIdle")
    assert ep["labels"]["endpoint"] == "chat-dev" and ep["annotations"]["value"] == "1"

    job(t1 + 60_000)  # still firing: nothing sent again
    job(t1 + 120_000)
    assert len(receiver.alerts()) == 2

    t2 = start_us // 1000 + int(4.5 * HOUR_MS)  # 09:30: the endpoint served since 09:00, the agent is silent
    job(t2)
    new = receiver.alerts()[2:]
    by_name = {a["labels"]["alertname"]: a for a in new}
    assert sorted(by_name) == ["AgentSilent", "GpuIdleHeld"]
    assert by_name["GpuIdleHeld"]["endsAt"] == _iso(t2)  # resolved at t2
    assert by_name["AgentSilent"]["labels"]["host"] == "h-silent"
    assert by_name["AgentSilent"]["annotations"]["summary"] == "agent silent for 1h30m (threshold 10m)"
    job(t2 + 60_000)
    assert len(receiver.alerts()) == 4  # no duplicates
    assert job.evaluator.stats.sent == 4 and job.evaluator.stats.provider_errors == 0

    rows = alert_rows(collector.store, t1, t2 + 1, {}, now_ms=t2 + 61_000)
    states = {(r["alertname"], r["state"]) for r in rows}
    assert states == {("EndpointIdle", "firing"), ("AgentSilent", "firing"), ("GpuIdleHeld", "resolved")}
    assert next(r for r in rows if r["alertname"] == "EndpointIdle")["active_since"].startswith(_iso(t1)[:19])
    # the same rows later, once the job has stopped: the firing ones are stale
    later = {(r["alertname"], r["state"]) for r in alert_rows(collector.store, t1, t2 + 1, {}, now_ms=t2 + HOUR_MS)}
    assert ("EndpointIdle", "stale") in later


def test_the_collector_runs_the_alert_job_on_its_thread(collector, tmp_path, receiver):
    start_us = past_start(5, 5.0)
    silent_host(collector, tmp_path, start_us)
    cfg = CollectorConfig(alerts=[{"kind": "agent_silent", "threshold": "10m"}], alert_webhook_url=receiver.url,
                          alert_interval_s=0.2).validate()
    jobs = attach_jobs(collector, cfg, env={})
    assert set(collector.job_parts) == {"alerts"}  # no MLflow configured: no tracker sync
    jobs.tick_s = 0.05
    jobs.start()
    assert wait_until(lambda: receiver.alerts(), 30), jobs.stats()
    assert {a["labels"]["alertname"] for a in receiver.alerts()} == {"AgentSilent"}
    assert wait_until(lambda: jobs.stats()["alerts"].runs >= 3, 30)
    assert len(receiver.alerts()) == 1  # evaluated again and again, sent once
    res = CliRunner().invoke(app, ["alerts", "--collector", collector.address, "--format", "json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert (row["state"], row["alertname"], row["subject"]) == ("firing", "AgentSilent", "host=h-silent")
    collector.stop(grace_s=1)
    assert jobs._thread is None  # stopped with the collector
    runs = jobs.stats()["alerts"].runs
    time.sleep(0.3)
    assert jobs.stats()["alerts"].runs == runs


def test_a_failing_job_is_counted_and_runs_again(collector):
    from gpuledger.clock import SimClock as Clock
    from gpuledger.collector.alerting import Jobs

    clock = Clock(1_000_000_000)
    jobs = Jobs(clock)
    calls = []

    def flaky(now_ms):
        calls.append(now_ms)
        if len(calls) == 1:
            raise RuntimeError("store away")

    jobs.add("flaky", 30.0, flaky)
    assert jobs.run_due() == 1 and jobs.stats()["flaky"].errors == 1
    assert jobs.run_due() == 0  # not due yet
    clock.advance(30.0)
    assert jobs.run_due() == 1 and jobs.stats()["flaky"].errors == 1 and len(calls) == 2
