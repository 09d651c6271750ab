"""`gpuledger estimate`: what a planned job will cost, before it runs.

Two bases, one row either way:
- a plan: instance type (provider, region), GPU count and hours -> the price in force now times
  GPU-hours (`cost`);
- similar past runs: `like_experiment` (the runs of an MLflow experiment id, or a W&B project) or
  `like_run` (the runs of that run's experiment): the 50th and 90th percentiles of their cost and
  GPU-hours as `cost --by run` prices them over the range (linear interpolation between runs), with
  the number of runs they rest on.
Both carry the team's measured idle share over the range (`cost --by team`: idle-held plus
idle-free cost over all cost) and what that share of the estimate would be
(`expected_idle_cost`): GPUs held for the hours asked are billed whether they compute or not.
The team is `team`, else the similar runs' team, else the whole fleet.
"""

from __future__ import annotations

from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.reports import cost_rows
from gpuledger.collector.runs import percentile, run_meta, run_rows
from gpuledger.collector.store import Store


class EstimateError(ValueError):
    pass


def _num(filters: dict, key: str, integer: bool = False) -> float | None:
    v = filters.get(key, "")
    if v == "":
        return None
    try:
        x = int(v) if integer else float(v)
    except ValueError:
        raise EstimateError(f"{key}: {v!r} is not a {'whole number' if integer else 'number'}") from None
    if x <= 0:
        raise EstimateError(f"{key}: must be > 0, got {v}")
    return x


def team_idle_share(store: Store, pricing: Pricing, since: int, until: int, now_ms: int, team: str,
                    rules: CoverageRules) -> tuple[float | None, str]:
    rows = cost_rows(store, pricing, since, until, "team", {}, now_ms, rules)
    if team:
        hit = [r for r in rows if r["team"] == team]
        if hit and hit[0]["cost"]:
            return hit[0]["idle_share"], f"team {team}"
        return None, f"team {team} (no priced GPU time in the range)"
    cost = sum(r["cost"] or 0.0 for r in rows)
    idle = sum(r["idle_cost"] or 0.0 for r in rows)
    return (idle / cost if cost else None), "the whole fleet"


def estimate_rows(store: Store, pricing: Pricing, since: int, until: int, filters: dict, now_ms: int,
                  rules: CoverageRules = CoverageRules()) -> list[dict]:
    itype = filters.get("instance_type", "")
    like_exp = filters.get("like_experiment", "")
    like_run = filters.get("like_run", "")
    if sum(bool(x) for x in (itype, like_exp, like_run)) != 1:
        raise EstimateError("give exactly one of instance_type (with gpus and hours), like_experiment and like_run")
    team = filters.get("team", "")
    row: dict = {}
    if itype:
        gpus = _num(filters, "gpus", integer=True)
        hours = _num(filters, "hours")
        if gpus is None or hours is None:
            raise EstimateError("instance_type: needs gpus and hours")
        provider, region = filters.get("provider", ""), filters.get("region", "")
        if not provider or not region:
            hits = [r for r in pricing.catalog_rows() if r["instance_type"] == itype
                    and (not provider or r["provider"] == provider) and (not region or r["region"] == region)]
            if not hits:
                raise EstimateError(f"instance_type: {itype!r} is not in the price catalog or overrides "
                                    "(see gpuledger pricing), or give provider and region")
            provider, region = hits[0]["provider"], hits[0]["region"]
        price = pricing.price(provider, region, itype, 0, "", now_ms)
        if price is None:
            raise EstimateError(f"instance_type: no price for {provider}/{region}/{itype}")
        cost = price.per_gpu_hour * gpus * hours
        row.update({"basis": f"{gpus} GPU(s) of {provider}/{region}/{itype} for {hours:g} h at "
                             f"{price.per_gpu_hour:.4f} {price.currency} per GPU-hour ({price.source})",
                    "runs": None, "gpu_hours": gpus * hours, "cost": cost, "currency": price.currency,
                    "p50_cost": None, "p90_cost": None, "p50_gpu_hours": None, "p90_gpu_hours": None})
    else:
        if like_run:
            m = run_meta(store, 0, run=like_run).get(like_run)
            if m is None:
                raise EstimateError(f"like_run: no process carried run {like_run!r}")
            experiment, own = m.experiment, like_run
        else:
            experiment, own = like_exp, ""
        if not experiment:
            raise EstimateError(f"like_run: run {like_run!r} names no experiment (MLFLOW_EXPERIMENT_ID or "
                                "WANDB_PROJECT on its processes)")
        runs = [r for r in run_rows(store, pricing, since, until, {"experiment": experiment}, now_ms, rules)
                if r.get("cost") is not None]
        if not runs:
            raise EstimateError(f"experiment {experiment!r}: no priced run in the range")
        costs = [r["cost"] for r in runs]
        gh = [r["gpu_hours"] for r in runs]
        team = team or max({r["team"] for r in runs if r["team"]} or {""}, key=lambda t: sum(
            1 for r in runs if r["team"] == t))
        p50 = percentile(costs, 50)
        row.update({"basis": f"{len(runs)} run(s) of experiment {experiment} with GPU time in the range"
                             + (f" (like run {own})" if own else ""),
                    "runs": len(runs), "gpu_hours": percentile(gh, 50), "cost": p50,
                    "currency": runs[0].get("currency") or "USD", "p50_cost": p50, "p90_cost": percentile(costs, 90),
                    "p50_gpu_hours": percentile(gh, 50), "p90_gpu_hours": percentile(gh, 90),
                    "mean_cost": sum(costs) / len(costs), "max_cost": max(costs)})
        if own:
            mine = next((r for r in runs if r["run"] == own), None)
            row["like_run_cost"] = mine["cost"] if mine else None
    share, who = team_idle_share(store, pricing, since, until, now_ms, team, rules)
    row.update({"team": who, "team_idle_share": share,
                "expected_idle_cost": row["cost"] * share if share is not None and row["cost"] is not None else None})
    return [row]
