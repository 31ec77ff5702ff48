"""Exact geometric predicates on float64 coordinates.

The orientation test uses Shewchuk's first-stage filter: the float determinant is trusted when its
magnitude reaches a rigorous bound on its rounding error (``ccwerrboundA``); otherwise the sign is
recomputed exactly with :class:`fractions.Fraction` (every float is a dyadic rational, so the
result is exact). Unlike Shewchuk's code, the bound also holds at the ends of the float range:
it carries an absolute term for products that underflow (subnormal or flushed to zero), and it is
infinite where an intermediate overflows, so every decision on finite input is exact.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

_EPS = np.finfo(np.float64).eps / 2  # unit roundoff, 2**-53
CCW_ERRBOUND = (3.0 + 16.0 * _EPS) * _EPS  # Shewchuk (1997), orient2d stage A
# A product that underflows is off by at most half the smallest subnormal, 2**-1075; twice that
# for the two products, with room for the rounding of the bound itself. (Sums and differences
# never lose accuracy to underflow: a subnormal result is exact.)
UNDERFLOW_ERR = 2.0**-1072


def orient_det(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Float orientation determinant and a strict bound on its absolute rounding error.

    ``a, b, c``: float64 arrays ``[..., 2]`` (broadcast). Returns ``(det, err)``, both float64
    ``[...]``, with ``det ~ (ax - cx)(by - cy) - (ay - cy)(bx - cx)`` (positive when a, b, c turn
    counter-clockwise) and ``|det - exact| < err`` (so ``|det| >= err`` certifies the sign of det).
    Where the float evaluation overflows, ``det = 0`` and ``err = inf`` (no certificate).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below
        left = (a[..., 0] - c[..., 0]) * (b[..., 1] - c[..., 1])
        right = (a[..., 1] - c[..., 1]) * (b[..., 0] - c[..., 0])
        det = left - right
        err = np.abs(left)  # then in place: fewer temporaries are markedly faster on large arrays
        err += np.abs(right)
        err *= CCW_ERRBOUND
        err += UNDERFLOW_ERR
        # An inf or NaN anywhere above reaches err (|left| + |right| >= |det|), and then its sum
        # (a sum that overflows on its own is a false alarm, which only costs the elementwise test).
        if not np.isfinite(err.sum()):
            overflow = ~np.isfinite(err)
            det, err = np.where(overflow, 0.0, det), np.where(overflow, np.inf, err)
    return det, err


def _zero_products(ax, ay, bx, by, cx, cy) -> np.ndarray:
    """Whether each product of the determinant has a zero factor (an equal coordinate pair), so
    that the triple is exactly collinear: bool, from float64 coordinate arrays of one shape."""
    return ((ax == cx) | (by == cy)) & ((ay == cy) | (bx == cx))


def _exact_signs(ax, ay, bx, by, cx, cy) -> np.ndarray:
    """Exact orientation signs, int8 ``[k]``, of the triples with float64 coordinates ``[k]`` each:
    0 where :func:`_zero_products` holds (no arithmetic), Fractions elsewhere."""
    sign = np.zeros(ax.size, dtype=np.int8)
    for i in np.flatnonzero(~_zero_products(ax, ay, bx, by, cx, cy)):
        fax, fay, fbx, fby, fcx, fcy = (Fraction(float(v[i])) for v in (ax, ay, bx, by, cx, cy))
        det = (fax - fcx) * (fby - fcy) - (fay - fcy) * (fbx - fcx)
        sign[i] = (det > 0) - (det < 0)
    return sign


def orient2d(a, b, c) -> np.ndarray:
    """Exact sign of the orientation of ``(a, b, c)``.

    ``a, b, c``: array-likes ``[..., 2]`` (broadcast, converted to float64). Returns an int8 array
    ``[...]``: +1 if the points turn counter-clockwise, -1 clockwise, 0 if exactly collinear.
    """
    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, c)))
    if a.ndim == 1:  # a single triple: the exact path below indexes arrays of triples
        return orient2d(a[None], b[None], c[None])[0]
    det, err = orient_det(a, b, c)
    sign = np.sign(det).astype(np.int8)
    unsure = np.abs(det) < err
    if unsure.any():
        cols = [v[..., j] for v in (a, b, c) for j in (0, 1)]
        # Axis-parallel runs (grids) are uncertified only by the underflow term of err, and can be
        # most triples: then settling the zero products in bulk is cheaper than gathering them.
        if np.count_nonzero(unsure) > unsure.size // 4:
            unsure &= ~_zero_products(*cols)
        at = np.nonzero(unsure)
        if at[0].size:  # gathering columns is cheap also for broadcast (stride-0) inputs
            sign[at] = _exact_signs(*(col[at] for col in cols))
    return sign
