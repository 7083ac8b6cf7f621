"""HF ``Trainer`` and TRL ``SFTTrainer`` driving this recipe's sharded QLoRA model.

A user with an existing HF script changes a few lines::

    from recipe.hf_trainer import RecipeModelArguments, RecipeTrainer, build_hf_model, load_hf_tokenizer

    parser = HfArgumentParser((RecipeModelArguments, TrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses()
    model = build_hf_model(model_args, training_args)  # was: AutoModelForCausalLM.from_pretrained(...) + get_peft_model
    tokenizer = load_hf_tokenizer(model)
    trainer = RecipeTrainer(model=model, args=training_args, train_dataset=..., processing_class=tokenizer)
    trainer.train()
    trainer.save_model()  # the complete PEFT adapter, all ranks' rows gathered

and launches it with ``torchrun --nproc-per-node N`` (or plain ``python`` for one process).
``RecipeSFTTrainer`` is the same for TRL's ``SFTTrainer`` / ``SFTConfig`` (TRL is optional and imported
only when that name is used).

``build_hf_model`` is ``recipe.builder.build_model`` behind HF's arguments, with the recipe's plan
(``recipe.plan``): per-rank loading, sharded 4-bit weights, FSDP2 mixed precision, CPU offload,
activation checkpointing (``gradient_checkpointing``) and per-block compile (``--compile``, default
``auto`` as in the recipe; ``torch_compile`` is ``true``) are applied when the model is built, before any
Trainer exists. ``RecipeModelArguments`` are generated from the recipe's config fields (help, choices,
defaults); the model carries what was decided as one object, ``model.recipe`` (``RecipeRuntime``), and
HF's calling convention in its ``forward`` (``HFLlamaForCausalLM``).

What the Trainer subclass overrides, and why (all documented override points of ``transformers.Trainer``
5.17, or public methods; nothing of transformers, accelerate or torch is patched):

* ``__init__``: refuses the ``TrainingArguments`` this model cannot honour, each with a message naming the
  field and what to set instead (``check_training_arguments``); checks that every 4-bit weight is an FSDP2
  shard of the current world (``check_sharded``) and fails loudly otherwise. It marks the model as already
  prepared for distributed training (``model._is_accelerate_prepared = True``, accelerate's own guard
  against double wrapping in ``Accelerator.prepare_model``): it is, by the recipe, so accelerate neither
  wraps it in ``DistributedDataParallel`` (which it would do on every ``torchrun`` launch, CPU or GPU),
  nor autocasts its forward, nor compiles it, nor moves it. Trainer itself does not move the model because
  the model is a bitsandbytes 4-bit one (``quantization_method``, HF's attribute for that), and it would
  use ``nn.DataParallel`` only for several GPUs in one process, which is refused.
* ``create_accelerator_and_postprocess``: builds HF's accelerator with ``mixed_precision="no"``; the
  recipe's FSDP2 ``MixedPrecisionPolicy`` computes in bf16/fp16 and the recipe's sharded ``LossScaler``
  scales fp16 losses (accelerate's ``GradScaler`` assumes unsharded gradients). ``fsdp`` / ``deepspeed``
  coming from an ``accelerate launch`` config are refused here.
* ``get_batch_samples``: counts the target tokens of the step's micro-batches the way the recipe does
  (``labels[:, 1:] != -100``) and all-reduces them (``average_tokens_across_devices``; without it each
  rank normalises by its own count and the ranks are averaged, HF's meaning of the flag).
* ``compute_loss``: the summed token loss of the micro-batch over that global count. No factor of the
  world size: FSDP sums gradients over ranks (``parallel/parallelize.py``), DDP would average them.
* ``training_step``: forward and backward under the model's SDPA kernels (``resolve_attention``),
  backward of the scaled loss in fp16; after the last micro-batch of a step
  (``accelerator.sync_gradients``) the recipe loop's own step rules (``recipe.step``): the fp16 unscale
  with the overflow flag all-reduced, the DTensor-aware clipping of ``parallel/grad_norm.py`` with
  ``max_grad_norm``, the non-finite check of every rank's loss and the gradient norm, and the skip of a
  step that overflowed or is NaN/inf (the same decision on every rank: the gradients are dropped, so
  AdamW's step is a no-op; the schedule advances, as in the recipe loop); ``max_nonfinite_steps`` such
  steps in a row raise ``TrainingDivergedError``, as in the recipe loop. It returns the loss times the
  world size, so that the mean over ranks which ``Trainer`` logs is the true mean over the global
  batch's targets.
* ``train``: hands HF's loop ``max_grad_norm = 0`` for the duration of the call (the recipe clipped
  already; HF's clip would clip again), and resumes the sharded optimizer and loss scaler state from a
  ``resume_from_checkpoint`` directory (``_RecipeStateCallback``).
* ``log``: the logged ``grad_norm`` is the recipe's pre-clip norm (HF measures after our clip);
  fp16 runs also log ``loss_scale``.
* ``save_model``: the complete PEFT adapter (``recipe.export.export_model_adapter`` gathers every rank's
  rows; rank 0 writes), the tokenizer and ``training_args.bin``; ``push_to_hub`` is HF's, on that folder.

Checkpoints (``save_steps`` / ``save_strategy``) are HF's folders ``checkpoint-N`` plus, written by a
``TrainerCallback.on_save`` on every rank: ``model.safetensors`` (the gathered LoRA weights under the
recipe's names, which HF's resume loads through a load-state-dict hook that keeps each rank's rows) and
``recipe_state/`` (the sharded optimizer state and the loss scaler, ``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers import Trainer, TrainerCallback
from transformers.utils.quantization_config import QuantizationMethod

from models.hf_reader import CheckpointReader
from models.llama import CausalLMOutput, LlamaForCausalLM
from models.quant import Weight4bit
from models.sdpa import SdpaChoice, sdpa_context
from parallel.distributed import DistInfo, init_distributed
from parallel.plan import ParallelPlan
from recipe.builder import build_model, ensure_checkpoint, resolve_attention
from recipe.checkpoint import TrainableState
from recipe.config import ConfigError, JobConfig, config_field, validate
from recipe.data import drop_trivial_masks, load_tokenizer
from recipe.export import export_model_adapter
from recipe.logging import log
from recipe.optim import LossScaler
from recipe.plan import resolve_plan
from recipe.step import NonfiniteGuard, StepRules, batch_to_device

__all__ = [
    "RecipeModelArguments",
    "HFLlamaForCausalLM",
    "UnsupportedSettingError",
    "job_config_from",
    "build_hf_model",
    "load_hf_tokenizer",
    "check_training_arguments",
    "check_sharded",
    "RecipeTrainer",
    "RecipeSFTTrainer",  # noqa: F822 (module __getattr__: TRL is imported on first use)
]

# The optimizers of TrainingArguments.optim that are torch's AdamW (the recipe's optimizer); both take
# the DTensor shards as they are.
SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused")
# What the recipe's model takes from a batch (collators may add columns of their own).
_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
STATE_DIR = "recipe_state"  # inside an HF checkpoint-N folder
LORA_WEIGHTS_NAME = "model.safetensors"  # the name HF's resume looks for
OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # HF's names in a checkpoint folder


class UnsupportedSettingError(ValueError):
    """A TrainingArguments (or SFTConfig) setting this model cannot honour; the message says what to set."""


# The recipe's model options as HfArgumentParser fields: (argument, config section, key). Types, defaults,
# help and choices are read from recipe.config's fields (one schema); _ARGUMENT_OVERRIDES changes the few
# whose meaning differs next to TrainingArguments.
_MODEL_ARGUMENTS = (
    ("model_name_or_path", "model", "checkpoint"),
    ("synthetic_shape", "model", "synthetic_shape"),
    ("tokenizer_name_or_path", "model", "tokenizer"),
    ("quant_type", "model", "quant_type"),
    ("lora_r", "lora", "rank"),
    ("lora_alpha", "lora", "alpha"),
    ("lora_dropout", "lora", "dropout"),
    ("lora_target_modules", "lora", "target_modules"),
    ("activation_checkpointing", "activation_checkpoint", "mode"),
    ("selective_every", "activation_checkpoint", "selective_every"),
    ("cpu_offload", "parallelism", "cpu_offload"),
    ("reshard_after_forward", "parallelism", "reshard_after_forward"),
    ("vocab_parallel_embedding", "parallelism", "vocab_parallel_embedding"),
    ("mixed_precision_reduce", "training", "mixed_precision_reduce"),
    ("attention_backend", "training", "attention_backend"),
    ("max_nonfinite_steps", "training", "max_nonfinite_steps"),
    ("compile", "training", "compile"),
)
_ARGUMENT_OVERRIDES: dict[str, dict[str, Any]] = {
    "quant_type": {"choices": ("nf4", "fp4"), "help": " The HF Trainer path trains QLoRA: nf4 or fp4."},
    "activation_checkpointing": {
        "default": "",
        "help": " Empty: full with --gradient_checkpointing, else none.",
    },
    "compile": {
        "type": str,
        "default": "auto",
        "choices": ("auto", "true", "false"),
        "help": " --torch_compile is the same as true.",
    },
}


def _model_arguments_class() -> type:
    fields = []
    for name, section, key in _MODEL_ARGUMENTS:
        f, tp = config_field(section, key)
        over = _ARGUMENT_OVERRIDES.get(name, {})
        default = over.get("default", f.default if f.default is not dataclasses.MISSING else f.default_factory())
        meta = {"help": f"[{section}] {key}: {f.metadata['help']}{over.get('help', '')}"}
        choices = over.get("choices", f.metadata.get("choices"))
        if choices is not None:
            meta["choices"] = tuple(choices)
        if isinstance(default, list):
            spec = field(default_factory=lambda d=default: list(d), metadata=meta)
        else:
            spec = field(default=default, metadata=meta)
        fields.append((name, over.get("type", tp), spec))
    cls = dataclasses.make_dataclass("RecipeModelArguments", fields)
    cls.__module__ = __name__
    cls.__doc__ = (
        "The recipe's model and LoRA options, for ``HfArgumentParser`` next to ``TrainingArguments``; each is "
        "a recipe.config key (``_MODEL_ARGUMENTS``), with its help, choices and default."
    )
    return cls


RecipeModelArguments = _model_arguments_class()


def job_config_from(model_args, training_args=None) -> JobConfig:
    """The recipe's JobConfig for these arguments (the sections ``recipe.builder.build_model`` reads).

    ``model_args``: a ``RecipeModelArguments``, each field a config key (``_MODEL_ARGUMENTS``). From
    ``training_args`` (a ``TrainingArguments``): ``seed`` (LoRA initialisation), ``bf16`` / ``fp16``
    (the compute dtype), ``gradient_checkpointing`` (full activation checkpointing), ``torch_compile``
    (``compile = true``), ``use_cpu``, ``ddp_backend`` and ``full_determinism`` (deterministic kernels and
    the split-independent gradient norm)."""
    ta = training_args
    cfg = JobConfig()
    if not model_args.model_name_or_path:
        raise ConfigError(
            "model_name_or_path is empty: set --model_name_or_path to a pre-quantized checkpoint directory or hub id"
        )
    if model_args.quant_type not in ("nf4", "fp4"):
        raise ConfigError(
            f"quant_type = {model_args.quant_type!r}: the HF Trainer path trains QLoRA on 4-bit weights; "
            "set --quant_type nf4 (or fp4)"
        )
    for name, section, key in _MODEL_ARGUMENTS:
        value = getattr(model_args, name)
        if name == "compile":
            value = {"true": True, "false": False}.get(str(value).lower(), value)
        elif isinstance(value, list):
            value = list(value)
        else:
            value = config_field(section, key)[1](value)
        setattr(getattr(cfg, section), key, value)
    ac = model_args.activation_checkpointing
    if ta is not None:
        cfg.job.seed = int(ta.seed)
        cfg.job.deterministic = bool(ta.full_determinism)
        cfg.training.mixed_precision_param = "float16" if ta.fp16 else "bfloat16" if ta.bf16 else "float32"
        if ta.torch_compile:
            cfg.training.compile = True
        cfg.training.device = "cpu" if ta.use_cpu else "auto"
        if ta.ddp_backend in ("gloo", "nccl"):
            cfg.parallelism.backend = ta.ddp_backend
        if ta.gradient_checkpointing and ac == "none":
            raise ConfigError(
                "gradient_checkpointing = True but activation_checkpointing = 'none': drop one of them "
                "(--activation_checkpointing full or selective, or no --gradient_checkpointing)"
            )
        ac = ac or ("full" if ta.gradient_checkpointing else "none")
    else:
        cfg.training.mixed_precision_param = "float32"
    cfg.activation_checkpoint.mode = ac or "none"
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class RecipeRuntime:
    """What ``build_hf_model`` decided, hung on the model as one object (``model.recipe``): the job
    config, the process group and device, the SDPA kernels, the parallel plan (``recipe.plan``) and the
    base checkpoint's directory."""

    config: JobConfig
    dist: DistInfo
    sdpa: SdpaChoice
    plan: ParallelPlan
    base_checkpoint: Path


