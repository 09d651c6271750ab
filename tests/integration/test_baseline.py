"""The finance baseline on a simulated fleet with its simulated bill, against the simulator's ground truth.

The fleet runs through a real collector (demo.run_fleet: agents, spools, gRPC, chDB), its agents
carrying the instance ids of the simulated bill (simbill.resource_ids); the bill and the API spend
go in through Admin.Import; the baseline comes back over the Query service. Every figure is then
recomputed here from what the simulator says happened (SimulatedSource.truth, its samples) and
what the bill writer wrote (SimBill), never from the store.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gpuledger.agent.simulate import SimulatedSource, simulated_fleet
from gpuledger.cli import app
from gpuledger.client import fetch_report
from gpuledger.collector.cli_finance import import_api_spend, import_bills
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.server import Collector
from gpuledger.collector.simbill import resource_ids, write_sim_bill
from gpuledger.collector.store import Store, StoreOptions
from gpuledger.demo import run_fleet
from tests.focus_check import validate_focus

HOSTS, HOURS, SEED, DISCOUNT, TICK_S = 4, 8.0, 7, 0.28, 300.0
WINDOW_US = 10_000_000
KEYS = {"total_cloud_cost", "ai_cost", "ai_share", "gpu_instance_cost", "ai_service_cost", "api_cost",
        "unwatched_gpu_cost", "unwatched_gpu_instances", "monitored_share", "training_cost", "inference_cost",
        "training_to_inference", "training_util_pct", "endpoint_up_hours", "endpoint_serving_hours",
        "endpoint_idle_share", "cost_per_successful_deployment", "cost_basis", "currency"}
SAGEMAKER = "arn:aws:sagemaker:us-east-1:111122223333:endpoint/chat-ranker"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    store = Store(f"chdb://{tmp / 'chdb'}")
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0")
    c.start()
    hosts = simulated_fleet(HOSTS, SEED)
    iids = {h.host_id: resource_ids(h.provider, h.region, h.host_id)[1] for h in hosts}
    run = run_fleet(c.address, tmp / "spool", HOSTS, HOURS, seed=SEED, tick_s=TICK_S, instance_ids=iids)
    since, until = run.start_us // 1000, run.end_us // 1000
    sim = write_sim_bill(tmp / "bill", since, until, hosts, discount=DISCOUNT)
    import_bills(c.address, [sim.focus_path])
    import_api_spend(c.address, [sim.api_spend_path], "openai")
    yield c, run, hosts, sim, since, until, tmp
    c.stop(grace_s=1)
    store.close()


def _baseline(c, since, until, **filters) -> dict:
    table, _ = fetch_report(c.address, "baseline", since, until, "", filters)
    return json.loads(table.column("document")[0].as_py())


def _window_sums(src_args, start_us: int, end_us: int) -> tuple[np.ndarray, np.ndarray]:
    """Busy and held microseconds per (GPU, 10 s window) of a simulated host, from its samples: the same
    poll sequence as run_fleet (so the same samples), each sample split across the windows it overlaps."""
    src = SimulatedSource(*src_args)
    n_gpus, n_win = len(src.gpus()), (end_us - start_us) // WINDOW_US
    busy = np.zeros((n_gpus, n_win))
    held = np.zeros((n_gpus, n_win))
    t = start_us
    while t < end_us:
        t = min(t + int(TICK_S * 1e6), end_us)
        u = src.poll(t).util
        for part in (0, 1):  # a sample reaches into at most two windows
            w = (u.t0_us - start_us) // WINDOW_US + part
            a = np.maximum(u.t0_us, start_us + w * WINDOW_US)
            b = np.minimum(u.t1_us, start_us + (w + 1) * WINDOW_US)
            ok = (b > a) & (w < n_win)
            dur = (b - a)[ok].astype(float)
            np.add.at(busy, (u.gpu[ok], w[ok]), dur * u.pct[ok] / 100.0)
            np.add.at(held, (u.gpu[ok], w[ok]), dur * (u.held[ok] > 0))
    return busy, held


def _truth(run, hosts, sim, since: int, until: int) -> dict:
    """Every figure of the baseline, from the simulator's truth and the bill as written."""
    billed = {b.host_id: b for b in sim.hosts if b.has_agent}
    ghost = next(b for b in sim.hosts if not b.has_agent)
    price_gpu_h = {h: b.hourly_price * (1 - DISCOUNT) / b.gpu_count for h, b in billed.items()}
    training = inference_gpu = 0.0
    train_active = train_held = 0.0
    up = serving = 0.0
    covered = 0.0
    for src in run.sources:
        b = billed[src.host_id]
        mon = sum(t.active_s + t.idle_held_s + t.idle_free_s for t in src.truth) / 3600
        covered += sim.effective_by_resource[b.resource_id] * mon / sim.gpu_hours_by_resource[b.resource_id]
        host = next(h for h in hosts if h.host_id == src.host_id)
        busy = held = None
        for g, (spec, t) in enumerate(zip(src.spec, src.truth, strict=True)):
            held_h = (t.active_s + t.idle_held_s) / 3600
            if spec.profile == "training":
                training += held_h * price_gpu_h[src.host_id]
                train_active += t.active_s
                train_held += t.active_s + t.idle_held_s
            elif spec.profile == "inference":
                inference_gpu += held_h * price_gpu_h[src.host_id]
                if busy is None:
                    busy, held = _window_sums((host.host_id, host.gpu_model, list(host.gpus), run.start_us, SEED),
                                              run.start_us, run.end_us)
                # whole milliseconds per window, as the wire carries them (busy_ms, idle_held_ms)
                busy_ms, held_ms = np.rint(busy[g] / 1000), np.rint(held[g] / 1000)
                up += held_ms.sum()
                serving += held_ms[busy_ms >= 0.05 * held_ms].sum()
    api_inference = api_embedding = 0.0
    for bucket in json.loads(sim.api_spend_path.read_text())["data"]:
        a, b = bucket["start_time"] * 1000, bucket["end_time"] * 1000
        share = max(0, min(b, until) - max(a, since)) / (b - a)
        for r in bucket["results"]:
            if "embedding" in r["line_item"]:
                api_embedding += r["amount"]["value"] * share
            else:
                api_inference += r["amount"]["value"] * share
    api = api_inference + api_embedding
    gpu_cost = sum(sim.effective_by_resource[b.resource_id] for b in sim.hosts)
    sagemaker = sim.effective_by_resource[SAGEMAKER]
    total = sim.effective_total + api
    ai = gpu_cost + sagemaker + api
    inference = inference_gpu + sagemaker + api_inference
    return {
        "total_cloud_cost": total, "ai_cost": ai, "ai_share": ai / total, "gpu_instance_cost": gpu_cost,
        "ai_service_cost": sagemaker, "api_cost": api, "unwatched_gpu_cost": sim.effective_by_resource[ghost.resource_id],
        "unwatched_gpu_instances": [ghost.resource_id], "monitored_share": covered / gpu_cost,
        "training_cost": training, "inference_cost": inference, "training_to_inference": training / inference,
        "training_util_pct": 100 * train_active / train_held,
        "endpoint_up_hours": up / 3.6e6, "endpoint_serving_hours": serving / 3.6e6,
        "endpoint_idle_share": 1 - serving / up,
    }


