"""Fused entropy attention vs SDPA (FlashAttention-2, cuDNN) vs the materialized path, one run.

bf16, 16k tokens per batch (B = 16384 / N), 2048 model width (H = 2048 / D). Forward and
forward+backward (with the entropy in the loss for ``ours``). ``test_masked_attention``: the same
at N = 16k under a mask, against the SDPA backends that take one (memory-efficient, cuDNN; FA-2
takes none): a boolean or a float (-inf) ``key_padding_mask`` hiding the last eighth of the keys,
or a float ``attn_mask [N, N]`` of random N(0, 1) biases, given to SDPA as the equivalent
``attn_mask`` (a padding mask as ``[B, 1, 1, N]``). ``test_causal_masked_attention``: a padding mask
and the causal mask together, against what SDPA takes for that (it refuses ``is_causal`` with an
``attn_mask``: one ``attn_mask [B, 1, N, N]`` of both, which its kernels read whole) and against
FlexAttention (``torch.compile``d, with a block mask of both, which skips the masked tiles). Run on a GPU:

    pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import pytest
import torch
import torch.nn.functional as F

from entropy_attn import entropy_attention
from entropy_attn.flops import attention_flops

pytestmark = pytest.mark.gpu

TOKENS, WIDTH = 16384, 2048


def materialized(q, k, v, causal):
    """The O(N^2)-memory path users had before: scores, softmax, entropy, all materialized."""
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    log_p = torch.log_softmax(s, dim=-1)
    p = log_p.exp()
    ent = -(p * log_p.masked_fill(p == 0, 0)).sum(-1)
    return (p.to(v.dtype) @ v), ent


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, causal, attn_mask=None):
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal), None

    return run


IMPLS = {  # (q, k, v, causal, **masks) -> (out, entropy or None)
    "ours": lambda q, k, v, causal, **m: entropy_attention(q, k, v, causal=causal, backend="triton", **m),
    "ours_no_entropy": lambda q, k, v, causal, **m: (
        entropy_attention(q, k, v, causal=causal, return_entropy=False, backend="triton", **m), None),
    "sdpa_flash": sdpa("flash"),
    "sdpa_cudnn": sdpa("cudnn"),
    "materialized": materialized,
}


def bench_step(fn, b, h, n, d, grad, **kw):
    """The timed step: ``fn(q, k, v, **kw)`` (an ``IMPLS`` entry or ``sdpa``; ``kw``: ``causal`` and
    the masks) on fresh bf16 inputs ``[b, h, n, d]``; with ``grad``, also the backward of the
    output and of the entropy (weighted as ``gamma * H.mean()``)."""
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    dout = torch.randn_like(q)
    dent = torch.full((b, h, n), 0.1 / (b * h * n), device="cuda")

    def step():
        if not grad:
            with torch.no_grad():
                fn(q, k, v, **kw)
            return
        out, ent = fn(q, k, v, **kw)
        outs, grads = [out], [dout]
        if ent is not None:
            outs.append(ent)
            grads.append(dent)
        torch.autograd.backward(outs, grads)

    return step


def cases():
    for d in (64, 128):
        for n in (1024, 4096, 16384):
            for causal in (False, True):
                for impl in IMPLS:
                    if impl == "materialized" and n > 4096:
                        continue  # out of memory at N = 8192 on an 80 GB H100 (issue 2)
                    yield impl, n, d, causal


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl,n,d,causal", list(cases()), ids=lambda x: str(x))
def test_attention(measure, impl, n, d, causal, mode):
    b, h = TOKENS // n, WIDTH // d
    step = bench_step(IMPLS[impl], b, h, n, d, mode == "fwd_bwd", causal=causal)
    measure(step, flops=attention_flops(b, h, n, n, d, causal=causal, mode=mode), rounds=10,
            group=f"attention {mode}", impl=impl, N=n, D=d, causal=causal)


MASKS = ("padding_bool", "padding_float", "bias_float")
MASKED_IMPLS = ("ours", "ours_no_entropy", "sdpa_efficient", "sdpa_cudnn")


def masks(kind, b, n):
    """``(ours, sdpa)``: the keyword arguments of our call and SDPA's ``attn_mask`` for mask ``kind``."""
    if kind == "bias_float":
        bias = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        return {"attn_mask": bias}, bias
    pad = torch.zeros(b, n, dtype=torch.bool, device="cuda")
    pad[:, n - n // 8:] = True  # MHA convention: True = padding
    if kind == "padding_bool":
        return {"key_padding_mask": pad}, ~pad[:, None, None, :]  # SDPA: True = attend
    bias = torch.zeros(b, n, device="cuda", dtype=torch.bfloat16).masked_fill(pad, float("-inf"))
    return {"key_padding_mask": bias}, bias[:, None, None, :]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", MASKED_IMPLS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("d", [64, 128])
def test_masked_attention(measure, impl, mask, d, mode):
    n = 16384
    b, h = TOKENS // n, WIDTH // d
    ours, theirs = masks(mask, b, n)
    if impl.startswith("sdpa"):
        fn, kw = sdpa(impl.removeprefix("sdpa_")), {"attn_mask": theirs}
    else:
        fn, kw = IMPLS[impl], ours
    step = bench_step(fn, b, h, n, d, mode == "fwd_bwd", causal=False, **kw)
    measure(step, flops=attention_flops(b, h, n, n, d, causal=False, mode=mode), rounds=10,
            group=f"attention masked {mode}", impl=impl, mask=mask, N=n, D=d)


def flex(pad, n):
    """FlexAttention (compiled) under the causal mask and key padding mask ``pad [B, N]`` (True =
    padding): ``(q, k, v, causal) -> (out, None)``, its block mask built once, outside the timing."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal_unpadded(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ~pad[b, kv_idx]

    block_mask = create_block_mask(causal_unpadded, pad.shape[0], None, n, n, device=pad.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, causal: (compiled(q, k, v, block_mask=block_mask), None)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", MASKED_IMPLS + ("flex",))
@pytest.mark.parametrize("mask", MASKS[:2])
@pytest.mark.parametrize("d", [64, 128])
def test_causal_masked_attention(measure, impl, mask, d, mode):
    n = 16384
    b, h = TOKENS // n, WIDTH // d
    ours, theirs = masks(mask, b, n)
    if impl == "flex":
        pad = ours["key_padding_mask"]
        fn, kw = flex(pad if pad.dtype == torch.bool else pad.isinf(), n), {}
    elif impl.startswith("sdpa"):
        causal = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
        both = theirs & causal if theirs.dtype == torch.bool else torch.where(causal, theirs, float("-inf"))
        fn, kw = sdpa(impl.removeprefix("sdpa_")), {"attn_mask": both}
    else:
        fn, kw = IMPLS[impl], ours
    step = bench_step(fn, b, h, n, d, mode == "fwd_bwd", causal=impl.startswith("ours"), **kw)
    measure(step, flops=attention_flops(b, h, n, n, d, causal=True, mode=mode), rounds=10,
            group=f"attention causal masked {mode}", impl=impl, mask=mask, N=n, D=d)
