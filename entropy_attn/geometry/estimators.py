"""Differentiable range-partition entropy estimators of point sets (MATH.md section 7).

Shapes: points ``x`` are ``[B, n, d]`` or ``[n, d]`` (any floating dtype, any device; float64
works throughout). Estimators return ``[B]``, or a 0-d tensor for ``[n, d]`` input. Every function
is differentiable in the points and in its parameters (anchors, halfspaces).

With ``normalize=True`` (the default) points are first centred and divided by their RMS radius,
so that ``H(lambda * S + t) == H(S)``, also at extreme scales (no raw coordinate is squared);
anchors and halfspaces then live in that normalized frame.

An empty set (``n == 0``) raises ``ValueError``: the estimators average over the points, which is
undefined there (the hard entropy of :mod:`.partition`, a minimum over partitions, is 0 instead).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_ALPHA = 10.0
DEFAULT_TAU = 0.1


def _require_points(x: torch.Tensor) -> None:
    """``ValueError`` if the set ``x`` ``[..., n, d]`` is empty (see the module docstring)."""
    if x.shape[-2] == 0:
        raise ValueError(f"the estimators need at least one point, got shape {tuple(x.shape)}")


def _batched(x: torch.Tensor):
    """``x`` as ``[B, n, d]`` and whether the batch axis was added; ``ValueError`` on another
    shape or an empty set."""
    if x.dim() not in (2, 3):
        raise ValueError(f"points must have shape [B, n, d] or [n, d], got {tuple(x.shape)}")
    _require_points(x)
    return (x.unsqueeze(0), True) if x.dim() == 2 else (x, False)


def centre_and_scale(x: torch.Tensor):
    """Centroid ``[..., 1, d]`` and RMS radius ``sqrt(mean_i ||x_i - mean||^2)`` ``[..., 1, 1]``
    of ``x`` ``[..., n, d]``.

    The deviations are divided by their largest magnitude before squaring, so that the squares
    neither overflow nor underflow at any scale where the deviations are finite; that divisor is
    detached (the radius does not depend on it). A zero radius (all points equal, or ``n == 0``)
    is replaced by 1, with zero gradient (the square root is taken of the replaced mean square, so
    its backward never meets sqrt(0)).
    """
    centre = x.mean(dim=-2, keepdim=True)
    if x.shape[-2] == 0:  # no deviation to scale by (amax has no identity)
        return centre, torch.ones_like(centre[..., :1])
    dev = x - centre
    peak = dev.detach().abs().amax(dim=(-2, -1), keepdim=True)
    spread = peak > 0
    peak = torch.where(spread, peak, torch.ones_like(peak))
    mean_sq = (dev / peak).square().sum(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)
    return centre, peak * torch.where(spread, mean_sq, torch.ones_like(mean_sq)).sqrt()


def normalize_points(x: torch.Tensor) -> torch.Tensor:
    """Centre each set and divide it by its RMS radius (see :func:`centre_and_scale`).

    ``x``: ``[..., n, d]``; returns the same shape and dtype.
    """
    centre, radius = centre_and_scale(x)
    return (x - centre) / radius


def default_num_anchors(n: int) -> int:
    """The paper's default ``k = min(16, n / 4)`` (at least 1)."""
    return max(1, min(16, n // 4))


@torch.no_grad()
def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) of ``k`` anchors among the points.

    ``x``: ``[B, n, d]`` or ``[n, d]``; returns ``[B, k, d]`` or ``[k, d]`` (detached copies of
    points). ``generator`` (on ``x``'s device) makes it reproducible.
    """
    xb, squeeze = _batched(x)
    batch, n, _ = xb.shape
    rows = torch.arange(batch, device=xb.device)
    first = torch.randint(n, (batch,), device=xb.device, generator=generator)
    anchors = [xb[rows, first]]
    dist = (xb - anchors[0][:, None]).square().sum(-1)
    for _ in range(1, k):
        weights = torch.where(dist.sum(-1, keepdim=True) > 0, dist, torch.ones_like(dist))
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        anchors.append(xb[rows, pick])
        dist = torch.minimum(dist, (xb - anchors[-1][:, None]).square().sum(-1))
    out = torch.stack(anchors, dim=1)
    return out[0] if squeeze else out


def grid_anchors(k: int, d: int, extent: float = 2.0, dtype=torch.float64, device=None):
    """Fixed anchors on a regular grid of ``round(k ** (1/d))`` points per axis over
    ``[-extent, extent]^d`` of the normalized frame; returns ``[m**d, d]``.

    Unlike k-means++ seeds, which follow the data and so split any set about evenly, fixed
    anchors make ``H_diff`` measure how concentrated a set is (see the correlation study in
    ``benchmarks/RESULTS.md``).
    """
    axis = torch.linspace(-extent, extent, max(1, round(k ** (1 / d))), dtype=dtype, device=device)
    return torch.cartesian_prod(*[axis] * d).reshape(-1, d)


def _entropy_of_mean(weights: torch.Tensor) -> torch.Tensor:
    """``-sum_r p_r log p_r`` with ``p_r = mean_i weights[..., i, r]``; ``[B, n, k] -> [B]``."""
    p = weights.mean(dim=-2)
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=-1)


def ball_assignments(x: torch.Tensor, anchors: torch.Tensor, alpha: float = DEFAULT_ALPHA):
    """Soft ball memberships ``p_ir = softmax_r(-alpha ||x_i - c_r||^2)``.

    ``x``: ``[B, n, d]``; ``anchors``: ``[k, d]`` or ``[B, k, d]``. Returns ``[B, n, k]``. The
    squared distances are formed from differences (not ``torch.cdist``), so the gradient is exact
    also where a point sits on an anchor, and each point's are taken relative to its nearest
    anchor's (softmax is invariant to the shift), so that a large ``alpha`` makes the memberships
    hard instead of every term -inf (NaN).
    """
    sq = (x[:, :, None, :] - anchors[..., None, :, :]).square().sum(-1)
    sq = sq - sq.detach().amin(-1, keepdim=True)
    return torch.softmax(-alpha * sq, dim=-1)


def ball_entropy(
    x: torch.Tensor,
    anchors: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    k: int | None = None,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ball estimator ``H_diff = -sum_r p_r log p_r``, ``p_r = mean_i p_ir`` (MATH.md 7).

    ``x``: ``[B, n, d]`` or ``[n, d]``. ``anchors``: ``[k, d]`` or ``[B, k, d]`` in the
    (normalized) frame of ``x``; if None, ``k`` (default :func:`default_num_anchors`) anchors
    are seeded by :func:`kmeans_pp` on the detached points with ``generator``. Returns ``[B]``
    (or 0-d), in nats, between 0 and ``log k``.
    """
    xb, squeeze = _batched(x)
    if normalize:
        xb = normalize_points(xb)
    if anchors is None:
        anchors = kmeans_pp(xb.detach(), k or default_num_anchors(xb.shape[1]), generator)
    h = _entropy_of_mean(ball_assignments(xb, anchors, alpha))
    return h[0] if squeeze else h


def _sign_codes(m: int, like: torch.Tensor) -> torch.Tensor:
    """All ``2**m`` sign codes as a ``[2**m, m]`` 0/1 tensor (dtype and device of ``like``)."""
    return torch.tensor(list(itertools.product((0, 1), repeat=m)), dtype=like.dtype, device=like.device)


def halfspace_gates(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, tau: float = DEFAULT_TAU):
    """Soft cells of ``m`` soft halfspaces ``h_t(x) = sigmoid((w_t . x - b_t) / tau)``.

    The cell of sign code ``j`` gets the normalized product gate
    ``g_j(x) = prod_t h_t^{j_t} (1 - h_t)^{1 - j_t} / sum_j' (same)``, computed in log space.
    ``x``: ``[B, n, d]``; ``normals``: ``[m, d]``; ``offsets``: ``[m]``. Returns ``[B, n, 2**m]``.
    """
    z = (x @ normals.transpose(-1, -2) - offsets) / tau
    codes = _sign_codes(normals.shape[-2], x)
    log_gate = F.logsigmoid(z) @ codes.T + F.logsigmoid(-z) @ (1 - codes).T
    return torch.softmax(log_gate, dim=-1)


def halfspace_entropy(
    x: torch.Tensor,
    normals: torch.Tensor,
    offsets: torch.Tensor,
    tau: float = DEFAULT_TAU,
    normalize: bool = True,
) -> torch.Tensor:
    """Halfspace estimator ``H_soft = -sum_j q_j log q_j``, ``q_j = mean_i g_j(x_i)``.

    ``x``: ``[B, n, d]`` or ``[n, d]``; ``normals`` ``[m, d]``, ``offsets`` ``[m]`` in the
    (normalized) frame; see :func:`halfspace_gates`. Returns ``[B]`` (or 0-d), at most
    ``m log 2``.
    """
    xb, squeeze = _batched(x)
    if normalize:
        xb = normalize_points(xb)
    h = _entropy_of_mean(halfspace_gates(xb, normals, offsets, tau))
    return h[0] if squeeze else h


class BallEntropy(nn.Module):
    """``H_diff`` with learnable anchors (``nn.Parameter`` ``[k, d]``) shared by the batch."""

    def __init__(self, anchors: torch.Tensor, alpha: float = DEFAULT_ALPHA, normalize: bool = True):
        super().__init__()
        self.anchors = nn.Parameter(anchors.detach().clone())
        self.alpha = alpha
        self.normalize = normalize

    @classmethod
    def from_points(cls, x: torch.Tensor, k: int | None = None, alpha: float = DEFAULT_ALPHA,
                    normalize: bool = True, generator: torch.Generator | None = None):
        """Seed the anchors by k-means++ on the (normalized) points ``x`` ``[n, d]``."""
        base = normalize_points(x) if normalize else x
        return cls(kmeans_pp(base, k or default_num_anchors(x.shape[-2]), generator), alpha, normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, n, d]`` or ``[n, d]``; returns ``[B]`` or 0-d."""
        return ball_entropy(x, self.anchors, self.alpha, normalize=self.normalize)


class HalfspaceEntropy(nn.Module):
    """``H_soft`` with learnable halfspaces: ``normals`` ``[m, d]`` and ``offsets`` ``[m]``."""

    def __init__(self, normals: torch.Tensor, offsets: torch.Tensor, tau: float = DEFAULT_TAU,
                 normalize: bool = True):
        super().__init__()
        self.normals = nn.Parameter(normals.detach().clone())
        self.offsets = nn.Parameter(offsets.detach().clone())
        self.tau = tau
        self.normalize = normalize

    @classmethod
    def from_points(cls, x: torch.Tensor, m: int = 4, tau: float = DEFAULT_TAU,
                    normalize: bool = True, generator: torch.Generator | None = None):
        """Random unit normals; each halfspace passes through a random point of ``x`` ``[n, d]``."""
        _require_points(x)
        base = normalize_points(x) if normalize else x
        normals = torch.randn(m, x.shape[-1], generator=generator, dtype=x.dtype, device=x.device)
        normals = normals / normals.norm(dim=-1, keepdim=True)
        through = base[torch.randint(x.shape[-2], (m,), generator=generator, device=x.device)]
        return cls(normals, (normals * through).sum(-1), tau, normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, n, d]`` or ``[n, d]``; returns ``[B]`` or 0-d."""
        return halfspace_entropy(x, self.normals, self.offsets, self.tau, self.normalize)