def test_baseline_matches_the_simulated_truth_for_every_question(fleet):
    c, run, hosts, sim, since, until, _ = fleet
    doc = _baseline(c, since, until)
    assert KEYS <= set(doc)
    want = _truth(run, hosts, sim, since, until)
    for key, value in want.items():
        if isinstance(value, list):
            assert doc[key] == value, key
        else:
            assert doc[key] == pytest.approx(value, rel=0.005), key
    assert (doc["cost_basis"], doc["currency"]) == ("effective", "USD")
    assert doc["cost_per_successful_deployment"] is None
    assert "no model registry" in doc["cost_per_successful_deployment_reason"]
    # what each answer rests on, and the flags of its question
    assert [q["id"] for q in doc["questions"]] == ["ai_spend", "gpu_monitoring", "training_vs_inference",
                                                   "training_utilization", "endpoint_idle"]
    assert all(q["method"] and q["rests_on"] and q["covers"] and isinstance(q["flags"], list) for q in doc["questions"])
    monitoring = doc["questions"][1]
    assert monitoring["flags"] == [f"1 GPU instance(s) in the bill report to no agent "
                                   f"({want['unwatched_gpu_cost']:,.2f} USD)"]
    assert "4 of 5 billed GPU instance(s) matched to agents" in monitoring["rests_on"]
    util_flagged = bool(doc["questions"][3]["flags"])
    assert util_flagged == (want["training_util_pct"] < 70)
    assert bool(doc["questions"][4]["flags"]) == (want["endpoint_idle_share"] > 0.5)
    # the split into workloads adds up to the AI cost; what nothing names is its own share
    assert sum(doc["workload_costs"].values()) == pytest.approx(doc["ai_cost"], rel=1e-9)
    assert doc["unclassified_share"] == pytest.approx(doc["workload_costs"]["unclassified"] / doc["ai_cost"])
    assert doc["workload_costs"]["embedding"] > 0 and doc["workload_costs"]["development"] > 0
    # tagging: the simulated processes all carry team, project and phase; hosts only a team
    assert doc["untagged_share"]["gpu_cost"]["team"] == 0.0
    assert 0 < doc["untagged_share"]["gpu_cost"]["project"] < 1
    assert all(u["process"] is None and u["missing"] == ["project", "phase"] for u in doc["untagged_top"])
    assert doc["untagged_share"]["bill_cost"]["project"] == 1.0  # the simulated bill tags no project
    # per instance: billed vs monitored GPU-hours, and the bill's price per instance-hour
    inst = {i["resource_id"]: i for i in doc["instances"]}
    for b in sim.hosts:
        i = inst[b.resource_id]
        assert i["price_per_instance_hour"] == pytest.approx(b.hourly_price * (1 - DISCOUNT))
        assert i["billed_gpu_hours"] == pytest.approx(sim.gpu_hours_by_resource[b.resource_id])
        assert (i["host"] or "") == b.host_id


