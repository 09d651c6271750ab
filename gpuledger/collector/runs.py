"""Experiment runs: what each tracked run cost, written back onto the run, and what a deployed
model cost to get to.

- `run_rows`: the Query report "runs": `cost --by run` figures (a run is its processes'
  MLFLOW_RUN_ID, else WANDB_RUN_ID) with each run's experiment, team, project, hosts and first and
  last sight, optionally only one experiment's runs.
- `RunCostSync`: the collector's tracker job. Every pass it takes the runs whose processes were seen
  in the last `lookback` and prices each over its whole life (from the hour its first process
  started to now: the same figures `cost --by run` gives for any range that holds the run), then
  writes what changed onto the MLflow run (metrics gpuledger.gpu_hours, .active_hours,
  .idle_held_hours, .cost, .idle_share; tags gpuledger.price_source, .currency, .cost_status,
  .cost_until) and, with W&B enabled, into the W&B run's summary. `cost_status` is `live` while the
  run runs and `final` once MLflow says it ended (FINISHED, FAILED or KILLED) and neither its end
  nor its processes' last batch is more recent than `final_after`. A late window that lands later
  makes the run seen again, and the corrected figure is written.
- `cost_per_successful_deployment`: the total cost of the experiments that produced a model version
  now deployed (MLflow registry aliases or stages), divided by the number of such deployments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gpuledger.clock import iso_utc
from gpuledger.collector import allocation
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.reports import cost_rows
from gpuledger.collector.store import Store
from gpuledger.integrations import COST_NUMBERS, PREFIX

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_RUN_LABEL = "arrayFirst(x -> x != '', [tags['mlflow_run_id'], tags['wandb_run_id']])"


@dataclass(frozen=True)
class RunMeta:
    run: str
    tracker: str  # mlflow | wandb
    experiment: str  # MLflow experiment id, or the W&B project
    team: str
    project: str
    wandb_run_id: str
    wandb_project: str
    hosts: tuple
    first_start_ms: int  # the earliest start of its processes
    last_seen_ms: int  # the collector's clock at the last batch that named one of its processes


def run_meta(store: Store, seen_since_ms: int = 0, experiment: str = "", run: str = "") -> dict[str, RunMeta]:
    """The runs named by processes seen since `seen_since_ms` (collector clock)."""
    where = []
    if experiment:
        where.append("experiment = {exp:String}")
    if run:
        where.append("run = {run:String}")
    rows = store.report_rows(
        f"""SELECT {_RUN_LABEL} AS run, any(if(tags['mlflow_run_id'] != '', 'mlflow', 'wandb')) AS tracker,
                   any(arrayFirst(x -> x != '', [tags['mlflow_experiment_id'], tags['wandb_project']])) AS experiment,
                   any(tags['team']), any(tags['project']), any(tags['wandb_run_id']), any(tags['wandb_project']),
                   groupUniqArray(host_id), min(start_ms), max(last_seen_ms)
            FROM {store.db}.processes FINAL
            WHERE run != '' AND last_seen_ms >= {{since:Int64}}
            GROUP BY run {'HAVING ' + ' AND '.join(where) if where else ''}""",
        {"since": seen_since_ms, "exp": experiment, "run": run})
    return {r[0]: RunMeta(r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(sorted(r[7])), int(r[8]), int(r[9]))
            for r in rows}


def price_sources(recs: dict, pricing: Pricing, hosts, at_ms: int) -> str:
    """Where the price of these hosts' GPUs comes from (the catalog, an override, a bill); `recs`:
    allocation.load_hosts(store)."""
    out = []
    for h in sorted(hosts):
        rec = recs.get(h)
        if rec is None:
            continue
        p = pricing.price(rec.provider, rec.region, rec.instance_type, rec.gpu_count, h, at_ms, tags=rec.tags,
                          instance_id=rec.instance_id)
        src = f"{p.method}: {p.source}" if p is not None else "unpriced"
        if src not in out:
            out.append(src)
    return "; ".join(out)[:1000]


def run_rows(store: Store, pricing: Pricing, since: int, until: int, filters: dict, now_ms: int,
             rules: CoverageRules = CoverageRules()) -> list[dict]:
    """The "runs" report: one row per run with GPU time in the range (filters: experiment, run)."""
    meta = run_meta(store, 0, filters.get("experiment", ""), filters.get("run", ""))
    out = []
    for r in cost_rows(store, pricing, since, until, "run", {}, now_ms, rules):
        m = meta.get(r["run"])
        if m is None:
            continue  # not a run (untagged, host owners), or another experiment
        out.append({"run": r["run"], "tracker": m.tracker, "experiment": m.experiment, "team": m.team,
                    "project": m.project, "hosts": ",".join(m.hosts), "first_start_ms": m.first_start_ms,
                    **{k: v for k, v in r.items() if k != "run"}})
    return out


def cost_fields(row: dict, price_source: str) -> dict | None:
    """A `cost --by run` row as the trackers' cost mapping (None when the run is unpriced)."""
    if row.get("cost") is None:
        return None
    out = {k: float(row[k] or 0.0) for k in COST_NUMBERS}
    out["price_source"] = price_source or row.get("allocation", "")
    out["currency"] = row.get("currency") or "USD"
    return out


