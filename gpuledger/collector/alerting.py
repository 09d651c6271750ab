"""The collector's scheduled jobs: alert rules and tracker cost sync, on one thread of their own.

`Jobs` runs named jobs, each every `interval_s` (like the rollup Sealer: start() and close() are
safe to call twice, a failing job is counted and logged and runs again next time). `attach_jobs`
builds them from the collector's config and hands them to the Collector, which starts and stops
them with itself:

- alerts ([[collector.alerts]], every `alert_interval_s`): an AlertEvaluator (alerts.py) over facts
  from the reports, posting to `alert_webhook_url` (Alertmanager's /api/v2/alerts or any receiver
  of the same body). After each evaluation the state of every alert is written to the `alerts`
  table, which the "alerts" report (`gpuledger alerts`) reads.
- tracker sync (every `tracker_sync_s`): runs.RunCostSync, writing run cost onto MLflow runs (when
  [mlflow] tracking_uri or MLFLOW_TRACKING_URI is set) and W&B run summaries (`wandb_sync`).

Facts per rule kind (alerts.py says what a fact's value means):
- gpu_idle_held: each GPU still reporting whose latest windows are idle-held (a process holds it,
  no kernel ran): seconds since its last window that was not (or the lookback, at most);
- endpoint_idle: each endpoint up in the last day: its idle share (endpoints.py);
- agent_silent: each host whose agent is live or silent (not stopped on purpose, not retired):
  seconds since its last window ended (coverage.py's HostStatus);
- unwatched_gpu_spend: NO FACTS YET. The spend on GPUs no agent watches comes from the bill
  baseline (collector/baseline.py), which is not on this branch: until it is wired in
  (`unwatched_spend_facts`), rules of this kind never fire; a warning at start says so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from gpuledger.clock import iso_utc
from gpuledger.collector.alerts import AlertEvaluator, Fact, Facts, evaluator_from_config
from gpuledger.collector.coverage import CoverageRules, expectations
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000


# ----------------------------------------------------------------------------- facts


def gpu_idle_held_facts(store: Store, now_ms: int, lookback_ms: int, rules: CoverageRules = CoverageRules()):
    """One fact per GPU whose windows up to now are idle-held: how long (seconds) without a break."""
    fresh_ms = rules.grace_ms + 120_000  # a GPU whose last window is older has stopped reporting
    rows = store.report_rows(
        f"""SELECT host_id, gpu_uuid, max(window_start_ms + window_ms) AS last_end,
                   maxIf(window_start_ms + window_ms, NOT (busy_ms = 0 AND idle_held_ms > 0)) AS last_break,
                   min(window_start_ms) AS first_start
            FROM {store.db}.gpu_windows FINAL
            WHERE window_start_ms >= {{lo:Int64}} AND window_start_ms < {{now:Int64}}
            GROUP BY host_id, gpu_uuid
            HAVING last_end >= {{fresh:Int64}} AND last_break < last_end""",
        {"lo": now_ms - lookback_ms, "now": now_ms, "fresh": now_ms - fresh_ms})
    out = []
    for host, gpu, last_end, last_break, first in rows:
        since = max(int(last_break), int(first))
        out.append(Fact({"host": host, "gpu_uuid": gpu}, (int(last_end) - since) / 1000.0,
                        f"GPU {gpu} on {host}: idle-held since {iso_utc(since)}, up to its last window at "
                        f"{iso_utc(int(last_end))}"))
    return out


def agent_silent_facts(store: Store, now_ms: int, rules: CoverageRules = CoverageRules(),
                       lookback_ms: int = 7 * 86_400_000):
    """One fact per host whose agent has not stopped on purpose: seconds since its last window."""
    _, status = expectations(store, now_ms - lookback_ms, now_ms, now_ms, rules)
    out = []
    for host, st in sorted(status.items()):
        if st.state not in ("live", "silent"):
            continue
        last = st.last_window_end_ms or st.since_ms
        out.append(Fact({"host": host}, max(0.0, (now_ms - last) / 1000.0),
                        f"host {host}: {st.state}, last window ended {iso_utc(last)}"))
    return out


def unwatched_spend_facts(now_ms: int):
    """unwatched_gpu_spend: no facts until the bill baseline (collector/baseline.py) is wired in here."""
    return []


def build_facts(store: Store, pricing: Pricing, rules: CoverageRules, alert_rules) -> Facts:
    idle_rules = [r.threshold for r in alert_rules if r.kind == "gpu_idle_held"]
    lookback = int((max(idle_rules, default=0.0) + 3600.0) * 1000) + HOUR_MS

    def endpoint_idle(now_ms: int):
        from gpuledger.collector.endpoints import idle_share_facts

        return idle_share_facts(store, pricing, now_ms, rules)

    if any(r.kind == "unwatched_gpu_spend" for r in alert_rules):
        log.warning("alert rules of kind unwatched_gpu_spend never fire yet: the bill baseline that supplies "
                    "unwatched spend is not wired into this collector")
    return Facts(gpu_idle_held=lambda now: gpu_idle_held_facts(store, now, lookback, rules),
                 endpoint_idle=endpoint_idle,
                 unwatched_gpu_spend=unwatched_spend_facts,
                 agent_silent=lambda now: agent_silent_facts(store, now, rules))


# ----------------------------------------------------------------------------- alert state in the store


def _key(labels: dict) -> str:
    return json.dumps({k: v for k, v in sorted(labels.items()) if k != "alertname"}, separators=(",", ":"))


class AlertJob:
    """Evaluate, send, and record each alert's state in the `alerts` table."""

    def __init__(self, store: Store, evaluator: AlertEvaluator) -> None:
        self.store = store
        self.evaluator = evaluator
        self._recorded: dict[tuple, tuple] = {}  # (alertname, key, since) -> (state, annotations)

    def __call__(self, now_ms: int) -> None:
        self.evaluator.evaluate(now_ms)
        from gpuledger.client import parse_time

        rows, seen = [], set()
        for a in self.evaluator.active():
            labels = a["labels"]
            since = parse_time(a["active_since"], now_ms)
            k = (labels["alertname"], _key(labels), since)
            seen.add(k)
            rows.append((k, labels, a["state"], a["annotations"]))
        for k, (state, ann) in list(self._recorded.items()):
            if k not in seen and state in ("firing", "pending"):
                # gone from the evaluator: a firing one resolved (and was delivered), a pending one cleared
                labels = {"alertname": k[0], **json.loads(k[1])}
                rows.append((k, labels, "resolved" if state == "firing" else "cleared", ann))
        out = []
        for k, labels, state, ann in rows:
            if self._recorded.get(k) == (state, ann) and state != "firing":
                continue  # unchanged (firing rows are rewritten: their updated_ms says the job is alive)
            out.append((k[0], k[1], {x: y for x, y in labels.items() if x != "alertname"}, state, k[2], now_ms,
                        ann.get("value", ""), ann.get("summary", ""), ann.get("description", "")))
            self._recorded[k] = (state, ann)
        for k, (state, _) in list(self._recorded.items()):
            if state in ("resolved", "cleared") and k not in seen:
                del self._recorded[k]
        if out:
            cols = list(zip(*out, strict=True))
            self.store.insert_table("alerts", pa.table({
                "alertname": pa.array(cols[0], pa.string()), "alert_key": pa.array(cols[1], pa.string()),
                "labels": pa.array([list(d.items()) for d in cols[2]], pa.map_(pa.string(), pa.string())),
                "state": pa.array(cols[3], pa.string()), "active_since_ms": pa.array(cols[4], pa.int64()),
                "updated_ms": pa.array(cols[5], pa.int64()), "value": pa.array(cols[6], pa.string()),
                "summary": pa.array(cols[7], pa.string()), "description": pa.array(cols[8], pa.string())}))


