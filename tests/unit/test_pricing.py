"""Pricing: shipped catalog, effective-dated overrides, per-GPU-hour prices, OpenCost CSV."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.collector.pricing import (
    CATALOG_SNAPSHOT_DATE,
    CATALOG_SOURCE,
    Pricing,
    PricingError,
    catalog_diff,
    validate_catalog_csv,
)

JUNE_2025 = 1_748_736_000_000  # 2025-06-01T00:00Z
ROOT = Path(__file__).resolve().parents[2]
OPENCOST = ROOT / "tests" / "fixtures" / "opencost"
CATALOG = ROOT / "gpuledger" / "collector" / "catalog" / "cloud-gpu-on-demand.csv"


def test_catalog_is_shipped_with_its_source_and_snapshot_date():
    p = Pricing.default()
    price = p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", 0)
    assert price.per_gpu_hour == pytest.approx(55.04 / 8)
    assert price.method == "instance_price/gpu_count"
    assert p.price("aws", "us-east-1", "p4d.24xlarge", 8, "h", 0).per_gpu_hour == pytest.approx(21.957642 / 8)
    assert CATALOG_SOURCE in p.sources and "skypilot-catalog" in CATALOG_SOURCE
    assert CATALOG_SNAPSHOT_DATE == "2026-01-22" and "2026" in CATALOG_SOURCE and "2c3d7ea7" in CATALOG_SOURCE
    assert p.price("aws", "us-east-1", "no-such-type", 8, "h", 0) is None
    with open(CATALOG, newline="") as fh:
        n = sum(1 for r in csv.DictReader(fh) if r["purchase_option"] == "on_demand")
    assert len(p.catalog_rows()) == n == 31


def test_effective_dated_override_changes_only_later_time(tmp_path):
    f = tmp_path / "pricing.toml"
    f.write_text('[[instance]]\nprovider="aws"\nregion="us-east-1"\ninstance_type="p5.48xlarge"\n'
                 'hourly_price=40.0\ngpu_count=8\neffective_from="2025-06-01"\n'
                 '[[gpu]]\nhost_id="dgx-01"\ngpu_hourly_price=1.25\n')
    p = Pricing.default(str(f))
    assert p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", JUNE_2025 - 1).per_gpu_hour == pytest.approx(6.88)
    assert p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", JUNE_2025).per_gpu_hour == pytest.approx(5.0)
    owned = p.price("onprem", "", "dgx-h100", 8, "dgx-01", JUNE_2025)
    assert (owned.per_gpu_hour, owned.method) == (1.25, "gpu_hour_price")
    assert p.breakpoints() == [JUNE_2025]


def _opencost(name: str) -> Pricing:
    p = Pricing()
    p.load_opencost_csv(OPENCOST / name)
    return p


def test_opencost_gpu_rows_are_keyed_by_a_gpu_label_not_a_host():
    """OpenCost's own sample: gpu rows name a GPU class held in a node label (InstanceIDField)."""
    p = _opencost("pricing_schema.csv")
    node = "gke-standard-cluster-1-pool-1-91dc432d-cg69"
    # the node row (metadata.name) plus the gpu row matched by label nvidia.com/gpu_type
    both = p.price("gcp", "us-central1", "n1-standard-8", 4, node, 0, tags={"nvidia.com/gpu_type": "Quadro_RTX_4000"})
    assert both.per_gpu_hour == pytest.approx(0.1337 / 4 + 0.75)
    assert both.method == "instance_price/gpu_count+gpu_hour_price"
    # another label key, value compared case-insensitively as OpenCost lowercases it
    gpu_only = p.price("onprem", "", "box", 2, "other-host", 0, tags={"gpu.nvidia.com/class": "quadro_rtx_4001"})
    assert (gpu_only.per_gpu_hour, gpu_only.method) == (0.80, "gpu_hour_price")
    assert "line 4" in gpu_only.source
    # the label key matters: the 4001 class under the other label does not match
    assert p.price("onprem", "", "box", 2, "h", 0, tags={"nvidia.com/gpu_type": "Quadro_RTX_4001"}) is None
    # the old misreading: a host whose id equals the GPU class name got the GPU price
    assert p.price("onprem", "", "box", 2, "Quadro_RTX_4000", 0) is None
    # node row alone, matched by the node's name
    assert p.price("onprem", "", "box", 2, node, 0).per_gpu_hour == pytest.approx(0.1337 / 2)


