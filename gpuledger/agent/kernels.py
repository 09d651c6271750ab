"""Window kernels: fold interval readings into fixed, wall-clock-aligned windows.

Every reading is an interval [t0_us, t1_us) of one key (a GPU, or a GPU-process pair): a
utilization sample of the driver covers its sample period, a gauge reading covers the time
since the previous reading of the same key. Windows are [lo + k*W, lo + (k+1)*W) for k in
[0, n_windows). A reading that crosses a window boundary is split by overlap, so folding the
same readings window by window, or all at once, gives the same figures.

Each kernel has two implementations with one contract: a numba one (`@njit(cache=True,
nogil=True)` in kernels_numba.py, the fast path) and a plain numpy reference here.
`tests/unit/test_kernels.py` checks they agree on random and edge-case inputs. The agent can run
on the reference (`agent.kernels = "numpy"`): a host folds only tens of samples per second per
GPU, and that keeps numba and LLVM out of the agent's memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gpuledger.schema import HIST_BUCKETS


class UtilFold(NamedTuple):
    """Per (key, window) sums over utilization intervals; shapes (n_keys, n_windows[, 10])."""

    sample_count: np.ndarray  # int32: samples whose end lies in the window
    covered_us: np.ndarray  # float64: time covered by valid (non-NaN) samples
    busy_us: np.ndarray  # float64: sum of overlap * pct / 100
    held_idle_us: np.ndarray  # float64: idle time while a process held the GPU
    util_min: np.ndarray  # float32: over samples ending in the window (NaN if none)
    util_max: np.ndarray  # float32
    hist: np.ndarray  # int32 (n_keys, n_windows, 10): samples by decile, at their end


class GaugeFold(NamedTuple):
    count: np.ndarray  # int32: readings whose timestamp lies in the window
    energy_mj: np.ndarray  # float64: counter deltas split by overlap
    power_sum_mw: np.ndarray  # float64: sum of power readings (mean = sum / power_count)
    power_count: np.ndarray  # int32: non-NaN power readings
    power_max_mw: np.ndarray  # float64 (NaN if none)
    mem_max: np.ndarray  # float64 (NaN if none)
    temp_max: np.ndarray  # float64 (NaN if none)


# ----------------------------------------------------------------------------- numpy reference


def _split(t0, t1, lo, window_us, n_windows):
    """Split intervals at window boundaries: returns (row index, window index, overlap)."""
    hi = lo + window_us * n_windows
    a = np.maximum(t0, lo)
    b = np.minimum(t1, hi)
    ok = b > a
    idx = np.nonzero(ok)[0]
    a, b = a[ok], b[ok]
    w0 = (a - lo) // window_us
    w1 = (b - 1 - lo) // window_us
    n = (w1 - w0 + 1).astype(np.int64)
    rows = np.repeat(idx, n)
    first = np.repeat(np.cumsum(n) - n, n)
    win = np.repeat(w0, n) + (np.arange(rows.size) - first)
    seg_a = np.maximum(np.repeat(a, n), lo + win * window_us)
    seg_b = np.minimum(np.repeat(b, n), lo + (win + 1) * window_us)
    return rows, win, (seg_b - seg_a).astype(np.float64)


def _end_window(t1, lo, window_us, n_windows):
    hi = lo + window_us * n_windows
    ok = (t1 > lo) & (t1 <= hi)
    return ok, np.where(ok, (t1 - 1 - lo) // window_us, 0)


def _fold_util_np(key, t0, t1, pct, held, lo, window_us, n_keys, n_windows):
    shape = (n_keys, n_windows)
    valid = (pct >= 0) & (t1 > t0)  # NaN or negative: no valid reading
    key, t0, t1, pct, held = key[valid], t0[valid], t1[valid], pct[valid], held[valid]
    rows, win, ov = _split(t0, t1, lo, window_us, n_windows)
    flat = key[rows].astype(np.int64) * n_windows + win
    size = n_keys * n_windows
    covered = np.bincount(flat, ov, size).reshape(shape)
    bz = ov * (pct[rows].astype(np.float64) * 0.01)
    busy = np.bincount(flat, bz, size).reshape(shape)
    h = held[rows] != 0
    held_idle = np.bincount(flat[h], (ov - bz)[h], size).reshape(shape)
    ok, we = _end_window(t1, lo, window_us, n_windows)
    ef = key[ok].astype(np.int64) * n_windows + we[ok]
    p = pct[ok]
    count = np.bincount(ef, minlength=size).astype(np.int32).reshape(shape)
    umin = np.full(size, np.inf, np.float32)
    np.minimum.at(umin, ef, p)
    umax = np.full(size, -np.inf, np.float32)
    np.maximum.at(umax, ef, p)
    empty = count.reshape(-1) == 0
    umin[empty] = np.nan
    umax[empty] = np.nan
    bucket = np.clip((p * np.float32(0.1)).astype(np.int64), 0, HIST_BUCKETS - 1)
    hist = np.bincount(ef * HIST_BUCKETS + bucket, minlength=size * HIST_BUCKETS)
    return UtilFold(
        count,
        covered,
        busy,
        held_idle,
        umin.reshape(shape),
        umax.reshape(shape),
        hist.astype(np.int32).reshape(n_keys, n_windows, HIST_BUCKETS),
    )


def _fold_gauge_np(key, t0, t1, energy_delta, power, mem, temp, lo, window_us, n_keys, n_windows):
    shape = (n_keys, n_windows)
    size = n_keys * n_windows
    ok, we = _end_window(t1, lo, window_us, n_windows)
    ef = key[ok].astype(np.int64) * n_windows + we[ok]
    count = np.bincount(ef, minlength=size).astype(np.int32).reshape(shape)

    def maxof(values):
        v = values[ok]
        good = ~np.isnan(v)
        out = np.full(size, -np.inf)
        np.maximum.at(out, ef[good], v[good])
        out[np.isneginf(out)] = np.nan
        return out.reshape(shape)

    pv = power[ok]
    pgood = ~np.isnan(pv)
    psum = np.bincount(ef[pgood], pv[pgood], size).reshape(shape)
    pcount = np.bincount(ef[pgood], minlength=size).astype(np.int32).reshape(shape)
    egood = ~np.isnan(energy_delta) & (t1 > t0)
    rows, win, ov = _split(t0[egood], t1[egood], lo, window_us, n_windows)
    span = (t1[egood] - t0[egood]).astype(np.float64)
    e = energy_delta[egood][rows] * ov / span[rows]
    energy = np.bincount(key[egood][rows].astype(np.int64) * n_windows + win, e, size).reshape(shape)
    return GaugeFold(count, energy, psum, pcount, maxof(power), maxof(mem), maxof(temp))


# ----------------------------------------------------------------------------- entry points


BACKENDS = ("numba", "numpy")


def _as(arr, dtype):
    return np.ascontiguousarray(arr, dtype=dtype)


def fold_util(key, t0_us, t1_us, pct, held, lo_us, window_us, n_keys, n_windows, *, reference=False):
    args = (
        _as(key, np.int32),
        _as(t0_us, np.int64),
        _as(t1_us, np.int64),
        _as(pct, np.float32),
        _as(held, np.uint8),
        np.int64(lo_us),
        np.int64(window_us),
        int(n_keys),
        int(n_windows),
    )
    if reference:
        return _fold_util_np(*args)
    from gpuledger.agent import kernels_numba

    return UtilFold(*kernels_numba._fold_util_nb(*args))


def fold_gauge(key, t0_us, t1_us, energy_delta_mj, power_mw, mem_bytes, temp_c, lo_us, window_us, n_keys,
               n_windows, *, reference=False):
    args = (
        _as(key, np.int32),
        _as(t0_us, np.int64),
        _as(t1_us, np.int64),
        _as(energy_delta_mj, np.float64),
        _as(power_mw, np.float64),
        _as(mem_bytes, np.float64),
        _as(temp_c, np.float64),
        np.int64(lo_us),
        np.int64(window_us),
        int(n_keys),
        int(n_windows),
    )
    if reference:
        return _fold_gauge_np(*args)
    from gpuledger.agent import kernels_numba

    return GaugeFold(*kernels_numba._fold_gauge_nb(*args))
