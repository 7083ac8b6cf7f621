"""Typed job configuration: one dataclass per TOML section, CLI overrides on top.

Precedence is CLI > TOML file > dataclass default. Every field carries its help
text (and, for enumerated settings, its valid choices) in ``field.metadata`` so
``--help``, validation and documentation all read from a single source.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from models.dtypes import COMPUTE_DTYPES, DTYPES
from models.llama import LORA_TARGETS
from models.sdpa import SDPA_BACKENDS
from models.shapes import SHAPES

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - older interpreters
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says how."""


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    # Mutable defaults (lists) need default_factory, otherwise every JobConfig
    # would share the same list object.
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    config_file: str = _f("", "Path of the TOML file that was loaded (set by the loader).")
    dump_folder: str = _f("./outputs", "Root folder for everything a run writes (checkpoints, metrics, profiles).")
    description: str = _f("", "Free-form description of the run.")
    seed: int = _f(42, "Seeds LoRA init, dropout and data order.")
    deterministic: bool = _f(
        False,
        "Deterministic kernels everywhere in the step: torch.use_deterministic_algorithms(True) (an op without "
        "a deterministic kernel raises), SDPA's math backend on CUDA, a fixed cuBLAS workspace, and a gradient "
        "norm that does not depend on the row split. With training.mixed_precision_reduce = 'float64', 1, 2 "
        "and 3 ranks then give bit-identical losses and adapters.",
    )


@dataclass
class Model:
    checkpoint: str = _f(
        "",
        "Directory of a HF Llama 3.x checkpoint: pre-quantized bitsandbytes 4-bit (nf4/fp4, any "
        "bnb_4bit_quant_storage) or plain bf16/fp16 safetensors; or a hub repo id owner/name[@revision] "
        "(e.g. unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit), downloaded once into the hub cache and used "
        "offline from there.",
    )
    synthetic_shape: str = _f(
        "",
        "If set and `checkpoint` does not exist, first write a synthetic random checkpoint of this shape there.",
        ("",) + tuple(SHAPES),
    )
    quant_type: str = _f(
        "nf4",
        "For a plain (unquantized) checkpoint, quantize frozen linear weights at load.",
        ("nf4", "fp4", "none"),
    )
    tokenizer: str = _f("", "Tokenizer directory; empty means the checkpoint directory.")
    mlp_chunk_tokens: int = _f(
        0,
        "Run each block's MLP over this many tokens at a time, each chunk recomputed in backward (for long "
        "sequences: the (tokens x intermediate) activations then exist for one chunk only). 0: no chunking.",
    )
    packed_attention: str = _f(
        "mask",
        "Attention over packed rows (documents separated by position ids restarting at 0): 'mask' builds a "
        "(seq x seq) boolean mask per row; 'segments' runs causal attention per document, with memory "
        "linear in seq_len (for long packed rows; not with training.compile).",
        ("mask", "segments"),
    )
    fuse_projections: bool = _f(
        False,
        "Hold q/k/v and gate/up each as one frozen (4-bit) matrix: one dequantization and one GEMM per group "
        "and one GEMM for their LoRA A matrices. Read from and exported under the HF/PEFT names; checkpoints "
        "resume either way.",
    )
    lora_epilogue: bool = _f(
        True,
        "In compiled blocks, run each 4-bit projection as one operator with its adapters inside: the B GEMMs "
        "accumulate into the frozen GEMM's output and, in backward, the A GEMMs into the frozen input "
        "gradient, so the adapters leave no (tokens x out) or (tokens x in) tensors of their own for the "
        "compiler to keep (measured: -0.51 GiB at micro-batch 4 for the 8B workload); each sum is rounded "
        "once. Eager blocks are unchanged.",
    )


@dataclass
class Lora:
    rank: int = _f(16, "LoRA rank r.")
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the LoRA input path, in [0, 1).")
    target_modules: list[str] = _f(
        list(LORA_TARGETS),
        f"Linear module names (last path component) that receive LoRA adapters; any of {', '.join(LORA_TARGETS)}.",
    )


