"""The simulated demo bill: what it writes imports back to the same figures."""

from __future__ import annotations

import csv

import pyarrow.compute as pc
import pytest

from gpuledger.agent.simulate import simulated_fleet
from gpuledger.collector.apispend import read_api_spend
from gpuledger.collector.bills import instance_key, read_bill_table
from gpuledger.collector.simbill import FOCUS_12_COLUMNS, write_sim_bill

START = 1_793_491_200_000 + 30 * 60_000  # 2026-11-01T00:30Z: a partial first hour
END = START + 26 * 3_600_000


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return write_sim_bill(tmp_path_factory.mktemp("simbill"), START, END, simulated_fleet(4), discount=0.25)


def test_sim_bill_imports_to_the_figures_it_wrote(sim):
    with open(sim.focus_path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == FOCUS_12_COLUMNS
        rows = list(reader)
    assert len(rows) == len(sim.rows)
    table, reader = read_bill_table(sim.focus_path)
    assert reader.formats[str(sim.focus_path)] == "focus-1.2" and reader.issue_count == 0
    assert pc.sum(table["billed_cost"]).as_py() == pytest.approx(sim.billed_total)
    assert pc.sum(table["effective_cost"]).as_py() == pytest.approx(sim.effective_total)
    assert sim.effective_total < sim.billed_total
    # every simulated host is billed at its catalog price for 26 h, effective 25 % lower
    for h in sim.hosts:
        sel = table.filter(pc.equal(table["resource_id"], h.resource_id))
        assert pc.sum(sel["billed_cost"]).as_py() == pytest.approx(h.hourly_price * 26)
        assert pc.sum(sel["effective_cost"]).as_py() == pytest.approx(h.hourly_price * 26 * 0.75)
        assert set(sel["instance_type"].to_pylist()) == {h.instance_type}
        assert set(sel["gpu_count"].to_pylist()) == {h.gpu_count}
        assert sim.gpu_hours_by_resource[h.resource_id] == pytest.approx(h.gpu_count * 26)
        assert instance_key(h.resource_id) == (h.instance_id.lower() if h.provider == "azure" else h.instance_id)
    assert sel.num_rows == 27  # a partial first and last hour
    ghost = [h for h in sim.hosts if not h.has_agent]
    assert len(ghost) == 1 and ghost[0].instance_type == "p4d.24xlarge"
    gpu = table.filter(table["is_gpu_instance"])
    sagemaker = "arn:aws:sagemaker:us-east-1:111122223333:endpoint/chat-ranker"
    assert set(gpu["resource_id"].to_pylist()) == {h.resource_id for h in sim.hosts} | {sagemaker}
    managed = gpu.filter(pc.equal(gpu["resource_id"], sagemaker))
    assert set(managed["instance_type"].to_pylist()) == {"ml.g5.xlarge"} and set(managed["gpu_count"].to_pylist()) == {1}
    credit = table.filter(pc.equal(table["charge_category"], "Credit"))
    assert credit["billed_cost"].to_pylist() == [-500.0]
    assert set(managed["service_name"].to_pylist()) == {"Amazon SageMaker"} and all(managed["ai_related"].to_pylist())
    other = table.filter(pc.invert(table["ai_related"]))
    assert {"Amazon Simple Storage Service", "AWS Data Transfer"} <= set(other["service_name"].to_pylist())


def test_sim_api_spend_export(sim):
    table, reader = read_api_spend(sim.api_spend_path)
    assert reader.issues == [] and table.num_rows == 3 * 2  # two UTC days touched
    assert pc.sum(table["cost"]).as_py() == pytest.approx(sim.api_spend_total)


def test_sim_bill_refuses_a_host_without_a_catalog_price(tmp_path):
    from dataclasses import replace

    host = replace(simulated_fleet(1)[0], instance_type="p9.mega")
    with pytest.raises(ValueError, match="no catalog price for aws/us-east-1/p9.mega"):
        write_sim_bill(tmp_path, START, END, [host])
