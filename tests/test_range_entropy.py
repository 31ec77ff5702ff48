"""Range-partition attention entropy (MATH.md section 4) against float64 evaluations."""
import math

import pytest
import torch

from entropy_attn import EntropyAttention, entropy_attention
from entropy_attn.range_entropy import ball_cells, halfspace_cells, init_anchors, interval_cells, patch_positions, sequence_positions
from oracle import TOL, definition, fresh_generator, rel_err


def cells_definition(positions, anchors, alpha):
    """G_jr = softmax_r(-alpha ||x_j - a_r||^2), formed from differences."""
    d2 = ((positions[:, None, :] - anchors[None, :, :]) ** 2).sum(-1)
    return torch.softmax(-alpha * d2, dim=-1)


def range_definition(q, k, v, cells, **kw):
    """Hr_i = -sum_r M_ir log M_ir with M = P G, for the cells G ``[Nk, k]``."""
    out, _, _, allowed = definition(q, k, v, **kw)
    # P from the definition, recomputed through the value path with V = identity
    eye = torch.eye(k.shape[2], dtype=torch.float64).expand(*v.shape[:2], -1, -1)
    P = definition(q, k, eye, **kw)[0]
    M = P @ cells
    Hr = -(M * torch.where(M > 0, M.log(), torch.zeros_like(M))).sum(-1)
    return out, Hr


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.bfloat16), ("reference", torch.float32)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_range_entropy_values_and_gradients(backend, dtype, causal, device):
    B, H, Hkv, Nq, Nk, D = 2, 2, 1, 23, 29, 32
    q, k, v = (torch.randn(B, n_h, n, D).to(dtype).to(device) for n_h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    kpm = torch.rand(B, Nk, device=device) < 0.2
    positions = sequence_positions(Nk, device=device)
    anchors = init_anchors(positions, 6) + 0.03 * torch.randn(6, 1, device=device)
    alpha = 5.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, anchors)]
    out, ent, hr = entropy_attention(*leaves[:3], causal=causal, key_padding_mask=kpm, entropy=("shannon", "range"),
                                     anchors=leaves[3], positions=positions, alpha=alpha, backend=backend)
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, anchors)]
    ref_cells = cells_definition(positions.double().cpu(), ref[3], alpha)
    ref_out, ref_hr = range_definition(*ref[:3], ref_cells, causal=causal, key_padding_mask=kpm.cpu())
    tol = TOL[dtype]
    assert rel_err(out, ref_out) < tol
    assert rel_err(hr, ref_hr) < tol
    assert rel_err(ent, definition(*[t.detach() for t in ref[:3]], causal=causal, key_padding_mask=kpm.cpu())[1]) < tol
    assert (hr >= -tol).all() and (hr <= math.log(6) + tol).all()
    go = torch.randn_like(ref_out)
    gh = torch.randn_like(ref_hr)

    def loss(o, h):
        return (o * go.to(o)).sum() + (h * gh.to(h)).sum()

    grads = torch.autograd.grad(loss(out, hr), leaves)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_hr), ref + [ref_cells])
    for name, g, rg in zip(["q", "k", "v"], grads, ref_grads):
        assert rel_err(g, rg) < 2 * tol, name
    # The cells' gradient dG = P^T dM comes out of the kernel like dV (in v's dtype): the same call
    # with the cells G given directly exposes it.
    cells = ball_cells(positions, anchors, alpha).detach().requires_grad_()
    out_g, _, hr_g = entropy_attention(*[t.detach() for t in leaves[:3]], causal=causal, key_padding_mask=kpm,
                                       entropy=("shannon", "range"), cells=cells, backend=backend)
    (d_cells,) = torch.autograd.grad(loss(out_g, hr_g), [cells])
    assert rel_err(d_cells, ref_grads[4]) < 2 * tol, "cells"
    # The anchors' gradient is dG pulled back through the softmax over anchors, whose sums over the
    # keys cancel: it amplifies dG's rounding (bfloat16: up to ~15x, ~0.09 relative on 1 draw in
    # 40). So it is checked as that pull-back of the kernel's own dG, evaluated in float64.
    ref_anchors = anchors.detach().double().requires_grad_()
    (pulled,) = torch.autograd.grad(cells_definition(positions.double(), ref_anchors, alpha), [ref_anchors],
                                    grad_outputs=d_cells.double())
    assert rel_err(grads[3], pulled) < 1e-3, "anchors"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nq,nk,logit", [(1, 1, 1.0), (1, 37, 1.0), (19, 37, 100.0)], ids=["1x1", "1x37", "large"])
