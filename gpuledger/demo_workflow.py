"""The demo's endpoints and experiments: a small fleet where people serve models and run experiments.

- `sim-inf-000-g6e.xlarge`: endpoint `chat` (production), one L40S, diurnal traffic all day;
- `sim-inf-001-g6.xlarge`: endpoint `chat-dev` (development), one L4, up around the clock but
  used only 09:00-17:00 UTC: it idles all night, and `gpuledger endpoints` flags it;
- `sim-train-002-g5.12xlarge`: four A10Gs running the runs of experiment `sim-finetune`, some of
  which fail early.

Each endpoint is a simulated vLLM server (agent.simulate.SimEndpoint). With `scrape="http"` (the
default) every one is served over real HTTP on 127.0.0.1 (SimInferenceServer) and the agents scrape
it through [[agent.endpoints]] exactly as they scrape vLLM; `scrape="direct"` hands the exposition
to the scraper in process (same parser and windows, no sockets).

With MLflow, the runs are created on the tracking server first (their ids are what the simulated
training processes carry as MLFLOW_RUN_ID), ended FINISHED or FAILED after the simulation, the best
finished run's model registered and given the `production` alias, and the collector's tracker job
writes each run's cost onto it.

The lead's `gpuledger demo` calls `workflow_demo(collector, root, hours, seed=..., mlflow=...)` after
its own fleet, with the same collector.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import (
    SimGpu,
    SimHost,
    SimInferenceServer,
    SimRun,
    SimulatedSource,
    Traffic,
    sim_http_get,
)
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock, WallClock
from gpuledger.collector.simbill import resource_ids
from gpuledger.config import AgentConfig

EXPERIMENT = "sim-finetune"
MODEL = "sim-chat-model"


@dataclass(frozen=True)
class PlannedRun:
    name: str
    gpu: int
    start_s: float
    end_s: float
    outcome: str  # FINISHED | FAILED


def plan_runs(hours: float, seed: int = 7, gpus: int = 4) -> list[PlannedRun]:
    """Runs over `hours` on `gpus` GPUs: each GPU runs back to back, runs of 40-90 min, about one in
    three failing in its first quarter; deterministic for a seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, total_s = [], hours * 3600.0
    for g in range(gpus):
        t = float(rng.uniform(0, 900))
        i = 0
        while t < total_s - 600:
            length = float(rng.uniform(40, 90)) * 60
            fails = rng.random() < 0.34
            end = min(total_s, t + (length * float(rng.uniform(0.1, 0.25)) if fails else length))
            out.append(PlannedRun(f"lr-{g}-{i}", g, t, end, "FAILED" if fails else "FINISHED"))
            t = end + float(rng.uniform(120, 900))
            i += 1
    return out


def synthetic_run_id(name: str, seed: int) -> str:
    return hashlib.blake2b(f"{name}/{seed}".encode(), digest_size=16).hexdigest()  # 32 hex, as MLflow's


def workflow_hosts(runs: list[tuple[PlannedRun, SimRun]], gpus: int = 4) -> list[SimHost]:
    """The three hosts (see the module docstring); training GPU g runs the planned runs of GPU g."""
    per_gpu: list[list[SimRun]] = [[] for _ in range(gpus)]
    for p, r in sorted(runs, key=lambda x: x[1].start_s):
        per_gpu[p.gpu % gpus].append(r)
    return [
        SimHost("sim-inf-000-g6e.xlarge", "aws", "us-east-1", "g6e.xlarge", "L40S",
                (SimGpu("endpoint", team="platform", project="chat", endpoint="chat", phase="production",
                        traffic=Traffic(peak_rps=3.0)),), {"team": "platform"}),
        SimHost("sim-inf-001-g6.xlarge", "aws", "us-east-1", "g6.xlarge", "L4",
                (SimGpu("endpoint", team="platform", project="chat", endpoint="chat-dev", phase="development",
                        traffic=Traffic(peak_rps=0.05, shape="hours", hours=(9.0, 17.0))),), {"team": "platform"}),
        SimHost("sim-train-002-g5.12xlarge", "aws", "us-east-1", "g5.12xlarge", "A10G",
                tuple(SimGpu("experiment", team="research", project="finetune", runs=tuple(rs)) for rs in per_gpu),
                {"team": "research"}),
    ]


