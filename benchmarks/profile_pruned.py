"""Where the time of ``pruned_attention`` goes, kernel by kernel (GPU): ``python benchmarks/profile_pruned.py``.

For each case (bf16, the sink-key inputs of ``bench_pruned.py``: prefill with B = 1, H = 2048 / D,
and decoding with B = 4, 32 query heads on 8 kv heads, D = 128) it prints the dense kernel's time,
then for each mode the time per call (``do_bench``), the CUDA time per call of every kernel the call
launches (torch.profiler, averaged over 5 calls, early launches off) and their sum: where the call
takes longer than its kernels, the GPU waits for the host. Used to decide what to optimize; the
speed numbers of record come from ``bench_pruned.py``.

``--host``: instead, where the host time of a call goes (cProfile over 200 calls of the host-bound
cases: prefill at 8k, decoding), the functions with the most time of their own first.
``--padded``: instead, prefill at 16k, s = 0.9, D = 64 and 128, without a mask and under the key
padding mask of ``bench_pruned.py::test_prefill_padded`` (the last eighth of the keys padded).
"""
import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pruned import padding, stripes  # noqa: E402

from entropy_attn import _launch, entropy_attention  # noqa: E402
from entropy_attn.pruned import clear_plans, pruned_attention  # noqa: E402

#: (B, H, Hkv, Nq, Nk, D, s)
CASES = [
    (1, 16, 16, 8192, 8192, 128, 0.95),
    (1, 16, 16, 16384, 16384, 128, 0.9),
    (1, 16, 16, 65536, 65536, 128, 0.95),
    (1, 32, 32, 65536, 65536, 64, 0.9),
    (4, 32, 8, 1, 131072, 128, 0.9),
    (4, 32, 8, 16, 32768, 128, 0.9),
    (1, 16, 16, 8192, 8192, 128, 0.8),
    (1, 32, 32, 8192, 8192, 64, 0.8),
]
#: (B, H, Hkv, Nq, Nk, D, s) of ``--padded``, each run without and with the padding mask
PADDED_CASES = [(1, 32, 32, 16384, 16384, 64, 0.9), (1, 16, 16, 16384, 16384, 128, 0.9)]
CALLS = 5


def kernel_times(fn) -> dict:
    """CUDA time per call (ms) of each kernel ``fn`` launches, by kernel name, with early launches
    off: a kernel launched early starts while the one before it runs and waits for it, so its CUDA
    time would include that wait (with them on, a fast call's kernels summed to more than the call)."""
    with _launch.pdl_switch() as switch:
        switch(False)
        clear_plans()
        try:
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(CALLS):
                    fn()
                torch.cuda.synchronize()
        finally:
            clear_plans()
    times = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            times[ev.key[:70]] += ev.device_time_total / 1e3 / CALLS
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def host_time(fn, calls: int = 20) -> float:
    """Host time per call (ms) of ``fn`` launched back to back without synchronizing: the floor of
    its time per call when its kernels are shorter than their launches."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return t


def host_profile(calls: int = 200, top: int = 30):
    """cProfile of ``calls`` back-to-back calls for each host-bound case and mode."""
    for b, h, hkv, nq, nk, d, s in (CASES[0], CASES[4]):
        q, k, v, tau = stripes(b, h, hkv, nq, nk, d, s)
        for mode in ("exact", "fast"):
            fn = lambda: pruned_attention(q, k, v, tau=tau, mode=mode)  # noqa: E731
            fn()
            print(f"\n=== host profile: B={b} H={h} Hkv={hkv} Nq={nq} Nk={nk} D={d} s={s} {mode}: "
                  f"{host_time(fn, calls):.3f} ms per call")
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            for _ in range(calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="profile the host time instead")
    parser.add_argument("--padded", action="store_true", help="the 16k cases without and with a padding mask")
    args = parser.parse_args()
    if args.host:
        host_profile()
        return
    runs = [(case, None) for case in CASES]
    if args.padded:
        runs = [(case, pad) for case in PADDED_CASES for pad in (False, True)]
    for (b, h, hkv, nq, nk, d, s), pad in runs:
        q, k, v, tau = stripes(b, h, hkv, nq, nk, d, s)
        masks = dict(key_padding_mask=padding(b, nk)) if pad else {}
        with torch.no_grad():
            dense = triton.testing.do_bench(lambda: entropy_attention(q, k, v, return_entropy=False, **masks))
            print(f"\n=== B={b} H={h} Hkv={hkv} Nq={nq} Nk={nk} D={d} s={s} tau={tau:.4g}"
                  f"{' padded' if pad else ''}: dense {dense:.3f} ms")
            for mode in ("exact", "fast"):
                call = lambda: pruned_attention(q, k, v, tau=tau, mode=mode, **masks)  # noqa: E731
                _, st = pruned_attention(q, k, v, tau=tau, mode=mode, return_stats=True, **masks)
                ms = triton.testing.do_bench(call)
                print(f"--- {mode}: {ms:.3f} ms ({dense / ms:.2f}x dense), tile sparsity "
                      f"{st['tile_sparsity'].mean().item():.3f}, pruned mass {st['pruned_mass'].mean().item():.4f}")
                print(f"    host {host_time(call):.3f} ms per call")
                times = kernel_times(call)
                for name, t in times.items():
                    print(f"    {t:8.3f} ms  {name}")
                print(f"    {sum(times.values()):8.3f} ms  (sum of kernels)")


if __name__ == "__main__":
    main()
