"""Attention regularizers and ``entropy_loss``: the training-side API of ``EntropyAttention``.

A regularizer kind maps checked attention inputs and the row entropy to one value per query row;
``EntropyAttention`` averages it over the valid rows of each head into ``layer.last_regularizer``
(``[H]``), and ``entropy_loss(model)`` sums those over layers, so a training step is
``loss = task + gamma * entropy_loss(model)``. Adding a kind is one entry in ``REGULARIZERS``.

Materialized helpers (``attention_probs``, ``map_rows``) evaluate ``P`` of MATH.md section 1 chunk
by chunk over the query rows; they serve the baselines that need ``P`` itself (the L2 regularizer,
top-k attention, ``need_weights``).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ._inputs import AttentionInputs, score_masks
from .reference import MASKED_BELOW, _compute_dtype, chunk_rows, full_precision, masked_scores, masked_softmax


@full_precision
def attention_probs(inp: AttentionInputs, rows: slice | None = None):
    """``(P, log P)`` of MATH.md section 1 for the query ``rows`` (all when None).

    Returns two ``[B, H, n, Nk]`` tensors, float32 (float64 for float64 inputs); masked entries
    and rows with no unmasked key are 0 in both (so ``-(P * log P).sum(-1)`` is the entropy).
    Differentiable in q, k and float masks.
    """
    cdt = _compute_dtype(inp.q.dtype)
    rows = rows or slice(0, inp.q.shape[2])
    q, k = inp.q[:, :, rows].to(cdt), inp.k.to(cdt)
    if inp.groups > 1:
        k = k.repeat_interleave(inp.groups, dim=1)
    p, log_p, _ = masked_softmax(masked_scores(inp.scale * (q @ k.transpose(-1, -2)), *score_masks(inp, rows, dtype=cdt)))
    return p, log_p


def map_rows(inp: AttentionInputs, fn: Callable, chunk_size: int | None = None) -> torch.Tensor:
    """``fn(P, log P)`` over chunks of query rows, concatenated along dim 2.

    ``fn`` maps the ``[B, H, n, Nk]`` chunk to a ``[B, H, n, ...]`` tensor. Chunks are
    checkpointed when gradients are needed, so memory stays O(chunk x Nk) and the backward
    recomputes ``P``: the cost is a second materialized attention pass (no fused kernel).
    """
    B, H, Nq, _ = inp.q.shape
    Nk = inp.k.shape[2]
    chunk_size = chunk_size or chunk_rows(B, H, Nk)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inp.q, inp.k, inp.attn_mask, inp.key_padding_mask)
    )

    def rows_fn(rows):
        return fn(*attention_probs(inp, rows))

    parts = []
    for r0 in range(0, Nq, chunk_size):
        rows = slice(r0, min(r0 + chunk_size, Nq))
        use_ckpt = needs_grad and Nq > chunk_size
        parts.append(checkpoint(rows_fn, rows, use_reentrant=False) if use_ckpt else rows_fn(rows))
    return torch.cat(parts, dim=2)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Undo ``expand``: slice every stride-0 dimension to size 1 (broadcasting restores it)."""
    return t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]


