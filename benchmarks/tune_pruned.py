"""Sweep the programs of the pruned sweep (``pruned_attn``: rows, warps, stages per program against
the 128-row tile lists of prefill) on the GPU and print the time of each, beside our dense kernel:
``python benchmarks/tune_pruned.py``; ``--predict`` sweeps the fast predictor's programs instead
(``pruned_predict``: query blocks, warps, stages per program), and ``--copy-engine`` times the exact
mode with and without the copy engine's loads of K and V (``_kv_operands``: tensor descriptors where
the key range is not split, or plain loads everywhere), alternating, the better of two rounds.
``--early`` times the pruned call with and without early launches (programmatic dependent launch,
``kernels/pdl.py``) and ``--occupancy`` the fast mode with sweep programs that fit more of them on a
multiprocessor, each alternating against what is in use.
``--small`` runs the first two at 8k-16k instead, each call replayed from a CUDA graph (its kernels
only: called directly, a call's host time would hide its kernels there). The winners go into
``entropy_attn/pruned.py`` (``_sweep_config``, ``_predict_config``, ``_kv_operands``).
Inputs: the sink-key inputs of ``bench_pruned.py`` (bf16, B = 1, H = 2048 / D); decoding: 32 query
heads on 8 kv heads, D = 128, random.
"""
import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pruned import cuda_graph, stripes  # noqa: E402

from entropy_attn import _launch, entropy_attention, pruned  # noqa: E402

#: (rows, warps, stages) of one sweep program; rows divide the 128-row query blocks.
SWEEP = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3), (128, 8, 2), (128, 8, 3), (128, 4, 2),
         (32, 4, 2), (32, 2, 2)]
#: (rows, warps, stages, registers per thread) of sweep programs more of which share a multiprocessor
#: than of the shapes in use (two): its 65536 registers hold three programs of 4 warps at 168
#: registers per thread, four at 128; one stage where shared memory would hold no more than two.
OCCUPANCY = {128: [(64, 4, 1, 168)], 64: [(64, 4, 2, 128), (64, 4, 3, 128), (64, 4, 2, 96)]}
#: (N, D, s)
CASES = [(65536, 128, 0.95), (65536, 128, 0.9), (65536, 64, 0.9), (65536, 64, 0.8), (32768, 128, 0.9),
         (16384, 128, 0.8)]
#: (N, D, s) of ``--small``.
SMALL_CASES = [(8192, 128, 0.8), (8192, 128, 0.95), (8192, 64, 0.8), (8192, 64, 0.9), (16384, 128, 0.8),
               (16384, 128, 0.9), (16384, 64, 0.8)]


#: (query blocks, key blocks per step, warps, stages) of one predictor program.
PREDICT = [(4, 64, 4, 3), (4, 32, 4, 3), (4, 32, 4, 4), (8, 32, 8, 3), (4, 128, 8, 3), (4, 64, 4, 2), (8, 64, 8, 3),
           (2, 64, 4, 3), (1, 64, 4, 3), (2, 32, 4, 3)]


def time_ms(fn, graphed: bool = False) -> float:
    """Median ms of ``fn``, or of its replay from a CUDA graph (``graphed``)."""
    return triton.testing.do_bench(cuda_graph(fn) if graphed else fn, return_mode="median")


