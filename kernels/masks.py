"""Score masking and the matrix product shared by every attention kernel.

Scores are kept in base 2 (``u = s * log2(e)``) so the kernels can use ``exp2``; a float mask is
therefore multiplied by log2(e) before it is added. Mask kinds (constexpr): 0 none, 1 boolean,
2 float.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: exp2 of anything below this is 0 in float32; clamping there keeps p * log p finite (0 * -inf is NaN).
MIN_EXP2 = tl.constexpr(-1000.0)
#: Initial running max: finite, so that ``m - m_new`` and ``l * (m - m_new)`` never meet inf.
M_INIT = tl.constexpr(-1.0e30)
NO_MASK = tl.constexpr(0)
BOOL_MASK = tl.constexpr(1)
FLOAT_MASK = tl.constexpr(2)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` with ``input_precision=PRECISION`` ('ieee' or 'tf32' for float32 operands).
    PRECISION 'upcast' multiplies in float32: Triton's CPU interpreter multiplies the raw bits of
    bfloat16 operands (triton-lang/triton#11584), so the launcher asks for it there."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def clamp_masked(x):
    """``max(x, MIN_EXP2)`` for the exponent ``x = u - m`` of a tile that may hold masked (-inf)
    scores: their weight ``2^x`` is 0 and ``2^x * x`` stays finite. A NaN stays NaN
    (``propagate_nan``), so a row that sees a NaN score gives NaN, as SDPA does; the plain
    ``tl.maximum`` (fmax) would drop that score as if it were masked."""
    return tl.maximum(x, MIN_EXP2, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def key_range(start_m, Nq, Nk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """``(end, full_end)`` for the query rows ``[start_m, start_m + BLOCK_M)``: keys ``[0, end)``
    are visible to some of them, keys ``[0, full_end)`` to all of them (causal: key ``j`` visible to
    query ``i`` iff ``j <= i + Nk - Nq``, bottom-right aligned). Mask tensors are not considered,
    and neither bound is rounded to key blocks."""
    if CAUSAL:
        end = tl.maximum(tl.minimum(Nk, start_m + BLOCK_M + Nk - Nq), 0)
        full_end = tl.maximum(tl.minimum(Nk, start_m + Nk - Nq + 1), 0)
    else:
        end = Nk
        full_end = Nk
    return end, full_end


@triton.jit
def padding_hull(Kpm, b, stride_kb, stride_kn, k_lo, k_hi, KPM_KIND: tl.constexpr, CHUNK: tl.constexpr = 2048):
    """``(lo, hi, clear)`` of the keys ``[k_lo, k_hi)`` of batch ``b``'s key padding mask
    ``Kpm [B, Nk]``: every key of that range outside ``[lo, hi)`` is padded (True, or -inf in a float
    mask; no visible key: ``lo = hi = k_lo``), and ``clear`` says that the mask leaves every key
    inside as it is (False, or 0.0), so that tiles there need no mask. One pass over that part of
    the mask row (bytes or floats, read from L2), ``CHUNK`` keys per step, kept per lane and reduced
    once after the pass."""
    Kpm += b.to(tl.int64) * stride_kb
    lo = tl.zeros([CHUNK], dtype=tl.int32) + k_hi
    hi = tl.zeros([CHUNK], dtype=tl.int32) + k_lo
    n_visible = tl.zeros([CHUNK], dtype=tl.int32)
    n_biased = tl.zeros([CHUNK], dtype=tl.int32)
    for c in range(k_lo, k_hi, CHUNK):
        j = c + tl.arange(0, CHUNK)
        x = tl.load(Kpm + j * stride_kn, mask=j < k_hi, other=0)
        if KPM_KIND == BOOL_MASK:
            visible = (x == 0) & (j < k_hi)
        else:
            x = x.to(tl.float32)
            visible = (x != float("-inf")) & (j < k_hi)
            n_biased += (visible & (x != 0.0)).to(tl.int32)  # NaN counts as a bias
        lo = tl.minimum(lo, tl.where(visible, j, k_hi))
        hi = tl.maximum(hi, tl.where(visible, j + 1, k_lo))
        n_visible += visible.to(tl.int32)
    lo = tl.min(lo, 0)
    hi = tl.max(hi, 0)
    clear = (tl.sum(n_visible, 0) == hi - lo) & (tl.sum(n_biased, 0) == 0)
    return tl.minimum(lo, hi), hi, clear


@triton.jit
def key_tiles(start_m, Nq, Nk, k_lo, k_hi, Kpm, b, stride_kb, stride_kn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr):
    """``(start, full_start, full_end, end)``: the query rows ``[start_m, start_m + BLOCK_M)`` of
    batch ``b`` visit the key tiles from ``start`` (a multiple of ``BLOCK_N``) on, to ``end``, within
    the keys ``[k_lo, k_hi)`` (``k_lo`` a multiple of ``BLOCK_N``; ``[0, Nk)`` for all of them); the
    whole tiles in ``[full_start, full_end)`` need no mask (every key in range and visible to every
    row), those before and after do. A key padding mask's padded ends (``padding_hull``, read
    only up to the last key a row sees) are not visited; inside a clear hull only the tiles across
    its edges need the mask, and a hull that is not clear (holes, finite biases) is masked
    throughout, as is every tile under an ``attn_mask``."""
    end, full_end = key_range(start_m, Nq, Nk, BLOCK_M, CAUSAL)
    end = tl.minimum(end, k_hi)
    start = k_lo
    full_start = k_lo
    if KPM_KIND != NO_MASK:
        lo, hi, clear = padding_hull(Kpm, b, stride_kb, stride_kn, k_lo, tl.maximum(end, k_lo), KPM_KIND)
        start = (lo // BLOCK_N) * BLOCK_N
        end = tl.minimum(end, hi)
        full_start = tl.minimum(tl.cdiv(lo, BLOCK_N) * BLOCK_N, end)
        full_end = tl.where(clear, tl.minimum(full_end, hi), 0)
    if MASK_KIND != NO_MASK:
        full_end = 0
    full_end = tl.maximum((tl.minimum(full_end, end) // BLOCK_N) * BLOCK_N, full_start)
    return start, full_start, full_end, end


@triton.jit
def apply_masks(
    u, i, j, b, h, Nq, Nk,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    Kpm, stride_kb, stride_kn,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
):
    """Mask a tile of base-2 scores ``u`` whose query index is ``i`` and key index is ``j``
    (broadcastable index grids, so both ``[BM, BN]`` and transposed ``[BN, BM]`` tiles work).

    Out-of-range entries, causal entries (``j > i + Nk - Nq``), padded keys (True, or -inf in a
    float ``Kpm``, whatever the score: a NaN key there is dropped, as on the reference path) and
    False entries of a boolean ``attn_mask`` become -inf; a float ``attn_mask`` is added (a NaN
    score under its -inf stays NaN: the same test there cost the dense kernels 8 %, H200 16k D128
    bf16). ``Mask`` is ``[B, H, Nq, Nk]`` (any strides, 0 for broadcast dims), ``Kpm`` is
    ``[B, Nk]`` with True = pad.
    """
    in_range = (i < Nq) & (j < Nk)
    valid = in_range
    if CAUSAL:
        valid = valid & (j <= i + (Nk - Nq))
    if KPM_KIND != NO_MASK:
        kpm = tl.load(Kpm + b.to(tl.int64) * stride_kb + j * stride_kn, mask=j < Nk, other=0)
        if KPM_KIND == BOOL_MASK:
            valid = valid & (kpm == 0)
        else:
            kpm = kpm.to(tl.float32)
            valid = valid & (kpm != float("-inf"))
            u = u + kpm * LOG2E
    if MASK_KIND != NO_MASK:
        offs = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + i.to(tl.int64) * stride_mm + j * stride_mn
        mask = tl.load(Mask + offs, mask=in_range, other=0)
        if MASK_KIND == BOOL_MASK:
            valid = valid & (mask != 0)
        else:
            u = u + mask.to(tl.float32) * LOG2E
    return tl.where(valid, u, float("-inf"))
