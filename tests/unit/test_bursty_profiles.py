"""Bursty simulator profiles: samples derived from an exact busy-interval model, that model's ground
truth, and the window kernels' integral of the samples."""

from __future__ import annotations

import numpy as np
import pytest

from gpuledger.agent.simulate import BURSTY, PROFILES, Loop, SimGpu, SimulatedSource
from gpuledger.agent.windows import Windower

START = 1_700_000_000_000_000  # a whole number of 10 s windows
SPAN_US = 20 * 60 * 1_000_000
PERIODS = (166_667, 1_000_000, 100_000)


def _source(profiles, period_us, seed=1) -> SimulatedSource:
    return SimulatedSource("bursty", "H100", [SimGpu(p) for p in profiles], START, seed=seed,
                           sample_period_us=period_us)


def _overlap_oracle(t0, t1, a, b) -> np.ndarray:
    """Busy us of each period [t0, t1) given busy intervals [a, b), interval by interval."""
    busy = np.zeros(t0.size, np.int64)
    for ai, bi in zip(a.tolist(), b.tolist(), strict=True):
        i, j = np.searchsorted(t1, ai, side="right"), np.searchsorted(t0, bi, side="left")
        busy[i:j] += np.clip(np.minimum(t1[i:j], bi) - np.maximum(t0[i:j], ai), 0, None)
    return busy


def test_bursty_profiles_are_listed():
    assert set(BURSTY) == {"training_45_15", "dataloader_8_2", "inference_poisson"}
    assert set(BURSTY) <= set(PROFILES)


@pytest.mark.parametrize("period_us", PERIODS)
@pytest.mark.parametrize("profile", sorted(BURSTY))
def test_each_sample_is_the_rounded_busy_fraction_of_its_period(profile, period_us):
    src = _source([profile], period_us)
    u = src.poll(START + SPAN_US).util
    a, b = src.busy_intervals(0, START, START + SPAN_US)
    assert a.size > 10 and np.all(b > a) and np.all(a[1:] > b[:-1])  # disjoint, sorted, none empty
    busy = _overlap_oracle(u.t0_us, u.t1_us, a, b)
    np.testing.assert_array_equal(u.pct, np.rint(100.0 * busy / period_us))
    assert np.all(u.held == 1)  # the GPU is held throughout: its idle time is idle-held
    np.testing.assert_array_equal(src.busy_us(0, u.t0_us, u.t1_us), busy)


