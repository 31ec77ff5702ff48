"""Sweep the block configurations of the Triton kernels on the GPU (bf16, 16k tokens) and print
the time of each: ``python benchmarks/tune_attention.py``. The winners go into
``entropy_attn/_launch.py`` (``_fwd_config``, ``_bwd_config``). ``--masked``: the forward's
configurations at N = 16k under ``bench_attention.py``'s masks instead (``--masked --causal``: with
the causal mask too; ``--masked --backward``: the backward's, with and without the entropy's
gradient)."""
import itertools
import sys

import torch
import triton

from entropy_attn import _launch, entropy_attention
from entropy_attn.flops import attention_flops

FWD = [  # (rows, keys, warps, stages[, maxnreg])
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 4, 4),
    (64, 64, 4, 3, 168),  # three programs per multiprocessor under a padding mask at D = 64 (RESULTS)
]
BWD = [  # (M1, N1, M2, N2, warps, stages)
    (32, 128, 128, 32, 4, 4), (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 3),
    (64, 64, 64, 64, 4, 3), (16, 128, 128, 16, 4, 4), (64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 4, 2),
]


def main():
    n, tokens, width = 4096, 16384, 2048
    for d, causal in itertools.product((64, 128), (False, True)):
        b, h = tokens // n, width // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        fl = attention_flops(b, h, n, n, d, causal=causal)
        for cfg in FWD:
            _launch._fwd_config = lambda *a, c=cfg, **kw: _launch._Config(*c)
            for ent in (True, False):
                try:
                    ms = triton.testing.do_bench(lambda: entropy_attention(q, k, v, causal=causal, return_entropy=ent, backend="triton"), return_mode="median")
                    print(f"fwd D={d} causal={causal} entropy={ent} cfg={cfg}: {ms:.3f} ms {fl / ms / 1e9:.0f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                    print(f"fwd D={d} cfg={cfg}: {type(e).__name__}", flush=True)
        sweep_backward(f"D={d} causal={causal}", (q, k, v), entropy_attention(q, k, v, causal=causal, backend="triton"), fl)


def sweep_backward(label, inputs, outputs, flops):
    """Time the backward of ``outputs = (out, entropy)`` into ``inputs = (q, k, v)`` under each
    ``BWD`` configuration, with the entropy's gradient and without."""
    out, ent = outputs
    do, de = torch.randn_like(out), torch.full_like(ent, 1e-6)
    for cfg in BWD:
        _launch._bwd_config = lambda *a, c=cfg: (_launch._Config(c[0], c[1], c[4], c[5]), _launch._Config(c[2], c[3], c[4], c[5]))
        for with_ent in (True, False):
            grads = ([out, ent], [do, de]) if with_ent else ([out], [do])
            try:
                ms = triton.testing.do_bench(lambda: torch.autograd.grad(grads[0], inputs, grads[1], retain_graph=True), return_mode="median")
                print(f"bwd {label} entropy={with_ent} cfg={cfg}: {ms:.3f} ms {2.5 * flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                print(f"bwd {label} cfg={cfg}: {type(e).__name__}", flush=True)


def masked(causal: bool, backward: bool):
    sys.path.insert(0, "benchmarks")
    from bench_attention import MASKS, masks

    n, tokens, width = 16384, 16384, 2048
    for d, kind in itertools.product((64, 128), MASKS):
        b, h = tokens // n, width // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
        ours, _ = masks(kind, b, n)
        fl = attention_flops(b, h, n, n, d, causal=causal)
        if backward:
            outputs = entropy_attention(q, k, v, causal=causal, backend="triton", **ours)
            sweep_backward(f"D={d} mask={kind} causal={causal}", (q, k, v), outputs, fl)
            continue
        for cfg, ent in itertools.product(FWD, (True, False)):
            _launch._fwd_config = lambda *a, c=cfg, **kw: _launch._Config(*c)
            call = lambda: entropy_attention(q, k, v, causal=causal, return_entropy=ent, backend="triton", **ours)  # noqa: E731
            try:
                ms = triton.testing.do_bench(call, return_mode="median")
                print(f"fwd D={d} mask={kind} causal={causal} entropy={ent} cfg={cfg}: {ms:.3f} ms {fl / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                print(f"fwd D={d} mask={kind} cfg={cfg}: {type(e).__name__}", flush=True)


if __name__ == "__main__":
    masked("--causal" in sys.argv, "--backward" in sys.argv) if "--masked" in sys.argv else main()
