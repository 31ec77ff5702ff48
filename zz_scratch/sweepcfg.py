import sys
sys.path.insert(0, "benchmarks")
import torch, triton
from bench_pruned import stripes
import entropy_attn.pruned as P
from entropy_attn._launch import _Config
from entropy_attn.pruned import pruned_attention
from entropy_attn import entropy_attention
VARIANTS = {128: [None, (64, 4, 3), (64, 4, 2), (128, 8, 4)], 64: [None, (128, 8, 3), (64, 4, 3), (64, 4, 2)]}
orig = P._sweep_config
for n, d, s in [(65536, 128, 0.9), (65536, 128, 0.95), (32768, 128, 0.8), (65536, 64, 0.9), (32768, 64, 0.8), (16384, 128, 0.9)]:
    h = 2048 // d
    q, k, v, tau = stripes(1, h, h, n, n, d, s)
    with torch.no_grad():
        ref = pruned_attention(q, k, v, tau=tau, mode="exact").float()
        for var in VARIANTS[d]:
            P._sweep_config = orig if var is None else (lambda cfg, d_, dv_, var=var: _Config(var[0], cfg.block_n, var[1], var[2]))
            res = []
            for mode in ("exact", "fast"):
                out = pruned_attention(q, k, v, tau=tau, mode=mode)
                err = (out.float() - ref).abs().max().item()
                ms = triton.testing.do_bench(lambda: pruned_attention(q, k, v, tau=tau, mode=mode), rep=300)
                res.append(f"{mode} {ms:.3f} ms err {err:.3g}")
            print(f"N={n} D={d} s={s} sweep={var or 'current'}: " + "; ".join(res), flush=True)
    P._sweep_config = orig
