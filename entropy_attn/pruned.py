"""Tau-pruned block-sparse attention for inference (shared MATH.md section 5).

    keep_ij = P_ij >= tau  (and each row's maximum entry is always kept)
    A_ij    = P_ij keep_ij / sum_l P_il keep_il,      O_i = sum_j A_ij v_j

``pruned_attention`` is the entry point. The Triton path (``kernels/pruned.py``) has two modes:

- ``mode='exact'``: a scores-only first pass (lse, row max and per-tile score maxima), a tile
  selection, and a second pass that loads and multiplies only the tiles that can hold a kept entry.
  Exact up to floating point.
- ``mode='fast'``: predicts the tiles from pooled queries and keys and, for long query sequences, a
  sample of query rows against all keys (``kernels/pruned_pool.py`` computes the latter two; no full
  first pass; with a causal mask also each row's most recent keys, where the head attends there) and
  prunes within them in one sweep (weights against a fixed reference per row, or an online softmax
  for split programs, tau >= 1 and float16); an approximation of the exact mode. With the sample it also
  checks the pooled lists against the sampled rows, and sweeps every tile of a head where they miss
  blocks that two sampled rows or more keep alone (attention by content, which pooling cannot see).

Few queries (decoding, ``Nq <= 16``) split the key range (pass 1) or the tile list (pass 2) over
several programs, flash-decoding style; a kernel (``split_combine``) combines the partials. With
grouped-query attention the query heads of a kv head run as the rows of one tile
(``_packed_groups``), so the key cache is read once per kv head, not once per query head. The fast
mode's pooled keys can be kept between decoding calls (``key_summary.KeySummary``), so that a call
does not pool the whole key cache again.

A call's launches are recorded once per input signature and replayed (``_plan.py``); on Hopper the
kernels after a call's first start while the one before them finishes (``kernels/pdl.py``).

The PyTorch reference (``reference_pruned``) materializes the scores chunk by chunk over the queries,
runs on any device and in float64, and is the ground truth of the tests.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch

from ._inputs import AttentionInputs, batch_rows, check_inputs, finite_number, score_masks
from . import _plan
from ._plan import PLAIN, Workspace, clear_plans, inputs_signature
from ._launch import (LOG2E, _block, _Config, _input_precision, _mask_args, _on_device, _unit_stride,
                      batch_slices, cdiv, early_launch, interpreting, next_pow2, tma_operands)
from .functional import attention_with_lse, resolve_backend
from .key_summary import KeySummary, _pool_keys
from .reference import chunk_rows, dense_operands, full_precision, masked_scores, masked_softmax

MODES = ("exact", "fast")
#: The fast predictor visits a tile when its estimated share of some pooled row's mass is at least
#: ``tau * FAST_SLACK``: with 1, the analogue of the exact rule (a tile whose mass is below tau cannot
#: hold an entry >= tau). Lower it to visit more tiles (the pooled estimate, exp of a mean score,
#: underestimates a tile's mass when its scores are spread).
FAST_SLACK = 1.0
#: Query rows sampled (against every key) for the fast predictor's vertical-stripe estimate, and the
#: shortest query sequence that gets it (below, the sample would cost more than ~5% of the QK work).
VERT_SAMPLES = 64
VERT_MIN_NQ = 1024
#: Grouped-query decoding packs the query heads of a kv group into one tile up to this many queries.
PACK_MAX_NQ = 16
#: Tile of the stats on the reference path when no block is given (the GPU prefill tile).
REFERENCE_BLOCK = (128, 64)


def _config(nq: int, d: int, dv: int) -> _Config:
    """Tiles of the Triton path; they are also the tiles of ``tile_sparsity``."""
    if interpreting():
        return _Config(16, 16, 1, 1)
    width = max(_block(d), _block(dv))
    block_m = 16 if nq <= 16 else 64 if nq <= 64 else 128
    if width > 128:
        return _Config(min(block_m, 64), 32, 4, 2)
    warps = 8 if (block_m == 128 and width > 64) else 4
    return _Config(block_m, 64, warps, 3)


def _chunk() -> int:
    """Key blocks per step of the kernels' loops over key blocks and key-block lists (64; 16 under
    the interpreter, whose small test shapes then still take several steps)."""
    return 16 if interpreting() else 64


def _bound_chunk(nkb: int) -> int:
    """Listed key blocks per step of the fast sweep's pooled lse bound (``_pooled_lse_bound``): 32
    up to 128 key blocks (8k keys), else ``_chunk()`` (``benchmarks/tune_pruned.py --bound-chunk``,
    H200, graphed: 8k D128 s 0.95 0.179 -> 0.172 ms, 8k D64 s 0.8 0.405 -> 0.393; 16k within
    +-0.2 %; 64 ahead from 32k, 32k D128 s 0.9 2.258 against 2.293, 64k D128 s 0.95 4.662 against
    4.741; 16 blocks: 8k D128 s 0.95 0.169, but 1.4-1.5x slower at D = 64)."""
    return 32 if nkb <= 128 and not interpreting() else _chunk()


#: Keys up to which the D <= 64 sweep takes 64-row programs (``_sweep_config``).
SMALL_SWEEP_MAX_NK = 16384


def _sweep_config(cfg: _Config, d: int, dv: int, nk: int) -> _Config:
    """Rows, warps and stages of the ``pruned_attn`` programs: its key tiles are ``cfg``'s and its rows
    divide ``cfg.block_m``, the query blocks of the tile lists. 128-row blocks at D = 128 are swept by
    two programs of 64 rows (4 warps, 2 stages), two of which fit on a multiprocessor, so that one's
    start and end (the pooled bound, the first tile, the store) overlap the other's tiles (H100,
    fast mode against 128 rows, 8 warps, 3 stages: 64k s 0.9 9.20 -> 8.88 ms, 16k s 0.9
    0.81 -> 0.70). At D <= 64 one program of 128 rows, 8 warps and 2 stages sweeps the block (H200,
    ``benchmarks/tune_pruned.py``, fast mode, 64k: s 0.8 20.5 -> 18.7 ms, s 0.9 10.3 -> 10.1, against
    64 x 4 warps x 2 stages; 3 stages: 27.4 and 14.5 ms; H100, 128 rows x 4 warps x 3 stages: s 0.9
    11.5 ms). The exact mode shares the shape: 2-4 % faster at 64k, within +-2 % at 16k. Its programs
    may use at most 128 registers per thread, so that two of them (8 warps each) fit in a
    multiprocessor's 65536: Triton 3.6's ptxas takes 128 by itself, Triton 3.8's 129, which would
    leave room for one (``python benchmarks/ttgir_pruned.py --d 64``, compiled for sm_90 on the CPU;
    with the cap 126 and 128, no spills). On the H200 with Triton 3.6 the cap changes nothing
    (same-process A/B, graphed: 0.98x-1.01x, outputs bitwise equal).
    Up to ``SMALL_SWEEP_MAX_NK`` keys (``nk``), where the tile lists are short and each program's
    start weighs more, D <= 64 takes two programs of 64 rows, 4 warps, 2 stages and at most 128
    registers instead: four fit on a multiprocessor (H200, ``tune_pruned.py --occupancy``, graphed,
    alternating: fast 8k s 0.8 / 0.95 0.383 -> 0.361 / 0.167 -> 0.159 ms, 16k 1.286 -> 1.231 /
    0.488 -> 0.464, exact 8k s 0.8 1.139 -> 1.115, 16k s 0.9 3.854 -> 3.813; from 32k the fast mode
    is 0.98x-1.004x as fast: 32k s 0.8 4.727 -> 4.834, s 0.9 2.587 -> 2.576, 64k s 0.9 9.654 -> 9.853)."""
    if cfg.block_m <= 64:
        return cfg
    if max(_block(d), _block(dv)) <= 64:
        if nk <= SMALL_SWEEP_MAX_NK:
            return _Config(64, cfg.block_n, 4, 2, maxnreg=128)
        return _Config(cfg.block_m, cfg.block_n, 8, 2, maxnreg=128)
    return _Config(64, cfg.block_n, 4, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (4 off CUDA), cached: the query costs ~10 us per call."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _num_splits(programs: int, nkb: int, device, min_blocks: int = 4) -> int:
    """Splits of the key range (or tile list) when fewer programs than multiprocessors: up to ~8
    programs per multiprocessor, at least ``min_blocks`` key blocks each, at most 64 splits. Few
    query rows make each key block's step short and latency-bound, so the many short programs keep
    more loads in flight (one query of 32 heads against 128k keys, H100: pass 1 took 0.36 ms with
    ~2 programs per multiprocessor, the key cache read alone 0.09 ms)."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(cdiv(8 * sms, programs), nkb // min_blocks, 64))


