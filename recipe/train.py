"""QLoRA training entry point: ``python -m recipe.train --job.config_file FILE [--section.key=value ...]``.

Reads top to bottom in the order data flows:
  config -> process group -> base checkpoint -> data -> model on meta -> parallelize (AC, compile,
  FSDP2) -> materialize this rank's shards (``recipe.builder``) -> optimizer -> [resume] -> train loop
  -> save / export.

Every component is built here from its own config section and the runtime objects it needs; none
of them sees the Trainer.

Loss normalisation: every optimizer step divides the summed token losses of all micro-batches on
all ranks by the global number of target tokens (all-reduced before the first micro-batch), so an
N-rank run with accumulation computes exactly the loss and gradients of a 1-rank run over the same
global batch. FSDP sums (not averages) gradients over ranks (parallel/parallelize.py sets its divide
factor to 1), so the backward loss is the same ``loss_sum / n_global`` on any world size: with a
bf16 backward, a factor of the world size there would change the rounding of every gradient. With HSDP
(``parallelism.data_parallel_replicate_degree`` > 1) nothing changes here: every rank still has its own
micro-batches (the loader's rank and world are the global ones), the token count is all-reduced over
all ranks, and FSDP sums the gradients over the shard group and then over the replicas.

Pipeline parallelism (``parallelism.pipeline_parallel_degree`` > 1, ``parallel/pipeline.py``): the
model is this rank's stages, ``self.model`` holds their blocks under the full model's names (what the
optimizer, checkpoints and export see), and the step's micro-batches go through the schedule instead of
the forward/backward loop; the loader's rank and world are the data-parallel ones, and the token count
is divided by the pipeline degree (each pipeline rank of a data-parallel rank counted the same batch).

Host-device synchronisation: a step leaves its loss, token count and gradient norm on the device;
they are read (with the step times, ``recipe.metrics.StepClock``) once per ``metrics.log_freq``
steps. One flag per step is read at once, because skipping the optimizer step needs it: fp16's
overflow flag, or in bf16/fp32 the non-finite guard's (``training.max_nonfinite_steps = 0`` turns
that check, and its read, off).
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from models.hf_reader import CheckpointReader
from models.sdpa import sdpa_context
from parallel.distributed import all_reduce_sum, destroy, init_distributed
from parallel.pipeline import PipelineRunner, format_bubble_table, plan_pipeline
from recipe import run_guard
from recipe.builder import base_quant_name, build_model, build_pipeline_model, ensure_checkpoint, resolve_attention
from recipe.checkpoint import Checkpointer, RunIdentity, TrainableState, schedule_changes
from recipe.config import JobConfig, config_to_dict, dump_toml, load_config
from recipe.data import (
    GlobalBatchLoader,
    build_data,
    drop_trivial_masks,
    load_tokenizer,
    resolve_global_batch_size,
)
from recipe.estimate import memory_warning
from recipe.exit_status import record_exit, report_bad_input, report_failure
from recipe.export import export_model_adapter
from recipe.logging import log
from recipe.metrics import (
    MetricsLogger,
    StepClock,
    describe_speed,
    gather_bubble,
    host_rss_gib,
    model_flops_per_token,
    peak_flops,
    peak_memory_gib,
    run_summary,
)
from recipe.optim import LossScaler, apply_hyperparameters, build_lr_scheduler, build_optimizer
from recipe.plan import resolve_plan
from recipe.planner import plan_for_run
from recipe.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher
from recipe.profiling import Profiler
from recipe.run_report import report_results
from recipe.seeding import rank_seed
from recipe.step import (
    DIVERGED_EXIT_CODE,
    NonfiniteGuard,
    StepOutcome,
    StepRules,
    TrainingDivergedError,
    batch_to_device,
)
from recipe.versions import check_torch

__all__ = ["Trainer", "main", "build_model", "memory_warning", "TrainingDivergedError", "DIVERGED_EXIT_CODE"]


class Preempted(Exception):
    """A signal stopped the run after a saved step (``Trainer._stop_preempted``)."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}")
        self.step = step


