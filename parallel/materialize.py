"""Turn a model built on the meta device (and possibly already sharded by FSDP2) into real tensors.

Each parameter becomes exactly this rank's rows, read straight from the checkpoint files into the
shard: no rank ever holds the full state dict. Rows per rank are ``parallel.sharding.shard_rows``
(FSDP2's ``torch.chunk`` rule), which is what FSDP expects to find in ``DTensor._local_tensor``.
4-bit weights were padded to a multiple of the shard degree by ``parallelize`` already, so their
chunks are always even. With HSDP each replica reads the same rows as its peers in the other replicas:
rank and world are those of the shard group.

Frozen dense weights (embeddings, norms, lm_head) are cast to the model's compute dtype; LoRA
parameters are fp32 master weights initialised from (seed, name), identical on any world size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models.hf_reader import CheckpointError, CheckpointReader, quantize_rows
from models.lora import lora_init_tensor
from models.quant import Weight4bit
from parallel.sharding import row_shard_dim, shard_rows

__all__ = ["materialize", "shard_rows"]


def _rank_world(param: torch.Tensor) -> tuple[int, int]:
    """(rank, world) of the row split this rank's shard is part of: the rank within the shard group and
    the shard degree (the whole mesh for FSDP; the shard dim of an HSDP mesh, whose replicas read the
    same rows)."""
    if not isinstance(param, DTensor):
        return 0, 1
    dim = row_shard_dim(param)
    if dim is None:
        raise NotImplementedError(
            "only row-sharded parameters, (Shard(0),) or (Replicate(), Shard(0)), are supported, "
            f"got {param.placements}"
        )
    mesh = param.device_mesh
    return mesh.get_local_rank(dim), mesh.size(dim)


@torch.no_grad()
def materialize(
    model: nn.Module,
    reader: CheckpointReader,
    *,
    device: torch.device,
    lora_seed: int,
    quant_device: torch.device | None = None,
    buffer_device: torch.device | None = None,
) -> None:
    """Replace every meta parameter of ``model`` by this rank's shard read from ``reader``.

    ``device`` is where shards live (CPU when FSDP offloads parameters). ``quant_device`` is where
    a dense checkpoint's rows are quantized (the GPU when there is one: much faster than CPU).
    """
    quant_device = quant_device or device
    # Buffers (RoPE frequencies) are not FSDP-managed: they live where compute runs, also when
    # parameter shards are offloaded to the CPU.
    buffer_device = buffer_device or device
    seen: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            name = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) in seen:  # tied weights: one tensor, two names
                setattr(module, pname, seen[id(param)])
                continue
            rank, world = _rank_world(param)
            local_meta = param.to_local() if isinstance(param, DTensor) else param
            new_local = _load_local(name, local_meta, param.shape, rank, world, reader, device, lora_seed, quant_device)
            if isinstance(param, DTensor):
                new = DTensor(new_local, param._spec, requires_grad=False)
            else:
                new = new_local
            new_param = nn.Parameter(new, requires_grad=param.requires_grad)
            seen[id(param)] = new_param
            setattr(module, pname, new_param)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(buffer_device)
        if hasattr(module, "load_shard"):  # buffers that hold checkpoint rows (parallel/embedding.py)
            module.load_shard(reader, buffer_device)


def _load_local(name, local_meta, global_shape, rank, world, reader, device, lora_seed, quant_device):
    n_rows = global_shape[0]
    if ".lora_" in name:
        start, end = shard_rows(n_rows, rank, world)
        full = lora_init_tensor(name, tuple(global_shape), lora_seed)
        # copy=True: a slice of `full` would keep the whole tensor alive on every rank (and its
        # storage offset breaks DCP's async staging copy).
        return full[start:end].to(device=device, dtype=local_meta.dtype, copy=True)

    if isinstance(local_meta, Weight4bit):
        return _load_4bit(name, local_meta, global_shape, rank, world, reader, device, quant_device)

    start, end = shard_rows(n_rows, rank, world)
    return reader.dense_rows(name, tuple(global_shape), start, end, local_meta.dtype).to(device)


def _load_4bit(name, local_meta: Weight4bit, global_shape, rank, world, reader, device, quant_device):
    prefix = name.removesuffix(".weight")
    padded, k = global_shape
    n_rows = local_meta.n_rows
    if padded % world:
        raise AssertionError(f"{name}: 4-bit rows {padded} not padded to a multiple of {world}")
    start, end = shard_rows(padded, rank, world)
    chunk = end - start
    real_end = min(end, n_rows)
    local = Weight4bit(
        torch.zeros(chunk, k // 2, dtype=torch.uint8, device=device),
        torch.zeros(chunk, k // local_meta.blocksize, dtype=torch.float32, device=device),
        torch.zeros(16, dtype=torch.float32, device=device),
        n_rows,
        local_meta.quant_type,
        local_meta.blocksize,
        local_meta.dtype,
    )
    # A rank past the last real row (tiny weights, many ranks) still reads one row for the code book.
    lo, hi = (start, real_end) if real_end > start else (0, 1)
    if reader.is_4bit(prefix):
        rows = reader.rows_4bit(prefix, n_rows, k, lo, hi)
    else:
        dense = reader.dense_rows(name, (n_rows, k), lo, hi, torch.float32)
        rows = quantize_rows(dense.to(quant_device), local_meta.quant_type, local_meta.blocksize)
    if (rows.quant_type, rows.blocksize) != (local_meta.quant_type, local_meta.blocksize):
        raise CheckpointError(
            f"{prefix}: checkpoint is {rows.quant_type}/blocksize {rows.blocksize}, model was built for "
            f"{local_meta.quant_type}/{local_meta.blocksize}"
        )
    n = max(real_end - start, 0)
    local.packed[:n].copy_(rows.packed[:n])
    local.absmax[:n].copy_(rows.absmax[:n])
    local.code.copy_(rows.code)
    return local
