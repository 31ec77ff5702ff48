"""Pooled keys: the summary of a key cache that the fast mode of ``pruned_attention`` predicts its
tiles from, computed per call, or kept between the calls of a decoding loop (``KeySummary``).

Per key block of ``block_n`` keys (the Triton path's key tile) and per (batch, kv head), kernel
``kernels.pruned_pool.pool_keys`` writes the block's mean key weighted by the padding mask, its
outlier key (the unmasked key farthest from that mean) and the log2 of their weights (see
``pool_keys``). A decoding step appends a few keys to a long cache; only the last block's summary
changes, so ``KeySummary.update`` re-pools the blocks from the first changed key on instead of the
whole cache (a fast decoding step, 1 query x 128k keys, replayed from a CUDA graph on an H200:
0.21 ms with a summary, 0.50 ms pooling the cache in the call; benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from ._inputs import _check_float, _check_tensor, batch_rows, check_padding_mask
from ._launch import (MAX_HEAD_DIM, TRITON_DTYPES, _block, _on_device, _padding_args, _unit_stride, batch_slices, cdiv,
                      interpreting)
from ._plan import PLAIN, Workspace


def _pool_keys(k, kpm_args, block_n: int, nkb: int, ws: Workspace = PLAIN, out=None, kb0: int = 0):
    """The fast predictor's pooled keys of ``k [B, Hkv, Nk, D]`` (unit last stride; kernel
    ``pool_keys``; the predictor pools the queries itself), with the padding mask ``kpm_args``
    (``_mask_args``' second), in key blocks of ``block_n``:

    - kp ``[B, Hkv, NKB, D]`` (k's dtype): per key block the mean key weighted by the padding mask
      (weight 0 for a padded key, ``exp(mask)`` for a float mask, 1 without one).
    - ko ``[B, Hkv, NKB, D]`` (k's dtype): per key block the outlier key, the unmasked key farthest
      from kp (0 where the block has none).
    - kbias ``[B or 1, NKB]`` float32 (one row without a padding mask): log2 of the block's total key
      weight (-inf if 0); kobias, same shape: log2 of the outlier key's weight alone, 0 where the
      block has an unmasked key, else -inf (all -inf with a float padding mask).

    One program of 2 warps per key block and (batch, kv head) (H200, graphed: 64k keys x 16 kv heads,
    D = 128, 130 us with 4 warps, 84 with 2, 77 with 1, 215 with 8; 8k: 24.2 / 18.8 / 18.3 / 34.6
    us); beyond ``GRID_ROWS`` (batch, kv head) rows, one launch per slice of the batch (``batch_slices``).

    ``out``: the four buffers to write (at least ``nkb`` blocks each), of which only the blocks
    ``[kb0, nkb)`` are written, and their first ``nkb`` blocks are returned; by default four new
    buffers of ``nkb`` blocks (allocated by ``ws``, which records their launch).
    """
    B, Hkv, Nk, D = k.shape
    kpm, *pstr, pkind = kpm_args
    given = out is not None
    if not given:
        out = _pooled_buffers(B, Hkv, D, k.dtype, k.device, B if pkind else 1, nkb, ws)
    kp, ko, kbias, kobias = out
    from .kernels.pruned_pool import pool_keys

    for rows in batch_slices(B, Hkv) if kb0 < nkb else ():
        part = batch_rows(k, rows)
        bias_rows = rows if pkind else slice(None)  # kbias, kobias: a row per batch entry with padding, else one
        ws.launch(pool_keys, (nkb - kb0, part.shape[0] * Hkv),
            part, batch_rows(kp, rows), batch_rows(ko, rows), batch_rows(kbias, bias_rows),
            batch_rows(kobias, bias_rows), batch_rows(kpm, rows), *k.stride(), *kp.stride(), *pstr, kbias.stride(0),
            Hkv, Nk, kb0,
            D=D, BLOCK_N=block_n, BLOCK_D=_block(D), KPM_KIND=pkind, num_warps=2, chained=True,
        )
    return tuple(_blocks(t, nkb) for t in out) if given else out


def _pooled_buffers(B: int, Hkv: int, D: int, dtype, device, rows: int, nkb: int, ws: Workspace = PLAIN) -> tuple:
    """Uninitialized ``(kp, ko, kbias, kobias)`` of ``nkb`` key blocks (``_pool_keys``' layout; ``rows``:
    B with a padding mask, else 1), allocated by ``ws``."""
    return (ws.empty((B, Hkv, nkb, D), dtype, device), ws.empty((B, Hkv, nkb, D), dtype, device),
            ws.empty((rows, nkb), torch.float32, device), ws.empty((rows, nkb), torch.float32, device))


def _blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` key blocks of a pooled-key buffer (``[B, Hkv, blocks, D]`` or ``[rows, blocks]``)."""
    return t[:, :, :n] if t.dim() == 4 else t[:, :n]


def _kpm_kind(mask) -> str | None:
    return None if mask is None else "bool" if mask.dtype == torch.bool else "float"


def _identity(t):
    """What tells that tensor ``t`` (or None) was written since: its address and version counter
    (None for inference tensors, which have none)."""
    if t is None:
        return None
    return t.data_ptr(), None if t.is_inference() else t._version


class KeySummary:
    """The pooled keys of a key cache, kept between calls: ``pruned_attention(q, k, v, mode='fast',
    key_summary=summary)`` then predicts its tiles without re-pooling ``k``.

    For decoding: build it once, and after each write to the key cache call ``update`` (which
    re-pools only the key blocks from the first new key on) before the next call::

        summary = KeySummary(k_cache[:, :, :n])
        for step in ...:
            k_cache[:, :, n] = k_new; v_cache[:, :, n] = v_new; n += 1
            summary.update(k_cache[:, :, :n])
            out = pruned_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], mode="fast", key_summary=summary)

    A call checks that the summary matches its keys (batch, kv heads, head dim, dtype, device,
    length, padding mask kind and shape, key block) and that neither ``k`` nor the padding mask was
    written since the last ``update`` (address and version counter; inference tensors have no
    version counter, so there only the address and length are checked): a stale summary raises
    ``ValueError`` instead of mispredicting. The keys the summary had seen must not change except
    through ``update(..., start=...)``: the test cannot see writes that bypass the version counter
    (``.data``, NumPy views, other tensors on the same storage), a new cache at a freed cache's
    address with as many writes, nor anything under ``torch.compile``, which skips it.

    Args:
        k: ``[B, Hkv, Nk, D]`` keys, float16, bfloat16 or float32 (float64 and devices the Triton
            path does not run on are accepted and pooled by nothing: the reference path, which
            those calls take, evaluates the exact definition).
        key_padding_mask: ``[B, Nk]``, as in ``pruned_attention``; the calls must pass the same.
        value_dim: the values' head dim (default D): it fixes the key block (64 keys; 32 where
            ``max(D, value_dim) > 128``; 16 under the interpreter).
    """

    def __init__(self, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                 value_dim: int | None = None):
        _check_tensor("k", k, 4)
        _check_float("k", k)
        B, Hkv, Nk, D = k.shape
        value_dim = D if value_dim is None else int(value_dim)
        if min(Nk, D, value_dim) <= 0:
            raise ValueError(f"empty keys or value dim: k {tuple(k.shape)}, value_dim {value_dim}")
        from .pruned import _config

        self.block_n = _config(1, D, value_dim).block_n
        self.value_dim = value_dim
        self._spec = (B, Hkv, D, k.dtype, k.device, _kpm_kind(key_padding_mask))
        self._pooled = None  # the four buffers, with room for _capacity key blocks
        self._views = None  # their first cdiv(num_keys, block_n) blocks
        self._capacity = 0
        self.num_keys = 0
        self.update(k, key_padding_mask, start=0)

    def _triton_pools(self) -> bool:
        """Whether the Triton path runs on these keys (else nothing is pooled)."""
        B, Hkv, D, dtype, device, _ = self._spec
        return dtype in TRITON_DTYPES and D <= MAX_HEAD_DIM and (device.type == "cuda" or interpreting())

    def update(self, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
               start: int | None = None) -> "KeySummary":
        """Re-pool after the keys ``[start, Nk)`` of ``k [B, Hkv, Nk, D]`` (and their padding mask
        entries) changed or were appended; by default ``start`` is the number of keys the summary
        had seen (an append; a shorter ``k`` truncates). Keys ``[0, start)`` must be the ones it
        has seen. Only the key blocks from ``start // block_n`` on are pooled again. Returns self."""
        self._check_layout(k, key_padding_mask, check_length=False)
        Nk = k.shape[2]
        start = min(self.num_keys, Nk) if start is None else int(start)
        if not 0 <= start <= Nk:
            raise ValueError(f"start must be in [0, {Nk}], got {start}")
        start = min(start, self.num_keys)
        if self._triton_pools():
            self._pool(k, key_padding_mask, start)
        self.num_keys = Nk
        self._seen = (_identity(k), _identity(key_padding_mask))
        return self

    def _pool(self, k, key_padding_mask, start: int) -> None:
        B, Hkv, D, dtype, device, kind = self._spec
        nkb = cdiv(k.shape[2], self.block_n)
        kb0 = start // self.block_n
        with _on_device(k):
            if nkb > self._capacity:  # grow (doubling), keeping the blocks below kb0
                cap = max(nkb, 2 * self._capacity)
                grown = _pooled_buffers(B, Hkv, D, dtype, device, B if kind else 1, cap)
                if self._pooled is not None:
                    for new, old in zip(grown, self._pooled):
                        _blocks(new, kb0).copy_(_blocks(old, kb0))
                self._pooled, self._capacity = grown, cap
            self._views = _pool_keys(_unit_stride(k), _padding_args(key_padding_mask, k), self.block_n, nkb,
                                     out=self._pooled, kb0=kb0)

    def pooled(self, k: torch.Tensor, key_padding_mask: torch.Tensor | None, value_dim: int) -> tuple | None:
        """The pooled keys ``(kp, ko, kbias, kobias)`` (``_pool_keys``' layout) for a call on keys
        ``k`` with ``key_padding_mask`` and values of head dim ``value_dim``, after checking that
        the summary matches them and is not stale (``ValueError`` otherwise); None where it pools
        nothing."""
        self._check_layout(k, key_padding_mask, check_length=True)
        if value_dim != self.value_dim:
            from .pruned import _config

            if _config(1, k.shape[3], value_dim).block_n != self.block_n:
                raise ValueError(f"key_summary was built for value_dim={self.value_dim}, whose key blocks "
                                 f"differ from those of values of head dim {value_dim}: build it with "
                                 f"value_dim={value_dim}")
        if not torch.compiler.is_compiling() and (_identity(k), _identity(key_padding_mask)) != self._seen:
            raise ValueError("key_summary is stale: k or key_padding_mask was written (or is another tensor) "
                             "since the summary's last update; call key_summary.update(k, key_padding_mask) "
                             "after writing to the key cache")
        return self._views

    def _check_layout(self, k, key_padding_mask, check_length: bool) -> None:
        _check_tensor("k", k, 4)
        B, Hkv, D, dtype, device, kind = self._spec
        got = (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        if got != (B, Hkv, D, dtype, device):
            raise ValueError(f"key_summary was built for keys of batch {B}, {Hkv} kv heads, head dim {D}, "
                             f"{dtype} on {device}; got batch {got[0]}, {got[1]} kv heads, head dim {got[2]}, "
                             f"{got[3]} on {got[4]}")
        if k.shape[2] == 0:
            raise ValueError("k has no keys")
        if check_length and k.shape[2] != self.num_keys:
            raise ValueError(f"key_summary holds {self.num_keys} keys but k has {k.shape[2]}: call "
                             "key_summary.update(k, key_padding_mask) after writing to the key cache")
        if _kpm_kind(key_padding_mask) != kind:
            raise ValueError(f"key_summary was built with a {kind or 'no'} key_padding_mask, got "
                             f"{_kpm_kind(key_padding_mask) or 'none'}")
        if key_padding_mask is not None:
            check_padding_mask(key_padding_mask, B, k.shape[2], k)

    def __repr__(self) -> str:
        B, Hkv, D, dtype, device, kind = self._spec
        return (f"KeySummary(B={B}, Hkv={Hkv}, D={D}, num_keys={self.num_keys}, block_n={self.block_n}, "
                f"{dtype}, {device}, key_padding_mask={kind})")