def test_reimporting_changes_no_figure(fleet):
    c, _, _, sim, since, until, _ = fleet
    before = _baseline(c, since, until)
    import_bills(c.address, [sim.focus_path])
    import_api_spend(c.address, [sim.api_spend_path], "openai")
    after = _baseline(c, since, until)
    for key in KEYS | {"workload_costs", "instances"}:
        assert json.dumps(after[key], sort_keys=True) == json.dumps(before[key], sort_keys=True) or \
            after[key] == pytest.approx(before[key], rel=1e-12), key


def test_the_bill_price_replaces_the_list_price_in_every_report(fleet):
    c, run, _, sim, since, until, _ = fleet
    table, reply = fetch_report(c.address, "idle", since, until, "host")
    assert "bill effective prices (focus-1.2-simulated.csv)" in reply.pricing_source
    billed = {b.host_id: b for b in sim.hosts if b.has_agent}
    for r in table.to_pylist():
        b = billed[r["host"]]
        assert r["price_method"] == "bill_effective/gpu_count"
        assert r["cost"] == pytest.approx(b.hourly_price * (1 - DISCOUNT) / b.gpu_count * r["gpu_hours"], rel=1e-9)
    # basis billed: the list price again, as the simulated bill invoices it
    doc = _baseline(c, since, until, basis="billed")
    assert doc["cost_basis"] == "billed"
    assert doc["gpu_instance_cost"] == pytest.approx(sum(sim.billed_by_resource[b.resource_id] for b in sim.hosts),
                                                     rel=0.005)
    focus, _ = fetch_report(c.address, "focus", since, until, "hour")
    assert set(focus.column("x_AllocationMethod").to_pylist()) <= {"bill_effective/gpu_count via process",
                                                                   "bill_effective/gpu_count via host",
                                                                   "bill_effective/gpu_count via host,"
                                                                   "bill_effective/gpu_count via process"}


def test_cost_by_team_shows_api_and_unwatched_gpu_spend(fleet):
    c, _, _, sim, since, until, _ = fleet
    table, _ = fetch_report(c.address, "cost", since, until, "team")
    rows = {r["team"]: r for r in table.to_pylist()}
    ghost = next(b for b in sim.hosts if not b.has_agent)
    assert rows["unknown"]["unwatched_gpu_cost"] == pytest.approx(sim.effective_by_resource[ghost.resource_id])
    assert rows["unknown"]["cost"] == 0.0  # no agent: no GPU telemetry cost
    doc = _baseline(c, since, until)
    assert sum(r["api_cost"] for r in rows.values()) == pytest.approx(doc["api_cost"])
    assert rows["platform"]["api_cost"] == 0.0 and rows["platform"]["cost"] > 0
    for r in rows.values():
        assert r["total_cost"] == pytest.approx(r["cost"] + r["api_cost"] + r["unwatched_gpu_cost"])


def test_focus_export_from_the_collector_validates(fleet):
    c, run, _, _, since, until, tmp = fleet
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat()  # noqa: E731
    args = ["export", "focus", "--collector", c.address, "--since", iso(since), "--until", iso(until)]
    out: dict[str, Path] = {}
    for fmt in ("csv", "parquet", "json"):
        out[fmt] = tmp / f"focus.{fmt}"
        res = CliRunner().invoke(app, [*args, "--format", fmt, "-o", str(out[fmt])])
        assert res.exit_code == 0, res.output
    assert validate_focus(out["csv"], "1.2") == []
    assert validate_focus(out["parquet"], "1.2") == []
    assert validate_focus(out["csv"], "1.0") == []
    rows = json.loads(out["json"].read_text())
    assert all(isinstance(r["Tags"], dict) for r in rows) and rows[0]["ChargePeriodStart"].endswith("Z")