@dataclass
class SyncStats:
    passes: int = 0
    written: int = 0  # run writes (MLflow and W&B)
    finalized: int = 0
    unknown_runs: int = 0  # run ids the tracker does not know (another server, a made-up id)
    unpriced: int = 0
    errors: int = 0
    last_error: str = ""
    last: dict = field(default_factory=dict)  # run -> (status, cost) last written


class RunCostSync:
    """Writes each run's cost onto its tracker run (see the module docstring). `sync(now_ms)` is one
    pass; the collector's job scheduler calls it every `tracker_sync_s`."""

    def __init__(self, store: Store, pricing: Pricing, rules: CoverageRules = CoverageRules(), *, mlflow=None,
                 wandb_write: Callable[[str, dict], object] | None = None, wandb_entity: str = "",
                 lookback_s: float = 2 * 86_400.0, final_after_s: float = 600.0) -> None:
        self.store = store
        self.pricing = pricing
        self.rules = rules
        self.mlflow = mlflow  # an integrations.mlflow.MlflowClient, or None
        self.wandb_write = wandb_write  # (path, cost) -> ..., e.g. integrations.wandb.write_cost
        self.wandb_entity = wandb_entity
        self.lookback_ms = int(lookback_s * 1000)
        self.final_after_ms = int(final_after_s * 1000)
        self.stats = SyncStats()
        self._written: dict[tuple[str, str], tuple] = {}  # (tracker, run) -> (figures, status)
        self._unknown_until: dict[str, int] = {}

    def sync(self, now_ms: int) -> int:
        """One pass; returns the number of runs written."""
        self.stats.passes += 1
        meta = run_meta(self.store, now_ms - self.lookback_ms)
        if not meta:
            return 0
        since = min(m.first_start_ms for m in meta.values()) // HOUR_MS * HOUR_MS
        since = max(since, now_ms - 400 * 86_400_000)  # a process 'started' decades ago prices its run from here
        rows = {r["run"]: r for r in cost_rows(self.store, self.pricing, since, now_ms, "run", {}, now_ms, self.rules)}
        written = 0
        recs = allocation.load_hosts(self.store)
        for run, m in sorted(meta.items()):
            row = rows.get(run)
            if row is None:
                continue
            cost = cost_fields(row, price_sources(recs, self.pricing, m.hosts, now_ms))
            if cost is None:
                self.stats.unpriced += 1
                continue
            try:
                if m.tracker == "mlflow" and self.mlflow is not None:
                    written += self._write_mlflow(run, m, cost, now_ms)
                if self.wandb_write is not None and m.wandb_run_id and m.wandb_project:
                    written += self._write_wandb(m, cost)
            except Exception as e:  # one run's tracker failing must not stop the others
                self.stats.errors += 1
                self.stats.last_error = f"run {run}: {e}"
                log.warning("tracker sync: run %s: %s", run, e)
        self.stats.written += written
        return written

    @staticmethod
    def _figures(cost: dict) -> tuple:
        return tuple(round(cost[k], 6) for k in COST_NUMBERS) + (cost["price_source"], cost["currency"])

    def _write_mlflow(self, run: str, m: RunMeta, cost: dict, now_ms: int) -> int:
        from gpuledger.integrations.mlflow import MlflowError

        if self._unknown_until.get(run, 0) > now_ms:
            return 0
        try:
            tracked = self.mlflow.get_run(run)
        except MlflowError as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or e.status == 404:
                self.stats.unknown_runs += 1
                self._unknown_until[run] = now_ms + HOUR_MS  # asked again in an hour
                return 0
            raise
        ended = tracked.status in TERMINAL and (tracked.end_time_ms or 0) <= now_ms - self.final_after_ms \
            and m.last_seen_ms <= now_ms - self.final_after_ms
        status = "final" if ended else "live"
        key = ("mlflow", run)
        figures = self._figures(cost)
        if self._written.get(key) == (figures, status):
            return 0
        self.mlflow.log_cost(run, cost, timestamp_ms=now_ms)
        self.mlflow.set_tags(run, {f"{PREFIX}cost_status": status, f"{PREFIX}cost_until": iso_utc(now_ms)})
        if status == "final" and (self._written.get(key) or (None, ""))[1] != "final":
            self.stats.finalized += 1
        self._written[key] = (figures, status)
        self.stats.last[run] = (status, cost["cost"])
        return 1

    def _write_wandb(self, m: RunMeta, cost: dict) -> int:
        from gpuledger.integrations.wandb import run_path

        key = ("wandb", f"{m.wandb_project}/{m.wandb_run_id}")
        figures = self._figures(cost)
        if self._written.get(key) == (figures, ""):
            return 0
        self.wandb_write(run_path(m.wandb_run_id, m.wandb_project, self.wandb_entity), cost)
        self._written[key] = (figures, "")
        return 1


