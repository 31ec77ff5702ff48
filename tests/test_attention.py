"""entropy_attention against the float64 definition (MATH.md sections 1-3).

On the CPU the Triton kernels run in Triton's interpreter at small shapes; tests marked ``gpu``
run the full dtype x head-dim x causal x mask matrix on a CUDA device.
"""
import itertools
import math

import pytest
import torch

from entropy_attn import entropy_attention, pruned_attention
from oracle import TOL, definition, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, H, Hkv, Nq, Nk, D, Dv, dtype, device, scale=1.0):
    q = (torch.randn(B, H, Nq, D) * scale).to(dtype).to(device)
    k = (torch.randn(B, Hkv, Nk, D) * scale).to(dtype).to(device)
    v = torch.randn(B, Hkv, Nk, Dv).to(dtype).to(device)
    return q, k, v


def make_mask(kind, B, H, Nq, Nk, device):
    """(attn_mask, key_padding_mask) of a named kind."""
    if kind == "none":
        return None, None
    if kind == "bool":  # [Nq, Nk], broadcast over batch and heads
        return (torch.rand(Nq, Nk) < 0.7).to(device), None
    if kind == "bool4d":
        return (torch.rand(B, 1, Nq, Nk) < 0.5).to(device), None
    if kind == "float":
        return torch.randn(B, H, Nq, Nk).to(device), None
    if kind == "float_inf":
        m = torch.randn(1, H, Nq, Nk)
        return m.masked_fill(torch.rand(1, H, Nq, Nk) < 0.3, float("-inf")).to(device), None
    if kind == "kpm":
        kpm = torch.rand(B, Nk) < 0.3
        kpm[:, 0] = False
        return None, kpm.to(device)
    if kind == "kpm_float":
        return None, torch.randn(B, Nk).to(device)
    if kind in ("kpm_ends", "kpm_ends_float"):  # padded ends only: the keys in [lo, hi) are visible
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        for b, (lo, hi) in enumerate(torch.randint(0, 4, (B, 2)).tolist()):
            lo = (0, Nk // 7 + lo, Nk // 9 + lo)[b % 3]  # right padding, left, both
            hi = Nk - (Nk // 5 + hi, hi, Nk // 6 + hi)[b % 3]
            kpm[b, lo:hi] = False
        if kind == "kpm_ends_float":
            kpm = torch.zeros(B, Nk).masked_fill(kpm, float("-inf"))
        return None, kpm.to(device)
    if kind == "all":
        return (torch.rand(Nq, Nk) < 0.8).to(device), (torch.rand(B, Nk) < 0.2).to(device)
    raise ValueError(kind)


def check_against_definition(q, k, v, *, backend="triton", grad=True, entropy_grad=True, grad_tol=None, **kw):
    """Forward and backward of entropy_attention vs float64 autograd of the definition."""
    dtype = q.dtype
    tol = TOL[dtype]
    grad_tol = 2 * tol if grad_tol is None else grad_tol
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, ent = entropy_attention(*leaves, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_leaves = [t.detach().double().cpu().requires_grad_(grad) for t in (q, k, v)]
    ref_out, ref_ent, _, allowed = definition(*ref_leaves, **kw)
    assert rel_err(out, ref_out) < tol
    assert rel_err(ent, ref_ent) < tol
    n = allowed.sum(-1).double()
    log_n = torch.where(n > 0, n.log(), torch.zeros_like(n))
    e = ent.detach().double().cpu()
    assert (e >= -tol).all() and (e <= log_n + tol * (1 + log_n)).all(), "entropy outside [0, log n]"
    if not grad:
        return out, ent
    g_out = torch.randn_like(ref_out)
    g_ent = torch.randn_like(ref_ent) if entropy_grad else None
    loss = (out * g_out.to(out.device, out.dtype)).sum()
    ref_loss = (ref_out * g_out).sum()
    if entropy_grad:
        loss = loss + (ent * g_ent.to(ent.device, ent.dtype)).sum()
        ref_loss = ref_loss + (ref_ent * g_ent).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, rg) < grad_tol, f"d{name}"
    return out, ent, grads


SHAPES = [  # B, H, Hkv, Nq, Nk, D, Dv
    (1, 1, 1, 1, 1, 16, 16),  # N = 1
    (2, 4, 2, 37, 45, 32, 24),  # GQA, odd sizes, Dv != D
    (1, 2, 1, 50, 23, 64, 64),  # MQA, Nq > Nk
    (1, 1, 1, 33, 33, 96, 96),
    (1, 2, 2, 17, 31, 40, 40),  # head dim not a power of two
    (1, 1, 1, 19, 21, 256, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_definition(shape, causal, dtype, device):
    B, H, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_inputs(B, H, Hkv, Nq, Nk, D, Dv, dtype, device)
    check_against_definition(q, k, v, causal=causal)


MASKS = ["bool", "bool4d", "float", "float_inf", "kpm", "kpm_float", "kpm_ends", "kpm_ends_float", "all"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_masks(mask, causal, dtype, device):
    B, H, Hkv, Nq, Nk = 2, 2, 1, 29, 35
    q, k, v = make_inputs(B, H, Hkv, Nq, Nk, 32, 32, dtype, device)
    attn_mask, kpm = make_mask(mask, B, H, Nq, Nk, device)
    check_against_definition(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=kpm)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fully_masked_rows_are_zero_without_nan(backend, device):
    B, H, Nq, Nk, D = 2, 2, 24, 18, 32
    q, k, v = make_inputs(B, H, H, Nq, Nk, D, D, torch.float32, device)
    kpm = torch.zeros(B, Nk, dtype=torch.bool, device=device)
    kpm[1] = True  # batch 1: every key padded
    # causal with Nq > Nk: the first Nq - Nk rows of batch 0 see no key either
    out, ent, (dq, dk, dv) = check_against_definition(q, k, v, backend=backend, causal=True, key_padding_mask=kpm)
    empty_rows = Nq - Nk
    for t in (out, ent, dq):
        assert (t[1] == 0).all()
        assert (t[0, :, :empty_rows] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rows_masked_by_the_attention_mask_are_zero_without_nan(kind, dtype, device):
    """Rows that an attention mask hides entirely (False, or -inf in a float mask): output and
    entropy 0, zero gradients, the other rows as the definition says."""
    B, H, Nq, Nk, D = 1, 2, 21, 30, 32
    q, k, v = make_inputs(B, H, H, Nq, Nk, D, D, dtype, device)
    keep = torch.rand(Nq, Nk, device=device) > 0.3
    keep[[0, 7, 20]] = False
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(Nq, Nk, device=device), -math.inf)
    out, ent, (dq, dk, dv) = check_against_definition(q, k, v, attn_mask=mask)
    for t in (out, ent, dq):
        assert (t[:, :, [0, 7, 20]] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_under_one_large_bias(backend, device):
    """A float mask that puts one large negative value on a whole row, as models that build their
    masks from ``torch.finfo(dtype).min`` do on padded queries. At -1e9 the row's float32 scores all
    round to the bias, so its softmax is uniform: out = the mean of v, entropy = log Nk, as in SDPA
    (the reference path gave every key weight 1 there, P = exp(s - lse) with lse rounded to the
    bias; in float64, where the scores survive, it lost digits of the log of the row's mass). At
    ``finfo(float32).min`` (below -1e30 ln 2) the entries count as masked, as -inf would: that row
    is empty (out and entropy 0), and a row with some entries there attends to the others."""
    B, H, Nq, Nk, D = 1, 2, 19, 37, 16
    q, k, v = make_inputs(B, H, H, Nq, Nk, D, D, torch.float32, device)
    mask = torch.randn(Nq, Nk, device=device)
    mask[3] = -1e9
    mask[11] = torch.finfo(torch.float32).min
    mask[5, :7] = torch.finfo(torch.float32).min
    if backend == "reference":  # float64: every row against the definition, with gradients
        check_against_definition(q.double(), k.double(), v.double(), backend=backend, attn_mask=mask.double())
    out, ent = entropy_attention(q, k, v, attn_mask=mask, backend=backend)
    ref_out, ref_ent, _, _ = definition(*(t.double().cpu() for t in (q, k, v)), attn_mask=mask)
    rows = [r for r in range(Nq) if r != 3]  # row 3: float32 rounds its scores to one value
    assert rel_err(out[:, :, rows], ref_out[:, :, rows]) < TOL[torch.float32]
    assert rel_err(ent[:, :, rows], ref_ent[:, :, rows]) < TOL[torch.float32]
    torch.testing.assert_close(out[:, :, 3], v.mean(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[:, :, 3], torch.full_like(ent[:, :, 3], math.log(Nk)), rtol=0, atol=1e-5)
    assert (out[:, :, 11] == 0).all() and (ent[:, :, 11] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batch(backend, device):
    """B = 0: empty outputs and gradients (as SDPA), and both pruned modes with zero stats."""
    q, k, v = make_inputs(0, 2, 2, 9, 7, 16, 16, torch.float32, device)
    q.requires_grad_(True)
    out, ent = entropy_attention(q, k, v, backend=backend)
    assert out.shape == (0, 2, 9, 16) and ent.shape == (0, 2, 9)
    (dq,) = torch.autograd.grad(out.sum() + ent.sum(), q)
    assert dq.shape == q.shape
    for mode in ("exact", "fast"):
        out, stats = pruned_attention(q, k, v, mode=mode, return_stats=True, backend=backend)
        assert out.shape == (0, 2, 9, 16)
        for t in stats.values():
            assert t.shape == (2,) and (t == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large_logits(dtype, causal, device):
    """|s| ~ 100: the streamed entropy loses no digits, and the gradient is right up to the one
    rounding every FlashAttention backward makes: D_i = dO_i . O_i uses the stored (rounded) O. At
    near one-hot rows dP_ij - D_i is a difference of nearly equal terms, so that rounding shows;
    the reference below makes the same substitution exactly (dS_ij gains -P_ij delta_i with
    delta_i = dO_i . (O_stored - O)), and the kernel must then match to the usual tolerance."""
    B, H, N, D = 1, 2, 40, 32
    q, k, v = make_inputs(B, H, H, N, N, D, D, dtype, device)
    scale = 60.0 / math.sqrt(D)
    tol = TOL[dtype]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, ent = entropy_attention(*leaves, scale=scale, causal=causal, backend="triton")
    ref = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_ent, _, _ = definition(*ref, scale=scale, causal=causal)
    assert rel_err(out, ref_out) < tol and rel_err(ent, ref_ent) < tol
    g_out, g_ent = torch.randn_like(ref_out), torch.randn_like(ref_ent)
    grads = torch.autograd.grad((out * g_out.to(out)).sum() + (ent * g_ent.to(ent)).sum(), leaves)
    ref_grads = list(torch.autograd.grad((ref_out * g_out).sum() + (ref_ent * g_ent).sum(), ref))
    P = definition(*[t.detach() for t in ref[:2]], torch.eye(N, dtype=torch.float64).expand(B, H, N, N),
                   scale=scale, causal=causal)[0]
    delta = (g_out * (out.detach().double().cpu() - ref_out.detach())).sum(-1, keepdim=True)
    ds_extra = -P * delta
    kd, qd = ref[1].detach(), ref[0].detach()
    ref_grads[0] = ref_grads[0] + scale * ds_extra @ kd
    ref_grads[1] = ref_grads[1] + scale * ds_extra.transpose(-1, -2) @ qd
    # float32 scores themselves carry eps * |s| ~ 1e-7 * 150 of error, which the gradient amplifies
    grad_tol = 1e-4 if dtype == torch.float32 else 2 * tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert rel_err(g, rg) < grad_tol, f"d{name}"


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_output_only_and_entropy_only_gradients(entropy_grad, device):
    q, k, v = make_inputs(1, 2, 2, 27, 27, 32, 32, torch.float32, device)
    check_against_definition(q, k, v, entropy_grad=entropy_grad)
    # entropy alone in the loss (the out gradient is None in the backward)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, ent = entropy_attention(*leaves, backend="triton")
    grads = torch.autograd.grad(ent.sum(), leaves)
    ref = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(definition(*ref)[1].sum(), ref, allow_unused=True)
    assert ref_grads[2] is None and (grads[2] == 0).all()  # the entropy does not depend on v
    for g, rg in zip(grads[:2], ref_grads[:2]):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "causal+padding"])
def test_key_gradients_sum_to_zero(masked, device):
    """sum_j dS_ij = 0 for every row (softmax is shift invariant) implies sum_j dK_j = 0 (masked
    entries have dS = 0, so masks keep it)."""
    q, k, v = make_inputs(2, 2, 2, 33, 47, 32, 32, torch.float32, device)
    kw = {}
    if masked:
        kpm = torch.zeros(2, 47, dtype=torch.bool, device=device)
        kpm[1, 30:] = True
        kw = dict(causal=True, key_padding_mask=kpm)
    _, _, (dq, dk, dv) = check_against_definition(q, k, v, **kw)
    total = dk.double().sum(dim=2)
    assert (total.norm() / dk.double().norm()) < 1e-5


def test_return_entropy_false(device):
    q, k, v = make_inputs(1, 2, 2, 20, 20, 32, 32, torch.float32, device)
    out = entropy_attention(q, k, v, return_entropy=False, backend="triton")
    assert isinstance(out, torch.Tensor)
    assert rel_err(out, definition(q.double().cpu(), k.double().cpu(), v.double().cpu())[0]) < 1e-5


def test_non_contiguous_inputs(device):
    """Projections of [N, B, E] tensors give strided views; they must work as they are."""
    B, N, H, D = 2, 21, 2, 32
    x = torch.randn(N, B, 3 * H * D, device=device)
    q, k, v = (t.reshape(N, B, H, D).permute(1, 2, 0, 3) for t in x.chunk(3, dim=-1))
    assert not q.is_contiguous()
    check_against_definition(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,D,causal,mask",
    list(itertools.product(DTYPES, [16, 32, 64, 96, 128, 256], [False, True], ["none", "kpm", "kpm_ends", "bool", "float"])),
    ids=str,
)
def test_gpu_matrix(dtype, D, causal, mask, device):
    """The full matrix on the GPU at odd sizes with GQA, forward and backward."""
    B, H, Hkv, Nq, Nk = 2, 4, 2, 333, 517
    q, k, v = make_inputs(B, H, Hkv, Nq, Nk, D, D, dtype, device)
    attn_mask, kpm = make_mask(mask, B, H, Nq, Nk, device)
    check_against_definition(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=kpm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_long_sequence(dtype, device):
    q, k, v = make_inputs(1, 2, 1, 2048 + 7, 4096 + 3, 128, 128, dtype, device)
    check_against_definition(q, k, v, causal=True)


def nan_cases(padded, causal):
    """``(q, k, v, kpm, cases)``: float32 inputs ``[2, 2, 40, 8]`` (key 9 padded when ``padded``:
    ``'bool'`` True, ``'float'`` -inf; else kpm None), and per case the inputs with one NaN and the
    ``[B, H, Nq]`` rows that see it: in q (its row), in a visible key (the rows of its kv head that
    see it) and in the padded key (none)."""
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[:, 9] = True
    if padded == "float":
        kpm = torch.zeros(2, 40).masked_fill(kpm, -math.inf)
    cases = [("q", 0, (0, 1, 4, 2), (0, 1, slice(4, 5))),
             ("key", 1, (1, 0, 6, 0), (1, 0, slice(6 if causal else 0, 40)))]
    if padded:
        cases.append(("padded key", 1, (0, 1, 9, 3), None))
    out = []
    for name, which, index, rows in cases:
        args = [q, k, v]
        args[which] = args[which].clone()
        args[which][index] = float("nan")
        sees = torch.zeros(2, 2, 40, dtype=torch.bool)
        if rows is not None:
            sees[rows] = True
        out.append((name, args, sees))
    return q, k, v, kpm if padded else None, out


def check_nan_rows(got, base, sees, name, atol):
    """``got`` (``[B, H, Nq]`` or ``[B, H, Nq, Dv]``) is NaN in every element of the rows that see
    the NaN and equals ``base`` within ``atol`` on the others."""
    got, base = got.cpu(), base.cpu()
    assert got[sees].isnan().all(), name
    torch.testing.assert_close(got[~sees], base[~sees], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("padded", [None, "bool", "float"], ids=["no_kpm", "kpm", "float_kpm"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_reaches_exactly_the_rows_that_see_it(causal, padded, backend, device):
    """A NaN in q, or in a key, makes NaN every row that sees it (as SDPA) and no other row: the
    output and entropy, dq for a NaN in q (a NaN key reaches the dq of rows that do not see it too: 0 x NaN), and the
    output of both pruned modes (whose visited tiles here hold every key). Until 2026-12-02 the
    kernels' clamp of s - m dropped a NaN score in every masked tile (a row of NaN scores came out
    0, with zero gradients, as if masked), and so did the reference path for a row of NaN scores.
    Until then too a NaN key under a -inf float padding mask made every row NaN in the kernels (NaN
    plus -inf), where the reference path dropped it."""
    q, k, v, kpm, cases = nan_cases(padded, causal)
    kw = dict(causal=causal, key_padding_mask=None if kpm is None else kpm.to(device), backend=backend)
    # float64 on the reference path; the kernels take float32
    dtype, atol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 1e-6)

    def run(args, grad):
        q, k, v = (t.to(device, dtype) for t in args)
        q.requires_grad_(grad)
        out, ent = entropy_attention(q, k, v, **kw)
        dq = torch.autograd.grad((out * torch.cos(out.detach().nan_to_num())).sum() + ent.sum(), q) if grad else ()
        with torch.no_grad():
            pruned = [pruned_attention(q, k, v, tau=0.05, mode=m, **kw) for m in ("exact", "fast")]
        return [out.detach(), ent.detach(), *pruned, *dq]

    base = run((q, k, v), grad=True)  # [out, ent, exact, fast, dq]
    for name, args, sees in cases:
        got = run(args, grad=name == "q")  # dq only for the q case: zip stops before base's dq
        for t, ref in zip(got, base):
            check_nan_rows(t, ref, sees, name, atol)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_nan_key_under_an_attention_mask(kind, backend, device):
    """A NaN key that some rows' attention mask hides: a False entry drops it (those rows attend to
    the other keys), a -inf float entry does not (NaN + -inf is NaN, as in SDPA), on both paths and
    in the pruned call at tau = 0 (dense attention). Until 2026-12-02 the reference path dropped it
    under the -inf float entry too, where the kernels and SDPA give NaN."""
    B, H, Nq, Nk, D = 1, 2, 9, 13, 16
    q, k, v = make_inputs(B, H, H, Nq, Nk, D, D, torch.float64, "cpu")
    keep = torch.rand(Nq, Nk) > 0.3
    keep[:, 0] = True
    keep[:5, 4] = False  # rows 0-4 hide key 4, the others see it
    keep[5:, 4] = True
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(Nq, Nk, dtype=torch.float64), -math.inf)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, attn_mask=mask)  # key 4 finite here
    k[0, 0, 4] = float("nan")
    nan_rows = torch.zeros(B, H, Nq, dtype=torch.bool)
    nan_rows[0, 0, 5:] = True  # the rows that see key 4
    if kind == "float":
        nan_rows[0, 0] = True
        assert torch.equal(sdpa(q, k, v, attn_mask=mask).isnan().any(-1), nan_rows)
    dtype, atol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 2e-5)
    args = [t.to(device, dtype) for t in (q, k, v)]
    m = mask.to(device) if kind == "bool" else mask.to(device, dtype)
    outs = [entropy_attention(*args, attn_mask=m, backend=backend)[0],
            pruned_attention(*args, attn_mask=m, tau=0.0, backend=backend)]
    for got in outs:
        got = got.cpu().double()
        assert got[nan_rows].isnan().all()
        torch.testing.assert_close(got[~nan_rows], want[~nan_rows], rtol=0, atol=atol)
