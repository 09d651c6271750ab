"""Agent commands around NVML and logs: `replay` (nvidia-smi CSV -> collector) and `probe`.

Registered on the agent app by gpuledger/agent/cli.py: `app.command()(replay)`, `app.command()(probe)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gpuledger.config import ConfigError, load_agent


def replay(
    file: Annotated[Path, typer.Argument(help="nvidia-smi --format=csv log (with or without nounits or noheader).",
                                         exists=True, dir_okay=False, readable=True)],
    host: Annotated[str, typer.Option("--host", help="Host id the GPUs belong to (as the agent would report).")],
    provider: Annotated[str, typer.Option(help="Cloud provider (aws, gcp, azure, onprem, ...), for pricing.")],
    region: Annotated[str, typer.Option(help="Region, for pricing (e.g. us-east-1).")],
    instance_type: Annotated[str, typer.Option(help="Instance type, for pricing (e.g. p4d.24xlarge).")],
    collector: Annotated[str | None, typer.Option(help="Collector HOST:PORT (default from config, "
                                                        "127.0.0.1:4700).")] = None,
    spool_dir: Annotated[str | None, typer.Option(help="Spool directory; default a temporary one, removed once "
                                                       "everything is acknowledged. Never the live agent's.")] = None,
    idle_mem_threshold_mib: Annotated[int | None, typer.Option(
        help="A GPU at 0 % with at least this much memory used is idle-held, else idle-free (default 1024).")] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the log's timestamps: nvidia-smi prints the logging "
                                               "host's local time without a zone (e.g. Europe/Berlin, Asia/Tokyo; "
                                               "Etc/GMT-9 is UTC+9).")] = "UTC",
    columns: Annotated[str | None, typer.Option(
        help="Column names of a log without a header line (--format=csv,noheader), comma-separated in "
             "--query-gpu order, e.g. timestamp,index,uuid,utilization.gpu,memory.used.")] = None,
    gpu_uuid: Annotated[str | None, typer.Option(
        help="UUID of the log's one GPU, for a log that names none (no uuid column).")] = None,
    gpu_index: Annotated[int | None, typer.Option(
        help="Index of the log's one GPU, for a log that names none (no index column).")] = None,
    config: Annotated[str | None, typer.Option(help="Agent TOML config (token, TLS, window size).")] = None,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for the collector's acknowledgements.")] = 300.0,
) -> None:
    """Replay an nvidia-smi CSV log into the collector, then exit once everything is acknowledged.

    Each line covers the time since the previous line of the same GPU; utilization % of it is
    active; a gap longer than three logging intervals is unmonitored; the rest is idle-held when
    memory used reaches the threshold or the line is above 0 %, else idle-free. No time is
    expected before the first line or after the last. Malformed lines are reported with their
    line numbers and skipped. The summary states the time zone the timestamps were read in.

    Examples:
      nvidia-smi --query-gpu=timestamp,index,uuid,name,utilization.gpu,memory.used,memory.total,power.draw \\
          --format=csv -l 5 > gpus.csv
      gpuledger agent replay gpus.csv --host train-07 --provider aws --region us-east-1 \\
          --instance-type p4d.24xlarge --collector collector.internal:4700 --timezone Europe/Berlin
      gpuledger agent replay old.csv --host lab-3 --provider onprem --region lab --instance-type dgx-a100 \\
          --idle-mem-threshold-mib 2048 --timezone Asia/Tokyo
      gpuledger agent replay raw.csv --columns timestamp,utilization.gpu,memory.used --gpu-index 0 \\
          --host ws-1 --provider onprem --region lab --instance-type rtx4090-ws
    """
    from gpuledger.agent.replay import ReplayError, parse_columns
    from gpuledger.agent.replay import replay as run_replay
    from gpuledger.security import agent_channel

    try:
        cfg = load_agent(config, host_id=host, provider=provider, region=region, instance_type=instance_type,
                         collector=collector, idle_mem_threshold_mib=idle_mem_threshold_mib)
        token, creds = agent_channel(cfg)
    except ConfigError as e:
        typer.echo(f"gpuledger agent replay: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        summary = run_replay(file, cfg, spool_dir=spool_dir, tz=timezone, drain_timeout_s=timeout_s, token=token,
                             channel_credentials=creds, columns=parse_columns(columns) if columns is not None else None,
                             gpu_uuid=gpu_uuid or "", gpu_index=gpu_index)
    except (ReplayError, OSError) as e:
        typer.echo(f"gpuledger agent replay: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary.render())
    if not summary.complete:
        raise typer.Exit(1)


def probe(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    proc_root: Annotated[str, typer.Option(help="Where the host's /proc is (e.g. /host/proc in a container).")] =
        "/proc",
) -> None:
    """Show what NVML offers on this machine and what each per-tick call costs.

    Driver and NVML versions; per GPU: sample buffer and its observed period, energy counter, GPM,
    per-process utilization, MIG; the measured latency of each NVML call the agent makes per tick;
    whether process environments (the source of process tags) are readable. Exits 1 when NVML is
    not usable (no driver or library), with what to install or fix.

    Examples:
      gpuledger agent probe
      gpuledger agent probe --json > probe.json
      gpuledger agent probe --proc-root /host/proc
    """
    from gpuledger.agent.probe import probe as run_probe
    from gpuledger.agent.probe import render

    result = run_probe(proc_root=proc_root)
    if json_out:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        typer.echo(render(result), err=not result.get("ok"))
    if not result.get("ok"):
        raise typer.Exit(1)
