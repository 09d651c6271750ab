"""Coverage: when each GPU was expected to be watched. Expected time not covered by a window is unmonitored.

Every agent run (and every replay) is a session: it starts at its `session_start_ms` (or, from an
agent older than that field, at its first window) and ends
- where it stopped on purpose (SIGTERM, shutdown, the end of a replayed log): the host is not
  expected after that until it reports again;
- if it never said so (killed, crashed, host lost): its silence counts as unmonitored, on the
  host's own timeline, until the host's next session starts, an operator retires the host, or the
  silence lasts `horizon` - whichever comes first. Silence is measured on the collector's clock
  since the session's last batch arrived, and laid after the session's last window;
- while the host is live (a batch arrived less than `grace` ago): at its last window. Data not yet
  due is not missing.

A GPU is expected over its host's session from its own first window in that session (a GPU added
later starts later), to the session's end if it reported as late as its host did, else to its own
last window (a GPU removed or a MIG layout reshaped). A GPU's declared first window (the earliest
its agent ever closed, bounded at ingest) extends its earliest session back: windows lost before
the first stored one are unmonitored.

Nothing here depends on another host's windows or clock. A range is taken in whole windows of each
GPU (the windows that start in it), and ends at the collector's now at the latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpuledger.collector.store import Store

NEVER = np.iinfo(np.int64).max
DEFAULT_WINDOW_MS = 10_000


@dataclass(frozen=True)
class CoverageRules:
    grace_ms: int = 90_000
    horizon_ms: int = 3_600_000


@dataclass
class HostStatus:
    host_id: str
    state: str  # live | stopped | silent | retired
    since_ms: int  # stopped / silent / retired since; live: its last window's end
    last_window_end_ms: int = 0


@dataclass
class GpuExpectation:
    host_id: str
    gpu_uuid: str
    window_ms: int
    intervals: list[tuple[int, int]] = field(default_factory=list)  # disjoint, sorted, in ms

    def per_period(self, edges: np.ndarray) -> np.ndarray:
        """Expected ms in each period [edges[i], edges[i+1]) (edges snapped up to this GPU's window grid)."""
        e = _ceil(np.asarray(edges, np.int64), self.window_ms)
        if not self.intervals:
            return np.zeros(max(e.size - 1, 0), np.int64)
        iv = np.asarray(self.intervals, np.int64)
        a, b = iv[:, 0][:, None], iv[:, 1][:, None]
        covered_to = np.clip(e[None, :], a, b) - a  # ms of each interval before each edge
        cum = covered_to.sum(axis=0)
        return np.diff(cum)


def expected_matrix(expected: dict[tuple[str, str], GpuExpectation], edges) -> tuple[list[tuple[str, str]],
                                                                                     np.ndarray]:
    """Expected ms of every GPU in every period [edges[i], edges[i+1]), in one pass over all intervals:
    (the GPUs, in order; a matrix of GPUs x periods). What GpuExpectation.per_period gives one GPU at a time."""
    keys = list(expected)
    n_periods = max(len(edges) - 1, 0)
    out = np.zeros((len(keys), n_periods), np.int64)
    by_window: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        if expected[k].intervals:
            by_window.setdefault(expected[k].window_ms, []).append(i)
    base = np.asarray(edges, np.int64)
    for w, rows in by_window.items():  # edges snap up to each window grid: one group per window length
        e = _ceil(base, w)
        owner = np.concatenate([np.full(len(expected[keys[i]].intervals), i, np.int64) for i in rows])
        iv = np.concatenate([np.asarray(expected[keys[i]].intervals, np.int64) for i in rows])
        a, b = iv[:, 0][:, None], iv[:, 1][:, None]
        per_interval = np.diff(np.clip(e[None, :], a, b) - a, axis=1)  # intervals x periods
        np.add.at(out, owner, per_interval)
    return keys, out


@dataclass
class _Session:
    host_id: str
    start_ms: int
    stopped_ms: int
    received_ms: int
    gpus: dict = field(default_factory=dict)  # uuid -> (window_ms, first, last_end, declared)

    @property
    def last_end_ms(self) -> int:
        return max((g[2] for g in self.gpus.values()), default=0)

    @property
    def first_window_ms(self) -> int:
        return min((g[1] for g in self.gpus.values()), default=0)


def _ceil(t, w):
    return -(-t // w) * w


def _load(store: Store, since: int, until: int, rules: CoverageRules, host_filter: str):
    db = store.db
    where = "WHERE host_id = {host:String}" if host_filter else ""
    rows = store.report_rows(
        f"""WITH s AS (
                SELECT host_id, agent_epoch, session_start_ms, gpu_uuid, max(window_ms) AS w,
                       min(first_window_ms) AS first, max(last_end_ms) AS last, min(declared_first_ms) AS declared,
                       max(stopped_ms) AS stopped, max(received_ms) AS received
                FROM {db}.sessions {where}
                GROUP BY host_id, agent_epoch, session_start_ms, gpu_uuid),
            k AS (
                SELECT host_id, agent_epoch, session_start_ms,
                       if(session_start_ms > 0, session_start_ms, min(first)) AS begin,
                       greatest(max(last), max(stopped)) AS finish
                FROM s GROUP BY host_id, agent_epoch, session_start_ms
                HAVING begin < {{until:Int64}}
                   AND (finish + {{horizon:Int64}} >= {{since:Int64}} OR begin >= {{since:Int64}} - {{horizon:Int64}}))
            SELECT s.host_id, s.agent_epoch, s.session_start_ms, s.gpu_uuid, s.w, s.first, s.last, s.declared,
                   s.stopped, s.received
            FROM s INNER JOIN k USING (host_id, agent_epoch, session_start_ms)""",
        {"since": since, "until": until, "horizon": rules.horizon_ms, "host": host_filter})
    sessions: dict[tuple, _Session] = {}
    for host, epoch, start, gpu, w, first, last, declared, stopped, received in rows:
        key = (host, int(epoch), int(start))
        s = sessions.get(key)
        if s is None:
            s = sessions[key] = _Session(host, int(start), 0, 0)
        s.stopped_ms = max(s.stopped_ms, int(stopped))
        s.received_ms = max(s.received_ms, int(received))
        if gpu:
            s.gpus[gpu] = (int(w) or DEFAULT_WINDOW_MS, int(first), int(last), int(declared))
    for s in sessions.values():
        if s.start_ms == 0:  # an agent older than session_start_ms: the run starts at its first window
            s.start_ms = min((g[1] for g in s.gpus.values()), default=0)
    retires: dict[str, list[int]] = {}
    for host, at in store.report_rows(
            f"SELECT host_id, at_ms FROM {db}.host_events FINAL WHERE kind = 'retire' "
            + ("AND host_id = {host:String} " if host_filter else "") + "ORDER BY at_ms", {"host": host_filter}):
        retires.setdefault(host, []).append(int(at))
    return [s for s in sessions.values() if s.start_ms > 0 or s.gpus], retires


def expectations(store: Store, since: int, until: int, now_ms: int, rules: CoverageRules,
                 host_filter: str = "") -> tuple[dict[tuple[str, str], GpuExpectation], dict[str, HostStatus]]:
    """Per (host, GPU): the expected intervals inside [since, min(until, now)); per host: its state now."""
    until = min(until, now_ms)
    sessions, retires = _load(store, since, until, rules, host_filter)
    by_host: dict[str, list[_Session]] = {}
    for s in sessions:
        by_host.setdefault(s.host_id, []).append(s)
    out: dict[tuple[str, str], GpuExpectation] = {}
    status: dict[str, HostStatus] = {}
    for host, ss in by_host.items():
        ss.sort(key=lambda s: (s.start_ms, s.received_ms))
        for i, s in enumerate(ss):
            nxt = next((o.start_ms for o in ss[i + 1:] if o.start_ms > s.start_ms), None)
            end, state, since_ms = _session_end(s, nxt, retires.get(host, ()), now_ms, rules)
            status[host] = HostStatus(host, state, since_ms, s.last_end_ms)  # the latest session's, in the end
            host_last = s.last_end_ms
            host_first = s.first_window_ms
            for uuid, (w, first, last, _declared) in s.gpus.items():
                # a GPU there from the run's first window is expected from the run's start; one that
                # appeared later (added, a MIG layout reshaped) from its own first window; likewise at the end
                g_start = s.start_ms if first <= host_first else max(s.start_ms, first)
                g_end = end if last >= host_last else last
                e = out.setdefault((host, uuid), GpuExpectation(host, uuid, w))
                e.window_ms = max(e.window_ms, w)
                if g_end > g_start:
                    e.intervals.append((g_start, g_end))
        # a declared first window reaches back before the GPU's earliest session
        earliest: dict[str, list[int]] = {}  # uuid -> [earliest start, earliest declared]
        for s in ss:
            for uuid, (_w, first, _last, declared) in s.gpus.items():
                g = earliest.setdefault(uuid, [NEVER, NEVER])
                start = s.start_ms if first <= s.first_window_ms else max(s.start_ms, first)
                g[0], g[1] = min(g[0], start), min(g[1], declared)
        for uuid, (g_start, declared) in earliest.items():
            if declared < g_start:
                out[(host, uuid)].intervals.append((declared, g_start))
    for e in out.values():
        lo, hi = _ceil(since, e.window_ms), _ceil(until, e.window_ms)
        e.intervals = _union([(max(a, lo), min(b, hi)) for a, b in e.intervals if min(b, hi) > max(a, lo)])
    return out, status


def _session_end(s: _Session, next_start: int | None, retire_times, now_ms: int,
                 rules: CoverageRules) -> tuple[int, str, int]:
    """(end of expected time, the state it leaves the host in, since when)."""
    last = s.last_end_ms
    floor = max(last, s.start_ms)
    if s.stopped_ms:
        return max(s.stopped_ms, s.start_ms), "stopped", s.stopped_ms
    silence = now_ms - s.received_ms
    if next_start is not None:
        end = min(next_start, floor + rules.horizon_ms)
        state, since = "silent", floor
    elif silence <= rules.grace_ms:
        end, state, since = floor, "live", floor
    else:
        end = floor + min(silence, rules.horizon_ms)
        state, since = "silent", floor
    retire = next((t for t in retire_times if t >= s.start_ms), None)
    if retire is not None and retire < end:
        end = max(floor, retire)  # retiring ends the silence, never what was measured
        if retire >= floor:
            state, since = "retired", retire
    return max(end, floor), state, since


def _union(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
