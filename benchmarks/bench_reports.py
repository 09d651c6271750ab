"""Reports at fleet scale: every report on a month of a fleet, against a bare aggregate of the same rows.

Loads `--gpus` GPUs x `--days` days through the collector's real insert path (fleetgen.load_fleet:
validate, ingest-time attribution, group commits, then the sealer's hourly rollups), then times each
report as finance runs it (the same functions the Query service calls) against a bare ClickHouse
`GROUP BY host_id` over the same raw windows, back to back, several times, and records each report's
peak memory above what the process held before it (VmHWM reset through /proc/self/clear_refs; chDB
runs inside this process, so that is the engine's memory too). Also measured:
- what FINAL costs on the raw table (the bare aggregate with and without it);
- reads never stall writes: insert rate of a further day's windows alone and while the largest report
  runs in a loop on another thread.
Result: a table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fleetgen import DAY_MS, load_fleet  # noqa: E402

from gpuledger.collector import reports  # noqa: E402
from gpuledger.collector.pricing import Pricing  # noqa: E402
from gpuledger.collector.store import Store, StoreOptions  # noqa: E402


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def timed(fn, repeat: int) -> tuple[list[float], float, object]:
    """Wall times of `repeat` runs and the peak extra memory (MB) over them."""
    times, peak, out = [], 0.0, None
    for _ in range(repeat):
        _reset_peak()
        base = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peak = max(peak, (_rss_kb("VmHWM") - base) / 1024)
    return times, peak, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=100)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default="", help="keep the store here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="the store in --data-dir is already loaded")
    ap.add_argument("--report-threads", type=int, default=0,
                    help="collector.report_threads: ClickHouse threads per report (0: all cores)")
    args = ap.parse_args()
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="gpuledger-bench-reports-"))
    tmp.mkdir(parents=True, exist_ok=True)
    end_ms = int(time.time() * 1000) // DAY_MS * DAY_MS - DAY_MS  # a day boundary, a day ago
    store = Store(f"chdb://{tmp / 'chdb'}", StoreOptions(readers=3, report_threads=args.report_threads))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if not args.reuse:
        t0 = time.perf_counter()
        st = load_fleet(store, args.gpus, args.days, end_ms,
                        progress=lambda d, n: log(f"  loaded day {d}/{n} ({time.perf_counter() - t0:.0f} s)"))
        log(f"loaded {st.gpu_windows:,} GPU-windows and {st.proc_windows:,} process windows in {st.load_s:.0f} s "
            f"({st.gpu_windows / st.load_s:,.0f} GPU-windows/s); rolled up in {st.seal_s:.0f} s")
        load = {"gpu_windows": st.gpu_windows, "proc_windows": st.proc_windows, "load_s": round(st.load_s, 1),
                "seal_s": round(st.seal_s, 1)}
    else:
        load = {}
    rows, comp, _ = store.stored_bytes("gpu_windows")
    pricing = Pricing.default()
    since, until = end_ms - args.days * DAY_MS, end_ms
    now = end_ms + 3_600_000
    db = store.db
    params = {"a": since, "b": until}
    bare_sql = (f"SELECT host_id, sum(busy_ms), sum(idle_held_ms), sum(idle_free_ms), sum(unmonitored_ms) "
                f"FROM {db}.gpu_windows{{final}} WHERE window_start_ms >= {{{{a:Int64}}}} "
                "AND window_start_ms < {{b:Int64}} GROUP BY host_id")

    def bare(final: bool = False):
        return store.query_rows(bare_sql.format(final=" FINAL" if final else ""), params)

    from gpuledger.schema import from_ipc
    from gpuledger.v1 import telemetry_pb2 as pb

    def via_query(report: str, by: str = "", filters: dict | None = None):
        """The report as the Query service computes it (reports.run: bill prices, Arrow reply), less the socket."""
        reply = reports.run(store, pricing, pb.ReportRequest(report=report, since_ms=since, until_ms=until, by=by,
                                                             filters=filters or {}), now)
        return from_ipc(reply.arrow) if reply.arrow else []

    cases = {
        "idle --by host": lambda: via_query("idle", "host"),
        "idle --by gpu": lambda: via_query("idle", "gpu"),
        "cost --by team": lambda: via_query("cost", "team"),
        "cost --by experiment": lambda: via_query("cost", "experiment"),
        "cost --by host": lambda: via_query("cost", "host"),
        "export focus --granularity day": lambda: via_query("focus", "day"),
        "heatmap host x 6 h (report html)": lambda: via_query("heatmap", "host", {"step_hours": "6"}),
        "heatmap gpu x 1 h": lambda: via_query("heatmap", "gpu"),
        "endpoints": lambda: via_query("endpoints"),
        "runs --experiment": lambda: via_query("runs", "", {"experiment": "exp-llm-pretrain"}),
        "baseline (no bill)": lambda: via_query("baseline"),
    }
    bare(), bare(True)  # warm caches for the reference as for the reports
    results = {}
    for name, fn in cases.items():
        fn()  # warm-up: first-use costs (imports, caches) are not the report's
        times, peak, out = timed(fn, args.repeat)
        ref_times, _, _ = timed(bare, args.repeat)
        ratios = [a / b for a, b in zip(times, ref_times, strict=True)]
        results[name] = {"s_median": round(statistics.median(times), 3), "s_min": round(min(times), 3),
                         "s_max": round(max(times), 3), "bare_s_median": round(statistics.median(ref_times), 3),
                         "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                         "peak_extra_mb": round(peak), "rows": len(out) if hasattr(out, "__len__") else None}
        log(f"{name:34s} {statistics.median(times):7.2f} s  bare {statistics.median(ref_times):6.2f} s  "
            f"x{min(ratios):.2f}-{max(ratios):.2f}  +{peak:6.0f} MB  {results[name]['rows']} rows")
    final_times, _, _ = timed(lambda: bare(True), args.repeat)
    plain_times, _, _ = timed(bare, args.repeat)
    final = {"bare_s": round(statistics.median(plain_times), 3), "bare_final_s": round(statistics.median(final_times), 3),
             "final_ratio": round(statistics.median(final_times) / statistics.median(plain_times), 2)}
    log(f"FINAL on the raw table: {final['bare_final_s']} s vs {final['bare_s']} s without (x{final['final_ratio']})")

    # reads never stall writes: insert a further day, alone and while the largest report runs in a loop
    import numpy as np
    from fleetgen import _host_day

    from gpuledger.collector import tables
    from gpuledger.collector.validate import Limits, validate

    hosts = max(1, args.gpus // 8)

    def day_batches(day: int):
        return [validate(_host_day(h, day, end_ms + (day - args.days) * DAY_MS, np.random.default_rng((9, h, day)))[0],
                         end_ms + 3 * DAY_MS, Limits(max_batch_rows=1 << 22)) for h in range(hosts)]

    def insert_rate(batches) -> float:
        known: dict = {}
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(batches), 8):
            group = batches[i:i + 8]
            store.insert(tables.build(group, now, int(time.time() * 1e6) + i, known))
            n += sum(v.gpu.num_rows for v in group)
        return n / (time.perf_counter() - t0)

    alone = insert_rate(day_batches(args.days))
    busy = threading.Event()
    stop = threading.Event()
    biggest = max(results, key=lambda k: results[k]["s_median"])

    def loop():
        while not stop.is_set():
            busy.set()
            cases[biggest]()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    busy.wait()
    during = insert_rate(day_batches(args.days + 1))
    stop.set()
    th.join()
    ingest = {"alone_windows_per_s": round(alone), "during_report_windows_per_s": round(during),
              "ratio": round(during / alone, 2), "report": biggest}
    log(f"inserts alone {alone:,.0f} GPU-windows/s; while '{biggest}' runs {during:,.0f}/s (x{during / alone:.2f})")
    out = {"bench": "reports", "gpus": args.gpus, "days": args.days, "report_threads": args.report_threads, "gpu_windows_stored": rows,
           "bytes_per_gpu_window": round(comp / max(rows, 1), 2), "load": load, "reports": results, "final": final,
           "ingest_during_report": ingest, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    print(json.dumps(out))
    store.close()
    if not args.data_dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