# ----------------------------------------------------------------------------- deployments


def cost_by_run(store: Store, pricing: Pricing, since: int, until: int, now_ms: int,
                rules: CoverageRules = CoverageRules()) -> dict[str, float]:
    return {r["run"]: r["cost"] for r in cost_rows(store, pricing, since, until, "run", {}, now_ms, rules)
            if r.get("cost") is not None}


def mlflow_client(mlflow_cfg, env=None):
    """An MlflowClient for an [mlflow] config (credentials from MLflow's own environment), or None."""
    from gpuledger.integrations.mlflow import MlflowClient

    if mlflow_cfg is None or not mlflow_cfg.tracking_uri:
        return None
    return MlflowClient.from_env(mlflow_cfg.tracking_uri, env=env, timeout_s=mlflow_cfg.timeout_s)


def cost_per_successful_deployment(store: Store, pricing: Pricing, since: int, until: int, now_ms: int,
                                   mlflow_cfg, rules: CoverageRules = CoverageRules(),
                                   client=None) -> tuple[float | None, str]:
    """(cost per deployed model version, how it was found) or (None, why not).

    The cost is that of every run (any status, deleted ones included) of the experiments whose runs
    produced a model version that now holds a deploy alias or stage, priced by `cost --by run` over
    [since, until), divided by the number of those deployments."""
    from gpuledger.integrations.mlflow import MlflowError, cost_per_deployment

    try:
        client = client or mlflow_client(mlflow_cfg)
    except ValueError as e:
        return None, f"MLflow: {e}"
    if client is None:
        return None, "MLflow is not configured ([mlflow] tracking_uri or MLFLOW_TRACKING_URI)"
    aliases = getattr(mlflow_cfg, "deploy_aliases", ("production", "champion"))
    stages = getattr(mlflow_cfg, "deploy_stages", ("Production",))
    try:
        basis = client.deployment_cost_basis(aliases, stages)
    except (MlflowError, OSError) as e:
        return None, f"MLflow at {client.base}: {e}"
    if not basis.deployments:
        return None, (f"no deployed model version in the MLflow registry (aliases {', '.join(aliases)}; "
                      f"stages {', '.join(stages)})")
    res = cost_per_deployment(basis, cost_by_run(store, pricing, since, until, now_ms, rules))
    cur = "USD"
    return res["cost_per_deployment"], (
        f"{res['total_cost']:,.2f} {cur} over {len(basis.runs)} runs of {len(basis.experiments)} experiment(s) "
        f"/ {res['deployments']} deployment(s); {len(res['unpriced_runs'])} run(s) had no GPU time in the range"
        + (f"; {len(basis.missing_runs)} deployed version(s) point to runs MLflow no longer has"
           if basis.missing_runs else ""))


def deployment_split(basis, costs: dict[str, float]) -> list[dict]:
    """`runs --successful`: the runs of the deployment experiments split into those whose model was
    deployed and those that were not, with their cost; plus the cost per deployment."""
    deployed_runs = {d.run_id for d in basis.deployments if d.run_id}
    groups = {"led to a deployment": [], "did not": []}
    for r in basis.runs:
        groups["led to a deployment" if r.run_id in deployed_runs else "did not"].append(r)
    n = len(basis.deployments)
    total = sum(costs.get(r.run_id, 0.0) for r in basis.runs)
    out = []
    for name, runs in groups.items():
        c = sum(costs.get(r.run_id, 0.0) for r in runs)
        by_status: dict[str, int] = {}
        for r in runs:
            by_status[r.status] = by_status.get(r.status, 0) + 1
        out.append({"group": name, "runs": len(runs), "statuses": ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())),
                    "cost": c, "share": c / total if total else None,
                    "cost_per_deployment": total / n if n else None, "deployments": n})
    return out


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    import numpy as np

    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.percentile(v, q)) if v else None
