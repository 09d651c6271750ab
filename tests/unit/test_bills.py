"""Bill import: real FOCUS and AWS CUR exports to the normalized schema, totals checked independently."""

from __future__ import annotations

import csv
import gzip
import re
import shutil
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gpuledger.collector.bills import (
    BILL_SCHEMA,
    BillError,
    GpuCatalog,
    SliceKey,
    detect_format,
    read_bill_table,
    read_bills,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "bills"
FOCUS10 = FIX / "focus-1.0-sample.csv"
CUR_SAMPLE = FIX / "aws-cur-legacy-sample.csv"
CUR_GPU = FIX / "aws-cur-legacy-gpu.csv"
FOCUS12 = FIX / "focus-1.2-gpu.csv"


def _num(v: str) -> float:
    return 0.0 if v in ("", "NULL") else float(v)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


# ---------------------------------------------------------------------------- FOCUS 1.0, real sample


def _focus_expected():
    rows = _csv_rows(FOCUS10)
    billed, effective = defaultdict(float), defaultdict(float)
    for r in rows:
        billed[r["ProviderName"]] += _num(r["BilledCost"])
        effective[r["ProviderName"]] += _num(r["EffectiveCost"]) if r["EffectiveCost"] != "NULL" \
            else _num(r["BilledCost"])
    return rows, billed, effective


def _check_focus_sample(table: pa.Table, rows: list[dict], billed: dict, effective: dict) -> None:
    assert table.num_rows == len(rows) == 200
    names = {"AWS": "aws", "Microsoft": "azure", "Oracle": "oci"}
    for provider, total in billed.items():
        sel = table.filter(pc.equal(table["provider"], names[provider]))
        assert pc.sum(sel["billed_cost"]).as_py() == pytest.approx(total, rel=1e-12, abs=1e-12)
        assert pc.sum(sel["effective_cost"]).as_py() == pytest.approx(effective[provider], rel=1e-12, abs=1e-12)
    assert Counter(table["charge_category"].to_pylist()) == Counter(r["ChargeCategory"] for r in rows)
    n_ai = sum(r["ServiceCategory"] == "AI and Machine Learning" for r in rows)
    assert n_ai > 0 and pc.sum(table["ai_related"]).as_py() == n_ai  # no GPU instance in this sample
    want_slices = {(names[r["ProviderName"]], r["BillingAccountId"], r["BillingPeriodStart"][:7]) for r in rows}
    got = set(zip(table["provider"].to_pylist(), table["billing_account_id"].to_pylist(),
                  table["billing_period"].to_pylist(), strict=True))
    assert got == want_slices
    # zone-less timestamps are UTC; the first row's charge period
    first = table.slice(0, 1).to_pylist()[0]
    assert first["charge_period_start_ms"] == _ms(rows[0]["ChargePeriodStart"])
    assert first["charge_period_end_ms"] == _ms(rows[0]["ChargePeriodEnd"])
    tagged = next(r for r in rows if r["Tags"] not in ("", "NULL"))
    i = rows.index(tagged)
    assert dict(table["tags"][i].as_py()) == {k: str(v) for k, v in __import__("json").loads(tagged["Tags"]).items()}


def test_focus_1_0_sample_csv_totals_match_an_independent_sum():
    rows, billed, effective = _focus_expected()
    table, reader = read_bill_table(FOCUS10)
    assert reader.formats == {str(FOCUS10): "focus-1.0"} and reader.issue_count == 0
    assert table.schema == BILL_SCHEMA
    _check_focus_sample(table, rows, billed, effective)
    assert table["row_number"].to_pylist() == list(range(2, 202))
    assert reader.slices == {SliceKey(*k) for k in set(zip(table["provider"].to_pylist(),
                                                           table["billing_account_id"].to_pylist(),
                                                           table["billing_period"].to_pylist(), strict=True))}


def test_focus_sample_as_gzip_and_parquet_gives_the_same_figures(tmp_path):
    rows, billed, effective = _focus_expected()
    gz = tmp_path / "focus.csv.gz"
    with open(FOCUS10, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    table, reader = read_bill_table(gz)
    _check_focus_sample(table, rows, billed, effective)
    assert reader.formats[str(gz)] == "focus-1.0"
    # Parquet as an export writes it: typed columns, real nulls
    cols = {k: [None if r[k] == "NULL" else r[k] for r in rows] for k in rows[0]}
    typed = {k: pa.array(v, pa.string()) for k, v in cols.items()}
    for k in ("BilledCost", "EffectiveCost", "ListCost", "ConsumedQuantity", "PricingQuantity"):
        typed[k] = pa.array([None if v is None else float(v) for v in cols[k]], pa.float64())
    for k in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd"):
        typed[k] = pc.cast(pc.cast(typed[k], pa.timestamp("ms")), pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table(typed), tmp_path / "focus.parquet", row_group_size=64)
    table, reader = read_bills(tmp_path / "focus.parquet", batch_rows=50), None
    chunks = list(table)
    assert [c.table.num_rows for c in chunks] == [50, 50, 50, 50]
    whole = pa.concat_tables([c.table for c in chunks])
    _check_focus_sample(whole, rows, billed, effective)
    assert whole["row_number"].to_pylist() == list(range(1, 201))


# ---------------------------------------------------------------------------- AWS CUR, real legacy sample


def test_cur_legacy_sample_totals_and_categories():
    rows = _csv_rows(CUR_SAMPLE)
    table, reader = read_bill_table(CUR_SAMPLE)
    assert reader.formats[str(CUR_SAMPLE)] == "aws-cur-legacy" and reader.issue_count == 0
    assert table.num_rows == len(rows) == 160
    assert pc.sum(table["billed_cost"]).as_py() == pytest.approx(sum(_num(r["lineItem/UnblendedCost"]) for r in rows),
                                                                 rel=1e-12)
    assert pc.sum(table["effective_cost"]).as_py() == pytest.approx(pc.sum(table["billed_cost"]).as_py())
    tax = sum(r["lineItem/LineItemType"] == "Tax" for r in rows)
    assert Counter(table["charge_category"].to_pylist()) == {"Tax": tax, "Usage": len(rows) - tax}
    assert reader.slices == {SliceKey("aws", "123412340534", "2023-11")}
    assert set(table["service_name"].to_pylist()) == {r["product/ProductName"] or r["lineItem/ProductCode"]
                                                      for r in rows}


def _cur2_name(legacy: str) -> str:
    group, _, name = legacy.partition("/")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", group).lower() + "_" + re.sub(
        r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _cur2_parquet(tmp_path: Path) -> Path:
    """The GPU CUR rows in CUR 2.0 form: snake_case columns, resource_tags as a map."""
    rows = _csv_rows(CUR_GPU)
    cols = {}
    for k in rows[0]:
        if k.startswith("resourceTags/"):
            continue
        cols[_cur2_name(k)] = pa.array([r[k] or None for r in rows], pa.string())
    for k in ("line_item_usage_start_date", "line_item_usage_end_date", "bill_billing_period_start_date"):
        cols[k] = pc.cast(cols[k], pa.timestamp("ms", tz="UTC"))
    for k in ("line_item_unblended_cost", "reservation_effective_cost", "savings_plan_savings_plan_effective_cost"):
        cols[k] = pc.cast(cols[k], pa.float64())
    tags = [[(k.split("/", 1)[1].replace(":", "_"), r[k]) for k in r if k.startswith("resourceTags/") and r[k]]
            for r in rows]
    cols["resource_tags"] = pa.array(tags, pa.map_(pa.string(), pa.string()))
    path = tmp_path / "cur2.parquet"
    pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("which", ["legacy-csv", "cur2-parquet"])
def test_cur_gpu_rows_amortized_cost_tags_and_catalog_match(tmp_path, which):
    path = CUR_GPU if which == "legacy-csv" else _cur2_parquet(tmp_path)
    table, reader = read_bill_table(path)
    assert reader.formats[str(path)] == ("aws-cur-legacy" if which == "legacy-csv" else "aws-cur-2.0")
    assert reader.issue_count == 0
    by = {r["resource_id"] or r["usage_type"] or r["charge_description"]: r for r in table.to_pylist()}
    p4d = by["i-0f00000000000p4d1"]
    assert (p4d["instance_type"], p4d["gpu_count"], p4d["gpu_model"], p4d["is_gpu_instance"]) == \
        ("p4d.24xlarge", 8, "A100", True)
    assert (p4d["team"], p4d["phase"], p4d["charge_category"]) == ("research", "pretrain", "Usage")
    p5 = by["i-0f00000000000p5e1"]
    assert (p5["instance_type"], p5["gpu_count"], p5["billed_cost"], p5["effective_cost"]) == \
        ("p5.48xlarge", 8, 0.0, 34.6752)
    assert p5["list_cost"] == 55.04
    created_by = "aws:createdBy" if which == "legacy-csv" else "aws_createdBy"  # CUR 2.0 keys use _ for :
    assert dict(p5["tags"]) == {"team": "search", created_by: "AssumedRole:ci"}
    g5 = [r for r in table.to_pylist() if r["instance_type"] == "g5.12xlarge"]
    assert {r["gpu_count"] for r in g5} == {4}
    # Savings Plan: covered usage at its effective rate, negation at 0, the fee only for what went unused
    def eff(prefix):
        return next(r["effective_cost"] for r in table.to_pylist() if r["charge_description"].startswith(prefix))

    assert eff("Compute Savings Plans") == 3.9704 and eff("SavingsPlanNegation") == 0.0
    assert eff("1 year No Upfront") == pytest.approx(4.5 - 3.9704)
    rows = _csv_rows(CUR_GPU)
    assert pc.sum(table["billed_cost"]).as_py() == pytest.approx(sum(_num(r["lineItem/UnblendedCost"]) for r in rows))
    credit = next(r for r in table.to_pylist() if r["charge_category"] == "Credit")
    assert credit["billed_cost"] == -100.0 and not credit["ai_related"]
    bedrock = next(r for r in table.to_pylist() if r["service_name"] == "Amazon Bedrock")
    assert bedrock["ai_related"] and not bedrock["is_gpu_instance"]
    assert sorted(Counter(table["charge_category"].to_pylist()).items()) == [("Credit", 1), ("Purchase", 1),
                                                                             ("Usage", 6)]


# ---------------------------------------------------------------------------- FOCUS 1.2, untidy, GPUs


def test_focus_1_2_untidy_rows_refusals_name_line_and_column():
    table, reader = read_bill_table(FOCUS12)
    assert reader.formats[str(FOCUS12)] == "focus-1.2"
    assert (reader.rows_read, reader.rows_imported, reader.refused) == (11, 9, 2)
    issues = {(i.row, i.column, i.refused): i for i in reader.issues}
    # line 8-9 hold one record with a line break inside a quoted cell: later lines are counted right
    assert set(issues) == {(10, "BilledCost", True), (11, "Tags", False), (12, "ChargePeriodStart", True)}
    assert str(issues[(10, "BilledCost", True)]) == \
        "focus-1.2-gpu.csv line 10, column BilledCost: not a number (value 'n/a'); row refused"
    assert "not an ISO 8601 date-time (value 'last tuesday')" in str(issues[(12, "ChargePeriodStart", True)])
    rows = {r["row_number"]: r for r in table.to_pylist()}
    assert sorted(rows) == [2, 3, 4, 5, 6, 7, 8, 11, 13]
    # totals: every readable row, computed from the file with the csv module
    src = [r for r in _csv_rows(FOCUS12) if r["BilledCost"] != "n/a" and r["ChargePeriodStart"] != "last tuesday"]
    assert pc.sum(table["billed_cost"]).as_py() == pytest.approx(sum(float(r["BilledCost"]) for r in src))
    assert pc.sum(table["effective_cost"]).as_py() == pytest.approx(sum(float(r["EffectiveCost"]) for r in src))
    aws = rows[2]
    assert (aws["provider"], aws["instance_type"], aws["gpu_count"], aws["gpu_model"]) == ("aws", "p5.48xlarge", 8,
                                                                                           "H100")
    assert aws["charge_period_start_ms"] == _ms("2026-11-03T00:00:00")  # no zone: UTC
    assert (aws["team"], aws["phase"], aws["workload"]) == ("research", "pretrain", "llm-70b")
    assert aws["slice_key"] == "aws|111122223333|2026-11"
    assert rows[3]["charge_category"] == "Credit" and rows[3]["billed_cost"] == -250.0
    sagemaker = rows[4]  # effective above billed is kept as it is
    assert (sagemaker["billed_cost"], sagemaker["effective_cost"], sagemaker["ai_related"]) == (0.0, 29.95, True)
    azure = rows[5]
    assert (azure["provider"], azure["instance_type"], azure["gpu_count"], azure["gpu_model"]) == \
        ("azure", "Standard_NC24ads_A100_v4", 1, "A100")
    assert rows[6]["ai_related"] and not rows[6]["is_gpu_instance"]  # Azure OpenAI
    gcp = rows[7]
    assert (gcp["provider"], gcp["instance_type"], gcp["gpu_count"]) == ("gcp", "a2-highgpu-1g", 1)
    assert gcp["charge_period_start_ms"] == _ms("2026-11-05T00:00:00")  # "... UTC"
    assert (gcp["team"], gcp["phase"]) == ("research", "eval")  # tags as a list of key/value pairs
    assert rows[8]["charge_description"] == "Vertex AI online prediction\nnode hours" and rows[8]["ai_related"]
    oci = rows[11]
    assert (oci["provider"], oci["instance_type"], oci["is_gpu_instance"], oci["gpu_count"], oci["gpu_model"]) == \
        ("oci", "BM.GPU.A100-v2.8", True, None, "A100")
    assert oci["tags"] == [] and oci["charge_period_start_ms"] == _ms("2026-11-07T00:00:00")
    assert rows[13]["charge_category"] == "Tax" and not rows[13]["ai_related"]
    assert reader.slices == {SliceKey("aws", "111122223333", "2026-11"),
                             SliceKey("azure", "/providers/Microsoft.Billing/billingAccounts/9876543", "2026-11"),
                             SliceKey("gcp", "01A2B3-C4D5E6-F70819", "2026-11"),
                             SliceKey("oci", "ocid1.tenancy.oc1..aaaaexample", "2026-11")}


# ---------------------------------------------------------------------------- detection, streaming, identity


def test_unknown_header_and_duplicate_columns_are_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "export.csv"
    bad.write_text("Date,Cost\n2026-01-01,1\n")
    with pytest.raises(BillError, match=r"export.csv line 1: header matches no known bill format"):
        list(read_bills(bad))
    dup = tmp_path / "dup.csv"
    dup.write_text("BilledCost,ChargePeriodStart,BilledCost\n1,2026-01-01,2\n")
    with pytest.raises(BillError, match=r"dup.csv line 1: duplicate column\(s\) BilledCost"):
        list(read_bills(dup))
    assert detect_format(["BilledCost", "ChargePeriodStart", "ServiceSubcategory"]) == "focus-1.1"


def test_a_large_parquet_bill_is_read_in_bounded_batches(tmp_path):
    n = 120_000
    start = pa.array([1_793_491_200_000 + (i % 720) * 3_600_000 for i in range(n)], pa.int64())
    t = pa.table({
        "BillingAccountId": pa.array(["1234"] * n), "ProviderName": pa.array(["AWS"] * n),
        "ChargePeriodStart": pc.cast(start, pa.timestamp("ms", tz="UTC")),
        "BillingPeriodStart": pc.cast(pa.array([1_793_491_200_000] * n, pa.int64()), pa.timestamp("ms", tz="UTC")),
        "ChargeCategory": pa.array(["Usage"] * n), "BilledCost": pa.array([0.5] * n),
        "EffectiveCost": pa.array([0.25] * n), "BillingCurrency": pa.array(["USD"] * n),
        "x_UsageType": pa.array(["USE1-BoxUsage:p5.48xlarge" if i % 3 == 0 else "USE1-TimedStorage" for i in range(n)]),
        "Tags": pa.array(['{"team": "a"}' if i % 2 else '{"team": "b"}' for i in range(n)]),
    })
    pq.write_table(t, tmp_path / "big.parquet", row_group_size=20_000)
    reader = read_bills(tmp_path / "big.parquet", batch_rows=10_000)
    sizes, billed, gpu, teams = [], 0.0, 0, Counter()
    for chunk in reader:
        sizes.append(chunk.table.num_rows)
        billed += pc.sum(chunk.table["billed_cost"]).as_py()
        gpu += pc.sum(chunk.table["is_gpu_instance"]).as_py()
        teams.update(chunk.table["team"].to_pylist())
    assert max(sizes) <= 10_000 and sum(sizes) == n
    assert billed == pytest.approx(0.5 * n) and gpu == (n + 2) // 3 and teams == {"a": n // 2, "b": n // 2}
    assert reader.slices == {SliceKey("aws", "1234", "2026-11")}


def test_replacing_slices_makes_reimport_idempotent(tmp_path):
    """The identity rule as a store applies it: an import replaces the slices it covers."""
    store: dict[str, list[dict]] = {}

    def import_(paths):
        reader = read_bills(paths)
        fresh = defaultdict(list)
        for chunk in reader:
            for r in chunk.table.to_pylist():
                fresh[r["slice_key"]].append(r)
        for s in reader.slices:
            store[str(s)] = fresh[str(s)]
        return reader

    def total():
        return sum(r["billed_cost"] for rows in store.values() for r in rows)

    # a delivery in two parts (AWS splits a month): import both parts together
    rows = CUR_SAMPLE.read_text().splitlines()
    part1, part2 = tmp_path / "cur-1.csv", tmp_path / "cur-2.csv"
    part1.write_text("\n".join(rows[:81]) + "\n")
    part2.write_text("\n".join([rows[0]] + rows[81:]) + "\n")
    r = import_([part1, part2])
    whole = sum(_num(x["lineItem/UnblendedCost"]) for x in _csv_rows(CUR_SAMPLE))
    assert total() == pytest.approx(whole) and r.slices == {SliceKey("aws", "123412340534", "2023-11")}
    import_([part1, part2])  # the same delivery again
    assert total() == pytest.approx(whole)
    import_(FOCUS10)  # other slices are kept
    focus_total = sum(_num(x["BilledCost"]) for x in _csv_rows(FOCUS10))
    assert total() == pytest.approx(whole + focus_total)
    # a newer export of the same period restates it: one row corrected
    newer = tmp_path / "cur-restated.csv"
    lines = CUR_SAMPLE.read_text().splitlines()
    header = next(csv.reader([lines[0]]))
    cost_col = header.index("lineItem/UnblendedCost")
    first = next(csv.reader([lines[1]]))
    old_cost = _num(first[cost_col])
    first[cost_col] = str(old_cost + 10.0)
    with open(newer, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerow(first)
        for ln in lines[2:]:
            w.writerow(next(csv.reader([ln])))
    import_(newer)
    assert total() == pytest.approx(whole + focus_total + 10.0)


def test_catalog_matching_of_usage_types_and_descriptions():
    cat = GpuCatalog.default()
    assert cat.describe("USE1-BoxUsage:p5.48xlarge")[:3] == ("p5.48xlarge", True, 8)
    assert cat.describe("BoxUsage:p4d.24xlarge")[:3] == ("p4d.24xlarge", True, 8)
    assert cat.describe("USW2-SpotUsage:g6e.xlarge")[:3] == ("g6e.xlarge", True, 1)
    assert cat.describe("USE1-BoxUsage:m6i.large")[:2] == ("m6i.large", False)
    assert cat.describe("USE1-Train:ml.p4d.24xlarge")[:3] == ("ml.p4d.24xlarge", True, 8)  # SageMaker
    assert cat.describe("EU-BoxUsage:p3.8xlarge")[:3] == ("p3.8xlarge", True, None)  # GPU family, not in catalog
    assert cat.describe("NC24ads A100 v4")[:3] == ("Standard_NC24ads_A100_v4", True, 1)
    assert cat.describe("Nvidia Tesla A100 GPU running in Americas") == (None, True, None, "A100")
    assert cat.describe("USE1-TimedStorage-ByteHrs") == (None, False, None, None)


def test_azure_style_export_with_a_byte_order_mark(tmp_path):
    f = tmp_path / "azure-focus.csv"
    f.write_bytes("\ufeffBilledCost,ChargePeriodStart,ProviderName,BillingAccountId,EffectiveCost,BillingCurrency,"
                  "x_SkuMeterName\n88.152,2026-11-02T00:00:00Z,Microsoft,acct-1,80.0,USD,NC24ads A100 v4\n"
                  .encode("utf-8"))
    table, reader = read_bill_table(f)
    assert reader.issue_count == 0 and reader.formats[str(f)] == "focus-1.0"
    row = table.to_pylist()[0]
    assert (row["billed_cost"], row["provider"], row["instance_type"]) == (88.152, "azure", "Standard_NC24ads_A100_v4")
