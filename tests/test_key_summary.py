"""``KeySummary``: the fast mode's pooled keys kept between the calls of a decoding loop. A call
with a summary must give exactly the output of the same call without one (which pools the keys
itself, checked against the definition in test_pruned.py), however the summary was grown,
rewritten or truncated; a summary that does not match the call's keys must raise."""
import math

import pytest
import torch

from entropy_attn import KeySummary, _plan, pruned_attention
from entropy_attn._launch import _padding_args, interpreting
from entropy_attn.key_summary import _pool_keys
from entropy_attn.pruned import _config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                               reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def fresh_pooled(k, kpm, block_n):
    nkb = -(-k.shape[2] // block_n)
    return _pool_keys(k, _padding_args(kpm, k), block_n, nkb)


def assert_same_pooled(summary, k, kpm):
    """The summary's pooled keys are bitwise those pooled from scratch."""
    got = summary.pooled(k, kpm, summary.value_dim)
    for a, b in zip(got, fresh_pooled(k, kpm, summary.block_n)):
        assert a.shape == b.shape and torch.equal(a, b)


def cache(B, Hkv, cap, D, dtype, kpm_kind):
    """Key and value caches ``[B, Hkv, cap, D]`` and a padding mask cache ``[B, cap]`` (None, bool
    with ~20 % padded, or float with finite values and ~20 % -inf)."""
    k = torch.randn(B, Hkv, cap, D, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, cap, D, device=DEV).to(dtype)
    pad = torch.rand(B, cap, device=DEV) < 0.2
    if kpm_kind is None:
        return k, v, None
    if kpm_kind == "bool":
        return k, v, pad
    return k, v, torch.randn(B, cap, device=DEV).masked_fill(pad, -math.inf)


@triton_ok
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decoding_loop_with_summary_matches_pooling_per_call(dtype, kpm_kind):
    """A decoding loop, grouped queries (4 query heads on 2 kv heads), 1 and 3 queries per step,
    appends of 1 to 2.5 key blocks (crossing block boundaries and growing the summary's buffers),
    each step called twice (the second replays a launch plan): the output is bitwise the output of
    the call that pools the keys itself, and the summary's pooled keys are those pooled from scratch."""
    B, H, Hkv, D = 2, 4, 2, 24
    bn = _config(1, D, D).block_n
    kc, vc, mc = cache(B, Hkv, 6 * bn, D, dtype, kpm_kind)
    n = bn + 5
    summary = KeySummary(kc[:, :, :n], None if mc is None else mc[:, :n])
    for step, grow in enumerate((1, bn // 2 + 3, 1, 2 * bn + bn // 2, 1)):
        k, v, kpm = kc[:, :, :n], vc[:, :, :n], None if mc is None else mc[:, :n]
        assert_same_pooled(summary, k, kpm)
        for nq in (1, 3, 3):
            q = (2 * torch.randn(B, H, nq, D, device=DEV)).to(dtype)
            args = dict(tau=0.02, mode="fast", key_padding_mask=kpm, backend="triton")
            out = pruned_attention(q, k, v, key_summary=summary, **args)
            ref = pruned_attention(q, k, v, **args)
            assert torch.isfinite(out).all() and torch.equal(out, ref), (step, nq)
        kc[:, :, n:n + grow] = torch.randn(B, Hkv, grow, D, device=DEV).to(dtype)  # the next keys
        n += grow
        summary.update(kc[:, :, :n], None if mc is None else mc[:, :n])
        assert summary.num_keys == n


@triton_ok
def test_update_after_rewrite_and_truncation():
    """``update(start=...)`` after rewriting keys inside the cache, and an update to a shorter cache
    (to mid-block: its last block is pooled again), give the keys pooled from scratch and the same
    output as pooling per call; a start outside ``[0, Nk]`` raises."""
    B, H, Hkv, D = 1, 2, 1, 16
    bn = _config(1, D, D).block_n
    kc, vc, _ = cache(B, Hkv, 5 * bn, D, torch.float32, None)
    summary = KeySummary(kc)
    kc[:, :, bn + 3] = 10 * torch.randn(D, device=DEV)  # a new strong key in block 1
    summary.update(kc, start=bn + 3)
    assert_same_pooled(summary, kc, None)
    n = 2 * bn + 7
    summary.update(kc[:, :, :n])
    assert summary.num_keys == n
    assert_same_pooled(summary, kc[:, :, :n], None)
    q = torch.randn(B, H, 2, D, device=DEV)
    out = pruned_attention(q, kc[:, :, :n], vc[:, :, :n], mode="fast", key_summary=summary, backend="triton")
    assert torch.equal(out, pruned_attention(q, kc[:, :, :n], vc[:, :, :n], mode="fast", backend="triton"))
    for start in (-1, n + 1):
        with pytest.raises(ValueError, match="start"):
            summary.update(kc[:, :, :n], start=start)


@triton_ok
def test_summaries_of_two_caches_alternate():
    """Two caches of one shape and their summaries, called alternately: the launch plan recorded
    on one pair replays with the other's pooled keys (they are plan inputs, not recorded buffers)."""
    B, H, Hkv, D, n = 1, 2, 1, 16, 70
    pairs = []
    for _ in range(2):
        k, v, _ = cache(B, Hkv, n, D, torch.float32, None)
        pairs.append((k, v, KeySummary(k)))
    q = torch.randn(B, H, 1, D, device=DEV)
    for _ in range(3):
        for k, v, summary in pairs:
            out = pruned_attention(q, k, v, mode="fast", key_summary=summary, backend="triton")
            assert torch.equal(out, pruned_attention(q, k, v, mode="fast", backend="triton"))
    assert sum(isinstance(p, _plan.Plan) for p in _plan._plans.values()) == 2  # with and without a summary


@triton_ok
def test_prefill_with_summary():
    """Prefill (many queries, causal, the pooled keys also bound the sweep's lse): same output."""
    B, H, Hkv, D, n = 1, 2, 2, 32, 90
    k, v, _ = cache(B, Hkv, n, D, torch.bfloat16, None)
    q = torch.randn(B, H, n, D, device=DEV).bfloat16()
    summary = KeySummary(k)
    out = pruned_attention(q, k, v, causal=True, mode="fast", key_summary=summary, backend="triton")
    assert torch.equal(out, pruned_attention(q, k, v, causal=True, mode="fast", backend="triton"))


def test_stale_or_mismatched_summary_raises():
    """Every way a summary can disagree with the call's keys raises before any kernel runs."""
    B, H, Hkv, D, n = 2, 4, 2, 16, 40
    kc, vc, mc = cache(B, Hkv, n + 8, D, torch.float32, "bool")
    k, v, kpm = kc[:, :, :n], vc[:, :, :n], mc[:, :n]
    q = torch.randn(B, H, 1, D, device=DEV)
    summary = KeySummary(k, kpm)

    def call(k=k, v=v, kpm=kpm, mode="fast", summary=summary, q=q):
        return pruned_attention(q, k, v, key_padding_mask=kpm, mode=mode, key_summary=summary)

    call()  # up to date: runs
    with pytest.raises(ValueError, match="holds 40 keys but k has 41"):
        call(kc[:, :, :n + 1], vc[:, :, :n + 1], mc[:, :n + 1])
    with pytest.raises(ValueError, match="mode='fast' only"):
        call(mode="exact")
    with pytest.raises(TypeError, match="KeySummary"):
        call(summary=object())
    with pytest.raises(ValueError, match="bool key_padding_mask, got none"):
        call(kpm=None)
    with pytest.raises(ValueError, match="bool key_padding_mask, got float"):
        call(kpm=torch.zeros(B, n, device=DEV))
    with pytest.raises(ValueError, match="batch 2, 2 kv heads, head dim 16"):
        call(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="float32"):
        call(k.double(), v.double(), q=q.double())
    with pytest.raises(TypeError, match="k must be float16"):
        KeySummary(k.to(torch.int32))
    # Same shape, other data: another tensor, or the cache written in place without an update.
    with pytest.raises(ValueError, match="stale"):
        call(k.clone())
    kc[0, 0, 3] += 1.0
    with pytest.raises(ValueError, match="stale"):
        call()
    summary.update(k, kpm, start=3)
    call()
    mc[1, 5] = ~mc[1, 5]
    with pytest.raises(ValueError, match="stale"):
        call()
    summary.update(k, kpm, start=5)
    call()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        KeySummary([1, 2])
    with pytest.raises(ValueError, match="4 dimensions"):
        KeySummary(k[0])
    with pytest.raises(ValueError, match=r"shape \[B, Nk\]"):
        KeySummary(k, kpm[:, :5])


def test_value_dim_fixes_the_key_block():
    """Values wider than the summary was built for raise where they change the key block (always
    on a GPU: D = 64 and Dv = 256 take 32-key blocks, not 64)."""
    B, H, D, dv, n = 1, 2, 64, 256, 100
    k = torch.randn(B, 1, n, D, device=DEV)
    v = torch.randn(B, 1, n, dv, device=DEV)
    q = torch.randn(B, H, 1, D, device=DEV)
    summary = KeySummary(k)
    if _config(1, D, dv).block_n != _config(1, D, D).block_n:
        with pytest.raises(ValueError, match="value_dim=256"):
            pruned_attention(q, k, v, mode="fast", key_summary=summary)
    else:  # the interpreter's 16-key blocks: the same block, so the summary fits
        assert summary.pooled(k, None, dv) is not None or not summary._triton_pools()
    wide = KeySummary(k, value_dim=dv)
    assert wide.block_n == _config(1, D, dv).block_n
    out = pruned_attention(q, k, v, mode="fast", key_summary=wide)
    assert out.shape == (B, H, 1, dv) and torch.equal(out, pruned_attention(q, k, v, mode="fast"))


def test_reference_path_ignores_the_summary():
    """float64 keys (the reference path): the summary pools nothing, still checks, and the output
    is the reference's."""
    k, v, _ = cache(1, 1, 50, 8, torch.float64, None)
    q = torch.randn(1, 2, 3, 8, device=DEV, dtype=torch.float64)
    summary = KeySummary(k)
    out = pruned_attention(q, k, v, mode="fast", key_summary=summary)
    assert torch.equal(out, pruned_attention(q, k, v, mode="fast"))
    with pytest.raises(ValueError, match="holds 50 keys"):
        pruned_attention(q, k[:, :, :49], v[:, :, :49], mode="fast", key_summary=summary)


@triton_ok
def test_inference_mode_tensors():
    """Inference tensors have no version counter: the summary checks their address and length."""
    with torch.inference_mode():
        kc, vc, _ = cache(1, 1, 60, 16, torch.float32, None)
        q = torch.randn(1, 2, 1, 16, device=DEV)
        summary = KeySummary(kc[:, :, :40])
        out = pruned_attention(q, kc[:, :, :40], vc[:, :, :40], mode="fast", key_summary=summary, backend="triton")
        assert torch.equal(out, pruned_attention(q, kc[:, :, :40], vc[:, :, :40], mode="fast", backend="triton"))
        with pytest.raises(ValueError, match="stale"):
            pruned_attention(q, kc[:, :, 1:41], vc[:, :, 1:41], mode="fast", key_summary=summary, backend="triton")
        summary.update(kc[:, :, :55])
        assert_same_pooled(summary, kc[:, :, :55], None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nq", [1, 16])
def test_decoding_step_replayed_from_a_cuda_graph(nq):
    """A serving step captured once in a CUDA graph (the summary's update for the newest key, then
    the fast call), replayed after new keys and queries are written into the captured buffers in
    place, gives exactly the fast call that pools the cache itself (grouped-query heads, split
    programs, 5000 keys of D = 128, bf16)."""
    B, H, Hkv, D, n = 2, 8, 2, 128, 5000
    k, v, _ = cache(B, Hkv, n, D, torch.bfloat16, None)
    q = torch.randn(B, H, nq, D, device=DEV).bfloat16()
    summary = KeySummary(k)

    def step():
        summary.update(k, start=n - 1)
        return pruned_attention(q, k, v, tau=0.01, mode="fast", key_summary=summary)

    step()  # compiles, and fills the launch caches outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on a side stream of its own
        out = step()
    for _ in range(3):
        k[:, :, n - 1] = 4 * torch.randn(B, Hkv, D, device=DEV).bfloat16()  # a new, strong last key
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = pruned_attention(q, k, v, tau=0.01, mode="fast")
        assert torch.isfinite(out).all() and torch.equal(out, ref)
