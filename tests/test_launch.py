"""The host-side launch helpers: ``cdiv``, ``next_pow2``, the early-launch switch and the direct launch path
(``entropy_attn._fastlaunch``), which must run a cached binary only for arguments Triton itself would
run it for."""
import math

import pytest
import torch
import triton
import triton.language as tl

from entropy_attn import _fastlaunch, _launch
from entropy_attn._launch import cdiv, next_pow2


@pytest.mark.parametrize("a", [0, 1, 2, 15, 16, 17, 1000, 65537])
@pytest.mark.parametrize("b", [1, 3, 16, 64, 128])
def test_cdiv(a, b):
    assert cdiv(a, b) == math.ceil(a / b)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 64, 100, 129, 4097])
def test_next_pow2(n):
    p = next_pow2(n)
    assert p >= max(n, 1) and p & (p - 1) == 0 and (p == 1 or p // 2 < n)


@triton.jit
def _gather(X, Y, n, stride, offset, BLOCK: tl.constexpr, SCALE: tl.constexpr):
    """Y[i] = SCALE * X[offset + i * stride] for i < n."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offset + i * stride, mask=i < n)
    tl.store(Y + i, x * SCALE, mask=i < n)


def _check_gather(x, n, stride, offset, scale, device, warps=1):
    y = torch.full((n,), -1.0, dtype=x.dtype, device=device)
    _fastlaunch.launch(_gather, (cdiv(n, 32),), x, y, n, stride, offset, BLOCK=32, SCALE=scale, num_warps=warps)
    torch.testing.assert_close(y, scale * x[offset: offset + n * stride: stride][:n], rtol=0, atol=0)


@pytest.mark.parametrize("allowed", [False, True])
def test_pdl_switch_restores_the_setting(monkeypatch, allowed):
    monkeypatch.setattr(_launch, "PDL_ENABLED", allowed)
    with pytest.raises(RuntimeError), _launch.pdl_switch() as switch:
        switch(True)
        assert _launch.PDL_ENABLED is allowed  # never on where it was not allowed
        switch(False)
        assert _launch.PDL_ENABLED is False
        raise RuntimeError
    assert _launch.PDL_ENABLED is allowed


def test_launch_matches_plain(device):
    """On every path (the plain one under the interpreter) a launch computes what the kernel says."""
    x = torch.randn(4096, device=device)
    for stride, offset, scale in [(1, 0, 1.0), (3, 5, 2.0), (1, 1, 1.0), (16, 32, -1.0)]:
        _check_gather(x, 100, stride, offset, scale, device)


@pytest.mark.gpu
def test_direct_launch_respects_specialization(monkeypatch):
    """Alternate arguments that Triton specializes differently (an integer equal to 1, divisible by
    16 or neither; a pointer 16-byte aligned or not; a constexpr; num_warps): each launch must take
    the binary of its own specialization. The repeats must not go through ``JITFunction.run``."""
    assert _fastlaunch.direct_enabled() == (
        ".".join(triton.__version__.split(".")[:2]) in _fastlaunch.DIRECT_VERSIONS)
    if not _fastlaunch.direct_enabled():
        pytest.fail(f"the direct path is off with Triton {triton.__version__}: check it and add the version")
    plain_runs = []
    run = type(_gather).run

    def counting_run(self, *args, **kwargs):
        plain_runs.append(kwargs.get("grid"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(_gather), "run", counting_run)
    monkeypatch.setattr(_fastlaunch, "_binaries", {})
    x = torch.randn(8192, device="cuda")
    x_odd = x[1:]  # 4-byte aligned only
    cases = [
        (x, 1, 0, 1.0, 1), (x, 16, 0, 1.0, 1), (x, 3, 7, 1.0, 1), (x_odd, 1, 0, 1.0, 1), (x, 1, 16, 1.0, 1),
        (x, 1, 0, 2.0, 1), (x_odd, 16, 3, -1.0, 1), (x, 1, 0, 1.0, 2),
    ]
    for rnd in range(3):
        for xx, stride, offset, scale, warps in cases:
            _check_gather(xx, 257, stride, offset, scale, "cuda", warps)
        if rnd == 0:
            first = len(plain_runs)
    assert len(plain_runs) == first, "repeat launches went through JITFunction.run"
    assert len(_fastlaunch._binaries) == first >= 6  # distinct specializations got distinct binaries


def test_plan_arena_layout():
    """A launch plan's arena (``entropy_attn._plan``) holds the buffers that only its kernels see, each
    at an offset aligned for Triton's pointer specialization, and none of the output, a filled buffer
    or one wrapped in a tensor descriptor; no arena when some launch has no binary to replay."""
    from entropy_attn._plan import ARENA_ALIGN, _arena, _Launch

    def step(slots, bound=("binary", ())):
        return _Launch(None, (1,), (), {}, slots, bound)

    f32 = torch.float32
    # Buffers 0-5 are slots 2-7 (two inputs first): 60 and 28 bytes, a filled one, one in a tensor
    # descriptor, the output, an empty one.
    allocs = (((3, 5), f32, None), ((7,), torch.int32, None), ((2, 2), f32, 0.0), ((4,), torch.bfloat16, None),
              ((9,), f32, None), ((0,), f32, None))
    launches = (step(((0, 0, None), (1, 2, None), (2, 5, ("layout",)))), step(((0, 3, None), (1, 6, None), (2, 7, None))))
    a = ARENA_ALIGN
    assert a >= 64 and a % 16 == 0
    assert _arena(allocs, launches, 6, 2) == ((0, a, None, None, None, 2 * a), 2 * a)
    assert _arena(allocs, launches + (step((), bound=None),), 6, 2) == (None, 0)


def test_plan_cache_keeps_the_plans_in_use(monkeypatch):
    """Past ``MAX_PLANS`` signatures the least recently used entry goes: a stream of signatures seen
    once (decoding against a growing key cache) does not evict a plan that is replayed between them
    (the cache used to be emptied whole, every 256 new signatures)."""
    from entropy_attn import _plan

    monkeypatch.setattr(_plan, "_plans", {})
    monkeypatch.setattr(_plan, "MAX_PLANS", 8)
    plan = object()
    assert _plan.lookup("in use") == (None, False)  # seen once
    assert _plan.lookup("in use") == (None, True)  # record now
    _plan.store("in use", plan)
    for step in range(50):
        assert _plan.lookup(("decoding", step)) == (None, False)
        assert _plan.lookup("in use") == (plan, False)
        assert len(_plan._plans) <= 8
    assert ("decoding", 49) in _plan._plans and ("decoding", 0) not in _plan._plans
