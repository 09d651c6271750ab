"""Reports: SQL over the store, priced at query time, returned as Arrow tables.

Every query is parameterised ({name:Type} placeholders bound by ClickHouse): host names and tag
values are data, never SQL. The parts: coverage.py (expected time), allocation.py (who pays, at what
price, from rollups and raw windows), export.py (FOCUS). This module picks the report and shapes
its rows.
"""

from __future__ import annotations

import re

import pyarrow as pa

from gpuledger.collector import allocation, billing, coverage
from gpuledger.collector.allocation import HostRecord, Periods, StateTally, price_breakpoints
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store
from gpuledger.schema import to_ipc
from gpuledger.v1 import telemetry_pb2 as pb

__all__ = ["CoverageRules", "ReportError", "run", "idle_rows", "cost_rows", "retire", "TAG_ALIASES"]

MS_PER_HOUR = 3_600_000.0
TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
# finance's names for process tags (agent keys in brackets)
TAG_ALIASES = {
    "team": ("team",),
    "project": ("project",),
    "phase": ("phase",),
    "workload": ("workload",),
    "experiment": ("mlflow_experiment_id", "wandb_project", "mlflow_run_id", "wandb_run_id"),
    "run": ("mlflow_run_id", "wandb_run_id"),
    "endpoint": ("endpoint",),
    "slurm_job": ("slurm_job_id",),
    "slurm_account": ("slurm_job_account",),
}


class ReportError(ValueError):
    pass


def run(store: Store, pricing: Pricing, req: pb.ReportRequest, now_ms: int,
        rules: CoverageRules = CoverageRules()) -> pb.ReportReply:
    until = min(req.until_ms or now_ms, now_ms)
    since = req.since_ms
    if since >= until:
        raise ReportError(f"since ({since}) must be before until ({until}, the collector's now at the latest)")
    filters = dict(req.filters)
    pricing = billing.report_pricing(store, pricing, since, until)  # an imported bill's prices come first
    if req.report == "idle":
        rows = idle_rows(store, pricing, since, until, req.by or "host", filters, now_ms, rules)
    elif req.report == "cost":
        rows = cost_rows(store, pricing, since, until, req.by or "team", filters, now_ms, rules)
    elif req.report == "focus":
        from gpuledger.collector.export import focus_rows, focus_table

        rows = focus_table(focus_rows(store, pricing, since, until, req.by or "day", now_ms, rules))
    elif req.report == "heatmap":
        from gpuledger.collector.heatmap import heatmap_table

        rows = heatmap_table(store, since, until, req.by or "gpu", filters, now_ms, rules)
    elif req.report == "baseline":
        from gpuledger.collector.baseline import baseline_table

        rows = baseline_table(store, pricing, since, until, filters, now_ms, rules)
    elif req.report in WORKFLOW_REPORTS:
        rows = _workflow_report(store, pricing, req.report, since, until, filters, now_ms, rules)
    else:
        raise ReportError(f"report: unknown report {req.report!r} (idle, cost, focus, heatmap, baseline, "
                          f"{', '.join(WORKFLOW_REPORTS)})")
    table = rows if isinstance(rows, pa.Table) else (pa.Table.from_pylist(rows) if rows else pa.table({}))
    currencies = sorted({c for c in (table.column("currency").to_pylist() if "currency" in table.column_names
                                     else []) if c})
    return pb.ReportReply(arrow=to_ipc(table), currency=",".join(currencies) or "USD",
                          pricing_source="; ".join(dict.fromkeys(pricing.sources)), since_ms=since, until_ms=until)


WORKFLOW_REPORTS = ("endpoints", "inference_model", "runs", "estimate", "alerts")


def _workflow_report(store: Store, pricing: Pricing, report: str, since: int, until: int, filters: dict,
                     now_ms: int, rules: CoverageRules):
    """Endpoints, runs, estimates and alerts (endpoints.py, runs.py, estimate.py, alerting.py); their
    input errors become ReportError (INVALID_ARGUMENT)."""
    from gpuledger.collector import alerting, endpoints, estimate, runs

    try:
        if report == "endpoints":
            return endpoints.endpoint_rows(store, pricing, since, until, filters, now_ms, rules)
        if report == "inference_model":
            return endpoints.inference_model(store, pricing, since, until, filters, now_ms, rules)
        if report == "runs":
            return runs.run_rows(store, pricing, since, until, filters, now_ms, rules)
        if report == "estimate":
            return estimate.estimate_rows(store, pricing, since, until, filters, now_ms, rules)
        return alerting.alert_rows(store, since, until, filters, now_ms)
    except (endpoints.EndpointError, estimate.EstimateError) as e:
        raise ReportError(str(e)) from e


def _periods(pricing: Pricing, since: int, until: int, grid_step: int = 0) -> Periods:
    return Periods(since, until, since // grid_step * grid_step if grid_step else 0, grid_step,
                   price_breakpoints(pricing, since, until))


# ----------------------------------------------------------------------------- idle


def _now(now_ms: int | None) -> int:
    import time

    return int(time.time() * 1000) if now_ms is None else now_ms