@dataclass
class WorkflowFleet:
    start_us: int
    end_us: int
    agents: list
    sources: list[SimulatedSource]
    shippers: list[Shipper]
    runs: list[tuple[PlannedRun, SimRun]] = field(default_factory=list)
    wall_s: float = 0.0
    hosts: list[SimHost] = field(default_factory=list)

    def endpoint(self, name: str):
        for s in self.sources:
            if name in s.endpoints:
                return s.endpoints[name]
        raise KeyError(name)


def run_workflow_fleet(collector_address: str, spool_root: Path, hours: float, *, start_us: int | None = None,
                       seed: int = 7, runs: list[tuple[PlannedRun, SimRun]] | None = None, window_s: float = 10.0,
                       flush_s: float = 300.0, scrape: str = "http", token: str | None = None,
                       progress: Callable[[float], None] | None = None, drain_timeout_s: float = 300.0,
                       hosts: list[SimHost] | None = None, gpu_tick_s: float = 60.0) -> WorkflowFleet:
    """Drive the workflow hosts for `hours` of simulated time, one thread and clock per host, through
    real agents, spools and gRPC streams; wait for every acknowledgement. The endpoints are scraped at
    every window boundary (so each window's counters are exactly its own), the GPUs polled every
    `gpu_tick_s` (a multiple of the window). `runs`: (plan, SimRun) pairs; default: `plan_runs` with
    synthetic run ids."""
    if scrape not in ("http", "direct"):
        raise ValueError(f"scrape: must be http or direct, got {scrape!r}")
    w_us = int(window_s * 1e6)
    per_step = max(1, int(round(gpu_tick_s / window_s)))
    if start_us is None:
        start_us = (WallClock().now_us() - int(hours * 3600e6)) // w_us * w_us
    end_us = start_us + int(hours * 3600e6)
    if runs is None:
        runs = [(p, SimRun(synthetic_run_id(p.name, seed), p.start_s, p.end_s, "0")) for p in plan_runs(hours, seed)]
    hosts = hosts if hosts is not None else workflow_hosts(runs)
    agents, sources, shippers, servers, clocks = [], [], [], [], []
    t0 = time.perf_counter()
    try:
        for h in hosts:
            clock = SimClock(start_us)  # the host's own clock: its simulated servers answer on it
            src = SimulatedSource(h.host_id, h.gpu_model, list(h.gpus), start_us, seed=seed)
            http_get = None
            if src.endpoints and scrape == "http":
                srv = SimInferenceServer(src.endpoints, clock)
                servers.append(srv)
                urls = {n: srv.url(n) for n in src.endpoints}
            else:
                urls = {n: f"http://sim/{n}/metrics" for n in src.endpoints}
                http_get = sim_http_get(src.endpoints, clock) if src.endpoints else None
            # the instance id a simulated bill gives this host (collector/simbill.py), as the metadata service would
            cfg = AgentConfig(host_id=h.host_id, provider=h.provider, region=h.region, instance_type=h.instance_type,
                              instance_id=resource_ids(h.provider, h.region, h.host_id)[1],
                              tags=dict(h.tags), collector=collector_address, spool_dir=str(spool_root / h.host_id),
                              window_s=window_s, tick_s=window_s, flush_s=flush_s, kernels="numba",
                              endpoints=[{"name": n, "server": "vllm", "url": u} for n, u in urls.items()]).validate()
            spool = Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes, fsync=False)
            agents.append(Agent(cfg, src, clock, spool, start_us=start_us, http_get=http_get))
            shippers.append(Shipper(collector_address, spool, token=token, max_inflight=4).start())
            sources.append(src)
            clocks.append(clock)
        steps = int((end_us - start_us) // w_us)
        done = [0] * len(agents)
        errors: list[BaseException] = []

        def drive(i: int) -> None:
            try:
                agents[i].step()  # the first scrape at the start: the counters' baseline
                for k in range(steps):
                    clocks[i].advance(window_s)
                    if (k + 1) % per_step == 0 or k + 1 == steps:
                        agents[i].step()  # polls the GPUs, folds their windows, scrapes
                    else:
                        agents[i].scrape()
                    done[i] = k + 1
                agents[i].close()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)

        threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(len(agents))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if progress:
                progress(sum(done) / max(1, steps * len(agents)))
            time.sleep(0.1)
        if errors:
            raise errors[0]
        if progress:
            progress(1.0)
        for sh in shippers:
            if not sh.drain(drain_timeout_s):
                raise RuntimeError(f"shipper for {sh.spool.dir} did not drain: {sh.stats.last_error}")
    finally:
        for sh in shippers:
            sh.close()
        for srv in servers:
            srv.close()
    return WorkflowFleet(start_us, end_us, agents, sources, shippers, list(runs), time.perf_counter() - t0,
                         list(hosts))


