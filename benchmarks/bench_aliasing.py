"""Aliasing: a scraped utilization gauge vs the integral of the driver's samples, on bursty work.

NVML reports utilization as the percent of each driver sample period (1/6 s to 1 s, by GPU) in
which a kernel ran (NVML API reference, `nvmlUtilization_t`). A Prometheus scrape of
dcgm-exporter reads that gauge once per scrape interval (NVIDIA's DCGM docs configure
`scrape_interval: 30s`; 15 s is the other common value) and a dashboard averages the scraped
values. gpuledger instead reads every period from the driver's sample buffer and integrates
busy_ms = sum(period x percent).

For each bursty simulator profile and each driver period, over a long span, this reports the idle
share seen by:
  (a) a 15 s scrape and (b) a 30 s scrape of the gauge, for every scrape phase (offset of the
      first scrape) in `--phase-step` steps across the interval; the gauge at a scrape instant is
      the percent of the most recent driver period that has ended;
  (c) gpuledger: the same driver samples through the agent's Windower and window kernels;
  (d) the ground truth: the exact busy time of the simulator's busy-interval model.

Model notes: the scrape reads the driver's latest period directly. A real dcgm-exporter adds its
own collection cadence (DCGM refreshes cached samples every collection interval; a scrape returns
the cached value), which can only make the scraped series coarser, never finer. The loops are
exactly periodic; a real loop's period wanders, which moves the scrape phase over a long span.

Prints a markdown table, one JSON summary line (for run_all.py), and writes the full result,
per-phase idle shares included, to benchmarks/out/aliasing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from gpuledger.agent.simulate import BURSTY, Loop, SimGpu, SimulatedSource
from gpuledger.agent.windows import Windower

START_US = 1_700_000_000_000_000  # a whole number of 10 s windows
DRIVER_PERIODS_US = {"1/6 s": 166_667, "1 s": 1_000_000}
SCRAPES_S = (15, 30)


def scrape_idle_shares(t1_us: np.ndarray, pct: np.ndarray, lo_us: int, hi_us: int, interval_us: int,
                       phases_us: np.ndarray, bucket_us: int) -> tuple[np.ndarray, np.ndarray]:
    """Idle shares (0..1) from averaging the gauge scraped every interval_us, one row per phase:
    over [lo, hi) and over each bucket [lo + j * bucket_us, ...) (a dashboard's shorter range).

    Scrapes happen at lo + phase + k * interval while before hi. Each reads the percent of the
    latest driver period that ended at or before the scrape (t1_us sorted); a scrape before the
    first period has ended reads nothing and is dropped, as Prometheus would store no sample.
    """
    k = np.arange((hi_us - lo_us) // interval_us + 1, dtype=np.int64)
    at = lo_us + phases_us[:, None] + k[None, :] * interval_us
    idx = np.searchsorted(t1_us, at, side="right") - 1
    ok = (at < hi_us) & (idx >= 0)
    gauge = np.where(ok, pct[np.maximum(idx, 0)].astype(np.float64), 0.0)
    whole = 1.0 - gauge.sum(axis=1) / ok.sum(axis=1) / 100.0
    n_b = -(-(hi_us - lo_us) // bucket_us)
    flat = np.arange(phases_us.size)[:, None] * n_b + np.clip((at - lo_us) // bucket_us, 0, n_b - 1)
    size = phases_us.size * n_b
    s = np.bincount(flat[ok], gauge[ok], size).reshape(-1, n_b)
    c = np.bincount(flat[ok], minlength=size).reshape(-1, n_b)
    return whole, 1.0 - s / np.maximum(c, 1) / 100.0


def gpuledger_busy_ms(src: SimulatedSource, readings, lo_us: int, hi_us: int, bucket_us: int,
                      kernels: str) -> tuple[np.ndarray, np.ndarray]:
    """busy_ms and covered_ms per GPU and bucket from the agent's own path: Windower -> window kernels."""
    w = Windower(src.gpus(), window_s=10.0, lateness_s=0.0, start_us=lo_us, kernels=kernels)
    w.add(readings)
    t = w.close(hi_us, final=True).gpu
    uuids = t.column("gpu_uuid").to_numpy(zero_copy_only=False)
    start_us = t.column("window_start_ms").to_numpy() * 1000
    n_b = -(-(hi_us - lo_us) // bucket_us)
    bucket = np.clip((start_us - lo_us) // bucket_us, 0, n_b - 1)
    busy, covered = np.zeros((len(src.gpus()), n_b)), np.zeros((len(src.gpus()), n_b))
    for g, f in enumerate(src.gpus()):
        m = uuids == f.uuid
        busy[g] = np.bincount(bucket[m], t.column("busy_ms").to_numpy()[m], n_b)
        covered[g] = np.bincount(bucket[m], t.column("covered_ms").to_numpy()[m], n_b)
    return busy, covered


def _row(profile, period, method, shares, truth, bucket_shares, bucket_truth, **extra):
    shares = np.asarray(shares, np.float64)
    err = np.abs(shares - truth) * 100.0
    return {"profile": profile, "driver_period": period, "method": method, **extra,
            "idle_share_mean": float(shares.mean()), "idle_share_min": float(shares.min()),
            "idle_share_max": float(shares.max()), "worst_error_points": float(err.max()),
            "worst_bucket_error_points": float(np.abs(bucket_shares - bucket_truth).max() * 100.0)}


def run(hours: float, phase_step_s: float, kernels: str, seed: int, bucket_h: float = 1.0,
        slips=(0.001, 0.005)) -> dict:
    profiles = tuple(BURSTY)
    rows, slip_rows, by_phase = [], [], {}
    timings = {}
    bucket_us = int(bucket_h * 3600e6)
    for period_name, period_us in DRIVER_PERIODS_US.items():
        t = time.perf_counter()
        src = SimulatedSource("aliasing", "H100", [SimGpu(p) for p in profiles], START_US, seed=seed,
                              sample_period_us=period_us)
        n_periods = int(hours * 3600e6) // period_us
        lo, hi = START_US, START_US + n_periods * period_us  # a whole number of driver periods
        readings = src.poll(hi)
        timings[f"simulate {period_name}"] = time.perf_counter() - t
        t = time.perf_counter()
        busy_ms, covered_ms = gpuledger_busy_ms(src, readings, lo, hi, bucket_us, kernels)
        timings[f"windows {period_name}"] = time.perf_counter() - t
        b_lo = lo + np.arange(busy_ms.shape[1], dtype=np.int64) * bucket_us
        b_hi = np.minimum(b_lo + bucket_us, hi)
        u = readings.util
        for g, profile in enumerate(profiles):
            m = u.gpu == g
            t1, pct = u.t1_us[m], u.pct[m]
            if t1.size != n_periods:
                raise SystemExit(f"{profile} {period_name}: {t1.size} samples, expected {n_periods}")
            truth = 1.0 - src.busy_us(g, lo, hi)[0] / (hi - lo)
            b_truth = 1.0 - src.busy_us(g, b_lo, b_hi) / (b_hi - b_lo)
            ledger = 1.0 - busy_ms[g].sum() / covered_ms[g].sum()
            b_ledger = 1.0 - busy_ms[g] / covered_ms[g]
            # each integer-percent sample is within half a percent of its period's exact busy time
            if abs(ledger - truth) > 0.005 or abs(covered_ms[g].sum() - (hi - lo) / 1000) > 1:
                raise SystemExit(f"{profile} {period_name}: gpuledger idle share {ledger:.6f} vs truth {truth:.6f}")
            for interval_s in SCRAPES_S:
                phases_us = np.arange(0, interval_s * 1e6, phase_step_s * 1e6).astype(np.int64)
                shares, b_shares = scrape_idle_shares(t1, pct, lo, hi, interval_s * 1_000_000, phases_us, bucket_us)
                rows.append(_row(profile, period_name, f"scrape {interval_s} s", shares, truth, b_shares, b_truth))
                by_phase[f"{profile}|{period_name}|scrape {interval_s} s"] = {
                    "phase_s": (phases_us / 1e6).round(3).tolist(), "idle_share": shares.round(5).tolist()}
                if interval_s == max(SCRAPES_S) and period_name == "1 s" and isinstance(BURSTY[profile], Loop):
                    # a loop whose cycle is a fraction `slip` shorter than a multiple of the scrape interval
                    # moves against the scrape exactly as the exact loop does against a scrape interval
                    # `slip` longer: the same samples, scraped at that interval
                    for slip in slips:
                        iv = int(round(interval_s * 1e6 * (1 + slip)))
                        sh, bsh = scrape_idle_shares(t1, pct, lo, hi, iv, phases_us, bucket_us)
                        slip_rows.append(_row(profile, period_name, f"scrape {interval_s} s", sh, truth, bsh,
                                              b_truth, slip=slip))
            rows.append(_row(profile, period_name, "gpuledger (driver samples)", [ledger], truth, b_ledger, b_truth))
            rows.append(_row(profile, period_name, "ground truth", [truth], truth, b_truth, b_truth))
    return {"bench": "aliasing", "hours": hours, "phase_step_s": phase_step_s, "bucket_hours": bucket_h,
            "kernels": kernels, "seed": seed, "rows": rows, "slip_rows": slip_rows, "timings_s": timings,
            "by_phase": by_phase}


def table(rows, bucket_h: float, slip: bool = False) -> str:
    head = "| profile | driver period | method |" + (" loop cycle off by |" if slip else "")
    out = [head + f" idle share mean | min | max | worst error vs truth (points) | worst {bucket_h:g} h error |",
           "| --- " * (head.count("|") - 1 + 5) + "|"]
    for r in rows:
        out.append(f"| {r['profile']} | {r['driver_period']} | {r['method']} |"
                   + (f" {100 * r['slip']:.1f} % |" if slip else "")
                   + f" {100 * r['idle_share_mean']:.1f} % | {100 * r['idle_share_min']:.1f} % "
                   f"| {100 * r['idle_share_max']:.1f} % | {r['worst_error_points']:.2f} "
                   f"| {r['worst_bucket_error_points']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=6.0, help="simulated span (default 6)")
    ap.add_argument("--phase-step", type=float, default=0.1, help="scrape phase step in seconds (default 0.1)")
    ap.add_argument("--kernels", choices=("numba", "numpy"), default="numba", help="window kernels (default numba)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.hours * 3600 < 2 * max(SCRAPES_S) or not 0 < args.phase_step <= min(SCRAPES_S):
        ap.error(f"--hours must cover two scrapes ({2 * max(SCRAPES_S)} s) and --phase-step lie in "
                 f"(0, {min(SCRAPES_S)}] seconds")
    t = time.perf_counter()
    res = run(args.hours, args.phase_step, args.kernels, args.seed)
    res["total_s"] = time.perf_counter() - t
    res["machine"] = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}
    print(table(res["rows"], res["bucket_hours"]))
    print()
    print(table(res["slip_rows"], res["bucket_hours"], slip=True))
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "aliasing.json").write_text(json.dumps(res, indent=1))
    summary = {k: v for k, v in res.items() if k != "by_phase"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
