"""Backward kernels: the gradient of loss(O, H) in one pass (MATH.md section 3).

With g_i = dL/dH_i and log P_ij = s_ij - lse_i (recomputed from the saved lse),

    dS_ij = P_ij (dP_ij - delta_i - g_i log P_ij),   delta_i = dO_i . O_i + g_i H_i

so the FlashAttention-2 backward changes by one per-row scalar folded into delta and one
multiply-add per score. The log P form avoids the cancellation of ``g_i s_ij`` at large |s|.

``attention_bwd_preprocess`` computes delta. ``attention_bwd`` is one launch: programs
``[0, cdiv(Nk, BLOCK_N1))`` each own a key block of one kv head and accumulate dK, dV over every
query head of its group (no atomics, deterministic); the remaining programs each own a query block
of one head and accumulate dQ.
"""
import triton
import triton.language as tl

from .attention_fwd import load_tile
from .masks import LN2, LOG2E, NO_MASK, apply_masks, clamp_masked, dot, key_tiles, padding_hull


@triton.jit
def attention_bwd_preprocess(
    Out, dOut, Ent, dEnt, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, Nq,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DENT: tl.constexpr,
):
    """delta_i = dO_i . O_i + g_i H_i for ``BLOCK_M`` rows of one (batch, head); Ent, dEnt and
    Delta are ``[B, H, Nq]`` contiguous float32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
                  offs_m, offs_dv, Nq, DV, stride_om, stride_od, True, BLOCK_DV != DV)
    do = load_tile(dOut + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh,
                   offs_m, offs_dv, Nq, DV, stride_gm, stride_gd, True, BLOCK_DV != DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * Nq + offs_m
    if HAS_DENT:
        ent = tl.load(Ent + rows, mask=offs_m < Nq, other=0.0)
        delta += tl.load(dEnt + rows, mask=offs_m < Nq, other=0.0) * ent
    tl.store(Delta + rows, delta, mask=offs_m < Nq)


@triton.jit
def _score_grad(p, dp, log_p2, delta, g, HAS_DENT: tl.constexpr):
    """dS = P (dP - delta - g log P), with log P given in bits (log P = log_p2 * ln 2)."""
    if HAS_DENT:
        return p * (dp - delta - (g * LN2) * log_p2)
    else:
        return p * (dp - delta)


@triton.jit
def _dkdv_query_blocks(
    dk, dv, k, v, Q, dO, Lse, Delta, dEnt, stride_qm, stride_qd, stride_gm, stride_gd,
    offs_n, offs_d, offs_dv, start, end, b, h, rows0, Nq, Nk, qk_scale,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    HAS_DENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over the query blocks ``[start, end)`` of head ``h``.
    Tiles are transposed (keys x queries). Rows past Nq load as zeros with lse 0, so they add
    nothing; ``MASKED`` tiles may hold -inf scores or +inf lse, hence the clamp."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q, offs_m, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)
        do = load_tile(dO, offs_m, offs_dv, Nq, DV, stride_gm, stride_gd, True, BLOCK_DV != DV)
        row_ok = offs_m < Nq
        lse2 = tl.load(Lse + rows0 + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + rows0 + offs_m, mask=row_ok, other=0.0)
        g = delta  # unused without an entropy gradient
        if HAS_DENT:
            g = tl.load(dEnt + rows0 + offs_m, mask=row_ok, other=0.0)
        u_t = dot(k, tl.trans(q), INPUT_PRECISION) * qk_scale
        if MASKED:
            u_t = apply_masks(u_t, offs_m[None, :], offs_n[:, None], b, h, Nq, Nk,
                              Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                              CAUSAL, MASK_KIND, KPM_KIND)
        log_p2_t = u_t - lse2[None, :]
        if MASKED:
            log_p2_t = clamp_masked(log_p2_t)
        p_t = tl.exp2(log_p2_t)
        dv += dot(p_t.to(do.dtype), do, INPUT_PRECISION)
        dp_t = dot(v, tl.trans(do), INPUT_PRECISION)
        ds_t = _score_grad(p_t, dp_t, log_p2_t, delta[None, :], g[None, :], HAS_DENT)
        dk += dot(ds_t.to(q.dtype), q, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dq_key_blocks(
    dq, q, do, lse2, delta, g, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, offs_dv, start, end, b, h, Nq, Nk, qk_scale,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    HAS_DENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over the key blocks ``[start, end)``."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_d, Nk, D, stride_kn, stride_kd, MASKED, BLOCK_D != D)
        v = load_tile(V, offs_n, offs_dv, Nk, DV, stride_vn, stride_vd, MASKED, BLOCK_DV != DV)
        u = dot(q, tl.trans(k), INPUT_PRECISION) * qk_scale
        if MASKED:
            u = apply_masks(u, offs_m[:, None], offs_n[None, :], b, h, Nq, Nk,
                            Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                            CAUSAL, MASK_KIND, KPM_KIND)
        log_p2 = u - lse2[:, None]
        if MASKED:
            log_p2 = clamp_masked(log_p2)
        p = tl.exp2(log_p2)
        dp = dot(do, tl.trans(v), INPUT_PRECISION)
        ds = _score_grad(p, dp, log_p2, delta[:, None], g[:, None], HAS_DENT)
        dq += dot(ds.to(k.dtype), k, INPUT_PRECISION)
    return dq


@triton.jit
def attention_bwd(
    Q, K, V, dO, Lse, Delta, dEnt, dQ, dK, dV, Mask, Kpm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, GROUPS, Nq, Nk, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    HAS_DENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(Nk, BLOCK_N1) + GROUPS * cdiv(Nq, BLOCK_M2), B * Hkv)``.

    Q, dO ``[B, H, Nq, *]``; K, V ``[B, Hkv, Nk, *]``; Lse (natural log, +inf for empty rows),
    Delta, dEnt ``[B, H, Nq]`` contiguous float32; dQ, dK, dV contiguous, like Q, K, V.
    """
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = H // GROUPS
    b = bhk // Hkv
    hk = bhk % Hkv
    n_key_blocks = tl.cdiv(Nk, BLOCK_N1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    if pid < n_key_blocks:
        start_n = pid * BLOCK_N1
        offs_n = start_n + tl.arange(0, BLOCK_N1)
        k = load_tile(K, offs_n, offs_d, Nk, D, stride_kn, stride_kd, True, BLOCK_D != D)
        v = load_tile(V, offs_n, offs_dv, Nk, DV, stride_vn, stride_vd, True, BLOCK_DV != DV)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_DV], dtype=tl.float32)
        # Query rows [start, full_start) see part of this key block (causal diagonal); rows
        # [full_start, Nq) see all of it, unless the block is ragged or masks are given.
        if CAUSAL:
            start = (tl.maximum(start_n - (Nk - Nq), 0) // BLOCK_M1) * BLOCK_M1
            full_start = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N1 - 1 - (Nk - Nq), 0), BLOCK_M1) * BLOCK_M1, Nq)
            full_start = tl.maximum(full_start, start)
        else:
            start = 0
            full_start = 0
        if start_n + BLOCK_N1 > Nk:
            full_start = Nq
        if MASK_KIND != NO_MASK:
            full_start = Nq
        if KPM_KIND != NO_MASK:  # the padding mask of this key block alone
            lo, hi, clear = padding_hull(Kpm, b, stride_pb, stride_pn, start_n, tl.minimum(start_n + BLOCK_N1, Nk),
                                         KPM_KIND, BLOCK_N1)
            start = tl.where(lo == hi, Nq, start)  # every key padded: dK = dV = 0
            # A mask that leaves every key of the block as it is is not applied.
            full_start = tl.where(clear & (lo == start_n) & (hi == start_n + BLOCK_N1), full_start, Nq)
        for member in range(GROUPS):
            h = hk * GROUPS + member
            head = b.to(tl.int64) * H + h
            Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            dOh = dO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
            dk, dv = _dkdv_query_blocks(
                dk, dv, k, v, Qh, dOh, Lse, Delta, dEnt, stride_qm, stride_qd, stride_gm, stride_gd,
                offs_n, offs_d, offs_dv, start, full_start, b, h, head * Nq, Nq, Nk, qk_scale,
                Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                D, DV, BLOCK_M1, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND, HAS_DENT, INPUT_PRECISION)
            dk, dv = _dkdv_query_blocks(
                dk, dv, k, v, Qh, dOh, Lse, Delta, dEnt, stride_qm, stride_qd, stride_gm, stride_gd,
                offs_n, offs_d, offs_dv, full_start, Nq, b, h, head * Nq, Nq, Nk, qk_scale,
                Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
                D, DV, BLOCK_M1, BLOCK_D, BLOCK_DV, False, CAUSAL, MASK_KIND, KPM_KIND, HAS_DENT, INPUT_PRECISION)
        kv_rows = bhk.to(tl.int64) * Nk
        out_mask = offs_n[:, None] < Nk
        tl.store(dK + (kv_rows + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(dK.dtype.element_ty),
                 mask=out_mask & (offs_d[None, :] < D))
        tl.store(dV + (kv_rows + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(dV.dtype.element_ty),
                 mask=out_mask & (offs_dv[None, :] < DV))
    else:
        n_query_blocks = tl.cdiv(Nq, BLOCK_M2)
        task = pid - n_key_blocks
        h = hk * GROUPS + task // n_query_blocks
        start_m = (task % n_query_blocks) * BLOCK_M2
        head = b.to(tl.int64) * H + h
        offs_m = start_m + tl.arange(0, BLOCK_M2)
        row_ok = offs_m < Nq
        q = load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                      offs_m, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)
        do = load_tile(dO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh,
                       offs_m, offs_dv, Nq, DV, stride_gm, stride_gd, True, BLOCK_DV != DV)
        lse2 = tl.load(Lse + head * Nq + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + head * Nq + offs_m, mask=row_ok, other=0.0)
        g = delta  # unused without an entropy gradient
        if HAS_DENT:
            g = tl.load(dEnt + head * Nq + offs_m, mask=row_ok, other=0.0)
        start, full_start, full_end, end = key_tiles(start_m, Nq, Nk, 0, Nk, Kpm, b, stride_pb, stride_pn,
                                                     BLOCK_M2, BLOCK_N2, CAUSAL, MASK_KIND, KPM_KIND)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
        dq = _dq_key_blocks(
            dq, q, do, lse2, delta, g, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, offs_d, offs_dv, start, full_start, b, h, Nq, Nk, qk_scale,
            Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N2, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND, HAS_DENT, INPUT_PRECISION)
        dq = _dq_key_blocks(
            dq, q, do, lse2, delta, g, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, offs_d, offs_dv, full_start, full_end, b, h, Nq, Nk, qk_scale,
            Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N2, BLOCK_D, BLOCK_DV, False, CAUSAL, MASK_KIND, KPM_KIND, HAS_DENT, INPUT_PRECISION)
        dq = _dq_key_blocks(
            dq, q, do, lse2, delta, g, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, offs_d, offs_dv, full_end, end, b, h, Nq, Nk, qk_scale,
            Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
            D, DV, BLOCK_N2, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND, HAS_DENT, INPUT_PRECISION)
        tl.store(dQ + (head * Nq + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