def _key_splits(programs: int, nkb: int, device, splits: int | None = None) -> tuple[int, int]:
    """``(splits, key blocks per split)`` of a key-range split (``splits`` forced, or from
    ``_num_splits``), with no empty split."""
    if splits is None:
        splits = _num_splits(programs, nkb, device)
    kb_per = cdiv(nkb, splits)
    return cdiv(nkb, kb_per), kb_per


def _predict_config(nqb: int, bh: int, device) -> tuple[int, int, int, int]:
    """``(QB, CHUNK, num_warps, num_stages)`` of the predictor's programs: up to 4 query blocks per
    program share each load of the pooled keys (64 pooled rows: one tensor-core tile), fewer where
    the grid would have fewer programs than the GPU has multiprocessors; ``_chunk()`` key blocks per
    step, 4 warps, 3 stages (``benchmarks/tune_pruned.py --predict``, H200, fast mode, 64k D128
    s 0.95: 4.67 ms against 4.73-4.97 for 2 or 8 query blocks, 8 warps, 2 or 4 stages; 32 or 128 key
    blocks per step: 4.76-4.84 against 4.70 in a second run; within +-3 % of the best at 16k-64k,
    D = 64 and 128. ``--predict --small``, graphed: at 8k D128, 256 programs of 4 query blocks
    against 512 of 2, s 0.8 0.327 against 0.337 ms, s 0.95 0.151 against 0.162)."""
    qb = 4
    while qb > 1 and cdiv(nqb, qb) * bh < _sm_count(device):
        qb //= 2
    return qb, _chunk(), 4, 3


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


#: The keys of the stats dict, in the row order of the ``pruned_fwd`` op's stats tensor.
STAT_NAMES = ("entry_sparsity", "tile_sparsity", "pruned_mass")


def _stats(unmasked, kept, mass_pruned, rows_live, tiles_live, tiles_visited) -> dict:
    """Per-(batch, head) totals -> the per-head stats dict (float32 ``[H]``, mean over batch)."""
    def ratio(num, den):
        den = den.to(torch.float64)
        return torch.where(den > 0, num.to(torch.float64) / den.clamp_min(1), torch.zeros_like(den))

    entry = ratio(unmasked - kept, unmasked)
    tile = ratio(tiles_live - tiles_visited, tiles_live).clamp_min(0)
    mass = ratio(mass_pruned, rows_live)
    return dict(zip(STAT_NAMES, (r.mean(0).float() for r in (entry, tile, mass))))


def _zero_stats(H: int, device) -> dict:
    return {name: torch.zeros(H, dtype=torch.float32, device=device) for name in STAT_NAMES}


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


