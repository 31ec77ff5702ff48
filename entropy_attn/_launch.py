"""Host side of the Triton kernels: checks, block configurations, allocation and launch.

Kept apart from ``entropy_attn.kernels`` (which holds only ``@triton.jit`` code), the way
flash-attention keeps its Python interface apart from its CUDA kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

from ._fastlaunch import interpreting, launch
from ._inputs import AttentionInputs, batch_rows
from .kernels.pdl import AVAILABLE as PDL_AVAILABLE

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: plain loads only
    TensorDescriptor = None

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_VALUE_DIM = 512
#: The kernels' grids run one row of programs per (batch, head) on their second axis, which CUDA
#: caps at 65535: a larger batch is launched in slices (``batch_slices``).
GRID_ROWS = 65535
LOG2E = 1.4426950408889634
#: Kernels that can load key and value tiles through tensor descriptors (Hopper's copy engine, TMA)
#: do so with Triton >= 3.6 (checked: 3.6 on the GPU, 3.8 in the interpreter; 3.4's interpreter
#: rejects strides that are not multiples of 16 elements); ``ENTROPY_ATTN_TMA=0`` makes them use
#: plain loads.
TMA_ENABLED = (
    os.environ.get("ENTROPY_ATTN_TMA", "1") != "0"
    and TensorDescriptor is not None
    and tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)
)
#: The copy engine's largest block edge (elements).
TMA_MAX_BOX = 256
#: The kernels of one pruned call are launched early on Hopper or newer (programmatic dependent
#: launch: each starts while the one before it finishes, ``kernels/pdl.py``); ``ENTROPY_ATTN_PDL=0``
#: launches each only after the one before it has finished.
PDL_ENABLED = os.environ.get("ENTROPY_ATTN_PDL", "1") != "0" and PDL_AVAILABLE


def check_triton_inputs(inp: AttentionInputs) -> None:
    """Raise a clear error for inputs the Triton kernels do not take."""
    q, v = inp.q, inp.v
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype}; "
            "use backend='reference' for float64"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if v.shape[-1] > MAX_VALUE_DIM:
        raise ValueError(f"backend='triton' supports value dims up to {MAX_VALUE_DIM}, got {v.shape[-1]}")
    if q.shape[1] > GRID_ROWS:
        raise ValueError(f"backend='triton' supports up to {GRID_ROWS} heads, got {q.shape[1]}")
    if not q.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 to run the "
            "kernels on the CPU in Triton's interpreter, or use backend='reference'"
        )


def batch_slices(batch: int, heads: int) -> tuple[slice, ...]:
    """The slices of a batch that the kernels are launched on, one after another: ``(slice(None),)``
    (the whole batch) unless ``batch x heads`` grid rows exceed ``GRID_ROWS``."""
    if batch * heads <= GRID_ROWS:
        return (slice(None),)
    step = max(1, GRID_ROWS // heads)
    return tuple(slice(b, min(b + step, batch)) for b in range(0, batch, step))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a constexpr function in Triton 3.6: ~6 us per host call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (1 for n <= 1), like ``triton.next_power_of_2`` without its host cost."""
    return 1 << max(n - 1, 0).bit_length()


def _block(n: int) -> int:
    return max(16, next_pow2(n))


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # registers per thread ptxas may use (None: its own choice)


def _fwd_config(d: int, dv: int, dtype: torch.dtype, padding: int = 0, causal: bool = False) -> _Config:
    """Block shape of the forward (measured on an H100, see benchmarks/RESULTS.md). ``padding``: the
    kind of the key padding mask (1 boolean, 2 float) where it is the call's only mask tensor (no
    ``attn_mask``), else 0. There other shapes measured faster (H200, 16k bf16, same process): at 64
    columns 128 x 64 blocks of 4 warps, with or without the causal mask (against 64 x 64 of 4 warps
    without it: 1.12x-1.14x with the entropy; against the default with it: 1.12x under a boolean
    mask, a tie under a float one; ``benchmarks/notes/masked_h200_2026-12-02.txt``, section 3); at
    128 columns with the causal mask 64 x 64 of 4 warps (1.01x-1.08x, ``tune_attention.py --masked
    --causal``)."""
    if interpreting():
        return _Config(16, 16, 1, 1)
    width = max(_block(d), _block(dv)) * dtype.itemsize // 2  # in 16-bit columns
    if padding and width <= 64:
        return _Config(128, 64, 4, 3)
    if padding and width <= 128 and causal:
        return _Config(64, 64, 4, 3)
    if width <= 128:
        return _Config(128, 64, 8, 3)
    return _Config(64, 32, 4, 2)


