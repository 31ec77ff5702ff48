"""Hard range-partition entropy: exact search vs brute force, bounds, and the estimator study."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entropy_attn.geometry import (ball_entropy, grid_anchors, normalize_points, partition_cost,
                                   range_partition_bounds, range_partition_entropy)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def _brute(points: np.ndarray, width: float) -> float:
    """Minimum over all set partitions whose parts are exactly S cap bbox(part), sides <= width."""
    z = normalize_points(torch.from_numpy(points)).numpy()
    best = math.inf
    for partition in _set_partitions(list(range(len(z)))):
        ok = True
        for part in partition:
            lo, hi = z[part].min(0), z[part].max(0)
            inside = ((z >= lo) & (z <= hi)).all(1).sum()
            if (hi - lo).max() > width or inside != len(part):
                ok = False
                break
        if ok:
            best = min(best, partition_cost([len(p) for p in partition]))
    return best


def test_cost():
    assert partition_cost([4]) == 0
    assert partition_cost([1, 1, 1, 1]) == pytest.approx(4 * math.log(4))
    assert partition_cost([2, 6]) == pytest.approx(2 * math.log(4) + 6 * math.log(8 / 6))


def test_exact_1d_and_2d_match_brute_force(rng):
    for trial in range(6):
        x = rng.random(7) if trial % 2 else rng.integers(0, 3, 7).astype(float)  # with ties
        assert range_partition_entropy(x, 0.8) == pytest.approx(_brute(x[:, None], 0.8), abs=1e-12)
        p = rng.random((7, 2)) if trial % 2 else rng.integers(0, 3, (7, 2)).astype(float)
        assert range_partition_entropy(p, 0.9) == pytest.approx(_brute(p, 0.9), abs=1e-12)


def test_known_values_and_invariance():
    two_blobs = np.r_[np.zeros(5), np.ones(5)] + 1e-3 * np.arange(10)
    assert range_partition_entropy(two_blobs, 0.5) == pytest.approx(10 * math.log(2))
    x = np.random.default_rng(0).random(200)
    h = range_partition_entropy(x, 0.3)
    assert range_partition_entropy(17 * x - 4, 0.3) == pytest.approx(h)
    assert range_partition_entropy(x, 100.0) == 0.0
    with pytest.raises(ValueError, match="range_partition_bounds"):
        range_partition_entropy(np.random.default_rng(0).random((40, 2)))


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_invariance_at_extreme_scales(scale):
    """The normalization used to overflow / underflow (~1e+-160), collapsing H_w to 0."""
    p = np.random.default_rng(0).normal(size=(10, 2))
    far = scale * (p + [3.0, -1.0])
    for fn in (range_partition_entropy, range_partition_bounds):
        assert fn(far, 0.7) == pytest.approx(fn(p, 0.7))
    h_1d = range_partition_entropy(p[:, 0], 0.7)
    assert range_partition_entropy(far[:, 0], 0.7) == pytest.approx(h_1d)


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_width_and_shapes_raise(rng, width):
    for fn in (range_partition_entropy, range_partition_bounds):
        with pytest.raises(ValueError, match="width"):
            fn(rng.random((6, 2)), width)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        range_partition_bounds(rng.random((10, 3)))


def test_empty_sets_have_zero_entropy():
    assert range_partition_entropy(np.zeros(0)) == 0.0
    assert range_partition_entropy(np.zeros((0, 2))) == 0.0
    assert range_partition_bounds(np.zeros((0, 2))) == (0.0, 0.0)


def test_bounds_bracket_exact(rng):
    for _ in range(4):
        p = rng.random((11, 2))
        lo, hi = range_partition_bounds(p, 0.7)
        exact = range_partition_entropy(p, 0.7)
        assert lo - 1e-9 <= exact <= hi + 1e-9
    lo, hi = range_partition_bounds(rng.random((500, 2)), 0.5)
    assert 0 < lo <= hi


def _family(rng, n, d):
    k, spread = int(rng.integers(1, 9)), rng.uniform(0.01, 0.5)
    return rng.random((k, d))[rng.integers(0, k, n)] + spread * rng.normal(size=(n, d)) / k**0.5


@pytest.mark.parametrize("d,n,floor", [(1, 128, 0.8), (2, 12, 0.6)])
def test_estimator_tracks_exact_entropy(d, n, floor):
    """Estimator-vs-truth study: H_diff with fixed grid anchors ranks sets like H_w does."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    truth, est = [], []
    for _ in range(40):
        s = _family(rng, n, d)
        truth.append(range_partition_entropy(s, 0.5) / n)
        est.append(ball_entropy(torch.from_numpy(s), grid_anchors(16, d), alpha=10.0).item())
    assert spearmanr(est, truth).statistic > floor
