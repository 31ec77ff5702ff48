"""Tau-pruned attention (shared MATH.md section 5) against a float64 evaluation of the definition.

CPU: the Triton kernels run in the interpreter (TRITON_INTERPRET=1; skipped otherwise) at small
shapes, where the tiles are 16 x 16; the reference path runs everywhere. GPU tests (``gpu``) repeat
the core checks at larger shapes.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from entropy_attn import entropy_attention
from entropy_attn._inputs import check_inputs
from entropy_attn._launch import TMA_ENABLED, TensorDescriptor, _mask_args, interpreting
from entropy_attn.kernels.pruned import LOCAL_KEYS, POOL_ROWS, pooled_queries
from entropy_attn.pruned import _config, _mask_tiles, pruned_attention, pruned_triton, reference_pruned
from oracle import fresh_generator

DEV = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                               reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}


# ------------------------------------------------------------------------------------------------
# The definition, densely in float64, written independently of the library
# ------------------------------------------------------------------------------------------------


def kernel_tiles(nq, d):
    """The Triton path's tiles for Nq = nq, D = d: the grid ``tile_sparsity`` is counted on
    (16 x 16 in the interpreter, larger on a GPU)."""
    cfg = _config(nq, d, d)
    return cfg.block_m, cfg.block_n


def definition(q, k, v, tau, *, causal=False, scale=None, attn_mask=None, key_padding_mask=None, block=None):
    """Returns (out float64, stats dict [H] float64, ambiguous rows [B, H, Nq] bool); tile stats
    on ``block`` tiles, by default the Triton path's (``kernel_tiles``).

    A row is ambiguous when an entry lies within 1e-4 (relative) of its threshold, where float32
    kernels may legitimately decide either way."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    scale = D ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    valid = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        valid &= j <= i + Nk - Nq
    if attn_mask is not None:
        am = attn_mask.expand(B, H, Nq, Nk)
        if am.dtype == torch.bool:
            valid &= am
        else:
            s = s + am.double()
            valid &= am > -math.inf
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        if kpm.dtype == torch.bool:
            valid &= ~kpm
        else:
            s = s + kpm.double()
            valid &= kpm > -math.inf
    s = s.masked_fill(~valid, -math.inf)
    empty = ~valid.any(-1)
    s0 = s.masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(s0, -1, keepdim=True)
    P = torch.exp(s0 - lse) * valid
    m = s0.amax(-1, keepdim=True)
    thr = torch.minimum(lse + (math.log(tau) if tau > 0 else -math.inf), m)
    keep = valid & (s >= thr)
    A = P * keep
    A = A / A.sum(-1, keepdim=True).clamp_min(1e-300)
    out = A @ v
    near = valid & ((s - thr).abs() <= 1e-4 * (1 + s.abs())) & (s != m)
    ambiguous = near.any(-1)
    # stats
    unm = valid.sum((-1, -2)).double()
    entry = torch.where(unm > 0, (valid & ~keep).sum((-1, -2)) / unm.clamp_min(1), 0.0)
    pm = ((P * ~keep).sum(-1) * ~empty).sum(-1) / (~empty).sum(-1).clamp_min(1)
    bm, bn = block or kernel_tiles(Nq, D)
    nrb, nkb = -(-Nq // bm), -(-Nk // bn)
    sp = torch.full((B, H, nrb * bm, nkb * bn), -math.inf, dtype=torch.float64)
    sp[:, :, :Nq, :Nk] = s
    tmax = sp.view(B, H, nrb, bm, nkb, bn).amax((3, 5))
    tp = torch.full((B, H, nrb * bm), math.inf, dtype=torch.float64)
    tp[:, :, :Nq] = torch.where(empty, math.inf, thr[..., 0])
    tmin = tp.view(B, H, nrb, bm).amin(-1)
    live = tmax > -math.inf
    visited = live & (tmax >= tmin[..., None])
    nl = live.sum((-1, -2)).double()
    tile = torch.where(nl > 0, 1 - visited.sum((-1, -2)) / nl.clamp_min(1), 0.0)
    stats = {"entry_sparsity": entry.mean(0), "tile_sparsity": tile.mean(0), "pruned_mass": pm.mean(0),
             "row_pruned_mass": (P * ~keep).sum(-1)}
    return out, stats, ambiguous


def fast_error_bound(st_ref, v):
    """Per-row bound [B, H, Nq] on |fast - exact| when the fast mode keeps a superset of the exact
    mode's entries (every tile with a kept entry visited, extra entries kept inside visited tiles):
    with m the row's pruned mass, the extra weight is at most m of the kept 1 - m, so the two
    normalized averages of v differ by at most 2 m / (1 - m) max|v|."""
    m = st_ref["row_pruned_mass"]
    return 2 * m / (1 - m).clamp_min(1e-12) * v.double().abs().max()


def check_close(out, ref, amb, dtype, max_amb_frac=0.25):
    """``out`` within TOL of ``ref`` on the rows that are not ambiguous (``definition``). At most a
    quarter of the rows (or one row) may be ambiguous: of 400 draws of ``test_large_logits``' 16
    rows, 25 had 2 or 3 ambiguous rows and none more (a limit of 0.1 failed there 1 draw in 16)."""
    assert torch.isfinite(out).all()
    assert amb.sum() <= max(1, max_amb_frac * amb.numel()), "too many rows at the threshold to check"
    err = (out.double().cpu() - ref).abs().amax(-1)
    err = err.masked_fill(amb, 0.0)
    assert err.max().item() <= TOL[dtype] * max(1.0, ref.abs().max().item()), err.max().item()


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def clustered(B, H, Hkv, Nq, Nk, D, *, dtype=torch.float32, block=16, strength=6.0, seed=0):
    """Sparse attention on purpose: keys come in contiguous clusters of ``block`` keys around a
    center, and each block of ``block`` queries points at one cluster, so each query has a few
    strong matches and most tiles hold no kept entry."""
    g = fresh_generator(seed)
    nc = max(1, -(-Nk // block))
    centers = torch.nn.functional.normalize(torch.randn(B, Hkv, nc, D, generator=g), dim=-1) * math.sqrt(D)
    cid = torch.arange(Nk) // block
    k = centers[:, :, cid] + 0.3 * torch.randn(B, Hkv, Nk, D, generator=g)
    qc = (torch.arange(Nq) // block * 5 + 1) % nc
    cq = centers.repeat_interleave(H // Hkv, 1)[:, :, qc]
    q = strength / math.sqrt(D) * cq + 0.3 * torch.randn(B, H, Nq, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_qkv(B, H, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0, qscale=2.0):
    g = fresh_generator(seed)
    return (randn(B, H, Nq, D, dtype=dtype, scale=qscale, gen=g), randn(B, Hkv, Nk, D, dtype=dtype, gen=g),
            randn(B, Hkv, Nk, D, dtype=dtype, gen=g))


def run(q, k, v, mode="exact", backend="triton", **kw):
    """``pruned_attention`` on the test device; with ``return_stats``, also checks that every stat (a
    fraction of entries, of tiles or of a row's mass) lies in [0, 1]."""
    dev = DEV if backend == "triton" else "cpu"
    mv = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kw = {a: mv(b) for a, b in kw.items()}
    result = pruned_attention(mv(q), mv(k), mv(v), mode=mode, backend=backend, **kw)
    if kw.get("return_stats"):
        for name, value in result[1].items():
            assert ((value >= -1e-5) & (value <= 1 + 1e-5)).all(), (name, value)
    return result


# ------------------------------------------------------------------------------------------------
# Exact mode against the definition
# ------------------------------------------------------------------------------------------------


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_random(dtype, causal):
    q, k, v = random_qkv(1, 2, 2, 37, 53, 16, dtype, seed=1)
    ref, _, amb = definition(q, k, v, 0.02, causal=causal)
    out = run(q, k, v, tau=0.02, causal=causal)
    assert out.dtype == dtype and out.shape == (1, 2, 37, 16)
    check_close(out, ref, amb, dtype)


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_clustered_skips_tiles_and_is_exact(dtype):
    bn = kernel_tiles(48, 32)[1]
    q, k, v = clustered(1, 2, 1, 48, 6 * bn, 32, dtype=dtype, block=bn)
    ref, st_ref, amb = definition(q, k, v, 0.01)
    out, st = run(q, k, v, tau=0.01, return_stats=True)
    check_close(out, ref, amb, dtype)
    assert (st["tile_sparsity"] > 0.5).all(), st  # most tiles really skipped ...
    for key in st:  # ... and counted as the definition says
        assert torch.allclose(st[key].double().cpu(), st_ref[key], atol=2e-3), (key, st[key], st_ref[key])


@triton_ok
def test_exact_dense_attention():
    """Near-uniform attention: little to prune, nothing skipped, still exact."""
    q, k, v = random_qkv(1, 2, 2, 32, 48, 16, seed=2, qscale=0.1)
    ref, st_ref, amb = definition(q, k, v, 0.01)
    out, st = run(q, k, v, tau=0.01, return_stats=True)
    check_close(out, ref, amb, torch.float32)
    assert st["tile_sparsity"].abs().max() < 1e-6 and st_ref["pruned_mass"].max() < 0.05


@triton_ok
def test_stats_random_with_masks():
    q, k, v = random_qkv(2, 2, 1, 33, 40, 16, seed=3)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, 25:] = True
    ref, st_ref, amb = definition(q, k, v, 0.03, causal=True, key_padding_mask=kpm)
    out, st = run(q, k, v, tau=0.03, causal=True, key_padding_mask=kpm, return_stats=True)
    check_close(out, ref, amb, torch.float32)
    for key in st:
        assert st[key].shape == (2,) and st[key].dtype == torch.float32
        assert torch.allclose(st[key].double().cpu(), st_ref[key], atol=2e-3), (key, st[key], st_ref[key])


@triton_ok
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("kpm_kind", ["bool", "float"])
def test_masks_and_fully_masked_rows(kind, kpm_kind):
    """Attention and padding masks, bool or float, in both modes against the definition. The padded
    keys match every query best and carry values of 100: any leak of them shows."""
    q, k, v = random_qkv(1, 2, 2, 21, 35, 16, seed=4)
    k[..., -4:, :] = 3 * q.mean(2, keepdim=True)
    v_live = v[..., :-4, :].clone()
    v[..., -4:, :] = 100.0
    g = fresh_generator(5)
    keep = torch.rand(1, 1, 21, 35, generator=g) > 0.4
    keep[..., 3, :] = False  # a fully masked row
    mask = keep if kind == "bool" else torch.where(keep, torch.randn(1, 1, 21, 35, generator=g), -math.inf)
    kpm = torch.zeros(1, 35, dtype=torch.bool)
    kpm[0, -4:] = True
    if kpm_kind == "float":
        kpm = torch.where(kpm, -math.inf, torch.randn(1, 35, generator=g))
    ref, st_ref, amb = definition(q, k, v, 0.02, attn_mask=mask, key_padding_mask=kpm)
    for mode in ("exact", "fast"):
        out = run(q, k, v, tau=0.02, attn_mask=mask, key_padding_mask=kpm, mode=mode)
        assert torch.isfinite(out).all()
        assert out[0, :, 3].abs().max() == 0
        if mode == "exact":
            check_close(out, ref, amb, torch.float32)
        else:
            err = (out.double().cpu() - ref).abs().amax(-1)
            assert (err <= fast_error_bound(st_ref, v_live) + 1e-3).all(), (err, fast_error_bound(st_ref, v_live))


@triton_ok
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("nq", [3, 40])
def test_fast_mode_lists_the_tiles_an_attn_mask_hides_in_part(kind, nq):
    """A tile that ``attn_mask`` hides in part is always visited and left out of the pooled
    estimates: here a hidden key with the largest score lies in the tile of a weak visible key, and
    if it stood for its tile (as the pooled keys alone say), the rows' estimated mass would be there
    and the tile of their dominant visible key (key 5, ~92 % of their visible mass) would go
    unlisted: the fast sweep returned the weak key's value (error 2.2) until the predictor read the
    mask per tile. The tiles the mask hides entirely (blocks 1 and 3) are not visited."""
    bn = _config(nq, 16, 16).block_n
    Nk, D = 4 * bn, 16
    g = fresh_generator(40)
    q, k, v = random_qkv(1, 1, 1, nq, Nk, D, seed=41)
    u = torch.zeros(D)
    u[0] = 1.0
    k = 0.1 * k
    hidden, dominant, weak = 2 * bn + 8, 5, 2 * bn + 1
    k[0, 0, hidden], k[0, 0, dominant], k[0, 0, weak] = 8 * u, 2.5 * u, 0 * u
    q = (4 * u).expand(1, 1, nq, D) + 0.01 * torch.randn(1, 1, nq, D, generator=g)
    keep = torch.zeros(1, 1, nq, Nk, dtype=torch.bool)
    keep[..., [dominant, weak]] = True
    mask = keep if kind == "bool" else torch.full(keep.shape, -math.inf).masked_fill(keep, 0.0)
    ref, st_ref, amb = definition(q, k, v, 0.01, attn_mask=mask)
    fast, st = run(q, k, v, tau=0.01, attn_mask=mask, mode="fast", return_stats=True)
    check_close(fast, ref, amb, torch.float32)
    assert (st["tile_sparsity"].cpu() == st_ref["tile_sparsity"]).all(), (st, st_ref)


@triton_ok
@pytest.mark.parametrize("shape", ["BHNN", "1HNN", "B1NN", "NN", "N"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_tiles_match_the_mask(shape, kind):
    """``_mask_tiles`` (kernel ``mask_tiles``) against the mask itself, tile by tile: -inf where
    every entry is hidden, +inf where some are, else the largest bias (base 2; 0 for a boolean
    mask; a NaN entry counts as 0), with rows past Nq and keys past Nk not counted, one row per
    batch entry or head only where the mask differs along it. Odd sizes; whole tiles hidden and
    whole tiles visible on purpose."""
    B, H, Nq, D = 2, 3, 200, 16
    cfg = _config(Nq, D, D)
    bm, bn = cfg.block_m, cfg.block_n
    Nk = 3 * bn - 11
    nqb, nkb = -(-Nq // bm), -(-Nk // bn)
    g = fresh_generator(60)
    full = {"BHNN": (B, H, Nq, Nk), "1HNN": (1, H, Nq, Nk), "B1NN": (B, 1, Nq, Nk), "NN": (Nq, Nk), "N": (Nk,)}[shape]
    keep = torch.rand(full, generator=g) > 0.3
    keep[..., :bn] = True  # tiles of key block 0 visible throughout
    keep[..., bn:2 * bn] = False  # key block 1 hidden throughout
    if kind == "bool":
        mask = keep
    else:
        mask = torch.where(keep, 3 * torch.randn(full, generator=g), -math.inf)
        mask[..., 0] = math.nan  # counts as 0: still visible
    q = torch.zeros(B, H, Nq, D)
    inp = check_inputs(q.to(DEV), q[:, :1, :1].expand(B, 1, Nk, D).to(DEV), q[:, :1, :1].expand(B, 1, Nk, D).to(DEV),
                       attn_mask=mask.to(DEV))
    tiles, strides = _mask_tiles(_mask_args(inp)[0], B, H, Nq, Nk, cfg, nqb, nkb)
    m4 = mask.expand(B, H, Nq, Nk)
    seen = m4 if kind == "bool" else m4 != -math.inf  # NaN: seen
    bias = torch.zeros(B, H, Nq, Nk) if kind == "bool" else torch.nan_to_num(m4, nan=0.0) * math.log2(math.e)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, nkb * bn - Nk, 0, nqb * bm - Nq), value=fill)  # noqa: E731
    in_range = pad(torch.ones(B, H, Nq, Nk, dtype=torch.bool), False)
    seen_p = pad(seen, False).view(B, H, nqb, bm, nkb, bn)
    hidden_p = (in_range & ~pad(seen, False)).view(B, H, nqb, bm, nkb, bn)
    top = pad(bias.masked_fill(~seen, -math.inf), -math.inf).view(B, H, nqb, bm, nkb, bn).amax((3, 5))
    want = torch.where(hidden_p.any((3, 5)), math.inf, top)
    want = torch.where(seen_p.any((3, 5)), want, -math.inf)
    assert tiles.shape[:2] == (B if shape in ("BHNN", "B1NN") else 1, H if shape in ("BHNN", "1HNN") else 1)
    got = torch.as_strided(tiles, (B, H, nqb, nkb), (*strides, 1)).cpu()
    assert (got[:, :, :, 1] == -math.inf).all() and (got[:, :, :, 0] < math.inf).all()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


def documents(n, d, bn, *, causal_mask=False, seed=0):
    """Packed documents: ``n`` tokens in three documents whose bounds lie off the tile edges, an
    ``attn_mask [n, n]`` that keeps each query to its own document (and causal if asked), and keys
    in topics of ``bn`` contiguous keys (a key block each); the queries of a block of ``bn`` rows
    point at one topic of their own document, so their attention is sparse there."""
    g = fresh_generator(seed)
    bounds = [0, 4 * bn + 3, 8 * bn + 7, n]
    doc = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:-1]), right=True)
    mask = doc[:, None] == doc[None, :]
    if causal_mask:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    topic = torch.arange(n) // bn
    centers = torch.nn.functional.normalize(torch.randn(int(topic.max()) + 1, d, generator=g), dim=-1) * math.sqrt(d)
    k = centers[topic] + 0.3 * torch.randn(n, d, generator=g)
    lo = torch.tensor(bounds)[doc]
    hi = torch.tensor(bounds)[doc + 1]
    pick = torch.arange(n) // bn * 11
    own = lo + pick % ((torch.arange(n) + 1 if causal_mask else hi) - lo)  # a key the query sees
    q = 6.0 / math.sqrt(d) * centers[topic[own]] + 0.3 * torch.randn(n, d, generator=g)
    v = torch.randn(n, d, generator=g)
    return q[None, None].repeat(1, 2, 1, 1), k[None, None], v[None, None], mask


@triton_ok
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal_mask", [False, True])
def test_fast_document_mask(monkeypatch, sampled, kind, causal_mask):
    """The fast mode under an ``attn_mask`` of packed documents (bounds off the tile edges), with and
    without the vertical sample, the mask boolean or float (random biases), alone or with a causal
    mask: within the error bound of a kept superset of the exact mode's entries, and without the
    sample it skips tiles."""
    import entropy_attn.pruned as pr

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16 if sampled else 1 << 30)
    bm, bn = kernel_tiles(192, 32)
    n = 12 * bn + 5
    q, k, v, keep = documents(n, 32, bn, causal_mask=causal_mask, seed=61)
    bias = 0.5 * torch.randn(n, n, generator=fresh_generator(62))
    mask = keep if kind == "bool" else torch.where(keep, bias, -math.inf)
    ref, st_ref, _ = definition(q, k, v, 0.01, attn_mask=mask)
    out, st = run(q, k, v, tau=0.01, attn_mask=mask, mode="fast", return_stats=True)
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - ref).abs().amax(-1)
    assert (err <= fast_error_bound(st_ref, v) + 1e-3).all(), (err.max(), fast_error_bound(st_ref, v).max())
    nqb, nkb = -(-n // bm), -(-n // bn)
    padded = torch.zeros(nqb * bm, nkb * bn, dtype=torch.bool)
    padded[:n, :n] = keep
    live = padded.view(nqb, bm, nkb, bn).any(3).any(1)
    assert live.float().mean() < 0.7  # the documents hide a third of the tiles or more
    if not (sampled or causal_mask):
        # The stat counts listed tiles among the live ones: a listed tile of another document would
        # bring it down. Each query block's topic is one of the 4-5 tiles of its document; it lists
        # that one, the tiles the mask hides in part (the document's ends) and a few more. (With the
        # causal mask, the diagonal tiles are hidden in part too, and few are left; with the sample,
        # each query block also lists the blocks the sampled rows keep, here all topics: attention by
        # content, the sample's known blind spot, where the miss check may sweep the head whole.)
        assert (st["tile_sparsity"].cpu() > 0).all(), st


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nq", [1, 40])
def test_a_fully_padded_batch_gives_zeros(mode, nq):
    """Every key of batch 1 padded: its rows are 0 (no NaN), batch 0 as the definition says."""
    q, k, v = random_qkv(2, 2, 1, nq, 50, 16, seed=8)
    kpm = torch.zeros(2, 50, dtype=torch.bool)
    kpm[1] = True
    ref, st_ref, amb = definition(q, k, v, 0.02, key_padding_mask=kpm)
    out, st = run(q, k, v, tau=0.02, key_padding_mask=kpm, mode=mode, return_stats=True)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    if mode == "exact":
        check_close(out, ref, amb, torch.float32)
    else:
        err = (out.double().cpu() - ref).abs().amax(-1)
        assert (err <= fast_error_bound(st_ref, v) + 1e-3).all(), err


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 29), (17, 1), (19, 45)])
def test_odd_sizes(nq, nk, dtype, mode):
    q, k, v = random_qkv(1, 1, 1, nq, nk, 24, dtype, seed=6)
    ref, st_ref, amb = definition(q, k, v, 0.05)
    out = run(q, k, v, tau=0.05, mode=mode)
    assert out.dtype == dtype and out.shape == (1, 1, nq, 24)
    if mode == "exact":
        check_close(out, ref, amb, dtype)
    else:  # a superset of the exact mode's entries, in the tiles it visits: within the bound
        err = (out.double().cpu() - ref).abs().amax(-1)
        assert (err <= fast_error_bound(st_ref, v) + TOL[dtype]).all(), (err, fast_error_bound(st_ref, v))


