"""Process group, device and mesh: validated before anything is loaded.

A plain ``python -m recipe.train`` (no torchrun) is a world of one; it still gets a process group,
so a 1-process run goes through the very same FSDP2 code path as an N-rank run.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DistInfo", "init_distributed", "LayoutError", "all_reduce_sum", "destroy"]


class LayoutError(RuntimeError):
    """A parallel layout this machine or config cannot run."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise LayoutError("training.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
        if local_rank >= n:
            raise LayoutError(
                f"local rank {local_rank} has no GPU: this machine has {n} GPU(s). "
                f"Launch with NGPU<={n} (./run_train.sh) or --nproc_per_node<={n}"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    device_kind: str = "auto", backend: str = "auto", dp_shard: int = -1, cpu_offload: bool = False
) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_kind, local_rank)
    if dp_shard not in (-1, world):
        raise LayoutError(
            f"parallelism.data_parallel_shard_degree = {dp_shard} but the job has {world} rank(s); "
            f"only pure FSDP is implemented, so set it to -1 or {world}"
        )
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LayoutError("parallelism.backend = 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    if backend == "nccl" and cpu_offload:
        # Offloaded shards live on the CPU: the same group must serve CPU tensors too.
        backend = "cuda:nccl,cpu:gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=10))
        if "WORLD_SIZE" not in os.environ:
            # A plain `python -m recipe.train`: a private rendezvous on a free port, without writing
            # MASTER_* into the environment (child processes and later runs would inherit a stale port).
            kwargs["init_method"] = f"tcp://127.0.0.1:{_free_port()}"
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
