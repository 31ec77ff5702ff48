"""The PyTorch reference path: float64 gradcheck, chunking, mask gradients, auto dispatch."""
import torch

from entropy_attn import entropy_attention
from entropy_attn._inputs import check_inputs
from entropy_attn.reference import reference_attention
from oracle import definition, rel_err


def test_gradcheck_float64():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 6, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, True, False, False, False, False, True]])

    def f(q, k, v):
        return entropy_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_chunked_equals_whole_and_definition():
    q, k, v = (torch.randn(2, 2, 37, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    inp = check_inputs(q, k, v, causal=True)
    whole = reference_attention(inp, chunk_size=1000)
    chunked = reference_attention(inp, chunk_size=5)
    ref = definition(q.detach(), k.detach(), v.detach(), causal=True)
    for a, b, r in zip(whole, chunked, ref):
        assert rel_err(a, r) < 1e-12 and rel_err(b, r) < 1e-12
    g = torch.randn_like(whole[0])
    ga = torch.autograd.grad((whole[0] * g).sum() + whole[1].sum(), (q, k, v))
    gb = torch.autograd.grad((chunked[0] * g).sum() + chunked[1].sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-12


def test_score_gradient_rows_sum_to_zero():
    """dS of MATH.md section 3 is the gradient of a float attn_mask: sum_j dS_ij = 0 per row."""
    q, k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 2, 13, 13, dtype=torch.float64, requires_grad=True)
    out, ent = entropy_attention(q, k, v, attn_mask=bias, causal=True, backend="reference")
    ds, = torch.autograd.grad((out * torch.randn_like(out)).sum() + 0.7 * ent.sum(), bias)
    assert ds.sum(-1).abs().max() < 1e-12 * ds.abs().max().clamp_min(1)
    assert ds.abs().max() > 0


def test_float32_and_half_inputs_on_reference():
    q, k, v = (torch.randn(1, 2, 9, 16).half() for _ in range(3))
    out, ent = entropy_attention(q, k, v)  # CPU tensors: auto picks the reference path
    assert out.dtype == torch.float16 and ent.dtype == torch.float32
    ref_out, ref_ent, *_ = definition(q.double(), k.double(), v.double())
    assert rel_err(out, ref_out) < 5e-3 and rel_err(ent, ref_ent) < 1e-5