def _bwd_config(d: int, dv: int, dtype: torch.dtype) -> tuple[_Config, _Config]:
    """(dK/dV programs: query block x key block, dQ programs: query block x key block)."""
    if interpreting():
        return _Config(16, 16, 1, 1), _Config(16, 16, 1, 1)
    width = max(_block(d), _block(dv)) * dtype.itemsize // 2
    if width <= 128:
        return _Config(32, 64, 4, 3), _Config(64, 32, 4, 3)
    return _Config(16, 64, 4, 2), _Config(64, 16, 4, 2)


def _input_precision(dtype: torch.dtype) -> str:
    """The kernels' ``dot`` precision: float32 inputs use TF32 only where PyTorch's matmuls would
    (``torch.get_float32_matmul_precision()``); bfloat16 under the interpreter multiplies in float32
    (see ``kernels.masks.dot``)."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _kernel_mask(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _padding_args(kpm: torch.Tensor | None, placeholder: torch.Tensor):
    """(padding tensor, 2 strides, kind) of a ``key_padding_mask`` for the kernels (``placeholder``
    as the pointer where there is none)."""
    if kpm is None:
        return (placeholder, 0, 0, 0)
    return (_kernel_mask(kpm), *kpm.stride(), 1 if kpm.dtype == torch.bool else 2)


def _mask_args(inp: AttentionInputs):
    """(mask tensor, 4 strides, kind) and (padding tensor, 2 strides, kind) for the kernels."""
    mask = inp.attn_mask
    if mask is None:
        mask_args = (inp.q, 0, 0, 0, 0, 0)
    else:
        mask_args = (_kernel_mask(mask), *mask.stride(), 1 if mask.dtype == torch.bool else 2)
    return mask_args, _padding_args(inp.key_padding_mask, inp.q)


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9 or newer: the copy engine's loads and early launches
    (a ROCm device is ``cuda`` to torch too, and an MI300 also reports capability 9)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def early_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched early (``PDL_ENABLED``, an NVIDIA GPU of compute
    capability 9 or newer, not in Triton's interpreter): what ``_plan.Workspace`` takes as ``early``."""
    return PDL_ENABLED and not interpreting() and _hopper_or_newer(device)


@contextlib.contextmanager
def pdl_switch():
    """For timing calls with and without early launches: yields ``switch(on)``, which turns them on
    (where ``PDL_ENABLED`` allowed them on entry) or off for the calls planned after it; the setting
    is restored on exit."""
    global PDL_ENABLED
    allowed = PDL_ENABLED

    def switch(on: bool) -> None:
        global PDL_ENABLED
        PDL_ENABLED = on and allowed

    try:
        yield switch
    finally:
        PDL_ENABLED = allowed


def _tma_loadable(t: torch.Tensor, block: list) -> bool:
    """Whether the copy engine can load ``block`` tiles of ``t``: 16-byte aligned base and strides
    (positive), unit last stride, block edges at most ``TMA_MAX_BOX``, on Hopper or newer (or in
    Triton's interpreter, which emulates it)."""
    size = t.element_size()
    return (
        (interpreting() or _hopper_or_newer(t.device))
        and t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        and all(s > 0 and s * size % 16 == 0 for s in t.stride()[:-1])
        and max(block) <= TMA_MAX_BOX
    )


def tma_operands(block_rows: int, *operands) -> tuple[list, bool]:
    """``(args, tma)`` for kernels that load row blocks of ``[B, H, N, D]`` tensors through
    ``kernels.attention_fwd.load_rows``: ``operands`` are ``(tensor, block_cols)`` pairs. Where the
    copy engine can load every one of them (and ``TMA_ENABLED``), ``args`` are rank-4 tensor
    descriptors with blocks ``[1, 1, block_rows, block_cols]`` and ``tma`` is True; else the tensors
    themselves and False."""
    blocks = [[1, 1, block_rows, cols] for _, cols in operands]
    if TMA_ENABLED and all(_tma_loadable(t, blk) for (t, _), blk in zip(operands, blocks)):
        return [TensorDescriptor(t, list(t.shape), list(t.stride()), blk) for (t, _), blk in zip(operands, blocks)], True
    return [t for t, _ in operands], False


