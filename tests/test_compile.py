"""The Triton path is a torch.library op: torch.compile traces it with no graph break, and
torch.library.opcheck validates its schema, fake tensor and autograd registrations."""
import torch

from entropy_attn import entropy_attention
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
