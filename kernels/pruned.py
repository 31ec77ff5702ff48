"""Tau-pruned block-sparse attention kernels (shared MATH.md section 5), inference only.

All scores are in base 2 (``u = s * log2 e``), so thresholds are ``log2 tau`` and ``lse2 = lse * log2 e``.

Exact mode, three launches:

1. ``pruned_scores``: Q K^T only (no P V). Per row the running max ``m`` and sum ``l`` (so
   ``lse2 = m + log2 l``), per tile (BLOCK_M x BLOCK_N) the masked score maximum. Programs may split
   the key range (``program_id(2)``, flash-decoding style for few queries); step 2 combines them.
2. ``pruned_select``: per row ``lse2`` and ``thr_i = min(lse2_i + log2 tau, m_i)`` (the row max is
   always kept) from the split partials; per query block ``thr_min = min_i thr_i`` and the compacted
   list of key blocks whose tile maximum is ``>= thr_min`` (and not fully masked). Every other tile
   holds no kept entry: skipping it is exact.
3. ``pruned_attn`` with ``EXACT``: only the listed tiles are loaded and multiplied;
   ``p_ij = 2^(u_ij - lse2_i)`` where ``u_ij >= thr_i``, else 0, so ``sum_j p_ij`` is the kept mass and
   ``out_i = sum_j p_ij v_j / sum_j p_ij``. No online rescaling is needed (lse is known), and splits
   of the list combine by plain sums.

Split programs (few queries) add a fourth launch, ``split_combine``, which folds their partials.
Both modes' sweeps (``pruned_attn``) mask only the listed tiles that need it: the lists are in key
order (the fast mode's after its first tile), so under a causal mask the tiles across the diagonal
and the partial last key block are their last ones, and under a key padding mask (no split, no
``attn_mask``) the tiles across the edges of its hull are their first and last ones
(``_unmasked_tiles``), as the dense kernel and the first pass mask only those (``key_tiles``).
The exact mode's launches over whole key ranges (no split) get K and V as tensor descriptors where
the copy engine (TMA) can load them, and load their tiles with it (``TMA``, ``load_rows``; the fast
sweep measured slower with it).

Fast mode, two launches after the kernels of ``pruned_pool.py`` (pooled keys, each key block's
outlier key, and for long query sequences the sampled vertical estimate):

1. ``pruned_predict``: 16 pooled query rows per query block (means over ``BLOCK_M / 16`` rows,
   pooled by the predictor as it loads them) against pooled keys (a weighted mean per key block,
   with the log of the block's unmasked key weight as a bias). Per pooled row a softmax over key
   blocks estimates each tile's share of the row's mass; a tile is visited when its largest share
   over the pooled rows is ``>= log2 (tau * slack)``, and the best tile of every pooled row is
   always visited (so no row is dropped). Mean pooling dilutes a single strong key (an attention
   sink, a vertical stripe), so for long query sequences a sample of real query rows against all
   keys gives the largest weight each key block gets, and key blocks reaching the same threshold are
   visited by every query block. Pooling also smears local attention (each row of a block attends to
   its own few preceding keys, which differ from row to row): with a causal mask every query block
   lists its local window too, the key blocks of its rows' ``LOCAL_KEYS`` most recent keys, in the
   heads whose sampled rows keep an entry in their own windows (every head without a sample; on the
   attention of the example LM at 8k tokens this took the largest error of its sparsest layer from
   8.3 to 0.03). The list puts the block's most concentrated tile first, then the
   rest in key order. One program predicts ``QB`` query blocks, so that their pooled rows share each
   load of the pooled keys, in one sweep over them: the shares are taken against each row's running
   lse and corrected by the smallest later growth of a row's lse, which lists a superset of the
   tiles above (see ``pruned_predict``).
2. ``pruned_attn`` without ``EXACT``: one sweep over the listed tiles. The weights are taken
   relative to a fixed reference per row, set by the first tile (``FIXED``, see ``_attn_tile``), so
   that nothing is rescaled from tile to tile; split programs and tau >= 1 use the online softmax
   (running max, rescaling), whose combine and whose dropping of stale entries need it, and so do
   float16 inputs, whose range cannot hold the fixed reference's weights. An
   entry is pruned when ``u_ij < min(lse2_lb_i + log2 tau, m_i)`` where ``lse2_lb_i`` is the log-sum
   of a subset of the row's entries seen so far (every entry of the first tile, which the predictor
   picks as the most concentrated one, and the kept entries of the later tiles; split programs sum
   every entry, see ``_attn_tile``; with the online softmax also the current tile's largest entry)
   or, if larger, a bound from the pooled keys of every listed tile, computed before the sweep: a
   lower bound of the true lse2,
   so every entry it prunes is also pruned by the exact definition (it may keep some that the exact
   mode prunes, and it misses the mass of tiles it does not visit). The test runs on the weights
   ``2^(u_ij - m_i)`` that the softmax computes anyway (``m_i`` the running max or the fixed
   reference) against ``tau 2^(lse2_lb_i - m_i)``, capped just below the row's largest weight so far
   (online) or a weight it has kept (fixed; see ``_attn_tile``): no log2 in the loop. Rows that kept
   nothing in the listed tiles (no unmasked key there, or every weight below float32's range under
   the fixed reference) and rows whose kept weights outgrew the fixed reference (a sum above 2^64)
   are recomputed over every key block with the online softmax (``FALLBACK``), so a row is dropped
   only if it has no unmasked key at all.
"""
import triton
import triton.language as tl

from .attention_fwd import load_rows, load_tile
from .masks import M_INIT, MIN_EXP2, NO_MASK, apply_masks, clamp_masked, dot, key_range, key_tiles
from .pdl import wait_previous
#: Pooled query rows per query block in the fast predictor (the smallest tl.dot M).
POOL_ROWS = tl.constexpr(16)
#: Causal fast mode: every query block lists the key blocks of its rows' this many most recent keys.
LOCAL_KEYS = tl.constexpr(128)