@triton_ok
def test_causal_more_queries_than_keys():
    """Rows that see no key (Nq > Nk, causal bottom-right) give 0 in both modes."""
    q, k, v = random_qkv(1, 2, 2, 30, 12, 16, seed=7)
    ref, _, amb = definition(q, k, v, 0.02, causal=True)
    for mode in ("exact", "fast"):
        out = run(q, k, v, tau=0.02, causal=True, mode=mode)
        assert torch.isfinite(out).all() and out[0, :, :18].abs().max() == 0
    check_close(run(q, k, v, tau=0.02, causal=True), ref, amb, torch.float32)


@triton_ok
def test_tau_zero_is_dense():
    q, k, v = random_qkv(1, 2, 1, 20, 33, 16, seed=8)
    dense = entropy_attention(q.to(DEV), k.to(DEV), v.to(DEV), causal=True, return_entropy=False, backend="triton")
    out, st = run(q, k, v, tau=0.0, causal=True, return_stats=True)
    assert torch.allclose(out, dense, atol=1e-6)
    assert all(float(t.abs().max()) == 0 for t in st.values())


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nk", [40, 128])  # 128: whole key blocks, the unmasked tiles' code path
def test_tau_above_one_keeps_row_max(mode, nk):
    q, k, v = random_qkv(1, 2, 2, 18, nk, 16, seed=9)
    s = q.double() @ k.double().transpose(-1, -2)
    expect = torch.gather(v.double(), 2, s.argmax(-1, keepdim=True).expand(-1, -1, -1, 16))
    out = run(q, k, v, tau=1.5, mode=mode).double().cpu()
    if mode == "exact":
        assert torch.allclose(out, expect, atol=1e-5)
    else:  # the max of the visited tiles: one value row each
        dist = (out[:, :, :, None, :] - v.double()[:, :, None, :, :]).abs().amax(-1).amin(-1)
        assert dist.max() < 1e-5
        assert (out == expect).all(-1).double().mean() > 0.5


