"""Range-partition entropy of attention rows (shared MATH.md section 4), fused as value columns.

Keys carry coordinates ``x_j`` (normalized 1-D positions by default, or 2-D patch coordinates);
soft cells ``G [Nk, k]`` assign each key to k regions; ``M = P G`` is each row's attention mass per
cell and ``Hr_i = -sum_r M_ir log M_ir``. ``M`` has the shape of ``P V``, so the attention kernel
computes it as ``[V | G]`` in the same pass, and its backward is the one of extra output columns:
autograd supplies ``dM = -g (log M + 1)`` and the fused backward does the rest, including
``dG = P^T dM``, which flows on to the anchors (and the positions, if they are learned).

Keys without a position (a ViT class token: a NaN row in ``positions``) form one extra cell.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry.estimators import ball_assignments, grid_anchors, halfspace_gates, kmeans_pp

DEFAULT_ALPHA = 5.0


def default_num_anchors(n_keys: int) -> int:
    """ceil(sqrt(Nk)), the paper's default count of anchors."""
    return max(1, math.ceil(math.sqrt(n_keys)))


def sequence_positions(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalized 1-D positions ``j / (n - 1)`` as ``[n, 1]`` (0 when n = 1)."""
    return torch.linspace(0.0, 1.0, n, device=device, dtype=dtype)[:, None] if n > 1 else torch.zeros(1, 1, device=device, dtype=dtype)


def patch_positions(rows: int, cols: int, *, class_token: bool = False, device=None, dtype=torch.float32) -> torch.Tensor:
    """(row, col) of each patch of a ``rows x cols`` grid scaled to [0, 1]^2, row-major, as
    ``[rows * cols (+1), 2]``; with ``class_token`` a first NaN row (a key with no position)."""
    r = sequence_positions(rows, device=device, dtype=dtype)[:, 0]
    c = sequence_positions(cols, device=device, dtype=dtype)[:, 0]
    pos = torch.cartesian_prod(r, c).reshape(-1, 2)
    if class_token:
        pos = torch.cat([torch.full((1, 2), float("nan"), device=device, dtype=dtype), pos])
    return pos


def init_anchors(positions: torch.Tensor, k: int | None = None, *, method: str = "grid",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial anchors ``[k, c]`` for ``positions [Nk, c]``: a uniform grid over [0, 1]^c
    (``k`` rounded to a power of the dimension) or k-means++ seeds among the positioned keys."""
    placed = positions[~positions.isnan().any(-1)]
    c = positions.shape[-1]
    k = default_num_anchors(len(placed)) if k is None else k
    if method == "grid":
        return (grid_anchors(k, c, extent=0.5, dtype=positions.dtype, device=positions.device) + 0.5).contiguous()
    if method == "kmeans++":
        return kmeans_pp(placed, k, generator=generator)
    raise ValueError(f"method must be 'grid' or 'kmeans++', got {method!r}")


def _with_unplaced_cell(positions: torch.Tensor, cells_of_placed) -> torch.Tensor:
    """Cells ``[Nk, k]`` of the positioned keys, plus one cell of the keys without a position
    when there are any (``[Nk, k + 1]``)."""
    unplaced = positions.isnan().any(-1, keepdim=True)
    g = cells_of_placed(torch.where(unplaced, torch.zeros_like(positions), positions))
    if not unplaced.any():
        return g
    return torch.cat([g.masked_fill(unplaced, 0.0), unplaced.to(g.dtype)], dim=-1)


def ball_cells(positions: torch.Tensor, anchors: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Soft ball cells ``G_jr = softmax_r(-alpha ||x_j - a_r||^2)``: ``positions [Nk, c]``,
    ``anchors [k, c]`` -> ``[Nk, k]`` (``[Nk, k + 1]`` with position-less keys), in positions'
    dtype. Computed in float64 (``[Nk, k]`` is small), where no squared distance of finite float32
    coordinates and no ``alpha`` overflows."""
    def cells(x):
        return ball_assignments(x[None].double(), anchors.double(), alpha)[0].to(positions.dtype)
    return _with_unplaced_cell(positions, cells)


def halfspace_cells(positions: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """The halfspace variant (paper appendix F): ``m`` soft halfspaces
    ``sigmoid((w_t . x - b_t) / tau)`` combined by normalized product gating into ``2**m`` cells.
    ``normals [m, c]``, ``offsets [m]`` -> ``[Nk, 2**m]``."""
    return _with_unplaced_cell(positions, lambda x: halfspace_gates(x[None], normals, offsets, tau)[0])


def interval_cells(positions: torch.Tensor, thresholds: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """1-D soft intervals: the halfspace gating of sorted thresholds ``b_1 < ... < b_m`` kept to
    its ``m + 1`` consistent sign codes (cell r: right of the first r thresholds, left of the
    rest), normalized. ``positions [Nk, 1]``, ``thresholds [m]`` -> ``[Nk, m + 1]``."""
    def cells(x):
        z = (x - thresholds.sort().values) / tau  # [Nk, m]
        right = F.pad(F.logsigmoid(z).cumsum(-1), (1, 0))  # sum over t < r
        left = F.pad(F.logsigmoid(-z).flip(-1).cumsum(-1), (1, 0)).flip(-1)  # sum over t >= r
        return torch.softmax(right + left, dim=-1)

    return _with_unplaced_cell(positions, cells)


def cell_entropy(mass: torch.Tensor) -> torch.Tensor:
    """``-sum_r M_r log M_r`` over the last dim, in float32 (float64 stays), with 0 log 0 = 0 and
    a finite gradient at M = 0 (the rows with no key)."""
    m = mass.float() if mass.dtype != torch.float64 else mass
    return -(m * m.clamp_min(torch.finfo(m.dtype).tiny).log()).sum(-1)
