"""Alerts: rules from [[collector.alerts]], evaluated over facts the reports supply, sent to an
Alertmanager-compatible receiver (POST /api/v2/alerts).

Rule kinds and what a fact's value is (an alert fires while value >= threshold, for `for`):

| kind | one fact per | value |
| gpu_idle_held | GPU | seconds the GPU has been idle-held without a break |
| endpoint_idle | inference endpoint | idle share of the last day, 0..1 |
| unwatched_gpu_spend | scope the report chooses (account, region, ...) | money spent on GPUs no agent watches |
| agent_silent | agent (host) | seconds since its last batch |

The lead plugs the reports in through `Facts`: one callable per kind, `f(now_ms) -> iterable of
Fact(subject labels, value, detail)`. A rule whose kind has no callable is an error at start.

Per alert (rule name + rule labels + the fact's subject labels) a state machine, as Prometheus
runs it: inactive -> pending (condition true) -> firing (still true after `for`) -> resolved
(condition false). Pending alerts are never sent. A firing alert is sent once, then again only
after `repeat_s` (Prometheus' resend delay); its endsAt is 4 x repeat_s ahead, so that a receiver
resolves it on its own if gpuledger stops sending. A resolved alert is sent once with endsAt = the
time it resolved. A fact provider that fails resolves nothing: its alerts keep their state until
it answers again.

Delivery: what is to be sent waits in an outbox, one entry per alert (the newest state wins), and
is posted as one JSON array. A receiver that is down, answers 5xx or 429, or times out gets the
same alerts again after a backoff (retry_initial_s doubling up to retry_max_s): nothing is lost,
nothing is sent twice once acknowledged. A 4xx answer (a malformed alert) is permanent: those
alerts are dropped, logged and counted.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gpuledger import __version__
from gpuledger.clock import Clock, WallClock
from gpuledger.config import ALERT_KINDS, AlertRuleConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fact:
    """One current fact: what it is about (labels such as host, gpu_uuid, endpoint), its value,
    and optional text for the alert's description."""

    subject: Mapping[str, str]
    value: float
    detail: str = ""


FactSource = Callable[[int], Iterable[Fact]]


@dataclass
class Facts:
    """The facts provider: one callable per rule kind, each called with now (ms)."""

    gpu_idle_held: FactSource | None = None
    endpoint_idle: FactSource | None = None
    unwatched_gpu_spend: FactSource | None = None
    agent_silent: FactSource | None = None


