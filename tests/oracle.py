"""Float64 evaluation of shared MATH.md section 1, materialized, written independently of the
library's reference path. Used as ground truth for every attention test; also the generator that
the tests drawing several input streams seed from the test's fresh seed."""
import math

import torch


def fresh_generator(stream=0):
    """A CPU ``torch.Generator`` for input stream ``stream`` of a test, seeded from the test's fresh
    seed (tests/conftest.py): new inputs each run, the same again with the run's TEST_SEED."""
    return torch.Generator().manual_seed(torch.initial_seed() + stream)


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def definition(q, k, v, *, causal=False, scale=None, attn_mask=None, key_padding_mask=None):
    """Returns (O [B,H,Nq,Dv], H [B,H,Nq], lse [B,H,Nq], allowed [B,H,Nq,Nk]) in float64.
    Differentiable in q, k, v (pass float64 leaves)."""
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq)
    if attn_mask is not None:
        m = attn_mask.cpu()
        if m.dtype == torch.bool:
            allowed &= m
        else:
            s = s + m.double()
    if key_padding_mask is not None:
        m = key_padding_mask.cpu()[:, None, None, :]
        if m.dtype == torch.bool:
            allowed &= ~m
        else:
            s = s + m.double()
    # The library's convention: a score below -1e30 ln 2 (-1e30 in base 2; a float mask of
    # torch.finfo(torch.float32).min, say) is masked, as -inf is.
    allowed = allowed & (s >= -1e30 * math.log(2))
    empty = ~allowed.any(-1, keepdim=True)
    z = s.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
    P = torch.softmax(z, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(z, dim=-1).masked_fill(empty.squeeze(-1), 0.0)
    O = P @ v
    # -sum P log P with log P from log_softmax: lse - sum P s would cancel for large scores (a row
    # whose every score carries a bias of -1e9)
    ent = -(P * torch.log_softmax(z, dim=-1).masked_fill(~allowed, 0.0)).sum(-1)
    return O, ent, lse, allowed


def rel_err(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(x).any(), "NaN in result"
    denom = ref.norm()
    return ((x - ref).norm() / (denom if denom > 0 else 1.0)).item()
