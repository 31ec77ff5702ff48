"""Print the tables of a benchmark run: ``python benchmarks/report.py bench.json [--markdown]``.

Rows are grouped by ``extra_info['group']``; each row shows the labels, the median time per call
(a round's time over ``extra_info['calls']``, 1 unless the round ran calls back to back), TFLOP/s
(from ``extra_info['flops']``, MATH.md section 6) and the peak device memory of one call.
``--targets`` prints instead, for each prefill group of ``bench_pruned.py``, the issue-5 table: per
N, D and s the competitors' times and the fast mode's speed-ups, against its targets at s >= 0.8
(0.8 / (1 - s) x our dense kernel, 3x cuDNN; bold where met), and for the decoding group each
implementation's time with its speed-up over cuDNN, and for the masked groups (key padding,
documents) each mask's times with the fast and exact modes' speed-ups.
"""
import argparse
import json
import os
from collections import defaultdict

SKIP = {"group", "flops", "peak_bytes", "calls"}


def rows_of(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        med = b["stats"]["median"] / info.get("calls", 1)
        row = {k: v for k, v in info.items() if k not in SKIP}
        row["ms"] = f"{med * 1e3:.3f}"
        if info.get("flops"):
            row["TFLOP/s"] = f"{info['flops'] / med / 1e12:.1f}"
        if info.get("peak_bytes") is not None:
            row["peak MiB"] = f"{info['peak_bytes'] / 2**20:.0f}"
        groups[info.get("group", b["group"] or "ungrouped")].append(row)
    return data, groups


def table(rows, markdown):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols)] + [fmt.format(*r) for r in cells])


def targets(rows) -> str:
    """The issue-5 table of one ``bench_pruned.py`` prefill group (markdown)."""
    ms = {(r["impl"], r["N"], r["D"], r.get("s_target")): float(r["ms"]) for r in rows}
    out = ["| N | D | s | dense ms | flash ms | cuDNN ms | exact ms (x dense) | fast ms | fast x dense (target) "
           "| fast x cuDNN (target 3x) | fast err | pruned mass exact / fast |", "|" + "---|" * 12]
    for r in rows:
        if r["impl"] != "pruned_fast":
            continue
        n, d, s = r["N"], r["D"], r["s_target"]
        dense, flash, cudnn = (ms.get((impl, n, d, None)) for impl in ("ours_dense", "sdpa_flash", "sdpa_cudnn"))
        exact, fast = ms.get(("pruned_exact", n, d, s)), float(r["ms"])
        if None in (dense, flash, cudnn, exact):
            continue
        goal = 0.8 / (1 - s) if s >= 0.8 else None
        x_dense, x_cudnn = dense / fast, cudnn / fast
        mark = lambda x, t: f"**{x:.2f}x**" if t is not None and x >= t else f"{x:.2f}x"  # noqa: E731
        out.append(f"| {n // 1024}k | {d} | {s} | {dense:.2f} | {flash:.2f} | {cudnn:.2f} | {exact:.2f} "
                   f"({dense / exact:.2f}x) | {fast:.2f} | {mark(x_dense, goal and goal - 1e-9)}"
                   f"{f' ({goal:g}x)' if goal else ''} | {mark(x_cudnn, goal and 3.0)} | {r['fast_err']:.3g} | "
                   f"{r['mass_exact']:.4g} / {r['mass_fast']:.4g} |")
    return "\n".join(out)


def masked(rows) -> str:
    """The masked prefill tables of ``bench_pruned.py`` (key padding, documents; markdown): per D and
    mask, ms and speed-ups. cuDNN runs only the padding group's ``ends`` mask (a hole costs it
    nothing, so its time stands for both); FlexAttention only the documents group."""
    ms = {(r["impl"], r["D"], r.get("mask")): float(r["ms"]) for r in rows}
    flex = any(r["impl"] == "flex" for r in rows)
    out = ["| N | D | mask | cuDNN ms |" + (" FlexAttention ms |" if flex else "") + " dense ms | exact ms (x dense) "
           "| fast ms | fast x dense | fast x cuDNN |" + (" fast x FlexAttention |" if flex else "")
           + " exact x cuDNN | fast err |", "|" + "---|" * (13 if flex else 11)]
    for r in rows:
        if r["impl"] != "pruned_fast":
            continue
        d, mask, fast = r["D"], r.get("mask"), float(r["ms"])
        cudnn = ms.get(("sdpa_cudnn", d, mask), ms.get(("sdpa_cudnn", d, "ends")))
        dense, exact, fx = ms.get(("ours_dense", d, mask)), ms.get(("pruned_exact", d, mask)), ms.get(("flex", d, mask))
        if None in (cudnn, dense, exact) or (flex and fx is None):
            continue
        out.append(f"| {r['N'] // 1024}k | {d} | {mask or 'documents'} | {cudnn:.2f} |"
                   + (f" {fx:.2f} |" if flex else "")
                   + f" {dense:.2f} | {exact:.2f} ({dense / exact:.2f}x) | {fast:.2f} | {dense / fast:.2f}x "
                   f"| {cudnn / fast:.2f}x |" + (f" {fx / fast:.2f}x |" if flex else "")
                   + f" {cudnn / exact:.2f}x | {r['fast_err']:.3g} |")
    return "\n".join(out)


def decoding(rows) -> str:
    """The decoding table of ``bench_pruned.py`` (markdown): ms per implementation, x cuDNN."""
    ms = {(r["impl"], r["Nq"], r["Nk"], r["graph"]): float(r["ms"]) for r in rows}
    impls = ("ours_dense", "sdpa_flash", "sdpa_cudnn", "pruned_exact", "pruned_fast", "pruned_fast_summary")
    out = ["| Nq | Nk | graph | ours dense | SDPA flash | cuDNN | exact (x cuDNN) | fast (x cuDNN) | fast step with a "
           "KeySummary (x cuDNN) | tile sparsity | fast err | pruned mass exact / fast |", "|" + "---|" * 12]
    for r in rows:
        if r["impl"] != "pruned_fast_summary":
            continue
        key = (r["Nq"], r["Nk"], r["graph"])
        t = [ms.get((impl, *key)) for impl in impls]
        if None in t:
            continue
        cudnn = t[2]
        cells = [f"{x:.3f}" for x in t[:3]] + [f"{x:.3f} ({cudnn / x:.2f}x)" for x in t[3:]]
        out.append(f"| {r['Nq']} | {r['Nk'] // 1024}k | {'yes' if r['graph'] else 'no'} | " + " | ".join(cells)
                   + f" | {r['s']} | {r['fast_err']:.3g} | {r['mass_exact']:.4g} / {r['mass_fast']:.4g} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--targets", action="store_true", help="the issue-5 target tables of bench_pruned.py")
    args = ap.parse_args()
    data, groups = rows_of(args.json)
    if args.targets:
        for name, rows in groups.items():
            if name.startswith(("pruned prefill, key padding", "pruned prefill, documents")):
                print(f"\n## {name}\n\n{masked(rows)}")
            elif name.startswith("pruned prefill"):
                print(f"\n## {name}\n\n{targets(rows)}")
            elif name.startswith("pruned decoding"):
                print(f"\n## {name}\n\n{decoding(rows)}")
        return
    m = data.get("machine_info", {})
    # $COMMIT (set by scripts/gpu_check.sh) names the commit where the run's git checkout cannot
    commit = os.environ.get("COMMIT") or data.get("commit_info", {}).get("id", "")[:10]
    print(f"# {data.get('datetime', '')}  {m.get('node', '')}  commit {commit}")
    for name, rows in groups.items():
        print(f"\n## {name}\n")
        print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
