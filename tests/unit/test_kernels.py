"""The numba window kernels agree with the numpy reference, and time is conserved."""

from __future__ import annotations

import numpy as np
import pytest

from gpuledger.agent.kernels import fold_gauge, fold_util

W = 10_000_000  # 10 s in us


def _random_util(rng, n, n_keys, span_us, max_period_us):
    t1 = np.sort(rng.integers(1, span_us, n))
    t0 = t1 - rng.integers(1, max_period_us, n)
    pct = rng.integers(0, 101, n).astype(np.float32)
    pct[rng.random(n) < 0.05] = np.nan
    return rng.integers(0, n_keys, n), t0, t1, pct, rng.integers(0, 2, n).astype(np.uint8)


def _assert_same(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-6, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_util_parity_random(seed):
    rng = np.random.default_rng(seed)
    n_keys, n_win = 5, 30
    args = _random_util(rng, 20_000, n_keys, n_win * W, 3 * W)
    for lo in (0, 7 * W):  # windows starting at 0 and a clipped range
        nb = fold_util(*args, lo, W, n_keys, n_win - 7 if lo else n_win)
        ref = fold_util(*args, lo, W, n_keys, n_win - 7 if lo else n_win, reference=True)
        _assert_same(nb, ref)


@pytest.mark.parametrize("seed", range(4))
def test_gauge_parity_random(seed):
    rng = np.random.default_rng(seed)
    n, n_keys, n_win = 5000, 3, 20
    t1 = np.sort(rng.integers(1, n_win * W, n))
    t0 = t1 - rng.integers(0, 2 * W, n)
    vals = [rng.random(n) * 1000 for _ in range(4)]
    for v in vals:
        v[rng.random(n) < 0.1] = np.nan
    key = rng.integers(0, n_keys, n)
    nb = fold_gauge(key, t0, t1, *vals, 0, W, n_keys, n_win)
    ref = fold_gauge(key, t0, t1, *vals, 0, W, n_keys, n_win, reference=True)
    _assert_same(nb, ref)


EDGE_CASES = {
    "empty": ([], [], [], [], []),
    "one sample": ([0], [W // 2 - 166_667], [W // 2], [40.0], [1]),
    "crosses a boundary": ([0], [W - 500_000], [W + 500_000], [100.0], [0]),
    "spans three windows": ([0], [W // 2], [2 * W + W // 2], [50.0], [1]),
    "gap between samples": ([0, 0], [0, 3 * W], [1_000_000, 3 * W + 1_000_000], [10.0, 90.0], [0, 1]),
    "NaN reading": ([0, 0], [0, 1_000_000], [1_000_000, 2_000_000], [np.nan, 30.0], [1, 1]),
    "before and after range": ([0, 0], [-5 * W, 9 * W], [-4 * W, 11 * W], [100.0, 100.0], [1, 1]),
    "zero-length interval": ([0], [W], [W], [100.0], [1]),
    "exactly on a boundary": ([0, 0], [0, W], [W, 2 * W], [100.0, 0.0], [0, 1]),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=list(EDGE_CASES))
def test_util_parity_edge_cases(case):
    key, t0, t1, pct, held = (np.asarray(x) for x in EDGE_CASES[case])
    args = (key.astype(np.int32), t0.astype(np.int64), t1.astype(np.int64), pct.astype(np.float32),
            held.astype(np.uint8), 0, W, 1, 4)
    _assert_same(fold_util(*args), fold_util(*args, reference=True))


def test_known_figures():
    # one sample of 1 s at 40 %, held, ending at 5 s; one 2 s sample at 100 % crossing 10 s
    r = fold_util(np.array([0, 0]), np.array([4_000_000, 9_000_000]), np.array([5_000_000, 11_000_000]),
                  np.array([40.0, 100.0]), np.array([1, 0]), 0, W, 1, 2)
    assert r.covered_us[0].tolist() == [2_000_000, 1_000_000]
    assert r.busy_us[0].tolist() == pytest.approx([400_000 + 1_000_000, 1_000_000])
    assert r.held_idle_us[0].tolist() == pytest.approx([600_000, 0])
    assert r.sample_count[0].tolist() == [1, 1]  # counted in the window holding the sample's end
    assert r.hist[0, 0, 4] == 1 and r.hist[0, 1, 9] == 1
    # energy: a 4 s interval of 4000 mJ across a boundary splits by overlap
    g = fold_gauge(np.array([0]), np.array([8_000_000]), np.array([12_000_000]), np.array([4000.0]),
                   np.array([300_000.0]), np.array([1e9]), np.array([55.0]), 0, W, 1, 2)
    assert g.energy_mj[0].tolist() == pytest.approx([2000.0, 2000.0])
    assert g.power_max_mw[0, 1] == 300_000 and np.isnan(g.power_max_mw[0, 0])


def test_folding_in_pieces_equals_folding_at_once():
    rng = np.random.default_rng(11)
    args = _random_util(rng, 5000, 2, 12 * W, 2 * W)
    whole = fold_util(*args, 0, W, 2, 12)
    for lo_w, n in ((0, 5), (5, 4), (9, 3)):
        part = fold_util(*args, lo_w * W, W, 2, n)
        np.testing.assert_allclose(part.busy_us, whole.busy_us[:, lo_w:lo_w + n])
        np.testing.assert_allclose(part.covered_us, whole.covered_us[:, lo_w:lo_w + n])
        np.testing.assert_array_equal(part.sample_count, whole.sample_count[:, lo_w:lo_w + n])


def test_covered_never_exceeds_window_for_non_overlapping_samples():
    # a driver's samples tile time: covered + unmonitored = window
    period = 166_667
    t1 = np.arange(period, 6 * W, period)
    r = fold_util(np.zeros(t1.size), t1 - period, t1, np.full(t1.size, 55.0), np.ones(t1.size), 0, W, 1, 6)
    assert (r.covered_us <= W).all()
    assert r.covered_us[0, 1:5].tolist() == [W] * 4
