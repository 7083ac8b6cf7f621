"""Per-step log line, the metrics JSONL file, optional TensorBoard, and the MFU formula.

Files (rank 0 only), under ``<job.dump_folder>/<metrics.save_folder>/``:

* ``metrics.jsonl``: one JSON object per optimizer step, with the keys

  ==================== ===============================================================================
  ``step``             1-based optimizer step
  ``loss``             mean token loss over the global batch (all ranks, all micro-batches)
  ``lr``               learning rate used by this step
  ``grad_norm``        global LoRA gradient norm before clipping
  ``tokens_per_s``     tokens (padding included) this rank processed per second of step time
  ``tokens_per_s_global`` ``tokens_per_s`` x world size: throughput of the whole job
  ``step_time_s``      wall time of the step (CUDA synchronised)
  ``tflops``           achieved model TFLOP/s per rank: ``flops_per_token * tokens_per_s / 1e12``
  ``mfu``              model FLOPs utilisation in [0, 1] (formula below); ``null`` on CPU or an unknown GPU
  ``peak_mem_gib``     CUDA: peak allocated GiB since training started; CPU: peak host RSS GiB
  ``host_rss_gib``     current host resident set size of rank 0, GiB
  ``skipped``          the optimizer step was skipped (fp16 overflow, or ``nonfinite``)
  ``nonfinite``        bf16/fp32: the loss or gradient norm was NaN/inf, so the step was skipped
  ``loss_scale``       current fp16 loss scale (1 when not fp16)
  ==================== ===============================================================================

* ``tensorboard/``: the numeric keys above as scalars, when ``metrics.enable_tensorboard`` is set and the
  optional ``tensorboard`` package is installed (``pip install tensorboard``).

MFU
---
``model_flops_per_token`` counts the matmul FLOPs (1 multiply-add = 2 FLOPs) that one training token
costs in this recipe. With L layers, hidden size h (= heads x head_dim), sequence length s, vocabulary V,

* ``N_blocks`` = frozen projection weights of all blocks = L * (q + k + v + o + gate + up + down sizes),
* ``N_head``   = V * h (lm_head; the embedding lookup is no matmul and is not counted),
* ``P_lora``   = LoRA parameters = sum over adapted projections of r * (in + out),
* ``f``        = fraction of blocks under activation checkpointing (none 0, full 1, selective
  ceil(L / k) / L),

::

    forward   = 2 (N_blocks + N_head) + 2 P_lora + 4 L s h
    backward  = 2 (N_blocks + N_head)        input gradients only: the 4-bit base is frozen, so there
                                             are no weight-gradient matmuls for it
              + 4 P_lora                     LoRA input gradients + LoRA weight gradients
              + 8 L s h                      attention backward = 2 x its forward
    recompute = f (2 N_blocks + 2 P_lora + 4 L s h - D)   checkpointed blocks re-run their forward
              + 2 N_head                     the chunked cross-entropy re-runs lm_head in backward

where ``D`` = 2 L r h with a LoRA on down_proj, else 2 L h i (i = intermediate size): non-reentrant
checkpointing stops the re-run once the last saved tensor is rebuilt, so a block's final matmul
(down_proj's lora_B, or the frozen down_proj itself) is not recomputed (checked against torch's
FlopCounterMode in tests/test_profiling.py). One approximation remains: layer 0's q/k/v input
gradients are counted although autograd skips them (nothing before them trains), 0.2 % for Llama 3.1 8B.
    flops_per_token = forward + backward + recompute

Attention forward is ``2 * 2 * s * h`` per layer per token (Q K^T and attention x V over the full s x s
score matrix; the causal mask is not discounted, the PaLM / torchtitan convention). Recomputation is
counted (pass ``recompute=False`` for the PaLM-style "MFU" that leaves it out; with it, the number is
what PaLM calls hardware FLOPs utilisation). With no AC this is 4N + 2 N_head + 6 P_lora + 12 L s h;
with full AC 6N + 8 P_lora + 16 L s h - D (N = N_blocks + N_head).

``mfu = flops_per_token * tokens_per_s (per rank) / peak_flops (per GPU)``, where ``peak_flops`` is the
GPU's dense bf16 (fp16 for T4) tensor-core peak from ``PEAK_FLOPS`` (or ``metrics.peak_tflops``),
whatever dtype the run trains in. Unknown GPUs and CPUs give ``mfu = null``.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from models.llama import LORA_TARGETS
from recipe.logging import log

__all__ = [
    "MetricsLogger",
    "StepClock",
    "peak_memory_gib",
    "reset_peak_memory",
    "host_rss_gib",
    "PEAK_FLOPS",
    "peak_flops",
    "model_flops_per_token",
    "JSONL_KEYS",
    "run_summary",
    "describe_speed",
    "gather_bubble",
]

JSONL_KEYS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_global",
    "step_time_s",
    "tflops",
    "mfu",
    "peak_mem_gib",
    "host_rss_gib",
    "skipped",
    "nonfinite",
    "loss_scale",
)


# Peak GiB seen before the last reset by ``reset_peak_memory``, per CUDA device index: phase
# measurements reset the allocator's peak counter, and this keeps ``peak_memory_gib`` a run peak.
_PEAK_FLOOR: dict[int, int] = {}


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def reset_peak_memory(device: torch.device, keep_run_peak: bool = True) -> None:
    """``torch.cuda.reset_peak_memory_stats``; with ``keep_run_peak`` ``peak_memory_gib`` still reports
    the peak since the last reset with ``keep_run_peak=False`` (the start of training)."""
    if device.type != "cuda":
        return
    i = _cuda_index(device)
    if keep_run_peak:
        _PEAK_FLOOR[i] = max(_PEAK_FLOOR.get(i, 0), torch.cuda.max_memory_allocated(i))
    else:
        _PEAK_FLOOR.pop(i, None)
    torch.cuda.reset_peak_memory_stats(i)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        i = _cuda_index(device)
        return max(_PEAK_FLOOR.get(i, 0), torch.cuda.max_memory_allocated(i)) / 2**30
    return host_rss_gib(peak=True)


def host_rss_gib(peak: bool = False) -> float:
    """This process's resident memory (GiB) now, or its peak. The peak is never below the current value:
    Linux updates its high-water mark (``ru_maxrss``) only when the RSS is about to shrink, so after a
    growth with no unmap since, ``ru_maxrss`` lags the current RSS; ``/proc/self/status``'s VmHWM takes
    the current RSS into account, and the max with the current value covers systems without it."""
    now = _current_rss_gib()
    if not peak:
        return now
    hwm = float("nan")
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 2**20  # kB
                    break
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return max(v for v in (hwm, maxrss, now) if v == v)  # nan-free max


def _current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------
# MFU

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU (T4: fp16, it has no bf16), from the vendors'
# datasheets. Matched against torch.cuda.get_device_name() as whole words, first match wins, so the
# more specific names come first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("T4", 65e12),
]


def peak_flops(device: torch.device | str, override_tflops: float = 0.0) -> float | None:
    """Peak dense FLOP/s of one GPU, or None (CPU, unknown GPU) so that MFU is reported as null."""
    if override_tflops > 0:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", name):
            return flops
    return None


_PROJ = LORA_TARGETS


def _proj_dims(shape) -> dict[str, tuple[int, int]]:
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }  # (in, out)


def ac_fraction(num_layers: int, ac_mode: str, ac_every: int = 1) -> float:
    """Fraction of blocks whose forward is recomputed (matches parallel.parallelize's choice)."""
    if ac_mode == "full":
        return 1.0
    if ac_mode == "selective":
        return math.ceil(num_layers / max(ac_every, 1)) / num_layers
    return 0.0


def model_flops_per_token(
    shape,
    seq_len: int,
    lora_rank: int,
    lora_targets: Iterable[str] = _PROJ,
    ac_mode: str = "none",
    ac_every: int = 1,
    recompute: bool = True,
    kept: Iterable[str] = (),
    keep_every: int = 1,
) -> float:
    """Training FLOPs per token of QLoRA on ``shape`` (a models.shapes.LlamaShape); see the module doc.
    ``kept`` / ``keep_every``: activation_checkpoint.keep_outputs / keep_every (not recomputed)."""
    dims = _proj_dims(shape)
    targets = set(lora_targets)
    L, s = shape.num_hidden_layers, seq_len
    h_attn = shape.num_attention_heads * shape.head_dim
    n_blocks = L * sum(i * o for i, o in dims.values())
    n_head = shape.vocab_size * shape.hidden_size
    p_lora = L * sum(lora_rank * (i + o) for name, (i, o) in dims.items() if name in targets) if lora_rank else 0
    attn_fwd = 2 * 2 * L * s * h_attn
    f = ac_fraction(L, ac_mode, ac_every)
    forward = 2 * (n_blocks + n_head) + 2 * p_lora + attn_fwd
    backward = 2 * (n_blocks + n_head) + 4 * p_lora + 2 * attn_fwd
    # Non-reentrant checkpointing stops recomputing once the last tensor backward needs is rebuilt:
    # down_proj's adapter runs before its frozen matmul (models/lora.py), so neither its lora_B matmul
    # (whose inputs are the last tensors saved) nor the frozen matmul after it is re-run.
    h, inter = shape.hidden_size, shape.intermediate_size
    not_rerun = L * 2 * (inter * h + (lora_rank * h if "down_proj" in targets and lora_rank else 0))
    kept = set(kept)
    n_kept = math.ceil(round(f * L) / max(keep_every, 1)) if kept else 0
    kept_rerun = n_kept * 2 * sum(i * o for name, (i, o) in dims.items() if name in kept)
    recomp = f * (2 * n_blocks + 2 * p_lora + attn_fwd - not_rerun) - kept_rerun + 2 * n_head if recompute else 0.0
    return float(forward + backward + recomp)


# ---------------------------------------------------------------------------
# Step timing


class StepClock:
    """Wall time of each step without a host-device synchronisation per step.

    On CUDA every step is bracketed by two events on the current stream; ``seconds`` synchronises
    once (on the newest event) and reads all the pending intervals. A step's interval starts when
    the device reaches its first kernel (or at once, if the device was idle waiting for the host),
    so it is the step's real wall time, host stalls included. On CPU the work is synchronous and
    ``time.perf_counter`` is exact.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, intervals: list[tuple]) -> list[float]:
        """[(start mark, end mark), ...] -> seconds per interval (one synchronisation in all)."""
        if not intervals:
            return []
        if self.cuda:
            intervals[-1][1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in intervals]
        return [b - a for a, b in intervals]


# ---------------------------------------------------------------------------
# Logger


def _open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "metrics.enable_tensorboard is set but TensorBoard is not installed; it is optional: "
            "`pip install tensorboard` to get event files (continuing without them).",
            flush=True,
        )
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


class MetricsLogger:
    """One line per step on rank 0 (with a progress/ETA column) and one JSON object per step.

    ``flops_per_token`` / ``peak_flops`` (FLOP/s of one GPU, None when unknown) add ``tflops`` and ``mfu``
    to each record; ``world_size`` adds ``tokens_per_s_global``.
    """

    def __init__(
        self,
        folder: Path | None,
        total_steps: int,
        rank: int,
        log_freq: int = 1,
        enable_jsonl: bool = True,
        *,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        enable_tensorboard: bool = False,
    ):
        self.rank = rank
        self.total = total_steps
        self.log_freq = log_freq
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.file = None
        self.tb = None
        if rank == 0 and folder is not None and (enable_jsonl or enable_tensorboard):
            folder.mkdir(parents=True, exist_ok=True)
            if enable_jsonl:
                self.file = open(folder / "metrics.jsonl", "a")
            if enable_tensorboard:
                self.tb = _open_tensorboard(folder)

    def begin(self, start_step: int) -> None:
        """Called once the run knows where it starts. A run from step 0 into a folder that holds an
        earlier run's metrics moves that file aside (kept, renamed) instead of appending to it, so a
        plot never stitches two runs together. A run resumed after step N keeps the rows of steps
        <= N (one per step) and drops the rows the interrupted run logged after its last checkpoint,
        which this run logs again, plus a torn last line: every reader sees each step once."""
        if self.file is None or self.file.tell() == 0:
            return
        if start_step > 0:
            self._drop_after(start_step)
            return
        path = Path(self.file.name)
        self.file.close()
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (aside := path.with_name(f"{path.name}.prev-{stamp}" + (f"-{n}" if n else ""))).exists():
            n += 1  # never replace an earlier one
        path.rename(aside)
        log(f"metrics: {path} held an earlier run's steps; moved to {aside.name}", self.rank)
        self.file = open(path, "a")

    def _drop_after(self, start_step: int) -> None:
        path = Path(self.file.name)
        self.file.close()
        data = path.read_bytes()
        rows: dict[int, bytes] = {}  # step -> its last row: a step re-done by an earlier resume
        later: list[int] = []
        bad = dups = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["step"]
                if not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, TypeError, KeyError):  # a torn line (killed mid-write) or junk
                bad += 1
                continue
            if step > start_step:
                later.append(step)
            else:
                dups += step in rows
                rows[step] = line
        if later or bad or dups or not data.endswith(b"\n"):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                # A new file swapped in whole: a kill during the rewrite leaves the old one intact.
                with open(tmp, "wb") as fh:
                    fh.write(b"".join(rows[k] + b"\n" for k in sorted(rows)))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as e:  # the metrics must not stop the run
                tmp.unlink(missing_ok=True)
                log(f"metrics: could not rewrite {path} ({e}); appending to it as it is", self.rank)
            else:
                what = []
                if later:
                    what.append(
                        f"{len(later)} row(s) of steps {min(later)}-{max(later)} that the interrupted "
                        "run logged after its last checkpoint"
                    )
                if dups:
                    what.append(f"{dups} repeated row(s)")
                if bad:
                    what.append(f"{bad} malformed or partial line(s)")
                if what:
                    log(
                        f"metrics: resuming after step {start_step}: dropped {' and '.join(what)} from {path.name}",
                        self.rank,
                    )
        self.file = open(path, "a")

    def _derived(self, record: dict) -> dict:
        out = {}
        tps = record.get("tokens_per_s")
        if tps is not None:
            out["tokens_per_s_global"] = tps * self.world_size
            fpt = self.flops_per_token
            out["tflops"] = fpt * tps / 1e12 if fpt else None
            out["mfu"] = fpt * tps / self.peak_flops if fpt and self.peak_flops else None
        return out

    def step(self, step: int, record: dict) -> None:
        if self.rank != 0:
            return
        record = {**record, **{k: v for k, v in self._derived(record).items() if k not in record}}
        if self.first_step is None:
            self.first_step, self.start = step, time.perf_counter() - record.get("step_time_s", 0.0)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if step % self.log_freq and step != self.total:
            return
        done = step - self.first_step + 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step)
        bar_w = 20
        filled = int(bar_w * step / max(self.total, 1))
        bar = "#" * filled + "." * (bar_w - filled)
        parts = [
            f"step {step:>5}/{self.total} [{bar}]",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"gnorm {record['grad_norm']:.3f}",
            f"tok/s {record['tokens_per_s']:,.0f}",
        ]
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts += [f"mem {record['peak_mem_gib']:.2f}GiB", f"eta {eta:,.0f}s"]
        if record.get("skipped"):
            if record.get("nonfinite"):
                parts.append("SKIPPED (NaN/inf loss or gradient norm)")
            else:
                parts.append(f"SKIPPED (fp16 overflow, loss scale now {record['loss_scale']:g})")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# --------------------------------------------------------------------------------------------- run summary


def run_summary(
    *,
    rank: int,
    world: int,
    device: torch.device,
    load_time_s: float,
    load_peak_gib: float,
    losses: list[float],
    step_times: list[float],
    tokens_per_step: int,
    warmup_steps: int = 3,
) -> dict:
    """Collective: per-rank memory and speed gathered to every rank, as ``<dump>/summary.json`` holds them
    (benchmarks read it). ``tokens_per_step``: the global batch's tokens (all ranks). The first step of a
    process is reported apart (``first_step_s``: it includes compilation when compile is on, and the
    allocator's warm-up), with ``tokens_per_s_after_first`` over the steps after it; the per-GPU median
    speed skips ``warmup_steps`` as before."""
    import statistics

    import torch.distributed as dist

    timed = step_times[warmup_steps:] or step_times
    cuda = device.type == "cuda"
    mine = {
        "rank": rank,
        "load_peak_gib": load_peak_gib if cuda else None,
        "train_peak_gib": peak_memory_gib(device) if cuda else None,
        "host_peak_rss_gib": host_rss_gib(peak=True),
        "tokens_per_s_per_gpu": tokens_per_step / statistics.median(timed) / world if timed else None,
    }
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    after = step_times[1:]
    return {
        "world": world,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "load_time_s": load_time_s,
        "losses": losses,
        "step_times_s": step_times,
        "first_step_s": step_times[0] if step_times else None,
        "tokens_per_s_after_first": tokens_per_step * len(after) / sum(after) if after and sum(after) > 0 else None,
        "ranks": ranks,
    }


def describe_speed(summary: dict) -> str:
    """The end-of-run speed line: the first step apart from the steady state after it."""
    first, after = summary.get("first_step_s"), summary.get("tokens_per_s_after_first")
    if first is None:
        return "speed: no step was timed"
    n = len(summary["step_times_s"]) - 1
    steady = f"{after:,.0f} tokens/s over the {n} step(s) after it" if after else "no later step"
    return f"speed: first step {first:.2f}s (compilation included when compile is on); {steady}"


def gather_bubble(timer_totals: dict, rank: int, world: int) -> list[dict]:
    """Collective: every pipeline rank's action times (``parallel.pipeline.ActionTimer.totals``)."""
    import torch.distributed as dist

    rows = [None] * world
    dist.all_gather_object(rows, dict(timer_totals, rank=rank))
    return rows
