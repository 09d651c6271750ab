"""Windower: conservation law, unmonitored gaps, and the simulator's ground truth."""

from __future__ import annotations

import numpy as np

from gpuledger.agent.simulate import SimGpu, SimulatedSource
from gpuledger.agent.source import GpuFacts, Readings, UtilReadings
from gpuledger.agent.windows import Windower

START = 1_700_000_000_000_000  # a multiple of 10 s in us


def _states(table):
    return {c: table.column(c).to_numpy().astype(np.int64) for c in
            ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms", "window_ms", "covered_ms")}


def test_conservation_and_truth_over_simulated_hours():
    gpus = [SimGpu("training", outage=(1800.0, 2400.0)), SimGpu("notebook"), SimGpu("inference"), SimGpu("idle")]
    src = SimulatedSource("h1", "H100", gpus, START, seed=3)
    w = Windower(src.gpus(), 10.0, 2.0, start_us=START)
    tables = []
    now = START
    for _ in range(3 * 60):  # 3 h in 60 s polls
        now += 60_000_000
        w.add(src.poll(now))
        c = w.close(now)
        if c:
            tables.append(c.gpu)
    c = w.close(now, final=True)
    tables.append(c.gpu)
    totals = {k: 0 for k in ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")}
    for t in tables:
        s = _states(t)
        # every GPU window: active + idle-held + idle-free + unmonitored = window length
        assert (s["busy_ms"] + s["idle_held_ms"] + s["idle_free_ms"] + s["unmonitored_ms"] == s["window_ms"]).all()
        assert (s["covered_ms"] == s["busy_ms"] + s["idle_held_ms"] + s["idle_free_ms"]).all()
        for k in totals:
            totals[k] += int(s[k].sum())
    truth = src.truth
    assert sum(totals.values()) == 4 * 3 * 3600 * 1000
    assert totals["busy_ms"] / 1000 == _approx(sum(t.active_s for t in truth))
    assert totals["idle_held_ms"] / 1000 == _approx(sum(t.idle_held_s for t in truth))
    assert totals["idle_free_ms"] / 1000 == _approx(sum(t.idle_free_s for t in truth))
    # the 10-minute outage of GPU 0 is unmonitored, never idle
    assert totals["unmonitored_ms"] / 1000 >= 600


def test_numpy_and_numba_windowers_agree():
    gpus = [SimGpu("training"), SimGpu("notebook"), SimGpu("inference"), SimGpu("idle")]
    out = {}
    for kernels in ("numba", "numpy"):
        src = SimulatedSource("h1", "H100", gpus, START, seed=9)
        w = Windower(src.gpus(), 10.0, 2.0, start_us=START, kernels=kernels)
        now, tables = START, []
        for _ in range(30):
            now += 60_000_000
            w.add(src.poll(now))
            tables.append(w.close(now).gpu)
        out[kernels] = tables
    for a, b in zip(out["numba"], out["numpy"], strict=True):
        for name in a.column_names:
            x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
            if name.endswith("_ms") or name.endswith("_mw") or name.endswith("_mj"):
                assert all(abs(p - q) <= 1 for p, q in zip(x, y, strict=True)), name  # float sums: +-1 in rounding
            else:
                assert x == y, name


def _approx(x):
    import pytest

    return pytest.approx(x, rel=1e-3, abs=2.0)


def test_window_without_readings_is_unmonitored():
    facts = [GpuFacts("GPU-a", 0, "x", 1, "simulated")]
    w = Windower(facts, 10.0, 0.0, start_us=START)
    w.add(Readings(util=UtilReadings(np.array([0], np.int32), np.array([START]), np.array([START + 5_000_000]),
                                     np.array([100.0], np.float32), np.array([1], np.uint8))))
    c = w.close(START + 30_000_000)
    s = _states(c.gpu)
    assert s["busy_ms"].tolist() == [5000, 0, 0]
    assert s["unmonitored_ms"].tolist() == [5000, 10000, 10000]
    assert s["idle_free_ms"].sum() == 0 and s["idle_held_ms"].sum() == 0


def test_lateness_keeps_the_last_window_open_and_final_close_flushes_it():
    facts = [GpuFacts("GPU-a", 0, "x", 1, "simulated")]
    w = Windower(facts, 10.0, 2.0, start_us=START)
    t1 = START + np.arange(1, 72) * 166_667
    w.add(Readings(util=UtilReadings(np.zeros(t1.size, np.int32), t1 - 166_667, t1,
                                     np.full(t1.size, 50.0, np.float32), np.ones(t1.size, np.uint8))))
    assert w.close(START + 11_000_000) is None  # [0, 10 s) ended 1 s ago: still within the 2 s lateness
    c = w.close(START + 12_000_000)
    assert c.gpu.num_rows == 1
    last = w.close(START + 12_000_000, final=True)
    assert last.gpu.column("window_start_ms").to_pylist() == [(START + 10_000_000) // 1000]
    assert last.gpu.column("covered_ms").to_pylist() == [1833]  # 11 samples of 166.667 ms after 10 s
