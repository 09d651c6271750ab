"""Allocation: who pays for each GPU-second of a range, and at what price.

- Active time of a GPU window is split among its processes by busy share (held share when no
  process reported utilization), idle-held time by held share: computed once, at ingest
  (`proc_windows.active_attr_us / held_attr_us`), so a report only sums.
- What no process accounts for (active or held time of a window without process windows),
  idle-free and unmonitored time go to the host's owner.
- Unmonitored time is expected time (coverage.py) minus the time windows cover.
- A GPU-second costs its host's price for the period (the catalog, an override, or a per-GPU-hour
  price; a MIG instance its share of the GPU), looked up once per host and price segment.

Sums come from the hourly rollups where they are current and whole hours are asked for, and from
the raw windows elsewhere (the range's partial first and last hours, hours a price changes in,
host-hours not yet rolled up). The SQL returns one row per (host, GPU, period[, label]); Python
only prices those rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpuledger.collector import coverage
from gpuledger.collector.pricing import Price, Pricing
from gpuledger.collector.store import Store

HOUR_MS = 3_600_000
MS_PER_HOUR = 3_600_000.0
STATES = ("active", "idle_held", "idle_free", "unmonitored")


# ----------------------------------------------------------------------------- typed records


@dataclass(frozen=True)
class HostRecord:
    host_id: str
    provider: str = ""
    region: str = ""
    instance_type: str = ""
    gpu_count: int = 0
    tags: dict = field(default_factory=dict)
    instance_id: str = ""


def load_hosts(store: Store) -> dict[str, HostRecord]:
    rows = store.report_rows(f"SELECT host_id, provider, region, instance_type, gpu_count, tags, instance_id "
                             f"FROM {store.db}.hosts FINAL")
    return {r[0]: HostRecord(r[0], r[1], r[2], r[3], int(r[4]), dict(r[5]), r[6]) for r in rows}


def load_shares(store: Store) -> dict[tuple[str, str], float]:
    """Fraction of a physical GPU each device is priced as (MIG instances < 1)."""
    rows = store.report_rows(f"SELECT host_id, uuid, argMax(share, first_window_ms) FROM {store.db}.gpus "
                             "GROUP BY host_id, uuid")
    return {(h, u): float(sh) for h, u, sh in rows if sh and sh != 1.0}


@dataclass
class StateMs:
    """GPU-milliseconds by state."""

    active: float = 0.0
    idle_held: float = 0.0
    idle_free: float = 0.0
    unmonitored: float = 0.0

    def values(self) -> tuple[float, float, float, float]:
        return self.active, self.idle_held, self.idle_free, self.unmonitored

    @property
    def monitored(self) -> float:
        return self.active + self.idle_held + self.idle_free

    @property
    def total(self) -> float:
        return self.monitored + self.unmonitored


@dataclass
class StateTally:
    """GPU-milliseconds by state and their cost."""

    ms: StateMs = field(default_factory=StateMs)
    cost: StateMs = field(default_factory=StateMs)
    priced: bool = True
    currency: set = field(default_factory=set)
    method: set = field(default_factory=set)
    gpus: set = field(default_factory=set)

    def add(self, price: Price | None, ms: StateMs, via: str = "") -> None:
        for name in STATES:
            setattr(self.ms, name, getattr(self.ms, name) + getattr(ms, name))
        if price is None:
            self.priced = False
            return
        rate = price.per_gpu_hour / MS_PER_HOUR
        for name in STATES:
            setattr(self.cost, name, getattr(self.cost, name) + getattr(ms, name) * rate)
        self.currency.add(price.currency)
        self.method.add(f"{price.method} via {via}" if via else price.method)

    def merge(self, other: StateTally) -> StateTally:
        for name in STATES:
            setattr(self.ms, name, getattr(self.ms, name) + getattr(other.ms, name))
            setattr(self.cost, name, getattr(self.cost, name) + getattr(other.cost, name))
        self.priced = self.priced and other.priced
        self.currency |= other.currency
        self.method |= other.method
        self.gpus |= other.gpus
        return self

    def fields(self, method_key: str) -> dict:
        m, c, p = self.ms, self.cost, self.priced
        total = sum(c.values())
        idle = c.idle_held + c.idle_free
        return {
            "gpu_hours": m.total / MS_PER_HOUR,
            "monitored_gpu_hours": m.monitored / MS_PER_HOUR,
            "active_hours": m.active / MS_PER_HOUR,
            "idle_held_hours": m.idle_held / MS_PER_HOUR,
            "idle_free_hours": m.idle_free / MS_PER_HOUR,
            "unmonitored_hours": m.unmonitored / MS_PER_HOUR,
            "mean_util_pct": 100.0 * m.active / m.monitored if m.monitored else None,
            "cost": total if p else None,
            "active_cost": c.active if p else None,
            "idle_cost": idle if p else None,
            "idle_held_cost": c.idle_held if p else None,
            "idle_free_cost": c.idle_free if p else None,
            "unmonitored_cost": c.unmonitored if p else None,
            "idle_share": ((idle / total) if total else 0.0) if p else None,
            "currency": ",".join(sorted(self.currency)),
            method_key: ",".join(sorted(self.method)) or ("unpriced" if not p else ""),
        }


# ----------------------------------------------------------------------------- periods and prices


@dataclass(frozen=True)
class Periods:
    """How a range is cut: an optional regular grid (FOCUS charge periods) crossed with price segments.

    A period is keyed (grid index, segment index); windows belong to the period their start falls in."""

    since: int
    until: int
    grid_start: int = 0  # first grid edge (<= since)
    grid_step: int = 0  # 0: no grid (one period)
    breakpoints: tuple[int, ...] = ()  # price changes strictly inside the range

    def grid_edges(self) -> list[int]:
        if not self.grid_step:
            return []
        first = self.grid_start + self.grid_step
        return list(range(first, self.until, self.grid_step))

    def pieces(self) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Edges of the elementary pieces, and each piece's (grid index, segment index)."""
        edges = sorted({self.since, self.until, *self.breakpoints, *self.grid_edges()})
        keys = []
        for a in edges[:-1]:
            g = (a - self.grid_start) // self.grid_step if self.grid_step else 0
            keys.append((int(g), sum(1 for b in self.breakpoints if b <= a)))
        return np.asarray(edges, np.int64), keys

    def bounds(self, key: tuple[int, int]) -> tuple[int, int]:
        g, seg = key
        lo, hi = self.since, self.until
        if self.grid_step:
            lo = max(lo, self.grid_start + g * self.grid_step)
            hi = min(hi, self.grid_start + (g + 1) * self.grid_step)
        bps = (self.since, *self.breakpoints, self.until)
        return max(lo, bps[seg]), min(hi, bps[seg + 1])

    def sql_key(self, column: str) -> str:
        """SQL of a row's (grid index, segment index), from a start-time column."""
        g = f"intDiv({column} - {{grid_start:Int64}}, {{grid_step:Int64}})" if self.grid_step else "0"
        return f"{g} AS grid, arrayCount(x -> x <= {column}, {{bps:Array(Int64)}}) AS seg"

    def params(self) -> dict:
        return {"grid_start": self.grid_start, "grid_step": self.grid_step or 1, "bps": list(self.breakpoints)}


