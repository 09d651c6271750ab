"""`gpuledger`: the thin typer root. Sub-apps come from agent/ and collector/.

Exit codes, for every command: 0 success; 1 a runtime failure (collector unreachable or refusing
the request, store failure, replay not fully acknowledged, NVML unusable); 2 bad input (a bad flag
value, time, range, `--by` key, log level, config key or file).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gpuledger import __version__, cli_report
from gpuledger.agent.cli import app as agent_app
from gpuledger.collector import cli as collector_cli
from gpuledger.collector import cli_finance
from gpuledger.helptext import command

app = typer.Typer(help="gpuledger: what your GPUs cost, and how much of that is idle.", no_args_is_help=True,
                  rich_markup_mode=None)
app.add_typer(agent_app, name="agent")
app.add_typer(collector_cli.app, name="collector")
command(app, collector_cli.idle)
command(app, collector_cli.cost)
command(app, collector_cli.pricing)
export_app = typer.Typer(help="Export cost and usage for other tools.", no_args_is_help=True, rich_markup_mode=None)
command(export_app, collector_cli.export_focus, "focus")
app.add_typer(export_app, name="export")
app.add_typer(cli_report.app, name="report")
from gpuledger.collector import cli_workflow  # noqa: E402

cli_workflow.register(app)  # endpoints, inference-model, runs, estimate, alerts

DEMO_MARKER = ".gpuledger-demo"  # written into a demo's data directory: only such a directory is emptied
cli_finance.register(app)  # bill import, api-spend import, baseline


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[LogLevel, typer.Option(help="debug, info, warning or error.", case_sensitive=False)] =
        LogLevel.warning,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:
    logging.basicConfig(level=getattr(logging, log_level.value.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _demo_dir(path: Path) -> Path:
    """The demo's data directory, emptied only if a previous demo made it (its marker file is there)."""
    from gpuledger.demo import fresh_dir

    if path.exists():
        if not path.is_dir():
            typer.echo(f"gpuledger demo: --data-dir {path} is a file, not a directory", err=True)
            raise typer.Exit(2)
        if any(path.iterdir()) and not (path / DEMO_MARKER).is_file():
            typer.echo(f"gpuledger demo: --data-dir {path} is not empty and was not made by gpuledger demo (no "
                       f"{DEMO_MARKER} file in it): refusing to delete it. Name a new or empty directory, or "
                       f"remove this one yourself.", err=True)
            raise typer.Exit(2)
    root = fresh_dir(path)
    (root / DEMO_MARKER).write_text("made by gpuledger demo: the next demo run may delete this directory\n")
    return root


def demo(
    hosts: Annotated[int, typer.Option(help="Simulated hosts (at least 8 for the full mix).")] = 8,
    hours: Annotated[float, typer.Option(help="Simulated hours, ending now.")] = 24.0,
    data_dir: Annotated[str, typer.Option(help="Where the demo's store and spools go; emptied first if a "
                                               "previous demo made it, refused if it holds anything else.")] =
        "gpuledger-data/demo",
    seed: Annotated[int, typer.Option(help="Fleet seed.")] = 7,
    mlflow: Annotated[bool, typer.Option(help="Also start a local MLflow server (mlflow installed, or "
                                              ".venv-mlflow) and write each run's cost onto it.")] = False,
) -> None:
    """Run a simulated fleet end to end on the embedded store, then print the reports.

    Starts a collector (gRPC on 127.0.0.1, embedded ClickHouse in DATA_DIR) and one agent per
    simulated host (each with its own spool and gRPC stream) over a simulated day: training jobs,
    notebooks holding GPUs, diurnal inference, idle GPUs, an NVML outage, an elastic endpoint that
    scales to zero and back; then inference servers scraped for their traffic (one dev endpoint
    idling all night) and an experiment's runs, some failing. It prints the idle-waste and cost
    reports, the endpoints and runs, imports a simulated cloud bill and API spend export, answers
    the finance baseline, and writes the HTML report.

    Examples:
      gpuledger demo
      gpuledger demo --hosts 16 --hours 48 --data-dir gl-demo
      gpuledger demo --mlflow
    """
    from gpuledger.demo import run_demo

    root = _demo_dir(Path(data_dir))
    run_demo(root, hosts=hosts, hours=hours, seed=seed, mlflow=mlflow, echo=typer.echo)


command(app, demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
