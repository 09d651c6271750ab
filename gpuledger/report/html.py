"""`gpuledger report html`: one self-contained HTML page of a range, for finance and SREs.

The page opens offline (from a mail attachment, a shared drive): its charts are Vega-Lite specs
built with Altair and drawn by Vega, Vega-Lite and vega-embed, whose JavaScript is inlined from the
bundle that the vl-convert-python package ships (`vl_convert.javascript_bundle`); the page loads
nothing from anywhere and its Content-Security-Policy forbids it to.

Why Vega-Lite (Altair + vl-convert): both are maintained by the Vega project, the JavaScript comes
inside a PyPI wheel (no CDN, no npm step, no browser download), Altair validates every spec against
the Vega-Lite schema before the page is written, and the whole runtime is 0.9 MB inlined
(measured), where plotly's offline bundle (plotly.min.js, several MB) would take most of the 5 MB a page
may weigh before any data.

Every figure comes from the collector's Query service, as the CLI gets it (`client.fetch_report`):
- idle waste by host (`idle`, by host), the headline totals and the price table;
- cost by team, project and phase (`cost`), the tables beside the spend charts;
- spend over time (`focus`, by day, or by hour for ranges of three days or less): each FOCUS row is
  labelled by its Tags (the host's owner tags overlaid by the process's tags, as the export writes
  them); a row without the key is "(unattributed)";
- the utilization heat map (`heatmap`): GPU x hour, or host x N hours when a fleet is too large to
  draw cell by cell (at most HEAT_MAX_CELLS cells, so a month of 1,000 GPUs stays small and fast);
- endpoints (`endpoints`, at the report's default policies): per endpoint, its up hours split into serving,
  idle and unknown (they add up to up); every column of the report in two tables; the flagged ones with
  what scale-to-zero or office hours would have saved, as the report words it;
- the finance baseline (`baseline`, one row whose `document` is collector/baseline.py's JSON document):
  the five questions, each with its figures (money, shares in %, the training : inference ratio), its
  flags, how it was computed, what it rests on and what it covers; cost by workload; what is missing;
  the untagged shares and top ten; the billed GPU instances; the endpoints' GPU-hours.
  Either section says "not available on this collector" when the collector lacks its report.

The page's tables print the reports' own values (cells carry the exact value in `data-v`), so a
reader can check every chart against a number, and the tests check the numbers against the JSON.
Every name that comes from users or bills (hosts, endpoints, tags, resource ids, flag texts) is
escaped as text; the chart data sits in JSON script elements with <, > and & escaped.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

HOUR_MS = 3_600_000
HEAT_MAX_CELLS = 20_000  # cells drawn in the heat map
HEAT_GPU_ROWS_MAX = 160  # above this many GPUs the heat map has one row per host
HEAT_STEPS = (1, 2, 3, 4, 6, 8, 12, 24, 48, 168)  # hours per cell, finest first
HEAT_MAX_CELLS_PER_ROW = 24 * 93  # the heatmap report's own bound
SPEND_HOURLY_MAX_MS = 72 * HOUR_MS  # ranges up to this are drawn by hour, longer ones by day
SPEND_DIMENSIONS = ("team", "project", "phase")
SPEND_TOP = 10  # labels drawn per spend chart; the rest are "(other)" (the tables list them all)
IDLE_CHART_TOP = 20  # hosts in the idle-waste chart (the table lists all)
OPTIONAL_REPORTS = ("endpoints", "baseline")
UNCLASSIFIED_WORKLOAD = "unclassified"  # the baseline's class of cost no tag names (collector/baseline.py)
UNATTRIBUTED = "(unattributed)"

# (report, since_ms, until_ms, by, filters) -> (Arrow table, ReportReply)
Fetch = Callable[[str, int, int, str, dict], tuple[pa.Table, object]]


class ReportUnavailable(Exception):
    """The collector does not serve this report (an older or newer collector)."""


# ----------------------------------------------------------------------------- data


@dataclass
class Section:
    """An optional report: its rows, or why there are none."""

    rows: list[dict] | None = None
    note: str = ""


@dataclass
class ReportData:
    since_ms: int
    until_ms: int
    source: str  # the collector's address
    generated_ms: int
    currency: str = "USD"
    pricing_sources: list[str] = field(default_factory=list)
    idle: list[dict] = field(default_factory=list)
    cost: dict[str, list[dict]] = field(default_factory=dict)  # dimension -> cost report rows
    spend_granularity: str = "day"
    spend: list[dict] = field(default_factory=list)  # {period_ms, dimension, label, cost, state costs}
    spend_unpriced_rows: int = 0
    heat_by: str = "gpu"
    heat_step_hours: int = 1
    heat: list[dict] = field(default_factory=list)
    optional: dict[str, Section] = field(default_factory=dict)


def grpc_fetch(address: str, token: str | None = None, credentials=None, timeout_s: float = 300.0) -> Fetch:
    """A Fetch over the collector's Query service (client.fetch_report, as the CLI)."""
    import grpc

    from gpuledger.client import fetch_report

    def fetch(report: str, since_ms: int, until_ms: int, by: str, filters: dict):
        try:
            return fetch_report(address, report, since_ms, until_ms, by, filters, token=token,
                                credentials=credentials, timeout_s=timeout_s)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNIMPLEMENTED or (
                    code == grpc.StatusCode.INVALID_ARGUMENT and "unknown report" in details):
                raise ReportUnavailable(details) from e
            raise

    return fetch


