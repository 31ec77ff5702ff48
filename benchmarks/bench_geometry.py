"""Geometry benchmark: Qhull vs our hulls, the strip heuristic, and EntropyNet preprocessing.

Protocols of the paper's geometry tables: uniform (unit square), parabolic (points on y = x^2, every
point a hull vertex) and clustered (8 Gaussian blobs) inputs, n = 1e3, 1e5, 1e6, plus Delaunay
(scipy) at 1e5. EntropyNet times include the network's forward pass, and the hull error of its
output is reported beside them. A second table shows Chan's output-sensitive time as the number
of hull vertices (and the set's entropy) falls.

    python benchmarks/bench_geometry.py           # full tables (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_geometry.py --quick   # n <= 1e5, one repeat
    pytest benchmarks/bench_geometry.py --benchmark-enable   # pytest-benchmark, Qhull alongside

Needs scipy; EntropyNet rows need torch. Timings are wall clock, median of the repeats.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import pytest
import scipy
import torch
from scipy.spatial import ConvexHull, Delaunay

from entropy_attn.geometry import (EntropyNet, ball_entropy, chan_hull, convex_hull, grid_anchors,
                                   hull_area_error, hull_hausdorff, monotone_chain, quickhull,
                                   strip_hull, train_entropynet)

ALGORITHMS = {
    "qhull": lambda p: ConvexHull(p).vertices,
    "fast (A-T + chain)": convex_hull,
    "monotone chain": monotone_chain,
    "quickhull": quickhull,
    "chan": chan_hull,
    "strip heuristic": strip_hull,
}
# Python-level work per hull vertex: with h = n these would take minutes
SKIP = {("parabolic", "quickhull"): 1e4, ("parabolic", "chan"): 1e4}


def make_points(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """``[n, 2]`` float64 points of one of the protocols."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, 2))
    if kind == "parabolic":
        t = rng.uniform(-1, 1, n)
        return np.c_[t, t**2]
    if kind == "clustered":
        centres = rng.random((8, 2))
        return centres[rng.integers(0, 8, n)] + 0.02 * rng.normal(size=(n, 2))
    raise ValueError(kind)


def timed(fn, *args, repeats: int = 3):
    """(median seconds, last result) of ``fn(*args)``."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def trained_net(steps: int = 150) -> EntropyNet:
    """EntropyNet trained briefly on mixed protocol samples (fixed grid anchors, seed 0)."""
    kinds = ["uniform", "parabolic", "clustered"]

    def sample(gen):
        seed = int(torch.randint(1 << 30, (1,), generator=gen))
        return torch.from_numpy(np.stack([make_points(k, 512, seed + i) for i, k in enumerate(kinds)])).float()

    torch.manual_seed(0)
    net = EntropyNet(2)
    train_entropynet(net, sample, steps=steps, lr=1e-2, progress=False,
                     anchors=grid_anchors(16, 2, dtype=torch.float32))
    return net.eval()


def entropynet_hull(net: EntropyNet, pts: np.ndarray):
    """Preprocess with EntropyNet (float32, no grad), then the fast hull of S'."""
    with torch.no_grad():
        moved = net(torch.from_numpy(pts).float()).double().numpy()
    return moved, convex_hull(moved)


def hull_table(sizes, repeats, net):
    rows = []
    for kind in ("uniform", "parabolic", "clustered"):
        for n in sizes:
            pts = make_points(kind, n)
            row = {"kind": kind, "n": n, "h": len(convex_hull(pts))}
            reps = repeats if n < 10**6 else 1
            for name, fn in ALGORITHMS.items():
                row[name] = None if n > SKIP.get((kind, name), np.inf) else timed(fn, pts, repeats=reps)[0]
            if net is not None and n <= 10**5:
                row["entropynet + hull"], (moved, _) = timed(entropynet_hull, net, pts, repeats=reps)
                row["area err"] = hull_area_error(pts, moved)
                row["hausdorff"] = hull_hausdorff(pts, moved, 8) if row["h"] <= 2000 else None
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def delaunay_row(net, n=10**5):
    pts = make_points("uniform", n)
    t_raw = timed(Delaunay, pts, repeats=1)[0]
    start = time.perf_counter()
    with torch.no_grad():
        moved = net(torch.from_numpy(pts).float()).double().numpy()
    Delaunay(moved)
    return t_raw, time.perf_counter() - start, hull_area_error(pts, moved)


