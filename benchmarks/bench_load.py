"""Load: hundreds of agents streaming to ONE collector over loopback, for a bounded time.

The collector runs as the real daemon in its own process (`gpuledger collector serve` on a fresh
data dir and a free loopback port), so its CPU seconds (utime + stime from /proc/<pid>/stat) and
peak RSS (VmHWM from /proc/<pid>/status) are its own. The agents are asyncio coroutines (grpc.aio)
spread over a few client processes; each agent has its own channel (its own TCP connection, as a
real host would), its own host_id and 8 GPUs, and sends pre-encoded batches of 8 GPUs x 6 windows
(one minute of 10 s windows, a distinct minute per batch) at a fixed rate on one long-lived stream.
Like the real shipper, an agent keeps its unacknowledged seqs (at most `inflight` at a time), resends
a batch on a retryable ack after a jittered backoff, and dead-letters a permanent rejection.

After `seconds` of sending the agents drain (wait for their outstanding acks, up to `drain_s`),
the collector is stopped with SIGTERM, and the bench opens the data dir's chDB itself to count
what was stored: windows lost (sent, never stored), acked-but-not-stored (must be 0 whatever
happens), duplicates (rows FINAL vs distinct keys), physical rows before merges. One JSON line.

    python benchmarks/bench_load.py                      # 500 agents x 8 GPUs, 60 s
    python benchmarks/bench_load.py --agents 50 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_GPUS, WINDOW_MS = 8, 10_000
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- batches


def host_id(agent: int) -> str:
    return f"load-{agent:04d}"


def build_batches(agent: int, n_batches: int, base_ms: int, n_windows: int) -> list[bytes]:
    """The agent's batches, encoded by the agent's own encoder; batch k covers minute k after base."""
    import pyarrow as pa

    from gpuledger.agent.runtime import encode_batch, gpu_infos, host_facts
    from gpuledger.agent.source import GpuFacts, ProcessIdentity
    from gpuledger.agent.windows import Closed
    from gpuledger.config import AgentConfig
    from gpuledger.schema import GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA

    rng = np.random.default_rng(agent)
    N_WINDOWS = n_windows  # noqa: N806
    BATCH_MS = n_windows * WINDOW_MS  # noqa: N806
    n = N_GPUS * N_WINDOWS
    uuids = [f"GPU-{agent:04d}-{g}" for g in range(N_GPUS)]
    facts = [GpuFacts(u, g, "NVIDIA H100 80GB HBM3 (load)", 80 << 30, "simulated") for g, u in enumerate(uuids)]
    cfg = AgentConfig(host_id=host_id(agent), provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                      tags={"team": f"team-{agent % 7}"})
    host, gpus = host_facts(cfg, facts), gpu_infos(facts)
    procs = [ProcessIdentity(pid=1000 + g, start_ms=base_ms - 3_600_000, command="python train.py",
                             tags={"team": f"team-{agent % 7}", "project": f"p{g % 3}"}) for g in range(N_GPUS)]
    uuid_col = pa.array(np.repeat(uuids, N_WINDOWS))
    offsets = np.tile(np.arange(N_WINDOWS, dtype=np.int64) * WINDOW_MS, N_GPUS)
    out = []
    for k in range(n_batches):
        busy = rng.integers(0, WINDOW_MS + 1, n)
        held = rng.integers(0, WINDOW_MS + 1 - busy)
        hist = np.zeros((n, 10), np.uint16)
        hist[np.arange(n), rng.integers(0, 10, n)] = 60
        starts = base_ms + k * BATCH_MS + offsets
        gpu = pa.Table.from_pydict({
            "gpu_uuid": uuid_col, "window_start_ms": starts,
            "window_ms": np.full(n, WINDOW_MS, np.uint32), "sample_count": np.full(n, 60, np.uint32),
            "covered_ms": np.full(n, WINDOW_MS, np.uint32), "busy_ms": busy.astype(np.uint32),
            "idle_held_ms": held.astype(np.uint32), "idle_free_ms": (WINDOW_MS - busy - held).astype(np.uint32),
            "unmonitored_ms": np.zeros(n, np.uint32), "util_min_pct": np.zeros(n, np.uint8),
            "util_max_pct": np.full(n, 100, np.uint8),
            "util_hist": pa.ListArray.from_arrays(np.arange(0, 10 * n + 1, 10, dtype=np.int32),
                                                  pa.array(hist.reshape(-1), pa.uint16())),
            "mem_used_max_bytes": rng.integers(0, 80 << 30, n).astype(np.uint64),
            "power_mean_mw": rng.integers(70_000, 700_000, n).astype(np.uint32),
            "power_max_mw": np.full(n, 700_000, np.uint32),
            "energy_mj": rng.integers(0, 7_000_000, n).astype(np.uint64),
            "temp_max_c": rng.integers(30, 90, n).astype(np.uint8),
            **{c: np.zeros(n, np.uint32) for c in ("gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms",
                                                   "tensor_active_ms", "dram_active_ms")},
        }, schema=GPU_WINDOW_SCHEMA)
        proc = pa.Table.from_pydict({
            "gpu_uuid": uuid_col, "window_start_ms": starts, "pid": np.repeat(np.arange(N_GPUS) + 1000, N_WINDOWS)
            .astype(np.uint32), "proc_start_ms": np.full(n, base_ms - 3_600_000, np.int64),
            "held_ms": (busy + held).astype(np.uint32), "busy_ms": busy.astype(np.uint32),
            "mem_max_bytes": rng.integers(0, 80 << 30, n).astype(np.uint64)}, schema=PROC_WINDOW_SCHEMA)
        closed = Closed(gpu=gpu, proc=proc, processes=procs)
        out.append(encode_batch(cfg.host_id, 1, k + 1, host, gpus, closed, 0, int(time.time() * 1000)))
    return out


# ----------------------------------------------------------------------------- agents (client processes)


async def run_agent(agent: int, batches: list[bytes], target: str, t0: float, a: dict) -> dict:
    import grpc

    from gpuledger.agent.shipper import STREAM_METHOD
    from gpuledger.v1 import telemetry_pb2 as pb

    loop = asyncio.get_running_loop()
    rng = random.Random(agent)
    period = 1.0 / a["rate"]
    phase = (agent * 0.6180339887) % 1.0 * period  # spread the agents evenly over one period
    stop_at, drain_until = t0 + a["seconds"], t0 + a["seconds"] + a["drain_s"]
    unacked: dict[int, float] = {}  # seq -> last send time: the spool's unacknowledged tail
    first_sent: dict[int, float] = {}
    st = {"agent": agent, "sent": 0, "writes": 0, "acked": [], "retried": 0, "rejected": 0, "backlog": 0,
          "lat": [], "delivery": [], "error": "", "first_ack_s": None, "max_streams": 0}
    changed = asyncio.Condition()
    wlock = asyncio.Lock()
    resends: set[asyncio.Task] = set()

    channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                         ("grpc.max_send_message_length", 64 << 20)])
    call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)()

    async def write(seq: int) -> None:
        async with wlock:
            unacked[seq] = loop.time()
            first_sent.setdefault(seq, unacked[seq])
            st["writes"] += 1
            await call.write(batches[seq - 1])

    async def resend_later(seq: int) -> None:
        await asyncio.sleep(rng.uniform(0.25, 1.0))
        await write(seq)

    async def reader() -> None:
        while True:
            ack = await call.read()
            if ack is grpc.aio.EOF:
                return
            now = loop.time()
            if st["first_ack_s"] is None:
                st["first_ack_s"] = now - t0
            if ack.code == 0:
                st["lat"].append(now - unacked.pop(ack.seq))
                st["delivery"].append(now - first_sent[ack.seq])
                st["acked"].append(ack.seq)
            elif ack.retryable:
                st["retried"] += 1
                t = asyncio.create_task(resend_later(ack.seq))
                resends.add(t)
                t.add_done_callback(resends.discard)
            else:
                st["rejected"] += 1
                unacked.pop(ack.seq, None)
                st["error"] = st["error"] or ack.message[:200]
            async with changed:
                changed.notify_all()

    async def writer() -> None:
        for k in range(len(batches)):
            due = t0 + phase + k * period
            if due >= stop_at:
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            async with changed:  # at most `inflight` unacknowledged, like the shipper
                try:
                    await asyncio.wait_for(changed.wait_for(lambda: len(unacked) < a["inflight"]),
                                           max(0.0, stop_at - loop.time()))
                except TimeoutError:
                    pass
            if len(unacked) >= a["inflight"] or loop.time() >= stop_at:  # the rest stays in the spool
                st["backlog"] = sum(1 for j in range(k, len(batches)) if t0 + phase + j * period < stop_at)
                return
            await write(k + 1)
            st["sent"] += 1

    read_task = asyncio.create_task(reader())
    try:
        await writer()
        async with changed:
            await asyncio.wait_for(changed.wait_for(lambda: not unacked), max(0.1, drain_until - loop.time()))
    except TimeoutError:
        pass
    except asyncio.InvalidStateError:  # the collector ended the stream; the reader has its status
        try:
            code, details = await call.code(), await call.details()
        except Exception:  # noqa: BLE001
            code, details = "?", ""
        st["error"] = st["error"] or f"stream ended by the collector: {code}: {details}"[:200]
    except grpc.RpcError as e:
        st["error"] = f"{e.code()}: {e.details()}"
    finally:
        for t in list(resends):
            t.cancel()
        try:
            await call.done_writing()
            await asyncio.wait_for(read_task, 5.0)
        except (TimeoutError, grpc.RpcError, asyncio.CancelledError) as e:
            st["error"] = st["error"] or f"closing: {type(e).__name__}"
            read_task.cancel()
        await channel.close(grace=None)
    st["unacked_at_end"] = len(unacked)
    return st


def client_process(agents: list[int], a: dict, base_ms: int, ready, start, results) -> None:
    n_batches = math.ceil(a["seconds"] * a["rate"]) + 1
    batches = {i: build_batches(i, n_batches, base_ms, a["windows"]) for i in agents}
    ready.put(len(agents))
    while start.value == 0:
        time.sleep(0.005)
    t_wall0 = start.value
    r0 = resource.getrusage(resource.RUSAGE_SELF)

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time() + (t_wall0 - time.time())  # the shared wall-clock start, on this loop's clock
        return await asyncio.gather(*(run_agent(i, batches[i], a["target"], t0, a) for i in agents))

    out = asyncio.run(main())
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    results.put({"agents": out, "cpu_s": cpu})


# ----------------------------------------------------------------------------- the collector process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15 of stat)


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError("collector did not become SERVING")


# ----------------------------------------------------------------------------- main


def report_probe(target: str, stop, out: list) -> None:
    """While the agents send: a report and a health check every few seconds, their latencies recorded."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gpuledger.client import fetch_report

    while not stop.wait(3.0):
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        try:
            fetch_report(target, "idle", now - 3 * 86_400_000, now, "host", timeout_s=120)
            report_s = time.perf_counter() - t0
        except grpc.RpcError as e:
            report_s = float("nan")
            out.append(("report_error", e.code().name))
        t1 = time.perf_counter()
        try:
            with grpc.insecure_channel(target) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            health_s = time.perf_counter() - t1
        except grpc.RpcError:
            health_s = float("nan")
        out.append((report_s, health_s))