@dataclass
class StepResult:
    """One optimizer step. The device values are read on the host only when asked for."""

    loss_sum: torch.Tensor  # summed token losses of the global batch (all ranks), on the device (fp32; fp64 exact)
    n_global: torch.Tensor  # target tokens of the global batch (>= 1), on the device
    tokens: int  # tokens this rank processed (padding included)
    outcome: StepOutcome  # the gradient norm and the skip decision (recipe.step)

    @property
    def grad_norm_t(self) -> torch.Tensor:  # LoRA gradient norm before clipping, on the device
        return self.outcome.grad_norm

    @property
    def skipped(self) -> bool:  # the optimizer step was skipped (fp16 overflow, or a non-finite loss / norm)
        return self.outcome.skip

    @property
    def nonfinite_ranks(self) -> tuple[int, ...]:  # bf16/fp32: ranks whose loss was NaN/inf (skip reason)
        return self.outcome.nonfinite_ranks

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / float(self.n_global)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)


class PendingStep(NamedTuple):
    """A step whose device values are not read yet (``Trainer._flush`` reads them in one go)."""

    step: int
    result: StepResult
    host: dict  # host-side values taken right after the step
    marks: tuple  # the StepClock marks around the step


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.job.seed)
        if cfg.job.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        p, t = cfg.parallelism, cfg.training
        self.dist = init_distributed(
            device=t.device,
            backend=p.backend,
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=p.data_parallel_shard_degree,
            pp=p.pipeline_parallel_degree,
            cpu_offload=p.cpu_offload,
        )
        self.device = self.dist.device
        rank, world = self.dist.rank, self.dist.world_size
        self._log_layout()
        self.dump = Path(cfg.job.dump_folder)
        # Before anything is loaded: one live run per dump folder; no rank outlives its launcher.
        run_guard.acquire(self.dump, rank, world)
        # Before anything is loaded: a wrong layout, or a dtype or kernel the GPU lacks, should not cost a
        # model load. The pipeline ranks of one data-parallel rank train the same micro-batches (the schedule's).
        micro_size = p.pipeline_parallel_microbatch_size if self.dist.pp > 1 else t.micro_batch_size
        self.global_batch = resolve_global_batch_size(t.global_batch_size, micro_size, self.dist.dp_world)
        self.sdpa = resolve_attention(cfg, self.dist)

        ckpt_dir = ensure_checkpoint(cfg.model, cfg.job.seed, self.dist)
        self.reader = CheckpointReader(ckpt_dir)
        # Every parallel decision, once (an impossible combination is a ConfigError before loading).
        self.plan = resolve_plan(
            cfg, self.device, self.dist.dp_shard, self.reader.shape, rank, world_size=self.dist.world_size
        )
        pipeline_plan = None
        if self.dist.pp > 1:  # before the data and the weights: the layout needs only the block count
            pipeline_plan = plan_pipeline(
                self.dist.pp,
                p.pipeline_parallel_schedule,
                self.reader.shape.num_hidden_layers,
                self.global_batch // (micro_size * self.dist.dp_world),
                p.pipeline_parallel_layers_per_stage,
                p.pipeline_parallel_split_points,
                self.plan.compile,
            )
        # Data before weights: a wrong data path, format or tokenizer fails in seconds, not after
        # the model has been loaded.
        shape = self.reader.shape
        tokenizer = None
        if cfg.data.path and cfg.data.format != "synthetic":
            tokenizer = load_tokenizer(cfg.model.tokenizer or str(ckpt_dir))
        self.data = build_data(cfg.data, tokenizer, shape.vocab_size, cfg.job.seed)
        self.loader = GlobalBatchLoader(
            self.data, self.global_batch, micro_size, self.dist.dp_rank, self.dist.dp_world, cfg.job.seed
        )

        warning = memory_warning(cfg, world, self.device)
        if warning:
            log(warning, rank)
        t0 = time.perf_counter()
        self.model, self.pipeline = self._build_model(pipeline_plan)
        self.load_time_s = time.perf_counter() - t0
        # Dropout draws from the global generator (LoRA initialisation has its own seeded generator).
        torch.manual_seed(rank_seed(cfg.job.seed, rank))
        self.load_peak_gib = peak_memory_gib(self.device)
        self.profiler = Profiler(
            cfg.profiling,
            t.steps,
            rank,
            world,
            self.device,
            self.dump / cfg.profiling.save_folder,
            self.dump / cfg.metrics.save_folder / "memory_report.json",
        )
        self.profiler.after_load()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        log(
            f"model ready in {self.load_time_s:.1f}s; load peak {self.load_peak_gib:.2f} GiB/rank; "
            f"{self.num_trainable():,} trainable parameters",
            rank,
        )

        self.optimizer = build_optimizer(self.params, cfg.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        if 0 < t.steps <= cfg.lr_scheduler.warmup_steps:
            log(
                f"note: lr_scheduler.warmup_steps = {cfg.lr_scheduler.warmup_steps} >= training.steps = "
                f"{t.steps}: the lr never reaches optimizer.lr",
                rank,
            )
        self.scaler = LossScaler(
            self.plan.param_dtype == torch.float16, t.loss_scale_init, t.loss_scale_growth_interval
        )
        self.rules = StepRules(
            self.params,
            self.scaler,
            max_norm=t.max_norm,
            exact_norm=cfg.job.deterministic,
            check_nonfinite=t.max_nonfinite_steps > 0,
            rank=rank,
            world=world,
            device=self.device,
            pp_group=self.dist.pp_mesh.get_group() if self.pipeline is not None else None,
        )
        self.nonfinite = NonfiniteGuard(t.max_nonfinite_steps, rank)
        self.step = 0  # optimizer steps completed
        self.metrics = self._metrics_logger()
        self.step_times: list[float] = []  # seconds of every step this process ran (summary.json)
        self.bubble: list[dict] = []  # pipeline: every rank's action times, after training
        if self.dist.is_main:
            self.dump.mkdir(parents=True, exist_ok=True)
        self.checkpointer = self._make_checkpointer()
        self.step = self.checkpointer.maybe_resume()  # raises CheckpointLoadError before any training
        if self.checkpointer.resumed_from is not None:
            moved = schedule_changes(self.checkpointer.resumed_meta.get("config"), config_to_dict(cfg))
            if moved:
                log(f"checkpoint: the lr schedule follows the config from step {self.step}: {', '.join(moved)}", rank)
            changed = apply_hyperparameters(self.optimizer, self.scheduler, cfg.optimizer)
            if changed:
                log(f"checkpoint: optimizer settings from the config, not the checkpoint: {', '.join(changed)}", rank)
        self.metrics.begin(self.step)
        self.preemption = PreemptionWatcher(rank, world)
        if self.dist.is_main:
            # After the resume checks: a rejected resume must leave the run's files as they were.
            tmp = self.dump / f".config.toml.tmp-{os.getpid()}"
            tmp.write_text(dump_toml(cfg))
            tmp.replace(self.dump / "config.toml")

    def _log_layout(self) -> None:
        d, schedule = self.dist, self.cfg.parallelism.pipeline_parallel_schedule
        layout = f" (HSDP: {d.dp_replicate} replicas x {d.dp_shard} shards)" if d.dp_replicate > 1 else ""
        if d.pp > 1:
            layout += f" (pipeline {d.pp} x data-parallel {d.dp_world}, {schedule})"
        backend = torch.distributed.get_backend()
        log(f"{d.world_size} rank(s){layout}, backend {backend}, device {self.device.type}", d.rank)

    def _build_model(self, pipeline_plan) -> tuple[torch.nn.Module, PipelineRunner | None]:
        """(the model, the pipeline runner or None). With a pipeline the model holds this rank's blocks
        under their full-model names (what the optimizer, checkpoints and export see)."""
        if pipeline_plan is None:
            return build_model(self.cfg, self.reader, self.dist, self.plan), None
        model, stages = build_pipeline_model(self.cfg, self.reader, self.dist, self.plan, pipeline_plan)
        pp_group = self.dist.pp_mesh.get_group()
        return model, PipelineRunner(stages, pipeline_plan, self.dist.pp_rank, pp_group, self.device)

    def _make_checkpointer(self) -> Checkpointer:
        cfg = self.cfg
        return Checkpointer(
            cfg.checkpoint,
            self.dump / cfg.checkpoint.folder,
            # Restored in this order: the LoRA weights and optimizer state, then the small states.
            states={
                "trainable": TrainableState(self.model, self.optimizer),
                "scheduler": self.scheduler,
                "scaler": self.scaler,
                "loader": self.loader,
            },
            identity=self._identity(),
            total_steps=cfg.training.steps,
            rank=self.dist.rank,
            world=self.dist.world_size,
            device=self.device,
        )

    def _metrics_logger(self) -> MetricsLogger:
        cfg = self.cfg
        return MetricsLogger(
            self.dump / cfg.metrics.save_folder,
            cfg.training.steps,
            self.dist.rank,
            cfg.metrics.log_freq,
            cfg.metrics.enable_jsonl,
            flops_per_token=model_flops_per_token(
                self.reader.shape,
                cfg.data.seq_len,
                cfg.lora.rank,
                cfg.lora.target_modules,
                cfg.activation_checkpoint.mode,
                cfg.activation_checkpoint.selective_every,
                kept=self.plan.ac_keep,
                keep_every=self.plan.ac_keep_every,
            ),
            peak_flops=peak_flops(self.device, cfg.metrics.peak_tflops),
            world_size=self.dist.world_size,
            enable_tensorboard=cfg.metrics.enable_tensorboard,
        )

    def _identity(self) -> RunIdentity:
        cfg = self.cfg
        return RunIdentity(
            base_path=Path(os.path.abspath(self.reader.path)),
            lora={
                "rank": int(cfg.lora.rank),
                "alpha": float(cfg.lora.alpha),
                "target_modules": sorted(cfg.lora.target_modules),
                "dropout": float(cfg.lora.dropout),
            },
            model_shape=RunIdentity.shape_dict(self.reader.shape),
            base_quant=base_quant_name(self.model.args),
            quant_type=cfg.model.quant_type,
            seed=cfg.job.seed,
            config=config_to_dict(cfg),
            data_order=self.loader.state_dict(),
            trainable={n: list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad},
        )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def train_step(self) -> StepResult:
        micro = self.loader.micro_batches(self.step)
        n_global = self.rules.count_tokens([mb["labels"] for mb in micro], pp=self.dist.pp)
        # fp32 like the loss sums (exact: token counts stay below 2**24); a device tensor, so that the
        # host never waits for the all-reduce.
        n32 = n_global.float()
        # Exact mode: gradients of all micro-batches are summed locally in fp64 (exact for bf16/fp32
        # addends) and reduced once, so the result does not depend on how the batch was split; the
        # reported loss is summed in fp64 too, for the same reason.
        exact = self.plan.reduce_dtype == torch.float64
        loss_sum = torch.zeros((), dtype=torch.float64 if exact else torch.float32, device=self.device)
        with self._attention_backend():
            loss_sum = self._forward_backward(micro, n32, loss_sum, exact)
        outcome = self.rules.finish(loss_sum, clip=self._clip)
        if not outcome.skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped fp16 step still advances the schedule (lr stays a function of the step
            # number); torch warns about a scheduler step without an optimizer step.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.step += 1
        tokens = sum(int(mb["input_ids"].numel()) for mb in micro)
        return StepResult(all_reduce_sum(loss_sum), n_global, tokens, outcome)

    def _forward_backward(self, micro, n32, loss_sum, exact: bool) -> torch.Tensor:
        if self.pipeline is not None:  # the schedule runs the micro-batches; it splits them again itself
            batch = drop_trivial_masks({k: torch.cat([mb[k] for mb in micro]) for k in micro[0]})
            # All on the device, token ids too: the schedule splits the batch into micro-batches there.
            batch = batch_to_device(batch, self.device, host_embedding=False)
            return self.pipeline.step(batch, lambda s: self.rules.backward_loss(s, n32), loss_sum)
        for i, mb in enumerate(micro):
            if exact:
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            mb = drop_trivial_masks(mb)
            batch = batch_to_device(mb, self.device, host_embedding=self.plan.embedding == "host")
            out = self.model(**batch)
            self.rules.backward_loss(out.loss_sum, n32).backward()
            loss_sum += out.loss_sum.detach().to(loss_sum.dtype)
        return loss_sum

    def _attention_backend(self):
        """The run's SDPA kernels (``recipe.builder.resolve_attention``), around forward, recompute and
        backward alike."""
        return sdpa_context(self.sdpa)

    def _clip(self) -> torch.Tensor:
        """The step's clip (``recipe.step.StepRules.clip``): in deterministic mode a norm that does not
        depend on how the rows are split over ranks, so the clip coefficient (and every update after
        it) is the same on any world size. A method of its own so that tests can wrap it."""
        return self.rules.clip()

    def train(self) -> list[float]:
        cfg = self.cfg
        losses: list[float] = []
        self.step_times.clear()
        pending: list[PendingStep] = []
        clock = StepClock(self.device)
        log_freq = cfg.metrics.log_freq
        self.model.train()
        if self.pipeline is not None:
            self.pipeline.train()
        self.profiler.start(self.model, self.optimizer)
        while self.step < cfg.training.steps:
            lr = self.optimizer.param_groups[0]["lr"]
            self.profiler.step_start(self.step + 1)
            start = clock.mark()
            with self.profiler.oom_guard(self.step + 1):
                r = self.train_step()
            end = clock.mark()
            self.profiler.step_end(self.step)
            # Host-side numbers are taken now, the device ones when the rows are flushed. Queued before the
            # skip handling: the flush before a TrainingDivergedError must write this step's row too.
            host = {
                "lr": lr,
                "peak_mem_gib": peak_memory_gib(self.device),
                "host_rss_gib": host_rss_gib(),
                "skipped": r.skipped,
                "nonfinite": bool(r.nonfinite_ranks),
                "loss_scale": self.scaler.scale,
            }
            pending.append(PendingStep(self.step, r, host, (start, end)))
            self.nonfinite.after_step(
                self.step,
                r.outcome,
                self.scaler.scale,
                last_checkpoint=self.checkpointer.last_complete_step,
                before_raise=lambda: self._flush(pending, clock),
            )
            # Asked before this step's row is printed, so that a signal arriving after a printed "step N" line
            # always finds step N+1 to finish: with the check after the row, a signal landing between the two
            # stopped the run at once, with no step in progress.
            stop = self.preemption.should_stop()
            # Also before a save: the metrics of every step a checkpoint holds are on disk with it.
            if self.step % log_freq == 0 or self.step == cfg.training.steps or self.checkpointer.due(self.step):
                losses += self._flush(pending, clock)
            self.checkpointer.maybe_save(self.step)
            if stop:
                losses += self._flush(pending, clock)
                self._stop_preempted()
        losses += self._flush(pending, clock)
        if self.pipeline is not None:
            self.bubble = self._report_bubble()
        self.profiler.finish()  # collective: the per-rank memory report, gathered to rank 0
        self.checkpointer.maybe_save(self.step, force=True)
        self.checkpointer.wait()
        if cfg.checkpoint.export_adapter:
            self.export_adapter(self.dump / "adapter")
        return losses

    def _report_bubble(self) -> list[dict]:
        """Collective: every rank's action times (``parallel.pipeline.ActionTimer``), printed by rank 0."""
        rows = gather_bubble(self.pipeline.timer.totals(), self.dist.rank, self.dist.world_size)
        log(format_bubble_table(rows, self.cfg.parallelism.pipeline_parallel_schedule), self.dist.rank)
        return rows

    def _stop_preempted(self) -> None:
        """After a signal: save the state of the step just finished, then leave with PREEMPTED_EXIT_CODE."""
        self.checkpointer.maybe_save(self.step, force=True)
        self.checkpointer.wait()
        saved = self.checkpointer.enabled
        log(
            f"stopped at step {self.step} on {self.preemption.describe()}: "
            + (
                "checkpoint saved; rerun the same command to resume"
                if saved
                else "checkpoint.enable is false, so nothing was saved"
            ),
            self.dist.rank,
        )
        raise Preempted(self.step)

    def _flush(self, pending: list[PendingStep], clock: StepClock) -> list[float]:
        """Read the pending steps' device values (one synchronisation) and write their metrics rows."""
        if not pending:
            return []
        seconds = clock.seconds([p.marks for p in pending])
        values = torch.stack(
            # With CPU offload the gradient norm lives on the host, the loss on the device.
            [
                torch.stack([t.double().to(self.device) for t in (r.loss_sum, r.n_global, r.grad_norm_t)])
                for r in (p.result for p in pending)
            ]
        ).tolist()
        losses = []
        for (step, r, host, _), dt, (loss_sum, n_global, norm) in zip(pending, seconds, values, strict=True):
            loss = loss_sum / n_global
            losses.append(loss)
            self.step_times.append(dt)
            self.metrics.step(
                step,
                {
                    "loss": loss,
                    "lr": host["lr"],
                    "grad_norm": norm,
                    "tokens_per_s": r.tokens / dt,
                    "step_time_s": dt,
                    "peak_mem_gib": host["peak_mem_gib"],
                    "host_rss_gib": host["host_rss_gib"],
                    "skipped": host["skipped"],
                    "nonfinite": host["nonfinite"],
                    "loss_scale": host["loss_scale"],
                },
            )
        pending.clear()
        return losses

    def export_adapter(self, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path | None:
        """Gather the LoRA weights (collective: every rank calls it) and write a PEFT adapter on rank 0."""
        return export_model_adapter(
            self.model,
            out_dir,
            self.cfg.lora,
            base_model=str(self.checkpointer.base_path),
            dtype=dtype,
            is_main=self.dist.is_main,
            pp_group=self.dist.pp_mesh.get_group() if self.dist.pp_mesh is not None else None,
        )

    def close(self) -> None:
        if hasattr(self, "preemption"):
            self.preemption.close()
        if hasattr(self, "profiler"):
            self.profiler.close()
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        self.metrics.close()
        # Drop what holds the process group (sharded parameters, optimizer state, their meshes) and
        # collect it now, so the gloo backend is destroyed here, with the interpreter alive, and not by
        # a garbage collection during interpreter shutdown.
        for name in ("optimizer", "scheduler", "model", "params", "loader", "scaler", "checkpointer"):
            self.__dict__.pop(name, None)
        gc.collect()
        destroy()
        run_guard.release()

    def write_summary(self, losses: list[float]) -> dict:
        """Per-rank memory and speed, gathered to rank 0 into <dump>/summary.json (``recipe.metrics.run_summary``)."""
        summary = run_summary(
            rank=self.dist.rank,
            world=self.dist.world_size,
            device=self.device,
            load_time_s=self.load_time_s,
            load_peak_gib=self.load_peak_gib,
            losses=losses,
            step_times=self.step_times,
            tokens_per_step=self.global_batch * self.cfg.data.seq_len,
        )
        if self.bubble:
            summary["pipeline"] = {"schedule": self.cfg.parallelism.pipeline_parallel_schedule, "ranks": self.bubble}
        log(describe_speed(summary), self.dist.rank)
        if self.dist.is_main:
            (self.dump / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (config, checkpoint, data, layout): reported without a traceback."""
    from models.hf_reader import CheckpointError
    from parallel.distributed import LayoutError
    from recipe.checkpoint import CheckpointLoadError, CheckpointSaveError
    from recipe.config import ConfigError
    from recipe.data import DataError

    return (ConfigError, CheckpointError, DataError, LayoutError, CheckpointLoadError, CheckpointSaveError)


def main(argv: list[str] | None = None) -> int:
    try:
        check_torch()  # recipe/versions.py: exit code 2 below the supported torch range, a warning above it
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        cfg = plan_for_run(cfg)  # parallelism.plan=auto: the layout for this machine's GPUs, before loading
        trainer = Trainer(cfg)
    except _user_errors() as e:
        # No Trainer holds a rank here: report_bad_input takes the process group's, else torchrun's.
        code = report_bad_input(e, rank=None)
        destroy()
        run_guard.release()
        return code
    rank = trainer.dist.rank
    try:
        try:
            losses = trainer.train()
        except Preempted as e:
            torch.distributed.barrier()
            return record_exit(PREEMPTED_EXIT_CODE, f"Preempted: {e}; rerun the same command to resume", rank)
        except TrainingDivergedError as e:
            return report_failure(e, DIVERGED_EXIT_CODE, rank)
        except _user_errors() as e:  # a checkpoint save that failed (full disk, unwritable folder)
            return report_bad_input(e, rank)
        trainer.write_summary(losses)
        report_results(cfg, rank)
        # Tear down together: a rank that destroys its gloo group while a peer is still in its last
        # collective makes the peer's transport threads abort ("terminate called without an active
        # exception", seen on CPU CI). Only on success: after an error on one rank, a barrier would
        # hang the others instead of letting torchrun stop them.
        torch.distributed.barrier()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without running C++ static destructors: a gloo transport thread still alive at exit()
    # makes libstdc++ abort with "terminate called without an active exception" (about one CPU run
    # in a hundred), which torchrun reports as a failed job after a complete, saved run. Everything
    # this job writes is closed by now; only the standard streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
