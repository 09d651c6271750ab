"""Endpoint scraping inside the agent: the CPU one scraped endpoint adds to a running agent.

Two agents on the same simulated GPU source (one GPU, seed fixed), stepped at the live agent's
1 s tick on a simulated clock, windows flushed every 10 s into a real spool (as `agent run` does,
without fsync): one without endpoints, one with N endpoints in [[agent.endpoints]] served over
loopback HTTP by a separate process (a production-sized vLLM exposition, about 70 kB, its request
counter advancing on every GET; that process's CPU is not counted). The difference of their CPU
(time.process_time), divided by ticks and endpoints, is what one endpoint costs: the HTTP GET, the
parse, the windows, and their share of the batches. Alternated, three rounds, median.

Goal: <= 1 ms of CPU per endpoint per 1 s tick, i.e. <= 0.1 % of one core per endpoint.
Prints one line of JSON.

    .venv/bin/python benchmarks/bench_endpoint_agent.py                  # 4 endpoints, 600 ticks
    .venv/bin/python benchmarks/bench_endpoint_agent.py --endpoints 8 --ticks 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scrape import SERVER, bodies  # noqa: E402  (the same server script and vLLM body as the scraper alone)

from gpuledger.agent.runtime import Agent  # noqa: E402
from gpuledger.agent.simulate import SimGpu, SimulatedSource  # noqa: E402
from gpuledger.agent.spool import Spool  # noqa: E402
from gpuledger.clock import SimClock  # noqa: E402
from gpuledger.config import AgentConfig  # noqa: E402

T0 = 1_767_225_600_000_000
GOAL_MS = 1.0


def run_agent(urls: list[str], ticks: int, workdir: Path) -> tuple[float, int]:
    """CPU seconds of `ticks` agent steps (1 s apart) and the endpoint windows it closed."""
    src = SimulatedSource("bench", "L4", [SimGpu("inference")], T0, seed=1)
    clock = SimClock(T0)
    cfg = AgentConfig(host_id="bench", spool_dir=str(workdir), window_s=10.0, tick_s=1.0, flush_s=10.0,
                      endpoints=[{"name": f"e{i}", "server": "vllm", "url": u,
                                  "labels": {"model_name": "facebook/opt-125m"}} for i, u in enumerate(urls)]).validate()
    agent = Agent(cfg, src, clock, Spool(str(workdir), fsync=False), start_us=T0)
    for _ in range(20):  # warm-up (imports, first scrapes)
        clock.advance(1.0)
        agent.step()
    c0 = time.process_time()
    for _ in range(ticks):
        clock.advance(1.0)
        agent.step()
    cpu = time.process_time() - c0
    stats = agent.endpoint_stats()
    assert all(s["scrapes_failed"] == 0 for s in stats.values()), stats
    return cpu, sum(s["scrapes_ok"] for s in stats.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    body = bodies()["production_sized"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "body.txt"
        path.write_text(body)
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            urls = [f"http://127.0.0.1:{port}/e{i}/metrics" for i in range(args.endpoints)]
            base, with_eps, scrapes = [], [], 0
            for r in range(args.rounds):
                base.append(run_agent([], args.ticks, Path(tmp) / f"a{r}")[0])
                cpu, n = run_agent(urls, args.ticks, Path(tmp) / f"b{r}")
                with_eps.append(cpu)
                scrapes += n
        finally:
            proc.terminate()
            proc.wait()
    b, w = statistics.median(base), statistics.median(with_eps)
    per_ms = (w - b) / (args.ticks * args.endpoints) * 1000
    print(json.dumps({
        "bench": "endpoint_agent", "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "endpoints": args.endpoints, "ticks": args.ticks, "body_bytes": len(body.encode()),
        "agent_cpu_ms_per_tick_without": round(b / args.ticks * 1000, 3),
        "agent_cpu_ms_per_tick_with": round(w / args.ticks * 1000, 3),
        "cpu_ms_per_endpoint_per_tick": round(per_ms, 3), "pct_of_core_per_endpoint": round(per_ms / 10, 4),
        "vs_goal": round(per_ms / GOAL_MS, 3), "rounds": args.rounds, "scrapes": scrapes,
    }))


if __name__ == "__main__":
    main()
