"""Finance's commands: `gpuledger bill import`, `gpuledger api-spend import`, `gpuledger baseline`.

Imports go through the running collector (Admin.Import), like the reports, so they work the same
on the embedded store and on a ClickHouse server. The client parses the files here, streaming
(bills.read_bills reads batches; memory stays bounded by a batch whatever the file's size), and
sends Arrow chunks of normalized rows; the collector checks them against its schema and stores
them (billing.py). The admin credential is needed where tokens are on: `--token-file` or
GPULEDGER_ADMIN_TOKEN (`gpuledger collector admin-token` makes one).

Exit codes: 0 imported (refused rows are listed, the rest is stored), 2 bad input (a file that is
not a bill, a bad option, an import the collector refused), 1 the collector failed or is out of
reach.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import typer

from gpuledger.client import parse_time
from gpuledger.config import ConfigError
from gpuledger.schema import to_ipc
from gpuledger.security import client_credentials, read_token
from gpuledger.v1 import telemetry_pb2 as pb

ADMIN_TOKEN_ENV = "GPULEDGER_ADMIN_TOKEN"

DEFAULT_COLLECTOR = "127.0.0.1:4700"
PIECE_BYTES = 4 << 20  # Arrow body per chunk (the collector takes up to its max_batch_bytes)


class ImportFailed(RuntimeError):
    """The collector did not store the import; `code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- chunks


def _pieces(table: pa.Table, max_bytes: int) -> Iterator[pa.Table]:
    n = table.num_rows
    if n == 0:
        return
    per = max(1, int(max_bytes / max(1.0, table.nbytes / n)))
    for a in range(0, n, per):
        yield table.slice(a, per)


def _twice(paths: list[Path]) -> str | None:
    seen: set[Path] = set()
    for p in paths:
        r = p.resolve()
        if r in seen:
            return str(p)
        seen.add(r)
    return None


def _dictionary(piece: pa.Table) -> pa.Table:
    """Text columns dictionary-encoded: bills repeat their values heavily, so the body is about half the
    size and the store takes it faster."""
    cols = [pc.dictionary_encode(c) if pa.types.is_string(c.type) else c for c in piece.columns]
    return pa.table(cols, names=piece.column_names)


def _chunk(kind: str, file_name: str, piece: pa.Table | None, issues=(), refused: int = 0) -> pb.ImportChunk:
    keys = sorted(pc.unique(piece.column("slice_key")).to_pylist()) if piece is not None else []
    return pb.ImportChunk(kind=kind, file_name=file_name, arrow=to_ipc(_dictionary(piece)) if piece is not None
                          else b"", slice_keys=keys, issues=list(issues), refused_rows=refused)


def _file_chunks(path: Path, catalog, batch_rows: int, piece_bytes: int, warnings: list | None):
    from gpuledger.collector.bills import read_bills

    reader = read_bills(path, catalog, batch_rows=batch_rows)
    sent = {"issues": 0, "refused": 0}

    def news():
        fresh = reader.issues[sent["issues"]:]
        refused = reader.refused - sent["refused"]
        sent.update(issues=len(reader.issues), refused=reader.refused)
        if warnings is not None:
            warnings.extend(str(i) for i in fresh if not i.refused)
        return [pb.ImportIssue(file=i.file, line=i.row, column=i.column, value=i.value, message=i.message,
                               refused=i.refused) for i in fresh], refused

    for chunk in reader:
        for piece in _pieces(chunk.table, piece_bytes):
            issues, refused = news()
            yield _chunk("bill", path.name, piece, issues, refused)
    issues, refused = news()
    if issues or refused:
        yield _chunk("bill", path.name, None, issues, refused)


def bill_chunks(paths: Iterable[str | Path], catalog=None, batch_rows: int = 65_536,
                piece_bytes: int = PIECE_BYTES, warnings: list | None = None) -> Iterator[pb.ImportChunk]:
    """ImportChunks of one bill delivery, file by file, read in batches (bills.read_bills). Issues the
    parser finds travel with the file's chunks; warnings (rows imported with a field emptied) are also
    appended to `warnings`."""
    from gpuledger.collector.bills import BillError, GpuCatalog

    catalog = catalog or GpuCatalog.default()
    paths = [Path(p) for p in paths]
    twice = _twice(paths)
    if twice:
        raise BillError(f"{twice}: given twice in one import (its rows would count twice)")
    last = ""
    for path in paths:
        yield from _file_chunks(path, catalog, batch_rows, piece_bytes, warnings)
        last = path.name
    yield pb.ImportChunk(kind="bill", file_name=last or "-", final=True)


_LINE = re.compile(r"^line (\d+)$")


def api_spend_chunks(paths: list[str | Path], provider: str, mapping: str | None = None, prices: str | None = None,
                     piece_bytes: int = PIECE_BYTES) -> Iterator[pb.ImportChunk]:
    """ImportChunks of API spend files (apispend.read_api_spend), checked to come from `provider`."""
    from gpuledger.collector.apispend import ApiSpendError, read_api_spend

    twice = _twice([Path(p) for p in paths])
    if twice:
        raise ApiSpendError(f"{twice}: given twice in one import (its rows would count twice)")
    table, reader = read_api_spend([Path(p) for p in paths], mapping, prices)
    if provider:
        other = pc.not_equal(table.column("vendor"), provider)
        if table.num_rows and pc.any(other).as_py():
            i = pc.index(other, True).as_py()
            r = table.slice(i, 1).to_pylist()[0]
            raise ApiSpendError(f"{r['source_file']} row {r['row_number']}: a {r['vendor']} {r['endpoint']} row, "
                                f"but --provider {provider}")
    by_file: dict[str, list] = {}
    for i in reader.issues:
        m = _LINE.match(i.where)
        by_file.setdefault(i.file, []).append(pb.ImportIssue(
            file=i.file, line=int(m.group(1)) if m else 0, column=i.field, value=i.value,
            message=i.message if m else f"{i.where}: {i.message}", refused=True))
    names = list(dict.fromkeys([Path(p).name for p in paths]))
    for name in names:
        part = table.filter(pc.equal(table.column("source_file"), name)) if table.num_rows else table
        issues = by_file.pop(name, [])
        first = True
        for piece in _pieces(part, piece_bytes):
            yield _chunk("api_spend", name, piece, issues if first else (), len(issues) if first else 0)
            first = False
        if first and issues:
            yield _chunk("api_spend", name, None, issues, len(issues))
    yield pb.ImportChunk(kind="api_spend", file_name=names[-1] if names else "-", final=True)


class _Guarded:
    """Iterates chunks for gRPC; a parser error stops the stream without its final chunk (so the
    collector stores nothing) and is kept to be raised to the caller."""

    def __init__(self, chunks: Iterator[pb.ImportChunk]) -> None:
        self.chunks = chunks
        self.error: BaseException | None = None

    def __iter__(self):
        try:
            yield from self.chunks
        except Exception as e:  # noqa: BLE001 - handed back to send_import's caller
            self.error = e


def send_import(target: str, chunks: Iterator[pb.ImportChunk], token: str | None = None,
                credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 3600.0) -> pb.ImportReply:
    """Stream an import to the collector's Admin.Import; raises the parser's error or ImportFailed."""
    guarded = _Guarded(chunks)
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        call = channel.stream_unary("/gpuledger.v1.Admin/Import", request_serializer=pb.ImportChunk.SerializeToString,
                                    response_deserializer=pb.ImportReply.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            reply = call(iter(guarded), timeout=timeout_s, metadata=md)
        except grpc.RpcError as e:
            if guarded.error is not None:
                raise guarded.error from None
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ImportFailed(f"collector at {target} does not take imports (Admin.Import): it is older than "
                                   "this client; upgrade the collector", e.code()) from e
            raise ImportFailed(f"collector at {target}: {e.code().name}: {e.details()}", e.code()) from e
    if guarded.error is not None:
        raise guarded.error
    return reply


def import_bills(target: str, paths: list[str | Path], token: str | None = None, credentials=None,
                 warnings: list | None = None, **kw) -> pb.ImportReply:
    return send_import(target, bill_chunks(paths, warnings=warnings, **kw), token, credentials)


def import_api_spend(target: str, paths: list[str | Path], provider: str, mapping: str | None = None,
                     prices: str | None = None, token: str | None = None, credentials=None) -> pb.ImportReply:
    return send_import(target, api_spend_chunks(paths, provider, mapping, prices), token, credentials)


def reply_dict(reply: pb.ImportReply) -> dict:
    return {"import_id": reply.import_id, "rows_stored": reply.rows_stored,
            "slices_replaced": list(reply.slices_replaced), "warnings": list(reply.warnings),
            "files": [{"file": f.file_name, "rows_stored": f.rows_stored, "rows_refused": f.rows_refused,
                       "refusals": [_issue_text(i) for i in f.refusals]} for f in reply.files]}


def _issue_text(i: pb.ImportIssue) -> str:
    where = f"line {i.line}" if i.line else "-"
    if i.file.endswith(".parquet") and i.line:
        where = f"row {i.line}"
    return f"{i.file} {where}, column {i.column}: {i.message} (value {i.value!r})"


# ----------------------------------------------------------------------------- commands


def _print_reply(reply: pb.ImportReply, fmt: str, what: str, warnings: list[str]) -> None:
    d = reply_dict(reply)
    if warnings:
        d["parser_warnings"] = warnings
    if fmt == "json":
        typer.echo(json.dumps(d, indent=1))
        return
    refused = sum(f["rows_refused"] for f in d["files"])
    typer.echo(f"{d['rows_stored']:,} {what} rows stored from {len(d['files'])} file(s), {len(d['slices_replaced'])} "
               f"slice(s) replaced, {refused:,} row(s) refused (import {d['import_id']})")
    for f in d["files"]:
        typer.echo(f"  {f['file']}: {f['rows_stored']:,} stored, {f['rows_refused']:,} refused")
        for r in f["refusals"]:
            typer.echo(f"    refused: {r}", err=True)
    for w in d["warnings"] + warnings:
        typer.echo(f"  warning: {w}", err=True)


def _run_import(send, fmt: str, what: str, warnings: list[str]) -> None:
    from gpuledger.collector.apispend import ApiSpendError
    from gpuledger.collector.bills import BillError

    if fmt not in ("table", "json"):
        typer.echo("gpuledger: --format must be table or json", err=True)
        raise typer.Exit(2)
    try:
        reply = send()
    except (BillError, ApiSpendError, ConfigError, OSError, pa.ArrowInvalid) as e:
        typer.echo(f"gpuledger: {e}; nothing was imported", err=True)
        raise typer.Exit(2) from e
    except ImportFailed as e:
        typer.echo(f"gpuledger: {e}", err=True)
        raise typer.Exit(2 if e.code in (grpc.StatusCode.INVALID_ARGUMENT,) else 1) from e
    _print_reply(reply, fmt, what, warnings)


def bill_import(
    files: Annotated[list[str], typer.Argument(help="Bill files of one delivery: FOCUS 1.0-1.2 or AWS CUR "
                                                    "(legacy, 2.0); CSV, .csv.gz or Parquet.")],
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    token_file: Annotated[str | None, typer.Option(help="File holding the admin token (or "
                                                     "GPULEDGER_ADMIN_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Import a cloud bill into the collector's store, beside the telemetry.

    Every row belongs to a slice (provider, billing account, billing month); an import replaces
    every slice it covers, so importing the same file again, or a newer export of the same month,
    never doubles a figure. Give all parts of one delivery together. Rows that cannot be read are
    refused and listed (file, line, column); the rest is imported.

    Examples:
      gpuledger bill import focus-2026-11.csv.gz --token-file ~/.gpuledger-admin-token
      gpuledger bill import cur-2026-11-00001.parquet cur-2026-11-00002.parquet
    """
    warnings: list[str] = []
    _run_import(lambda: import_bills(collector, files, read_token(token_file, ADMIN_TOKEN_ENV),
                                     client_credentials(ca_file), warnings=warnings), fmt, "bill", warnings)


def api_spend_import(
    files: Annotated[list[str], typer.Argument(help="API spend exports (JSON pages, CSV or TSV).")],
    provider: Annotated[str, typer.Option(help="openai or anthropic: every row must come from it.")],
    mapping: Annotated[str | None, typer.Option(help="TOML mapping API keys / projects / workspaces to teams.")] =
        None,
    prices: Annotated[str | None, typer.Option(help="TOML token prices (USD per million tokens) to price usage "
                                                    "rows.")] = None,
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    token_file: Annotated[str | None, typer.Option(help="File holding the admin token (or "
                                                     "GPULEDGER_ADMIN_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Import OpenAI or Anthropic API cost and usage (Admin API exports) into the collector's store.

    Each row belongs to a slice (vendor, endpoint, UTC day); an import replaces every slice it
    covers, so re-fetching the last days and importing them again never doubles.

    Examples:
      gpuledger api-spend import costs.json --provider openai --mapping teams.toml
      gpuledger api-spend import cost_report.json usage.json --provider anthropic --prices prices.toml
    """
    if provider not in ("openai", "anthropic"):
        typer.echo("gpuledger api-spend import: --provider must be openai or anthropic", err=True)
        raise typer.Exit(2)
    _run_import(lambda: import_api_spend(collector, files, provider, mapping, prices,
                                         read_token(token_file, ADMIN_TOKEN_ENV), client_credentials(ca_file)),
                fmt, "API spend", [])


def baseline(
    since: Annotated[str | None, typer.Option(help="Start: ISO 8601 or relative (30d). Default 30d.")] = None,
    until: Annotated[str | None, typer.Option(help="End. Default now.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    basis: Annotated[str, typer.Option(help="effective (amortized, after discounts) or billed (invoiced).")] =
        "effective",
    collector: Annotated[str, typer.Option(help="Collector HOST:PORT.")] = DEFAULT_COLLECTOR,
    token_file: Annotated[str | None, typer.Option(help="File holding the read-only query token "
                                                     "(or GPULEDGER_QUERY_TOKEN).")] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate of a TLS collector.")] = None,
) -> None:
    """Finance's baseline: five questions about AI spend, answered from the bill, the API spend and
    the telemetry, each with how it was computed, what it rests on and how much spend that covers.

    1. What do we spend on AI, and what share of the cloud bill is it?
    2. How much of the GPU spend do agents watch (and which GPU instances does no agent report)?
    3. What does training cost against inference?
    4. How busy are the GPUs while they train?
    5. How much of the time inference endpoints hold GPUs do they serve requests?

    Examples:
      gpuledger baseline --since 2026-11-01 --until 2026-12-01
      gpuledger baseline --since 30d --format json
    """
    from gpuledger.client import fetch_report
    if fmt not in ("table", "json") or basis not in ("effective", "billed"):
        typer.echo("gpuledger baseline: --format must be table or json, --basis effective or billed", err=True)
        raise typer.Exit(2)
    now_ms = int(time.time() * 1000)
    try:
        since_ms = parse_time(since, now_ms, now_ms - 30 * 86_400_000)
        until_ms = parse_time(until, now_ms, now_ms)
        token = read_token(token_file, "GPULEDGER_QUERY_TOKEN")
        creds = client_credentials(ca_file)
    except (ValueError, ConfigError, OSError) as e:
        typer.echo(f"gpuledger baseline: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        table, _ = fetch_report(collector, "baseline", since_ms, until_ms, "", {"basis": basis}, token=token,
                                credentials=creds)
    except grpc.RpcError as e:
        hint = "; the collector is older than this client (no baseline report): upgrade it" \
            if "unknown report 'baseline'" in (e.details() or "") else ""
        typer.echo(f"gpuledger: collector at {collector}: {e.code().name}: {e.details()}{hint}", err=True)
        raise typer.Exit(2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT and not hint else 1) from e
    doc = json.loads(table.column("document")[0].as_py())
    if fmt == "json":
        typer.echo(json.dumps(doc, indent=1))
    else:
        from gpuledger.collector.baseline import render_text

        typer.echo(render_text(doc))


def register(app: typer.Typer) -> None:
    """Add the finance commands to the root CLI: `bill import`, `api-spend import`, `baseline` (the admin token
    they need comes from `gpuledger collector admin-token`)."""
    from gpuledger.helptext import command

    bill_app = typer.Typer(help="Cloud bills (FOCUS, AWS CUR) beside the telemetry.", no_args_is_help=True,
                           rich_markup_mode=None)
    command(bill_app, bill_import, "import")
    app.add_typer(bill_app, name="bill")
    api_app = typer.Typer(help="AI API spend (OpenAI, Anthropic) beside the telemetry.", no_args_is_help=True,
                          rich_markup_mode=None)
    command(api_app, api_spend_import, "import")
    app.add_typer(api_app, name="api-spend")
    command(app, baseline)
