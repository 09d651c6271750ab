"""`gpuledger`: the thin typer root. Sub-apps come from agent/ and collector/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from gpuledger import __version__
from gpuledger.agent.cli import app as agent_app
from gpuledger.collector import cli as collector_cli
from gpuledger.collector import cli_finance

app = typer.Typer(help="gpuledger: what your GPUs cost, and how much of that is idle.", no_args_is_help=True,
                  add_completion=False)
app.add_typer(agent_app, name="agent")
app.add_typer(collector_cli.app, name="collector")
app.command()(collector_cli.idle)
app.command()(collector_cli.cost)
app.command()(collector_cli.pricing)
export_app = typer.Typer(help="Export cost and usage for other tools.", no_args_is_help=True)
export_app.command("focus")(collector_cli.export_focus)
app.add_typer(export_app, name="export")
cli_finance.register(app, collector_cli.app)


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def demo(
    hosts: Annotated[int, typer.Option(help="Simulated hosts (at least 8 for the full mix).")] = 8,
    hours: Annotated[float, typer.Option(help="Simulated hours, ending now.")] = 24.0,
    data_dir: Annotated[str, typer.Option(help="Where the demo's store and spools go (emptied first).")] =
        "gpuledger-data/demo",
    seed: Annotated[int, typer.Option(help="Fleet seed.")] = 7,
) -> None:
    """Run a simulated fleet end to end on the embedded store, then print the reports.

    Starts a collector (gRPC on 127.0.0.1, embedded ClickHouse in DATA_DIR), one agent per
    simulated host (each with its own spool and gRPC stream), replays a simulated day, and asks
    the collector for the idle-waste and cost reports.

    Examples:
      gpuledger demo
      gpuledger demo --hosts 16 --hours 48 --data-dir /tmp/gl-demo
    """
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gpuledger.client import fetch_report
    from gpuledger.demo import fresh_dir, run_fleet, start_embedded_collector
    from gpuledger.format import render

    root = fresh_dir(Path(data_dir))
    collector = start_embedded_collector(root)
    typer.echo(f"collector on {collector.address}, embedded ClickHouse (chDB) in {root / 'chdb'}")
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("simulating {task.fields[hosts]} hosts x {task.fields[hours]:g} h"), BarColumn(),
                      TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn()) as bar:
            task = bar.add_task("sim", total=1.0, hosts=hosts, hours=hours)
            run = run_fleet(collector.address, root / "spool", hosts, hours, seed=seed,
                            progress=lambda f: bar.update(task, completed=f))
        windows = sum(a.windows_sampled for a in run.agents)
        gpus = sum(len(a.gpus) for a in run.agents)
        typer.echo(f"{gpus} GPUs on {hosts} hosts: {windows:,} GPU-windows sampled, spooled, streamed and "
                   f"acknowledged in {time.perf_counter() - t0:.1f} s")
        since_ms, until_ms = run.start_us // 1000, run.end_us // 1000
        table, reply = fetch_report(collector.address, "idle", since_ms, until_ms, "host")
        typer.echo("\nIdle waste by host (gpuledger idle):")
        typer.echo(render(table.to_pylist(), "table", collector_cli.IDLE_COLUMNS))
        table, _ = fetch_report(collector.address, "cost", since_ms, until_ms, "team")
        typer.echo("\nCost by team (gpuledger cost --by team):")
        typer.echo(render(table.to_pylist(), "table", ["team", "gpu_hours", "active_hours", "idle_held_hours",
                                                       "idle_free_hours", "unmonitored_hours", "cost", "idle_cost",
                                                       "currency"]))
        typer.echo(f"\nprices: {reply.pricing_source}")
    finally:
        collector.stop()
        collector.store.close()
    typer.echo(f"\ndata lives in {root.resolve()} (store: {root / 'chdb'}, agent spools: {root / 'spool'}).")
    typer.echo(f"explore it: gpuledger collector serve --data-dir {root} & gpuledger idle --since {int(hours) + 1}h")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