def test_range_entropy_edge_cases(dtype, nq, nk, logit, device):
    """Triton against the float64 definition: N = 1, a batch whose keys are all padded (its rows:
    output and range entropy 0, no NaN, zero gradients), logits of spread ~100; every dtype. At such
    logits the gradients are only checked finite: the rounding of the stored output that every
    FlashAttention backward uses shows there (test_attention.py's large-logit test accounts for it)."""
    B, H, D = 2, 2, 32
    g = fresh_generator(7)
    q = torch.randn(B, H, nq, D, generator=g) * (logit / math.sqrt(D)) ** 0.5 * D ** 0.25
    k = torch.randn(B, H, nk, D, generator=g) * (logit / math.sqrt(D)) ** 0.5 * D ** 0.25
    v = torch.randn(B, H, nk, D, generator=g)
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    kpm = torch.zeros(B, nk, dtype=torch.bool, device=device)
    kpm[1] = True
    positions = sequence_positions(nk, device=device)
    anchors = init_anchors(positions, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, hr = entropy_attention(*leaves, key_padding_mask=kpm, entropy="range", positions=positions,
                                anchors=anchors, alpha=5.0, backend="triton")
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_hr = range_definition(*ref, cells_definition(positions.double().cpu(), anchors.double().cpu(), 5.0),
                                       key_padding_mask=kpm.cpu())
    assert torch.isfinite(out).all() and torch.isfinite(hr).all()
    assert (out[1] == 0).all() and (hr[1] == 0).all()
    tol = TOL[dtype]
    assert rel_err(out, ref_out) < tol and rel_err(hr, ref_hr) < tol
    assert (hr >= -tol).all() and (hr <= math.log(4) + tol).all()
    go, gh = torch.randn_like(ref_out), torch.randn_like(ref_hr)
    grads = torch.autograd.grad((out * go.to(out)).sum() + (hr * gh.to(hr)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_hr * gh).sum(), ref)
    for name, gr, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(gr).all() and (gr[1] == 0).all(), name
        if logit == 1.0:
            assert rel_err(gr, rg) < 2 * tol, name


def test_gradcheck_float64_anchors_and_positions():
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    anchors = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    positions = (sequence_positions(7, dtype=torch.float64) + 0.01 * torch.randn(7, 1, dtype=torch.float64)).requires_grad_()

    def f(q, k, v, anchors, positions):
        return entropy_attention(q, k, v, causal=True, entropy="range", anchors=anchors, positions=positions, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, anchors, positions))


def test_low_when_mass_is_local_high_when_spread():
    n, D = 64, 16
    positions = sequence_positions(n)
    anchors = init_anchors(positions, 8)
    k = torch.randn(1, 1, n, D)
    v = torch.randn(1, 1, n, D)
    # The query aligns with key 10 only: with |k10| = 8 its score (8 |k10|^2 / sqrt(D) = 128) beats
    # the others (std 16) on any draw; with |k10| left random, about 1 draw in 75 let other keys take
    # enough mass to fail (h_local 1.05 against h_spread 2.05 in a fresh-clone CI run).
    k[..., 10, :] *= 8.0 / k[..., 10, :].norm()
    local = k[:, :, 10:11] * 8
    spread = torch.zeros(1, 1, 1, D)  # uniform attention
    # alpha acts on [0, 1] coordinates: with 8 anchors 1/7 apart, alpha ~ k^2 gives sharp cells
    _, h_local = entropy_attention(local, k, v, entropy="range", anchors=anchors, alpha=200.0)
    _, h_spread = entropy_attention(spread, k, v, entropy="range", anchors=anchors, alpha=200.0)
    assert h_local.item() < 0.5 * h_spread.item()
    assert h_spread.item() > 0.9 * math.log(8)