class Prices:
    """One price lookup per (host, segment, MIG share), shared by every report."""

    def __init__(self, pricing: Pricing, hosts: dict[str, HostRecord], shares: dict[tuple[str, str], float],
                 periods: Periods) -> None:
        self.pricing = pricing
        self.hosts = hosts
        self.shares = shares
        self.periods = periods
        self._cache: dict[tuple[str, int], Price | None] = {}

    def host(self, host_id: str) -> HostRecord:
        return self.hosts.get(host_id) or HostRecord(host_id)

    def __call__(self, host_id: str, gpu_uuid: str, seg: int) -> Price | None:
        key = (host_id, seg)
        if key not in self._cache:
            h = self.host(host_id)
            at = (self.periods.since, *self.periods.breakpoints)[seg]
            self._cache[key] = self.pricing.price(h.provider, h.region, h.instance_type, h.gpu_count, host_id, at,
                                                  tags=h.tags, instance_id=h.instance_id)
        price = self._cache[key]
        share = self.shares.get((host_id, gpu_uuid), 1.0)
        if price is None or share == 1.0:
            return price
        return dataclasses.replace(price, per_gpu_hour=price.per_gpu_hour * share, method=price.method + "*mig_share")


def price_breakpoints(pricing: Pricing, since: int, until: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in pricing.breakpoints() if since < b < until}))


# ----------------------------------------------------------------------------- sums: rollups + raw


