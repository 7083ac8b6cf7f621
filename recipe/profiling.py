"""Where every GiB and second goes: CUDA memory snapshots, torch profiler traces, per-phase memory report.

All three are driven by the ``[profiling]`` config section and cost nothing when off (no profiler
object, no ``_record_memory_history``, no hooks):

* memory snapshots (``enable_memory_snapshot``, CUDA only; on CPU they are skipped with one message):
  ``torch.cuda.memory._record_memory_history(max_entries=...)`` starts before the first step of
  ``memory_snapshot_steps`` and ``<dump>/<save_folder>/memory_snapshot/rank{r}_step{N}.pickle`` is
  dumped after the last one (N = that last step). Drag the pickle onto https://pytorch.org/memory_viz.
  With ``memory_snapshot_on_oom`` (default) recording runs from the first training step on, and an
  out-of-memory error inside a step dumps ``rank{r}_oom.pickle`` before it is re-raised.
* torch profiler (``enable_profiling``): each step of ``profile_steps`` is traced (CPU, plus CUDA when
  available; shapes and memory recorded, no stacks) and exported as a Chrome trace
  ``<dump>/<save_folder>/traces/rank{r}_step{N}.json`` (open it in https://ui.perfetto.dev or
  chrome://tracing), with the top operators beside it in ``rank{r}_step{N}_ops.txt``.
* memory report (``memory_report``): per rank, GiB at each phase of training (``PHASES``), gathered to
  rank 0, printed as a table at the end of training and saved as
  ``<dump>/<metrics.save_folder>/memory_report.json``.

Memory report phases. GPU numbers are the CUDA caching allocator's *allocated* bytes (tensors alive;
``gpu_reserved`` adds what the allocator holds cached); host numbers are the process's resident set:

=================== ===================================================================================
``load``            peak during model build + checkpoint load (sharded 4-bit base + LoRA materialized)
``after_load``      allocated right after load
``forward_peak``    peak during a forward pass (max over micro-batches and steps)
``backward_peak``   peak during a backward pass (incl. activation recomputation)
``optimizer_peak``  peak during ``optimizer.step`` (the first step also creates the Adam states)
``after_optimizer`` allocated at the end of a step (after ``zero_grad``): the steady state between steps
=================== ===================================================================================

Phase peaks come from ``torch.cuda.reset_peak_memory_stats`` at the start of a phase and
``max_memory_allocated`` at its end, taken from module / optimizer hooks: allocator statistics are kept
on the host in program order, so no device synchronisation is added. Every training step is measured and
the maximum is kept. On CPU the GPU columns are ``null`` ("n/a") and the host columns hold the resident
set at the end of each phase (``load``: the process's peak RSS up to the end of load).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from recipe.logging import log
from recipe.metrics import host_rss_gib, reset_peak_memory

__all__ = ["Profiler", "MemoryReport", "PHASES", "format_memory_table"]

PHASES = ("load", "after_load", "forward_peak", "backward_peak", "optimizer_peak", "after_optimizer")
_GIB = 2**30


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _ranges(steps) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    runs: list[list[int]] = []
    for s in sorted(steps or []):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


class MemoryReport:
    """Per-phase memory of one rank; ``enabled=False`` makes every method a no-op (no hooks)."""

    def __init__(
        self, enabled: bool, device: torch.device, rank: int = 0, world_size: int = 1, path: Path | None = None
    ):
        self.enabled = enabled
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank, self.world_size, self.path = rank, world_size, path
        self.gpu: dict[str, float | None] = dict.fromkeys(PHASES)
        self.gpu_reserved: dict[str, float | None] = dict.fromkeys(PHASES)
        self.host: dict[str, float | None] = dict.fromkeys(PHASES)
        self.steps: list[int] = []
        self._phase: str | None = None
        self._active = False
        self._handles: list[Any] = []

    # -- measurements ------------------------------------------------------
    def _put(self, name: str, keep_max: bool = True) -> None:
        f = _max if keep_max else (lambda _old, new: new)
        if self.cuda:
            self.gpu[name] = f(self.gpu[name], torch.cuda.memory_allocated(self.device) / _GIB)
            self.gpu_reserved[name] = f(self.gpu_reserved[name], torch.cuda.memory_reserved(self.device) / _GIB)
        self.host[name] = f(self.host[name], host_rss_gib())

    def after_load(self) -> None:
        """Call right after the model is built and its shards are loaded."""
        if not self.enabled:
            return
        if self.cuda:
            self.gpu["load"] = torch.cuda.max_memory_allocated(self.device) / _GIB
            self.gpu_reserved["load"] = torch.cuda.max_memory_reserved(self.device) / _GIB
        self.host["load"] = host_rss_gib(peak=True)
        self._put("after_load", keep_max=False)

    def _enter(self, phase: str) -> None:
        if not self._active:
            return
        self._close()
        if self.cuda:
            reset_peak_memory(self.device)
        self._phase = phase

    def _close(self) -> None:
        if self._phase is None:
            return
        name = f"{self._phase}_peak"
        if self.cuda:
            self.gpu[name] = _max(self.gpu[name], torch.cuda.max_memory_allocated(self.device) / _GIB)
            self.gpu_reserved[name] = _max(self.gpu_reserved[name], torch.cuda.max_memory_reserved(self.device) / _GIB)
        self.host[name] = _max(self.host[name], host_rss_gib())
        self._phase = None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Hook the phase boundaries: forward start/end on the root module, optimizer step start."""
        if not self.enabled or self._handles:
            return
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._enter("forward"), prepend=True),
            # The forward's end opens the backward phase; it ends at the next forward or optimizer step.
            model.register_forward_hook(lambda *_: self._enter("backward")),
        ]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self._enter("optimizer")))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def step_start(self, step: int) -> None:
        if self.enabled:
            self._active = True

    def step_end(self, step: int) -> None:
        if not self.enabled or not self._active:
            return
        self._close()
        self._active = False
        self._put("after_optimizer")
        self.steps.append(step)

    # -- report ------------------------------------------------------------
    def rank_record(self) -> dict:
        return {
            "rank": self.rank,
            "gpu": dict(self.gpu),
            "gpu_reserved": dict(self.gpu_reserved),
            "host_rss": dict(self.host),
            "host_rss_current": host_rss_gib(),
            "host_rss_peak": host_rss_gib(peak=True),
        }

    def finish(self) -> dict | None:
        """Gather every rank's record to rank 0 (a collective: all ranks call it); rank 0 prints the
        table, writes the JSON and returns the report, other ranks return None."""
        if not self.enabled:
            return None
        self.detach()
        rec = self.rank_record()
        dist = torch.distributed
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            records: list[Any] = [None] * self.world_size
            dist.all_gather_object(records, rec)
        else:
            records = [rec]
        if self.rank != 0:
            return None
        report = {
            "units": "GiB",
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "world_size": self.world_size,
            "phases": list(PHASES),
            "steps_measured": self.steps,
            "ranks": sorted(records, key=lambda r: r["rank"]),
        }
        print(format_memory_table(report), flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"memory report -> {self.path}", flush=True)
        return report


