"""Window kernel throughput on one core: numba vs the numpy reference vs a streaming read.

The read limit is measured in the same run: one pass over the same input arrays (a sum of
each), which is what any kernel must at least do. Result: one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np

from gpuledger.agent.kernels import fold_util

W = 10_000_000


def make_input(n: int, n_gpus: int = 8, period_us: int = 166_667, seed: int = 0):
    """Samples as an agent holds them: GPUs interleaved per tick, driver periods, integer percent."""
    rng = np.random.default_rng(seed)
    per_gpu = n // n_gpus
    t1 = np.repeat(np.arange(1, per_gpu + 1, dtype=np.int64) * period_us, n_gpus)
    key = np.tile(np.arange(n_gpus, dtype=np.int32), per_gpu)
    pct = rng.integers(0, 101, t1.size).astype(np.float32)
    held = (rng.random(t1.size) < 0.7).astype(np.uint8)
    n_win = int(t1[-1] // W) + 1
    return key, t1 - period_us, t1, pct, held, n_gpus, n_win


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(n: int = 24_000_000, repeat: int = 5) -> dict:
    key, t0, t1, pct, held, n_keys, n_win = make_input(n)
    n = key.size
    fold_util(key[:1000], t0[:1000], t1[:1000], pct[:1000], held[:1000], 0, W, n_keys, n_win)  # compile / load cache
    nb_s = best_of(lambda: fold_util(key, t0, t1, pct, held, 0, W, n_keys, n_win), repeat)
    m = min(n, 4_000_000)  # the reference is slow: time it on a slice
    ref_s = best_of(lambda: fold_util(key[:m], t0[:m], t1[:m], pct[:m], held[:m], 0, W, n_keys,
                                      int(t1[m - 1] // W) + 1, reference=True), 2) * n / m
    read_s = best_of(lambda: (key.sum(), t0.sum(), t1.sum(), pct.sum(), held.sum()), repeat)
    in_bytes = sum(a.nbytes for a in (key, t0, t1, pct, held))
    res = {
        "bench": "window_kernel",
        "samples": n,
        "numba_samples_per_s": n / nb_s,
        "numpy_ref_samples_per_s": n / ref_s,
        "read_limit_samples_per_s": n / read_s,
        "read_limit_gb_per_s": in_bytes / read_s / 1e9,
        "numba_vs_read_limit": read_s / nb_s,
        "numba_vs_numpy_ref": ref_s / nb_s,
        "bytes_per_sample": in_bytes / n,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return res


if __name__ == "__main__":
    print(json.dumps(main()))
