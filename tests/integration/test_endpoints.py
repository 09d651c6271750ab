"""Inference endpoints end to end over real sockets: an agent scraping a real local HTTP server
(the fixtures' vLLM exposition, counters advancing, HTTP 500s, a server that hangs), simulated
vLLM servers against their own ground truth, and the scale-to-zero and office-hours savings of a
hand-built timeline computed by hand."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest

from gpuledger.agent.runtime import Agent, encode_batch, endpoint_part, gpu_infos, host_facts
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.source import GpuFacts, ProcessIdentity
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Closed
from gpuledger.client import fetch_report
from gpuledger.clock import SimClock
from gpuledger.collector.endpoints import replay_scale_to_zero
from gpuledger.config import AgentConfig
from gpuledger.demo_workflow import run_workflow_fleet, workflow_hosts
from gpuledger.schema import ENDPOINT_WINDOW_SCHEMA, GPU_WINDOW_SCHEMA, PROC_WINDOW_SCHEMA
from tests.integration.streams import send_batches
from tests.unit.test_scrape import MetricsServer, vllm

S = 1_000_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def past_start(hour_utc: int, hours_before_now: float, weekday: int | None = None) -> int:
    """The latest instant at `hour_utc` (on `weekday`, 0 = Monday) at least `hours_before_now` ago, in us."""
    now_ms = int(time.time() * 1000) - int(hours_before_now * HOUR_MS)
    t = now_ms // DAY_MS * DAY_MS + hour_utc * HOUR_MS
    while t > now_ms or (weekday is not None and ((t // DAY_MS) + 3) % 7 != weekday):  # 1970-01-01 was a Thursday
        t -= DAY_MS
    return t * 1000


def agent_for(collector, tmp_path, src, clock, start_us, endpoints, **cfg):
    conf = AgentConfig(host_id=src.host_id, provider="aws", region="us-east-1", instance_type="g6.xlarge",
                       collector=collector.address, spool_dir=str(tmp_path / src.host_id), window_s=10.0,
                       endpoints=endpoints, **{"tick_s": 1.0, "flush_s": 30.0, **cfg}).validate()
    spool = Spool(conf.spool_dir, fsync=False)
    return Agent(conf, src, clock, spool, start_us=start_us), Shipper(collector.address, spool).start()


def endpoint_windows(store, name):
    return store.query_rows(
        "SELECT window_start_ms, scraped_ms, requests, prompt_tokens, generation_tokens, scrape_errors "
        "FROM gpuledger.endpoint_windows FINAL WHERE endpoint = {e:String} ORDER BY window_start_ms", {"e": name})


def test_agent_scrapes_a_real_server_into_the_store_failures_marked_not_guessed(collector, tmp_path):
    server = MetricsServer()
    try:
        start = past_start(12, 2.0)
        src = SimulatedSource("h-scrape", "L4", [SimGpu("endpoint", endpoint="chat")], start, seed=1)
        clock = SimClock(start)
        agent, shipper = agent_for(collector, tmp_path, src, clock, start,
                                   [{"name": "chat", "server": "vllm", "url": server.url}])
        req = prompt = gen = 0
        for i in range(121):  # one scrape a second for two minutes; counters advance 3 requests a second
            if i:
                clock.advance(1.0)
            server.status = 500 if 40 <= i < 50 else 200
            req, prompt, gen = 1 + 3 * i, 5 + 300 * i, 7 + 90 * i
            server.body = vllm(req, prompt, gen, running=2)
            agent.step()
        agent.close()
        assert shipper.drain(60)
        shipper.close()
    finally:
        server.close()
    rows = endpoint_windows(collector.store, "chat")
    w0 = start // 1000
    assert [r[0] for r in rows] == [w0 + 10_000 * k for k in range(12)]
    assert sum(r[2] for r in rows) == req - 1 and sum(r[3] for r in rows) == prompt - 5
    assert sum(r[4] for r in rows) == gen - 7  # totals exact, the gap's increments included
    # scrapes 40..49 failed: the time between the good ones at 39 s and 50 s is not scraped
    assert [(r[1], r[5]) for r in rows[3:6]] == [(9_000, 0), (0, 10), (10_000, 0)]
    assert all(r[1] == 10_000 and r[5] == 0 for r in rows[:3] + rows[6:])
    # the gap's 33 requests spread over its 11 s: 30 in [40 s, 50 s), and the 3 of [39 s, 40 s), a window
    # already closed when they became known, carried into the first open one
    assert (rows[3][2], rows[4][2]) == (27, 33)
    assert agent.endpoint_stats()["chat"]["scrapes_failed"] == 10
    table, _ = fetch_report(collector.address, "endpoints", w0, w0 + 120_000, "")
    (row,) = table.to_pylist()
    assert row["endpoint"] == "chat" and row["counters"] == "scraped" and row["scrape_errors"] == 10
    assert row["up_hours"] == pytest.approx(120 / 3600) and row["unknown_hours"] == pytest.approx(10 / 3600)
    assert row["requests"] == req - 1 and row["serving_hours"] == pytest.approx(110 / 3600)


def test_a_hung_server_never_delays_the_gpu_windows(collector, tmp_path):
    release, in_flight = threading.Event(), []

    class Hang(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            in_flight.append(1)
            release.wait(30)
            body = vllm(5, 10, 20).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            in_flight.pop()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        start = past_start(12, 2.0)
        src = SimulatedSource("h-hang", "L4", [SimGpu("inference")], start, seed=1)
        clock = SimClock(start)
        agent, shipper = agent_for(collector, tmp_path, src, clock, start, [{
            "name": "slow", "server": "vllm", "url": f"http://127.0.0.1:{httpd.server_address[1]}/metrics",
            "timeout_s": 30.0}], tick_s=0.05)
        agent.start_scraping()
        deadline = time.monotonic() + 20
        while not in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert in_flight, "the scrape thread never reached the server"
        for _ in range(6):  # a minute of GPU windows while the scrape hangs
            clock.advance(10.0)
            agent.step()
        assert in_flight and agent.windows_sampled == 5  # closed up to now - lateness, scrape still hung
        release.set()
        agent.close()
        assert shipper.drain(60)
        shipper.close()
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
    n = collector.store.query_rows("SELECT count() FROM gpuledger.gpu_windows FINAL WHERE host_id = 'h-hang'")[0][0]
    assert n == 6


def run_endpoint_fleet(collector, tmp_path):
    """Two simulated vLLM endpoints (production diurnal; development, used 09-17 UTC) served over real
    HTTP and scraped by their agents, 07:00-09:30 UTC: the dev endpoint idles, then serves."""
    hosts = workflow_hosts([])[:2]
    return run_workflow_fleet(collector.address, tmp_path / "spool", 2.5, start_us=past_start(7, 3.0), hosts=hosts,
                              runs=[], scrape="http")


def test_endpoints_and_inference_model_match_the_simulators_ground_truth(collector, tmp_path):
    c, fleet = collector, run_endpoint_fleet(collector, tmp_path)
    since, until = fleet.start_us // 1000, fleet.end_us // 1000
    table, _ = fetch_report(c.address, "endpoints", since, until, "")
    rows = {r["endpoint"]: r for r in table.to_pylist()}
    assert set(rows) == {"chat", "chat-dev"}
    for name, row in rows.items():
        truth = fleet.endpoint(name).truth(fleet.start_us, fleet.end_us, 10 * S)
        assert row["requests"] == truth["requests"].sum()
        assert row["prompt_tokens"] == truth["prompt_tokens"].sum()
        assert row["generation_tokens"] == truth["generation_tokens"].sum()
        assert row["serving_hours"] == pytest.approx(truth["serving"].sum() * 10 / 3600, rel=0.005)
        assert row["up_hours"] == pytest.approx(2.5) and row["unknown_hours"] == 0 and row["scrape_errors"] == 0
        assert row["idle_share"] == pytest.approx(1 - row["serving_hours"] / 2.5)
    assert rows["chat"]["requests"] > 10_000 and rows["chat-dev"]["requests"] > 0
    # cost exactly as `cost --by endpoint` splits it; per 1,000 requests and per million tokens from it
    cost, _ = fetch_report(c.address, "cost", since, until, "endpoint")
    by_ep = {r["endpoint"]: r for r in cost.to_pylist()}
    for name, row in rows.items():
        assert row["cost"] == pytest.approx(by_ep[name]["cost"], rel=1e-9)
        assert row["cost_per_1k_requests"] == pytest.approx(row["cost"] / row["requests"] * 1000)
        tokens = row["prompt_tokens"] + row["generation_tokens"]
        assert row["cost_per_million_tokens"] == pytest.approx(row["cost"] / tokens * 1e6)
    # the development endpoint idled from 07:00 to 09:00: flagged, with what scale-to-zero saves
    assert rows["chat-dev"]["flag"].startswith("always_on_dev: development endpoint") and not rows["chat"]["flag"]
    assert rows["chat-dev"]["cold_starts"] == 1 and rows["chat-dev"]["scale_to_zero_down_hours"] == pytest.approx(1.75)
    assert rows["chat-dev"]["scale_to_zero_saving"] == pytest.approx(1.75 * 0.8048, rel=1e-6)  # g6.xlarge, 1 L4
    check_inference_model(c, fleet)
    check_cli(c, fleet)


def check_cli(c, fleet):
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from gpuledger.cli import app

    def iso(us):
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat()

    window = ["--collector", c.address, "--since", iso(fleet.start_us), "--until", iso(fleet.end_us)]
    res = CliRunner().invoke(app, ["endpoints", *window])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].split()[:4] == ["endpoint", "phase", "up_hours", "serving_hours"]
    assert "! chat-dev: always_on_dev: development endpoint up 24.0 h/day" in res.stdout
    res = CliRunner().invoke(app, ["inference-model", "--endpoint", "chat", "--target-rps", "25", *window])
    assert res.exit_code == 0, res.output
    assert "rests on: capacity" in res.stdout and "2.5 h of scraped counters" in res.stdout
    assert "GPUs needed:" in res.stdout and "g6e.xlarge" in res.stdout
    res = CliRunner().invoke(app, ["inference-model", "--endpoint", "chat", *window])
    assert res.exit_code == 2 and "exactly one of --target-rps and --requests-per-day" in res.output
    res = CliRunner().invoke(app, ["endpoints", "--timezone", "Nowhere/Atlantis", *window])
    assert res.exit_code == 2 and "timezone: 'Nowhere/Atlantis' is not a time zone name" in res.output


def test_every_new_command_has_help_with_examples():
    from typer.testing import CliRunner

    from gpuledger.cli import app

    for cmd in ("endpoints", "inference-model", "runs", "estimate", "alerts"):
        res = CliRunner().invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.output, cmd


def check_inference_model(c, fleet):
    """inference-model rests on the measured capacity; its errors name what is missing."""
    import grpc

    since, until = fleet.start_us // 1000, fleet.end_us // 1000
    table, _ = fetch_report(c.address, "inference_model", since, until, "",
                            {"endpoint": "chat", "target_rps": "25", "headroom": "0.3"})
    rows = table.to_pylist()
    assert [r["instance_type"] for r in rows] == ["g6e.xlarge", "g6e.2xlarge", "g6e.12xlarge", "g6e.48xlarge"]
    # capacity from the simulator's truth, the same way: busiest 5 % of 5-minute buckets per GPU-second
    truth = fleet.endpoint("chat").truth(fleet.start_us, fleet.end_us, 10 * S)
    per_bucket = truth["requests"].reshape(-1, 30).sum(axis=1) / 300.0  # one GPU held all the time
    top = np.sort(per_bucket)[::-1][:max(1, int(np.ceil(0.05 * per_bucket.size)))]
    r = rows[0]
    assert r["requests_per_gpu_s"] == pytest.approx(top.mean(), rel=0.005)
    assert r["measured_hours"] == pytest.approx(2.5) and "2.5 h of scraped counters" in r["basis"]
    gpus = int(np.ceil(25 / (r["requests_per_gpu_s"] * 0.7)))
    assert r["gpus_needed"] == gpus and r["instances"] == gpus
    assert r["monthly_cost"] == pytest.approx(gpus * 1.861 * 730)
    assert r["cost_per_1k_requests"] == pytest.approx(r["monthly_cost"] / (25 * 730 * 3600 / 1000))
    big = next(x for x in rows if x["instance_type"] == "g6e.12xlarge")
    assert big["instances"] == -(-gpus // 4) and big["always_on_floor_monthly"] == pytest.approx(10.49264 * 730)
    # low traffic: one instance, and scale-to-zero up 1 - exp(-rate x idle) of the time
    table, _ = fetch_report(c.address, "inference_model", since, until, "",
                            {"endpoint": "chat", "requests_per_day": "500", "idle_minutes": "10"})
    low = table.to_pylist()[0]
    assert low["instances"] == 1 and low["mean_rps"] == pytest.approx(500 / 86400)
    share = 1 - np.exp(-500 / 86400 * 600)
    assert low["scale_to_zero_monthly"] == pytest.approx(1.861 * 730 * share)
    for filters, msg in (({"endpoint": "nope", "target_rps": "1"}, "endpoint 'nope': no windows"),
                         ({"endpoint": "chat"}, "give exactly one of target_rps and requests_per_day"),
                         ({"endpoint": "chat", "target_rps": "-3"}, "target_rps: -3 must be > 0")):
        with pytest.raises(grpc.RpcError) as e:
            fetch_report(c.address, "inference_model", since, until, "", filters)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()


# ----------------------------------------------------------------------------- a hand-computed case


def _hand_batch(start_ms: int, serving: np.ndarray) -> bytes:
    """Host h-hand (g5.12xlarge, 1.418 per GPU-hour): GPU 0 runs endpoint dev-ep (its counters scraped:
    2 requests of 100 + 50 tokens in each serving window), GPU 1 endpoint dev-gpu (no counters: busy
    5 s in each serving window). Both held for the whole range."""
    n = serving.size
    starts = start_ms + 10_000 * np.arange(n, dtype=np.int64)
    busy = np.where(serving, 5_000, 0).astype(np.uint32)
    gpus = [GpuFacts(uuid=f"GPU-hand-{i}", index=i, name="NVIDIA A10G", mem_total_bytes=24 << 30,
                     util_method="samples") for i in range(2)]
    zeros = pa.array(np.zeros(2 * n, np.uint32))
    gpu = pa.table({
        "gpu_uuid": pa.array([g.uuid for g in gpus for _ in range(n)]),
        "window_start_ms": pa.array(np.tile(starts, 2)), "window_ms": pa.array(np.full(2 * n, 10_000, np.uint32)),
        "sample_count": pa.array(np.full(2 * n, 10, np.uint32)), "covered_ms": pa.array(np.full(2 * n, 10_000, np.uint32)),
        "busy_ms": pa.array(np.tile(busy, 2)), "idle_held_ms": pa.array(np.tile(10_000 - busy, 2).astype(np.uint32)),
        "idle_free_ms": zeros, "unmonitored_ms": zeros,
        "util_min_pct": pa.array(np.zeros(2 * n, np.uint8)), "util_max_pct": pa.array(np.full(2 * n, 50, np.uint8)),
        "util_hist": pa.array([[10] + [0] * 9] * (2 * n), pa.list_(pa.uint16())),
        **{k: pa.array(np.zeros(2 * n, np.uint64 if k in ("mem_used_max_bytes", "energy_mj") else
                                (np.uint8 if k == "temp_max_c" else np.uint32)))
           for k in ("mem_used_max_bytes", "power_mean_mw", "power_max_mw", "energy_mj", "temp_max_c",
                     "gpm_covered_ms", "sm_active_ms", "sm_occupancy_ms", "tensor_active_ms", "dram_active_ms")},
    }).select(GPU_WINDOW_SCHEMA.names).cast(GPU_WINDOW_SCHEMA)
    procs = [ProcessIdentity(pid=100 + i, start_ms=start_ms - HOUR_MS, command="vllm serve",
                             tags=(("endpoint", name), ("phase", "development"), ("team", "platform")))
             for i, name in enumerate(("dev-ep", "dev-gpu"))]
    proc = pa.table({"gpu_uuid": gpu.column("gpu_uuid"), "window_start_ms": gpu.column("window_start_ms"),
                     "pid": pa.array(np.repeat([100, 101], n).astype(np.uint32)),
                     "proc_start_ms": pa.array(np.full(2 * n, start_ms - HOUR_MS, np.int64)),
                     "held_ms": pa.array(np.full(2 * n, 10_000, np.uint32)), "busy_ms": gpu.column("busy_ms"),
                     "mem_max_bytes": pa.array(np.zeros(2 * n, np.uint64))}).cast(PROC_WINDOW_SCHEMA)
    reqs = np.where(serving, 2, 0).astype(np.uint64)
    ep = pa.table({"endpoint": ["dev-ep"] * n, "server": ["vllm"] * n, "window_start_ms": starts,
                   "window_ms": np.full(n, 10_000, np.uint32), "scraped_ms": np.full(n, 10_000, np.uint32),
                   "requests": reqs, "prompt_tokens": reqs * 100, "generation_tokens": reqs * 50,
                   "running_max": np.zeros(n, np.uint32), "scrape_errors": np.zeros(n, np.uint32)}
                  ).cast(ENDPOINT_WINDOW_SCHEMA)
    cfg = AgentConfig(host_id="h-hand", provider="aws", region="us-east-1", instance_type="g5.12xlarge")
    closed = Closed(gpu=gpu, proc=proc, processes=procs, start_ms=int(starts[0]), end_ms=int(starts[-1]) + 10_000)
    return encode_batch("h-hand", 1, 1, host_facts(cfg, gpus), gpu_infos(gpus), closed, 0, int(time.time() * 1000),
                        start_ms) + endpoint_part(ep)


def test_scale_to_zero_and_office_hours_savings_by_hand(collector):
    start_ms = past_start(7, 3.0, weekday=0) // 1000  # a Monday, 07:00 UTC
    serving = np.zeros(720, bool)  # two hours of 10 s windows
    serving[0:60] = True  # 07:00-07:10
    serving[360:372] = True  # 08:00-08:02
    acks = send_batches(collector.address, [_hand_batch(start_ms, serving)])
    assert [a.code for a in acks] == [0], acks
    table, _ = fetch_report(collector.address, "endpoints", start_ms, start_ms + 2 * HOUR_MS, "",
                            {"idle_minutes": "15", "office_hours": "08:00-18:00", "office_days": "mon-fri"})
    rows = {r["endpoint"]: r for r in table.to_pylist()}
    per_gpu_hour = 5.672 / 4
    for name in ("dev-ep", "dev-gpu"):
        r = rows[name]
        assert r["phase"] == "development" and r["up_hours"] == pytest.approx(2.0)
        assert r["serving_hours"] == pytest.approx(72 * 10 / 3600) and r["idle_share"] == pytest.approx(648 / 720)
        assert r["cost"] == pytest.approx(2 * per_gpu_hour)
        # by hand: down 07:25-08:00 (35 min) and 08:17-09:00 (43 min) = 78 min; one cold start at 08:00
        assert r["scale_to_zero_down_hours"] == pytest.approx(78 / 60) and r["cold_starts"] == 1
        assert r["scale_to_zero_saving"] == pytest.approx(78 / 60 * per_gpu_hour, rel=1e-9)
        # office hours 08:00-18:00: 07:00-08:00 would have been off
        assert r["office_hours_saving"] == pytest.approx(1.0 * per_gpu_hour, rel=1e-9)
        assert r["flag"].startswith("always_on_dev: development endpoint up 24.0 h/day, serving 2.4 h/day")
    assert rows["dev-ep"]["counters"] == "scraped" and rows["dev-gpu"]["counters"].startswith("none (serving: GPU busy")
    assert rows["dev-ep"]["requests"] == 144 and rows["dev-ep"]["requests_outside_hours"] == 120
    assert rows["dev-ep"]["cost_per_1k_requests"] == pytest.approx(2 * per_gpu_hour / 144 * 1000)
    assert rows["dev-ep"]["cost_per_million_tokens"] == pytest.approx(2 * per_gpu_hour / (144 * 150) * 1e6)
    assert rows["dev-gpu"]["requests"] == 0 and rows["dev-gpu"]["cost_per_1k_requests"] is None
    # the same answer from the pure replay
    starts = np.arange(720) * 10_000
    assert replay_scale_to_zero(starts, 10_000, serving, np.ones(720), 15 * 60_000, 0)[0] == 468
    # a longer timeout: down 07:40-08:00 and 08:32-09:00 = 48 min
    table, _ = fetch_report(collector.address, "endpoints", start_ms, start_ms + 2 * HOUR_MS, "",
                            {"idle_minutes": "30", "endpoint": "dev-ep"})
    (r,) = table.to_pylist()
    assert r["scale_to_zero_saving"] == pytest.approx(48 / 60 * per_gpu_hour, rel=1e-9)
