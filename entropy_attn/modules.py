"""``EntropyAttention``: a drop-in ``nn.MultiheadAttention`` on the fused entropy kernels.

It subclasses ``nn.MultiheadAttention`` (same constructor, parameters, ``state_dict`` keys, forward
signature, return values and mask conventions; ``isinstance(layer, nn.MultiheadAttention)`` holds)
and replaces its forward:

- training, or a dropout-free, weights-free call: ``entropy_attention`` (Triton kernels on CUDA,
  the chunked PyTorch reference elsewhere), recording the row entropy for ``entropy_loss``;
- eval with ``tau > 0``: ``pruned_attention`` (MATH.md section 5);
- ``need_weights=True``, or attention dropout in training: the materialized path (``P`` in full,
  like ``nn.MultiheadAttention``'s own ``need_weights`` path; O(B H L S) memory).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._inputs import AttentionInputs, check_inputs, finite_number
from .functional import BACKENDS, _range_cells, attention_entropies
from .pruned import MODES, pruned_attention
from .range_entropy import DEFAULT_ALPHA, cell_entropy, init_anchors, sequence_positions
from .reference import _compute_dtype
from .regularizer import (REGULARIZERS, attention_probs, head_mean, key_counts, map_rows, normalized_entropy,
                          padded_keys)


#: The id of the running autograd graph task, -1 outside a backward (what ``torch.utils.checkpoint``
#: itself reads; a private function, so a torch without it never counts as recomputing).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing's recomputation
    (``torch.utils.checkpoint``, either form). The layers keep the records of the forward proper
    then, and the monitor counts a call once (not traced by ``torch.compile``, which records)."""
    return not torch.compiler.is_compiling() and _graph_task_id() != -1


def _keep_module_forward(module, args):
    """No-op forward pre-hook. ``nn.TransformerEncoderLayer`` in eval under ``no_grad`` takes the
    fused ``torch._transformer_encoder_layer_fwd``, which reads ``self_attn``'s weights and never
    calls ``self_attn``; a hook on any of its submodules disables that fast path."""


def _pad_keys(mask: Tensor | None, n: int, bool_fill: bool) -> Tensor | None:
    """Append ``n`` key columns to a ``[..., S]`` mask: ``bool_fill`` in a boolean mask, 0 in a float one."""
    if mask is None or n == 0:
        return mask
    fill = bool_fill if mask.dtype == torch.bool else 0.0
    extra = torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)


def _top_k_inputs(inp: AttentionInputs, k: int) -> AttentionInputs:
    """Inputs that keep only the ``k`` largest scores of each row: an explicit ``[B, H, L, S]``
    mask (the top-k baseline; materialized, chosen without gradient, O(B H L S) memory)."""
    with torch.no_grad():
        keep = map_rows(inp, lambda p, _: torch.zeros_like(p, dtype=torch.bool).scatter_(
            -1, p.topk(min(k, p.shape[-1]), dim=-1).indices, True))
    mask = inp.attn_mask
    if mask is None:
        mask = keep
    elif mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, float("-inf"))
    return check_inputs(inp.q, inp.k, inp.v, causal=inp.causal, scale=inp.scale, attn_mask=mask,
                        key_padding_mask=inp.key_padding_mask)


def _tau_prune(p: Tensor, tau: float) -> Tensor:
    """MATH.md section 5 on a materialized ``P``: keep ``P >= tau`` and each row's maximum, renormalize."""
    keep = (p >= tau) | (p == p.amax(dim=-1, keepdim=True))
    a = p * keep
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


class _NoGradient(torch.autograd.Function):
    """``out`` as a function of ``q, k, v`` whose backward raises: the pruned kernels have no
    gradient, and a backward that went around them would leave q, k and v (and the layer's input
    projection) silently without one."""

    @staticmethod
    def forward(ctx, out, q, k, v):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "EntropyAttention: a forward in eval() with tau > 0 runs pruned_attention, which has no gradient; "
            "call the layer with need_weights=True (the materialized path, differentiable), in train(), or with tau=0"
        )


class EntropyAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that records its attention entropy and prunes at inference.

    Positional arguments, ``forward`` and returns are those of ``nn.MultiheadAttention`` (read its
    documentation); masks follow its conventions (boolean ``attn_mask`` True = *not* allowed,
    boolean ``key_padding_mask`` True = padding, float masks added to the scores). Keyword-only:

    Args:
        regularizer: what ``last_regularizer`` holds, a key of ``entropy_attn.regularizer.REGULARIZERS``
            or ``'range'``:
            ``'shannon'`` (the row entropy of the fused kernel, free), ``'l2'`` (``sum_j P_ij^2``,
            computed by a second, materialized and checkpointed pass over ``P``: about the cost of
            an unfused attention forward+backward), ``'range'`` (the range-partition entropy of
            MATH.md section 4, fused into the same kernels as ``num_anchors`` extra value columns;
            the layer owns its ``anchors`` as a parameter), ``'none'`` (zeros).
        normalize: divide the entropy by ``log n_i`` (``n_i`` unmasked keys of row i; 0 where
            ``n_i <= 1``), so ``last_entropy`` lies in [0, 1]; the range regularizer by the log
            of its number of cells (``num_anchors``, +1 where keys without a position add one).
        tau: in eval mode, drop attention entries ``P_ij < tau`` and renormalize (MATH.md section 5)
            through ``entropy_attn.pruned.pruned_attention``; 0 = dense. Its kernels have no
            gradient: a backward through such a forward raises, eagerly (``need_weights=True`` runs
            the materialized path, which has one; under ``torch.compile`` q, k and v get none).
        prune_mode: ``mode`` of ``pruned_attention`` (``'exact'`` by default).
        top_k: baseline that keeps only the ``k`` largest scores of each query row, in training and
            eval; the selection materializes a ``[B, H, L, S]`` boolean mask (no fused speed).
        backend: ``'auto'`` (Triton kernels for CUDA inputs, PyTorch reference elsewhere),
            ``'triton'`` or ``'reference'``; see ``entropy_attention``.
        num_anchors, range_alpha, key_positions: for ``regularizer='range'``: the number of anchors
            (about ``sqrt(S)`` is the paper's choice; the grid rounds it to a power of c), the
            cells' temperature on [0, 1] coordinates (> 0), and the keys' coordinates ``[S, c]``
            (default the normalized 1-D positions; e.g.
            ``range_entropy.patch_positions(14, 14, class_token=True)`` for a ViT).
            The anchors are initialized on a uniform grid of ``[0, 1]^c``. A ``state_dict`` of a
            ``'range'`` layer has the extra key ``anchors``.

    Attributes set by a forward in training mode or under ``AttentionMonitor`` (None otherwise):
        last_entropy: ``[H]`` float32 (float64 for float64 inputs), the Shannon entropy (nats, or normalized) of each head,
            averaged over batch and valid query rows (rows with at least one unmasked key; in
            self-attention, rows whose query is padding are left out). Differentiable.
        last_regularizer: ``[H]``, the ``regularizer`` kind's value averaged the same way
            (``last_entropy`` itself for ``'shannon'``). Differentiable.
        last_prune_stats: eval with ``tau > 0`` and ``need_weights=False`` under a monitor:
            ``pruned_attention``'s per-head stats.
    A layer called several times per step holds its last call's values; in training they keep
    the entropy's autograd graph alive until the next forward or the backward. The recomputation
    of activation checkpointing, inside the backward, leaves them as they are.

    Differences from ``nn.MultiheadAttention``:
        - ``need_weights=True`` (the default, as there) and attention dropout in training run the
          materialized path: ``P`` in float32, dropout applied to ``P`` (the returned weights are
          the dropped-out ones, as there); the entropy is always that of the undropped ``P``.
          Set ``need_weights=False`` and ``dropout=0`` for the fused kernels.
        - ``is_causal=True`` is also accepted without ``attn_mask`` (square attention). With a mask,
          it is trusted as a hint (as ``scaled_dot_product_attention`` does): the kernels apply the
          causal rule and skip the mask, unless ``add_bias_kv`` / ``add_zero_attn`` add key columns
          or ``L != S``; then the mask is used, and the added columns stay visible to every query
          (as in ``nn.MultiheadAttention``'s weights path; its SDPA path hides them).
        - A query row with no unmasked key gives attention output 0 and entropy 0, never NaN.
        - Bad inputs raise ``ValueError`` / ``TypeError`` naming the argument and expected shape.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, regularizer="shannon",
                 normalize=False, tau=0.0, prune_mode="exact", top_k=None, backend="auto",
                 num_anchors=16, range_alpha=DEFAULT_ALPHA, key_positions=None) -> None:
        if not (isinstance(embed_dim, int) and isinstance(num_heads, int)) or embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive integers, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if regularizer not in (*REGULARIZERS, "range"):
            raise ValueError(f"regularizer must be one of {sorted((*REGULARIZERS, 'range'))}, got {regularizer!r}")
        tau = finite_number("tau", tau, positive=False)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if prune_mode not in MODES:
            raise ValueError(f"prune_mode must be one of {MODES}, got {prune_mode!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        self.regularizer, self.normalize, self.tau = regularizer, normalize, tau
        self.prune_mode, self.top_k, self.backend = prune_mode, top_k, backend
        self.last_entropy = self.last_regularizer = self.last_prune_stats = None
        self._last_rows = None  # [H] valid rows behind last_entropy (the monitor's weights)
        self._monitors = 0  # active AttentionMonitors: record the entropy in eval too
        self.register_forward_pre_hook(_keep_module_forward)
        if regularizer == "range":
            if key_positions is not None:
                if not (isinstance(key_positions, Tensor) and key_positions.is_floating_point()):
                    raise TypeError(f"key_positions must be a floating-point tensor, got {type(key_positions).__name__}")
                if key_positions.dim() != 2 or key_positions.shape[1] < 1:
                    raise ValueError(f"key_positions must have shape [S, c], got {tuple(key_positions.shape)}")
            if not isinstance(num_anchors, int) or num_anchors < 1:
                raise ValueError(f"num_anchors must be a positive integer, got {num_anchors!r}")
            self.key_positions = key_positions
            self.range_alpha = finite_number("range_alpha", range_alpha)
            self._init_anchors(num_anchors, device, dtype)

    def _init_anchors(self, num_anchors: int, device, dtype) -> None:
        """``anchors [num_anchors, c]``: a uniform grid over [0, 1]^c (c from ``key_positions``)."""
        c = 1 if self.key_positions is None else self.key_positions.shape[1]
        grid = init_anchors(torch.zeros(1, c), num_anchors)
        self.anchors = nn.Parameter(grid.to(device=device, dtype=torch.float32 if dtype is None else dtype))

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **options) -> "EntropyAttention":
        """An ``EntropyAttention`` sharing ``mha``'s parameters (the same ``Parameter`` objects and
        ``out_proj`` module, so optimizers and tied weights stay valid), device, dtype, config and
        train/eval mode. ``options``: the keyword-only options of the constructor, or ``dropout``."""
        w = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, options.pop("dropout", mha.dropout),
                    mha.in_proj_bias is not None, mha.bias_k is not None, mha.add_zero_attn,
                    mha.kdim, mha.vdim, mha.batch_first, device="meta", dtype=w.dtype, **options)
        for name, param in mha.named_parameters(recurse=False):
            setattr(layer, name, param)
        layer.out_proj = mha.out_proj
        if layer.regularizer == "range":  # built on the meta device above
            layer._init_anchors(layer.anchors.shape[0], w.device, w.dtype)
        return layer.train(mha.training)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, regularizer={self.regularizer!r}, normalize={self.normalize}, "
                f"tau={self.tau}, top_k={self.top_k}, backend={self.backend!r}")

    def __getstate__(self) -> dict:
        """``copy.deepcopy`` (EMA and SWA copies of a model) and pickling take the last forward's
        ``last_entropy`` / ``last_regularizer`` detached (they hold its autograd graph, which cannot
        be copied), and leave out an active ``AttentionMonitor``."""
        state = self.__dict__.copy()
        # An AttentionMonitor watches this layer, not its copies.
        state["_monitors"] = 0
        state["_forward_hooks"] = OrderedDict((i, h) for i, h in state["_forward_hooks"].items()
                                              if not getattr(h, "attention_monitor", False))
        detached = {}
        for name in ("last_entropy", "last_regularizer"):
            t = state[name]
            if isinstance(t, Tensor):
                state[name] = detached.setdefault(id(t), t.detach())
        return state

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Shapes as ``nn.MultiheadAttention.forward``: query ``(L, E)``, ``(L, N, E)`` or, with
        ``batch_first``, ``(N, L, E)``; returns ``(attn_output, attn_weights or None)``, the weights
        ``(N, L, S)`` averaged over heads or ``(N, H, L, S)`` (unbatched: no ``N``), S counting the
        ``add_bias_kv`` / ``add_zero_attn`` columns."""
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        if not batched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, L = query.shape[0], query.shape[1]
        inp, n_extra = self._inputs(query, key, value, self_attention, key_padding_mask, attn_mask, is_causal)
        if self.top_k is not None:
            inp = _top_k_inputs(inp, self.top_k)

        record = self.training or self._monitors > 0
        pruning = not self.training and self.tau > 0
        weights = None
        self.last_prune_stats = None
        cells = self._cells(inp, n_extra) if record and self.regularizer == "range" else None
        if need_weights or (self.training and self.dropout > 0):
            out, entropies, weights = self._materialized(inp, pruning, cells)
        elif pruning:
            out, entropies = self._pruned(inp, record, cells)
        else:
            out, entropies = attention_entropies(inp, self._kinds(record), cells=cells, backend=self.backend)
        if record:
            query_pad = padded_keys(key_padding_mask) if self_attention and key_padding_mask is not None else None
            records = self._records(inp, entropies, query_pad, cells)
            if not recomputing():  # activation checkpointing's recomputation keeps the forward's records
                self.last_entropy, self._last_rows, self.last_regularizer = records
        else:
            self.last_entropy = self.last_regularizer = self._last_rows = None

        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if weights is not None:
            weights = (weights.mean(dim=1) if average_attn_weights else weights).to(out.dtype)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    # -- forward steps -------------------------------------------------------------------------

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate like ``nn.MultiheadAttention`` (with ValueError / TypeError); return ``batched``."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(
                    f"{name} is a NestedTensor; EntropyAttention takes padded tensors with key_padding_mask "
                    "(for nn.TransformerEncoder set encoder.use_nested_tensor = False; replace_attention does)")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must have the same number of dimensions, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features in its last dimension, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in all but the last dimension")
        bdim = 0 if self.batch_first else 1
        L, S = (query.shape[1 - bdim], key.shape[1 - bdim]) if batched else (query.shape[0], key.shape[0])
        N = query.shape[bdim] if batched else None
        if batched and key.shape[bdim] != N:
            raise ValueError(f"query has batch size {N} but key has {key.shape[bdim]} "
                             f"(batch_first={self.batch_first})")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and (not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point())):
                raise TypeError(f"{name} must be a boolean or floating point tensor, got "
                                f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask must have shape {expected} (batch, source length), got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            heads = (N * self.num_heads) if batched else self.num_heads
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} or (batch * num_heads, L, S) = "
                                 f"{(heads, L, S)}, got {tuple(attn_mask.shape)}")
        return batched

    def _project(self, query, key, value, self_attention: bool):
        """In-projections of ``[B, L, E]`` / ``[B, S, kdim|vdim]`` inputs -> q, k, v ``[B, *, E]``."""
        b = [None] * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return tuple(F.linear(x, w, bb) for x, w, bb in zip((query, key, value), ws, b))
        if self_attention:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        ws = self.in_proj_weight.chunk(3)
        return tuple(F.linear(x, w, bb) for x, w, bb in zip((query, key, value), ws, b))

    def _inputs(self, query, key, value, self_attention, key_padding_mask, attn_mask, is_causal):
        """Project, append the ``add_bias_kv`` / ``add_zero_attn`` key columns, convert the masks to
        ``entropy_attention``'s conventions. Returns ``(AttentionInputs, number of added keys)``."""
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._project(query, key, value, self_attention)
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.to(k.dtype).expand(B, 1, -1))
            extra_v.append(self.bias_v.to(v.dtype).expand(B, 1, -1))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(B, 1, self.embed_dim))
            extra_v.append(v.new_zeros(B, 1, self.embed_dim))
        n_extra = len(extra_k)
        if n_extra:
            k, v = torch.cat([k, *extra_k], dim=1), torch.cat([v, *extra_v], dim=1)
        H, D = self.num_heads, self.head_dim
        q, k, v = (x.view(B, x.shape[1], H, D).transpose(1, 2) for x in (q, k, v))

        causal = bool(is_causal) and L == S and n_extra == 0
        if is_causal and not causal:
            if attn_mask is None:
                if L != S:
                    raise ValueError(f"is_causal=True without attn_mask needs L == S, got L={L}, S={S}; pass attn_mask")
                attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1)
        if causal:
            attn_mask = None  # the hint replaces the mask (as scaled_dot_product_attention does)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked; entropy_attention: True = attend
            attn_mask = _pad_keys(attn_mask, n_extra, bool_fill=True)
            attn_mask = attn_mask.view(-1, H, L, S + n_extra) if attn_mask.dim() == 3 else attn_mask
        key_padding_mask = _pad_keys(key_padding_mask, n_extra, bool_fill=False)
        inp = check_inputs(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        return inp, n_extra

    def _kinds(self, record: bool) -> tuple[str, ...]:
        """The entropies a forward computes: none outside training and monitoring."""
        if not record:
            return ()
        return ("shannon", "range") if self.regularizer == "range" else ("shannon",)

    def _cells(self, inp: AttentionInputs, n_extra: int) -> Tensor:
        """The range entropy's soft cells ``[S + n_extra, num_anchors (+1)]`` in v's dtype; the
        ``add_bias_kv`` / ``add_zero_attn`` keys have no position (a cell of their own)."""
        S = inp.k.shape[2] - n_extra
        cdt = _compute_dtype(inp.q.dtype)
        pos = self.key_positions
        pos = sequence_positions(S, device=inp.q.device, dtype=cdt) if pos is None else pos.to(inp.q.device, cdt)
        if pos.shape[0] != S:
            raise ValueError(f"key_positions has {pos.shape[0]} rows but the keys have length {S}")
        pos = torch.cat([pos, pos.new_full((n_extra, pos.shape[1]), float("nan"))])
        return _range_cells(inp, None, self.anchors.to(cdt), pos, self.range_alpha)

    def _materialized(self, inp: AttentionInputs, pruning: bool, cells: Tensor | None):
        """``P`` in full: returns ``(out [B, H, L, D], {'shannon': entropy [B, H, L] of the
        undropped P, 'range': its range entropy when cells are given}, weights [B, H, L, S],
        dropped-out and tau-pruned as applied)``."""
        if self.training and self.dropout > 0:
            warnings.warn("EntropyAttention: attention dropout in training runs the materialized PyTorch path "
                          "(O(B H L S) memory, no fused kernel); use dropout=0 for the fused kernels", stacklevel=3)
        p, log_p = attention_probs(inp)
        entropies = {"shannon": -(p * log_p).sum(dim=-1)}
        if cells is not None:
            entropies["range"] = cell_entropy(p @ cells.to(p.dtype))
        a = _tau_prune(p, self.tau) if pruning else p
        a = F.dropout(a, self.dropout, training=self.training)
        out = (a @ inp.v.to(a.dtype)).to(inp.q.dtype)
        return out, entropies, a

    def _pruned(self, inp: AttentionInputs, record: bool, cells: Tensor | None):
        """Eval with ``tau > 0``: ``(out, dense entropies)``; under a monitor, also the
        ``pruned_attention`` stats and the dense entropies (one extra dense pass)."""
        result = pruned_attention(inp.q, inp.k, inp.v, tau=self.tau, causal=inp.causal, scale=inp.scale,
                                  attn_mask=inp.attn_mask, key_padding_mask=inp.key_padding_mask,
                                  mode=self.prune_mode, return_stats=record, backend=self.backend)
        out, self.last_prune_stats = result if record else (result, None)
        # Not under torch.compile, which traces the backward (and so the raise) ahead of time.
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
                t.requires_grad for t in (inp.q, inp.k, inp.v)):
            out = _NoGradient.apply(out, inp.q, inp.k, inp.v)
        if not record:
            return out, {}
        _, entropies = attention_entropies(inp, self._kinds(record), cells=cells, backend=self.backend)
        return out, entropies

    def _records(self, inp: AttentionInputs, entropies: dict, query_pad: Tensor | None, cells: Tensor | None) -> tuple:
        """``(last_entropy, rows, last_regularizer)`` (``[H]`` each; ``rows``: the valid rows behind
        the entropy) from the row entropies ``[B, H, L]`` (``entropies['range']`` is the range
        regularizer's row value, over the ``cells``). A recomputation under activation
        checkpointing computes them again (they save the same tensors) and drops them."""
        entropy = entropies["shannon"]
        counts = key_counts(inp)
        valid = counts > 0
        if query_pad is not None:
            valid = valid & ~query_pad[:, None, :]
        valid = valid.expand_as(entropy)
        if self.normalize:
            entropy = normalized_entropy(entropy, counts)
        mean_entropy, rows = head_mean(entropy, valid), valid.sum(dim=(0, 2)).float()
        if self.regularizer == "range":
            h_range = entropies["range"]
            if self.normalize:  # 0 with one cell, as Shannon with one key
                log_cells = math.log(cells.shape[-1])
                h_range = h_range / log_cells if log_cells > 0 else torch.zeros_like(h_range)
            return mean_entropy, rows, head_mean(h_range, valid)
        fn = REGULARIZERS[self.regularizer]
        if fn is None:
            return mean_entropy, rows, torch.zeros_like(mean_entropy)
        per_row = fn(inp, entropy)
        return mean_entropy, rows, mean_entropy if per_row is entropy else head_mean(per_row, valid)