def padded_keys(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """The padded keys of a ``key_padding_mask`` ``[B, Nk]``: its True entries, or its float entries
    below ``MASKED_BELOW`` (-inf, ``finfo.min``); bool ``[B, Nk]``."""
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    return key_padding_mask < MASKED_BELOW


def key_counts(inp: AttentionInputs) -> torch.Tensor:
    """Number of unmasked keys ``n_i`` of every query row, float32, broadcastable to
    ``[B, H, Nq]``. A key is masked by the causal rule, a False boolean ``attn_mask`` entry, a True
    boolean ``key_padding_mask`` entry, or a float mask entry below ``MASKED_BELOW`` (-inf,
    ``finfo.min``; other finite biases count)."""
    Nq, Nk = inp.q.shape[2], inp.k.shape[2]
    dev = inp.q.device
    if inp.attn_mask is None and inp.key_padding_mask is None:  # closed form, no [Nq, Nk] tensor
        i = torch.arange(Nq, device=dev, dtype=torch.float32)
        counts = (i + (Nk - Nq + 1)).clamp(0, Nk) if inp.causal else torch.full_like(i, Nk)
        return counts.view(1, 1, Nq)
    keep = torch.ones(1, 1, 1, Nk, dtype=torch.bool, device=dev)
    if inp.causal:
        i = torch.arange(Nq, device=dev)[:, None]
        keep = keep & (torch.arange(Nk, device=dev)[None, :] <= i + (Nk - Nq))
    if inp.attn_mask is not None:
        m = _compact(inp.attn_mask)
        keep = keep & (m if m.dtype == torch.bool else ~(m < MASKED_BELOW))
    if inp.key_padding_mask is not None:
        keep = keep & ~padded_keys(inp.key_padding_mask)[:, None, None, :]
    counts = keep.sum(dim=-1, dtype=torch.float32)
    return counts.expand(*counts.shape[:2], Nq)


def normalized_entropy(entropy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``H_i / log n_i``, 0 where ``n_i <= 1`` (MATH.md section 1)."""
    counts = counts.to(entropy.dtype)
    return torch.where(counts > 1, entropy / torch.log(counts.clamp_min(2.0)), torch.zeros_like(entropy))


def head_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-head weighted mean over batch and rows: ``[B, H, Nq]`` values and 0/1 weights -> ``[H]``."""
    w = weights.to(values.dtype).expand_as(values)
    return (values * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1.0)


def _shannon(inp: AttentionInputs, entropy: torch.Tensor) -> torch.Tensor:
    return entropy


def _l2(inp: AttentionInputs, entropy: torch.Tensor) -> torch.Tensor:
    """``sum_j P_ij^2`` per row (the L2 baseline; materialized, see ``map_rows``)."""
    return map_rows(inp, lambda p, log_p: (p * p).sum(dim=-1))


#: kind -> ``fn(inputs, entropy [B, H, Nq]) -> [B, H, Nq]`` per-row value, or None for no penalty.
#: ``entropy`` is the (optionally normalized) Shannon entropy of the fused kernel.
REGULARIZERS: dict[str, Callable[[AttentionInputs, torch.Tensor], torch.Tensor] | None] = {
    "shannon": _shannon,
    "l2": _l2,
    "none": None,
}


def entropy_loss(model: torch.nn.Module) -> torch.Tensor:
    """Sum over the model's ``EntropyAttention`` layers of the mean over heads of
    ``layer.last_regularizer`` (set by each layer's last forward in training mode).

    Returns a differentiable scalar (float32; float64 for float64 layers). Layers whose last
    forward recorded nothing (run in eval outside a monitor, or never run) contribute 0. A layer
    that a forward skips (LayerDrop, a branch not taken) still holds the value of the forward that
    last ran it, whose graph an earlier backward has freed: set its ``last_regularizer = None``
    where you skip it. Under activation checkpointing, use
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the reentrant form runs the
    forward under ``no_grad``, so its values carry no gradient (``entropy_loss`` warns when grad
    mode is on); the recomputation in the backward leaves the layers' values as the forward set
    them.

    Raises:
        ValueError: the model holds no ``EntropyAttention`` (see ``replace_attention``).
        RuntimeError: no layer has a recorded value: run a forward in training mode first.
    """
    from .modules import EntropyAttention

    layers = [m for m in model.modules() if isinstance(m, EntropyAttention)]
    if not layers:
        raise ValueError(
            "entropy_loss: the model has no EntropyAttention layer; swap its attention with "
            "entropy_attn.replace_attention(model) first"
        )
    recorded = [m for m in layers if m.last_regularizer is not None]
    if not recorded:
        raise RuntimeError(
            "entropy_loss: no EntropyAttention layer has recorded a value; call the model in "
            "training mode (model.train()) before entropy_loss(model)"
        )
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
            m.regularizer != "none" and not m.last_regularizer.requires_grad
            and any(p.requires_grad for p in m.parameters()) for m in recorded):
        warnings.warn(
            "entropy_loss: some layers' values carry no gradient, so the penalty does not train them: "
            "their forward ran under torch.no_grad, as reentrant activation checkpointing runs it; "
            "use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)", stacklevel=2)
    terms = [m.last_regularizer.mean() for m in recorded]
    return sum(terms[1:], terms[0])
