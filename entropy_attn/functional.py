"""Functional attention with the row entropy: the library's main entry point."""
from __future__ import annotations

from dataclasses import replace

import torch

from ._inputs import AttentionInputs, check_inputs, finite_number
from ._launch import check_triton_inputs
from .range_entropy import DEFAULT_ALPHA, ball_cells, cell_entropy, init_anchors, sequence_positions
from .reference import _compute_dtype, reference_attention

BACKENDS = ("auto", "triton", "reference")
ENTROPIES = ("shannon", "range")


def _mask_needs_grad(inp: AttentionInputs) -> bool:
    return any(m is not None and m.requires_grad for m in (inp.attn_mask, inp.key_padding_mask))


def _triton_runs(inp: AttentionInputs) -> bool:
    """Whether backend='auto' takes the Triton kernels: CUDA inputs that ``check_triton_inputs``
    accepts, and no mask that needs a gradient (the reference path differentiates float masks)."""
    if not inp.q.is_cuda or _mask_needs_grad(inp):
        return False
    try:
        check_triton_inputs(inp)
    except (TypeError, ValueError):
        return False
    return True


def resolve_backend(backend: str, inp: AttentionInputs) -> str:
    """Map ``backend`` ('auto', 'triton' or 'reference') to the path that runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if _triton_runs(inp) else "reference"
    if backend == "triton":
        check_triton_inputs(inp)
        if _mask_needs_grad(inp):
            raise ValueError("backend='triton' does not differentiate masks; use backend='reference'")
    return backend


def attention_with_lse(inp: AttentionInputs, *, entropy: bool = True, backend: str = "auto"):
    """``(out, entropy, lse)`` on checked inputs; lse is +inf (Triton) or -inf (reference) on
    rows with no unmasked key. ``entropy`` is None when not asked for."""
    if resolve_backend(backend, inp) == "reference":
        out, ent, lse = reference_attention(inp)
        return out, (ent if entropy else None), lse
    args = (inp.q, inp.k, inp.v, inp.attn_mask, inp.key_padding_mask, inp.causal, inp.scale, entropy)
    if torch.compiler.is_compiling():  # traced as the custom ops
        out, lse, ent = torch.ops.entropy_attn.attention_fwd(*args)
    else:  # eager: the same kernels and autograd, without the ops' dispatch
        from .ops import AttentionFunction  # (ops imports pruned, which imports this module)

        out, lse, ent = AttentionFunction.apply(*args)
    return out, (ent if entropy else None), lse


def _check_range_tensor(name: str, t, device) -> None:
    """``positions``, ``anchors`` or ``cells`` of the range entropy: a floating-point tensor on q's
    device."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _range_cells(inp: AttentionInputs, cells, anchors, positions, alpha: float) -> torch.Tensor:
    """The soft cells G ``[Nk, k]`` of the range entropy, checked, in v's dtype. Default positions
    and anchors are in the compute dtype (float64 for float64 inputs)."""
    nk = inp.k.shape[2]
    if cells is None:
        if positions is None:
            positions = sequence_positions(nk, device=inp.q.device, dtype=_compute_dtype(inp.q.dtype))
        _check_range_tensor("positions", positions, inp.q.device)
        if positions.dim() != 2 or positions.shape[0] != nk or positions.shape[1] < 1:
            raise ValueError(f"positions must have shape [Nk, c] = [{nk}, c >= 1], got {tuple(positions.shape)}")
        if anchors is None:
            anchors = init_anchors(positions)
        _check_range_tensor("anchors", anchors, inp.q.device)
        if anchors.dim() != 2 or anchors.shape[0] < 1 or anchors.shape[1] != positions.shape[1]:
            raise ValueError(f"anchors must have shape [k >= 1, {positions.shape[1]}], got {tuple(anchors.shape)}")
        cells = ball_cells(positions, anchors, finite_number("alpha", alpha))
    _check_range_tensor("cells", cells, inp.q.device)
    if cells.dim() != 2 or cells.shape[0] != nk or cells.shape[1] < 1:
        raise ValueError(f"cells must have shape [Nk, k] = [{nk}, k >= 1], got {tuple(cells.shape)}")
    return cells.to(inp.v.dtype)


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
    entropy: str | tuple[str, ...] = "shannon",
    anchors: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
    cells: torch.Tensor | None = None,
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
        return_entropy: also return the entropy (or entropies).
        entropy: ``'shannon'`` (MATH.md section 2), ``'range'`` (the range-partition entropy of
            MATH.md section 4) or a tuple of both, returned in that order.
        anchors: ``[k, c]`` cell centres for ``'range'`` (a tensor the caller owns, learnable);
            default a uniform grid of about ``ceil(sqrt(n))`` anchors, ``n`` the keys with a
            position, rounded to a power of ``c`` (see ``range_entropy.init_anchors``).
        positions: ``[Nk, c]`` key coordinates in [0, 1]^c for ``'range'``; default the normalized
            1-D positions ``j / (Nk - 1)``. NaN rows (e.g. a class token) form a cell of their own.
        alpha: temperature of the ball cells, acting on [0, 1] coordinates: the default 5 (the
            paper's) gives broad cells; ``alpha ~ k**2`` makes cells about one anchor spacing wide.
        cells: ``[Nk, k]`` soft cells G given directly (e.g. ``range_entropy.halfspace_cells``);
            overrides ``anchors``, ``positions`` and ``alpha``.
        backend: ``'triton'`` (fused kernels; CUDA, or the CPU under ``TRITON_INTERPRET=1``),
            ``'reference'`` (PyTorch, chunked over queries, any device, float64-capable), or
            ``'auto'``: Triton for supported CUDA inputs, else the reference path. A float mask that
            requires grad is differentiated on the reference path only.

    Returns:
        ``(out, *entropies)``, or ``out`` alone when ``return_entropy=False``. ``out`` is
        ``[B, H, Nq, Dv]`` in q's dtype; each entropy is ``[B, H, Nq]`` float32 (float64 for float64
        inputs), in nats; Shannon lies in ``[0, log n_i]`` for ``n_i`` unmasked keys, range in
        ``[0, log k]`` for ``k`` cells (the anchors, and one more where keys without a position
        form it). A row with no unmasked key gives out 0 and entropies 0, with zero
        gradients. All outputs are differentiable; on the Triton path their gradients come from one
        fused backward kernel (the range entropy rides along as ``k`` extra value columns).
    """
    kinds = (entropy,) if isinstance(entropy, str) else tuple(entropy)
    if not kinds or any(kind not in ENTROPIES for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"entropy must be one of {ENTROPIES} or a tuple of them, got {entropy!r}")
    inp = check_inputs(
        q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, key_padding_mask=key_padding_mask
    )
    if not return_entropy:
        return attention_entropies(inp, (), backend=backend)[0]
    g = _range_cells(inp, cells, anchors, positions, alpha) if "range" in kinds else None
    out, values = attention_entropies(inp, kinds, cells=g, backend=backend)
    return (out, *(values[kind] for kind in kinds))


def attention_entropies(inp: AttentionInputs, kinds=("shannon",), *, cells: torch.Tensor | None = None,
                        backend: str = "auto"):
    """Attention on checked inputs with the entropies ``kinds`` (a subset of ``ENTROPIES``) from one
    fused call: ``(out, {kind: [B, H, Nq]})``. ``'range'`` needs ``cells`` G ``[Nk, k]`` in v's
    dtype; it rides along as ``k`` extra value columns."""
    dv = inp.v.shape[-1]
    if "range" in kinds:
        B, Hkv, Nk, _ = inp.v.shape
        inp = replace(inp, v=torch.cat([inp.v, cells.expand(B, Hkv, Nk, cells.shape[-1])], dim=-1))
    out, ent, _ = attention_with_lse(inp, entropy="shannon" in kinds, backend=backend)
    values = {"shannon": ent} if "shannon" in kinds else {}
    if "range" in kinds:
        out, mass = out.split([dv, out.shape[-1] - dv], dim=-1)
        values["range"] = cell_entropy(mass)
    return out, values


__all__ = ["entropy_attention", "attention_entropies", "resolve_backend", "attention_with_lse"]