@pytest.mark.parametrize("period_us", PERIODS)
@pytest.mark.parametrize("profile", sorted(BURSTY))
def test_ground_truth_is_the_integral_of_the_samples_within_rounding(profile, period_us):
    src = _source([profile], period_us)
    u = src.poll(START + SPAN_US).util
    lo, hi = int(u.t0_us[0]), int(u.t1_us[-1])
    truth_us = int(src.busy_us(0, lo, hi)[0])
    integral_us = float(((u.t1_us - u.t0_us) * u.pct.astype(np.float64)).sum()) / 100.0
    exact = src.busy_us(0, u.t0_us, u.t1_us)
    partial = int(((exact > 0) & (exact < period_us)).sum())  # only these periods are rounded
    assert abs(integral_us - truth_us) <= 0.005 * period_us * partial + 1e-6
    assert abs(src.truth[0].active_s * 1e6 - integral_us) < 1.0  # the source's own truth counts its samples
    assert src.truth[0].idle_free_s == 0.0 and src.truth[0].unmonitored_s == 0.0

    model = BURSTY[profile]
    if isinstance(model, Loop):  # whole cycles: exactly on / (on + off) busy
        whole = SPAN_US // int((model.on_s + model.off_s) * 1e6) * int(model.on_s * 1e6)
        assert int(src.busy_us(0, START, START + SPAN_US)[0]) == whole
    else:  # M/G/inf union: busy share 1 - exp(-rate x mean service), about 22 % for this endpoint
        share = truth_us / (hi - lo)
        mean_service_s = model.median_ms / 1000 * np.exp(model.sigma**2 / 2)
        assert abs(share - (1 - np.exp(-model.rate_per_s * mean_service_s))) < 0.03


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_window_kernels_integrate_the_samples_to_the_truth(kernels):
    profiles = sorted(BURSTY)
    period = 166_667
    src = _source(profiles, period, seed=4)
    w = Windower(src.gpus(), window_s=10.0, lateness_s=2.0, start_us=START, kernels=kernels)
    rng = np.random.default_rng(0)
    now, end, tables = START, START + SPAN_US, []
    while now < end:  # an agent's irregular ticks, windows closed between polls
        now = min(end, now + int(rng.integers(200_000, 7_000_000)))
        w.add(src.poll(now))
        closed = w.close(now, final=now == end)
        if closed is not None:
            tables.append(closed.gpu)
    uuids = np.concatenate([t.column("gpu_uuid").to_numpy(zero_copy_only=False) for t in tables])
    starts = np.concatenate([t.column("window_start_ms").to_numpy() for t in tables]) * 1000
    busy_ms = np.concatenate([t.column("busy_ms").to_numpy() for t in tables]).astype(np.int64)
    held_ms = np.concatenate([t.column("idle_held_ms").to_numpy() for t in tables]).astype(np.int64)
    covered_ms = np.concatenate([t.column("covered_ms").to_numpy() for t in tables]).astype(np.int64)
    for g, facts in enumerate(src.gpus()):
        m = uuids == facts.uuid
        ws = starts[m]
        assert np.array_equal(ws, START + 10_000_000 * np.arange(ws.size))  # every window once, in order
        n_samples = (end - START) // period
        hi = START + n_samples * period  # the end of the last whole driver period
        truth_w = src.busy_us(g, ws, np.minimum(ws + 10_000_000, hi))
        # per window: a period that straddles a window edge is split by overlap, off by at most that
        # overlap on each side, plus half a percent of each period and whole-ms rounding
        assert np.all(np.abs(busy_ms[m] * 1000 - truth_w) <= 2 * period + 0.005 * 10_000_000 + 500)
        # in total the straddling errors cancel: only the samples' rounding remains
        exact = src.busy_us(g, START + period * np.arange(n_samples), START + period * np.arange(1, n_samples + 1))
        partial = int(((exact > 0) & (exact < period)).sum())
        total_truth = int(src.busy_us(g, START, hi)[0])
        assert abs(busy_ms[m].sum() * 1000 - total_truth) <= 0.005 * period * partial + 500 * ws.size
        assert abs(covered_ms[m].sum() * 1000 - (hi - START)) <= 500 * ws.size
        np.testing.assert_array_equal(busy_ms[m] + held_ms[m], covered_ms[m])  # the rest is idle-held


def test_samples_do_not_depend_on_how_the_source_is_polled():
    profiles = sorted(BURSTY)
    one = _source(profiles, 166_667, seed=9).poll(START + SPAN_US).util
    src = _source(profiles, 166_667, seed=9)
    rng = np.random.default_rng(1)
    parts, now = [], START
    while now < START + SPAN_US:
        now = min(START + SPAN_US, now + int(rng.integers(1, 90_000_000)))
        parts.append(src.poll(now).util)
    for g in range(len(profiles)):
        many = np.concatenate([p.pct[p.gpu == g] for p in parts])
        np.testing.assert_array_equal(one.pct[one.gpu == g], many)
    other = _source(profiles, 166_667, seed=10).poll(START + SPAN_US).util
    by_gpu = {p: (one.pct[one.gpu == g], other.pct[other.gpu == g]) for g, p in enumerate(profiles)}
    np.testing.assert_array_equal(*by_gpu["training_45_15"])  # a loop depends on time only
    assert not np.array_equal(*by_gpu["inference_poisson"])  # requests depend on the seed


@pytest.mark.parametrize("profile", sorted(BURSTY))
def test_busy_time_of_an_interval_does_not_depend_on_the_other_intervals_asked(profile):
    src = _source([profile], 1_000_000, seed=3)
    t0 = START + np.arange(0, SPAN_US, 500_000, dtype=np.int64)
    t1 = t0 + 250_000
    together = src.busy_us(0, t0, t1)
    alone = np.array([src.busy_us(0, a, b)[0] for a, b in zip(t0.tolist(), t1.tolist(), strict=True)])
    np.testing.assert_array_equal(alone, together)
    assert 0 < together.sum() < t1.sum() - t0.sum()


def test_busy_us_rejects_bad_questions():
    src = _source(["inference_poisson", "notebook"], 1_000_000)
    with pytest.raises(ValueError, match="t1_us >= t0_us"):
        src.busy_us(0, START + 10, START)
    with pytest.raises(ValueError, match=r"GPU 1: profile 'notebook' has no busy-interval model"):
        src.busy_us(1, START, START + 10)
    assert src.busy_us(0, [], []).size == 0