def alert_rows(store: Store, since: int, until: int, filters: dict, now_ms: int,
               stale_ms: int = 3 * 60_000) -> list[dict]:
    """The "alerts" report: alerts pending or firing now, and those that resolved in [since, until).
    A firing alert not re-recorded for `stale_ms` (filter `stale_s`) shows as `stale`: the collector
    that evaluated it stopped (or its alert job fails)."""
    if filters.get("stale_s"):
        stale_ms = int(float(filters["stale_s"]) * 1000)
    rows = store.report_rows(
        f"""SELECT alertname, alert_key, argMax(labels, updated_ms), argMax(state, updated_ms), active_since_ms,
                   max(updated_ms), argMax(value, updated_ms), argMax(summary, updated_ms),
                   argMax(description, updated_ms)
            FROM {store.db}.alerts GROUP BY alertname, alert_key, active_since_ms""")
    out = []
    for name, _k, labels, state, since_ms, updated, value, summary, desc in rows:
        since_ms, updated = int(since_ms), int(updated)
        if state == "cleared":  # pending, never fired
            continue
        if state == "resolved":
            if not (since <= updated < until):
                continue
        elif updated < now_ms - stale_ms:
            state = "stale"
        out.append({"state": state, "alertname": name,
                    "subject": ", ".join(f"{k}={v}" for k, v in sorted(dict(labels).items())),
                    "active_since": iso_utc(since_ms), "updated": iso_utc(updated), "value": value, "summary": summary,
                    "description": desc})
    order = {"firing": 0, "pending": 1, "stale": 2, "resolved": 3}
    out.sort(key=lambda r: (order.get(r["state"], 9), r["alertname"], r["subject"], r["active_since"]))
    return out


