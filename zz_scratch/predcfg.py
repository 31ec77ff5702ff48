import sys
sys.path.insert(0, "benchmarks")
import torch, triton
from bench_pruned import stripes
from profile_pruned import kernel_times
import entropy_attn.pruned as P
from entropy_attn.kernels import pruned as KP
from entropy_attn.pruned import pruned_attention
pp = KP.pruned_predict
orig_run = type(pp).run
orig_group = P._predict_group
def setv(qb, warps, stages):
    def run(self_, *a, **kw):
        kw["num_warps"], kw["num_stages"] = warps, stages
        return orig_run(pp, *a, **kw)
    pp.run = run.__get__(pp)
    P._predict_group = (lambda nqb, bh, dev: orig_group(nqb, bh, dev)) if qb is None else (lambda nqb, bh, dev: min(qb, nqb))
for n, d, s in [(65536, 128, 0.95), (65536, 64, 0.9), (16384, 128, 0.9), (8192, 128, 0.95)]:
    h = 2048 // d
    q, k, v, tau = stripes(1, h, h, n, n, d, s)
    with torch.no_grad():
        setv(None, 4, 2)
        base = pruned_attention(q, k, v, tau=tau, mode="fast")
        for qb, w, st in [(None, 4, 2), (None, 4, 3), (None, 8, 2), (8, 4, 2), (8, 8, 2), (8, 8, 3), (2, 4, 2)]:
            setv(qb, w, st)
            try:
                out = pruned_attention(q, k, v, tau=tau, mode="fast")
                same = torch.equal(out, base)
                t = kernel_times(lambda: pruned_attention(q, k, v, tau=tau, mode="fast"))
                pt = sum(val for key, val in t.items() if "pruned_predict" in key)
                print(f"N={n} D={d} s={s} QB={qb or 'auto'} warps={w} stages={st}: predict {pt:.3f} ms same={same}", flush=True)
            except Exception as e:
                print(f"N={n} D={d} QB={qb} warps={w} stages={st}: {type(e).__name__} {str(e)[:150]}", flush=True)
