"""Tabulate benchmark results: recipe summary.json files and HF baseline JSON files.

    python benchmarks/report.py --recipe NAME=DIR/summary.json ... --hf NAME=hf.json ... [--compare A B]

Prints a markdown table (memory: maxima over ranks; tokens/s: the slowest rank) and, with --compare, the per-step loss
difference between two recipe runs.
"""

from __future__ import annotations

import argparse
import json


def _row(name, world, device, ranks, path):
    def mx(key):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        return max(vals) if vals else float("nan")

    # Throughput: the slowest rank's (the step ends when every rank's does); memory: the largest.
    tok = [r["tokens_per_s_per_gpu"] for r in ranks if r.get("tokens_per_s_per_gpu")]
    return (
        f"| {name} | {path} | {world} | {device} | {mx('load_peak_gib'):.2f} | {mx('train_peak_gib'):.2f} | "
        f"{mx('host_peak_rss_gib'):.2f} | {min(tok) if tok else float('nan'):,.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", nargs="*", default=[])
    ap.add_argument("--hf", nargs="*", default=[])
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        action="append",
        default=[],
        help="per-step loss difference of two recipe runs (repeatable)",
    )
    args = ap.parse_args()
    print(
        "| run | path | GPUs | card | load peak GiB/GPU | train peak GiB/GPU | host peak RSS GiB/rank | tokens/s/GPU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    losses = {}
    for spec in args.recipe:
        name, path = spec.split("=", 1)
        try:
            s = json.load(open(path))
        except (OSError, json.JSONDecodeError) as e:
            print(f"| {name} | recipe | missing ({e}) |")
            continue
        losses[name] = s["losses"]
        print(_row(name, s["world"], s["device"], s["ranks"], "recipe"))
    for spec in args.hf:
        name, path = spec.split("=", 1)
        try:
            recs = json.load(open(path))
        except (OSError, json.JSONDecodeError) as e:
            print(f"| {name} | HF | missing ({e}) |")
            continue
        print(_row(name, recs[0]["world"], recs[0]["device"], recs, recs[0]["path"]))
    for pair in args.compare:
        a, b = (losses.get(n) for n in pair)
        if a and b:
            # Runs of different lengths (e.g. one stopped early) are compared over their common steps;
            # the line below prints how many.
            diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
            print(
                f"\nloss |{pair[0]} - {pair[1]}| over {len(diffs)} steps: "
                f"max {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}; "
                f"first {a[0]:.4f}/{b[0]:.4f}, last {a[-1]:.4f}/{b[-1]:.4f}"
            )
            print("per step:", " ".join(f"{d:.1e}" for d in diffs))


if __name__ == "__main__":
    main()
