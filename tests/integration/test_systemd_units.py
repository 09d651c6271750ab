"""The systemd units: tight (systemd-analyze security), valid (systemd-analyze verify), and they start.

systemd itself cannot run here, so "they start" is checked as far as that allows: each unit's
ExecStart= line runs by hand as an unprivileged user (nobody, when the test runs as root) with the
unit's Environment= and its LoadCredential= files copied into a credentials directory that only
that user can read, exactly what systemd hands the service; the collector with the shipped
collector.toml, the agent with the shipped agent.toml over the fake NVML. Paths under /etc and
/var/lib are moved into a temporary tree, and the ports made free; nothing else is changed.
What this does not cover: the sandbox itself (namespaces, seccomp, device cgroup), which only a
running systemd applies.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.certs import make_pki

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
NOBODY = 65534


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys such as Environment= repeat)."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == "Service" and k == key]


@pytest.mark.parametrize("unit", ["gpuledger-agent.service", "gpuledger-collector.service"])
def test_units_run_unprivileged_with_private_state(unit):
    path = UNITS / unit
    assert values(path, "DynamicUser") == ["yes"]
    assert "User" not in {k for _, k, _ in unit_entries(path)}
    assert values(path, "StateDirectoryMode") == ["0700"] and values(path, "UMask") == ["0077"]
    assert values(path, "NoNewPrivileges") == ["yes"]


def test_agent_keeps_only_the_two_capabilities_it_needs():
    path = UNITS / "gpuledger-agent.service"
    caps = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert set(" ".join(values(path, "CapabilityBoundingSet")).split()) == caps
    assert set(" ".join(values(path, "AmbientCapabilities")).split()) == caps
    assert values(UNITS / "gpuledger-collector.service", "CapabilityBoundingSet") == [""]


@pytest.mark.parametrize("unit, prefix", [("gpuledger-agent.service", "GPULEDGER_AGENT_"),
                                          ("gpuledger-collector.service", "GPULEDGER_COLLECTOR_")])
def test_every_credential_is_passed_to_the_daemon(unit, prefix):
    path = UNITS / unit
    names = [v.split(":", 1)[0] for v in values(path, "LoadCredential")]
    env = dict(v.split("=", 1) for v in values(path, "Environment"))
    pointed = {v[len("%d/"):] for k, v in env.items() if k.startswith(prefix) and v.startswith("%d/")}
    assert names and set(names) == pointed


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return exe


@pytest.mark.parametrize("unit", ["gpuledger-agent.service", "gpuledger-collector.service"])
def test_units_score_5_or_better_in_systemd_analyze_security(unit):
    exe = _analyze()
    res = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(UNITS / unit)], capture_output=True,
                         text=True, timeout=60)
    if res.returncode != 0 and "offline" in res.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {res.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 5.0, res.stdout


def test_units_pass_systemd_analyze_verify(tmp_path):
    exe = _analyze()
    system = Path("/usr/lib/systemd/system")
    if not (system / "sysinit.target").exists():
        pytest.skip("no systemd unit directory to verify against (/usr/lib/systemd/system)")
    # a root tree holding the system's units, ours, and the binary ExecStart names
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in ("gpuledger-agent.service", "gpuledger-collector.service"):
        shutil.copy(UNITS / unit, root / "etc/systemd/system" / unit)
    exe_path = root / "opt/gpuledger/bin/gpuledger"
    exe_path.parent.mkdir(parents=True)
    exe_path.write_text("#!/bin/sh\n")
    exe_path.chmod(0o755)
    res = subprocess.run([exe, "verify", f"--root={root}", "gpuledger-agent.service", "gpuledger-collector.service"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


# ----------------------------------------------------------------------------- the ExecStart lines, by hand


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(readable: Path) -> tuple[int, int, str]:
    """(uid, gid, note): nobody when we are root and nobody can run this Python, import gpuledger and
    read `readable`; else ourselves."""
    if os.geteuid() == 0:
        try:
            probe = subprocess.run([sys.executable, "-c", f"import gpuledger.cli; open({str(readable)!r}).read()"],
                                   cwd=ROOT, capture_output=True, user=NOBODY, group=NOBODY, extra_groups=[],
                                   env={"PYTHONPATH": str(ROOT)}, timeout=60)
            if probe.returncode == 0:
                return NOBODY, NOBODY, "nobody"
        except OSError:  # this Python lives where nobody may not go (a pyenv under /root)
            pass
    return os.geteuid(), os.getegid(), "the test's own user"


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid)


class Unit:
    """One unit's ExecStart= run the way systemd would: its user, environment and credentials."""

    def __init__(self, name: str, etc: Path, tree: Path, uid: int, gid: int) -> None:
        self.path = UNITS / name
        self.etc, self.uid, self.gid = etc, uid, gid
        self.creds = tree / "credentials" / name
        self.creds.mkdir(parents=True)
        for spec in values(self.path, "LoadCredential"):
            cred, src = spec.split(":", 1)
            shutil.copy(self.moved(src), self.creds / cred)
            (self.creds / cred).chmod(0o400)
        self.creds.chmod(0o500)
        _chown_tree(self.creds, uid, gid)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tree)}
        for v in values(self.path, "Environment"):
            key, _, val = v.partition("=")
            self.env[key] = val.replace("%d", str(self.creds))
        self.env["CREDENTIALS_DIRECTORY"] = str(self.creds)

    def moved(self, path: str) -> str:
        return path.replace("/etc/gpuledger/", f"{self.etc}/")

    def argv(self) -> list[str]:
        (line,) = values(self.path, "ExecStart")
        exe, *args = line.split()
        assert exe == "/opt/gpuledger/bin/gpuledger"
        return [sys.executable, "-m", "gpuledger.cli", *(self.moved(a) for a in args)]

    def start(self, extra_env: dict) -> subprocess.Popen:
        kw = {} if self.uid == os.geteuid() else {"user": self.uid, "group": self.gid, "extra_groups": []}
        return subprocess.Popen(self.argv(), cwd=ROOT, env={**self.env, **extra_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, umask=int(values(self.path, "UMask")[0], 8),
                                **kw)


def _wait_for(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen (exit {proc.poll()}):\n{''.join(seen)}")


@pytest.fixture
def host_tree():
    """A directory every user may traverse (pytest's own temporary directories are private to us)."""
    d = Path(tempfile.mkdtemp(prefix="gpuledger-units-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_exec_start_lines_start_as_the_unit_user_with_their_credentials(tmp_path, host_tree):
    """The README's install steps, on one machine: credentials made by the CLI as root (mode 0600),
    handed over as credentials; the collector starts on the shipped config (non-loopback: TLS and
    tokens required), the agent on the shipped agent.toml, and its windows are acknowledged."""
    tree = host_tree / "host"
    etc = tree / "etc"
    (etc / "tls").mkdir(parents=True)
    tree.chmod(0o755)
    etc.chmod(0o755)
    (etc / "probe").write_text("")
    uid, gid, who = _as_user(etc / "probe")
    pki = make_pki(tmp_path)
    shutil.copy(pki["server"], etc / "tls/collector.pem")
    shutil.copy(pki["server_key"], etc / "tls/collector-key.pem")
    shutil.copy(pki["ca"], etc / "ca.pem")
    (etc / "tls/collector-key.pem").chmod(0o600)
    gl = [sys.executable, "-m", "gpuledger.cli"]
    subprocess.run([*gl, "collector", "add-agent", "gpu-node-01", "--tokens-file", str(etc / "agent-tokens"), "--out",
                    str(etc / "agent.token")], cwd=ROOT, check=True, capture_output=True, timeout=60)
    subprocess.run([*gl, "collector", "query-token", "--file", str(etc / "query.token"), "--out",
                    str(tmp_path / "query.token")], cwd=ROOT, check=True, capture_output=True, timeout=60)
    for f in ("agent-tokens", "query.token", "agent.token"):
        assert (etc / f).stat().st_mode & 0o077 == 0, f
    port = _free_port()
    state = {"gpuledger": tree / "var/lib/gpuledger", "gpuledger-agent": tree / "var/lib/gpuledger-agent"}
    for d in state.values():
        d.mkdir(parents=True, mode=0o700)
        os.chown(d, uid, gid)
    text = (UNITS / "collector.toml").read_text().replace("0.0.0.0:4700", f"0.0.0.0:{port}")
    (etc / "collector.toml").write_text(text.replace('"/var/lib/gpuledger"', f'"{state["gpuledger"]}"'))
    text = (UNITS / "agent.toml").read_text().replace("collector.internal:4700", f"localhost:{port}")
    text = text.replace("/var/lib/gpuledger-agent/", f"{state['gpuledger-agent']}/")
    (etc / "agent.toml").write_text(text.replace("/etc/gpuledger/", f"{etc}/"))
    # the fake NVML stands in for the driver: a module named pynvml on the agent's path
    shim = tree / "shim"
    shim.mkdir()
    (shim / "pynvml.py").write_text(
        "import sys\nfrom gpuledger.clock import WallClock\nfrom tests.unit.fake_pynvml import FakeNvml, h100\n"
        "sys.modules[__name__] = FakeNvml([h100()], clock=WallClock())\n")
    for p in (tree, etc, etc / "tls", shim):
        p.chmod(0o755)
    for p in (etc / "collector.toml", etc / "agent.toml", etc / "ca.pem", shim / "pynvml.py"):
        p.chmod(0o644)

    collector = Unit("gpuledger-collector.service", etc, tree, uid, gid)
    agent = Unit("gpuledger-agent.service", etc, tree, uid, gid)
    procs = []
    try:
        c = collector.start({"PYTHONPATH": str(ROOT)})
        procs.append(c)
        out = _wait_for(c, "collector listening on", 120)
        assert "1 agent tokens, 1 query tokens, 0 admin tokens; TLS" in out, out
        fast = {"GPULEDGER_AGENT_WINDOW_S": "1", "GPULEDGER_AGENT_TICK_S": "0.2", "GPULEDGER_AGENT_FLUSH_S": "1",
                "GPULEDGER_AGENT_LATENESS_S": "0.2"}
        a = agent.start({"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}", **fast})
        procs.append(a)
        _wait_for(a, "agent gpu-node-01: 1 GPUs", 120)
        deadline = time.monotonic() + 60
        rows = ""
        while time.monotonic() < deadline:
            res = subprocess.run([*gl, "idle", "--collector", f"localhost:{port}", "--since", "1h", "--format", "csv",
                                  "--token-file", str(tmp_path / "query.token"), "--ca-file", pki["ca"]], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            rows = res.stdout
            if "gpu-node-01" in rows:
                break
            time.sleep(1)
        assert "gpu-node-01" in rows, f"no windows from the agent (ran as {who}):\n{rows}"
        spool = state["gpuledger-agent"] / "spool"
        assert spool.stat().st_uid == uid and spool.stat().st_mode & 0o777 == 0o700
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
