"""QLoRA training entry point: ``python -m recipe.train --job.config_file FILE [--section.key=value ...]``.

Reads top to bottom in the order data flows:
  config -> process group -> checkpoint reader -> model on meta -> parallelize (AC, compile, FSDP2)
  -> materialize this rank's shards -> data -> optimizer -> [resume] -> train loop -> save / export.

Loss normalisation: every optimizer step divides the summed token losses of all micro-batches on
all ranks by the global number of target tokens (all-reduced before the first micro-batch), so an
N-rank run with accumulation computes exactly the loss and gradients of a 1-rank run over the same
global batch. FSDP sums (not averages) gradients over ranks (parallel/parallelize.py sets its divide
factor to 1), so the backward loss is the same ``loss_sum / n_global`` on any world size: with a
bf16 backward, a factor of the world size there would change the rounding of every gradient.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.hf_reader import CheckpointReader
from models.llama import LORA_TARGETS, LlamaForCausalLM, ModelArgs
from parallel.distributed import DistInfo, LayoutError, all_reduce_sum, destroy, init_distributed
from parallel.materialize import materialize
from parallel.parallelize import DTYPES, parallelize
from recipe.checkpoint import Checkpointer
from recipe.config import ConfigError, JobConfig, dump_toml, load_config
from recipe.data import GlobalBatchLoader, build_data, count_targets, load_tokenizer
from recipe.logging import log
from recipe.metrics import MetricsLogger, host_rss_gib, model_flops_per_token, peak_flops, peak_memory_gib
from recipe.optim import LossScaler, build_lr_scheduler, build_optimizer
from recipe.profiling import Profiler

__all__ = ["Trainer", "main", "build_model"]


def ensure_checkpoint(cfg: JobConfig, dist_info: DistInfo) -> Path:
    """The base checkpoint directory; writes a synthetic one first when the config asks for it."""
    path = Path(cfg.model.checkpoint)
    if not cfg.model.checkpoint:
        raise ConfigError("[model] checkpoint is empty: set it to a HF checkpoint directory")
    if cfg.model.synthetic_shape:
        # Rank 0 decides and writes; every rank takes the barrier, whatever it sees on disk (a rank
        # that starts late could otherwise find the files, skip the barrier and desynchronise).
        if dist_info.is_main and not (path / "config.json").exists():
            from models.synthetic import MARKER_FILE, write_synthetic_checkpoint

            # config.json is written last: a marker without it is an interrupted synthetic write,
            # which may be redone (only the writer's own files are replaced).
            redo = (path / MARKER_FILE).is_file()
            log(f"writing a synthetic '{cfg.model.synthetic_shape}' checkpoint to {path}"
                + (" (redoing an interrupted write)" if redo else ""))
            try:
                write_synthetic_checkpoint(path, shape=cfg.model.synthetic_shape, seed=cfg.job.seed, overwrite=redo)
            except FileExistsError as e:
                raise ConfigError(
                    f"model.checkpoint = {str(path)!r} has no config.json, so a synthetic checkpoint would be "
                    f"written there, but: {e}. Point model.checkpoint at a real checkpoint or a new directory"
                ) from e
        torch.distributed.barrier()
    return path


def build_model(cfg: JobConfig, reader: CheckpointReader, dist_info: DistInfo) -> LlamaForCausalLM:
    """Meta model -> parallelize -> this rank's shards. No rank ever holds the full weights."""
    scheme = reader.quant_scheme(quantize_dense_as=cfg.model.quant_type)
    param_dtype = DTYPES[cfg.training.mixed_precision_param]
    args = ModelArgs(
        shape=reader.shape,
        lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        lora_targets=tuple(cfg.lora.target_modules),
        quant_type=scheme[0] if scheme else None,
        quant_blocksize=scheme[1] if scheme else 64,
        dtype=param_dtype,
        row_multiple=dist_info.world_size,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    offload = cfg.parallelism.cpu_offload
    parallelize(
        model,
        dist_info.mesh,
        param_dtype=param_dtype,
        reduce_dtype=DTYPES[cfg.training.mixed_precision_reduce],
        reshard_after_forward=cfg.parallelism.reshard_after_forward,
        cpu_offload=offload,
        pin_memory=offload and dist_info.device.type == "cuda",
        ac_mode=cfg.activation_checkpoint.mode,
        ac_every=cfg.activation_checkpoint.selective_every,
        compile=cfg.training.compile,
        vocab_parallel_embedding=cfg.parallelism.vocab_parallel_embedding,
    )
    shard_device = torch.device("cpu") if offload else dist_info.device
    materialize(model, reader, device=shard_device, lora_seed=cfg.job.seed, quant_device=dist_info.device,
                buffer_device=dist_info.device)
    return model


def _drop_trivial_masks(mb: dict) -> dict:
    """Drop an all-ones attention_mask and position_ids equal to 0..T-1, checked on the
    CPU copy: the model then takes the pure-causal (flash) attention path and never inspects them
    on the GPU. Packed rows (positions restarting at 0) keep position_ids: the model masks attention
    between their documents."""
    mb = dict(mb)
    if "attention_mask" in mb and bool(mb["attention_mask"].all()):
        del mb["attention_mask"]
    pos = mb.get("position_ids")
    if pos is not None and torch.equal(pos, torch.arange(pos.shape[-1]).expand_as(pos)):
        del mb["position_ids"]
    return mb


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    skipped: bool


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        unknown = set(cfg.lora.target_modules) - set(LORA_TARGETS)
        if unknown:
            raise ConfigError(f"lora.target_modules: unknown module(s) {sorted(unknown)}; valid: {list(LORA_TARGETS)}")
        torch.manual_seed(cfg.job.seed)
        if cfg.job.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        p = cfg.parallelism
        self.dist = init_distributed(cfg.training.device, p.backend, p.data_parallel_shard_degree, p.cpu_offload)
        self.device = self.dist.device
        log(f"{self.dist.world_size} rank(s), backend {torch.distributed.get_backend()}, device {self.device.type}",
            self.dist.rank)
        self.dump = Path(cfg.job.dump_folder)
        self._check_batch_layout()

        ckpt_dir = ensure_checkpoint(cfg, self.dist)
        self.reader = CheckpointReader(ckpt_dir)
        # Data before weights: a wrong data path, format or tokenizer fails in seconds, not after
        # the model has been loaded.
        shape = self.reader.shape
        tokenizer = None
        if cfg.data.path and cfg.data.format != "synthetic":
            tokenizer = load_tokenizer(cfg.model.tokenizer or str(ckpt_dir))
        self.data = build_data(cfg.data, tokenizer, shape.vocab_size, cfg.job.seed)
        self.loader = GlobalBatchLoader(
            self.data, self.global_batch, cfg.training.micro_batch_size, self.dist.rank, self.dist.world_size, cfg.job.seed
        )

        t0 = time.perf_counter()
        self.model = build_model(cfg, self.reader, self.dist)
        self.load_time_s = time.perf_counter() - t0
        # Dropout draws from the global generator: seed it per rank, or every rank would draw the
        # same masks for its different samples. (LoRA initialisation has its own seeded generator.)
        torch.manual_seed(cfg.job.seed + self.dist.rank)
        self.load_peak_gib = peak_memory_gib(self.device)
        self.profiler = Profiler(cfg, self.dist.rank, self.dist.world_size, self.device, self.dump)
        self.profiler.after_load()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        log(f"model ready in {self.load_time_s:.1f}s; load peak {self.load_peak_gib:.2f} GiB/rank; "
            f"{self.num_trainable():,} trainable parameters", self.dist.rank)

        self.optimizer = build_optimizer(self.params, cfg.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        if 0 < cfg.training.steps <= cfg.lr_scheduler.warmup_steps:
            log(f"note: lr_scheduler.warmup_steps = {cfg.lr_scheduler.warmup_steps} >= training.steps = "
                f"{cfg.training.steps}: the lr never reaches optimizer.lr", self.dist.rank)
        fp16 = cfg.training.mixed_precision_param == "float16"
        self.scaler = LossScaler(fp16, cfg.training.loss_scale_init, cfg.training.loss_scale_growth_interval)
        self.step = 0  # optimizer steps completed
        self.metrics = MetricsLogger(
            self.dump / cfg.metrics.save_folder, cfg.training.steps, self.dist.rank,
            cfg.metrics.log_freq, cfg.metrics.enable_jsonl,
            flops_per_token=model_flops_per_token(
                shape, cfg.data.seq_len, cfg.lora.rank, cfg.lora.target_modules,
                cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_every,
            ),
            peak_flops=peak_flops(self.device, cfg.metrics.peak_tflops),
            world_size=self.dist.world_size, enable_tensorboard=cfg.metrics.enable_tensorboard,
        )
        if self.dist.is_main:
            self.dump.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(cfg, self)
        self.step = self.checkpointer.maybe_resume()  # raises CheckpointLoadError before any training
        self.metrics.begin(self.step)
        if self.dist.is_main:
            # After the resume checks: a rejected resume must leave the run's files as they were.
            tmp = self.dump / f".config.toml.tmp-{os.getpid()}"
            tmp.write_text(dump_toml(cfg))
            tmp.replace(self.dump / "config.toml")

    def _check_batch_layout(self) -> None:
        """Checked before anything is loaded: a wrong layout should not cost a model load."""
        t, world = self.cfg.training, self.dist.world_size
        gbs = t.global_batch_size if t.global_batch_size != -1 else t.micro_batch_size * world
        self.global_batch = gbs
        if gbs <= 0 or gbs % (t.micro_batch_size * world):
            raise LayoutError(
                f"training.global_batch_size = {gbs} is not a multiple of micro_batch_size "
                f"({t.micro_batch_size}) x ranks ({world}); use e.g. {t.micro_batch_size * world * max(1, gbs // (t.micro_batch_size * world))}"
            )

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def train_step(self) -> StepResult:
        micro = self.loader.micro_batches(self.step)
        n_local = sum(count_targets(mb["labels"]) for mb in micro)
        n_global = all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=self.device)).item()
        n_global = max(n_global, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        # Exact mode: gradients of all micro-batches are summed locally in fp64 (exact for bf16/fp32
        # addends) and reduced once, so the result does not depend on how the batch was split.
        exact = self.cfg.training.mixed_precision_reduce == "float64"
        for i, mb in enumerate(micro):
            if exact:
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            mb = _drop_trivial_masks(mb)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            out = self.model(**batch)
            self.scaler.scale_loss(out.loss_sum / n_global).backward()
            loss_sum += out.loss_sum.detach().float()
        found_inf = self.scaler.unscale_(self.params)
        grad_norm = self._clip()
        if not found_inf:
            self.optimizer.step()
        self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped fp16 step still advances the schedule (lr stays a function of the step
            # number); torch warns about a scheduler step without an optimizer step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        self.step += 1
        loss = all_reduce_sum(loss_sum).item() / n_global
        tokens = sum(int(mb["input_ids"].numel()) for mb in micro)
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=tokens, skipped=found_inf)

    def _clip(self) -> float:
        max_norm = self.cfg.training.max_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm if max_norm > 0 else float("inf"), foreach=True
        )
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def train(self) -> list[float]:
        cfg = self.cfg
        losses = []
        self.step_times: list[float] = []
        self.model.train()
        self.profiler.start(self.model, self.optimizer)
        while self.step < cfg.training.steps:
            lr = self.scheduler.get_last_lr()[0]
            self.profiler.step_start(self.step + 1)
            t0 = time.perf_counter()
            with self.profiler.oom_guard(self.step + 1):
                r = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.profiler.step_end(self.step)
            losses.append(r.loss)
            self.step_times.append(dt)
            if r.skipped:
                log(f"step {self.step}: fp16 overflow, optimizer step skipped, loss scale -> {self.scaler.scale:g}",
                    self.dist.rank)
            self.metrics.step(self.step, {
                "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
                "tokens_per_s": r.tokens / dt, "step_time_s": dt,
                "peak_mem_gib": peak_memory_gib(self.device), "host_rss_gib": host_rss_gib(),
                "skipped": r.skipped, "loss_scale": self.scaler.scale,
            })
            self.checkpointer.maybe_save(self.step)
        self.profiler.finish()  # collective: the per-rank memory report, gathered to rank 0
        self.checkpointer.maybe_save(self.step, force=True)
        self.checkpointer.wait()
        if cfg.checkpoint.export_adapter:
            self.checkpointer.export_adapter(self.dump / "adapter")
        return losses

    def close(self) -> None:
        if hasattr(self, "profiler"):
            self.profiler.close()
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        self.metrics.close()
        # Drop what holds the process group (sharded parameters, optimizer state, their meshes) and
        # collect it now, so the gloo backend is destroyed here, with the interpreter alive, and not by
        # a garbage collection during interpreter shutdown.
        for name in ("optimizer", "scheduler", "model", "params", "loader", "scaler"):
            self.__dict__.pop(name, None)
        gc.collect()
        destroy()

    def write_summary(self, losses: list[float], warmup_steps: int = 3) -> dict:
        """Per-rank memory and speed, gathered to rank 0 into <dump>/summary.json (benchmarks read it)."""
        import json
        import statistics

        timed = self.step_times[warmup_steps:] or self.step_times
        cuda = self.device.type == "cuda"
        gbs = self.global_batch
        mine = {
            "rank": self.dist.rank,
            "load_peak_gib": self.load_peak_gib if cuda else None,
            "train_peak_gib": peak_memory_gib(self.device) if cuda else None,
            "host_peak_rss_gib": host_rss_gib(peak=True),
            "tokens_per_s_per_gpu": gbs * self.cfg.data.seq_len / statistics.median(timed) / self.dist.world_size
            if timed else None,
        }
        ranks = [None] * self.dist.world_size
        torch.distributed.all_gather_object(ranks, mine)
        summary = {
            "world": self.dist.world_size,
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "torch": torch.__version__,
            "load_time_s": self.load_time_s,
            "losses": losses,
            "step_times_s": self.step_times,
            "ranks": ranks,
        }
        if self.dist.is_main:
            (self.dump / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (config, checkpoint, data, layout): reported without a traceback."""
    from models.hf_reader import CheckpointError
    from parallel.distributed import LayoutError
    from recipe.checkpoint import CheckpointLoadError
    from recipe.config import ConfigError
    from recipe.data import DataError

    return (ConfigError, CheckpointError, DataError, LayoutError, CheckpointLoadError)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        trainer = Trainer(cfg)
    except _user_errors() as e:
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
        status = os.environ.get("RECIPE_EXIT_STATUS_FILE")  # set by run_train.sh (torchrun hides exit codes)
        if status:
            with open(status, "w") as f:
                f.write(f"2\n{type(e).__name__}: {e}\n")
        destroy()
        return 2
    try:
        losses = trainer.train()
        trainer.write_summary(losses)
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
