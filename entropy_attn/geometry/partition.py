"""Hard range-partition entropy (MATH.md section 7), the ground truth for the estimators.

Range family: axis-parallel boxes with every side at most ``width`` (intervals of length at most
``width`` in 1-D), measured in the normalized frame of the estimators (centred, RMS radius 1), so
the entropy is invariant to scaling and translation. A partition of S is admissible when each part
is exactly ``S cap R`` for a box R of the family (a box takes every point of S inside it). Its cost
is ``sum_P |P| log(n / |P|)`` (nats; divide by n for a per-point entropy), and

    H_w(S) = min over admissible partitions of sum_P |P| log(n / |P|).

Merging parts never raises the cost, so without a size limit the whole set would be one part
(H = 0); ``width`` sets the scale, as ``alpha`` does for the ball estimator (radius ~ 1/sqrt(alpha)).

Exact search: in 1-D the parts are runs of the sorted values (ties never split) spanning at most
``width``, and a dynamic program over run ends finds the optimum in O(n * window). In 2-D the
candidate parts are ``S cap bbox(P)`` for all boxes spanned by point coordinates with sides at most
``width`` (O(n^4) candidates), and a dynamic program over subsets (always extending the lowest
uncovered point) finds the optimum: exact up to ``max_exact`` points (default 12). For larger 2-D
sets :func:`range_partition_bounds` gives ``n log(n / M) <= H_w <= grid cost``, with M the largest
number of points in one box of the family and the upper bound the best of four shifted grids of
cell side ``width``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._inputs import finite_number
from .estimators import normalize_points


def partition_cost(sizes) -> float:
    """``sum_P |P| log(n / |P|)`` for part sizes ``sizes`` (n = their sum), in nats."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return float((sizes * np.log(sizes.sum() / sizes)).sum())


def _normalized(points, width: float, normalize: bool) -> np.ndarray:
    """``points`` as a float64 ``[n, d]`` array (``[n]`` is 1-D), normalized if asked, after checking
    them and the range width."""
    finite_number("width", width)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[:, None]
    if pts.ndim != 2 or not np.isfinite(pts).all():
        raise ValueError(f"points must be a finite [n, d] or [n] array, got shape {pts.shape}")
    return normalize_points(torch.from_numpy(pts)).numpy() if normalize else pts


def _entropy_1d(v: np.ndarray, width: float) -> float:
    v = np.sort(v)
    n = v.size
    boundary = np.ones(n + 1, dtype=bool)  # a part may start / end at i only between distinct values
    boundary[1:n] = v[1:] != v[:-1]
    start = np.searchsorted(v, v - width, side="left")  # first i with v[i] >= v[j-1] - width
    dp = np.full(n + 1, np.inf)
    dp[0] = 0.0
    for j in range(1, n + 1):
        if not boundary[j]:
            continue
        i = np.arange(start[j - 1], j)
        size = j - i
        dp[j] = (dp[i] + size * np.log(n / size)).min()
    return float(dp[n])


def _box_parts(pts: np.ndarray, width: float) -> list[int]:
    """Bitmasks of the distinct non-empty sets ``S cap B`` over boxes of the family."""
    axes = []
    for coord in pts.T:
        lo, hi = np.meshgrid(coord, coord, indexing="ij")
        ok = (hi >= lo) & (hi - lo <= width)
        axes.append((coord >= lo[ok][:, None]) & (coord <= hi[ok][:, None]))
    inside = axes[0][:, None, :] & axes[1][None, :, :]
    bits = (inside.reshape(-1, len(pts)) * (1 << np.arange(len(pts)))).sum(axis=1)
    return sorted({int(b) for b in bits if b})


def _entropy_2d_exact(pts: np.ndarray, width: float) -> float:
    n = len(pts)
    full = (1 << n) - 1
    by_point = [[] for _ in range(n)]
    for part in _box_parts(pts, width):
        low = (part & -part).bit_length() - 1
        by_point[low].append((part, bin(part).count("1")))
    cost = [0.0] + [s * math.log(n / s) for s in range(1, n + 1)]
    dp = [math.inf] * (full + 1)
    dp[0] = 0.0
    for covered in range(full):
        base = dp[covered]
        if base == math.inf:
            continue
        free = ~covered & full
        low = (free & -free).bit_length() - 1
        for part, size in by_point[low]:
            if not part & covered:
                new = covered | part
                if base + cost[size] < dp[new]:
                    dp[new] = base + cost[size]
    return dp[full]


def range_partition_entropy(points, width: float = 0.5, normalize: bool = True,
                            max_exact: int = 12) -> float:
    """Exact ``H_w(S)`` (nats, not divided by n) for ``points`` ``[n]``/``[n, 1]`` (any n) or
    ``[n, 2]`` with ``n <= max_exact``; see the module docstring. ``ValueError`` otherwise."""
    pts = _normalized(points, width, normalize)
    n, d = pts.shape
    if n == 0:
        return 0.0
    if d == 1:
        return _entropy_1d(pts[:, 0], width)
    if d == 2 and n <= max_exact:
        return _entropy_2d_exact(pts, width)
    raise ValueError(f"exact search covers 1-D sets and 2-D sets of at most {max_exact} points "
                     f"(got {n} points in {d}-D); use range_partition_bounds")


def _max_box_count(pts: np.ndarray, width: float) -> int:
    """Largest number of points of ``pts`` ``[n, 2]`` in one box with sides ``width``."""
    order = np.argsort(pts[:, 0])
    x, y = pts[order, 0], pts[order, 1]
    end = np.searchsorted(x, x + width, side="right")
    best = 1
    for i in range(len(x)):
        ys = np.sort(y[i:end[i]])
        best = max(best, int((np.searchsorted(ys, ys + width, side="right") - np.arange(ys.size)).max()))
    return best


def range_partition_bounds(points, width: float = 0.5, normalize: bool = True):
    """``(lower, upper)`` bounds on ``H_w(S)`` for ``points`` ``[n, 2]`` of any size (O(n^2 log n)).

    lower = ``n log(n / M)`` (every part has at most M points); upper = the cost of the best of
    four grid partitions with cells of side ``width`` shifted by 0 or ``width / 2`` per axis
    (each cell's points are ``S cap bbox``, an admissible part).
    """
    pts = _normalized(points, width, normalize)
    n, d = pts.shape
    if d != 2:
        raise ValueError(f"points must have shape [n, 2], got {pts.shape}")
    if n == 0:
        return 0.0, 0.0
    lower = n * math.log(n / _max_box_count(pts, width))
    upper = math.inf
    for shift in ((0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)):
        cells = np.floor(pts / width + np.asarray(shift)).astype(np.int64)
        _, sizes = np.unique(cells, axis=0, return_counts=True)
        upper = min(upper, partition_cost(sizes))
    return lower, upper
