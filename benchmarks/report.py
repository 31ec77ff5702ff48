"""Print the tables of a benchmark run: ``python benchmarks/report.py bench.json [--markdown]``.

Rows are grouped by ``extra_info['group']``; each row shows the labels, the median time per call
(a round's time over ``extra_info['calls']``, 1 unless the round ran calls back to back), TFLOP/s
(from ``extra_info['flops']``, MATH.md section 6) and the peak device memory of one call.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    data, groups = rows_of(args.json)
    m = data.get("machine_info", {})
    # $COMMIT (set by scripts/gpu_check.sh) names the commit where the run's git checkout cannot
    commit = os.environ.get("COMMIT") or data.get("commit_info", {}).get("id", "")[:10]
    print(f"# {data.get('datetime', '')}  {m.get('node', '')}  commit {commit}")
    for name, rows in groups.items():
        print(f"\n## {name}\n")
        print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
