"""CLI of the agent side: `agent run`."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import typer

from gpuledger.agent.cli_nvml import probe, replay
from gpuledger.config import ConfigError, load_agent
from gpuledger.helptext import command

log = logging.getLogger("gpuledger.agent")
app = typer.Typer(help="The per-host agent: NVML -> windows -> spool -> gRPC.", no_args_is_help=True,
                  rich_markup_mode=None)


def run(
    config: Annotated[str | None, typer.Option(help="TOML config file ([agent] section).")] = None,
    collector: Annotated[str | None, typer.Option(help="Collector HOST:PORT.")] = None,
    spool_dir: Annotated[str | None, typer.Option(help="Spool directory (survives restarts).")] = None,
    simulate: Annotated[bool, typer.Option(help="Use a simulated GPU source instead of NVML.")] = False,
    sim_profile: Annotated[str, typer.Option(help="With --simulate: training, notebook, inference or idle.")] =
        "training",
    sim_gpus: Annotated[int, typer.Option(help="With --simulate: number of GPUs.")] = 4,
    sim_model: Annotated[str, typer.Option(help="With --simulate: GPU model (H100, A100, T4, ...).")] = "H100",
) -> None:
    """Run the agent until SIGTERM; the open window is spooled on the way out.

    Examples:
      gpuledger agent run --config /etc/gpuledger/agent.toml
      gpuledger agent run --simulate --collector 127.0.0.1:4700 --spool-dir gl-spool
    """
    from gpuledger.agent.runtime import Agent
    from gpuledger.agent.shipper import Shipper
    from gpuledger.agent.spool import Spool
    from gpuledger.clock import WallClock
    from gpuledger.security import agent_channel

    try:
        cfg = load_agent(config, collector=collector, spool_dir=spool_dir)
        token, creds = agent_channel(cfg)
    except ConfigError as e:
        typer.echo(f"gpuledger agent: {e}", err=True)
        raise typer.Exit(2) from e
    clock = WallClock()
    if simulate:
        from gpuledger.agent.simulate import GPU_MODELS, PROFILES, SimGpu, SimulatedSource

        if sim_profile not in PROFILES or sim_model not in GPU_MODELS:
            typer.echo(f"gpuledger agent: --sim-profile must be one of {PROFILES}, --sim-model one of "
                       f"{tuple(GPU_MODELS)}", err=True)
            raise typer.Exit(2)
        source = SimulatedSource(cfg.host_id, sim_model, [SimGpu(sim_profile)] * sim_gpus, clock.now_us())
    else:
        from gpuledger.agent.nvml import open_nvml_source

        try:
            source = open_nvml_source(cfg)  # NVML unusable: SystemExit with what to fix (exit 1)
        except ConfigError as e:
            typer.echo(f"gpuledger agent: {e}", err=True)
            raise typer.Exit(2) from e
    try:
        spool = Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes)
    except OSError as e:
        source.close()
        typer.echo(f"gpuledger agent: spool {cfg.spool_dir}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from e
    agent = Agent(cfg, source, clock, spool)
    shipper = Shipper(cfg.collector, spool, token=token, channel_credentials=creds, max_inflight=cfg.max_inflight,
                      ack_timeout_s=cfg.send_timeout_s, backoff_initial_s=cfg.backoff_initial_s,
                      backoff_max_s=cfg.backoff_max_s).start()
    if cfg.metrics_listen:
        from gpuledger.metrics import agent_registry
        from gpuledger.metrics import serve as serve_metrics

        serve_metrics(agent_registry(agent, spool, shipper), cfg.metrics_listen)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"agent {cfg.host_id}: {len(agent.gpus)} GPUs, shipping to {cfg.collector}, spool {cfg.spool_dir} "
               f"(epoch {spool.epoch}, {spool.pending_count()} batches pending)", err=True)
    agent.run(stop)
    agent.close()
    shipper.close(drain_timeout_s=5.0)
    spool.close()


command(app, run)
command(app, replay)
command(app, probe)
