"""Error measures for approximate hulls and maxima (MATH.md section 7).

Polygons are float64 ``[h, 2]`` vertex arrays in counter-clockwise order (as
``points[convex_hull(points)]``); a polygon of 1 or 2 vertices is a point or a segment.
"""
from __future__ import annotations

import numpy as np

from .hull import check_points, convex_hull


def polygon_area(poly) -> float:
    """Signed shoelace area of ``poly`` ``[h, 2]`` (positive for counter-clockwise order, 0 for
    fewer than 3 vertices). The sum runs over coordinates relative to the first vertex: on
    absolute ones it cancels catastrophically for a polygon far from the origin."""
    p = np.asarray(poly, dtype=np.float64)
    p = p - p[:1]
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * (x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def hull_area_error(points, approx_points) -> float:
    """``|Area(hull(S)) - Area(hull(S'))| / Area(hull(S))`` for ``[n, 2]`` and ``[m, 2]`` sets;
    ``ValueError`` when hull(S) has zero area (fewer than 3 points, or all collinear)."""
    area = [polygon_area(p[convex_hull(p)]) for p in map(check_points, (points, approx_points))]
    if area[0] == 0:
        raise ValueError("hull(S) has zero area: the relative area error is undefined")
    return abs(area[0] - area[1]) / area[0]


def _distance_to_boundary(q: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distances ``[m]`` from points ``q`` ``[m, 2]`` to the boundary of ``poly`` ``[e, 2]``
    (min over its segments, in chunks of points to bound memory by about 2**22 pairs)."""
    a, ab = poly, np.roll(poly, -1, axis=0) - poly
    len2 = (ab * ab).sum(-1)
    len2 = np.where(len2 > 0, len2, 1)
    out = np.empty(len(q))
    step = max(1, 2**22 // len(poly))
    for lo in range(0, len(q), step):
        aq = q[lo:lo + step, None, :] - a[None]
        t = np.clip((aq * ab).sum(-1) / len2, 0, 1)
        out[lo:lo + step] = np.linalg.norm(aq - t[..., None] * ab, axis=-1).min(axis=1)
    return out


def _boundary_samples(poly: np.ndarray, per_edge: int) -> np.ndarray:
    t = np.arange(per_edge)[:, None, None] / per_edge
    return (poly + t * (np.roll(poly, -1, axis=0) - poly)).reshape(-1, 2)


def hausdorff_polygons(poly_a, poly_b, samples_per_edge: int = 64) -> float:
    """Hausdorff distance between the boundaries of two convex polygons ``[h, 2]``.

    Each boundary is sampled at its vertices and ``samples_per_edge`` evenly spaced points per
    edge, and the exact distance from every sample to the other boundary (its segments) is taken.
    The result is exact when the farthest points are vertices and otherwise below the true value
    by at most half the longest sample spacing. Cost O(samples_per_edge * h_a * h_b).
    """
    a, b = (np.asarray(p, dtype=np.float64) for p in (poly_a, poly_b))
    if not (len(a) and len(b)):
        raise ValueError("the Hausdorff distance needs two non-empty polygons")
    sa, sb = _boundary_samples(a, samples_per_edge), _boundary_samples(b, samples_per_edge)
    return float(max(_distance_to_boundary(sa, b).max(), _distance_to_boundary(sb, a).max()))


def hull_hausdorff(points, approx_points, samples_per_edge: int = 64) -> float:
    """Hausdorff distance between the boundaries of ``hull(S)`` and ``hull(S')``."""
    a, b = (p[convex_hull(p)] for p in map(check_points, (points, approx_points)))
    return hausdorff_polygons(a, b, samples_per_edge)


def maxima_f1(predicted, truth) -> float:
    """F1 score of a predicted index set against the true maxima (both int arrays); 1.0 when
    both are empty."""
    pred, true = set(np.asarray(predicted).tolist()), set(np.asarray(truth).tolist())
    if not pred and not true:
        return 1.0
    hits = len(pred & true)
    return 2 * hits / (len(pred) + len(true))
