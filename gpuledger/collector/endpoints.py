"""Inference endpoints: what each one costs for the traffic it serves, what a policy would save,
and what a target traffic would cost (`gpuledger endpoints`, `gpuledger inference-model`).

An endpoint is known by its name: the `name` of its [[agent.endpoints]] entry (its own request and
token counters, scraped into endpoint_windows) and the GPULEDGER_ENDPOINT of its server process
(its GPU time and cost). Give both the same name; either alone still reports what it can.

Per endpoint, over the range, on its window grid (10 s by default), each window is
- up: a process of the endpoint held a GPU, or its server answered a scrape;
- serving: requests completed in the window or were in flight at a scrape (counters), or, for an
  endpoint whose counters are not scraped, its GPUs were busy at least `active_threshold_pct` of
  the time they were held;
- unknown: up, but no good scrape covers the window (a scrape failed, the scraper was not
  configured then). Unknown time is neither serving nor idle, and no policy claims to save it.

Figures: up, serving and unknown hours (wall time); idle share = idle / up; requests and tokens
(counter increments, exact); GPU hours and cost exactly as `cost --by endpoint` splits them; cost
per 1,000 requests and per million tokens (prompt + generation).

Policies are replayed over the endpoint's own measured timeline, window by window:
- scale to zero after `idle_minutes` without serving (the first window of the range counts as just
  served: nothing is claimed before it); a window that serves while scaled down is a cold start
  (counted: each one made a request wait for the model to load); the saving is the GPU cost of the
  windows it would have been down;
- an office-hours schedule (days, local hours, time zone): the saving is the cost of its windows
  outside the schedule, and the traffic it would have turned away is counted too.
Why not the hourly rollups: whether a 15-minute idle gap exists depends on where in the hour the
requests fell, and an hour with one request is busy at hourly resolution. The replay therefore reads
the raw windows of the range: the endpoint_windows rows and the endpoint processes' proc_windows
(about 60,000 windows per endpoint and week). A window's cost is its GPU-milliseconds held times
its host's mean price per GPU-millisecond over the range (the price of `cost --by endpoint` for that
host and endpoint).

An endpoint is flagged `always_on_dev` when its phase (the processes' phase tag) is a development
or staging phase, it was up at least 90 % of the range, and it served at most
`flag_serving_hours` hours a day.

`inference-model` sizes a target traffic from the endpoint's demonstrated capacity: requests (or
tokens) per GPU-second in its busiest buckets of `bucket_minutes` (the top 5 % of fully scraped,
serving buckets). That is what the endpoint did serve, not necessarily the most it could: an endpoint
never pushed to saturation is sized conservatively.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow.compute as pc

from gpuledger.collector import allocation, rollup
from gpuledger.collector.allocation import MS_PER_HOUR, Periods, StateTally, price_breakpoints
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.store import Store

DEFAULT_WINDOW_MS = 10_000
DEV_PHASES = ("dev", "development", "staging", "stage", "test", "testing", "qa", "sandbox")
HOURS_PER_MONTH = 730.0
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class EndpointError(ValueError):
    pass


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Schedule:
    """Office hours: local [start_min, end_min) on `days` (0 = Monday) in time zone `tz`."""

    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    start_min: int = 8 * 60
    end_min: int = 18 * 60
    tz: str = "UTC"

    @classmethod
    def parse(cls, hours: str = "08:00-18:00", days: str = "mon-fri", tz: str = "UTC") -> Schedule:
        m = re.fullmatch(r"\s*(\d{1,2})(?::(\d{2}))?\s*-\s*(\d{1,2})(?::(\d{2}))?\s*", hours or "")
        if not m:
            raise EndpointError(f"office_hours: {hours!r} is not HH:MM-HH:MM (e.g. 08:00-18:00)")
        a = int(m.group(1)) * 60 + int(m.group(2) or 0)
        b = int(m.group(3)) * 60 + int(m.group(4) or 0)
        if not (0 <= a < b <= 24 * 60):
            raise EndpointError(f"office_hours: {hours!r} must start before it ends, within one day")
        picked: list[int] = []
        for part in (days or "").lower().replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            if lo not in _DAYS or (hi and hi not in _DAYS):
                raise EndpointError(f"office_days: {days!r}: use mon..sun, ranges (mon-fri) or lists (mon,wed)")
            i, j = _DAYS.index(lo), _DAYS.index(hi or lo)
            picked.extend(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        if not picked:
            raise EndpointError(f"office_days: {days!r} names no day")
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
        except Exception as e:  # ZoneInfoNotFoundError, ValueError on odd names
            raise EndpointError(f"timezone: {tz!r} is not a time zone name (e.g. UTC, Europe/Berlin)") from e
        return cls(tuple(sorted(set(picked))), a, b, tz)

    def inside(self, starts_ms: np.ndarray) -> np.ndarray:
        """Whether each instant lies inside the schedule (local time, daylight saving included)."""
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(self.tz)
        q = 900_000  # every UTC offset in use is a whole number of quarter hours
        buckets, inv = np.unique(np.asarray(starts_ms, np.int64) // q, return_inverse=True)
        ok = np.zeros(buckets.size, bool)
        for i, b in enumerate(buckets.tolist()):
            local = datetime.fromtimestamp(b * q / 1000, UTC).astimezone(zone)
            minute = local.hour * 60 + local.minute
            ok[i] = local.weekday() in self.days and self.start_min <= minute < self.end_min
        return ok[inv]

    def text(self) -> str:
        days = ",".join(_DAYS[d] for d in self.days)
        return f"{days} {self.start_min // 60:02d}:{self.start_min % 60:02d}-" \
               f"{self.end_min // 60:02d}:{self.end_min % 60:02d} {self.tz}"


@dataclass(frozen=True)
class Options:
    idle_minutes: float = 15.0  # scale-to-zero replay: down after this long without serving
    schedule: Schedule = Schedule()
    active_threshold_pct: float = 5.0  # serving without counters: GPU busy share of held time
    flag_serving_hours: float = 6.0  # always_on_dev: at most this many serving hours a day
    endpoint: str = ""  # only this endpoint

    @classmethod
    def from_filters(cls, f: dict) -> Options:
        def num(key: str, default: float, lo: float = 0.0, hi: float = math.inf) -> float:
            if key not in f or f[key] == "":
                return default
            try:
                v = float(f[key])
            except ValueError:
                raise EndpointError(f"{key}: {f[key]!r} is not a number") from None
            if not (lo <= v <= hi):
                raise EndpointError(f"{key}: {v:g} must be between {lo:g} and {hi:g}")
            return v

        sched = Schedule.parse(f.get("office_hours") or "08:00-18:00", f.get("office_days") or "mon-fri",
                               f.get("timezone") or "UTC")
        return cls(idle_minutes=num("idle_minutes", 15.0, 0.0, 7 * 24 * 60), schedule=sched,
                   active_threshold_pct=num("active_threshold_pct", 5.0, 0.0, 100.0),
                   flag_serving_hours=num("flag_serving_hours", 6.0, 0.0, 24.0), endpoint=f.get("endpoint", ""))


# ----------------------------------------------------------------------------- the timeline


@dataclass
class Timeline:
    """One endpoint's windows over a range (arrays aligned on `starts`)."""

    endpoint: str
    window_ms: int
    starts: np.ndarray  # window starts, ms, sorted
    up: np.ndarray
    known: np.ndarray  # a good scrape covers the window
    serving: np.ndarray
    requests: np.ndarray
    prompt_tokens: np.ndarray
    generation_tokens: np.ndarray
    held_ms: np.ndarray  # GPU-ms its processes held
    busy_ms: np.ndarray
    cost: np.ndarray  # GPU cost of the window's held time
    has_counters: bool
    server: str = ""
    phase: str = ""
    hosts: set = field(default_factory=set)
    scrape_errors: int = 0
    tally: StateTally | None = None  # cost --by endpoint figures

    @property
    def unknown(self) -> np.ndarray:
        return self.up & ~self.known if self.has_counters else np.zeros(self.starts.size, bool)

    @property
    def idle(self) -> np.ndarray:
        return self.up & ~self.serving & ~self.unknown

    def hours(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * self.window_ms / MS_PER_HOUR


def _periods(pricing: Pricing, since: int, until: int) -> Periods:
    return Periods(since, until, 0, 0, price_breakpoints(pricing, since, until))


def _endpoint_rows(store: Store, since: int, until: int, endpoint: str):
    where = " AND endpoint = {e:String}" if endpoint else ""
    return store.query_arrow(
        f"""SELECT endpoint, window_start_ms, max(window_ms) AS w, min(scraped_ms) AS scraped, sum(requests) AS r,
                   sum(prompt_tokens) AS p, sum(generation_tokens) AS g, max(running_max) AS run,
                   sum(scrape_errors) AS err, any(server) AS server, groupUniqArray(host_id) AS hosts
            FROM {store.db}.endpoint_windows FINAL
            WHERE window_start_ms >= {{since:Int64}} AND window_start_ms < {{until:Int64}}{where}
            GROUP BY endpoint, window_start_ms ORDER BY endpoint, window_start_ms""",
        {"since": since, "until": until, "e": endpoint}, store.report_settings())


def _held_rows(store: Store, since: int, until: int, endpoint: str, rates: dict[tuple[str, str], float]):
    """Per (endpoint, window): held and busy ms of its processes and their cost (held ms x the rate of the
    (endpoint, host) pair), and each endpoint's hosts. Sealed hours come from the endpoint_use rollup (one
    row per endpoint, host and window, no join); the hours not sealed yet and the range's ragged ends from
    the raw process windows of the endpoint's processes. One row per endpoint and window reaches Python."""
    plan = allocation.read_plan(store, since, until)
    db = store.db
    ep_where = " AND tags['endpoint'] = {e:String}" if endpoint else ""
    use_where = " AND endpoint = {e:String}" if endpoint else ""
    eps = rollup.ENDPOINT_PROCS.format(db=db, where=ep_where)  # the processes the rollup sums, by the same rule
    procs = f"SELECT host_id, pid, start_ms FROM {eps}"
    raw = f"""SELECT host_id, pid, proc_start_ms, window_start_ms, held_ms, busy_ms
              FROM {db}.proc_windows FINAL
              WHERE window_start_ms >= {{since:Int64}} AND window_start_ms < {{until:Int64}} AND {plan.raw}
                AND (host_id, pid, proc_start_ms) IN ({procs})"""
    params = {"since": since, "until": until, "e": endpoint, **plan.params,
              "rate_keys": [f"{ep}\t{host}" for ep, host in rates],
              "rate_values": [float(r) for r in rates.values()]}
    rows = store.query_arrow(
        f"""SELECT ep, start, sum(h) AS held, sum(b) AS busy,
                   sum(h * transform(concat(ep, '\t', host_id), {{rate_keys:Array(String)}},
                                        {{rate_values:Array(Float64)}}, 0.)) AS cost
            FROM (
                SELECT endpoint AS ep, toString(host_id) AS host_id, window_start_ms AS start, held_ms AS h,
                       busy_ms AS b
                FROM {db}.endpoint_use FINAL WHERE {plan.rollup}{use_where}
                UNION ALL
                SELECT p.endpoint, toString(r.host_id), r.window_start_ms, r.held_ms, r.busy_ms
                FROM ({raw}) AS r
                INNER JOIN {eps} AS p ON r.host_id = p.host_id AND r.pid = p.pid AND r.proc_start_ms = p.start_ms)
            GROUP BY ep, start ORDER BY ep, start""", params, store.report_settings())
    # which hosts each endpoint ran on: distinct pairs, so the rollup needs no FINAL here
    pairs = store.report_rows(
        f"""SELECT DISTINCT endpoint, toString(host_id) FROM {db}.endpoint_use WHERE {plan.rollup}{use_where}
            UNION DISTINCT
            SELECT p.endpoint, toString(r.host_id) FROM (SELECT DISTINCT host_id, pid, proc_start_ms FROM ({raw})) AS r
            INNER JOIN {eps} AS p ON r.host_id = p.host_id AND r.pid = p.pid AND r.proc_start_ms = p.start_ms""",
        params)
    hosts: dict[str, set] = {}
    for ep, host in pairs:
        hosts.setdefault(str(ep), set()).add(str(host))
    return rows, hosts


def _phases(store: Store, since_ms: int) -> dict[str, str]:
    rows = store.report_rows(
        f"""SELECT tags['endpoint'] AS ep, tags['phase'] AS phase, count() AS n FROM {store.db}.processes FINAL
            WHERE tags['endpoint'] != '' AND last_seen_ms >= {{since:Int64}} GROUP BY ep, phase""",
        {"since": since_ms})
    best: dict[str, tuple[int, str]] = {}
    for ep, phase, n in rows:
        if phase and (ep not in best or (int(n), phase) > best[ep]):
            best[ep] = (int(n), phase)
    return {ep: p for ep, (_, p) in best.items()}


def _col(t, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _names(t, name: str) -> np.ndarray:
    """A string column as an object array, each distinct value converted once (a month has 260,000 rows an
    endpoint, and a handful of names)."""
    col = t.column(name)
    if len(col) == 0:
        return np.zeros(0, object)
    enc = pc.dictionary_encode(col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
    values = np.asarray([str(x) for x in enc.dictionary.to_pylist()], dtype=object)
    return values[enc.indices.to_numpy(zero_copy_only=False)]


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.union1d, without its sort when one side is empty and the other already strictly increasing."""
    for x, y in ((a, b), (b, a)):
        if not x.size and (y.size < 2 or bool((np.diff(y) > 0).all())):
            return y
    return np.union1d(a, b)


def cost_by_endpoint_host(store: Store, pricing: Pricing, since: int, until: int, now_ms: int,
                          rules: CoverageRules) -> dict[tuple[str, str], StateTally]:
    """(endpoint, host) -> its StateTally, split exactly as `cost --by endpoint` splits (a host tagged
    endpoint=E pays E for what no process accounts for)."""
    label = "if(p.tags['endpoint'] != '', concat(p.tags['endpoint'], '\\t', a.host_id), '')"

    def owner(h) -> str:
        return f"{h.tags['endpoint']}\t{h.host_id}" if h.tags.get("endpoint") else ""

    acc = allocation.allocate(store, pricing, _periods(pricing, since, until), now_ms, rules, label, {}, owner)
    out = {}
    for lbl, tally in acc.items():
        if lbl:
            ep, _, host = lbl.partition("\t")
            out[(ep, host)] = tally
    return out


def timelines(store: Store, pricing: Pricing, since: int, until: int, now_ms: int,
              rules: CoverageRules = CoverageRules(), opts: Options = Options(),
              with_cost: bool = True) -> dict[str, Timeline]:
    """Every endpoint seen in the range (by counters or by processes), as a Timeline; without
    `with_cost` no allocation is run (cost arrays 0, tally None: what the alert facts need)."""
    until = min(until, now_ms)
    ew = _endpoint_rows(store, since, until, opts.endpoint)
    tallies = cost_by_endpoint_host(store, pricing, since, until, now_ms, rules) if with_cost else {}
    rates = {}
    for (ep, host), tally in tallies.items():
        ms = tally.ms.active + tally.ms.idle_held
        rates[(ep, host)] = (tally.cost.active + tally.cost.idle_held) / ms if ms and tally.priced else 0.0
    hw, h_hosts = _held_rows(store, since, until, opts.endpoint, rates)
    phases = _phases(store, since)
    e_name = _names(ew, "endpoint")
    h_name = _names(hw, "ep")
    names = sorted(set(e_name) | set(h_name)
                   | {e for e, _ in tallies if not opts.endpoint or e == opts.endpoint})
    # every column converted once, not once per endpoint
    ec = {c: _col(ew, c) for c in ("w", "window_start_ms", "scraped", "run", "r", "p", "g", "err")}
    hc = {c: _col(hw, c) for c in ("start", "held", "busy", "cost")}
    e_hosts = np.asarray(ew.column("hosts").to_pylist(), dtype=object)
    e_server = _names(ew, "server")
    out: dict[str, Timeline] = {}
    for name in names:
        em = e_name == name
        hm = h_name == name
        wms = ec["w"][em]
        w = int(np.bincount(wms).argmax()) if wms.size else DEFAULT_WINDOW_MS
        e_start = ec["window_start_ms"][em].astype(np.int64) // w * w
        h_start = hc["start"][hm].astype(np.int64) // w * w
        starts = _sorted_union(e_start, h_start)
        n = starts.size
        ei = np.searchsorted(starts, e_start)
        hi = np.searchsorted(starts, h_start)

        def place(values, idx, dtype=np.int64, n=n):
            arr = np.zeros(n, dtype)
            np.add.at(arr, idx, values)
            return arr

        scraped = place(ec["scraped"][em].astype(np.int64), ei)
        running = np.zeros(n, np.int64)
        np.maximum.at(running, ei, ec["run"][em].astype(np.int64))
        requests = place(ec["r"][em].astype(np.int64), ei)
        held = place(hc["held"][hm].astype(np.float64), hi, np.float64)
        busy = place(hc["busy"][hm].astype(np.float64), hi, np.float64)
        ep_tally = StateTally()
        for (ep, _host), tally in tallies.items():
            if ep == name:
                ep_tally.merge(tally)
        cost = place(hc["cost"][hm].astype(np.float64), hi, np.float64)
        has_counters = bool((scraped > 0).any())
        known = scraped > 0
        up = (held > 0) | known
        if has_counters:
            serving = known & ((requests > 0) | (running > 0))
        else:
            serving = (held > 0) & (busy >= opts.active_threshold_pct / 100.0 * held)
        hosts = set(h_hosts.get(name, ()))
        for hs in e_hosts[em]:
            hosts.update(hs)
        servers = [s for s in e_server[em] if s]
        out[name] = Timeline(
            endpoint=name, window_ms=w, starts=starts, up=up, known=known, serving=serving, requests=requests,
            prompt_tokens=place(ec["p"][em].astype(np.int64), ei),
            generation_tokens=place(ec["g"][em].astype(np.int64), ei),
            held_ms=held, busy_ms=busy, cost=cost, has_counters=has_counters,
            server=servers[0] if servers else "", phase=phases.get(name, ""), hosts=hosts,
            scrape_errors=int(ec["err"][em].sum()) if em.any() else 0,
            tally=ep_tally if any(e == name for e, _ in tallies) else None)
    return out


# ----------------------------------------------------------------------------- policies


def replay_scale_to_zero(starts_ms: np.ndarray, window_ms: int, busy: np.ndarray, cost: np.ndarray,
                         idle_ms: float, since_ms: int) -> tuple[float, np.ndarray, int]:
    """Scale to zero after `idle_ms` without a busy window, replayed over a timeline.

    Returns (saving, down mask, cold starts). A window is down when it starts at least `idle_ms` after
    the end of the last busy window before it (the range's start counts as one); a busy window that
    comes while down is a cold start (it is served, after a model load, and is not saved)."""
    starts = np.asarray(starts_ms, np.int64)
    if starts.size == 0:
        return 0.0, np.zeros(0, bool), 0
    ends = np.where(busy, starts + window_ms, np.int64(since_ms))
    last = np.maximum.accumulate(np.maximum(ends, since_ms))
    prev = np.concatenate(([since_ms], last[:-1]))
    asleep = starts >= prev + idle_ms
    down = asleep & ~busy
    cold = asleep & busy & (starts > prev)  # a busy window right after a busy one is no cold start
    return float(np.asarray(cost)[down].sum()), down, int(cold.sum())


# ----------------------------------------------------------------------------- the report


def _per(cost: float | None, n: float, unit: float) -> float | None:
    return cost / n * unit if cost is not None and n else None


def endpoint_row(t: Timeline, since: int, until: int, opts: Options) -> dict:
    range_h = (until - since) / MS_PER_HOUR
    days = range_h / 24.0
    up_h = t.hours(t.up)
    serving_h = t.hours(t.serving)
    tokens = int(t.prompt_tokens.sum() + t.generation_tokens.sum())
    requests = int(t.requests.sum())
    f = t.tally.fields("allocation") if t.tally is not None else {}
    cost = f.get("cost")
    busy_for_policy = t.serving | t.unknown  # never claim a saving on time whose traffic is unknown
    saving, down, cold = replay_scale_to_zero(t.starts, t.window_ms, busy_for_policy, t.cost,
                                              opts.idle_minutes * 60_000, since)
    inside = opts.schedule.inside(t.starts)
    outside = t.up & ~inside
    office_saving = float(t.cost[outside].sum())
    dev = t.phase.lower() in DEV_PHASES
    around_clock = range_h > 0 and up_h >= 0.9 * range_h
    few_hours = days > 0 and serving_h / days <= opts.flag_serving_hours
    flag = ""
    if dev and around_clock and few_hours and t.starts.size:
        cur = f.get("currency") or "USD"
        flag = (f"always_on_dev: {t.phase} endpoint up {up_h / days:.1f} h/day, serving {serving_h / days:.1f} h/day; "
                f"scale-to-zero after {opts.idle_minutes:g} min would have saved {saving:,.2f} {cur} "
                f"({cold} cold starts), office hours ({opts.schedule.text()}) {office_saving:,.2f} {cur}")
    return {
        "endpoint": t.endpoint, "phase": t.phase, "server": t.server, "hosts": len(t.hosts),
        "counters": "scraped" if t.has_counters else f"none (serving: GPU busy >= {opts.active_threshold_pct:g} %)",
        "up_hours": up_h, "serving_hours": serving_h, "idle_hours": t.hours(t.idle),
        "unknown_hours": t.hours(t.unknown), "idle_share": (t.hours(t.idle) / up_h) if up_h else None,
        "requests": requests, "prompt_tokens": int(t.prompt_tokens.sum()),
        "generation_tokens": int(t.generation_tokens.sum()), "scrape_errors": t.scrape_errors,
        "gpu_hours": f.get("gpu_hours"), "active_hours": f.get("active_hours"), "idle_held_hours": f.get("idle_held_hours"),
        "cost": cost, "idle_cost": f.get("idle_cost"), "currency": f.get("currency", ""),
        "cost_per_1k_requests": _per(cost, requests, 1000.0), "cost_per_million_tokens": _per(cost, tokens, 1e6),
        "scale_to_zero_saving": saving if t.tally is not None else None, "scale_to_zero_down_hours": t.hours(down),
        "cold_starts": cold, "office_hours_saving": office_saving if t.tally is not None else None,
        "requests_outside_hours": int(t.requests[~inside].sum()),
        "flag": flag,
    }


def endpoint_rows(store: Store, pricing: Pricing, since: int, until: int, filters: dict, now_ms: int,
                  rules: CoverageRules = CoverageRules()) -> list[dict]:
    """`gpuledger endpoints`: one row per endpoint, flagged ones first, then by cost."""
    opts = Options.from_filters(filters)
    until = min(until, now_ms)
    rows = [endpoint_row(t, since, until, opts) for t in timelines(store, pricing, since, until, now_ms, rules,
                                                                   opts).values()]
    rows.sort(key=lambda r: (not r["flag"], -(r["cost"] or 0.0), r["endpoint"]))
    return rows


# ----------------------------------------------------------------------------- inference model


def _catalog() -> list[dict]:
    from importlib import resources

    from gpuledger.collector.pricing import CATALOG_FILE, validate_catalog_csv

    return validate_catalog_csv(resources.files("gpuledger.collector").joinpath(CATALOG_FILE).read_text())


def gpu_model_of(store: Store, hosts: set[str]) -> str:
    """The endpoint's GPU model: its hosts' instance type in the catalog, else the GPU's name."""
    cat = _catalog()
    recs = allocation.load_hosts(store)
    by_type = {(r["provider"], r["region"], r["instance_type"]): r["gpu_model"] for r in cat}
    by_name = {r["instance_type"]: r["gpu_model"] for r in cat}
    for h in sorted(hosts):
        rec = recs.get(h)
        if rec is not None:
            model = by_type.get((rec.provider, rec.region, rec.instance_type)) or by_name.get(rec.instance_type)
            if model:
                return model
    if not hosts:
        return ""
    names = store.report_rows(f"SELECT DISTINCT name FROM {store.db}.gpus WHERE host_id IN {{h:Array(String)}}",
                              {"h": sorted(hosts)})
    models = sorted({r["gpu_model"] for r in cat}, key=len, reverse=True)
    for (name,) in names:
        for m in models:
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(m)}(?![A-Za-z0-9])", name):
                return m
    return ""


def capacity(t: Timeline, bucket_minutes: float = 5.0, top_share: float = 0.05) -> dict:
    """Requests and tokens per GPU-second in the endpoint's busiest buckets: buckets of
    `bucket_minutes` in which every up window was scraped and some window served; the top share of
    them (at least one) by requests per GPU-second."""
    bucket_ms = int(bucket_minutes * 60_000)
    if bucket_ms < t.window_ms:
        raise EndpointError(f"bucket_minutes: {bucket_minutes:g} is shorter than a window ({t.window_ms} ms)")
    b = t.starts // bucket_ms
    keys, inv = np.unique(b, return_inverse=True)

    def per(values):
        return np.bincount(inv, weights=np.asarray(values, np.float64), minlength=keys.size)

    req = per(t.requests)
    tok = per(t.prompt_tokens + t.generation_tokens)
    gpu_s = per(t.held_ms) / 1000.0
    unknown = per(t.unknown)
    serving = per(t.serving)
    ok = (unknown == 0) & (serving > 0) & (gpu_s > 0)
    known_h = t.hours(t.known & t.up)
    if not ok.any():
        return {"buckets": 0, "known_hours": known_h}
    rate = np.where(ok, req / np.where(gpu_s > 0, gpu_s, 1), -1.0)
    n_top = max(1, int(math.ceil(top_share * ok.sum())))
    top = np.argsort(-rate, kind="stable")[:n_top]
    trate = np.where(ok, tok / np.where(gpu_s > 0, gpu_s, 1), -1.0)
    ttop = np.argsort(-trate, kind="stable")[:n_top]
    hourly = np.bincount(t.starts[t.known] // 3_600_000 - t.starts.min() // 3_600_000,
                         weights=t.requests[t.known].astype(np.float64))
    full_hours = hourly[hourly > 0]
    return {"buckets": int(ok.sum()), "top_buckets": n_top, "bucket_minutes": bucket_minutes,
            "known_hours": known_h, "requests_per_gpu_s": float(req[top].sum() / gpu_s[top].sum()),
            "tokens_per_gpu_s": float(tok[ttop].sum() / gpu_s[ttop].sum()) if tok.sum() else None,
            "tokens_per_request": float(tok.sum() / req.sum()) if req.sum() else None,
            "peak_to_mean": float(full_hours.max() / full_hours.mean()) if full_hours.size else 1.0,
            "gpus_held": float(np.median(t.held_ms[t.up] / t.window_ms)) if t.up.any() else 0.0}


def inference_model(store: Store, pricing: Pricing, since: int, until: int, filters: dict, now_ms: int,
                    rules: CoverageRules = CoverageRules()) -> list[dict]:
    """`gpuledger inference-model`: one row per candidate instance type (cheapest first), every row
    carrying the basis (measured capacity, hours of measurement) and the target."""
    name = filters.get("endpoint", "")
    if not name:
        raise EndpointError("endpoint: required (the endpoint whose measurements size the target)")

    def num(key: str, default: float | None, hi: float = math.inf, zero: bool = False) -> float | None:
        v = filters.get(key, "")
        if v == "":
            return default
        try:
            x = float(v)
        except ValueError:
            raise EndpointError(f"{key}: {v!r} is not a number") from None
        if not (0 < x <= hi or (zero and x == 0)) or math.isnan(x):
            raise EndpointError(f"{key}: {x:g} must be {'>=' if zero else '>'} 0"
                                + (f" and <= {hi:g}" if hi < math.inf else ""))
        return x

    rps = num("target_rps", None)
    per_day = num("requests_per_day", None)
    tpr = num("tokens_per_request", None)
    headroom = num("headroom", 0.3, 0.95, zero=True)
    idle_min = num("idle_minutes", 15.0, zero=True)
    if (rps is None) == (per_day is None):
        raise EndpointError("give exactly one of target_rps and requests_per_day")
    opts = Options(endpoint=name)
    until = min(until, now_ms)
    tls = timelines(store, pricing, since, until, now_ms, rules, opts)
    t = tls.get(name)
    if t is None or not t.starts.size:
        raise EndpointError(f"endpoint {name!r}: no windows between {since} and {until}")
    if not t.has_counters:
        raise EndpointError(f"endpoint {name!r}: no request counters were scraped in the range; configure it "
                            "in [[agent.endpoints]] of its host's agent")
    cap = capacity(t, num("bucket_minutes", 5.0) or 5.0)
    if not cap.get("buckets"):
        raise EndpointError(f"endpoint {name!r}: no fully scraped bucket with traffic in the range")
    if tpr is not None and not cap.get("tokens_per_gpu_s"):
        raise EndpointError(f"endpoint {name!r} ({t.server}) reports no token counters: size it by requests")
    if per_day is not None:
        avg_rps = per_day / 86_400.0
        peak_rps = avg_rps * cap["peak_to_mean"]
        target = (f"{per_day:,.0f} requests/day: {avg_rps:.3f} req/s on average, sized for {peak_rps:.3f} req/s "
                  f"(the endpoint's own peak hour is {cap['peak_to_mean']:.2f} x its mean)")
    else:
        avg_rps = peak_rps = rps
        target = f"{rps:g} req/s sustained"
    if tpr is not None:
        need_gpu_s = peak_rps * tpr / cap["tokens_per_gpu_s"]
        unit = f"{cap['tokens_per_gpu_s']:.1f} tokens per GPU-second at {tpr:g} tokens/request"
    else:
        need_gpu_s = peak_rps / cap["requests_per_gpu_s"]
        unit = f"{cap['requests_per_gpu_s']:.3f} requests per GPU-second"
    gpus_needed = max(1, math.ceil(need_gpu_s / (1.0 - headroom) - 1e-9))
    model = gpu_model_of(store, t.hosts)
    basis = (f"capacity {unit}: the busiest {cap['top_buckets']} of {cap['buckets']} fully scraped "
             f"{cap['bucket_minutes']:g}-minute buckets of endpoint {name} ({model or 'GPU model unknown'}, "
             f"{cap['known_hours']:.1f} h of scraped counters, {t.hours(t.up):.1f} h up between "
             f"{datetime.fromtimestamp(since / 1000, UTC):%Y-%m-%d %H:%M} and "
             f"{datetime.fromtimestamp(until / 1000, UTC):%Y-%m-%d %H:%M} UTC); demonstrated, not a saturation test")
    monthly_requests = avg_rps * HOURS_PER_MONTH * 3600.0
    up_fraction = 1.0 - math.exp(-avg_rps * idle_min * 60.0)  # Poisson arrivals at the mean rate
    want = [s for s in (filters.get("instance_types") or "").split(",") if s]
    cands = [r for r in _catalog() if r["purchase_option"] == "on_demand"
             and ((r["instance_type"] in want) if want else (model and r["gpu_model"] == model))]
    for key in ("provider", "region"):
        if filters.get(key):
            cands = [r for r in cands if r[key] == filters[key]]
    if not cands:
        raise EndpointError(f"no catalog instance type with {model or 'the endpoint' + chr(39) + 's'} GPUs"
                            + (f" among {', '.join(want)}" if want else "") + ": name some with instance_types")
    rows = []
    for r in cands:
        price = pricing.price(r["provider"], r["region"], r["instance_type"], r["gpu_count"], "", now_ms)
        if price is None:
            continue
        hourly = price.per_gpu_hour * r["gpu_count"]
        inst = math.ceil(gpus_needed / r["gpu_count"])
        monthly = inst * hourly * HOURS_PER_MONTH
        note = "" if r["gpu_model"] == model else f"capacity measured on {model or 'unknown GPUs'}, assumed equal"
        rows.append({
            "instance_type": r["instance_type"], "provider": r["provider"], "region": r["region"],
            "gpu_model": r["gpu_model"], "gpus_per_instance": r["gpu_count"], "instances": inst,
            "gpus_needed": gpus_needed, "headroom": headroom, "hourly_price": hourly, "monthly_cost": monthly,
            "cost_per_1k_requests": monthly / (monthly_requests / 1000.0) if monthly_requests else None,
            "always_on_floor_monthly": hourly * HOURS_PER_MONTH,
            "scale_to_zero_monthly": monthly * up_fraction if inst == 1 else monthly,
            "scale_to_zero_up_share": up_fraction if inst == 1 else 1.0,
            "currency": price.currency, "note": note,
            "endpoint": name, "target": target, "target_rps": peak_rps, "mean_rps": avg_rps,
            "requests_per_gpu_s": cap["requests_per_gpu_s"], "tokens_per_gpu_s": cap.get("tokens_per_gpu_s"),
            "measured_tokens_per_request": cap.get("tokens_per_request"), "measured_hours": cap["known_hours"],
            "basis": basis,
        })
    rows.sort(key=lambda x: (x["monthly_cost"], x["instance_type"]))
    return rows


# ----------------------------------------------------------------------------- alert facts


def idle_share_facts(store: Store, pricing: Pricing, now_ms: int, rules: CoverageRules = CoverageRules(),
                     day_ms: int = 86_400_000):
    """Alert facts for endpoint_idle: each endpoint up in the last day, with its idle share."""
    from gpuledger.collector.alerts import Fact

    out = []
    for t in timelines(store, pricing, now_ms - day_ms, now_ms, now_ms, rules, with_cost=False).values():
        up = t.hours(t.up)
        if up <= 0:
            continue
        idle = t.hours(t.idle)
        out.append(Fact({"endpoint": t.endpoint}, idle / up,
                        f"endpoint {t.endpoint} ({t.phase or 'no phase'}): up {up:.1f} h of the last day, "
                        f"serving {t.hours(t.serving):.1f} h, idle {idle:.1f} h"))
    return out
