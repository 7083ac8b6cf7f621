"""The decisions ``parallelize`` and ``materialize`` act on, as one frozen object.

``recipe.plan.resolve_plan`` makes every decision once, from the config, the device and the checkpoint's
shape, before anything is loaded (an impossible combination is a config error there); the parallel code
only reads the result, and never a config section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ParallelPlan", "EMBEDDING_PLACES"]

# Where the frozen embedding table lives: an FSDP-sharded module of its own; the vocabulary-sharded
# lookup (parallel/embedding.py, each rank its rows); pinned host memory (parallel/embedding.py); or the
# root module's, tied to lm_head.
EMBEDDING_PLACES = ("fsdp", "vocab_sharded", "host", "tied")


@dataclass(frozen=True)
class ParallelPlan:
    param_dtype: torch.dtype  # compute dtype of the frozen weights (FSDP's param_dtype)
    reduce_dtype: torch.dtype  # gradient reduction dtype
    cpu_offload: bool  # FSDP keeps parameter shards and gradients on the host
    pin_memory: bool  # pin the offloaded shards (only where CUDA exists)
    reshard_after_forward: bool  # blocks free their gathered weights after forward
    ac_mode: str  # activation checkpointing: none, full or selective
    ac_every: int  # selective: every k-th block
    ac_offload: bool  # checkpointed blocks' inputs kept in pinned host memory
    ac_keep: tuple[str, ...]  # projections whose frozen output checkpointed blocks keep (not recompute)
    ac_keep_every: int  # ... in every k-th checkpointed block
    compile: bool  # torch.compile each block
    compile_mode: str  # torch.compile's mode ("default", "reduce-overhead", ...)
    compile_loss: bool  # torch.compile the loss chunks' cross-entropy too (model.token_loss)
    embedding: str  # one of EMBEDDING_PLACES
    lm_head_on_host: bool  # lm_head's matrix in pinned host memory, copied per forward (parallel/embedding.py)
    compute_device: torch.device  # where compute, buffers and dense-to-4-bit quantization run
    shard_device: torch.device  # where parameter shards live (the host with cpu_offload)
    # False: a one-rank job with nothing to shard, offload or reduce runs without FSDP; the LoRA weights
    # stay fp32 masters, cast to param_dtype where they are used (``parallel.parallelize``).
    fsdp: bool

    def __post_init__(self):
        if self.embedding not in EMBEDDING_PLACES:
            raise ValueError(f"embedding must be one of {EMBEDDING_PLACES}, got {self.embedding!r}")
