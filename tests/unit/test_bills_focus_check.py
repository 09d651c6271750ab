"""The FOCUS check harness (tests/focus_check.py): real sample data, our simulated bill, known defects."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gpuledger.collector.simbill import write_sim_bill
from tests.focus_check import NUMERIC, column_rule_errors, validate_focus, validator_available

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "bills"
FOCUS10 = FIX / "focus-1.0-sample.csv"
START = 1_793_491_200_000


@pytest.fixture(scope="module")
def sim_csv(tmp_path_factory) -> Path:
    from gpuledger.agent.simulate import simulated_fleet

    return write_sim_bill(tmp_path_factory.mktemp("sim"), START, START + 6 * 3_600_000, simulated_fleet(3)).focus_path


FINOPS_SAMPLE_DEFECTS = [
    "BillingPeriodEnd: not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat) (200 value(s); first at line 2: "
    "'2024-10-01 00:00:00')",
    "BillingPeriodStart: not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat) (200 value(s); first at line 2: "
    "'2024-09-01 00:00:00')",
    "ChargeFrequency: value not allowed (7 value(s); first at line 144: 'Usage-based')",
    "ChargePeriodEnd: not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat) (200 value(s); first at line 2: "
    "'2024-09-18 23:00:00')",
    "ChargePeriodStart: not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat) (200 value(s); first at line 2: "
    "'2024-09-18 22:00:00')",
    "ContractedCost: null where the spec allows none (7 value(s); first at line 144: None)",
]


def test_finops_sample_has_exactly_its_real_defects_and_is_valid_once_they_are_fixed(tmp_path):
    """The FinOps Foundation's real FOCUS 1.0 sample writes date/times without 'T' and 'Z', one
    provider's ChargeFrequency in the wrong case and null ContractedCost: the rules find those and
    nothing else; with only those cells conformed, the same rows pass."""
    assert column_rule_errors(FOCUS10, "1.0") == FINOPS_SAMPLE_DEFECTS
    with open(FOCUS10, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    for r in rows:
        for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"):
            r[c] = r[c].replace(" ", "T") + "Z"
        r["ChargeFrequency"] = r["ChargeFrequency"].replace("Usage-based", "Usage-Based")
        if r["ContractedCost"] == "NULL":
            r["ContractedCost"] = r["EffectiveCost"]
    fixed = tmp_path / "focus-1.0-conformed.csv"
    with open(fixed, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    assert validate_focus(fixed, "1.0") == []
    assert validate_focus(fixed, "1.1") == []


@pytest.mark.skipif(not validator_available("1.0"), reason="focus-validator 1.0.0 not installed (.venv-focus10 or "
                    "FOCUS_VALIDATOR_1_0); see tests/focus_check.py")
def test_focus_validator_1_0_agrees_on_the_finops_sample():
    found = [e for e in validate_focus(FOCUS10, "1.0") if e.startswith("focus-validator")]
    assert sorted(e.split(":")[0] for e in found) == [
        "focus-validator BillingPeriodEnd_IsDateTime", "focus-validator BillingPeriodStart_IsDateTime",
        "focus-validator ChargeFrequency_Enum", "focus-validator ChargePeriodEnd_IsDateTime",
        "focus-validator ChargePeriodStart_IsDateTime", "focus-validator ContractedCost_NotNull"]


def test_simulated_bill_is_valid_focus_1_2(sim_csv):
    assert column_rule_errors(sim_csv, "1.2") == []
    if validator_available("1.2"):
        assert validate_focus(sim_csv, "1.2") == []


def _defective(sim_csv: Path, tmp_path: Path) -> tuple[Path, Path]:
    with open(sim_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = [c for c in reader.fieldnames if c != "BillingAccountId"]
    rows[0]["ListUnitPrice"] = repr(0.1 + 0.2)  # 0.30000000000000004
    rows[1]["Tags"] = "team=ml"
    rows[2]["ChargePeriodStart"] = "2026-11-01 00:00:00"
    bad_csv = tmp_path / "defects.csv"
    with open(bad_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    # the same rows as Parquet, written carelessly: string date/times, a column of type null
    cols = {c: pa.array([r[c] or None for r in rows], pa.string()) for c in header}
    for c in NUMERIC:
        if c in cols:
            cols[c] = pc.cast(cols[c], pa.float64())
    cols["ListUnitPrice"] = pa.array([0.1 + 0.2] + cols["ListUnitPrice"].to_pylist()[1:], pa.float64())
    for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodEnd"):
        cols[c] = pc.cast(pc.cast(pc.replace_substring(cols[c], "Z", ""), pa.timestamp("s")),
                          pa.timestamp("s", tz="UTC"))
    cols["CommitmentDiscountId"] = pa.nulls(len(rows))
    bad_parquet = tmp_path / "defects.parquet"
    pq.write_table(pa.table(cols), bad_parquet)
    return bad_csv, bad_parquet


def test_known_defects_are_each_reported(sim_csv, tmp_path):
    bad_csv, bad_parquet = _defective(sim_csv, tmp_path)
    errors = column_rule_errors(bad_csv, "1.2")
    assert errors == [
        "BillingAccountId: mandatory column missing",
        "ChargePeriodStart: not 'YYYY-MM-DDTHH:mm:ssZ' (DateTimeFormat) (1 value(s); first at line 4: "
        "'2026-11-01 00:00:00')",
        "ListUnitPrice: more significant digits than a double carries: float noise (NumericFormat precision) "
        "(1 value(s); first at line 2: '0.30000000000000004')",
        "Tags: not a serialized JSON object (KeyValueFormat) (1 value(s); first at line 3: 'team=ml')",
    ]
    errors = column_rule_errors(bad_parquet, "1.2")
    assert errors == [
        "BillingAccountId: mandatory column missing",
        "ChargePeriodStart: is string, not a timestamp: date/times in Parquet are timestamps (DateTimeFormat)",
        "CommitmentDiscountId: has Arrow type null: a column written without a type (write it with its FOCUS type)",
        "ListUnitPrice: more significant digits than a double carries: float noise (NumericFormat precision) "
        "(1 value(s); first at row 1: '0.30000000000000004')",
        "Tags: not a serialized JSON object (KeyValueFormat) (1 value(s); first at row 2: 'team=ml')",
    ]


@pytest.mark.skipif(not validator_available("1.2"), reason="focus-validator 2.2.1 not installed (.venv-focus or "
                    "FOCUS_VALIDATOR_1_2); see tests/focus_check.py")
def test_focus_validator_1_2_reports_the_missing_billing_account(sim_csv, tmp_path):
    bad_csv, _ = _defective(sim_csv, tmp_path)
    found = [e for e in validate_focus(bad_csv, "1.2") if e.startswith("focus-validator")]
    # what it finds; the cell-format defects (Tags, date/time text, float noise) only our rules report
    assert "focus-validator CostAndUsage-D-024-M: Column 'BillingAccountId' MUST be present in the table." in found
    assert found and all("BillingAccountId" in e for e in found), found


def test_tags_must_be_a_flat_json_object(tmp_path, sim_csv):
    with open(sim_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    rows[0]["Tags"] = json.dumps({"team": {"name": "ml"}})
    f = tmp_path / "nested.csv"
    with open(f, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    assert column_rule_errors(f, "1.2") == [
        "Tags: a value is an object or array (KeyValueFormat) (1 value(s); first at line 2: "
        "'{\"team\": {\"name\": \"ml\"}}')"]
