"""The agent's per-GPU metrics: dcgm-exporter's names and labels, figures from the closed windows,
state-seconds counted once (fed by the agent's `on_closed` hook) and never going backwards.

The GPUs are the fake pynvml's (the hardware boundary); everything above it is the real NvmlSource,
windower, agent and spool.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuledger.agent.nvml import NvmlSource
from gpuledger.agent.runtime import Agent
from gpuledger.agent.shipper import Shipper
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock
from gpuledger.collector.validate import validate
from gpuledger.config import AgentConfig
from gpuledger.metrics import agent_registry, gpu_totals
from gpuledger.v1 import telemetry_pb2 as pb

try:
    from tests.unit import fake_pynvml as fk
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import fake_pynvml as fk

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
T0 = 1_709_546_400_000_000  # a window boundary
POD_5151 = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"  # from tests/fixtures/proc/5151/cgroup

# dcgm-exporter, release 4.5.3-4.8.2 (github.com/NVIDIA/dcgm-exporter, Apache-2.0):
# - the fields gpuledger exposes, with their Prometheus type and unit as etc/default-counters.csv
#   lists them (SM_ACTIVE and SM_OCCUPANCY are there, commented out);
DCGM_FIELDS = {
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "%"),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "W"),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", "mJ"),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "MiB"),
    "DCGM_FI_DEV_FB_USED": ("gauge", "MiB"),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "C"),
    "DCGM_FI_PROF_SM_ACTIVE": ("gauge", "ratio"),
    "DCGM_FI_PROF_SM_OCCUPANCY": ("gauge", "ratio"),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("gauge", "ratio"),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("gauge", "ratio"),
}
# - the label keys of a GPU series (internal/pkg/rendermetrics/render_metrics.go), those of a MIG
#   instance, the driver version (a `label` row of default-counters.csv) and the pod attribute.
DCGM_GPU_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"}
DCGM_MIG_LABELS = {"GPU_I_PROFILE", "GPU_I_ID"}
DCGM_DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"


def scrape(reg) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)], through the text exposition and Prometheus's own parser."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def types(reg) -> dict[str, str]:
    return {fam.name: fam.type for fam in text_string_to_metric_families(generate_latest(reg).decode())}


def one(samples, **match) -> tuple[dict, float]:
    hits = [(lab, v) for lab, v in samples if all(lab.get(k) == v2 for k, v2 in match.items())]
    assert len(hits) == 1, (match, samples)
    return hits[0]


class Host:
    """A host with an H100 (a pod's process at 75 %), an H100 in MIG mode (one 3g.40gb instance at
    40 %) and a T4 at 20 %, run by the real agent over the fake NVML."""

    def __init__(self, tmp_path: Path) -> None:
        self.gpus = [fk.h100(0), fk.h100_mig(1), fk.t4(2)]
        self.clock = SimClock(T0)
        self.fake = fk.FakeNvml(self.gpus, clock=self.clock)
        self.gpus[0].load, self.gpus[0].processes = 75, [fk.FakeProcess(5151)]
        self.gpus[1].mig[0].load, self.gpus[1].mig[0].processes = 40, [fk.FakeProcess(4242)]
        self.gpus[2].load = 20
        self.source = NvmlSource(self.fake, proc_root=str(PROC))
        self.cfg = AgentConfig(host_id="gpu-host-1", spool_dir=str(tmp_path / "spool")).validate()
        self.spool = Spool(self.cfg.spool_dir, fsync=False)
        self.agent = Agent(self.cfg, self.source, self.clock, self.spool, start_us=T0)
        self.shipper = Shipper("127.0.0.1:1", self.spool)  # never started: its counters stay 0
        self.agent.step()

    def run(self, seconds: int, every=None) -> None:
        for i in range(seconds):
            self.clock.advance(1.0)
            self.agent.step()
            if every is not None:
                every(i)

    def spooled(self) -> list:
        now_ms = self.clock.now_us() // 1000
        return [validate(pb.WindowBatch.FromString(self.spool.read(r)), now_ms) for r in self.spool.pending()]

    def spooled_totals(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Seconds per state (active, idle_held, idle_free, unmonitored) and energy in mJ per GPU
        device, summed over the windows spooled: what the collector receives."""
        seconds: dict[str, list[float]] = {}
        energy: dict[str, int] = {}
        for v in self.spooled():
            t = v.gpu.to_pydict()
            for i, uuid in enumerate(t["gpu_uuid"]):
                acc = seconds.setdefault(uuid, [0.0, 0.0, 0.0, 0.0])
                for k, c in enumerate(("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")):
                    acc[k] += t[c][i] / 1000
                energy[uuid] = energy.get(uuid, 0) + t["energy_mj"][i]
        return seconds, energy

    def state_seconds(self, m, gpu) -> list[float]:
        """The scraped gpuledger_gpu_state_seconds_total of one device (a GpuFacts), in STATES order."""
        match = {"UUID": gpu.parent_uuid or gpu.uuid}
        if "unallocated" in gpu.uuid:
            match["GPU_I_PROFILE"] = "unallocated"
        elif gpu.mig:
            match["GPU_I_ID"] = gpu.uuid
        return [one(m["gpuledger_gpu_state_seconds_total"], state=s, **match)[1]
                for s in ("active", "idle_held", "idle_free", "unmonitored")]

    def close(self) -> None:
        self.spool.close()


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


