"""The run's plan: every decision the parallel code acts on, resolved once, before anything is loaded.

``resolve_plan`` reads the config sections, the device and the checkpoint's shape and returns a frozen
``parallel.plan.ParallelPlan`` (dtypes, offload and pinning, resharding, activation checkpointing,
compile, where the embedding table lives, where shards live); ``parallelize`` and ``materialize`` read
only that. Every impossible combination is a ``ConfigError`` here (exit code 2, before the weights are
read). Both drivers use it (``recipe.train`` and ``recipe.hf_trainer``, through ``recipe.builder``).

``training.compile = 'auto'`` is decided here, with one logged line giving the reason: on where the
device is CUDA; off on CPU (inductor's CPU code is slower than eager for these shapes) and where a
setting excludes it (``model.packed_attention = 'segments'``, a pipeline schedule that splits backward).
An explicit ``true`` where it is impossible is a config error. When compile is on, inductor's FX-graph
and AOT-autograd caches are on, in a directory that outlives /tmp cleanups (``compile_cache``), so a
rerun reuses the compiled code.

``parallelism.host_embedding``, ``parallelism.host_lm_head`` and ``activation_checkpoint.offload`` = 'auto'
(the defaults) are decided here too, each with its logged line: on where they were measured to pay, one
CUDA rank without FSDP (the 8B workload on one H100: train peak 10.45 -> 8.55 GiB for the first and the
last, tokens/s -0.6 %; lm_head on the host at micro-batch 4: 9.82 -> 8.85 GiB, about -1 %; BENCHMARKS.md
2026-12-07), off elsewhere until measured there. ``activation_checkpoint.keep_outputs = ['auto']`` (the
default) keeps o/gate/up's frozen outputs in every second checkpointed block where they wait on the host
(``resolve_keep_outputs``). ``recipe.estimate`` predicts with the same decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.dtypes import DTYPES
from models.shapes import LlamaShape
from parallel.pipeline import SCHEDULES
from parallel.plan import ParallelPlan
from recipe.config import ConfigError, JobConfig
from recipe.logging import log

__all__ = [
    "resolve_plan",
    "resolve_compile",
    "resolve_host_embedding",
    "resolve_host_lm_head",
    "resolve_ac_offload",
    "CompileDecision",
    "Decision",
    "compile_cache",
    "needs_fsdp",
    "kept_outputs_on_host",
    "resolve_keep_outputs",
    "auto_keep_excluded",
    "KeepDecision",
    "AUTO_KEEP",
    "AUTO_KEEP_EVERY",
]


@dataclass(frozen=True)
class CompileDecision:
    on: bool
    reason: str

    def describe(self) -> str:
        return f"training.compile: {'on' if self.on else 'off'} ({self.reason})"


def resolve_compile(cfg: JobConfig, device_type: str) -> CompileDecision:
    """``training.compile`` (true, false or 'auto') for a run on ``device_type`` ('cuda' or 'cpu').
    Compiles nothing; raises ``ConfigError`` for an explicit true that a setting excludes."""
    setting = cfg.training.compile
    excluded = []
    if cfg.model.packed_attention == "segments":
        excluded.append(
            (
                "model.packed_attention = 'segments' loops over each row's documents, which torch.compile would "
                "recompile for every new layout",
                "--model.packed_attention=mask",
            )
        )
    p = cfg.parallelism
    if p.pipeline_parallel_degree > 1 and SCHEDULES[p.pipeline_parallel_schedule].split_backward:
        excluded.append(
            (
                f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule} splits the backward "
                "into input and weight passes, which torch.compile does not support",
                "--parallelism.pipeline_parallel_schedule=1F1B (or GPipe, Interleaved1F1B)",
            )
        )
    if setting is True:
        if excluded:
            why, fix = excluded[0]
            raise ConfigError(f"training.compile = true, but {why}: set --training.compile=false (or auto), or {fix}.")
        return CompileDecision(True, "training.compile = true")
    if setting is False:
        return CompileDecision(False, "training.compile = false")
    if excluded:
        return CompileDecision(False, excluded[0][0])
    if device_type != "cuda":
        return CompileDecision(False, "CPU device: inductor's CPU code is slower than eager for these shapes")
    return CompileDecision(True, "CUDA")


@dataclass(frozen=True)
class Decision:
    """An on/off decision of the plan with the reason that is logged."""

    key: str
    on: bool
    reason: str

    def describe(self) -> str:
        return f"{self.key}: {'on' if self.on else 'off'} ({self.reason})"

    @classmethod
    def explicit(cls, key: str, setting: bool) -> Decision:
        """What an explicit true/false in the config decides, and says so."""
        return cls(key, setting, f"{key} = {str(setting).lower()}")


def resolve_compile_loss(cfg: JobConfig, compile_on: bool) -> Decision:
    """``training.compile_loss`` (true, false or 'auto'): only with compiled blocks (it is their compile
    that sets the cache, the mode and the CPU exclusion), and there 'auto' turns it on."""
    key, setting = "training.compile_loss", cfg.training.compile_loss
    if not compile_on:
        return Decision(key, False, "training.compile is off")
    if isinstance(setting, bool):
        return Decision.explicit(key, setting)
    return Decision(key, True, "with the compiled blocks: +0.8 to +2.0 % tokens/s on one H100")


def kept_outputs_on_host(ac_offload: bool, compiled: bool) -> bool:
    """Where ``activation_checkpoint.keep_outputs`` waits: a compiled block's kept outputs are saved
    tensors of its graph, which activation offload's hooks move to the host; eager checkpointing holds
    them in its own cache, on the device (parallel/activation_offload.py)."""
    return ac_offload and compiled


# keep_outputs = 'auto': what is kept where it pays (BENCHMARKS.md 2026-12-07, fifth to seventh sessions,
# one H100, 8B, the one-GPU defaults): o/gate/up in every second checkpointed block, +5.4 % tokens/s for
# +0.12 GiB at micro-batch 2 and +8.2 % for +0.51 GiB at micro-batch 4 (lm_head on the host); the GPU oracle
# passed it (median 8.59e-2 / worst 1.65e-1 against bf16 eager's 9.79e-2 / 1.90e-1). Every block (keep_every
# 1) doubles the host copies: not measured for o/gate/up (up_proj alone: 11,843 against 11,404 tokens/s).
AUTO_KEEP = ("o_proj", "gate_proj", "up_proj")
AUTO_KEEP_EVERY = 2


@dataclass(frozen=True)
class KeepDecision:
    """``activation_checkpoint.keep_outputs`` / ``keep_every`` as the run applies them, and why."""

    names: tuple[str, ...]
    every: int
    reason: str

    def describe(self) -> str:
        if not self.names:
            return f"activation_checkpoint.keep_outputs: none ({self.reason})"
        blocks = "every checkpointed block" if self.every == 1 else f"one of every {self.every} checkpointed blocks"
        return f"activation_checkpoint.keep_outputs: {', '.join(self.names)} kept in {blocks} ({self.reason})"


def auto_keep_excluded(
    saver_excluded: str | None, ac_mode: str, ac_offload: bool, compiled: bool, quantized: bool, mlp_chunk: int
) -> str | None:
    """Why keep_outputs = 'auto' keeps nothing for a run of these settings, or None where it keeps
    ``AUTO_KEEP``: where the kept outputs wait in host memory (``kept_outputs_on_host``), measured on one
    CUDA rank. ``recipe.estimate`` and ``recipe.planner`` decide with this too."""
    if saver_excluded:
        return saver_excluded
    if ac_mode == "none":
        return "activation_checkpoint.mode = 'none': nothing is recomputed"
    if not kept_outputs_on_host(ac_offload, compiled):
        return "they would wait on the GPU: they go to the host only with activation offload and compiled blocks"
    if not quantized:
        return "model.quant_type = 'none': no 4-bit projections"
    if mlp_chunk:
        return "model.mlp_chunk_tokens checkpoints each MLP chunk again, where the block's policy does not reach"
    return None


def resolve_keep_outputs(
    cfg: JobConfig, device_type: str, world_size: int, ac_offload: bool, compiled: bool
) -> KeepDecision:
    """``activation_checkpoint.keep_outputs`` (a list, or ['auto']) and ``keep_every`` (0: 2 with
    'auto', 1 with a list) for this run."""
    ac = cfg.activation_checkpoint
    if ac.keep_outputs != ["auto"]:
        return KeepDecision(tuple(ac.keep_outputs), ac.keep_every or 1, "activation_checkpoint.keep_outputs set")
    every = ac.keep_every or AUTO_KEEP_EVERY
    if device_type != "cuda":
        why = f"{device_type.upper()} device: measured on one CUDA rank"
    else:
        why = auto_keep_excluded(
            _auto_saver_excluded(cfg, device_type, world_size),
            ac.mode,
            ac_offload,
            compiled,
            cfg.model.quant_type != "none",
            cfg.model.mlp_chunk_tokens,
        )
    if why:
        return KeepDecision((), every, why)
    return KeepDecision(AUTO_KEEP, every, "one CUDA rank, compiled, activation offload: +5.4 % tokens/s on one H100")


def _auto_saver_excluded(cfg: JobConfig, device_type: str, world_size: int) -> str | None:
    """Why an 'auto' memory saver stays off here, or None where it was measured to pay: one CUDA rank
    without FSDP (BENCHMARKS.md, 2026-12-07: host embedding and activation offload together took the 8B
    workload's train peak from 10.45 to 8.55 GiB on an H100 at -0.6 % tokens/s)."""
    if device_type != "cuda":
        return f"{device_type.upper()} device: the host is where the tensors already are"
    if world_size > 1:
        return f"{world_size} ranks: measured on one rank only so far"
    if needs_fsdp(cfg, world_size):
        return "FSDP runs this one-rank job (CPU offload, a reduce dtype or single_rank_fsdp): not measured there"
    return None


def _host_table(name: str, setting, tied: bool) -> Decision | None:
    """What tied embeddings and an explicit setting decide for ``parallelism.<name>`` (a table kept in
    host memory; with tied embeddings one matrix is both lm_head and the embedding, which the GPU then
    needs: an explicit true is a ``ConfigError``); None: 'auto', decided by the caller."""
    key = f"parallelism.{name}"
    if setting is True and tied:
        raise ConfigError(
            f"{key}: this checkpoint ties lm_head to the embedding table, which the GPU then needs for both; "
            f"set --{key}=false"
        )
    if isinstance(setting, bool):
        return Decision.explicit(key, setting)
    if tied:
        return Decision(key, False, "tied embeddings: the one table is lm_head and the embedding")
    return None


def resolve_host_embedding(cfg: JobConfig, device_type: str, world_size: int, tied: bool) -> Decision:
    """``parallelism.host_embedding`` (true, false or 'auto')."""
    key = "parallelism.host_embedding"
    fixed = _host_table("host_embedding", cfg.parallelism.host_embedding, tied)
    if fixed is not None:
        return fixed
    if cfg.parallelism.vocab_parallel_embedding and world_size > 1:
        return Decision(key, False, "parallelism.vocab_parallel_embedding places the table")
    why = _auto_saver_excluded(cfg, device_type, world_size)
    return Decision(key, why is None, why or "one CUDA rank without FSDP: 1 GiB less for Llama 3 8B")


def resolve_host_lm_head(cfg: JobConfig, device_type: str, world_size: int, tied: bool) -> Decision:
    """``parallelism.host_lm_head`` (true, false or 'auto')."""
    fixed = _host_table("host_lm_head", cfg.parallelism.host_lm_head, tied)
    if fixed is not None:
        return fixed
    why = _auto_saver_excluded(cfg, device_type, world_size)
    reason = why or "one CUDA rank without FSDP: 1 GiB less at the backward peak for Llama 3 8B"
    return Decision("parallelism.host_lm_head", why is None, reason)


def resolve_ac_offload(cfg: JobConfig, device_type: str, world_size: int) -> Decision:
    """``activation_checkpoint.offload`` (true, false or 'auto')."""
    key, ac = "activation_checkpoint.offload", cfg.activation_checkpoint
    setting, mode = ac.offload, ac.mode
    if isinstance(setting, bool):
        return Decision.explicit(key, setting)
    if mode == "none":
        return Decision(key, False, "activation_checkpoint.mode = 'none': nothing is checkpointed")
    why = _auto_saver_excluded(cfg, device_type, world_size)
    return Decision(key, why is None, why or "one CUDA rank without FSDP: the blocks' inputs wait on the host")


def resolve_plan(
    cfg: JobConfig,
    device: torch.device,
    shard_degree: int,
    shape: LlamaShape,
    rank: int = 0,
    world_size: int | None = None,
):
    """The frozen ``ParallelPlan`` of this run (logs the compile decision); ``shard_degree``: the ranks
    each parameter is split over (the shard group); ``shape``: the checkpoint's (tied embeddings);
    ``world_size``: all ranks of the job (default ``shard_degree``)."""
    p, t, ac = cfg.parallelism, cfg.training, cfg.activation_checkpoint
    tied = shape.tie_word_embeddings
    world = shard_degree if world_size is None else world_size
    host = resolve_host_embedding(cfg, device.type, world, tied)
    ac_offload = resolve_ac_offload(cfg, device.type, world)
    head = resolve_host_lm_head(cfg, device.type, world, tied)
    if host.on:
        embedding = "host"
    elif tied:
        embedding = "tied"
    elif p.vocab_parallel_embedding and shard_degree > 1:
        embedding = "vocab_sharded"
    else:
        embedding = "fsdp"
    decision = resolve_compile(cfg, device.type)
    loss = resolve_compile_loss(cfg, decision.on)
    keep = resolve_keep_outputs(cfg, device.type, world, ac_offload.on, decision.on)
    for line in (decision.describe(), loss.describe(), host.describe(), head.describe(), ac_offload.describe()):
        log(line, rank)
    if keep.names:
        if kept_outputs_on_host(ac_offload.on, decision.on):
            where = "on the host (activation offload)"
        else:
            where = "on the device" + (" (eager checkpointing keeps them in its own cache)" if ac_offload.on else "")
        log(f"{keep.describe()}, {where}", rank)
    elif ac.keep_outputs == ["auto"]:
        log(keep.describe(), rank)
    if decision.on:
        where, entries = compile_cache()
        log(f"compile cache: {where} ({f'warm, {entries} graphs' if entries else 'cold'})", rank)
    return ParallelPlan(
        param_dtype=DTYPES[t.mixed_precision_param],
        reduce_dtype=DTYPES[t.mixed_precision_reduce],
        cpu_offload=p.cpu_offload,
        pin_memory=p.cpu_offload and device.type == "cuda",
        reshard_after_forward=p.reshard_after_forward,
        ac_mode=ac.mode,
        ac_every=ac.selective_every,
        ac_offload=ac_offload.on,
        ac_keep=keep.names,
        ac_keep_every=keep.every,
        compile=decision.on,
        compile_mode=t.compile_mode,
        compile_loss=loss.on,
        embedding=embedding,
        lm_head_on_host=head.on,
        compute_device=device,
        shard_device=torch.device("cpu") if p.cpu_offload else device,
        fsdp=needs_fsdp(cfg, world),
    )


def needs_fsdp(cfg: JobConfig, world_size: int) -> bool:
    """FSDP is for more than one rank, or for what only it does on one: CPU offload (it moves each
    block's weights in), an fp32 or fp64 gradient accumulation other than autograd's own (reduce dtype
    not float32), a pipeline stage. Else the job runs without it (``parallelism.single_rank_fsdp`` keeps
    it): with one rank FSDP's all-gather and reduce-scatter are copies, and its per-block hooks add host
    time to every micro-batch's forward, recompute and backward."""
    p = cfg.parallelism
    return (
        world_size > 1
        or p.single_rank_fsdp
        or p.cpu_offload
        or p.pipeline_parallel_degree > 1
        or cfg.training.mixed_precision_reduce != "float32"
    )


def compile_cache() -> tuple[str, int]:
    """Turn on inductor's FX-graph and AOT-autograd caches in a stable directory: TORCHINDUCTOR_CACHE_DIR
    if set, else ``$XDG_CACHE_HOME/torchinductor`` (``~/.cache/torchinductor``) instead of torch's default
    under /tmp, which cleanups and new containers empty. Returns (the directory, compiled graphs already
    in it: 0 means a cold cache, the first step compiles from scratch)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "torchinductor")
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    where = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    graphs = where / "fxgraph"
    entries = sum(1 for _ in graphs.iterdir()) if graphs.is_dir() else 0
    return str(where), entries
