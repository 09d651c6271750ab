"""Pricing: shipped catalog, effective-dated overrides, per-GPU-hour prices, OpenCost CSV."""

from __future__ import annotations

import pytest

from gpuledger.collector.pricing import CATALOG_SOURCE, Pricing, PricingError

JUNE_2025 = 1_748_736_000_000  # 2025-06-01T00:00Z


def test_catalog_is_shipped_with_its_source():
    p = Pricing.default()
    price = p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", 0)
    assert price.per_gpu_hour == pytest.approx(98.32 / 8)
    assert price.method == "instance_price/gpu_count"
    assert CATALOG_SOURCE in p.sources and "skypilot-catalog" in CATALOG_SOURCE
    assert p.price("aws", "us-east-1", "no-such-type", 8, "h", 0) is None
    assert len(p.catalog_rows()) == 26


def test_effective_dated_override_changes_only_later_time(tmp_path):
    f = tmp_path / "pricing.toml"
    f.write_text('[[instance]]\nprovider="aws"\nregion="us-east-1"\ninstance_type="p5.48xlarge"\n'
                 'hourly_price=55.04\ngpu_count=8\neffective_from="2025-06-01"\n'
                 '[[gpu]]\nhost_id="dgx-01"\ngpu_hourly_price=1.25\n')
    p = Pricing.default(str(f))
    assert p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", JUNE_2025 - 1).per_gpu_hour == pytest.approx(12.29)
    assert p.price("aws", "us-east-1", "p5.48xlarge", 8, "h", JUNE_2025).per_gpu_hour == pytest.approx(6.88)
    owned = p.price("onprem", "", "dgx-h100", 8, "dgx-01", JUNE_2025)
    assert (owned.per_gpu_hour, owned.method) == (1.25, "gpu_hour_price")
    assert p.breakpoints() == [JUNE_2025]


def test_opencost_csv(tmp_path):
    (tmp_path / "oc.csv").write_text(
        "EndTimestamp,InstanceID,Region,AssetClass,InstanceIDField,InstanceType,MarketPriceHourly,Version\n"
        ",,us-east-1,gpu,,a3-highgpu-8g,3.90,\n,,us-east-1,node,,a3-highgpu-8g,2.00,\n")
    (tmp_path / "p.toml").write_text('opencost_csv = "oc.csv"\n')
    p = Pricing.default(str(tmp_path / "p.toml"))
    price = p.price("gcp", "us-central1", "a3-highgpu-8g", 8, "h", 0)
    assert (price.per_gpu_hour, price.method) == (3.90, "gpu_hour_price")


def test_bad_override_names_the_problem(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[instance]]\nprovider="aws"\nregion="x"\nhourly_price=1.0\ngpu_count=1\n')
    with pytest.raises(PricingError, match=r"instance\[0\] lacks 'instance_type'"):
        Pricing.default(str(f))
    f.write_text('[[instance]]\nprovider="aws"\nregion="x"\ninstance_type="t"\nhourly_price=1.0\ngpu_count=1\n'
                 'effective_from="last tuesday"\n')
    with pytest.raises(PricingError, match="effective_from: cannot read 'last tuesday'"):
        Pricing.default(str(f))