def test_opencost_region_and_provider_id():
    p = _opencost("pricing_schema_region.csv")
    name = "gke-standard-cluster-1-pool-1-91dc432d-cg69"
    at = {r: p.price("gcp", r, "t", 1, "h", 0, instance_id=name).per_gpu_hour
          for r in ("regionone", "regiontwo", "elsewhere")}
    assert at == {"regionone": 0.1337, "regiontwo": 0.1338, "elsewhere": 0.1339}
    # a providerID-shaped instance id reduces to the instance name, as OpenCost does
    assert p.price("gcp", "regiontwo", "t", 1, "h", 0, instance_id=f"gce://proj/zone-a/{name}").per_gpu_hour == 0.1338
    # spec.providerID names the cloud instance, not the host id
    assert p.price("gcp", "regionone", "t", 1, name, 0) is None


def test_opencost_label_keyed_nodes_and_gpus_and_end_timestamp():
    p = _opencost("pricing_schema_mixed_gpu_ondemand.csv")
    tags = {"TestClusterUsage": "OnDemand", "nvidia.com/gpu_type": "a100-ondemand"}
    price = p.price("onprem", "", "dgx", 8, "h", 0, tags=tags)
    assert price.per_gpu_hour == pytest.approx(0.90411 / 8 + 0.5)
    reserved = p.price("onprem", "", "dgx", 8, "h", 0, tags={"TestClusterUsage": "Reserved",
                                                              "nvidia.com/gpu_type": "a100-reserved"})
    assert reserved.per_gpu_hour == pytest.approx(0.654795 / 8 + 1.0)
    rows = [r for r in p.all_rows() if r["kind"].startswith("opencost")]
    assert len(rows) == 4 and {r["end_timestamp"] for r in rows} == {"2028-01-06T23:34:45Z"}
    assert {r["match"] for r in rows} == {"tag TestClusterUsage=Reserved", "tag TestClusterUsage=OnDemand",
                                          "tag nvidia.com/gpu_type=a100-ondemand",
                                          "tag nvidia.com/gpu_type=a100-reserved"}


def test_opencost_azure_provider_id_and_instance_type_class():
    p = _opencost("pricing_schema_case.csv")
    vm = ("/subscriptions/123a7sd-asd-1234-578a9-123abcdef/resourceGroups/CASE_12_STAGE_TEST7/providers/"
          "Microsoft.Compute/virtualMachineScaleSets/vmss-agent-worker0-12stagetest7-ezggnore/virtualMachines/7")
    exact = p.price("azure", "eastus2", "Standard_F32s_v2", 1, "h", 0, instance_id=f"azure://{vm.lower()}")
    assert exact.per_gpu_hour == pytest.approx(0.13370357) and "line 2" in exact.source
    # another VM of the same type and region: OpenCost's class price (InstanceType + Region)
    cls = p.price("azure", "eastus2", "Standard_F32s_v2", 2, "h", 0, instance_id="other")
    assert cls.per_gpu_hour == pytest.approx(0.13370357 / 2)
    assert p.price("azure", "westus", "Standard_F32s_v2", 2, "h", 0, instance_id="other") is None


def test_opencost_instance_type_gpu_rows_still_price_a_type(tmp_path):
    (tmp_path / "oc.csv").write_text(
        "EndTimestamp,InstanceID,Region,AssetClass,InstanceIDField,InstanceType,MarketPriceHourly,Version\n"
        ",,us-central1,gpu,,a3-highgpu-8g,3.90,\n,,,gpu,,a3-highgpu-8g,4.10,\n")
    (tmp_path / "p.toml").write_text('opencost_csv = "oc.csv"\n')
    p = Pricing.default(str(tmp_path / "p.toml"))
    price = p.price("gcp", "us-central1", "a3-highgpu-8g", 8, "h", 0)
    assert (price.per_gpu_hour, price.method) == (3.90, "gpu_hour_price")
    assert p.price("gcp", "us-east4", "a3-highgpu-8g", 8, "h", 0).per_gpu_hour == 4.10


