"""A frozen embedding table split by vocabulary rows over the ranks of the shard group.

Under FSDP the embedding table is all-gathered for every micro-batch (1 GiB for Llama 3 in bf16, plus
the all-gather buffer) only to read a few thousand rows of it. Here each rank keeps its rows for good.
Ranks hold different batches, so a lookup first all-gathers the token ids of every rank (a few KiB),
each rank embeds the tokens that fall in its vocabulary range for all ranks' batches (zeros elsewhere),
and one all-reduce of those (world x batch x seq x hidden: 64 MiB for 2 ranks at micro-batch 2 x 2048
x 4096 bf16) assembles every rank's embeddings; each keeps its own slice. Exactly one rank contributes
a nonzero value per position, so the sum is exact in any dtype: the output equals the plain lookup.
Every rank must pass ids of the same shape (the recipe's loader does: fixed micro-batch and seq_len).

The table is frozen (QLoRA never trains it), so no gradient flows through the collectives. It is a
buffer, not a parameter, so FSDP leaves it alone; ``parallel.materialize`` fills it through
``load_shard``. Not used with tied embeddings (lm_head shares the table) or a shard degree of 1.

The group is the shard group (``parallel.parallelize``): every rank with pure FSDP; with HSDP each
replica keeps a whole table, split over its own shard group, and the collectives stay within it
(within a node, with a node per replica). ``rank`` and ``world`` are the rank in that group and its size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.sharding import shard_rows

__all__ = ["HostEmbedding", "HostLMHead", "VocabShardedEmbedding"]


class VocabShardedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, *, dtype, rank: int, world: int, group, key: str):
        super().__init__()
        self.start, self.end = shard_rows(num_embeddings, rank, world)  # FSDP's row split
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.group = group
        self.key = key  # checkpoint key of the full table
        # Not persistent: the rows differ per rank and come from the base checkpoint, so they must
        # stay out of training checkpoints (DCP would store one rank's rows as if they were everyone's).
        self.register_buffer(
            "weight", torch.empty(self.end - self.start, dim, dtype=dtype, device="meta"), persistent=False
        )

    @torch.no_grad()
    def load_shard(self, reader, device) -> None:
        rows = reader.dense_rows(
            self.key, (self.num_embeddings, self.embedding_dim), self.start, self.end, self.weight.dtype
        )
        self.weight = rows.to(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size(self.group)
        gathered = [torch.empty_like(input_ids) for _ in range(world)]
        dist.all_gather(gathered, input_ids.contiguous(), group=self.group)
        # An id no rank owns would embed as zeros; nn.Embedding raises instead, so must this (an
        # async check on the GPU: no host sync). Every rank sees every id, so all of them raise.
        ids = torch.stack(gathered)
        torch._assert_async(
            ((ids >= 0) & (ids < self.num_embeddings)).all(),
            f"token id out of range [0, {self.num_embeddings}) for the embedding table",
        )
        local = ids - self.start  # (world, *ids.shape)
        inside = (local >= 0) & (local < self.end - self.start)
        if self.end > self.start:
            out = nn.functional.embedding(local.clamp(0, self.end - self.start - 1), self.weight)
            out = out * inside.unsqueeze(-1).to(out.dtype)
        else:  # more ranks than rows: this rank owns none
            out = self.weight.new_zeros(*local.shape, self.embedding_dim)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out[dist.get_rank(self.group)]

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.end}) of {self.num_embeddings}, dim={self.embedding_dim}"


class _HostMatrix(nn.Module):
    """A frozen (rows x cols) checkpoint matrix kept in host memory, pinned when the model computes on
    CUDA: ``parallel.materialize`` fills it through ``load_shard``, and ``model.to(device)`` leaves it
    where it is. A non-persistent buffer: it comes from the base checkpoint and stays out of training
    checkpoints, and FSDP leaves it alone."""

    def __init__(self, rows: int, cols: int, *, dtype, key: str):
        super().__init__()
        self.key = key  # checkpoint key of the matrix
        self.device = torch.device("cpu")  # the compute device; set at load
        self.register_buffer("weight", torch.empty(rows, cols, dtype=dtype, device="meta"), persistent=False)

    @torch.no_grad()
    def load_shard(self, reader, device) -> None:
        rows, cols = self.weight.shape
        full = reader.dense_rows(self.key, (rows, cols), 0, rows, self.weight.dtype)
        self.device = torch.device(device)
        self.weight = full.pin_memory() if self.device.type == "cuda" else full

    def _apply(self, fn, recurse=True):
        weight = self.weight
        out = super()._apply(fn, recurse)
        self.weight = weight
        return out


class HostEmbedding(_HostMatrix):
    """The frozen embedding table kept in host memory (pinned when the model runs on CUDA).

    QLoRA never trains the table, and a step reads only the batch's rows of it: for Llama 3 8B the
    table is 1 GiB of GPU memory (a tenth of the training peak) for 32 MiB of rows per micro-batch.
    Here the lookup runs on the host into a pinned buffer that is copied to the device. The token ids
    travel device -> host first, which waits for the work already queued on the GPU: a short stall
    per micro-batch, unless the caller passes the ids on the host (the recipe's loop does). Every rank
    keeps a whole table in host memory.
    Not with tied embeddings (lm_head needs the table on the device).
    """

    def __init__(self, num_embeddings: int, dim: int, *, dtype, key: str):
        super().__init__(num_embeddings, dim, dtype=dtype, key=key)
        self.num_embeddings, self.embedding_dim = num_embeddings, dim

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)
        pinned = self.device.type == "cuda"
        out = torch.empty(ids.numel(), self.embedding_dim, dtype=self.weight.dtype, pin_memory=pinned)
        # index_select raises on an id outside the table, as nn.Embedding does.
        torch.index_select(self.weight, 0, ids, out=out)
        return out.view(*input_ids.shape, self.embedding_dim).to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the host"


class HostLMHead(_HostMatrix):
    """lm_head's frozen matrix kept in pinned host memory, copied to the device once per forward.

    The output projection is needed only from the loss's forward to the end of its backward, while the
    training peak comes later, in the blocks' backward: on the device the 1 GiB of Llama 3 8B's lm_head
    sits there unused (a ninth of the 8B workload's peak). Here it waits on the host; ``prefetch`` (a
    forward hook on the embedding, or a forward pre-hook on a pipeline last part's ``LlamaModel`` that has
    none, set by ``parallel.parallelize``) starts the copy on a side stream once a forward has its input
    embeddings on their way, so that it travels behind the blocks' forward, and ``device_weight`` hands
    the copy to the loss (``models.llama.output_weight``), which keeps it as an input of its checkpointed
    chunks until their backward: the device copy is freed before the blocks' backward. Without a pending
    prefetch (a CPU run, a forward given ``inputs_embeds``, a call of ``forward`` from outside the model's
    forward) ``device_weight`` copies on the spot. No gradient: QLoRA never trains lm_head. Not with tied
    embeddings (the table is also the input embedding).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype, key: str):
        super().__init__(out_features, in_features, dtype=dtype, key=key)
        self.in_features, self.out_features = in_features, out_features
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._stream = None

    @torch.no_grad()
    def prefetch(self) -> None:
        """Start copying the matrix to the device on a side stream (CUDA only; a no-op elsewhere or while
        a copy is pending). The destination is allocated on the compute stream, which waits for the
        copy in ``device_weight``: when the loss's backward frees it, nothing else still uses it."""
        if self.device.type != "cuda" or self._pending is not None:
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        out = torch.empty_like(self.weight, device=self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # out's memory may have just been freed
        with torch.cuda.stream(self._stream):
            out.copy_(self.weight, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._pending = (out, done)

    def device_weight(self) -> torch.Tensor:
        """The matrix on the compute device: the prefetched copy (the compute stream waits for it), or a
        copy made now."""
        if self._pending is None:
            return self.weight.to(self.device, non_blocking=True)
        out, done = self._pending
        self._pending = None
        torch.cuda.current_stream(self.device).wait_event(done)
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.device_weight())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, on the host"
