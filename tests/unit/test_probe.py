"""`probe` over the fake pynvml: versions, what each GPU supports, per-tick call latency, environ readability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpuledger.agent.cli_nvml import probe as probe_cmd
from gpuledger.agent.probe import probe, render
from gpuledger.clock import SimClock

try:
    from tests.unit import fake_pynvml as fk
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import fake_pynvml as fk

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
T0 = 1_709_546_400_000_000


@pytest.fixture
def machine():
    gpus = [fk.h100(0), fk.a100_mig(1), fk.t4(2)]
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus, clock=clock)
    gpus[0].load, gpus[0].processes = 60, [fk.FakeProcess(4242)]
    return fake, clock


def test_probe_reports_versions_and_what_each_gpu_supports(machine):
    fake, clock = machine
    d = probe(fake, proc_root=str(PROC), polls=5, interval_s=0.5, clock=clock)
    assert d["ok"] is True
    assert (d["driver_version"], d["nvml_version"], d["cuda_driver_version"]) == ("550.54.15", "12.550.54.15", "12.4")
    assert d["physical_gpus"] == 3 and len(d["gpus"]) == 4  # the A100 shows as its two MIG instances
    h100, mig3, mig4, t4 = d["gpus"]
    assert h100["utilization"] == {"method": "samples", "sample_buffer": True, "sample_period_us": 166_667}
    assert h100["energy_counter"] and h100["power"] == "field values (instant)" and h100["gpm"]
    assert h100["process_utilization"] and not h100["mig"]["enabled"] and h100["healthy"]
    assert h100["architecture"] == fk.NVML_DEVICE_ARCH_HOPPER and h100["pci_bus_id"] == "00000000:18:00.0"
    for m, profile in ((mig3, "3g.20gb"), (mig4, "4g.20gb")):
        assert m["kind"] == "mig" and m["name"].endswith(profile)
        assert m["mig"] == {"enabled": True, "instance": True, "parent_uuid": fake.gpus[1].uuid}
        assert m["utilization"]["method"] == "none" and "unmonitored" in m["utilization"]["note"]
        assert not m["gpm"] and not m["energy_counter"]
    assert t4["utilization"]["method"] == "rates" and not t4["utilization"]["sample_buffer"]
    assert t4["power"] == "nvmlDeviceGetPowerUsage" and "samples" in t4["absent"]


def test_probe_measures_every_nvml_call_made_per_tick(machine):
    fake, clock = machine
    d = probe(fake, proc_root=str(PROC), polls=5, interval_s=0.5, clock=clock)
    calls = d["call_latency_us"]
    assert d["ticks_measured"] == 5
    assert calls["nvmlDeviceGetSamples"]["calls_per_tick"] == 1  # only the H100 has a sample buffer
    assert calls["nvmlDeviceGetUtilizationRates"]["calls_per_tick"] == 1  # the T4
    assert calls["nvmlDeviceGetComputeRunningProcesses"]["calls_per_tick"] == 4  # every GPU and MIG instance
    assert calls["nvmlDeviceGetFieldValues"]["calls_per_tick"] == 2  # H100 and T4, energy (+ power) batched
    assert {"nvmlGpmSampleGet", "nvmlGpmMetricsGet", "nvmlDeviceGetProcessUtilization",
            "nvmlDeviceGetMemoryInfo"} <= calls.keys()
    assert all(c["mean_us"] >= 0 and c["max_us"] >= c["mean_us"] for c in calls.values())
    assert d["tick_latency_us"]["max"] >= d["tick_latency_us"]["mean"] > 0
    json.dumps(d)  # --json can print it


def test_probe_checks_process_environments(machine):
    fake, clock = machine
    d = probe(fake, proc_root=str(PROC), clock=clock)
    env = d["process_environ"]
    assert (env["pid"], env["readable"]) == (4242, True)
    assert "GPULEDGER_TEAM" in env["allowlist"]
    fake.gpus[0].processes = [fk.FakeProcess(31337)]  # a pid this /proc does not show
    env = probe(fake, proc_root=str(PROC), clock=clock)["process_environ"]
    assert env["readable"] is False and env["reason"] == "no such process"


def test_probe_text(machine):
    fake, clock = machine
    text = render(probe(fake, proc_root=str(PROC), clock=clock))
    assert "driver 550.54.15, NVML 12.550.54.15, CUDA 12.4; 3 GPUs" in text
    assert "sample buffer, period 166.7 ms (observed)" in text
    assert "MIG instance of GPU 1  NVIDIA A100-SXM4-40GB MIG 3g.20gb" in text
    assert "utilization rates (no sample buffer)" in text
    assert "nvmlDeviceGetSamples" in text and "whole tick (all GPUs)" in text


def test_probe_without_driver_says_what_to_install():
    d = probe(fk.library_missing())
    assert d == {"ok": False, "error": d["error"]}
    assert "install the NVIDIA driver" in d["error"]
    assert render(d).startswith("gpuledger probe: NVML is not usable here.")


def _nvml_works() -> bool:
    from gpuledger.agent.nvml import NvmlSource, NvmlUnavailable

    try:
        NvmlSource(proc_root=str(PROC)).close()
        return True
    except NvmlUnavailable:
        return False


def test_probe_command_exits_non_zero_without_a_driver():
    if _nvml_works():
        pytest.skip("this machine has a working NVIDIA driver; the no-driver path is covered with the fake")
    app = typer.Typer()
    app.command()(probe_cmd)

    @app.command()
    def _unused() -> None:
        pass

    res = CliRunner().invoke(app, ["probe", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["ok"] is False
    res = CliRunner().invoke(app, ["probe"])
    assert res.exit_code == 1 and "NVML is not usable here" in res.output