def main(agents: int = 500, procs: int = 4, seconds: float = 60.0, rate: float = 0.5, inflight: int = 8,
         drain_s: float = 20.0, keep: bool = False, max_streams: int = 0, windows: int = 6) -> dict:
    BATCH_MS = windows * WINDOW_MS  # noqa: N806
    tmp = Path(tempfile.mkdtemp(prefix="gl-load-"))
    port = free_port()
    target = f"127.0.0.1:{port}"
    base_ms = (int(time.time() * 1000) - 2 * 86_400_000) // 3_600_000 * 3_600_000  # two days ago, on the hour
    log = open(tmp / "collector.log", "w")
    cmd = [sys.executable, "-m", "gpuledger.cli", "collector", "serve", "--data-dir", str(tmp), "--listen", target]
    env = dict(os.environ)
    if max_streams:
        env["GPULEDGER_COLLECTOR_MAX_STREAMS"] = str(max_streams)
    collector = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_serving(target, collector)
        a = {"target": target, "seconds": seconds, "rate": rate, "inflight": inflight, "drain_s": drain_s,
             "windows": windows}
        ctx = mp.get_context("spawn")
        ready, results = ctx.Queue(), ctx.Queue()
        start = ctx.Value("d", 0.0)
        chunks = [list(range(p, agents, procs)) for p in range(procs)]
        workers = [ctx.Process(target=client_process, args=(c, a, base_ms, ready, start, results)) for c in chunks]
        t_enc = time.perf_counter()
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=300)
        encode_s = time.perf_counter() - t_enc
        rss_idle = proc_status_kib(collector.pid, "VmRSS")
        cpu0 = proc_cpu_s(collector.pid)
        t0 = time.time() + 1.0
        start.value = t0
        import threading

        probe_stop, probes = threading.Event(), []
        probe = threading.Thread(target=report_probe, args=(target, probe_stop, probes), daemon=True)
        time.sleep(max(0.0, t0 - time.time()))
        probe.start()
        time.sleep(seconds)
        probe_stop.set()
        probe.join(timeout=180)
        out = [results.get(timeout=seconds + drain_s + 120) for _ in workers]
        for w in workers:
            w.join(timeout=30)
        t_end = time.time()
        cpu_s = proc_cpu_s(collector.pid) - cpu0
        peak_rss = proc_status_kib(collector.pid, "VmHWM")
        threads = proc_status_kib(collector.pid, "Threads")
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=60)
    finally:
        if collector.poll() is None:
            collector.kill()
            collector.wait()
        log.close()

    stats = [s for r in out for s in r["agents"]]
    client_cpu = sum(r["cpu_s"] for r in out)
    wall = t_end - t0
    per_batch = N_GPUS * windows

    from gpuledger.collector.store import Store

    store = Store(f"chdb://{tmp / 'chdb'}")
    try:
        q = store.query_rows
        raw_rows, final_rows = q("SELECT count() FROM gpuledger.gpu_windows")[0][0], \
            q("SELECT count() FROM gpuledger.gpu_windows FINAL")[0][0]
        keys = q("SELECT uniqExact(host_id, gpu_uuid, window_start_ms) FROM gpuledger.gpu_windows")[0][0]
        per_batch_stored = {(h, int(k)): int(c) for h, k, c in q(
            "SELECT host_id, intDiv(window_start_ms - {b:Int64}, {m:Int64}) AS k, uniqExact(gpu_uuid, window_start_ms) "
            "FROM gpuledger.gpu_windows GROUP BY host_id, k", {"b": base_ms, "m": BATCH_MS})}
        proc_raw = q("SELECT count() FROM gpuledger.proc_windows")[0][0]
        proc_keys = q("SELECT uniqExact(host_id, gpu_uuid, window_start_ms, pid, proc_start_ms) "
                      "FROM gpuledger.proc_windows")[0][0]
    finally:
        store.close()

    sent_windows = lost = acked_not_stored = 0
    sent_keys = set()
    for s in stats:
        h = host_id(s["agent"])
        for k in range(s["sent"]):  # batches go out in order: the first `sent` were written
            sent_keys.add((h, k))
            got = per_batch_stored.get((h, k), 0)
            lost += per_batch - got
        for seq in s["acked"]:
            acked_not_stored += per_batch - per_batch_stored.get((h, seq - 1), 0)
        sent_windows += s["sent"] * per_batch
    stored_unsent = sum(c for key, c in per_batch_stored.items() if key not in sent_keys)
    lat = np.array([x for s in stats for x in s["lat"]] or [float("nan")])
    delivery = np.array([x for s in stats for x in s["delivery"]] or [float("nan")])
    acked = sum(len(s["acked"]) for s in stats)
    first_ack = np.array([s["first_ack_s"] if s["first_ack_s"] is not None else np.inf for s in stats])
    errors = sorted({s["error"] for s in stats if s["error"]})
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bench": "collector_load",
        "agents": agents, "gpus_per_agent": N_GPUS, "windows_per_batch": per_batch, "client_processes": procs,
        "collector_max_streams": max_streams or "default",
        "send_s": seconds, "batches_per_agent_per_s": rate, "max_inflight": inflight,
        "windows_sent": sent_windows, "windows_acked": acked * per_batch,
        "windows_lost": lost, "acked_but_not_stored": acked_not_stored, "stored_but_never_sent": stored_unsent,
        "duplicates": final_rows - keys, "physical_duplicate_rows": raw_rows - keys,
        "proc_rows_physical_duplicates": proc_raw - proc_keys,
        "batches_sent": sum(s["sent"] for s in stats), "batch_writes": sum(s["writes"] for s in stats),
        "retryable_acks": sum(s["retried"] for s in stats), "rejected": sum(s["rejected"] for s in stats),
        "agent_backlog_batches": sum(s["backlog"] for s in stats),
        "agents_with_unacked_at_end": sum(1 for s in stats if s["unacked_at_end"]),
        "agents_fully_acked": sum(1 for s in stats if s["sent"] and len(s["acked"]) == s["sent"]),
        "agents_acked_within_5s": int((first_ack <= 5.0).sum()),
        "agents_first_acked_while_sending": int((first_ack <= seconds).sum()),
        "first_ack_p50_s": float(np.percentile(first_ack, 50)), "first_ack_max_s": float(first_ack.max()),
        "ack_latency_p50_ms": float(np.nanpercentile(lat, 50) * 1000),
        "ack_latency_p99_ms": float(np.nanpercentile(lat, 99) * 1000),
        "delivery_latency_p99_ms": float(np.nanpercentile(delivery, 99) * 1000),
        "throughput_windows_per_s": acked * per_batch / wall,
        "throughput_batches_per_s": acked / wall,
        "offered_windows_per_s": agents * rate * per_batch,
        "wall_s": wall, "encode_s": encode_s,
        "collector_cpu_s": cpu_s, "collector_cpu_pct_of_one_core": 100.0 * cpu_s / wall,
        "collector_cpu_ms_per_batch": 1000.0 * cpu_s / max(acked, 1),
        "clients_cpu_s": client_cpu,
        "collector_peak_rss_mib": peak_rss / 1024, "collector_idle_rss_mib": rss_idle / 1024,
        "collector_threads_at_end": threads,
        "report_latency_during_load_s": _pcts([p[0] for p in probes if isinstance(p[0], float)]),
        "health_latency_during_load_s": _pcts([p[1] for p in probes if isinstance(p[0], float)]),
        "report_errors_during_load": [p[1] for p in probes if p[0] == "report_error"][:5],
        "errors": errors[:5],
        **({"data_dir": str(tmp)} if keep else {}),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def _pcts(xs: list[float]) -> dict:
    a = np.array([x for x in xs if x == x])
    if not a.size:
        return {"n": 0}
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3), "max": round(float(a.max()), 3)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--procs", type=int, default=4, help="client processes the agents are spread over")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the agents send")
    p.add_argument("--rate", type=float, default=0.5, help="batches per agent per second")
    p.add_argument("--inflight", type=int, default=8, help="unacknowledged batches per agent, at most")
    p.add_argument("--drain-s", type=float, default=20.0, help="time to wait for outstanding acks after sending")
    p.add_argument("--keep", action="store_true", help="keep the data dir (printed as data_dir)")
    p.add_argument("--collector-max-streams", type=int, default=0,
                   help="collector.max_streams for this run (default: the collector's own)")
    p.add_argument("--windows", type=int, default=6, help="windows per GPU per batch (1 with the agent's default "
                                                          "10 s flush, at --rate 0.1)")
    args = p.parse_args()
    print(json.dumps(main(args.agents, args.procs, args.seconds, args.rate, args.inflight, args.drain_s, args.keep,
                          args.collector_max_streams, args.windows)))