@dataclass
class Data:
    path: str = _f("", "JSONL or Parquet file; empty means synthetic random tokens.")
    format: str = _f(
        "auto",
        "Sample format; 'auto' infers it from the fields of the first record. 'oig': LAION OIG text "
        "(e.g. unified_chip2.jsonl) with '<human>:' / '<bot>:' turns in text_field; with mask_prompt only "
        "the bot turns are trained.",
        ("auto", "text", "instruction", "chat", "oig", "synthetic"),
    )
    seq_len: int = _f(2048, "Sequence length of each training row.")
    packing: bool = _f(True, "Pack samples into full seq_len rows; otherwise pad each sample.")
    mask_prompt: bool = _f(True, "Exclude prompt tokens from the loss.")
    text_field: str = _f("text", "Record field holding raw text (formats 'text' and 'oig').")
    prompt_field: str = _f("instruction", "Record field holding the instruction (format 'instruction').")
    input_field: str = _f("input", "Record field holding the optional input (format 'instruction').")
    response_field: str = _f("output", "Record field holding the response (format 'instruction').")
    messages_field: str = _f("messages", "Record field holding the message list (format 'chat').")
    num_synthetic_samples: int = _f(1024, "Number of samples in the synthetic data set.")


@dataclass
class Training:
    steps: int = _f(100, "Number of optimizer steps.")
    micro_batch_size: int = _f(1, "Sequences per forward pass per rank.")
    global_batch_size: int = _f(
        -1,
        "Sequences per optimizer step over all ranks; -1 means micro_batch_size * data-parallel ranks "
        "(no gradient accumulation). Must be a multiple of micro_batch_size * dp ranks.",
    )
    max_norm: float = _f(1.0, "Gradient clipping max norm (<= 0 disables).")
    mixed_precision_param: str = _f("bfloat16", "Compute dtype for parameters.", COMPUTE_DTYPES)
    mixed_precision_reduce: str = _f(
        "float32",
        "Dtype of gradient reduction. 'float64': micro-batch gradients are accumulated unsharded in fp64 "
        "and reduced once per step; the sum is exact, so every world size and accumulation split gives "
        "bit-identical gradients (costs 8 bytes per LoRA parameter while accumulating).",
        tuple(DTYPES),
    )
    device: str = _f("auto", "Device type; 'auto' picks cuda when available.", ("auto", "cpu", "cuda"))
    attention_backend: str = _f(
        "auto",
        "SDPA kernels the attention may use (forward, recompute and backward). 'auto': those the GPU's compute "
        "capability has (below 8.0, e.g. a T4: memory-efficient and math, never flash or cuDNN; from 8.0 on "
        "torch's own choice; math in deterministic mode; torch's choice on CPU). A forced one ('efficient' "
        "emulates a T4 on a newer GPU) that the device or dtype lacks stops the run before loading. The choice "
        "is logged.",
        SDPA_BACKENDS,
    )
    compile: bool | str = _f(
        "auto",
        "torch.compile each transformer block. 'auto': on where the device is CUDA, off on CPU and where another "
        "setting excludes it (model.packed_attention = 'segments', a pipeline schedule that splits backward); "
        "the decision and its reason are logged. true where it is impossible stops the run before loading.",
        ("auto", True, False),
    )
    compile_mode: str = _f(
        "default",
        "torch.compile's mode for the blocks when compile is on. 'reduce-overhead' replays each block as a CUDA "
        "graph (static shapes: one graph per sequence length; not with activation checkpointing, whose "
        "recompute a replay would overwrite: it stopped the step on an H100, BENCHMARKS.md); 'max-autotune' "
        "also benchmarks GEMM and Triton configurations while compiling (minutes longer). Only 'default' is "
        "measured so far.",
        ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_loss: bool | str = _f(
        "auto",
        "Also compile the cross-entropy of each loss chunk (the fp32 upcast, log-softmax and target gather as "
        "fused kernels, forward and backward, instead of fp32 logits in memory). 'auto': on wherever the "
        "blocks are compiled (one H100: +0.8 to +2.0 % tokens/s at the same peak, and it passes the fp32 "
        "oracle: BENCHMARKS.md 2026-12-07); with compile off it stays off (logged).",
        ("auto", True, False),
    )
    loss_scale_init: float = _f(65536.0, "Initial loss scale (float16 only).")
    loss_scale_growth_interval: int = _f(2000, "Steps without overflow before the loss scale grows (float16 only).")
    max_nonfinite_steps: int = _f(
        3,
        "bfloat16/float32: an optimizer step whose loss or gradient norm is NaN/inf is skipped (logged with the "
        "step and the ranks that saw it); this many in a row stop the run. 0 turns the check off (it reads one "
        "flag on the host per step). float16 steps are guarded by the loss scaler instead.",
    )


@dataclass
class Optimizer:
    name: str = _f("AdamW", "Optimizer name; only 'AdamW' is supported (in any letter case).")
    lr: float = _f(2e-4, "Peak learning rate.")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.999, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.")


@dataclass
class LRScheduler:
    warmup_steps: int = _f(10, "Linear warmup steps.")
    decay_type: str = _f("cosine", "Decay shape after warmup.", ("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of the peak.")


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = _f(
        1,
        "HSDP replicas: the ranks form a replicate x shard mesh; parameters are sharded within each group of "
        "data_parallel_shard_degree consecutive ranks (a node, when that is the processes per node) and "
        "replicated across the groups, gradients all-reduced between replicas. 1 is pure FSDP over all ranks.",
    )
    data_parallel_shard_degree: int = _f(
        -1,
        "FSDP ranks per replica (parameters sharded over them); -1 means the rest: the number of ranks / "
        "data_parallel_replicate_degree. replicate x shard must equal the number of ranks.",
    )
    plan: str = _f(
        "off",
        "'auto': before loading, pick the layout that fits this machine's GPUs with the highest predicted "
        "tokens/s (recipe.planner: replicate/shard degree, reshard_after_forward, cpu_offload, activation "
        "offload, host_embedding, checkpointing mode, micro-batch; the global batch is kept), print it with "
        "the runner-up, and train with it. 'off': the layout as configured.",
        ("off", "auto"),
    )
    reshard_after_forward: bool = _f(True, "Free unsharded parameters after forward (re-gather in backward).")
    cpu_offload: bool = _f(False, "Offload sharded parameters and gradients to CPU.")
    single_rank_fsdp: bool = _f(
        False,
        "Wrap a one-rank job in FSDP anyway. Off (default): one rank with mixed_precision_reduce = float32, "
        "no CPU offload and no pipeline runs without FSDP (nothing to shard or reduce): the LoRA weights are "
        "plain fp32 tensors cast to the compute dtype where used, with the same numbers and no per-block "
        "gather and reduce copies.",
    )
    backend: str = _f("auto", "Process group backend; 'auto' is nccl on GPU, gloo on CPU.", ("auto", "nccl", "gloo"))
    vocab_parallel_embedding: bool = _f(
        False,
        "Keep each rank's rows of the frozen embedding table and assemble lookups with one all-reduce of "
        "the activations, instead of all-gathering the whole table per micro-batch (saves its memory and "
        "traffic). Experimental: not yet measured on GPUs. Ignored with tied embeddings or one rank.",
    )
    host_embedding: bool | str = _f(
        "auto",
        "Keep the frozen embedding table in pinned host memory and look tokens up there: the GPU holds only "
        "the batch's rows (saves 1 GiB for Llama 3 8B). 'auto': on for one CUDA rank without FSDP, where it "
        "was measured (BENCHMARKS.md), off elsewhere; the decision and its reason are logged. Not with tied "
        "embeddings or vocab_parallel_embedding.",
        ("auto", True, False),
    )
    host_lm_head: bool | str = _f(
        "auto",
        "Keep lm_head's frozen matrix in pinned host memory and copy it to the GPU once per micro-batch, "
        "behind the blocks' forward; the copy is freed after the loss's backward, before the blocks' "
        "backward, where the training peak is (measured on one H100, 8B at micro-batch 4: 8.85 instead of 9.82 "
        "GiB, -1 % tokens/s). 'auto': on for one CUDA rank without FSDP, off elsewhere until measured there; "
        "the decision and its reason are logged. Not with tied embeddings.",
        ("auto", True, False),
    )
    pipeline_parallel_degree: int = _f(
        1,
        "Pipeline stages' rank groups: the ranks form a pipeline x data-parallel mesh (pipeline outermost); "
        "each stage's modules are sharded with FSDP2 over the data-parallel ranks. Must divide the number "
        "of ranks. 1: no pipeline.",
    )
    pipeline_parallel_schedule: str = _f(
        "ZBVZeroBubble",
        "torch.distributed.pipelining schedule. ZBVZeroBubble and DualPipeV (V-shaped, exactly 2 stages per "
        "rank) and InterleavedZeroBubble split backward into input (B) and weight (W) passes that fill the "
        "bubble; Interleaved1F1B, 1F1B and GPipe are there for comparison.",
        ("ZBVZeroBubble", "InterleavedZeroBubble", "DualPipeV", "Interleaved1F1B", "1F1B", "GPipe"),
    )
    pipeline_parallel_microbatch_size: int = _f(
        1,
        "Sequences per pipeline micro-batch; with pipeline_parallel_degree > 1 it takes the place of "
        "training.micro_batch_size (the schedule runs global_batch_size / data-parallel ranks / this many "
        "micro-batches per step).",
    )
    pipeline_parallel_layers_per_stage: int = _f(
        -1,
        "Transformer blocks per pipeline stage (the number of stages is then blocks / this); -1: the "
        "schedule's stages per rank (1 for 1F1B and GPipe, 2 for the others) times the degree, blocks split "
        "evenly. Ignored when pipeline_parallel_split_points is set.",
    )
    pipeline_parallel_split_points: list[int] = _f(
        [],
        "Explicit cut: the index of the first block of every stage after the first (increasing), e.g. 2,4,6 "
        "for four stages of an 8-block model. Empty: see pipeline_parallel_layers_per_stage.",
    )


@dataclass
class ActivationCheckpoint:
    mode: str = _f("none", "Activation checkpointing of transformer blocks.", ("none", "full", "selective"))
    selective_every: int = _f(2, "With mode 'selective', checkpoint every k-th block.")
    offload: bool | str = _f(
        "auto",
        "Keep each checkpointed block's input (batch x seq x hidden) in pinned host memory from forward "
        "to backward, copied on a side stream and prefetched one block ahead (parallel/activation_offload.py). "
        "Needs mode full or selective. 'auto': on for one CUDA rank without FSDP with mode full or selective, "
        "where it was measured (BENCHMARKS.md), off elsewhere; the decision and its reason are logged.",
        ("auto", True, False),
    )
    keep_outputs: list[str] = _f(
        ["auto"],
        "Projections whose frozen (4-bit) output a checkpointed block keeps for backward instead of "
        "recomputing it (torch.utils.checkpoint's selective policy): any of q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj (with model.fuse_projections a fused group is kept when one of its parts is "
        "named), an empty list for none, or 'auto' (the default; recipe.plan decides and logs it): o_proj, "
        "gate_proj and up_proj in every second checkpointed block where the kept outputs wait in host memory "
        "(one CUDA rank without FSDP, compiled blocks, activation offload), none elsewhere. Each costs "
        "(tokens x out_features) per kept block: with activation offload it waits in pinned host memory when "
        "the blocks are compiled, else on the GPU. Saves the recompute's largest GEMMs (gate/up are 54 % of a "
        "Llama block's frozen FLOPs). Measured on one H100 (8B, the one-GPU defaults): +5.4 % tokens/s for "
        "+0.12 GiB of training peak at micro-batch 2, +8.2 % for +0.51 GiB at micro-batch 4; through the GPU "
        "accuracy oracle (BENCHMARKS.md, 2026-12-07).",
    )
    keep_every: int = _f(
        0,
        "With keep_outputs, keep them in every k-th checkpointed block (the others recompute all); 0 (the "
        "default): 2 with keep_outputs 'auto', 1 with a list.",
    )


@dataclass
class Checkpoint:
    enable: bool = _f(False, "Save training checkpoints.")
    folder: str = _f("checkpoint", "Checkpoint folder, relative to job.dump_folder.")
    interval: int = _f(100, "Save every this many steps.")
    keep_latest_k: int = _f(0, "Keep only the latest k checkpoints (0 keeps all).")
    load_step: int = _f(-1, "Step to resume from; -1 means the latest complete checkpoint.")
    async_mode: bool = _f(False, "Save checkpoints asynchronously.")
    export_adapter: bool = _f(True, "Write a PEFT adapter at the end of training.")


@dataclass
class Profiling:
    enable_memory_snapshot: bool = _f(
        False,
        "Record CUDA memory history and dump per-rank snapshot pickles (open them at "
        "https://pytorch.org/memory_viz) to <dump_folder>/<save_folder>/memory_snapshot/; CUDA only "
        "(skipped with a message on CPU).",
    )
    memory_snapshot_steps: list[int] = _f(
        [],
        "1-based steps to record: recording starts before the first listed step and "
        "rank{r}_step{N}.pickle is dumped after the last (N). Empty: only the out-of-memory dump.",
    )
    memory_snapshot_on_oom: bool = _f(
        True,
        "With enable_memory_snapshot: record from the first step on and dump rank{r}_oom.pickle when a "
        "step runs out of CUDA memory (then the error is re-raised).",
    )
    memory_snapshot_max_entries: int = _f(
        100000, "Allocation events kept in the memory history ring buffer (max_entries)."
    )
    enable_profiling: bool = _f(False, "Trace profile_steps with the torch profiler (CPU, + CUDA when available).")
    profile_steps: list[int] = _f(
        [],
        "1-based steps to trace; each is exported as a Chrome trace "
        "<dump_folder>/<save_folder>/traces/rank{r}_step{N}.json (open in https://ui.perfetto.dev).",
    )
    save_folder: str = _f("profiling", "Profiling output folder, relative to job.dump_folder.")
    memory_report: bool = _f(
        True,
        "Measure per-rank memory per phase (load, forward, backward, optimizer; max over steps), print a "
        "table at the end and write <dump_folder>/<metrics.save_folder>/memory_report.json. Adds no "
        "device synchronisation.",
    )


@dataclass
class Metrics:
    log_freq: int = _f(1, "Log metrics every this many steps.")
    enable_jsonl: bool = _f(True, "Write metrics as JSON lines.")
    enable_tensorboard: bool = _f(
        False,
        "Write TensorBoard event files to <dump_folder>/<save_folder>/tensorboard "
        "(optional package: pip install tensorboard).",
    )
    save_folder: str = _f("metrics", "Metrics output folder, relative to job.dump_folder.")
    plots: bool = _f(
        True,
        "At the end of a run, write loss / speed / memory PNGs to <dump_folder>/<save_folder>/plots "
        "(recipe.plot; only when matplotlib is installed, else the end-of-run report says how to get them).",
    )
    peak_tflops: float = _f(
        0.0,
        "Peak dense bf16 TFLOP/s of one GPU, for MFU; 0 looks the GPU up in recipe.metrics.PEAK_FLOPS "
        "(MFU is null on CPU or an unknown GPU).",
    )


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    lora: Lora = field(default_factory=Lora)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)


# ---------------------------------------------------------------------------
# Schema introspection


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]


