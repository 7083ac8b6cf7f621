"""Apply activation checkpointing, torch.compile and FSDP2 to the model, in this order.

The order is torchtitan's and it matters:
  0. optionally, the frozen embedding table becomes a vocabulary-sharded lookup split over the shard
     group, or a lookup in host memory, and lm_head's matrix waits in host memory between forwards
     (parallel/embedding.py); FSDP manages none of them. 4-bit weights
     get zero rows up to a multiple of the shard degree (parallel/sharding.py), so that their packed
     shards are even;
  1. activation checkpointing wraps each block's forward, so FSDP's hooks (added later, around the
     module call) stay outside the recomputed region and re-gather the block before its recompute
     (with ``ac_keep`` a selective policy keeps the named projections' frozen outputs instead);
     with ``activation_checkpoint.offload`` the root module gets the saved-tensor hooks that keep the
     checkpointed blocks' inputs on the host (parallel/activation_offload.py): on the root, which is
     never compiled, they are active around the compiled blocks too;
  2. torch.compile compiles each block in place (names unchanged, so checkpoint keys still match), and
     with ``compile_loss`` the parameter-free cross-entropy of the loss chunks (``model.token_loss``);
  3. ``fully_shard`` on every block, then on the embeddings (unless tied to lm_head), then the root
     (norm + lm_head + whatever is left). 4-bit weights shard through ``Weight4bit``'s all-gather
     extension; LoRA parameters and frozen dense weights shard as ordinary parameters. On a shard
     group of one rank without CPU offload the frozen weights stay out of FSDP (plain tensors used in
     place: ``frozen_params_left_local``) and only the LoRA parameters are FSDP's. A job of one rank
     with nothing for FSDP to do (no CPU offload, fp32 reduction, no pipeline: ``ParallelPlan.fsdp``)
     skips this step: plain tensors, the adapters cast to the compute dtype where used.

All of it runs on the meta model: nothing is allocated until ``parallel.materialize`` reads each
rank's rows. What to apply comes from one frozen ``parallel.plan.ParallelPlan`` (``recipe.plan``
resolves it from the config once); nothing here reads a config section.

``mesh`` is the data-parallel mesh: 1-D (FSDP over all ranks) or 2-D (replicate, shard) for HSDP, which
``fully_shard`` implements itself (shards on the last dim, replicates on the first, and all-reduces
the reduce-scattered gradients over the replicas). Everything that splits rows here uses the shard
dim only (``parallel.sharding.shard_submesh``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.lora import QLoRALinear
from parallel.activation_offload import BlockInputOffload
from parallel.embedding import HostEmbedding, HostLMHead, VocabShardedEmbedding
from parallel.plan import ParallelPlan
from parallel.sharding import pad_4bit_rows, shard_submesh

__all__ = ["parallelize", "apply_activation_checkpointing", "frozen_params_left_local"]


def apply_activation_checkpointing(
    model: nn.Module, mode: str, every: int = 1, keep: tuple[str, ...] = (), keep_every: int = 1
) -> list[int]:
    """Recompute block activations in backward: ``full`` = every block, ``selective`` = every k-th.

    Non-reentrant checkpointing, patched onto the block instance so parameter names do not change.
    ``keep``: projections (``activation_checkpoint.keep_outputs``) whose frozen output every
    ``keep_every``-th checkpointed block keeps for backward instead of recomputing: they are tagged
    (``QLoRALinear.keep_tag``) and the block's checkpoint gets a selective policy that saves the tagged
    4-bit products and recomputes everything else. Returns the widths (last dims) of the kept
    outputs, which activation offload then also moves to the host.
    """
    if mode == "none":
        return []
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode must be none, full or selective, got {mode!r}")
    step = 1 if mode == "full" else every
    count, widths = 0, set()
    # Children are named by their block index in the full model, also in a pipeline stage's part.
    for name, block in model.model.layers.named_children():
        if int(name) % step == 0:
            tags = _tag_kept(block, keep) if keep and count % keep_every == 0 else {}
            widths.update(tags.values())
            block.forward = functools.partial(_checkpointed_forward, block.forward, frozenset(tags))
            count += 1
    return sorted(widths)


def _tag_kept(block: nn.Module, keep: tuple[str, ...]) -> dict[str, int]:
    """Tag the frozen products of ``keep`` in one block; {tag: output width}. A fused group (q/k/v,
    gate/up) has one product: it is kept when any of its parts is named."""
    tags = {}
    for owner, fused in ((block.self_attn, "qkv_proj"), (block.mlp, "gate_up_proj")):
        group = getattr(owner, fused)
        if group is not None and any(part in keep for part, _ in group.parts):
            group.keep_tag = fused
            tags[fused] = group.out_features
    for owner in (block.self_attn, block.mlp):
        for proj in keep:
            linear = getattr(owner, proj, None)
            if isinstance(linear, QLoRALinear) and linear.weight is not None:
                linear.keep_tag = proj
                tags[proj] = linear.out_features
    return tags


_TAGGED_OPS = (torch.ops.qlora_recipe.linear_4bit.default, torch.ops.qlora_recipe.lora_linear_4bit.default)


def _keep_policy(tags: frozenset[str], ctx, func, *args, **kwargs):
    # The 4-bit operators' last argument is their tag (models.quant.linear_4bit, models.qlora_op).
    if func in _TAGGED_OPS and args[-1] in tags:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(inner, tags: frozenset[str], *args, **kwargs):
    if tags:
        policy = functools.partial(_keep_policy, tags)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def frozen_params_left_local(model: nn.Module, shard_degree: int, cpu_offload: bool) -> set[nn.Parameter]:
    """The frozen parameters FSDP should leave alone: all of them when the shard group is one rank (one
    GPU, or HSDP that only replicates) and nothing is offloaded; else none.

    With nothing to split, FSDP's all-gather of a frozen weight only copies it into a second buffer:
    for Llama 3 8B on one GPU the root's lm_head (kept gathered from forward to backward) is a second
    1 GiB copy at the backward peak, and each block's packed 4-bit bytes are copied once more while it
    computes. Left out of FSDP they are plain tensors (``Weight4bit`` for the 4-bit ones) used in place;
    they are already stored in the compute dtype (``parallel.materialize``), so mixed precision has
    nothing to cast, and they have no gradients to reduce. LoRA parameters stay under FSDP (fp32
    masters, bf16 compute copies, gradient reduction over the replicas). With CPU offload FSDP must keep
    them: it is what moves them to the GPU for each block.
    """
    if shard_degree > 1 or cpu_offload:
        return set()
    return {p for p in model.parameters() if not p.requires_grad}


def _without_fsdp(model: nn.Module, plan: ParallelPlan) -> nn.Module:
    """A one-rank job that FSDP has nothing to do for (``ParallelPlan.fsdp`` is False): every parameter
    stays a plain tensor. What FSDP's mixed-precision policy did, the adapters do where their weights are
    used: cast the fp32 masters to ``param_dtype`` (the same rounding), so autograd returns their
    gradients in fp32 and accumulates them in ``.grad`` over micro-batches, as FSDP's fp32 reduction did
    (the same sums in the same order: the losses are bit for bit FSDP's on one rank). Frozen weights are
    already stored in the compute dtype (``parallel.materialize``)."""
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            module.compute_dtype = plan.param_dtype
    return model


def parallelize(model: nn.Module, mesh, plan: ParallelPlan, *, keep_unsharded: bool = False) -> nn.Module:
    """Apply the recipe's parallelism to the meta ``model`` in place, and return it.

    ``plan``: the run's decisions (``parallel.plan.ParallelPlan``, resolved and checked by
    ``recipe.plan.resolve_plan``). ``keep_unsharded``: blocks stay gathered from forward to backward
    whatever ``plan.reshard_after_forward`` says (a pipeline schedule with a split backward needs it:
    see ``parallel.pipeline``).
    """
    reshard_after_forward = plan.reshard_after_forward and not keep_unsharded
    tied = model.args.shape.tie_word_embeddings
    shard_mesh = shard_submesh(mesh)
    # With HSDP the table is split over the shard group: each replica holds a whole table.
    # A pipeline stage (``LlamaForCausalLM.part``) may hold no embeddings.
    has_embedding = model.model.embed_tokens is not None
    sharded_embedding = plan.embedding == "vocab_sharded" and has_embedding
    if sharded_embedding:
        emb = model.model.embed_tokens
        model.model.embed_tokens = VocabShardedEmbedding(
            emb.num_embeddings,
            emb.embedding_dim,
            dtype=emb.weight.dtype,
            rank=shard_mesh.get_local_rank(),
            world=shard_mesh.size(),
            group=shard_mesh.get_group(),
            key="model.embed_tokens.weight",
        )
    host_embedding = plan.embedding == "host" and has_embedding
    if host_embedding:
        emb = model.model.embed_tokens
        model.model.embed_tokens = HostEmbedding(
            emb.num_embeddings, emb.embedding_dim, dtype=emb.weight.dtype, key="model.embed_tokens.weight"
        )
    if plan.lm_head_on_host and getattr(model, "lm_head", None) is not None:  # never with tied (recipe.plan)
        head = model.lm_head
        model.lm_head = HostLMHead(head.in_features, head.out_features, dtype=head.weight.dtype, key="lm_head.weight")
        # Started once the embedding's output is on its way (a part without the embedding: when its
        # LlamaModel starts; neither is ever compiled), so that the copy travels behind the blocks'
        # forward. Started before the lookup, the 1 GiB copy held the host embedding's host-to-device
        # copy, and with it the first block, behind it on the copy engine: about 20 ms of idle GPU per
        # micro-batch on one H200 (the four >= 5 ms gaps of a micro-batch-2 step's profile, BENCHMARKS.md
        # 2026-12-07 sixth session).
        start = lambda *_: model.lm_head.prefetch()
        emb = getattr(model.model, "embed_tokens", None)
        if emb is not None:
            emb.register_forward_hook(start)
        else:
            model.model.register_forward_pre_hook(start)
    pad_4bit_rows(model, shard_mesh.size())
    widths = apply_activation_checkpointing(model, plan.ac_mode, plan.ac_every, plan.ac_keep, plan.ac_keep_every)
    if plan.ac_offload:
        # On the root module, which is never compiled: the hooks are active around compiled blocks.
        model.activation_offload = BlockInputOffload(model.args.shape.hidden_size, extra_widths=widths)
        model.activation_offload.install(model, blocks=list(model.model.layers))
    if plan.compile:
        for block in model.model.blocks():
            block.compile(fullgraph=False, mode=None if plan.compile_mode == "default" else plan.compile_mode)
        if plan.compile_loss and getattr(model, "token_loss", None) is not None:
            # Static for the first chunk length (all chunks but a batch's last), then one graph dynamic
            # in the length for every other: batches of varying length (HF collators pad to the longest)
            # would otherwise compile a graph per last-chunk length until dynamo's recompile limit.
            model.token_loss.compile(fullgraph=True, dynamic=None)
        if plan.compile_mode == "reduce-overhead":
            # CUDA graph trees must know where an iteration starts, or a graph's outputs kept by the
            # previous micro-batch's autograd graph look still alive to them: every model forward is one.
            model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    if not plan.fsdp:
        return _without_fsdp(model, plan)
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=plan.pin_memory) if plan.cpu_offload else OffloadPolicy()
    ignored = frozen_params_left_local(model, shard_mesh.size(), plan.cpu_offload)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    for block in model.model.blocks():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    embedding_in_fsdp = has_embedding and not tied and not sharded_embedding and not host_embedding
    if embedding_in_fsdp and model.model.embed_tokens.weight not in ignored:
        fully_shard(model.model.embed_tokens, reshard_after_forward=reshard_after_forward, **kw)
    # The root keeps norm and lm_head (and the embeddings when tied). It is needed again right at
    # the start of backward, so it stays gathered. (lm_head in a group of its own measured worse on
    # the 8B benchmark: 8.18 against 8.04 GiB peak, since it is then gathered when activations peak.)
    fully_shard(model, reshard_after_forward=False, **kw)
    # Sum gradients over ranks instead of averaging: the training loop divides the loss by the
    # global token count itself, so the backward (and its bf16 rounding) is the same on any world
    # size. A world-size factor in the loss instead would round bf16 gradients differently on 3 ranks.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # sum on the wire too (every supported torch has it)
    return model
