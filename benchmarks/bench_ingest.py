"""Collector ingest: windows/s end to end with concurrent agent streams, vs a bare insert_arrow.

End to end = gRPC over loopback, protobuf + Arrow decode, validation, group-committed insert
into embedded ClickHouse (chDB), acknowledgement. The agents run in a separate process so
they do not share the collector's interpreter lock; their batches are encoded beforehand.
The reference is `insert_arrow` of the very same rows (host_id added) straight into a table of
the same schema, in commits of the same size as the collector's. Result: one JSON line.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuledger.agent.runtime import encode_batch, gpu_infos, host_facts  # noqa: E402
from gpuledger.agent.source import GpuFacts  # noqa: E402
from gpuledger.agent.windows import Closed  # noqa: E402
from gpuledger.schema import GPU_WINDOW_SCHEMA, from_ipc  # noqa: E402


def template(n_gpus: int, n_windows: int, rng) -> pa.Table:
    n = n_gpus * n_windows
    busy = rng.integers(0, 10_001, n)
    held = rng.integers(0, 10_001 - busy)
    hist = np.zeros((n, 10), np.uint16)
    hist[np.arange(n), rng.integers(0, 10, n)] = 60
    cols = {
        "gpu_uuid": pa.array(np.repeat([f"GPU-{g:04d}" for g in range(n_gpus)], n_windows)),
        "window_start_ms": np.tile(np.arange(n_windows, dtype=np.int64) * 10_000, n_gpus),
        "window_ms": np.full(n, 10_000, np.uint32), "sample_count": np.full(n, 60, np.uint32),
        "covered_ms": np.full(n, 10_000, np.uint32), "busy_ms": busy.astype(np.uint32),
        "idle_held_ms": held.astype(np.uint32), "idle_free_ms": (10_000 - busy - held).astype(np.uint32),
        "unmonitored_ms": np.zeros(n, np.uint32), "util_min_pct": np.zeros(n, np.uint8),
        "util_max_pct": np.full(n, 100, np.uint8),
        "util_hist": pa.ListArray.from_arrays(np.arange(0, 10 * n + 1, 10, dtype=np.int32),
                                              pa.array(hist.reshape(-1), pa.uint16())),
        "mem_used_max_bytes": rng.integers(0, 80 << 30, n).astype(np.uint64),
        "power_mean_mw": rng.integers(50_000, 700_000, n).astype(np.uint32),
        "power_max_mw": rng.integers(50_000, 700_000, n).astype(np.uint32),
        "energy_mj": rng.integers(0, 7_000_000, n).astype(np.uint64),
        "temp_max_c": rng.integers(30, 90, n).astype(np.uint8),
    }
    for c in ("gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms", "tensor_active_ms", "dram_active_ms"):
        cols[c] = np.zeros(n, np.uint32)
    return pa.Table.from_pydict(cols, schema=GPU_WINDOW_SCHEMA)


def build_batches(stream: int, n_batches: int, n_gpus: int, n_windows: int, base_ms: int) -> list[bytes]:
    from gpuledger.config import AgentConfig

    rng = np.random.default_rng(stream)
    t = template(n_gpus, n_windows, rng)
    facts = [GpuFacts(f"GPU-{g:04d}", g, "bench", 80 << 30, "simulated") for g in range(n_gpus)]
    cfg = AgentConfig(host_id=f"bench-{stream:03d}", provider="aws", region="us-east-1", instance_type="p5.48xlarge")
    host, gpus = host_facts(cfg, facts), gpu_infos(facts)
    out = []
    for b in range(n_batches):
        shift = base_ms + b * n_windows * 10_000
        tb = t.set_column(1, "window_start_ms", pa.compute.add(t.column("window_start_ms"), shift))
        closed = Closed(gpu=tb, proc=_empty_proc(), processes=[])
        out.append(encode_batch(cfg.host_id, 1, b + 1, host, gpus, closed, 0, shift))
    return out


def _empty_proc():
    from gpuledger.schema import PROC_WINDOW_SCHEMA

    return PROC_WINDOW_SCHEMA.empty_table()


def agent_process(address, stream, batches, max_inflight, results):
    import threading

    import grpc

    from gpuledger.agent.shipper import STREAM_METHOD
    from gpuledger.v1 import telemetry_pb2 as pb

    sem = threading.Semaphore(max_inflight)
    sent_at = {}
    lat = []

    first = []

    def gen():
        for i, b in enumerate(batches):
            sem.acquire()
            sent_at[i + 1] = time.perf_counter()
            if not first:
                first.append(time.time())
            yield b

    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
        codes = []
        for ack in call(gen(), timeout=600):
            lat.append(time.perf_counter() - sent_at[ack.seq])
            codes.append(ack.code)
            sem.release()
    results.put((stream, codes.count(0), len(codes), lat, first[0], time.time()))


def run_streams(address, per_stream, max_inflight):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_many, args=(address, chunk, max_inflight, results)) for chunk in per_stream]
    for p in procs:
        p.start()
    out = [results.get() for chunk in per_stream for _ in chunk]
    for p in procs:
        p.join()
    # from the first batch sent to the last acknowledgement received, over all streams
    return max(r[5] for r in out) - min(r[4] for r in out), out


def _many(address, chunk, max_inflight, results):
    import threading

    threads = [threading.Thread(target=agent_process, args=(address, s, b, max_inflight, results)) for s, b in chunk]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(streams: int = 16, batches_per_stream: int = 24, n_gpus: int = 8, windows_per_gpu: int = 360,
         max_inflight: int = 4) -> dict:
    from gpuledger.collector.pricing import Pricing
    from gpuledger.collector.server import Collector
    from gpuledger.collector.store import Store, StoreOptions

    base_ms = (int(time.time() * 1000) - 40 * 86_400_000) // 10_000 * 10_000
    all_batches = [(s, build_batches(s, batches_per_stream, n_gpus, windows_per_gpu, base_ms)) for s in range(streams)]
    total_windows = streams * batches_per_stream * n_gpus * windows_per_gpu
    tmp = tempfile.mkdtemp(prefix="gl-bench-")
    store = Store(f"chdb://{tmp}/chdb")
    collector = Collector(store, Pricing.default(), listen="127.0.0.1:0", insert_max_rows=200_000,
                          insert_max_wait_s=0.02, max_pending_rows=4_000_000, max_batch_bytes=64 << 20)
    collector.start()
    # 2 client processes, 8 streams each: the agents' side of the wire
    half = (len(all_batches) + 1) // 2
    wall, results = run_streams(collector.address, [all_batches[:half], all_batches[half:]], max_inflight)
    ok = sum(r[1] for r in results)
    lat = np.concatenate([r[3] for r in results])
    commits, rows = collector.writer.commits, collector.writer.rows_committed
    insert_s = store.insert_seconds
    stored = store.query_rows("SELECT count() FROM gpuledger.gpu_windows")[0][0]
    collector.stop()
    # reference: bare insert_arrow of the same rows, in commits of the collector's mean size
    bare = Store(f"chdb://{tmp}/chdb", StoreOptions(database="bare"), client=store.client)
    tables = []
    from gpuledger.v1 import telemetry_pb2 as pb

    for _s, batches in all_batches:
        for raw in batches:
            m = pb.WindowBatch.FromString(raw)
            t = from_ipc(m.gpu_windows_arrow)
            tables.append(t.add_column(0, "host_id", pa.array([m.host.host_id] * t.num_rows)))
    full = pa.concat_tables(tables).combine_chunks()
    chunk = max(1, rows // max(commits, 1))
    timings = []
    for _ in range(3):  # the median of three: a single timing on a 2-core machine is noisy
        bare.command("TRUNCATE TABLE bare.gpu_windows")
        t0 = time.perf_counter()
        for off in range(0, full.num_rows, chunk):
            bare.client.insert_arrow("bare.gpu_windows", full.slice(off, chunk))
        timings.append(time.perf_counter() - t0)
    bare_s = sorted(timings)[1]
    store.close()
    res = {
        "bench": "collector_ingest",
        "streams": streams,
        "windows": total_windows,
        "windows_per_batch": n_gpus * windows_per_gpu,
        "acked_ok": ok,
        "batches": streams * batches_per_stream,
        "stored_rows": stored,
        "end_to_end_windows_per_s": total_windows / wall,
        "bare_insert_windows_per_s": total_windows / bare_s,
        "ratio_to_bare_insert": bare_s / wall,
        "group_commits": commits,
        "collector_insert_s": insert_s,
        "wall_s": wall,
        "rows_per_commit": chunk,
        "ack_latency_p50_ms": float(np.percentile(lat, 50) * 1000),
        "ack_latency_p99_ms": float(np.percentile(lat, 99) * 1000),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    return res


if __name__ == "__main__":
    kw = {}
    if len(sys.argv) > 1:
        kw["windows_per_gpu"] = int(sys.argv[1])
    print(json.dumps(main(**kw)))
