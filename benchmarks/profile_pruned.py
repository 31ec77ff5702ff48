"""Where the time of ``pruned_attention`` goes, kernel by kernel (GPU): ``python benchmarks/profile_pruned.py``.

For each case (bf16, B = 1, H = 2048 / D, the sink-key inputs of ``bench_pruned.py``) it prints the
dense kernel's time, then for each mode the CUDA time per call of every kernel the call launches
(torch.profiler, summed over 5 calls) and the tiles listed by each mode. Used to decide what to
optimize; the speed numbers of record come from ``bench_pruned.py``.
"""
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pruned import WIDTH, stripes  # noqa: E402

from entropy_attn import entropy_attention  # noqa: E402
from entropy_attn.pruned import pruned_attention  # noqa: E402

CASES = [(16384, 128, 0.9), (32768, 128, 0.95), (65536, 128, 0.95), (65536, 64, 0.9)]
CALLS = 5


def kernel_times(fn) -> dict:
    """CUDA time per call (ms) of each kernel ``fn`` launches, by kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            times[ev.key[:70]] += ev.device_time_total / 1e3 / CALLS
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main():
    for n, d, s in CASES:
        q, k, v, tau = stripes(1, WIDTH // d, WIDTH // d, n, n, d, s)
        with torch.no_grad():
            dense = triton.testing.do_bench(lambda: entropy_attention(q, k, v, return_entropy=False))
            print(f"\n=== N={n} D={d} s={s} tau={tau:.4g}: dense {dense:.2f} ms")
            for mode in ("exact", "fast"):
                _, st = pruned_attention(q, k, v, tau=tau, mode=mode, return_stats=True)
                ms = triton.testing.do_bench(lambda: pruned_attention(q, k, v, tau=tau, mode=mode))
                print(f"--- {mode}: {ms:.2f} ms ({dense / ms:.2f}x dense), tile sparsity "
                      f"{st['tile_sparsity'].mean().item():.3f}, pruned mass {st['pruned_mass'].mean().item():.4f}")
                times = kernel_times(lambda: pruned_attention(q, k, v, tau=tau, mode=mode))
                for name, t in times.items():
                    print(f"    {t:8.3f} ms  {name}")
                print(f"    {sum(times.values()):8.3f} ms  (sum of kernels)")


if __name__ == "__main__":
    main()
