"""Pieces of the finance baseline: workload classes, endpoint serving time, bill prices per month, the importer."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from gpuledger.agent.runtime import encode_batch, gpu_infos, host_facts
from gpuledger.agent.simulate import SimGpu, SimulatedSource, simulated_fleet
from gpuledger.agent.windows import Windower
from gpuledger.collector import billing
from gpuledger.collector.baseline import UNCLASSIFIED, classify, classify_api, endpoint_hours
from gpuledger.collector.bills import read_bill_table
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.simbill import write_sim_bill
from gpuledger.config import AgentConfig
from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA, to_ipc
from gpuledger.v1 import telemetry_pb2 as pb
from tests.integration.streams import send_batches

NOV = 1_793_491_200_000  # 2026-11-01T00:00Z
DEC = 1_796_083_200_000  # 2026-12-01T00:00Z
HOUR = 3_600_000


def test_classes_follow_the_documented_precedence():
    assert classify("train", "experiment") == "training"  # workload before phase
    assert classify("", "Fine Tuning") == "fine-tuning"
    assert classify(None, "production", "serving") == "inference"  # an unknown value passes to the next
    assert classify("notebook") == "development"
    assert classify("embeddings") == "embedding"
    assert classify("", None, "") == UNCLASSIFIED
    assert classify("production") == UNCLASSIFIED
    assert classify_api("costs", "", "text-embedding-3-small, input") == "embedding"
    assert classify_api("costs", "", "gpt-4o-2024-08-06 fine-tuning, training") == "fine-tuning"
    assert classify_api("cost_report", "claude-sonnet-4", "") == "inference"


def _endpoint_batch(start_us: int, minutes: int, requests_until_ms: int) -> tuple[pb.WindowBatch, pa.Table]:
    src = SimulatedSource("ep-host", "A10G", [SimGpu("inference", project="chat")], start_us, seed=3)
    w = Windower(src.gpus(), 10.0, 0.0, start_us=start_us, kernels="numpy")
    end = start_us + minutes * 60_000_000
    w.add(src.poll(end))
    closed = w.close(end)
    cfg = AgentConfig(host_id="ep-host", provider="aws", region="us-east-1", instance_type="g5.xlarge")
    raw = encode_batch("ep-host", 1, 1, host_facts(cfg, src.gpus()), gpu_infos(src.gpus()), closed, 0,
                       int(time.time() * 1000), start_us // 1000)
    b = pb.WindowBatch.FromString(raw)
    starts = list(range(start_us // 1000, end // 1000, 10_000))
    b.endpoint_windows_arrow = to_ipc(pa.table({
        "endpoint": ["chat-endpoint"] * len(starts), "server": ["vllm"] * len(starts), "window_start_ms": starts,
        "window_ms": [10_000] * len(starts), "scraped_ms": [10_000] * len(starts),
        "requests": [5 if s < requests_until_ms else 0 for s in starts], "prompt_tokens": [0] * len(starts),
        "generation_tokens": [0] * len(starts), "running_max": [1] * len(starts), "scrape_errors": [0] * len(starts),
    }, schema=ENDPOINT_WINDOW_SCHEMA))
    return b, closed.proc


def test_endpoint_serving_time_comes_from_request_counts_else_from_activity(collector):
    start_us = (int(time.time() * 1e6) - 2 * 3_600_000_000) // 10_000_000 * 10_000_000
    half = start_us // 1000 + 5 * 60_000
    batch, proc = _endpoint_batch(start_us, 10, half)
    acks = send_batches(collector.address, [batch.SerializeToString()])
    assert acks[0].code == 0, acks[0].message
    held = np.asarray(proc.column("held_ms").to_pylist(), float)
    starts = np.asarray(proc.column("window_start_ms").to_pylist())
    since, until = start_us // 1000, start_us // 1000 + 10 * 60_000
    # activity never counts (threshold above 100 %): serving is exactly the windows with requests
    ep = endpoint_hours(collector.store, since, until, min_active=1.01)
    assert ep.up_ms == pytest.approx(held.sum())
    assert ep.serving_ms == pytest.approx(held[starts < half].sum())
    assert ep.by_requests_ms == ep.serving_ms and ep.with_counts_ms == pytest.approx(held.sum())
    assert set(ep.endpoints) == {"chat-endpoint"}
    # the default 5 %: the busy endpoint also serves where its server counted no request
    ep = endpoint_hours(collector.store, since, until)
    assert ep.serving_ms > held[starts < half].sum() and ep.by_requests_ms == pytest.approx(held[starts < half].sum())
    assert 0 <= ep.idle_share < 0.5


def _import(store, path, now_us: int):
    table, _ = read_bill_table(path)
    imp = billing.Importer(store, now_us)
    imp.add(pb.ImportChunk(kind="bill", file_name=path.name, arrow=to_ipc(table),
                           slice_keys=sorted(set(table["slice_key"].to_pylist()))))
    return imp.commit()


def test_bill_prices_per_month_and_host(store, tmp_path):
    hosts = simulated_fleet(2)
    nov = write_sim_bill(tmp_path / "nov", DEC - 2 * HOUR, DEC, hosts, discount=0.5)
    write_sim_bill(tmp_path / "dec", DEC, DEC + 2 * HOUR, hosts, discount=0.25)
    _import(store, nov.focus_path, 1)
    (tmp_path / "dec" / "focus-1.2-simulated.csv").rename(tmp_path / "dec" / "focus-dec.csv")
    _import(store, tmp_path / "dec" / "focus-dec.csv", 2)
    base = Pricing.default()
    p = billing.report_pricing(store, base, DEC - 2 * HOUR, DEC + 2 * HOUR)
    assert isinstance(p, billing.BillPricing) and p.breakpoints()[-1] == DEC and DEC in p.breakpoints()
    h = nov.hosts[0]
    for at, disc in ((DEC - HOUR, 0.5), (DEC + HOUR, 0.25)):
        price = p.price(h.provider, h.region, h.instance_type, h.gpu_count, "whatever", at, instance_id=h.instance_id)
        assert price.per_gpu_hour == pytest.approx(h.hourly_price * (1 - disc) / h.gpu_count)
        assert price.method == "bill_effective/gpu_count" and "focus" in price.source
    # matched by the bill's gpuledger_host tag when the host gives no instance id
    by_tag = p.price(h.provider, h.region, h.instance_type, h.gpu_count, h.host_id, DEC + HOUR)
    assert by_tag.per_gpu_hour == pytest.approx(h.hourly_price * 0.75 / h.gpu_count)
    # a host the bill does not know keeps the catalog's price
    other = p.price("aws", "us-east-1", "g5.12xlarge", 4, "unbilled", DEC + HOUR, instance_id="i-unknown")
    assert other == base.price("aws", "us-east-1", "g5.12xlarge", 4, "unbilled", DEC + HOUR)
    billed = billing.report_pricing(store, base, DEC, DEC + 2 * HOUR, basis="billed")
    assert billed.price(h.provider, h.region, h.instance_type, h.gpu_count, "x", DEC + HOUR,
                        instance_id=h.instance_id).per_gpu_hour == pytest.approx(h.hourly_price / h.gpu_count)
    # no bill in the range: the collector's own pricing, untouched
    assert billing.report_pricing(store, base, NOV - 48 * HOUR, NOV - 24 * HOUR) is base


def test_importer_refuses_rows_and_imports_it_cannot_store(store, tmp_path):
    sim = write_sim_bill(tmp_path, DEC, DEC + 2 * HOUR, simulated_fleet(1))
    table, _ = read_bill_table(sim.focus_path)
    keys = sorted(set(table["slice_key"].to_pylist()))
    period = table.column("billing_period").to_pylist()
    period[0] = "Dec 2026"
    bad = table.set_column(table.schema.get_field_index("billing_period"), "billing_period", pa.array(period))
    imp = billing.Importer(store, 10)
    imp.add(pb.ImportChunk(kind="bill", file_name=sim.focus_path.name, arrow=to_ipc(bad), slice_keys=keys))
    reply = imp.commit()
    (f,) = reply.files
    assert f.rows_refused == 1 and f.rows_stored == table.num_rows - 1
    assert (f.refusals[0].line, f.refusals[0].column, f.refusals[0].value) == (2, "billing_period", "Dec 2026")
    imp = billing.Importer(store, 11)
    imp.add(pb.ImportChunk(kind="bill", file_name="a.csv", slice_keys=keys))
    with pytest.raises(billing.ImportRefused, match="kind: 'api_spend' after 'bill'"):
        imp.add(pb.ImportChunk(kind="api_spend", file_name="a.csv"))
    with pytest.raises(billing.ImportRefused, match="arrow: not an Arrow IPC stream"):
        billing.Importer(store, 12).add(pb.ImportChunk(kind="bill", file_name="a.csv", arrow=b"not arrow"))
    with pytest.raises(billing.ImportRefused, match="source_file 'focus-1.2-simulated.csv' differs"):
        billing.Importer(store, 13).add(pb.ImportChunk(kind="bill", file_name="other.csv", arrow=to_ipc(table),
                                                       slice_keys=keys))
    ids = [billing.new_import_id(5) for _ in range(3)]
    assert ids == sorted(set(ids))  # unique and increasing, even from one clock reading


def test_the_store_columns_are_the_parsers_schemas(store):
    from gpuledger.collector.apispend import API_SPEND_SCHEMA
    from gpuledger.collector.bills import BILL_SCHEMA

    for table, schema in (("bill_rows", BILL_SCHEMA), ("api_spend_rows", API_SPEND_SCHEMA)):
        cols = [r[0] for r in store.query_rows(f"SELECT name FROM system.columns WHERE database = 'gpuledger' AND "
                                               f"table = '{table}' ORDER BY position")]
        assert cols == [*schema.names, "import_id"]


def test_host_facts_carry_the_instance_id(tmp_path):
    from gpuledger.agent.runtime import Agent
    from gpuledger.agent.spool import Spool
    from gpuledger.clock import SimClock

    cfg = AgentConfig(host_id="h", provider="aws", instance_id="i-0abc", spool_dir=str(tmp_path / "spool"))
    src = SimulatedSource("h", "T4", [SimGpu("idle")], 0)
    assert host_facts(cfg, src.gpus()).instance_id == "i-0abc"
    assert host_facts(replace(cfg, instance_id=""), src.gpus(), instance_id="i-0found").instance_id == "i-0found"
    # the agent puts it in every batch's host facts (from the config: the metadata service is not asked)
    agent = Agent(cfg, src, SimClock(10_000_000_000), Spool(cfg.spool_dir, fsync=False))
    assert agent.host.instance_id == "i-0abc"