@full_precision
def reference_pruned(inp: AttentionInputs, tau: float, *, block=REFERENCE_BLOCK, stats: bool = False,
                     chunk_size: int | None = None):
    """MATH.md section 5 evaluated densely, chunk by chunk over the queries.

    Half-precision inputs are computed in float32, float64 in float64. ``block`` = (BLOCK_M,
    BLOCK_N) is the tile grid of ``tile_sparsity`` (the exact kernel's skip test: a tile is visited
    iff it has an unmasked entry and its maximum score reaches ``min_i thr_i`` over its rows).

    Returns ``out [B, H, Nq, Dv]`` in q's dtype, or ``(out, stats)``.
    """
    q = inp.q
    B, H, Nq, _ = q.shape
    Nk = inp.k.shape[2]
    qc, kc, vc = dense_operands(inp)
    cdt = qc.dtype
    bm, bn = block
    log_tau = math.log(tau) if tau > 0 else -math.inf
    if chunk_size is None:
        chunk_size = chunk_rows(B, H, Nk)
    chunk_size = cdiv(chunk_size, bm) * bm
    nkb = cdiv(Nk, bn)
    dev = q.device
    zeros = lambda dt=torch.int64: torch.zeros(B, H, dtype=dt, device=dev)  # noqa: E731
    unmasked, kept, rows_live, tiles_live, tiles_visited = zeros(), zeros(), zeros(), zeros(), zeros()
    mass_pruned = zeros(torch.float64)
    outs = []
    for r0 in range(0, Nq, chunk_size):
        rows = slice(r0, min(r0 + chunk_size, Nq))
        s = masked_scores(inp.scale * (qc[:, :, rows] @ kc.transpose(-1, -2)), *score_masks(inp, rows, dtype=cdt))
        valid = s != float("-inf")  # a NaN score is seen: its row is NaN
        empty = ~valid.any(-1)
        p, _, lse = masked_softmax(s)
        thr = torch.minimum(lse + log_tau, s.amax(-1))  # -inf on empty rows, which keep nothing
        keep = valid & (s >= thr[..., None])
        pk = p * keep
        mass = pk.sum(-1)
        a = pk / torch.where(empty, 1.0, mass)[..., None]
        outs.append(a @ vc)
        if not stats:
            continue
        unmasked += valid.sum((-1, -2))
        kept += keep.sum((-1, -2))
        rows_live += (~empty).sum(-1)
        mass_pruned += torch.where(empty, 0.0, 1.0 - mass).sum(-1).to(torch.float64)
        n = s.shape[2]
        nrb = cdiv(n, bm)
        sp = torch.full((B, H, nrb * bm, nkb * bn), float("-inf"), dtype=cdt, device=dev)
        sp[:, :, :n, :Nk] = s.masked_fill(~valid, float("-inf"))
        tmax = sp.view(B, H, nrb, bm, nkb, bn).amax((3, 5))
        thr_p = torch.full((B, H, nrb * bm), float("inf"), dtype=cdt, device=dev)
        thr_p[:, :, :n] = torch.where(empty, float("inf"), thr)
        thr_min = thr_p.view(B, H, nrb, bm).amin(-1)
        live = tmax > float("-inf")
        tiles_live += live.sum((-1, -2))
        tiles_visited += (live & (tmax >= thr_min[..., None])).sum((-1, -2))
    out = torch.cat(outs, dim=2).to(q.dtype)
    if not stats:
        return out
    return out, _stats(unmasked, kept, mass_pruned, rows_live, tiles_live, tiles_visited)


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


def _kv_operands(block_n: int, plain: bool, *operands) -> tuple[list, bool]:
    """``(args, tma)``: the K and V arguments of a pruned kernel, given as ``(tensor, block columns)``.
    The exact mode's kernels over whole key ranges load them through tensor descriptors where the
    copy engine can (``tma_operands``); ``plain``: split key ranges (decoding) and the fast sweep
    keep plain loads. H200, same machine, A/B in benchmarks/RESULTS.md: the exact mode 1-5 %
    faster at 8k-64k with the copy engine, but decoding (short split programs) 14-35 % slower and
    the fast sweep 12-29 % slower."""
    if plain:
        return [t for t, _ in operands], False
    return tma_operands(block_n, *operands)


