"""``launch(kernel, grid, *args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` with less host time.

Each ``kernel[grid](...)`` call through Triton's ``JITFunction.run`` binds and specializes every
argument, then rebuilds its cache key (a string of the options), checks the kernel's globals and
builds the launch metadata before it launches: 20 us for an empty kernel with one argument and
40-80 us for ours (60-90 arguments) on the H100 machine's host (Triton 3.6), where a fast-mode
pruned call launches five kernels. Here Triton's own binder computes the specialization of the
arguments (the key under which Triton caches binaries: pointer alignment, integers equal to 1 or
divisible by 16, their widths, the constexprs), a dict maps it to the binary that the first plain
launch compiled, and the binary is launched directly, as ``JITFunction.run`` does last. So a
binary runs only for arguments that Triton itself would run it for.

The direct path relies on Triton internals (``JITFunction.device_caches``, the binary's launcher
arguments), so it is used only with the Triton versions it was checked on (``DIRECT_VERSIONS``:
tests/test_launch.py on the GPU) and only when no launch hook (a profiler) or Triton debug mode
is set; everywhere else, and under the interpreter, ``launch`` is the plain launch.
"""
from __future__ import annotations

import os

import torch
import triton

#: Triton versions (major.minor) whose launch internals the direct path was checked against.
DIRECT_VERSIONS = ("3.6",)
#: Set ``ENTROPY_ATTN_DIRECT_LAUNCH=0`` to always take Triton's plain launch path.
_ENABLED = (
    os.environ.get("ENTROPY_ATTN_DIRECT_LAUNCH", "1") != "0"
    and ".".join(triton.__version__.split(".")[:2]) in DIRECT_VERSIONS
)
#: (kernel, device, specialization, options) -> compiled binary.
_binaries: dict = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def direct_enabled() -> bool:
    """Whether ``launch`` may take the direct path now (CUDA, checked Triton, no hooks, no debug)."""
    if not _ENABLED or interpreting():
        return False
    rt = triton.knobs.runtime
    return not (rt.launch_enter_hook.calls or rt.launch_exit_hook.calls or rt.debug)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launch the ``@triton.jit`` ``kernel`` on ``grid`` (1 to 3 ints) with ``args`` (its runtime
    arguments, positional) and ``kwargs`` (constexprs and launch options such as ``num_warps``), on
    the current CUDA device and stream: the same launch as ``kernel[grid](*args, **kwargs)``."""
    if not direct_enabled():
        kernel[grid](*args, **kwargs)
        return
    key, params, binary = _lookup(kernel, args, kwargs)
    if binary is None:  # first launch of this specialization: Triton compiles (or loads) and runs it
        binary = kernel[grid](*args, **kwargs)
        _binaries[key] = binary.result() if hasattr(binary, "result") else binary
        return
    run_bound(binary, grid, params.values())


def _lookup(kernel, args, kwargs):
    """``(key, params, binary)``: Triton's binder on the arguments (``params``: the launcher's
    arguments by name), the cache key of their specialization and its binary (None if not cached)."""
    device = torch.cuda.current_device()
    params, specialization, options = kernel.device_caches[device][-1](*args, **kwargs)
    key = (kernel, device, tuple(specialization), tuple(options.items()))
    return key, params, _binaries.get(key)


def bind(kernel, args: tuple, kwargs: dict):
    """``(binary, params)`` for a launch of ``kernel`` with ``args`` and ``kwargs`` that ``launch``
    has run before on the current device: the binary it would run and its launcher's full argument
    list (``params[i] is args[i]`` for the positional arguments), so that ``run_bound`` can repeat
    the launch with other tensors of the same specialization. None on the plain path or before the
    first launch."""
    if not direct_enabled():
        return None
    _, params, binary = _lookup(kernel, args, kwargs)
    return None if binary is None else (binary, list(params.values()))


def current_stream() -> int:
    """The raw handle of the current CUDA stream of the current device (what ``run_bound`` takes)."""
    return triton.runtime.driver.active.get_current_stream(torch.cuda.current_device())


def run_bound(binary, grid: tuple, params, stream: int | None = None) -> None:
    """Launch ``binary`` (from ``bind``) on ``grid`` with the launcher arguments ``params`` on
    ``stream`` (default: the current device's current stream, ``current_stream()``), as
    ``JITFunction.run`` does last. No launch metadata and no hooks: the caller checked
    ``direct_enabled()``."""
    g0, g1, g2 = (*grid, 1, 1)[:3]
    if stream is None:
        stream = current_stream()
    binary.run(g0, g1, g2, stream, binary.function, binary.packed_metadata, None, None, None, *params)