def _fields(section_cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    # Resolve the string annotations that `from __future__ import annotations` leaves behind.
    hints = typing.get_type_hints(section_cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(section_cls)}


def _is_auto_bool(tp: Any) -> bool:
    """A ``bool | str`` field: true, false or 'auto' (resolved later, e.g. by ``recipe.plan``)."""
    return set(typing.get_args(tp)) == {bool, str}


def config_field(section: str, key: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field of ``section.key`` and its type (help, choices and default in one place)."""
    return _fields(_sections()[section])[key]


def _type_name(tp: Any) -> str:
    if _is_auto_bool(tp):
        return "bool or 'auto'"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_section(section: str, where: str) -> type:
    secs = _sections()
    if section not in secs:
        raise ConfigError(
            f"unknown config section '{section}' ({where}).{_suggest(section, list(secs))} "
            f"Valid sections: {', '.join(secs)}."
        )
    return secs[section]


def _check_key(section: str, key: str, where: str) -> tuple[dataclasses.Field, Any]:
    fields = _fields(_check_section(section, where))
    if key not in fields:
        sug = _suggest(key, list(fields))
        sug = sug.replace("'", f"'{section}.", 1) if sug else ""
        raise ConfigError(
            f"unknown config key '{section}.{key}' ({where}).{sug} Valid keys in [{section}]: {', '.join(fields)}."
        )
    return fields[key]


# ---------------------------------------------------------------------------
# Value conversion


def _type_error(name: str, tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(
        f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) ({where}). "
        f"Give a value of type {_type_name(tp)}."
    )


def _from_toml(name: str, tp: Any, value: Any, where: str) -> Any:
    """Check a TOML-typed value strictly: TOML already has types, so no string coercion."""
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise _type_error(name, tp, value, where)
        (elem,) = typing.get_args(tp)
        return [_from_toml(f"{name}[{i}]", elem, v, where) for i, v in enumerate(value)]
    # bool is a subclass of int, so it must be excluded explicitly for numeric fields.
    if _is_auto_bool(tp):
        ok = isinstance(value, bool) or value == "auto"
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise _type_error(name, tp, value, where)
    return value


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _from_cli(name: str, tp: Any, raw: str, where: str) -> Any:
    """Parse a command-line string into the field's type."""
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        items = [s.strip() for s in raw.split(",")]
        # Drop empties so "" means [] and a trailing comma is harmless.
        return [_from_cli(name, elem, s, where) for s in items if s]
    try:
        if _is_auto_bool(tp) and raw.strip().lower() == "auto":
            return "auto"
        if tp is bool or _is_auto_bool(tp):
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"{name}: expected {_type_name(tp)}, got {raw!r} (str) ({where}). "
            + (
                "Use true/false/1/0/yes/no" + (" or auto." if _is_auto_bool(tp) else ".")
                if tp is bool or _is_auto_bool(tp)
                else f"Give a value of type {_type_name(tp)}."
            )
        ) from None
    return raw


# ---------------------------------------------------------------------------
# Validation

# (section, key, predicate, requirement text) for simple range checks.
_RANGES: list[tuple[str, str, typing.Callable[[Any], bool], str]] = [
    ("lora", "rank", lambda v: v > 0, "> 0"),
    ("lora", "alpha", lambda v: v > 0, "> 0"),
    ("lora", "dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    # Without any target there is nothing to train.
    (
        "lora",
        "target_modules",
        lambda v: len(v) > 0,
        f"non-empty: at least one of the seven projections ({', '.join(LORA_TARGETS)})",
    ),
    ("data", "seq_len", lambda v: v > 0, "> 0"),
    ("model", "mlp_chunk_tokens", lambda v: v >= 0, ">= 0 (0: no chunking)"),
    ("training", "steps", lambda v: v >= 0, ">= 0"),
    ("training", "micro_batch_size", lambda v: v > 0, "> 0"),
    ("training", "global_batch_size", lambda v: v == -1 or v > 0, "-1 (micro_batch_size x ranks) or > 0"),
    ("training", "loss_scale_init", lambda v: 0 < v < math.inf, "> 0 and finite"),
    # 0 would divide by zero in LossScaler.update.
    ("training", "loss_scale_growth_interval", lambda v: v >= 1, ">= 1"),
    ("training", "max_nonfinite_steps", lambda v: v >= 0, ">= 0"),
    # Case-insensitive like recipe.optim.build_optimizer, so it is not a choices field.
    ("optimizer", "name", lambda v: v.lower() == "adamw", "'AdamW' (the only supported optimizer)"),
    ("optimizer", "lr", lambda v: 0 < v < math.inf, "> 0 and finite"),
    # torch.optim.AdamW raises on betas outside [0, 1) only when the optimizer is built, after the model loads.
    ("optimizer", "beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer", "beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer", "eps", lambda v: 0 < v < math.inf, "> 0 and finite"),
    ("optimizer", "weight_decay", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    # Outside [0, 1] the decayed lr overshoots the peak or turns negative.
    ("lr_scheduler", "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lr_scheduler", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("activation_checkpoint", "selective_every", lambda v: v >= 1, ">= 1"),
    ("parallelism", "pipeline_parallel_degree", lambda v: v >= 1, ">= 1"),
    ("parallelism", "pipeline_parallel_microbatch_size", lambda v: v >= 1, ">= 1"),
    ("parallelism", "pipeline_parallel_layers_per_stage", lambda v: v == -1 or v >= 1, "-1 (automatic) or >= 1"),
    ("checkpoint", "interval", lambda v: v >= 1, ">= 1"),
    ("checkpoint", "keep_latest_k", lambda v: v >= 0, ">= 0"),
    ("metrics", "log_freq", lambda v: v >= 1, ">= 1"),
    ("metrics", "peak_tflops", lambda v: v >= 0, ">= 0"),
    ("profiling", "memory_snapshot_max_entries", lambda v: v >= 1, ">= 1"),
]


def validate(cfg: JobConfig) -> None:
    """Check choice fields and simple ranges; cross-field checks that need the
    world size (e.g. global_batch_size divisibility) happen at setup time."""
    for sec in _sections():
        obj = getattr(cfg, sec)
        for key, (f, _) in _fields(type(obj)).items():
            choices = f.metadata.get("choices")
            val = getattr(obj, key)
            if choices is not None and val not in choices:
                raise ConfigError(
                    f"{sec}.{key}: invalid value {val!r}.{_suggest(str(val), [str(c) for c in choices if c])} "
                    f"Valid choices: {', '.join(repr(c) for c in choices)}."
                )
    for sec, key, ok, req in _RANGES:
        val = getattr(getattr(cfg, sec), key)
        # `not ok(...)` also rejects NaN, whose comparisons are all False.
        if not ok(val) or (isinstance(val, float) and math.isnan(val)):
            default = getattr(_sections()[sec](), key)
            if isinstance(default, list):  # in the comma-separated form the CLI takes
                default = ",".join(str(x) for x in default)
            raise ConfigError(f"{sec}.{key} must be {req}, got {val!r}. Set e.g. --{sec}.{key}={default}.")
    if cfg.parallelism.host_embedding is True and cfg.parallelism.vocab_parallel_embedding:
        raise ConfigError(
            "parallelism.host_embedding and parallelism.vocab_parallel_embedding both place the embedding "
            "table: keep one of them (--parallelism.vocab_parallel_embedding=false or "
            "--parallelism.host_embedding=false)."
        )
    if cfg.model.packed_attention == "segments" and cfg.training.compile is True:
        raise ConfigError(
            "model.packed_attention = 'segments' loops over each row's documents, which torch.compile would "
            "recompile for every new layout: set --training.compile=false or --model.packed_attention=mask."
        )
    if cfg.training.compile_mode == "reduce-overhead" and cfg.activation_checkpoint.mode != "none":
        # Measured on an H100 (BENCHMARKS.md, 2026-12-07): the step stops with "accessing tensor output of
        # CUDAGraphs that has been overwritten by a subsequent run". A known limit of CUDA graph trees
        # under non-reentrant checkpointing in torch 2.11 (pytorch/pytorch#154306).
        raise ConfigError(
            "training.compile_mode = 'reduce-overhead' replays each block as one CUDA graph, whose outputs the "
            f"next replay overwrites; activation_checkpoint.mode = {cfg.activation_checkpoint.mode!r} recomputes "
            "blocks in backward while their saved outputs are still in use: set --activation_checkpoint.mode=none "
            "or --training.compile_mode=default."
        )
    if cfg.activation_checkpoint.offload is True and cfg.activation_checkpoint.mode == "none":
        raise ConfigError(
            "activation_checkpoint.offload keeps checkpointed blocks' inputs on the host, and "
            "activation_checkpoint.mode is 'none': set --activation_checkpoint.mode=full (or selective), "
            "or drop the offload."
        )
    _validate_keep_outputs(cfg)
    unknown = sorted(set(cfg.lora.target_modules) - set(LORA_TARGETS))
    if unknown:
        raise ConfigError(f"lora.target_modules: unknown module(s) {unknown}; valid: {list(LORA_TARGETS)}")


# The projections whose frozen output activation checkpointing can keep: down_proj's output is never
# recomputed (nothing in backward needs it: the block's output is the next block's saved input).
KEEPABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def _validate_keep_outputs(cfg: JobConfig) -> None:
    ac = cfg.activation_checkpoint
    if ac.keep_every < 0:
        raise ConfigError(f"activation_checkpoint.keep_every must be >= 0 (0: the default), got {ac.keep_every}")
    if "auto" in ac.keep_outputs and ac.keep_outputs != ["auto"]:
        raise ConfigError(
            f"activation_checkpoint.keep_outputs = {ac.keep_outputs}: 'auto' stands alone; give 'auto' or a list "
            f"of projections from {list(KEEPABLE)} (or an empty list for none)."
        )
    if not ac.keep_outputs or ac.keep_outputs == ["auto"]:
        return
    where = f"activation_checkpoint.keep_outputs = {ac.keep_outputs}"
    if "down_proj" in ac.keep_outputs:
        raise ConfigError(
            f"{where}: down_proj's output is not recomputed anyway (the block's output is the next block's "
            f"saved input); name some of {list(KEEPABLE)}."
        )
    unknown = sorted(set(ac.keep_outputs) - set(KEEPABLE))
    if unknown:
        raise ConfigError(f"{where}: unknown projection(s) {unknown}; valid: {list(KEEPABLE)}")
    if ac.mode == "none":
        raise ConfigError(
            f"{where} needs checkpointed blocks, and activation_checkpoint.mode is 'none': set "
            "--activation_checkpoint.mode=full (or selective), or drop keep_outputs."
        )
    if cfg.model.quant_type == "none":
        raise ConfigError(
            f"{where} keeps outputs of 4-bit projections, and model.quant_type is 'none': use a 4-bit "
            "checkpoint or model.quant_type nf4/fp4, or drop keep_outputs."
        )
    if cfg.model.mlp_chunk_tokens and {"gate_proj", "up_proj"} & set(ac.keep_outputs):
        raise ConfigError(
            f"{where}: model.mlp_chunk_tokens checkpoints each MLP chunk again inside the block, where the "
            "block's policy does not reach: set --model.mlp_chunk_tokens=0 or keep only attention projections."
        )


# ---------------------------------------------------------------------------
# Loading


def _apply_toml(cfg: JobConfig, data: dict[str, Any], where: str) -> None:
    for section, table in data.items():
        _check_section(section, where)
        if not isinstance(table, dict):
            raise ConfigError(
                f"'{section}' must be a table ({where}); "
                f"write it as a [{section}] header followed by key = value lines."
            )
        obj = getattr(cfg, section)
        for key, value in table.items():
            f, tp = _check_key(section, key, where)
            if value == "auto" and typing.get_origin(tp) is list and f.default_factory() == ["auto"]:
                value = ["auto"]  # a list field whose default is 'auto' (keep_outputs) takes the bare word too
            setattr(obj, key, _from_toml(f"{section}.{key}", tp, value, where))


def _parse_argv(argv: list[str]) -> list[tuple[str, str, str | None]]:
    """Split argv into (section, key, raw value or None for a bare flag)."""
    out: list[tuple[str, str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides must look like --section.key=value "
                f"or --section.key value (e.g. --training.steps=10); see --help."
            )
        name, eq, raw = arg[2:].partition("=")
        value: str | None = raw if eq else None
        # Space form: consume the next token unless it is itself an option.
        if value is None and i < len(argv) and not argv[i].startswith("--"):
            value = argv[i]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key, value))
    return out


def config_from_dict(data: dict[str, Any], where: str = "dict") -> JobConfig:
    """Build and validate a JobConfig from a nested dict such as config_to_dict's output."""
    cfg = JobConfig()
    _apply_toml(cfg, data, where)
    validate(cfg)
    return cfg


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML named by --job.config_file, then CLI overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        raise SystemExit(0)

    overrides = []
    for section, key, raw in _parse_argv(argv):
        where = f"from --{section}.{key}"
        _, tp = _check_key(section, key, "on the command line")
        if raw is None:
            if tp is not bool and not _is_auto_bool(tp):
                raise ConfigError(f"--{section}.{key} needs a value: use --{section}.{key}=VALUE ({_type_name(tp)}).")
            raw = "true"
        overrides.append((section, key, _from_cli(f"{section}.{key}", tp, raw, where)))

    cfg = JobConfig()
    # The file path comes from the CLI; the last occurrence wins like any override.
    path = next((v for s, k, v in reversed(overrides) if (s, k) == ("job", "config_file")), "")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path!r}. Check --job.config_file.")
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"malformed TOML in {path!r}: {e}. Fix the syntax at that position.") from None
        _apply_toml(cfg, data, f"in {path}")

    for section, key, value in overrides:
        setattr(getattr(cfg, section), key, value)
    cfg.job.config_file = path
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Help and serialization


def format_help() -> str:
    lines = [
        "usage: [--job.config_file PATH] [--section.key=value | --section.key value ...]",
        "CLI overrides beat the TOML file, which beats defaults. Lists are comma-separated; "
        "a bare --section.flag sets a bool to true.",
    ]
    for sec, cls in _sections().items():
        lines.append(f"\n[{sec}]")
        defaults = cls()
        for key, (f, tp) in _fields(cls).items():
            lines.append(f"  --{sec}.{key} ({_type_name(tp)}, default: {getattr(defaults, key)!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
            if "choices" in f.metadata:
                lines.append(f"      choices: {', '.join(repr(c) for c in f.metadata['choices'])}")
    return "\n".join(lines)


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # repr gives shortest round-trip text; TOML spells inf/nan the same way.
        return repr(v)
    if isinstance(v, str):
        # ensure_ascii=False avoids \ud83d-style surrogate escapes that TOML rejects;
        # DEL is the one control char JSON leaves raw but TOML forbids.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: JobConfig) -> str:
    parts = []
    for sec, table in config_to_dict(cfg).items():
        parts.append(f"[{sec}]")
        parts.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        parts.append("")
    return "\n".join(parts)
