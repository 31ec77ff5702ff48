"""Hull algorithms against scipy's Qhull and an exact reference; degenerate and adversarial input."""
from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest

from entropy_attn.geometry import (akl_toussaint_filter, chan_hull, convex_hull, maxima_3d,
                                   monotone_chain, orient2d, polygon_area, quickhull, strip_hull)
from entropy_attn.geometry import hull, predicates

from ._reference import exact_hull, scipy_hull

ALGORITHMS = [monotone_chain, convex_hull, quickhull, chan_hull]


def _sets(rng):
    yield "uniform", rng.random((500, 2))
    yield "gaussian", rng.normal(size=(2000, 2))
    yield "disk", (lambda r, t: np.c_[r * np.cos(t), r * np.sin(t)])(
        np.sqrt(rng.random(3000)), 2 * np.pi * rng.random(3000))
    t = rng.random(400)
    yield "parabola", np.c_[t, t**2]
    yield "circle", np.c_[np.cos(2 * np.pi * t), np.sin(2 * np.pi * t)]
    yield "grid", rng.integers(0, 7, (300, 2)).astype(float)  # collinear runs and copies
    yield "clusters", np.concatenate([rng.normal(c, 0.05, (300, 2)) for c in rng.random((5, 2))])
    yield "tiny", rng.random((5, 2))


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_matches_qhull(algo, rng):
    for name, pts in _sets(rng):
        out = algo(pts)
        assert out.dtype == np.int64
        ref = scipy_hull(pts)
        # Qhull may report any copy of a duplicated point; ours is the smallest index
        np.testing.assert_array_equal(pts[out], pts[ref], err_msg=name)
        if name in ("grid", "tiny"):
            assert out.tolist() == exact_hull(pts), name


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_many_small_random_sets(algo):
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(1, 40))
        pts = rng.integers(0, 4, (n, 2)).astype(float) if trial % 2 else rng.normal(size=(n, 2))
        assert algo(pts).tolist() == exact_hull(pts), (trial, pts.tolist())


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_degenerate(algo):
    assert algo(np.zeros((0, 2))).tolist() == []
    assert algo([[3.0, 4.0]]).tolist() == [0]
    assert algo([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]).tolist() == [0]
    assert algo([[2.0, 0.0], [0.0, 1.0]]).tolist() == [1, 0]
    line = np.c_[np.arange(10.0), 2 * np.arange(10.0)][::-1]
    assert algo(line).tolist() == [9, 0]  # all collinear: the two extreme points
    vertical = np.c_[np.zeros(5), [3.0, 1.0, 4.0, 1.0, 5.0]]
    assert algo(vertical).tolist() == [1, 4]
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0], [1, 0], [0, 0], [0.5, 0.5]])
    assert algo(square).tolist() == [0, 1, 2, 3]  # edge midpoints dropped, first copy kept


@pytest.mark.parametrize("algo", ALGORITHMS + [akl_toussaint_filter, strip_hull],
                         ids=lambda f: f.__name__)
