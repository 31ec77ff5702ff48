"""Launch plans: the allocations and kernel launches of a call, recorded on the second call with a
given input signature and replayed on later calls.

A short ``pruned_attention`` call spends most of its time on the host (0.25-0.5 ms per call on the
H200 machines without plans, 0.15-0.25 ms with them: five launches, each through Triton's argument
binder, a dozen allocations, and the Python that derives tile shapes, grids and splits;
benchmarks/RESULTS.md). All of that but the tensors' addresses is a function of the call's signature
(shapes, strides, dtypes and 16-byte alignment of its input tensors, which of them are the same
tensor, its scalar options), and so is every binary Triton picks (it specializes on the same
things). A ``Plan`` recorded once per signature replays the call as: allocate its buffers, then
launch each recorded binary with its recorded launcher arguments, the tensors swapped in (and the
tensor descriptors of the kernels that load through the copy engine rebuilt around them).

On the direct launch path (``_fastlaunch``), where every recorded launch replays its binary, the
buffers that only the kernels see (not the output, not filled, not wrapped in a tensor descriptor)
are carved out of one allocation (the plan's arena) and handed to the launcher as addresses, which
Triton's launcher takes as they are: one ``torch.empty`` per call instead of one per buffer
(a dozen for a fast call), and no ``data_ptr()`` lookups (H200, same-process A/B against the
plans without it: host time per call issued back to back, fast 8k 0.188 -> 0.115 ms, exact 8k
0.192 -> 0.140, exact decoding 0.151 -> 0.109; outputs bitwise equal).

A signature is recorded on its second call, so that calls whose shapes never repeat (decoding
against a growing key cache) pay no recording. The plans see only their signature: code that
changes a configuration another way (a module constant, a monkeypatched config function, as
``benchmarks/tune_pruned.py`` and the tests do) calls ``clear_plans()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._fastlaunch import bind, current_stream, direct_enabled, launch, run_bound
from ._launch import TensorDescriptor

#: Signatures kept (the least recently used is dropped past this; a plan holds no tensor).
MAX_PLANS = 256
#: Byte alignment of each buffer in a plan's arena (Triton specializes pointers on 16 bytes).
ARENA_ALIGN = 256
#: signature -> its Plan; None: seen once, record on the next call; False: could not be recorded.
_plans: dict = {}


_UNSEEN = object()


def lookup(signature) -> tuple:
    """``(plan, record)``: the plan recorded for ``signature`` (or None), and whether the call
    should record one (its signature was seen once before). The cache keeps its entries in the
    order of their last use and drops the least recently used one when full, so that a stream of
    signatures seen once (decoding against a growing key cache) does not evict the plans in use."""
    plan = _plans.pop(signature, _UNSEEN)
    if plan is _UNSEEN:
        if len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]
        _plans[signature] = None
        return None, False
    _plans[signature] = plan  # now the most recently used
    if plan is None or plan is False:
        return None, plan is None
    return plan, False


def store(signature, plan) -> None:
    """Keep the ``plan`` recorded for ``signature`` (None: it could not be recorded, do not retry)."""
    _plans[signature] = plan if plan is not None else False


def clear_plans() -> None:
    """Forget every recorded plan (each signature is recorded again on its second call)."""
    _plans.clear()


def tensor_signature(t: torch.Tensor | None):
    """What a kernel's specialization and configuration can depend on in a tensor argument."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def inputs_signature(inputs) -> tuple:
    """What a plan recorded with the tensors ``inputs`` depends on in them: each one's
    ``tensor_signature``, and the position of the first input that is the same tensor. A plan's
    slots are per tensor object, so one recorded with ``k is v`` (or with a placeholder standing for
    an absent mask) must not replay where they are two tensors, nor the other way round."""
    first: dict = {}
    return tuple((tensor_signature(t), first.setdefault(id(t), i)) for i, t in enumerate(inputs))


def _carried(a) -> torch.Tensor | None:
    """The tensor a launch argument carries: itself, or a tensor descriptor's base (None for others)."""
    if isinstance(a, torch.Tensor):
        return a
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        return a.base
    return None


def _layout(a) -> tuple | None:
    """What a replay needs to rebuild argument ``a`` around another tensor: None for a tensor, the
    shape, strides, block and padding of a tensor descriptor."""
    if isinstance(a, torch.Tensor):
        return None
    return (list(a.shape), list(a.strides), list(a.block_shape), a.padding)


