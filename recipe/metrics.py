"""Per-step log line and the metrics JSONL file."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

__all__ = ["MetricsLogger", "peak_memory_gib", "host_rss_gib", "log"]


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_rss_gib(peak=True)


def host_rss_gib(peak: bool = False) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


class MetricsLogger:
    """One line per step on rank 0 (with a progress/ETA column) and one JSON object per step."""

    def __init__(self, folder: Path | None, total_steps: int, rank: int, log_freq: int = 1, enable_jsonl: bool = True):
        self.rank = rank
        self.total = total_steps
        self.log_freq = log_freq
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.file = None
        if rank == 0 and enable_jsonl and folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / "metrics.jsonl", "a")

    def step(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        if self.first_step is None:
            self.first_step, self.start = step, time.perf_counter() - record.get("step_time_s", 0.0)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
            self.file.flush()
        if step % self.log_freq and step != self.total:
            return
        done = step - self.first_step + 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step)
        bar_w = 20
        filled = int(bar_w * step / max(self.total, 1))
        bar = "#" * filled + "." * (bar_w - filled)
        parts = [
            f"step {step:>5}/{self.total} [{bar}]",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"gnorm {record['grad_norm']:.3f}",
            f"tok/s {record['tokens_per_s']:,.0f}",
            f"mem {record['peak_mem_gib']:.2f}GiB",
            f"eta {eta:,.0f}s",
        ]
        if record.get("skipped"):
            parts.append(f"SKIPPED (fp16 overflow, loss scale now {record['loss_scale']:g})")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