def format_memory_table(report: dict) -> str:
    def cell(v):
        return "n/a" if v is None else f"{v:.3f}"

    head = ["rank", "memory"] + list(report["phases"])
    rows = []
    for r in report["ranks"]:
        rows.append([str(r["rank"]), "gpu"] + [cell(r["gpu"].get(p)) for p in report["phases"]])
        rows.append([str(r["rank"]), "gpu_rsv"] + [cell(r["gpu_reserved"].get(p)) for p in report["phases"]])
        rows.append([str(r["rank"]), "host"] + [cell(r["host_rss"].get(p)) for p in report["phases"]])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda row: "  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True))
    title = (
        f"memory report ({report['units']}; {report['device_name']}; gpu = CUDA allocated, gpu_rsv = "
        f"reserved, host = process RSS; max over steps {_ranges(report['steps_measured'])})"
    )
    lines = [title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append(
        "host RSS now / peak per rank: "
        + ", ".join(
            f"rank {r['rank']}: {r['host_rss_current']:.3f} / {r['host_rss_peak']:.3f}" for r in report["ranks"]
        )
    )
    return "\n".join(lines)


class Profiler:
    """Memory snapshots + torch profiler + memory report, steered by the ``[profiling]`` section.

    Trainer calls, in order: ``after_load()`` once the model is loaded, ``start(model, optimizer)``
    before the first step, then per step ``step_start(n)`` / ``with oom_guard(n): train_step()`` /
    ``step_end(n)`` (n = 1-based step number), ``finish()`` on every rank after the last step and
    ``close()`` at exit (also after an error).
    """

    def __init__(
        self,
        p,
        total_steps: int,
        rank: int,
        world_size: int,
        device: torch.device,
        folder: Path,
        report_path: Path | None,
    ):
        """``p``: the ``[profiling]`` section; ``folder``: where snapshots and traces go;
        ``report_path``: where the memory report's JSON goes."""
        self.rank, self.device = rank, torch.device(device)
        self.folder = Path(folder)
        cuda = self.device.type == "cuda"
        self.snapshot = p.enable_memory_snapshot and cuda
        if p.enable_memory_snapshot and not cuda:
            log("memory snapshots need CUDA; skipped", rank)
        self.snapshot_steps = sorted(set(p.memory_snapshot_steps)) if self.snapshot else []
        self.snapshot_on_oom = self.snapshot and p.memory_snapshot_on_oom
        self.max_entries = p.memory_snapshot_max_entries
        self.profile_steps = set(p.profile_steps) if p.enable_profiling else set()
        for name, steps in (("memory_snapshot_steps", self.snapshot_steps), ("profile_steps", self.profile_steps)):
            late = sorted(s for s in steps if not 1 <= s <= total_steps)
            if late:
                log(f"profiling.{name}: step(s) {late} outside 1..{total_steps} (training.steps) never run", rank)
        # The snapshot window runs from its first to its last step and is dumped at the end: a last
        # step that never runs must not take the whole window with it, so the window ends with the run.
        inside = [s for s in self.snapshot_steps if s <= total_steps]
        if inside and inside[-1] < self.snapshot_steps[-1]:
            log(
                f"profiling.memory_snapshot_steps: the snapshot of steps {inside[0]}-{self.snapshot_steps[-1]} "
                f"is dumped at step {total_steps}, the last one",
                rank,
            )
            inside.append(total_steps)
        self.snapshot_steps = inside
        self.memory = MemoryReport(p.memory_report, self.device, rank, world_size, report_path)
        self.recording = False
        self._prof = None
        self.written: list[Path] = []

    # -- memory snapshots --------------------------------------------------
    def _snapshot_path(self, tag: str) -> Path:
        d = self.folder / "memory_snapshot"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"rank{self.rank}_{tag}.pickle"

    def _start_recording(self) -> None:
        if not self.recording:
            # Stack traces of allocations only (context="alloc"), Python frames only: with tracebacks of
            # frees too (context="all", the default) torch 2.11 training steps died in backward with
            # "SystemError: run_backward returned NULL without setting an exception"; C++ frames also
            # make the dump slow to symbolize.
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=self.max_entries)
            self.recording = True

    def _stop_recording(self) -> None:
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def dump_snapshot(self, tag: str) -> Path:
        path = self._snapshot_path(tag)
        torch.cuda.memory._dump_snapshot(str(path))
        self.written.append(path)
        return path

    def oom_guard(self, step: int):
        """Context manager around a train step: on CUDA OOM, dump ``rank{r}_oom.pickle`` and re-raise."""
        if not self.snapshot:
            return contextlib.nullcontext()
        return self._oom_guard(step)

    @contextlib.contextmanager
    def _oom_guard(self, step: int):
        try:
            yield
        except torch.OutOfMemoryError:
            if self.recording:
                path = self.dump_snapshot("oom")
                print(
                    f"[rank {self.rank}] CUDA out of memory in step {step}: memory snapshot -> {path} "
                    "(open it at https://pytorch.org/memory_viz)",
                    flush=True,
                )
            raise

    # -- training hooks ----------------------------------------------------
    def after_load(self) -> None:
        self.memory.after_load()

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before the first step: ``peak_memory_gib`` counts from here (phase resets keep it a run peak)."""
        reset_peak_memory(self.device, keep_run_peak=False)
        self.memory.attach(model, optimizer)
        if self.snapshot_on_oom:
            self._start_recording()

    def step_start(self, step: int) -> None:
        if self.snapshot_steps and self.snapshot_steps[0] <= step <= self.snapshot_steps[-1]:
            self._start_recording()
        if step in self.profile_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(
                activities=activities,
                record_shapes=True,
                profile_memory=True,
                with_stack=False,
                acc_events=True,  # one cycle anyway; avoids torch's 'clears events' warning
            )
            self._prof.__enter__()
        self.memory.step_start(step)

    def step_end(self, step: int) -> None:
        self.memory.step_end(step)
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)
            d = self.folder / "traces"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"rank{self.rank}_step{step}.json"
            prof.export_chrome_trace(str(path))
            self.written.append(path)
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            try:
                table = prof.key_averages().table(sort_by=sort, row_limit=30)
                (d / f"rank{self.rank}_step{step}_ops.txt").write_text(table + "\n")
            except Exception as e:  # the summary is a convenience; never fail a run over it
                log(f"profiler op table not written: {e}", self.rank)
            log(f"profiler trace of step {step} -> {path}", self.rank)
        if self.snapshot_steps and step == self.snapshot_steps[-1]:
            path = self.dump_snapshot(f"step{step}")
            log(
                f"memory snapshot of steps {self.snapshot_steps[0]}-{step} -> {path} "
                "(open it at https://pytorch.org/memory_viz)",
                self.rank,
            )
            if not self.snapshot_on_oom:
                self._stop_recording()

    def finish(self) -> dict | None:
        return self.memory.finish()

    def close(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            with contextlib.suppress(Exception):
                prof.__exit__(None, None, None)
        self._stop_recording()
        self.memory.detach()