def sweep_predictor(cases=CASES, graphed=False):
    """The fast mode's time per call with each predictor shape of ``PREDICT``."""
    for n, d, s in cases:
        q, k, v, tau = stripes(1, 2048 // d, 2048 // d, n, n, d, s)
        print(f"N={n} D={d} s={s}", flush=True)
        with torch.no_grad():
            for qb, chunk, warps, stages in PREDICT:
                pruned._predict_config = lambda nqb, bh, dev, c=(qb, chunk, warps, stages): c
                pruned.clear_plans()  # the recorded launch plans hold the previous shape
                ms = time_ms(lambda: pruned.pruned_attention(q, k, v, tau=tau, mode="fast"), graphed)
                print(f"  fast predict={qb}qb x{chunk}kb x{warps}w{stages}s: {ms:.3f} ms", flush=True)


def sweep_programs(cases=CASES, graphed=False):
    """The pruned call's time per call with each sweep shape of ``SWEEP``, beside the dense kernel."""
    for n, d, s in cases:
        q, k, v, tau = stripes(1, 2048 // d, 2048 // d, n, n, d, s)
        with torch.no_grad():
            dense = time_ms(lambda: entropy_attention(q, k, v, return_entropy=False), graphed)
            print(f"N={n} D={d} s={s}: dense {dense:.3f} ms", flush=True)
            for rows, warps, stages in SWEEP:
                pruned._sweep_config = lambda cfg, d, dv, nk, c=(rows, warps, stages): pruned._Config(c[0], cfg.block_n, c[1], c[2])
                pruned.clear_plans()
                for mode in ("fast", "exact") if n == 65536 and d == 128 and s == 0.9 else ("fast",):
                    try:
                        ms = time_ms(lambda: pruned.pruned_attention(q, k, v, tau=tau, mode=mode), graphed)
                        print(f"  {mode} sweep={rows}x{warps}w{stages}s: {ms:.3f} ms ({dense / ms:.2f}x dense)", flush=True)
                    except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                        print(f"  {mode} sweep={rows}x{warps}w{stages}s: {type(e).__name__}: {e}", flush=True)


def occupancy():
    """The pruned call's time, replayed from a CUDA graph, with the sweep shape in use and with each
    of ``OCCUPANCY``, alternating, the better of two rounds (fast mode; exact mode where marked)."""
    in_use = pruned._sweep_config
    for n, d, s, mode in [(8192, 128, 0.8, "fast"), (8192, 128, 0.95, "fast"), (16384, 128, 0.9, "fast"),
                          (65536, 128, 0.95, "fast"), (8192, 64, 0.8, "fast"), (8192, 64, 0.95, "fast"),
                          (16384, 64, 0.8, "fast"), (16384, 64, 0.95, "fast"), (32768, 64, 0.8, "fast"),
                          (32768, 64, 0.9, "fast"), (65536, 64, 0.9, "fast"), (8192, 64, 0.8, "exact"),
                          (16384, 64, 0.9, "exact"), (32768, 64, 0.9, "exact")]:
        q, k, v, tau = stripes(1, 2048 // d, 2048 // d, n, n, d, s)

        def apply(shape):
            pruned._sweep_config = in_use if shape is None else (
                lambda cfg, d_, dv, nk, c=shape: pruned._Config(c[0], cfg.block_n, c[1], c[2], maxnreg=c[3]))

        with torch.no_grad():
            best = alternate([None] + OCCUPANCY[d], apply, lambda: pruned.pruned_attention(q, k, v, tau=tau, mode=mode),
                             graphed=True)
        print(f"{mode} N={n} D={d} s={s}: " + ", ".join(
            ("in use" if c is None else "{}x{}w{}s/{}r".format(*c)) + f" {ms:.3f} ms" for c, ms in best.items()), flush=True)
    pruned._sweep_config = in_use


def alternate(variants, apply, fn, graphed: bool = False, rounds: int = 2) -> dict:
    """The better of ``rounds`` medians of ``fn`` under each of ``variants`` (``apply(variant)`` sets
    one up), by variant: the variants alternate, and the launch plans are cleared between them."""
    best = {}
    for _ in range(rounds):
        for variant in variants:
            apply(variant)
            pruned.clear_plans()
            best[variant] = min(best.get(variant, float("inf")), time_ms(fn, graphed))
    return best


def copy_engine():
    """The exact mode's time per call with the copy engine's loads (``_launch.TMA_ENABLED``) and without."""
    enabled = _launch.TMA_ENABLED

    def timed(fn):
        best = alternate((False, True), lambda tma: setattr(_launch, "TMA_ENABLED", tma), fn)
        return best[False], best[True]

    print("| exact mode | plain ms | copy engine ms | speed-up |\n|---|---|---|---|")
    for n, d, s in CASES + [(8192, 128, 0.9), (8192, 64, 0.8), (16384, 64, 0.8)]:
        q, k, v, tau = stripes(1, 2048 // d, 2048 // d, n, n, d, s)
        with torch.no_grad():
            plain, tma = timed(lambda: pruned.pruned_attention(q, k, v, tau=tau, mode="exact"))
        print(f"| N={n} D={d} s={s} | {plain:.3f} | {tma:.3f} | {plain / tma:.3f}x |", flush=True)
    for nq, nk in [(1, 32768), (16, 32768), (1, 131072), (16, 131072)]:
        q = torch.randn(1, 32, nq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, nk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with torch.no_grad():
            plain, tma = timed(lambda: pruned.pruned_attention(q, k, v, tau=0.01, mode="exact"))
        print(f"| decoding {nq} x {nk} | {plain:.3f} | {tma:.3f} | {plain / tma:.3f}x |", flush=True)
    _launch.TMA_ENABLED = enabled


def bound_chunk():
    """The fast mode's time per call, replayed from a CUDA graph (its kernels only), with 16, 32 or
    64 listed key blocks per step of the sweep's pooled lse bound (``_bound_chunk``), alternating,
    the better of two rounds."""
    chunks = (16, 32, 64)
    print("| fast mode, CUDA graph | " + " | ".join(f"{c} blocks ms" for c in chunks) + " |")
    print("|---" * (len(chunks) + 1) + "|")
    for n, d, s in [(8192, 128, 0.95), (8192, 64, 0.8), (8192, 128, 0.8), (16384, 128, 0.9), (16384, 64, 0.8),
                    (32768, 128, 0.9), (32768, 64, 0.9), (65536, 128, 0.95), (65536, 64, 0.9)]:
        q, k, v, tau = stripes(1, 2048 // d, 2048 // d, n, n, d, s)
        with torch.no_grad():
            best = alternate(chunks, lambda c: setattr(pruned, "_bound_chunk", lambda nkb: c),
                             lambda: pruned.pruned_attention(q, k, v, tau=tau, mode="fast"), graphed=True)
        print(f"| N={n} D={d} s={s} | " + " | ".join(f"{best[c]:.3f}" for c in chunks) + " |", flush=True)


def early_launch():
    """The pruned call's time with and without early launches (``_launch.PDL_ENABLED``: programmatic
    dependent launch, ``kernels/pdl.py``), alternating, the better of three rounds, replayed from a
    CUDA graph and called directly (``do_bench``: calls back to back); outputs compared bitwise."""
    print("| call | graphed off ms | graphed on ms | speed-up | direct off ms | direct on ms | speed-up | equal |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(f"fast {n // 1024}k D{d} s {s}", "fast", stripes(1, 2048 // d, 2048 // d, n, n, d, s))
             for n, d, s in SMALL_CASES + [(65536, 128, 0.95), (65536, 64, 0.9)]]
    cases += [(f"exact {n // 1024}k D{d} s {s}", "exact", stripes(1, 2048 // d, 2048 // d, n, n, d, s))
              for n, d, s in [(8192, 128, 0.9), (16384, 64, 0.8)]]
    cases += [(f"{mode} decoding {nq} x {nk // 1024}k", mode, stripes(4, 32, 8, nq, nk, 128, 0.9, seed=1))
              for mode in ("fast", "exact") for nq, nk in [(1, 32768), (16, 131072)]]
    for name, mode, (q, k, v, tau) in cases:
        def call():
            return pruned.pruned_attention(q, k, v, tau=tau, mode=mode)

        with torch.no_grad(), _launch.pdl_switch() as switch:
            outs = {}
            for on in (False, True):
                switch(on)
                pruned.clear_plans()
                outs[on] = [call() for _ in range(3)][-1]
            graphed = alternate((False, True), switch, call, graphed=True, rounds=3)
            direct = alternate((False, True), switch, call, rounds=3)
        equal = torch.equal(outs[False], outs[True])
        print(f"| {name} | {graphed[False]:.3f} | {graphed[True]:.3f} | {graphed[False] / graphed[True]:.3f}x | "
              f"{direct[False]:.3f} | {direct[True]:.3f} | {direct[False] / direct[True]:.3f}x | {equal} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", action="store_true", help="sweep the predictor's programs")
    parser.add_argument("--copy-engine", action="store_true", help="time the exact mode with and without the copy engine")
    parser.add_argument("--bound-chunk", action="store_true", help="time the fast sweep's lse bound steps")
    parser.add_argument("--early", action="store_true", help="time the pruned call with and without early launches")
    parser.add_argument("--occupancy", action="store_true", help="time sweep shapes with more programs per multiprocessor")
    parser.add_argument("--small", action="store_true", help="sweep (or --predict) at 8k-16k, from CUDA graphs")
    args = parser.parse_args()
    if args.early or args.occupancy:
        (early_launch if args.early else occupancy)()
    elif args.copy_engine or args.bound_chunk:
        (copy_engine if args.copy_engine else bound_chunk)()
    else:
        cases = dict(cases=SMALL_CASES, graphed=True) if args.small else {}
        (sweep_predictor if args.predict else sweep_programs)(**cases)


if __name__ == "__main__":
    main()
