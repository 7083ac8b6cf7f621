"""Host time FSDP2 adds to a one-rank step: 32 blocks of 7 LoRA-sized adapter pairs on tiny tensors, so
that the step is almost all Python and hook time, with and without ``fully_shard``.

    python benchmarks/fsdp_one_rank_overhead.py [--device cpu|cuda] [--repeats 2]

Why it exists: a one-rank job runs without FSDP (``recipe.plan``; README "Memory options"), which
removes FSDP's per-block hooks and their copies on every micro-batch's forward, recompute and backward.
This measures that cost alone; the whole-step effect on a GPU is a ``benchmarks/single_gpu.sh`` run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

BLOCKS, ADAPTERS, MICRO, STEPS, WARMUP = 32, 7, 4, 6, 2


class Block(nn.Module):
    def __init__(self, hidden: int = 32, rank: int = 4):
        super().__init__()
        self.A = nn.ModuleList(nn.Linear(hidden, rank, bias=False) for _ in range(ADAPTERS))
        self.B = nn.ModuleList(nn.Linear(rank, hidden, bias=False) for _ in range(ADAPTERS))

    def forward(self, x):
        for a, b in zip(self.A, self.B, strict=True):
            x = x + b(a(x))
        return x


def step_ms(fsdp: bool, device: torch.device, mesh) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)]).to(device)
    if fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in model:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    x = torch.randn(2, 8, 32, device=device)
    for it in range(STEPS):
        if it == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
        for mb in range(MICRO):
            if fsdp:
                model.set_requires_gradient_sync(mb == MICRO - 1)
            model(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (STEPS - WARMUP) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = torch.device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    try:
        for _ in range(args.repeats):
            plain, wrapped = step_ms(False, device, mesh), step_ms(True, device, mesh)
            print(
                f"{BLOCKS} blocks x {ADAPTERS} adapters, {MICRO} micro-batches on {device.type}: "
                f"no FSDP {plain:.1f} ms, FSDP {wrapped:.1f} ms per step"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
