"""The PyTorch reference path: MATH.md section 1 evaluated chunk by chunk over the queries.

It is the CPU backend and the ground truth the Triton kernels are checked against. Each chunk of
``chunk_size`` query rows materializes only a ``[B, H, chunk, Nk]`` score block, and when gradients
are needed each chunk is wrapped in ``torch.utils.checkpoint`` so the backward recomputes it: the
memory stays O(chunk x Nk), so small models train on the CPU. Half-precision inputs are computed in
float32, float64 inputs in float64 (``torch.autograd.gradcheck`` passes).
"""
from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from ._inputs import AttentionInputs, score_masks

#: Score elements per chunk (B * H * chunk * Nk) when ``chunk_size`` is not given: 16 Mi floats.
_CHUNK_ELEMENTS = 1 << 24
#: A score below this counts as masked, as in the Triton kernels, whose running max starts at -1e30
#: in base 2 (``kernels/masks.py``, ``M_INIT``): a float mask of ``torch.finfo(torch.float32).min``,
#: as some models build theirs, masks its entry as -inf does, and a row with nothing above it is empty.
MASKED_BELOW = -1e30 * math.log(2)


def chunk_rows(B: int, H: int, Nk: int) -> int:
    """Query rows per chunk of the materialized paths: about ``_CHUNK_ELEMENTS`` scores, at least 1
    (also for an empty batch)."""
    return max(1, _CHUNK_ELEMENTS // max(1, B * H * Nk))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_precision(fn):
    """Decorator: run ``fn(inp, ...)`` with autocast off on ``inp.q``'s device. The reference path
    computes in float32 (float64 for float64 inputs), but under a caller's autocast its matmuls
    would run in 16 bits again (CPU bfloat16 autocast: entropies off by 0.04 nats at 256 keys)."""
    @functools.wraps(fn)
    def run(inp, *args, **kwargs):
        with torch.autocast(inp.q.device.type, enabled=False):
            return fn(inp, *args, **kwargs)
    return run


def dense_operands(inp: AttentionInputs):
    """``(q, k, v)`` of checked inputs in the compute dtype (float32, float64 for float64 inputs),
    k and v repeated to q's heads (grouped-query attention): ``[B, H, N, D]`` each."""
    cdt = _compute_dtype(inp.q.dtype)
    k, v = inp.k, inp.v
    if inp.groups > 1:
        k = k.repeat_interleave(inp.groups, dim=1)
        v = v.repeat_interleave(inp.groups, dim=1)
    return inp.q.to(cdt), k.to(cdt), v.to(cdt)


def masked_scores(s: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
    """Scores ``s`` plus ``bias``, -inf where ``hidden`` (``score_masks``; None: nothing) or where
    the sum is below ``MASKED_BELOW``. A NaN or infinite score under a hidden entry is dropped; under a
    -inf float ``attn_mask`` entry it gives NaN (NaN or inf plus -inf), as in SDPA and the kernels."""
    if bias is None and hidden is None:
        return s
    if bias is not None:
        s = s + bias
    drop = s < MASKED_BELOW
    return s.masked_fill(drop if hidden is None else drop | hidden, float("-inf"))


def masked_softmax(s: torch.Tensor):
    """``(P, log P, lse)`` of scores ``s [..., Nk]`` whose masked entries are -inf.

    Masked entries are 0 in both P and log P (0 log 0 = 0, and no -inf reaches autograd); a row
    with no unmasked entry has P = 0, log P = 0 and lse = -inf, with zero gradients. A NaN score
    counts as unmasked: its row is NaN, as in SDPA and the Triton kernels.
    """
    valid = s != float("-inf")
    empty = ~valid.any(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)  # a finite row for logsumexp; its weights are zeroed below
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    # Not s - lse: where every score of a row carries one large bias (-1e9, say), lse rounds to it
    # and loses the log of the row's mass; log_softmax subtracts the row max first.
    log_p = torch.log_softmax(s, dim=-1).masked_fill(~valid, 0.0)
    p = torch.exp(log_p).masked_fill(~valid | empty, 0.0)
    return p, log_p, lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf"))


def attention_rows(q, k, v, masks: tuple, scale: float):
    """Attention of a block of query rows, with the row entropy.

    Args:
        q: ``[B, H, n, D]``; k ``[B, H, Nk, D]``, v ``[B, H, Nk, Dv]`` (heads already expanded).
        masks: ``(bias, hidden)`` of ``score_masks`` for these rows.
    Returns:
        ``(out [B, H, n, Dv], entropy [B, H, n], lse [B, H, n])`` in q's dtype. Rows with no
        unmasked key give out 0, entropy 0 and lse -inf, with zero gradients.
    """
    p, log_p, lse = masked_softmax(masked_scores(scale * (q @ k.transpose(-1, -2)), *masks))
    return p @ v, -(p * log_p).sum(dim=-1), lse


@full_precision
def reference_attention(inp: AttentionInputs, chunk_size: int | None = None):
    """MATH.md section 1 on checked inputs.

    Returns:
        ``(out [B, H, Nq, Dv] in q.dtype, entropy [B, H, Nq] float32, or float64 for float64
        inputs, lse [B, H, Nq] same dtype as entropy)``.
    """
    q, k, v = inp.q, inp.k, inp.v
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    qc, kc, vc = dense_operands(inp)
    cdt = qc.dtype
    if chunk_size is None:
        chunk_size = chunk_rows(B, H, Nk)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, inp.attn_mask, inp.key_padding_mask)
    )

    def rows_attention(q_rows, k_all, v_all, rows):
        return attention_rows(q_rows, k_all, v_all, score_masks(inp, rows, dtype=cdt), inp.scale)

    outs, ents, lses = [], [], []
    for r0 in range(0, Nq, chunk_size):
        rows = slice(r0, min(r0 + chunk_size, Nq))
        args = (qc[:, :, rows], kc, vc, rows)
        if needs_grad and Nq > chunk_size:
            o, e, l = checkpoint(rows_attention, *args, use_reentrant=False)
        else:
            o, e, l = rows_attention(*args)
        outs.append(o)
        ents.append(e)
        lses.append(l)
    out = torch.cat(outs, dim=2).to(q.dtype)
    return out, torch.cat(ents, dim=2), torch.cat(lses, dim=2)
