"""The accuracy-vs-sparsity study: train every regularizer with several seeds, sweep tau after
each run, and put all curves on one figure with a markdown table.

    python -m examples.study --task vit --preset cpu --out runs/study_cpu
    python -m examples.study --task both --preset gpu-quick --jobs 4 --out runs/study_gpu

Each run is ``train_vit.main`` / ``train_lm.main`` with the preset's flags plus ``--reg``,
``--gamma`` (the preset's per-regularizer value unless ``--gamma`` is given), ``--seed`` and
``--out OUT/<task>/<reg>_s<seed>``. ``--jobs N`` runs N of them at a time as subprocesses (tiny
models leave most of a GPU idle); ``--jobs 1`` runs them in this process. ``--budget-s`` caps the
total training time: each run gets ``budget * jobs / runs`` seconds (``--time-limit``), on top of
which come start-up (kernel compilation), evaluation and the tau sweep.

Outputs under ``--out``: ``study.json`` (every run's sweep and the aggregates), ``study.csv``
(one row per run and tau), ``study.md`` (the table) and ``study_<task>.png`` (mean curve per
regularizer, error bars = std over seeds).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from examples.common import REGULARIZERS, in_range, plot_tradeoff, write_json

ROOT = Path(__file__).resolve().parents[1]
TAUS = ["--taus", "0", "0.001", "0.003", "0.01", "0.03", "0.1", "0.3"]

#: preset -> task -> flags for the training script. gamma per regularizer comes from GAMMAS.
PRESETS = {
    # seconds on a CPU: checks the plumbing (the tests use it)
    "smoke": {
        "vit": ["--dataset", "digits", "--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "32",
                "--steps", "8", "--threads", "1", "--device", "cpu", "--taus", "0", "0.01", "0.1"],
        "lm": ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
               "--steps", "8", "--max-bytes", "1000000", "--eval-batches", "2", "--threads", "1", "--device", "cpu",
               "--taus", "0", "0.01", "0.1"],
    },
    # minutes on a CPU
    "cpu": {
        "vit": ["--dataset", "digits", "--dim", "32", "--depth", "2", "--heads", "4", "--batch-size", "64",
                "--steps", "600", "--lr", "3e-3", "--threads", "1", "--device", "cpu", *TAUS],
        "lm": ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "128", "--batch-size", "16",
               "--steps", "400", "--max-bytes", "4000000", "--eval-batches", "8", "--threads", "1", "--device", "cpu",
               *TAUS],
    },
    # H100, bf16, --jobs 4: 5 regularizers x 3 seeds x 2 tasks in about 6 minutes (budget 200 s of
    # training, ~27 s per run, plus start-up and sweeps); --steps is a cap the time limit cuts short
    "gpu-quick": {
        "vit": ["--dataset", "shapes", "--n-train", "20000", "--dim", "128", "--depth", "4", "--heads", "4",
                "--batch-size", "256", "--steps", "3000", "--lr", "2e-3", "--device", "cuda", "--amp",
                "--workers", "0", *TAUS],
        "lm": ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "512", "--batch-size", "32",
               "--steps", "3000", "--lr", "2e-3", "--device", "cuda", "--amp", *TAUS],
    },
    # H100, bf16: longer runs (about 30-40 minutes with --jobs 4)
    "gpu-full": {
        "vit": ["--dataset", "shapes", "--n-train", "50000", "--dim", "192", "--depth", "6", "--heads", "6",
                "--batch-size", "256", "--epochs", "30", "--lr", "1e-3", "--device", "cuda", "--amp", *TAUS],
        "lm": ["--n-layer", "6", "--n-head", "6", "--n-embd", "384", "--block-size", "1024", "--batch-size", "32",
               "--steps", "5000", "--lr", "1e-3", "--device", "cuda", "--amp", *TAUS],
    },
}

#: preset -> default --budget-s (total training seconds): 30 runs x 4 jobs -> about 27 s of training each
PRESET_BUDGET_S = {"gpu-quick": 200.0}

#: regularizer -> gamma (none and topk carry no penalty). The penalties are normalized
#: (``--normalize``: entropy / log n), so one gamma serves shannon and range.
GAMMAS = {"none": 0.0, "topk": 0.0, "l2": 0.1, "shannon": 0.1, "range": 0.1}
SPARSITY_POINTS = (0.5, 0.8, 0.9, 0.95, 0.98)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("vit", "lm", "both"), default="vit")
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    p.add_argument("--regs", nargs="+", choices=REGULARIZERS, default=list(REGULARIZERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--gamma", type=float, default=None, help="one gamma for every penalized regularizer")
    p.add_argument("--budget-s", type=in_range(float, 0), default=argparse.SUPPRESS,
                   help="total training seconds over all runs (0: no limit; default: the preset's, "
                        + ", ".join(f"{k} {v:g}" for k, v in PRESET_BUDGET_S.items()) + ", others 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses when > 1)")
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags appended to every run's command line (e.g. --extra --steps 100)")
    return p


def run_argv(task: str, preset: str, reg: str, seed: int, gamma: float, out: Path, time_limit: float,
             extra: list[str]) -> list[str]:
    """The training script's command line for one run."""
    argv = [*PRESETS[preset][task], "--reg", reg, "--gamma", str(gamma), "--seed", str(seed), "--normalize",
            "--out", str(out), "--no-progress"]
    if time_limit > 0:
        argv += ["--time-limit", f"{time_limit:.1f}"]
    return argv + extra


