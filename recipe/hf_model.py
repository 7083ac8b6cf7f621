"""The HF-facing side of the recipe's model: ``RecipeModelArguments`` (HfArgumentParser fields generated
from recipe.config's), ``job_config_from``, ``HFLlamaForCausalLM`` (HF's calling convention around the
recipe's model) and ``build_hf_model``.

``build_hf_model`` is ``recipe.builder.build_model`` behind HF's arguments, with the recipe's plan
(``recipe.plan``): per-rank loading, sharded 4-bit weights, FSDP2 mixed precision, CPU offload,
activation checkpointing (``gradient_checkpointing``) and per-block compile (``--compile``, default
``auto`` as in the recipe; ``torch_compile`` is ``true``) are applied when the model is built, before any
Trainer exists. ``RecipeModelArguments`` are generated from the recipe's config fields (help, choices,
defaults); the model carries what was decided as one object, ``model.recipe`` (``RecipeRuntime``), and
HF's calling convention in its ``forward`` (``HFLlamaForCausalLM``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.utils.quantization_config import QuantizationMethod

from models.hf_reader import CheckpointReader
from models.llama import CausalLMOutput, LlamaForCausalLM
from models.sdpa import SdpaChoice
from parallel.distributed import DistInfo, init_distributed
from parallel.plan import ParallelPlan
from recipe.builder import build_model, ensure_checkpoint, resolve_attention
from recipe.config import ConfigError, JobConfig, config_field, validate
from recipe.data import load_tokenizer
from recipe.logging import log
from recipe.plan import resolve_plan

__all__ = [
    "RecipeModelArguments",
    "RecipeRuntime",
    "HFLlamaForCausalLM",
    "UnsupportedSettingError",
    "job_config_from",
    "build_hf_model",
    "load_hf_tokenizer",
]


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
