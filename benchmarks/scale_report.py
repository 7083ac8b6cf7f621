"""One table of scale runs: measured peaks and tokens/s (each run's summary.json) beside the estimate.

``python benchmarks/scale_report.py OUTDIR NAME...``: for each NAME, ``OUTDIR/NAME.summary.json`` (written by
the run) and ``OUTDIR/NAME.args`` (the run's rank count, GPU cap and recipe.train arguments, one per line,
written by the shell script before the run) give one row; a run without a summary is reported with the
last error line of its log (e.g. out of memory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe import estimate as E  # noqa: E402
from recipe import planner  # noqa: E402
from recipe.config import load_config  # noqa: E402


def row(out: Path, name: str) -> str:
    spec = (out / f"{name}.args").read_text().split("\n")
    nproc, cap, args = int(spec[0]), spec[1], [a for a in spec[2:] if a]
    cfg = load_config([a for a in args if not a.startswith("--job.dump_folder")])
    summ = out / f"{name}.summary.json"
    if cfg.parallelism.plan == "auto":  # the layout the run trained with: the planner's for its GPUs and cap
        options, _ = planner.best(cfg, nproc, "h100", float(cap) if cap else None)
        planner.apply(cfg, options[0].layout, nproc)
    est = E.estimate(cfg, nproc, "h100")
    pred = f"{est.train_peak:.2f} / {est.load_peak:.2f} GiB, {est.tokens_per_s:,.0f}"
    if not summ.exists():
        log = out / f"{name}.log"
        lines = [x for x in (log.read_text().splitlines() if log.exists() else []) if "rror" in x]
        why = (lines[-1] if lines else "no summary")[:100].replace("|", "/")
        return f"| {name} | {cfg.data.seq_len:,} | {nproc} | {cap} | FAILED: {why} | | | | {pred} |"
    s = json.loads(summ.read_text())
    r = max(s["ranks"], key=lambda x: x["train_peak_gib"] or 0)
    gpu = "CPU" if r["train_peak_gib"] is None else f"{r['train_peak_gib']:.2f} / {r['load_peak_gib']:.2f}"
    losses = ", ".join(f"{x:.3f}" for x in s["losses"])
    tps = r["tokens_per_s_per_gpu"]
    return (
        f"| {name} | {cfg.data.seq_len:,} | {nproc} | {cap} | {gpu} | "
        f"{max(x['host_peak_rss_gib'] for x in s['ranks']):.1f} | {tps:,.0f} | {losses} | {pred} |"
    )


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    print(
        "| run | seq_len | ranks | GPU cap GiB | train / load peak GiB (max rank) | host GiB | tokens/s/GPU | "
        "losses | estimate: train / load, tokens/s (h100) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in argv[1:]:
        if (out / f"{name}.args").exists():
            print(row(out, name))


if __name__ == "__main__":
    main(sys.argv[1:])