def replace_attention(model: nn.Module, **options) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` of ``model`` (exact type; subclasses are left alone) for
    an ``EntropyAttention`` made by ``EntropyAttention.from_mha(mha, **options)``, in place.

    Weights are shared, not copied (the same ``Parameter`` objects), so the device, dtype, train/eval
    mode, tied modules and an already-built optimizer stay valid. Forward hooks registered on the
    old modules are not carried over. ``nn.TransformerEncoder`` modules get
    ``use_nested_tensor = False``: their nested-tensor fast path would bypass the new layers.

    Returns ``model``. Raises ValueError if ``model`` holds no ``nn.MultiheadAttention`` (nor an
    ``EntropyAttention``, so a second call is a no-op).
    """
    swapped: dict[int, EntropyAttention] = {}
    found = isinstance(model, EntropyAttention)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            found = found or isinstance(child, EntropyAttention)
            if type(child) is nn.MultiheadAttention:
                if id(child) not in swapped:
                    swapped[id(child)] = EntropyAttention.from_mha(child, **options)
                setattr(parent, name, swapped[id(child)])
    if type(model) is nn.MultiheadAttention:
        raise ValueError("replace_attention swaps submodules in place; use EntropyAttention.from_mha(mha) "
                         "for a bare nn.MultiheadAttention")
    if not swapped and not found:
        raise ValueError(f"replace_attention: {type(model).__name__} holds no nn.MultiheadAttention")
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
