"""Bill and API spend imports through a running collector (Admin.Import over real gRPC, chDB store).

Real public samples of each format (tests/fixtures/bills/README.md) are imported and the stored
totals compared with sums computed here from the files with the csv module; an import replaces
the slices it covers; refusals name file, line and column; an interrupted import changes nothing.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.collector.apispend import ApiSpendError
from gpuledger.collector.billing import current_sql
from gpuledger.collector.bills import BillError, read_bill_table
from gpuledger.collector.cli_finance import (
    ImportFailed,
    _chunk,
    bill_chunks,
    import_api_spend,
    import_bills,
    send_import,
)
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.security import Auth, hash_token
from gpuledger.v1 import telemetry_pb2 as pb
from tests.unit.test_bills import _cur2_parquet

FIX = Path(__file__).resolve().parents[1] / "fixtures"
FOCUS10 = FIX / "bills" / "focus-1.0-sample.csv"
CUR_SAMPLE = FIX / "bills" / "aws-cur-legacy-sample.csv"
CUR_GPU = FIX / "bills" / "aws-cur-legacy-gpu.csv"
FOCUS12 = FIX / "bills" / "focus-1.2-gpu.csv"
API = FIX / "apispend"


def _num(v: str) -> float:
    return 0.0 if v in ("", "NULL") else float(v)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _stored(store, kind: str = "bill") -> dict[str, tuple]:
    """{source file: (rows, billed, effective)} of the rows that count now."""
    if kind == "bill":
        sql = (f"SELECT source_file, count(), sum(billed_cost), sum(effective_cost) FROM {current_sql(store, 'bill')} "
               "GROUP BY source_file")
    else:
        sql = (f"SELECT source_file, count(), sum(ifNull(cost, 0)), 0 FROM {current_sql(store, 'api_spend')} "
               "GROUP BY source_file")
    return {r[0]: (int(r[1]), float(r[2]), float(r[3])) for r in store.query_rows(sql)}


def _focus_totals(path: Path) -> tuple[int, float, float]:
    rows = _csv(path)
    billed = sum(_num(r["BilledCost"]) for r in rows)
    effective = sum(_num(r["EffectiveCost"]) if r["EffectiveCost"] != "NULL" else _num(r["BilledCost"]) for r in rows)
    return len(rows), billed, effective


def _approx(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=1e-9, abs=1e-9)
    assert got[2] == pytest.approx(want[2], rel=1e-9, abs=1e-9)


def test_each_format_imports_to_the_totals_of_its_file(collector, tmp_path):
    addr, store = collector.address, collector.store
    # FOCUS 1.0, the FinOps Foundation's real sample: CSV, then the same rows gzipped and as typed Parquet
    want = _focus_totals(FOCUS10)
    reply = import_bills(addr, [FOCUS10])
    assert reply.rows_stored == 200 and reply.files[0].rows_refused == 0
    _approx(_stored(store)[FOCUS10.name], want)
    gz = tmp_path / "focus-1.0-sample.csv.gz"
    with open(FOCUS10, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    import_bills(addr, [gz])
    got = _stored(store)
    assert set(got) == {gz.name}  # the same slices: the gzip replaced the CSV, never added to it
    _approx(got[gz.name], want)
    table, _ = read_bill_table(FOCUS10)
    parquet = tmp_path / "focus-1.0-sample.parquet"
    src = _csv(FOCUS10)
    typed = {k: pa.array([None if r[k] == "NULL" else r[k] for r in src], pa.string()) for k in src[0]}
    for k in ("BilledCost", "EffectiveCost", "ListCost"):
        typed[k] = pc.cast(typed[k], pa.float64())
    for k in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd"):
        typed[k] = pc.cast(pc.cast(typed[k], pa.timestamp("ms")), pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table(typed), parquet, row_group_size=64)
    reply = import_bills(addr, [parquet], batch_rows=50)
    assert sorted(reply.slices_replaced) == sorted({str(s) for s in _slices(table)})
    _approx(_stored(store)[parquet.name], want)
    # FOCUS 1.1: the same rows with a column 1.1 added (ServiceSubcategory)
    v11 = tmp_path / "focus-1.1-sample.csv"
    with open(FOCUS10, newline="") as fh, open(v11, "w", newline="") as out:
        reader = csv.DictReader(fh)
        w = csv.DictWriter(out, fieldnames=[*reader.fieldnames, "ServiceSubcategory"], lineterminator="\n")
        w.writeheader()
        w.writerows({**r, "ServiceSubcategory": "Other (Compute)"} for r in reader)
    import_bills(addr, [v11])
    assert store.query_rows(f"SELECT DISTINCT format FROM {current_sql(store, 'bill')}") == [("focus-1.1",)]
    _approx(_stored(store)[v11.name], want)
    # AWS CUR legacy, a real anonymized sample: other slices, so the FOCUS rows stay
    rows = _csv(CUR_SAMPLE)
    cur_billed = sum(_num(r["lineItem/UnblendedCost"]) for r in rows)
    import_bills(addr, [CUR_SAMPLE])
    got = _stored(store)
    _approx(got[CUR_SAMPLE.name], (160, cur_billed, cur_billed))
    _approx(got[v11.name], want)
    # CUR legacy GPU rows, then the same rows as CUR 2.0 Parquet: the second replaces the first
    gpu_rows = _csv(CUR_GPU)
    gpu_billed = sum(_num(r["lineItem/UnblendedCost"]) for r in gpu_rows)
    import_bills(addr, [CUR_GPU])
    first = _stored(store)[CUR_GPU.name]
    assert first[0] == len(gpu_rows) and first[1] == pytest.approx(gpu_billed)
    cur2 = _cur2_parquet(tmp_path)
    import_bills(addr, [cur2])
    got = _stored(store)
    assert CUR_GPU.name not in got
    _approx(got[cur2.name], first)  # same rows, same amortized cost, either layout


def _slices(table: pa.Table) -> set[str]:
    return set(table["slice_key"].to_pylist())


def test_refusals_name_file_line_and_column_and_the_rest_is_imported(collector):
    # find the bad cells independently: csv module line numbers of unreadable values
    bad = {}
    with open(FOCUS12, newline="") as fh:
        reader = csv.DictReader(fh)
        for r in reader:
            if r["BilledCost"] == "n/a":
                bad[reader.line_num] = "BilledCost"
            if r["ChargePeriodStart"] == "last tuesday":
                bad[reader.line_num] = "ChargePeriodStart"
    assert len(bad) == 2
    warnings: list[str] = []
    reply = import_bills(collector.address, [FOCUS12], warnings=warnings)
    (f,) = reply.files
    assert (f.file_name, f.rows_stored, f.rows_refused) == (FOCUS12.name, 9, 2)
    assert {(i.file, i.line, i.column) for i in f.refusals} == {(FOCUS12.name, line, col) for line, col in bad.items()}
    assert all(i.refused and i.message for i in f.refusals)
    assert any("line 11, column Tags" in w for w in warnings)  # imported without its tags, and said so
    good = [r for r in _csv(FOCUS12) if r["BilledCost"] != "n/a" and r["ChargePeriodStart"] != "last tuesday"]
    got = _stored(collector.store)[FOCUS12.name]
    assert got[0] == 9 and got[1] == pytest.approx(sum(float(r["BilledCost"]) for r in good))
    assert got[2] == pytest.approx(sum(float(r["EffectiveCost"]) for r in good))


def _restated(tmp_path: Path, delta: float) -> Path:
    """A newer export of the CUR sample's period: its first row's cost corrected by `delta`, its last row gone."""
    lines = CUR_SAMPLE.read_text().splitlines()
    header = next(csv.reader([lines[0]]))
    col = header.index("lineItem/UnblendedCost")
    out = tmp_path / "cur-restated.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i, ln in enumerate(lines[1:-1]):
            row = next(csv.reader([ln]))
            if i == 0:
                row[col] = str(_num(row[col]) + delta)
            w.writerow(row)
    return out


def test_reimport_and_a_newer_export_replace_and_never_double(collector, tmp_path):
    addr, store = collector.address, collector.store
    rows = CUR_SAMPLE.read_text().splitlines()
    part1, part2 = tmp_path / "cur-00001.csv", tmp_path / "cur-00002.csv"
    part1.write_text("\n".join(rows[:81]) + "\n")
    part2.write_text("\n".join([rows[0]] + rows[81:]) + "\n")
    whole = sum(_num(r["lineItem/UnblendedCost"]) for r in _csv(CUR_SAMPLE))

    def total():
        return sum(v[1] for v in _stored(store).values())

    reply = import_bills(addr, [part1, part2])  # one delivery in two parts
    assert reply.slices_replaced == ["aws|123412340534|2023-11"] and reply.rows_stored == 160
    assert total() == pytest.approx(whole)
    import_bills(addr, [part1, part2])
    assert total() == pytest.approx(whole)
    with pytest.raises(BillError, match="cur-00001.csv: given twice in one import"):
        import_bills(addr, [part1, part2, part1])
    # one part alone replaces the delivery's slice: it says so (and the other part's rows stop counting)
    reply = import_bills(addr, [part2])
    assert reply.warnings == ["1 slice(s) (aws|123412340534|2023-11) were last imported from cur-00001.csv, not in "
                              "this import: their rows there no longer count (import all parts of one delivery "
                              "together)"]
    import_bills(addr, [part1, part2])
    assert total() == pytest.approx(whole)
    import_bills(addr, [FOCUS10])
    focus = _focus_totals(FOCUS10)[1]
    assert total() == pytest.approx(whole + focus)
    last = _num(_csv(CUR_SAMPLE)[-1]["lineItem/UnblendedCost"])
    import_bills(addr, [_restated(tmp_path, 10.0)])
    assert total() == pytest.approx(whole + focus + 10.0 - last)
    assert set(_stored(store)) == {"cur-restated.csv", FOCUS10.name}
    n = store.query_rows("SELECT count() FROM gpuledger.import_slices FINAL WHERE kind = 'bill' AND "
                         "slice_key = 'aws|123412340534|2023-11'")[0][0]
    assert n == 1


def _rows_chunk(file: str, table: pa.Table, keys=None, final=False) -> pb.ImportChunk:
    c = _chunk("bill", file, table)
    if keys is not None:
        del c.slice_keys[:]
        c.slice_keys.extend(keys)
    c.final = final
    return c


def _sample_table(path: Path = FOCUS12) -> pa.Table:
    return read_bill_table(path)[0]


def test_the_collector_checks_each_row_and_refuses_what_it_cannot_store(collector):
    t = _sample_table().slice(0, 4)
    eff = t.column("effective_cost").to_pylist()
    eff[1] = float("inf")
    t = t.set_column(t.schema.get_field_index("effective_cost"), "effective_cost", pa.array(eff, pa.float64()))
    line = t.column("row_number")[1].as_py()
    reply = send_import(collector.address, iter([_rows_chunk(FOCUS12.name, t, final=True)]))
    (f,) = reply.files
    assert (f.rows_stored, f.rows_refused) == (3, 1)
    assert [(i.line, i.column, i.message) for i in f.refusals] == [(line, "effective_cost", "not a finite amount")]
    assert _stored(collector.store)[FOCUS12.name][0] == 3


def test_an_import_the_collector_refuses_stores_nothing(collector):
    t = _sample_table()
    with pytest.raises(ImportFailed, match="slice_key 'aws|111122223333|2026-11' of a row is not among") as e:
        send_import(collector.address, iter([_rows_chunk(FOCUS12.name, t, keys=["oci|x|2026-11"], final=True)]))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # a stream that ends without its final chunk: the rows it carried never count
    with pytest.raises(ImportFailed, match="ended without its final chunk"):
        send_import(collector.address, iter([_rows_chunk(FOCUS12.name, t)]))
    # a second file that is not a bill: the first file's rows do not count either
    bogus = FOCUS12.parent.parent / "apispend" / "openai-costs.csv"
    with pytest.raises(BillError, match="openai-costs.csv line 1: header matches no known bill format"):
        import_bills(collector.address, [FOCUS10, bogus])
    assert _stored(collector.store) == {}
    assert collector.store.query_rows("SELECT count() FROM gpuledger.import_slices")[0][0] == 0


def test_older_and_newer_clients_against_this_collector(collector):
    t = _sample_table()
    # an older client: a body without nullable columns this collector knows -> stored as nulls
    older = t.drop_columns(["workload", "gpu_model"])
    reply = send_import(collector.address, iter([_rows_chunk(FOCUS12.name, older, final=True)]))
    assert reply.rows_stored == t.num_rows and not reply.warnings
    nulls = collector.store.query_rows(f"SELECT countIf(workload IS NULL), countIf(gpu_model IS NULL) FROM "
                                       f"{current_sql(collector.store, 'bill')}")[0]
    assert nulls == (t.num_rows, t.num_rows)
    # a newer client: a column this collector does not know -> ignored, and said so
    newer = t.append_column("x_carbon_kg", pa.array([1.0] * t.num_rows))
    reply = send_import(collector.address, iter([_rows_chunk(FOCUS12.name, newer, final=True)]))
    assert reply.rows_stored == t.num_rows
    assert reply.warnings == [f"{FOCUS12.name}: column(s) x_carbon_kg unknown to this collector: ignored"]
    # a body without a column this collector cannot do without: refused, naming it
    with pytest.raises(ImportFailed, match="column billed_cost is missing"):
        send_import(collector.address, iter([_rows_chunk(FOCUS12.name, t.drop_columns(["billed_cost"]),
                                                         final=True)]))


def test_this_client_against_a_collector_without_imports():
    """A collector from before Admin.Import serves Admin.Retire only: the client says what to do."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gpuledger.v1.Admin", {
        "Retire": grpc.unary_unary_rpc_method_handler(
            lambda req, ctx: pb.RetireReply(host_id=req.host_id), request_deserializer=pb.RetireRequest.FromString,
            response_serializer=pb.RetireReply.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ImportFailed, match="does not take imports .* older than this client; upgrade the "
                                               "collector") as e:
            import_bills(f"127.0.0.1:{port}", [FOCUS12])
        assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)


