"""Turn a model built on the meta device (and possibly already sharded by FSDP2) into real tensors.

Each parameter becomes exactly this rank's rows, read straight from the checkpoint files into the
shard: no rank ever holds the full state dict. Rows per rank are ``parallel.sharding.shard_rows``
(FSDP2's ``torch.chunk`` rule), which is what FSDP expects to find in ``DTensor._local_tensor``.
4-bit weights were padded to a multiple of the shard degree by ``parallelize`` already, so their
chunks are always even. With HSDP each replica reads the same rows as its peers in the other replicas:
rank and world are those of the shard group.

Frozen dense weights (embeddings, norms, lm_head) are cast to the model's compute dtype; LoRA
parameters are fp32 master weights initialised from (seed, name), identical on any world size.

A fused frozen weight (``models.lora.FusedQLoRALinear``, e.g. ``self_attn.qkv_proj.weight``) has no
checkpoint key of its own: its rows are those of its parts' tensors (``q_proj``, ``k_proj``, ``v_proj``)
one after the other, and a rank's row range may straddle parts; each part is read for its overlap only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models.hf_reader import CheckpointError, CheckpointReader, quantize_rows
from models.lora import FusedQLoRALinear, lora_init_tensor
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
            sources = _sources(mod_name, module, pname)
            new_local = _load_local(
                name, local_meta, param.shape, rank, world, reader, device, lora_seed, quant_device, sources
            )
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


def _sources(mod_name: str, module: nn.Module, pname: str) -> list[tuple[str, int]] | None:
    """(checkpoint key prefix, rows) of each part of a fused frozen weight, in row order; None otherwise."""
    if not isinstance(module, FusedQLoRALinear) or pname != "weight":
        return None
    parent = mod_name.rpartition(".")[0]
    return [(f"{parent}.{part}" if parent else part, rows) for part, rows in module.parts]


def _pieces(sources, start: int, end: int):
    """(key prefix, part rows, start, end within the part) of rows [start, end) of the concatenation."""
    offset = 0
    for prefix, rows in sources:
        lo, hi = max(start, offset), min(end, offset + rows)
        if lo < hi:
            yield prefix, rows, lo - offset, hi - offset
        offset += rows


def _load_local(name, local_meta, global_shape, rank, world, reader, device, lora_seed, quant_device, sources=None):
    n_rows = global_shape[0]
    if ".lora_" in name:
        start, end = shard_rows(n_rows, rank, world)
        full = lora_init_tensor(name, tuple(global_shape), lora_seed)
        # copy=True: a slice of `full` would keep the whole tensor alive on every rank (and its
        # storage offset breaks DCP's async staging copy).
        return full[start:end].to(device=device, dtype=local_meta.dtype, copy=True)

    if isinstance(local_meta, Weight4bit):
        return _load_4bit(name, local_meta, global_shape, rank, world, reader, device, quant_device, sources)

    start, end = shard_rows(n_rows, rank, world)
    if sources is None:
        return reader.dense_rows(name, tuple(global_shape), start, end, local_meta.dtype).to(device)
    k = global_shape[1]
    parts = [
        reader.dense_rows(f"{p}.weight", (rows, k), lo, hi, local_meta.dtype)
        for p, rows, lo, hi in _pieces(sources, start, end)
    ]
    return (torch.cat(parts) if parts else torch.empty(0, k, dtype=local_meta.dtype)).to(device)


def _load_4bit(name, local_meta: Weight4bit, global_shape, rank, world, reader, device, quant_device, sources=None):
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
    at = 0
    for part, part_rows, a, b in _pieces(sources or [(prefix, n_rows)], lo, hi):
        rows = _rows_4bit(reader, part, part_rows, k, a, b, local_meta, quant_device)
        if at == 0:
            local.code.copy_(rows.code)
        elif not torch.equal(local.code, rows.code.to(local.code.device)):
            # One matrix dequantizes through one code book.
            raise CheckpointError(
                f"{part}: its 4-bit code book differs from the other parts of the fused {name}; "
                "set model.fuse_projections=false for this checkpoint"
            )
        n = min(b - a, max(real_end - start - at, 0))
        local.packed[at : at + n].copy_(rows.packed[:n])
        local.absmax[at : at + n].copy_(rows.absmax[:n])
        at += b - a
    return local


def _rows_4bit(reader, prefix, n_rows, k, lo, hi, local_meta: Weight4bit, quant_device):
    """Rows [lo, hi) of one checkpoint projection as 4-bit rows of the model's scheme."""
    if reader.is_4bit(prefix):
        rows = reader.rows_4bit(prefix, n_rows, k, lo, hi)
    else:
        dense = reader.dense_rows(f"{prefix}.weight", (n_rows, k), lo, hi, torch.float32)
        rows = quantize_rows(dense.to(quant_device), local_meta.quant_type, local_meta.blocksize)
    if (rows.quant_type, rows.blocksize) != (local_meta.quant_type, local_meta.blocksize):
        raise CheckpointError(
            f"{prefix}: checkpoint is {rows.quant_type}/blocksize {rows.blocksize}, model was built for "
            f"{local_meta.quant_type}/{local_meta.blocksize}"
        )
    return rows
