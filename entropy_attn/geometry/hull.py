"""Planar convex hulls and 3-D maxima in NumPy.

Output convention of every hull function: an int64 array of indices into ``points``
(``[n, 2]``, any real dtype, converted to float64) listing the hull's strict vertices
counter-clockwise, as ``scipy.spatial.ConvexHull(points).vertices`` does, starting at the
lexicographically smallest vertex (smallest x, then smallest y). Points in the relative interior
of an edge are not vertices. Degenerate input gets a defined answer:

- duplicated points: the smallest index among the copies is reported;
- ``n == 0``: empty array; all points equal: ``[i]``;
- all points collinear (scipy raises ``QhullError`` here): the two extreme points
  ``[lexmin, lexmax]``;
- NaN or infinite coordinates, or a wrong shape: ``ValueError`` naming the problem.

Every orientation decision is exact (:func:`~entropy_attn.geometry.predicates.orient2d`), so
nearly collinear points are never misclassified, at any finite scale of the coordinates. The exact
answers do not depend on the algorithm: all four return identical arrays.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from fractions import Fraction

import numpy as np

from .predicates import orient2d, orient_det

_EMPTY = np.zeros(0, dtype=np.int64)


def check_points(points, dim: int = 2) -> np.ndarray:
    """Return ``points`` as a float64 ``[n, dim]`` array; ``ValueError`` on a bad shape or NaN/inf."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != dim:
        raise ValueError(f"points must have shape [n, {dim}], got {tuple(pts.shape)}")
    if not np.isfinite(pts).all():
        kind = "NaN" if np.isnan(pts).any() else "infinite"
        raise ValueError(f"points contain {kind} coordinates")
    return pts


#: Coordinate magnitudes beyond 2^+-500 make the orientation determinant's products overflow or
#: underflow, and most orientation tests then fall back to exact Fractions (300-1200x slower).
SAFE_MAGNITUDE = 2.0**500


def _planar_points(points) -> np.ndarray:
    """``check_points(points)``, scaled by the power of two that brings its largest magnitude into
    [0.5, 1) when that magnitude lies beyond ``SAFE_MAGNITUDE`` either way and the scaling is exact
    (no nonzero coordinate becomes subnormal). Orientation signs and comparisons, and so every
    hull's indices, are unchanged by it; only the exact fallback is spared."""
    pts = check_points(points)
    peak = np.abs(pts).max(initial=0.0)
    if peak == 0 or 1 / SAFE_MAGNITUDE <= peak <= SAFE_MAGNITUDE:
        return pts
    shift = -int(np.frexp(peak)[1])
    smallest = np.abs(pts[pts != 0]).min()
    if np.ldexp(smallest, shift) < np.finfo(np.float64).tiny:  # the set spans too many binades
        return pts
    return np.ldexp(pts, shift)


# ----------------------------------------------------------------------------------------------
# Andrew's monotone chain, vectorized over groups