def _stale_hours(store: Store, h0: int, h1: int, host_filter: str) -> list[tuple[str, int]]:
    """Host-hours in [h0, h1) whose rollup is missing or older than data that landed since."""
    if h1 <= h0:
        return []
    db = store.db
    host = "AND host_id = {host:String}" if host_filter else ""
    rows = store.report_rows(
        f"""SELECT m.host_id, m.hour_ms FROM
              (SELECT host_id, hour_ms, max(mark_us) AS m FROM {db}.rollup_marks
               WHERE hour_ms >= {{h0:Int64}} AND hour_ms < {{h1:Int64}} {host} GROUP BY host_id, hour_ms) AS m
            LEFT JOIN
              (SELECT host_id, hour_ms, max(built_us) AS b FROM {db}.rollup_built
               WHERE hour_ms >= {{h0:Int64}} AND hour_ms < {{h1:Int64}} {host} GROUP BY host_id, hour_ms) AS b
            ON m.host_id = b.host_id AND m.hour_ms = b.hour_ms
            WHERE m.m > b.b""", {"h0": h0, "h1": h1, "host": host_filter})
    return [(r[0], int(r[1])) for r in rows]


@dataclass
class _Plan:
    """Where each part of a range is read from."""

    h0: int  # rollups cover [h0, h1) except the host-hours and hours below
    h1: int
    stale: list[tuple[str, int]]
    raw_hours: list[int]  # hours read raw for every host (a price changes inside)
    raw_ranges: list[tuple[int, int]]  # time ranges read raw (for all hosts, or the stale ones)


