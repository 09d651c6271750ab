"""Alerts: rules, the pending -> firing -> resolved state machine, and delivery to a real local
HTTP receiver that speaks Alertmanager's POST /api/v2/alerts. The clock is injected (ms passed to
evaluate); nothing sleeps."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuledger.collector.alerts import AlertEvaluator, AlertmanagerSender, Fact, Facts, evaluator_from_config
from gpuledger.config import AlertRuleConfig, CollectorConfig

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms
MIN = 60_000
H = 3_600_000


class Receiver:
    """A real HTTP receiver on 127.0.0.1:<port>; `status` is what it answers; `stop()` and
    `start()` take it off and back onto the same port (connection refused in between)."""

    def __init__(self) -> None:
        self.posts: list[list[dict]] = []
        self.status = 200
        self.port = 0
        self.httpd = None
        self.start()

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/api/v2/alerts" and self.headers["Content-Type"] == "application/json"
                if outer.status == 200:
                    outer.posts.append(body)
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v2/alerts"

    def alerts(self) -> list[dict]:
        return [a for post in self.posts for a in post]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


class Fleet:
    """Facts as the reports would give them: the test sets the current figures."""

    def __init__(self) -> None:
        self.idle_held: dict[tuple[str, str], float] = {}
        self.endpoint_idle: dict[str, float] = {}
        self.unwatched: float = 0.0
        self.silent: dict[str, float] = {}
        self.fail = False

    def facts(self) -> Facts:
        def gpu(now_ms):
            if self.fail:
                raise RuntimeError("store unavailable")
            return [Fact({"host": h, "gpu_uuid": g}, v) for (h, g), v in self.idle_held.items()]

        return Facts(gpu_idle_held=gpu,
                     endpoint_idle=lambda now: [Fact({"endpoint": e}, v, detail=f"{e}: 24 h window")
                                                for e, v in self.endpoint_idle.items()],
                     unwatched_gpu_spend=lambda now: [Fact({"account": "123456789012"}, self.unwatched)],
                     agent_silent=lambda now: [Fact({"host": h}, v) for h, v in self.silent.items()])


IDLE = AlertRuleConfig(kind="gpu_idle_held", threshold=2 * 3600.0, for_s=600.0, labels={"severity": "warning"},
                       name="GpuIdleHeld")


def make(receiver, fleet, rules=(IDLE,), **kw) -> AlertEvaluator:
    return AlertEvaluator(list(rules), fleet.facts(), AlertmanagerSender(receiver.url, timeout_s=2.0),
                          repeat_s=kw.pop("repeat_s", 3600.0), generator_url="http://gpuledger.internal/idle",
                          retry_initial_s=10.0, retry_max_s=60.0, **kw)


def test_fires_after_for_is_not_resent_and_resolves_with_ends_at(receiver):
    fleet = Fleet()
    ev = make(receiver, fleet)
    fleet.idle_held[("gpu-node-01", "GPU-aaa")] = 2 * 3600 + 60  # over the 2 h threshold
    ev.evaluate(T0)
    assert receiver.posts == [] and [a["state"] for a in ev.active()] == ["pending"]
    ev.evaluate(T0 + 5 * MIN)
    assert receiver.posts == []  # pending for 5 of its 10 minutes
    fleet.idle_held[("gpu-node-01", "GPU-aaa")] = 2 * 3600 + 60 + 600
    ev.evaluate(T0 + 10 * MIN)
    assert receiver.posts == [[{
        "labels": {"alertname": "GpuIdleHeld", "severity": "warning", "host": "gpu-node-01", "gpu_uuid": "GPU-aaa"},
        "annotations": {"summary": "GPU held idle for 2h11m (threshold 2h)", "value": "7860"},
        "startsAt": "2026-01-01T00:10:00.000Z",
        "endsAt": "2026-01-01T04:10:00.000Z",  # 4 x the repeat interval ahead
        "generatorURL": "http://gpuledger.internal/idle"}]]
    for m in (11, 20, 40, 69):  # still firing: nothing sent within the repeat interval
        ev.evaluate(T0 + m * MIN)
    assert len(receiver.posts) == 1
    ev.evaluate(T0 + 70 * MIN)  # one repeat interval after it was sent
    assert len(receiver.posts) == 2
    assert receiver.posts[1][0]["startsAt"] == "2026-01-01T00:10:00.000Z"
    assert receiver.posts[1][0]["endsAt"] == "2026-01-01T05:10:00.000Z"
    del fleet.idle_held[("gpu-node-01", "GPU-aaa")]  # someone released the GPU
    ev.evaluate(T0 + 75 * MIN)
    resolved = receiver.posts[2][0]
    assert resolved["endsAt"] == "2026-01-01T01:15:00.000Z" and resolved["startsAt"] == "2026-01-01T00:10:00.000Z"
    for m in (76, 200, 400):
        ev.evaluate(T0 + m * MIN)
    assert len(receiver.posts) == 3 and ev.active() == []


def test_pending_that_clears_is_never_sent(receiver):
    fleet = Fleet()
    ev = make(receiver, fleet)
    fleet.idle_held[("h1", "GPU-1")] = 3 * 3600
    ev.evaluate(T0)
    fleet.idle_held.clear()
    ev.evaluate(T0 + 9 * MIN)
    fleet.idle_held[("h1", "GPU-1")] = 3 * 3600
    ev.evaluate(T0 + 12 * MIN)  # pending again from here: for counts anew
    ev.evaluate(T0 + 21 * MIN)
    assert receiver.posts == []
    ev.evaluate(T0 + 22 * MIN)
    assert [a["startsAt"] for a in receiver.alerts()] == ["2026-01-01T00:22:00.000Z"]


def test_receiver_down_then_back_nothing_lost_nothing_doubled(receiver):
    fleet = Fleet()
    rule = AlertRuleConfig(kind="agent_silent", threshold=600.0, name="AgentSilent")
    ev = make(receiver, fleet, rules=(rule,))
    fleet.silent = {"h1": 900.0, "h2": 1200.0}
    receiver.stop()  # connection refused
    ev.evaluate(T0)
    assert ev.stats.send_failures == 1 and ev.stats.outbox == 2 and receiver.posts == []
    ev.evaluate(T0 + 5_000)  # within the 10 s backoff: no try
    assert ev.stats.send_failures == 1
    receiver.start()
    receiver.status = 503
    ev.evaluate(T0 + 10_000)  # tried: 503 is retryable
    assert ev.stats.send_failures == 2 and receiver.posts == []
    fleet.silent = {"h1": 930.0}  # h2 came back while the receiver was down
    receiver.status = 200
    ev.evaluate(T0 + 25_000)  # backoff doubled to 20 s: not yet
    assert receiver.posts == []
    ev.evaluate(T0 + 30_000)
    got = {a["labels"]["host"]: a["endsAt"] for a in receiver.alerts()}
    # h1 firing (endsAt ahead); h2's firing was never delivered, only its resolution is
    assert got == {"h1": "2026-01-01T04:00:30.000Z", "h2": "2026-01-01T00:00:25.000Z"}
    ev.evaluate(T0 + 40_000)
    ev.evaluate(T0 + 50_000)
    assert len(receiver.alerts()) == 2 and ev.stats.sent == 2 and ev.stats.outbox == 0


def test_a_refused_batch_is_dropped_not_retried(receiver):
    fleet = Fleet()
    ev = make(receiver, fleet, rules=(AlertRuleConfig(kind="agent_silent", threshold=60.0, name="AgentSilent"),))
    fleet.silent = {"h1": 120.0}
    receiver.status = 400
    ev.evaluate(T0)
    receiver.status = 200
    ev.evaluate(T0 + MIN)
    assert receiver.posts == [] and ev.stats.dropped == 1 and "HTTP 400" in ev.stats.last_error


def test_failing_provider_resolves_nothing(receiver):
    fleet = Fleet()
    ev = make(receiver, fleet, rules=(AlertRuleConfig(kind="gpu_idle_held", threshold=60.0, name="GpuIdleHeld"),))
    fleet.idle_held[("h1", "GPU-1")] = 120.0
    ev.evaluate(T0)
    fleet.fail = True
    ev.evaluate(T0 + MIN)
    ev.evaluate(T0 + 2 * MIN)
    assert len(receiver.posts) == 1 and ev.stats.provider_errors == 2
    assert [a["state"] for a in ev.active()] == ["firing"]
    fleet.fail = False
    fleet.idle_held.clear()
    ev.evaluate(T0 + 3 * MIN)
    assert receiver.posts[-1][0]["endsAt"] == "2026-01-01T00:03:00.000Z"


def test_each_kind_with_its_threshold_and_subject(receiver):
    fleet = Fleet()
    rules = [AlertRuleConfig(kind="endpoint_idle", threshold=0.8, name="EndpointIdle", labels={"team": "ml"}),
             AlertRuleConfig(kind="unwatched_gpu_spend", threshold=100.0, name="UnwatchedSpend",
                             summary="{value} USD of GPU spend in account {account} is not watched"),
             AlertRuleConfig(kind="agent_silent", threshold=600.0, name="AgentSilent")]
    ev = make(receiver, fleet, rules=rules)
    fleet.endpoint_idle = {"chat": 0.92, "embed": 0.35}
    fleet.unwatched = 250.0
    fleet.silent = {"h1": 599.0, "h2": 601.0}
    ev.evaluate(T0)
    got = sorted((a["labels"]["alertname"], a["annotations"]["summary"], a["annotations"].get("description", ""))
                 for a in receiver.alerts())
    assert got == [("AgentSilent", "agent silent for 10m1s (threshold 10m)", ""),
                   ("EndpointIdle", "endpoint idle 92 % of the last day (threshold 80 %)", "chat: 24 h window"),
                   ("UnwatchedSpend", "250.00 USD of GPU spend in account 123456789012 is not watched", "")]
    assert [a["labels"] for a in receiver.alerts() if a["labels"]["alertname"] == "EndpointIdle"] == [
        {"alertname": "EndpointIdle", "team": "ml", "endpoint": "chat"}]


def test_a_rule_without_its_provider_is_an_error(receiver):
    with pytest.raises(ValueError, match=r"collector.alerts\[0\] \(GpuIdleHeld\): no facts provider for kind gpu_idle_held"):
        AlertEvaluator([IDLE], Facts(), AlertmanagerSender(receiver.url))


def test_evaluator_from_collector_config(receiver):
    cfg = CollectorConfig(alerts=({"kind": "agent_silent", "threshold": "10m", "for": "1m"},),
                          alert_webhook_url=receiver.url, alert_repeat_s=1800.0,
                          alert_generator_url="http://grafana.internal/d/gpu").validate()
    fleet = Fleet()
    fleet.silent = {"h9": 3600.0}
    ev = evaluator_from_config(cfg, fleet.facts())
    ev.evaluate(T0)
    ev.evaluate(T0 + MIN)
    [a] = receiver.alerts()
    assert a["labels"] == {"alertname": "AgentSilent", "host": "h9"}
    assert a["endsAt"] == "2026-01-01T02:01:00.000Z" and a["generatorURL"] == "http://grafana.internal/d/gpu"