def chan_table(n=10**5):
    """Chan's time as the hull shrinks: h points on the unit circle, the rest in a disk of
    radius 0.5. Entropy = H_diff with 16 grid anchors (alpha = 10) on the normalized set."""
    rows = []
    rng = np.random.default_rng(0)
    inner = rng.normal(size=(n, 2))
    inner = 0.5 * np.sqrt(rng.random((n, 1))) * inner / np.linalg.norm(inner, axis=1, keepdims=True)
    for h in (3, 16, 256, 4096, 16384):
        t = 2 * np.pi * np.arange(h) / h
        pts = np.r_[np.c_[np.cos(t), np.sin(t)], inner[: n - h]]
        ent = ball_entropy(torch.from_numpy(pts), grid_anchors(16, 2)).item()
        rows.append((h, ent, timed(chan_hull, pts)[0], timed(convex_hull, pts)[0],
                     timed(lambda p: ConvexHull(p).vertices, pts)[0]))
    return rows


def _fmt(v, unit="s"):
    if v is None:
        return "—"
    return f"{v:.4f}" if unit == "s" else f"{v:.2e}"


def _fmt_row(row):
    cells = [row["kind"], f"{row['n']:.0e}", str(row["h"])]
    cells += [_fmt(row.get(name)) for name in ALGORITHMS]
    cells += [_fmt(row.get("entropynet + hull")), _fmt(row.get("area err"), "e"),
              _fmt(row.get("hausdorff"), "e")]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n <= 1e5, one repeat")
    args = parser.parse_args(argv)
    sizes = [10**3, 10**5] if args.quick else [10**3, 10**5, 10**6]
    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | "
          f"python {platform.python_version()} | numpy {np.__version__} | scipy {scipy.__version__} "
          f"| torch {torch.__version__} | threads {torch.get_num_threads()}")
    start = time.perf_counter()
    net = trained_net(60 if args.quick else 150)
    print(f"EntropyNet training: {time.perf_counter() - start:.1f} s\n")
    header = (["input", "n", "h"] + list(ALGORITHMS) + ["entropynet + hull", "area err", "hausdorff"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    hull_table(sizes, 1 if args.quick else 3, net)
    t_raw, t_net, err = delaunay_row(net)
    print(f"\nDelaunay, uniform 1e5: scipy {t_raw:.3f} s; EntropyNet + scipy {t_net:.3f} s "
          f"(hull area error of S' {err:.2e})")
    print("\n| h | H_diff (grid) | chan | fast | qhull |\n|---|---|---|---|---|")
    for h, ent, tc, tf, tq in chan_table(10**4 if args.quick else 10**5):
        print(f"| {h} | {ent:.3f} | {tc:.4f} | {tf:.4f} | {tq:.4f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------------------------
# pytest-benchmark: one group per input, Qhull side by side with ours


@pytest.mark.parametrize("kind,n", [("uniform", 10**6), ("uniform", 10**5), ("clustered", 10**5),
                                    ("parabolic", 10**5)])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_hull_speed(benchmark, kind, n, name):
    if n > SKIP.get((kind, name), np.inf):
        pytest.skip("h = n: minutes of Python-level work")
    benchmark.group = f"{kind} n={n:.0e}"
    pts = make_points(kind, n)
    out = benchmark.pedantic(ALGORITHMS[name], args=(pts,), rounds=3, iterations=1)
    assert len(out) >= 3


if __name__ == "__main__":
    main()
