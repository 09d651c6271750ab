"""NvmlSource over the fake pynvml: cursor, held, gauges, GPM, MIG, fallbacks, errors, the agent pipeline."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest

from gpuledger.agent.nvml import NvmlSource, NvmlUnavailable, open_nvml_source
from gpuledger.agent.runtime import Agent
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock
from gpuledger.collector.validate import validate
from gpuledger.config import AgentConfig
from gpuledger.v1 import telemetry_pb2 as pb

try:
    from tests.unit import fake_pynvml as fk
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import fake_pynvml as fk

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
P = 166_667  # H100 sample period (us)
T0 = 1_709_546_400_000_000  # 2024-03-04 10:00:00 UTC, a window boundary
# the driver's timestamps are a cursor on another clock: far from the agent's wall clock
OFFSET = -1_709_000_000_000_000 + 4_321


def source(fake, **kw) -> NvmlSource:
    return NvmlSource(fake, proc_root=str(PROC), **kw)


def cat(readings, part: str):
    parts = [getattr(r, part) for r in readings]
    names = [n for n in vars(parts[0])]
    return {n: np.concatenate([getattr(p, n) for p in parts]) for n in names}


def windows(src: NvmlSource, readings, start_us: int, end_us: int) -> dict[str, dict[str, int]]:
    """Fold readings into 10 s windows; per GPU uuid, summed state milliseconds."""
    w = Windower(src.gpus(), 10.0, 0.0, start_us=start_us)
    for r in readings:
        w.add(r)
    t = w.close(end_us, final=True).gpu
    out: dict[str, dict[str, int]] = {}
    cols = ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms", "covered_ms", "window_ms")
    for i, uuid in enumerate(t.column("gpu_uuid").to_pylist()):
        acc = out.setdefault(uuid, dict.fromkeys(cols, 0))
        for c in cols:
            acc[c] += int(t.column(c)[i].as_py())
    return out


# ----------------------------------------------------------------------------- the sample cursor


def test_cursor_no_sample_lost_or_counted_twice_across_irregular_ticks():
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu], driver_offset_us=OFFSET)
    fake.advance_to(T0)
    src = source(fake)
    assert src.gpus()[0].util_method == "samples"
    assert src.poll(T0).util.gpu.size == 0  # the first poll learns period and clock offset, emits nothing
    readings = []
    ticks = [1, 5, 6, 13, 14, 30, 31, 47, 90, 91, 120]  # in sample periods; one gap of 43 periods
    for k, load in zip(ticks, [10, 55, 100, 0, 37, 90, 3, 64, 71, 100, 20], strict=True):
        gpu.load = load
        fake.advance_to(T0 + k * P)
        readings.append(src.poll(T0 + k * P))
    u = cat(readings, "util")
    # contiguous from the first poll to the last: nothing missed, nothing overlapping
    assert u["t0_us"][0] == T0 and u["t1_us"][-1] == T0 + 120 * P
    assert (u["t0_us"][1:] == u["t1_us"][:-1]).all()
    # one reading per driver sample, at the sample's own time mapped onto the agent clock
    produced = [(ts, per, pct) for ts, per, pct in gpu.history if ts > T0 + OFFSET]
    assert list(u["t1_us"]) == [ts - OFFSET for ts, _, _ in produced]
    busy = float(((u["t1_us"] - u["t0_us"]) * u["pct"].astype(np.float64) / 100).sum())
    assert busy == pytest.approx(sum(per * pct / 100 for _, per, pct in produced), abs=1e-6)
    assert src.late_samples == 0


def test_idle_gpu_without_samples_is_idle_not_unmonitored():
    gpu = fk.h100(0, samples_when_idle=False)  # the driver keeps no sample while idle: NOT_FOUND
    fake = fk.FakeNvml([gpu], driver_offset_us=OFFSET)
    fake.advance_to(T0)
    src = source(fake)
    readings = [src.poll(T0)]
    for j in range(1, 61):  # a poll every 3 periods (0.5 s)
        gpu.load = 70 if 20 < j <= 40 else 0
        fake.advance_to(T0 + 3 * j * P)
        readings.append(src.poll(T0 + 3 * j * P))
    u = cat(readings, "util")
    assert (u["t0_us"][1:] == u["t1_us"][:-1]).all()
    assert u["t0_us"][0] == T0
    # covered up to the last poll minus the 0.5 s holdback for samples still in flight
    assert u["t1_us"][-1] == T0 + 180 * P - 500_000
    busy = ((u["t1_us"] - u["t0_us"]) * u["pct"].astype(np.float64) / 100).sum()
    assert busy == pytest.approx(60 * P * 0.70, abs=1e-6)  # samples 61..120 at 70 %
    assert set(u["pct"][u["pct"] > 0].tolist()) == {70.0}


def test_unaligned_ticks_stay_within_one_sample_of_the_truth():
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu], driver_offset_us=OFFSET)
    fake.advance_to(T0)
    src = source(fake)
    readings = [src.poll(T0)]
    rng = random.Random(7)
    t = T0
    for _ in range(200):
        t += rng.randrange(200_000, 1_400_000)
        gpu.load = rng.choice([0, 5, 50, 95, 100])
        fake.advance_to(t)
        readings.append(src.poll(t))
    u = cat(readings, "util")
    assert (u["t0_us"][1:] >= u["t1_us"][:-1]).all()  # never overlapping: nothing counted twice
    covered = int((u["t1_us"] - u["t0_us"]).sum())
    span = int(u["t1_us"][-1] - T0)
    assert span - covered <= 2 * P  # at most the clock offset's settling is uncovered
    busy = float(((u["t1_us"] - u["t0_us"]) * u["pct"].astype(np.float64) / 100).sum())
    end_drv = u["t1_us"][-1] + OFFSET
    truth = sum(per * pct / 100 for ts, per, pct in gpu.history if T0 + OFFSET < ts <= end_drv + P)
    assert abs(busy - truth) <= 2 * P


def test_agent_stall_longer_than_the_buffer_leaves_the_lost_part_unmonitored():
    gpu = fk.h100(0, buffer_len=120)  # 20 s of samples
    fake = fk.FakeNvml([gpu], driver_offset_us=OFFSET)
    fake.advance_to(T0)
    src = source(fake)
    gpu.load = 100
    readings = [src.poll(T0)]
    for k in (6, 12):
        fake.advance_to(T0 + k * P)
        readings.append(src.poll(T0 + k * P))
    stall_end = T0 + 12 * P + 180 * P  # 30 s without a poll: the oldest 10 s fall out of the buffer
    fake.advance_to(stall_end)
    readings.append(src.poll(stall_end))
    u = cat(readings, "util")
    covered = int((u["t1_us"] - u["t0_us"]).sum())
    assert covered == 12 * P + 120 * P  # the 120 buffered samples, nothing invented for the lost 60
    assert (u["pct"] == 100).all()  # the lost stretch was not filled as idle


# ----------------------------------------------------------------------------- held, processes


def test_held_follows_processes_switching_halfway_between_polls():
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu], driver_offset_us=OFFSET)
    fake.advance_to(T0)
    src = source(fake)
    gpu.load = 40
    readings = [src.poll(T0)]
    for j in range(1, 11):  # a poll every second (6 periods)
        if j == 6:
            gpu.processes = [fk.FakeProcess(4242, sm_util=30), fk.FakeProcess(5151, sm_util=50)]
        if j == 10:
            gpu.processes = []
        fake.advance_to(T0 + 6 * j * P)
        readings.append(src.poll(T0 + 6 * j * P))
    u = cat(readings, "util")
    ends = (u["t1_us"] - T0) // P
    held = dict(zip(ends.tolist(), u["held"].tolist(), strict=True))
    # processes first seen at the poll at 36 P, absent at 30 P: the change is placed at 33 P
    assert [held[k] for k in range(29, 39)] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    # gone at the poll at 60 P, present at 54 P: held until 57 P
    assert [held[k] for k in range(55, 61)] == [1, 1, 1, 0, 0, 0]
    procs = [p for r in readings for p in r.processes]
    by_pid: dict[int, list] = {}
    for r in readings:
        for i in range(r.procs.gpu.size):
            pid = r.processes[r.procs.proc[i]].pid
            by_pid.setdefault(pid, []).append((int(r.procs.t0_us[i] - T0), int(r.procs.t1_us[i] - T0),
                                               float(r.procs.pct[i])))
    for pid, share in ((4242, 30.0), (5151, 50.0)):
        rows = by_pid[pid]
        assert rows[0][:2] == (33 * P, 36 * P)  # appeared: from halfway
        assert rows[-1][:2] == (54 * P, 57 * P)  # gone: until halfway
        assert sum(b - a for a, b, _ in rows) == 24 * P
        assert {pct for _, _, pct in rows[:-1]} == {share}  # its own SM utilization share
        assert rows[-1][2] == 0.0  # it ran no kernel after the last poll that saw it
    idents = {p.pid: p for p in procs}
    assert idents[4242].tags and dict(idents[4242].tags)["team"] == "search"
    assert idents[5151].pod_uid == "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"


# ----------------------------------------------------------------------------- gauges, GPM


def test_h100_energy_counter_power_batched_and_gpm():
    gpu = fk.h100(0)
    fake = fk.FakeNvml([gpu])
    fake.advance_to(T0)
    src = source(fake)
    gpu.load = 50
    calls0 = fake.calls["nvmlDeviceGetFieldValues"]
    readings = [src.poll(T0)]
    for s in range(1, 11):
        fake.advance_to(T0 + s * 1_000_000)
        readings.append(src.poll(T0 + s * 1_000_000))
    assert fake.calls["nvmlDeviceGetFieldValues"] - calls0 == 11  # energy and power in one call per poll
    assert "nvmlDeviceGetPowerUsage" not in fake.calls
    g = cat(readings, "gauges")
    assert np.diff(g["energy_mj"][1:]).tolist() == [385_000.0] * 9  # 385 W for 1 s = 385 000 mJ
    assert set(g["power_mw"][1:].tolist()) == {385_000.0}
    assert set(g["mem_used_bytes"].tolist()) == {0.0}
    m = cat(readings, "gpm")
    assert (m["t0_us"][1:] == m["t1_us"][:-1]).all() and m["t1_us"][-1] == T0 + 10_000_000
    assert m["sm_active_pct"].tolist() == pytest.approx([45.0] * len(m["gpu"]))
    assert m["sm_occupancy_pct"].tolist() == pytest.approx([25.0] * len(m["gpu"]))
    assert m["tensor_active_pct"].tolist() == pytest.approx([30.0] * len(m["gpu"]))
    assert m["dram_active_pct"].tolist() == pytest.approx([15.0] * len(m["gpu"]))
    win = windows(src, readings, T0, T0 + 10_000_000)[gpu.uuid]
    # 59 samples of 1/6 s ended by T0 + 10 s; the 60th (ending 20 us later) is still in flight: unmonitored
    assert (win["busy_ms"], win["idle_free_ms"], win["unmonitored_ms"]) == (4917, 4916, 167)


def test_absent_field_is_nan_and_logged_once_per_device(caplog):
    caplog.set_level(logging.INFO)
    gpus = [fk.h100(0, unsupported={"nvmlDeviceGetTemperature"}), fk.h100(1)]
    fake = fk.FakeNvml(gpus)
    fake.advance_to(T0)
    src = source(fake)
    readings = []
    for s in range(10):
        fake.advance_to(T0 + s * 1_000_000)
        readings.append(src.poll(T0 + s * 1_000_000))
    g = cat(readings, "gauges")
    assert np.isnan(g["temp_c"][g["gpu"] == 0]).all()
    assert not np.isnan(g["temp_c"][g["gpu"] == 1]).any()
    notes = [r for r in caplog.records if "temperature" in r.getMessage()]
    assert len(notes) == 1 and gpus[0].uuid in notes[0].getMessage()
    assert src.devices()[0]["absent"] == ["temperature"]
    assert not any(r.unhealthy for r in readings)  # absent is not down


# ----------------------------------------------------------------------------- fallbacks, MIG


def test_t4_without_sample_buffer_falls_back_to_utilization_rates():
    gpu = fk.t4(0)
    fake = fk.FakeNvml([gpu])
    fake.advance_to(T0)
    src = source(fake)
    facts = src.gpus()[0]
    assert facts.util_method == "rates" and facts.name == "Tesla T4"
    dev = src.devices()[0]
    assert "samples" in dev["absent"]
    assert dev["fields_batched"] == ["energy"] and "power" in dev["fields_single"]  # no POWER_INSTANT field
    gpu.load = 30
    readings = [src.poll(T0)]
    for s in range(1, 21):
        fake.advance_to(T0 + s * 1_000_000)
        readings.append(src.poll(T0 + s * 1_000_000))
    u = cat(readings, "util")
    assert u["t0_us"].tolist() == [T0 + s * 1_000_000 for s in range(20)]  # since the previous poll
    assert set(u["pct"].tolist()) == {30.0}
    g = cat(readings, "gauges")
    assert set(g["power_mw"][1:].tolist()) == {28_000.0}  # 10 W + 60 W x 30 %, read by its own call
    win = windows(src, readings, T0, T0 + 20_000_000)[gpu.uuid]
    assert (win["busy_ms"], win["idle_free_ms"], win["unmonitored_ms"]) == (6000, 14000, 0)


def test_a100_mig_instances_idle_free_or_honestly_unmonitored():
    gpu = fk.a100_mig(0)
    clock = SimClock(T0)
    fake = fk.FakeNvml([gpu], clock=clock)
    src = source(fake)
    facts = src.gpus()
    assert [f.mig for f in facts] == [True, True]
    assert [f.util_method for f in facts] == ["none", "none"]
    assert [f.uuid[:4] for f in facts] == ["MIG-", "MIG-"]
    assert facts[0].name.endswith("MIG 3g.20gb") and facts[1].name.endswith("MIG 4g.20gb")
    assert src.physical_gpu_count == 1 and gpu.uuid not in {f.uuid for f in facts}
    gpu.mig[0].processes = [fk.FakeProcess(4242, used_bytes=6 << 30)]
    readings = [src.poll(T0)]
    for s in range(1, 31):
        clock.advance(1.0)
        if s == 20:
            gpu.mig[1].processes = [fk.FakeProcess(5151)]
        readings.append(src.poll(clock.now_us()))
    win = windows(src, readings, T0, T0 + 30_000_000)
    # held by a process, busy or idle unknown: unmonitored, never guessed as idle
    assert win[facts[0].uuid] == {"busy_ms": 0, "idle_held_ms": 0, "idle_free_ms": 0, "unmonitored_ms": 30_000,
                                  "covered_ms": 0, "window_ms": 30_000}
    # no process: nothing can run on it, idle-free; from halfway to the poll that saw the process: unmonitored
    assert win[facts[1].uuid]["idle_free_ms"] == 19_500 and win[facts[1].uuid]["unmonitored_ms"] == 10_500
    pr = cat(readings, "procs")
    held = {}
    for r in readings:
        for i in range(r.procs.gpu.size):
            pid = r.processes[r.procs.proc[i]].pid
            held[pid] = held.get(pid, 0) + int(r.procs.t1_us[i] - r.procs.t0_us[i])
    assert held == {4242: 30_000_000, 5151: 10_500_000}
    assert pr["mem_bytes"][0] == 6 << 30
    g = cat(readings, "gauges")
    assert np.isnan(g["energy_mj"]).all()  # energy belongs to the physical GPU
    assert set(g["mem_used_bytes"][g["gpu"] == 0].tolist()) == {float(6 << 30)}


def test_h100_mig_instance_utilization_from_gpm():
    gpu = fk.h100_mig(0)
    clock = SimClock(T0)
    fake = fk.FakeNvml([gpu], clock=clock)
    src = source(fake)
    facts, free = src.gpus()  # the 3g instance, and the 4 of 7 slices no instance holds
    assert facts.mig and facts.util_method == "gpm" and facts.share == pytest.approx(3 / 7)
    assert free.mig and free.share == pytest.approx(4 / 7) and free.uuid == f"{gpu.uuid}-unallocated-4of7"
    gpu.mig[0].load = 40
    gpu.mig[0].processes = [fk.FakeProcess(4242)]
    readings = [src.poll(T0)]
    for _ in range(20):
        clock.advance(1.0)
        readings.append(src.poll(clock.now_us()))
    u = cat(readings, "util")
    inst = u["gpu"] == 0
    assert u["pct"][inst].tolist() == pytest.approx([40.0] * 20) and set(u["held"][inst].tolist()) == {1}
    wins = windows(src, readings, T0, T0 + 20_000_000)
    win = wins[facts.uuid]
    assert (win["busy_ms"], win["idle_held_ms"], win["unmonitored_ms"]) == (8000, 12000, 0)
    # the unallocated slices are idle-free all the time after the first poll: paid for, unusable
    assert (wins[free.uuid]["idle_free_ms"], wins[free.uuid]["unmonitored_ms"]) == (20_000, 0)
    m = cat(readings, "gpm")
    assert m["sm_active_pct"].tolist() == pytest.approx([36.0] * 20)


def test_mig_gpu_without_instances_is_all_idle_free():
    gpu = fk.a100_mig(0)
    gpu.mig, gpu.mig_mode = [], True  # MIG enabled, no instance created yet
    clock = SimClock(T0)
    src = source(fk.FakeNvml([gpu], clock=clock))
    (free,) = src.gpus()
    assert free.share == 1.0 and free.uuid.endswith("-unallocated-7of7")
    readings = [src.poll(T0)]
    for _ in range(10):
        clock.advance(1.0)
        readings.append(src.poll(clock.now_us()))
    win = windows(src, readings, T0, T0 + 10_000_000)[free.uuid]
    assert (win["idle_free_ms"], win["busy_ms"], win["idle_held_ms"], win["unmonitored_ms"]) == (10_000, 0, 0, 0)


def test_unallocated_mig_slices_are_unmonitored_while_the_gpu_is_lost():
    gpu = fk.h100_mig(0)
    clock = SimClock(T0)
    src = source(fk.FakeNvml([gpu], clock=clock), retry_s=1000.0)
    inst, free = src.gpus()
    readings = [src.poll(T0)]
    for i in range(20):
        clock.advance(1.0)
        if i == 9:
            gpu.lost = True  # off the bus after 10 s
        readings.append(src.poll(clock.now_us()))
    win = windows(src, readings, T0, T0 + 20_000_000)[free.uuid]
    assert (win["idle_free_ms"], win["unmonitored_ms"]) == (9_000, 11_000)  # not idle while nobody can tell


# ----------------------------------------------------------------------------- errors


def test_gpu_lost_mid_run_others_go_on_and_its_time_is_unmonitored(caplog):
    caplog.set_level(logging.WARNING)
    gpus = [fk.h100(0), fk.h100(1), fk.t4(2)]
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus, clock=clock)
    src = source(fake, retry_s=5.0)
    for g in gpus:
        g.load = 60
    readings = [src.poll(T0)]
    unhealthy = []
    for s in range(1, 61):
        clock.advance(1.0)
        gpus[1].lost = 21 <= s < 43  # fails from the poll at 21 s, answers again from 43 s
        r = src.poll(clock.now_us())
        readings.append(r)
        if r.unhealthy:
            unhealthy.append((s, r.unhealthy))
    # retried at 26, 31, 36, 41 (still lost), 46 (back)
    assert unhealthy == [(s, (1,)) for s in range(21, 46)]
    assert src.down_events == 1
    downs = [r for r in caplog.records if r.levelno == logging.ERROR and gpus[1].uuid in r.getMessage()]
    assert len(downs) == 1
    win = windows(src, readings, T0, T0 + 60_000_000)
    w0, w1, w2 = (win[g.uuid] for g in gpus)
    # GPU 1: covered to its last sample before the loss (119 periods), then from the first clean poll (46 s);
    # at most one sample still in flight at the end
    outage_ms = round((46_000_000 - 119 * P) / 1000)
    assert outage_ms <= w1["unmonitored_ms"] <= outage_ms + 167
    assert w0["unmonitored_ms"] <= 167  # GPU 0 never stopped: only the sample in flight at the end
    assert w2["unmonitored_ms"] == 0 and w2["busy_ms"] == 36_000
    u = cat(readings, "util")
    assert (u["t1_us"][u["gpu"] == 1] > T0 + 47_000_000).any()  # samples flow again after recovery


def test_no_driver_is_fatal_with_a_hint():
    with pytest.raises(NvmlUnavailable, match="install the NVIDIA driver"):
        NvmlSource(fk.library_missing())
    with pytest.raises(NvmlUnavailable, match="kernel driver is not loaded"):
        NvmlSource(fk.FakeNvml([], init_error=fk.NVML_ERROR_DRIVER_NOT_LOADED))
    with pytest.raises(NvmlUnavailable, match="no GPUs"):
        NvmlSource(fk.FakeNvml([]))
    cfg = AgentConfig(host_id="h").validate()
    with pytest.raises(SystemExit) as e:
        open_nvml_source(cfg, nvml=fk.library_missing())
    assert "libnvidia-ml.so.1" in str(e.value.code)  # printed on stderr, exit status 1


def test_fake_raises_the_nvml_error_classes_of_nvidia_ml_py():
    gpu = fk.t4(0)
    fake = fk.FakeNvml([gpu])
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(fk.NVMLError_NotSupported) as e:
        fake.nvmlDeviceGetSamples(h, fk.NVML_GPU_UTILIZATION_SAMPLES, 0)
    assert e.value.value == fk.NVML_ERROR_NOT_SUPPORTED and isinstance(e.value, fk.NVMLError)
    assert type(fk.NVMLError(fk.NVML_ERROR_GPU_IS_LOST)) is fk.NVMLError_GpuIsLost
    try:
        import pynvml
    except ImportError:
        return
    for name in ("NVMLError_NotSupported", "NVMLError_GpuIsLost", "NVMLError_NotFound", "NVMLError_LibraryNotFound"):
        assert hasattr(pynvml, name)
    for code in ("NOT_SUPPORTED", "NOT_FOUND", "GPU_IS_LOST", "LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED"):
        assert getattr(pynvml, f"NVML_ERROR_{code}") == getattr(fk, f"NVML_ERROR_{code}")
    for name in ("NVML_GPU_UTILIZATION_SAMPLES", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "NVML_FI_DEV_POWER_INSTANT",
                 "NVML_GPM_METRIC_SM_UTIL", "NVML_GPM_METRIC_DRAM_BW_UTIL", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"):
        assert getattr(pynvml, name) == getattr(fk, name)


def test_close_is_safe_twice_and_frees_gpm_buffers():
    fake = fk.FakeNvml([fk.h100(0)])
    fake.advance_to(T0)
    src = source(fake)
    src.close()
    src.close()
    assert fake.calls["nvmlGpmSampleFree"] == fake.calls["nvmlGpmSampleAlloc"] == 2
    assert fake.inited == 0


# ----------------------------------------------------------------------------- through the agent


def test_agent_over_nvml_source_spools_batches_the_collector_accepts(tmp_path):
    gpus = [fk.h100(0), fk.a100_mig(1), fk.t4(2)]
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus, clock=clock)
    gpus[0].load, gpus[0].processes = 75, [fk.FakeProcess(4242)]
    gpus[1].mig[0].processes = [fk.FakeProcess(5151)]
    gpus[2].load = 20
    src = source(fake)
    cfg = AgentConfig(host_id="gpu-host-1", provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                      spool_dir=str(tmp_path / "spool")).validate()
    spool = Spool(cfg.spool_dir, fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=T0)
    agent.step()  # as Agent.run does: the first poll at start
    for _ in range(60):
        clock.advance(1.0)
        agent.step()
    agent.close()
    batches = [pb.WindowBatch.FromString(spool.read(r)) for r in spool.pending()]
    assert batches
    now_ms = clock.now_us() // 1000
    totals: dict[str, list[int]] = {}
    for b in batches:
        v = validate(b, now_ms)  # raises on any contract violation
        t = v.gpu
        for i, uuid in enumerate(t.column("gpu_uuid").to_pylist()):
            acc = totals.setdefault(uuid, [0, 0, 0, 0])
            for j, c in enumerate(("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")):
                acc[j] += int(t.column(c)[i].as_py())
    assert {g.util_method for g in batches[0].gpus} == {"samples", "none", "rates"}
    assert all(sum(v) == 60_000 for v in totals.values())  # every GPU-second in exactly one state
    h100 = totals[gpus[0].uuid]
    assert h100[0] == pytest.approx(0.75 * 60_000, abs=200) and h100[2] == 0  # held: never idle-free
    assert totals[gpus[2].uuid] == [12_000, 0, 48_000, 0]
    spool.close()
