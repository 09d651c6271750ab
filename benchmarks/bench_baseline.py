"""Finance baseline: bill import through the collector, and the baseline report on a month of a GPU fleet.

1. Import. A generated FOCUS 1.2 Parquet file (bench_bill_import.generate: 10 million rows by
   default, benchmarks/out/, made once) is imported with `gpuledger bill import`'s code path
   (cli_finance.import_bills: streamed parse, Arrow chunks over Admin.Import) into a collector
   with an embedded store. Three processes, each its own peak RSS (ru_maxrss):
     collector  the server (gRPC, validation, chDB inserts);
     client     the importer;
     reference  the parser alone (bills.read_bills to the end), the most any import could reach.
   Result: rows/s of the import and of the parser, their ratio, both peaks, the collector's RSS
   before and after, and the rows the store counts afterwards (must equal the rows imported).
2. Baseline. A month of a GPU fleet (default 1,000 GPUs, 30 days of 10 s windows) is loaded into an
   embedded store, with a FOCUS bill for its instances, and `baseline_document` timed against
   the idle report (`idle_rows`) on the same store and range (the reference: one pass over the
   same rollups). The loader is `load_fleet` from benchmarks/bench_reports.py when that module has
   it; otherwise the one below (`load_month`: windows generated inside ClickHouse by INSERT ...
   SELECT, rollups built by the collector's own sealer).

    python benchmarks/bench_baseline.py [--rows 10000000] [--gpus 1000] [--days 30] [--skip-import]
                                        [--skip-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

HOUR_MS = 3_600_000
WINDOW_MS = 10_000


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- 1. import through the collector


def serve(data_dir: str) -> None:
    """Child: an embedded collector; prints its port, waits for stdin to close, prints its figures."""
    from gpuledger.collector.billing import current_sql
    from gpuledger.demo import start_embedded_collector

    c = start_embedded_collector(Path(data_dir))
    print(json.dumps({"port": c.port, "rss_before_mib": _rss_mib()}), flush=True)
    sys.stdin.read()
    rows = c.store.query_rows(f"SELECT count() FROM {current_sql(c.store, 'bill')}")[0][0]
    out = {"stored_rows": int(rows), "rss_after_mib": _rss_mib(), "peak_rss_mib": _peak_mib()}
    c.stop(grace_s=5)
    c.store.close()
    print(json.dumps(out), flush=True)


def client(address: str, path: str) -> None:
    from gpuledger.collector.cli_finance import import_bills

    t0 = time.perf_counter()
    reply = import_bills(address, [path])
    print(json.dumps({"rows": int(reply.rows_stored), "seconds": time.perf_counter() - t0,
                      "refused": int(sum(f.rows_refused for f in reply.files)), "slices": len(reply.slices_replaced),
                      "peak_rss_mib": _peak_mib()}))


def parse_only(path: str) -> None:
    from bench_bill_import import run_gpuledger

    print(json.dumps(run_gpuledger(path)))


def bench_import(rows: int) -> dict:
    from bench_bill_import import generate

    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"focus-bench-{rows}.parquet"
    if not path.exists():
        generate(path, rows)
    me = str(Path(__file__).resolve())
    ref = json.loads(subprocess.run([sys.executable, me, "--parse-only", str(path)], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="gl-bench-import-") as tmp:
        srv = subprocess.Popen([sys.executable, me, "--serve", tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        try:
            started = json.loads(srv.stdout.readline())
            proc = subprocess.run([sys.executable, me, "--client", f"127.0.0.1:{started['port']}", str(path)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            ours = json.loads(proc.stdout.strip().splitlines()[-1])
            srv.stdin.close()
            server = json.loads(srv.stdout.readline())
        finally:
            if srv.poll() is None:
                srv.wait(timeout=120)
    return {
        "bench": "bill_import_through_collector", "rows": rows, "file_mib": round(path.stat().st_size / 2**20, 1),
        "import_rows_per_s": round(ours["rows"] / ours["seconds"]), "import_seconds": round(ours["seconds"], 1),
        "parse_only_rows_per_s": round(ref["rows"] / ref["seconds"]),
        "ratio_import_to_parse": round((ours["rows"] / ours["seconds"]) / (ref["rows"] / ref["seconds"]), 3),
        "client_peak_rss_mib": round(ours["peak_rss_mib"]), "parse_only_peak_rss_mib": round(ref["peak_rss_mib"]),
        "collector_rss_before_mib": round(started["rss_before_mib"]),
        "collector_rss_after_mib": round(server["rss_after_mib"]),
        "collector_peak_rss_mib": round(server["peak_rss_mib"]),
        "rows_stored": ours["rows"], "rows_counted_by_store": server["stored_rows"], "refused": ours["refused"],
        "slices": ours["slices"], "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


# ----------------------------------------------------------------------------- 2. the baseline on a month


PROFILES = ("training", "inference", "notebook", "idle")
_BUSY = ("multiIf(prof = 0, 8000 + r * 2, prof = 1, 1500 + r * 6, prof = 2, r % 400, 0)")


def load_month(store, gpus: int, days: int, start_ms: int) -> dict:
    """A fleet of p5.48xlarge hosts (8 GPUs each) for `days`: every GPU window and process window
    generated inside ClickHouse (profiles by GPU: training, inference endpoint, notebook, idle), the facts
    the collector keeps (hosts with instance ids, GPUs, processes with tags, sessions), then the
    hourly rollups built by the collector's sealer, as a live collector would have them."""
    import pyarrow as pa

    from gpuledger.collector.rollup import seal
    from gpuledger.collector.simbill import resource_ids

    db, n_hosts, n_win = store.db, max(1, gpus // 8), days * 86_400_000 // WINDOW_MS
    end_ms = start_ms + n_win * WINDOW_MS
    hosts = [f"bench-{h:04d}" for h in range(n_hosts)]
    never = 2**63 - 1
    for h, host in enumerate(hosts):
        src = (f"SELECT number % 8 AS g, intDiv(number, 8) AS w, (g + {h}) % 4 AS prof, "
               f"cityHash64({h}, number) % 1000 AS r, {_BUSY} AS busy FROM numbers({8 * n_win})")
        store.command(
            f"""INSERT INTO {db}.gpu_windows (host_id, gpu_uuid, window_start_ms, window_ms, sample_count, covered_ms,
                   busy_ms, idle_held_ms, idle_free_ms, unmonitored_ms, util_min_pct, util_max_pct)
                SELECT '{host}', concat('GPU-{host}-', toString(g)), {start_ms} + w * {WINDOW_MS}, {WINDOW_MS}, 60,
                       {WINDOW_MS}, busy, if(prof = 3, 0, {WINDOW_MS} - busy), if(prof = 3, {WINDOW_MS}, 0), 0, 0, 100
                FROM ({src})""")
        store.command(
            f"""INSERT INTO {db}.proc_windows (host_id, gpu_uuid, window_start_ms, pid, proc_start_ms, held_ms, busy_ms,
                   mem_max_bytes, active_attr_us, held_attr_us)
                SELECT '{host}', concat('GPU-{host}-', toString(g)), {start_ms} + w * {WINDOW_MS}, 1000 + g, {start_ms},
                       {WINDOW_MS}, busy, 0, busy * 1000, ({WINDOW_MS} - busy) * 1000
                FROM ({src}) WHERE prof != 3""")
    tags = {0: [("team", "research"), ("project", "llm"), ("workload", "train"), ("phase", "pretrain")],
            1: [("team", "search"), ("project", "ranker"), ("workload", "inference"), ("endpoint", "ranker")],
            2: [("team", "vision"), ("project", "detector"), ("workload", "notebook")]}
    procs, gpu_rows, sessions, host_rows, marks = [], [], [], [], []
    for h, host in enumerate(hosts):
        _, iid = resource_ids("aws", "us-east-1", host)
        host_rows.append((host, host, "aws", "us-east-1", "p5.48xlarge", 8, [("team", "platform")], "bench", 0, iid))
        sessions.append((host, 1, start_ms, "", 0, never, 0, never, end_ms, end_ms))
        for g in range(8):
            uuid, prof = f"GPU-{host}-{g}", (g + h) % 4
            gpu_rows.append((host, uuid, g, "NVIDIA H100", 80 << 30, "samples", False, start_ms, "", 1.0))
            sessions.append((host, 1, start_ms, uuid, WINDOW_MS, start_ms, end_ms, never, 0, end_ms))
            if prof != 3:
                procs.append((host, 1000 + g, start_ms, PROFILES[prof], "", "", tags[prof], end_ms))
        marks += [(host, hr, 1) for hr in range(start_ms // HOUR_MS * HOUR_MS, end_ms, HOUR_MS)]

    def table(rows, names, types):
        return pa.table({n: pa.array([r[i] for r in rows], t) for i, (n, t) in enumerate(zip(names, types,
                                                                                            strict=True))})

    tag_t = pa.map_(pa.string(), pa.string())
    store.insert_table("hosts", table(host_rows, ["host_id", "hostname", "provider", "region", "instance_type",
                                                  "gpu_count", "tags", "agent_version", "updated_ms", "instance_id"],
                                      [pa.string()] * 5 + [pa.uint32(), tag_t, pa.string(), pa.int64(), pa.string()]))
    store.insert_table("gpus", table(gpu_rows, ["host_id", "uuid", "gpu_index", "name", "mem_total_bytes",
                                                "util_method", "mig", "first_window_ms", "parent_uuid", "share"],
                                     [pa.string(), pa.string(), pa.uint32(), pa.string(), pa.uint64(), pa.string(),
                                      pa.bool_(), pa.int64(), pa.string(), pa.float32()]))
    store.insert_table("processes", table(procs, ["host_id", "pid", "start_ms", "command", "container_id", "pod_uid",
                                                  "tags", "last_seen_ms"],
                                          [pa.string(), pa.uint32(), pa.int64(), pa.string(), pa.string(), pa.string(),
                                           tag_t, pa.int64()]))
    store.insert_table("sessions", table(sessions, ["host_id", "agent_epoch", "session_start_ms", "gpu_uuid",
                                                    "window_ms", "first_window_ms", "last_end_ms",
                                                    "declared_first_ms", "stopped_ms", "received_ms"],
                                         [pa.string(), pa.uint64(), pa.int64(), pa.string(), pa.uint32()]
                                         + [pa.int64()] * 5))
    store.insert_table("rollup_marks", table(marks, ["host_id", "hour_ms", "mark_us"],
                                             [pa.string(), pa.int64(), pa.int64()]))
    t0 = time.perf_counter()
    sealed = seal(store, 2**62, 0)
    return {"hosts": hosts, "gpus": n_hosts * 8, "windows": n_hosts * 8 * n_win, "since": start_ms, "until": end_ms,
            "sealed_host_hours": sealed, "seal_seconds": time.perf_counter() - t0}


def bench_baseline(gpus: int, days: int) -> dict:
    from gpuledger.agent.simulate import SimHost
    from gpuledger.collector import billing
    from gpuledger.collector.baseline import baseline_document
    from gpuledger.collector.bills import read_bills
    from gpuledger.collector.pricing import Pricing
    from gpuledger.collector.reports import idle_rows
    from gpuledger.collector.simbill import write_sim_bill
    from gpuledger.collector.store import Store
    from gpuledger.schema import to_ipc
    from gpuledger.v1 import telemetry_pb2 as pb

    start_ms = 1_793_491_200_000  # 2026-11-01T00:00Z
    with tempfile.TemporaryDirectory(prefix="gl-bench-baseline-") as tmp:
        store = Store(f"chdb://{tmp}/chdb")
        t0 = time.perf_counter()
        try:
            from bench_reports import load_fleet  # the lead's loader, when it has landed
            loaded = load_fleet(store, gpus=gpus, days=days, start_ms=start_ms)
            loader = "bench_reports.load_fleet"
        except (ImportError, TypeError):
            loaded = load_month(store, gpus, days, start_ms)
            loader = "bench_baseline.load_month"
        load_s = time.perf_counter() - t0
        since, until = loaded["since"], loaded["until"]
        # the month's bill for the fleet's instances (hourly rows) and one instance no agent reports
        t0 = time.perf_counter()
        sim_hosts = [SimHost(h, "aws", "us-east-1", "p5.48xlarge", "H100", ()) for h in loaded["hosts"]]
        bill = write_sim_bill(Path(tmp) / "bill", since, until, sim_hosts)
        imp = billing.Importer(store, time.time_ns() // 1000)
        reader = read_bills(bill.focus_path)
        for chunk in reader:
            imp.add(pb.ImportChunk(kind="bill", file_name=bill.focus_path.name, arrow=to_ipc(chunk.table),
                                   slice_keys=sorted(str(s) for s in chunk.slices)))
        imp.commit()
        bill_s = time.perf_counter() - t0
        pricing = Pricing.default()
        now_ms = until + HOUR_MS
        times, ref_times = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            doc = baseline_document(store, pricing, since, until, now_ms)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            idle_rows(store, billing.report_pricing(store, pricing, since, until), since, until, "host", {}, now_ms)
            ref_times.append(time.perf_counter() - t0)
        store.close()
    best, ref = min(times), min(ref_times)
    return {
        "bench": "baseline_month", "loader": loader, "gpus": loaded["gpus"], "days": days,
        "gpu_windows": loaded.get("windows"), "load_seconds": round(load_s, 1),
        "seal_seconds": round(loaded.get("seal_seconds", 0.0), 1),
        "sealed_host_hours": loaded.get("sealed_host_hours"), "bill_rows": imp.rows_stored,
        "bill_import_seconds": round(bill_s, 1), "baseline_seconds": round(best, 2),
        "idle_report_seconds": round(ref, 2), "ratio_baseline_to_idle": round(best / ref, 2),
        "check_monitored_share": round(doc["monitored_share"], 4), "check_unwatched": doc["unwatched_gpu_instances"],
        "check_endpoint_up_hours": round(doc["endpoint_up_hours"], 1), "peak_rss_mib": round(_peak_mib()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--gpus", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--skip-import", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--serve")
    ap.add_argument("--client", nargs=2)
    ap.add_argument("--parse-only")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.client:
        return client(*args.client)
    if args.parse_only:
        return parse_only(args.parse_only)
    if not args.skip_import:
        print(json.dumps(bench_import(args.rows)), flush=True)
    if not args.skip_baseline:
        print(json.dumps(bench_baseline(args.gpus, args.days)), flush=True)


if __name__ == "__main__":
    main()