def test_bad_input(algo):
    with pytest.raises(ValueError, match="NaN"):
        algo([[0.0, 0.0], [1.0, np.nan], [2.0, 1.0]])
    with pytest.raises(ValueError, match="infinite"):
        algo([[0.0, 0.0], [1.0, np.inf], [2.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        algo(np.zeros((4, 3)))


def _adversarial():
    """Kettner et al.'s classroom example: points within a few ulps of the line y = x."""
    u = 2.0**-53
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    p = np.c_[0.5 + i.ravel() * u, 0.5 + j.ravel() * u]
    return p, np.array([12.0, 12.0]), np.array([24.0, 24.0])


def _naive_sign(a, b, c):
    det = (a[..., 0] - c[..., 0]) * (b[..., 1] - c[..., 1]) - (a[..., 1] - c[..., 1]) * (b[..., 0] - c[..., 0])
    return np.sign(det)


def _fraction_sign(a, b, c):
    ax, ay, bx, by, cx, cy = map(Fraction, (*a, *b, *c))
    d = (ax - cx) * (by - cy) - (ay - cy) * (bx - cx)
    return (d > 0) - (d < 0)


def test_orient2d_exact_on_adversarial_points():
    p, q, r = _adversarial()
    ours = orient2d(p, q, r)
    exact = np.array([_fraction_sign(a, q, r) for a in p])
    np.testing.assert_array_equal(ours, exact)
    naive = _naive_sign(p, q[None], r[None])
    assert (naive != exact).sum() > 100  # the naive determinant really fails here
    assert set(exact.tolist()) == {-1, 0, 1}


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_hull_of_nearly_collinear_points(algo):
    p, q, r = _adversarial()
    rng = np.random.default_rng(3)
    pts = np.concatenate([p[rng.choice(len(p), 300, replace=False)], [q, r, [0.5, 24.0]]])
    assert algo(pts).tolist() == exact_hull(pts)


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_runs_of_one_repeated_point(algo):
    """Chan's groups of one repeated point each have a one-vertex hull (no tournament round)."""
    runs = np.repeat(np.random.default_rng(0).normal(size=(10, 2)), 4, axis=0)
    for pts in ([[3.0, 3.0]] * 5, [[0.0, 0.0]] * 4 + [[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, runs):
        assert algo(pts).tolist() == exact_hull(np.asarray(pts))


def test_orient2d_exact_at_the_ends_of_the_float_range():
    """Products that overflow (|x| >~ 1e154) or underflow (|x| <~ 1e-155) void the float filter."""
    rng = np.random.default_rng(5)
    scale = 10.0 ** rng.choice([-320, -300, -200, -170, -160, -150, 150, 154, 160, 200, 300, 307],
                               (3000, 1))
    a, b = rng.uniform(-1, 1, (2, 3000, 2)) * scale
    c = a + rng.uniform(-2, 3, (3000, 1)) * (b - a)  # nearly collinear after rounding
    exact = np.array([_fraction_sign(*t) for t in zip(a, b, c)])
    np.testing.assert_array_equal(orient2d(a, b, c), exact)
    assert orient2d([2e154, 3e154], [3e154, 2e154], [0.0, 0.0]) == -1
    assert orient2d([0.0, 0.0], [1e-170, 0.0], [1e-170, 1e-170]) == 1


def test_orient2d_settles_axis_parallel_runs_without_fractions(monkeypatch):
    """Collinear grid runs are uncertified by the filter (its underflow term) but must stay fast."""
    monkeypatch.setattr(predicates, "Fraction", None)  # the slow exact path would raise
    a = np.random.default_rng(0).integers(0, 100, (1000, 2)).astype(float)
    assert not orient2d(a, a + [1, 0], a + [5, 0]).any()
    assert not orient2d(a, a + [0, 3], a - [0, 2]).any()


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-170, 1e-160, 1e154, 1e160, 1e200, 1e300])
def test_hull_at_extreme_scales(algo, scale):
    """Overflowing products used to give NaN signs: wrong hulls, a quickhull crash and a chan_hull
    hang; underflowing ones certified false collinearity."""
    rng = np.random.default_rng(2)
    sets = [np.array([[0, 0], [3, 2], [2, 3], [1, 1], [-1, 2], [2, -1]]),
            rng.integers(0, 20, (80, 2)), rng.uniform(-1, 1, (80, 2))]
    for base in sets:
        pts = base * scale
        assert algo(pts).tolist() == exact_hull(pts)
        # with a point at the other end of the float range the set cannot be scaled exactly
        # (hull._planar_points), so the predicates meet the overflow and underflow themselves
        spanning = np.r_[pts, [[2.0**-1000, 2.0**-1000] if scale > 1 else [2.0**1000, -(2.0**1000)]]]
        assert algo(spanning).tolist() == exact_hull(spanning)


@pytest.mark.parametrize("algo", ALGORITHMS + [akl_toussaint_filter, strip_hull], ids=lambda f: f.__name__)
def test_hull_at_extreme_scales_takes_no_more_exact_tests(monkeypatch, algo):
    """Beyond 2^+-500 the determinant's products overflow or underflow and the filter certifies
    nothing, so the exact Fraction fallback settled most tests (300-1200x slower on 6000 points).
    A set within 2^1022 of dynamic range is now scaled by a power of two first (exact: the same
    orientations, comparisons and indices)."""
    exact_triples = []
    exact_signs = predicates._exact_signs

    def counted(*cols):
        exact_triples.append(cols[0].size)
        return exact_signs(*cols)

    monkeypatch.setattr(predicates, "_exact_signs", counted)
    pts = np.random.default_rng(3).normal(size=(2000, 2))
    expected = algo(pts)
    at_unit_scale = sum(exact_triples)  # a few nearly collinear triples (chan_hull's tangents)
    for exponent in (600, -600, 1000, -1000):
        exact_triples.clear()
        assert np.array_equal(algo(np.ldexp(pts, exponent)), expected)
        assert sum(exact_triples) == at_unit_scale, exponent


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda f: f.__name__)
def test_hull_near_the_largest_float(algo):
    """Differences of coordinates overflow here too: right answers, and no RuntimeWarning."""
    big = np.finfo(np.float64).max
    corners = np.array([[big, big], [-big, -big], [big, -big], [-big, big], [0.0, 0.0]])
    triangle = np.array([[big, 0.0], [0.0, big], [-big, -big], [0.0, 0.0], [big / 2, -big / 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pts in (corners, triangle):
            assert algo(pts).tolist() == exact_hull(pts)


def test_akl_toussaint_near_the_largest_float():
    """Line functions overflow there: their thresholds discard nothing, and warn about nothing."""
    big = np.finfo(np.float64).max
    pts = np.r_[[[big, big], [-big, -big], [big, -big], [-big, big]],
                big * np.random.default_rng(0).uniform(-1, 1, (50, 2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(exact_hull(pts)) <= set(akl_toussaint_filter(pts).tolist())


def test_chan_hull_fails_rather_than_hangs_on_a_broken_predicate(monkeypatch):
    """A predicate that always says clockwise sends the tangent pointers round for ever."""

    def always_clockwise(a, b, c):
        return -np.ones(np.broadcast_shapes(*(np.shape(v)[:-1] for v in (a, b, c))), np.int8)

    monkeypatch.setattr(hull, "orient2d", always_clockwise)
    with pytest.raises(RuntimeError, match="did not stop"):
        chan_hull(np.random.default_rng(0).random((40, 2)))


def test_akl_toussaint_on_fewer_than_three_points():
    for n in range(3):
        assert akl_toussaint_filter(np.arange(2.0 * n).reshape(n, 2)).tolist() == list(range(n))


def test_akl_toussaint_keeps_every_vertex(rng):
    pts = rng.normal(size=(20000, 2))
    kept = akl_toussaint_filter(pts)
    assert kept.size < len(pts) // 20
    assert set(scipy_hull(pts).tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("exponent", [-530, -524, -515])
def test_akl_toussaint_keeps_every_vertex_when_products_underflow(exponent):
    """Near 1e-160 the line functions' products underflow: the filter dropped hull vertices."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (3000, 2))
    on_edge = (np.arange(3000), rng.integers(0, 2, 3000))
    pts[on_edge] = np.sign(pts[on_edge])  # on the square's boundary, then jittered across it
    pts = (pts + 1e-3 * rng.normal(size=pts.shape)) * 2.0**exponent
    hull_vertices = exact_hull(pts)
    assert set(hull_vertices) <= set(akl_toussaint_filter(pts).tolist())
    assert convex_hull(pts).tolist() == hull_vertices


def test_strip_hull_is_a_close_inner_approximation(rng):
    pts = rng.random((20000, 2))
    exact, approx = polygon_area(pts[convex_hull(pts)]), polygon_area(pts[strip_hull(pts, 256)])
    assert approx <= exact
    assert (exact - approx) / exact < 1e-2
    assert strip_hull(pts, 4).size < convex_hull(pts).size


def _brute_maxima(pts):
    ge = (pts[None, :, :] >= pts[:, None, :]).all(-1)  # ge[i, j]: j >= i everywhere
    eq = (pts[None, :, :] == pts[:, None, :]).all(-1)
    j_lt_i = np.arange(len(pts))[None, :] < np.arange(len(pts))[:, None]
    dominated = (ge & ~eq).any(1) | (eq & j_lt_i).any(1)
    return np.flatnonzero(~dominated)


def test_maxima_3d_brute_force(rng):
    for pts in (rng.random((800, 3)), rng.integers(0, 5, (400, 3)).astype(float),
                np.c_[rng.random(300), 1 - rng.random(300), rng.random(300)], np.zeros((0, 3))):
        np.testing.assert_array_equal(maxima_3d(pts), _brute_maxima(pts))
    sphere = rng.normal(size=(500, 3))
    sphere = np.abs(sphere) / np.linalg.norm(sphere, axis=1, keepdims=True)
    assert maxima_3d(sphere).tolist() == list(range(500))  # all on the positive octant sphere
    with pytest.raises(ValueError, match="NaN"):
        maxima_3d([[0.0, 1.0, np.nan]])
