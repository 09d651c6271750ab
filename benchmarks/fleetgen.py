"""A month of a large fleet, loaded through the collector's real insert path, fast.

The simulator folds driver samples through the window kernels; at 1,000 GPUs x 30 days (259 M GPU-
windows) that would take hours. This generator builds the windows the agents would send directly, with
numpy, per host and day: 8 GPUs a host, profiles mixed as in the simulated fleet (training jobs of 7 h
with input stalls and 1 h gaps, notebooks holding GPUs, diurnal inference endpoints, idle GPUs), one
process per job with team / project / phase / workload / MLflow run tags, a short NVML outage now and
then. Each host-day is encoded as a real WindowBatch, decoded and validated by `validate()` (ingest-time
attribution included), group-committed by the Writer's own table builder and `Store.insert`, exactly
as the collector stores a batch; only the gRPC hop is left out. Then the sealer rolls the month up.

`load_fleet(store, gpus, days, end_ms)` is what the report, HTML and baseline benchmarks use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpuledger.agent.source import ProcessIdentity
from gpuledger.agent.windows import Closed
from gpuledger.collector import tables
from gpuledger.collector.store import Store
from gpuledger.collector.validate import Limits, validate
from gpuledger.schema import GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA
from gpuledger.v1 import telemetry_pb2 as pb

W_MS = 10_000
DAY_MS = 86_400_000
PER_DAY = DAY_MS // W_MS
GPUS_PER_HOST = 8
SHAPES = [("aws", "us-east-1", "p5.48xlarge"), ("aws", "us-east-1", "p4d.24xlarge"),
          ("aws", "us-east-1", "g6.48xlarge"), ("gcp", "us-central1", "a2-highgpu-8g")]
TEAMS = [("research", "llm-pretrain"), ("search", "ranker"), ("vision", "detector"), ("platform", "chat-api")]
PROFILES = ("training", "training", "training", "notebook", "inference", "idle")


@dataclass
class LoadStats:
    gpu_windows: int = 0
    proc_windows: int = 0
    batches: int = 0
    load_s: float = 0.0
    seal_s: float = 0.0


def _host_day(h: int, day: int, day0_ms: int, rng) -> tuple[pb.WindowBatch, int]:
    provider, region, itype = SHAPES[h % len(SHAPES)]
    host_id = f"fleet-{h:04d}"
    t = np.arange(PER_DAY, dtype=np.int64) * W_MS + day0_ms  # window starts
    abs_s = (t // 1000).astype(np.float64)
    gpu_rows, proc_rows, idents = [], [], {}
    for g in range(GPUS_PER_HOST):
        prof = PROFILES[(h * 7 + g * 3) % len(PROFILES)]
        team, project = TEAMS[(h + g) % len(TEAMS)]
        uuid = f"GPU-{h:04d}-{g}"
        busy = np.zeros(PER_DAY)
        held = np.zeros(PER_DAY, bool)
        job = np.zeros(PER_DAY, np.int64)
        if prof == "training":
            cycle = (abs_s + g * 1800) % (8 * 3600)
            held = cycle < 7 * 3600
            job = ((abs_s + g * 1800) // (8 * 3600)).astype(np.int64)
            stall = (cycle % 360) >= 320
            busy = np.where(held & ~stall, np.clip(rng.normal(0.93, 0.03, PER_DAY), 0, 1), 0.0)
        elif prof == "notebook":
            held[:] = True
            job[:] = day // 3
            busy = np.where(rng.random(PER_DAY) < 0.05, rng.random(PER_DAY) * 0.7, 0.0)
        elif prof == "inference":
            held[:] = True
            job[:] = 0
            frac_day = (abs_s % 86_400) / 86_400
            busy = np.clip(0.45 + 0.4 * np.sin(2 * np.pi * (frac_day - 0.3)) + rng.normal(0, 0.05, PER_DAY), 0, 1)
        covered = np.full(PER_DAY, W_MS, np.int64)
        if rng.random() < 0.02:  # an NVML outage of 20 minutes now and then
            a = int(rng.integers(0, PER_DAY - 120))
            covered[a:a + 120] = 0
        busy_ms = np.minimum(np.rint(busy * covered), covered).astype(np.int64)
        held_ms = np.where(held, covered - busy_ms, 0)
        free_ms = covered - busy_ms - held_ms
        util = np.where(covered > 0, busy_ms * 100 // np.maximum(covered, 1), 0)
        samples = np.where(covered > 0, 60, 0)
        gpu_rows.append((uuid, t, covered, busy_ms, held_ms, free_ms, util, samples))
        hk = held & (covered > 0)
        if hk.any():
            for jid in np.unique(job[hk]).tolist():
                sel = hk & (job == jid)
                pid = 1000 + (h * 131 + g * 17 + int(jid)) % 60_000
                start_ms = int(jid) * 8 * 3600 * 1000 - g * 1_800_000 if prof == "training" else day0_ms
                tags = (("team", team), ("project", project), ("phase", "production" if prof == "inference"
                                                               else "training" if prof == "training" else "development"),
                        ("workload", prof))
                if prof == "training":
                    tags += (("mlflow_experiment_id", f"exp-{project}"), ("mlflow_run_id", f"run-{h}-{g}-{jid}"))
                if prof == "inference":
                    tags += (("endpoint", f"{project}-endpoint"),)
                idents[(pid, start_ms)] = ProcessIdentity(pid, start_ms, {"training": "python train.py",
                                                                         "notebook": "jupyter-kernel",
                                                                         "inference": "vllm serve"}[prof],
                                                          f"c{h}{g}{jid}", "", tags)
                proc_rows.append((uuid, t[sel], pid, start_ms, (held_ms + busy_ms)[sel], busy_ms[sel]))
    n = GPUS_PER_HOST * PER_DAY
    hist = np.zeros((n, 10), np.uint16)
    utils = np.concatenate([r[6] for r in gpu_rows])
    samples = np.concatenate([r[7] for r in gpu_rows])
    hist[np.arange(n), np.minimum(utils // 10, 9)] = samples
    cov = np.concatenate([r[2] for r in gpu_rows])
    gpu = pa.Table.from_pydict({
        "gpu_uuid": pa.array(np.repeat([r[0] for r in gpu_rows], PER_DAY)),
        "window_start_ms": np.concatenate([r[1] for r in gpu_rows]),
        "window_ms": np.full(n, W_MS, np.uint32), "sample_count": samples.astype(np.uint32),
        "covered_ms": cov.astype(np.uint32), "busy_ms": np.concatenate([r[3] for r in gpu_rows]).astype(np.uint32),
        "idle_held_ms": np.concatenate([r[4] for r in gpu_rows]).astype(np.uint32),
        "idle_free_ms": np.concatenate([r[5] for r in gpu_rows]).astype(np.uint32),
        "unmonitored_ms": (W_MS - cov).astype(np.uint32), "util_min_pct": np.zeros(n, np.uint8),
        "util_max_pct": np.minimum(utils + 5, 100).astype(np.uint8) * (samples > 0),
        "util_hist": pa.ListArray.from_arrays(np.arange(0, 10 * n + 1, 10, dtype=np.int32),
                                              pa.array(hist.reshape(-1), pa.uint16())),
        "mem_used_max_bytes": np.where(cov > 0, 40 << 30, 0).astype(np.uint64),
        "power_mean_mw": (80_000 + utils * 6_000).astype(np.uint32),
        "power_max_mw": (90_000 + utils * 6_200).astype(np.uint32),
        "energy_mj": ((80_000 + utils * 6_000) * 10).astype(np.uint64),
        "temp_max_c": (35 + utils // 2).astype(np.uint8),
        **{c: np.zeros(n, np.uint32) for c in ("gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms",
                                               "tensor_active_ms", "dram_active_ms")},
    }, schema=GPU_WINDOW_SCHEMA)
    if proc_rows:
        proc = pa.Table.from_pydict({
            "gpu_uuid": pa.array(np.concatenate([np.repeat(r[0], r[1].size) for r in proc_rows])),
            "window_start_ms": np.concatenate([r[1] for r in proc_rows]),
            "pid": np.concatenate([np.full(r[1].size, r[2], np.uint32) for r in proc_rows]),
            "proc_start_ms": np.concatenate([np.full(r[1].size, r[3], np.int64) for r in proc_rows]),
            "held_ms": np.concatenate([r[4] for r in proc_rows]).astype(np.uint32),
            "busy_ms": np.concatenate([r[5] for r in proc_rows]).astype(np.uint32),
            "mem_max_bytes": np.full(sum(r[1].size for r in proc_rows), 40 << 30, np.uint64),
        }, schema=PROC_WINDOW_SCHEMA)
    else:
        proc = PROC_WINDOW_SCHEMA.empty_table()
    from gpuledger.agent.runtime import encode_batch, process_infos  # noqa: F401

    host = pb.HostFacts(host_id=host_id, hostname=host_id, provider=provider, region=region, instance_type=itype,
                        gpu_count=GPUS_PER_HOST, tags={"team": "platform", "cloud_account": f"{provider}-prod"},
                        agent_version="bench", instance_id=f"i-{h:08x}")
    gpus = [pb.GpuInfo(uuid=r[0], index=g, name="NVIDIA H100 80GB HBM3", mem_total_bytes=80 << 30,
                       util_method="samples", share=1.0) for g, r in enumerate(gpu_rows)]
    closed = Closed(gpu, proc, list(idents.values()), int(t[0]), int(t[-1]) + W_MS)
    raw = encode_batch(host_id, 1, day + 1, host, gpus, closed, 0, int(t[-1]) + W_MS, session_start_ms=0)
    return pb.WindowBatch.FromString(raw), gpu.num_rows


def load_fleet(store: Store, gpus: int, days: int, end_ms: int, seed: int = 7, progress=None,
               seal: bool = True) -> LoadStats:
    """Load `gpus` GPUs (8 a host) x `days` days ending at `end_ms` (a day boundary), then roll it up."""
    hosts = max(1, gpus // GPUS_PER_HOST)
    first_day = end_ms - days * DAY_MS
    stats = LoadStats()
    known: dict = {}
    mark = [0]
    t0 = time.perf_counter()
    for day in range(days):
        group, rows = [], 0
        for h in range(hosts):
            rng = np.random.default_rng((seed, h, day))
            batch, _ = _host_day(h, day, first_day + day * DAY_MS, rng)
            v = validate(batch, end_ms + DAY_MS, Limits(max_batch_rows=1 << 22))
            group.append(v)
            rows += v.rows
            stats.gpu_windows += v.gpu.num_rows
            stats.proc_windows += v.proc.num_rows
            stats.batches += 1
            if rows >= 600_000 or h == hosts - 1:
                mark[0] = max(int(time.time() * 1e6), mark[0] + 2)
                store.insert(tables.build(group, end_ms, mark[0], known))
                group, rows = [], 0
        if progress:
            progress(day + 1, days)
    stats.load_s = time.perf_counter() - t0
    if seal:
        from gpuledger.collector.rollup import seal as seal_pass

        t1 = time.perf_counter()
        seal_pass(store, int(time.time() * 1e6) + 10**9, 0)
        stats.seal_s = time.perf_counter() - t1
    return stats