class HFCausalLMOutput(CausalLMOutput):
    """``CausalLMOutput`` as HF ``Trainer`` reads outputs: indexable like a tuple (loss, logits) or a dict."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.loss, self.logits) if v is not None)[key]

    def keys(self):
        return [k for k in ("loss", "logits") if getattr(self, k) is not None]


class HFLlamaForCausalLM(LlamaForCausalLM):
    """The recipe's Llama with the attributes HF ``Trainer`` and TRL read. Parameters, modules and
    ``forward`` are the base class's (``recipe.builder.build_model(..., model_cls=HFLlamaForCausalLM)``).

    ``quantization_method``: the frozen base is bitsandbytes 4-bit, and HF does not ``.to()`` such a model
    (it would pull CPU-offloaded shards onto the GPU)."""

    main_input_name = "input_ids"
    _keys_to_ignore_on_save = None
    supports_gradient_checkpointing = True
    quantization_method = QuantizationMethod.BITS_AND_BYTES

    recipe: RecipeRuntime  # set by build_hf_model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        position_ids=None,
        inputs_embeds=None,
        num_items_in_batch=None,
        return_logits: bool | None = None,
        **hf_kwargs,
    ) -> HFCausalLMOutput:
        """HF's calling convention around the recipe model's: ``num_items_in_batch`` divides the summed
        loss (HF's gradient-accumulation normalisation), ``return_logits`` adds the logits next to the
        loss, and the keywords HF and TRL pass besides (``use_cache``, ``return_dict``, ...) are accepted
        and unused."""
        h = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        out = self.causal_lm_output(h, labels, with_logits=bool(return_logits))
        if labels is not None and num_items_in_batch is not None:
            out.loss = out.loss_sum / num_items_in_batch
        return HFCausalLMOutput(**{f.name: getattr(out, f.name) for f in dataclasses.fields(out)})

    def add_model_tags(self, tags) -> None:  # TRL tags its models (model cards)
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.model_tags = sorted(set(getattr(self, "model_tags", None) or []) | set(tags))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.recipe.config.activation_checkpoint.mode != "none"

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Called by ``Trainer.train`` with ``gradient_checkpointing``: the recipe's checkpointing was
        applied when the model was built (inside FSDP's hooks); nothing can be added afterwards."""
        if not self.is_gradient_checkpointing:
            raise UnsupportedSettingError(
                "TrainingArguments.gradient_checkpointing = True, but the model was built without activation "
                "checkpointing: build it with build_hf_model(model_args, training_args) from the same arguments "
                "(or --activation_checkpointing full)"
            )

    def gradient_checkpointing_disable(self) -> None:
        pass

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


def _shard_full_tensors(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a full (unsharded) tensor for a DTensor parameter becomes this rank's
    rows of it (``distribute_tensor`` without communication: every rank holds the full tensor)."""
    for name, p in module.named_parameters():
        key = prefix + name
        v = state_dict.get(key)
        if v is not None and isinstance(p, DTensor) and not isinstance(v, DTensor):
            if tuple(v.shape) != tuple(p.shape):
                continue  # load_state_dict reports the size mismatch
            state_dict[key] = distribute_tensor(
                v.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None
            )


def _frozen_keys_are_not_missing(module, incompatible_keys) -> None:
    """load_state_dict post-hook: the frozen base is never in a training checkpoint; only a missing LoRA
    weight is missing."""
    keep = [k for k in incompatible_keys.missing_keys if ".lora_A." in k or ".lora_B." in k]
    incompatible_keys.missing_keys[:] = keep


def build_hf_model(model_args: RecipeModelArguments, training_args=None) -> HFLlamaForCausalLM:
    """This recipe's sharded QLoRA model for ``RecipeTrainer`` / ``RecipeSFTTrainer`` (collective: every
    rank calls it). Initialises the process group (torchrun's environment, or a world of one)."""
    cfg = job_config_from(model_args, training_args)
    p, t = cfg.parallelism, cfg.training
    dist_info = init_distributed(device=t.device, backend=p.backend, cpu_offload=p.cpu_offload)
    sdpa = resolve_attention(cfg, dist_info)
    path = ensure_checkpoint(cfg.model, cfg.job.seed, dist_info)
    reader = CheckpointReader(path)
    plan = resolve_plan(
        cfg, dist_info.device, dist_info.dp_shard, reader.shape, dist_info.rank, world_size=dist_info.world_size
    )
    model = build_model(cfg, reader, dist_info, plan, model_cls=HFLlamaForCausalLM)
    from transformers import AutoConfig, GenerationConfig

    model.config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.recipe = RecipeRuntime(cfg, dist_info, sdpa, plan, Path(os.path.abspath(path)))
    model.name_or_path = str(model_args.model_name_or_path)
    model.register_load_state_dict_pre_hook(_shard_full_tensors)
    model.register_load_state_dict_post_hook(_frozen_keys_are_not_missing)
    n = sum(q.numel() for q in model.parameters() if q.requires_grad)
    log(f"hf_trainer: model ready: {dist_info.world_size} rank(s), {n:,} trainable parameters", dist_info.rank)
    return model


def load_hf_tokenizer(model: HFLlamaForCausalLM):
    """The model's tokenizer (``tokenizer_name_or_path``, else the checkpoint's own), local files only."""
    return load_tokenizer(model.recipe.config.model.tokenizer or str(model.recipe.base_checkpoint))


# --------------------------------------------------------------------------------------------- checks


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


# --------------------------------------------------------------------------------------------- trainer


def _lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Full LoRA tensors on every rank (a collective)."""
    from parallel.sharding import gather_rows

    return {n: gather_rows(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


class _RecipeStateCallback(TrainerCallback):
    """Writes the recipe's part of every HF checkpoint (on every rank) and restores it on resume."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_recipe_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer._resume_dir is not None:
            self.trainer._load_recipe_state(Path(self.trainer._resume_dir))


class RecipeTrainerMixin:
    """The overrides shared by ``RecipeTrainer`` and ``RecipeSFTTrainer`` (see the module docstring)."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if not isinstance(model, HFLlamaForCausalLM):
            raise TypeError(
                f"{type(self).__name__} trains the recipe's sharded model: build it with "
                f"recipe.hf_trainer.build_hf_model (got {type(model).__name__})"
            )
        if args is None:
            raise TypeError(f"{type(self).__name__} needs args (TrainingArguments or SFTConfig)")
        check_training_arguments(args, model)
        check_sharded(model)
        # Already prepared for distributed training (by the recipe): accelerate's own guard against
        # wrapping a model twice. See the module docstring.
        model._is_accelerate_prepared = True
        cfg = model.recipe.config
        self._recipe_cfg = cfg
        self._recipe_dist = model.recipe.dist
        self._scaler = LossScaler(model.recipe.plan.param_dtype == torch.float16)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        dist_info = model.recipe.dist
        # The recipe loop's step rules (recipe.step): token count, loss scale, unscale, clip, non-finite policy.
        self._rules = StepRules(
            self._trainable,
            self._scaler,
            max_norm=float(args.max_grad_norm),
            exact_norm=cfg.job.deterministic,
            check_nonfinite=cfg.training.max_nonfinite_steps > 0,
            rank=dist_info.rank,
            world=dist_info.world_size,
            device=dist_info.device,
        )
        self._nonfinite = NonfiniteGuard(cfg.training.max_nonfinite_steps, dist_info.rank)
        self._step_loss: torch.Tensor | None = None  # this rank's summed micro-batch losses of the step
        self._last_grad_norm: torch.Tensor | None = None
        self._resume_dir: str | None = None
        if args.logging_nan_inf_filter and model.recipe.dist.device.type == "cuda":
            # Trainer's filter reads every micro-batch's loss on the host (torch.isnan(...) in a
            # Python `if`): a synchronisation per micro-batch, in a step bound by the host. A step
            # whose gradient norm is NaN/inf is skipped by _finish_step instead (and logged).
            args.logging_nan_inf_filter = False
            log(
                "hf_trainer: logging_nan_inf_filter off (a host sync per micro-batch); steps with a NaN/inf "
                "gradient norm are skipped and logged instead",
                model.recipe.dist.rank,
            )
        super().__init__(model, args, *rest, **kwargs)
        self.add_callback(_RecipeStateCallback(self))

    # -- accelerate ----------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        requested = self.args.mixed_precision
        self.args.mixed_precision = "no"  # the recipe's FSDP2 mixed precision and LossScaler do it
        try:
            super().create_accelerator_and_postprocess()
        finally:
            self.args.mixed_precision = requested
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            what = "FSDP" if self.is_fsdp_enabled else "DeepSpeed"
            raise UnsupportedSettingError(
                f"the accelerate configuration enables {what}: the recipe shards the model itself; launch with "
                "torchrun (or accelerate launch without --use_fsdp / --use_deepspeed)"
            )

    def create_optimizer(self, model=None):
        """HF's AdamW (``optim``, ``learning_rate``, ``adam_*``, ``weight_decay``) without its empty groups
        (every LoRA weight falls in the decay group, and DCP's optimizer state dict, used by checkpoints,
        cannot map a group without parameters), with ``foreach`` kernels unless ``adamw_torch_fused``."""
        opt = super().create_optimizer(model)
        inner = opt
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.param_groups[:] = [g for g in inner.param_groups if g["params"]]
        if not any(g.get("fused") for g in inner.param_groups):
            # The multi-tensor kernels, as the recipe's own optimizer (recipe.optim.build_optimizer): torch
            # picks them by itself on GPUs only, and the per-tensor loop rounds differently.
            for g in inner.param_groups:
                g["foreach"] = True
        return opt

    # -- the step ------------------------------------------------------------------------------------
    @property
    def _world(self) -> int:
        return self._recipe_dist.world_size

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and the number of target tokens to normalise by (see module docstring)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        labels = [b["labels"] for b in batches if "labels" in b]
        n = self._rules.count_tokens(labels, across_ranks=self.args.average_tokens_across_devices)
        return batches, n.float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "shift_labels" in inputs:
            raise UnsupportedSettingError(
                "the batch carries shift_labels (context/sequence parallelism): not supported, the recipe's "
                "model shifts labels itself"
            )
        batch = drop_trivial_masks({k: v for k, v in inputs.items() if k in _MODEL_INPUTS})
        on_host = model.recipe.plan.embedding == "host"
        batch = batch_to_device(batch, self._recipe_dist.device, host_embedding=on_host)
        out = model(**batch)
        if out.loss_sum is None:
            raise ValueError("the batch has no labels: the recipe's Trainer needs them to compute the loss")
        loss = out.loss if num_items_in_batch is None else out.loss_sum / num_items_in_batch
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        # The run's SDPA kernels for forward and backward (with the recomputed forward in it).
        with sdpa_context(model.recipe.sdpa):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            self._scaler.scale_loss(loss).backward()
        # A non-finite loss_sum / count is a non-finite loss: the sum is what the step checks.
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        if self.accelerator.sync_gradients:
            self._finish_step()
        # Trainer logs the mean over ranks of what this returns: times the world size, that is the sum
        # over ranks, the loss of the global batch.
        return loss.detach() * self._world

    def _finish_step(self) -> None:
        """After the last micro-batch: unscale (fp16), clip, check (``recipe.step.StepRules.finish``), and
        drop the gradients of a step to skip: the decision is the same on every rank (an all-reduced
        flag, an all-reduced norm), and AdamW skips parameters without gradients, so HF's optimizer step
        is a no-op; the schedule still advances, as in the recipe loop. ``max_nonfinite_steps`` skipped
        non-finite steps in a row raise ``TrainingDivergedError`` out of ``train``, as in the recipe."""
        outcome = self._rules.finish(self._step_loss)
        self._step_loss = None
        if outcome.skip:
            for p in self._trainable:
                p.grad = None
        self._last_grad_norm = outcome.grad_norm
        self._nonfinite.after_step(
            self.state.global_step + 1, outcome, self._scaler.scale, last_checkpoint=self._last_checkpoint_step
        )

    def _last_checkpoint_step(self) -> int | None:
        from transformers.trainer_utils import get_last_checkpoint

        out = self.args.output_dir
        last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
        return int(last.rsplit("-", 1)[1]) if last else None

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            state = Path(resume_from_checkpoint) / STATE_DIR
            if not (state / ".metadata").is_file():
                raise ValueError(
                    f"{resume_from_checkpoint} has no {STATE_DIR}/ (the recipe's optimizer state): it was not "
                    "written by RecipeTrainer / RecipeSFTTrainer, so it cannot be resumed exactly"
                )
        self._resume_dir = resume_from_checkpoint or None
        saved = self.args.max_grad_norm
        self.args.max_grad_norm = 0.0  # clipped in training_step already
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            self.args.max_grad_norm = saved

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "grad_norm" in logs and self._last_grad_norm is not None:
            logs["grad_norm"] = float(self._last_grad_norm)
        if self._scaler.enabled and "loss" in logs:
            logs["loss_scale"] = self._scaler.scale
        super().log(logs, *args, **kwargs)

    # -- saving --------------------------------------------------------------------------------------
    def _export_adapter(self, out: Path) -> None:
        """The complete PEFT adapter into ``out`` (collective), next to whatever else ``out`` holds."""
        is_main = self._recipe_dist.is_main
        tmp = out.parent / f".{out.name}.adapter-tmp"
        export_model_adapter(
            self.model,
            tmp,
            self._recipe_cfg.lora,
            base_model=str(self.model.recipe.base_checkpoint),
            is_main=is_main,
            verbose=False,
        )
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            names = sorted(f.name for f in tmp.iterdir())
            for name in names:
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"hf_trainer: saved the PEFT adapter ({', '.join(names)}) to {out}")
        if self._world > 1:
            dist.barrier()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        self._export_adapter(out)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(out))
            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(self.args, out / TRAINING_ARGS_NAME)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _trainable_state(self) -> TrainableState:
        # The LoRA weights go to HF's model.safetensors (HF's resume loads them); recipe_state/ has the rest.
        return TrainableState(self.model, self._inner_optimizer(), include_model=False)

    def _inner_optimizer(self):
        opt = self.optimizer
        while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer
        return opt

    def _save_recipe_state(self, ckpt: Path) -> None:
        """Collective: the LoRA weights (full, for HF's resume) and the sharded optimizer + loss scaler."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        lora = _lora_state_dict(self.model)
        sd = self._trainable_state().state_dict()
        sd["scaler"] = json.dumps(self._scaler.state_dict())
        dcp.save(sd, checkpoint_id=str(ckpt / STATE_DIR))
        if self._recipe_dist.is_main:
            tmp = ckpt / f".{LORA_WEIGHTS_NAME}.tmp-{uuid.uuid4().hex[:8]}"
            save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, ckpt / LORA_WEIGHTS_NAME)
            # HF's optimizer.pt holds rank 0's shards only (and HF's resume cannot map them onto the ranks);
            # recipe_state/ replaces it. Without it HF's resume also leaves the scheduler to us.
            (ckpt / OPTIMIZER_NAME).unlink(missing_ok=True)
        if self._world > 1:
            dist.barrier()

    def _load_recipe_state(self, ckpt: Path) -> None:
        """Collective: the optimizer and loss scaler of ``ckpt`` (HF has loaded the LoRA weights by now)."""
        import torch.distributed.checkpoint as dcp

        state = self._trainable_state()
        sd = state.state_dict()
        sd["scaler"] = ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(ckpt / STATE_DIR))
        state.load_state_dict({"optim": sd["optim"]})
        self._scaler.load_state_dict(json.loads(sd["scaler"]))
        sched = ckpt / SCHEDULER_NAME
        if sched.is_file():  # HF loads it only together with optimizer.pt, which recipe_state/ replaces
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
        log(f"hf_trainer: resumed optimizer, scheduler and loss scaler from {ckpt}", self._recipe_dist.rank)


class RecipeTrainer(RecipeTrainerMixin, Trainer):
    """``transformers.Trainer`` for the recipe's sharded QLoRA model (see the module docstring)."""


_SFT_CLASS = None


def _sft_trainer_class():
    global _SFT_CLASS
    if _SFT_CLASS is None:
        try:
            from trl import SFTTrainer
        except ImportError as e:
            raise ImportError(
                "RecipeSFTTrainer needs TRL, an optional dependency: pip install trl==1.16.0 "
                f"(the version this recipe is tested with) ({e})"
            ) from e

        class RecipeSFTTrainer(RecipeTrainerMixin, SFTTrainer):
            """TRL's ``SFTTrainer`` (dataset preparation, chat templates, packing, completion-only and
            assistant-only masks) on the recipe's sharded model; the loss, the step and saving are
            ``RecipeTrainerMixin``'s. TRL's fused LM head (and its entropy / token-accuracy metrics) is not
            used: the recipe's chunked cross-entropy computes the loss."""

        _SFT_CLASS = RecipeSFTTrainer
    return _SFT_CLASS


def __getattr__(name: str):
    if name == "RecipeSFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
