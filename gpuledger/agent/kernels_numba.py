"""The numba implementations of the window kernels (the fast path); see kernels.py for the contract.

Imported on first use only, so that an agent configured with `kernels = "numpy"` never loads
numba and LLVM (about 100 MB of resident memory).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _win_of(t, lo, window_us, inv_w):
    """floor((t - lo) / window_us) without a 64-bit integer division (exact for t >= lo)."""
    d = t - lo
    w = np.int64(d * inv_w)
    if w * window_us > d:
        w -= 1
    elif (w + 1) * window_us <= d:
        w += 1
    return w


@njit(cache=True, nogil=True)
def _fold_util_nb(key, t0, t1, pct, held, lo, window_us, n_keys, n_windows):
    size = n_keys * n_windows
    count = np.zeros(size, np.int32)
    covered = np.zeros(size, np.float64)
    busy = np.zeros(size, np.float64)
    held_idle = np.zeros(size, np.float64)
    umin = np.full(size, np.inf, np.float32)
    umax = np.full(size, -np.inf, np.float32)
    hist = np.zeros(size * 10, np.int32)
    hi = lo + window_us * n_windows
    inv_w = 1.0 / window_us
    for i in range(key.shape[0]):
        p = pct[i]
        if not (p >= 0.0):  # NaN (no valid reading) or negative: the time stays unmonitored
            continue
        a = t0[i]
        b = t1[i]
        if b <= lo or a >= hi or b <= a:
            continue
        base = np.int64(key[i]) * n_windows
        frac = p * 0.01
        hf = 1.0 if held[i] != 0 else 0.0
        # the sample's end decides the window that counts it (count, min, max, histogram)
        if b <= hi:
            we = _win_of(b - 1, lo, window_us, inv_w)
            e = base + we
            count[e] += 1
            umin[e] = min(umin[e], p)
            umax[e] = max(umax[e], p)
            hist[e * 10 + min(np.int64(p * 0.1), 9)] += 1
            if a >= lo + we * window_us:  # the common case: the sample lies in one window
                ov = float(b - a)
                bz = ov * frac
                covered[e] += ov
                busy[e] += bz
                held_idle[e] += (ov - bz) * hf
                continue
        if a < lo:
            a = lo
        if b > hi:
            b = hi
        w = _win_of(a, lo, window_us, inv_w)
        wend = lo + (w + 1) * window_us
        j = base + w
        while True:
            seg_end = b if b < wend else wend
            ov = float(seg_end - a)
            bz = ov * frac
            covered[j] += ov
            busy[j] += bz
            held_idle[j] += (ov - bz) * hf
            if seg_end >= b:
                break
            a = seg_end
            j += 1
            wend += window_us
    for j in range(size):
        if count[j] == 0:
            umin[j] = np.nan
            umax[j] = np.nan
    shape = (n_keys, n_windows)
    return (count.reshape(shape), covered.reshape(shape), busy.reshape(shape), held_idle.reshape(shape),
            umin.reshape(shape), umax.reshape(shape), hist.reshape((n_keys, n_windows, 10)))


@njit(cache=True, nogil=True)
def _fold_gauge_nb(key, t0, t1, energy_delta, power, mem, temp, lo, window_us, n_keys, n_windows):
    count = np.zeros((n_keys, n_windows), np.int32)
    energy = np.zeros((n_keys, n_windows), np.float64)
    psum = np.zeros((n_keys, n_windows), np.float64)
    pcount = np.zeros((n_keys, n_windows), np.int32)
    pmax = np.full((n_keys, n_windows), np.nan, np.float64)
    mmax = np.full((n_keys, n_windows), np.nan, np.float64)
    tmax = np.full((n_keys, n_windows), np.nan, np.float64)
    hi = lo + window_us * n_windows
    for i in range(key.shape[0]):
        k = key[i]
        b = t1[i]
        if b > lo and b <= hi:
            we = (b - 1 - lo) // window_us
            count[k, we] += 1
            v = power[i]
            if v == v:
                psum[k, we] += v
                pcount[k, we] += 1
                cur = pmax[k, we]
                if cur != cur or v > cur:
                    pmax[k, we] = v
            v = mem[i]
            if v == v:
                cur = mmax[k, we]
                if cur != cur or v > cur:
                    mmax[k, we] = v
            v = temp[i]
            if v == v:
                cur = tmax[k, we]
                if cur != cur or v > cur:
                    tmax[k, we] = v
        e = energy_delta[i]
        a = t0[i]
        if e != e or b <= a:
            continue
        span = float(b - a)
        if b <= lo or a >= hi:
            continue
        ca = a if a > lo else lo
        cb = b if b < hi else hi
        w = (ca - lo) // window_us
        wend = lo + (w + 1) * window_us
        while True:
            seg_end = cb if cb < wend else wend
            energy[k, w] += e * (seg_end - ca) / span
            if seg_end >= cb:
                break
            ca = seg_end
            w += 1
            wend += window_us
    return count, energy, psum, pcount, pmax, mmax, tmax
