"""Who holds a GPU: process identity, container, pod and tags, read from /proc.

For each pid NVML reports on a GPU:
- identity: the pid plus its start time (/proc/<pid>/stat field 22, clock ticks after boot,
  plus `btime` from /proc/stat), so a reused pid is another process;
- command: /proc/<pid>/comm (never the command line: arguments carry tokens);
- container id and Kubernetes pod UID: from /proc/<pid>/cgroup, cgroup v1 and v2, cgroupfs and
  systemd drivers (docker, containerd, cri-o, podman);
- tags: from /proc/<pid>/environ, ONLY the allowlisted keys. The file is scanned as bytes; an
  entry whose key is not allowlisted is skipped where it lies, never copied into a structure,
  never logged. An unreadable environment (another user's process, no CAP_SYS_PTRACE) gives a
  process without tags, never an error.

The /proc root is a parameter (a host's /proc mounted at /host/proc in a container, or a fixture
tree in tests). Identities are cached per (pid, start time); only the small stat file is read
again on later polls.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from gpuledger.agent.source import ProcessIdentity
from gpuledger.config import DEFAULT_ENV_ALLOWLIST

log = logging.getLogger(__name__)

MAX_TAG_VALUE = 256  # the collector's limit for a tag value
MAX_COMMAND = 256

_CID = r"[0-9a-f]{64}"
# <runtime>-<id>.scope under the systemd cgroup driver; crio-conmon-<id>.scope is the monitor, not the container
_SCOPE = re.compile(rf"^(?:docker|cri-containerd|crio|libpod|containerd)-({_CID})\.scope$")
_BARE = re.compile(rf"^({_CID})$")  # cgroupfs driver: /docker/<id>, /kubepods/burstable/pod<uid>/<id>
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# kubepods-burstable-pod<uid with _>.slice (systemd) or pod<uid> (cgroupfs)
_POD = re.compile(rf"(?:^|-)pod({_UID})(?:\.slice)?$")


def tag_name(env_key: str) -> str:
    """GPULEDGER_TEAM -> team, GPULEDGER_COST_CENTER -> cost_center, MLFLOW_RUN_ID -> mlflow_run_id."""
    key = env_key[len("GPULEDGER_"):] if env_key.startswith("GPULEDGER_") else env_key
    return key.lower()


def parse_cgroup(text: str) -> tuple[str, str]:
    """(container id, pod UID) from the text of /proc/<pid>/cgroup; empty strings where absent.

    Lines are `hierarchy:controllers:path` (v1, many lines) or `0::path` (v2). The v2 line is
    read first; the innermost matching path component wins.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    lines.sort(key=lambda ln: not ln.startswith("0::"))
    container = pod = ""
    for line in lines:
        path = line.split(":", 2)[-1]
        c = p = ""
        for part in path.split("/"):
            m = _SCOPE.match(part) or _BARE.match(part)
            if m:
                c = m.group(1)
            m = _POD.search(part)
            if m:
                p = m.group(1).replace("_", "-")
        container = container or c
        pod = pod or p
        if container and pod:
            break
    return container, pod


