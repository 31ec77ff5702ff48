"""Inputs of the fast mode's tile predictor (``pruned.pruned_predict``, which pools its query rows
itself): summaries of k, and a sample of exact attention rows.

Scores are in base 2 (``u = s * log2 e``), as in every kernel here.

- ``pool_keys``: per key block, the weighted mean key (weights from ``key_padding_mask``), the log2
  of the block's total weight, and its outlier key (the unmasked key farthest from the mean).
- ``vertical_sample`` and ``vertical_combine``: the exact softmax of a few evenly spaced query rows
  over all keys, reduced to the largest weight each key block gets from any of them, and to the
  blocks that only one of them keeps (what the predictor checks its pooled lists against). The first
  splits the key blocks over programs and stores per (sampled row, key block) the score maximum and
  per row partial softmax sums; the second combines the sums into each row's lse and takes
  ``max_r (blockmax_r - lse_r)`` per key block.
- ``mask_tiles``: an ``attn_mask`` per tile: whether it hides all, some or none of the tile's
  entries, and the largest score bias it gives one (what the predictor adds to its estimates).
"""
import triton
import triton.language as tl

from .attention_fwd import load_tile
from .masks import BOOL_MASK, FLOAT_MASK, LOG2E, M_INIT, NO_MASK, apply_masks
from .pdl import wait_previous
from .pruned import LOCAL_KEYS, _scores_blocks, local_window, split_lse