def idle_rows(store: Store, pricing: Pricing, since: int, until: int, by: str, filters: dict,
              now_ms: int | None = None, rules: CoverageRules = CoverageRules()) -> list[dict]:
    """Idle waste per host (or GPU), most expensive first, with each host's state (live, stopped since T,
    silent since T, retired)."""
    now_ms = _now(now_ms)
    if by not in ("host", "gpu"):
        raise ReportError(f"by: {by!r} is not host or gpu")
    host_filter = filters.get("host", "")
    periods = _periods(pricing, since, until)
    hosts = allocation.load_hosts(store)
    prices = allocation.Prices(pricing, hosts, allocation.load_shares(store), periods)
    t, status = allocation.gpu_period_table(store, periods, now_ms, rules, host_filter)
    acc: dict[tuple, tuple[HostRecord, str | None, StateTally]] = {}
    cols = [t.column(n).to_pylist() for n in ("host_id", "gpu_uuid", "seg", "active", "idle_held", "idle_free",
                                              "unmonitored")]
    for host_id, uuid, seg, active, held, free, unmon in zip(*cols, strict=True):
        key = (host_id,) if by == "host" else (host_id, uuid)
        if key not in acc:
            acc[key] = (prices.host(host_id), uuid if by == "gpu" else None, StateTally())
        tally = acc[key][2]
        tally.add(prices(host_id, uuid, seg), allocation.StateMs(active, held, free, unmon))
        tally.gpus.add(uuid)
    dropped = _dropped(store, host_filter)
    out = []
    for (host_id, *_), (h, uuid, tally) in acc.items():
        row = {"host": host_id}
        if uuid is not None:
            row["gpu_uuid"] = uuid
        st = status.get(host_id)
        row.update({"provider": h.provider, "region": h.region, "instance_type": h.instance_type,
                    "gpus": len(tally.gpus), "state": st.state if st else "unknown",
                    "state_since_ms": st.since_ms if st else None, "dropped_windows": dropped.get(host_id, 0)})
        row.update(tally.fields("price_method"))
        out.append(row)
    out.sort(key=lambda r: (-(r["idle_cost"] or 0), r["host"], r.get("gpu_uuid", "")))
    return out


def _dropped(store: Store, host_filter: str = "") -> dict[str, int]:
    where = "WHERE host_id = {host:String}" if host_filter else ""
    rows = store.report_rows(f"SELECT host_id, max(dropped_windows) FROM {store.db}.sessions {where} "
                             "GROUP BY host_id", {"host": host_filter})
    return {r[0]: int(r[1]) for r in rows}


# ----------------------------------------------------------------------------- cost by tag


def label_for(by: str) -> tuple[str, dict, callable]:
    """(SQL label of a process, its parameters, the label of what no process accounts for on a host)."""
    if by != "host" and by != "process" and not TAG_KEY.match(by):
        raise ReportError(f"by: {by!r} is not a tag key")
    keys = list(TAG_ALIASES.get(by, (by,)))
    if by == "process":
        return "concat(toString(a.pid), ':', p.command)", {}, lambda h: "(no process)"
    if by == "host":
        return "a.host_id", {}, lambda h: h.host_id
    return ("arrayFirst(x -> x != '', arrayMap(k -> p.tags[k], {keys:Array(String)}))", {"keys": keys},
            lambda h: next((h.tags[k] for k in keys if h.tags.get(k)), "(unattributed)"))


def cost_rows(store: Store, pricing: Pricing, since: int, until: int, by: str, filters: dict,
              now_ms: int | None = None, rules: CoverageRules = CoverageRules()) -> list[dict]:
    """Cost by a process tag (team, project, ...), `host` or `process`.

    Active time of a GPU window is split among its processes by busy share (held share if no
    process reported utilization), idle-held time by held share; idle-free and unmonitored
    time, and GPU time no process reading covers, go to the host's owner tag of the same key.
    """
    now_ms = _now(now_ms)
    label_sql, params, owner = label_for(by)
    acc = allocation.allocate(store, pricing, _periods(pricing, since, until), now_ms, rules, label_sql, params,
                              owner, host_filter=filters.get("host", ""))
    merged: dict[str, StateTally] = {}
    for lbl, tally in acc.items():  # a process without the tag and a host without it: one row
        key = lbl or "(untagged)"
        merged[key] = merged[key].merge(tally) if key in merged else tally
    rows = [{by: lbl, **tally.fields("allocation")} for lbl, tally in merged.items()]
    rows.sort(key=lambda x: (-(x["cost"] or 0), str(x[by])))
    return billing.spend_columns(store, rows, by, since, until)  # API and unwatched GPU spend beside


def focus_rows(store: Store, pricing: Pricing, since: int, until: int, granularity: str = "day",
               now_ms: int | None = None, rules: CoverageRules = CoverageRules()) -> list[dict]:
    from gpuledger.collector import export

    return export.focus_rows(store, pricing, since, until, granularity, _now(now_ms), rules)


# ----------------------------------------------------------------------------- operator actions


def retire(store: Store, host_id: str, at_ms: int, note: str, now_ms: int,
           rules: CoverageRules = CoverageRules()) -> tuple[int, str]:
    """Record that a host is gone from `at_ms`; returns (at_ms, the host's state now)."""
    if not host_id or len(host_id) > 128:
        raise ReportError("host_id: required, at most 128 characters")
    known = store.query_rows(f"SELECT count() FROM {store.db}.sessions WHERE host_id = {{h:String}}",
                             {"h": host_id})[0][0]
    if not known:
        raise ReportError(f"host_id: {host_id[:80]!r} has never reported to this collector")
    if at_ms > now_ms:
        raise ReportError(f"at: {at_ms} is in the future")
    store.insert_table("host_events", pa.table({
        "host_id": pa.array([host_id]), "kind": pa.array(["retire"]), "at_ms": pa.array([at_ms], pa.int64()),
        "recorded_ms": pa.array([now_ms], pa.int64()), "note": pa.array([note[:500]])}))
    _, status = coverage.expectations(store, at_ms, now_ms + 1, now_ms, rules, host_filter=host_id)
    st = status.get(host_id)
    if st is None:
        return at_ms, "unknown"
    from datetime import UTC, datetime

    since = datetime.fromtimestamp(st.since_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return at_ms, st.state if st.state == "live" else f"{st.state} since {since}"
