"""Estimators against float64 evaluations of the formulas, gradients, invariances, fixed point."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from entropy_attn.geometry import (BallEntropy, HalfspaceEntropy, ball_assignments, ball_entropy,
                                   default_num_anchors, halfspace_entropy, kmeans_pp,
                                   normalize_points)
from oracle import fresh_generator

D = torch.float64


def _points(n=40, d=2, seed=0):
    """Fresh standard normal points ``[n, d]`` float64; one stream per ``seed`` within a test."""
    return torch.randn(n, d, dtype=D, generator=fresh_generator(seed))


def _direct_ball(x: np.ndarray, c: np.ndarray, alpha: float) -> float:
    """H_diff straight from MATH.md 7, with explicit loops (x already normalized)."""
    n, k = len(x), len(c)
    p = np.zeros((n, k))
    for i in range(n):
        w = [math.exp(-alpha * float(((x[i] - c[r]) ** 2).sum())) for r in range(k)]
        p[i] = np.array(w) / sum(w)
    pr = p.mean(0)
    return float(-(pr * np.log(pr)).sum())


def _direct_soft(x: np.ndarray, w: np.ndarray, b: np.ndarray, tau: float) -> float:
    m = len(w)
    h = 1 / (1 + np.exp(-(x @ w.T - b) / tau))  # [n, m]
    gates = np.stack([np.prod(np.where(np.array(code), h, 1 - h), axis=1)
                      for code in itertools.product((0, 1), repeat=m)], axis=1)
    q = (gates / gates.sum(1, keepdims=True)).mean(0)
    return float(-(q * np.log(q)).sum())


def test_normalization_and_defaults():
    x = _points() * 7 + 3
    z = normalize_points(x)
    assert torch.allclose(z.mean(0), torch.zeros(2, dtype=D), atol=1e-12)
    assert torch.allclose(z.square().sum(-1).mean(), torch.tensor(1.0, dtype=D))
    assert normalize_points(torch.ones(5, 2, dtype=D)).abs().max() == 0
    assert [default_num_anchors(n) for n in (1, 8, 40, 64, 1000)] == [1, 2, 10, 16, 16]


def test_identical_points_have_finite_gradients():
    """A set of equal points (zero RMS radius, replaced by 1): finite gradients."""
    x = torch.full((30, 2), 0.5, dtype=D, requires_grad=True)
    h = ball_entropy(x, anchors=torch.randn(16, 2, dtype=D, generator=fresh_generator(3)))
    h.backward()
    assert torch.isfinite(h) and torch.isfinite(x.grad).all()
    x.grad = None
    normalize_points(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ball_entropy_matches_formula():
    x, c = _points(), _points(5, seed=1)
    for alpha in (0.5, 10.0):
        direct = _direct_ball(normalize_points(x).numpy(), c.numpy(), alpha)
        assert ball_entropy(x, c, alpha).item() == pytest.approx(direct, rel=1e-12)
    batch = torch.stack([x, 2 * x[torch.randperm(40)] + 1, _points(seed=3)])
    h = ball_entropy(batch, c)
    assert h.shape == (3,)
    assert torch.allclose(h[0], h[1], rtol=1e-12) and torch.allclose(h[2], ball_entropy(batch[2], c))
    per_batch = torch.stack([c, c + 0.1, c - 0.1])
    assert torch.allclose(ball_entropy(batch, per_batch)[1], ball_entropy(batch[1], c + 0.1))
    assert 0 < h.min() and h.max() < math.log(5)


def test_halfspace_entropy_matches_formula():
    x, w, b = _points(), _points(3, seed=4), torch.tensor([0.1, -0.2, 0.3], dtype=D)
    direct = _direct_soft(normalize_points(x).numpy(), w.numpy(), b.numpy(), 0.3)
    assert halfspace_entropy(x, w, b, tau=0.3).item() == pytest.approx(direct, rel=1e-12)
    assert halfspace_entropy(x, w, b).item() <= 3 * math.log(2) + 1e-12


def test_gradcheck_float64():
    x = _points(12).requires_grad_()
    c = _points(3, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ball_entropy(a, b, 2.0), (x, c))
    w, b = _points(3, seed=5).requires_grad_(), torch.zeros(3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u, v: halfspace_entropy(a, u, v, 0.5), (x, w, b))


@pytest.mark.parametrize("estimator", ["ball", "soft"])
def test_invariances(estimator):
    x = _points(50)
    c, w, b = _points(6, seed=7), _points(4, seed=8), torch.zeros(4, dtype=D)
    fn = (lambda s: ball_entropy(s, c)) if estimator == "ball" else (lambda s: halfspace_entropy(s, w, b))
    h = fn(x)
    assert fn(x[torch.randperm(50)]).item() == pytest.approx(h.item(), rel=1e-12)
    assert fn(123.0 * x).item() == pytest.approx(h.item(), rel=1e-12)
    assert fn(x + torch.tensor([5.0, -9.0], dtype=D)).item() == pytest.approx(h.item(), rel=1e-11)
    assert fn(0.01 * x - 40).item() == pytest.approx(h.item(), rel=1e-10)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-30), (torch.float32, 1e30),
                                         (D, 1e-200), (D, 1e200)])
def test_invariances_at_extreme_scales(dtype, scale):
    """The RMS radius used to square raw deviations: inf or 0 beyond ~1e+-19 (float32) and
    ~1e+-160 (float64), and the estimates collapsed. Gradients scale as 1 / scale."""
    x = _points(50).to(dtype).requires_grad_()
    far = (scale * (x.detach() + torch.tensor([5.0, -9.0], dtype=dtype))).requires_grad_()
    c, w, b = (v.to(dtype) for v in (_points(6, seed=7), _points(4, seed=8), torch.zeros(4)))
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    for fn in (lambda s: ball_entropy(s, c), lambda s: halfspace_entropy(s, w, b)):
        (h, grad), (h_far, grad_far) = ((fn(s), torch.autograd.grad(fn(s), s)[0]) for s in (x, far))
        assert h_far.item() == pytest.approx(h.item(), rel=rel)
        assert torch.allclose(grad_far * scale, grad, rtol=1e3 * rel, atol=1e3 * rel)
    rms = normalize_points(far.detach()).square().sum(-1).mean().sqrt().item()
    assert rms == pytest.approx(1, rel=rel)


def test_empty_set_raises():
    empty = torch.zeros(0, 2, dtype=D)
    calls = [lambda: ball_entropy(empty), lambda: ball_entropy(empty[None], _points(3)),
             lambda: halfspace_entropy(empty, _points(2), torch.zeros(2, dtype=D)),
             lambda: kmeans_pp(empty, 2), lambda: BallEntropy.from_points(empty),
             lambda: HalfspaceEntropy.from_points(empty)]
    for call in calls:
        with pytest.raises(ValueError, match="at least one point"):
            call()
    assert normalize_points(empty).shape == (0, 2)  # the hard entropy's path: H = 0 there


def test_kmeans_pp():
    x = _points(100)
    a = kmeans_pp(x, 8, torch.Generator().manual_seed(0))
    b = kmeans_pp(x, 8, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (8, 2)
    assert all((x == row).all(1).any() for row in a)  # anchors are points of the set
    assert len({tuple(r.tolist()) for r in a}) == 8
    batch = kmeans_pp(torch.stack([x, -x]), 4)
    assert batch.shape == (2, 4, 2)
    # spread: k-means++ beats the first k points on the k-means cost of a clustered set
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=D)
    blobs = torch.cat([c + 0.1 * _points(30, seed=i) for i, c in enumerate(centres)])
    seeds = kmeans_pp(blobs, 3, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, seeds).amin(1).max() < 1.0


def test_learnable_modules_train():
    x = _points(60)
    for module in (BallEntropy.from_points(x, generator=torch.Generator().manual_seed(0)),
                   HalfspaceEntropy.from_points(x, generator=torch.Generator().manual_seed(0))):
        params = list(module.parameters())
        assert params and all(p.dtype == D for p in params)
        opt = torch.optim.Adam(params, lr=0.05)
        before = module(x).item()
        for _ in range(30):
            opt.zero_grad()
            (-module(x)).backward()  # maximize: spread the anchors / halfspaces over the set
            opt.step()
        assert module(x).item() > before + 1e-3


def _closed_form_anchor_grad(x, c, alpha):
    """dH/dc_r = (2 alpha / n) sum_i p_ir a_ir (x_i - c_r), a_ir = sum_s p_is log p_s - log p_r."""
    p = ball_assignments(x[None], c, alpha)[0]
    log_pr = p.mean(0).log()
    a = (p * log_pr).sum(1, keepdim=True) - log_pr
    w = p * a
    return 2 * alpha / len(x) * (w.T @ x - w.sum(0)[:, None] * c), p, w


def test_anchor_gradient_closed_form():
    x, c = normalize_points(_points(30)), _points(4, seed=9).requires_grad_()
    grad, = torch.autograd.grad(ball_entropy(x, c, 3.0, normalize=False), c)
    assert torch.allclose(grad, _closed_form_anchor_grad(x, c.detach(), 3.0)[0], rtol=1e-10, atol=1e-14)


def test_anchor_fixed_point():
    """Anchor stationarity of MATH.md 7. Differentiating H_diff gives, at a stationary c_r,
    c_r = sum_i w_ir x_i / sum_i w_ir with w_ir = p_ir (sum_s p_is log p_s - log p_r); MATH.md
    states weights p_ir^2 (the fuzzy c-means update), which does NOT hold there: checked below."""
    g = torch.Generator().manual_seed(0)
    x = normalize_points(torch.cat([0.3 * torch.randn(40, 2, dtype=D, generator=g) + 1,
                                    0.5 * torch.randn(60, 2, dtype=D, generator=g) - 1]))
    anchors = kmeans_pp(x, 4, g)
    free, fixed = x.mean(0, keepdim=True).requires_grad_(), anchors[1:]
    opt = torch.optim.LBFGS([free], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -ball_entropy(x, torch.cat([free, fixed]), 2.0, normalize=False)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    c = torch.cat([free, fixed]).detach()
    grad, p, w = _closed_form_anchor_grad(x, c, 2.0)
    assert grad[0].abs().max() < 1e-10  # stationary in c_0
    assert w[:, 0].sum() > 0.5  # a genuine stationary point, not an anchor that lost its mass
    fixed_point = (w[:, 0] @ x) / w[:, 0].sum()
    assert (fixed_point - c[0]).norm() < 1e-7
    q = p[:, 0] ** 2
    assert ((q @ x) / q.sum() - c[0]).norm() > 0.1  # the p^2-weighted mean is elsewhere