@pytest.mark.parametrize("row, message", [
    ("yesterday,i-1,,node,spec.providerID,,1.0,", "line 2, column EndTimestamp: cannot read 'yesterday'"),
    ("2024-01-01,i-1,,node,spec.foo,,1.0,", "line 2, column InstanceIDField: 'spec.foo'"),
    ("2024-01-01,a100,,gpu,,,1.0,", "line 2, column InstanceIDField: empty"),
    ("2024-01-01,i-1,,node,metadata.name,,cheap,", "line 2, column MarketPriceHourly: 'cheap'"),
    ("2024-01-01,i-1,,node,metadata.name,,1.0", "line 2: 7 cells, the header has 8"),
])
def test_opencost_bad_rows_name_line_and_column(tmp_path, row, message):
    f = tmp_path / "oc.csv"
    f.write_text("EndTimestamp,InstanceID,Region,AssetClass,InstanceIDField,InstanceType,MarketPriceHourly,Version\n"
                 + row + "\n")
    with pytest.raises(PricingError) as e:
        Pricing().load_opencost_csv(f)
    assert message in str(e.value)


def test_later_end_timestamp_wins_for_the_same_asset(tmp_path):
    f = tmp_path / "oc.csv"
    f.write_text("EndTimestamp,InstanceID,Region,AssetClass,InstanceIDField,InstanceType,MarketPriceHourly,Version\n"
                 "2024-03-01 00:00:00 UTC,n1,,node,metadata.name,,3.0,\n"
                 "2024-01-01 00:00:00 UTC,n1,,node,metadata.name,,1.0,\n")
    p = Pricing()
    p.load_opencost_csv(f)
    assert p.price("onprem", "", "x", 1, "n1", 0).per_gpu_hour == 3.0


def test_bad_override_names_the_problem(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[instance]]\nprovider="aws"\nregion="x"\nhourly_price=1.0\ngpu_count=1\n')
    with pytest.raises(PricingError, match=r"instance\[0\] lacks 'instance_type'"):
        Pricing.default(str(f))
    f.write_text('[[instance]]\nprovider="aws"\nregion="x"\ninstance_type="t"\nhourly_price=1.0\ngpu_count=1\n'
                 'effective_from="last tuesday"\n')
    with pytest.raises(PricingError, match="effective_from: cannot read 'last tuesday'"):
        Pricing.default(str(f))


def _overrides(tmp_path) -> Path:
    shutil.copy(OPENCOST / "pricing_schema.csv", tmp_path / "oc.csv")
    f = tmp_path / "pricing.toml"
    f.write_text('opencost_csv = "oc.csv"\n[[instance]]\nprovider="aws"\nregion="us-east-1"\n'
                 'instance_type="p5.48xlarge"\nhourly_price=40.0\ngpu_count=8\neffective_from="2025-06-01"\n'
                 '[[gpu]]\nhost_id="dgx-01"\ngpu_hourly_price=1.25\n'
                 '[[gpu]]\ninstance_type="a3-highgpu-8g"\ngpu_hourly_price=3.9\n')
    return f


def test_all_rows_lists_every_kind_of_price(tmp_path):
    p = Pricing.default(str(_overrides(tmp_path)))
    rows = p.all_rows()
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    assert kinds == {"catalog": 31, "instance_override": 1, "gpu_override": 2, "opencost_node": 1, "opencost_gpu": 2}
    over = next(r for r in rows if r["kind"] == "instance_override")
    assert (over["per_gpu_hour"], over["effective_from"]) == (5.0, "2025-06-01T00:00:00Z")
    assert {r["match"] for r in rows if r["kind"] == "gpu_override"} == {"host_id=dgx-01",
                                                                       "instance_type=a3-highgpu-8g"}
    gpu = [r for r in rows if r["kind"] == "opencost_gpu"]
    assert {(r["match"], r["per_gpu_hour"]) for r in gpu} == {("tag nvidia.com/gpu_type=Quadro_RTX_4000", 0.75),
                                                            ("tag gpu.nvidia.com/class=Quadro_RTX_4001", 0.80)}
    assert all(r["source"] for r in rows)


