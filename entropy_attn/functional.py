"""Functional attention with the row entropy: the library's main entry point."""
from __future__ import annotations

import torch

from ._inputs import AttentionInputs, check_inputs
from ._launch import MAX_HEAD_DIM, MAX_VALUE_DIM, TRITON_DTYPES, check_triton_inputs, interpreting
from .reference import reference_attention

BACKENDS = ("auto", "triton", "reference")


def _triton_runs(inp: AttentionInputs) -> bool:
    """Whether backend='auto' takes the Triton kernels: CUDA inputs the kernels support, and no
    mask that needs a gradient (the reference path differentiates float masks)."""
    mask_grad = any(m is not None and m.requires_grad for m in (inp.attn_mask, inp.key_padding_mask))
    return (
        inp.q.is_cuda
        and inp.q.dtype in TRITON_DTYPES
        and inp.q.shape[-1] <= MAX_HEAD_DIM
        and inp.v.shape[-1] <= MAX_VALUE_DIM
        and not mask_grad
    )


def resolve_backend(backend: str, inp: AttentionInputs) -> str:
    """Map ``backend`` ('auto', 'triton' or 'reference') to the path that runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if _triton_runs(inp) else "reference"
    if backend == "triton":
        check_triton_inputs(inp)
        if any(m is not None and m.requires_grad for m in (inp.attn_mask, inp.key_padding_mask)):
            raise ValueError("backend='triton' does not differentiate masks; use backend='reference'")
    return backend


def attention_with_lse(inp: AttentionInputs, *, entropy: bool = True, backend: str = "auto"):
    """``(out, entropy, lse)`` on checked inputs; lse is +inf (Triton) or -inf (reference) on
    rows with no unmasked key. ``entropy`` is None when not asked for."""
    if resolve_backend(backend, inp) == "reference":
        out, ent, lse = reference_attention(inp)
        return out, (ent if entropy else None), lse
    out, lse, ent = torch.ops.entropy_attn.attention_fwd(
        inp.q, inp.k, inp.v, inp.attn_mask, inp.key_padding_mask, inp.causal, inp.scale, entropy
    )
    return out, (ent if entropy else None), lse


def entropy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_entropy: bool = True,
    backend: str = "auto",
):
    """Scaled dot-product attention that also returns each query row's attention entropy.

    Args:
        q: ``[B, H, Nq, D]`` queries, float16 / bfloat16 / float32 (float64 on the reference path).
        k: ``[B, Hkv, Nk, D]`` keys, ``H % Hkv == 0`` (grouped-query / multi-query attention).
        v: ``[B, Hkv, Nk, Dv]`` values.
        causal: mask keys after the query, aligned bottom-right as in flash-attn: key ``j`` is
            visible to query ``i`` iff ``j <= i + Nk - Nq``. Combines with the masks below.
        scale: score scale, default ``D ** -0.5``.
        attn_mask: broadcastable to ``[B, H, Nq, Nk]``; boolean (True = attend) or floating
            (added to the scores; -inf masks), as in ``scaled_dot_product_attention``.
        key_padding_mask: ``[B, Nk]``; boolean (True = padding, ignored) or floating (added), as
            in ``nn.MultiheadAttention``.
        return_entropy: also return the entropy.
        backend: ``'triton'`` (fused kernels; CUDA, or the CPU under ``TRITON_INTERPRET=1``),
            ``'reference'`` (PyTorch, chunked over queries, any device, float64-capable), or
            ``'auto'``: Triton for supported CUDA inputs, else the reference path. A float mask that
            requires grad is differentiated on the reference path only.

    Returns:
        ``(out, entropy)``, or ``out`` alone when ``return_entropy=False``. ``out`` is
        ``[B, H, Nq, Dv]`` in q's dtype; ``entropy`` is ``[B, H, Nq]`` float32 (float64 for float64
        inputs), in nats, within ``[0, log n_i]`` for ``n_i`` unmasked keys. A row with no unmasked
        key gives out 0 and entropy 0, with zero gradients. Both outputs are differentiable; on the
        Triton path their gradients come from one fused backward kernel.
    """
    inp = check_inputs(
        q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, key_padding_mask=key_padding_mask
    )
    out, ent, _ = attention_with_lse(inp, entropy=return_entropy, backend=backend)
    return (out, ent) if return_entropy else out


__all__ = ["entropy_attention", "resolve_backend", "attention_with_lse", "interpreting"]