def test_interval_and_halfspace_cells_match_their_definitions():
    """Float64, entry by entry: interval cell r = softmax_r(sum_{t<r} log sigmoid((x - b_(t)) / tau)
    + sum_{t>=r} log sigmoid(-(x - b_(t)) / tau)) over the sorted thresholds b_(t); halfspace cell of
    sign code c = prod_t h_t^c_t (1 - h_t)^(1 - c_t), normalized, h_t = sigmoid((w_t . x - b_t) / tau),
    codes in binary order (c_1 the most significant bit). Then gradcheck of both."""
    g = fresh_generator(31)
    x = torch.rand(17, 1, dtype=torch.float64, generator=g)
    b = torch.rand(3, dtype=torch.float64, generator=g)
    tau = 0.07
    sig = torch.sigmoid
    bs = b.sort().values
    logits = torch.stack([sum(sig((x[:, 0] - bs[t]) / tau).log() for t in range(r))
                          + sum(sig(-(x[:, 0] - bs[t]) / tau).log() for t in range(r, 3)) for r in range(4)], -1)
    assert torch.allclose(interval_cells(x, b, tau), torch.softmax(logits, -1), rtol=1e-12, atol=1e-14)
    y = torch.rand(11, 2, dtype=torch.float64, generator=g)
    w, o = torch.randn(3, 2, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g)
    h = sig((y @ w.T - o) / tau)
    codes = [[(j >> (2 - t)) & 1 for t in range(3)] for j in range(8)]
    gates = torch.stack([math.prod(h[:, t] if c[t] else 1 - h[:, t] for t in range(3)) for c in codes], -1)
    assert torch.allclose(halfspace_cells(y, w, o, tau), gates / gates.sum(-1, keepdim=True), rtol=1e-10, atol=1e-14)
    torch.autograd.gradcheck(lambda xx, bb: interval_cells(xx, bb, tau), (x[:6].requires_grad_(), b.clone().requires_grad_()))
    torch.autograd.gradcheck(lambda yy, ww, oo: halfspace_cells(yy, ww, oo, tau),
                             (y[:5].requires_grad_(), w.clone().requires_grad_(), o.clone().requires_grad_()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keys_without_position_get_their_own_cell(backend, device):
    """Keys with a NaN position (a class token) fall in one extra cell, alone: cells sum to 1, the
    class token's row is that cell's one-hot; the range entropy against float64 M = P G with G from
    the definition."""
    pos = patch_positions(3, 4, class_token=True).double()
    anchors = init_anchors(pos.float(), 4).double()
    cells = ball_cells(pos, anchors, alpha=5.0)
    G = torch.cat([torch.zeros(1, 4, dtype=torch.float64), cells_definition(pos[1:], anchors, 5.0)])
    G = torch.cat([G, torch.eye(13, dtype=torch.float64)[:, :1]], -1)  # the extra cell: key 0 only
    assert torch.allclose(cells, G, rtol=1e-12, atol=1e-15)
    q, k, v = (torch.randn(1, 2, 13, 16) for _ in range(3))
    q[..., 1, :] = k[..., 0, :] * 2  # some mass on the class token
    _, hr = entropy_attention(q.to(device), k.to(device), v.to(device), entropy="range", positions=pos.float().to(device),
                              anchors=anchors.float().to(device), alpha=5.0, backend=backend)
    _, ref = range_definition(q.double(), k.double(), v.double(), G)
    assert rel_err(hr.double().cpu(), ref) < 1e-5, (hr, ref)


def test_patch_positions_with_class_token():
    pos = patch_positions(3, 4, class_token=True)
    assert pos.shape == (13, 2) and pos[0].isnan().all() and pos[1:].min() == 0 and pos[1:].max() == 1
    q, k, v = (torch.randn(1, 1, 13, 16) for _ in range(3))
    # Query 0 attends to the class token: its key gets norm 2 sqrt(D) = 8, so that its score
    # (10 |k0|^2 / sqrt(D) = 160) beats the others (std 20) on any draw; with |k0| left random,
    # about 1 draw in 12 (TEST_SEED=5 one of them) let other keys take much of the mass (hr 0.82 in
    # a fresh-clone CI run).
    k[..., 0, :] *= 8.0 / k[..., 0, :].norm()
    q[..., 0, :] = k[..., 0, :] * 10
    _, hr = entropy_attention(q, k, v, entropy="range", positions=pos, anchors=init_anchors(pos, 4), alpha=50.0)
    assert hr[0, 0, 0] < 0.1  # nearly all mass in the class token's own cell


def test_halfspace_and_interval_cells():
    x = sequence_positions(50)
    g = interval_cells(x, torch.tensor([0.7, 0.2, 0.5]), tau=0.02)
    assert g.shape == (50, 4) and torch.allclose(g.sum(-1), torch.ones(50))
    assert (g.argmax(-1)[x[:, 0] < 0.15] == 0).all() and (g.argmax(-1)[x[:, 0] > 0.75] == 3).all()
    h = halfspace_cells(patch_positions(5, 5), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, 0.5]), tau=0.05)
    assert h.shape == (25, 4) and torch.allclose(h.sum(-1), torch.ones(25))
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    out, hr = entropy_attention(q, k, v, entropy="range", cells=g)
    eye = torch.eye(50, dtype=torch.float64).expand(1, 2, -1, -1)
    M = definition(q.double(), k.double(), eye)[0] @ g.double()
    assert rel_err(hr, -(M * M.log()).sum(-1)) < 1e-5