def environ_tags(data: bytes, allow: dict[bytes, str]) -> tuple[tuple[str, str], ...]:
    """Allowlisted entries of an environ blob (NUL-separated KEY=VALUE), as sorted (tag, value).

    Walks the bytes in place: an entry whose key is not in `allow` is skipped without copying
    its value anywhere.
    """
    out: dict[str, str] = {}
    n = len(data)
    pos = 0
    while pos < n:
        end = data.find(b"\0", pos)
        if end < 0:
            end = n
        eq = data.find(b"=", pos, end)
        if eq > pos:
            name = allow.get(data[pos:eq])
            if name is not None:
                value = data[eq + 1:end].decode("utf-8", "replace")
                value = "".join(ch for ch in value if ch >= " " and ch != "\x7f")[:MAX_TAG_VALUE]
                if value:
                    out[name] = value
        pos = end + 1
    return tuple(sorted(out.items()))


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class ProcAttributor:
    """Identity of GPU processes from a /proc tree; cached per (pid, start time)."""

    def __init__(self, proc_root: str | os.PathLike = "/proc", env_keys: Iterable[str] = (), *,
                 clock_ticks: int | None = None, read_bytes: Callable[[Path], bytes] | None = None,
                 max_cache: int = 4096) -> None:
        self.root = Path(proc_root)
        keys = tuple(dict.fromkeys((*DEFAULT_ENV_ALLOWLIST, *(k.strip() for k in env_keys if k.strip()))))
        self.env_keys = keys
        self._allow = {k.encode(): tag_name(k) for k in keys}
        self.clock_ticks = int(clock_ticks or _sysconf_clk_tck())
        self._read = read_bytes or _read_bytes
        self._btime_ms: int | None = None
        self._cache: OrderedDict[tuple[int, int], ProcessIdentity] = OrderedDict()
        self._max_cache = max_cache
        self.environ_unreadable = 0  # processes whose environment could not be read (no tags)
        self.not_visible = 0  # pids NVML reported that this /proc does not show

    # ------------------------------------------------------------------ pieces
    def btime_ms(self) -> int:
        if self._btime_ms is None:
            text = self._read(self.root / "stat").decode("ascii", "replace")
            for line in text.splitlines():
                if line.startswith("btime "):
                    self._btime_ms = int(line.split()[1]) * 1000
                    break
            else:
                raise ValueError(f"{self.root / 'stat'}: no btime line")
        return self._btime_ms

    def start_ticks(self, pid: int) -> int | None:
        """Field 22 of /proc/<pid>/stat (clock ticks after boot); None if the process is not visible."""
        try:
            text = self._read(self.root / str(pid) / "stat").decode("ascii", "replace")
        except OSError:
            return None
        # the command (field 2) is in parentheses and may itself contain spaces and ')'
        rest = text[text.rfind(")") + 1:].split()
        try:
            return int(rest[19])  # rest[0] is field 3
        except (IndexError, ValueError):
            return None

    def start_ms(self, ticks: int) -> int:
        return self.btime_ms() + ticks * 1000 // self.clock_ticks

    # ------------------------------------------------------------------ identity
    def identity(self, pid: int) -> ProcessIdentity | None:
        """The process's identity, or None when /proc does not show it (exited, other pid namespace)."""
        ticks = self.start_ticks(pid)
        if ticks is None:
            self.not_visible += 1
            return None
        key = (pid, ticks)
        ident = self._cache.get(key)
        if ident is not None:
            self._cache.move_to_end(key)
            return ident
        ident = self._build(pid, ticks)
        self._cache[key] = ident
        while len(self._cache) > self._max_cache:
            self._cache.popitem(last=False)
        return ident

    def _build(self, pid: int, ticks: int) -> ProcessIdentity:
        d = self.root / str(pid)
        command = ""
        try:
            command = self._read(d / "comm").decode("utf-8", "replace").strip()
            command = "".join(ch for ch in command if ch >= " ")[:MAX_COMMAND]
        except OSError:
            pass
        container = pod = ""
        try:
            container, pod = parse_cgroup(self._read(d / "cgroup").decode("utf-8", "replace"))
        except OSError:
            pass
        tags: tuple[tuple[str, str], ...] = ()
        try:
            data = self._read(d / "environ")
        except OSError as e:
            # another user's process without CAP_SYS_PTRACE, or gone: no tags, never a crash
            self.environ_unreadable += 1
            log.debug("pid %d: environment not readable (%s); no process tags", pid, type(e).__name__)
        else:
            tags = environ_tags(data, self._allow)
            del data
        try:
            start_ms = self.start_ms(ticks)
        except (OSError, ValueError) as e:
            log.warning("cannot read btime from %s (%s); process start times are relative to boot",
                        self.root / "stat", e)
            start_ms = ticks * 1000 // self.clock_ticks
        return ProcessIdentity(pid=pid, start_ms=start_ms, command=command, container_id=container, pod_uid=pod,
                               tags=tags)

    def environ_readable(self, pid: int) -> tuple[bool, str]:
        """Whether /proc/<pid>/environ can be opened. Opens it only (the kernel checks access at open)."""
        try:
            fd = os.open(self.root / str(pid) / "environ", os.O_RDONLY)
        except PermissionError:
            return False, "permission denied (run the agent as root or grant CAP_SYS_PTRACE)"
        except FileNotFoundError:
            return False, "no such process"
        except OSError as e:
            return False, e.strerror or type(e).__name__
        os.close(fd)
        return True, "readable"

    def cache_size(self) -> int:
        return len(self._cache)


def _sysconf_clk_tck() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100
