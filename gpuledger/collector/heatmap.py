"""The utilization heat map report: GPU (or host) x hour, each cell split into the four GPU states.

`heatmap_table(...)` reads the same sums as every other report (allocation.gpu_period_table: the hourly
rollups where current, the raw windows elsewhere, unmonitored time from coverage) on a grid of
`step_hours` hours aligned to the UTC epoch, so cells of one step line up across reports. No price
is applied: a cell tells time, not money.

Parameters ride on ReportRequest: `by` is `gpu` (default) or `host` (a host's GPUs summed);
filters `step_hours` (1 to 168, default 1) and `host` (one host). One row per (host[, GPU], cell)
that has expected or stored time; `util_pct` is active time over monitored time (None without
monitored time), the definition of `mean_util_pct` in the idle report.
"""

from __future__ import annotations

import numpy as np
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
    t, _status = allocation.gpu_period_table(store, periods, now_ms, rules, filters.get("host", ""))
    keys = ["host_id", "gpu_uuid", "grid"] if by == "gpu" else ["host_id", "grid"]
    aggs = [(c, "sum") for c in ("active", "idle_held", "idle_free", "unmonitored")]
    if by == "host":
        aggs.append(("gpu_uuid", "count_distinct"))
    cells = t.group_by(keys).aggregate(aggs).sort_by([(k, "ascending") for k in keys])
    grid = cells.column("grid").to_numpy()
    starts = np.maximum(since, grid_start + grid * step_ms)
    ends = np.minimum(until, grid_start + (grid + 1) * step_ms)
    active, held, free, unmon = (cells.column(f"{c}_sum").to_numpy() for c in ("active", "idle_held", "idle_free",
                                                                               "unmonitored"))
    monitored = active + held + free
    with np.errstate(invalid="ignore", divide="ignore"):
        util = np.where(monitored > 0, 100.0 * active / np.where(monitored > 0, monitored, 1), np.nan)
    cols = {"host": cells.column("host_id").dictionary_encode()}
    if by == "gpu":
        index = _gpu_index(store, filters.get("host", ""))
        cols["gpu_uuid"] = cells.column("gpu_uuid").dictionary_encode()
        pairs = pa.table({"h": cells.column("host_id"), "u": cells.column("gpu_uuid")}).group_by(["h", "u"]) \
            .aggregate([])
        idx_of = {(h, u): index.get((h, u)) for h, u in zip(pairs.column("h").to_pylist(),
                                                            pairs.column("u").to_pylist(), strict=True)}
        cols["gpu_index"] = pa.array([idx_of[(h, u)] for h, u in zip(cells.column("host_id").to_pylist(),
                                                                     cells.column("gpu_uuid").to_pylist(),
                                                                     strict=True)], pa.int32())
    else:
        cols["gpus"] = cells.column("gpu_uuid_count_distinct").cast(pa.int32())
    cols.update({
        "start_ms": pa.array(starts, pa.int64()),
        "end_ms": pa.array(ends, pa.int64()),
        "active_ms": pa.array(active, pa.float64()),
        "idle_held_ms": pa.array(held, pa.float64()),
        "idle_free_ms": pa.array(free, pa.float64()),
        "unmonitored_ms": pa.array(unmon, pa.float64()),
        "util_pct": pa.array(util, pa.float64(), from_pandas=True),
    })
    return pa.table(cols)


def _gpu_index(store: Store, host_filter: str) -> dict[tuple[str, str], int]:
    where = "WHERE host_id = {host:String}" if host_filter else ""
    rows = store.report_rows(f"SELECT host_id, uuid, argMax(gpu_index, first_window_ms) FROM {store.db}.gpus "
                             f"{where} GROUP BY host_id, uuid", {"host": host_filter})
    return {(h, u): int(i) for h, u, i in rows}
