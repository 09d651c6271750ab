"""Files that name hosts, processes, tags and tokens are private to their owner (0700 / 0600),
whatever the umask: the agent's spool (and a replay's temporary spool) and token files."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from gpuledger.agent.replay import replay
from gpuledger.agent.spool import Spool
from gpuledger.config import AgentConfig
from gpuledger.security import add_agent_token, add_query_token, write_private

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"


@pytest.fixture
def open_umask():
    old = os.umask(0o002)  # a umask that would leave files group-writable and world-readable
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_spool_directory_and_files_are_private(tmp_path, open_umask):
    d = tmp_path / "spool"
    s = Spool(d, fsync=False, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(4):
        s.append(bytes([i]) * 3000, n_windows=1)
    s.dead_letter(2, "test: refused")
    s.ack(3)
    s.close()
    modes = _modes(d)
    assert modes.pop(".") == 0o700
    assert any(name.endswith(".seg") for name in modes) and "state.json" in modes and "deadletter.log" in modes
    assert modes == dict.fromkeys(modes, 0o600)


def test_replays_temporary_spool_is_private(tmp_path, open_umask, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes the replay's spool
    cfg = AgentConfig(host_id="lab-1", collector="127.0.0.1:1", send_timeout_s=0.5, backoff_max_s=0.2)
    summary = replay(FIXTURES / "t4-nounits-1s.csv", cfg, drain_timeout_s=0.5)
    assert not summary.complete  # nobody acknowledged: the spool stays for a rerun
    sdir = Path(summary.spool_dir)
    assert sdir.parent == tmp_path
    modes = _modes(sdir)
    assert modes.pop(".") == 0o700
    assert modes and modes == dict.fromkeys(modes, 0o600)
    shutil.rmtree(sdir)


def test_token_files_are_created_600_and_narrowed_to_600(tmp_path, open_umask):
    tokens = tmp_path / "agent-tokens"
    add_agent_token(str(tokens), "h1")
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    q = tmp_path / "query.token"
    q.write_text("")
    q.chmod(0o664)
    add_query_token(str(q))
    assert stat.S_IMODE(q.stat().st_mode) == 0o600
    out = tmp_path / "printed.token"
    write_private(out, "secret\n")
    write_private(out, "other\n")  # replaced, not appended
    assert out.read_text() == "other\n" and stat.S_IMODE(out.stat().st_mode) == 0o600