class SendError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class AlertmanagerSender:
    """POSTs a JSON array of alerts to an Alertmanager /api/v2/alerts URL (or any webhook that takes
    the same body). Raises SendError(retryable=...)."""

    def __init__(self, url: str, timeout_s: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", "User-Agent": f"gpuledger/{__version__}",
                        **(headers or {})}

    def __call__(self, alerts: Sequence[dict]) -> None:
        req = urllib.request.Request(self.url, data=json.dumps(list(alerts)).encode(), method="POST",
                                     headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()[:200].decode("utf-8", errors="replace")
            retry = e.code >= 500 or e.code in (408, 429)
            raise SendError(f"{self.url}: HTTP {e.code}: {body.strip()}", retryable=retry) from e
        except (urllib.error.URLError, OSError) as e:
            raise SendError(f"{self.url}: {getattr(e, 'reason', e)}", retryable=True) from e


@dataclass
class _Alert:
    rule: AlertRuleConfig
    labels: dict
    annotations: dict
    state: str  # pending | firing | resolved
    active_since_ms: int
    fired_at_ms: int = 0
    resolved_at_ms: int = 0
    last_sent_ms: int | None = None  # last delivered while firing


@dataclass
class AlertStats:
    sent: int = 0  # alerts delivered (each alert of a batch counts)
    send_failures: int = 0  # failed posts (retried)
    dropped: int = 0  # alerts refused for good (4xx)
    provider_errors: int = 0
    last_error: str = ""
    outbox: int = 0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{sec}s" if sec and not d else ""]
    return "".join(parts) or "0s"


def _value_text(kind: str, v: float) -> str:
    if kind in ("gpu_idle_held", "agent_silent"):
        return _fmt_duration(v)
    if kind == "endpoint_idle":
        return f"{v * 100:.0f} %"
    return f"{v:.2f}"


_DEFAULT_SUMMARY = {
    "gpu_idle_held": "GPU held idle for {value} (threshold {threshold})",
    "endpoint_idle": "endpoint idle {value} of the last day (threshold {threshold})",
    "unwatched_gpu_spend": "{value} spent on GPUs that no agent watches (threshold {threshold})",
    "agent_silent": "agent silent for {value} (threshold {threshold})",
}


class _Fields(dict):
    def __missing__(self, key):  # a placeholder the rule's summary names but the fact lacks
        return "{" + key + "}"


class AlertEvaluator:
    """Evaluates the rules over the facts and sends what changed.

    evaluate(now_ms) runs every rule once and then flush(now_ms); call it every few tens of seconds
    (the lead's alert loop). The clock is injected; nothing here sleeps."""

    def __init__(self, rules: Sequence[AlertRuleConfig], facts: Facts, sender: Callable[[Sequence[dict]], None],
                 repeat_s: float = 4 * 3600.0, generator_url: str = "", clock: Clock | None = None,
                 retry_initial_s: float = 5.0, retry_max_s: float = 300.0) -> None:
        for i, r in enumerate(rules):
            if r.kind not in ALERT_KINDS:
                raise ValueError(f"collector.alerts[{i}].kind: unknown kind {r.kind!r}")
            if getattr(facts, r.kind) is None:
                raise ValueError(f"collector.alerts[{i}] ({r.name}): no facts provider for kind {r.kind}")
        if repeat_s <= 0:
            raise ValueError("repeat_s must be > 0")
        self.rules = list(rules)
        self.facts = facts
        self.sender = sender
        self.repeat_ms = int(repeat_s * 1000)
        self.valid_ms = 4 * self.repeat_ms
        self.generator_url = generator_url
        self.clock = clock or WallClock()
        self.retry_initial_ms = int(retry_initial_s * 1000)
        self.retry_max_ms = int(retry_max_s * 1000)
        self._alerts: dict[tuple, _Alert] = {}
        self._outbox: dict[tuple, dict | None] = {}  # key -> fixed payload (resolved), or None (build when sent)
        self._next_try_ms = 0
        self._backoff_ms = 0
        self.stats = AlertStats()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, now_ms: int | None = None) -> None:
        now = self.clock.now_us() // 1000 if now_ms is None else int(now_ms)
        for rule in self.rules:
            self._evaluate_rule(rule, now)
        self.flush(now)

    def _evaluate_rule(self, rule: AlertRuleConfig, now: int) -> None:
        try:
            facts = list(getattr(self.facts, rule.kind)(now))
        except Exception as e:  # a report that fails: the state of this rule's alerts is kept
            self.stats.provider_errors += 1
            self.stats.last_error = f"{rule.name}: facts provider failed: {e}"
            log.warning("alert rule %s: facts provider failed, its alerts keep their state: %s", rule.name, e)
            return
        for_ms = int(rule.for_s * 1000)
        active = set()
        for fact in facts:
            value = float(fact.value)
            if not (math.isnan(value) or value >= rule.threshold):
                continue
            labels = {**{str(k): str(v) for k, v in fact.subject.items()}, **rule.labels, "alertname": rule.name}
            key = (rule.name,) + tuple(sorted(labels.items()))
            if key in active:
                continue  # two facts with the same subject: the first wins
            active.add(key)
            if math.isnan(value):
                continue  # not known now: the alert, if any, keeps its state
            a = self._alerts.get(key)
            if a is None or a.state == "resolved":
                a = _Alert(rule=rule, labels=labels, annotations={}, state="pending", active_since_ms=now)
                self._alerts[key] = a
            a.annotations = self._annotations(rule, fact, labels)
            if a.state == "pending" and now - a.active_since_ms >= for_ms:
                a.state, a.fired_at_ms, a.last_sent_ms = "firing", now, None
                self._outbox[key] = None
            elif (a.state == "firing" and key not in self._outbox and a.last_sent_ms is not None
                  and now - a.last_sent_ms >= self.repeat_ms):
                self._outbox[key] = None  # resend after the repeat interval
        for key, a in list(self._alerts.items()):
            if a.rule.name != rule.name or key in active:
                continue
            if a.state == "pending":
                del self._alerts[key]
            elif a.state == "firing":
                a.state, a.resolved_at_ms = "resolved", now
                self._outbox[key] = self._payload(a, now)  # fixed: endsAt is the time it resolved

    def _annotations(self, rule: AlertRuleConfig, fact: Fact, labels: dict) -> dict:
        fields = _Fields(labels, value=_value_text(rule.kind, fact.value),
                         threshold=_value_text(rule.kind, rule.threshold))
        out = {"summary": (rule.summary or _DEFAULT_SUMMARY[rule.kind]).format_map(fields),
               "value": f"{fact.value:g}"}
        if fact.detail:
            out["description"] = fact.detail
        return out

    def _payload(self, a: _Alert, now: int) -> dict:
        ends = a.resolved_at_ms if a.state == "resolved" else now + self.valid_ms
        p = {"labels": dict(a.labels), "annotations": dict(a.annotations), "startsAt": _iso(a.fired_at_ms),
             "endsAt": _iso(ends)}
        if self.generator_url:
            p["generatorURL"] = self.generator_url
        return p

    # ------------------------------------------------------------------ delivery
    def flush(self, now_ms: int | None = None) -> int:
        """Send the outbox if it is due; returns the number of alerts delivered."""
        now = self.clock.now_us() // 1000 if now_ms is None else int(now_ms)
        self.stats.outbox = len(self._outbox)
        if not self._outbox or now < self._next_try_ms:
            return 0
        keys, payloads = [], []
        for k, fixed in list(self._outbox.items()):
            a = self._alerts.get(k)
            if fixed is not None:
                payloads.append(fixed)
            elif a is not None and a.state == "firing":
                payloads.append(self._payload(a, now))  # endsAt from the time it is sent
            else:
                del self._outbox[k]
                continue
            keys.append(k)
        if not payloads:
            return 0
        try:
            self.sender(payloads)
        except SendError as e:
            self.stats.last_error = str(e)
            if not e.retryable:
                self.stats.dropped += len(payloads)
                log.error("alerts refused by the receiver, %d dropped: %s", len(payloads), e)
                self._delivered(keys, now, sent=False)
                return 0
            self.stats.send_failures += 1
            self._backoff_ms = min(self.retry_max_ms, max(self.retry_initial_ms, 2 * self._backoff_ms))
            self._next_try_ms = now + self._backoff_ms
            log.warning("alert receiver: %s; %d alerts kept, next try in %.0f s", e, len(payloads),
                        self._backoff_ms / 1000)
            return 0
        self._backoff_ms, self._next_try_ms = 0, 0
        self.stats.sent += len(payloads)
        self._delivered(keys, now, sent=True)
        return len(payloads)

    def _delivered(self, keys: list, now: int, sent: bool) -> None:
        for k in keys:
            self._outbox.pop(k, None)
            a = self._alerts.get(k)
            if a is None:
                continue
            if a.state == "firing":
                a.last_sent_ms = now  # after a refusal too: tried again only after the repeat interval
            elif a.state == "resolved":
                del self._alerts[k]
        self.stats.outbox = len(self._outbox)

    # ------------------------------------------------------------------ introspection
    def active(self) -> list[dict]:
        """The alerts now pending or firing (and resolved ones not yet delivered), for a status page."""
        return [{"labels": dict(a.labels), "state": a.state, "active_since": _iso(a.active_since_ms),
                 "annotations": dict(a.annotations)} for a in self._alerts.values()]


def evaluator_from_config(cfg, facts: Facts, clock: Clock | None = None) -> AlertEvaluator:
    """An evaluator for a CollectorConfig: its rules, webhook URL, repeat interval, generator URL."""
    sender = AlertmanagerSender(cfg.alert_webhook_url, timeout_s=cfg.alert_timeout_s)
    return AlertEvaluator(cfg.alerts, facts, sender, repeat_s=cfg.alert_repeat_s,
                          generator_url=cfg.alert_generator_url, clock=clock)


__all__ = ["AlertEvaluator", "AlertmanagerSender", "Fact", "Facts", "SendError", "evaluator_from_config"]