@triton.jit
def _base2_scores(
    q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``(qk, unit)``: the tile's base-2 scores are ``u = qk * unit``. Unmasked tiles return the raw
    product and ``unit = qk_scale``, so that a row max is taken on qk and scaled once per row
    (qk_scale > 0) and the scale fuses into the exponent (one multiply per entry less); masked
    tiles return the masked base-2 scores (``unit = 1``)."""
    qk = dot(q, tl.trans(k), PRECISION)
    unit = qk_scale
    if MASKED:
        qk = apply_masks(qk * qk_scale, offs_m[:, None], offs_n[None, :], b, h, Nq, Nk,
                         Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                         CAUSAL, MASK_KIND, KPM_KIND)
        unit = 1.0
    return qk, unit


@triton.jit
def _scores_blocks(
    m, l, cnt, q, K, TileMax, stride_kn, stride_kd, offs_m, offs_d, kb_lo, kb_hi, b, h, hk, Nq, Nk, qk_scale,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_kb, stride_kpn,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    STATS: tl.constexpr, MAX_STORE: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold the scores of key blocks ``[kb_lo, kb_hi)`` into the running max ``m`` and sum ``l``
    (base 2) of each row, and with ``STATS`` its unmasked count ``cnt``. ``MAX_STORE``: ``'tile'``
    stores each tile's score maximum at ``TileMax + kb``, ``'rows'`` each row's maximum in the block
    at ``TileMax + kb * BLOCK_M + r`` (``BLOCK_M`` = the number of rows)."""
    for kb in range(kb_lo, kb_hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_rows(K, b, hk, kb * BLOCK_N, offs_n, offs_d, Nk, D, stride_kn, stride_kd, MASKED, BLOCK_D != D, TMA)
        qk, unit = _base2_scores(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale,
                                 Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_kb, stride_kpn,
                                 MASKED, CAUSAL, MASK_KIND, KPM_KIND, PRECISION)
        row_max = tl.max(qk, 1) * unit
        if MAX_STORE == "tile":
            tl.store(TileMax + kb, tl.max(row_max, 0))
        elif MAX_STORE == "rows":
            tl.store(TileMax + kb * row_max.shape[0] + tl.arange(0, row_max.shape[0]), row_max)
        m_new = tl.maximum(m, row_max)
        x = qk * unit - m_new[:, None]
        if MASKED:
            x = clamp_masked(x)
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x), 1)
        m = m_new
        if STATS:
            cnt += tl.sum((qk > float("-inf")).to(tl.int32), 1)
    return m, l, cnt


@triton.jit
def pruned_scores(
    Q, K, TileMax, Mpart, Lpart, Cnt, Mask, Kpm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, GROUPS, Nq, Nk, NQB, NKB, KB_PER_SPLIT, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    STATS: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 1 of the exact mode: ``BLOCK_M`` rows of one (batch, head) against the key blocks
    ``[split * KB_PER_SPLIT, (split + 1) * KB_PER_SPLIT)``.

    TileMax ``[B*H, NQB, NKB]`` float32 (pre-filled with -inf by the host: tiles past the causal end
    are never written); Mpart, Lpart ``[splits, B*H, Nq]`` float32 partial max and sum (base 2);
    Cnt ``[splits, B*H, Nq]`` int32 unmasked entries per row (``STATS`` only). With ``TMA``, K is a
    tensor descriptor of the ``[B, Hkv, Nk, D]`` keys (``load_rows``).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if not TMA:
        K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    TileMax += (bh.to(tl.int64) * NQB + pid_m) * NKB

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, offs_m, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)

    # The split's key blocks: tiles [full_start, full_end) are visible to every row of the block and
    # in range (inside a clear key padding mask's hull, with no attn_mask), so they need no mask; the
    # key padding mask's padded ends are not visited (``key_tiles``).
    k_lo = split * KB_PER_SPLIT * BLOCK_N
    k_hi = tl.minimum(k_lo + KB_PER_SPLIT * BLOCK_N, Nk)
    start, full_start, full_end, end = key_tiles(pid_m * BLOCK_M, Nq, Nk, k_lo, k_hi, Kpm, b, stride_pb, stride_pn,
                                                 BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, KPM_KIND)
    m = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    if KPM_KIND != NO_MASK:  # else start = full_start
        m, l, cnt = _scores_blocks(
            m, l, cnt, q, K, TileMax, stride_kn, stride_kd, offs_m, offs_d, start // BLOCK_N, full_start // BLOCK_N,
            b, h, hk, Nq, Nk, qk_scale, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, BLOCK_N, BLOCK_D, True, CAUSAL, MASK_KIND, KPM_KIND, STATS, "tile", TMA, PRECISION)
    m, l, cnt = _scores_blocks(
        m, l, cnt, q, K, TileMax, stride_kn, stride_kd, offs_m, offs_d, full_start // BLOCK_N, full_end // BLOCK_N,
        b, h, hk, Nq, Nk, qk_scale, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, BLOCK_N, BLOCK_D, False, CAUSAL, MASK_KIND, KPM_KIND, STATS, "tile", TMA, PRECISION)
    m, l, cnt = _scores_blocks(
        m, l, cnt, q, K, TileMax, stride_kn, stride_kd, offs_m, offs_d, full_end // BLOCK_N, tl.cdiv(end, BLOCK_N),
        b, h, hk, Nq, Nk, qk_scale, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, BLOCK_N, BLOCK_D, True, CAUSAL, MASK_KIND, KPM_KIND, STATS, "tile", TMA, PRECISION)

    rows = (split * tl.num_programs(1) + bh).to(tl.int64) * Nq + offs_m
    row_mask = offs_m < Nq
    tl.store(Mpart + rows, m, mask=row_mask)
    tl.store(Lpart + rows, l, mask=row_mask)
    if STATS:
        tl.store(Cnt + rows, cnt, mask=row_mask)


@triton.jit
def split_lse(Mpart, Lpart, offs, mask, SPLITS, split_stride):
    """Fold the partial row maxima and sums (base 2) of ``SPLITS`` key-range splits, split ``s`` at
    ``Mpart / Lpart + s * split_stride + offs``, into each row's max ``m`` and
    ``lse2 = m + log2 l`` (+inf for a row that saw no key). Returns ``(m, lse2)``."""
    m = tl.full(offs.shape, M_INIT, dtype=tl.float32)
    l = tl.zeros(offs.shape, dtype=tl.float32)
    for s in range(0, SPLITS):
        part = s * split_stride + offs
        m_s = tl.load(Mpart + part, mask=mask, other=M_INIT)
        m_new = tl.maximum(m, m_s)
        l = l * tl.exp2(m - m_new) + tl.load(Lpart + part, mask=mask, other=0.0) * tl.exp2(m_s - m_new)
        m = m_new
    empty = l == 0.0  # not l <= 0: a NaN sum (a NaN score seen) gives a NaN lse2
    return m, tl.where(empty, float("inf"), m + tl.log2(tl.where(empty, 1.0, l)))