def test_pricing_command_shows_overrides_and_opencost_rows(tmp_path):
    res = CliRunner().invoke(app, ["pricing", "--file", str(_overrides(tmp_path)), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 37
    assert {r["kind"] for r in rows} == {"catalog", "instance_override", "gpu_override", "opencost_node",
                                         "opencost_gpu"}
    assert any(r["match"] == "host_id=gke-standard-cluster-1-pool-1-91dc432d-cg69" and r["hourly_price"] == 0.1337
               for r in rows)
    table = CliRunner().invoke(app, ["pricing", "--file", str(_overrides(tmp_path))])
    assert table.exit_code == 0 and "opencost_gpu" in table.stdout and "2026" in table.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('opencost_csv = "missing.csv"\n')
    res = CliRunner().invoke(app, ["pricing", "--file", str(bad)])
    assert res.exit_code == 2 and "missing.csv" in res.stderr


# ---------------------------------------------------------------------------- catalog refresh


def test_shipped_catalog_validates_and_diff_names_changes():
    rows = validate_catalog_csv(CATALOG.read_text())
    old = [dict(r) for r in rows]
    new = [dict(r) for r in rows if r["instance_type"] != "p3.2xlarge"]
    for r in new:
        if r["instance_type"] == "p5.48xlarge":
            r["hourly_price"] = 44.032
    new.append({**new[0], "instance_type": "g7.xlarge", "hourly_price": 2.0})
    diff = {d["instance_type"]: d for d in catalog_diff(old, new)}
    assert set(diff) == {"p3.2xlarge", "p5.48xlarge", "g7.xlarge"}
    assert (diff["p5.48xlarge"]["change"], diff["p5.48xlarge"]["change_pct"]) == ("changed", -20.0)
    assert diff["p3.2xlarge"]["change"] == "removed" and diff["g7.xlarge"]["change"] == "added"


def _refresh(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "refresh_catalog.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_refresh_script_validates_then_replaces_catalog_and_snapshot(tmp_path):
    cat = tmp_path / "catalog"
    cat.mkdir()
    shutil.copy(CATALOG, cat / "cloud-gpu-on-demand.csv")
    lines = CATALOG.read_text().splitlines()
    header = lines[0]
    # an invalid refresh: negative price on data line 3, and a duplicate row
    bad = tmp_path / "bad.csv"
    bad_row = lines[2].split(",")
    bad_row[8] = "-1"
    bad.write_text("\n".join([header, lines[1], ",".join(bad_row)]) + "\n")
    res = _refresh(str(bad), "--snapshot-date", "2026-03-01", "--catalog-dir", str(cat))
    assert res.returncode == 2 and "line 3, column hourly_price: must be a positive number" in res.stderr
    dup = tmp_path / "dup.csv"
    dup.write_text("\n".join([header, lines[1], lines[1]]) + "\n")
    res = _refresh(str(dup), "--snapshot-date", "2026-03-01", "--catalog-dir", str(cat))
    assert res.returncode == 2 and "line 3, column instance_type: duplicate of line 2" in res.stderr
    assert (cat / "cloud-gpu-on-demand.csv").read_text() == CATALOG.read_text()  # nothing written
    # a valid one: p5.48xlarge cheaper, p3.2xlarge gone
    good = tmp_path / "good.csv"
    rows = [ln.replace(",55.04,", ",44.032,") for ln in lines if ",p3.2xlarge," not in ln]
    good.write_text("\n".join(rows) + "\n")
    res = _refresh(str(good), "--snapshot-date", "2026-03-01", "--label", "2026-03-01 (test)", "--check",
                   "--catalog-dir", str(cat))
    assert res.returncode == 0 and "| p5.48xlarge (aws) | us-east-1 | 55.04 | 44.032 | -20.0% |" in res.stdout
    assert not (cat / "snapshot.csv").exists()
    res = _refresh(str(good), "--snapshot-date", "2026-03-01", "--label", "2026-03-01 (test)",
                   "--catalog-dir", str(cat))
    assert res.returncode == 0, res.stderr
    assert (cat / "cloud-gpu-on-demand.csv").read_text() == good.read_text()
    snap = {r["key"]: r["value"] for r in csv.DictReader((cat / "snapshot.csv").open())}
    assert snap == {"snapshot_date": "2026-03-01", "snapshot_label": "2026-03-01 (test)"}
    assert _refresh(str(good), "--snapshot-date", "March", "--catalog-dir", str(cat)).returncode == 2
