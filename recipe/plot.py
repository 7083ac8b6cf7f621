"""Render run directories into PNGs: ``python -m recipe.plot RUN_DIR [RUN_DIR2 ...] --out OUT_DIR``.

A run directory is a ``job.dump_folder``. Its ``config.toml`` names the metrics folder (default
``metrics/``), which holds ``metrics.jsonl`` and ``memory_report.json``. Written into OUT_DIR:

* ``loss.png``        loss per step, one line per run (labelled by directory name, e.g. 1 GPU vs 2 GPUs)
* ``tokens_per_s.png`` throughput of the whole job per step (``tokens_per_s_global``) per run
* ``mfu.png``         MFU per step, when some run has it (GPU runs of a known GPU)
* ``memory.png``      GiB per phase per rank (grouped bars) from each run's ``memory_report.json``:
                      GPU allocated where measured, and host RSS

matplotlib is an optional dependency (``pip install matplotlib``); the Agg backend is used, so no
display is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["main", "plot_runs", "load_run"]


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("recipe.plot needs matplotlib, an optional dependency: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics_folder(run: Path) -> Path:
    cfg = run / "config.toml"
    if cfg.exists():
        try:
            folder = tomllib.loads(cfg.read_text()).get("metrics", {}).get("save_folder", "metrics")
            if (run / folder).is_dir():
                return run / folder
        except tomllib.TOMLDecodeError:
            pass
    if (run / "metrics").is_dir():
        return run / "metrics"
    hits = sorted(run.rglob("metrics.jsonl")) or sorted(run.rglob("memory_report.json"))
    return hits[0].parent if hits else run


def load_run(run: str | Path) -> dict:
    """{'dir', 'steps': [records sorted by step, the last record of a step wins], 'memory': report|None}."""
    run = Path(run)
    if not run.is_dir():
        raise SystemExit(f"recipe.plot: {run} is not a directory (give a run's job.dump_folder)")
    folder = _metrics_folder(run)
    by_step: dict[int, dict] = {}
    jsonl = folder / "metrics.jsonl"
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            line = line.strip()
            if line:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec  # a re-run or resume into the same folder: last one wins
    mem = folder / "memory_report.json"
    memory = json.loads(mem.read_text()) if mem.exists() else None
    if not by_step and memory is None:
        raise SystemExit(f"recipe.plot: no metrics.jsonl or memory_report.json under {run}")
    return {"dir": run, "steps": [by_step[s] for s in sorted(by_step)], "memory": memory}


def _labels(runs: list[Path]) -> list[str]:
    """Shortest trailing path parts that tell the runs apart (the directory name when unique)."""
    parts = [r.resolve().parts for r in runs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in runs]


def _line_plot(plt, runs, labels, key, ylabel, title, path, fallback=None, scale=1.0):
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run, label in zip(runs, labels, strict=True):
        pts = []
        for r in run["steps"]:
            v = r.get(key, r.get(fallback) if fallback else None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                pts.append((r["step"], v * scale))
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory_plot(plt, runs, labels, path):
    panels = []  # (label, report, key, what)
    for run, label in zip(runs, labels, strict=True):
        rep = run["memory"]
        if rep is None:
            continue
        if any(v is not None for r in rep["ranks"] for v in r["gpu"].values()):
            panels.append((label, rep, "gpu", "GPU allocated"))
        panels.append((label, rep, "host_rss", "host RSS"))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False)
    for ax, (label, rep, key, what) in zip(axes[:, 0], panels, strict=True):
        phases = rep["phases"]
        ranks = rep["ranks"]
        width = 0.8 / max(len(ranks), 1)
        for j, r in enumerate(ranks):
            vals = [r[key].get(p) for p in phases]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(phases))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=f"rank {r['rank']}")
            if len(ranks) <= 4:
                ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases, rotation=15)
        ax.set_ylabel("GiB")
        ax.set_title(f"{label}: {what} per phase ({rep.get('device_name', rep.get('device', ''))})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write the PNGs for ``run_dirs`` into ``out``; returns the paths written."""
    plt = _import_pyplot()
    runs = [load_run(d) for d in run_dirs]
    labels = _labels([r["dir"] for r in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _line_plot(plt, runs, labels, "loss", "loss", "training loss", out / "loss.png"),
        _line_plot(
            plt,
            runs,
            labels,
            "tokens_per_s_global",
            "tokens / s (all ranks)",
            "throughput",
            out / "tokens_per_s.png",
            fallback="tokens_per_s",
        ),
        _line_plot(plt, runs, labels, "mfu", "MFU (%)", "model FLOPs utilisation", out / "mfu.png", scale=100.0),
        _memory_plot(plt, runs, labels, out / "memory.png"),
    ]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipe.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (job.dump_folder of each run)")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    args = ap.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)  # bad input: exit 2, like the other tools
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
