"""Where does a training step's time go? GPU kernel time against wall time, top kernels.

    torchrun --standalone --nproc_per_node 2 benchmarks/profile_step.py [--section.key=value ...]

Runs the recipe's Trainer for a few steps, profiles one step with the torch profiler and prints (rank
0): wall time of the step, the summed GPU kernel time (if it is far below the wall time, the step is
bound by the CPU or by synchronisations, not by the GPU) and the operators with the most GPU time.
"""

from __future__ import annotations

import sys
import time

import torch

from recipe.config import load_config
from recipe.train import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1:])
    tr = Trainer(cfg)
    tr.model.train()
    for _ in range(2):
        tr.train_step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if tr.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        tr.train_step()
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
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
    tr.close()


if __name__ == "__main__":
    main()
