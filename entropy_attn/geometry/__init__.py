"""Geometry: differentiable range-partition entropy, EntropyNet, and exact planar hulls.

See MATH.md section 7. Torch is needed for the estimators and EntropyNet; the hull algorithms
and metrics are NumPy only. scipy (extra ``geometry``) is used only by tests and benchmarks.
"""
from .entropynet import (EntropyNet, chamfer, entropynet_loss, load_entropynet, save_entropynet,
                         train_entropynet)
from .estimators import (BallEntropy, HalfspaceEntropy, ball_assignments, ball_entropy,
                         centre_and_scale, default_num_anchors, grid_anchors, halfspace_entropy,
                         halfspace_gates,
                         kmeans_pp, normalize_points)
from .hull import (akl_toussaint_filter, chan_hull, check_points, convex_hull, maxima_3d,
                   monotone_chain, quickhull, strip_hull)
from .metrics import (hausdorff_polygons, hull_area_error, hull_hausdorff, maxima_f1,
                      polygon_area)
from .partition import partition_cost, range_partition_bounds, range_partition_entropy
from .predicates import orient2d

__all__ = [
    "BallEntropy", "EntropyNet", "HalfspaceEntropy", "akl_toussaint_filter", "ball_assignments",
    "ball_entropy", "centre_and_scale", "chamfer", "chan_hull", "check_points", "convex_hull",
    "default_num_anchors", "entropynet_loss", "grid_anchors", "halfspace_entropy", "halfspace_gates",
    "hausdorff_polygons", "hull_area_error", "hull_hausdorff", "kmeans_pp", "load_entropynet",
    "maxima_3d", "maxima_f1", "monotone_chain", "normalize_points", "orient2d", "partition_cost",
    "polygon_area", "quickhull", "range_partition_bounds", "range_partition_entropy",
    "save_entropynet", "strip_hull", "train_entropynet",
]