def test_names_types_and_labels_are_dcgm_exporters(host):
    reg = agent_registry(host.agent, host.spool, host.shipper)
    host.run(30)
    m, t = scrape(reg), types(reg)
    exported = {n for n in t if n.startswith("DCGM_")}
    assert exported == set(DCGM_FIELDS)  # this host has GPM, power, memory, energy and temperature
    for name in exported:
        want = DCGM_FIELDS[name][0]
        # dcgm-exporter's counter is exposed under its exact series name, which a prometheus_client
        # counter family cannot have (it would be ..._total): a gauge whose value only grows
        assert t[name] == "gauge", (name, want)
        assert name in m and f"{name}_total" not in m
    h100, mig_gpu, t4 = host.gpus
    inst = host.source.gpus()[1]
    base = {"Hostname": socket.gethostname(), DCGM_DRIVER_LABEL: "550.54.15"}
    lab, _ = one(m["DCGM_FI_DEV_POWER_USAGE"], UUID=h100.uuid)
    assert lab == {**base, "gpu": "0", "UUID": h100.uuid, "pci_bus_id": "00000000:18:00.0", "device": "nvidia0",
                   "modelName": "NVIDIA H100 80GB HBM3", "pod_uid": POD_5151}
    lab, _ = one(m["DCGM_FI_DEV_GPU_UTIL"], GPU_I_PROFILE="3g.40gb")
    # a MIG instance: the parent GPU's UUID, index, bus id and model, with the instance's profile;
    # the fake's NVML gives the agent no GPU instance id in its device facts, so the MIG UUID stands in
    assert lab == {**base, "gpu": "1", "UUID": mig_gpu.uuid, "pci_bus_id": "00000000:28:00.0", "device": "nvidia1",
                   "modelName": "NVIDIA H100 80GB HBM3", "GPU_I_PROFILE": "3g.40gb", "GPU_I_ID": inst.uuid}
    lab, _ = one(m["DCGM_FI_DEV_GPU_UTIL"], UUID=t4.uuid)
    assert set(lab) == DCGM_GPU_LABELS | {DCGM_DRIVER_LABEL} and lab["modelName"] == "Tesla T4"
    for name in exported:
        for lab, _ in m[name]:
            assert DCGM_GPU_LABELS <= set(lab)
            assert set(lab) - DCGM_GPU_LABELS <= DCGM_MIG_LABELS | {DCGM_DRIVER_LABEL, "pod_uid"}
    # counters keep one series per GPU whoever holds it: no pod label, so they never restart
    assert all("pod_uid" not in lab for lab, _ in m["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"])
    assert all("pod_uid" not in lab for lab, _ in m["gpuledger_gpu_state_seconds_total"])
    # the unallocated slices of the MIG GPU are no DCGM entity: gpuledger's own counters only
    free = host.source.gpus()[2]
    assert free.uuid.endswith("-unallocated-4of7")
    assert not any(lab.get("GPU_I_PROFILE") == "unallocated" for n in exported for lab, _ in m[n])
    lab, v = one(m["gpuledger_gpu_state_seconds_total"], GPU_I_PROFILE="unallocated", state="idle_free")
    # windows [0,10) and [10,20) s are closed at 30 s (2 s lateness), each counted by the hook
    assert lab["UUID"] == mig_gpu.uuid and v == 20.0


