"""The Triton paths are torch.library ops: torch.compile traces them with no graph break, and
torch.library.opcheck validates their schema, fake tensor and autograd registrations."""
import pytest
import torch

from entropy_attn import EntropyAttention, KeySummary, entropy_attention, pruned_attention
from oracle import rel_err


def _inputs(device):
    q = torch.randn(1, 2, 19, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 23, 16, device=device, requires_grad=True)
    v = torch.randn(1, 1, 23, 16, device=device, requires_grad=True)
    return q, k, v


def _loss(q, k, v, kpm):
    out, ent = entropy_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="triton")
    return out.square().sum() + 0.1 * ent.mean()


def test_compile_fullgraph_matches_eager(device):
    q, k, v = _inputs(device)
    kpm = torch.zeros(1, 23, dtype=torch.bool, device=device)
    kpm[0, 3] = True
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    eager_loss = _loss(q, k, v, kpm)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    loss = compiled(q, k, v, kpm)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert rel_err(loss, eager_loss) < 1e-6
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) < 1e-6


def test_opcheck(device):
    q, k, v = _inputs(device)
    mask = (torch.rand(19, 23, device=device) < 0.8).expand(1, 2, 19, 23)
    args = (q, k, v, mask, None, True, 0.25, True)
    torch.library.opcheck(torch.ops.entropy_attn.attention_fwd.default, args)


def _pruned_inputs(device):
    q = torch.randn(2, 4, 19, 16, device=device)
    k, v = torch.randn(2, 2, 2, 23, 16, device=device).unbind(0)
    kpm = torch.zeros(2, 23, dtype=torch.bool, device=device)
    kpm[1, 17:] = True
    return q, k, v, kpm


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_pruned_compile_fullgraph_matches_eager(device, mode):
    """``pruned_attention`` (the ``pruned_fwd`` op) compiles with ``fullgraph=True`` (a graph break
    there fails) and gives the eager output and stats."""
    q, k, v, kpm = _pruned_inputs(device)

    def fn(q, k, v):
        return pruned_attention(q, k, v, tau=0.05, causal=True, key_padding_mask=kpm, mode=mode,
                                return_stats=True, backend="triton")

    torch._dynamo.reset()
    out, stats = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    eager_out, eager_stats = fn(q, k, v)
    assert torch.equal(out, eager_out)
    assert stats.keys() == eager_stats.keys()
    for name, val in stats.items():
        assert val.shape == (4,) and torch.equal(val, eager_stats[name]), name


def test_pruned_compile_with_key_summary(device):
    """The fast mode with a ``KeySummary`` (decoding: one query against a padded cache) compiles
    with ``fullgraph=True``; its pooled keys go to the op as tensors."""
    q, k, v, kpm = _pruned_inputs(device)
    q = q[:, :, :1]
    summary = KeySummary(k, kpm)

    def fn(q, k, v):
        return pruned_attention(q, k, v, tau=0.05, key_padding_mask=kpm, mode="fast", key_summary=summary,
                                backend="triton")

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(out, fn(q, k, v))
    assert torch.equal(out, pruned_attention(q, k, v, tau=0.05, key_padding_mask=kpm, mode="fast", backend="triton"))
    torch.library.opcheck(torch.ops.entropy_attn.pruned_fwd.default,
                          (q, k, v, None, kpm, False, 0.25, 0.05, "fast", 1.0, False, *summary.pooled(k, kpm, 16)))


def test_entropy_attention_eval_pruned_compiles(device):
    """An ``EntropyAttention`` in eval with ``tau > 0`` compiles whole, as a model served with
    ``torch.compile`` needs."""
    layer = EntropyAttention(32, 4, batch_first=True, tau=0.05, backend="triton", device=device).eval()
    x = torch.randn(2, 19, 32, device=device)
    kpm = torch.zeros(2, 19, dtype=torch.bool, device=device)
    kpm[1, 11:] = True
    torch._dynamo.reset()
    with torch.no_grad():
        eager, _ = layer(x, x, x, key_padding_mask=kpm, need_weights=False)
        compiled = torch.compile(lambda x: layer(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                                 fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("stats", [False, True])
def test_pruned_opcheck(device, stats):
    q, k, v, kpm = _pruned_inputs(device)
    mask = (torch.rand(19, 23, device=device) < 0.8).expand(2, 4, 19, 23)
    for args in ((q, k, v, mask, None, True, 0.25, 0.05, "exact", 1.0, stats),
                 (q, k, v, None, kpm, False, 0.3, 0.02, "fast", 0.5, stats)):
        torch.library.opcheck(torch.ops.entropy_attn.pruned_fwd.default, args)


@pytest.mark.gpu
def test_pruned_reduce_overhead_matches_eager():
    """``torch.compile(mode="reduce-overhead")`` replays the pruned kernels from a CUDA graph (no
    host launch work per call) and gives the eager result on fresh inputs."""
    q, k, v, _ = (t.bfloat16() if t.is_floating_point() else t for t in _pruned_inputs("cuda"))
    q, k, v = (t.repeat(1, 1, 64, 1) for t in (q, k, v))  # 1216 queries, 1472 keys
    fn = lambda q, k, v: pruned_attention(q, k, v, tau=0.01, mode="fast")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        q, k, v = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
        out = compiled(q, k, v).clone()
        assert torch.equal(out, fn(q, k, v))