# ----------------------------------------------------------------------------- the scheduler


@dataclass
class JobStats:
    runs: int = 0
    errors: int = 0
    last_error: str = ""
    last_run_ms: int = 0


@dataclass
class _Job:
    name: str
    interval_ms: int
    fn: Callable[[int], object]
    next_ms: int = 0
    stats: JobStats = field(default_factory=JobStats)


class Jobs:
    """Runs each job every interval on one thread (`gpuledger-jobs`); `run_due(now_ms)` runs the jobs
    that are due now (what the thread does, callable from tests with an injected time)."""

    def __init__(self, clock, tick_s: float = 1.0) -> None:
        self.clock = clock
        self.tick_s = tick_s
        self.jobs: list[_Job] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, name: str, interval_s: float, fn: Callable[[int], object], first_after_s: float = 0.0) -> None:
        self.jobs.append(_Job(name, int(interval_s * 1000), fn, self.clock.now_us() // 1000 + int(first_after_s * 1000)))

    def stats(self) -> dict[str, JobStats]:
        return {j.name: j.stats for j in self.jobs}

    def run_due(self, now_ms: int | None = None) -> int:
        now_ms = self.clock.now_us() // 1000 if now_ms is None else now_ms
        ran = 0
        with self._lock:
            for j in self.jobs:
                if now_ms < j.next_ms:
                    continue
                j.next_ms = now_ms + j.interval_ms
                j.stats.runs += 1
                j.stats.last_run_ms = now_ms
                ran += 1
                try:
                    j.fn(now_ms)
                except Exception as e:  # a job must outlive its failures; the next interval tries again
                    j.stats.errors += 1
                    j.stats.last_error = str(e)
                    log.exception("collector job %s failed", j.name)
        return ran

    def start(self) -> None:
        if self._thread is None and self.jobs:
            self._thread = threading.Thread(target=self._run, name="gpuledger-jobs", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.run_due()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None


def build_jobs(store: Store, pricing: Pricing, rules: CoverageRules, cfg, clock, *, mlflow_cfg=None,
               env=None) -> tuple[Jobs, dict]:
    """The jobs a CollectorConfig asks for, and their parts (evaluator, sync) by name."""
    jobs = Jobs(clock)
    parts: dict = {}
    if cfg.alerts:
        evaluator = evaluator_from_config(cfg, build_facts(store, pricing, rules, cfg.alerts), clock=clock)
        parts["alerts"] = AlertJob(store, evaluator)
        jobs.add("alerts", cfg.alert_interval_s, parts["alerts"], first_after_s=cfg.alert_interval_s)
    if cfg.tracker_sync_s > 0:
        from gpuledger.collector.runs import RunCostSync, mlflow_client

        client = mlflow_client(mlflow_cfg, env=env) if mlflow_cfg is not None else None
        wandb_write = None
        if cfg.wandb_sync:
            from gpuledger.integrations.wandb import write_cost

            wandb_write = write_cost
        if client is not None or wandb_write is not None:
            parts["tracker_sync"] = RunCostSync(store, pricing, rules, mlflow=client, wandb_write=wandb_write,
                                                wandb_entity=cfg.wandb_entity, lookback_s=cfg.tracker_lookback_s,
                                                final_after_s=cfg.tracker_final_after_s)
            jobs.add("tracker_sync", cfg.tracker_sync_s, lambda now: parts["tracker_sync"].sync(now),
                     first_after_s=min(cfg.tracker_sync_s, 60.0))
    return jobs, parts


def attach_jobs(collector, cfg, config_path: str | None = None, env=None) -> Jobs:
    """Build the jobs of `cfg` (and the [mlflow] section of the same file) and give them to the
    collector, which starts them with itself and stops them before its store closes."""
    from gpuledger.config import load_mlflow

    mlflow_cfg = load_mlflow(config_path, env=env)
    jobs, parts = build_jobs(collector.store, collector.pricing, collector.rules, cfg, collector.clock,
                             mlflow_cfg=mlflow_cfg, env=env)
    collector.jobs = jobs
    collector.job_parts = parts
    return jobs


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll `pred` until true or timeout (tests and the demo, with real receivers)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