def test_gauges_are_the_latest_window_and_unmonitored_is_not_zero(host):
    reg = agent_registry(host.agent, host.spool, host.shipper)
    host.run(30)
    m = scrape(reg)
    h100 = host.gpus[0]
    w = host.agent.last_closed.gpu.to_pylist()
    last = max((r for r in w if r["gpu_uuid"] == h100.uuid), key=lambda r: r["window_start_ms"])
    assert last["window_start_ms"] == T0 // 1000 + 10_000  # windows [0,10) and [10,20) s are closed at 30 s - 2 s
    assert one(m["DCGM_FI_DEV_GPU_UTIL"], UUID=h100.uuid)[1] == pytest.approx(75.0, abs=0.5)
    assert one(m["DCGM_FI_DEV_GPU_UTIL"], UUID=host.gpus[2].uuid)[1] == pytest.approx(20.0, abs=0.5)
    assert one(m["DCGM_FI_DEV_GPU_UTIL"], GPU_I_PROFILE="3g.40gb")[1] == pytest.approx(40.0, abs=0.5)
    # the fake draws idle + (max - idle) x load: 70 + 630 x 0.75 W
    assert one(m["DCGM_FI_DEV_POWER_USAGE"], UUID=h100.uuid)[1] == pytest.approx(542.5, abs=0.01)
    assert one(m["DCGM_FI_DEV_GPU_TEMP"], UUID=h100.uuid)[1] == last["temp_max_c"] == 33 + 75 // 3
    used_mib = last["mem_used_max_bytes"] // 2**20
    assert used_mib == 2048  # the pod's process holds 2 GiB
    assert one(m["DCGM_FI_DEV_FB_USED"], UUID=h100.uuid)[1] == used_mib
    assert one(m["DCGM_FI_DEV_FB_FREE"], UUID=h100.uuid)[1] == 81559 - used_mib
    # GPM: the fake's SM / occupancy / tensor / DRAM activity are 0.9 / 0.5 / 0.6 / 0.3 of its load
    for name, share in (("DCGM_FI_PROF_SM_ACTIVE", 0.9), ("DCGM_FI_PROF_SM_OCCUPANCY", 0.5),
                        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 0.6), ("DCGM_FI_PROF_DRAM_ACTIVE", 0.3)):
        assert one(m[name], UUID=h100.uuid)[1] == pytest.approx(0.75 * share, abs=0.005), name
    # no GPM on a T4, no power or temperature of its own on a MIG instance: absent, not 0
    assert not any(lab["UUID"] == host.gpus[2].uuid for lab, _ in m["DCGM_FI_PROF_SM_ACTIVE"])
    assert not any("GPU_I_PROFILE" in lab for lab, _ in m["DCGM_FI_DEV_POWER_USAGE"])
    # the H100 falls off the bus: its windows are unmonitored, and its utilization is no longer shown
    h100.lost = True
    host.run(30)
    m = scrape(reg)
    assert not any(lab["UUID"] == h100.uuid for lab, _ in m["DCGM_FI_DEV_GPU_UTIL"])
    unmon = one(m["gpuledger_gpu_state_seconds_total"], UUID=h100.uuid, state="unmonitored")[1]
    assert unmon >= 10.0


