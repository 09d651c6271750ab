"""Attribution from a fixture /proc tree: identity, containers, pods, allowlisted tags, secrets kept out."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from gpuledger.agent.attribution import ProcAttributor, environ_tags, parse_cgroup, tag_name
from gpuledger.agent.nvml import NvmlSource
from gpuledger.agent.runtime import Agent
from gpuledger.agent.spool import Spool
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig
from gpuledger.schema import from_ipc
from gpuledger.v1 import telemetry_pb2 as pb

try:
    from tests.unit import fake_pynvml as fk
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import fake_pynvml as fk

PROC = Path(__file__).resolve().parents[1] / "fixtures" / "proc"
BTIME_MS = 1709542800 * 1000
SECRET = "do-not-ship-7f3c91e2"
T0 = 1_709_546_400_000_000  # 2024-03-04 10:00:00 UTC, a window boundary


def attributor(root=PROC, **kw) -> ProcAttributor:
    return ProcAttributor(root, ("CUSTOM_COST_CENTER",), clock_ticks=100, **kw)


def test_identity_is_pid_plus_start_time_from_stat_and_btime():
    ident = attributor().identity(4242)
    assert ident.pid == 4242
    assert ident.start_ms == BTIME_MS + 123456 * 10  # 123456 ticks at 100 Hz
    assert ident.command == "python"


def test_command_with_spaces_and_parentheses_does_not_shift_stat_fields():
    ident = attributor().identity(8181)
    assert ident.command == "my (odd) app"
    assert ident.start_ms == BTIME_MS + 556677 * 10


@pytest.mark.parametrize("pid, container, pod", [
    (4242, "4f1c2a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a10", ""),  # docker, cgroupfs, v1
    (5151, "9e2b1f0c3d4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c",
     "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"),  # k8s containerd systemd v2, burstable
    (6161, "c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc",
     "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"),  # k8s cri-o systemd v1, besteffort
    (7171, "77d2cf0b1a8e4b6c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e", ""),  # docker systemd v2
    (8181, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
     "2c3d4e5f-6071-8293-a4b5-c6d7e8f90a1b"),  # k8s cgroupfs v1, guaranteed
    (9191, "", ""),  # a user session: no container
])
def test_container_and_pod_from_cgroup(pid, container, pod):
    ident = attributor().identity(pid)
    assert (ident.container_id, ident.pod_uid) == (container, pod)


def test_cgroup_forms_beyond_the_fixture_tree():
    cid = "ab" * 32
    assert parse_cgroup(f"0::/machine.slice/libpod-{cid}.scope\n") == (cid, "")
    # the conmon monitor scope is not the container
    assert parse_cgroup(f"0::/system.slice/crio-conmon-{cid}.scope\n") == ("", "")
    assert parse_cgroup(f"0::/kubepods.slice/kubepods-pod11112222_3333_4444_5555_666677778888.slice/"
                        f"cri-containerd-{cid}.scope") == (cid, "11112222-3333-4444-5555-666677778888")
    assert parse_cgroup("") == ("", "")


def test_only_allowlisted_environment_keys_become_tags():
    a = attributor()
    assert dict(a.identity(4242).tags) == {"team": "search", "project": "ranker", "phase": "training",
                                          "mlflow_run_id": "8f2c1d", "custom_cost_center": "cc-42"}
    assert dict(a.identity(5151).tags) == {"team": "vision", "workload": "train", "wandb_project": "detector",
                                          "wandb_run_id": "abc123"}
    assert dict(a.identity(8181).tags) == {"slurm_job_account": "physics", "slurm_job_id": "4711"}
    assert a.identity(9191).tags == ()


def test_tag_values_are_cleaned_of_control_characters_and_bad_bytes():
    tags = dict(attributor().identity(6161).tags)
    assert tags == {"endpoint": "chat-api", "phase": "production", "team": "platform\ufffd", "slurm_job_id": "991"}


def test_tag_names():
    assert tag_name("GPULEDGER_TEAM") == "team"
    assert tag_name("GPULEDGER_ENDPOINT") == "endpoint"
    assert tag_name("MLFLOW_RUN_ID") == "mlflow_run_id"
    assert tag_name("SLURM_JOB_ID") == "slurm_job_id"


def test_environ_scan_never_copies_values_of_other_keys():
    data = b"A=1\0SECRET=" + SECRET.encode() + b"\0GPULEDGER_TEAM=x\0=weird\0NOEQUALS\0"
    assert environ_tags(data, {b"GPULEDGER_TEAM": "team"}) == (("team", "x"),)


def test_unreadable_environ_gives_a_process_without_tags(caplog):
    caplog.set_level(logging.DEBUG)
    a = attributor()
    ident = a.identity(7171)  # environ is a directory here: reading it fails
    assert ident.tags == () and ident.command == "jupyter-kernel"
    assert a.environ_unreadable == 1


def test_permission_denied_on_environ_is_not_a_crash():
    def read_bytes(path: Path) -> bytes:
        if path.name == "environ":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_bytes()

    a = attributor(read_bytes=read_bytes)
    ident = a.identity(4242)
    assert ident.tags == ()
    assert ident.container_id.startswith("4f1c2a9e")  # the rest is still read
    assert a.environ_unreadable == 1


def test_process_not_in_proc_is_none():
    a = attributor()
    assert a.identity(31337) is None
    assert a.not_visible == 1


def test_pid_reuse_gives_another_identity_and_the_cache_keeps_both(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    a = attributor(root)
    first = a.identity(4242)
    # the process exits; the kernel hands pid 4242 to a new process
    stat = (root / "4242" / "stat").read_text().replace(" 123456 ", " 999999 ")
    (root / "4242" / "stat").write_text(stat)
    (root / "4242" / "environ").write_bytes(b"GPULEDGER_TEAM=other\0")
    second = a.identity(4242)
    assert second.pid == first.pid and second.start_ms != first.start_ms
    assert dict(second.tags) == {"team": "other"}
    assert a.identity(4242) is second  # cached per (pid, start time): environ is not read again
    assert a.cache_size() == 2


def _run_agent(tmp_path, fake, source, clock, seconds, step_s=1.0, on_tick=None):
    spool = Spool(tmp_path / "spool", fsync=False)
    cfg = AgentConfig(host_id="gpu-host-1", provider="aws", region="us-east-1", instance_type="p5.48xlarge",
                      spool_dir=str(tmp_path / "spool")).validate()
    agent = Agent(cfg, source, clock, spool, start_us=clock.now_us())
    for i in range(int(seconds / step_s)):
        clock.advance(step_s)
        fake.advance_to(clock.now_us())
        if on_tick:
            on_tick(i + 1)
        agent.step()
    agent.close()
    # the batches with windows (the last one is the run's stop, which has none)
    payloads = [spool.read(r) for r in spool.pending() if r.n_windows]
    spool.close()
    return payloads


def test_pid_reuse_does_not_merge_processes_in_windows(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    gpu = fk.h100(0)
    clock = SimClock(T0)
    fake = fk.FakeNvml([gpu])
    fake.advance_to(T0)
    gpu.load = 60
    gpu.processes = [fk.FakeProcess(4242)]
    source = NvmlSource(fake, attribution=attributor(root))

    def reuse(tick: int) -> None:
        if tick == 15:  # the first process is gone, a new one got the same pid
            (root / "4242" / "stat").write_text((root / "4242" / "stat").read_text().replace(" 123456 ", " 777777 "))
            (root / "4242" / "environ").write_bytes(b"GPULEDGER_TEAM=other\0")

    payloads = _run_agent(tmp_path, fake, source, clock, 30, on_tick=reuse)
    tags: dict = {}
    held: dict = {}
    for raw in payloads:
        b = pb.WindowBatch.FromString(raw)
        tags.update({(p.pid, p.start_ms): dict(p.tags) for p in b.processes})
        t = from_ipc(b.proc_windows_arrow)
        for pid, start, ms in zip(t.column("pid").to_pylist(), t.column("proc_start_ms").to_pylist(),
                                  t.column("held_ms").to_pylist(), strict=True):
            held[(pid, start)] = held.get((pid, start), 0) + ms
    first, second = (4242, BTIME_MS + 1_234_560), (4242, BTIME_MS + 7_777_770)
    assert set(tags) == {first, second}
    assert tags[first]["team"] == "search" and tags[second] == {"team": "other"}
    # polls every second from T0+1 (which primes): the first process is seen through T0+14, the second from T0+15;
    # the change is placed halfway between those polls
    assert held == {first: 13_500, second: 15_500}


def test_secret_environment_values_never_reach_windows_logs_or_batches(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    gpus = [fk.h100(0), fk.h100(1)]
    clock = SimClock(T0)
    fake = fk.FakeNvml(gpus)
    fake.advance_to(T0)
    gpus[0].load, gpus[0].processes = 80, [fk.FakeProcess(4242)]  # its environ holds secrets
    gpus[1].load, gpus[1].processes = 10, [fk.FakeProcess(5151), fk.FakeProcess(9191)]
    att = attributor()
    source = NvmlSource(fake, attribution=att)
    readings = []
    orig_poll = source.poll

    def poll(now_us):
        r = orig_poll(now_us)
        readings.append(r)
        return r

    source.poll = poll
    payloads = _run_agent(tmp_path, fake, source, clock, 40)
    assert payloads, "the agent spooled no batch"
    blob = b"".join(payloads) + b"".join(p.read_bytes() for p in (tmp_path / "spool").iterdir() if p.is_file())
    assert SECRET.encode() not in blob
    assert b"AWS_SECRET_ACCESS_KEY" not in blob and b"DATABASE_URL" not in blob
    assert b"search" in blob and b"ranker" in blob  # the allowlisted tags did ship
    for r in readings:
        assert all(SECRET not in repr(p) for p in r.processes)
    for rec in caplog.records:
        assert SECRET not in rec.getMessage()
    assert SECRET not in repr(att.__dict__)
    decoded = [pb.WindowBatch.FromString(p) for p in payloads]
    assert all(SECRET not in str(b) for b in decoded)
