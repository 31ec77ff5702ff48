"""EntropyNet: a PointNet-style residual network that moves points to lower their entropy.

``S' = S + f(S)`` (MATH.md section 7). ``f`` works in the normalized frame (centred, RMS radius 1)
and its offsets are scaled back, so the network is translation and scale equivariant. Layers:
a shared per-point MLP ``d -> 64 -> 128 -> 256``, a max-pool over the points giving a global
256-d feature, which is concatenated to every point's 64-d feature, and a per-point MLP
``320 -> 128 -> d`` producing the offsets (last layer initialized to zero, so ``f = 0`` at start).

Loss: ``Chamfer(S, S') + lambda * H_diff(S') + mu * mean_i ||S'_i - S_i||^2`` on normalized
coordinates, with ``lambda = 0.1`` (MATH.md) and ``mu = 0.1`` (our default; MATH.md names none).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .estimators import (ball_entropy, centre_and_scale, default_num_anchors, kmeans_pp,
                         normalize_points)

DEFAULT_LAMBDA = 0.1
DEFAULT_MU = 0.1


def _mlp(*widths: int) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class EntropyNet(nn.Module):
    """``forward(x)``: ``x`` ``[B, n, d]`` or ``[n, d]`` (floating point, ``d = dim``) -> ``S'`` of the
    same shape and dtype; an empty set (``n = 0``) is returned as it is (a copy)."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.dim = dim
        self.local = _mlp(dim, 64)
        self.glob = _mlp(64, 128, 256)
        self.head = nn.Sequential(_mlp(64 + 256, 128), nn.Linear(128, dim))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def offsets(self, z: torch.Tensor) -> torch.Tensor:
        """``f`` on normalized points ``z`` ``[B, n, d]``; returns ``[B, n, d]``."""
        local = self.local(z)
        pooled = self.glob(local).amax(dim=1, keepdim=True)
        return self.head(torch.cat([local, pooled.expand(-1, z.shape[1], -1)], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"points must have shape [B, n, {self.dim}] or [n, {self.dim}] (EntropyNet(dim="
                             f"{self.dim})), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"points must be floating point, got {x.dtype}")
        if x.shape[-2] == 0:  # nothing to move (and the max-pool has no identity)
            return x.clone()
        xb = x.unsqueeze(0) if x.dim() == 2 else x
        centre, radius = centre_and_scale(xb)
        out = xb + radius * self.offsets((xb - centre) / radius)
        return out[0] if x.dim() == 2 else out


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric squared Chamfer distance, ``[B, n, d]`` x ``[B, m, d]`` -> ``[B]``:
    ``mean_i min_j ||a_i - b_j||^2 + mean_j min_i ||a_i - b_j||^2`` (O(n m) memory)."""
    sq = torch.cdist(a, b).square()
    return sq.amin(dim=2).mean(dim=1) + sq.amin(dim=1).mean(dim=1)


def entropynet_loss(s: torch.Tensor, s_new: torch.Tensor, anchors: torch.Tensor | None = None,
                    lam: float = DEFAULT_LAMBDA, mu: float = DEFAULT_MU) -> torch.Tensor:
    """Mean over the batch of ``Chamfer + lam * H_diff(S') + mu * mean ||S' - S||^2``, all on
    coordinates normalized by the frame of ``s`` (``[B, n, d]``). ``anchors`` (``[k, d]`` or
    ``[B, k, d]``, normalized frame) default to k-means++ on ``s``; pass them for a deterministic
    loss."""
    centre, radius = centre_and_scale(s)
    z, z_new = (s - centre) / radius, (s_new - centre) / radius
    if anchors is None:
        anchors = kmeans_pp(z, default_num_anchors(s.shape[1]))
    entropy = ball_entropy(z_new, anchors)
    move = (z_new - z).square().sum(-1).mean(-1)
    return (chamfer(z, z_new) + lam * entropy + mu * move).mean()


def train_entropynet(
    net: EntropyNet,
    sample: Callable[[torch.Generator], torch.Tensor],
    steps: int = 200,
    lr: float = 1e-3,
    lam: float = DEFAULT_LAMBDA,
    mu: float = DEFAULT_MU,
    seed: int = 0,
    progress: bool = True,
    anchors: torch.Tensor | None = None,
) -> list[float]:
    """Train ``net`` with Adam on batches ``sample(generator)`` (``[B, n, d]``) for ``steps``
    steps. The entropy term uses ``anchors`` (``[k, d]``, normalized frame, e.g.
    :func:`~entropy_attn.geometry.grid_anchors`) or, if None, k-means++ seeds of each batch drawn
    from the same generator; a fixed ``seed`` makes the run deterministic. Shows a tqdm bar when ``progress`` and tqdm is
    installed. Returns the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    bar: Iterable[int] = range(steps)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(bar, desc="EntropyNet", unit="step")
    losses = []
    for _ in bar:
        s = sample(gen)
        batch_anchors = anchors if anchors is not None else kmeans_pp(
            normalize_points(s), default_num_anchors(s.shape[1]), gen)
        loss = entropynet_loss(s, net(s), batch_anchors, lam, mu)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def save_entropynet(net: EntropyNet, path) -> None:
    """Save the weights and the input dimension of ``net`` to ``path`` (``torch.save``)."""
    torch.save({"dim": net.dim, "state_dict": net.state_dict()}, path)


def load_entropynet(path, map_location="cpu") -> EntropyNet:
    """Rebuild an :class:`EntropyNet` saved by :func:`save_entropynet`."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    net = EntropyNet(blob["dim"])
    net.load_state_dict(blob["state_dict"])
    return net
