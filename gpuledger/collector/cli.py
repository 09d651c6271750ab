"""CLI of the collector side: `collector serve`, and the reports (`idle`, `cost`, `pricing`)."""

from __future__ import annotations

import logging
import signal
import threading
from enum import StrEnum
from typing import Annotated

import grpc
import typer

from gpuledger.client import fetch_report, parse_time
from gpuledger.config import ConfigError, load_collector
from gpuledger.format import render
from gpuledger.helptext import command

log = logging.getLogger("gpuledger.collector")
app = typer.Typer(help="The central collector: gRPC ingest, ClickHouse storage, priced reports.",
                  no_args_is_help=True, rich_markup_mode=None)

DEFAULT_COLLECTOR = "127.0.0.1:4700"


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def serve(
    config: Annotated[str | None, typer.Option(help="TOML config file ([collector] section).")] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to listen on (default 127.0.0.1:4700).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Directory of the embedded store (chdb).")] = None,
    store: Annotated[str | None, typer.Option(help="Store DSN: chdb:///path or http(s)://host:8123.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback listen address without TLS.")] = False,
) -> None:
    """Run the collector until SIGTERM or Ctrl-C.

    Examples:
      gpuledger collector serve --data-dir /var/lib/gpuledger
      gpuledger collector serve --config /etc/gpuledger/collector.toml
      gpuledger collector serve --store http://default:@clickhouse:8123 --listen 0.0.0.0:4700
    """
    from gpuledger.collector.service import build_collector

    try:
        cfg = load_collector(config, listen=listen, data_dir=data_dir, store=store, insecure=insecure or None)
    except (ValueError, OSError) as e:
        typer.echo(f"gpuledger collector: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        collector = build_collector(cfg, config)
    except ValueError as e:  # ConfigError, PricingError, a bad DSN: bad input
        typer.echo(f"gpuledger collector: {e}", err=True)
        raise typer.Exit(2) from e
    except Exception as e:  # noqa: BLE001 - the store could not be opened: a runtime failure, said in one line
        typer.echo(f"gpuledger collector: store {cfg.store_dsn()}: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from e
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    collector.start()
    if cfg.metrics_listen:
        from gpuledger.metrics import collector_registry
        from gpuledger.metrics import serve as serve_metrics

        _, mport = serve_metrics(collector_registry(collector), cfg.metrics_listen)
        typer.echo(f"metrics on {cfg.metrics_listen.rsplit(':', 1)[0]}:{mport}/metrics", err=True)
    typer.echo(f"collector listening on {collector.address}, store {cfg.store_dsn()}; "
               f"{collector.security_note}", err=True)
    stop.wait()
    typer.echo("collector: finishing in-flight inserts", err=True)
    collector.stop(grace_s=10)
    collector.store.close()


def _report(report: str, collector: str, since: str | None, until: str | None, by: str, filters: dict,
            token_file: str | None, ca_file: str | None = None):
    import time

    now_ms = int(time.time() * 1000)
    try:
        since_ms = parse_time(since, now_ms, now_ms - 7 * 86_400_000)
        until_ms = parse_time(until, now_ms, now_ms)
    except ValueError as e:
        typer.echo(f"gpuledger: {e}", err=True)
        raise typer.Exit(2) from e
    if since_ms >= until_ms:
        typer.echo(f"gpuledger: --since ({since or '7d'}) must be before --until ({until or 'now'})", err=True)
        raise typer.Exit(2)
    from gpuledger.security import client_credentials, read_token

    try:
        token = read_token(token_file, "GPULEDGER_QUERY_TOKEN")
        creds = client_credentials(ca_file)
    except ConfigError as e:
        typer.echo(f"gpuledger: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        return fetch_report(collector, report, since_ms, until_ms, by, filters, token=token, credentials=creds)
    except grpc.RpcError as e:
        typer.echo(f"gpuledger: collector at {collector}: {e.code().name}: {e.details()}", err=True)
        # the collector names what is wrong with the request: bad input (2); anything else is a runtime failure
        raise typer.Exit(2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1) from e


IDLE_COLUMNS = ["host", "instance_type", "gpus", "state", "since", "gpu_hours", "active_hours", "idle_held_hours",
                "idle_free_hours", "unmonitored_hours", "mean_util_pct", "cost", "idle_cost", "idle_share", "currency"]


def with_since(rows: list[dict]) -> list[dict]:
    """Idle rows with a readable 'since': empty for a live host, else when it stopped, went silent or was retired."""
    for r in rows:
        r["since"] = "" if r.get("state") == "live" else _since_text(r.get("state_since_ms"))
    return rows


def _since_text(ms) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else ""


def idle(
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (7d, 12h). Default 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="End: ISO 8601 or relative. Default now.")] = None,
    by: Annotated[str, typer.Option(help="host or gpu.")] = "host",
    sort: Annotated[str, typer.Option(help="Column to sort by, descending (e.g. idle_cost, idle_share).")] = "idle_cost",
    fmt: Annotated[Fmt, typer.Option("--format", help="table, csv or json.")] = Fmt.table,
    host: Annotated[str | None, typer.Option(help="Only this host.")] = None,
    token_file: Annotated[str | None, typer.Option(help="File holding the read-only query token "
                                                     "(or GPULEDGER_QUERY_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """Idle waste per host (or GPU): who pays for GPUs that sit idle.

    Examples:
      gpuledger idle --since 7d
      gpuledger idle --since 2026-11-01 --until 2026-11-08 --by gpu --format csv
      gpuledger idle --since 24h --sort idle_share --format json
    """
    if by not in ("host", "gpu"):
        typer.echo("gpuledger idle: --by must be host or gpu", err=True)
        raise typer.Exit(2)
    table, reply = _report("idle", collector, since, until, by, {"host": host} if host else {}, token_file, ca_file)
    rows = table.to_pylist()
    if rows and sort not in rows[0]:
        typer.echo(f"gpuledger idle: --sort {sort!r} is not a column ({', '.join(rows[0])})", err=True)
        raise typer.Exit(2)
    rows.sort(key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0) if isinstance(r.get(sort), (int, float))
                             else 0, str(r.get(sort)) if not isinstance(r.get(sort), (int, float)) else ""))
    rows = with_since(rows)
    cols = IDLE_COLUMNS if by == "host" else IDLE_COLUMNS[:1] + ["gpu_uuid"] + IDLE_COLUMNS[1:]
    typer.echo(render(rows, fmt.value, cols if fmt != Fmt.json else None))
    if fmt == Fmt.table:
        typer.echo(f"\nprices: {reply.pricing_source}", err=True)


COST_BY = "team, project, phase, workload, experiment, run, endpoint, slurm_job, slurm_account, host, process, " \
          "or a tag key that the data carries"
_NO_TAG = ("(untagged)", "(unattributed)")


def known_by_keys() -> list[str]:
    """The `--by` keys always accepted: the finance names of process tags, `host` and `process`."""
    from gpuledger.collector.reports import TAG_ALIASES

    return [*TAG_ALIASES, "host", "process"]


def cost(
    by: Annotated[str, typer.Option(help=f"Group by: {COST_BY}.")] = "team",
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (7d). Default 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="End. Default now.")] = None,
    fmt: Annotated[Fmt, typer.Option("--format", help="table, csv or json.")] = Fmt.table,
    token_file: Annotated[str | None, typer.Option(help="File holding the read-only query token "
                                                     "(or GPULEDGER_QUERY_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """GPU cost by team, project, phase, workload, experiment or endpoint, split active / idle.

    --by takes one of the names above (team, project, phase, workload, experiment, run, endpoint,
    slurm_job, slurm_account), host or process; or any other tag key that a process or a host in
    the range carries (an allowlisted environment key lowercased without GPULEDGER_, such as
    cost_center for COST_CENTER; a host tag key from the agent config; a pod label tag). Any other
    key exits 2 and names the keys the range does carry.

    Examples:
      gpuledger cost --by team --since 30d
      gpuledger cost --by endpoint --since 2026-11-01 --format csv
      gpuledger cost --by experiment --since 7d --format json
      gpuledger cost --by cost_center --since 30d
    """
    table, reply = _report("cost", collector, since, until, by, {}, token_file, ca_file)
    rows = table.to_pylist()
    known = known_by_keys()
    if by not in known and all(r.get(by) in _NO_TAG for r in rows):
        # not a name we know, and no process or host in the range carries it: a typo, most likely
        focus, _ = _report("focus", collector, since, until, "day", {}, token_file, ca_file)
        import json

        seen = sorted({k for t in focus.column("Tags").to_pylist() for k in json.loads(t or "{}")}
                      if focus.num_rows and "Tags" in focus.column_names else set())
        typer.echo(f"gpuledger cost: --by {by!r} is not a known key ({', '.join(known)}) and no process or host in "
                   f"this range carries a tag of that name (tag keys in this range: {', '.join(seen) or 'none'})",
                   err=True)
        raise typer.Exit(2)
    cols = [by, "gpu_hours", "active_hours", "idle_held_hours", "idle_free_hours", "unmonitored_hours", "cost",
            "active_cost", "idle_cost", "unmonitored_cost", "api_cost", "unwatched_gpu_cost", "currency"]
    typer.echo(render(rows, fmt.value, cols if fmt != Fmt.json else None))
    if fmt == Fmt.table:
        typer.echo(f"\nprices: {reply.pricing_source}", err=True)


def pricing(
    file: Annotated[str | None, typer.Option(help="Overrides TOML to apply on top of the catalog.")] = None,
    fmt: Annotated[Fmt, typer.Option("--format", help="table, csv or json.")] = Fmt.table,
) -> None:
    """Show every price in force: the shipped catalog, your overrides and OpenCost rows.

    One row per price, with its kind (catalog, instance_override, gpu_override, opencost_node,
    opencost_gpu), what a host must match for it to apply, the hourly and per-GPU-hour price,
    its effective date and its source. The catalog's snapshot date is in its source.

    Examples:
      gpuledger pricing
      gpuledger pricing --file /etc/gpuledger/pricing.toml --format csv

    Overrides file (TOML):
      [[instance]]  provider="aws" region="us-east-1" instance_type="p5.48xlarge" hourly_price=55.04
                    gpu_count=8 effective_from="2025-06-01"
      [[gpu]]       host_id="dgx-01" gpu_hourly_price=1.10      # owned hardware, per GPU-hour
      opencost_csv = "opencost-pricing.csv"                      # OpenCost custom pricing (node and gpu rows)

    Refresh the shipped catalog from a newer snapshot: scripts/refresh_catalog.py (see its --help).
    """
    from gpuledger.collector.pricing import CATALOG_SOURCE, Pricing, PricingError

    try:
        p = Pricing.default(file)
    except PricingError as e:
        typer.echo(f"gpuledger pricing: {e}", err=True)
        raise typer.Exit(2) from e
    rows = p.all_rows()
    if fmt == Fmt.table:  # the catalog's long source is printed once, below the table
        rows = [{**r, "source": "catalog" if r["source"] == CATALOG_SOURCE else r["source"]} for r in rows]
    typer.echo(render(rows, fmt.value))
    if fmt == Fmt.table:
        typer.echo(f"\nsources: {'; '.join(p.sources)}", err=True)


def export_focus(
    output: Annotated[str, typer.Option("--output", "-o", help="File to write; '-' for standard output.")] = "-",
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (30d). Default 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="End. Default now.")] = None,
    granularity: Annotated[str, typer.Option(help="Charge period: hour or day (UTC).")] = "day",
    fmt: Annotated[str, typer.Option("--format", help="csv, json or parquet.")] = "csv",
    token_file: Annotated[str | None, typer.Option(help="File holding the read-only query token "
                                                     "(or GPULEDGER_QUERY_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """Export GPU cost and usage as FOCUS-aligned rows (FinOps Open Cost and Usage Specification).

    One row per charge period, host, tag set and GPU state (active, idle_held, idle_free,
    unmonitored; column x_GpuState), in GPU-hours, with the host's owner tags overlaid by the
    process's tags in Tags. Costs are at the catalog or override price (see x_PriceSource):
    gpuledger issues no invoice, so the four cost columns carry the same figure.

    Examples:
      gpuledger export focus --since 2026-11-01 --until 2026-12-01 -o gpu-2026-11.csv
      gpuledger export focus --since 24h --granularity hour --format parquet -o today.parquet
    """
    if fmt not in ("csv", "json", "parquet"):
        typer.echo("gpuledger export focus: --format must be csv, json or parquet", err=True)
        raise typer.Exit(2)
    if fmt == "parquet" and output == "-":
        typer.echo("gpuledger export focus: parquet needs --output FILE", err=True)
        raise typer.Exit(2)
    table, _ = _report("focus", collector, since, until, granularity, {}, token_file, ca_file)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        typer.echo(f"{table.num_rows} FOCUS rows written to {output}", err=True)
        return
    import json

    from gpuledger.collector.export import TIMESTAMP_COLUMNS

    rows = table.to_pylist()
    for r in rows:  # FOCUS date/times as 'YYYY-MM-DDTHH:mm:ssZ'; in JSON, Tags as an object (KeyValueFormat)
        for c in TIMESTAMP_COLUMNS:
            if r.get(c) is not None:
                r[c] = r[c].strftime("%Y-%m-%dT%H:%M:%SZ")
        if fmt == "json" and isinstance(r.get("Tags"), str):
            r["Tags"] = json.loads(r["Tags"])
    text = render(rows, fmt)
    if output == "-":
        typer.echo(text)
    else:
        with open(output, "w") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        typer.echo(f"{table.num_rows} FOCUS rows written to {output}", err=True)


def add_agent(
    host_id: Annotated[str, typer.Argument(help="The agent's host_id (agent.host_id in its config).")],
    tokens_file: Annotated[str, typer.Option(help="The collector's tokens file (collector.tokens_file).")],
    out: Annotated[str | None, typer.Option(help="Write the token to this file (created mode 600) instead of "
                                                 "printing it.")] = None,
) -> None:
    """Create a token for one agent: its hash goes into the tokens file, the token is printed once.

    The tokens file is created mode 600. Put the token in the agent's token file (mode 600,
    agent.token_file; on systemd /etc/gpuledger/agent.token, passed as a credential). Restart
    the collector to load it.

    Examples:
      gpuledger collector add-agent gpu-node-01 --tokens-file /etc/gpuledger/agent-tokens --out gpu-node-01.token
    """
    from gpuledger.security import add_agent_token

    try:
        _emit_token(add_agent_token(tokens_file, host_id), out)
    except ConfigError as e:
        typer.echo(f"gpuledger collector: {e}", err=True)
        raise typer.Exit(2) from e


def query_token(
    file: Annotated[str, typer.Option(help="The collector's query token file (collector.query_token_file).")],
    out: Annotated[str | None, typer.Option(help="Write the token to this file (created mode 600) instead of "
                                                 "printing it.")] = None,
) -> None:
    """Create a read-only query token for reports: its hash is appended to FILE, the token printed once.

    FILE is created mode 600.

    Examples:
      gpuledger collector query-token --file /etc/gpuledger/query.token --out ~/.gpuledger-query-token
      gpuledger idle --since 7d --token-file ~/.gpuledger-query-token
    """
    from gpuledger.security import add_query_token

    try:
        _emit_token(add_query_token(file), out)
    except ConfigError as e:
        typer.echo(f"gpuledger collector: {e}", err=True)
        raise typer.Exit(2) from e


def admin_token(
    file: Annotated[str, typer.Option(help="The collector's admin token file (collector.admin_token_file).")],
    out: Annotated[str | None, typer.Option(help="Write the token to this file (created mode 600) instead of "
                                                 "printing it.")] = None,
) -> None:
    """Create an admin token (retire hosts, import bills and API spend; read reports): its hash is appended
    to FILE, the token printed once.

    FILE is created mode 600. Restart the collector to load it.

    Examples:
      gpuledger collector admin-token --file /etc/gpuledger/admin.token --out ~/.gpuledger-admin-token
      gpuledger collector retire gpu-node-17 --token-file ~/.gpuledger-admin-token
    """
    from gpuledger.security import add_query_token

    try:
        _emit_token(add_query_token(file), out)  # the same one-hash-per-line format as query tokens
    except ConfigError as e:
        typer.echo(f"gpuledger collector: {e}", err=True)
        raise typer.Exit(2) from e


def retire(
    host_id: Annotated[str, typer.Argument(help="The host's id (agent.host_id).")],
    at: Annotated[str | None, typer.Option(help="When it went away: ISO 8601 or relative (2h). Default now.")] = None,
    note: Annotated[str, typer.Option(help="Why (kept with the record).")] = "",
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    token_file: Annotated[str | None, typer.Option(help="File holding the admin token (or "
                                                     "GPULEDGER_ADMIN_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """Say a host is gone: from AT on, its silence is no longer counted as unmonitored time.

    A host that stops on purpose (SIGTERM, shutdown) says so itself; one that vanished (terminated
    without a clean shutdown, decommissioned) stays unmonitored until the collector's silence horizon
    (collector.silence_horizon_s) unless retired. Windows it sends later bring it back.

    Examples:
      gpuledger collector retire gpu-node-17
      gpuledger collector retire spot-a100-3 --at 2026-11-20T03:15Z --note "spot reclaim"
    """
    import time

    from gpuledger.client import retire_host
    from gpuledger.security import client_credentials, read_token

    now_ms = int(time.time() * 1000)
    try:
        at_ms = parse_time(at, now_ms, now_ms)
        token = read_token(token_file, "GPULEDGER_ADMIN_TOKEN")
        creds = client_credentials(ca_file)
    except (ValueError, ConfigError) as e:
        typer.echo(f"gpuledger collector retire: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        reply = retire_host(collector, host_id, at_ms, note, token=token, credentials=creds)
    except grpc.RpcError as e:
        typer.echo(f"gpuledger collector retire: collector at {collector}: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1) from e
    typer.echo(f"{reply.host_id}: retired from {_since_text(reply.at_ms)} UTC; now {reply.state}")


def _emit_token(token: str, out: str | None) -> None:
    if out is None:
        typer.echo(token)
        return
    from gpuledger.security import write_private

    try:
        write_private(out, token + "\n")
    except OSError as e:
        raise ConfigError(f"--out {out}: {e.strerror}") from e
    typer.echo(f"token written to {out} (mode 600)", err=True)


command(app, serve)
command(app, add_agent, "add-agent")
command(app, query_token, "query-token")
command(app, admin_token, "admin-token")
command(app, retire)