@triton_ok
@pytest.mark.parametrize("gap,tie", [(2.0 ** -5, False), (2.0 ** -8, True)])
def test_exact_keeps_near_ties_of_the_row_max(gap, tie):
    """The exact mode's one tolerance (README, ``pruned_attention``): on the Triton path an entry
    within 1e-6 (1 + |m|) of its row's maximum m (base-2 scores) counts as a tie of the maximum and
    is kept, even at tau > 1, so that the maximum recomputed by the second pass is never lost; an
    entry further below is pruned. At logits near 1e4 that is 0.01 nats: a gap of 2^-5 nats is
    pruned, one of 2^-8 kept; the reference path prunes both. (Scores 1e4 and 1e4 - gap, exact in
    float32 and from operands exact in TF32.)"""
    q = torch.zeros(1, 1, 1, 16)
    q[..., :2] = 1
    k = torch.zeros(1, 1, 2, 16)
    k[0, 0, :, 0] = 1e4
    k[0, 0, 1, 1] = -gap
    v = torch.zeros(1, 1, 2, 16)
    v[0, 0, :, 0] = torch.tensor([1.0, -1.0])
    expect = math.tanh(gap / 2) if tie else 1.0  # w0 - w1 over both keys, or v0 alone
    out = run(q, k, v, tau=1.5, scale=1.0, mode="exact")[0, 0, 0, 0].item()
    assert out == pytest.approx(expect, abs=1e-4)
    assert run(q, k, v, tau=1.5, scale=1.0, backend="reference")[0, 0, 0, 0].item() == 1.0


@triton_ok
def test_gqa():
    q, k, v = clustered(1, 4, 2, 32, 64, 16, dtype=torch.float16, seed=10)
    ref, _, amb = definition(q, k, v, 0.01)
    check_close(run(q, k, v, tau=0.01), ref, amb, torch.float16)


# ------------------------------------------------------------------------------------------------
# Decoding (few queries, split programs)
# ------------------------------------------------------------------------------------------------


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_decoding_splits(mode):
    q, k, v = clustered(1, 2, 1, 3, 160, 16, seed=11)
    q = q[:, :, :3]
    ref, st_ref, amb = definition(q, k, v, 0.01, causal=True)
    inp = check_inputs(q.to(DEV), k.to(DEV), v.to(DEV), causal=True)
    one = pruned_triton(inp, 0.01, mode, splits=1)
    four = pruned_triton(inp, 0.01, mode, splits=4)
    if mode == "exact":
        assert torch.allclose(one, four, atol=1e-5)
        check_close(four, ref, amb, torch.float32)
    else:  # each split prunes against its own running bound: close, not equal (a superset of the
        # exact mode's entries; max |fast - exact| 0.056 over 100 draws in the interpreter)
        for out in (one, four):
            err = (out.double().cpu() - ref).abs().amax(-1)
            assert (err <= fast_error_bound(st_ref, v) + 1e-3).all() and err.max() < 0.15, err


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nq,causal,padded", [(1, True, True), (3, False, False), (16, False, True)])
def test_gqa_decoding_packs_query_heads(mode, nq, causal, padded):
    """Grouped-query decoding runs the 4 query heads of a kv head as the rows of one tile: the output
    and the per-head entry stats are the definition's, the tile stats those of the packed tiles
    (the union of the group's heads), shared by the group's heads. The keys span ~10 key tiles (16
    keys under the interpreter, 64 on the GPU), so that the union differs from each head's tiles."""
    s = kernel_tiles(4 * nq, 16)[1] // 16
    B, H, Hkv, Nk, D = 2, 8, 2, 150 * s, 16
    qf, k, v = clustered(B, H, Hkv, 16 * s * H, Nk, D, block=10 * s, seed=16)
    q = torch.stack([qf[:, h, 16 * s * h:16 * s * h + nq] for h in range(H)], 1)  # heads point at different keys
    if nq == 3:  # stored [B, Nq, H, D] (packing copies it)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kpm = None
    if padded:
        kpm = torch.zeros(B, Nk, dtype=torch.bool)
        kpm[1, 100 * s:] = True
    ref, st_ref, amb = definition(q, k, v, 0.01, causal=causal, key_padding_mask=kpm)
    packed = q.reshape(B, Hkv, 4 * nq, D)  # the packed rows, non-causal (a single query's causal mask is empty)
    _, st_packed, _ = definition(packed, k, v, 0.01, key_padding_mask=kpm)
    _, st_heads, _ = definition(q, k, v, 0.01, causal=causal, key_padding_mask=kpm, block=kernel_tiles(4 * nq, D))
    out, st = run(q, k, v, tau=0.01, causal=causal, key_padding_mask=kpm, mode=mode, return_stats=True)
    assert out.shape == (B, H, nq, D) and torch.isfinite(out).all()
    tiles = st["tile_sparsity"].double().cpu()
    assert (tiles.view(Hkv, 4) == tiles.view(Hkv, 4)[:, :1]).all()  # one tile list per group
    if mode == "exact":
        check_close(out, ref, amb, torch.float32)
        for key in ("entry_sparsity", "pruned_mass"):
            assert torch.allclose(st[key].double().cpu(), st_ref[key], atol=2e-3), (key, st[key], st_ref[key])
        assert torch.allclose(tiles, st_packed["tile_sparsity"].repeat_interleave(4), atol=2e-3), (tiles, st_packed)
        assert (tiles < st_heads["tile_sparsity"] - 0.05).any()  # the union of the heads' tiles, not each head's
    else:
        err = (out.double().cpu() - ref).abs().amax(-1)
        assert (err <= fast_error_bound(st_ref, v) + 1e-3).all(), err.max()
        assert (out.abs().amax(-1) > 0).all()


@triton_ok
def test_fast_splits_keep_the_row_max_rule():
    """Diffuse rows split over several programs: each split keeps its own maximum, the combine must
    drop the splits below the row threshold (else it averages the splits' maxima)."""
    q, k, v = random_qkv(1, 2, 1, 2, 300, 16, seed=15, qscale=0.5)
    inp = check_inputs(q.to(DEV), k.to(DEV), v.to(DEV))
    out, st = pruned_triton(inp, 1.5, "fast", splits=5, stats=True)
    dist = (out.double().cpu()[:, :, :, None, :] - v.double()[:, :, None, :, :]).abs().amax(-1)
    assert dist.amin(-1).max() < 1e-5  # one value row each
    # The stats count the one kept entry of each row (from the kept split only) and its true weight.
    p = torch.softmax(inp.scale * q.double() @ k.double().transpose(-1, -2), -1)
    kept = p.gather(-1, dist.argmin(-1, keepdim=True))[..., 0]
    assert torch.allclose(st["pruned_mass"].double().cpu(), (1 - kept).mean((0, 2)), atol=1e-5), st
    assert torch.allclose(st["entry_sparsity"].double().cpu(), torch.full((2,), 1 - 1 / 300, dtype=torch.double))
    out, st = pruned_triton(inp, 0.01, "fast", splits=5, stats=True)
    # Diffuse rows (all P < tau but the max): the exact mode keeps 1-3 entries, the fast mode may keep
    # a few more (pruned against a lower bound of lse), which moves such a row by O(1): the fast
    # mode's documented weak case. No NaN, no empty row, entry sparsity still high:
    assert torch.isfinite(out).all() and (out.abs().amax(-1) > 0).all()
    assert (st["entry_sparsity"] > 0.9).all(), st


# ------------------------------------------------------------------------------------------------
# Fast mode: never NaN, never drops a row, measured deviation from exact
# ------------------------------------------------------------------------------------------------


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_clustered_close_to_exact(dtype):
    bn = kernel_tiles(48, 32)[1]
    q, k, v = clustered(1, 2, 1, 48, 6 * bn, 32, dtype=dtype, block=bn)
    ref, st_ref, _ = definition(q, k, v, 0.01)
    out, st = run(q, k, v, tau=0.01, mode="fast", return_stats=True)
    assert out.dtype == dtype
    err = (out.double().cpu() - ref).abs().amax(-1)
    # Measured: mean |fast - exact| over rows <= 1.1e-3 in the interpreter (16 x 16 tiles, 110 draws;
    # most rows equal the exact mode's); max 0.058 on one H100 draw (64 x 64 tiles: more background
    # entries kept before the running lse bound tightens). The bound is loose (~0.9 here).
    assert (err <= fast_error_bound(st_ref, v) + max(1e-3, TOL[dtype])).all(), (err.max(), fast_error_bound(st_ref, v).max())
    assert err.mean() < 0.05, err.mean()
    # The fast mode visits a superset of the exact mode's tiles, yet skips some: 3 to 15 of the 18
    # (the exact mode 13 to 15) over 300 draws, most often 10 to 12.
    assert (st["tile_sparsity"].cpu() <= st_ref["tile_sparsity"] + 1e-6).all(), (st, st_ref)
    assert (st["tile_sparsity"] > 0).all(), st
    assert (st["pruned_mass"].double().cpu() < st_ref["pruned_mass"] + 0.01).all(), (st, st_ref)


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_random_no_nan_no_empty_rows(dtype):
    q, k, v = random_qkv(1, 2, 2, 40, 70, 16, dtype, seed=12, qscale=3.0)
    ref, st_ref, _ = definition(q, k, v, 0.01)
    out, st = run(q, k, v, tau=0.01, mode="fast", return_stats=True)
    assert torch.isfinite(out).all()
    assert (out.abs().amax(-1) > 0).all()  # no row dropped
    # The deviation on diffuse random attention is larger (it keeps entries the exact mode prunes):
    assert (out.double().cpu() - ref).abs().max() < 0.5
    assert ((st["pruned_mass"].double().cpu() - st_ref["pruned_mass"]).abs() < 0.1).all()


def large_logits(dtype, masked):
    """Logits up to |s| ~ 200 laid out against the fast mode's fixed reference (the row max of its
    first tile, plus 32 bits): 16 queries, 4 key blocks. Row 0 puts +60 on one key of block 3, so block
    3 is the first tile of the query block; row 1 puts +150 on two keys of block 1, far above its
    maximum in block 3 (its weights there would overflow float32). All keys share a component that
    gives row 2 logits near -200; ``masked``: an attention mask hides block 3 from row 2 (it then has
    no first-tile maximum, and the mask turns off the pooled lse bound that otherwise catches row 1)."""
    bn = kernel_tiles(16, 16)[1]
    nk = 4 * bn
    g = fresh_generator(21)
    q, k, v = torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 1, nk, 16, generator=g), torch.randn(1, 1, nk, 16, generator=g)
    e = torch.eye(16)
    q[0, 0, 0], k[0, 0, 3 * bn + 5] = 20 * e[0], 12 * e[0]  # scale 1/4: +60
    q[0, 0, 1], k[0, 0, bn + 1:bn + 3] = 20 * e[1], 30 * e[1]  # +150
    k[0, 0, :, 2] = 40.0
    q[0, 0, 2] = -20 * e[2]  # -200 +- 5
    mask = None
    if masked:
        mask = torch.ones(16, nk, dtype=torch.bool)
        mask[2, 3 * bn:] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_large_logits(dtype, masked):
    """Both modes against the definition with |s| up to ~200; the fast mode recomputes the rows its
    fixed reference cannot hold (row 1 overflowing, row 2 underflowing when masked; float16 takes the
    running max instead)."""
    q, k, v, mask = large_logits(dtype, masked)
    ref, st_ref, amb = definition(q, k, v, 0.01, attn_mask=mask)
    check_close(run(q, k, v, tau=0.01, attn_mask=mask), ref, amb, dtype)
    out = run(q, k, v, tau=0.01, attn_mask=mask, mode="fast").double().cpu()
    assert torch.isfinite(out).all()
    err = (out - ref).abs().amax(-1)
    assert (err <= fast_error_bound(st_ref, v) + TOL[dtype]).all(), (err, fast_error_bound(st_ref, v))
    # Rows 0 and 1 keep only their strong keys in both modes.
    assert err[0, 0, :2].max() <= TOL[dtype] * ref.abs().max(), err[0, 0, :3]