def _exact_first_pass(inp, q, k, cfg, nqb, nkb, stats, splits, mask_args, kpm_args, ws: Workspace = PLAIN):
    """Pass 1: ``(tile_max [BH, NQB, NKB], mpart [S, BH, Nq], lpart [S, BH, Nq], unmasked [BH, Nq] or
    None)``, the partial row max and sum (base 2) of each of the S key-range splits."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    BH = B * H
    dev = q.device
    (mask, *mstr, mkind), (kpm, *pstr, pkind) = mask_args, kpm_args
    splits, kb_per = _key_splits(nqb * BH, nkb, dev, splits)
    tile_max = ws.full((BH, nqb, nkb), float("-inf"), torch.float32, dev)
    mpart = ws.empty((splits, BH, Nq), torch.float32, dev)
    lpart = ws.empty((splits, BH, Nq), torch.float32, dev)
    cnt = ws.empty((splits, BH, Nq) if stats else (1,), torch.int32, dev)
    from .kernels.pruned import pruned_scores

    (k_arg,), tma = _kv_operands(cfg.block_n, splits > 1, (k, _block(D)))
    ws.launch(pruned_scores, (nqb, BH, splits),
        q, k_arg, tile_max, mpart, lpart, cnt, mask, kpm,
        *q.stride(), *k.stride(), *mstr, *pstr,
        H, inp.groups, Nq, Nk, nqb, nkb, kb_per, inp.scale * LOG2E,
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block(D),
        CAUSAL=inp.causal, MASK_KIND=mkind, KPM_KIND=pkind,
        STATS=stats, TMA=tma, PRECISION=_input_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    unmasked = cnt.sum(0) if stats else None
    return tile_max, mpart, lpart, unmasked


def _select(tile_max, mpart, lpart, tau, cfg, nqb, nkb, Nq, ws: Workspace = PLAIN):
    """The skip test (kernel ``pruned_select``): ``(idx [BH, NQB, NKB], count [BH, NQB],
    nvalid [BH, NQB], lse2 [BH, Nq], thr [BH, Nq])``; lse2 and thr are base 2, +inf on empty rows."""
    BH = tile_max.shape[0]
    dev = tile_max.device
    idx = ws.empty((BH, nqb, nkb), torch.int32, dev)
    count = ws.empty((BH, nqb), torch.int32, dev)
    nvalid = ws.empty((BH, nqb), torch.int32, dev)
    lse2 = ws.empty((BH, Nq), torch.float32, dev)
    thr = ws.empty((BH, Nq), torch.float32, dev)
    from .kernels.pruned import pruned_select

    chunk = min(256, max(16, next_pow2(nkb)))
    ws.launch(pruned_select, (nqb, BH), tile_max, mpart, lpart, lse2, thr, idx, count, nvalid, Nq, nqb, nkb,
                             mpart.shape[0], math.log2(tau), BLOCK_M=cfg.block_m, CHUNK=chunk, chained=True)
    return idx, count, nvalid, lse2, thr


def _vertical(inp, q, k, cfg, nkb, masks, log2_thr: float, ws: Workspace = PLAIN, local: bool = False):
    """``(vert, vert_local, keeper, (miss, iota))``. ``vert`` ``[B*H, NKB]`` float32: log2 of the largest
    softmax weight that ``VERT_SAMPLES`` query rows, evenly spaced (row ``round(r (Nq - 1) /
    (VERT_SAMPLES - 1))``), give to a key of each key block (exact weights of those rows over all
    keys, all masks applied; -inf where none of them sees a key of the block). With ``local`` (the
    predictor's local windows), ``vert_local`` (the same shape) is the same over the rows whose window
    holds the block (the evidence of local attention, ``vertical_combine``); else None. ``keeper``
    ``[B*H, NKB]`` int32: the query row of the only sampled row that keeps an entry of the block
    (weight >= ``2^log2_thr``), else -1; ``miss`` ``[B*H, 2]`` int32, set to (Nq, -1), where
    ``pruned_predict`` records the sampled rows its pooled lists miss; ``iota`` ``[NKB]`` int32, every
    key block (the list that ``pruned_attn`` sweeps in heads with misses). None for short query
    sequences (``Nq < VERT_MIN_NQ``), where the sample would cost too much. ``masks``:
    ``_mask_args(inp)``. Kernels ``vertical_sample`` (the key blocks split over programs; 4 warps, 2
    stages: H200, graphed, against the prefill tiles' 8 warps and 3 stages at D = 128: 64k 98.6 ->
    92.9 us, 8k 27.0 -> 23.6; at D = 64, against 4 warps and 3 stages: 64k 100.9 -> 99.4, 8k 25.4 ->
    23.9; 2 warps: 1.1-1.6x slower) and ``vertical_combine``."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if Nq < VERT_MIN_NQ:
        return None
    BH = B * H
    dev = q.device
    block_s = max(16, next_pow2(VERT_SAMPLES))
    splits, kb_per = _key_splits(BH, nkb, dev)
    block_max = ws.empty((BH, nkb, block_s), torch.float32, dev)
    mpart = ws.empty((splits, BH, block_s), torch.float32, dev)
    lpart = ws.empty((splits, BH, block_s), torch.float32, dev)
    vert = ws.empty((BH, nkb), torch.float32, dev)
    vert_local = ws.empty((BH, nkb), torch.float32, dev) if local else None
    keeper = ws.empty((BH, nkb), torch.int32, dev)
    miss = ws.empty((BH, 2), torch.int32, dev)
    iota = ws.empty((nkb,), torch.int32, dev)
    (mask, *mstr, mkind), (kpm, *pstr, pkind) = masks
    from .kernels.pruned_pool import vertical_combine, vertical_sample

    ws.launch(vertical_sample, (BH, splits),
        q, k, block_max, mpart, lpart, mask, kpm,
        *q.stride(), *k.stride(), *mstr, *pstr,
        H, inp.groups, Nq, Nk, nkb, kb_per, VERT_SAMPLES, inp.scale * LOG2E,
        D=D, BLOCK_S=block_s, BLOCK_N=cfg.block_n, BLOCK_D=_block(D),
        CAUSAL=inp.causal, MASK_KIND=mkind, KPM_KIND=pkind, PRECISION=_input_precision(q.dtype),
        num_warps=4, num_stages=2, chained=True,
    )
    chunk = _chunk()
    ws.launch(vertical_combine, (BH, cdiv(nkb, chunk)), block_max, mpart, lpart, vert,
              vert if vert_local is None else vert_local, keeper, miss, iota, Nq, Nk, nkb, splits, VERT_SAMPLES,
              log2_thr,
              BLOCK_S=block_s, BLOCK_N=cfg.block_n, CHUNK=chunk, LOCAL=local, chained=True)
    return vert, vert_local, keeper, (miss, iota)


def _mask_tiles(mask_args, B, H, Nq, Nk, cfg, nqb, nkb, ws: Workspace = PLAIN):
    """``(tiles, strides)``: an ``attn_mask`` (``_mask_args``' first) per tile of the lists (kernel
    ``mask_tiles``): -inf where it hides the whole tile, +inf where it hides part of it, else the
    largest base-2 score bias it gives an entry there; ``[B or 1, H or 1, NQB, NKB]`` float32, one
    row per batch entry or head only where the mask differs between them, and the strides the
    predictor indexes it by (0 along a broadcast dim). Reads the whole mask once (at 16k tokens a
    boolean ``[N, N]`` mask is 256 MiB)."""
    from .kernels.pruned_pool import mask_tiles

    mask, smb, smh, smm, smn, kind = mask_args
    bm, hm = (B if smb else 1), (H if smh else 1)
    tiles = ws.empty((bm, hm, nqb, nkb), torch.float32, mask.device)
    strides = (tiles.stride(0) if bm > 1 else 0, tiles.stride(1) if hm > 1 else 0, tiles.stride(2))
    kb_per = 16
    ws.launch(mask_tiles, (nqb, cdiv(nkb, kb_per), bm * hm), mask, tiles, smb, smh, smm, smn, *strides,
              hm, Nq, Nk, nkb, kb_per, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_KIND=kind, chained=True)
    return tiles, strides


def _predict(inp, q, k, cfg, nqb, nkb, log2_thr: float, masks, chunk: int | None = None, ws: Workspace = PLAIN,
             pooled: tuple | None = None, local: bool | None = None):
    """The fast mode's tile lists: the pooled keys (``pooled``, a ``KeySummary``'s, or
    ``_pool_keys``), the vertical estimate (``_vertical``) and the kernel ``pruned_predict`` on
    ``q [B, H, Nq, D]`` (unit stride), at the threshold ``log2_thr = log2 (tau * slack)``, with the
    masks ``masks = _mask_args(inp)``, ``chunk`` key blocks per step (by default
    ``_predict_config``'s; an ``attn_mask`` enters through ``_mask_tiles``). ``local`` (by default
    ``inp.causal``): also list each query block's local window, the key blocks of its rows' ``LOCAL_KEYS`` most recent keys, in the heads whose sampled
    rows keep an entry in theirs, or in every head without a sample (``pruned_predict``; packed
    grouped-query decoding passes it for the one causal query whose mask packing drops). Returns
    ``(idx [B*H, NQB, NKB] int32 (first ``count`` entries valid), count [B*H, NQB] int32, (kp, ko,
    kbias, kobias), check)``: the pooled keys for the sweep's lse bound, and with the vertical sample
    ``(miss, iota)`` (``_vertical``: the smallest and largest sampled row that the pooled lists miss,
    per head; ``pruned_attn`` sweeps every tile of a head where they differ), else None."""
    B, H, Nq, D = q.shape
    BH = B * H
    dev = q.device
    local = inp.causal if local is None else local
    kp, ko, kbias, kobias = pooled or _pool_keys(k, masks[1], cfg.block_n, nkb, ws)
    tiles, tile_strides = None, (0,) * 3
    if masks[0][-1]:  # an attn_mask
        tiles, tile_strides = _mask_tiles(masks[0], B, H, Nq, k.shape[2], cfg, nqb, nkb, ws)
    vert, vert_local, keeper, check = _vertical(inp, q, k, cfg, nkb, masks, log2_thr, ws, local) or (None,) * 4
    idx = ws.empty((BH, nqb, nkb), torch.int32, dev)
    count = ws.empty((BH, nqb), torch.int32, dev)
    from .kernels.pruned import POOL_ROWS, pruned_predict

    qb, default_chunk, warps, stages = _predict_config(nqb, BH, dev)
    chunk = chunk or default_chunk
    share = ws.empty((BH, nqb, nkb), torch.float32, dev)
    lse_run = ws.empty((BH, cdiv(nkb, chunk), nqb * POOL_ROWS.value), torch.float32, dev)
    ws.launch(pruned_predict, (cdiv(nqb, qb), BH),
        q, kp, ko, kbias, kobias, vert if vert is not None else kbias,
        vert_local if vert_local is not None else kbias, keeper if keeper is not None else count,
        count if check is None else check[0], share, lse_run, idx, count, tiles if tiles is not None else kbias,
        *q.stride(), *kp.stride(), kbias.stride(0) if kbias.shape[0] > 1 else 0, kbias.stride(1), *tile_strides,
        H, inp.groups, Nq, k.shape[2], nqb, nkb, inp.scale * LOG2E, log2_thr,
        D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block(D), QB=qb, CHUNK=chunk,
        CAUSAL=inp.causal, LOCAL=local, VERT=vert is not None, MASK_TILES=tiles is not None,
        PRECISION=_input_precision(q.dtype), num_warps=warps, num_stages=stages, chained=True,
    )
    return idx, count, (kp, ko, kbias, kobias), check


def _combine(opart, mpart, lpart, lall, dtype, log2_tau: float, exact: bool, stats: bool, ws: Workspace = PLAIN):
    """The split programs' partials (``pruned_attn`` with ``SPLIT``) folded into ``(out [B*H, Nq, Dv]
    in dtype, the split weights [S, B*H, Nq] float32 or None)`` by the kernel ``split_combine`` (the
    weights: fast mode with ``stats`` only; 0 for a split dropped as holding no kept entry)."""
    S, BH, Nq, Dv = opart.shape
    weights = stats and not exact
    out = ws.empty((BH, Nq, Dv), dtype, opart.device)
    w = ws.empty(lpart.shape, lpart.dtype, lpart.device) if weights else lpart  # a placeholder where not written
    from .kernels.pruned import split_combine

    block_r = 16
    ws.launch(split_combine, (cdiv(Nq, block_r), BH), opart, mpart, lpart, lall, out, w, Nq, S, log2_tau,
           DV=Dv, BLOCK_R=block_r, BLOCK_DV=_block(Dv), EXACT=exact, STATS=weights, chained=True)
    return out, (w if weights else None)


def _packed_groups(inp: AttentionInputs) -> int:
    """Query heads per tile: ``groups`` for grouped-query decoding (``Nq <= PACK_MAX_NQ``, no
    ``attn_mask``, causal only with one query, where it masks nothing), else 1. The ``G`` query
    heads of a kv head then run as ``G * Nq`` rows of one head, so each key and value tile is read
    once per group instead of once per query head."""
    nq = inp.q.shape[2]
    if inp.groups == 1 or nq > PACK_MAX_NQ or inp.attn_mask is not None or (inp.causal and nq > 1):
        return 1
    return inp.groups


def pruned_triton(inp: AttentionInputs, tau: float, mode: str = "exact", *, stats: bool = False,
                  splits: int | None = None, slack: float = FAST_SLACK, pooled: tuple | None = None):
    """The Triton path on checked inputs with ``tau > 0``. ``splits`` forces the number of
    programs per query block (decoding); None picks it from the shapes. ``pooled``: the fast mode's
    pooled keys ``(kp, ko, kbias, kobias)`` (a ``KeySummary``'s), else pooled here.

    Without ``stats`` the call is recorded as a launch plan (``_plan.py``) on the second call with
    its signature and replayed on later ones, which skips most of its host time. A batch of more
    than ``GRID_ROWS`` (batch, head) rows runs in slices (``batch_slices``), one call each."""
    B, H, Nq_in = inp.q.shape[:3]
    parts = batch_slices(B, H)
    if len(parts) > 1:
        return _pruned_in_slices(inp, parts, tau, mode, stats, splits, slack, pooled)
    local = inp.causal  # the fast predictor's local window, also where packing drops the causal mask
    pack = _packed_groups(inp)
    if pack > 1:  # rows (g, i) of kv head hk: query head hk * pack + g, query i
        inp = replace(inp, q=inp.q.reshape(B, H // pack, pack * Nq_in, inp.q.shape[3]), causal=False)
    q, k, v = (_unit_stride(t) for t in (inp.q, inp.k, inp.v))
    mask_args, kpm_args = _mask_args(inp)
    inputs = (q, k, v, mask_args[0], kpm_args[0], *(pooled or ()))
    signature = None
    if not stats:
        signature = (mode, tau, slack, splits, local, pack, inp.scale, _input_precision(q.dtype), q.device,
                     mask_args[-1], kpm_args[-1], *inputs_signature(inputs))
    shape = (B, H, Nq_in, v.shape[3])
    with _on_device(q):
        plan, record = _plan.lookup(signature) if signature is not None else (None, False)
        if plan is not None:
            return plan.run(inputs, q.device).view(shape)
        ws = Workspace(inputs if record else None, early=early_launch(q.device))
        out, st = _pruned_launches(inp, q, k, v, mask_args, kpm_args, tau, mode, stats, splits, slack, pack, local,
                                   pooled, ws)
    if record:
        _plan.store(signature, ws.plan(out))
    out = out.view(shape)
    return (out, st) if stats else out


def _pruned_in_slices(inp: AttentionInputs, parts: tuple, tau, mode, stats, splits, slack, pooled):
    """``pruned_triton`` on the batch slices ``parts``, one call each: their outputs concatenated and
    their stats (means over each slice's batch entries) averaged, weighted by the slices' sizes."""
    B = inp.q.shape[0]
    results = []
    for rows in parts:
        # A pooled padding bias has one row per batch entry, or one row for all (no padding mask).
        part_pooled = pooled and tuple(batch_rows(t, rows) if t.shape[0] == B else t for t in pooled)
        results.append(pruned_triton(inp.batch(rows), tau, mode, stats=stats, splits=splits, slack=slack,
                                     pooled=part_pooled))
    if not stats:
        return torch.cat(results)
    out = torch.cat([o for o, _ in results])
    sizes = [rows.stop - rows.start for rows in parts]
    st = {name: sum(n * part[name] for n, (_, part) in zip(sizes, results)) / B for name in STAT_NAMES}
    return out, st


def _pruned_launches(inp, q, k, v, mask_args, kpm_args, tau, mode, stats, splits, slack, pack, local, pooled,
                     ws: Workspace):
    """``pruned_triton``'s allocations and launches, through ``ws``, on the prepared inputs (q packed
    for grouped-query decoding, unit last strides; ``local``: the fast predictor's local windows, see
    ``_predict``). Returns ``(out [B, Hq, Nq, Dv] or [B*Hq, Nq, Dv], stats dict or None)``."""
    B, Hq, Nq, D = q.shape
    H, Nq_in = Hq * pack, Nq // pack
    Nk, Dv = k.shape[2], v.shape[3]
    BH = B * Hq
    dev = q.device
    cfg = _config(Nq, D, Dv)
    nqb, nkb = cdiv(Nq, cfg.block_m), cdiv(Nk, cfg.block_n)
    (mask, *mstr, mkind), (kpm, *pstr, pkind) = mask_args, kpm_args
    exact = mode == "exact"
    chunk = _bound_chunk(nkb)
    from .kernels.pruned import pruned_attn

    lse2 = thr = check = None
    if exact or stats:
        tile_max, mpart1, lpart1, unmasked = _exact_first_pass(
            inp, q, k, cfg, nqb, nkb, stats, splits, mask_args, kpm_args, ws)
        idx, count, nvalid, lse2, thr = _select(tile_max, mpart1, lpart1, tau, cfg, nqb, nkb, Nq, ws)
    if not exact:
        idx, count, (kp, ko, kbias, kobias), check = _predict(inp, q, k, cfg, nqb, nkb, math.log2(tau * slack),
                                                             (mask_args, kpm_args), ws=ws, pooled=pooled, local=local)
    # Splitting the fast mode needs every row covered by the predictor (no in-kernel fallback).
    can_split = exact or (inp.attn_mask is None and not (inp.causal and inp.key_padding_mask is not None))
    if splits is None:
        n_split = _num_splits(nqb * BH, nkb, dev) if can_split else 1
    else:
        n_split = splits if can_split else 1
    split = n_split > 1
    f32 = (torch.float32, dev)
    lpart = ws.empty((n_split, BH, Nq), *f32)
    # Pointers a configuration neither reads nor writes get a placeholder of the right type.
    out = ws.empty((B, Hq, Nq, Dv), q.dtype, dev) if not split else q
    opart = ws.empty((n_split, BH, Nq, Dv), *f32) if split else lpart
    mpart = ws.empty((n_split, BH, Nq), *f32) if split else lpart
    lall = ws.empty((n_split, BH, Nq), *f32) if split and not exact else lpart
    kept = ws.empty((n_split, BH, Nq), *f32) if stats else lpart
    kcnt = ws.empty((n_split, BH, Nq), torch.int32, dev) if stats else count
    bound = not exact and inp.attn_mask is None
    if exact:
        kp, ko, kbias, kobias = q, q, lpart, lpart
    kp_str = kp.stride() if not exact else (0, 0, 0, 0)
    kb_str = (kbias.stride(0) if kbias.shape[0] > 1 else 0, kbias.stride(-1)) if not exact else (0, 0)
    masked = inp.causal or mkind != 0 or pkind != 0 or Nk % cfg.block_n != 0
    fallback = not exact and not split  # the fast sweep recomputes lost rows itself (no split combine)
    # The fixed reference's weights (2^-32 down to 2^-126, and up to 2^64 before the fallback) do not
    # fit float16, in which the weights meet v in the tensor cores: float16 rows take the running max.
    fixed = fallback and tau < 1 and q.dtype != torch.float16
    sweep = _sweep_config(cfg, D, Dv, Nk)
    (k_arg, v_arg), tma = _kv_operands(cfg.block_n, split or not exact, (k, _block(D)), (v, _block(Dv)))
    ws.launch(pruned_attn, (cdiv(Nq, sweep.block_m), BH, n_split),
        q, k_arg, v_arg, out, idx, count, *(check or (count, count)),
        thr if thr is not None else lpart, lse2 if lse2 is not None else lpart,
        opart, mpart, lpart, lall, kept, kcnt, mask, kpm, kp, ko, kbias, kobias,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr, *pstr, *kp_str, *kb_str,
        Hq, inp.groups, Nq, Nk, nqb, nkb, inp.scale * LOG2E, tau,
        D=D, DV=Dv, LIST_M=cfg.block_m, BLOCK_M=sweep.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block(D),
        BLOCK_DV=_block(Dv), CAUSAL=inp.causal, MASK_KIND=mkind, KPM_KIND=pkind, MASKED=masked,
        EXACT=exact, FIXED=fixed, SPLIT=split, FALLBACK=fallback, STATS=stats,
        LSE_BOUND=bound, CHECK=check is not None, CHUNK=chunk, TMA=tma, PRECISION=_input_precision(q.dtype),
        num_warps=sweep.num_warps, num_stages=sweep.num_stages, maxnreg=sweep.maxnreg, chained=True,
    )
    if split:
        out, wsplit = _combine(opart, mpart, lpart, lall, q.dtype, math.log2(tau), exact, stats, ws)
    if not stats:
        return out, None
    live = torch.isfinite(lse2)
    if exact:
        kept_mass, kept_cnt = lpart.sum(0), kcnt.sum(0)
    elif split:  # the dropped splits keep nothing
        kept_mass, kept_cnt = (kept * (wsplit > 0)).sum(0), (kcnt * (wsplit > 0)).sum(0)
    else:
        kept_mass, kept_cnt = kept[0], kcnt[0]

    def per_head(rows):  # [B*Hq, Nq] per row -> [B, H] sums
        return rows.reshape(B, H, Nq_in).sum(-1)

    def per_group(blocks):  # [B*Hq, NQB] per query block -> [B, H] sums (a group's packed heads share them)
        return blocks.view(B, Hq, nqb).sum(-1).repeat_interleave(pack, 1)

    st = _stats(
        per_head(unmasked).to(torch.int64),
        per_head(kept_cnt).to(torch.int64),
        per_head(torch.where(live, 1.0 - kept_mass, 0.0)).to(torch.float64),
        per_head(live),
        per_group(nvalid),
        per_group(count if check is None else torch.where((check[0][:, 0] < check[0][:, 1])[:, None], nvalid, count)),
    )
    return out, st


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def pruned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float = 0.01,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    mode: str = "exact",
    return_stats: bool = False,
    backend: str = "auto",
    fast_slack: float = FAST_SLACK,
    key_summary: KeySummary | None = None,
):
    """Attention with every weight below ``tau`` pruned and each row renormalized over what is kept
    (shared MATH.md section 5): ``A_ij = P_ij [P_ij >= tau] / sum_l P_il [P_il >= tau]``, where each
    row's maximum entry is always kept (so ``tau > 1`` keeps only the row maxima, and no row with an
    unmasked key is ever empty). ``tau = 0`` is dense attention (it runs the dense kernel).

    Inference only: it is not differentiable. It runs under ``torch.no_grad()`` and its outputs
    never require grad, so it can be called in ``eval()`` on parameters that require grad, but it
    gives no gradient (train with ``entropy_attention``). Under ``torch.compile`` the Triton path
    runs as the ``torch.library`` op ``torch.ops.entropy_attn.pruned_fwd``, so a call (or a model
    whose ``EntropyAttention`` layers run in eval with ``tau > 0``) is traced without a graph break;
    called eagerly it launches the same kernels directly, without the op's dispatch (host time).
    Either way a call without stats records its launches on the second call with its input
    signature (shapes, strides, dtypes and alignment of the tensors, the options) and replays them
    on later ones (``entropy_attn._plan``; ``pruned.clear_plans()`` forgets them).

    Args:
        q, k, v, causal, scale, attn_mask, key_padding_mask: as in ``entropy_attention`` (same
            layouts, masks and grouped-query rules; checked by ``check_inputs``).
        tau: pruning threshold on the attention weights, finite and >= 0 (default 0.01).
        mode: ``'exact'``: the definition, exactly (up to floating point): a scores-only first pass
            computes lse, the row maxima and the per-tile score maxima, then only the tiles that can
            hold a kept entry are loaded and multiplied. On the Triton path an entry within ``1e-6
            (1 + |m|)`` of its row's maximum ``m`` (base-2 scores) counts as a tie of the maximum
            and is kept, so that the recomputed maximum is never lost. ``'fast'``: no full first
            pass: the tiles are predicted from pooled queries and keys (a tile is visited when its
            estimated share of a pooled row's mass is at least ``tau * fast_slack``, and the best
            tile of each pooled row always is; its one-sweep listing may add a few more) and entries
            are pruned within them against a running lower bound of lse. It misses the mass of tiles
            it does not visit and may keep entries the exact mode prunes; it never returns NaN from
            finite inputs and never empties a row that has an unmasked key. It pays off for long
            prefill on attention with block structure (sinks, vertical stripes, clustered keys; from
            32k tokens 8-16x the dense kernel at tile sparsity 0.9-0.95, while at 8k-16k the host's
            work per call bounds it unless it is replayed from a CUDA graph; max |fast - exact|
            0.05-0.1 on sink-key inputs; the README's "Measured" section and benchmarks/RESULTS.md
            give the numbers). With ``causal=True`` it also visits the key blocks of each row's 128
            most recent keys (local attention, which pooling smears) in the heads whose sampled rows
            attend there (every head below 1024 queries). From 1024 queries it checks its lists
            against 64 sampled rows: a head where two of them or more keep a key block (that no
            other sampled row keeps) which their query block lists only for the sample is swept
            whole, every tile it sees (pooling misses attention by content there; such a head takes
            1.0-1.2x the dense kernel's time). On the attention of the example LMs (8k tokens) it is
            close to the exact mode in the regularized model's sparser layers (relative error
            0.03-0.23 %, 1.9-3.5x dense); in their first layers the check sweeps the heads that
            attend by content whole, and a head that passes it may still miss tiles (2.5-3.5 %); it
            visits nearly every tile of an unregularized model (benchmarks/RESULTS.md): check its
            error on your model, layer by layer (``return_stats``, or against ``'exact'``), before
            serving with it. For decoding (Nq <= 16) pass a ``key_summary``: without one it pools
            the whole key cache on every call and is slower than ``'exact'`` with one query. Rows
            whose weights are all near tau (diffuse rows) are its weak case: it may keep entries
            that the exact mode prunes. With an ``attn_mask`` it first reads the whole mask once, per
            tile: a tile that the mask hides entirely is never visited, and the estimate of one it
            hides in part comes from all of its keys plus the mask's largest bias there, so it can
            be off where few of the tile's keys are visible (at the edges of document or window
            masks); it then takes no pooled lower bound of lse and no split programs (decoding runs
            one program per query block). Pass ``causal=True`` rather than a causal ``attn_mask``,
            which costs that read. The reference backend evaluates the exact definition in both
            modes.
        return_stats: also return the stats dict below.
        backend: ``'triton'``, ``'reference'`` or ``'auto'`` (Triton for CUDA inputs), as in
            ``entropy_attention``.
        fast_slack: the predictor's safety factor (mode='fast' only): smaller visits more tiles.
        key_summary: mode='fast' only: the pooled keys of ``k`` (``entropy_attn.KeySummary``), kept
            between calls (decoding: ``update`` it after each write to the key cache), so that the
            call does not pool the keys itself. It must match ``k`` and ``key_padding_mask`` and be
            up to date (``ValueError`` otherwise). The output is the same as without it.

    Returns:
        ``out`` ``[B, H, Nq, Dv]`` in q's dtype (rows with no unmasked key are 0), or
        ``(out, stats)``. ``stats`` maps to float32 tensors ``[H]``, each computed per (batch, head)
        over the whole ``[Nq, Nk]`` score matrix and then averaged over the batch:

        - ``entry_sparsity``: pruned unmasked entries / unmasked entries (0 if none is unmasked).
        - ``tile_sparsity``: 1 - visited tiles / tiles with at least one unmasked entry, on the
          kernel's tile grid (BLOCK_M x BLOCK_N, ``_config``: 128 x 64 for Nq > 64, 64 x 64 for
          17-64 queries, 16 x 64 for Nq <= 16, with 32 key columns and at most 64 rows where
          ``max(D, Dv) > 128``; 16 x 16 under the interpreter; the reference backend uses 128 x
          64). Exact mode: the tiles passing the skip test; fast mode: the tiles the predictor
          listed. In grouped-query decoding (``Nq <= 16``, ``Hkv < H``, no ``attn_mask``, causal
          only with ``Nq = 1``) a tile's rows are the ``Nq`` queries of all ``H / Hkv`` query heads
          of a kv head: those heads share one tile list and report its sparsity.
        - ``pruned_mass``: the mean over rows with an unmasked key of the softmax mass of the entries
          not kept, ``sum_j P_ij (1 - keep_ij)``, with P the full (unpruned) softmax; in fast mode
          this includes the mass of the tiles it skipped (its "mass lost").

        In fast mode ``return_stats=True`` also runs the exact first pass to measure these, so it is
        slower than without.
    """
    inp = check_inputs(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    tau = finite_number("tau", tau, positive=False)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fast_slack = finite_number("fast_slack", fast_slack)
    path = resolve_backend(backend, inp)
    H = q.shape[1]
    pooled = None
    if key_summary is not None:
        if mode != "fast":
            raise ValueError(f"key_summary is used by mode='fast' only, got mode={mode!r}")
        if not isinstance(key_summary, KeySummary):
            raise TypeError(f"key_summary must be an entropy_attn.KeySummary, got {type(key_summary).__name__}")
        pooled = key_summary.pooled(inp.k, inp.key_padding_mask, v.shape[3])
    with torch.no_grad():
        if q.shape[0] * H == 0:  # an empty batch: nothing to launch, no entry to count
            out = q.new_zeros(*q.shape[:3], v.shape[3])
            return (out, _zero_stats(H, q.device)) if return_stats else out
        if tau == 0.0:
            out, _, _ = attention_with_lse(inp, entropy=False, backend=path)
            return (out, _zero_stats(H, q.device)) if return_stats else out
        if path == "reference":
            return reference_pruned(inp, tau, stats=return_stats)
        if not torch.compiler.is_compiling():  # eager: the kernels directly, without the op's dispatch
            return pruned_triton(inp, tau, mode, stats=return_stats, slack=fast_slack, pooled=pooled)
        out, st = torch.ops.entropy_attn.pruned_fwd(q, k, v, inp.attn_mask, inp.key_padding_mask, inp.causal,
                                                    inp.scale, tau, mode, fast_slack, return_stats, *(pooled or ()))
    return (out, dict(zip(STAT_NAMES, st.unbind(0)))) if return_stats else out


__all__ = ["pruned_attention", "KeySummary", "reference_pruned", "pruned_triton", "clear_plans", "STAT_NAMES"]
