"""`gpuledger report html`: the self-contained HTML report of a range (gpuledger/report/)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

app = typer.Typer(help="Reports as pictures: one HTML page for finance and SREs.", no_args_is_help=True)

DEFAULT_COLLECTOR = "127.0.0.1:4700"


@app.command("html")
def html(
    output: Annotated[str, typer.Option("--output", "-o", help="HTML file to write.")],
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (30d, 12h). Default 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="End: ISO 8601 or relative. Default now.")] = None,
    png: Annotated[str | None, typer.Option(help="Also write a full-page screenshot (PNG), rendered by headless "
                                                 "Chromium, which must be installed.")] = None,
    token_file: Annotated[str | None, typer.Option(help="File holding the read-only query token "
                                                     "(or GPULEDGER_QUERY_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """Write one self-contained HTML page: spend by team, project and phase over time, idle waste by host,
    a utilization heat map, endpoints, the baseline, and the prices behind every figure.

    The page opens offline (a mail attachment will do): its charts' JavaScript is inlined and it loads
    nothing. Its figures are the collector's reports for the range (the same as `gpuledger idle`,
    `gpuledger cost` and `gpuledger export focus`).

    Examples:
      gpuledger report html --since 30d -o gpu-cost.html
      gpuledger report html --since 2026-11-01 --until 2026-12-01 -o november.html --png november.png
    """
    import grpc

    from gpuledger.client import parse_time
    from gpuledger.config import ConfigError
    from gpuledger.security import client_credentials, read_token

    now_ms = int(time.time() * 1000)
    try:
        since_ms = parse_time(since, now_ms, now_ms - 7 * 86_400_000)
        until_ms = parse_time(until, now_ms, now_ms)
    except ValueError as e:
        typer.echo(f"gpuledger report html: {e}", err=True)
        raise typer.Exit(2) from e
    if since_ms >= until_ms:
        typer.echo("gpuledger report html: --since must be before --until", err=True)
        raise typer.Exit(2)
    try:
        token = read_token(token_file, "GPULEDGER_QUERY_TOKEN")
        creds = client_credentials(ca_file)
    except ConfigError as e:
        typer.echo(f"gpuledger report html: {e}", err=True)
        raise typer.Exit(2) from e

    from gpuledger.report import write_report

    try:
        path = write_report(collector, since_ms, until_ms, output, token=token, credentials=creds)
    except grpc.RpcError as e:
        typer.echo(f"gpuledger report html: collector at {collector}: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(1) from e
    except OSError as e:
        typer.echo(f"gpuledger report html: {output}: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)", err=True)
    if png:
        from gpuledger.report.browser import Browser, BrowserError, check_page

        try:
            with Browser() as b:
                res = check_page(b, path, png)
        except (BrowserError, OSError) as e:
            typer.echo(f"gpuledger report html: --png: {e}", err=True)
            raise typer.Exit(1) from e
        if res.blank_charts or res.errors:
            typer.echo(f"gpuledger report html: the page did not draw cleanly: blank {res.blank_charts}, "
                       f"errors {res.errors[:3]}", err=True)
            raise typer.Exit(1)
        typer.echo(f"screenshot written to {png} (charts drawn in {res.drawn_ms / 1000:.1f} s)", err=True)