def test_cli_baseline_json_and_table(fleet):
    c, _, _, _, since, until, _ = fleet
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).isoformat()  # noqa: E731
    args = ["baseline", "--collector", c.address, "--since", iso(since), "--until", iso(until)]
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert KEYS <= set(doc) and doc["unwatched_gpu_instances"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0
    for q in doc["questions"]:
        assert q["question"] in res.stdout
    assert "FLAG:" in res.stdout and "unwatched_gpu_cost" in res.stdout
    res = CliRunner().invoke(app, [*args, "--basis", "list"])
    assert res.exit_code == 2


def test_without_a_bill_the_baseline_answers_what_telemetry_can(fleet, tmp_path):
    # a store of its own: another database in the same embedded engine (one engine path per process)
    store = Store(f"chdb://{fleet[-1] / 'chdb'}", StoreOptions(database="gl_nobill"))
    collector = Collector(store, Pricing.default(), listen="127.0.0.1:0")
    collector.start()
    try:
        _without_a_bill(collector, tmp_path)
    finally:
        collector.stop(grace_s=1)
        store.close()


def _without_a_bill(collector, tmp_path):
    run = run_fleet(collector.address, tmp_path / "spool", 2, 2.0, seed=3)
    since, until = run.start_us // 1000, run.end_us // 1000
    doc = _baseline(collector, since, until)
    assert doc["total_cloud_cost"] is None and doc["ai_share"] is None
    assert doc["unwatched_gpu_cost"] is None and doc["unwatched_gpu_instances"] is None
    assert any(m.startswith("no cloud bill imported") for m in doc["missing"])
    assert any(m.startswith("no AI API spend imported") for m in doc["missing"])
    idle, _ = fetch_report(collector.address, "idle", since, until, "host")
    assert doc["gpu_instance_cost"] == pytest.approx(sum(r["cost"] for r in idle.to_pylist()), rel=1e-9)
    assert doc["ai_cost"] == pytest.approx(doc["gpu_instance_cost"])
    assert doc["training_util_pct"] is not None and doc["endpoint_up_hours"] > 0
    assert {r["price_method"] for r in idle.to_pylist()} == {"instance_price/gpu_count"}


def test_demo_finance_imports_the_simulated_bill_and_answers(fleet, tmp_path):
    from gpuledger.demo_finance import demo_instance_ids, import_demo_finance

    store = Store(f"chdb://{fleet[-1] / 'chdb'}", StoreOptions(database="gl_demo"))
    collector = Collector(store, Pricing.default(), listen="127.0.0.1:0")
    collector.start()
    try:
        run = run_fleet(collector.address, tmp_path / "spool", 2, 1.0, seed=5, instance_ids=demo_instance_ids(2, 5))
        demo = import_demo_finance(collector.address, run, tmp_path / "finance", seed=5)
        ghost = next(b for b in demo.bill.hosts if not b.has_agent)
        assert demo.baseline["unwatched_gpu_instances"] == [ghost.resource_id]
        assert demo.bill_rows == len(demo.bill.rows) and demo.api_rows > 0
        assert "2 of 3 billed GPU instance(s) matched to agents" in demo.baseline["questions"][1]["rests_on"]
        assert "What do we spend on AI" in demo.text
    finally:
        collector.stop(grace_s=1)
        store.close()


def test_hosts_match_by_instance_id_else_by_bill_tag_else_are_named(fleet, tmp_path):
    from gpuledger.demo_finance import demo_instance_ids

    store = Store(f"chdb://{fleet[-1] / 'chdb'}", StoreOptions(database="gl_noid"))
    collector = Collector(store, Pricing.default(), listen="127.0.0.1:0")
    collector.start()
    try:
        ids = demo_instance_ids(2, 5)
        first, other = sorted(ids)
        run = run_fleet(collector.address, tmp_path / "spool", 2, 1.0, seed=5, instance_ids={first: ids[first]})
        since, until = run.start_us // 1000, run.end_us // 1000
        sim = write_sim_bill(tmp_path / "bill", since, until, simulated_fleet(2, 5))
        import_bills(collector.address, [sim.focus_path])
        doc = _baseline(collector, since, until)  # the other host is matched by the bill's gpuledger_host tag
        assert len(doc["unwatched_gpu_instances"]) == 1 and not any("no instance id" in m for m in doc["missing"])
        # a bill without that tag: the host cannot be matched, and the baseline names it
        text = sim.focus_path.read_text().replace(f'""gpuledger_host"": ""{other}"", ', "")  # CSV-quoted JSON
        assert text != sim.focus_path.read_text()
        sim.focus_path.write_text(text)
        import_bills(collector.address, [sim.focus_path])
        doc = _baseline(collector, since, until)
        assert len(doc["unwatched_gpu_instances"]) == 2
        assert any(m.startswith(f"1 cloud host(s) report no instance id ({other})") for m in doc["missing"])
    finally:
        collector.stop(grace_s=1)
        store.close()
