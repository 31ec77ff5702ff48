"""Metrics on shapes with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from entropy_attn.geometry import (hausdorff_polygons, hull_area_error, hull_hausdorff,
                                   maxima_f1, polygon_area)

SQUARE = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])


def test_area():
    assert polygon_area(SQUARE) == 1.0
    assert polygon_area(SQUARE[::-1]) == -1.0
    assert polygon_area(2 * SQUARE) == 4.0


def test_hull_area_error(rng):
    inner = rng.random((300, 2))
    assert hull_area_error(np.r_[SQUARE, inner], 0.9 * np.r_[SQUARE, inner]) == pytest.approx(0.19)
    assert hull_area_error(SQUARE, SQUARE + 5) == 0.0


def test_area_far_from_origin(rng):
    """The shoelace sum over absolute coordinates cancelled: 0 at 1e8, -268435456 at 1e12."""
    for offset in (1e8, 1e12):
        assert polygon_area(SQUARE + offset) == 1.0
    inner = rng.random((300, 2))
    near = hull_area_error(np.r_[SQUARE, inner], 0.9 * np.r_[SQUARE, inner])
    far = hull_area_error(np.r_[SQUARE, inner] + 1e8, 0.9 * np.r_[SQUARE, inner] + 1e8)
    assert far == pytest.approx(near, rel=1e-6)


def test_degenerate_input_raises():
    for flat in ([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="zero area"):
            hull_area_error(flat, SQUARE)
    with pytest.raises(ValueError, match="non-empty"):
        hausdorff_polygons(np.zeros((0, 2)), SQUARE)


def test_hausdorff():
    centred = SQUARE - 0.5
    assert hausdorff_polygons(2 * centred, 4 * centred) == pytest.approx(math.sqrt(2))
    assert hausdorff_polygons(SQUARE, SQUARE + [0.1, 0.0]) == pytest.approx(0.1)
    assert hausdorff_polygons(SQUARE, SQUARE) == 0.0
    # farthest point mid-edge: triangle inside the square, error at most half a sample spacing
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert hausdorff_polygons(tri, SQUARE, 64) == pytest.approx(math.sqrt(0.5), abs=1 / 128)
    rng = np.random.default_rng(0)
    pts = rng.random((1000, 2))
    assert hull_hausdorff(pts, pts + [0.0, 0.25]) == pytest.approx(0.25)


def test_maxima_f1():
    assert maxima_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert maxima_f1([1, 2], [2, 3]) == 0.5
    assert maxima_f1([], [1]) == 0.0
    assert maxima_f1([], []) == 1.0