@triton.jit
def split_combine(
    Opart, Mpart, Lpart, Lall, Out, W, Nq, SPLITS, log2_tau,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, EXACT: tl.constexpr, STATS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Fold the ``SPLITS`` split programs of ``BLOCK_R`` rows of one (batch, head) into their output
    (flash-decoding's combine). Opart ``[S, B*H, Nq, DV]`` and Mpart, Lpart, Lall ``[S, B*H, Nq]``
    float32 as ``pruned_attn`` writes them with ``SPLIT``; Out ``[B*H, Nq, DV]`` (its dtype).

    Exact (the parts are kept weights against the exact lse): ``out = sum_s O_s / sum_s l_s``, the
    kept mass at least 1e-30 (rows that kept nothing give 0).
    Fast (online parts relative to each split's max ``m_s``; ``l_all_s`` the sum over every entry the
    split saw): ``m = max_s m_s``, ``w_s = 2^(m_s - m)``, ``lse2_lb = m + log2 sum_s w_s l_all_s``;
    a split whose maximum is below ``thr = min(lse2_lb + log2 tau, m)`` holds no kept entry after all
    (each split kept at least its own maximum) and gets ``w_s = 0``, so the row maximum rule holds for
    the whole row; ``out = sum_s w_s O_s / sum_s w_s l_s`` (0 where that is 0). ``STATS``: W
    ``[S, B*H, Nq]`` float32 = ``w_s``.
    """
    wait_previous(PDL)
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < Nq
    offs_dv = tl.arange(0, BLOCK_DV)
    tile_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    base = bh.to(tl.int64) * Nq + rows
    split_stride = tl.num_programs(1).to(tl.int64) * Nq  # B*H rows of Nq per split
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    if EXACT:
        for s in range(0, SPLITS):
            part = s * split_stride + base
            l += tl.load(Lpart + part, mask=row_ok, other=0.0)
            acc += tl.load(Opart + part[:, None] * DV + offs_dv[None, :], mask=tile_ok, other=0.0)
        out = acc / tl.maximum(l, 1e-30)[:, None]
    else:
        m, lse_lb = split_lse(Mpart, Lall, base, row_ok, SPLITS, split_stride)
        thr = tl.minimum(lse_lb + log2_tau, m)
        for s in range(0, SPLITS):
            part = s * split_stride + base
            m_s = tl.load(Mpart + part, mask=row_ok, other=M_INIT)
            w = tl.where(m_s >= thr, tl.exp2(m_s - m), 0.0)
            l += tl.load(Lpart + part, mask=row_ok, other=0.0) * w
            acc += tl.load(Opart + part[:, None] * DV + offs_dv[None, :], mask=tile_ok, other=0.0) * w[:, None]
            if STATS:
                tl.store(W + part, w, mask=row_ok)
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    tl.store(Out + base[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=tile_ok)


@triton.jit
def pruned_select(
    TileMax, Mpart, Lpart, Lse2, Thr, Idx, Count, NValid, Nq, NQB, NKB, SPLITS, log2_tau,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False,
):
    """The exact tile skip test of query block ``pid_m``: each row's lse2 and threshold from the
    first pass's split partials, then the list of key blocks whose tile maximum reaches
    ``thr_min = min_i thr_i``.

    Mpart, Lpart ``[SPLITS, B*H, Nq]`` float32: per split the row max and sum (base 2). Writes Lse2
    and Thr ``[B*H, Nq]`` float32 (``thr_i = min(lse2_i + log2 tau, m_i)``, with m_i lowered by ~1e-6
    relative so that the recomputed row maximum is always kept; both +inf on empty rows), Idx
    ``[B*H, NQB, NKB]`` int32 (first Count entries valid, in key order), Count and NValid
    ``[B*H, NQB]`` int32: listed tiles and tiles with at least one unmasked entry.
    """
    wait_previous(PDL)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < Nq
    rows = bh.to(tl.int64) * Nq + offs_m
    m, lse2 = split_lse(Mpart, Lpart, rows, row_mask, SPLITS, tl.num_programs(1).to(tl.int64) * Nq)
    # A NaN lse2 (the row saw a NaN score) gives thr just below m (fmin): the row max's tile is
    # visited and its weight 2^(u - lse2) makes the row NaN.
    thr = tl.where(lse2 == float("inf"), float("inf"), tl.minimum(lse2 + log2_tau, m - 1e-6 * (1.0 + tl.abs(m))))
    tl.store(Lse2 + rows, lse2, mask=row_mask)
    tl.store(Thr + rows, thr, mask=row_mask)
    thr_min = tl.min(tl.where(row_mask, thr, float("inf")), 0)
    base = (bh.to(tl.int64) * NQB + pid_m) * NKB
    n = 0
    n_valid = 0
    for c in range(0, NKB, CHUNK):
        kb = c + tl.arange(0, CHUNK)
        tm = tl.load(TileMax + base + kb, mask=kb < NKB, other=float("-inf"))
        live_t = tm > float("-inf")
        keep = live_t & (tm >= thr_min)
        ki = keep.to(tl.int32)
        pos = n + tl.cumsum(ki, 0) - 1
        tl.store(Idx + base + pos, kb, mask=keep)
        n += tl.sum(ki, 0)
        n_valid += tl.sum(live_t.to(tl.int32), 0)
    tl.store(Count + bh * NQB + pid_m, n)
    tl.store(NValid + bh * NQB + pid_m, n_valid)


@triton.jit
def pooled_queries(Q, offs_r, offs_d, Nq, stride_qm, stride_qd,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The pooled query rows ``offs_r`` ``[R, BLOCK_D]`` of one (batch, head) (``Q`` points at its
    ``[Nq, D]`` rows), in Q's dtype, summed in float32: pooled row r (row ``r % 16`` of query block
    ``r // 16``) is the mean of the query rows ``[r G, (r + 1) G)`` below Nq, ``G = BLOCK_M / 16``
    (0 where none is; a NaN element of the mean becomes 0, so that a NaN query row leaves the
    estimates finite). Row g of every group at once: G loads of R rows (no reshape of a tile),
    unrolled so that they are in flight together (in the predictor at D = 128 this spills 8 bytes
    outside its loops; one load at a time measured slower)."""
    G: tl.constexpr = BLOCK_M // POOL_ROWS
    qp = tl.zeros([offs_r.shape[0], BLOCK_D], dtype=tl.float32)
    for g in tl.static_range(G):
        qp += load_tile(Q, offs_r * G + g, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D).to(tl.float32)
    n_rows = tl.minimum(tl.maximum(Nq - offs_r * G, 0), G)  # query rows < Nq in each group
    qp = qp / tl.maximum(n_rows, 1).to(tl.float32)[:, None]
    return tl.where(qp == qp, qp, 0.0).to(Q.dtype.element_ty)


@triton.jit
def _block_estimate(qp, Kp, Ko, Kbias, Kobias, kb, first_row, offs_d, NKB, Nq, Nk, qk_scale,
                    stride_kn, stride_kd, stride_bn, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Estimated log2 mass ``[POOL_ROWS, CHUNK]`` of key blocks ``kb`` for the pooled rows whose
    first query rows are ``first_row``: the larger of the block's weight times 2^(q . mean key) and
    its outlier key (the farthest from the mean) on its own, which catches a single strong key (an
    attention sink) that the mean dilutes (the larger term, not their sum: within a factor 2 of it,
    and no exp2/log2 per entry); -inf where the block is invisible (masked, causal, past NKB)."""
    kp = load_tile(Kp, kb, offs_d, NKB, D, stride_kn, stride_kd, True, BLOCK_D != D)
    ko = load_tile(Ko, kb, offs_d, NKB, D, stride_kn, stride_kd, True, BLOCK_D != D)
    bias = tl.load(Kbias + kb * stride_bn, mask=kb < NKB, other=float("-inf"))
    obias = tl.load(Kobias + kb * stride_bn, mask=kb < NKB, other=float("-inf"))
    est = tl.maximum(dot(qp, tl.trans(kp), PRECISION) * qk_scale + bias[None, :],
                     dot(qp, tl.trans(ko), PRECISION) * qk_scale + obias[None, :])
    if CAUSAL:
        est = tl.where(kb[None, :] * BLOCK_N <= first_row[:, None] + (Nk - Nq), est, float("-inf"))
    return est


@triton.jit
def local_window(kb, first_key, last_key, BLOCK_N: tl.constexpr):
    """Whether key block ``kb`` holds one of the ``LOCAL_KEYS`` most recent keys of a row whose own
    (last visible) key lies in ``[first_key, last_key]`` (broadcast: a row per query block or per
    sampled row)."""
    return ((kb + 1) * BLOCK_N > first_key - LOCAL_KEYS + 1) & (kb * BLOCK_N <= last_key)


@triton.jit
def pruned_predict(
    Q, Kp, Ko, Kbias, Kobias, Vert, VertLocal, Keeper, Miss, Share, LseRun, Idx, Count, Tiles,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bn, stride_tb, stride_th, stride_tq,
    H, GROUPS, Nq, Nk, NQB, NKB, qk_scale, log2_thr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QB: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, VERT: tl.constexpr,
    MASK_TILES: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """Fast-mode tile prediction for the ``QB`` query blocks ``[pid QB, (pid + 1) QB)`` of one
    (batch, head): their ``QB * 16`` pooled rows share every load of the pooled keys.

    Q ``[B, H, Nq, D]``, pooled here (``pooled_queries``: 16 rows per query block); Kp ``[B, Hkv, NKB, D]``
    pooled keys (q's dtype), Ko the same shape: each block's outlier key (0 where none); Kbias
    ``[B or 1, NKB]`` float32, log2 of each key block's unmasked weight (-inf: nothing visible),
    Kobias the same for the outlier key alone. With ``VERT``, Vert ``[B*H, NKB]`` float32: log2
    of the largest weight a sample of real query rows puts in each key block (vertical stripes,
    attention sinks: single strong keys that mean pooling dilutes); such blocks are visited by
    every query block (where the causal mask lets them). With ``LOCAL`` (causal attention) every query
    block also lists the key blocks of its rows' ``LOCAL_KEYS`` most recent keys (``local_window``);
    with ``VERT`` too, only in a (batch, head) whose sampled rows keep an entry in their own windows
    (VertLocal ``[B*H, NKB]`` float32: the largest weight they give there, ``vertical_combine``): a
    head that attends to its first keys and diffusely, say, lists none. With ``VERT`` it also checks
    its pooled lists against the sample: a key block that only one sampled row keeps (Keeper
    ``[B*H, NKB]`` int32, that row, ``vertical_combine``) and that the row's query block does not
    list but for the vertical estimate is a miss of the pooled estimate, which predicts the other
    rows alone. Miss ``[B*H, 2]`` int32 gets the smallest and largest missed row (atomic minimum and
    maximum); where they differ (two sampled rows or more missed), ``pruned_attn`` sweeps every tile
    of the head. With ``MASK_TILES`` (an ``attn_mask``), Tiles ``[B or 1, H or 1, NQB, NKB]``
    float32 (strides ``stride_tb, stride_th, stride_tq`` and 1, 0 along a broadcast dim;
    ``mask_tiles``) says per tile whether the mask hides all of its entries (-inf: never listed),
    some (+inf: always listed where the causal mask lets it, and left out of the estimates, since a
    hidden key could stand for the whole block) or none (the mask's largest base-2 bias there,
    added to the tile's estimates). Writes Idx ``[B*H, NQB, NKB]`` int32 and Count ``[B*H, NQB]``;
    Share ``[B*H, NQB, NKB]`` and LseRun ``[B*H, cdiv(NKB, CHUNK), NQB * 16]`` float32 are its scratch (see below).

    One sweep over the pooled keys computes each pooled row's log-sum ``lse_r`` of the estimated
    block masses (and its best block). The share test ``est_rj - lse_r >= log2_thr`` needs the final
    lse, so the sweep stores, per query block and key block, ``Share = max_r (est_rj - lse_r^(c))``
    over the block's pooled rows, against each row's running lse after the key chunk c of j, and
    ``LseRun`` = ``lse_r^(c)``. The listing then tests ``Share - min_r (lse_r - lse_r^(c)) >= log2_thr``
    without recomputing an estimate: every tile that passes the share test for some pooled row passes
    it (a superset; the same tiles where the rows' lse grow alike after chunk c). Each pooled row's
    best block gets Share = +inf between the two loops, so the listing's one test lists it too
    (against testing every block against the 16 rows' best blocks in the listing: 0.6-1.3 % faster
    fast calls at 8k-64k on the H200, one case -2 %).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    Kp += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    Ko += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    Kbias += b.to(tl.int64) * stride_bb
    Kobias += b.to(tl.int64) * stride_bb
    Tiles += b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th
    G: tl.constexpr = BLOCK_M // POOL_ROWS
    R: tl.constexpr = QB * POOL_ROWS
    offs_r = pid * R + tl.arange(0, R)
    first_row = offs_r * G  # first query row of each pooled row
    row_ok = first_row < Nq
    qb_r = offs_r // POOL_ROWS  # the query block of each pooled row
    qb = pid * QB + tl.arange(0, QB)  # the program's query blocks
    qb_ok = qb < NQB
    offs_d = tl.arange(0, BLOCK_D)
    qp = pooled_queries(Q, offs_r, offs_d, Nq, stride_qm, stride_qd, D, BLOCK_M, BLOCK_D)
    wait_previous(PDL)  # the pooled keys and the vertical estimate

    base = (bh.to(tl.int64) * NQB + qb) * NKB
    n_pooled = NQB * POOL_ROWS
    lse_run = LseRun + bh.to(tl.int64) * tl.cdiv(NKB, CHUNK) * n_pooled + offs_r
    # The sweep: per pooled row, the log-sum (base 2) over key blocks of the estimated block mass, the
    # best visible block, and the shares against the running log-sum.
    m = tl.full([R], M_INIT, dtype=tl.float32)
    l = tl.zeros([R], dtype=tl.float32)
    best = tl.zeros([R], dtype=tl.int32)
    # The largest weight the sampled rows give a key in their own windows (LOCAL and VERT).
    local_max = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), 0)
    for c in range(0, NKB, CHUNK):
        kb = c + tl.arange(0, CHUNK)
        if LOCAL and VERT:
            local_max = tl.maximum(local_max, tl.max(tl.load(VertLocal + bh.to(tl.int64) * NKB + kb, mask=kb < NKB,
                                                             other=float("-inf")), 0))
        est = _block_estimate(qp, Kp, Ko, Kbias, Kobias, kb, first_row, offs_d, NKB, Nq, Nk, qk_scale,
                              stride_kn, stride_kd, stride_bn, D, BLOCK_N, BLOCK_D, CAUSAL, PRECISION)
        if MASK_TILES:
            bias = tl.load(Tiles + qb_r[:, None] * stride_tq + kb[None, :],
                           mask=(qb_r < NQB)[:, None] & (kb < NKB)[None, :], other=float("-inf"))
            est = tl.where(bias < float("inf"), est + bias, float("-inf"))
        est = tl.where(row_ok[:, None], est, float("-inf"))
        c_max = tl.max(est, 1)
        c_arg = tl.argmax(est, 1).to(tl.int32) + c
        best = tl.where(c_max > m, c_arg, best)
        m_new = tl.maximum(m, c_max)
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(tl.maximum(est - m_new[:, None], MIN_EXP2)), 1)
        m = m_new
        lse_c = tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), float("inf"))  # +inf: no block seen yet
        share = tl.max(tl.reshape(est - lse_c[:, None], (QB, POOL_ROWS, CHUNK)), 1)
        tl.store(Share + base[:, None] + kb[None, :], share, mask=qb_ok[:, None] & (kb[None, :] < NKB))
        tl.store(lse_run + (c // CHUNK) * n_pooled, lse_c, mask=offs_r < n_pooled)
    # The listing reads Share and LseRun in other threads' layout: make the sweep's stores visible.
    tl.debug_barrier()
    live = l > 0.0
    # The best block of every pooled row is listed: its share becomes +inf (after the sweep's stores,
    # before the listing's loads).
    tl.store(Share + (bh.to(tl.int64) * NQB + qb_r) * NKB + best, float("inf"), mask=live & (qb_r < NQB))
    tl.debug_barrier()
    lse = tl.where(live, m + tl.log2(tl.where(live, l, 1.0)), float("inf"))
    # Each query block's first tile: the best block of its most concentrated pooled row.
    conc = tl.reshape(tl.where(live, m - lse, float("-inf")), (QB, POOL_ROWS))
    top = tl.max(conc, 1)
    best_qb = tl.reshape(tl.where(live, best, -1), (QB, POOL_ROWS))
    first = tl.max(tl.where(conc == top[:, None], best_qb, -1), 1)

    tl.store(Idx + base, first, mask=qb_ok & (first >= 0))
    n = (first >= 0).to(tl.int32)
    first_key = qb * BLOCK_M + (Nk - Nq)  # causal: the last key that the block's first and last rows see
    last_key = tl.minimum(qb * BLOCK_M + BLOCK_M, Nq) - 1 + (Nk - Nq)
    miss_lo = tl.zeros([], dtype=tl.int32) + Nq  # the sampled rows that the pooled lists miss (VERT)
    miss_hi = tl.zeros([], dtype=tl.int32) - 1
    # The listing: visit a tile if its share, less the smallest growth of a pooled row's lse after its
    # chunk (rows that had seen no block then do not count), is >= tau * slack (+inf: the best block
    # of one of the query block's pooled rows). Each step lists STEPS chunks of key blocks: steps of
    # one chunk, [QB, CHUNK] tiles, left the loop latency-bound (H200, the predictor alone, 64k D64 /
    # D128 s 0.95: 614 -> 535 / 523 -> 418 us; 16k D128 s 0.9 57.4 -> 52.5; 2 or 8 chunks no better).
    STEPS: tl.constexpr = 4
    n_chunks = tl.cdiv(NKB, CHUNK)
    for c in range(0, NKB, STEPS * CHUNK):
        kb = c + tl.arange(0, STEPS * CHUNK)
        chunks = c // CHUNK + tl.arange(0, STEPS)
        lse_c = tl.load(lse_run[None, :] + chunks[:, None] * n_pooled,
                        mask=(chunks < n_chunks)[:, None] & (offs_r < n_pooled)[None, :], other=float("inf"))
        growth = tl.where(lse_c < float("inf"), lse[None, :] - lse_c, float("inf"))  # [STEPS, R]
        growth_min = tl.trans(tl.min(tl.reshape(growth, (STEPS, QB, POOL_ROWS)), 2))  # [QB, STEPS]
        growth_min = tl.reshape(tl.broadcast_to(growth_min[:, :, None], (QB, STEPS, CHUNK)), (QB, STEPS * CHUNK))
        share = tl.load(Share + base[:, None] + kb[None, :], mask=qb_ok[:, None] & (kb[None, :] < NKB),
                        other=float("-inf"))
        keep = share - growth_min >= log2_thr
        if MASK_TILES:
            bias = tl.load(Tiles + qb[:, None] * stride_tq + kb[None, :], mask=qb_ok[:, None] & (kb[None, :] < NKB),
                           other=float("-inf"))
            partial = bias == float("inf")
            if CAUSAL:
                partial = partial & (kb[None, :] * BLOCK_N <= last_key[:, None])
            keep = keep | partial
        if LOCAL:  # the local window: the blocks of the rows' LOCAL_KEYS most recent keys
            window = keep | local_window(kb[None, :], first_key[:, None], last_key[:, None], BLOCK_N)
            keep = tl.where(local_max >= log2_thr, window, keep) if VERT else window
        if VERT:
            keeper = tl.load(Keeper + bh.to(tl.int64) * NKB + kb, mask=kb < NKB, other=-1)
            missed = ((keeper[None, :] >= 0) & (keeper[None, :] // BLOCK_M == qb[:, None]) & ~keep
                      & (kb[None, :] != first[:, None]))
            miss_lo = tl.minimum(miss_lo, tl.min(tl.min(tl.where(missed, keeper[None, :], Nq), 1), 0))
            miss_hi = tl.maximum(miss_hi, tl.max(tl.max(tl.where(missed, keeper[None, :], -1), 1), 0))
            vert = tl.load(Vert + bh.to(tl.int64) * NKB + kb, mask=kb < NKB, other=float("-inf"))
            vis = vert[None, :] >= log2_thr
            if CAUSAL:
                vis = vis & (kb[None, :] * BLOCK_N <= last_key[:, None])
            keep = keep | vis
        if MASK_TILES:  # a local window or vertical stripe that the mask hides is not visited
            keep = keep & (bias > float("-inf"))
        keep = keep & (kb[None, :] < NKB) & (kb[None, :] != first[:, None])
        ki = keep.to(tl.int32)
        pos = n[:, None] + tl.cumsum(ki, 1) - 1
        tl.store(Idx + base[:, None] + pos, kb[None, :], mask=keep & qb_ok[:, None])
        n += tl.sum(ki, 1)
    tl.store(Count + bh * NQB + qb, n, mask=qb_ok)
    if VERT:
        if miss_hi >= 0:
            tl.atomic_min(Miss + 2 * bh, miss_lo)
            tl.atomic_max(Miss + 2 * bh + 1, miss_hi)


@triton.jit
def _pooled_lse_bound(
    q, Kp, Ko, Kbias, Kobias, Idx, count, b, hk, offs_m, offs_d, Nq, Nk, NKB, qk_scale,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_bb, stride_bn,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """A lower bound of each row's lse2 from the pooled keys: by Jensen,
    ``sum_{j in block} w_j 2^(u_ij) >= W 2^(q_i . kbar)`` with kbar the w-weighted mean key and W the
    block weight (``Kbias = log2 W``), and it is also >= the outlier key's own term. Causal rows
    count only the blocks they see entirely. (The pooled keys are rounded to q's dtype for the tensor
    cores, so the bound holds to that rounding.)
    Only the ``count`` listed key blocks ``Idx[:count]`` are summed (fewer terms: still a lower
    bound), which costs one small product per 64 listed blocks instead of one per 64 key blocks."""
    Kp += b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    Ko += b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
    Kbias += b.to(tl.int64) * stride_bb
    Kobias += b.to(tl.int64) * stride_bb
    mb = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    lb = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, count, CHUNK):
        t = c + tl.arange(0, CHUNK)
        kb = tl.load(Idx + t, mask=t < count, other=NKB)
        kp = load_tile(Kp, kb, offs_d, NKB, D, stride_pkn, stride_pkd, True, BLOCK_D != D)
        bias = tl.load(Kbias + kb * stride_bn, mask=kb < NKB, other=float("-inf"))
        ko = load_tile(Ko, kb, offs_d, NKB, D, stride_pkn, stride_pkd, True, BLOCK_D != D)
        obias = tl.load(Kobias + kb * stride_bn, mask=kb < NKB, other=float("-inf"))
        # Both terms are lower bounds of the block's sum: Jensen, and one of its terms.
        est = tl.maximum(dot(q, tl.trans(kp), PRECISION) * qk_scale + bias[None, :],
                         dot(q, tl.trans(ko), PRECISION) * qk_scale + obias[None, :])
        if CAUSAL:
            est = tl.where((kb[None, :] + 1) * BLOCK_N <= offs_m[:, None] + (Nk - Nq) + 1, est, float("-inf"))
        m_new = tl.maximum(mb, tl.max(est, 1))
        lb = lb * tl.exp2(mb - m_new) + tl.sum(tl.exp2(tl.maximum(est - m_new[:, None], MIN_EXP2)), 1)
        mb = m_new
    return tl.where(lb > 0.0, mb + tl.log2(tl.where(lb > 0.0, lb, 1.0)), float("-inf"))


@triton.jit
def _unmasked_tiles(Idx, start, hi, start_m, Nq, Nk, full_start, full_end, LIST_M: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FEW_MASKED: tl.constexpr,
                    HULL: tl.constexpr, CAUSAL: tl.constexpr):
    """``(first, mid)``: of the listed tiles ``Idx[start:hi]``, those in ``[first, mid)`` need no mask for the
    rows ``[start_m, start_m + BLOCK_M)`` (key blocks every key of which every row sees), the others
    do. The lists are in key order from ``start`` on (the fast mode's first tile is peeled before it),
    so the masked ones are their first and last ones. Without ``MASKED`` none is masked
    (``(start, hi)``); without ``FEW_MASKED`` (an attention mask, or a key padding mask in split
    programs) all of them (``(start, start)``).
    With ``HULL`` (a key padding mask, no split) the tiles from ``full_start`` to ``full_end``
    (``key_tiles``: inside a clear hull of the padding mask) need none: the whole list is counted, as
    the fast mode's local windows and a head swept whole may list padded blocks. Otherwise only the
    causal diagonal and the partial last key block are masked: a list of a query block of ``LIST_M``
    rows holds only key blocks that one of its rows sees, so at most ``LIST_M / BLOCK_N + 2`` of them
    (``<= TAIL``), and only the last ``TAIL`` are read."""
    if not MASKED:
        return start, hi
    elif not FEW_MASKED:
        return start, start
    elif HULL:
        STEP: tl.constexpr = 64
        n_head = tl.zeros([], dtype=tl.int32)
        n_tail = tl.zeros([], dtype=tl.int32)
        for c in range(start, hi, STEP):
            t = c + tl.arange(0, STEP)
            kb = tl.load(Idx + t, mask=t < hi, other=0)
            n_head += tl.sum(((t < hi) & (kb * BLOCK_N < full_start)).to(tl.int32), 0)
            n_tail += tl.sum(((t < hi) & ((kb + 1) * BLOCK_N > full_end)).to(tl.int32), 0)
        return start + n_head, tl.maximum(hi - n_tail, start + n_head)
    else:
        TAIL: tl.constexpr = 4 if LIST_M <= 2 * BLOCK_N else 2 * LIST_M // BLOCK_N
        _, full_end = key_range(start_m, Nq, Nk, BLOCK_M, CAUSAL)
        t = hi - 1 - tl.arange(0, TAIL)
        kb = tl.load(Idx + t, mask=t >= start, other=0)
        return start, hi - tl.sum(((t >= start) & ((kb + 1) * BLOCK_N > full_end)).to(tl.int32), 0)


@triton.jit
def _attn_tile(
    acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, kb, thr, lse2, lse_lb, rowsel,
    stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale, tau,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    EXACT: tl.constexpr, FIXED: tl.constexpr, ROWSEL: tl.constexpr, FIRST: tl.constexpr, SEEN_ALL: tl.constexpr,
    STATS: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold key block ``kb`` into the accumulators (see the module docstring). Fast mode: ``FIRST``,
    the first listed tile, whose whole sum enters the lse bound before its own entries are tested;
    ``SEEN_ALL``, every entry (not only the kept ones) of the later tiles enters the seen sum too
    (split programs: ``split_combine`` bounds lse by their seen sums alone, with no pooled bound).
    ``FIXED``: the weights are taken relative to a fixed reference ``m`` per row instead of the running
    max, so nothing is rescaled, and the later tiles take no row max: ``p_max`` is a weight the row
    has kept (relative to ``m``: the first tile's largest, raised to a later tile's mean weight), and
    every cut stays below it. The first tile sets ``m``: 32 above the larger of its row max and the
    pooled lse bound (0 if both are -inf), so the row max's weight is at most 2^-32 there and a later
    one overflows only above 2^128: the caller recomputes rows whose kept sum ``l`` passes 2^64
    (``pruned_attn``). Otherwise (online) ``m`` is the running max and ``p_max`` is unused."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = load_rows(K, b, hk, kb * BLOCK_N, offs_n, offs_d, Nk, D, stride_kn, stride_kd, MASKED, BLOCK_D != D, TMA)
    qk, unit = _base2_scores(q, k, offs_m, offs_n, b, h, Nq, Nk, qk_scale,
                             Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                             MASKED, CAUSAL, MASK_KIND, KPM_KIND, PRECISION)
    if ROWSEL:
        qk = tl.where(rowsel[:, None], qk, float("-inf"))
    v = load_rows(V, b, hk, kb * BLOCK_N, offs_n, offs_dv, Nk, DV, stride_vn, stride_vd, MASKED, BLOCK_DV != DV, TMA)
    if EXACT:
        u = qk * unit
        pruned = u < thr[:, None]  # not u >= thr: a NaN score is kept, and its row is NaN
        p = tl.where(pruned, 0.0, tl.exp2(u - lse2[:, None]))
        l += tl.sum(p, 1)
        acc += dot(p.to(v.dtype), v, PRECISION)
        if STATS:
            kcnt += tl.sum((~pruned).to(tl.int32), 1)
    elif FIXED:
        if FIRST:
            u_max = tl.max(qk, 1) * unit
            m = tl.maximum(u_max, lse_lb) + 32.0
            m = tl.where(m > float("-inf"), m, 0.0)
        x = qk * unit - m[:, None]
        if MASKED:
            x = clamp_masked(x)
        pa = tl.exp2(x)
        if FIRST:
            # p_max: a weight the row has kept, here the first tile's largest (by the same operations
            # as its entry's). Every cut stays below it (by 2^-20 (|m| + 130) relative: more than the
            # rounding of x if a compiler contracts the two differently), so the first tile keeps its
            # row max and a later tile keeps any larger entry: the row max is always kept, and no
            # later tile needs its own row max.
            p_max = tl.exp2(u_max - m)
            l_seen = tl.sum(pa, 1)
        cap = p_max * (1.0 - (tl.abs(m) + 130.0) * 9.5367431640625e-07)
        cut = tl.minimum(tau * tl.maximum(l_seen, tl.exp2(lse_lb - m)), cap)
        pruned = pa < cut[:, None]  # not pa >= cut: a NaN weight is kept, and its row is NaN
        p = tl.where(pruned, 0.0, pa)
        p_sum = tl.sum(p, 1)
        if not FIRST:
            l_seen += p_sum
            # The mean of the tile's weights, kept ones counted, is at most its largest kept weight
            # (rows whose first tile was masked start with p_max = 0, which prunes nothing).
            p_max = tl.maximum(p_max, p_sum * (1.0 / BLOCK_N))
        l += p_sum
        acc += dot(p.to(v.dtype), v, PRECISION)
    else:
        u_max = tl.max(qk, 1) * unit
        m_new = tl.maximum(m, u_max)
        alpha = tl.exp2(m - m_new)
        x = qk * unit - m_new[:, None]
        if MASKED:
            x = clamp_masked(x)
        pa = tl.exp2(x)
        # The lse bound relative to m_new, 2^(bound - m_new): the larger of the pooled bound and the
        # seen sum l_seen (every entry of the first tile and the kept entries of the later ones, or
        # with SEEN_ALL all of them: a subset of the row) plus this tile's largest entry (known
        # before the tile's sum, so the test does not wait for it; the first tile waits: its sum is
        # the whole bound).
        if FIRST:
            l_seen = tl.sum(pa, 1)
            seen = l_seen
        else:
            seen = l_seen * alpha + tl.exp2(u_max - m_new)
        # keep_ij: u_ij >= min(bound_i + log2 tau, m_new_i), that is pa_ij >= cut_i, with no log2.
        # The cap just below 1 keeps the row max whatever the rounding of its x (a fused multiply-add
        # of the raw product: within 2^-24 |m_new| of 0, not exactly 0); entries tied with it to
        # that relative precision are kept too.
        cap = tl.exp2(-(1.0 + tl.abs(m_new)) * 1.9073486328125e-06)  # 2^-19 (1 + |m_new|)
        cut = tl.minimum(tau * tl.maximum(seen, tl.exp2(lse_lb - m_new)), cap)
        pruned = pa < cut[:, None]  # as above
        p = tl.where(pruned, 0.0, pa)
        p_sum = tl.sum(p, 1)
        if not FIRST:
            if SEEN_ALL:
                l_seen = l_seen * alpha + tl.sum(pa, 1)
            else:
                l_seen = l_seen * alpha + p_sum
        # Every entry kept so far is <= the old max m: if the threshold passed m (cut > 2^(m - m_new)),
        # all of them are pruned after all, so drop them (this makes tau > 1 keep only the row max).
        stale = cut > alpha
        alpha = tl.where(stale, 0.0, alpha)
        l = l * alpha + p_sum
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION)
        m = m_new
        if STATS:
            kept = tl.where(stale, 0.0, kept)
            kcnt = tl.where(stale, 0, kcnt)
    if STATS and not EXACT:
        u = qk * unit
        live = ~pruned & (u > float("-inf"))
        kept += tl.sum(tl.where(live, tl.exp2(u - lse2[:, None]), 0.0), 1)
        kcnt += tl.sum(live.to(tl.int32), 1)
    return acc, m, l, l_seen, p_max, kept, kcnt


@triton.jit
def _listed_tiles(
    acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, Idx, t_lo, t_hi, thr, lse2, lse_lb, row_mask,
    stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale, tau,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    EXACT: tl.constexpr, FIXED: tl.constexpr, SPLIT: tl.constexpr, STATS: tl.constexpr, TMA: tl.constexpr,
    PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    """Fold the listed tiles ``Idx[t_lo:t_hi]`` (not the fast mode's first) into the accumulators,
    each ``MASKED`` or not (``_attn_tile``); ``STAGES``: the loop's software pipelining depth (None:
    the compiler's default)."""
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        acc, m, l, l_seen, p_max, kept, kcnt = _attn_tile(
            acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, tl.load(Idx + t), thr, lse2, lse_lb, row_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale,
            tau, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, MASKED, CAUSAL, MASK_KIND, KPM_KIND,
            EXACT, FIXED, False, False, SPLIT, STATS, TMA, PRECISION)
    return acc, m, l, l_seen, p_max, kept, kcnt


@triton.jit
def pruned_attn(
    Q, K, V, Out, Idx, Count, Miss, Iota, Thr, Lse2, Opart, Mpart, Lpart, Lall, Kept, Kcnt, Mask, Kpm,
    Kp, Ko, Kbias, Kobias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_bb, stride_bn,
    H, GROUPS, Nq, Nk, NQB, NKB, qk_scale, tau,
    D: tl.constexpr, DV: tl.constexpr, LIST_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr, MASKED: tl.constexpr,
    EXACT: tl.constexpr, FIXED: tl.constexpr, SPLIT: tl.constexpr, FALLBACK: tl.constexpr, STATS: tl.constexpr,
    LSE_BOUND: tl.constexpr, CHECK: tl.constexpr, CHUNK: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Pass 2: ``BLOCK_M`` rows of one (batch, head) over its share of the key blocks listed for
    their query block of ``LIST_M`` rows (split ``program_id(2)`` of ``num_programs(2)`` takes an
    equal slice of the list).

    Thr, Lse2 ``[B*H, Nq]`` float32 base 2 (exact: the thresholds and lse, +inf on empty rows; fast:
    Lse2 is the exact lse, read only with ``STATS``). Without ``SPLIT`` writes Out ``[B, H, Nq, DV]``
    (input dtype) and Lpart[0] (kept mass, exact; kept sum, fast); with ``SPLIT`` writes the
    unnormalized Opart ``[S, B*H, Nq, DV]`` and Mpart, Lpart (and Lall, fast: the seen sum
    ``l_seen``, here the sum over every entry seen) ``[S, B*H, Nq]`` float32 for ``split_combine``.
    ``tau`` is the threshold itself (fast mode; the exact mode reads Thr).
    ``STATS``: Kept (true kept mass, fast only) and Kcnt (kept entries) ``[S, B*H, Nq]``. ``CHECK``
    (fast mode with the vertical sample): a head whose Miss ``[B*H, 2]`` int32 holds two different
    rows (``pruned_predict``) is swept over every key block its rows see (the first of Iota ``[NKB]``
    int32, each block's own index), not its lists. With ``TMA``,
    K and V are tensor descriptors of the ``[B, Hkv, Nk, D]`` keys and ``[B, Hkv, Nk, DV]`` values
    (``load_rows``).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if not TMA:
        K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    qb = pid_m * BLOCK_M // LIST_M  # the query block of the tile lists (LIST_M rows, a multiple of BLOCK_M)
    Idx += (bh.to(tl.int64) * NQB + qb) * NKB

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = offs_m < Nq
    rows = bh.to(tl.int64) * Nq + offs_m
    q = load_tile(Q, offs_m, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)
    # With a key padding mask alone and no split, the tiles inside its clear hull need no mask.
    FEW_MASKED: tl.constexpr = MASK_KIND == NO_MASK and (KPM_KIND == NO_MASK or not SPLIT)  # else all are masked
    HULL: tl.constexpr = FEW_MASKED and KPM_KIND != NO_MASK
    full_start = 0
    full_end = Nk
    if HULL:
        _, full_start, full_end, _ = key_tiles(pid_m * BLOCK_M, Nq, Nk, 0, Nk, Kpm, b, stride_pb, stride_pn,
                                               BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, KPM_KIND)
    wait_previous(PDL)  # the tile lists (and thresholds, lse, pooled keys)
    if EXACT:
        thr = tl.load(Thr + rows, mask=row_mask, other=float("inf"))
    else:
        thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if EXACT or STATS:
        lse2 = tl.load(Lse2 + rows, mask=row_mask, other=float("inf"))
    else:
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    count = tl.load(Count + bh * NQB + qb)
    if CHECK:
        if tl.load(Miss + 2 * bh) < tl.load(Miss + 2 * bh + 1):
            Idx = Iota
            end, _ = key_range(pid_m * BLOCK_M, Nq, Nk, BLOCK_M, CAUSAL)
            count = tl.cdiv(end, BLOCK_N)
    lo = (split * count) // n_split
    hi = ((split + 1) * count) // n_split
    start = lo
    if not EXACT:
        start = lo + 1  # the fast sweep peels its first listed tile
    start = tl.minimum(start, hi)
    first_unmasked, mid = _unmasked_tiles(Idx, start, hi, pid_m * BLOCK_M, Nq, Nk, full_start, full_end,
                                          LIST_M, BLOCK_M, BLOCK_N, MASKED, FEW_MASKED, HULL, CAUSAL)
    lse_lb = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if LSE_BOUND:
        lse_lb = _pooled_lse_bound(q, Kp, Ko, Kbias, Kobias, Idx, count, b, hk, offs_m, offs_d, Nq, Nk, NKB, qk_scale,
                                   stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_bb, stride_bn,
                                   D, BLOCK_M, BLOCK_N, BLOCK_D, CHUNK, CAUSAL, PRECISION)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_seen = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    kept = tl.zeros([BLOCK_M], dtype=tl.float32)
    kcnt = tl.zeros([BLOCK_M], dtype=tl.int32)

    if not EXACT:
        if lo < hi:
            acc, m, l, l_seen, p_max, kept, kcnt = _attn_tile(
                acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, tl.load(Idx + lo), thr, lse2, lse_lb, row_mask,
                stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale,
                tau, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, MASKED, CAUSAL, MASK_KIND, KPM_KIND,
                EXACT, FIXED, False, True, SPLIT, STATS, TMA, PRECISION)
    # Listed tiles [first_unmasked, mid) need no mask, the others do (``_unmasked_tiles``): with an
    # attention mask all of them, else the first few (a key padding mask's edge) and the last few, over
    # which a pipeline of the exact mode's copy-engine loads costs more than it hides.
    if HULL:
        acc, m, l, l_seen, p_max, kept, kcnt = _listed_tiles(
            acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, Idx, start, first_unmasked, thr, lse2, lse_lb, row_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale,
            tau, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND,
            EXACT, FIXED, SPLIT, STATS, TMA, PRECISION, 1 if EXACT else None)
    if FEW_MASKED:
        acc, m, l, l_seen, p_max, kept, kcnt = _listed_tiles(
            acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, Idx, first_unmasked, mid, thr, lse2, lse_lb, row_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale,
            tau, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, MASK_KIND, KPM_KIND,
            EXACT, FIXED, SPLIT, STATS, TMA, PRECISION, None)
    if MASKED:
        acc, m, l, l_seen, p_max, kept, kcnt = _listed_tiles(
            acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, Idx, mid, hi, thr, lse2, lse_lb, row_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk, qk_scale,
            tau, Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND,
            EXACT, FIXED, SPLIT, STATS, TMA, PRECISION, 1 if EXACT and FEW_MASKED else None)

    if FALLBACK:
        # Rows recomputed from scratch over every key block with the online softmax: those that kept
        # nothing in the listed tiles (no unmasked key there, or FIXED: every weight below 2^-126 of
        # the reference) and, FIXED, those whose kept sum passed 2^64 (overflow near; any weight
        # above 2^64 is kept, so it is in the sum; an online sum is at most the key count). The
        # other rows are masked out of these tiles: their weights are 0 and their m (running max or
        # fixed reference) stays, so their sums are unchanged.
        redo = row_mask & ((l == 0.0) | (l > 1.8446744073709552e19))
        if tl.max(redo.to(tl.int32), 0) > 0:
            acc = tl.where(redo[:, None], 0.0, acc)
            m = tl.where(redo, M_INIT, m)
            l = tl.where(redo, 0.0, l)
            l_seen = tl.where(redo, 0.0, l_seen)
            kept = tl.where(redo, 0.0, kept)
            kcnt = tl.where(redo, 0, kcnt)
            end, _ = key_range(pid_m * BLOCK_M, Nq, Nk, BLOCK_M, CAUSAL)
            for kb in range(0, tl.cdiv(end, BLOCK_N)):
                acc, m, l, l_seen, p_max, kept, kcnt = _attn_tile(
                    acc, m, l, l_seen, p_max, kept, kcnt, q, K, V, kb, thr, lse2, lse_lb, redo,
                    stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, b, h, hk, Nq, Nk,
                    qk_scale, tau,
                    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                    D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND,
                    EXACT, False, True, False, False, STATS, TMA, PRECISION)

    srows = (split * tl.num_programs(1) + bh).to(tl.int64) * Nq + offs_m
    if SPLIT:
        o_ptrs = Opart + srows[:, None] * DV + offs_dv[None, :]
        tl.store(o_ptrs, acc, mask=row_mask[:, None] & (offs_dv[None, :] < DV))
        tl.store(Mpart + srows, m, mask=row_mask)
        if not EXACT:
            tl.store(Lall + srows, l_seen, mask=row_mask)
    else:
        l_safe = tl.where(l > 0.0, l, 1.0)
        out = acc / l_safe[:, None]
        Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        o_ptrs = Out + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lpart + srows, l, mask=row_mask)
    if STATS:
        tl.store(Kept + srows, kept, mask=row_mask)
        tl.store(Kcnt + srows, kcnt, mask=row_mask)