def test_imports_need_the_admin_token(store):
    admin, query = "admin-secret-token", "query-secret-token"
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0",
                  auth=Auth({}, {hash_token(query): ""}, {hash_token(admin): ""}))
    c.start()
    try:
        with pytest.raises(ImportFailed, match="PERMISSION_DENIED: this token cannot change the collector's records"):
            import_bills(c.address, [FOCUS12], token=query)
        with pytest.raises(ImportFailed, match="UNAUTHENTICATED"):
            import_bills(c.address, [FOCUS12])
        assert _stored(store) == {}
        assert import_bills(c.address, [FOCUS12], token=admin).rows_stored == 9
    finally:
        c.stop(grace_s=1)


def _pages(name: str) -> list[dict]:
    doc = json.loads((API / name).read_text())
    return doc if isinstance(doc, list) else [doc]


def test_api_spend_imports_to_the_reported_totals_and_replaces_its_days(collector):
    addr, store = collector.address, collector.store
    want = sum(r["amount"]["value"] for p in _pages("openai-costs.json") for b in p["data"] for r in b["results"])
    reply = import_api_spend(addr, [API / "openai-costs.json"], "openai", API / "mapping.toml")
    assert reply.rows_stored == 7 and reply.files[0].rows_refused == 0
    assert sorted(reply.slices_replaced) == ["openai|costs|2026-11-01", "openai|costs|2026-11-02",
                                             "openai|costs|2026-11-03"]
    assert _stored(store, "api_spend")["openai-costs.json"][1] == pytest.approx(want)
    # the same days again, from the CSV export of the same page: replaced, not added
    csv_want = sum(float(r["amount_value"]) for r in _csv(API / "openai-costs.csv"))
    import_api_spend(addr, [API / "openai-costs.csv"], "openai", API / "mapping.toml")
    got = _stored(store, "api_spend")
    assert set(got) == {"openai-costs.csv"} and got["openai-costs.csv"][1] == pytest.approx(csv_want)
    teams = dict(store.query_rows(f"SELECT ifNull(team, ''), sum(cost) FROM {current_sql(store, 'api_spend')} "
                                  "GROUP BY team"))
    by_project = {}
    for r in _csv(API / "openai-costs.csv"):
        by_project[r["project_id"]] = by_project.get(r["project_id"], 0.0) + float(r["amount_value"])
    assert teams["search"] == pytest.approx(by_project["proj_search"])
    # Anthropic: the cost report (cents) and priced usage, other slices: both vendors now count
    cents = sum(float(r["amount"]) for p in _pages("anthropic-cost-report.json") for b in p["data"]
                for r in b["results"])
    import_api_spend(addr, [API / "anthropic-cost-report.json", API / "anthropic-usage-messages.json"], "anthropic",
                     API / "mapping.toml", API / "anthropic-prices.toml")
    reported = store.query_rows(f"SELECT sum(cost) FROM {current_sql(store, 'api_spend')} "
                                "WHERE endpoint = 'cost_report'")[0][0]
    assert reported == pytest.approx(cents / 100)
    assert _stored(store, "api_spend")["openai-costs.csv"][1] == pytest.approx(csv_want)
    with pytest.raises(ApiSpendError, match="openai-costs.json row 1: a openai costs row, but --provider anthropic"):
        import_api_spend(addr, [API / "openai-costs.json"], "anthropic")