def launch(task: str, argv: list[str], in_process: bool) -> bool:
    """Run one training run: ``main(argv)`` here (errors propagate), or a subprocess logging to
    ``<out>/log.txt``; a failed subprocess is reported with its log's tail and returns False, so
    the other runs (and the device time spent on them) still count."""
    out = Path(argv[argv.index("--out") + 1])
    if in_process:
        from examples import train_lm, train_vit

        {"vit": train_vit, "lm": train_lm}[task].main(argv)
        return True
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-m", f"examples.train_{task}", *argv], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (out / "log.txt").read_text().splitlines()[-15:]
        print(f"FAILED (exit {rc}): {task} {' '.join(argv)}\n  " + "\n  ".join(tail))
    return rc == 0


def value_at(sparsity: list[float], values: list[float], target: float) -> float | None:
    """A run's metric at ``target`` sparsity: linear interpolation along its sweep; its least
    sparse point when that is already sparser than ``target`` (top-k); None when even its
    sparsest point is below ``target``."""
    order = np.argsort(sparsity)
    s, v = np.asarray(sparsity)[order], np.asarray(values)[order]
    if target > s[-1]:
        return None
    return float(v[0]) if target < s[0] else float(np.interp(target, s, v))


def aggregate(runs: list[dict]) -> dict:
    """Per regularizer: mean / std over seeds of sparsity and the primary metric at each tau, of
    the metric at ``SPARSITY_POINTS`` (seeds whose sweep reaches it), and of the IoU."""
    out = {}
    for reg in dict.fromkeys(r["reg"] for r in runs):
        mine = [r for r in runs if r["reg"] == reg]
        key = mine[0]["primary"]
        taus = [p["tau"] for p in mine[0]["sweep"]]
        col = lambda k: np.array([[p[k] for p in r["sweep"]] for r in mine])
        agg = dict(seeds=len(mine), gamma=mine[0]["gamma"], metric=key, tau=taus,
                   sparsity=col("sparsity").mean(0).tolist(), value=col(key).mean(0).tolist(),
                   err=col(key).std(0).tolist(), entropy=col("entropy").mean(0).tolist())
        for s in SPARSITY_POINTS:
            vals = [v for r in mine if (v := value_at([p["sparsity"] for p in r["sweep"]],
                                                         [p[key] for p in r["sweep"]], s)) is not None]
            agg[f"at_{s}"] = (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None
        if "iou" in mine[0]:
            ious = np.array([[r["iou"]["iou"], r["iou"]["iou_random"], r["iou"]["iou_best"]] for r in mine])
            agg["iou"] = dict(mean=float(ious[:, 0].mean()), std=float(ious[:, 0].std()),
                              random=float(ious[:, 1].mean()), best=float(ious[:, 2].mean()))
        out[reg] = agg
    return out


def markdown_table(task: str, agg: dict) -> str:
    """The study's table for one task: dense metric, metric at fixed sparsities, entropy, IoU."""
    fmt = lambda m, s: f"{m:.4f} ± {s:.4f}" if m is not None else "n/a"
    metric = next(iter(agg.values()))["metric"]
    heads = ["reg", "gamma", "seeds", f"dense {metric}", "entropy / log n (tau=0)",
             *[f"{metric} @ {int(s * 100)}% sparsity" for s in SPARSITY_POINTS], "max sparsity"]
    has_iou = any("iou" in a for a in agg.values())
    if has_iou:
        heads.append("attention-object IoU")
    lines = [f"### {task}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for reg, a in agg.items():
        i0 = a["tau"].index(0.0) if 0.0 in a["tau"] else 0
        row = [reg, f"{a['gamma']:g}", str(a["seeds"]), fmt(a["value"][i0], a["err"][i0]), f"{a['entropy'][i0]:.3f}"]
        for s in SPARSITY_POINTS:
            v = a[f"at_{s}"]
            row.append("n/a" if v is None else f"{fmt(v[0], v[1])} ({v[2]})")
        row.append(f"{max(a['sparsity']):.3f}")
        if has_iou:
            row.append(f"{a['iou']['mean']:.3f} ± {a['iou']['std']:.3f}" if "iou" in a else "")
        lines.append("| " + " | ".join(row) + " |")
    if has_iou:
        a = next(a for a in agg.values() if "iou" in a)
        lines += ["", f"IoU of random patches {a['iou']['random']:.3f}, best reachable {a['iou']['best']:.3f} "
                      "(protocol: examples/train_vit.py docstring)."]
    lines += ["", f"`{metric} @ s% sparsity`: linear interpolation along each seed's tau sweep (a run already "
                  "sparser than s at tau = 0, as top-k can be, counts with its tau = 0 point), mean ± std over "
                  "the seeds whose sweep reaches s (count in brackets); n/a when none does."]
    return "\n".join(lines)


def write_csv(path: Path, runs: list[dict]) -> None:
    """One row per run and tau."""
    fields = ["task", "reg", "gamma", "seed", "tau", "sparsity", "entry_sparsity", "entropy", "accuracy", "ppl",
              "bpb", "loss", "iou"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            for p in r["sweep"]:
                w.writerow({**{k: r[k] for k in ("task", "reg", "gamma", "seed")}, **p,
                            "iou": r.get("iou", {}).get("iou", "")})


def main(argv: list[str] | None = None) -> dict:
    """Run the study; returns ``{task: {"runs": [...], "aggregate": {...}}}``."""
    args = build_parser().parse_args(argv)
    tasks = ["vit", "lm"] if args.task == "both" else [args.task]
    plan = [(t, reg, seed) for t in tasks for reg in args.regs for seed in args.seeds]
    # unset --budget-s: the preset's, recorded in args (study.json) as the budget the runs had
    budget = vars(args).setdefault("budget_s", PRESET_BUDGET_S.get(args.preset, 0.0))
    time_limit = budget * args.jobs / len(plan) if budget else 0.0
    jobs = []
    for task, reg, seed in plan:
        gamma = GAMMAS[reg] if args.gamma is None or reg in ("none", "topk") else args.gamma
        out = args.out / task / f"{reg}_s{seed}"
        jobs.append((task, run_argv(task, args.preset, reg, seed, gamma, out, time_limit, args.extra), out))
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        ok = list(pool.map(lambda j: launch(j[0], j[1], args.jobs == 1), jobs))
    print(f"{sum(ok)} of {len(jobs)} runs succeeded in {time.perf_counter() - start:.0f}s")

    result, tables = {}, []
    for task in tasks:
        runs = [json.loads((out / "metrics.json").read_text()) for (t, _, out), good in zip(jobs, ok) if t == task and good]
        if not runs:
            continue
        agg = aggregate(runs)
        result[task] = dict(runs=runs, aggregate=agg)
        tables.append(markdown_table(task, agg))
        ylabel = "validation accuracy" if task == "vit" else "validation perplexity (bytes)"
        plot_tradeoff({f"{reg} (γ={a['gamma']:g})": a for reg, a in agg.items()}, args.out / f"study_{task}.png",
                      ylabel, f"{task}: {args.preset}, {len(args.seeds)} seed(s), mean ± std")
    write_json(args.out / "study.json", dict(args=vars(args), **result))
    write_csv(args.out / "study.csv", [r for t in result for r in result[t]["runs"]])
    (args.out / "study.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))
    return result


if __name__ == "__main__":
    main()