def test_range_errors():
    q, k, v = (torch.randn(1, 1, 9, 16) for _ in range(3))
    with pytest.raises(ValueError, match="entropy must be one of"):
        entropy_attention(q, k, v, entropy="renyi")
    with pytest.raises(ValueError, match="positions must have shape"):
        entropy_attention(q, k, v, entropy="range", positions=torch.rand(8, 1))
    with pytest.raises(ValueError, match="anchors must have shape"):
        entropy_attention(q, k, v, entropy="range", anchors=torch.rand(3, 2))
    with pytest.raises(ValueError, match="cells must have shape"):
        entropy_attention(q, k, v, entropy="range", cells=torch.rand(8, 3))
    bad = [  # (argument, value, error, match): each raised naming the argument
        ("positions", torch.arange(9)[:, None], TypeError, "positions must be a floating-point tensor"),
        ("positions", [[0.0]] * 9, TypeError, "positions must be a floating-point tensor"),
        ("positions", torch.rand(9, 0), ValueError, "positions must have shape"),
        ("positions", torch.rand(9, 1, device="meta"), ValueError, "positions is on meta"),
        ("anchors", torch.rand(3, 1).bool(), TypeError, "anchors must be a floating-point tensor"),
        ("anchors", torch.rand(0, 1), ValueError, "anchors must have shape"),
        ("alpha", float("nan"), ValueError, "alpha must be a positive finite number"),
        ("alpha", -5.0, ValueError, "alpha must be a positive finite number"),
        ("alpha", "5", TypeError, "alpha must be a real number"),
        ("alpha", None, TypeError, "alpha must be a real number"),
        ("cells", torch.ones(9, 3, dtype=torch.int64), TypeError, "cells must be a floating-point tensor"),
        ("cells", torch.rand(9, 0), ValueError, "cells must have shape"),
    ]
    for name, value, error, match in bad:
        with pytest.raises(error, match=match):
            entropy_attention(q, k, v, entropy="range", **{name: value})
    for value, error in (("x", TypeError), (0.0, ValueError)):
        with pytest.raises(error, match="range_alpha must be a"):
            EntropyAttention(16, 2, regularizer="range", range_alpha=value)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("alpha,anchors", [(1e39, [[0.2], [0.7]]), (1e38, [[3.0], [4.0]]), (5.0, [[2e19], [3e19]])],
                         ids=["alpha_beyond_float32", "far_anchors", "huge_anchors"])
def test_range_entropy_stays_finite_at_extreme_alpha_and_anchors(alpha, anchors, backend, device):
    """Float32 cells where alpha * ||x - a||^2 (or the squared distance itself) overflows float32:
    the memberships become hard (each key in its nearest anchor's cell), as the float64 definition
    says; they were NaN (every softmax term -inf, or inf * 0), and so were the entropy and dq."""
    q, k, v = (torch.randn(1, 2, 7, 16, device=device, requires_grad=True) for _ in range(3))
    positions = sequence_positions(7, device=device)
    anchors = torch.tensor(anchors, device=device)
    _, hr = entropy_attention(q, k, v, entropy="range", anchors=anchors, positions=positions, alpha=alpha,
                              backend=backend)
    cells = cells_definition(positions.double().cpu(), anchors.double().cpu(), alpha)
    assert torch.equal(cells, cells.round())  # hard memberships
    ref = range_definition(*(t.detach().double().cpu() for t in (q, k, v)), cells)[1]
    torch.testing.assert_close(hr.detach().double().cpu(), ref, rtol=0, atol=1e-5)  # 0 where one cell holds every key
    dq, = torch.autograd.grad(hr.sum(), q)
    assert dq.isfinite().all()


def test_range_default_positions_keep_float64():
    """float64 inputs get float64 default positions and anchors (they were float32: errors of
    3e-8 against the float64 definition), in the functional call and in a float64 layer."""
    q, k, v = (torch.randn(1, 2, 23, 8, dtype=torch.float64) for _ in range(3))
    _, hr = entropy_attention(q, k, v, entropy="range")
    pos = sequence_positions(23, dtype=torch.float64)
    _, hr64 = entropy_attention(q, k, v, entropy="range", positions=pos, anchors=init_anchors(pos))
    torch.testing.assert_close(hr, hr64, rtol=0, atol=1e-14)
    layer = EntropyAttention(16, 2, regularizer="range", num_anchors=5, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    layer(x, x, x, need_weights=False)
    cells = layer._cells(layer._inputs(x, x, x, True, None, None, False)[0], 0)
    assert cells.dtype == torch.float64
