"""Exact geometric predicates on float64 coordinates.

The orientation test uses Shewchuk's first-stage filter: the float determinant is trusted when its
magnitude exceeds a rigorous bound on its rounding error (``ccwerrboundA``); otherwise the sign is
recomputed exactly with :class:`fractions.Fraction` (every float is a dyadic rational, so the
result is exact). Underflow to subnormals is not accounted for, as in Shewchuk's code.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

_EPS = np.finfo(np.float64).eps / 2  # unit roundoff, 2**-53
CCW_ERRBOUND = (3.0 + 16.0 * _EPS) * _EPS  # Shewchuk (1997), orient2d stage A


def orient_det(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Float orientation determinant and an upper bound on its absolute rounding error.

    ``a, b, c``: float64 arrays ``[..., 2]`` (broadcast). Returns ``(det, err)``, both ``[...]``,
    with ``det ~ (ax - cx)(by - cy) - (ay - cy)(bx - cx)`` (positive when a, b, c turn
    counter-clockwise) and ``|det - exact| < err`` unless ``det == err == 0`` (then exact).
    """
    acx = a[..., 0] - c[..., 0]
    bcx = b[..., 0] - c[..., 0]
    acy = a[..., 1] - c[..., 1]
    bcy = b[..., 1] - c[..., 1]
    left = acx * bcy
    right = acy * bcx
    return left - right, CCW_ERRBOUND * (np.abs(left) + np.abs(right))


def _exact_sign(a, b, c) -> int:
    ax, ay, bx, by, cx, cy = (Fraction(float(v)) for v in (a[0], a[1], b[0], b[1], c[0], c[1]))
    det = (ax - cx) * (by - cy) - (ay - cy) * (bx - cx)
    return (det > 0) - (det < 0)


def orient2d(a, b, c) -> np.ndarray:
    """Exact sign of the orientation of ``(a, b, c)``.

    ``a, b, c``: array-likes ``[..., 2]`` (broadcast, converted to float64). Returns an int8 array
    ``[...]``: +1 if the points turn counter-clockwise, -1 clockwise, 0 if exactly collinear.
    """
    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, c)))
    det, err = orient_det(a, b, c)
    sign = np.sign(det).astype(np.int8)
    unsure = np.flatnonzero(np.abs(det) < err)
    if unsure.size:
        shape = det.shape
        a2, b2, c2 = (v.reshape(-1, 2) for v in (a, b, c))
        flat = sign.reshape(-1)
        for i in unsure:
            flat[i] = _exact_sign(a2[i], b2[i], c2[i])
        sign = flat.reshape(shape)
    return sign
