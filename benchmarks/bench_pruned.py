"""Tau-pruned attention (exact and fast) vs our dense kernel vs SDPA flash vs cuDNN, one run.

bf16, B = 1, H = 2048 / D heads, non-causal, on inputs with controlled tile sparsity s: every query
puts ~90% of its mass on the same ``n_hot = (1 - s) * Nk / 64`` sink keys, one per distinct 64-key
block (vertical stripes), the rest on a near-uniform background. Each row can keep at most 1/tau
entries, so tau = min(0.01, 0.45 / n_hot) (recorded). Labels: the measured tile sparsity of the
exact mode (``s``), the ideal speed-up ``1/(1-s)``, and for the fast mode its deviation from the
exact output (``fast_err``: max |fast - exact|) and its pruned mass next to the exact one.
Prefill at 8k and 16k (s >= 0.8) is also timed replayed from a CUDA graph, every competitor alike
(``graph``: no host launch overhead, which the pruned call's five launches feel at these sizes), and
at 8k-32k (s >= 0.8) called back to back, 131072 / N calls per synchronization (``stream``: each
call's host work overlaps the kernels of the calls before it, as in a model's forward pass).
Prefill under a key padding mask (16k, s = 0.9, the last eighth of the keys padded, with and
without a hole in the padding's hull) against our dense kernel and cuDNN under the same mask; and
under an ``attn_mask [N, N]`` of eight packed documents (16k, the same inputs, document bounds off
the tile edges) against our dense kernel, cuDNN and FlexAttention with the same mask (TFLOP/s
count every entry, masked or not).
Decoding: Nq = 1 and 16 queries against Nk = 32k and 128k keys (B = 4, 32 query heads, 8 kv heads),
each called directly and replayed from a CUDA graph; ``pruned_fast_summary`` is a decoding step of
the fast mode with a ``KeySummary`` kept between steps: the summary's update for one new key (the
last key block pooled again), then the call.

    pytest benchmarks/bench_pruned.py --benchmark-enable --benchmark-json=out.json   # ~3 min, H100
    pytest benchmarks/bench_pruned.py -m slow ...                                  # adds N = 64k
    python benchmarks/report.py out.json
"""
import math

import pytest
import torch
import torch.nn.functional as F

from entropy_attn import KeySummary, entropy_attention
from entropy_attn.flops import attention_flops
from entropy_attn.pruned import pruned_attention

pytestmark = pytest.mark.gpu
WIDTH = 2048
SPARSITY = (0.5, 0.8, 0.9, 0.95)


