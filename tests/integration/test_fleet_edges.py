"""Cost truth at the fleet's edges: hosts that stop, go silent, run clocks ahead, send overlapping or
hostile windows. Each test is a regression for a defect measured on the engine before host sessions
(it failed there): real agents, spools and shippers, a real collector over gRPC, real chDB."""

from __future__ import annotations

import numpy as np
import pytest

from gpuledger.agent.replay import replay
from gpuledger.agent.runtime import Agent, encode_batch, gpu_infos, host_facts
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.source import GpuFacts, Readings, UtilReadings
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock
from gpuledger.collector.pricing import Pricing
from gpuledger.collector.reports import idle_rows
from gpuledger.collector.server import INVALID_ARGUMENT, OK, Collector
from gpuledger.config import AgentConfig
from gpuledger.v1 import telemetry_pb2 as pb
from tests.integration.streams import send_batches

HOUR_MS = 3_600_000
NOW_US = 1_795_000_000_000_000 // 10_000_000 * 10_000_000  # the collector's clock in these tests (2026-11-18)
NOW_MS = NOW_US // 1000


@pytest.fixture
def sim_collector(store):
    clock = SimClock(NOW_US)
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", clock=clock)
    c.start()
    yield c, clock
    c.stop(grace_s=1)


def _by_host(rows):
    return {r["host"]: r for r in rows}


def _gpu_s(row, key):
    return row[key] * 3600 / row["gpus"]


def _run_agent(collector, tmp_path, host, start_us, seconds, *, stop=True, gpus=2, clock_offset_us=0, seed=1):
    """A simulated agent run from start_us for `seconds` on its own clock (offset from the truth by
    `clock_offset_us`), shipped to the collector; stop=False leaves it killed (no stop batch)."""
    clock = SimClock(start_us + clock_offset_us)
    src = SimulatedSource(host, "A10G", [SimGpu("inference")] * gpus, start_us + clock_offset_us, seed=seed)
    cfg = AgentConfig(host_id=host, provider="aws", region="us-east-1", instance_type="g5.12xlarge",
                      collector=collector.address, flush_s=60, window_s=10).validate()
    spool = Spool(tmp_path / host, fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=start_us + clock_offset_us)
    for _ in range(int(seconds)):
        clock.advance(1)
        agent.step()
    if stop:
        agent.close()
    else:
        agent.flush()
    sh = Shipper(collector.address, spool, ack_timeout_s=10).start()
    assert sh.drain(60), sh.stats.last_error
    sh.close()
    spool.close()
    return agent


