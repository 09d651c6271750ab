"""The FOCUS-aligned export: the same money as the reports, split by period, host, tags and state."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.collector.reports import ReportError, focus_rows, idle_rows
from gpuledger.demo import run_fleet

FOCUS_COLUMNS = {"BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency", "BillingPeriodStart",
                 "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd", "ChargeCategory", "ChargeDescription",
                 "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit", "ProviderName", "RegionId",
                 "ResourceId", "ServiceCategory", "ServiceName", "SkuId", "Tags"}


def test_focus_rows_add_up_to_the_idle_report(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", n_hosts=3, hours=5.0, seed=4)
    since, until = run.start_us // 1000, run.end_us // 1000
    rows = focus_rows(collector.store, collector.pricing, since, until, "hour")
    assert FOCUS_COLUMNS <= set(rows[0])
    idle = idle_rows(collector.store, collector.pricing, since, until, "host", {})
    assert sum(r["BilledCost"] for r in rows) == pytest.approx(sum(r["cost"] for r in idle), rel=1e-9)
    assert sum(r["ConsumedQuantity"] for r in rows) == pytest.approx(sum(r["gpu_hours"] for r in idle), rel=1e-9)
    for state, col in (("active", "active_hours"), ("idle_held", "idle_held_hours"), ("idle_free", "idle_free_hours"),
                       ("unmonitored", "unmonitored_hours")):
        got = sum(r["ConsumedQuantity"] for r in rows if r["x_GpuState"] == state)
        assert got == pytest.approx(sum(r[col] for r in idle), rel=1e-9, abs=1e-9), state
    periods = sorted({r["ChargePeriodStart"] for r in rows})
    assert len(periods) in (5, 6)  # 5 h, not aligned to the hour
    teams = {json.loads(r["Tags"]).get("team") for r in rows}
    assert {"platform"} < teams  # host owner tags and process tags both appear
    assert all(r["ChargeCategory"] == "Usage" and r["ConsumedUnit"] == "GPU-Hours" for r in rows)
    with pytest.raises(ReportError, match="granularity"):
        focus_rows(collector.store, collector.pricing, since, until, "minute")


def test_export_focus_cli_csv_and_parquet(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", n_hosts=2, hours=2.0, seed=5)
    from datetime import UTC, datetime

    iso = lambda us: datetime.fromtimestamp(us / 1e6, UTC).isoformat()  # noqa: E731
    args = ["export", "focus", "--collector", collector.address, "--since", iso(run.start_us), "--until",
            iso(run.end_us)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows and FOCUS_COLUMNS <= set(rows[0])
    out = tmp_path / "focus.parquet"
    res = CliRunner().invoke(app, [*args, "--format", "parquet", "-o", str(out)])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out)
    assert t.num_rows == len(rows)
    assert sum(t.column("BilledCost").to_pylist()) == pytest.approx(sum(float(r["BilledCost"]) for r in rows))