def stripes(b, h, hkv, nq, nk, d, s, seed=0):
    """Sink-key inputs with exact-mode tile sparsity ~ s (see the module docstring)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nkb = nk // 64
    n_hot = max(1, round((1 - s) * nkb))
    q = 0.3 * torch.randn(b, h, nq, d, device="cuda", generator=g)
    k = torch.randn(b, hkv, nk, d, device="cuda", generator=g)
    hot = torch.randperm(nkb, device="cuda", generator=g)[:n_hot] * 64 + torch.randint(0, 64, (n_hot,), device="cuda", generator=g)
    k[..., 0] = 0.0
    k[:, :, hot, 0] = math.sqrt(d)
    q[..., 0] = math.log(9 * nk / n_hot)
    v = torch.randn(b, hkv, nk, d, device="cuda", generator=g)
    tau = min(0.01, 0.45 / n_hot)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), tau


def sdpa(kind, causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def run(q, k, v, attn_mask=None):
        gqa = q.shape[1] != k.shape[1]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)

    return run


def dense_impls(causal=False):
    """The dense competitors, name -> ``fn(q, k, v)``: our kernel without entropy, SDPA flash, cuDNN."""
    return {
        "ours_dense": lambda q, k, v: entropy_attention(q, k, v, causal=causal, return_entropy=False, backend="triton"),
        "sdpa_flash": sdpa("flash", causal),
        "sdpa_cudnn": sdpa("cudnn", causal),
    }


DENSE = dense_impls()

_LABELS = {}


def prune_labels(q, k, v, tau, causal=False, slack=1.0, **masks):
    """Measured sparsity and the fast mode's deviation: the exact mode's tile sparsity ``s`` and
    ideal speed-up ``1/(1-s)``, the fast mode's (``fast_slack=slack``) ``fast_s``, ``fast_err`` =
    max |fast - exact|, ``fast_rel`` = ||fast - exact|| / ||exact|| (Frobenius) and both modes' mean
    pruned mass (``pruned_attention``'s stats, means over heads), under ``masks``."""
    with torch.no_grad():
        ex, st = pruned_attention(q, k, v, tau=tau, causal=causal, mode="exact", return_stats=True, **masks)
        fa, stf = pruned_attention(q, k, v, tau=tau, causal=causal, mode="fast", return_stats=True, fast_slack=slack,
                                   **masks)
    s = st["tile_sparsity"].mean().item()
    diff = fa.float() - ex.float()
    return dict(
        tau=round(tau, 5), s=round(s, 3), ideal=round(1 / max(1 - s, 1e-9), 1),
        fast_s=round(stf["tile_sparsity"].mean().item(), 3),
        fast_err=float(f"{diff.abs().max().item():.3g}"),
        fast_rel=float(f"{(diff.norm() / ex.float().norm()).item():.3g}"),
        mass_exact=round(st["pruned_mass"].mean().item(), 4), mass_fast=round(stf["pruned_mass"].mean().item(), 4),
    )


def sparse_labels(q, k, v, tau):
    """``prune_labels`` of a non-causal input, cached per input."""
    key = (q.data_ptr(), tuple(q.shape), tuple(k.shape), tau)
    if key not in _LABELS:
        _LABELS[key] = prune_labels(q, k, v, tau)
    return _LABELS[key]


def prefill_cases(sizes, sparsity=SPARSITY):
    for n in sizes:
        for d in (64, 128):
            for impl in DENSE:
                yield impl, n, d, None
            for s in sparsity:
                for mode in ("exact", "fast"):
                    yield f"pruned_{mode}", n, d, s


_INPUTS = {}


def prefill_inputs(n, d, s):
    key = (n, d, s)
    if key not in _INPUTS:
        _INPUTS.clear()
        _LABELS.clear()
        _INPUTS[key] = stripes(1, WIDTH // d, WIDTH // d, n, n, d, 0.9 if s is None else s)
    return _INPUTS[key]


def impl_call(impl, q, k, v, tau, s, labels):
    """``fn()`` running ``impl`` on (q, k, v); a pruned impl adds the input's sparsity labels (target
    ``s``) to ``labels``."""
    if impl in DENSE:
        return lambda: DENSE[impl](q, k, v)
    mode = impl.split("_")[1]
    labels.update(s_target=s, **sparse_labels(q, k, v, tau))
    if impl == "pruned_fast_summary":  # a decoding step: the newest key's block pooled again, then the call
        summary = KeySummary(k)

        def step():
            summary.update(k, start=k.shape[2] - 1)
            return pruned_attention(q, k, v, tau=tau, mode=mode, key_summary=summary)
        return step
    return lambda: pruned_attention(q, k, v, tau=tau, mode=mode)


def _prefill(measure, impl, n, d, s, how="direct"):
    """Time one prefill case ``how``: ``'direct'`` (each call synchronized), ``'graph'`` (replayed
    from a CUDA graph) or ``'stream'`` (calls back to back, one synchronization per round)."""
    q, k, v, tau = prefill_inputs(n, d, s)
    group = {"direct": "pruned prefill", "graph": "pruned prefill, CUDA graph",
             "stream": "pruned prefill, calls back to back"}[how]
    labels = dict(group=f"{group} (bf16, non-causal)", impl=impl, N=n, D=d)
    fn = impl_call(impl, q, k, v, tau, s, labels)
    if impl == "pruned_exact":
        labels.pop("fast_err"), labels.pop("mass_fast"), labels.pop("fast_s")
    with torch.no_grad():
        if how == "graph":
            fn = cuda_graph(fn)
        # Below 32k a call takes a few ms at most and its host part jitters: more rounds.
        rounds = 5 if n >= 32768 else 25
        calls = 1
        if how == "stream":
            rounds, calls = 10, max(2, 131072 // n)
        measure(fn, flops=attention_flops(1, WIDTH // d, n, n, d), rounds=rounds, warmup=2, calls=calls, **labels)


@pytest.mark.parametrize("impl,n,d,s", list(prefill_cases((8192, 16384, 32768))), ids=str)
def test_prefill(measure, impl, n, d, s):
    _prefill(measure, impl, n, d, s)


@pytest.mark.slow
@pytest.mark.parametrize("impl,n,d,s", list(prefill_cases((65536,))), ids=str)
def test_prefill_64k(measure, impl, n, d, s):
    _prefill(measure, impl, n, d, s)


@pytest.mark.parametrize("impl,n,d,s", list(prefill_cases((8192, 16384), (0.8, 0.9, 0.95))), ids=str)
def test_prefill_graph(measure, impl, n, d, s):
    _prefill(measure, impl, n, d, s, how="graph")


@pytest.mark.parametrize("impl,n,d,s", list(prefill_cases((8192, 16384, 32768), (0.8, 0.9, 0.95))), ids=str)
def test_prefill_stream(measure, impl, n, d, s):
    _prefill(measure, impl, n, d, s, how="stream")


def padded_cases():
    for d in (64, 128):
        yield "sdpa_cudnn", d, "ends"
        for impl in ("ours_dense", "pruned_exact", "pruned_fast"):
            for mask in ("ends", "ends_hole"):
                yield impl, d, mask


def padding(b, nk):
    """The ``ends`` key padding mask ``[b, nk]`` bool (True = padded): the last eighth of the keys."""
    pad = torch.zeros(b, nk, dtype=torch.bool, device="cuda")
    pad[:, nk - nk // 8:] = True
    return pad


@pytest.mark.parametrize("impl,d,mask", list(padded_cases()), ids=str)
def test_prefill_padded(measure, impl, d, mask):
    """Prefill under a key padding mask: 16k keys of which the last eighth is padded (``ends``: our
    kernels mask only the tiles across the padding's edge), or that and one padded key in the middle
    (``ends_hole``: a hole in the mask's hull, which masks every tile, as packed sequences do); inputs
    of tile sparsity 0.9. cuDNN gets the mask as SDPA's boolean ``attn_mask [1, 1, 1, N]``."""
    n = 16384
    q, k, v, tau = prefill_inputs(n, d, 0.9)
    pad = padding(1, n)
    if mask == "ends_hole":
        pad[:, n // 2] = True
    labels = dict(group="pruned prefill, key padding mask (bf16, non-causal)", impl=impl, N=n, D=d, mask=mask)
    fn = None
    if impl == "sdpa_cudnn":
        fn = lambda: sdpa("cudnn")(q, k, v, attn_mask=~pad[:, None, None, :])  # noqa: E731
    masked_prefill(measure, impl, q, k, v, tau, labels, fn, key_padding_mask=pad)


def masked_prefill(measure, impl, q, k, v, tau, labels, fn=None, **masks):
    """Time ``impl`` on prefill inputs ``(q, k, v, tau)`` under ``masks``: ``fn``, a competitor's
    call (under the same mask) built by the caller, or else our dense kernel or a pruned mode, called
    here (a pruned mode adds its sparsity labels to ``labels``)."""
    if fn is None and impl == "ours_dense":
        fn = lambda: entropy_attention(q, k, v, return_entropy=False, backend="triton", **masks)  # noqa: E731
    elif fn is None:
        mode = impl.split("_")[1]
        labels.update(s_target=0.9, **prune_labels(q, k, v, tau, **masks))
        if mode == "exact":
            for name in ("fast_err", "mass_fast", "fast_s"):
                labels.pop(name)
        fn = lambda: pruned_attention(q, k, v, tau=tau, mode=mode, **masks)  # noqa: E731
    n, d = q.shape[2], q.shape[3]
    with torch.no_grad():
        measure(fn, flops=attention_flops(1, WIDTH // d, n, n, d), rounds=25, warmup=2, **labels)


def document_cases():
    for d in (64, 128):
        for impl in ("sdpa_cudnn", "flex", "ours_dense", "pruned_exact", "pruned_fast"):
            yield impl, d


@pytest.mark.parametrize("impl,d", list(document_cases()), ids=str)
def test_prefill_documents(measure, impl, d):
    """Prefill of eight packed documents (16k tokens, bounds 29 keys past each 2048) under a boolean
    ``attn_mask [N, N]`` that keeps each query to its own document, on the s = 0.9 inputs (each
    document sees the sink keys that lie in it). FlexAttention gets the same mask as its block mask
    (built once, outside the timing); cuDNN gets it as SDPA's ``attn_mask [1, 1, N, N]``."""
    n = 16384
    q, k, v, tau = prefill_inputs(n, d, 0.9)
    bounds = torch.arange(1, 8, device="cuda") * 2048 + 29
    doc = torch.bucketize(torch.arange(n, device="cuda"), bounds, right=True)
    same = doc[:, None] == doc[None, :]
    labels = dict(group="pruned prefill, documents (bf16, non-causal)", impl=impl, N=n, D=d)
    fn = None
    if impl == "sdpa_cudnn":
        fn = lambda: sdpa("cudnn")(q, k, v, attn_mask=same[None, None])  # noqa: E731
    elif impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, n, n, device="cuda")
        compiled = torch.compile(flex_attention, dynamic=False)
        fn = lambda: compiled(q, k, v, block_mask=block_mask)  # noqa: E731
    masked_prefill(measure, impl, q, k, v, tau, labels, fn, attn_mask=same)


def decode_cases(nks):
    for nk in nks:
        for nq in (1, 16):
            for impl in (*DENSE, "pruned_exact", "pruned_fast", "pruned_fast_summary"):
                for graph in (False, True):
                    yield impl, nq, nk, graph


def cuda_graph(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as PyTorch's docs
    do); returns its replay. Serving engines run decoding steps this way, which removes the host's
    launch overhead from every competitor alike."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _decode(measure, impl, nq, nk, graph):
    b, h, hkv, d, s = 4, 32, 8, 128, 0.9
    key = ("dec", nq, nk)
    if key not in _INPUTS:
        _INPUTS.clear()
        _LABELS.clear()
        _INPUTS[key] = stripes(b, h, hkv, nq, nk, d, s, seed=1)
    q, k, v, tau = _INPUTS[key]
    labels = dict(group="pruned decoding (bf16, B=4, H=32, Hkv=8, D=128)", impl=impl, Nq=nq, Nk=nk, graph=graph)
    fn = impl_call(impl, q, k, v, tau, s, labels)
    try:
        with torch.no_grad():
            fn()
            if graph:
                fn = cuda_graph(fn)
    except RuntimeError as e:  # e.g. a cuDNN build without this shape
        pytest.skip(f"{impl}: {str(e).splitlines()[0][:120]}")
    with torch.no_grad():
        measure(fn, flops=attention_flops(b, h, nq, nk, d), rounds=10, warmup=3, **labels)


@pytest.mark.parametrize("impl,nq,nk,graph", list(decode_cases((32768, 131072))), ids=str)
def test_decode(measure, impl, nq, nk, graph):
    _decode(measure, impl, nq, nk, graph)
