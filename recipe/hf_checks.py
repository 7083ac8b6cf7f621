"""What ``RecipeTrainer`` refuses before training: ``TrainingArguments`` (or TRL's ``SFTConfig``) settings the
recipe's model cannot honour, each with the field and what to set instead, and a model whose 4-bit weights
are not the recipe's shards of the current world."""

from __future__ import annotations

from torch.distributed.tensor import DTensor, Shard

from models.quant import Weight4bit
from recipe.hf_model import HFLlamaForCausalLM, UnsupportedSettingError

__all__ = ["SUPPORTED_OPTIM", "check_training_arguments", "check_sharded"]

# The optimizers of TrainingArguments.optim that are torch's AdamW (the recipe's optimizer); both take
# the DTensor shards as they are.
SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused")


def _refuse(field_name: str, value, why: str) -> UnsupportedSettingError:
    return UnsupportedSettingError(f"TrainingArguments.{field_name} = {value!r} is not supported: {why}")


def check_training_arguments(args, model: HFLlamaForCausalLM) -> None:
    """Raise ``UnsupportedSettingError`` for a setting this model cannot honour."""
    cfg = model.recipe.config
    if args.fsdp:
        raise _refuse(
            "fsdp",
            args.fsdp,
            "the recipe shards the model itself (FSDP2 over the 4-bit weights, applied by build_hf_model); "
            "remove --fsdp and --fsdp_config",
        )
    if args.deepspeed:
        raise _refuse("deepspeed", args.deepspeed, "the recipe shards the model itself (FSDP2); remove --deepspeed")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in SUPPORTED_OPTIM:
        raise _refuse(
            "optim",
            optim,
            "the LoRA parameters are FSDP2 DTensor shards, trained with torch's AdamW; "
            f"set --optim {SUPPORTED_OPTIM[0]} (or {SUPPORTED_OPTIM[1]})",
        )
    want = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    have = cfg.training.mixed_precision_param
    if want != have:
        flag = "fp16" if args.fp16 else "bf16"
        raise _refuse(
            flag,
            bool(getattr(args, flag)),
            f"these arguments ask for {want} compute, but the model was built for {have}; build it with "
            "build_hf_model(model_args, training_args) from the same TrainingArguments",
        )
    if args.gradient_checkpointing and cfg.activation_checkpoint.mode == "none":
        raise _refuse(
            "gradient_checkpointing",
            True,
            "the model was built without activation checkpointing; build it with "
            "build_hf_model(model_args, training_args) from the same TrainingArguments",
        )
    if args.torch_compile and not model.recipe.plan.compile:
        raise _refuse(
            "torch_compile",
            True,
            "the model was built without compile (the recipe compiles each block when it builds the model); "
            "build it with build_hf_model(model_args, training_args) from the same arguments",
        )
    simple = [
        (
            "label_smoothing_factor",
            args.label_smoothing_factor != 0,
            "set it to 0 (the recipe's chunked loss never builds the full logits)",
        ),
        ("use_liger_kernel", bool(args.use_liger_kernel), "set it to False (the recipe has its own kernels)"),
        (
            "auto_find_batch_size",
            bool(args.auto_find_batch_size),
            "set it to False and choose per_device_train_batch_size",
        ),
        ("neftune_noise_alpha", args.neftune_noise_alpha is not None, "leave it unset"),
        ("fp16_full_eval", bool(args.fp16_full_eval), "set it to False: evaluation runs in the model's compute dtype"),
        ("bf16_full_eval", bool(args.bf16_full_eval), "set it to False: evaluation runs in the model's compute dtype"),
        (
            "parallelism_config",
            getattr(args, "parallelism_config", None) is not None,
            "leave it unset: the recipe's only parallelism is FSDP2 over all ranks",
        ),
        # TRL's SFTConfig
        (
            "activation_offloading",
            bool(getattr(args, "activation_offloading", False)),
            "set it to False (use --cpu_offload of the model arguments to offload parameter shards)",
        ),
        (
            "loss_type",
            getattr(args, "loss_type", "nll") != "nll",
            "set --loss_type nll (the recipe's loss is the token-mean negative log-likelihood)",
        ),
        ("use_liger_kernel", bool(getattr(args, "use_liger_kernel", False)), "set it to False"),
    ]
    for name, bad, what in simple:
        if bad:
            raise _refuse(name, getattr(args, name), what)
    if args.n_gpu > 1:
        raise _refuse(
            "n_gpu",
            args.n_gpu,
            "several GPUs visible to one process (Trainer would use nn.DataParallel); launch with "
            "torchrun --nproc-per-node N, or make one GPU visible with CUDA_VISIBLE_DEVICES",
        )
    world = model.recipe.dist.world_size
    if args.world_size != world:
        raise UnsupportedSettingError(
            f"TrainingArguments see {args.world_size} process(es) but the model is sharded over {world}: build "
            "the model and the Trainer in the same launch, and on a CPU-only machine pass --use_cpu "
            "(accelerate sees a torchrun launch without it as independent single processes there)"
        )


def check_sharded(model: HFLlamaForCausalLM) -> int:
    """Every 4-bit base weight must be an FSDP2 shard (Shard(0) DTensor) over all ranks, holding its share
    of the rows (on one rank: the whole weight, outside FSDP); returns how many were checked. Raises
    RuntimeError otherwise."""
    world = model.recipe.dist.world_size
    # One rank without CPU offload: the frozen weights stay out of FSDP, whole plain tensors
    # (parallel.parallelize.frozen_params_left_local); the LoRA parameters are FSDP's still.
    left_local = world == 1 and not model.recipe.plan.cpu_offload
    n = 0
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if not isinstance(local, Weight4bit):
            continue
        n += 1
        if left_local:
            if isinstance(p, DTensor) or local.packed.shape[0] != p.shape[0]:
                raise RuntimeError(
                    f"4-bit weight {name} should be this rank's whole weight on one rank (type {type(p).__name__}): "
                    "build the model with recipe.hf_trainer.build_hf_model, and do not wrap it again"
                )
            continue
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != world:
            raise RuntimeError(
                f"4-bit weight {name} is not sharded over the {world} rank(s) (type {type(p).__name__}"
                + (f", placements {p.placements}" if isinstance(p, DTensor) else "")
                + "): build the model with recipe.hf_trainer.build_hf_model, and do not wrap it again"
            )
        if local.packed.shape[0] * world != p.shape[0]:
            raise RuntimeError(
                f"4-bit weight {name}: this rank holds {local.packed.shape[0]} of {p.shape[0]} rows, not 1/{world}"
            )
    if n == 0:
        raise RuntimeError("the model has no 4-bit weights: build it with recipe.hf_trainer.build_hf_model")
    return n
