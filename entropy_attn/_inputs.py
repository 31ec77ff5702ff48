"""Validation and normalization of attention inputs, shared by every backend.

Layouts follow ``torch.nn.functional.scaled_dot_product_attention``:

- q ``[B, H, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` with ``H % Hkv == 0``
  (grouped-query / multi-query attention when ``Hkv < H``).
- ``attn_mask`` broadcastable to ``[B, H, Nq, Nk]``: boolean (True = attend) or floating
  (added to the scores; ``-inf`` masks).
- ``key_padding_mask`` ``[B, Nk]``: boolean (True = pad, as in ``nn.MultiheadAttention``) or
  floating (added to the scores).
- ``causal``: key j is visible to query i iff ``j <= i + (Nk - Nq)`` (aligned bottom-right, as
  flash-attn does); with ``Nq > Nk`` the first ``Nq - Nk`` rows see no key and return 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionInputs:
    """Checked inputs. Masks are kept as given (broadcast views, no copies)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None  # broadcast view [B, H, Nq, Nk], bool or float
    key_padding_mask: torch.Tensor | None  # [B, Nk], bool (True = pad) or float
    causal: bool
    scale: float

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def batch(self, rows: slice) -> "AttentionInputs":
        """These inputs for the batch entries ``rows`` (views); ``slice(None)`` gives ``self``."""
        if rows == slice(None):
            return self
        return replace(self, q=self.q[rows], k=self.k[rows], v=self.v[rows],
                       attn_mask=batch_rows(self.attn_mask, rows),
                       key_padding_mask=batch_rows(self.key_padding_mask, rows))


def batch_rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``t[rows]`` for a tensor whose first dim is the batch; None stays None, ``slice(None)`` gives ``t``."""
    return t if t is None or rows == slice(None) else t[rows]


def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_mask(name: str, mask, q: torch.Tensor) -> None:
    """A mask must be a boolean or floating tensor on q's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be boolean or floating point, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device} but q is on {q.device}")


def check_padding_mask(key_padding_mask, B: int, Nk: int, ref: torch.Tensor) -> None:
    """A ``key_padding_mask`` must be a boolean or floating ``[B, Nk]`` tensor on ``ref``'s device."""
    _check_mask("key_padding_mask", key_padding_mask, ref)
    if tuple(key_padding_mask.shape) != (B, Nk):
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = {[B, Nk]}, got {tuple(key_padding_mask.shape)}"
        )


def check_inputs(
    q, k, v, *, causal: bool = False, scale: float | None = None, attn_mask=None, key_padding_mask=None
) -> AttentionInputs:
    """Validate shapes, dtypes and devices; return normalized inputs.

    Raises:
        TypeError: a non-tensor argument, a ``causal`` that is not a bool, an unsupported dtype, or
            mismatched dtypes.
        ValueError: mismatched shapes, ``H % Hkv != 0``, different devices, masks that do not
            broadcast, or a non-positive scale.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_float("q", q)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all three must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if (Bk, Hkv, Nk) != tuple(v.shape[:3]):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if Bk != B:
        raise ValueError(f"batch mismatch: q has {B}, k and v have {Bk}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has {D}, k has {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if min(Nq, Nk, D, v.shape[-1]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else finite_number("scale", scale)

    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, q)
        try:
            if attn_mask.dim() > 4:
                raise RuntimeError
            torch.broadcast_shapes(attn_mask.shape, (B, H, Nq, Nk))
            attn_mask = attn_mask.expand(B, H, Nq, Nk)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, Nq, Nk] = "
                f"{[B, H, Nq, Nk]}"
            ) from None
    if key_padding_mask is not None:
        check_padding_mask(key_padding_mask, B, Nk, q)
    return AttentionInputs(q, k, v, attn_mask, key_padding_mask, causal, scale)


def finite_number(name: str, value, *, positive: bool = True) -> float:
    """``value`` as a float, checked: a real number (not a bool or a string; TypeError naming
    ``name``), finite and > 0, or >= 0 when not ``positive`` (ValueError naming ``name``)."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value}")
    return value


def score_masks(inp: AttentionInputs, rows: slice | None = None,
                dtype=torch.float32) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The masks of ``inp`` for the query rows ``rows`` (all when None), as the kernels apply them
    (``kernels/masks.py``): ``(bias, hidden)``, each ``[B, H, n, Nk]`` or None where nothing is.
    ``bias`` (``dtype``) is the sum of the float masks, added to the scores; ``hidden`` (bool) is
    True where an entry is masked whatever its score: causal, a False ``attn_mask`` entry, a padded
    key (True, or -inf in a float ``key_padding_mask``). A -inf entry of a float ``attn_mask`` is only
    added, so a NaN score under it stays NaN, as in SDPA."""
    B, H, Nq, _ = inp.q.shape
    Nk = inp.k.shape[2]
    rows = rows or slice(0, Nq)
    r0, r1 = rows.start, min(rows.stop, Nq)
    bias = hidden = None
    if inp.causal:
        i = torch.arange(r0, r1, device=inp.q.device)[:, None]
        j = torch.arange(Nk, device=inp.q.device)[None, :]
        hidden = j > i + (Nk - Nq)
    for mask, view in ((inp.attn_mask, lambda m: m[:, :, r0:r1]), (inp.key_padding_mask, lambda m: m[:, None, None, :])):
        if mask is None:
            continue
        m = view(mask)
        if m.dtype == torch.bool:
            hide = ~m if mask is inp.attn_mask else m
        else:
            bias = m.to(dtype) if bias is None else bias + m.to(dtype)
            if mask is inp.attn_mask:
                continue
            hide = m == float("-inf")
        hidden = hide if hidden is None else hidden | hide
    shape = (B, H, r1 - r0, Nk)
    return (None if bias is None else bias.expand(shape)), (None if hidden is None else hidden.expand(shape))
