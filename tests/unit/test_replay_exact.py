"""Replay is exact for any logging interval and any replay step: closed windows carry, per state,
what a one-pass reference computes from the log's lines (rounded to whole ms per window)."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuledger.agent.replay import ReplaySource, parse_log
from gpuledger.agent.runtime import Agent
from gpuledger.agent.spool import Spool
from gpuledger.agent.windows import Windower
from gpuledger.clock import SimClock
from gpuledger.config import AgentConfig
from gpuledger.schema import from_ipc
from gpuledger.v1 import telemetry_pb2 as pb

BASE_MS = 1_793_577_600_000  # 2026-11-02 00:00:00 UTC
THRESHOLD_MIB = 1024
STATES = ("busy_ms", "idle_held_ms", "idle_free_ms", "unmonitored_ms")

# one GPU's log: (timestamp ms, utilization % or None for [N/A], memory.used MiB or None)
Line = tuple[int, float | None, float | None]


def write_log(path: Path, gpus: list[list[Line]]) -> Path:
    rows = sorted((ts, g, pct, mem) for g, lines in enumerate(gpus) for ts, pct, mem in lines)
    out = ["timestamp, index, utilization.gpu [%], memory.used [MiB]"]
    for ts, g, pct, mem in rows:
        t = datetime.fromtimestamp(ts // 1000, UTC)
        out.append(f"{t:%Y/%m/%d %H:%M:%S}.{ts % 1000:03d}, {g}, {'[N/A]' if pct is None else f'{pct:g} %'}, "
                   f"{'[N/A]' if mem is None else f'{mem:g} MiB'}")
    path.write_text("\n".join(out) + "\n")
    return path


def reference(gpus: list[list[Line]], window_ms: int) -> dict[tuple[int, int], list[float]]:
    """One pass over each GPU's lines, straight from the rules: per (GPU, window start ms) the ms
    in each state, every GPU from the window of the log's first line to that of its last line."""
    out: dict[tuple[int, int], list[float]] = {}
    first = min(lines[0][0] for lines in gpus) // window_ms * window_ms
    last = -(-max(lines[-1][0] for lines in gpus) // window_ms) * window_ms
    for g, lines in enumerate(gpus):
        ts = [t for t, _, _ in lines]
        for w in range(first, max(last, first + window_ms), window_ms):
            out[(g, w)] = [0.0, 0.0, 0.0, float(window_ms)]
        spacing = statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False)) if len(ts) > 1 else 0
        for (t0, _, _), (t1, pct, mem) in zip(lines, lines[1:], strict=False):
            if t1 - t0 > 3 * spacing or pct is None:
                continue  # unmonitored
            held = pct > 0 or (mem is not None and mem >= THRESHOLD_MIB)
            for w in range(t0 // window_ms * window_ms, t1, window_ms):
                ov = min(t1, w + window_ms) - max(t0, w)
                acc = out[(g, w)]
                acc[0] += ov * pct / 100
                acc[1 if held else 2] += ov * (1 - pct / 100)
                acc[3] -= ov
    return out


def windows_of(table, index: dict[str, int], into: dict[tuple[int, int], list[int]]) -> None:
    """Windows of a closed table by (GPU index in the log, window start ms)."""
    cols = {c: table.column(c).to_pylist() for c in ("gpu_uuid", "window_start_ms", *STATES)}
    for i, uuid in enumerate(cols["gpu_uuid"]):
        key = (index[uuid], cols["window_start_ms"][i])
        assert key not in into, f"window {key} closed twice"
        into[key] = [cols[c][i] for c in STATES]


def assert_exact(got: dict, ref: dict) -> None:
    assert set(got) == set(ref), f"windows differ: missing {sorted(set(ref) - set(got))[:5]}, " \
                                 f"extra {sorted(set(got) - set(ref))[:5]}"
    for key, want in ref.items():
        for state, g, r in zip(STATES, got[key], want, strict=True):
            assert abs(g - r) <= 1.0 + 1e-6, f"GPU {key[0]} window {key[1]}: {state} {g} ms, reference {r:.3f} ms"


def fold_stepped(src: ReplaySource, steps_us: list[int], window_s: float, lateness_s: float) -> dict:
    """Drive the Windower as the Agent does: poll, add, close at now - lateness; a final close at the end."""
    w = Windower(src.gpus(), window_s, lateness_s, start_us=src.first_us, kernels="numpy")
    index = {g.uuid: g.index for g in src.gpus()}
    got: dict = {}
    now, k = src.first_us, 0
    while now < src.last_us:
        now = min(now + steps_us[k % len(steps_us)], src.last_us)
        k += 1
        w.add(src.poll(now))
        closed = w.close(now)
        if closed is not None:
            windows_of(closed.gpu, index, got)
    w.add(src.poll(now))
    closed = w.close(now, final=True)
    if closed is not None:
        windows_of(closed.gpu, index, got)
    return got


def coarse(interval_s: int, n: int, gpu: int) -> list[Line]:
    """A deterministic coarse log: busy, idle-held, idle-free lines, an [N/A] line and a long gap."""
    pcts = [0, 35, 100, 0, 0, None, 80, 0, 12, 0]
    mems = [30000, 30000, 500, 2000, 100, 2000, 100, None, 800, 1024]
    lines, t = [], BASE_MS + 7_321 + gpu * 1_234
    for i in range(n):
        lines.append((t, pcts[i % len(pcts)], mems[(i + gpu) % len(mems)]))
        t += interval_s * 1000 + (i % 3) * 37 + (interval_s * 1000 * 5 if i == n // 2 else 0)
    return lines


@pytest.mark.parametrize("interval_s", [60, 300])
def test_a_coarse_log_replayed_through_the_agent_loses_no_time(tmp_path, interval_s):
    """Regression: with the Agent's default replay step (1 h), a line whose interval straddled a
    step used to land in windows already closed and count as unmonitored (-1.3 % active at 60 s,
    -7 % at 300 s). Through the real Agent and Spool, every window now holds the reference's figures."""
    n = 4 * 3600 // interval_s  # four hours: four replay steps, each cutting through a line
    gpus = [coarse(interval_s, n, 0), coarse(interval_s * 2 // 3, n * 3 // 2, 1)]
    parsed = parse_log(write_log(tmp_path / "coarse.csv", gpus))
    src = ReplaySource(parsed, "coarse", THRESHOLD_MIB)
    cfg = AgentConfig(host_id="coarse", flush_s=3600.0, lateness_s=2.0).validate()
    clock = SimClock(src.first_us)
    spool = Spool(tmp_path / "spool", fsync=False)
    agent = Agent(cfg, src, clock, spool, start_us=src.first_us)
    while clock.now_us() < src.last_us:
        clock.advance(min(3600.0, (src.last_us - clock.now_us()) / 1e6))
        agent.step()
    agent.close()
    got: dict = {}
    index = {g.uuid: g.index for g in src.gpus()}
    for rec in spool.pending():
        if not rec.n_windows:  # the stop batch at the log's end
            continue
        windows_of(from_ipc(pb.WindowBatch.FromString(spool.read(rec)).gpu_windows_arrow), index, got)
    spool.close()
    ref = reference(gpus, 10_000)
    assert_exact(got, ref)
    truth = src.total_truth()
    sums = [sum(v[i] for v in got.values()) for i in range(3)]
    n = len(got)
    assert sums[0] == pytest.approx(truth.active_s * 1000, abs=n)
    assert sums[1] == pytest.approx(truth.idle_held_s * 1000, abs=n)
    assert sums[2] == pytest.approx(truth.idle_free_s * 1000, abs=n)


@st.composite
def logs(draw):
    gpus = []
    start = BASE_MS + draw(st.integers(0, 86_400_000))
    for _ in range(draw(st.integers(1, 3))):
        interval = draw(st.one_of(st.integers(10, 1_000), st.integers(1_000, 300_000)))
        lines, t = [], start + draw(st.integers(0, 20_000))
        for _ in range(draw(st.integers(2, 30))):
            pct = draw(st.one_of(st.none(), st.just(0), st.just(0), st.integers(1, 100)))
            mem = draw(st.sampled_from([None, 0, 500, 1023, 1024, 30000]))
            lines.append((t, pct, mem))
            spacing = interval + draw(st.integers(-interval // 10, interval // 10))
            if draw(st.integers(0, 9)) == 0:
                spacing *= draw(st.integers(2, 9))  # a gap, unmonitored past three intervals
            t += max(spacing, 1)
        gpus.append(lines)
    return gpus


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gpus=logs(), steps_ms=st.lists(st.one_of(st.integers(1, 2_000), st.integers(2_000, 7_200_000)),
                                      min_size=1, max_size=4),
       window_s=st.sampled_from([1, 10, 60]), lateness_s=st.sampled_from([0.0, 2.0, 7.5]))
def test_any_interval_any_step_gives_the_one_pass_figures(tmp_path, gpus, steps_ms, window_s, lateness_s):
    src = ReplaySource(parse_log(write_log(tmp_path / "log.csv", gpus)), "prop", THRESHOLD_MIB)
    duration_us = src.last_us - src.first_us
    floor_us = math.ceil(duration_us / 150)  # at most ~150 polls per GPU log: the test stays fast
    steps_us = [max(s * 1000, floor_us, 1) for s in steps_ms]
    got = fold_stepped(src, steps_us, window_s, lateness_s)
    ref = reference(gpus, window_s * 1000)
    assert_exact(got, ref)
    # the reference's totals are the source's own one-pass truth
    for facts, truth in zip(src.gpus(), src.truth, strict=True):
        mine = [sum(v[s] for (g, _), v in ref.items() if g == facts.index) for s in range(3)]
        assert mine == pytest.approx([truth.active_s * 1000, truth.idle_held_s * 1000, truth.idle_free_s * 1000],
                                     abs=1e-3)


def test_a_line_split_across_many_polls_adds_up_to_the_whole_line(tmp_path):
    """One 300 s line polled every 7 s: the pieces cover it exactly once, with the line's utilization."""
    gpus = [[(BASE_MS, 0, 0), (BASE_MS + 300_000, 40, 2000)]]
    src = ReplaySource(parse_log(write_log(tmp_path / "one.csv", gpus)), "split", THRESHOLD_MIB)
    pieces = []
    for now in range(src.first_us + 7_000_000, src.last_us + 7_000_000, 7_000_000):
        u = src.poll(min(now, src.last_us)).util
        pieces += list(zip(u.t0_us.tolist(), u.t1_us.tolist(), u.pct.tolist(), u.held.tolist(), strict=True))
    assert len(pieces) == 43
    assert pieces[0][0] == src.first_us and pieces[-1][1] == src.last_us
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))  # contiguous, no overlap
    assert {(p, h) for _, _, p, h in pieces} == {(40.0, 1)}
    assert src.poll(src.last_us + 10_000_000).util.gpu.size == 0  # nothing handed out twice
