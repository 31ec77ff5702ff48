"""Reference implementations for the geometry tests: exact hull, scipy comparison."""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def exact_hull(points: np.ndarray) -> list[int]:
    """Reference: Andrew's stack-based monotone chain with Fraction arithmetic (small n only).
    Counter-clockwise from the lexicographic minimum, strict vertices, smallest index of copies."""
    order = sorted(range(len(points)), key=lambda i: (points[i, 0], points[i, 1], i))
    uniq = [i for k, i in enumerate(order)
            if k == 0 or tuple(points[i]) != tuple(points[order[k - 1]])]
    if len(uniq) <= 1:
        return uniq

    def cross(o, a, b):
        (ox, oy), (ax, ay), (bx, by) = ((Fraction(points[i, 0]), Fraction(points[i, 1]))
                                        for i in (o, a, b))
        return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)

    def chain(seq):
        out = []
        for i in seq:
            while len(out) >= 2 and cross(out[-2], out[-1], i) <= 0:
                out.pop()
            out.append(i)
        return out

    lower, upper = chain(uniq), chain(uniq[::-1])
    return lower[:-1] + upper[:-1]


def scipy_hull(points: np.ndarray) -> np.ndarray:
    """scipy's ConvexHull vertices rotated to start at the lexicographically smallest vertex."""
    from scipy.spatial import ConvexHull

    v = ConvexHull(points).vertices
    start = min(range(len(v)), key=lambda i: (points[v[i], 0], points[v[i], 1]))
    return np.roll(v, -start)
