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

``build_hf_model`` and ``RecipeModelArguments`` live in ``recipe.hf_model`` (the model), the checks of
``TrainingArguments`` in ``recipe.hf_checks``; this module re-exports both.

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

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from models.sdpa import sdpa_context
from recipe.checkpoint import TrainableState
from recipe.data import drop_trivial_masks
from recipe.export import export_model_adapter
from recipe.hf_checks import check_sharded, check_training_arguments
from recipe.hf_model import (
    HFLlamaForCausalLM,
    RecipeModelArguments,
    UnsupportedSettingError,
    build_hf_model,
    job_config_from,
    load_hf_tokenizer,
)
from recipe.logging import log
from recipe.optim import LossScaler
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

# What the recipe's model takes from a batch (collators may add columns of their own).
_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
STATE_DIR = "recipe_state"  # inside an HF checkpoint-N folder
LORA_WEIGHTS_NAME = "model.safetensors"  # the name HF's resume looks for
OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # HF's names in a checkpoint folder


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
