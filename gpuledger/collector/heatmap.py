"""The utilization heat map report: GPU (or host) x hour, each cell split into the four GPU states.

`heatmap_table(...)` reads the same sums as every other report (allocation.gpu_periods: the hourly
rollups where current, the raw windows elsewhere, unmonitored time from coverage) on a grid of
`step_hours` hours aligned to the UTC epoch, so cells of one step line up across reports. No price
is applied: a cell tells time, not money.

Parameters ride on ReportRequest: `by` is `gpu` (default) or `host` (a host's GPUs summed);
filters `step_hours` (1 to 168, default 1) and `host` (one host). One row per (host[, GPU], cell)
that has expected or stored time; `util_pct` is active time over monitored time (None without
monitored time), the definition of `mean_util_pct` in the idle report.
"""

from __future__ import annotations

import pyarrow as pa

from gpuledger.collector import allocation
from gpuledger.collector.allocation import HOUR_MS, Periods
from gpuledger.collector.coverage import CoverageRules
from gpuledger.collector.reports import ReportError
from gpuledger.collector.store import Store

MAX_STEP_HOURS = 168
MAX_CELLS_PER_SERIES = 24 * 93  # the FOCUS export's bound: about three months of hours per GPU


class HeatmapError(ReportError):
    pass


def step_hours_of(filters: dict) -> int:
    text = str(filters.get("step_hours", "") or "1").strip()
    try:
        step = int(text)
    except ValueError:
        raise HeatmapError(f"filters.step_hours: {text!r} is not a whole number of hours") from None
    if not 1 <= step <= MAX_STEP_HOURS:
        raise HeatmapError(f"filters.step_hours: {step} is outside 1..{MAX_STEP_HOURS}")
    return step


def heatmap_table(store: Store, since: int, until: int, by: str, filters: dict, now_ms: int,
                  rules: CoverageRules = CoverageRules()) -> pa.Table:
    if by not in ("gpu", "host"):
        raise HeatmapError(f"by: {by!r} is not gpu or host")
    step_ms = step_hours_of(filters) * HOUR_MS
    grid_start = since // step_ms * step_ms
    if (until - grid_start) / step_ms > MAX_CELLS_PER_SERIES:
        raise HeatmapError(f"range: more than {MAX_CELLS_PER_SERIES} cells per {by}; raise filters.step_hours or "
                           "narrow since/until")
    periods = Periods(since, until, grid_start, step_ms, ())  # no price segments: time only
    gps, _status = allocation.gpu_periods(store, periods, now_ms, rules, filters.get("host", ""))
    cells: dict[tuple, list[float]] = {}
    gpus_in: dict[tuple, set] = {}
    for (host_id, uuid, g, _seg), gp in gps.items():
        key = (host_id, uuid, g) if by == "gpu" else (host_id, "", g)
        acc = cells.get(key)
        if acc is None:
            acc = cells[key] = [0.0, 0.0, 0.0, 0.0]
        c = gp.covered
        acc[0] += c.active
        acc[1] += c.idle_held
        acc[2] += c.idle_free
        acc[3] += c.unmonitored
        gpus_in.setdefault(key, set()).add(uuid)
    index = _gpu_index(store, filters.get("host", "")) if by == "gpu" else {}
    keys = sorted(cells)
    starts = [max(since, grid_start + g * step_ms) for _, _, g in keys]
    ends = [min(until, grid_start + (g + 1) * step_ms) for _, _, g in keys]
    vals = [cells[k] for k in keys]
    util = [100.0 * v[0] / (v[0] + v[1] + v[2]) if (v[0] + v[1] + v[2]) > 0 else None for v in vals]
    cols = {"host": pa.array([k[0] for k in keys], pa.string()).dictionary_encode()}
    if by == "gpu":
        cols["gpu_uuid"] = pa.array([k[1] for k in keys], pa.string()).dictionary_encode()
        cols["gpu_index"] = pa.array([index.get((k[0], k[1])) for k in keys], pa.int32())
    else:
        cols["gpus"] = pa.array([len(gpus_in[k]) for k in keys], pa.int32())
    cols.update({
        "start_ms": pa.array(starts, pa.int64()),
        "end_ms": pa.array(ends, pa.int64()),
        "active_ms": pa.array([v[0] for v in vals], pa.float64()),
        "idle_held_ms": pa.array([v[1] for v in vals], pa.float64()),
        "idle_free_ms": pa.array([v[2] for v in vals], pa.float64()),
        "unmonitored_ms": pa.array([v[3] for v in vals], pa.float64()),
        "util_pct": pa.array(util, pa.float64()),
    })
    return pa.table(cols)


def _gpu_index(store: Store, host_filter: str) -> dict[tuple[str, str], int]:
    where = "WHERE host_id = {host:String}" if host_filter else ""
    rows = store.report_rows(f"SELECT host_id, uuid, argMax(gpu_index, first_window_ms) FROM {store.db}.gpus "
                             f"{where} GROUP BY host_id, uuid", {"host": host_filter})
    return {(h, u): int(i) for h, u, i in rows}
