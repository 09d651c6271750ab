"""`gpuledger demo`: a simulated fleet, end to end, on the embedded store.

A collector on 127.0.0.1 (random port) with embedded ClickHouse (chDB) in a data directory;
one agent per simulated host with its own simulated clock, spool directory and gRPC stream;
a simulated day replayed as fast as the machine allows; then the reports, fetched from the
collector's query service exactly as `gpuledger idle` does.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimHost, SimulatedSource, Truth, simulated_fleet
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock, WallClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.store import Store
from gpuledger.config import AgentConfig


@dataclass
class FleetRun:
    start_us: int
    end_us: int
    agents: list
    sources: list[SimulatedSource]
    shippers: list[Shipper]
    wall_s: float

    def truth(self) -> dict[str, Truth]:
        out = {}
        for s in self.sources:
            t = Truth()
            for g in s.truth:
                t.add(g)
            out[s.host_id] = t
        return out


def run_fleet(collector_address: str, spool_root: Path, n_hosts: int, hours: float, *, seed: int = 7,
              start_us: int | None = None, tick_s: float = 300.0, flush_s: float = 600.0, window_s: float = 10.0,
              progress=None, drain_timeout_s: float = 300.0, token: str | None = None,
              hosts: list[SimHost] | None = None, instance_ids: dict[str, str] | None = None) -> FleetRun:
    """Run a simulated fleet for `hours` of simulated time, one thread per host; wait for every ack.

    `hosts` defaults to `simulated_fleet(n_hosts, seed)`. A host's lifecycle events (simulate.SimHost)
    are played on its own clock: a stop is a graceful agent stop (the host is then off), a start a new
    agent run, a kill an agent that dies right after closing its windows while the host stays up, a
    restart the agent back on the same boot. `instance_ids`: host_id -> cloud instance id (e.g. from
    simbill.resource_ids, to match a simulated bill)."""
    w_us = int(window_s * 1e6)
    if start_us is None:
        start_us = (WallClock().now_us() - int(hours * 3600e6)) // w_us * w_us
    end_us = start_us + int(hours * 3600e6)
    hosts = simulated_fleet(n_hosts, seed) if hosts is None else hosts
    agents, sources, shippers, clocks, cfgs, spools = [], [], [], [], [], []
    for h in hosts:
        off = int(h.clock_offset_s * 1e6)
        clock = SimClock(start_us + off)
        src = SimulatedSource(h.host_id, h.gpu_model, list(h.gpus), start_us + off, seed=seed)
        cfg = AgentConfig(host_id=h.host_id, provider=h.provider, region=h.region, instance_type=h.instance_type,
                          instance_id=(instance_ids or {}).get(h.host_id, ""), tags=dict(h.tags),
                          collector=collector_address,
                          spool_dir=str(spool_root / h.host_id), window_s=window_s, tick_s=min(tick_s, window_s),
                          flush_s=flush_s, kernels="numba").validate()
        spool = Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes, fsync=False)
        agents.append(Agent(cfg, src, clock, spool, start_us=start_us + off))
        shippers.append(Shipper(collector_address, spool, token=token, max_inflight=4).start())
        sources.append(src)
        clocks.append(clock)
        cfgs.append(cfg)
        spools.append(spool)
    runs: list[list[Agent]] = [[a] for a in agents]
    done_us = [0] * len(hosts)
    t0 = time.perf_counter()

    def drive(i: int) -> None:
        clock, src, h = clocks[i], sources[i], hosts[i]
        off = int(h.clock_offset_s * 1e6)
        agent: Agent | None = runs[i][0]

        def run_until(t_true_us: int) -> None:
            target = min(t_true_us, end_us) + off
            while clock.now_us() < target:
                clock.advance(min(tick_s, (target - clock.now_us()) / 1e6))
                agent.step()
                done_us[i] = clock.now_us() - off - start_us

        for t_s, kind in sorted(h.lifecycle):
            t = start_us + int(t_s * 1e6)
            if t >= end_us:
                break
            if kind in ("stop", "kill") and agent is not None:
                run_until(t)
                if kind == "stop":
                    agent.close()
                else:  # dies: no stop batch, the host stays up; what was not spooled yet is lost
                    src.forget_after(spools[i].closed_until_ms * 1000)
                agent = None
            elif kind in ("start", "restart") and agent is None:
                clock.advance((t + off - clock.now_us()) / 1e6)
                src.skip_to(clock.now_us(), unmonitored=kind == "restart")
                # a start is a new run from now; a restart resumes where the killed run stopped closing windows
                agent = Agent(cfgs[i], src, clock, spools[i], start_us=clock.now_us() if kind == "start" else None,
                              boot_ms=0)
                runs[i].append(agent)
        if agent is not None:
            run_until(end_us)
            agent.close()
        done_us[i] = end_us - start_us

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(len(hosts))]
    for t in threads:
        t.start()
    total = (end_us - start_us) * len(hosts)
    while any(t.is_alive() for t in threads):
        if progress:
            progress(sum(done_us) / total)
        time.sleep(0.1)
    if progress:
        progress(1.0)
    for sh in shippers:
        if not sh.drain(drain_timeout_s):
            raise RuntimeError(f"shipper for {sh.spool.dir} did not drain: {sh.stats.last_error}")
        sh.close()
    return FleetRun(start_us, end_us, [a for r in runs for a in r], sources, shippers, time.perf_counter() - t0)


def start_embedded_collector(data_dir: Path, listen: str = "127.0.0.1:0") -> Collector:
    store = Store(f"chdb://{data_dir / 'chdb'}")
    collector = Collector(store, Pricing.default(), listen=listen)
    collector.start()
    return collector


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_demo(root: Path, *, hosts: int = 8, hours: float = 24.0, seed: int = 7, mlflow: bool = False,
             echo=print) -> None:
    """`gpuledger demo`: every part of gpuledger on a simulated day, through a real collector on 127.0.0.1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gpuledger.agent.simulate import elastic_fleet
    from gpuledger.client import fetch_report
    from gpuledger.collector import cli as collector_cli
    from gpuledger.collector.simbill import resource_ids
    from gpuledger.demo_finance import demo_instance_ids, import_demo_finance
    from gpuledger.demo_workflow import workflow_demo
    from gpuledger.format import render
    from gpuledger.report import write_report

    collector = start_embedded_collector(root)
    echo(f"collector on {collector.address}, embedded ClickHouse (chDB) in {root / 'chdb'}")
    t0 = time.perf_counter()
    try:
        billed = simulated_fleet(hosts, seed)
        fleet = billed + [h for h in elastic_fleet(hours) if h.host_id == "sim-elastic-endpoint"]
        with Progress(TextColumn("simulating {task.fields[hosts]} hosts x {task.fields[hours]:g} h"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn()) as bar:
            task = bar.add_task("sim", total=1.0, hosts=len(fleet), hours=hours)
            ids = {**demo_instance_ids(hosts, seed), **{h.host_id: resource_ids(h.provider, h.region, h.host_id)[1]
                                                        for h in fleet}}
            run = run_fleet(collector.address, root / "spool", hosts, hours, seed=seed, hosts=fleet, instance_ids=ids,
                            progress=lambda f: bar.update(task, completed=f))
        windows = sum(a.windows_sampled for a in run.agents)
        gpus = sum(len(s.gpus()) for s in run.sources)
        echo(f"{gpus} GPUs on {len(fleet)} hosts: {windows:,} GPU-windows sampled, spooled, streamed and "
             f"acknowledged in {time.perf_counter() - t0:.1f} s")
        since_ms, until_ms = run.start_us // 1000, run.end_us // 1000
        table, reply = fetch_report(collector.address, "idle", since_ms, until_ms, "host")
        echo("\nIdle waste by host (gpuledger idle):")
        echo(render(collector_cli.with_since(table.to_pylist()), "table", collector_cli.IDLE_COLUMNS))
        table, _ = fetch_report(collector.address, "cost", since_ms, until_ms, "team")
        echo("\nCost by team (gpuledger cost --by team):")
        echo(render(table.to_pylist(), "table", ["team", "gpu_hours", "active_hours", "idle_held_hours",
                                                 "idle_free_hours", "unmonitored_hours", "cost", "idle_cost",
                                                 "currency"]))
        echo(f"\nprices: {reply.pricing_source}")
        echo("\nEndpoints and experiments (inference servers scraped for their traffic; an experiment's runs):")
        wf = workflow_demo(collector, root, min(hours, 24.0), seed=seed, start_us=run.start_us, mlflow=mlflow,
                           echo=echo)
        # the bill lists the hosts that ran all day (the elastic endpoint, off part of the day, is priced from the
        # catalog), the rest of a cloud bill (general-purpose compute for web and databases) and a small credit
        finance = import_demo_finance(collector.address, run, root / "finance", seed=seed, hosts=billed + wf.hosts,
                                      credit=50.0, other_compute_per_day=2_500.0)
        echo(finance.text)
        page = write_report(collector.address, since_ms, until_ms, root / "report.html")
        echo(f"\nHTML report (opens offline; charts for finance): {page.resolve()}")
    finally:
        collector.stop()
        collector.store.close()
    echo(f"\ndata lives in {root.resolve()} (store: {root / 'chdb'}, agent spools: {root / 'spool'}).")
    echo(f"explore it: gpuledger collector serve --data-dir {root} & gpuledger idle --since {int(hours) + 1}h")