def _peel(xy: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Positions of the chain of each group: ``xy`` ``[m, 2]`` is sorted (lexicographically, or
    reversed for upper chains) within contiguous groups ``gid`` ``[m]``, without duplicates.

    Andrew's stack scan pops a point exactly when it makes a non-left turn with its neighbours;
    here every such point is deleted in parallel, and the points next to a deletion are re-tested,
    until none is left. A deleted point lies on or above (for the lower chain) a segment between
    two remaining points, so the remaining polyline only descends and ends as the convex chain.
    """
    pos, cur, g = np.arange(len(gid)), xy, gid
    dirty = np.ones(len(gid), dtype=bool)
    while pos.size >= 3:
        mid = np.flatnonzero((g[1:-1] == g[:-2]) & (g[1:-1] == g[2:]) & dirty[1:-1]) + 1
        if not mid.size:
            break
        drop = mid[orient2d(cur[mid - 1], cur[mid], cur[mid + 1]) <= 0]
        if not drop.size:
            break
        keep = np.ones(pos.size, dtype=bool)
        keep[drop] = False
        dirty = np.zeros(pos.size, dtype=bool)
        dirty[drop - 1] = True
        dirty[drop + 1] = True
        pos, cur, g, dirty = pos[keep], cur[keep], g[keep], dirty[keep]
    return pos


def _block_lex_order(pts: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    """Order sorting each block of ``size`` consecutive entries of ``idx`` by (x, y, index)."""
    n, n_blocks = idx.size, -(-idx.size // size)
    x = np.full(n_blocks * size, np.inf)
    x[:n] = pts[idx, 0]
    order = np.argsort(x.reshape(n_blocks, size), axis=1)
    order = (order + np.arange(0, n_blocks * size, size)[:, None]).ravel()
    order = order[order < n]
    xs, block = x[order], order // size
    if ((xs[1:] == xs[:-1]) & (block[1:] == block[:-1])).any():  # ties in x: sort fully
        order = np.lexsort((idx, pts[idx, 1], pts[idx, 0], np.arange(n) // size))
    return order


def group_hulls(pts: np.ndarray, idx: np.ndarray, size: int):
    """Convex hulls of the blocks of ``size`` consecutive entries of ``idx``, all at once
    (monotone chain: sort each block, then the lower and upper chains by :func:`_peel`).

    ``pts``: float64 ``[N, 2]``; ``idx``: int64 ``[m]`` indices into ``pts``. Returns
    ``(vert, block)``, int64 ``[h]`` each: the hull vertices of the blocks in block order, each
    counter-clockwise from its lexicographic minimum, copies of a point reduced to the smallest
    index.
    """
    if not idx.size:
        return _EMPTY, _EMPTY
    order = _block_lex_order(pts, idx, size)
    idx, gid = idx[order], order // size
    xy = pts[idx]
    dup = np.zeros(idx.size, dtype=bool)
    dup[1:] = (gid[1:] == gid[:-1]) & (xy[1:] == xy[:-1]).all(axis=1)
    idx, gid, xy = idx[~dup], gid[~dup], xy[~dup]
    lower = _peel(xy, gid)
    rev = np.arange(idx.size)[::-1]
    upper = rev[_peel(xy[rev], gid[rev])]  # each block from its lexmax back to its lexmin
    ug = gid[upper]
    same = ug[1:] == ug[:-1]
    upper = upper[np.r_[False, same] & np.r_[same, False]]  # endpoints are in the lower chain
    pos = np.concatenate([lower, upper])
    part = np.repeat([0, 1], [lower.size, upper.size])
    rank = np.concatenate([np.arange(lower.size), np.arange(upper.size)])
    pos = pos[np.lexsort((rank, part, gid[pos]))]
    return idx[pos], gid[pos]


def monotone_chain(points) -> np.ndarray:
    """Convex hull by Andrew's monotone chain (sort, then lower and upper chains).

    ``points``: ``[n, 2]``. Returns int64 vertex indices, counter-clockwise from the
    lexicographically smallest vertex (see the module docstring). O(n log n) for the sort plus
    O(n) per deletion pass of :func:`_peel` (few passes on typical inputs, O(n) passes at worst).
    """
    pts = _planar_points(points)
    idx = np.arange(len(pts))
    return group_hulls(pts, idx, max(len(pts), 1))[0]


# ----------------------------------------------------------------------------------------------
# Akl-Toussaint extreme-point filter and the fast path

_FILTER_SLACK = 16 * np.finfo(np.float64).eps
# Absolute part of the filter's bound: the four products of a line function that may underflow
# are off by at most 2**-1075 each (cf. predicates.UNDERFLOW_ERR), with room for its own rounding.
_FILTER_UNDERFLOW = 2.0**-1070
_CHUNK = 16384  # points per block of the filter loop (keeps its temporaries in cache)


def _extremes(x: np.ndarray, y: np.ndarray, n_directions: int) -> np.ndarray:
    """Positions of the extreme points of ``(x, y)`` in ``n_directions`` equally spaced directions,
    counter-clockwise from +x. The 8-direction case uses x, y, x + y, x - y (no products)."""
    if n_directions == 8:
        s, d = x + y, x - y
        return np.array([x.argmax(), s.argmax(), y.argmax(), d.argmin(),
                         x.argmin(), s.argmin(), y.argmin(), d.argmax()])
    angle = 2 * np.pi * np.arange(n_directions) / n_directions
    return (np.cos(angle)[:, None] * x + np.sin(angle)[:, None] * y).argmax(axis=1)


@np.errstate(over="ignore", invalid="ignore")  # an overflow only voids thresholds (see below)
def _filter(pts: np.ndarray, cand: np.ndarray, n_directions: int) -> np.ndarray:
    """Subset of ``cand`` (int64 indices) not certainly strictly inside the polygon spanned by the
    extreme points of ``pts[cand]`` in ``n_directions`` equally spaced directions.

    A point is discarded only when the float value of every edge's line function exceeds a bound
    on its rounding error (coefficients and evaluation, 16 eps of the magnitudes involved, plus
    the error of products that underflow), so a discarded point lies strictly left of every edge,
    hence in the interior of the hull, whatever rounding did to the choice of the extreme points.
    Where a product overflows, that edge's threshold is inf or NaN, and discards nothing.
    """
    if cand.size < 3:  # no interior
        return cand
    x, y = np.ascontiguousarray(pts[cand, 0]), np.ascontiguousarray(pts[cand, 1])
    ext = _extremes(x, y, n_directions)
    poly = np.stack([x[ext], y[ext]], axis=1)
    poly = poly[(poly != np.roll(poly, -1, axis=0)).any(axis=1)]
    if len(poly) < 3:
        return cand
    a, b = poly, np.roll(poly, -1, axis=0)
    coef_x = a[:, 1] - b[:, 1]
    coef_y = b[:, 0] - a[:, 0]
    const = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    mag_x = max(-x.min(), x.max())
    mag_y = max(-y.min(), y.max())
    slack = _FILTER_SLACK * (
        np.abs(coef_x) * mag_x + np.abs(coef_y) * mag_y
        + np.abs(a[:, 0] * b[:, 1]) + np.abs(a[:, 1] * b[:, 0])
    ) + _FILTER_UNDERFLOW
    threshold = slack - const
    inside = np.empty(x.size, dtype=bool)
    value, term = np.empty(_CHUNK), np.empty(_CHUNK)
    above = np.empty(_CHUNK, dtype=bool)
    for lo in range(0, x.size, _CHUNK):
        xs, ys, ins = x[lo:lo + _CHUNK], y[lo:lo + _CHUNK], inside[lo:lo + _CHUNK]
        v, t, ab = value[:xs.size], term[:xs.size], above[:xs.size]
        ins[:] = True
        for e in range(len(poly)):
            np.multiply(xs, coef_x[e], out=v)
            np.multiply(ys, coef_y[e], out=t)
            v += t
            np.greater(v, threshold[e], out=ab)
            ins &= ab
    return cand[~inside]


def akl_toussaint_filter(points, n_directions: int = 8) -> np.ndarray:
    """Akl-Toussaint heuristic: indices (int64, increasing) of the points of ``points``
    (``[n, 2]``) that are not certainly interior to the polygon of the extreme points in
    ``n_directions`` directions. Every hull vertex survives."""
    pts = _planar_points(points)
    return _filter(pts, np.arange(len(pts)), n_directions)


def convex_hull(points, min_survivors: int = 2048, max_directions: int = 512) -> np.ndarray:
    """Fastest exact path: Akl-Toussaint filtering, refined by doubling the number of directions
    while more than ``min_survivors`` points survive and each round still removes over 10 %, then
    the monotone chain on the survivors. Same output as :func:`monotone_chain`."""
    pts = _planar_points(points)
    cand = np.arange(len(pts))
    n_directions = 8
    while cand.size > min_survivors and n_directions <= max_directions:
        kept = _filter(pts, cand, n_directions)
        progress = kept.size < 0.9 * cand.size
        cand, n_directions = kept, 2 * n_directions
        if not progress:
            break
    return group_hulls(pts, cand, max(cand.size, 1))[0]


def strip_hull(points, n_strips: int = 1024) -> np.ndarray:
    """Approximate hull, a sort-based heuristic (Bentley-Faust-Preparata with equal-count strips):
    sort by x, cut into ``n_strips`` strips, keep each strip's lowest and highest point and the
    two x-extremes, and return the exact hull of those (a subset of the true vertices may be
    missed; every returned index is a point of the input). Same output format as the exact hulls.
    """
    pts = _planar_points(points)
    n = len(pts)
    order = np.argsort(pts[:, 0], kind="stable")
    strip = np.arange(n) * min(n_strips, max(n, 1)) // max(n, 1)
    by_y = order[np.lexsort((pts[order, 1], strip))]
    first = np.r_[True, strip[1:] != strip[:-1]] if n else np.zeros(0, bool)
    last = np.r_[strip[1:] != strip[:-1], True] if n else np.zeros(0, bool)
    keep = np.unique(np.concatenate([by_y[first | last], order[:1], order[-1:]]))
    return group_hulls(pts, keep, max(keep.size, 1))[0]


# ----------------------------------------------------------------------------------------------
# QuickHull


def _lex_extremes(pts: np.ndarray):
    """Indices of the lexicographic minimum and maximum, smallest index among copies."""
    x, y = pts[:, 0], pts[:, 1]
    at_min = np.flatnonzero(x == x.min())
    lo = at_min[np.flatnonzero(y[at_min] == y[at_min].min())[0]]
    at_max = np.flatnonzero(x == x.max())
    hi = at_max[np.flatnonzero(y[at_max] == y[at_max].max())[0]]
    return int(lo), int(hi)


def _farthest_right(pts: np.ndarray, a: int, b: int, sub: np.ndarray) -> int:
    """The point of ``sub`` (all strictly right of a->b) farthest from line ab, exactly; among
    equally far points the first along a->b (a hull vertex), smallest index among copies."""
    det, err = orient_det(pts[a], pts[b], pts[sub])
    close = sub[-det + err >= (-det - err).max()]
    if close.size == 1:
        return int(close[0])
    fa, fb = (tuple(map(Fraction, pts[i])) for i in (a, b))
    exact = [
        (fa[1] - fb[1]) * Fraction(pts[i, 0]) + (fb[0] - fa[0]) * Fraction(pts[i, 1])
        for i in close
    ]
    best = min(exact)
    far = close[[e == best for e in exact]]
    with np.errstate(over="ignore"):  # only the signs are used, and survive overflow
        dx, dy = pts[b] - pts[a]
    key = pts[far, 0] * np.sign(dx) if dx != 0 else pts[far, 1] * np.sign(dy)
    first = far[key == key.min()]
    return int(first.min())


def quickhull(points) -> np.ndarray:
    """Convex hull by QuickHull (recursive farthest-point splitting, run with an explicit stack).

    ``points``: ``[n, 2]``. Returns int64 vertex indices in the module's convention.
    Expected O(n log h) on random input, O(n h) at worst.
    """
    pts = _planar_points(points)
    if len(pts) == 0:
        return _EMPTY
    lo, hi = _lex_extremes(pts)
    if (pts[lo] == pts[hi]).all():
        return np.array([lo], dtype=np.int64)
    side = orient2d(pts[lo], pts[hi], pts)
    out = [lo]
    stack = [(hi, lo, np.flatnonzero(side > 0)), hi, (lo, hi, np.flatnonzero(side < 0))]
    while stack:
        task = stack.pop()
        if isinstance(task, int):
            out.append(task)
            continue
        a, b, sub = task
        if not sub.size:
            continue
        c = _farthest_right(pts, a, b, sub)
        right_ac = sub[orient2d(pts[a], pts[c], pts[sub]) < 0]
        right_cb = sub[orient2d(pts[c], pts[b], pts[sub]) < 0]
        stack += [(c, b, right_cb), c, (a, c, right_ac)]
    return np.array(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Chan's output-sensitive algorithm


def _farther(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exactly, whether ``b`` is farther from ``p`` than ``a``, for ``a``, ``b`` on one ray from
    ``p`` (or ``a == p``). ``p`` ``[2]``, ``a``, ``b`` ``[..., 2]``; bool ``[...]``."""
    a_is_p = (a == p).all(axis=-1)
    with np.errstate(over="ignore"):  # a difference that overflows keeps its sign, all we use
        out_x = np.sign(a[..., 0] - p[0]) * np.sign(b[..., 0] - a[..., 0]) > 0
        out_y = np.sign(a[..., 1] - p[1]) * np.sign(b[..., 1] - a[..., 1]) > 0
    along = np.where(a[..., 0] != p[0], out_x, out_y)
    return np.where(a_is_p, (b != p).any(axis=-1), along)


def _beats(pts: np.ndarray, p: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether candidate ``b`` is a better next gift-wrapping vertex from ``pts[p]`` than ``a``
    (more clockwise, then farther, then the smaller index of equal points); ``-1`` = no candidate.
    Valid when all candidates lie in a closed half-plane behind the last hull edge."""
    pa, pb, pp = pts[a], pts[b], pts[p]
    turn = orient2d(pp, pa, pb)
    same = (pa == pb).all(axis=-1)
    ahead = (turn < 0) | ((turn == 0) & ~same & _farther(pp, pa, pb)) | (same & (b < a))
    return (b >= 0) & ((a < 0) | ahead)


def _tournament(pts: np.ndarray, p: int, cand: np.ndarray) -> np.ndarray:
    """Position, along the last axis of ``cand`` (int64 ``[..., L]``, -1 = empty), of the best
    gift-wrapping candidate from ``pts[p]`` (see :func:`_beats`), by pairwise elimination."""
    pos = np.broadcast_to(np.arange(cand.shape[-1]), cand.shape)
    while cand.shape[-1] > 1:
        if cand.shape[-1] % 2:
            pad = [(0, 0)] * (cand.ndim - 1) + [(0, 1)]
            cand = np.pad(cand, pad, constant_values=-1)
            pos = np.pad(pos, pad, constant_values=-1)
        win = _beats(pts, p, cand[..., 0::2], cand[..., 1::2])
        cand = np.where(win, cand[..., 1::2], cand[..., 0::2])
        pos = np.where(win, pos[..., 1::2], pos[..., 0::2])
    return pos[..., 0].copy()  # pos may still be the read-only broadcast, and callers advance it


def _chan_round(pts: np.ndarray, m: int):
    """One round of Chan's algorithm with group size ``m``: hulls of the groups, then at most
    ``m`` gift-wrapping steps. Returns the hull, or None if it has more than ``m`` vertices."""
    n = len(pts)
    idx = np.arange(n)
    vert, vgid = group_hulls(pts, idx, m)
    n_groups = -(-n // m)
    if n_groups == 1:
        return vert
    counts = np.bincount(vgid, minlength=n_groups)
    col = np.arange(vert.size) - (np.cumsum(counts) - counts)[vgid]
    hulls = np.full((n_groups, counts.max()), -1, dtype=np.int64)
    hulls[vgid, col] = vert
    rows = np.arange(n_groups)
    # the lexicographic minimum of the set is the smallest of the groups' first vertices
    firsts = hulls[:, 0]
    start = int(firsts[np.lexsort((firsts, pts[firsts, 1], pts[firsts, 0]))[0]])
    # tangent pointers from the start, then advanced monotonically (they only move forward)
    ptr = _tournament(pts, start, hulls)
    out, p = [start], start
    for _ in range(m):
        active = rows
        # A pointer that moved counts times would be back at its start, and circle for ever: with
        # exact predicates it never does, and the bound makes a broken predicate fail, not hang.
        for _ in range(counts.max() + 1):
            if not active.size:
                break
            cur = hulls[active, ptr[active]]
            nxt_col = (ptr[active] + 1) % counts[active]
            nxt = hulls[active, nxt_col]
            turn = orient2d(pts[p], pts[cur], pts[nxt])
            farther = _farther(pts[p], pts[cur], pts[nxt])
            # a collinear closer next vertex means the edge points at p: the tangent lies beyond
            move = (turn < 0) | ((turn == 0) & (farther | ((nxt != cur) & (counts[active] > 2))))
            ptr[active[move]] = nxt_col[move]
            active = active[move]
        else:
            raise RuntimeError("chan_hull: a tangent search did not stop (inconsistent predicate)")
        tangents = hulls[rows, ptr]
        q = int(tangents[_tournament(pts, p, tangents)])
        if q == start:
            return np.array(out, dtype=np.int64)
        out.append(q)
        p = q
    return None


def chan_hull(points) -> np.ndarray:
    """Convex hull by Chan's output-sensitive algorithm, O(n log h).

    Rounds t = 1, 2, ... use group size m = min(n, 2**(2**t)): the groups' hulls are computed
    together by the vectorized monotone chain, then gift wrapping over the group hulls, with one
    tangent pointer per group that only moves forward, runs for at most m steps. A round that
    does not close the hull is abandoned. ``points``: ``[n, 2]``; output as the module states.
    """
    pts = _planar_points(points)
    if len(pts) == 0:
        return _EMPTY
    t = 1
    while True:
        hull = _chan_round(pts, min(len(pts), 2 ** (2**t)))
        if hull is not None:
            return hull
        t += 1


# ----------------------------------------------------------------------------------------------
# 3-D maxima


def maxima_3d(points) -> np.ndarray:
    """Maximal points (Pareto set, every coordinate maximized) of ``points`` ``[n, 3]``.

    p is dominated when another point q has q >= p in every coordinate and q != p; copies of a
    maximal point are reported once, by their smallest index. Returns increasing int64 indices.
    A vectorized pre-filter removes the points dominated by a few strong points (the maxima of
    the coordinate sum and of each coordinate); a sweep in decreasing x with a (y, z) staircase
    (bisection on sorted lists) settles the rest.
    """
    pts = check_points(points, dim=3)
    n = len(pts)
    if n == 0:
        return _EMPTY
    idx = np.arange(n)
    alive = np.ones(n, dtype=bool)
    for s in {int(pts.sum(axis=1).argmax()), *map(int, pts.argmax(axis=0))}:
        below = (pts <= pts[s]).all(axis=1)
        copy = (pts == pts[s]).all(axis=1)
        alive &= ~(below & ~copy) & ~(copy & (idx > s))
    cand = idx[alive]
    order = cand[np.lexsort((cand, -pts[cand, 2], -pts[cand, 1], -pts[cand, 0]))]
    ys: list[float] = []
    neg_zs: list[float] = []  # staircase: y increasing, z decreasing
    out = []
    for i in order.tolist():
        y, z = pts[i, 1], pts[i, 2]
        j = bisect_left(ys, y)
        if j < len(ys) and -neg_zs[j] >= z:
            continue
        out.append(i)
        hi = bisect_right(ys, y)
        lo = bisect_left(neg_zs, -z, 0, hi)
        ys[lo:hi] = [y]
        neg_zs[lo:hi] = [-z]
    return np.sort(np.array(out, dtype=np.int64))