def heat_layout(n_gpus: int, n_hosts: int, since_ms: int, until_ms: int) -> tuple[str, int]:
    """(by, hours per cell) of the heat map: GPU rows for small fleets, host rows above
    HEAT_GPU_ROWS_MAX GPUs; the finest step that keeps the map under HEAT_MAX_CELLS cells."""
    by = "gpu" if n_gpus <= HEAT_GPU_ROWS_MAX else "host"
    rows = max(1, n_gpus if by == "gpu" else n_hosts)
    for step in HEAT_STEPS:
        step_ms = step * HOUR_MS
        cols = (until_ms - since_ms // step_ms * step_ms + step_ms - 1) // step_ms
        if rows * cols <= HEAT_MAX_CELLS and cols <= HEAT_MAX_CELLS_PER_ROW:
            return by, step
    return by, HEAT_STEPS[-1]


def _ms(v) -> int:
    if isinstance(v, datetime):
        return int(v.timestamp() * 1000)
    return int(v)


def spend_rows(focus: list[dict], dimensions=SPEND_DIMENSIONS) -> tuple[list[dict], int]:
    """Cost per charge period and label of each dimension, from FOCUS rows (their Tags); the number of
    rows without a price (counted as 0)."""
    acc: dict[tuple, dict] = {}
    unpriced = 0
    for r in focus:
        cost = r.get("BilledCost")
        if cost is None:
            unpriced += 1
            cost = 0.0
        tags = json.loads(r.get("Tags") or "{}")
        period = _ms(r["ChargePeriodStart"])
        state = r.get("x_GpuState") or "active"
        for dim in dimensions:
            label = tags.get(dim) or UNATTRIBUTED
            a = acc.get((period, dim, label))
            if a is None:
                a = acc[(period, dim, label)] = {"period_ms": period, "dimension": dim, "label": label, "cost": 0.0,
                                                 "active": 0.0, "idle_held": 0.0, "idle_free": 0.0,
                                                 "unmonitored": 0.0, "gpu_hours": 0.0}
            a["cost"] += cost
            a[state] = a.get(state, 0.0) + cost
            a["gpu_hours"] += r.get("ConsumedQuantity") or 0.0
    return sorted(acc.values(), key=lambda a: (a["dimension"], a["period_ms"], a["label"])), unpriced


def collect(fetch: Fetch, since_ms: int, until_ms: int, source: str = "", now_ms: int | None = None) -> ReportData:
    """Ask the collector for every report the page shows."""
    import time

    idle_t, reply = fetch("idle", since_ms, until_ms, "host", {})
    # the collector bounds the range (until at its now at the latest): every later report uses its range
    since_ms = reply.since_ms or since_ms
    until_ms = reply.until_ms or until_ms
    data = ReportData(since_ms, until_ms, source, int(time.time() * 1000) if now_ms is None else now_ms,
                      currency=reply.currency or "USD",
                      pricing_sources=[reply.pricing_source] if reply.pricing_source else [])
    data.idle = idle_t.to_pylist()
    for dim in SPEND_DIMENSIONS:
        t, _ = fetch("cost", since_ms, until_ms, dim, {})
        data.cost[dim] = t.to_pylist()
    data.spend_granularity = "hour" if until_ms - since_ms <= SPEND_HOURLY_MAX_MS else "day"
    focus_t, _ = fetch("focus", since_ms, until_ms, data.spend_granularity, {})
    focus_t = focus_t.select([c for c in ("BilledCost", "ChargePeriodStart", "Tags", "x_GpuState",
                                          "ConsumedQuantity") if c in focus_t.column_names])
    data.spend, data.spend_unpriced_rows = spend_rows(focus_t.to_pylist())
    n_gpus = sum(int(r.get("gpus") or 0) for r in data.idle)
    data.heat_by, data.heat_step_hours = heat_layout(n_gpus, len(data.idle), since_ms, until_ms)
    heat_t, _ = fetch("heatmap", since_ms, until_ms, data.heat_by, {"step_hours": str(data.heat_step_hours)})
    data.heat = heat_t.to_pylist()
    for name in OPTIONAL_REPORTS:
        try:
            t, _ = fetch(name, since_ms, until_ms, "", {})
        except ReportUnavailable as e:
            data.optional[name] = Section(None, f"not available on this collector ({e})")
            continue
        data.optional[name] = Section(t.to_pylist(), "")
    return data


# ----------------------------------------------------------------------------- formatting


def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def money(v, currency: str = "USD") -> str:
    if v is None:
        return "unpriced"
    sign = "-" if v < 0 else ""
    prefix = "$" if currency == "USD" else f"{currency} "
    return f"{sign}{prefix}{abs(v):,.2f}"


def number(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def percent(v, digits: int = 1) -> str:
    """v in 0..100."""
    return "-" if v is None else f"{v:.{digits}f} %"


def share(v, digits: int = 1) -> str:
    """v in 0..1."""
    return "-" if v is None else f"{100.0 * v:.{digits}f} %"


def kind_of(column: str, values: list) -> str:
    """How a column of an unknown report is printed: money, hours, pct, share, time, int, num or text."""
    nums = [v for v in values if v is not None]
    if not nums or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
        return "text"
    c = column.lower()
    if c == "cost" or c.endswith("_cost") or c.endswith("_price") or c.startswith("cost_"):
        return "money"
    if c.endswith("_hours"):
        return "hours"
    if c.endswith("_pct"):
        return "pct"
    if (c.endswith("_share") or c.endswith("coverage") or c.endswith("_ratio") or c.endswith("_fraction")) and \
            all(-1e-9 <= v <= 1 + 1e-9 for v in nums):
        return "share"
    if c.endswith("_ms") and all(v > 1e11 for v in nums):
        return "time"
    if all(isinstance(v, int) for v in nums):
        return "int"
    return "num"


def fmt(kind: str, v, currency: str = "USD") -> str:
    if v is None:
        return "-"
    if kind == "money":
        return money(v, currency)
    if kind == "rate":  # money per unit: small amounts keep four decimals
        return money(v, currency) if v == 0 or abs(v) >= 1 else money(v, currency).replace(
            f"{abs(v):,.2f}", f"{abs(v):,.4f}")
    if kind == "ratio":
        return f"{v:,.2f}x"
    if kind == "hours":
        return number(v, 1)
    if kind == "pct":
        return percent(v)
    if kind == "share":
        return share(v)
    if kind == "time":
        return iso(int(v))
    if kind == "int":
        return f"{int(v):,}"
    if kind == "num":
        return number(v, 2)
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def esc(v) -> str:
    return html.escape(str(v), quote=True)


@dataclass(frozen=True)
class Col:
    key: str
    title: str
    kind: str  # see fmt


TALL_ROWS = 25  # a longer table scrolls in its own box, so the charts below stay near


def table(rows: list[dict], cols: list[Col], *, report: str, by: str, key: str, currency: str,
          caption: str = "", compact: bool = False) -> str:
    """An HTML table; every figure cell carries its column (data-col) and exact value (data-v)."""
    head = "".join(f'<th class="{"num" if c.kind != "text" else ""}">{esc(c.title)}</th>' for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c.key)
            if c.kind == "text":
                text = fmt("text", v) if v is not None else "-"
                cells.append(f'<td data-col="{esc(c.key)}">{esc(text)}</td>')
            else:
                exact = "" if v is None else esc(json.dumps(v))
                cells.append(f'<td class="num" data-col="{esc(c.key)}" data-v="{exact}">'
                             f'{esc(fmt(c.kind, v, currency))}</td>')
        body.append(f'<tr data-key="{esc(r.get(key, ""))}">{"".join(cells)}</tr>')
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    box = "scroll tall" if len(rows) > TALL_ROWS else "scroll"
    cls = "figures compact" if compact else "figures"
    return (f'<div class="{box}"><table class="{cls}" data-report="{esc(report)}" data-by="{esc(by)}" '
            f'data-key="{esc(key)}">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


# ----------------------------------------------------------------------------- charts (Vega-Lite via Altair)


def _alt():
    try:
        import altair as alt
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("the HTML report needs altair and vl-convert-python (pip install altair "
                           "vl-convert-python)") from e
    return alt


def spend_chart(dim: str, granularity: str, top: list[str]) -> dict:
    alt = _alt()
    unit = "utcyearmonthdate" if granularity == "day" else "utcyearmonthdatehours"
    base = alt.Chart(alt.Data(name=f"spend_{dim}")).transform_calculate(
        group=f"indexof({json.dumps(top)}, datum.label) >= 0 ? datum.label : '(other)'")
    chart = base.mark_bar().encode(
        x=alt.X("period_ms:T", timeUnit=unit, title=f"{granularity} (UTC)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("sum(cost):Q", title="cost", axis=alt.Axis(format="$,.0f")),
        color=alt.Color("group:N", title=dim, sort=top + ["(other)"], scale=alt.Scale(scheme="tableau10")),
        tooltip=[alt.Tooltip("group:N", title=dim), alt.Tooltip("period_ms:T", timeUnit=unit, title=granularity),
                 alt.Tooltip("sum(cost):Q", format="$,.2f", title="cost"),
                 alt.Tooltip("sum(idle_held):Q", format="$,.2f", title="idle-held"),
                 alt.Tooltip("sum(idle_free):Q", format="$,.2f", title="idle-free")],
    ).properties(width="container", height=220, title=f"Spend by {dim}, per {granularity}")
    return chart.to_dict()


def idle_chart() -> dict:
    alt = _alt()
    chart = alt.Chart(alt.Data(name="idle_top")).transform_fold(
        ["idle_held_cost", "idle_free_cost"], as_=["kind", "amount"]).mark_bar().encode(
        y=alt.Y("host:N", sort=alt.EncodingSortField("idle_cost", order="descending"), title=None),
        x=alt.X("amount:Q", stack="zero", title="idle cost", axis=alt.Axis(format="$,.0f")),
        color=alt.Color("kind:N", title="idle", scale=alt.Scale(domain=["idle_held_cost", "idle_free_cost"],
                                                                 range=["#e45756", "#f2b447"]),
                        legend=alt.Legend(labelExpr="datum.label == 'idle_held_cost' ? 'held (a process holds the "
                                                    "GPU)' : 'free (no process)'")),
        tooltip=[alt.Tooltip("host:N"), alt.Tooltip("instance_type:N"),
                 alt.Tooltip("idle_cost:Q", format="$,.2f", title="idle cost"),
                 alt.Tooltip("idle_share:Q", format=".1%", title="idle share"),
                 alt.Tooltip("amount:Q", format="$,.2f", title="this part")],
    ).properties(width="container", title="Idle cost by host, most expensive first")
    return chart.to_dict()


def heat_chart(by: str, step_hours: int, n_rows: int, has_unmonitored: bool = True) -> dict:
    alt = _alt()
    cell = f"{step_hours} h" if step_hours > 1 else "hour"
    x = alt.X("start_ms:T", title="time (UTC)", scale=alt.Scale(type="utc"),
              axis=alt.Axis(labelAngle=0, labelOverlap=True))
    y = alt.Y("row:N", title=None, sort=None,
              axis=alt.Axis(labelOverlap=True, labelFontSize=9 if n_rows > 40 else 11, labelLimit=260))
    tip = [alt.Tooltip("row:N", title=by), alt.Tooltip("start_ms:T", timeUnit="utcyearmonthdatehoursminutes",
                                                      title="from (UTC)"),
           alt.Tooltip("util_pct:Q", format=".1f", title="utilization %"),
           alt.Tooltip("idle_held_h:Q", format=".2f", title="idle-held GPU-h"),
           alt.Tooltip("idle_free_h:Q", format=".2f", title="idle-free GPU-h"),
           alt.Tooltip("unmonitored_h:Q", format=".2f", title="unmonitored GPU-h")]
    base = alt.Chart(alt.Data(name="heat")).transform_calculate(
        idle_held_h="datum.idle_held_ms / 3600000", idle_free_h="datum.idle_free_ms / 3600000",
        unmonitored_h="datum.unmonitored_ms / 3600000")
    unmon = base.transform_filter("datum.util_pct == null").mark_rect(color="#b9b9b9").encode(
        x=x, x2="end_ms:T", y=y, tooltip=tip)
    util = base.transform_filter("datum.util_pct != null").mark_rect().encode(
        x=x, x2="end_ms:T", y=y, tooltip=tip,
        color=alt.Color("util_pct:Q", title="utilization %", scale=alt.Scale(domain=[0, 100], scheme="viridis")))
    height = max(120, min(1400, n_rows * (6 if n_rows > 60 else 14)))
    chart = (alt.layer(unmon, util) if has_unmonitored else util).properties(
        width="container", height=height,
        title=f"Utilization, {'GPU' if by == 'gpu' else 'host'} x {cell} (grey: no monitored time)")
    return chart.to_dict()


ENDPOINT_PARTS = (("serving_hours", "serving", "#54a24b"), ("idle_hours", "idle (up, no traffic)", "#e45756"),
                  ("unknown_hours", "unknown (no good scrape)", "#b9b9b9"))


def endpoint_chart(order: list[str], max_up_hours: float) -> dict:
    """Per endpoint, one bar as long as its up hours, split into serving, idle and unknown hours (they add up to
    up), labelled with its idle share; endpoints in the report's order (flagged first, then by cost)."""
    alt = _alt()
    keys = [k for k, _, _ in ENDPOINT_PARTS]
    label = " : ".join(f"datum.part == '{k}' ? '{t}'" for k, t, _ in ENDPOINT_PARTS[:-1]) + \
        f" : '{ENDPOINT_PARTS[-1][1]}'"
    y = alt.Y("endpoint:N", sort=order, title=None, axis=alt.Axis(labelLimit=260))
    # room on the right for the labels; ticks and grid only up to the longest bar
    x_scale = alt.Scale(domain=[0, max(1e-9, max_up_hours) * 1.22], nice=False)
    x_axis = alt.Axis(values=hour_ticks(max_up_hours), title="hours (wall time) in the range")
    bars = alt.Chart(alt.Data(name="endpoints")).transform_fold(keys, as_=["part", "hours"]).transform_calculate(
        order=f"indexof({json.dumps(keys)}, datum.part)").mark_bar().encode(
        y=y, x=alt.X("hours:Q", stack="zero", scale=x_scale, axis=x_axis),
        color=alt.Color("part:N", title=None,
                        scale=alt.Scale(domain=keys, range=[c for _, _, c in ENDPOINT_PARTS]),
                        legend=alt.Legend(orient="top", labelExpr=label.replace("datum.part", "datum.label"))),
        order=alt.Order("order:Q"),
        tooltip=[alt.Tooltip("endpoint:N"), alt.Tooltip("phase:N"),
                 alt.Tooltip("up_hours:Q", format=",.1f", title="up h"),
                 alt.Tooltip("serving_hours:Q", format=",.1f", title="serving h"),
                 alt.Tooltip("idle_hours:Q", format=",.1f", title="idle h"),
                 alt.Tooltip("unknown_hours:Q", format=",.1f", title="unknown h"),
                 alt.Tooltip("idle_share:Q", format=".1%", title="idle share"),
                 alt.Tooltip("cost:Q", format="$,.2f", title="cost")])
    text = alt.Chart(alt.Data(name="endpoints")).transform_calculate(
        label="datum.idle_share == null ? '' : 'idle ' + format(100 * datum.idle_share, '.0f') + ' % of ' + "
              "format(datum.up_hours, ',.1f') + ' h up'").mark_text(align="left", dx=4, fontSize=11).encode(
        y=y, x=alt.X("up_hours:Q", scale=x_scale, axis=x_axis), text="label:N")
    chart = alt.layer(bars, text).properties(width="container", height=26 * len(order) + 30,
                                             title="Endpoints: hours up, split into serving and idle")
    return chart.configure_view(strokeWidth=0).to_dict()


HOUR_TICK_STEPS = (0.25, 0.5, 1, 2, 3, 4, 6, 12, 24, 48, 72, 168, 336, 720, 1440, 2160, 4320, 8760)


def hour_ticks(top: float, most: int = 10) -> list[float]:
    """Axis values 0, step, 2 step, ... up to `top` hours, at most `most` steps of a whole-hour-friendly size."""
    if not top > 0:
        return [0]
    step = next((s for s in HOUR_TICK_STEPS if top / s <= most), None) or math.ceil(top / most)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def workload_chart(order: list[str]) -> dict:
    """The baseline's cost per workload class (training, inference, ...), one bar each."""
    alt = _alt()
    chart = alt.Chart(alt.Data(name="workloads")).mark_bar().encode(
        y=alt.Y("workload:N", sort=order, title=None),
        x=alt.X("cost:Q", title="cost", axis=alt.Axis(format="$,.0f")),
        color=alt.condition(f"datum.workload == '{UNCLASSIFIED_WORKLOAD}'", alt.value("#b9b9b9"),
                            alt.value("#4c78a8")),
        tooltip=[alt.Tooltip("workload:N"), alt.Tooltip("cost:Q", format="$,.2f"),
                 alt.Tooltip("share:Q", format=".1%", title="share of classified cost")],
    ).properties(width="container", height=24 * len(order) + 20, title="AI cost by workload (baseline question 3)")
    return chart.to_dict()


@functools.lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega + Vega-Lite + vega-embed as one script (window.vegaEmbed), from the vl-convert-python wheel, for
    the Vega-Lite version Altair writes."""
    try:
        import vl_convert as vlc
        from altair.utils._importers import vl_version_for_vl_convert
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the HTML report needs altair and vl-convert-python") from e
    return vlc.javascript_bundle(vl_version=vl_version_for_vl_convert())


def _columnar(rows: list[dict], keys: list[str]) -> dict:
    return {"n": len(rows), "cols": {k: [r.get(k) for r in rows] for k in keys}}


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can close or confuse the element."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c").replace(
        ">", "\\u003e").replace("&", "\\u0026")


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------- page


IDLE_COLS = [Col("host", "host", "text"), Col("instance_type", "instance type", "text"), Col("state", "state", "text"),
             Col("gpus", "GPUs", "int"), Col("gpu_hours", "GPU-hours", "hours"),
             Col("mean_util_pct", "mean utilization", "pct"), Col("cost", "cost", "money"),
             Col("idle_cost", "idle cost", "money"), Col("idle_share", "idle share", "share"),
             Col("idle_held_hours", "idle-held h", "hours"), Col("idle_free_hours", "idle-free h", "hours"),
             Col("unmonitored_hours", "unmonitored h", "hours")]


def cost_cols(dim: str) -> list[Col]:
    return [Col(dim, dim, "text"), Col("gpu_hours", "GPU-hours", "hours"), Col("cost", "cost", "money"),
            Col("active_cost", "active", "money"), Col("idle_held_cost", "idle-held", "money"),
            Col("idle_free_cost", "idle-free", "money"), Col("unmonitored_cost", "unmonitored", "money"),
            Col("idle_share", "idle share", "share")]


def price_rows(idle: list[dict]) -> list[dict]:
    """Per (provider, region, instance type, method): hosts, GPUs, GPU-hours, cost, cost per GPU-hour."""
    acc: dict[tuple, dict] = {}
    for r in idle:
        k = (r.get("provider") or "", r.get("region") or "", r.get("instance_type") or "", r.get("price_method") or "")
        a = acc.setdefault(k, {"provider": k[0], "region": k[1], "instance_type": k[2], "price_method": k[3],
                               "hosts": 0, "gpus": 0, "gpu_hours": 0.0, "cost": 0.0, "priced": True})
        a["hosts"] += 1
        a["gpus"] += int(r.get("gpus") or 0)
        a["gpu_hours"] += r.get("gpu_hours") or 0.0
        if r.get("cost") is None:
            a["priced"] = False
        else:
            a["cost"] += r["cost"]
    out = []
    for a in acc.values():
        if not a["priced"]:
            a["cost"] = None
        a["per_gpu_hour"] = a["cost"] / a["gpu_hours"] if a["cost"] is not None and a["gpu_hours"] else None
        a["key"] = "/".join(x for x in (a["provider"], a["region"], a["instance_type"], a["price_method"]))
        del a["priced"]
        out.append(a)
    out.sort(key=lambda a: -(a["cost"] or 0))
    return out


PRICE_COLS = [Col("provider", "provider", "text"), Col("region", "region", "text"),
              Col("instance_type", "instance type", "text"), Col("price_method", "method", "text"),
              Col("hosts", "hosts", "int"), Col("gpus", "GPUs", "int"), Col("gpu_hours", "GPU-hours", "hours"),
              Col("cost", "cost", "money"), Col("per_gpu_hour", "per GPU-hour", "money")]


def totals(idle: list[dict]) -> dict:
    def s(k):
        vals = [r.get(k) for r in idle]
        return None if any(v is None for v in vals) else sum(vals)

    t = {k: s(k) for k in ("gpus", "gpu_hours", "active_hours", "idle_held_hours", "idle_free_hours",
                           "unmonitored_hours", "cost", "idle_cost", "active_cost", "unmonitored_cost")}
    t["hosts"] = len(idle)
    t["idle_share"] = (t["idle_cost"] / t["cost"]) if t["cost"] else (None if t["cost"] is None else 0.0)
    return t


# endpoints: every column of `gpuledger endpoints --format json` (collector/endpoints.py endpoint_row), in two
# tables keyed by endpoint; `flag` is printed as text under them
ENDPOINT_TIME_COLS = [
    Col("endpoint", "endpoint", "text"), Col("phase", "phase", "text"), Col("up_hours", "up h", "hours"),
    Col("serving_hours", "serving h", "hours"), Col("idle_hours", "idle h", "hours"),
    Col("unknown_hours", "unknown h", "hours"), Col("idle_share", "idle share", "share"),
    Col("requests", "requests", "int"), Col("prompt_tokens", "prompt tokens", "int"),
    Col("generation_tokens", "generation tokens", "int"), Col("hosts", "hosts", "int"),
    Col("server", "server", "text"), Col("counters", "request counters", "text"),
    Col("scrape_errors", "scrape errors", "int")]
ENDPOINT_COST_COLS = [
    Col("endpoint", "endpoint", "text"), Col("cost", "cost", "money"), Col("idle_cost", "idle cost", "money"),
    Col("cost_per_1k_requests", "per 1,000 requests", "rate"),
    Col("cost_per_million_tokens", "per million tokens", "rate"),
    Col("scale_to_zero_saving", "scale-to-zero saving", "money"), Col("cold_starts", "cold starts", "int"),
    Col("scale_to_zero_down_hours", "scaled-down h", "hours"),
    Col("office_hours_saving", "office-hours saving", "money"),
    Col("requests_outside_hours", "requests outside hours", "int"), Col("gpu_hours", "GPU-hours", "hours"),
    Col("active_hours", "active GPU-h", "hours"), Col("idle_held_hours", "idle-held GPU-h", "hours"),
    Col("currency", "currency", "text")]
ENDPOINT_CHART_TOP = 30  # endpoints drawn in the chart (the tables list all)


def endpoint_cols(rows: list[dict]) -> tuple[list[Col], list[Col]]:
    """The two tables' columns; a column the report gains later is appended to the second, printed by its name."""
    known = {c.key for c in ENDPOINT_TIME_COLS + ENDPOINT_COST_COLS} | {"flag"}
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in known]
    return ENDPOINT_TIME_COLS, ENDPOINT_COST_COLS + [Col(k, k.replace("_", " "), kind_of(k, [r.get(k) for r in rows]))
                                                     for k in extra]


def _unavailable(name: str, sec: Section) -> str:
    return f'<p class="unavailable" data-unavailable="{esc(name)}">{esc(sec.note)}</p>'


def endpoints_section(sec: Section, currency: str) -> tuple[str, dict]:
    """(HTML, {chart name: (spec, {dataset: columnar rows})}) of the endpoints report."""
    if sec.rows is None:
        return _unavailable("endpoints", sec), {}
    rows = sec.rows
    note = ('<p class="note">From <code>gpuledger endpoints</code>. An endpoint is up while a process carrying its '
            'name (GPULEDGER_ENDPOINT) holds a GPU or its server answers a scrape; it serves in the windows where its '
            'server counted requests (or, without scraped counters, where its GPUs were busy); idle share is idle '
            'over up hours. Cost is the GPU cost <code>cost --by endpoint</code> gives it. Savings replay each '
            "endpoint's measured timeline: scale to zero after 15 idle minutes, and office hours (Monday to Friday, "
            '08:00-18:00 UTC), the report\'s defaults.</p>')
    if not rows:
        return note + ('<p class="empty">No endpoint in this range: no process carried GPULEDGER_ENDPOINT and no '
                       'inference server was scraped.</p>'), {}
    flagged = [r for r in rows if r.get("flag")]
    if flagged:
        items = "".join(f'<li class="flag" data-flag="{esc(r["endpoint"])}"><b>{esc(r["endpoint"])}</b>: '
                        f'<span class="text">{esc(r["flag"])}</span></li>' for r in flagged)
        flags = (f'<div class="flags"><h3>Flagged ({len(flagged)} of {len(rows)})</h3>'
                 f'<ul class="flags">{items}</ul></div>')
    else:
        flags = (f'<p class="ok">No endpoint flagged (a development or staging endpoint up at least 90 % of the range '
                 f'while serving at most 6 hours a day would be), of {len(rows)}.</p>')
    top = rows[:ENDPOINT_CHART_TOP]
    charts = {}
    if any((r.get("up_hours") or 0) > 0 for r in top):
        keys = ["endpoint", "phase", "up_hours", "serving_hours", "idle_hours", "unknown_hours", "idle_share", "cost"]
        spec = endpoint_chart([r["endpoint"] for r in top], max(r.get("up_hours") or 0.0 for r in top))
        charts["endpoints"] = (spec, {"endpoints": _columnar([{k: _clean(r.get(k)) for k in keys} for r in top],
                                                             keys)})
    time_cols, cost_cols_ = endpoint_cols(rows)
    more = (f'<p class="note">The chart shows the first {ENDPOINT_CHART_TOP} of {len(rows)} endpoints (flagged, then '
            'by cost); the tables list all.</p>') if len(rows) > ENDPOINT_CHART_TOP else ""
    chart = '<div class="chart" data-chart="endpoints"></div>' if charts else ""
    body = (note + flags + chart + more
            + table(rows, time_cols, report="endpoints", by="time", key="endpoint", currency=currency,
                    caption="gpuledger endpoints: time and traffic")
            + table(rows, cost_cols_, report="endpoints", by="cost", key="endpoint", currency=currency,
                    caption="gpuledger endpoints: cost and what a policy would have saved"))
    return body, charts


# baseline: the document of collector/baseline.py baseline_document
ANSWER_LABELS = {
    "total_cloud_cost": "total cloud cost", "ai_cost": "AI cost", "ai_share": "AI share of the cloud bill",
    "gpu_instance_cost": "GPU instances", "ai_service_cost": "AI services", "api_cost": "AI APIs",
    "unbilled_gpu_cost": "GPU hosts no bill covers", "monitored_share": "GPU spend agents watch",
    "unwatched_gpu_cost": "GPU spend no agent watches", "unwatched_gpu_instances": "GPU instances no agent reports",
    "training_cost": "training (with fine-tuning)", "inference_cost": "inference",
    "training_to_inference": "training : inference", "cost_per_successful_deployment":
        "training cost per successful deployment", "training_util_pct": "training GPUs active",
    "endpoint_up_hours": "endpoint GPU-hours up", "endpoint_serving_hours": "endpoint GPU-hours serving",
    "endpoint_idle_share": "endpoint idle share"}
BASELINE_WORKLOAD_COLS = [Col("workload", "workload", "text"), Col("cost", "cost", "money"),
                          Col("share", "share of classified cost", "share")]
BASELINE_UNTAGGED_SHARE_COLS = [Col("key", "tag", "text"),
                                Col("gpu_cost_share", "share of GPU cost without it", "share"),
                                Col("bill_cost_share", "share of bill cost without it", "share")]
BASELINE_UNTAGGED_TOP_COLS = [Col("host", "host", "text"), Col("process", "process", "text"),
                              Col("cost", "cost", "money"), Col("missing", "missing tags", "text")]
BASELINE_INSTANCE_COLS = [Col("resource_id", "resource id", "text"), Col("host", "host (agent)", "text"),
                          Col("instance_type", "instance type", "text"), Col("gpus", "GPUs", "int"),
                          Col("cost", "cost", "money"), Col("billed_gpu_hours", "billed GPU-h", "hours"),
                          Col("monitored_gpu_hours", "monitored GPU-h", "hours"),
                          Col("coverage", "monitored share", "share"),
                          Col("price_per_instance_hour", "per instance-hour", "money")]
BASELINE_ENDPOINT_COLS = [Col("endpoint", "endpoint", "text"), Col("up_hours", "GPU-hours up", "hours"),
                          Col("serving_hours", "GPU-hours serving", "hours")]


def answer_kind(key: str, v) -> str:
    """How a baseline answer is printed (as the baseline's own text rendering does)."""
    if isinstance(v, (list, dict)) or isinstance(v, str):
        return "text"
    if key.endswith("_share"):
        return "share"
    if key.endswith("_pct"):
        return "pct"
    if key.endswith("_hours"):
        return "hours"
    if key == "training_to_inference":
        return "ratio"
    return "money"


def _answer(key: str, v, currency: str) -> str:
    kind = answer_kind(key, v)
    if isinstance(v, list):
        text = ", ".join(str(x) for x in v) or "none"
        cls = "v list"
    else:
        text = fmt(kind, v, currency) + (" GPU-h" if kind == "hours" and v is not None else "")
        cls = "v"
    return (f'<div class="fig" data-answer="{esc(key)}" data-kind="{kind}" data-v="{esc(json.dumps(v))}">'
            f'<div class="{cls}">{esc(text)}</div><div class="k">{esc(ANSWER_LABELS.get(key, key.replace("_", " ")))}'
            f'</div></div>')


def baseline_section(sec: Section, currency: str) -> tuple[str, dict]:
    """(HTML, charts) of the baseline report: its one row's JSON document, question by question."""
    if sec.rows is None:
        return _unavailable("baseline", sec), {}
    try:
        doc = json.loads(sec.rows[0]["document"])
        questions = doc["questions"]
    except (IndexError, KeyError, TypeError, ValueError) as e:
        return (f'<p class="warn">The collector\'s baseline could not be read ({esc(type(e).__name__)}: '
                f'{esc(e)}).</p>'), {}
    cur = (doc.get("currency") or currency).split(",")[0] or currency
    out = [f'<p class="note">From <code>gpuledger baseline</code>: five questions finance asks, answered from the '
           f'imported cloud bill, the AI API spend and the telemetry; {esc(doc.get("cost_basis", ""))} cost, '
           f'{esc(doc.get("currency", ""))}, {esc(doc.get("since", ""))} to {esc(doc.get("until", ""))}. '
           'Each answer says how it was computed, what it rests on and how much of the spend it covers.</p>']
    if doc.get("flags"):
        out.append('<div class="flags"><h3>Flags</h3><ul class="flags">'
                   + "".join(f'<li class="flag">{esc(f)}</li>' for f in doc["flags"]) + "</ul></div>")
    if doc.get("missing"):
        out.append('<div class="missing"><h3>Missing or partial</h3><ul class="missing">'
                   + "".join(f'<li data-missing="{i}">{esc(m)}</li>' for i, m in enumerate(doc["missing"]))
                   + "</ul></div>")
    charts = {}
    for i, q in enumerate(questions, 1):
        answers = q.get("answer", {})
        figs = "".join(_answer(k, v, cur) for k, v in answers.items() if not k.endswith("_reason"))
        reasons = "".join(f'<p class="reason" data-reason="{esc(k)}">{esc(v)}</p>' for k, v in answers.items()
                          if k.endswith("_reason") and v)
        flags = "".join(f'<p class="flag">{esc(f)}</p>' for f in q.get("flags", []))
        cov = q.get("coverage_share")
        covers = esc(q.get("covers", "")) + (f' <span class="cov" data-coverage="{esc(json.dumps(cov))}">(coverage '
                                             f'{esc(share(cov))})</span>' if cov is not None else "")
        extra = ""
        qid = q.get("id", "")
        if qid == "training_vs_inference" and doc.get("workload_costs"):
            wl = doc["workload_costs"]
            total = sum(v for v in wl.values() if v is not None)
            rows = [{"workload": k, "cost": v, "share": (v / total) if total else None} for k, v in wl.items()]
            order = [r["workload"] for r in rows]
            keys = ["workload", "cost", "share"]
            charts["baseline_workloads"] = (workload_chart(order), {"workloads": _columnar(
                [{k: _clean(r[k]) for k in keys} for r in rows], keys)})
            extra = ('<div class="chart" data-chart="baseline_workloads"></div>'
                     + table(rows, BASELINE_WORKLOAD_COLS, report="baseline", by="workload", key="workload",
                             currency=cur, compact=True,
                             caption="workload_costs: every cost classified by its tags"))
        elif qid == "gpu_monitoring" and doc.get("instances"):
            inst = doc["instances"]
            extra = (f'<details><summary>GPU instances in the bill ({len(inst)})</summary>'
                     + table(inst, BASELINE_INSTANCE_COLS, report="baseline", by="instances", key="resource_id",
                             currency=cur, caption="instances: billed and monitored GPU-hours") + "</details>")
        elif qid == "endpoint_idle" and doc.get("endpoints"):
            eps = [{"endpoint": k, **v} for k, v in sorted(doc["endpoints"].items())]
            extra = (f'<details><summary>Per endpoint ({len(eps)})</summary>'
                     + table(eps, BASELINE_ENDPOINT_COLS, report="baseline", by="endpoints", key="endpoint",
                             currency=cur, compact=True,
                             caption="GPU-hours of the endpoints' processes (not wall hours)")
                     + "</details>")
        out.append(
            f'<article class="question" data-question="{esc(qid)}"><h3>{i}. {esc(q.get("question", ""))}</h3>'
            f'<div class="figs">{figs}</div>{reasons}{flags}'
            f'<dl class="basis"><dt>how</dt><dd>{esc(q.get("method", ""))}</dd>'
            f'<dt>rests on</dt><dd>{esc("; ".join(q.get("rests_on", [])) or "-")}</dd>'
            f'<dt>covers</dt><dd>{covers}</dd></dl>{extra}</article>')
    us = doc.get("untagged_share") or {}
    if us:
        keys = list(dict.fromkeys(k for part in us.values() for k in (part or {})))
        gpu, bill = us.get("gpu_cost") or {}, us.get("bill_cost") or {}
        rows = [{"key": k, "gpu_cost_share": gpu.get(k), "bill_cost_share": bill.get(k)} for k in keys]
        out.append('<h3>Tagging</h3><p class="note">Share of cost without each tag: GPU cost by the tags of the '
                   "processes (the host's own for its owner's time), the bill by its resource tags. Tag processes "
                   "with GPULEDGER_TEAM, GPULEDGER_PROJECT and GPULEDGER_PHASE, hosts in the agent's config.</p>"
                   + table(rows, BASELINE_UNTAGGED_SHARE_COLS, report="baseline", by="untagged_share", key="key",
                           currency=cur, compact=True, caption="untagged_share"))
    top = doc.get("untagged_top") or []
    if top:
        rows = [{**u, "key": f"{u.get('host')}/{u.get('process') or ''}",
                 "process": u.get("process") or "(host owner)", "missing": ", ".join(u.get("missing") or [])}
                for u in top]
        out.append(table(rows, BASELINE_UNTAGGED_TOP_COLS, report="baseline", by="untagged_top", key="key",
                         currency=cur, compact=True,
                         caption="untagged_top: the costliest hosts and processes missing a tag"))
    return "".join(out), charts


def render(data: ReportData) -> str:
    """The page, as one string."""
    cur = data.currency.split(",")[0] or "USD"
    specs: dict[str, dict] = {}
    datasets: dict[str, dict] = {}
    charts: dict[str, list[str]] = {}  # chart -> datasets it needs
    t = totals(data.idle)

    # spend over time
    spend_html = []
    for dim in SPEND_DIMENSIONS:
        rows = [r for r in data.spend if r["dimension"] == dim]
        by_label: dict[str, float] = {}
        for r in rows:
            by_label[r["label"]] = by_label.get(r["label"], 0.0) + r["cost"]
        top = [lbl for lbl, _ in sorted(by_label.items(), key=lambda kv: -kv[1])][:SPEND_TOP]
        name = f"spend_{dim}"
        if rows:
            specs[name] = spend_chart(dim, data.spend_granularity, top)
            datasets[name] = _columnar(rows, ["period_ms", "label", "cost", "idle_held", "idle_free"])
            charts[name] = [name]
        chart = f'<div class="chart" data-chart="{name}"></div>' if rows else '<p class="empty">No spend.</p>'
        spend_html.append(
            f'<h3>By {dim}</h3>{chart}'
            + table(data.cost.get(dim, []), cost_cols(dim), report="cost", by=dim, key=dim, currency=cur,
                    caption=f"gpuledger cost --by {dim}")
            + _spend_pivot(rows, dim, data.spend_granularity, cur))

    # idle waste
    if data.idle:
        specs["idle"] = idle_chart()
        specs["idle"]["height"] = 16 * min(len(data.idle), IDLE_CHART_TOP) + 40
        datasets["idle_top"] = _columnar(
            [{k: _clean(r.get(k)) for k in ("host", "instance_type", "idle_cost", "idle_share", "idle_held_cost",
                                               "idle_free_cost")} for r in data.idle[:IDLE_CHART_TOP]],
            ["host", "instance_type", "idle_cost", "idle_share", "idle_held_cost", "idle_free_cost"])
        charts["idle"] = ["idle_top"]

    # heat map
    heat_rows, heat_n = _heat_rows(data)
    if heat_rows:
        specs["heat"] = heat_chart(data.heat_by, data.heat_step_hours, heat_n,
                                   any(r["util_pct"] is None for r in heat_rows))
        datasets["heat"] = _columnar(heat_rows, ["row", "start_ms", "end_ms", "util_pct", "idle_held_ms",
                                                 "idle_free_ms", "unmonitored_ms"])
        charts["heat"] = ["heat"]

    # endpoints and baseline (reports the collector may not serve)
    optional_html = {}
    for name, section in (("endpoints", endpoints_section), ("baseline", baseline_section)):
        sec = data.optional.get(name, Section(None, "not available on this collector"))
        body, sec_charts = section(sec, cur)
        for chart_name, (spec, ds) in sec_charts.items():
            specs[chart_name] = spec
            datasets.update(ds)
            charts[chart_name] = list(ds)
        optional_html[name] = body

    kpis = "".join(
        f'<div class="kpi"><div class="v" data-total="{k}" data-v="{esc(json.dumps(t.get(k)))}">{esc(v)}</div>'
        f'<div class="k">{esc(label)}</div></div>'
        for k, label, v in (("cost", "GPU cost", money(t["cost"], cur)),
                            ("idle_cost", "idle cost", money(t["idle_cost"], cur)),
                            ("idle_share", "idle share of cost", share(t["idle_share"])),
                            ("gpu_hours", "GPU-hours", number(t["gpu_hours"])),
                            ("unmonitored_hours", "unmonitored GPU-hours", number(t["unmonitored_hours"])),
                            ("gpus", "GPUs", f"{t['gpus'] or 0:,}"), ("hosts", "hosts", f"{t['hosts']:,}")))
    unpriced = (f'<p class="warn">{data.spend_unpriced_rows} FOCUS rows have no price (counted as 0 in the '
                f'charts).</p>') if data.spend_unpriced_rows else ""
    heat_note = (f'One row per {"GPU" if data.heat_by == "gpu" else "host (its GPUs summed)"}, one cell per '
                 f'{data.heat_step_hours} hour{"s" if data.heat_step_hours > 1 else ""}; colour: active time over '
                 f'monitored time (the idle report\'s mean utilization). '
                 + ("" if data.heat_by == "gpu" else f"The fleet has more than {HEAT_GPU_ROWS_MAX} GPUs, so rows are "
                                                     "hosts. ")
                 + (f"Cells are {data.heat_step_hours} h wide to keep the map under {HEAT_MAX_CELLS:,} cells. "
                    if data.heat_step_hours > 1 else ""))
    sources = "".join(f"<li>{esc(s)}</li>" for s in data.pricing_sources) or "<li>-</li>"
    body = f"""
<header>
  <h1>GPU cost and idle waste</h1>
  <p class="range" data-since-ms="{data.since_ms}" data-until-ms="{data.until_ms}">{esc(iso(data.since_ms))} to
  {esc(iso(data.until_ms))} &middot; collector {esc(data.source or "-")} &middot; generated {esc(iso(data.generated_ms))}
  &middot; currency {esc(data.currency)}</p>
  <div class="kpis">{kpis}</div>
</header>
<nav><a href="#spend">Spend</a> <a href="#idle">Idle waste</a> <a href="#heat">Utilization</a>
<a href="#endpoints">Endpoints</a> <a href="#baseline">Baseline</a> <a href="#prices">Prices</a></nav>
<section id="spend"><h2>Spend over time</h2>
<p class="note">Charts: FOCUS export rows ({esc(data.spend_granularity)} charge periods) labelled by their Tags (the
host's owner tags overlaid by the process's tags); a row without the key is {UNATTRIBUTED}. Tables: the cost
report (<code>gpuledger cost --by ...</code>), which puts a process without the tag under (untagged) and
host time under the host's owner tag.</p>{unpriced}
{"".join(spend_html)}</section>
<section id="idle"><h2>Idle waste by host</h2>
<p class="note">Idle cost is idle-held (a process holds the GPU, no kernel runs) plus idle-free (no process) time
at the instance price (<code>gpuledger idle</code>). Unmonitored time (no data) is never counted as idle.</p>
{'<div class="chart" data-chart="idle"></div>' if data.idle else ''}
{table(data.idle, IDLE_COLS, report="idle", by="host", key="host", currency=cur,
       caption="gpuledger idle --by host") if data.idle else '<p class="empty">No GPU time in this range.</p>'}
</section>
<section id="heat"><h2>Utilization heat map</h2><p class="note">{esc(heat_note)}</p>
{'<div class="chart" data-chart="heat"></div>' if heat_rows else '<p class="empty">No GPU time in this range.</p>'}
</section>
<section id="endpoints"><h2>Endpoints: up versus serving</h2>{optional_html["endpoints"]}</section>
<section id="baseline"><h2>Finance baseline</h2>{optional_html["baseline"]}</section>
<section id="prices"><h2>Prices</h2>
<p class="note">Every cost on this page is at the price in force for each host and period, from these sources
(the collector's, as <code>gpuledger pricing</code> lists them):</p><ul class="sources">{sources}</ul>
{table(price_rows(data.idle), PRICE_COLS, report="prices", by="instance_type", key="key", currency=cur,
       caption="per GPU-hour: cost over GPU-hours in the range")}
</section>
<footer>gpuledger &middot; charts: Vega-Lite {esc(_vl_version())} drawn by Vega (inlined; this page loads nothing)
</footer>"""
    return PAGE.format(
        title=esc(f"gpuledger: GPU cost {iso(data.since_ms)} to {iso(data.until_ms)}"),
        style=STYLE, body=body, vega=vega_bundle().replace("</script", "<\\/script"),
        specs=_script_json(specs), data=_script_json(datasets), charts=_script_json(charts), glue=GLUE)


def _vl_version() -> str:
    try:
        import altair as alt

        return alt.SCHEMA_VERSION.lstrip("v")
    except ImportError:  # pragma: no cover
        return "?"


def _spend_pivot(rows: list[dict], dim: str, granularity: str, currency: str) -> str:
    """The figures behind a spend chart: one row per charge period, one column per label."""
    if not rows:
        return ""
    labels = sorted({r["label"] for r in rows})
    periods = sorted({r["period_ms"] for r in rows})
    cell = {(r["period_ms"], r["label"]): r["cost"] for r in rows}
    head = "".join(f'<th class="num">{esc(lbl)}</th>' for lbl in labels)
    body = []
    for p in periods:
        tds = "".join(f'<td class="num" data-col="{esc(lbl)}" data-v="{esc(json.dumps(cell.get((p, lbl))))}">'
                      f'{esc(money(cell[(p, lbl)], currency)) if (p, lbl) in cell else "-"}</td>' for lbl in labels)
        body.append(f'<tr data-key="{p}"><td>{esc(iso(p))}</td>{tds}</tr>')
    return (f'<details><summary>Figures by {esc(granularity)} ({len(periods)} rows)</summary>'
            f'<table class="figures pivot" data-report="spend" data-by="{esc(dim)}"><thead><tr><th>{esc(granularity)} '
            f'(UTC)</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></details>')


def _heat_rows(data: ReportData) -> tuple[list[dict], int]:
    rows = []
    labels = {}
    for r in data.heat:
        if data.heat_by == "gpu":
            idx = r.get("gpu_index")
            label = f"{r['host']} / GPU {idx}" if idx is not None else f"{r['host']} / {r.get('gpu_uuid', '')[:12]}"
            order = (r["host"], idx if idx is not None else 1 << 30, r.get("gpu_uuid", ""))
        else:
            label = f"{r['host']} ({r.get('gpus', 0)} GPUs)"
            order = (r["host"],)
        labels.setdefault(label, order)
        rows.append({"row": label, "start_ms": r["start_ms"], "end_ms": r["end_ms"],
                     "util_pct": None if r.get("util_pct") is None else round(r["util_pct"], 1),
                     "idle_held_ms": round(r["idle_held_ms"]), "idle_free_ms": round(r["idle_free_ms"]),
                     "unmonitored_ms": round(r["unmonitored_ms"])})
    ordered = sorted(labels, key=lambda lbl: labels[lbl])
    rank = {lbl: i for i, lbl in enumerate(ordered)}
    rows.sort(key=lambda r: (rank[r["row"]], r["start_ms"]))
    return rows, len(ordered)


def write_report(collector_address: str, since_ms: int, until_ms: int, path, token: str | None = None,
                 credentials=None, now_ms: int | None = None) -> Path:
    """Fetch every report of [since_ms, until_ms) from the collector and write the page to `path`; returns it.

    For `make demo`: after the fleet has run, `write_report(collector.address, since_ms, until_ms,
    root / "report.html")` and print the returned path."""
    data = collect(grpc_fetch(collector_address, token, credentials), since_ms, until_ms, collector_address, now_ms)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- page template

STYLE = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; }
header { padding: 20px 0 8px; border-bottom: 1px solid var(--line); }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.range, .note, footer { color: var(--muted); } .note { max-width: 980px; }
.kpis { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.kpi { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.kpi .v { font-size: 20px; font-weight: 600; } .kpi .k { color: var(--muted); font-size: 12px; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid var(--line); z-index: 2; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
.scroll { overflow-x: auto; } .scroll.tall { max-height: 460px; overflow-y: auto; }
.scroll.tall thead th { position: sticky; top: 0; }
.chart { width: 100%; min-height: 60px; margin: 6px 0 10px; }
table.figures { border-collapse: collapse; margin: 6px 0 14px; font-size: 12.5px; width: 100%; }
table.figures.compact { width: auto; min-width: 480px; }
table.figures caption { text-align: left; color: var(--muted); font-family: ui-monospace, monospace; font-size: 12px;
                        padding-bottom: 4px; }
table.figures th, table.figures td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left;
                                      white-space: nowrap; }
table.figures th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
details { margin: 0 0 12px; } summary { cursor: pointer; color: var(--muted); }
.unavailable, .empty { color: var(--muted); font-style: italic; } .warn { color: #9a6700; }
.ok { color: #1a7f37; }
div.flags, div.missing { border-left: 4px solid #cf222e; background: #fff5f5; padding: 6px 12px; margin: 10px 0;
                          border-radius: 0 6px 6px 0; max-width: 1100px; }
div.missing { border-left-color: #9a6700; background: #fff8e6; }
div.flags h3, div.missing h3 { margin: 2px 0 4px; font-size: 14px; }
ul.flags, ul.missing { margin: 0; padding-left: 18px; }
li.flag, p.flag { color: #82071e; } p.flag { background: #fff5f5; border-left: 4px solid #cf222e; padding: 4px 10px;
                                             margin: 6px 0; max-width: 1100px; }
p.flag::before { content: "\\2691  "; }
article.question { border: 1px solid var(--line); border-radius: 6px; padding: 4px 14px 8px; margin: 12px 0; }
article.question h3 { margin: 8px 0 8px; }
.figs { display: flex; flex-wrap: wrap; gap: 8px; }
.fig { background: var(--bg); border-radius: 6px; padding: 6px 12px; min-width: 120px; max-width: 420px; }
.fig .v { font-size: 17px; font-weight: 600; font-variant-numeric: tabular-nums; }
.fig .v.list { font-size: 12.5px; font-weight: 400; font-family: ui-monospace, monospace; word-break: break-all; }
.fig .k { color: var(--muted); font-size: 12px; }
p.reason { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
dl.basis { display: grid; grid-template-columns: 80px 1fr; gap: 2px 10px; margin: 10px 0 4px; font-size: 12.5px;
           max-width: 1100px; }
dl.basis dt { color: var(--muted); } dl.basis dd { margin: 0; }
footer { margin-top: 36px; border-top: 1px solid var(--line); padding-top: 8px; font-size: 12px; }
@media print { nav { display: none; } .chart { break-inside: avoid; } }
"""

GLUE = """
(function () {
  "use strict";
  const read = (id) => JSON.parse(document.getElementById(id).textContent);
  const specs = read("gl-specs"), data = read("gl-data"), charts = read("gl-charts");
  const rows = (d) => {
    const keys = Object.keys(d.cols), out = new Array(d.n);
    for (let i = 0; i < d.n; i++) { const o = {}; for (const k of keys) o[k] = d.cols[k][i]; out[i] = o; }
    return out;
  };
  const jobs = [];
  document.querySelectorAll("[data-chart]").forEach((el) => {
    const name = el.dataset.chart, spec = specs[name];
    spec.datasets = {};
    for (const ds of charts[name]) spec.datasets[ds] = rows(data[ds]);
    el.dataset.state = "drawing";
    jobs.push(vegaEmbed(el, spec, { renderer: "canvas", actions: { export: true, source: false, compiled: false,
                                                                     editor: false } })
      .then((res) => { el.dataset.state = "drawn"; return name; })
      .catch((err) => { el.dataset.state = "failed"; el.textContent = "chart failed: " + err; console.error(err);
                        throw err; }));
  });
  window.glChartsDone = Promise.allSettled(jobs).then((r) => {
    window.glDrawnMs = performance.now();
    document.body.dataset.charts = r.every((x) => x.status === "fulfilled") ? "drawn" : "failed";
    return r.map((x) => x.status);
  });
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; \
style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body>{body}
<script type="application/json" id="gl-specs">{specs}</script>
<script type="application/json" id="gl-data">{data}</script>
<script type="application/json" id="gl-charts">{charts}</script>
<script>{vega}</script>
<script>{glue}</script>
</body></html>
"""