# ----------------------------------------------------------------------------- MLflow


def find_mlflow() -> list[str] | None:
    """The mlflow command: GPULEDGER_MLFLOW (an executable), `mlflow` on PATH, or .venv-mlflow/bin/mlflow."""
    exe = os.environ.get("GPULEDGER_MLFLOW", "")
    if exe:
        return [exe] if Path(exe).exists() else None
    for cand in (shutil.which("mlflow"), str(Path(".venv-mlflow") / "bin" / "mlflow")):
        if cand and Path(cand).exists():
            return [cand]
    return None


def start_local_mlflow(workdir: Path, timeout_s: float = 180.0) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1 (a free port), sqlite store in `workdir`; returns (url, process)."""
    cmd = find_mlflow()
    if cmd is None:
        raise RuntimeError("mlflow is not installed: pip install 'mlflow[auth]==3.17.2' (in a venv of its own: it "
                           "pins an older pyarrow), then set GPULEDGER_MLFLOW to its mlflow executable")
    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (workdir / "mlflow.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.Popen(cmd + ["server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                                   "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {workdir / 'mlflow.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            time.sleep(0.3)
    stop_local_mlflow(proc)
    raise RuntimeError(f"mlflow server not up after {timeout_s:.0f} s; see {workdir / 'mlflow.log'}")


def stop_local_mlflow(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def create_mlflow_runs(client, planned: list[PlannedRun], start_ms: int,
                       experiment: str = EXPERIMENT) -> tuple[str, list[tuple[PlannedRun, SimRun]]]:
    """The planned runs as MLflow runs (RUNNING, started when the plan says): (experiment id, pairs)."""
    exp_id = client._experiment_id(experiment, create=True)
    out = []
    for p in planned:
        r = client.create_run(exp_id, run_name=p.name, start_time_ms=start_ms + int(p.start_s * 1000),
                              tags={"gpu": str(p.gpu)})
        out.append((p, SimRun(r.run_id, p.start_s, p.end_s, exp_id)))
    return exp_id, out


def finish_mlflow_runs(client, runs: list[tuple[PlannedRun, SimRun]], start_ms: int, model: str = MODEL) -> str:
    """End each run as planned; register the longest finished run's model and give it the `production`
    alias (a deployment). Returns that run's id ('' if none finished)."""
    best, best_len = "", -1.0
    for p, r in runs:
        client.update_run(r.run_id, p.outcome, end_time_ms=start_ms + int(p.end_s * 1000))
        if p.outcome == "FINISHED" and p.end_s - p.start_s > best_len:
            best, best_len = r.run_id, p.end_s - p.start_s
    if best:
        # registry writes the client does not otherwise need: straight to the REST API
        try:
            client._call("POST", "registered-models/create", f"model {model!r}: create", body={"name": model})
        except Exception as e:  # already there (a demo run twice on one server)
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
                raise
        mv = client._call("POST", "model-versions/create", f"model {model!r}: create version",
                          body={"name": model, "source": f"runs:/{best}/model", "run_id": best})
        client._call("POST", "registered-models/alias", f"model {model!r}: set alias",
                     body={"name": model, "alias": "production", "version": str(mv["model_version"]["version"])})
    return best