def attention_forward(inp: AttentionInputs, entropy: bool):
    """Run the forward kernel.

    Returns ``(out [B, H, Nq, Dv] q.dtype, lse [B, H, Nq] float32 (+inf for empty rows),
    entropy [B, H, Nq] float32, or an empty tensor when ``entropy`` is False)``.
    """
    check_triton_inputs(inp)
    B, H, Nq, _ = inp.q.shape
    dev = inp.q.device
    out = torch.empty((B, H, Nq, inp.v.shape[3]), dtype=inp.q.dtype, device=dev)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=dev)
    ent = torch.empty((B, H, Nq) if entropy else (0,), dtype=torch.float32, device=dev)
    with _on_device(inp.q):
        for rows in batch_slices(B, H):
            _forward_launch(inp.batch(rows), *(batch_rows(t, rows) for t in (out, lse, ent)), entropy)
    return out, lse, ent


def _forward_launch(inp: AttentionInputs, out, lse, ent, entropy: bool) -> None:
    """Launch the forward kernel on at most ``GRID_ROWS`` (batch, head) rows, into ``out``, ``lse``, ``ent``."""
    q, k, v = (_unit_stride(t) for t in (inp.q, inp.k, inp.v))
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    (mask, *mstr, mkind), (kpm, *pstr, pkind) = _mask_args(inp)
    cfg = _fwd_config(D, Dv, q.dtype, padding=pkind if mkind == 0 else 0, causal=inp.causal)
    from .kernels.attention_fwd import attention_fwd

    launch(
        attention_fwd, (cdiv(Nq, cfg.block_m), B * H), q, k, v, out, lse, ent, mask, kpm,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr, *pstr,
        H, inp.groups, Nq, Nk, inp.scale * LOG2E,
        D=D, DV=Dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block(D), BLOCK_DV=_block(Dv),
        CAUSAL=inp.causal, MASK_KIND=mkind, KPM_KIND=pkind, ENTROPY=entropy,
        INPUT_PRECISION=_input_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )


def attention_backward(inp: AttentionInputs, out, lse, ent, dout, dent):
    """Run the backward kernels. ``dent`` is the gradient of the entropy output, or None when the
    loss does not depend on it. Returns ``(dq, dk, dv)`` shaped and typed like q, k, v."""
    q, k, v = inp.q, inp.k, inp.v
    if dent is not None:
        dent = dent.to(torch.float32).contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    with _on_device(q):
        for rows in batch_slices(q.shape[0], q.shape[1]):
            _backward_launch(inp.batch(rows), *(batch_rows(t, rows) for t in (out, lse, ent, dout, dent, dq, dk, dv)))
    return dq, dk, dv


def _backward_launch(inp: AttentionInputs, out, lse, ent, dout, dent, dq, dk, dv) -> None:
    """Launch the backward kernels on at most ``GRID_ROWS`` (batch, head) rows, into ``dq, dk, dv``
    (``dent``: float32, contiguous, or None)."""
    q, k, v = (_unit_stride(t) for t in (inp.q, inp.k, inp.v))
    dout = _unit_stride(dout)
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    has_dent = dent is not None
    if not has_dent:
        dent = lse  # placeholder pointer, never read
    delta = torch.empty_like(lse)
    (mask, *mstr, mkind), (kpm, *pstr, pkind) = _mask_args(inp)
    kv_cfg, q_cfg = _bwd_config(D, Dv, q.dtype)
    from .kernels.attention_bwd import attention_bwd, attention_bwd_preprocess

    pre_block = 16 if interpreting() else 64
    launch(
        attention_bwd_preprocess, (cdiv(Nq, pre_block), B * H), out, dout, ent, dent, delta, *out.stride(), *dout.stride(), H, Nq,
        DV=Dv, BLOCK_M=pre_block, BLOCK_DV=_block(Dv), HAS_DENT=has_dent,
    )
    grid = (cdiv(Nk, kv_cfg.block_n) + inp.groups * cdiv(Nq, q_cfg.block_m), B * Hkv)
    launch(
        attention_bwd, grid, q, k, v, dout, lse, delta, dent, dq, dk, dv, mask, kpm,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mstr, *pstr,
        H, inp.groups, Nq, Nk, inp.scale, inp.scale * LOG2E,
        D=D, DV=Dv, BLOCK_M1=kv_cfg.block_m, BLOCK_N1=kv_cfg.block_n,
        BLOCK_M2=q_cfg.block_m, BLOCK_N2=q_cfg.block_n, BLOCK_D=_block(D), BLOCK_DV=_block(Dv),
        CAUSAL=inp.causal, MASK_KIND=mkind, KPM_KIND=pkind, HAS_DENT=has_dent,
        INPUT_PRECISION=_input_precision(q.dtype),
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