def _plan(store: Store, periods: Periods, host_filter: str) -> _Plan:
    since, until = periods.since, periods.until
    h0 = -(-since // HOUR_MS) * HOUR_MS
    h1 = until // HOUR_MS * HOUR_MS
    raw_hours = sorted({b // HOUR_MS * HOUR_MS for b in periods.breakpoints if b % HOUR_MS})
    if periods.grid_step and (periods.grid_step % HOUR_MS or periods.grid_start % HOUR_MS):
        h0 = h1  # a grid finer than hours, or off the hour: all raw
    stale = _stale_hours(store, h0, h1, host_filter) if h1 > h0 else []
    hours = sorted({h for _, h in stale} | set(raw_hours))
    ranges = []
    if h1 <= h0:
        ranges.append((since, until))
    else:
        if since < h0:
            ranges.append((since, h0))
        for h in hours:
            if h0 <= h < h1:
                if ranges and ranges[-1][1] == h:
                    ranges[-1] = (ranges[-1][0], h + HOUR_MS)
                else:
                    ranges.append((h, h + HOUR_MS))
        if h1 < until:
            if ranges and ranges[-1][1] == h1:
                ranges[-1] = (ranges[-1][0], until)
            else:
                ranges.append((h1, until))
    return _Plan(h0, max(h0, h1), stale, raw_hours, ranges)


def _raw_filter(plan: _Plan, column: str = "window_start_ms") -> str:
    """Raw rows to read: inside the raw ranges and, within the rollups' span, only the stale host-hours or
    the price-change hours."""
    if not plan.raw_ranges:
        return "0"
    ranges = " OR ".join(f"({column} >= {a} AND {column} < {b})" for a, b in plan.raw_ranges)
    hour = f"intDiv({column}, {HOUR_MS}) * {HOUR_MS}"
    keep = (f"{column} < {plan.h0} OR {column} >= {plan.h1} OR has({{raw_hours:Array(Int64)}}, {hour}) "
            f"OR (host_id, {hour}) IN (SELECT arrayJoin({{stale:Array(Tuple(String, Int64))}}))")
    return f"({ranges}) AND ({keep})"


def _rollup_filter(plan: _Plan) -> str:
    if plan.h1 <= plan.h0:
        return "0"
    return (f"hour_ms >= {plan.h0} AND hour_ms < {plan.h1} AND NOT has({{raw_hours:Array(Int64)}}, hour_ms) "
            "AND (host_id, hour_ms) NOT IN (SELECT arrayJoin({stale:Array(Tuple(String, Int64))}))")


def _params(plan: _Plan, periods: Periods, host_filter: str, **extra) -> dict:
    return {**periods.params(), "raw_hours": plan.raw_hours, "stale": plan.stale, "host": host_filter, **extra}


@dataclass
class ReadPlan:
    """Which part of [since, until) a reader takes from rollups and which from the raw tables (`rollup` and
    `raw` are SQL conditions on a rollup's hour_ms and a raw table's window_start_ms; `params` binds them)."""

    rollup: str
    raw: str
    params: dict


def read_plan(store: Store, since: int, until: int, use_rollups: bool = True) -> ReadPlan:
    """The plan of rollups and raw windows for an ungridded range with no price cut (endpoint_use's readers);
    without `use_rollups` everything is read raw."""
    if use_rollups:
        plan = _plan(store, Periods(since, until), "")
    else:
        plan = _Plan(since, since, [], [], [(since, until)] if until > since else [])
    return ReadPlan(_rollup_filter(plan), _raw_filter(plan), {"raw_hours": plan.raw_hours, "stale": plan.stale})


def state_sums(store: Store, periods: Periods, host_filter: str = "") -> list[tuple]:
    """(host, GPU, grid, seg, active ms, idle-held ms, idle-free ms) of the stored windows."""
    return store.report_rows(*_state_sql(store, periods, host_filter))


def state_table(store: Store, periods: Periods, host_filter: str = "") -> pa.Table:
    """state_sums as an Arrow table: host_id, gpu_uuid, grid, seg, active, idle_held, idle_free."""
    sql, params = _state_sql(store, periods, host_filter)
    return store.query_arrow(sql, params, store.report_settings())


def _state_sql(store: Store, periods: Periods, host_filter: str) -> tuple[str, dict]:
    plan = _plan(store, periods, host_filter)
    db = store.db
    host = " AND host_id = {host:String}" if host_filter else ""
    return (
        f"""SELECT host_id, gpu_uuid, grid, seg, sum(busy) AS active, sum(held) AS idle_held,
                   sum(free) AS idle_free FROM (
                SELECT host_id, gpu_uuid, {periods.sql_key('hour_ms')}, busy_ms AS busy, idle_held_ms AS held,
                       idle_free_ms AS free
                FROM {db}.gpu_hours FINAL WHERE {_rollup_filter(plan)}{host}
                UNION ALL
                SELECT host_id, gpu_uuid, {periods.sql_key('window_start_ms')}, busy_ms, idle_held_ms, idle_free_ms
                FROM {db}.gpu_windows FINAL WHERE {_raw_filter(plan)}{host})
            GROUP BY host_id, gpu_uuid, grid, seg""", _params(plan, periods, host_filter))


def attributed_sums(store: Store, periods: Periods, label_sql: str, label_params: dict,
                    host_filter: str = "") -> list[tuple]:
    """(host, GPU, grid, seg, label, active µs, idle-held µs) attributed to processes, labelled by `label_sql`
    (over the process `p`: p.pid, p.command, p.tags, and `a.host_id`), aggregated per process first."""
    plan = _plan(store, periods, host_filter)
    db = store.db
    host = " AND host_id = {host:String}" if host_filter else ""
    return store.report_rows(
        f"""SELECT a.host_id, a.gpu_uuid, a.grid, a.seg, {label_sql} AS label, sum(a.active), sum(a.held)
            FROM (
                SELECT host_id, gpu_uuid, grid, seg, pid, proc_start_ms, sum(active) AS active, sum(held) AS held
                FROM (
                    SELECT host_id, gpu_uuid, {periods.sql_key('hour_ms')}, pid, proc_start_ms,
                           active_attr_us AS active, held_attr_us AS held
                    FROM {db}.alloc_hours FINAL WHERE {_rollup_filter(plan)}{host}
                    UNION ALL
                    SELECT host_id, gpu_uuid, {periods.sql_key('window_start_ms')}, pid, proc_start_ms,
                           active_attr_us, held_attr_us
                    FROM {db}.proc_windows FINAL WHERE {_raw_filter(plan)}{host})
                GROUP BY host_id, gpu_uuid, grid, seg, pid, proc_start_ms) AS a
            LEFT JOIN (SELECT host_id, pid, start_ms, command, tags FROM {db}.processes FINAL) AS p
                ON p.host_id = a.host_id AND p.pid = a.pid AND p.start_ms = a.proc_start_ms
            GROUP BY a.host_id, a.gpu_uuid, a.grid, a.seg, label""",
        _params(plan, periods, host_filter, **label_params))


# ----------------------------------------------------------------------------- per GPU and period


def gpu_period_table(store: Store, periods: Periods, now_ms: int, rules: coverage.CoverageRules,
                     host_filter: str = "") -> tuple[pa.Table, dict[str, coverage.HostStatus]]:
    """Per (host, GPU, grid, seg), columnar: host_id, gpu_uuid, grid, seg and the ms of each state, unmonitored
    being expected minus covered (never < 0). Built with Arrow and numpy: a month of 1,000 GPUs by the hour is
    720,000 rows, never a Python object each."""
    sums = state_table(store, periods, host_filter)
    sums = pa.table({n: sums.column(n).cast(t) for n, t in (
        ("host_id", pa.string()), ("gpu_uuid", pa.string()), ("grid", pa.int64()), ("seg", pa.int64()),
        ("active", pa.float64()), ("idle_held", pa.float64()), ("idle_free", pa.float64()))})
    expected, status = coverage.expectations(store, periods.since, periods.until, now_ms, rules, host_filter)
    edges, keys = periods.pieces()
    grid_of = np.array([k[0] for k in keys], np.int64)
    seg_of = np.array([k[1] for k in keys], np.int64)
    gpu_keys, matrix = coverage.expected_matrix(expected, edges)
    gi, pi = np.nonzero(matrix)
    host_of = np.array([k[0] for k in gpu_keys], object)
    uuid_of = np.array([k[1] for k in gpu_keys], object)
    exp = pa.table({"host_id": pa.array(host_of[gi] if gi.size else np.zeros(0, object), pa.string()),
                    "gpu_uuid": pa.array(uuid_of[gi] if gi.size else np.zeros(0, object), pa.string()),
                    "grid": grid_of[pi], "seg": seg_of[pi], "expected": matrix[gi, pi].astype(np.float64)})
    joined = sums.join(exp, keys=["host_id", "gpu_uuid", "grid", "seg"], join_type="full outer")
    fill = {name: pc.fill_null(joined.column(name), 0.0) for name in ("active", "idle_held", "idle_free",
                                                                     "expected")}
    monitored = pc.add(pc.add(fill["active"], fill["idle_held"]), fill["idle_free"])
    unmonitored = pc.max_element_wise(pc.subtract(fill["expected"], monitored), 0.0)
    out = pa.table({"host_id": joined.column("host_id"), "gpu_uuid": joined.column("gpu_uuid"),
                    "grid": joined.column("grid"), "seg": joined.column("seg"), "active": fill["active"],
                    "idle_held": fill["idle_held"], "idle_free": fill["idle_free"], "unmonitored": unmonitored})
    return out, status


def allocate(store: Store, pricing: Pricing, periods: Periods, now_ms: int, rules: coverage.CoverageRules,
             label_sql: str, label_params: dict, owner, *, by_period: bool = False,
             host_filter: str = "") -> dict:
    """Split every GPU-millisecond of the range among labels: {label: StateTally}, or with `by_period`
    {(label, (grid, seg)): StateTally}. `owner(host: HostRecord) -> label` takes what no process accounts for."""
    hosts = load_hosts(store)
    prices = Prices(pricing, hosts, load_shares(store), periods)
    gpt, _status = gpu_period_table(store, periods, now_ms, rules, host_filter)
    acc: dict = {}

    def slot(label, key):
        return (label, key) if by_period else label

    attributed: dict[tuple, list[float]] = {}
    for host_id, uuid, g, seg, label, active_us, held_us in attributed_sums(store, periods, label_sql, label_params,
                                                                           host_filter):
        key = (int(g), int(seg))
        ms = StateMs(active=float(active_us) / 1000.0, idle_held=float(held_us) / 1000.0)
        tally = acc.setdefault(slot(label, key), StateTally())
        tally.add(prices(host_id, uuid, key[1]), ms, "process")
        tally.gpus.add((host_id, uuid))
        a = attributed.setdefault((host_id, uuid, *key), [0.0, 0.0])
        a[0] += ms.active
        a[1] += ms.idle_held
    cols = [gpt.column(n).to_pylist() for n in ("host_id", "gpu_uuid", "grid", "seg", "active", "idle_held",
                                                "idle_free", "unmonitored")]
    for host_id, uuid, g, seg, active, held, free, unmon in zip(*cols, strict=True):
        a = attributed.get((host_id, uuid, g, seg), (0.0, 0.0))
        rest = StateMs(max(0.0, active - a[0]), max(0.0, held - a[1]), free, unmon)
        if rest.total <= 0:
            continue
        tally = acc.setdefault(slot(owner(prices.host(host_id)), (g, seg)), StateTally())
        tally.add(prices(host_id, uuid, seg), rest, "host")
        tally.gpus.add((host_id, uuid))
    return acc