@dataclass(frozen=True)
class _Launch:
    """One recorded launch: the arguments with each tensor (or tensor descriptor) replaced by None
    and named in ``slots`` (``(position, slot, descriptor layout or None)``), and, on the direct path,
    the binary and its launcher arguments (same)."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    slots: tuple
    bound: tuple | None

    def run(self, tensors: list, direct: bool, stream: int | None = None) -> None:
        bound = direct and self.bound is not None
        values = list(self.bound[1] if bound else self.args)
        for pos, slot, layout in self.slots:
            values[pos] = tensors[slot] if layout is None else TensorDescriptor(tensors[slot], *layout)
        if bound:
            run_bound(self.bound[0], self.grid, values, stream)
        else:
            launch(self.kernel, self.grid, *values, **self.kwargs)


def _without_tensors(values) -> tuple:
    """``values`` with each tensor and tensor descriptor replaced by None (a plan keeps no tensor
    alive)."""
    return tuple(None if _carried(a) is not None else a for a in values)


@dataclass(frozen=True)
class Plan:
    """A recorded call: ``allocs`` ((shape, dtype, fill value or None) per buffer, in order), the
    ``launches`` and the slot of its output. Slots number the inputs, then the buffers. ``arena``:
    (byte offset or None) per buffer, and ``arena_bytes`` its size; buffers with an offset live in
    the arena on the direct launch path (None: no arena, every launch needs tensors)."""
    allocs: tuple
    launches: tuple
    out: int
    arena: tuple | None = None
    arena_bytes: int = 0

    def run(self, inputs, device) -> torch.Tensor:
        """Replay on ``inputs`` (same signature as the recording's) on the current stream; returns
        the output tensor."""
        tensors = list(inputs)
        direct = direct_enabled()
        base = None
        if direct and self.arena is not None:
            arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=device)
            base = arena.data_ptr()
        for i, (shape, dtype, fill) in enumerate(self.allocs):
            if base is not None and self.arena[i] is not None:
                tensors.append(base + self.arena[i])
            elif fill is None:
                tensors.append(torch.empty(shape, dtype=dtype, device=device))
            else:
                tensors.append(torch.full(shape, fill, dtype=dtype, device=device))
        stream = current_stream() if direct else None  # one lookup for every launch
        for step in self.launches:
            step.run(tensors, direct, stream)
        return tensors[self.out]


def _arena(allocs: tuple, launches: tuple, out: int, n_inputs: int) -> tuple[tuple | None, int]:
    """``(offsets, bytes)`` of the buffers that can live in a plan's arena: not the output, not
    filled, not wrapped in a tensor descriptor; ``(None, 0)`` unless every launch replays a binary
    (the plain launch path needs tensors)."""
    if not launches or any(step.bound is None for step in launches):
        return None, 0
    wrapped = {slot for step in launches for _, slot, layout in step.slots if layout is not None}
    offsets, size = [], 0
    for i, (shape, dtype, fill) in enumerate(allocs):
        slot = n_inputs + i
        if fill is not None or slot == out or slot in wrapped:
            offsets.append(None)
            continue
        offsets.append(size)
        nbytes = math.prod(shape) * dtype.itemsize
        size += -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN
    return tuple(offsets), size


class Workspace:
    """Where a call allocates its buffers (``empty``, ``full``) and launches its kernels
    (``launch``). Built with the call's ``inputs`` it also records them: ``plan(out)`` returns the
    ``Plan``, or None if some launch took a tensor that is neither an input nor one of its buffers.
    Built without, it only allocates and launches. With ``early``, the kernels launched with
    ``chained=True`` start before the kernel launched before them has finished (programmatic
    dependent launch, ``kernels/pdl.py``), all but the workspace's first launch, which starts after
    everything before the call as usual."""

    def __init__(self, inputs=None, early: bool = False):
        self.early = early
        self._launched = 0
        self.recording = inputs is not None
        self._tensors = list(inputs or ())  # every recorded tensor stays alive, so that ids stay unique
        self._slot = {id(t): i for i, t in enumerate(self._tensors)}
        self._allocs = []
        self._launches = []
        self._complete = True

    def empty(self, shape, dtype, device) -> torch.Tensor:
        return self._buffer(torch.empty(shape, dtype=dtype, device=device), (tuple(shape), dtype, None))

    def full(self, shape, value, dtype, device) -> torch.Tensor:
        return self._buffer(torch.full(shape, value, dtype=dtype, device=device), (tuple(shape), dtype, value))

    def _buffer(self, t, spec):
        if self.recording:
            self._slot.setdefault(id(t), len(self._tensors))
            self._tensors.append(t)
            self._allocs.append(spec)
        return t

    def launch(self, kernel, grid: tuple, *args, chained: bool = False, **kwargs) -> None:
        """``kernel[grid](*args, **kwargs)``, recorded. ``chained``: the kernel takes the constexpr
        ``PDL`` and waits for the kernel before it where ``kernels/pdl.py`` says."""
        if chained and self.early:
            kwargs.update(PDL=True, launch_pdl=self._launched > 0)
        self._launched += 1
        launch(kernel, grid, *args, **kwargs)
        if not self.recording:
            return
        slots = tuple((pos, self._slot.get(id(_carried(a))), _layout(a))
                      for pos, a in enumerate(args) if _carried(a) is not None)
        if any(slot is None for _, slot, _ in slots):
            self._complete = False
            return
        bound = bind(kernel, args, kwargs)
        if bound is not None:
            binary, params = bound
            if any(params[pos] is not args[pos] for pos, _, _ in slots):
                bound = None
            else:
                bound = (binary, _without_tensors(params))
        self._launches.append(_Launch(kernel, tuple(grid), _without_tensors(args), dict(kwargs), slots, bound))

    def plan(self, out: torch.Tensor) -> Plan | None:
        slot = self._slot.get(id(out))
        if not (self.recording and self._complete) or slot is None:
            return None
        allocs, launches = tuple(self._allocs), tuple(self._launches)
        return Plan(allocs, launches, slot, *_arena(allocs, launches, slot, len(self._tensors) - len(allocs)))


#: A workspace that only allocates and launches.
PLAIN = Workspace()