def test_state_seconds_count_every_window_once(host):
    reg = agent_registry(host.agent, host.spool, host.shipper)
    host.run(600)
    host.agent.close()  # closes the open window [590, 600) s through the hook too
    m = scrape(reg)
    assert scrape(reg)["gpuledger_gpu_state_seconds_total"] == m["gpuledger_gpu_state_seconds_total"]
    assert host.agent.windows_sampled == 4 * 60
    # the same figures as the batches the collector receives, read back from the spool
    want, energy = host.spooled_totals()
    facts = host.source.gpus()
    assert len(want) == len(facts) == 4
    for g in facts:
        got = host.state_seconds(m, g)
        assert got == pytest.approx(want[g.uuid], abs=1e-9), g.uuid
        assert sum(got) == pytest.approx(600.0)  # 60 windows of 10 s: every GPU-second in exactly one state
    h100 = host.gpus[0]
    assert one(m["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"], UUID=h100.uuid)[1] == energy[h100.uuid]
    assert energy[h100.uuid] == pytest.approx(542.5 * 600 * 1000, rel=0.002)  # W x s = J; in mJ


def test_counters_never_go_backwards_across_scrapes(host):
    reg = agent_registry(host.agent, host.spool, host.shipper)
    counters = None
    history = []

    def scrape_counters():
        m = scrape(reg)
        return {(name, tuple(sorted(lab.items()))): v for name, samples in m.items()
                if name.endswith("_total") or name == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
                for lab, v in samples}

    for k in range(24):
        if k == 8:
            host.gpus[0].lost = True  # a GPU lost and back: unmonitored time, then readings again
        if k == 14:
            host.gpus[0].lost = False
        host.run(23)  # scrapes less often than windows close: two or three closes between scrapes
        now = scrape_counters()
        if counters is not None:
            assert set(counters) <= set(now)  # no series disappears
            for key, v in counters.items():
                assert now[key] >= v, key
        counters = now
        history.append(now)
    first, last = history[1], history[-1]
    grew = [k for k in last if k[0] == "gpuledger_gpu_state_seconds_total" and last[k] > first.get(k, 0)]
    assert any(dict(k[1])["state"] == "unmonitored" for k in grew)
    assert any(dict(k[1])["state"] == "active" for k in grew)
    # every window closed between scrapes was counted: the totals are the spooled windows' sums
    host.agent.flush()
    want, _ = host.spooled_totals()
    m = scrape(reg)
    for g in host.source.gpus():
        got = host.state_seconds(m, g)
        assert got == pytest.approx(want[g.uuid], abs=1e-9), g.uuid
        assert sum(got) == pytest.approx(550.0)  # 24 x 23 s = 552 s: windows up to 550 s closed
    # the H100 was lost from 184 s to 322 s (and is found again at its next 10 s retry): its time
    # alone is unmonitored
    unmonitored = {g.uuid: host.state_seconds(m, g)[3] for g in host.source.gpus()}
    h100 = host.gpus[0].uuid
    assert 322 - 184 <= unmonitored.pop(h100) <= 322 - 184 + 10
    assert set(unmonitored.values()) == {0.0}


def test_totals_are_one_per_agent_and_chain_an_existing_hook(host):
    calls = []
    host.agent.on_closed = calls.append
    t = gpu_totals(host.agent)
    assert gpu_totals(host.agent) is t
    reg = agent_registry(host.agent, host.spool, host.shipper)  # a second reader shares the totals
    agent_registry(host.agent, host.spool, host.shipper)  # and a third
    host.run(12)  # closes the window [0, 10) s
    assert len(calls) == 1 and calls[0] is host.agent.last_closed  # the existing hook still gets it
    state_ms, *_ = t.snapshot()
    assert {u: sum(ms) for u, ms in state_ms.items()} == {g.uuid: 10_000 for g in host.source.gpus()}  # once
    assert sum(v for _, v in scrape(reg)["gpuledger_gpu_state_seconds_total"]) == 4 * 10.0


def test_a_failing_existing_hook_neither_stops_the_agent_nor_the_counting(host, caplog):
    def broken(_closed):
        raise RuntimeError("a hook of someone else's")

    host.agent.on_closed = broken
    reg = agent_registry(host.agent, host.spool, host.shipper)
    host.run(32)  # three windows closed, each time the old hook raises
    assert host.agent.windows_sampled == 4 * 3
    assert sum(v for _, v in scrape(reg)["gpuledger_gpu_state_seconds_total"]) == 4 * 30.0
    failures = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "a hook of someone else's"]
    assert len(failures) == 3  # logged by the agent, once per Closed
