"""The end of a run: where everything it wrote is, and its pictures.

``report_results`` (rank 0, after the summary) renders ``metrics.jsonl`` and ``memory_report.json``
into PNGs with ``recipe.plot`` when ``metrics.plots`` is on and matplotlib is installed (an optional
dependency: without it the report says how to get them), then prints one block that names each file
the run wrote: the metrics, the summary, the config, the adapter, the latest checkpoint, the memory
report, the PNGs and the profiler's traces. A file the config switched off is not listed; one that
should exist and does not is named as missing (a config that lies would otherwise go unnoticed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from recipe.config import JobConfig
from recipe.logging import log

__all__ = ["report_results", "result_paths", "write_plots"]


def write_plots(dump: Path, out: Path) -> tuple[list[Path], str | None]:
    """PNGs of ``dump`` into ``out``: (paths, None), or ([], why not)."""
    if importlib.util.find_spec("matplotlib") is None:
        return [], "matplotlib is not installed (pip install matplotlib), so no PNGs"
    from recipe.plot import plot_runs

    try:
        return plot_runs([dump], out), None
    except SystemExit as e:  # recipe.plot's bad-input exit: nothing to draw
        return [], f"no PNGs: {e.code}"


def result_paths(cfg: JobConfig, pngs: list[Path]) -> list[tuple[str, Path]]:
    """(what, path) for each file this configuration writes, in the order a user looks for them."""
    dump = Path(cfg.job.dump_folder)
    metrics = dump / cfg.metrics.save_folder
    rows = []
    if cfg.metrics.enable_jsonl:
        rows.append(("metrics (one JSON line per step)", metrics / "metrics.jsonl"))
    rows += [("summary (losses, step times, per-rank memory)", dump / "summary.json")]
    rows += [("config (everything this run used)", dump / "config.toml")]
    if cfg.checkpoint.export_adapter:
        rows.append(("LoRA adapter (PEFT)", dump / "adapter"))
    if cfg.checkpoint.enable:
        folder = dump / cfg.checkpoint.folder
        steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
        rows.append(("latest checkpoint", steps[-1] if steps else folder))
    if cfg.profiling.memory_report:
        rows.append(("memory report", metrics / "memory_report.json"))
    if cfg.metrics.enable_tensorboard:
        rows.append(("TensorBoard events", metrics / "tensorboard"))
    if cfg.profiling.enable_profiling:
        rows.append(("profiler traces", dump / cfg.profiling.save_folder / "traces"))
    rows += [(f"plot: {p.stem}", p) for p in pngs]
    return rows


def report_results(cfg: JobConfig, rank: int) -> list[tuple[str, Path]]:
    """Rank 0: write the PNGs (``metrics.plots``) and print where every result is; returns the rows."""
    if rank != 0:
        return []
    dump = Path(cfg.job.dump_folder)
    pngs, why = [], None
    if cfg.metrics.plots:
        pngs, why = write_plots(dump, dump / cfg.metrics.save_folder / "plots")
    rows = result_paths(cfg, pngs)
    width = max(len(what) for what, _ in rows)
    lines = [f"results in {dump.absolute()}:"]
    for what, path in rows:
        missing = "" if path.exists() else "  (missing)"
        lines.append(f"  {what:<{width}}  {path}{missing}")
    if why:
        lines.append(f"  (plots: {why})")
    log("\n".join(lines), rank)
    return rows