@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_keeps_a_row_max_after_the_first_tile(dtype):
    """The fast sweep (one program per query block: the fixed reference) keeps each row's maximum
    where it lies after the first tile, below tau times the mass kept before it. Row 0 puts +60 on
    one key of block 3, so block 3 is the query block's first tile; row 1 sees 0 on every key but
    +1.5 on one key of block 1: tau = 0.5 times its bn unit weights of the first tile is at least 8,
    above its maximum's e^1.5 = 4.5. Only that key has v[:, 15] != 0, so out[1, 15] > 0 iff it is
    kept (a cut without its cap in the later tiles fails here)."""
    bn = kernel_tiles(16, 16)[1]
    nk = 4 * bn
    g = fresh_generator(22)
    q, k = torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 1, nk, 16, generator=g)
    v = torch.randn(1, 1, nk, 16, generator=g)
    e = torch.eye(16)
    k[..., :2] = 0.0
    q[0, 0, 0], k[0, 0, 3 * bn + 5, 0] = 20 * e[0], 12.0  # scale 1/4: +60
    q[0, 0, 1], k[0, 0, bn + 1, 1] = 4 * e[1], 1.5  # +1.5
    v[..., 15] = 0.0
    v[0, 0, bn + 1, 15] = 1.0
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ref, _, _ = definition(q, k, v, 0.5)
    assert ref[0, 0, 1, 15] == 1.0  # the exact mode keeps row 1's maximum alone
    inp = check_inputs(q.to(DEV), k.to(DEV), v.to(DEV))
    out = pruned_triton(inp, 0.5, "fast", splits=1).double().cpu()
    assert torch.isfinite(out).all()
    # Kept: the maximum (e^1.5) among at most the 4 bn unit weights of row 1.
    assert out[0, 0, 1, 15] >= math.exp(1.5) / (math.exp(1.5) + 4 * bn) - TOL[dtype], out[0, 0, 1]


