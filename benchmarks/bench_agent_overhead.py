"""Agent overhead: CPU seconds per hour and peak RSS for 8 GPUs at default settings.

Runs the real agent loop (NvmlSource over the fake pynvml + attribution from the fixture /proc +
Windower + Agent.step + spool appends with fsync; the shipper only with --collector) for N ticks
of a simulated clock at the default tick_s=1 and window_s=10. The fake NVML answers instantly, so
this measures the agent's own CPU; the fake's work of producing samples between ticks is not
counted. Goals: <= 0.5 % of one core (18 CPU s per hour) and <= 150 MB peak RSS.

RSS is reported in steps: after the imports every agent process makes (numpy, pyarrow, grpc, numba
with LLVM and the cached kernels), after warm-up (the first window initialises pyarrow's compute
registry), and the growth over the measured ticks, so the NVML path's own share is visible.

Prints one line of JSON.

    .venv/bin/python benchmarks/bench_agent_overhead.py            # one simulated hour (3600 ticks)
    .venv/bin/python benchmarks/bench_agent_overhead.py --ticks 600 --gpus 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

import fake_pynvml as fk  # noqa: E402

from gpuledger.agent.nvml import NvmlSource  # noqa: E402
from gpuledger.agent.runtime import Agent  # noqa: E402
from gpuledger.agent.spool import Spool  # noqa: E402
from gpuledger.clock import SimClock  # noqa: E402
from gpuledger.config import AgentConfig  # noqa: E402

T0 = 1_709_546_400_000_000
PIDS = (4242, 5151, 6161, 7171, 8181, 9191)  # processes of the fixture /proc tree


def _rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024.0
    except (OSError, IndexError, ValueError):
        return float("nan")


def _warm_kernels() -> None:
    """Load the numba kernels (from their cache) as the agent does on its first window."""
    import numpy as np

    from gpuledger.agent import kernels

    one = np.ones(1, np.int64)
    kernels.fold_util(np.zeros(1, np.int32), one - 1, one, np.zeros(1, np.float32), np.zeros(1, np.uint8), 0, 10, 1, 1)
    kernels.fold_gauge(np.zeros(1, np.int32), one - 1, one, *(np.zeros(1),) * 4, 0, 10, 1, 1)


def run(ticks: int, n_gpus: int, collector: str | None, warmup: int, kernels: str = "numba") -> dict:
    rss_imports = _rss_mb()  # numpy, pyarrow, grpc (and numba with its LLVM): the floor of the agent process
    gpus = [fk.h100(i, keep_history=False) for i in range(n_gpus)]
    for i, g in enumerate(gpus):
        g.processes = [fk.FakeProcess(PIDS[i % len(PIDS)])] if i % 4 != 3 else []  # one GPU in four unallocated
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus)
    fake.advance_to(T0)
    src = NvmlSource(fake, proc_root=str(ROOT / "tests" / "fixtures" / "proc"))
    poll_cpu = [0.0]
    real_poll = src.poll

    def timed_poll(now_us: int):
        c0 = time.process_time()
        try:
            return real_poll(now_us)
        finally:
            poll_cpu[0] += time.process_time() - c0

    src.poll = timed_poll
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as tmp:
        cfg = AgentConfig(host_id="bench-host", provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                          spool_dir=tmp, kernels=kernels).validate()
        spool = Spool(tmp, max_bytes=cfg.spool_max_bytes)  # fsync on, as in production
        agent = Agent(cfg, src, clock, spool, start_us=T0)
        shipper = None
        if collector:
            from gpuledger.agent.shipper import Shipper

            shipper = Shipper(collector, spool).start()
        cpu = 0.0
        fake_cpu = 0.0
        t_wall = time.perf_counter()
        for i in range(warmup + ticks):
            if i == warmup:  # JIT warm-up, first-poll priming and the first window are not counted
                cpu, fake_cpu, poll_cpu[0] = 0.0, 0.0, 0.0
                c_all = time.process_time()
                rss_warm = _rss_mb()
            for j, g in enumerate(gpus):  # a changing load: training-like with stalls, one idle GPU
                g.load = 0 if j % 4 == 3 else (0 if (i // 40 + j) % 9 == 0 else 70 + (i * 7 + j * 13) % 30)
            clock.advance(cfg.tick_s)
            f0 = time.process_time()
            fake.advance_to(clock.now_us())  # the "hardware": not the agent's cost
            fake_cpu += time.process_time() - f0
            c0 = time.process_time()
            agent.step()
            if shipper is None:  # stand-in for the collector's acknowledgements, so the spool stays small
                for rec in spool.pending():
                    spool.ack(rec.seq)
            cpu += time.process_time() - c0
        whole = time.process_time() - c_all
        wall = time.perf_counter() - t_wall
        windows, batches = agent.windows_sampled, agent.batches_spooled
        agent.close()
        if shipper is not None:
            shipper.close(drain_timeout_s=30)
            cpu = whole - fake_cpu  # the shipper runs on its own thread: count the whole process
        spool.close()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_per_hour = cpu / ticks * 3600.0 / cfg.tick_s
    pct = 100.0 * cpu_per_hour / 3600.0
    rss_mb = rss_kb / 1024.0
    return {
        "bench": "agent_overhead",
        "kernels": kernels,
        "numba_loaded": "numba" in sys.modules,
        "gpus": n_gpus,
        "ticks": ticks,
        "tick_s": cfg.tick_s,
        "window_s": cfg.window_s,
        "shipper": bool(collector),
        "cpu_s_per_hour": round(cpu_per_hour, 3),
        "pct_of_one_core": round(pct, 4),
        "goal_pct_of_one_core": 0.5,
        "cpu_ms_per_tick": round(1000 * cpu / ticks, 4),
        "nvml_source_ms_per_tick": round(1000 * poll_cpu[0] / ticks, 4),
        "peak_rss_mb": round(rss_mb, 1),
        "rss_after_imports_mb": round(rss_imports, 1),  # numpy, pyarrow, grpc, numba + LLVM
        "rss_after_warmup_mb": round(rss_warm, 1),  # + pyarrow's compute registry on the first window
        "rss_growth_measured_mb": round(_rss_mb() - rss_warm, 1),
        "goal_peak_rss_mb": 150,
        "windows": windows,
        "batches": batches,
        "pass": pct <= 0.5 and rss_mb <= 150,
        "bench_wall_s": round(wall, 2),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=3600, help="measured ticks (default: one simulated hour)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--collector", default=None, help="HOST:PORT of a collector: also run the shipper")
    ap.add_argument("--kernels", choices=("numba", "numpy", "both"), default="both",
                    help="agent.kernels; both: one fresh process each (peak RSS is per process)")
    a = ap.parse_args()
    if a.kernels == "both":
        import subprocess

        for k in ("numba", "numpy"):
            args = [sys.executable, __file__, "--kernels", k, "--ticks", str(a.ticks), "--gpus", str(a.gpus),
                    "--warmup", str(a.warmup)] + (["--collector", a.collector] if a.collector else [])
            subprocess.run(args, check=True)
        return
    if a.kernels == "numba":
        _warm_kernels()
    print(json.dumps(run(a.ticks, a.gpus, a.collector, a.warmup, a.kernels)), flush=True)


if __name__ == "__main__":
    main()
