"""Process group, device and mesh: validated before anything is loaded.

A plain ``python -m recipe.train`` (no torchrun) is a world of one; it still gets a process group,
so a 1-process run goes through the very same FSDP2 code path as an N-rank run.

The data-parallel mesh is 1-D (``("dp_shard",)``: pure FSDP over every rank) or, with
``parallelism.data_parallel_replicate_degree`` > 1, 2-D (``("dp_replicate", "dp_shard")``: HSDP,
torchtitan's names). Rank ``r`` sits at ``(r // shard, r % shard)``: consecutive ranks form a shard
group, so with torchrun (which numbers the ranks of one node consecutively) and a shard degree equal
to the processes per node, parameters are sharded within a node and replicated across nodes.
``fully_shard`` on a 2-D mesh shards on the last dim, replicates on the first and all-reduces the
gradients over the replicas after the reduce-scatter.

With ``parallelism.pipeline_parallel_degree = P`` > 1 a ``"pp"`` dim comes first: the world mesh is
``("pp", "dp_shard")`` (or ``("pp", "dp_replicate", "dp_shard")``), rank ``r`` is pipeline rank
``r // (world / P)`` and data-parallel rank ``r % (world / P)``, and ``DistInfo.mesh`` is the data-parallel
submesh that each stage is sharded over. The ranks of one pipeline (same data-parallel rank) train the
same micro-batches.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "DistInfo",
    "init_distributed",
    "resolve_dp_degrees",
    "resolve_pp_degree",
    "LayoutError",
    "all_reduce_sum",
    "destroy",
]


class LayoutError(RuntimeError):
    """A parallel layout this machine or config cannot run."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # the data-parallel mesh given to fully_shard: ("dp_shard",) or ("dp_replicate", "dp_shard")
    pp_mesh: DeviceMesh | None = None  # ("pp",): this rank's pipeline, or None without pipeline parallelism

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this rank's shard group (the whole mesh without replication)."""
        return self.mesh["dp_shard"] if self.mesh.ndim > 1 else self.mesh

    @property
    def dp_replicate(self) -> int:
        return self.mesh.size(0) if self.mesh.ndim > 1 else 1

    @property
    def dp_shard(self) -> int:
        return self.shard_mesh.size()

    @property
    def pp(self) -> int:
        return self.pp_mesh.size() if self.pp_mesh is not None else 1

    @property
    def dp_world(self) -> int:
        """Data-parallel ranks (each trains its own micro-batches): the world without the pipeline dim."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_world

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_world


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


def resolve_dp_degrees(world: int, dp_replicate: int = 1, dp_shard: int = -1) -> tuple[int, int]:
    """(replicate, shard) degrees of the data-parallel mesh for ``world`` ranks; ``dp_shard = -1`` is
    the rest (``world // dp_replicate``). Raises ``LayoutError`` naming both keys when they cannot
    make up the world."""
    rep_key, shard_key = "parallelism.data_parallel_replicate_degree", "parallelism.data_parallel_shard_degree"
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    hint = (
        f"set {rep_key} to a divisor of {world} ({', '.join(map(str, divisors))}; 1 is pure FSDP) and "
        f"{shard_key} to -1 (the rest: {world} / the replicate degree)"
    )
    if dp_replicate < 1 or dp_shard == 0 or dp_shard < -1:
        raise LayoutError(
            f"{rep_key} = {dp_replicate} and {shard_key} = {dp_shard}: the replicate degree must be >= 1 and the "
            f"shard degree >= 1 or -1; {hint}"
        )
    shard = world // dp_replicate if dp_shard == -1 else dp_shard
    if dp_replicate * shard != world:
        why = f", not a multiple of {dp_replicate}" if dp_shard == -1 else ""
        raise LayoutError(
            f"{rep_key} = {dp_replicate} x {shard_key} = {dp_shard} but the job has {world} rank(s){why}: "
            f"replicate x shard must equal the number of ranks; {hint}"
        )
    return dp_replicate, shard


def resolve_pp_degree(world: int, pp: int) -> int:
    """The data-parallel world (``world / pp``); raises ``LayoutError`` when ``pp`` does not divide ``world``."""
    if pp < 1 or world % pp:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise LayoutError(
            f"parallelism.pipeline_parallel_degree = {pp} does not divide the job's {world} rank(s): set it to "
            f"one of {', '.join(map(str, divisors))}, or launch a multiple of {max(pp, 1)} ranks (NGPU)"
        )
    return world // pp


def init_distributed(
    *,
    device: str = "auto",
    backend: str = "auto",
    dp_replicate: int = 1,
    dp_shard: int = -1,
    pp: int = 1,
    cpu_offload: bool = False,
) -> DistInfo:
    """The process group (torchrun's environment, or a world of one) and the meshes. Keyword-only, named
    after the config keys: ``device`` (training.device), ``backend``, ``dp_replicate`` / ``dp_shard`` /
    ``pp`` (parallelism.data_parallel_replicate_degree / data_parallel_shard_degree /
    pipeline_parallel_degree); ``cpu_offload``: FSDP keeps shards on the host, so an NCCL group must
    carry CPU tensors too (a gloo backend beside it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device
    device = resolve_device(kind, local_rank)
    replicate, shard = resolve_dp_degrees(resolve_pp_degree(world, pp), dp_replicate, dp_shard)
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
        if device.type == "cuda" and "nccl" in backend:
            # Binding the device initialises NCCL eagerly (and lets meshes split it). Not for gloo on CUDA
            # (one-GPU emulation): torch 2.11's mesh then splits the gloo group, whose options cannot be
            # copied ("cannot pickle ... _Options"), and an HSDP mesh fails before training.
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    dims = (("dp_replicate", replicate),) if replicate > 1 else ()
    dims += (("dp_shard", shard),)
    if pp > 1:
        dims = (("pp", pp),) + dims
    names = tuple(n for n, _ in dims)
    full = init_device_mesh(device.type, tuple(d for _, d in dims), mesh_dim_names=names)
    mesh, pp_mesh = full, None
    if pp > 1:
        mesh, pp_mesh = full[names[1:]], full["pp"]
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh, pp_mesh=pp_mesh)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