def test_a_host_that_stops_stops_costing(sim_collector, tmp_path):
    """Before: a host stopped with SIGTERM while another kept reporting accrued unmonitored time up to
    the other host's newest window (66 s per GPU in 70 s)."""
    c, _ = sim_collector
    t0 = NOW_US - 2 * HOUR_MS * 1000
    _run_agent(c, tmp_path, "stops", t0, 600)  # stops on purpose after 10 minutes
    _run_agent(c, tmp_path, "goes-on", t0, 3600)
    rows = _by_host(idle_rows(c.store, c.pricing, t0 // 1000, t0 // 1000 + HOUR_MS, "host", {}, now_ms=NOW_MS))
    stops, goes_on = rows["stops"], rows["goes-on"]
    assert stops["state"] == "stopped" and stops["state_since_ms"] == t0 // 1000 + 600_000
    assert _gpu_s(stops, "gpu_hours") == pytest.approx(600, abs=0.01)
    assert stops["unmonitored_hours"] == 0
    assert _gpu_s(goes_on, "gpu_hours") == pytest.approx(3600, abs=0.01)


def test_two_logs_of_different_lengths_each_end_where_their_log_ends(sim_collector, tmp_path):
    """Before: a 30 min log replayed beside a 2 h one was reported with 1.5 h of unmonitored time."""
    c, _ = sim_collector
    start = (NOW_MS - 3 * HOUR_MS) // 60_000 * 60_000

    def log(path, minutes):
        from datetime import UTC, datetime

        lines = ["timestamp, utilization.gpu [%], memory.used [MiB]"]
        for i in range(minutes * 6 + 1):
            ts = datetime.fromtimestamp((start + i * 10_000) / 1000, UTC).strftime("%Y/%m/%d %H:%M:%S.000")
            lines.append(f"{ts}, {40 if i % 2 else 0} %, 2000 MiB")
        path.write_text("\n".join(lines) + "\n")
        return path

    for host, minutes in (("short-log", 30), ("long-log", 120)):
        cfg = AgentConfig(host_id=host, provider="aws", region="us-east-1", instance_type="g5.xlarge",
                          collector=c.address).validate()
        s = replay(log(tmp_path / f"{host}.csv", minutes), cfg, spool_dir=tmp_path / host, drain_timeout_s=60,
                   wall_clock=SimClock(NOW_US))
        assert s.complete, s.render()
    rows = _by_host(idle_rows(c.store, c.pricing, start, start + 2 * HOUR_MS, "host", {}, now_ms=NOW_MS))
    assert rows["short-log"]["unmonitored_hours"] == 0 and rows["short-log"]["state"] == "stopped"
    assert rows["short-log"]["gpu_hours"] == pytest.approx(0.5, abs=1e-6)
    assert rows["long-log"]["gpu_hours"] == pytest.approx(2.0, abs=1e-6)


def test_silence_is_unmonitored_up_to_the_horizon_then_the_host_is_gone(sim_collector, tmp_path):
    """Before: a silent host counted as unmonitored for up to 7 days in later reports."""
    c, clock = sim_collector
    t0 = NOW_US - 6 * HOUR_MS * 1000
    _run_agent(c, tmp_path, "crashed", t0, 1800, stop=False)  # killed after 30 min: no stop
    since, until = t0 // 1000, NOW_MS
    r = _by_host(idle_rows(c.store, c.pricing, since, until, "host", {}, now_ms=NOW_MS))["crashed"]
    # its last batch arrived at NOW (shipped late), so by the collector's clock it is live: nothing missing
    assert r["state"] == "live" and r["unmonitored_hours"] == 0
    later = NOW_MS + 5 * HOUR_MS
    r = _by_host(idle_rows(c.store, c.pricing, since, later, "host", {}, now_ms=later))["crashed"]
    last_window_end = t0 // 1000 + 1_790_000  # killed: its open window and the 2 s before it never closed
    assert r["state"] == "silent" and r["state_since_ms"] == last_window_end
    assert _gpu_s(r, "unmonitored_hours") == pytest.approx(3600, abs=0.01)  # the horizon, then gone
    assert _gpu_s(r, "gpu_hours") == pytest.approx(1790 + 3600, abs=0.01)
    # an operator says it is gone since 10 minutes after its last window: the silence ends there
    from gpuledger.collector.reports import retire

    clock.advance(5 * 3600)
    at, state = retire(c.store, "crashed", last_window_end + 600_000, "spot reclaim", later)
    assert state.startswith("retired")
    r = _by_host(idle_rows(c.store, c.pricing, since, later, "host", {}, now_ms=later))["crashed"]
    assert r["state"] == "retired" and _gpu_s(r, "unmonitored_hours") == pytest.approx(600, abs=0.01)


def test_one_hosts_clock_cannot_move_another_hosts_figures(sim_collector, tmp_path):
    """Before: a host 4 minutes ahead (inside the 5-minute future limit) added 280 s of priced unmonitored
    time per GPU to every other host in a range ending after now."""
    c, _ = sim_collector
    t0 = NOW_US - HOUR_MS * 1000
    _run_agent(c, tmp_path, "on-time", t0, 3600, stop=False)
    _run_agent(c, tmp_path, "ahead", t0, 3600, stop=False, clock_offset_us=240_000_000)
    rows = _by_host(idle_rows(c.store, c.pricing, t0 // 1000, NOW_MS + HOUR_MS, "host", {}, now_ms=NOW_MS))
    assert rows["on-time"]["unmonitored_hours"] == 0
    assert _gpu_s(rows["on-time"], "gpu_hours") == pytest.approx(3600 - 0, abs=10.01)  # its last window at most
    assert rows["ahead"]["unmonitored_hours"] == 0


def _batch(host, gpus, util, start_ms, end_ms, window_s=10.0, seq=1, first_windows=None, session_ms=0):
    w = Windower(gpus, window_s, 0.0, start_us=start_ms * 1000, kernels="numpy")
    w.add(Readings(util=util))
    closed = w.close(end_ms * 1000)
    cfg = AgentConfig(host_id=host, provider="aws", region="us-east-1", instance_type="g5.xlarge")
    return encode_batch(host, 1, seq, host_facts(cfg, gpus), gpu_infos(gpus, first_windows), closed, 0, NOW_MS,
                        session_ms)


def _util(t0_ms, t1_ms, pct=50):
    t = np.arange(t0_ms, t1_ms, 1000, dtype=np.int64) * 1000
    return UtilReadings(np.zeros(t.size, np.int32), t, t + 1_000_000, np.full(t.size, pct, np.float32),
                        np.ones(t.size, np.uint8))


GPU = GpuFacts("GPU-edge", 0, "A10G", 1, "samples")


def test_overlapping_windows_are_refused_in_a_batch_and_against_what_is_stored(sim_collector):
    """Before: two windows of different lengths overlapping for one GPU were accepted: 15 GPU-seconds
    reported for 10 s of wall time."""
    c, _ = sim_collector
    base = NOW_MS - HOUR_MS
    ten = pb.WindowBatch.FromString(_batch("ovl", [GPU], _util(base, base + 60_000), base, base + 60_000))
    fifteen = pb.WindowBatch.FromString(_batch("ovl", [GPU], _util(base + 45_000, base + 90_000), base + 45_000,
                                               base + 90_000, window_s=15.0, seq=2))
    # one batch holding both grids: refused, naming the window
    both = pb.WindowBatch()
    both.CopyFrom(ten)
    import pyarrow as pa

    from gpuledger.schema import from_ipc, to_ipc

    both.gpu_windows_arrow = to_ipc(pa.concat_tables([from_ipc(ten.gpu_windows_arrow),
                                                      from_ipc(fifteen.gpu_windows_arrow)]))
    both.proc_windows_arrow = b""
    del both.processes[:]
    acks = send_batches(c.address, [both.SerializeToString()])
    assert acks[0].code == INVALID_ARGUMENT and "gpu_windows." in acks[0].message and "at row" in acks[0].message
    # stored 10 s windows, then 15 s windows that overlap them: refused, naming the stored window
    acks = send_batches(c.address, [ten.SerializeToString(), fifteen.SerializeToString()])
    assert [a.code for a in acks] == [OK, INVALID_ARGUMENT], [a.message for a in acks]
    assert "overlaps windows of 10000 ms already accepted" in acks[1].message
    # a collector restarted since (no memory of what it accepted): the store is read where spans meet
    c2 = Collector(c.store, c.pricing, listen="127.0.0.1:0", clock=SimClock(NOW_US))
    c2.start()
    try:
        acks = send_batches(c2.address, [fifteen.SerializeToString()])
        assert acks[0].code == INVALID_ARGUMENT and "overlaps the stored window (1794996430000, 10000 ms)" in \
            acks[0].message.replace(str(base + 30_000), "1794996430000")
    finally:
        c2.stop(grace_s=1)
    # 15 s windows after the stored ones are fine (an agent whose window_s changed at a restart)
    nxt = base + 65_000  # on the 15 s grid, after the last 10 s window
    assert nxt % 15_000 == 0
    later = _batch("ovl", [GPU], _util(nxt, nxt + 60_000), nxt, nxt + 60_000, window_s=15.0, seq=3)
    assert [a.code for a in send_batches(c.address, [later])] == [OK]
    r = idle_rows(c.store, c.pricing, base, nxt + 60_000, "gpu", {"host": "ovl"}, now_ms=NOW_MS)[0]
    assert (r["gpu_hours"] - r["unmonitored_hours"]) * 3600 == pytest.approx(120)  # 60 s of each grid, none twice


def test_a_first_window_far_in_the_past_is_bounded(sim_collector):
    """Before: a GPU first seen today declaring first_window_ms = 1 was billed 720 unmonitored GPU-hours
    ($2,949) in a 30-day report."""
    c, _ = sim_collector
    base = NOW_MS - HOUR_MS
    raw = _batch("hostile", [GPU], _util(base, base + 60_000), base, base + 60_000, first_windows={GPU.uuid: 1})
    ack = send_batches(c.address, [raw])[0]
    assert ack.code == OK and "gpus[0].first_window_ms 1 is more than 24 h before" in ack.message
    r = idle_rows(c.store, c.pricing, NOW_MS - 30 * 24 * HOUR_MS, NOW_MS, "gpu", {"host": "hostile"},
                  now_ms=NOW_MS)[0]
    assert r["unmonitored_hours"] <= 24.0 + 1e-9  # at most the backfill bound
    assert r["unmonitored_hours"] == pytest.approx(24.0, abs=1e-6)
    # a session start claimed 30 days back is bounded the same way
    raw = _batch("hostile2", [GPU], _util(base, base + 60_000), base, base + 60_000,
                 session_ms=base - 30 * 24 * HOUR_MS)
    ack = send_batches(c.address, [raw])[0]
    assert ack.code == OK and "session_start_ms" in ack.message
    r = idle_rows(c.store, c.pricing, NOW_MS - 30 * 24 * HOUR_MS, NOW_MS, "gpu", {"host": "hostile2"},
                  now_ms=NOW_MS)[0]
    assert r["unmonitored_hours"] == pytest.approx(24.0, abs=1e-6)


def test_retire_over_the_admin_service_and_the_cli(tmp_path):
    """`gpuledger collector retire` through a collector with tokens: only the admin token may."""
    import time

    import grpc
    from typer.testing import CliRunner

    from gpuledger.cli import app
    from gpuledger.client import retire_host
    from gpuledger.collector.store import Store
    from gpuledger.security import Auth, hash_token, new_token

    admin, query, agent = new_token(), new_token(), new_token()
    store = Store(f"chdb://{tmp_path / 'chdb'}")
    clock = SimClock(int(time.time() * 1e6))
    c = Collector(store, Pricing.default(), listen="127.0.0.1:0", clock=clock,
                  auth=Auth({hash_token(agent): "gone-host"}, {hash_token(query): "q"}, {hash_token(admin): "ops"}))
    c.start()
    try:
        base = int(time.time() * 1000) // 10_000 * 10_000 - HOUR_MS
        raw = _batch("gone-host", [GPU], _util(base, base + 60_000), base, base + 60_000)
        acks = send_batches(c.address, [raw], metadata=(("authorization", f"Bearer {agent}"),))
        assert [a.code for a in acks] == [OK]
        clock.advance(2 * 3600)  # silent since
        with pytest.raises(grpc.RpcError) as e:
            retire_host(c.address, "gone-host", token=query)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin token" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            retire_host(c.address, "never-seen", token=admin)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "never reported" in e.value.details()
        tok = tmp_path / "admin.token"
        tok.write_text(admin + "\n")
        tok.chmod(0o600)
        res = CliRunner().invoke(app, ["collector", "retire", "gone-host", "--at", "30m", "--collector", c.address,
                                       "--token-file", str(tok), "--note", "decommissioned"])
        assert res.exit_code == 0, res.output
        assert "gone-host: retired from" in res.output and "now retired since" in res.output
        assert store.query_rows("SELECT note FROM gpuledger.host_events FINAL WHERE host_id = 'gone-host'") == \
            [("decommissioned",)]
        res = CliRunner().invoke(app, ["collector", "retire", "gone-host", "--at", "yesterday-ish", "--collector",
                                       c.address, "--token-file", str(tok)])
        assert res.exit_code == 2 and "cannot read 'yesterday-ish'" in res.output
    finally:
        c.stop(grace_s=1)
        store.close()
