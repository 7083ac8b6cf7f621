"""From a config to a sharded QLoRA model: base checkpoint -> model on meta -> parallelize -> this rank's shards.

The one builder every caller uses (the training entry point, and any other driver of the same
model): no rank ever holds the full weights. ``build_model`` reads the ``[model]``, ``[lora]``,
``[training]``, ``[parallelism]`` and ``[activation_checkpoint]`` sections and ``job.seed``;
``resolve_attention`` checks, before anything is loaded, that the device has the compute dtype and the
SDPA kernels the config asks for.
``build_pipeline_model`` does the same per pipeline stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.dtypes import DTYPES
from models.hf_reader import CheckpointReader
from models.hub import parse_repo_spec, resolve_checkpoint
from models.llama import LlamaForCausalLM, ModelArgs
from models.sdpa import DeviceSupportError, SdpaChoice, check_compute_dtype, choose_sdpa_backends, compute_capability
from parallel.distributed import DistInfo
from parallel.materialize import materialize
from parallel.parallelize import parallelize
from parallel.pipeline import PipelinePlan, cut_stages
from parallel.plan import ParallelPlan
from recipe.config import ConfigError, JobConfig
from recipe.logging import log

__all__ = ["ensure_checkpoint", "build_model", "build_pipeline_model", "base_quant_name", "resolve_attention"]


def resolve_attention(cfg: JobConfig, dist_info: DistInfo) -> SdpaChoice:
    """The SDPA kernels of this run (``models.sdpa``), logged; a compute dtype or a forced kernel the
    device lacks is a ``ConfigError`` naming the key (exit code 2, before any loading)."""
    t, device = cfg.training, dist_info.device
    cap = compute_capability(device)
    name = torch.cuda.get_device_name(device) if cap is not None else "the CPU"
    dtype = DTYPES[t.mixed_precision_param]
    try:
        check_compute_dtype(dtype, cap, name)
    except DeviceSupportError as e:
        raise ConfigError(
            f"training.mixed_precision_param = {t.mixed_precision_param!r}: {e} (--training.mixed_precision_param=..."
            "; with the HF Trainer: --fp16 for float16, neither --fp16 nor --bf16 for float32)"
        ) from None
    try:
        choice = choose_sdpa_backends(t.attention_backend, cap, dtype, cfg.job.deterministic)
    except DeviceSupportError as e:
        raise ConfigError(f"training.attention_backend = {t.attention_backend!r} on {name}: {e}") from None
    log(f"attention: {choice.describe()}", dist_info.rank)
    return choice


def ensure_checkpoint(model_cfg, seed: int, dist_info: DistInfo) -> Path:
    """The base checkpoint directory of the ``[model]`` section (collective: every rank calls it).

    Writes a synthetic one first when ``synthetic_shape`` asks for it; a hub repo id
    (``owner/name[@revision]``) is downloaded once into the hub cache (``models.hub``).
    """
    path = Path(model_cfg.checkpoint)
    if not model_cfg.checkpoint:
        raise ConfigError("[model] checkpoint is empty: set it to a HF checkpoint directory or a hub repo id")
    if not model_cfg.synthetic_shape and not path.exists() and parse_repo_spec(model_cfg.checkpoint):
        # One download per machine: local rank 0 (ranks of one machine share its hub cache).
        return resolve_checkpoint(
            model_cfg.checkpoint, is_main=dist_info.local_rank == 0, barrier=torch.distributed.barrier
        )
    if model_cfg.synthetic_shape:
        # Rank 0 decides and writes; every rank takes the barrier, whatever it sees on disk (a rank
        # that starts late could otherwise find the files, skip the barrier and desynchronise).
        if dist_info.is_main and not (path / "config.json").exists():
            from models.synthetic import MARKER_FILE, write_synthetic_checkpoint

            # config.json is written last: a marker without it is an interrupted synthetic write,
            # which may be redone (only the writer's own files are replaced).
            redo = (path / MARKER_FILE).is_file()
            log(
                f"writing a synthetic '{model_cfg.synthetic_shape}' checkpoint to {path}"
                + (" (redoing an interrupted write)" if redo else ""),
                dist_info.rank,
            )
            try:
                write_synthetic_checkpoint(path, shape=model_cfg.synthetic_shape, seed=seed, overwrite=redo)
            except FileExistsError as e:
                raise ConfigError(
                    f"model.checkpoint = {str(path)!r} has no config.json, so a synthetic checkpoint would be "
                    f"written there, but: {e}. Point model.checkpoint at a real checkpoint or a new directory"
                ) from e
        torch.distributed.barrier()
    return path


def base_quant_name(args: ModelArgs) -> str:
    """How the frozen base is stored: 'nf4/64', 'fp4/64', ... or 'none' (what a resume must match)."""
    return f"{args.quant_type}/{args.quant_blocksize}" if args.quant_type else "none"


def build_model(
    cfg: JobConfig,
    reader: CheckpointReader,
    dist_info: DistInfo,
    plan: ParallelPlan,
    model_cls: type[LlamaForCausalLM] = LlamaForCausalLM,
) -> LlamaForCausalLM:
    """Meta model -> parallelize -> this rank's shards.

    ``plan``: the run's decisions (``recipe.plan.resolve_plan``). ``model_cls``: ``LlamaForCausalLM`` or a
    subclass that only adds attributes and a calling convention (``recipe.hf_model``'s HF-facing model);
    its parameters and modules must be the base class's."""
    model = _meta_model(cfg, reader, plan, model_cls)
    _parallelize_and_load(model, cfg, reader, dist_info, plan)
    return model


def build_pipeline_model(
    cfg: JobConfig, reader: CheckpointReader, dist_info: DistInfo, plan: ParallelPlan, pipeline: PipelinePlan
) -> tuple[LlamaForCausalLM, list[LlamaForCausalLM]]:
    """(rank_model, stages) of this pipeline rank (``parallel.pipeline.cut_stages``): each stage is
    parallelized over the data-parallel mesh and loaded on its own, so a rank reads only its stages'
    tensors (and with FSDP only its rows of them)."""
    rank_model, stages = cut_stages(_meta_model(cfg, reader, plan, LlamaForCausalLM), pipeline, dist_info.pp_rank)
    for stage in stages:
        _parallelize_and_load(stage, cfg, reader, dist_info, plan, keep_unsharded=pipeline.keep_unsharded)
    return rank_model, stages


def _meta_model(
    cfg: JobConfig, reader: CheckpointReader, plan: ParallelPlan, model_cls: type[LlamaForCausalLM]
) -> LlamaForCausalLM:
    # A pre-quantized checkpoint's own scheme wins over model.quant_type (which quantizes dense ones).
    scheme = reader.quant_scheme(quantize_dense_as=cfg.model.quant_type)
    args = ModelArgs(
        shape=reader.shape,
        lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        lora_targets=tuple(cfg.lora.target_modules),
        quant_type=scheme[0] if scheme else None,
        quant_blocksize=scheme[1] if scheme else 64,
        dtype=plan.param_dtype,
        mlp_chunk_tokens=cfg.model.mlp_chunk_tokens,
        packed_attention=cfg.model.packed_attention,
        fuse_projections=cfg.model.fuse_projections,
        lora_epilogue=cfg.model.lora_epilogue,
    )
    with torch.device("meta"):
        return model_cls(args)


def _parallelize_and_load(
    model, cfg: JobConfig, reader: CheckpointReader, dist_info: DistInfo, plan: ParallelPlan, keep_unsharded=False
) -> None:
    parallelize(model, dist_info.mesh, plan, keep_unsharded=keep_unsharded)
    materialize(
        model,
        reader,
        device=plan.shard_device,
        lora_seed=cfg.job.seed,
        quant_device=plan.compute_device,
        buffer_device=plan.compute_device,
    )