@triton.jit
def sampled_rows(offs_s, SAMPLES, Nq):
    """The query row of each sample ``offs_s < SAMPLES``: ``round(r (Nq - 1) / (SAMPLES - 1))``
    (halves up); ``Nq`` (no row) for the others."""
    n_gaps = tl.maximum(SAMPLES - 1, 1)
    return tl.where(offs_s < SAMPLES, (offs_s * (Nq - 1) + n_gaps // 2) // n_gaps, Nq)


@triton.jit
def pool_keys(
    K, Kp, Ko, Kbias, Kobias, Kpm,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_pb, stride_pn, stride_bb,
    HKV, Nk, KB0,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KPM_KIND: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Summary of key block ``kb = KB0 + program_id(0)`` of one (batch, kv head) (``KB0 > 0``
    re-pools the blocks of a grown key cache from there on).

    With ``w_j`` the weight of key j (1; 0 for a key padded by a boolean ``Kpm`` ``[B, Nk]`` or past
    Nk; ``exp(Kpm[b, j])`` for a float ``Kpm``):

    - Kp ``[B, HKV, NKB, D]``: the weighted mean key ``kbar = sum_j w_j k_j / W``, ``W = sum_j w_j``
      (0 where W = 0), rounded to Kp's dtype.
    - Ko (same shape and strides, K's dtype): the outlier key, the key with ``w_j > 0`` farthest
      (Euclidean, float32) from the rounded kbar; 0 where the block has none.
    - Kbias, Kobias ``[B or 1, NKB]`` float32 (row stride ``stride_bb``, one row when there is no
      Kpm; written by the programs of kv head 0): ``log2 W`` (-inf where W = 0), and the log2 weight
      of the outlier key alone: 0 where the block has a key with ``w_j > 0``, else -inf (always -inf
      for a float Kpm, whose weights differ per key).
    """
    wait_previous(PDL)
    kb = KB0 + tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    Kp += b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + kb * stride_on
    Ko += b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + kb * stride_on

    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # log2 w_j: the score bias the padding mask gives key j (0, -inf or the float mask), -inf past Nk.
    log2_w = apply_masks(tl.zeros([BLOCK_N], dtype=tl.float32), 0, offs_n, b, 0, 1, Nk,
                         Kpm, 0, 0, 0, 0, Kpm, stride_pb, stride_pn, False, NO_MASK, KPM_KIND)
    # Padded keys are not loaded (0): their NaN or inf must not reach the mean.
    unpadded = log2_w > float("-inf")
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=unpadded[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    top = tl.max(log2_w, 0)
    has_key = top > float("-inf")
    w = tl.exp2(log2_w - tl.where(has_key, top, 0.0))  # w_j / max_j w_j
    w_sum = tl.sum(w, 0)
    kbar = tl.sum(w[:, None] * k, 0) / tl.where(has_key, w_sum, 1.0)
    # A NaN element (of an unpadded key) becomes 0, so that the block's estimates stay finite.
    kbar = tl.where(kbar == kbar, kbar, 0.0).to(Kp.dtype.element_ty)
    tl.store(Kp + offs_d * stride_od, kbar, mask=offs_d < D)

    diff = k - kbar.to(tl.float32)[None, :]
    dist = tl.where(unpadded, tl.sum(diff * diff, 1), float("-inf"))
    far = kb * BLOCK_N + tl.argmax(dist, 0)
    ko = tl.load(K + far * stride_kn + offs_d * stride_kd, mask=offs_d < D, other=0.0)
    tl.store(Ko + offs_d * stride_od, tl.where(has_key, ko, 0.0), mask=offs_d < D)

    if KPM_KIND == NO_MASK:
        owner = bh == 0
    else:
        owner = hk == 0
    if owner:
        bias = tl.where(has_key, top + tl.log2(tl.where(has_key, w_sum, 1.0)), float("-inf"))
        tl.store(Kbias + b.to(tl.int64) * stride_bb + kb, bias)
        obias = tl.where(has_key & (KPM_KIND != FLOAT_MASK), 0.0, float("-inf"))
        tl.store(Kobias + b.to(tl.int64) * stride_bb + kb, obias)


@triton.jit
def vertical_sample(
    Q, K, BlockMax, Mpart, Lpart, Mask, Kpm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, GROUPS, Nq, Nk, NKB, KB_PER_SPLIT, SAMPLES, qk_scale,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The sampled query rows of one (batch, head) against the key blocks
    ``[split * KB_PER_SPLIT, (split + 1) * KB_PER_SPLIT)``, every mask applied.

    Sample ``r < SAMPLES`` (``2 <= SAMPLES <= BLOCK_S``) is query row ``round(r (Nq - 1) /
    (SAMPLES - 1))`` (halves up); rows ``r >= SAMPLES`` of the tile see no key. Writes BlockMax
    ``[B*H, NKB, BLOCK_S]`` float32 (the maximum base-2 score of each sampled row in each key block,
    -inf where all its keys are masked) and Mpart, Lpart ``[splits, B*H, BLOCK_S]`` float32 (the
    row's running max and sum over the split's keys, ``lse2 = m + log2 l``).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh

    offs_s = tl.arange(0, BLOCK_S)
    rows = sampled_rows(offs_s, SAMPLES, Nq)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, rows, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)
    wait_previous(PDL)

    kb_lo = split * KB_PER_SPLIT
    kb_hi = tl.minimum(kb_lo + KB_PER_SPLIT, NKB)
    m, l, _ = _scores_blocks(
        tl.full([BLOCK_S], M_INIT, dtype=tl.float32), tl.zeros([BLOCK_S], dtype=tl.float32),
        tl.zeros([BLOCK_S], dtype=tl.int32), q, K, BlockMax + bh.to(tl.int64) * NKB * BLOCK_S,
        stride_kn, stride_kd, rows, offs_d, kb_lo, kb_hi, b, h, hk, Nq, Nk, qk_scale,
        Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, BLOCK_N, BLOCK_D, True, CAUSAL, MASK_KIND, KPM_KIND, False, "rows", False, PRECISION)

    part = (split * tl.num_programs(0) + bh).to(tl.int64) * BLOCK_S + offs_s
    tl.store(Mpart + part, m)
    tl.store(Lpart + part, l)


@triton.jit
def vertical_combine(
    BlockMax, Mpart, Lpart, Vert, VertLocal, Keeper, Miss, Iota, Nq, Nk, NKB, SPLITS, SAMPLES, log2_thr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, LOCAL: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Per (batch, head) ``bh`` and key blocks ``[pid CHUNK, (pid + 1) CHUNK)``: each sampled row's
    lse2 from the splits' partial sums (+inf for a row that sees no key), then Vert ``[B*H, NKB]``
    float32 = ``max_r (BlockMax[bh, kb, r] - lse2_r)``, the log2 of the largest softmax weight a
    sampled row gives a key of block kb (-inf if none). With ``LOCAL`` (causal: the predictor lists
    the local windows, ``pruned.local_window``, of the heads that attend locally), also VertLocal
    ``[B*H, NKB]`` float32, the evidence of local attention: the same maximum over the sampled rows
    whose window holds kb. Rows that see no key block before their window (the first
    ``LOCAL_KEYS + BLOCK_N - 1`` causal rows, whose weights lie in it whatever the head does) give
    no evidence. Keeper ``[B*H, NKB]`` int32: the query row of the one sampled row that keeps an
    entry of block kb (a weight >= ``2^log2_thr``), -1 where none or several do: the blocks that the
    predictor checks its pooled lists against (``pruned_predict``, which records its misses in Miss
    ``[B*H, 2]`` int32, set here to (Nq, -1): no missed row yet), and Iota ``[NKB]`` int32, the
    list of every key block, which ``pruned_attn`` sweeps in the heads with misses. Inputs as
    written by ``vertical_sample``."""
    wait_previous(PDL)
    bh = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    _, lse = split_lse(Mpart, Lpart, bh.to(tl.int64) * BLOCK_S + offs_s, offs_s < BLOCK_S, SPLITS,
                       tl.num_programs(0).to(tl.int64) * BLOCK_S)
    kb = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    ptrs = BlockMax + (bh.to(tl.int64) * NKB + kb[:, None]) * BLOCK_S + offs_s[None, :]
    bmax = tl.load(ptrs, mask=kb[:, None] < NKB, other=float("-inf"))
    logw = bmax - lse[None, :]
    rows = sampled_rows(offs_s, SAMPLES, Nq)
    if LOCAL:
        own = rows + (Nk - Nq)  # each sampled row's own key
        near = local_window(kb[:, None], own[None, :], own[None, :], BLOCK_N)
        chose = near & (own >= LOCAL_KEYS + BLOCK_N - 1)[None, :]  # a key block lies before the row's window
        tl.store(VertLocal + bh.to(tl.int64) * NKB + kb, tl.max(tl.where(chose, logw, float("-inf")), 1), mask=kb < NKB)
    tl.store(Vert + bh.to(tl.int64) * NKB + kb, tl.max(logw, 1), mask=kb < NKB)
    kept = logw >= log2_thr
    row = tl.max(tl.where(kept, rows[None, :], -1), 1)
    single = tl.sum(kept.to(tl.int32), 1) == 1
    tl.store(Keeper + bh.to(tl.int64) * NKB + kb, tl.where(single, row, -1), mask=kb < NKB)
    if tl.program_id(1) == 0:
        tl.store(Miss + 2 * bh, Nq)
        tl.store(Miss + 2 * bh + 1, -1)
    if bh == 0:
        tl.store(Iota + kb, kb, mask=kb < NKB)


@triton.jit
def mask_tiles(
    Mask, Tiles,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tq,
    HM, Nq, Nk, NKB, KB_PER,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, PDL: tl.constexpr = False,
):
    """The attention mask ``Mask [B, H, Nq, Nk]`` (any strides, 0 along a broadcast dim) per tile of
    ``BLOCK_M`` query rows and ``BLOCK_N`` keys, for query block ``program_id(0)``, key blocks
    ``[program_id(1) KB_PER, (program_id(1) + 1) KB_PER)`` and mask entry ``(b, h) =
    divmod(program_id(2), HM)``. Writes Tiles ``[BM, HM, NQB, NKB]`` float32 (strides ``stride_tb,
    stride_th, stride_tq`` and 1): -inf where the mask hides every entry of the tile (False, or
    -inf in a float mask), +inf where it hides some of them, else the largest base-2 score bias it
    gives an entry (0 for a boolean mask; a NaN entry counts as 0). Rows past Nq and keys past Nk do
    not count."""
    wait_previous(PDL)
    qb = tl.program_id(0)
    b = tl.program_id(2) // HM
    h = tl.program_id(2) % HM
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    Mask += b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    Tiles += b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + qb.to(tl.int64) * stride_tq
    kb_lo = tl.program_id(1) * KB_PER
    for kb in range(kb_lo, tl.minimum(kb_lo + KB_PER, NKB)):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        x = tl.load(Mask + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn, mask=in_range,
                    other=0)
        if MASK_KIND == BOOL_MASK:
            seen = in_range & (x != 0)
            bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            x = x.to(tl.float32)
            seen = in_range & (x != float("-inf"))
            bias = tl.where(x == x, x * LOG2E, 0.0)
        n_seen = tl.sum(tl.sum(seen.to(tl.int32), 1), 0)
        n_hidden = tl.sum(tl.sum((in_range & ~seen).to(tl.int32), 1), 0)
        top = tl.max(tl.max(tl.where(seen, bias, float("-inf")), 1), 0)
        tl.store(Tiles + kb, tl.where(n_seen == 0, float("-inf"), tl.where(n_hidden > 0, float("inf"), top)))