def workflow_demo(collector, root: Path, hours: float, *, seed: int = 7, start_us: int | None = None,
                  mlflow: bool = False, echo: Callable[[str], None] = print, scrape: str = "http") -> WorkflowFleet:
    """The demo's second part: the workflow fleet into `collector`, then `endpoints`, `runs` and an
    estimate; with `mlflow`, a local MLflow server whose runs get their cost written on them."""
    from gpuledger.client import fetch_report
    from gpuledger.collector.runs import RunCostSync
    from gpuledger.format import render
    from gpuledger.integrations.mlflow import MlflowClient

    w_us = 10_000_000
    if start_us is None:
        start_us = (WallClock().now_us() - int(hours * 3600e6)) // w_us * w_us
    start_ms = start_us // 1000
    planned = plan_runs(hours, seed)
    proc, client, runs, exp_id = None, None, None, "0"
    try:
        if mlflow:
            url, proc = start_local_mlflow(root / "mlflow")
            client = MlflowClient(url)
            exp_id, runs = create_mlflow_runs(client, planned, start_ms)
            echo(f"MLflow on {url}: experiment {EXPERIMENT} ({exp_id}), {len(runs)} runs")
        fleet = run_workflow_fleet(collector.address, root / "spool-workflow", hours, start_us=start_us, seed=seed,
                                   runs=runs, scrape=scrape)
        now_ms = WallClock().now_us() // 1000
        if client is not None:
            best = finish_mlflow_runs(client, fleet.runs, start_ms)
            sync = RunCostSync(collector.store, collector.pricing, collector.rules, mlflow=client, final_after_s=0)
            n = sync.sync(now_ms)
            echo(f"cost written onto {n} MLflow runs; model {MODEL} production alias -> run {best[:8]}")
        since, until = fleet.start_us // 1000, fleet.end_us // 1000
        table, _ = fetch_report(collector.address, "endpoints", since, until, "")
        echo("\nInference endpoints (gpuledger endpoints):")
        echo(render(table.to_pylist(), "table", ENDPOINT_COLUMNS))
        for r in table.to_pylist():
            if r["flag"]:
                echo(f"  ! {r['endpoint']}: {r['flag']}")
        table, _ = fetch_report(collector.address, "runs", since, until, "", {"experiment": exp_id})
        rows = table.to_pylist()
        outcome = {r.run_id: p.outcome for p, r in fleet.runs}
        for r in rows:
            r["status"] = outcome.get(r["run"], "")
        echo(f"\nRuns of {EXPERIMENT}, the 10 most expensive (gpuledger runs --experiment {EXPERIMENT}):")
        echo(render(rows[:10], "table", ["run", "status", "gpu_hours", "active_hours", "idle_held_hours", "cost",
                                         "idle_share", "currency"]))
        failed = sum(r["cost"] or 0.0 for r in rows if r["status"] == "FAILED")
        total = sum(r["cost"] or 0.0 for r in rows)
        echo(f"{len(rows)} runs, {total:,.2f} USD in all; {failed:,.2f} USD on runs that failed")
        if client is not None:
            from gpuledger.collector.runs import cost_per_successful_deployment
            from gpuledger.config import MlflowConfig

            value, reason = cost_per_successful_deployment(collector.store, collector.pricing, since, until, now_ms,
                                                           MlflowConfig(tracking_uri=client.base), client=client)
            echo(f"cost per successful deployment: {'-' if value is None else f'{value:,.2f} USD'} ({reason})")
        return fleet
    finally:
        if proc is not None:
            stop_local_mlflow(proc)


ENDPOINT_COLUMNS = ["endpoint", "phase", "up_hours", "serving_hours", "idle_share", "requests", "cost",
                    "cost_per_1k_requests", "cost_per_million_tokens", "scale_to_zero_saving", "office_hours_saving"]
