"""Where does a training step's time go? GPU kernel time against wall time, top kernels, idle GPU time.

    torchrun --standalone --nproc_per_node 2 benchmarks/profile_step.py [--section.key=value ...]

Runs the recipe's Trainer for a few steps, profiles one step with the torch profiler and prints (rank
0): wall time of the step, the summed GPU kernel time (if it is far below the wall time, the step is
bound by the CPU or by synchronisations, not by the GPU), the operators with the most GPU time, and
where the GPU idles: the gaps between compute kernels (copies on their own stream do not count as
busy), by size, and what the host was doing during them (per thread, the innermost operator open at
the middle of each gap, and the step phase it belongs to: data, forward, backward, finish (unscale,
clip, non-finite check), optimizer). Under the profiler every launch costs more, so the idle time is an
upper bound; the attribution says which host work the GPU waits for.
"""

from __future__ import annotations

import bisect
import sys
import time
from collections import defaultdict
from collections.abc import Iterable

import torch

from recipe.config import load_config
from recipe.train import Trainer

# Device activity that is not compute: a step waiting on these is waiting on a copy, not on the host.
_NOT_COMPUTE = ("Memcpy", "Memset")


def idle_gaps(busy: Iterable[tuple[float, float]], window: tuple[float, float], min_us: float = 5.0):
    """The intervals of ``window`` covered by no ``busy`` interval, each at least ``min_us`` long."""
    merged: list[list[float]] = []
    for s, e in sorted(busy):
        s, e = max(s, window[0]), min(e, window[1])
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    gaps, t = [], window[0]
    for s, e in merged:
        if s - t >= min_us:
            gaps.append((t, s))
        t = max(t, e)
    if window[1] - t >= min_us:
        gaps.append((t, window[1]))
    return gaps


class _Thread:
    """One host thread's operators (name, start, end, phase), for the innermost one open at a time."""

    def __init__(self, ops: list[tuple[str, float, float, str]]):
        self.ops = sorted(ops, key=lambda o: o[1])
        self.starts = [o[1] for o in self.ops]

    def open_at(self, t: float, max_walk: int = 20000):
        # Nested operators: the innermost open one is the latest-starting operator still open at t.
        i = bisect.bisect_right(self.starts, t) - 1
        for k in range(i, max(i - max_walk, -1), -1):
            if self.ops[k][2] >= t:
                return self.ops[k]
        return None


def attribute(gaps, threads: dict[str, list[tuple[str, float, float, str]]]):
    """Idle microseconds per (thread, innermost open operator) and per (thread, phase): each gap is
    charged, on every thread, to what that thread had open at the gap's middle ("(idle)": nothing)."""
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    by_phase: dict[tuple[str, str], float] = defaultdict(float)
    index = {name: _Thread(ops) for name, ops in threads.items()}
    for s, e in gaps:
        mid = (s + e) / 2
        for name, th in index.items():
            op = th.open_at(mid)
            by_op[(name, op[0] if op else "(idle)")] += e - s
            by_phase[(name, op[3] if op else "(idle)")] += e - s
    return by_op, by_phase


def gap_report(gaps, window: tuple[float, float], by_op, by_phase, top: int = 12) -> str:
    span = window[1] - window[0]
    idle = sum(e - s for s, e in gaps)
    lines = [
        f"GPU idle: {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms ({idle / span:.1%}) in {len(gaps)} gaps "
        "between compute kernels"
    ]
    buckets = [(0, 50), (50, 500), (500, 5000), (5000, float("inf"))]
    for lo, hi in buckets:
        sel = [e - s for s, e in gaps if lo <= e - s < hi]
        name = f"{lo / 1e3:g}-{hi / 1e3:g} ms" if hi != float("inf") else f">= {lo / 1e3:g} ms"
        lines.append(f"  gaps {name:>12}: {len(sel):6d}, {sum(sel) / 1e3:8.1f} ms")
    for title, table in (("phase", by_phase), ("innermost host operator", by_op)):
        lines.append(f"idle time by thread and {title} open at the gap's middle:")
        for (thread, what), us in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {us / 1e3:8.1f} ms  {thread:<10} {what[:90]}")
    return "\n".join(lines)