def test_cli_bill_and_api_spend_import(collector, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bill", "import", str(FOCUS12), "--collector", collector.address, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rows_stored"] == 9 and doc["files"][0]["rows_refused"] == 2
    assert any(r.startswith(f"{FOCUS12.name} line 10, column BilledCost: not a number") for r in
               doc["files"][0]["refusals"])
    res = runner.invoke(app, ["bill", "import", str(FOCUS12), "--collector", collector.address])
    assert res.exit_code == 0
    assert "9 bill rows stored from 1 file(s), 4 slice(s) replaced, 2 row(s) refused" in res.stdout
    bad = tmp_path / "notes.csv"
    bad.write_text("Date,Cost\n2026-11-01,3\n")
    res = runner.invoke(app, ["bill", "import", str(bad), "--collector", collector.address])
    assert res.exit_code == 2 and "notes.csv line 1: header matches no known bill format" in res.stderr
    assert "nothing was imported" in res.stderr
    res = runner.invoke(app, ["api-spend", "import", str(API / "openai-costs.json"), "--provider", "openai",
                              "--collector", collector.address])
    assert res.exit_code == 0 and "7 API spend rows stored" in res.stdout
    res = runner.invoke(app, ["api-spend", "import", str(API / "openai-costs.json"), "--provider", "azure",
                              "--collector", collector.address])
    assert res.exit_code == 2
    res = runner.invoke(app, ["bill", "import", str(FOCUS12), "--collector", "127.0.0.1:1"])
    assert res.exit_code == 1 and "UNAVAILABLE" in res.stderr


def test_chunks_stay_within_the_piece_size():
    chunks = list(bill_chunks([FOCUS10], piece_bytes=8_000))
    bodies = [c for c in chunks if c.arrow]
    assert len(bodies) > 3 and chunks[-1].final and not chunks[-1].arrow
    assert sum(pa.ipc.open_stream(pa.py_buffer(c.arrow)).read_all().num_rows for c in bodies) == 200
    assert max(len(c.arrow) for c in bodies) < 8_000 * 4
