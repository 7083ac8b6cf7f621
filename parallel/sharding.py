"""Row sharding: which rows of a tensor a rank owns, and the padding that makes 4-bit rows shard evenly.

One home for the arithmetic that FSDP2's ``torch.chunk`` rule implies: rank r of w owns rows
[r*c, (r+1)*c) with c = ceil(rows / w) (``shard_rows``). The materializer reads exactly those rows
from the checkpoint, the vocabulary-sharded embedding keeps them, and the tests check against them.

4-bit weights are packed: a ``Weight4bit`` shard must hold whole rows of its inner tensors, and
FSDP's uneven-shard path would need inner tensors of the outer shape. So before ``fully_shard``
every 4-bit weight of the meta model is given zero rows up to a multiple of the shard degree
(``pad_4bit_rows``); ``Weight4bit.dequantize`` drops them again. The model itself never knows the
world size.

With HSDP the mesh is 2-D, (replicate, shard): a row-sharded DTensor is ``(Replicate(), Shard(0))`` and
its rows are split over the shard dim only (``row_shard_dim``), so "rank" and "world" in this arithmetic
are the rank within the shard group and the shard degree, and the padding multiple is the shard degree.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from models.quant import Weight4bit

__all__ = ["shard_rows", "padded_rows", "pad_4bit_rows", "gather_rows", "row_shard_dim", "shard_submesh"]


def shard_rows(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the rows rank ``rank`` of ``world`` owns (FSDP2's chunking; may be empty)."""
    chunk = -(-n_rows // world)
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows)


def shard_submesh(mesh):
    """The 1-D mesh parameters are sharded over: the last dim of an HSDP mesh (FSDP2's rule), else the mesh."""
    return mesh[mesh.mesh_dim_names[-1]] if mesh.ndim > 1 else mesh


def row_shard_dim(t: torch.Tensor) -> int | None:
    """The mesh dim a row-sharded DTensor's rows are split over: its one ``Shard(0)`` placement when every
    other placement is ``Replicate()`` (FSDP: ``(Shard(0),)``; HSDP: ``(Replicate(), Shard(0))``).
    None for any other tensor or placement."""
    if not isinstance(t, DTensor):
        return None
    shard = [i for i, p in enumerate(t.placements) if p.is_shard(0)]
    if len(shard) != 1 or not all(p.is_replicate() for i, p in enumerate(t.placements) if i != shard[0]):
        return None
    return shard[0]


def padded_rows(n_rows: int, multiple: int) -> int:
    return -(-n_rows // multiple) * multiple


def pad_4bit_rows(model: nn.Module, multiple: int) -> None:
    """Give every (meta) 4-bit weight a row count that is a multiple of ``multiple``."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, Weight4bit):
                continue
            rows = padded_rows(param.n_rows, multiple)
            if rows == param.shape[0]:
                continue
            if param.device.type != "meta":
                raise RuntimeError(f"{name}: 4-bit rows can only be padded on the meta model, before loading")
            w = Weight4bit.empty(
                param.n_rows,
                param.shape[1],
                quant_type=param.quant_type,
                blocksize=param.blocksize,
                dtype=param.dtype,
                device=param.device,
                rows=rows,
            )
            setattr(module, name, nn.Parameter(w, requires_grad=False))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a row-sharded DTensor (``row_shard_dim``: Shard(0) on a 1-D mesh, or
    (Replicate(), Shard(0)) on an HSDP mesh, gathered over the shard dim only); other tensors as they are.

    Collective (over the shard group). One ``all_gather_into_tensor`` of equal, zero-padded chunks, the
    collective FSDP2 itself uses: gloo's list all-gather (what ``DTensor.full_tensor`` runs) crashes on
    CUDA tensors, which is what several ranks sharing one GPU through gloo hold.
    """
    if not isinstance(t, DTensor):
        return t
    dim = row_shard_dim(t)
    if dim is None:
        return t.full_tensor()
    mesh = t.device_mesh
    world, rows = mesh.size(dim), t.shape[0]
    local = t.to_local()
    chunk = -(-rows // world)
    buf = local.new_zeros((chunk, *local.shape[1:]))
    buf[: local.shape[0]].copy_(local)
    out = local.new_empty((world * chunk, *local.shape[1:]))
    with warnings.catch_warnings():  # torch 2.13 renames it (all_gather_single); 2.11 has only this name
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(out, buf, group=mesh.get_group(dim))
    return out[:rows]