def _phase_of(e, phases: set[str]) -> str:
    p = e
    while p is not None:
        if p.name in phases:
            return p.name
        p = p.cpu_parent
    return "(outside the phases)"


def analyse_gaps(prof, phases: set[str], main_thread_op: str) -> str | None:
    """The idle report of one profiled step (None without GPU kernels, e.g. on CPU)."""
    evs = prof.events()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    busy = [
        (e.time_range.start, e.time_range.end)
        for e in evs
        if e.device_type == cuda and not e.is_user_annotation and not e.name.startswith(_NOT_COMPUTE)
    ]
    if not busy:
        return None
    host = [e for e in evs if e.device_type == cpu]
    step = next((e for e in host if e.name == main_thread_op), None)
    start = step.time_range.start if step else min(e.time_range.start for e in host)
    window = (start, max(e for _, e in busy))
    main = step.thread if step else None
    threads: dict[str, list] = defaultdict(list)
    for e in host:
        if e.name == main_thread_op:
            continue
        name = "main" if e.thread == main else f"thread {e.thread}"
        threads[name].append((e.name, e.time_range.start, e.time_range.end, _phase_of(e, phases)))
    gaps = idle_gaps(busy, window)
    by_op, by_phase = attribute(gaps, threads)
    return gap_report(gaps, window, by_op, by_phase)


class _Phases:
    """record_function ranges around the step's phases (data, forward, backward, finish, optimizer),
    installed on one Trainer by wrapping its attributes (the recipe itself stays unannotated)."""

    NAMES = ("step: data", "step: forward", "step: backward", "step: finish", "step: optimizer")

    def __init__(self, tr: Trainer):
        def wrap(obj, attr, label):
            fn = getattr(obj, attr)

            def run(*a, **k):
                with torch.profiler.record_function(label):
                    return fn(*a, **k)

            setattr(obj, attr, run)

        wrap(tr.loader, "micro_batches", "step: data")
        wrap(tr.model, "forward", "step: forward")
        wrap(tr.rules, "finish", "step: finish")
        wrap(tr.optimizer, "step", "step: optimizer")
        self._backward = torch.autograd.backward

        def backward(*a, **k):
            with torch.profiler.record_function("step: backward"):
                return self._backward(*a, **k)

        torch.autograd.backward = backward

    def close(self) -> None:
        torch.autograd.backward = self._backward


def main() -> None:
    cfg = load_config(sys.argv[1:])
    tr = Trainer(cfg)
    tr.model.train()
    for _ in range(2):
        tr.train_step()
    phases = _Phases(tr)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if tr.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        with torch.profiler.record_function("profiled step"):
            tr.train_step()
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    phases.close()
    if tr.dist.is_main:
        ka = prof.key_averages()
        # Kernels only: a CPU op's device time is its kernels' time again, and GPU user annotations
        # (FSDP's ranges) span kernels too, so summing every event counted kernels twice or more.
        kernels = [
            e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
        ]
        dev = sum(e.device_time_total for e in kernels) / 1e6
        print(f"profiled step: wall {wall:.3f}s, summed GPU kernel time {dev:.3f}s ({dev / wall:.0%} of wall)")
        print(
            ka.table(
                sort_by="self_device_time_total" if len(acts) > 1 else "self_cpu_time_total",
                row_limit=22,
                max_name_column_width=60,
            )
        )
        report = analyse_gaps(prof, set(_Phases.NAMES), "profiled step")
        print(report if report else "GPU idle: no GPU kernels in the profile (CPU run)")
    tr.close()


if __name__ == "__main__":
    main()