def opposite_pair_keys(n, d, g):
    """``[1, 1, n, d]`` float64 keys in opposite pairs of random unit directions (from generator
    ``g``): every key block's mean key is 0, so the pooled estimates see nothing in them."""
    u = torch.nn.functional.normalize(torch.randn(1, 1, n // 2, d, generator=g, dtype=torch.float64), dim=-1)
    return torch.stack([u, -u], 3).reshape(1, 1, n, d)


def previous_key_attention(nq, nk, d, dtype, seed):
    """Causal local attention that pooling cannot see: each query row points at the key just before
    its own (a previous-token head; bottom-right aligned, row i's own key is i + nk - nq) with a
    logit of +20, against |s| ~ 20 / sqrt(d) elsewhere, on ``opposite_pair_keys``."""
    g = fresh_generator(seed)
    k = opposite_pair_keys(nk, d, g)
    q = 20 * math.sqrt(d) * k[:, :, nk - nq - 1:nk - 1]
    v = torch.randn(1, 1, nk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@triton_ok
# prefill, also with the vertical sample (whose rows then keep their entries in their windows);
# grouped-query decoding (packed heads)
@pytest.mark.parametrize("nq,groups,sampled", [(256, 1, False), (256, 1, True), (1, 4, False)])
def test_fast_causal_lists_the_local_window(monkeypatch, nq, groups, sampled):
    """With a causal mask the fast mode lists each query block's local window (the key blocks of its
    rows' ``LOCAL_KEYS`` most recent keys), so it keeps previous-token attention whose blocks the
    pooled estimates miss (128 key blocks, each with a zero mean key): it matches the definition
    (without it, in the interpreter, some rows of each draw were off by about |v|: by 2.8-3.8 in
    prefill, 3.9-5.2 for the decoding query), and still skips most tiles (0.81 of them in the
    interpreter). One query with ``groups`` query heads on one kv head runs packed, where the
    causal mask (empty) is dropped but the window is not. tau = 0.3, where each row keeps its
    previous key alone: the interpreter's pooled rows are single rows (16-row blocks), whose
    estimates list more tiles at tau = 0.01."""
    import entropy_attn.pruned as pr

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16 if sampled else 1 << 30)
    bm, bn = kernel_tiles(nq, 64)
    nk = 128 * bn
    q, k, v = previous_key_attention(nq, nk, 64, torch.bfloat16, seed=23)
    q = q.expand(1, groups, nq, 64).contiguous()
    ref, st_ref, _ = definition(q, k, v, 0.3, causal=True)
    assert (st_ref["row_pruned_mass"] < 0.01).all()  # ~4e-4: the keys are near orthogonal
    out, st = run(q, k, v, tau=0.3, causal=True, mode="fast", return_stats=True)
    err = (out.double().cpu() - ref).abs().max()
    assert err <= 0.05, err
    assert (st["tile_sparsity"] > 0.5).all(), st


@triton_ok
def test_fast_local_window_only_where_sampled_rows_attend_locally(monkeypatch):
    """With the vertical sample (long query sequences) a head lists the local windows only if its
    sampled rows (those with keys before their window) keep an entry in theirs: causal attention on
    a sink key at the start (~90 % of each row's mass) and diffuse elsewhere lists the same tiles with
    and without the windows, and fewer than every window. (The previous-key attention of
    ``test_fast_causal_lists_the_local_window`` with the sample lists them.)"""
    import entropy_attn.pruned as pr

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)
    bm, bn = kernel_tiles(2048, 64)
    n, D = 2048, 64
    g = fresh_generator(25)
    q = 0.3 * torch.randn(1, 2, n, D, generator=g)
    k = torch.randn(1, 1, n, D, generator=g)
    k[..., 0] = 0.0
    k[:, :, 0, 0] = math.sqrt(D)  # the sink key
    q[..., 0] = math.log(9 * n)
    inp = check_inputs(q.bfloat16().to(DEV), k.bfloat16().to(DEV), k.bfloat16().to(DEV), causal=True)
    nqb, nkb = n // bm, n // bn
    listed = {}
    for local in (False, True):
        idx, count, *_ = pr._predict(inp, inp.q, inp.k, pr._config(n, D, D), nqb, nkb, math.log2(0.01),
                                    _mask_args(inp), local=local)
        idx, count = idx.cpu(), count.cpu()
        listed[local] = [[set(idx[bh, i, :count[bh, i]].tolist()) for i in range(nqb)] for bh in range(2)]
    assert listed[True] == listed[False]
    windows = [set(range(max(0, (i * bm - LOCAL_KEYS.value) // bn), (i + 1) * bm // bn)) for i in range(nqb)]
    assert any(not windows[i] <= listed[True][bh][i] for bh in range(2) for i in range(nqb))


def content_and_sinks(n, hkv, causal, seed):
    """q, k, v (bf16) of two query heads. Head 0 attends by content, each row to one key (a random
    permutation; causal: even rows their own key, odd rows a random key before their local window,
    from the second half where they can) in key blocks whose mean key is 0, which pooling cannot
    see; head 1 to one of two sink keys that every row sees (5 and n / 2 + 5; causal: 0 and 5).
    Logit +20 against |s| ~ 2.5 elsewhere, on ``opposite_pair_keys``. ``hkv`` kv heads (1: both on
    one)."""
    D = 64
    g = fresh_generator(seed)
    k = opposite_pair_keys(n, D, g)
    if causal:  # even rows: their own key; odd rows: a key of the second half before their window
        i = torch.arange(n)
        lo = torch.where(i >= n // 2 + LOCAL_KEYS.value, n // 2, 0)
        span = torch.clamp(i - LOCAL_KEYS.value, min=0) - lo + 1
        far = lo + (torch.rand(n, generator=g, dtype=torch.float64) * span).long()
        content = torch.where(i % 2 == 0, i, torch.minimum(far, i))
        sinks = torch.randint(0, 2, (n,), generator=g) * 5
    else:
        content = torch.randperm(n, generator=g)
        sinks = torch.randint(0, 2, (n,), generator=g) * (n // 2) + 5
    q = 20 * math.sqrt(D) * k[0, 0, torch.stack([content, sinks])][None]
    v = torch.randn(1, hkv, n, D, generator=g, dtype=torch.float64)
    return tuple(t.to(torch.bfloat16).contiguous() for t in (q, k.expand(1, hkv, n, D), v))


@triton_ok
def test_fast_sweeps_the_heads_whose_pooled_lists_miss_sampled_rows(monkeypatch):
    """With the vertical sample, the predictor checks its pooled lists against the sampled rows:
    where two sampled rows or more keep a key block (that no other sampled row keeps) which their
    query block lists only for the vertical estimate, the whole head is swept. The content head of
    ``content_and_sinks`` is swept whole and matches the definition (without the check, rows of
    each draw were off by about |v|); the sink head, whose sinks every sampled row keeps, passes
    the check and skips most tiles. (Flagged in 158 of 160 draws on the interpreter's tiles, and in
    40 of 40 on the GPU's, emulated in the interpreter; with 8 sampled rows in 10 of 12 and 38 of 40.
    The two draws that were not flagged missed one sampled row alone, and the check needs two: so
    the test takes the first of three draws that is flagged.)"""
    import entropy_attn.pruned as pr

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)
    monkeypatch.setattr(pr, "VERT_SAMPLES", 16)
    n = 32 * kernel_tiles(2048, 64)[1]  # 32 key blocks: most of 16 sampled rows keep a block alone
    misses = []
    for seed in (27, 28, 29):
        q, k, v = content_and_sinks(n, 2, False, seed=seed)
        inp = check_inputs(q.to(DEV), k.to(DEV), v.to(DEV))
        cfg = pr._config(n, 64, 64)
        nqb, nkb = n // cfg.block_m, n // cfg.block_n
        *_, (miss, _) = pr._predict(inp, inp.q, inp.k, cfg, nqb, nkb, math.log2(0.3), _mask_args(inp))
        (lo, hi), unflagged = miss.cpu().tolist()
        assert unflagged == [n, -1], miss  # the sink head is never flagged
        misses.append(miss)
        if lo < hi:
            break
    assert lo < hi, misses
    ref, _, _ = definition(q, k, v, 0.3)
    out, st = run(q, k, v, tau=0.3, mode="fast", return_stats=True)
    err = (out.double().cpu() - ref).abs().amax((0, 2, 3))
    assert (err <= 0.05).all(), err
    assert st["tile_sparsity"][0] == 0 and st["tile_sparsity"][1] > 0.5, st


@triton_ok
def test_fast_sweeps_a_flagged_causal_head_whole(monkeypatch):
    """A head flagged by the check is swept over every key block its rows see under a causal mask
    (both query heads on one kv head): the content head of ``content_and_sinks``, flagged here by
    hand (whether its sampled rows' targets land in the few blocks that a 512-key draw lists anyway
    varies), matches the definition (in the interpreter, without the flag its rows were off by
    about |v|, and so they were when the sweep stopped one key block short of its rows' last
    key), and counts every live tile as visited; the sink head is left to its lists."""
    import entropy_attn.pruned as pr

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)
    monkeypatch.setattr(pr, "VERT_SAMPLES", 8)
    predict = pr._predict

    def flag_head_0(*args, **kwargs):
        idx, count, pooled, check = predict(*args, **kwargs)
        check[0][0] = torch.tensor([-1, 0], dtype=torch.int32)
        return idx, count, pooled, check

    monkeypatch.setattr(pr, "_predict", flag_head_0)
    q, k, v = content_and_sinks(512, 1, True, seed=28)
    ref, _, _ = definition(q, k, v, 0.3, causal=True)
    out, st = run(q, k, v, tau=0.3, causal=True, mode="fast", return_stats=True)
    err = (out.double().cpu() - ref).abs().amax((0, 2, 3))
    assert (err <= 0.05).all(), err
    assert st["tile_sparsity"][0] == 0 and st["tile_sparsity"][1] > 0.2, st


@triton_ok
@pytest.mark.parametrize("causal", [False, True])
def test_fast_predictor_query_block_groups(monkeypatch, causal):
    """The predictor's programs take QB query blocks each (sharing the pooled-key loads): any QB,
    including a ragged last group, lists the same tiles and gives the same output as QB = 1."""
    import entropy_attn.pruned as pr

    bm, bn = kernel_tiles(80, 16)
    q, k, v = clustered(1, 2, 1, 5 * bm - 3, 7 * bn, 16, block=bn, seed=21)
    results = {}
    for qb in (1, 2, 4):
        monkeypatch.setattr(pr, "_predict_config", lambda nqb, bh, device, qb=qb: (qb, 16, 4, 3))
        results[qb] = run(q, k, v, tau=0.01, causal=causal, mode="fast", return_stats=True)
    for qb in (2, 4):
        assert torch.equal(results[qb][0], results[1][0])
        for name, val in results[qb][1].items():
            assert torch.equal(val, results[1][1][name]), name


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("causal", [False, True])
def test_sweep_programs_split_list_blocks(monkeypatch, mode, causal):
    """Each row's result depends only on its own running sums and its query block's tile list, so
    sweeping a list block with programs of fewer rows (64-row programs on the GPU's 128-row lists, as
    at D = 128; 16 on 32 under the interpreter, its lists being forced to 32 rows) gives the same output and stats."""
    import entropy_attn.pruned as pr
    from entropy_attn._launch import _Config

    if interpreting():
        monkeypatch.setattr(pr, "_config", lambda nq, d, dv: _Config(32, 16, 1, 1))
    warps_stages = (1, 1) if interpreting() else (4, 2)
    q, k, v = clustered(1, 2, 1, 70, 96, 16, block=16, seed=22)
    results = []
    for sweep in (lambda cfg, d, dv, nk: cfg, lambda cfg, d, dv, nk: _Config(cfg.block_m // 2, cfg.block_n, *warps_stages)):
        monkeypatch.setattr(pr, "_sweep_config", sweep)
        results.append(run(q, k, v, tau=0.01, causal=causal, mode=mode, return_stats=True))
    (whole, st_whole), (halves, st_halves) = results
    assert torch.allclose(halves, whole, atol=1e-5, rtol=0), (halves - whole).abs().max()
    for name, val in st_halves.items():
        assert torch.allclose(val, st_whole[name], atol=1e-6, rtol=0), name
    if mode == "exact" and interpreting():
        ref, _, amb = definition(q, k, v, 0.01, causal=causal, block=(32, 16))
        check_close(halves, ref, amb, torch.float32)


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("rows", ["list", "half"])
def test_causal_sweep_masks_the_tiles_across_the_diagonal(monkeypatch, mode, rows):
    """The sweep masks only the listed tiles that need it (``_unmasked_tiles``: under a causal mask the
    last ones of a list, which cross the diagonal). Key offsets ``Nk - Nq`` of -2 modulo the key block
    put the most key blocks across the diagonal of a list block of two key blocks' rows (three of them;
    32 x 16 lists under the interpreter, 128 x 64 on the GPU), swept by programs of the list's rows or
    half of them. A tau this small keeps nearly every entry, so both modes must give the definition;
    a diagonal tile taken for unmasked would add keys the rows must not see."""
    import entropy_attn.pruned as pr
    from entropy_attn._launch import _Config

    if interpreting():
        monkeypatch.setattr(pr, "_config", lambda nq, d, dv: _Config(32, 16, 1, 1))
    cfg = pr._config(100, 16, 16)
    if rows == "half":
        warps_stages = (1, 1) if interpreting() else (4, 2)
        monkeypatch.setattr(pr, "_sweep_config", lambda c, d, dv, nk: _Config(c.block_m // 2, c.block_n, *warps_stages))
    bn = cfg.block_n
    for nq, nk in ((cfg.block_m + 3, cfg.block_m + 3 + bn - 2), (2 * cfg.block_m + 6, 2 * cfg.block_m + 6 + 3 * bn - 2)):
        q, k, v = random_qkv(1, 2, 1, nq, nk, 16, seed=nq)
        ref, _, amb = definition(q, k, v, 1e-6, causal=True)
        check_close(run(q, k, v, tau=1e-6, causal=True, mode=mode), ref, amb, torch.float32)


def ends_padding(kind, B, Nk, seed):
    """A ``key_padding_mask [B, Nk]`` that pads the ends of each batch row (right, left, both, at
    offsets off the key blocks' edges): bool, float (0 inside, -inf outside: a clear hull), or float
    with one finite bias inside, or bool with one hole inside (hulls that must be masked throughout)."""
    g = fresh_generator(seed)
    pad = torch.ones(B, Nk, dtype=torch.bool)
    for b in range(B):
        lo = (0, Nk // 5, Nk // 7)[b % 3] + int(torch.randint(0, 3, (), generator=g))
        hi = Nk - (Nk // 4, 0, Nk // 6)[b % 3] - int(torch.randint(0, 3, (), generator=g))
        pad[b, lo:hi] = False
        if kind == "hole":
            pad[b, (lo + hi) // 2] = True
    if kind in ("bool", "hole"):
        return pad
    mask = torch.zeros(B, Nk).masked_fill(pad, -math.inf)
    if kind == "bias":
        mask[:, Nk // 2] = -0.5
    return mask


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float", "bias", "hole"])
def test_padding_hull_masks_only_the_edge_tiles(monkeypatch, mode, causal, kind):
    """Under a key padding mask alone, the first pass and the sweep mask only the tiles across the
    edges of the mask's hull (``key_tiles``, ``_unmasked_tiles``); a hull with a hole or a bias is
    masked throughout. The padded keys match every query best and carry values of 100, so a padded
    tile taken for unmasked shows. Lists of 32 x 16 tiles (forced under the interpreter), 70 queries
    (no split; in the causal case the fast mode's local windows list padded key blocks) and 3 (split
    programs, masked throughout); a tau this small keeps nearly every entry, so both modes must give
    the definition."""
    import entropy_attn.pruned as pr
    from entropy_attn._launch import _Config

    if interpreting():
        monkeypatch.setattr(pr, "_config", lambda nq, d, dv: _Config(32, 16, 1, 1))
    bn = pr._config(70, 16, 16).block_n
    nk = 6 * bn + 5
    for nq in (70, 3):
        q, k, v = random_qkv(3, 2, 1, nq, nk, 16, seed=nq + 7)
        kpm = ends_padding(kind, 3, nk, seed=nq)
        pad = kpm if kpm.dtype == torch.bool else kpm == -math.inf
        k = torch.where(pad[:, None, :, None], 3 * q.mean((1, 2), keepdim=True), k)
        v = torch.where(pad[:, None, :, None], 100.0, v)
        ref, _, amb = definition(q, k, v, 1e-6, causal=causal, key_padding_mask=kpm)
        out = run(q, k, v, tau=1e-6, causal=causal, key_padding_mask=kpm, mode=mode)
        check_close(out, ref, amb, torch.float32)


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", ["prefill", "masked", "decoding"])
def test_launch_plan_replays_the_call(monkeypatch, mode, case):
    """A call without stats records its launch plan (``entropy_attn._plan``) on the second call with
    its signature; later calls replay it. On other values the replay must give exactly what a call
    without a plan gives, an input of another alignment gets its own plan, and no plan keeps a
    tensor alive."""
    import gc
    import weakref

    import entropy_attn.pruned as pr
    from entropy_attn import _fastlaunch, _plan

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)  # the vertical sample's kernels too (fast prefill)
    monkeypatch.setattr(pr, "VERT_SAMPLES", 8)
    # decoding: grouped-query heads packed, split key range and the split combine. Prefill on the GPU:
    # enough programs for an unsplit key range, whose exact-mode launches take tensor descriptors.
    prefill = (2, 80, 80, 70, 96) if DEV == "cuda" else (1, 2, 2, 70, 96)
    B, H, Hkv, Nq, Nk = {"prefill": prefill, "masked": (2, 2, 1, 45, 61), "decoding": (2, 4, 2, 1, 200)}[case]

    def call(seed, q_storage_offset=0):
        q, k, v = clustered(B, H, Hkv, Nq, Nk, 16, seed=seed)
        if q_storage_offset:  # on the device: a copy to it would be aligned again
            q = torch.empty(q.numel() + q_storage_offset, device=DEV)[q_storage_offset:].view_as(q).copy_(q)
        kw = {}
        if case == "masked":
            kw = dict(causal=True, key_padding_mask=torch.rand(B, Nk, generator=fresh_generator(seed)) < 0.2)
        return run(q, k, v, tau=0.01, mode=mode, **kw)

    def plans():
        return [p for p in _plan._plans.values() if isinstance(p, _plan.Plan)]

    first = call(1)
    assert plans() == []  # a signature seen once records nothing (decoding with a growing cache)
    assert torch.equal(call(1), first)  # recorded on its second call
    (plan,) = plans()
    # On the direct launch path (CUDA, Triton 3.6) every launch replays its recorded binary.
    assert all(step.bound is not None for step in plan.launches) == _fastlaunch.direct_enabled()
    # There its scratch buffers are carved out of one arena (their addresses go to the launcher).
    assert (plan.arena is not None and any(o is not None for o in plan.arena)) == _fastlaunch.direct_enabled()
    if case == "prefill" and mode == "exact":  # the copy engine's tensor descriptors, rebuilt on replay
        descriptors = any(layout is not None for step in plan.launches for _, _, layout in step.slots)
        assert descriptors == (TMA_ENABLED and (interpreting() or torch.cuda.get_device_capability()[0] >= 9))
    replayed = call(2)
    misaligned = [call(2, q_storage_offset=1) for _ in range(3)]  # a 4-byte aligned q: seen, recorded, replayed
    assert len(plans()) == 2
    _plan.clear_plans()
    fresh = call(2)  # no plan
    assert plans() == []
    assert torch.equal(replayed, fresh) and not torch.equal(replayed, first)
    assert all(torch.equal(out, fresh) for out in misaligned)
    _plan.clear_plans()
    q, k, v = (t.to(DEV) for t in clustered(B, H, Hkv, Nq, Nk, 16, seed=3))
    kw = dict(causal=True, key_padding_mask=torch.zeros(B, Nk, dtype=torch.bool, device=DEV)) if case == "masked" else {}
    for _ in range(3):  # seen, recorded, replayed
        run(q, k, v, tau=0.01, mode=mode, **kw)
    assert len(plans()) == 1
    alive = [weakref.ref(t) for t in (q, k, v)]
    del q, k, v
    gc.collect()
    assert all(r() is None for r in alive)


def _plan_cases(scenario):
    """``(cases, pairs)`` for ``test_launch_plan_tells_apart_calls``: named calls ``(args, kwargs)``
    whose launch-plan signatures once coincided, and the orders to run them in."""
    g = fresh_generator(5)
    mk = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(DEV)  # noqa: E731
    B, N, D = 1, 32, 32
    if scenario == "masks and aliases":  # Nk = D: a float mask [B, H, N, N] has q's signature
        q, k, v, x = (mk(B, 2, N, D) for _ in range(4))
        mask = torch.zeros(B, 2, N, N, device=DEV)
        mask[..., N // 2:] = float("-inf")
        cases = {"none": ((q, k, v), {}), "mask": ((q, k, v), {"attn_mask": mask}),
                 "k is v": ((q, x, x), {}), "q is k is v": ((x, x, x), {})}
        pairs = (("none", "mask"), ("mask", "none"), ("k is v", "none"), ("q is k is v", "none"), ("none", "k is v"))
    else:  # grouped-query decoding packs q [1, 8, 1, D] into [1, 2, 4, D] and drops the causal mask
        k, v = mk(B, 2, 40, 16, scale=3.0), mk(B, 2, 40, 16)
        cases = {"gqa decoding": ((mk(B, 8, 1, 16), k, v), {"causal": True}),
                 "causal": ((mk(B, 2, 4, 16, scale=3.0), k, v), {"causal": True})}
        pairs = (("gqa decoding", "causal"), ("causal", "gqa decoding"))
    return cases, pairs


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("scenario", ["masks and aliases", "packed causal"])
def test_launch_plan_tells_apart_calls(mode, scenario):
    """A plan's slots are per tensor object, a call without a mask hands its kernels q as the mask's
    placeholder, and grouped-query decoding packs its query heads into rows and drops the causal
    mask: a plan recorded without a mask must not replay for a float mask of q's shape, strides and
    dtype (Nk = D), one recorded with ``k is v`` or ``q is k is v`` not for distinct tensors, one of
    packed causal decoding not for a causal call on q of the packed shape, nor each the other way
    round (each replayed the other's plan and returned values 0.24-4.0 off)."""
    from entropy_attn import _plan

    cases, pairs = _plan_cases(scenario)

    def call(name):
        args, kw = cases[name]
        return pruned_attention(*args, tau=0.01, mode=mode, backend="triton", **kw)

    expected = {}
    for name in cases:  # a signature's first call records no plan
        _plan.clear_plans()
        expected[name] = call(name)
    for first, then in pairs:
        _plan.clear_plans()
        for name in (first, first, then, then, first):  # seen, recorded; seen, recorded; replayed
            assert torch.equal(call(name), expected[name]), (first, then, name)
    _plan.clear_plans()


@triton_ok
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", ["prefill", "decoding", "stats"])
def test_early_launches_chain_the_call(monkeypatch, mode, case):
    """With early launches (programmatic dependent launch, ``kernels/pdl.py``), every kernel of a
    pruned call but its first starts early (``launch_pdl``) and waits for the kernel before it
    (``PDL``); the first waits for everything before the call, as a plain launch does (the exact
    mode's first pass does not let the next kernel start before it ends: measured slower). Checked
    on the launches a call makes and on those its launch plan replays (the flags are taken off
    before the launch here: the interpreter has no grid dependency control)."""
    import entropy_attn.pruned as pr
    from entropy_attn import _plan

    monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)
    monkeypatch.setattr(pr, "VERT_SAMPLES", 8)
    monkeypatch.setattr(pr, "early_launch", lambda device: True)
    calls = []

    def launch(kernel, grid, *args, **kwargs):
        calls.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), kwargs.pop("PDL", None),
                      kwargs.pop("launch_pdl", None)))
        real_launch(kernel, grid, *args, **kwargs)

    real_launch = _plan.launch
    monkeypatch.setattr(_plan, "launch", launch)
    monkeypatch.setattr(_plan, "direct_enabled", lambda: False)  # replays go through ``launch`` too
    _plan.clear_plans()
    B, H, Hkv, Nq, Nk = (1, 2, 2, 40, 90) if case != "decoding" else (2, 4, 2, 1, 200)
    q, k, v = (t.to(DEV) for t in clustered(B, H, Hkv, Nq, Nk, 16, seed=40))
    for _ in range(3 if case != "stats" else 1):  # seen, recorded, replayed
        calls.clear()
        run(q, k, v, tau=0.01, mode=mode, return_stats=case == "stats")
        names = [name for name, _, _ in calls]
        assert "pruned_attn" in names and len(calls) >= 2, calls
        assert (names[0] == "pruned_scores") == (mode == "exact" or case == "stats"), calls
        first = None if names[0] == "pruned_scores" else False  # the first pass is not chained at all
        assert [early for _, _, early in calls] == [first] + [True] * (len(calls) - 1), calls
        assert all(pdl is True for _, pdl, _ in calls[1:]), calls
    _plan.clear_plans()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nq", [1, 16, 1500])
def test_early_launches_match_plain_launches(monkeypatch, mode, nq):
    """Early launches change when kernels start, never what they compute: 12 calls on 4 inputs issued
    back to back without synchronization (a missing wait would let a kernel read a buffer before
    the kernel before it has written it), 12 more replaying their launch plans, and a replay from a
    CUDA graph give bitwise what plain launches give."""
    from entropy_attn import _launch, _plan

    if not _launch.early_launch(torch.device("cuda")):
        pytest.skip("early launches need Hopper or newer and ENTROPY_ATTN_PDL unset")
    shapes = (2, 8, 2, nq, 3000, 64)
    inputs = [[t.cuda() for t in clustered(*shapes, dtype=torch.bfloat16, block=64, seed=s)] for s in range(4)]
    mask = torch.zeros(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2500:] = True

    def calls():
        return [pruned_attention(*inputs[i % 4], tau=0.01, mode=mode, key_padding_mask=mask) for i in range(12)]

    outs = {}
    for on in (False, True):
        monkeypatch.setattr(_launch, "PDL_ENABLED", on)
        _plan.clear_plans()
        outs[on] = calls()  # the first call of each input is seen, the second records its plan
        outs[on] += calls()  # replayed plans
        static = [t.clone() for t in inputs[0]]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = pruned_attention(*static, tau=0.01, mode=mode, key_padding_mask=mask)
        for t, new in zip(static, inputs[1]):
            t.copy_(new)
        graph.replay()
        outs[on].append(out.clone())
    _plan.clear_plans()
    assert all(torch.isfinite(o).all() for o in outs[True])
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))


@triton_ok
@pytest.mark.skipif(not TMA_ENABLED, reason="copy-engine loads are off (Triton < 3.6 or ENTROPY_ATTN_TMA=0)")
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", ["masked", "decoding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_engine_loads_match_plain_loads(monkeypatch, mode, case, dtype):
    """The exact mode's kernels (and the first pass that the fast mode's stats run) load K and V
    through tensor descriptors where the copy engine (TMA) can (Hopper or newer; the interpreter
    emulates it) and the key range is not split. Its zero fill outside the tensor must stand in for
    the plain loads' bounds masks: the same output and stats as with plain loads (bitwise in the
    interpreter), on ragged N and D (D = 40: 64 columns per tile) and masks; split programs keep
    plain loads."""
    import entropy_attn._launch as launch_mod
    import entropy_attn.pruned as pr

    taken = []  # per launch of pass 1 and the sweep, in order: loads through the copy engine?
    kv_operands = pr._kv_operands

    def spy(*args):
        ops, tma = kv_operands(*args)
        taken.append(tma)
        return ops, tma

    monkeypatch.setattr(pr, "_kv_operands", spy)
    # Nk: at least 4 key blocks on the GPU too, so that 4 splits are 4 (no split is left empty)
    B, H, Hkv, Nq, Nk = {"masked": (2, 2, 1, 45, 261), "decoding": (2, 4, 2, 1, 200)}[case]
    q, k, v = clustered(B, H, Hkv, Nq, Nk, 40, dtype=dtype, seed=5)
    kw = {}
    if case == "masked":
        kw = dict(causal=True, key_padding_mask=(torch.rand(B, Nk, generator=fresh_generator(5)) < 0.2).to(DEV))
    inp = check_inputs(q.to(DEV), k.to(DEV), v.to(DEV), **kw)
    capable = interpreting() or torch.cuda.get_device_capability()[0] >= 9
    for splits in (1, 4):
        results = []
        for enabled in (True, False):
            monkeypatch.setattr(launch_mod, "TMA_ENABLED", enabled)
            taken.clear()
            results.append(pruned_triton(inp, 0.01, mode, stats=True, splits=splits))
            whole = enabled and capable and splits == 1
            assert taken == [whole, whole and mode == "exact"]
        (out, st), (plain, st_plain) = results
        assert not torch.isnan(out).any()
        if interpreting():
            assert torch.equal(out, plain)
            assert all(torch.equal(val, st_plain[name]) for name, val in st.items())
        else:
            torch.testing.assert_close(out, plain, atol=TOL[dtype], rtol=0)
            for name, val in st.items():
                torch.testing.assert_close(val, st_plain[name], atol=1e-3, rtol=0)


@pytest.mark.skipif(TensorDescriptor is None, reason="this Triton has no tensor descriptors")
def test_copy_engine_operands_only_where_loadable(monkeypatch):
    """``tma_operands`` builds tensor descriptors only when every operand's base and strides are
    16-byte aligned, its last stride is 1 and the blocks fit the copy engine; otherwise the kernels
    get the tensors (plain loads)."""
    import entropy_attn._launch as launch_mod
    from entropy_attn._launch import tma_operands

    monkeypatch.setattr(launch_mod, "_hopper_or_newer", lambda device: True)
    monkeypatch.setattr(launch_mod, "TMA_ENABLED", True)
    k = torch.zeros(2, 3, 50, 40, dtype=torch.float16)
    v = torch.zeros(2, 3, 50, 64, dtype=torch.float16)
    (kd, vd), tma = tma_operands(64, (k, 64), (v, 64))
    assert tma and (kd.base, vd.base) == (k, v)
    assert (list(kd.shape), list(kd.strides), list(kd.block_shape)) == ([2, 3, 50, 40], list(k.stride()), [1, 1, 64, 64])
    shifted = torch.zeros(k.numel() + 8, dtype=torch.float16)[1:k.numel() + 1].view_as(k)  # 2-byte aligned base
    for bad, cols in [(torch.zeros(2, 3, 50, 36, dtype=torch.float16), 64),  # rows of 72 bytes
                      (shifted, 64),
                      (k.transpose(-1, -2), 64),  # last stride not 1
                      (torch.zeros(2, 3, 50, 512, dtype=torch.float16), 512)]:  # block wider than 256
        ops, tma = tma_operands(64, (bad, cols), (v, 64))
        assert not tma and ops[0] is bad and ops[1] is v
    monkeypatch.setattr(launch_mod, "TMA_ENABLED", False)
    assert tma_operands(64, (k, 64), (v, 64)) == ([k, v], False)


def stripes(B, H, N, D, n_hot, *, block=16, seed=0, strength=None):
    """Vertical stripes (attention sinks): every query puts most of its mass on the same ``n_hot``
    keys, one per distinct ``block``-key block; the rest is near-uniform background. (The
    benchmark builds the same with 64-key blocks.)"""
    g = fresh_generator(seed)
    q = 0.3 * torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    hot = torch.randperm(N // block, generator=g)[:n_hot] * block + torch.randint(0, block, (n_hot,), generator=g)
    beta = math.log(3 * N / n_hot) if strength is None else strength
    k[..., 0] = 0.0
    k[:, :, hot, 0] = math.sqrt(D)  # sink keys stand out (as they do in trained models)
    q[..., 0] = beta
    return q, k, torch.randn(B, H, N, D, generator=g)


@triton_ok
@pytest.mark.parametrize("vertical", [False, True])
def test_fast_attention_sinks(monkeypatch, vertical):
    """Single strong keys inside key blocks: mean pooling alone dilutes them; the outlier key of
    each block and (for long query sequences) the sampled vertical estimate find them."""
    import entropy_attn.pruned as pr

    if vertical:
        monkeypatch.setattr(pr, "VERT_MIN_NQ", 16)
        monkeypatch.setattr(pr, "VERT_SAMPLES", 8)
    bn = kernel_tiles(96, 16)[1]
    q, k, v = stripes(1, 2, 6 * bn, 16, 3, block=bn, seed=14)
    ref, st_ref, _ = definition(q, k, v, 0.01)
    out, st = run(q, k, v, tau=0.01, mode="fast", return_stats=True)
    # The fast mode keeps a superset of the exact mode's entries: the background entries near tau
    # kept before the sink tile tightens the running lse bound. Measured in the interpreter over 360
    # draws: mean |fast - exact| over rows 0-0.057 (max 0.31), pruned mass up to 0.057 below the
    # exact mode's; with the outlier keys' bias turned off, means of 0.03-0.09 (20 draws).
    err = (out.double().cpu() - ref).abs().amax(-1)
    assert (err <= fast_error_bound(st_ref, v) + 1e-3).all(), (err.max(), fast_error_bound(st_ref, v).max())
    assert err.mean() < 0.1, err.mean()
    assert (st["pruned_mass"].double().cpu() <= st_ref["pruned_mass"] + 1e-4).all(), (st, st_ref)
    # (At this small N the background mass of a key block is above tau: the predictor, which tests
    # block mass, may visit every tile, while the exact skip test drops the half without a sink:
    # 0.33-0.50 of the tiles over 360 draws.)
    assert (st_ref["tile_sparsity"] > 0.15).all()


# ------------------------------------------------------------------------------------------------
# Reference path, API
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_path(dtype):
    q, k, v = clustered(2, 2, 1, 40, 80, 16, dtype=dtype, seed=13)
    kpm = torch.zeros(2, 80, dtype=torch.bool)
    kpm[0, :10] = True
    ref, st_ref, amb = definition(q, k, v, 0.01, causal=True, key_padding_mask=kpm, block=(16, 16))
    inp = check_inputs(q, k, v, causal=True, key_padding_mask=kpm)
    out, st = reference_pruned(inp, 0.01, block=(16, 16), stats=True, chunk_size=16)
    check_close(out, ref, amb, dtype)
    for key in st:
        assert torch.allclose(st[key].double(), st_ref[key], atol=1e-6), key
    out2 = pruned_attention(q, k, v, tau=0.01, causal=True, key_padding_mask=kpm, backend="reference")
    assert torch.allclose(out2, out)


def test_validation_and_no_grad():
    q, k, v = random_qkv(1, 1, 1, 4, 5, 8)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            pruned_attention(q, k, v, tau=bad, backend="reference")
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="tau must be a real number"):
            pruned_attention(q, k, v, tau=bad, backend="reference")
    with pytest.raises(ValueError):
        pruned_attention(q, k, v, mode="approx", backend="reference")
    with pytest.raises(ValueError):
        pruned_attention(q, k[:, :, :, :4], v, backend="reference")
    qg = q.clone().requires_grad_()
    out = pruned_attention(qg, k, v, backend="reference")
    assert not out.requires_grad


# ------------------------------------------------------------------------------------------------
# GPU, larger shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 16, 700])
def test_gpu_exact_vs_reference(causal, nq):
    """Both modes against the float64 definition at the GPU's tiles. Causal with 700 queries on 2000
    keys, the query blocks whose cluster lies after their causal end attend diffusely: a sixth of
    the rows lose over half their mass to the pruning, and many have entries at the threshold
    (ambiguous rows: up to 275 of 5600 over 25 draws on the H200). On those rows the fast mode keeps
    more entries than the exact mode (its lse bound is lower while it sweeps), so its output differs
    by up to 3.3 (85 draws); it stayed within the bound of a kept superset (by at least 0.29 in each
    of 25 draws that checked it), and within 0.084 on rows that lose less than a tenth of their mass."""
    q, k, v = clustered(2, 4, 2, max(nq, 64), 2000, 64, dtype=torch.bfloat16, block=64)
    q = q[:, :, -nq:].contiguous()
    ref, st_ref, amb = definition(q, k, v, 0.01, causal=causal)
    bound = fast_error_bound(st_ref, v)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    for mode in ("exact", "fast"):
        out, st = pruned_attention(q, k, v, tau=0.01, causal=causal, mode=mode, return_stats=True)
        assert torch.isfinite(out).all() and (out.abs().amax(-1) > 0).all()
        err = (out.double().cpu() - ref).abs().amax(-1)
        if mode == "exact":  # measured: at most 0.0156 off the ambiguous rows (bf16 outputs)
            # One query gives 8 rows: 0 / 1 / 2 / 3 of them ambiguous in 185 / 92 / 22 / 1 of 300
            # draws (the definition alone, on the CPU), so a quarter (2) failed 1 draw in 300.
            check_close(out, ref, amb, torch.bfloat16, max_amb_frac=0.5 if nq == 1 else 0.25)
        else:
            assert (st["tile_sparsity"].cpu() <= st_ref["tile_sparsity"] + 1e-6).all(), (st, st_ref)
            assert (err <= bound + 1e-2).all(), (err - bound).max()
            local = st_ref["row_pruned_mass"] < 0.1
            assert err.masked_fill(~local, 0.0).max() < 0.15, err.masked_fill(~local, 0.0).max()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nq", [1, 16, 1500])  # split decoding, packed grouped queries, prefill with the vertical sample
def test_cuda_graph_replay(mode, nq):
    """Captured in a CUDA graph (as serving engines run decoding steps) and replayed on new inputs
    copied into the captured ones, a call gives exactly the eager call's output: every launch goes
    to the capturing stream and nothing on the host depends on the data."""
    shapes = (2, 8, 2, nq, 3000, 64)
    static = [t.cuda() for t in clustered(*shapes, dtype=torch.bfloat16, block=64, seed=1)]
    mask = torch.zeros(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2500:] = True  # padded keys (True = pad): the pooled weights of the fast mode

    def call():
        return pruned_attention(*static, tau=0.01, mode=mode, key_padding_mask=mask)

    call()  # compiles, and fills the launch caches outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on a side stream of its own
        out = call()
    for seed in (2, 3):
        for t, new in zip(static, clustered(*shapes, dtype=torch.bfloat16, block=64, seed=seed)):
            t.copy_(new)
        graph.replay()
        eager = call()
        assert torch.isfinite(eager).all() and (eager.abs().amax(-1) > 0).all()
        assert torch.equal(out, eager), (out.float() - eager.float()).abs().max()


# ------------------------------------------------------------------------------------------------
# Fast predictor inputs (kernels/pruned_pool.py) against float64 evaluations of their definitions
# ------------------------------------------------------------------------------------------------


def padding_mask(kind, B, Nk, bn, seed):
    """None, or a bool / float ``key_padding_mask [B, Nk]`` padding ~30% of the keys and all of key
    block 1 of batch 0 (a float mask: -inf there, random finite values elsewhere)."""
    if kind is None:
        return None
    g = fresh_generator(seed)
    pad = torch.rand(B, Nk, generator=g) < 0.3
    pad[0, bn:2 * bn] = True
    if kind == "bool":
        return pad
    return torch.randn(B, Nk, generator=g).masked_fill(pad, -math.inf)


def pooled_queries_definition(q, bm):
    """float64 ``[..., NQB * 16, D]``: the pooled rows of ``q [..., Nq, D]`` (16 per query block of
    ``bm`` rows): row r is the mean of the query rows ``[r g, (r + 1) g)`` below Nq, ``g = bm / 16``,
    and 0 where there is none."""
    q = q.double()
    nq = q.shape[-2]
    g, rows = bm // POOL_ROWS.value, -(-nq // bm) * POOL_ROWS.value
    return torch.stack([q[..., r * g:(r + 1) * g, :].mean(-2) if r * g < nq else torch.zeros_like(q[..., 0, :])
                        for r in range(rows)], -2)


@triton.jit
def _pooled_queries_kernel(Q, Qp, Nq, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Qp ``[NQB * 16, D]`` = the predictor's pooled rows of a contiguous ``Q [Nq, D]``."""
    offs_r = tl.program_id(0) * POOL_ROWS + tl.arange(0, POOL_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    qp = pooled_queries(Q, offs_r, offs_d, Nq, D, 1, D, BLOCK_M, BLOCK_D)
    tl.store(Qp + offs_r[:, None] * D + offs_d[None, :], qp, mask=offs_d[None, :] < D)


@triton_ok
@pytest.mark.parametrize("dtype,bm", [(torch.float32, None), (torch.bfloat16, 128)])
def test_pooled_queries_match_definition(dtype, bm):
    """The predictor's pooled query rows, with partial and empty row groups past Nq."""
    bm = bm or _config(64, 24, 24).block_m
    Nq, D = bm + 22, 24
    nqb = -(-Nq // bm)
    q = randn(Nq, D, dtype=dtype, gen=fresh_generator(30)).to(DEV)
    qp = torch.empty((nqb * 16, D), dtype=dtype, device=DEV)
    _pooled_queries_kernel[(nqb,)](q, qp, Nq, D=D, BLOCK_M=bm, BLOCK_D=32)
    g = bm // 16
    ref = pooled_queries_definition(q.cpu(), bm)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the rounding of the means
    assert torch.allclose(qp.cpu().double(), ref, atol=tol, rtol=tol)
    assert (qp.cpu()[torch.arange(nqb * 16) * g >= Nq] == 0).all()  # empty groups: exactly 0


def pooled_keys_definition(k, kpm, bn):
    """float64 ``(kp, kbias, kobias, w)``: the pooled keys, log2 of each key block's total weight and
    of the outlier key's weight (as ``_pool_keys`` documents), and the key weights ``w [B, Nk]``
    (0: padded)."""
    k = k.double()
    B, _, Nk, _ = k.shape
    nkb = -(-Nk // bn)
    if kpm is None:
        w = torch.ones(B, Nk, dtype=torch.float64)
    else:
        w = (~kpm).double() if kpm.dtype == torch.bool else kpm.double().exp()
    W = torch.stack([w[:, j * bn:(j + 1) * bn].sum(-1) for j in range(nkb)], 1)
    kp = torch.stack([torch.einsum("bn,bhnd->bhd", w[:, j * bn:(j + 1) * bn], k[:, :, j * bn:(j + 1) * bn])
                      for j in range(nkb)], 2) / W.clamp_min(1e-300)[:, None, :, None]
    kbias = torch.log2(W)
    kobias = torch.where((W > 0) & (kpm is None or kpm.dtype == torch.bool), 0.0, -math.inf)
    if kpm is None:
        kbias, kobias = kbias[:1], kobias[:1]
    return kp, kbias, kobias, w


@triton_ok
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype,tiles", [(torch.float32, "kernel"), (torch.bfloat16, (128, 64))])
def test_pooled_keys_match_definition(dtype, tiles, kpm_kind):
    """Pooled keys weighted by the padding mask (a ragged last block, a fully padded block), the
    block biases and the outlier keys, GQA."""
    from entropy_attn._launch import _Config
    from entropy_attn.key_summary import _pool_keys

    cfg = _config(64, 24, 24) if tiles == "kernel" else _Config(*tiles, 4, 1)
    bn = cfg.block_n
    B, H, Hkv, Nk, D = 2, 4, 2, 2 * bn + 22, 24
    nkb = -(-Nk // bn)
    q, k, _ = random_qkv(B, H, Hkv, 8, Nk, D, dtype, seed=31)
    kpm = padding_mask(kpm_kind, B, Nk, bn, seed=32)
    inp = check_inputs(q.to(DEV), k.to(DEV), k.to(DEV), key_padding_mask=None if kpm is None else kpm.to(DEV))
    kp, ko, kbias, kobias = (t.cpu() for t in _pool_keys(inp.k, _mask_args(inp)[1], cfg.block_n, nkb))
    kp_ref, kbias_ref, kobias_ref, w = pooled_keys_definition(k, kpm, bn)

    assert kp.shape == ko.shape == (B, Hkv, nkb, D) and kp.dtype == ko.dtype == dtype
    assert kbias.shape == kobias.shape == kbias_ref.shape and kbias.dtype == kobias.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the rounding of the means
    assert torch.allclose(kp.double(), kp_ref, atol=tol, rtol=tol)
    assert torch.equal(kbias.isinf(), kbias_ref.isinf()) and torch.equal(kobias, kobias_ref.float())
    fin = kbias_ref.isfinite()
    assert torch.allclose(kbias.double()[fin], kbias_ref[fin], atol=1e-5)
    assert (kbias_ref[0, 1] == -math.inf) == (kpm is not None)  # the fully padded block
    # The outlier key: an unmasked key of its block at the largest distance from (rounded) kp.
    kd = k.double()
    for j in range(nkb):
        keys = kd[:, :, j * bn:(j + 1) * bn]
        live = (w[:, j * bn:(j + 1) * bn] > 0)[:, None, :].expand(-1, Hkv, -1)
        dist = (keys - kp.double()[:, :, j, None]).square().sum(-1).masked_fill(~live, -math.inf)
        out = ko.double()[:, :, j]
        has = live.any(-1)
        assert (out[~has] == 0).all()
        is_key = ((keys == out[:, :, None]).all(-1) & live).any(-1)
        d_out = (out - kp.double()[:, :, j]).square().sum(-1)
        assert is_key[has].all()
        assert (d_out[has] >= dist.amax(-1)[has] * (1 - 1e-5) - 1e-6).all()


@triton_ok
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("thr", [0.02, 0.9])  # 0.9: most tiles are listed only as some pooled row's best block
def test_fast_predictor_lists_match_definition(causal, thr):
    """The predictor's tile lists against float64 estimates from its own pooled keys: every tile to
    which a pooled row gives a share ``est - lse >= log2 (tau * slack)``, and every pooled row's best
    block, is listed (the best block of the most concentrated row first); every listed tile passes
    the one-sweep test (the share against each row's running lse after the tile's chunk, less the
    smallest growth of a row's lse after it). Causal: also every key block holding one of a row's
    ``LOCAL_KEYS`` most recent keys. The rows of a query block attend to clusters in
    different chunks, so that test lists more than the first rule here. (Ties within 1e-3 go either
    way.)"""
    import entropy_attn.pruned as pr

    chunk, eps, log2_thr = 16, 1e-3, math.log2(thr)
    bm, bn = kernel_tiles(200, 16)
    B, H, Hkv, D = 1, 2, 1, 16
    Nq, Nk = 3 * bm + 5, 70 * bn + 7  # 4 query blocks, 71 key blocks in 5 chunks: two steps of the listing
    q, k, _ = clustered(B, H, Hkv, Nq, Nk, D, block=bm // 2, strength=3.0, seed=40)
    inp = check_inputs(q.to(DEV), k.to(DEV), k.to(DEV), causal=causal)
    nqb, nkb = -(-Nq // bm), -(-Nk // bn)
    idx, count, (kp, ko, kbias, kobias), _ = pr._predict(inp, inp.q, inp.k, pr._config(Nq, D, D), nqb, nkb,
                                                      log2_thr, _mask_args(inp), chunk)
    idx, count = idx.cpu(), count.cpu()

    P = POOL_ROWS.value
    g, R = bm // P, nqb * P
    first_row = torch.arange(R) * g
    qp = pooled_queries_definition(q, bm)
    unit = inp.scale / math.log(2)
    kpd, kod = (t.cpu().double().repeat_interleave(H // Hkv, 1) for t in (kp, ko))
    est = torch.maximum(unit * qp @ kpd.transpose(-1, -2) + kbias.cpu().double(),
                        unit * qp @ kod.transpose(-1, -2) + kobias.cpu().double())
    in_causal_range = torch.arange(nkb)[None, :] * bn <= first_row[:, None] + Nk - Nq
    visible = (first_row < Nq)[:, None] & (in_causal_range | (not causal))
    est = est.masked_fill(~visible, -math.inf)
    ln2 = math.log(2)
    lse = torch.logsumexp(est * ln2, -1) / ln2
    live = lse.isfinite()
    lse_run = torch.logcumsumexp(est * ln2, -1) / ln2
    after_chunk = torch.clamp((torch.arange(nkb) // chunk + 1) * chunk, max=nkb) - 1
    lse_c = lse_run[..., after_chunk]  # [B, H, R, NKB]: each row's lse after the chunk of block j
    seen = lse_c.isfinite()
    share_run = torch.where(seen, est - lse_c, -math.inf)
    growth = torch.where(seen, lse[..., None] - lse_c, math.inf)
    per_qb = lambda t: t.reshape(B * H, nqb, P, *t.shape[3:])  # noqa: E731
    share = torch.where(live[..., None], est - lse[..., None], -math.inf)
    top = est.amax(-1, keepdim=True)
    best_may = live[..., None] & (est >= top - eps)
    best_sure = best_may & (est == top) & (best_may.sum(-1, keepdim=True) == 1)
    must = per_qb((share >= log2_thr + eps) | best_sure).any(2)
    one_sweep = per_qb(share_run).amax(2) - per_qb(growth).amin(2)
    may = (one_sweep >= log2_thr - eps) | per_qb(best_may).any(2)
    if causal:  # the local window: the key blocks of each block's rows' LOCAL_KEYS most recent keys
        qb, kb = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
        own_first, own_last = qb * bm + Nk - Nq, torch.clamp((qb + 1) * bm, max=Nq) - 1 + Nk - Nq
        local = ((kb + 1) * bn - 1 > own_first - LOCAL_KEYS.value) & (kb * bn <= own_last)
        assert local.sum(1).min() >= LOCAL_KEYS.value // bn
        must, may = must | local, may | local

    listed = torch.zeros(B * H, nqb, nkb, dtype=torch.bool)
    for bh in range(B * H):
        for i in range(nqb):
            tiles = idx[bh, i, :count[bh, i]].long()
            assert len(set(tiles.tolist())) == len(tiles) and ((tiles >= 0) & (tiles < nkb)).all()
            listed[bh, i, tiles] = True
            conc = per_qb(torch.where(live, top[..., 0] - lse, -math.inf))[bh, i]
            r = conc.argmax()
            if (conc >= conc[r] - eps).sum() == 1 and per_qb(best_sure)[bh, i, r].any():
                assert tiles[0] == per_qb(est)[bh, i, r].argmax()
    assert (must & ~listed).sum() == 0, (must & ~listed).nonzero()
    assert (listed & ~may).sum() == 0, (listed & ~may).nonzero()
    exact_rule = per_qb((share >= log2_thr) | best_may).any(2)
    if thr < 0.5:
        assert (listed & ~exact_rule).any()  # the one-sweep test lists more than the first rule here
    else:
        assert (per_qb(best_sure & (share < log2_thr - eps)).any(2) & listed).any()  # listed as a best block only


def vertical_definition(q, k, samples, bn, *, scale, causal=False, attn_mask=None, key_padding_mask=None,
                        local_keys=None, log2_thr=None):
    """float64 ``[B*H, NKB]``: log2 of the largest softmax weight (all masks) that the sampled query
    rows ``round(r (Nq - 1) / (samples - 1))`` (halves up) give to a key of each key block. With
    ``local_keys``: also the evidence of local attention, the same maximum over the sampled rows
    whose local window holds the block (the blocks holding one of the row's ``local_keys`` most recent
    keys, its own key ``row + Nk - Nq`` included) and that see a key block before it. With
    ``log2_thr``: also the keeper of each block, the query row of the only sampled row whose largest
    weight in it is >= 2^log2_thr (-1 where none or several are; and a boolean mask of the blocks
    where a row is within 1e-4 of the threshold, which either answer fits)."""
    q, k = q.double(), k.double()
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rows = torch.tensor([(r * (Nq - 1) + (samples - 1) // 2) // (samples - 1) for r in range(samples)])
    s = scale * q[:, :, rows] @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.arange(Nk)[None, :] > rows[:, None] + Nk - Nq, -math.inf)
    if attn_mask is not None:
        am = attn_mask.expand(B, H, Nq, Nk)[:, :, rows]
        s = s + (torch.where(am, 0.0, -math.inf) if am.dtype == torch.bool else am.double())
    if key_padding_mask is not None:
        pm = key_padding_mask[:, None, None, :]
        s = s + (torch.where(pm, -math.inf, 0.0) if pm.dtype == torch.bool else pm.double())
    valid = s > -math.inf
    lse = torch.logsumexp(s, -1, keepdim=True)
    logp = torch.where(valid, s - lse.nan_to_num(neginf=0.0), -math.inf) / math.log(2)
    nkb = -(-Nk // bn)
    logp = torch.nn.functional.pad(logp, (0, nkb * bn - Nk), value=-math.inf)
    per_row = logp.view(B, H, samples, nkb, bn).amax(4)
    vert = per_row.amax(2).reshape(B * H, nkb)
    out = [vert]
    if local_keys is not None:
        own = (rows + Nk - Nq)[:, None]
        first, last = torch.arange(nkb)[None, :] * bn, torch.arange(nkb)[None, :] * bn + bn - 1
        near = (last > own - local_keys) & (first <= own)  # [samples, NKB]
        chose = near & (own >= local_keys + bn - 1)  # rows that see a key block before their window
        out.append(per_row.masked_fill(~chose, -math.inf).amax(2).reshape(B * H, nkb))
    if log2_thr is not None:
        kept = (per_row >= log2_thr).reshape(B * H, samples, nkb)
        row = torch.where(kept, rows[None, :, None], -1).amax(1)
        out.append(torch.where(kept.sum(1) == 1, row, -1))
        out.append(((per_row - log2_thr).abs() < 1e-4).any(2).reshape(B * H, nkb))
    return out[0] if len(out) == 1 else tuple(out)


@triton_ok
@pytest.mark.parametrize("case", [
    # GQA, causal with Nq < Nk, key blocks split over several programs and combined in chunks
    # (interpreter tiles: 44 key blocks, 16 per chunk), with the predictor's local windows (rows with
    # key blocks before their windows on the GPU's 64-key blocks too)
    dict(B=1, H=2, Hkv=1, Nq=150, Nk=700, causal=True, samples=64, local=True),
    # Nq > Nk (causal: the first rows, sample 0 included, see no key), bool padding with a fully
    # padded block, 12 samples in a 16-row tile
    dict(B=2, H=4, Hkv=2, Nq=170, Nk=100, causal=True, kpm="bool", samples=12),
    dict(B=2, H=2, Hkv=2, Nq=77, Nk=70, mask="bool", kpm="float", samples=64),
    dict(B=1, H=4, Hkv=1, Nq=77, Nk=150, causal=True, mask="float", kpm="bool", samples=12, tiles=(128, 64),
         dtype=torch.bfloat16),
])
def test_vertical_matches_definition(monkeypatch, case):
    """The sampled vertical estimate: every mask kind, empty sampled rows, ragged key blocks; the
    local evidence, and the block keepers (the only sampled row that keeps an entry there)."""
    import entropy_attn.pruned as pr
    from entropy_attn._launch import _Config

    c = {"causal": False, "kpm": None, "mask": None, "tiles": None, "dtype": torch.float32, "local": False, **case}
    B, H, Hkv, Nq, Nk, D = c["B"], c["H"], c["Hkv"], c["Nq"], c["Nk"], 24
    monkeypatch.setattr(pr, "VERT_MIN_NQ", 1)
    monkeypatch.setattr(pr, "VERT_SAMPLES", c["samples"])
    cfg = _config(Nq, D, D) if c["tiles"] is None else _Config(*c["tiles"], 4, 1)
    nkb = -(-Nk // cfg.block_n)
    q, k, _ = random_qkv(B, H, Hkv, Nq, Nk, D, c["dtype"], seed=33)
    g = fresh_generator(34)
    kpm = padding_mask(c["kpm"], B, Nk, cfg.block_n, seed=35)
    mask = None
    if c["mask"] is not None:
        keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
        keep[..., 0, :] = False  # sampled row 0 sees no key
        mask = keep if c["mask"] == "bool" else torch.randn(B, 1, Nq, Nk, generator=g).masked_fill(~keep, -math.inf)
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    inp = check_inputs(dev(q), dev(k), dev(k), causal=c["causal"], attn_mask=dev(mask), key_padding_mask=dev(kpm))
    # local: each sampled row's weights in its own window apart (the predictor's local windows).
    local = c["local"]
    kw = dict(scale=inp.scale, causal=c["causal"], attn_mask=mask, key_padding_mask=kpm)
    # The keepers at a threshold that several sampled rows pass, and just below the largest weight
    # (one keeper at least), against the definition (rows within 1e-4 of the threshold either way).
    top = vertical_definition(q, k, c["samples"], cfg.block_n, **kw).max().item()
    for log2_thr in (math.log2(0.05), top - 1e-3):
        vert, vert_local, keeper, (miss, iota) = pr._vertical(inp, inp.q, inp.k, cfg, nkb, _mask_args(inp), log2_thr,
                                                              local=local)
        *ref, keeper_ref, near_thr = vertical_definition(
            q, k, c["samples"], cfg.block_n, local_keys=LOCAL_KEYS.value if local else None, log2_thr=log2_thr, **kw)
        keeper = keeper.cpu()
        assert keeper.shape == (B * H, nkb) and keeper.dtype == torch.int32
        assert torch.equal(keeper[~near_thr].long(), keeper_ref[~near_thr])
        assert (keeper_ref == -1).any() and ((keeper_ref >= 0).any() or log2_thr < top - 1e-3)
        assert miss.cpu().tolist() == [[Nq, -1]] * (B * H) and iota.cpu().tolist() == list(range(nkb))
    assert (vert_local is None) == (not local)
    wants = ref
    assert all(want.isfinite().any() for want in wants)
    for got, want in zip((vert, vert_local), wants):
        got = got.cpu()
        assert got.shape == (B * H, nkb) and got.dtype == torch.float32
        assert not got.isnan().any()
        assert torch.equal(got.isinf(), want.isinf()), (got, want)
        fin = want.isfinite()
        assert torch.allclose(got.double()[fin], want[fin], atol=1e-4), (got - want)[fin].abs().max()
