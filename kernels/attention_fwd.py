"""Forward kernel: attention with the streamed row entropy (MATH.md section 2).

Per query row the kernel keeps FlashAttention's running max ``m`` and sum ``l`` plus one more
running sum, ``t = sum exp(s - m) (s - m)``, all in base 2. At the end
``lse = m + log l`` and ``H = log l - t / l`` (times ln 2), with no cancellation for large |s|.

Empty rows (no unmasked key) give out 0, entropy 0 and lse = +inf: the +inf makes
``P = exp(s - lse) = 0`` in the backward with no special case.
"""
import triton
import triton.language as tl

from .masks import LN2, M_INIT, apply_masks, clamp_masked, dot, key_tiles


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c, ROW_CHECK: tl.constexpr, COL_CHECK: tl.constexpr):
    """Load ``ptr[rows, cols]`` with zeros outside ``[0, n_rows) x [0, n_cols)``; the bounds
    checks are compiled in only where the tile can cross them."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    if ROW_CHECK and COL_CHECK:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif ROW_CHECK:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif COL_CHECK:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_rows(X, b, h, start, rows, cols, n_rows, n_cols, stride_r, stride_c,
              ROW_CHECK: tl.constexpr, COL_CHECK: tl.constexpr, TMA: tl.constexpr):
    """The rows ``rows = start + arange(R)`` and columns ``cols`` of the (batch ``b``, head ``h``)
    slice of a ``[B, H, N, D]`` tensor, zeros outside ``[0, n_rows) x [0, n_cols)``. With ``TMA``,
    ``X`` is a tensor descriptor of the whole tensor (block ``[1, 1, R, len(cols)]``): the copy engine
    loads the block and fills what lies outside the tensor with zeros. Otherwise ``X`` points at the
    slice (``load_tile``)."""
    if TMA:
        return tl.reshape(X.load([b, h, start, 0]), (rows.shape[0], cols.shape[0]))
    else:
        return load_tile(X, rows, cols, n_rows, n_cols, stride_r, stride_c, ROW_CHECK, COL_CHECK)


@triton.jit
def _fwd_key_blocks(
    acc, m, l, t, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, offs_dv, start, end, b, h, Nq, Nk, qk_scale,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_kb, stride_kpn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    ENTROPY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold the key blocks ``[start, end)`` into the running sums. ``MASKED`` blocks apply the
    masks and bounds; the others are known to be fully visible and in range."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K, offs_n, offs_d, Nk, D, stride_kn, stride_kd, MASKED, BLOCK_D != D)
        u = dot(q, tl.trans(k), INPUT_PRECISION) * qk_scale
        if MASKED:
            u = apply_masks(u, offs_m[:, None], offs_n[None, :], b, h, Nq, Nk,
                            Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_kb, stride_kpn,
                            CAUSAL, MASK_KIND, KPM_KIND)
        m_new = tl.maximum(m, tl.max(u, 1))
        x = u - m_new[:, None]  # s - m', in bits
        if MASKED:
            x = clamp_masked(x)
        p = tl.exp2(x)
        alpha = tl.exp2(m - m_new)
        if ENTROPY:
            t = alpha * (t + l * (m - m_new)) + tl.sum(p * x, 1)
        l = alpha * l + tl.sum(p, 1)
        v = load_tile(V, offs_n, offs_dv, Nk, DV, stride_vn, stride_vd, MASKED, BLOCK_DV != DV)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, INPUT_PRECISION)
        m = m_new
    return acc, m, l, t


@triton.jit
def attention_fwd(
    Q, K, V, Out, Lse, Ent, Mask, Kpm,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, GROUPS, Nq, Nk, qk_scale,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, KPM_KIND: tl.constexpr,
    ENTROPY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: ``BLOCK_M`` query rows of one (batch, head).

    Q ``[B, H, Nq, D]``, K ``[B, Hkv, Nk, D]``, V ``[B, Hkv, Nk, DV]`` (fp16/bf16/fp32, any
    strides with unit last stride); Out ``[B, H, Nq, DV]`` in the input dtype; Lse and Ent
    ``[B, H, Nq]`` contiguous float32 (natural log, nats). ``qk_scale = scale * log2(e)``.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUPS
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q, offs_m, offs_d, Nq, D, stride_qm, stride_qd, True, BLOCK_D != D)

    m = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Tiles [full_start, full_end) are visible to every row of the block and in range: no masking
    # needed. The tiles before and after them need the masks (a key padding mask's edges, the causal
    # diagonal, the ragged last block, an attn_mask).
    start, full_start, full_end, end = key_tiles(pid_m * BLOCK_M, Nq, Nk, 0, Nk, Kpm, b, stride_pb, stride_pn,
                                                 BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, KPM_KIND)
    acc, m, l, t = _fwd_key_blocks(
        acc, m, l, t, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, offs_dv, start, full_start, b, h, Nq, Nk, qk_scale,
        Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND, ENTROPY, INPUT_PRECISION)
    acc, m, l, t = _fwd_key_blocks(
        acc, m, l, t, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, offs_dv, full_start, full_end, b, h, Nq, Nk, qk_scale,
        Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, CAUSAL, MASK_KIND, KPM_KIND, ENTROPY, INPUT_PRECISION)
    acc, m, l, t = _fwd_key_blocks(
        acc, m, l, t, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, offs_dv, full_end, end, b, h, Nq, Nk, qk_scale,
        Mask, stride_mb, stride_mh, stride_mm, stride_mn, Kpm, stride_pb, stride_pn,
        D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, CAUSAL, MASK_KIND, KPM_KIND, ENTROPY, INPUT_PRECISION)

    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV))

    row_mask = offs_m < Nq
    rows = bh.to(tl.int64) * Nq + offs_m
    lse = tl.where(empty, float("inf"), (m + tl.log2(l_safe)) * LN2)
    tl.store(Lse + rows, lse, mask=row_mask)
    if ENTROPY:
        tl.store(Ent + rows, (tl.log2(l_safe) - t / l_safe) * LN2, mask=row_mask)
