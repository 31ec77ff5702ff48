"""The Triton path as ``torch.library`` custom ops, so that ``torch.compile`` traces through it
without graph breaks and autograd calls the fused backward.

``torch.ops.entropy_attn.attention_fwd`` returns ``(out, lse, entropy)``;
``torch.ops.entropy_attn.attention_bwd`` returns ``(dq, dk, dv)`` from the gradients of out and
entropy in one fused backward (MATH.md section 3). Eager calls take ``AttentionFunction``, the same
kernels and backward as an ``autograd.Function``, without the ops' dispatch (host time).
``torch.ops.entropy_attn.pruned_fwd`` returns ``(out, stats)`` of the tau-pruned kernels (MATH.md
section 5, inference only: no autograd), so that ``torch.compile`` traces ``pruned_attention`` and
``EntropyAttention`` in eval with ``tau > 0`` whole, CUDA graphs (``mode="reduce-overhead"``)
included.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _launch
from ._inputs import AttentionInputs
from .pruned import STAT_NAMES, pruned_triton


def _inputs(q, k, v, attn_mask, key_padding_mask, causal, scale) -> AttentionInputs:
    return AttentionInputs(q, k, v, attn_mask, key_padding_mask, causal, scale)


def _attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    causal: bool, scale: float, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch.attention_forward(_inputs(q, k, v, attn_mask, key_padding_mask, causal, scale), entropy)


attention_fwd = torch.library.custom_op("entropy_attn::attention_fwd", _attention_forward, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, attn_mask, key_padding_mask, causal, scale, entropy):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, H, Nq, v.shape[-1]))
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    ent = q.new_empty((B, H, Nq) if entropy else (0,), dtype=torch.float32)
    return out, lse, ent


def _attention_backward(
    dout: Tensor, dent: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ent: Tensor,
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    inp = _inputs(q, k, v, attn_mask, key_padding_mask, causal, scale)
    return _launch.attention_backward(inp, out, lse, ent, dout, dent)


attention_bwd = torch.library.custom_op("entropy_attn::attention_bwd", _attention_backward, mutates_args=())


@attention_bwd.register_fake
def _(dout, dent, q, k, v, out, lse, ent, attn_mask, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_padding_mask, causal, scale, _ = inputs
    out, lse, ent = output
    ctx.save_for_backward(q, k, v, out, lse, ent, attn_mask, key_padding_mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse, dent, bwd=attention_bwd):
    q, k, v, out, lse, ent, attn_mask, key_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dent is not None and dent.numel() == 0:
        dent = None
    dq, dk, dv = bwd(dout, dent, q, k, v, out, lse, ent, attn_mask, key_padding_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class AttentionFunction(torch.autograd.Function):
    """``attention_fwd`` and its autograd for eager calls: the same kernels, saved tensors and fused
    backward, without the custom ops' dispatch (on the H200 machine's host the forward op took
    114-118 us of host time per call against 74-78 us for its launches alone). ``torch.compile``
    traces the ops instead. ``apply(q, k, v, attn_mask, key_padding_mask, causal, scale, entropy)``
    returns ``(out, lse, entropy)``; the gradient of lse is not propagated (as with the op)."""

    @staticmethod
    def forward(q, k, v, attn_mask, key_padding_mask, causal, scale, entropy):
        return _attention_forward(q, k, v, attn_mask, key_padding_mask, causal, scale, entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs give None, as the op's backward expects
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse, dent):
        return _backward(ctx, dout, dlse, dent, bwd=_attention_backward)


@torch.library.custom_op("entropy_attn::pruned_fwd", mutates_args=())
def pruned_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
    causal: bool, scale: float, tau: float, mode: str, slack: float, stats: bool,
    kp: Tensor | None = None, ko: Tensor | None = None, kbias: Tensor | None = None, kobias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Nq, Dv] in q's dtype, stats)``: with ``stats``, float32 ``[3, H]``, the rows in
    ``STAT_NAMES`` order; else an empty float32 ``[0]``. ``tau > 0``, checked inputs. ``kp, ko,
    kbias, kobias``: the fast mode's pooled keys (a ``KeySummary``'s), or None."""
    inp = _inputs(q, k, v, attn_mask, key_padding_mask, causal, scale)
    pooled = None if kp is None else (kp, ko, kbias, kobias)
    if not stats:
        return pruned_triton(inp, tau, mode, slack=slack, pooled=pooled), q.new_empty((0,), dtype=torch.float32)
    out, st = pruned_triton(inp, tau, mode, stats=True, slack=slack, pooled=pooled)
    return out, torch.stack([st[name] for name in STAT_NAMES])


@pruned_fwd.register_fake
def _(q, k, v, attn_mask, key_padding_mask, causal, scale, tau, mode, slack, stats, kp=None, ko=None, kbias=None,
      kobias=None):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, H, Nq, v.shape[-1]))
    return out, q.new_empty((3, H) if stats else (0,), dtype=torch.float32)
