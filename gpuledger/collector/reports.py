"""Reports: SQL over the store, priced at query time, returned as Arrow tables.

Every query is parameterised ({name:Type} placeholders bound by ClickHouse): host names and
tag values are data, never SQL.

Time a GPU is expected to be watched: from its first window (or `since`) to the end of the
newest window of the whole fleet (or `until`). Windows inside that span that never arrived
(agent down, host unreachable) count as unmonitored, never as idle.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from datetime import UTC, datetime

import pyarrow as pa

from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store
from gpuledger.schema import to_ipc
from gpuledger.v1 import telemetry_pb2 as pb

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


def run(store: Store, pricing: Pricing, req: pb.ReportRequest, now_ms: int) -> pb.ReportReply:
    until = req.until_ms or now_ms
    since = req.since_ms
    if since >= until:
        raise ReportError(f"since ({since}) must be before until ({until})")
    if req.report == "idle":
        rows = idle_rows(store, pricing, since, until, req.by or "host", dict(req.filters))
    elif req.report == "cost":
        rows = cost_rows(store, pricing, since, until, req.by or "team", dict(req.filters))
    elif req.report == "focus":
        rows = focus_rows(store, pricing, since, until, req.by or "day")
    else:
        raise ReportError(f"report: unknown report {req.report!r} (idle, cost, focus)")
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    currencies = sorted({r["currency"] for r in rows if r.get("currency")})
    return pb.ReportReply(arrow=to_ipc(table), currency=",".join(currencies) or "USD",
                          pricing_source="; ".join(dict.fromkeys(pricing.sources)), since_ms=since, until_ms=until)


# ----------------------------------------------------------------------------- building blocks


def _hosts(store: Store) -> dict[str, dict]:
    rows = store.query_rows(
        f"SELECT host_id, provider, region, instance_type, gpu_count, tags FROM {store.db}.hosts FINAL")
    return {r[0]: {"provider": r[1], "region": r[2], "instance_type": r[3], "gpu_count": int(r[4]),
                   "tags": dict(r[5])} for r in rows}


def _shares(store: Store) -> dict[tuple[str, str], float]:
    """Fraction of a physical GPU each device is priced as (MIG instances < 1)."""
    rows = store.query_rows(f"SELECT host_id, uuid, argMax(share, first_window_ms) FROM {store.db}.gpus "
                            "GROUP BY host_id, uuid")
    return {(h, u): float(sh) for h, u, sh in rows if sh and sh != 1.0}


def _scaled(price, share: float):
    if price is None or share == 1.0:
        return price
    return dataclasses.replace(price, per_gpu_hour=price.per_gpu_hour * share, method=price.method + "*mig_share")


def _breakpoints(pricing: Pricing, since: int, until: int) -> list[int]:
    return sorted({b for b in pricing.breakpoints() if since < b < until})


def _seg_price(pricing: Pricing, host_id: str, h: dict, bps: list[int], seg: int, since: int):
    at = bps[seg - 1] if seg > 0 else since
    return pricing.price(h["provider"], h["region"], h["instance_type"], h["gpu_count"], host_id, at)


def gpu_state_rows(store: Store, since: int, until: int, bps: list[int], host_filter: str = ""):
    """Per (host, GPU, price segment): summed state milliseconds."""
    where = "window_start_ms >= {since:Int64} AND window_start_ms < {until:Int64}"
    params = {"since": since, "until": until, "bps": bps}
    if host_filter:
        where += " AND host_id = {host:String}"
        params["host"] = host_filter
    return store.query_rows(
        f"""SELECT host_id, gpu_uuid, arrayCount(x -> x <= window_start_ms, {{bps:Array(Int64)}}) AS seg,
                   sum(busy_ms), sum(idle_held_ms), sum(idle_free_ms), sum(unmonitored_ms), sum(window_ms),
                   max(window_start_ms + window_ms), max(window_ms)
            FROM {store.db}.gpu_windows FINAL WHERE {where}
            GROUP BY host_id, gpu_uuid, seg""", params)


RETIRE_AFTER_MS = 7 * 86_400_000  # a host silent this long before a report's start is retired, not down
DEFAULT_WINDOW_MS = 10_000


@dataclasses.dataclass
class _Coverage:
    """What one GPU's stored windows cover in a report's range."""

    seen: dict = dataclasses.field(default_factory=lambda: defaultdict(int))  # price segment -> window ms
    last_end: int = 0
    window_ms: int = DEFAULT_WINDOW_MS


def _ceil(t: int, w: int) -> int:
    return -(-t // w) * w


def _missing_ms(store: Store, since: int, until: int, bps: list[int], cover: dict, fleet_end: int,
                host_filter: str = "") -> dict[tuple[str, str, int], int]:
    """Per (host, GPU, price segment): time the GPU should have been watched minus what its windows
    cover. That is unmonitored time, never idle.

    A GPU is expected from its first window (as the agent reports it, so windows lost before the
    first stored one count) or the range's first whole window, until:
    - the end of the fleet's newest window in range, if it reported as late as its host did (its
      host went silent: agent down, host unreachable);
    - its own last window, if its host kept reporting without it (replaced, MIG reshaped);
    - never, if its host sent nothing in range and nothing for RETIRE_AFTER_MS before (retired).
    Windows are selected by start in [since, until), so the range is taken in whole windows.
    """
    host_last: dict[str, int] = {}
    for (host_id, _), c in cover.items():
        host_last[host_id] = max(host_last.get(host_id, 0), c.last_end)
    gpus = store.query_rows(f"SELECT host_id, uuid, min(first_window_ms) FROM {store.db}.gpus GROUP BY host_id, uuid")
    silent = sorted({h for h, _, _ in gpus if h not in host_last and (not host_filter or h == host_filter)})
    recent: set[tuple[str, str]] = set()  # GPUs of silent hosts that were there when the host went quiet
    if silent:
        last: dict[str, list] = defaultdict(list)
        for h, u, end in store.query_rows(
                f"SELECT host_id, gpu_uuid, max(window_start_ms + window_ms) FROM {store.db}.gpu_windows "
                "WHERE host_id IN {hosts:Array(String)} AND window_start_ms >= {horizon:Int64} "
                "AND window_start_ms < {since:Int64} GROUP BY host_id, gpu_uuid",
                {"hosts": silent, "horizon": since - RETIRE_AFTER_MS, "since": since}):
            last[h].append((int(end), u))
        for h, ends in last.items():
            newest = max(e for e, _ in ends)
            recent.update((h, u) for e, u in ends if e == newest)
    out: dict[tuple[str, str, int], int] = {}
    for host_id, uuid, first in gpus:
        if host_filter and host_id != host_filter:
            continue
        c = cover.get((host_id, uuid))
        w = c.window_ms if c else DEFAULT_WINDOW_MS
        start = max(int(first), _ceil(since, w))
        if c is not None:
            end = fleet_end if c.last_end >= host_last[host_id] else c.last_end
        elif host_id in host_last or (host_id, uuid) not in recent:
            continue
        else:
            end = fleet_end
        end = min(end, _ceil(until, w))
        if end <= start:
            continue
        # a window is counted in the price period it starts in: split expected time where windows do
        inner = sorted({_ceil(b, w) for b in bps} - {start, end})
        edges = [start] + [b for b in inner if start < b < end] + [end]
        for a, b in zip(edges, edges[1:], strict=False):
            seg = sum(1 for x in bps if x <= a)
            missing = (b - a) - (c.seen.get(seg, 0) if c else 0)
            if missing > 0:
                out[(host_id, uuid, seg)] = missing
    return out


def _coverage(rows) -> tuple[dict, int]:
    cover: dict[tuple[str, str], _Coverage] = {}
    fleet_end = 0
    for host_id, uuid, seg, _b, _h, _f, _u, win, last_end, win_ms in rows:
        c = cover.setdefault((host_id, uuid), _Coverage())
        c.seen[int(seg)] += int(win)
        c.last_end = max(c.last_end, int(last_end))
        c.window_ms = int(win_ms) or DEFAULT_WINDOW_MS
        fleet_end = max(fleet_end, int(last_end))
    return cover, fleet_end


def _fleet_end(store: Store, since: int, until: int) -> int:
    r = store.query_rows(f"SELECT max(window_start_ms + window_ms) FROM {store.db}.gpu_windows "
                         "WHERE window_start_ms >= {since:Int64} AND window_start_ms < {until:Int64}",
                         {"since": since, "until": until})
    return int(r[0][0] or 0)


def _dropped(store: Store) -> dict[str, int]:
    rows = store.query_rows(f"SELECT host_id, max(dropped_windows) FROM {store.db}.agent_batches GROUP BY host_id")
    return {r[0]: int(r[1]) for r in rows}


# ----------------------------------------------------------------------------- idle


def idle_rows(store: Store, pricing: Pricing, since: int, until: int, by: str, filters: dict) -> list[dict]:
    if by not in ("host", "gpu"):
        raise ReportError(f"by: {by!r} is not host or gpu")
    hosts = _hosts(store)
    shares = _shares(store)
    bps = _breakpoints(pricing, since, until)
    acc: dict[tuple, dict] = {}
    host_filter = filters.get("host", "")
    blank = {"provider": "", "region": "", "instance_type": "", "gpu_count": 0, "tags": {}}
    rows = gpu_state_rows(store, since, until, bps, host_filter)
    cover, fleet_end = _coverage(rows)
    if host_filter:  # the fleet's end, not just this host's
        fleet_end = max(fleet_end, _fleet_end(store, since, until))
    missing = _missing_ms(store, since, until, bps, cover, fleet_end, host_filter)
    parts = [(host_id, uuid, seg, busy, held, free, unmon) for host_id, uuid, seg, busy, held, free, unmon, *_ in rows]
    parts += [(host_id, uuid, seg, 0, 0, 0, ms) for (host_id, uuid, seg), ms in missing.items()]
    for host_id, uuid, seg, busy, held, free, unmon in parts:
        h = hosts.get(host_id, blank)
        price = _scaled(_seg_price(pricing, host_id, h, bps, int(seg), since), shares.get((host_id, uuid), 1.0))
        key = (host_id,) if by == "host" else (host_id, uuid)
        row = acc.setdefault(key, _new_row(host_id, h, uuid if by == "gpu" else None))
        row["_gpus"].add(uuid)
        _add_ms(row, busy, held, free, unmon, price)
    dropped = _dropped(store)
    out = []
    for row in acc.values():
        row["gpus"] = len(row.pop("_gpus"))
        row["dropped_windows"] = dropped.get(row["host"], 0)
        out.append(_finish(row))
    out.sort(key=lambda r: (-(r["idle_cost"] or 0), r["host"]))
    return out


@dataclasses.dataclass
class _Tally:
    """GPU-milliseconds by state (active, idle-held, idle-free, unmonitored) and their cost."""

    ms: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    cost: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    priced: bool = True
    currency: set = dataclasses.field(default_factory=set)
    method: set = dataclasses.field(default_factory=set)

    def add(self, price, active, held, free, unmon, via: str = "") -> None:
        vals = (float(active), float(held), float(free), float(unmon))
        for i, v in enumerate(vals):
            self.ms[i] += v
        if price is None:
            self.priced = False
            return
        rate = price.per_gpu_hour / MS_PER_HOUR
        for i, v in enumerate(vals):
            self.cost[i] += v * rate
        self.currency.add(price.currency)
        self.method.add(f"{price.method} via {via}" if via else price.method)

    def fields(self, method_key: str) -> dict:
        busy, held, free, unmon = self.ms
        c_busy, c_held, c_free, c_unmon = self.cost
        monitored = busy + held + free
        total = sum(self.cost)
        p = self.priced
        return {
            "gpu_hours": (monitored + unmon) / MS_PER_HOUR,
            "monitored_gpu_hours": monitored / MS_PER_HOUR,
            "active_hours": busy / MS_PER_HOUR,
            "idle_held_hours": held / MS_PER_HOUR,
            "idle_free_hours": free / MS_PER_HOUR,
            "unmonitored_hours": unmon / MS_PER_HOUR,
            "mean_util_pct": 100.0 * busy / monitored if monitored else None,
            "cost": total if p else None,
            "active_cost": c_busy if p else None,
            "idle_cost": c_held + c_free if p else None,
            "idle_held_cost": c_held if p else None,
            "idle_free_cost": c_free if p else None,
            "unmonitored_cost": c_unmon if p else None,
            "idle_share": ((c_held + c_free) / total if total else 0.0) if p else None,
            "currency": ",".join(sorted(self.currency)),
            method_key: ",".join(sorted(self.method)) or ("unpriced" if not p else ""),
        }


def _new_row(host_id: str, h: dict, uuid: str | None) -> dict:
    row = {"host": host_id}
    if uuid is not None:
        row["gpu_uuid"] = uuid
    row.update({"provider": h["provider"], "region": h["region"], "instance_type": h["instance_type"], "_gpus": set(),
                "_tally": _Tally()})
    return row


def _add_ms(row: dict, busy, held, free, unmon, price) -> None:
    row["_tally"].add(price, int(busy), int(held), int(free), int(unmon))


def _finish(row: dict) -> dict:
    row.update(row.pop("_tally").fields("price_method"))
    return row


# ----------------------------------------------------------------------------- cost by tag


def cost_rows(store: Store, pricing: Pricing, since: int, until: int, by: str, filters: dict) -> list[dict]:
    """Cost by a process tag (team, project, ...), `host` or `process`.

    Active time of a GPU window is split among its processes by busy share (held share if no
    process reported utilization), idle-held time by held share; idle-free and unmonitored
    time, and GPU time no process reading covers, go to the host's owner tag of the same key.
    """
    if by != "host" and by != "process" and not TAG_KEY.match(by):
        raise ReportError(f"by: {by!r} is not a tag key")
    keys = list(TAG_ALIASES.get(by, (by,)))
    if by == "process":
        label = "concat(toString(p.pid), ':', p.command)"
    elif by == "host":
        label = "pw.host_id"
    else:
        label = "arrayFirst(x -> x != '', arrayMap(k -> p.tags[k], {keys:Array(String)}))"

    def owner(host_id: str, h: dict) -> str:
        if by == "host":
            return host_id
        if by == "process":
            return "(no process)"
        return next((h["tags"][k] for k in keys if h["tags"].get(k)), "(unattributed)")

    acc = allocate(store, pricing, since, until, label, {"keys": keys}, owner)
    rows = [{by: lbl or "(untagged)", **tally.fields("allocation")} for lbl, tally in acc.items()]
    rows.sort(key=lambda x: (-(x["cost"] or 0), str(x[by])))
    return rows


def allocate(store: Store, pricing: Pricing, since: int, until: int, label_sql: str, label_params: dict,
             owner, split_at: list[int] | None = None) -> dict:
    """Split every GPU-millisecond of [since, until) among labels; returns {label: tally}, or with
    `split_at` (period boundaries) {(label, period index): tally}.

    `label_sql` labels a process window (an SQL expression over `pw` and its process `p`);
    `owner(host_id, host facts)` labels what no process accounts for on a host. Coverage (who
    reported until when) is taken over the whole range, then split, so a period in which nobody
    reported still carries its unmonitored time.
    """
    hosts = _hosts(store)
    shares = _shares(store)
    splits = sorted({x for x in (split_at or ()) if since < x < until})
    bps = sorted(set(_breakpoints(pricing, since, until)) | set(splits))

    def slot(label, seg: int):
        if split_at is None:
            return label
        seg_start = bps[seg - 1] if seg > 0 else since
        return (label, sum(1 for x in splits if x <= seg_start))

    params = {"since": since, "until": until, "bps": bps, **label_params}
    db = store.db
    attributed = store.query_rows(
        f"""WITH pw AS (
                SELECT host_id, gpu_uuid, window_start_ms, pid, proc_start_ms, held_ms, busy_ms,
                       sum(busy_ms) OVER w AS busy_total, sum(held_ms) OVER w AS held_total
                FROM {db}.proc_windows FINAL
                WHERE window_start_ms >= {{since:Int64}} AND window_start_ms < {{until:Int64}}
                WINDOW w AS (PARTITION BY host_id, gpu_uuid, window_start_ms))
            SELECT pw.host_id, pw.gpu_uuid, arrayCount(x -> x <= pw.window_start_ms, {{bps:Array(Int64)}}) AS seg,
                   {label_sql} AS label,
                   sum(g.busy_ms * if(busy_total > 0, pw.busy_ms / busy_total, pw.held_ms / held_total)) AS active,
                   sum(g.idle_held_ms * pw.held_ms / held_total) AS held
            FROM pw
            INNER JOIN (SELECT host_id, gpu_uuid, window_start_ms, busy_ms, idle_held_ms
                        FROM {db}.gpu_windows FINAL
                        WHERE window_start_ms >= {{since:Int64}} AND window_start_ms < {{until:Int64}}) AS g
                ON g.host_id = pw.host_id AND g.gpu_uuid = pw.gpu_uuid AND g.window_start_ms = pw.window_start_ms
            LEFT JOIN (SELECT host_id, pid, start_ms, command, tags FROM {db}.processes FINAL) AS p
                ON p.host_id = pw.host_id AND p.pid = pw.pid AND p.start_ms = pw.proc_start_ms
            WHERE held_total > 0
            GROUP BY pw.host_id, pw.gpu_uuid, seg, label""", params)
    acc: dict[str, _Tally] = {}
    host_att: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    blank = {"provider": "", "region": "", "instance_type": "", "gpu_count": 0, "tags": {}}
    for host_id, uuid, seg, label, active, held in attributed:
        h = hosts.get(host_id, blank)
        price = _scaled(_seg_price(pricing, host_id, h, bps, int(seg), since), shares.get((host_id, uuid), 1.0))
        _cost_add(acc, slot(label, int(seg)), "process", price, active, held, 0, 0)
        host_att[(host_id, uuid, int(seg))][0] += active
        host_att[(host_id, uuid, int(seg))][1] += held
    # the rest of every host's time goes to the host's owner
    rows = gpu_state_rows(store, since, until, bps)
    cover, fleet_end = _coverage(rows)
    per_gpu_seg: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for host_id, uuid, seg, busy, held, free, unmon, *_ in rows:
        v = per_gpu_seg[(host_id, uuid, int(seg))]
        for i, x in enumerate((busy, held, free, unmon)):
            v[i] += int(x)
    for key, ms in _missing_ms(store, since, until, bps, cover, fleet_end).items():
        per_gpu_seg[key][3] += ms
    for (host_id, uuid, seg), (busy, held, free, unmon) in per_gpu_seg.items():
        h = hosts.get(host_id, blank)
        price = _scaled(_seg_price(pricing, host_id, h, bps, seg, since), shares.get((host_id, uuid), 1.0))
        att = host_att.get((host_id, uuid, seg), [0.0, 0.0])
        _cost_add(acc, slot(owner(host_id, h), seg), "host", price, max(0.0, busy - att[0]),
                  max(0.0, held - att[1]), free, unmon)
    return acc


def _cost_add(acc, label, via, price, active, held, free, unmon) -> None:
    acc.setdefault(label, _Tally()).add(price, active, held, free, unmon, via)


# ----------------------------------------------------------------------------- FOCUS export

FOCUS_VERSION = "1.2"
GRANULARITY_MS = {"hour": 3_600_000, "day": 86_400_000}
STATES = ("active", "idle_held", "idle_free", "unmonitored")
_SEP = "\x1f"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month_bounds(ms: int) -> tuple[int, int]:
    d = datetime.fromtimestamp(ms / 1000, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def focus_rows(store: Store, pricing: Pricing, since: int, until: int, granularity: str = "day") -> list[dict]:
    """Cost and usage rows aligned with the FinOps FOCUS specification (version FOCUS_VERSION).

    One row per charge period (hour or day, UTC), host, tag set and GPU state, allocated as in
    `cost_rows`: Tags are the host's owner tags overlaid with the process's allowlisted tags.
    gpuledger issues no invoice: BilledCost, EffectiveCost, ListCost and ContractedCost all carry
    the cost at the catalog (or override) price, and x_PriceSource says which. Quantities are
    GPU-hours; x_GpuState is active, idle_held, idle_free or unmonitored.
    """
    step = GRANULARITY_MS.get(granularity)
    if step is None:
        raise ReportError(f"granularity: {granularity!r} is not hour or day")
    if (until - since) / step > 24 * 93:
        raise ReportError(f"range: at most {24 * 93} charge periods in one export; narrow since/until")
    hosts = _hosts(store)
    label = "concat(pw.host_id, '\\x1f', toJSONString(mapSort(p.tags)))"
    first = since // step * step
    bounds = list(range(first, until, step)) + [until]
    bounds[0] = since
    acc = allocate(store, pricing, since, until, label, {}, lambda host_id, h: f"{host_id}{_SEP}{{}}",
                   split_at=bounds[1:-1])
    out = []
    for (lbl, period), tally in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        a, b = bounds[period], bounds[period + 1]
        bill_start, bill_end = _month_bounds(a)
        host_id, _, tags_json = lbl.partition(_SEP)
        h = hosts.get(host_id, {"provider": "", "region": "", "instance_type": "", "tags": {}})
        tags = {**h["tags"], **json.loads(tags_json or "{}")}
        for i, state in enumerate(STATES):
            ms = tally.ms[i]
            if ms <= 0:
                continue
            hours = ms / MS_PER_HOUR
            cost = tally.cost[i] if tally.priced else None
            out.append({
                "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
                "BillingCurrency": ",".join(sorted(tally.currency)) or None,
                "BillingPeriodStart": _iso(bill_start), "BillingPeriodEnd": _iso(bill_end),
                "ChargePeriodStart": _iso(a), "ChargePeriodEnd": _iso(b),
                "ChargeCategory": "Usage", "ChargeClass": None, "ChargeFrequency": "Usage-Based",
                "ChargeDescription": f"GPU time, {state.replace('_', '-')}, on {h['instance_type'] or 'unknown'}",
                "ConsumedQuantity": hours, "ConsumedUnit": "GPU-Hours",
                "PricingQuantity": hours, "PricingUnit": "GPU-Hours",
                "ListUnitPrice": (cost / hours) if cost is not None and hours else None,
                "ProviderName": h["provider"] or None, "PublisherName": h["provider"] or None,
                "InvoiceIssuerName": h["provider"] or None,
                "RegionId": h["region"] or None, "RegionName": h["region"] or None,
                "ResourceId": host_id, "ResourceName": host_id, "ResourceType": "GPU host",
                "ServiceCategory": "AI and Machine Learning", "ServiceName": "GPU compute",
                "SkuId": h["instance_type"] or None,
                "Tags": json.dumps(tags, sort_keys=True, ensure_ascii=False),
                "x_GpuState": state,
                "x_AllocationMethod": ",".join(sorted(tally.method)) or "unpriced",
                "x_PriceSource": "; ".join(dict.fromkeys(pricing.sources)),
                "x_FocusVersion": FOCUS_VERSION,
            })
    return out
