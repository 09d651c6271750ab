"""NvmlSource on a real GPU: samples arrive, and busy time follows a controlled torch load.

Skips with a reason where there is no NVML, no GPU, or (for the load test) no torch with CUDA.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpuledger.clock import WallClock

pytestmark = pytest.mark.gpu


def _source_or_skip(**kw):
    from gpuledger.agent.nvml import NvmlSource, NvmlUnavailable

    try:
        return NvmlSource(**kw)
    except NvmlUnavailable as e:
        pytest.skip(f"no usable NVML on this machine: {e}")


@pytest.fixture(scope="module")
def source():
    src = _source_or_skip(measure_calls=True)
    yield src
    src.close()


def _poll_for(src, seconds: float, tick_s: float = 0.5):
    clock = WallClock()
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(src.poll(clock.now_us()))
        time.sleep(tick_s)
    return out


def test_facts_and_readings_arrive(source):
    facts = source.gpus()
    assert facts and len({f.uuid for f in facts}) == len(facts)
    assert all(f.uuid.startswith(("GPU-", "MIG-")) for f in facts)
    readings = _poll_for(source, 4.0)
    assert not any(r.unhealthy for r in readings)
    for pos, f in enumerate(facts):
        g = np.concatenate([r.gauges.gpu for r in readings])
        assert (g == pos).sum() == len(readings)  # one gauge row per GPU and poll
        if f.util_method in ("samples", "rates"):
            u = [r.util for r in readings[1:]]
            t0 = np.concatenate([x.t0_us[x.gpu == pos] for x in u])
            t1 = np.concatenate([x.t1_us[x.gpu == pos] for x in u])
            pct = np.concatenate([x.pct[x.gpu == pos] for x in u])
            assert t0.size, f"no utilization readings from {f.uuid}"
            assert (t1 > t0).all() and (t0[1:] >= t1[:-1]).all()  # no overlap: nothing counted twice
            assert ((pct >= 0) & (pct <= 100)).all()
            assert (t1[-1] - t0[0]) >= 2_000_000  # several seconds covered
    energy = np.concatenate([r.gauges.energy_mj[r.gauges.gpu == 0] for r in readings])
    if not np.isnan(energy).all():
        assert (np.diff(energy) >= 0).all()  # a counter


def test_busy_time_follows_a_controlled_torch_load(source):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
    facts = source.gpus()
    pos = next((i for i, f in enumerate(facts) if f.uuid == uuid), None)
    if pos is None or facts[pos].util_method not in ("samples", "rates"):
        pytest.skip(f"the torch device {uuid} has no NVML utilization (MIG or not visible)")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    b = torch.randn_like(a)
    torch.cuda.synchronize()
    phases: list[tuple[str, float, float]] = []
    stop = threading.Event()

    def load():
        for name, secs in (("busy", 4.0), ("idle", 4.0), ("busy", 4.0)):
            t0 = time.time()
            if name == "busy":
                while time.time() - t0 < secs:
                    for _ in range(8):
                        a @ b
                    torch.cuda.synchronize()
            else:
                stop.wait(secs)
            phases.append((name, t0, time.time()))

    th = threading.Thread(target=load)
    readings = [source.poll(WallClock().now_us())]
    th.start()
    while th.is_alive():
        time.sleep(0.5)
        readings.append(source.poll(WallClock().now_us()))
    th.join()
    time.sleep(1.5)
    readings.append(source.poll(WallClock().now_us()))
    u = [r.util for r in readings]
    t0 = np.concatenate([x.t0_us[x.gpu == pos] for x in u])
    t1 = np.concatenate([x.t1_us[x.gpu == pos] for x in u])
    pct = np.concatenate([x.pct[x.gpu == pos] for x in u]).astype(np.float64)
    held = np.concatenate([x.held[x.gpu == pos] for x in u])

    def mean_util(a_s: float, b_s: float) -> float:
        a_us, b_us = a_s * 1e6 + 500_000, b_s * 1e6 - 500_000  # 0.5 s margins at the edges
        ov = np.clip(np.minimum(t1, b_us) - np.maximum(t0, a_us), 0, None)
        return float((ov * pct).sum() / ov.sum())

    for name, a_s, b_s in phases:
        m = mean_util(a_s, b_s)
        if name == "busy":
            assert m >= 85.0, f"busy phase read as {m:.1f} %"
        else:
            assert m <= 5.0, f"idle phase read as {m:.1f} %"
    idle = next((a_s, b_s) for n, a_s, b_s in phases if n == "idle")
    inside = (t0 >= idle[0] * 1e6 + 1e6) & (t1 <= idle[1] * 1e6 - 1e6)
    assert held[inside].all(), "this process holds the GPU while idle: its time must be idle-held"
