import cProfile, pstats, sys, time, io
sys.path.insert(0, "benchmarks")
import torch
from bench_pruned import stripes
from entropy_attn.pruned import pruned_attention
import triton
q, k, v, tau = stripes(1, 16, 16, 8192, 8192, 128, 0.95)
with torch.no_grad():
    for _ in range(5):
        pruned_attention(q, k, v, tau=tau, mode="fast")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        pruned_attention(q, k, v, tau=tau, mode="fast")
    print("host per call ms", (time.perf_counter() - t0) / 200 * 1e3)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        pruned_attention(q, k, v, tau=tau, mode="fast")
    pr.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(40)
        print(s.getvalue())
