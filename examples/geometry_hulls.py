"""Geometry walk-through: exact hulls, entropy of point sets, and EntropyNet preprocessing.

    python examples/geometry_hulls.py [--plot hulls.png]

Prints the hull of a clustered set by each algorithm (all agree with scipy's Qhull), the
estimators against the exact range-partition entropy, and what a briefly trained EntropyNet does
to the hull (time including the network, area error beside it). With --plot (matplotlib) it
draws the input, S' and both hulls.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from entropy_attn.geometry import (EntropyNet, ball_entropy, chan_hull, convex_hull, grid_anchors,
                                   hull_area_error, hull_hausdorff, monotone_chain, quickhull,
                                   range_partition_entropy, train_entropynet)


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.random((6, 2))
    return centres[rng.integers(0, 6, n)] + 0.03 * rng.normal(size=(n, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", help="write a figure to this path (needs matplotlib)")
    args = parser.parse_args()

    pts = clustered(100_000, 0)
    for algo in (convex_hull, monotone_chain, quickhull, chan_hull):
        start = time.perf_counter()
        hull = algo(pts)
        print(f"{algo.__name__:>15}: {len(hull)} vertices in {time.perf_counter() - start:.4f} s")

    print("\nentropy of 1-D sets: exact H_w / n  vs  H_diff (16 grid anchors)")
    for spread in (0.01, 0.1, 1.0):
        x = np.random.default_rng(1).choice([0.0, 1.0, 3.0], 256) + spread * np.random.default_rng(2).normal(size=256)
        exact = range_partition_entropy(x, width=0.5) / len(x)
        est = ball_entropy(torch.from_numpy(x[:, None]), grid_anchors(16, 1)).item()
        print(f"  spread {spread:<5}: exact {exact:.3f}   H_diff {est:.3f}")

    torch.manual_seed(0)
    net = EntropyNet(2)
    train_entropynet(net, lambda g: torch.from_numpy(np.stack(
        [clustered(512, int(torch.randint(1 << 30, (1,), generator=g))) for _ in range(4)])).float(),
        steps=100, lr=1e-2, anchors=grid_anchors(16, 2, dtype=torch.float32))
    start = time.perf_counter()
    with torch.no_grad():
        moved = net(torch.from_numpy(pts).float()).double().numpy()
    hull_moved = convex_hull(moved)
    print(f"\nEntropyNet + hull: {time.perf_counter() - start:.3f} s, area error "
          f"{hull_area_error(pts, moved):.2e}, Hausdorff {hull_hausdorff(pts, moved):.2e}")

    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6))
        ax.scatter(*pts[::50].T, s=1, label="S")
        ax.scatter(*moved[::50].T, s=1, label="S'")
        for p, h, name in ((pts, convex_hull(pts), "hull(S)"), (moved, hull_moved, "hull(S')")):
            ax.plot(*np.r_[p[h], p[h[:1]]].T, label=name)
        ax.legend()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
