"""Will it fit? Per-rank memory, checkpoint size and speed of a job, from its config alone.

``python -m recipe.estimate --job.config_file F --ngpu N [--section.key=value ...] [--card h200]
[--fit-gpu-gib G]`` reads the TOML (with the same overrides as ``recipe.train``) and the base
checkpoint's ``config.json`` (or ``model.synthetic_shape`` when there is none yet): never a weight file,
never a GPU. It prints, per rank:

* GPU memory (CUDA *allocated*, GiB) at each phase of the memory report (``recipe.profiling.PHASES``:
  ``load`` ... ``after_optimizer``): the number ``--profiling.memory_report`` measures;
* host memory (resident set);
* the training checkpoint's size (``recipe/checkpoint``: LoRA weights + AdamW state): the tensor bytes,
  exact, and the DCP data files, exact up to the small pickled scalars;
* tokens/s per GPU on ``--card``: the step-time model of ``recipe.planner`` (the card's peak, efficiencies
  and transfer costs fitted to the measured rows of ``CALIBRATION``).

``--plan`` adds the layout planner's choice for ``--ngpu`` x ``--card`` (``recipe.planner``); ``--calibration``
prints the estimator against every measured row; ``--help`` lists these options.

``--fit-gpu-gib G`` adds the largest ``training.micro_batch_size`` (at the configured ``seq_len``) and the
largest ``data.seq_len`` (at the configured micro-batch) whose training peak stays under G GiB.

How the memory is counted (bytes per rank; N = the shard degree, T = micro-batch x seq_len tokens,
p = bytes of ``training.mixed_precision_param``): the *static* state is every FSDP shard (4-bit codes
0.5 byte/weight + one fp32 scale per block, rows padded to a multiple of N; embeddings, lm_head and
norms in p; LoRA fp32), AdamW adds 8 bytes per LoRA parameter / N, gradients 4 / N (alive between the
micro-batches of an accumulating step). During a step the GPU also holds the root group unsharded
(lm_head, kept from the forward's start to the backward's end), the embedding table while it is gathered
(twice, briefly: FSDP copies the all-gather output into the parameter), two gathered blocks (FSDP
prefetches one), the saved activations (with full AC one (T x hidden) tensor per block) and the working
set of the largest moment: a block's recompute and backward, or a chunk of the cross-entropy. Those terms
are counted from the model code (``_block_saved_bytes``, ``_block_work_bytes``); ``_WORK_SCALE``, the one
fitted constant, scales the working sets to the H200 measurements of BENCHMARKS.md (see ``CALIBRATION``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.dtypes import DTYPES
from models.shapes import LlamaShape, get_shape, shape_from_hf_config
from recipe.config import ConfigError, JobConfig, load_config
from recipe.metrics import PEAK_FLOPS, ac_fraction, model_flops_per_token
from recipe.plan import (
    kept_outputs_on_host,
    needs_fsdp,
    resolve_ac_offload,
    resolve_compile,
    resolve_host_embedding,
    resolve_host_lm_head,
    resolve_keep_outputs,
)
from recipe.profiling import PHASES

__all__ = [
    "CARDS",
    "CALIBRATION",
    "Estimate",
    "estimate",
    "fit",
    "checkpoint_tensors",
    "calibration_table",
    "memory_warning",
]

_GIB = 2**30

# Card -> (name in recipe.metrics.PEAK_FLOPS, device memory in GiB as torch.cuda reports total_memory:
# H200 measured here (143,771 MiB); the others are the nvidia-smi totals of those cards).
CARDS: dict[str, tuple[str, float]] = {
    "h200": ("H200", 143771 / 1024),
    "h100": ("H100", 81559 / 1024),
    "a100": ("A100", 81920 / 1024),
    "l4": ("L4", 23034 / 1024),
    "t4": ("T4", 15360 / 1024),
}

# Scale the counted working sets to the caching allocator's peaks: the pair that minimises the largest
# relative error over CALIBRATION (a grid over 0.2-1.6 in steps of 0.05; max error 2.3 %). What is
# counted double-counts tensors the allocator frees early (silu's input, the fp32 logits).
_WORK_SCALE = 0.45  # a block's recompute and MLP backward, and the embedding-free phases
_LOSS_SCALE = 0.65  # the cross-entropy chunk


@dataclass(frozen=True)
class Measured:
    """One measured run: its job (a file of train_configs/ plus overrides), GPUs, and what it gave."""

    what: str
    overrides: dict
    ngpu: int
    train: float | None  # training peak, GiB per rank (CUDA allocated)
    load: float | None  # load peak
    tokens_per_s: float | None  # per GPU
    card: str
    fitted: bool  # one of the rows the constants were fitted to
    source: str
    config: str = "llama3_8b_qlora.toml"
    # Measured before frozen weights left FSDP on one shard rank (main cb917b8, 2026-12-07): every row so
    # far. Such rows are compared with the layout they ran (``measured_job``).
    frozen_in_fsdp: bool = True
    # Measured eager and with host_embedding and activation offload off unless set (the benchmarks passed
    # --training.compile=false; the savers' 'auto' defaults came 2026-12-07): ``job_overrides`` says so,
    # so the row's job is the one that ran.
    before_auto_defaults: bool = True
    # Measured with lm_head on the GPU (before parallelism.host_lm_head's 'auto' default, 2026-12-07, fifth
    # session) unless the overrides say otherwise.
    before_host_lm_head: bool = True
    # Measured before model.lora_epilogue (2026-12-07, sixth session): adapters' products added apart.
    before_lora_epilogue: bool = True
    # Measured before activation_checkpoint.keep_outputs' 'auto' default (2026-12-07, seventh session):
    # nothing kept unless the overrides say so.
    before_keep_auto: bool = True
    # Measured with the forward half of model.lora_epilogue only (2026-12-07, sixth session): ``measured_job``.
    before_epilogue_backward: bool = False

    @property
    def job_overrides(self) -> dict:
        base = (_BEFORE_AUTO if self.before_auto_defaults else {}) | (_NO_HEAD if self.before_host_lm_head else {})
        base |= _NO_EPILOGUE if self.before_lora_epilogue else {}
        return base | (_NO_KEEP if self.before_keep_auto else {}) | self.overrides


_1B = {
    "model.synthetic_shape": "llama3_2_1b",
    "data.seq_len": 512,
    "training.micro_batch_size": 1,
    "training.global_batch_size": 6,
    "training.mixed_precision_reduce": "float64",
}
_LEAN = {"activation_checkpoint.offload": True, "parallelism.host_embedding": True}
_LONG = _LEAN | {"training.micro_batch_size": 1, "training.global_batch_size": 1, "model.mlp_chunk_tokens": 8192}
_T4 = {"model.synthetic_shape": "llama3_1_8b", "training.attention_backend": "auto"}
_T4_PLAN = {
    "training.micro_batch_size": 1,
    "activation_checkpoint.mode": "selective",
    "activation_checkpoint.selective_every": 2,
    "activation_checkpoint.offload": True,
    "parallelism.host_embedding": True,
}
_OFF = {key: False for key in _LEAN}  # both memory savers off
_BEFORE_AUTO = _OFF | {"training.compile": False}
_NO_HEAD, _HEAD_MB4 = (
    {"parallelism.host_lm_head": False},
    {"parallelism.host_lm_head": True, "training.micro_batch_size": 4},
)
_HOST, _ACT = {"parallelism.host_embedding": True}, {"activation_checkpoint.offload": True}
_NO_EPILOGUE, _MB4 = {"model.lora_epilogue": False}, {"training.micro_batch_size": 4}
_NO_KEEP = {"activation_checkpoint.keep_outputs": ""}
_KEEP2 = {"activation_checkpoint.keep_outputs": "o_proj,gate_proj,up_proj", "activation_checkpoint.keep_every": 2}
_GRID = _OFF | {"parallelism.host_lm_head": False}  # benchmarks/planner_grid.sh: no memory saver
_FSDP1, _FUSED = {"parallelism.single_rank_fsdp": True}, {"model.fuse_projections": True}
_B, _R0, _R0B = "BENCHMARKS.md", "REFERENCE.md 0", "REFERENCE.md 0b"
# Every measured row of BENCHMARKS.md and shared/REFERENCE.md sections 0 / 0b that the recipe's current
# layout ran (2 ranks "on one GPU" are gloo ranks sharing a card: per-rank memory as on 2 cards, speed
# meaningless). tests/test_estimate.py checks the estimator against every row: memory within 10 %;
# BENCHMARKS.md prints the table (``python -m recipe.estimate --calibration``).
CALIBRATION: list[Measured] = [
    Measured("8B, 1 GPU, eager", {}, 1, 11.32, 6.27, 6909, "h200", True, _R0B + ", " + _B + " call A"),
    Measured("8B, 1 GPU, eager", {}, 1, 11.27, 6.27, 6329, "h100", False, _R0),
    Measured("8B, 2 GPUs", {}, 2, 8.04, 3.12, 5494, "h200", True, _R0B + ", " + _B + " 4x H200"),
    Measured("8B, 2 ranks on one GPU (later tree)", {}, 2, 7.41, 3.12, None, "h200", False, _B + " call D"),
    Measured("8B, 4 GPUs (lm_head in its own group)", {}, 4, 6.00, 1.56, 4838, "h200", False, _B + " 4x H200"),
    Measured(
        "8B, 2 GPUs, vocab_parallel_embedding",
        {"parallelism.vocab_parallel_embedding": True},
        2,
        7.39,
        3.12,
        None,
        "h200",
        True,
        _R0B,
    ),
    Measured("8B, 2 GPUs, cpu_offload", {"parallelism.cpu_offload": True}, 2, 4.47, 0.0, None, "h200", True, _R0B),
    Measured("8B, 1 GPU, lean (act. offload + host emb.)", _LEAN, 1, 9.35, 5.29, 6764, "h200", True, _B + " call A"),
    Measured("8B, 2 GPUs, lean", _LEAN, 2, 5.25, 2.63, None, "h200", True, _B + " call B"),
    Measured("8B, 1 GPU, compiled", {"training.compile": True}, 1, 11.54, 6.27, 9099, "h200", False, _B + " call A"),
    Measured("8B, 1 GPU, compiled", {"training.compile": True}, 1, 11.54, 6.27, 9664, "h100", False, _R0),
    Measured("8B, 1 GPU, compiled + lean", _LEAN | {"training.compile": True}, 1, 9.64, 5.29, 8054, "h200", False, _B),
    Measured("8B, 1 GPU, compiled + lean", _LEAN | {"training.compile": True}, 1, 9.64, 5.29, 7623, "h100", False, _R0),
    Measured(
        "8B, long context 32,768, lean + MLP chunks",
        _LONG | {"data.seq_len": 32768},
        1,
        13.23,
        None,
        4867,
        "h100",
        False,
        _R0,
    ),
    Measured(
        "8B, long context 65,536, lean + MLP chunks",
        _LONG | {"data.seq_len": 65536},
        1,
        18.14,
        None,
        3611,
        "h100",
        False,
        _R0,
    ),
    Measured("1B det (seq 512, mb 1, fp64 reduce), 1 GPU", _1B, 1, 3.17, 1.17, None, "h200", True, _B),
    Measured("1B det, 2 ranks on one GPU", _1B, 2, 2.41, 0.58, None, "h200", True, _B),
    Measured("1B det, 3 ranks on one GPU", _1B, 3, 2.16, 0.39, None, "h200", True, _B),
    Measured(
        "T4 job (fp16), 1 rank, 15 GiB cap",
        _T4,
        1,
        11.34,
        6.27,
        None,
        "h200",
        False,
        _B + " call E",
        "llama3_8b_qlora_t4.toml",
    ),
    Measured(
        "T4 job, 2 ranks, cpu_offload",
        _T4 | {"parallelism.cpu_offload": True},
        2,
        4.47,
        0.0,
        None,
        "h200",
        False,
        _B + " call F",
        "llama3_8b_qlora_t4.toml",
    ),
    Measured(
        "T4 job, seq 512, 1 rank",
        _T4 | {"data.seq_len": 512},
        1,
        10.22,
        None,
        None,
        "h100",
        False,
        _R0,
        "llama3_8b_qlora_t4.toml",
    ),
    # 2026-12-07, one H100, the tree that runs one rank without FSDP (BENCHMARKS.md "2026-12-07, third
    # session"): each row's savers as set, compile on (the speed column is compiled except for eager).
    *(
        Measured(what, _OFF | ov, 1, train, load, tps, "h100", False, _B + " 12-07", frozen_in_fsdp=False)
        for what, ov, train, load, tps in (
            ("8B, 1 GPU, eager, no FSDP", {"training.compile": False}, 10.21, 6.27, 7682),
            ("8B, 1 GPU, compiled, no FSDP", {"training.compile": True}, 10.45, 6.27, 10460),
            ("8B, 1 GPU, compiled, FSDP on one rank", _FSDP1 | {"training.compile": True}, 10.44, 6.27, 10255),
            ("8B, 1 GPU, compiled + host embedding", _HOST | {"training.compile": True}, 9.47, 5.29, 10443),
            ("8B, 1 GPU, compiled + act. offload", _ACT | {"training.compile": True}, 9.52, 6.27, 10388),
            ("8B, 1 GPU, compiled + fused projections", _FUSED | {"training.compile": True}, 10.47, 6.26, 10571),
        )
    ),
    Measured(
        "8B, 1 GPU, the default (compile, host embedding, act. offload: 'auto')",
        {},
        1,
        8.55,
        5.29,
        10401,
        "h100",
        False,
        _B + " 12-07",
        frozen_in_fsdp=False,
        before_auto_defaults=False,
    ),
    # 2026-12-07, fourth session, one H100 (BENCHMARKS.md): the defaults ('auto': compile with the loss
    # chunks, and on one rank host embedding and activation offload), as each run set them.
    *(
        Measured(what, ov, n, train, load, tps, "h100", False, _B + " 12-07 (4)", config, False, False)
        for what, ov, n, train, load, tps, config in (
            ("8B, 1 GPU, the default", {}, 1, 8.54, 5.29, 10673, "llama3_8b_qlora.toml"),
            (
                "8B, 1 GPU, the default at micro-batch 4",
                {"training.micro_batch_size": 4},
                1,
                9.82,
                5.29,
                11219,
                "llama3_8b_qlora.toml",
            ),
            (
                "8B, 1 GPU, compiled, no checkpointing",
                _OFF | {"training.compile": True, "activation_checkpoint.mode": "none"},
                1,
                26.50,
                6.27,
                13854,
                "llama3_8b_qlora.toml",
            ),
            ("T4 job (fp16), 1 rank, 15 GiB cap", _T4, 1, 8.61, 5.29, None, "llama3_8b_qlora_t4.toml"),
            ("T4 job, 2 ranks, full sharding", _T4, 2, 7.41, 3.12, None, "llama3_8b_qlora_t4.toml"),
            (
                "T4 job, 2 ranks, no resharding",
                _T4 | {"parallelism.reshard_after_forward": False},
                2,
                11.74,
                3.12,
                None,
                "llama3_8b_qlora_t4.toml",
            ),
            (
                "T4 job, 2 ranks, HSDP 2x1, micro-batch 1 (the planner's)",
                _T4 | {"parallelism.data_parallel_replicate_degree": 2, "training.micro_batch_size": 1},
                2,
                9.52,
                6.27,
                None,
                "llama3_8b_qlora_t4.toml",
            ),
            (
                "T4 job, 2 ranks, cpu_offload",
                _T4 | {"parallelism.cpu_offload": True},
                2,
                4.47,
                0.0,
                None,
                "llama3_8b_qlora_t4.toml",
            ),
        )
    ),
    # 2026-12-07, fifth session, one H100 (BENCHMARKS.md): lm_head on the host, micro-batch 4, kept outputs;
    # the T4 planner's layout (HSDP 2x1, micro-batch 1, every second block checkpointed, both savers).
    *(
        # All ran with lm_head on the GPU unless their overrides put it on the host (before_host_lm_head).
        Measured(what, ov, n, train, load, tps, "h100", False, _B + " 12-07 (5)", config, False, False, True)
        for what, ov, n, train, load, tps, config in (
            ("8B, 1 GPU, the default (lm_head on the GPU)", {}, 1, 8.57, 5.29, 10658, "llama3_8b_qlora.toml"),
            (
                "8B, 1 GPU, default + host lm_head, micro-batch 4",
                _HEAD_MB4,
                1,
                8.85,
                4.31,
                11091,
                "llama3_8b_qlora.toml",
            ),
            *(
                (
                    f"8B, 1 GPU, default + host lm_head, micro-batch 4, keep {kept} every {k}",
                    _HEAD_MB4 | {"activation_checkpoint.keep_outputs": kept, "activation_checkpoint.keep_every": k},
                    1,
                    train,
                    4.31,
                    tps,
                    "llama3_8b_qlora.toml",
                )
                for kept, k, train, tps in (
                    ("o_proj,gate_proj,up_proj", 2, 9.35, 11875),
                    ("gate_proj,up_proj", 2, 9.28, 11745),
                    ("o_proj,gate_proj", 2, 9.13, 11613),
                    ("up_proj", 1, 9.06, 11843),
                    ("up_proj", 2, 9.07, 11404),
                )
            ),
            ("T4 job (fp16), 1 rank, 15 GiB cap", _T4, 1, 8.60, 5.29, None, "llama3_8b_qlora_t4.toml"),
            (
                "T4 job, 1 rank, the planner's 2x T4 layout at micro-batch 1",
                _T4 | _T4_PLAN,
                1,
                12.14,
                5.29,
                None,
                "llama3_8b_qlora_t4.toml",
            ),
            (
                "T4 job, 2 ranks, the planner's layout (HSDP 2x1)",
                _T4 | _T4_PLAN | {"parallelism.data_parallel_replicate_degree": 2},
                2,
                11.99,
                5.29,
                None,
                "llama3_8b_qlora_t4.toml",
            ),
        )
    ),
    # 2026-12-07, sixth session (BENCHMARKS.md): one H200 before model.lora_epilogue (call 1), then one
    # H100 with its forward half (calls 2 and 3, one warm machine); lm_head on the host ('auto') in all of them. Speeds
    # only from 6-step runs (the 3-step memory-snapshot runs give peaks only).
    *(
        Measured(
            what,
            ov,
            1,
            train,
            4.31,
            tps,
            card,
            False,
            _B + " 12-07 (6)",
            frozen_in_fsdp=False,
            before_auto_defaults=False,
            before_host_lm_head=False,
            before_lora_epilogue=epi,
            before_epilogue_backward=True,
        )
        for what, ov, train, tps, card, epi in (
            ("8B, 1 GPU, the default", {}, 7.94, 10823, "h200", True),
            ("8B, 1 GPU, the default, micro-batch 4, keep o/gate/up every 2", _MB4 | _KEEP2, 9.35, None, "h200", True),
            ("8B, 1 GPU, the default (lora_epilogue)", {}, 7.68, 10194, "h100", False),
            ("8B, 1 GPU, the default at micro-batch 4", _MB4, 8.34, 11131, "h100", False),
            ("8B, 1 GPU, the default at micro-batch 4, no epilogue", _MB4 | _NO_EPILOGUE, 8.85, 11180, "h100", False),
            ("8B, 1 GPU, micro-batch 4, keep o/gate/up every 2", _MB4 | _KEEP2, 8.85, 12048, "h100", False),
        )
    ),
    # 2026-12-07, seventh session, one H100 (BENCHMARKS.md): the default and kept outputs with both halves of
    # the epilogue and lm_head's prefetch after the embedding (call 1); the planner grid (calls 4-6: one
    # rank through one_gpu_ranks.py capped at 24 GiB, none_mb1 at 80; no memory saver, compile on).
    *(
        Measured(
            what,
            ov,
            1,
            train,
            load,
            tps,
            "h100",
            False,
            _B + " 12-07 (7)",
            frozen_in_fsdp=False,
            before_auto_defaults=False,
            before_host_lm_head=False,
            before_lora_epilogue=False,
        )
        for what, ov, train, load, tps in (
            ("8B, 1 GPU, the default", {}, 7.68, 4.31, 10446),
            ("8B, 1 GPU, the default, keep o/gate/up every 2", _KEEP2, 7.80, 4.31, 11013),
            ("8B, 1 GPU, host lm_head, micro-batch 4, keep o/gate/up every 2", _HEAD_MB4 | _KEEP2, 8.61, 4.31, 12251),
            *(
                (
                    f"8B, 1 GPU, no saver, AC {mode}, micro-batch {mb}",
                    _GRID | {"activation_checkpoint.mode": mode, "training.micro_batch_size": mb},
                    train,
                    6.27,
                    tps,
                )
                for mode, mb, train, tps in (
                    ("full", 2, 10.12, 9478),
                    ("full", 4, 11.95, 11321),
                    ("full", 8, 15.04, 11555),
                    ("selective", 1, 13.22, 9236),
                    ("selective", 2, 17.80, 12198),
                    ("none", 1, 17.39, 8386),
                )
            ),
        )
    ),
]


@dataclass
class Estimate:
    """What ``estimate`` predicts for one rank (GiB unless named otherwise)."""

    shape: LlamaShape
    ngpu: int
    gpu: dict[str, float]  # phase -> CUDA allocated GiB (recipe.profiling.PHASES)
    host: float  # resident set per rank
    checkpoint_tensor_bytes: int  # all ranks together
    checkpoint_data_bytes: int  # the DCP data files (__r_0.distcp) of all ranks together
    flops_per_token: float
    tokens_per_s: float | None  # per GPU on the card; None without a card
    card: str | None
    card_gib: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak(self) -> float:
        return max(self.gpu[p] for p in PHASES[2:])

    @property
    def load_peak(self) -> float:
        return self.gpu["load"]


# ---------------------------------------------------------------------------
# The job: shape and layout


# Hub repos whose shape is known without their config.json (the configs of train_configs/ name them).
KNOWN_REPOS = {
    "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit": "llama3_1_8b",
    "unsloth/Meta-Llama-3.1-8B-bnb-4bit": "llama3_1_8b",
    "unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit": "llama3_1_70b",
    "unsloth/Llama-3.2-1B-Instruct-bnb-4bit": "llama3_2_1b",
}


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def _reachable() -> bool:
    """The hub answers a TCP connection within 3 s (huggingface_hub itself retries for about 20 s)."""
    from urllib.parse import urlparse

    url = urlparse(_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


@functools.cache
def _hub_config(spec: str) -> tuple[dict | None, str]:
    """(config.json of hub repo ``spec`` or None, how it was found / why not). The hub cache first;
    online, only config.json is fetched (never a weight file)."""
    from models.hub import _offline, parse_repo_spec

    parsed = parse_repo_spec(spec)
    if parsed is None:
        return None, "not a hub repo id"
    repo, revision = parsed
    import huggingface_hub

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed cache reads as "not cached"
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), f"{repo}: config.json from the hub cache"
    if _offline():
        return None, f"{repo}: config.json is not in the hub cache and the hub is offline (HF_HUB_OFFLINE)"
    if not _reachable():
        return None, f"{repo}: config.json is not in the hub cache and {_endpoint()} cannot be reached"
    try:
        path = huggingface_hub.hf_hub_download(repo, "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001 - no network, gated, missing: each says so in its message
        return None, f"{repo}: config.json is not in the hub cache and fetching it failed ({type(e).__name__})"
    return json.loads(Path(path).read_text()), f"{repo}: config.json fetched from the hub"


def job_shape(cfg: JobConfig) -> tuple[LlamaShape, bool, int]:
    """(shape, 4-bit base?, blocksize) from the checkpoint's config.json (a directory, or a hub repo id
    through the hub cache or a fetch of config.json alone), else ``model.synthetic_shape``, else the
    shape of a known hub repo."""
    path = Path(cfg.model.checkpoint) / "config.json"
    hf, why = None, ""
    if cfg.model.checkpoint and path.is_file():
        hf = json.loads(path.read_text())
    elif cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists() and not cfg.model.synthetic_shape:
        hf, why = _hub_config(cfg.model.checkpoint)
        if hf is None and cfg.model.checkpoint.split("@")[0] in KNOWN_REPOS:
            return get_shape(KNOWN_REPOS[cfg.model.checkpoint.split("@")[0]]), True, 64
    if hf is not None:
        q = hf.get("quantization_config") or {}
        if q.get("load_in_4bit"):
            return shape_from_hf_config(hf), True, int(q.get("bnb_4bit_blocksize", 64) or 64)
        return shape_from_hf_config(hf), cfg.model.quant_type != "none", 64
    if cfg.model.synthetic_shape:
        # models.synthetic writes nf4 double-quantized files with blocksize 64.
        return get_shape(cfg.model.synthetic_shape), True, 64
    if why and why != "not a hub repo id":
        raise ConfigError(
            f"cannot estimate without the model's shape: {why}. Do one of: go online (only config.json is "
            f"fetched), `hf download {cfg.model.checkpoint.split('@')[0]} config.json` into the hub cache, or name "
            "a known shape with --model.synthetic_shape=llama3_1_8b (or llama3_1_70b, llama3_2_1b)"
        )
    raise ConfigError(
        f"cannot estimate without the model's shape: {str(path)!r} does not exist and model.synthetic_shape is "
        "empty. Point --model.checkpoint at a directory with config.json, or set --model.synthetic_shape"
    )


def _proj(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """Projection -> (in, out) features."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)} | {
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Job:
    shape: LlamaShape
    quant: bool
    blocksize: int
    n: int  # shard degree
    rank: int
    targets: tuple[str, ...]
    mb: int
    seq: int
    p: int  # bytes of the compute/param dtype
    reduce: int  # bytes of the reduce dtype
    accum: int  # micro-batches per optimizer step per rank
    offload: bool
    act_offload: bool
    ac_mode: str
    ac_every: int
    reshard: bool
    vocab_parallel: bool
    host_embedding: bool
    host_lm_head: bool
    mlp_chunk: int  # model.mlp_chunk_tokens (0: whole sequence)
    replicate: int = 1  # HSDP replicas (parameters whole within a replica of n ranks)
    compile: bool = False
    frozen_local: bool = False  # frozen weights outside FSDP (one shard rank, no CPU offload)
    fused: bool = False  # model.fuse_projections: gate and up dequantize as one matrix
    fsdp: bool = True  # FSDP wraps the blocks (recipe.plan: more than one rank, or what needs it on one)
    keep: tuple[str, ...] = ()  # activation_checkpoint.keep_outputs as recipe.plan resolves it
    keep_every: int = 1
    keep_auto: bool = False  # keep_outputs = 'auto' (recipe.planner decides it again for each layout)
    epilogue: bool = False  # model.lora_epilogue with 4-bit weights (it acts in compiled blocks only)
    epilogue_backward: bool = True  # its backward half (since 2026-12-07, seventh session; see gpu_phases)


def _job(cfg: JobConfig, ngpu: int) -> _Job:
    p = cfg.parallelism
    if ngpu < 1:
        raise ConfigError(f"--ngpu must be >= 1, got {ngpu}")
    rep = p.data_parallel_replicate_degree
    n = p.data_parallel_shard_degree if p.data_parallel_shard_degree > 0 else ngpu // max(rep, 1)
    if rep < 1 or n * rep != ngpu:
        raise ConfigError(
            f"parallelism: replicate {rep} x shard {n} != --ngpu {ngpu}; set "
            "--parallelism.data_parallel_shard_degree=-1 or an --ngpu that is their product"
        )
    t = cfg.training
    gb = t.global_batch_size if t.global_batch_size > 0 else t.micro_batch_size * ngpu
    if gb % (t.micro_batch_size * ngpu):
        raise ConfigError(
            f"training.global_batch_size {gb} is not a multiple of micro_batch_size x ranks = "
            f"{t.micro_batch_size * ngpu}; set --training.global_batch_size to such a multiple"
        )
    shape, quant, blocksize = job_shape(cfg)
    # 'auto' as recipe.plan decides it on CUDA for this many ranks.
    act_offload = resolve_ac_offload(cfg, "cuda", ngpu).on
    compiled = resolve_compile(cfg, "cuda").on
    keep = resolve_keep_outputs(cfg, "cuda", ngpu, act_offload, compiled)
    return _Job(
        shape=shape,
        quant=quant,
        blocksize=blocksize,
        n=n,
        rank=cfg.lora.rank,
        targets=tuple(cfg.lora.target_modules),
        mb=t.micro_batch_size,
        seq=cfg.data.seq_len,
        p=DTYPES[t.mixed_precision_param].itemsize,
        reduce=DTYPES[t.mixed_precision_reduce].itemsize,
        accum=gb // (t.micro_batch_size * ngpu),
        offload=p.cpu_offload,
        act_offload=act_offload,
        ac_mode=cfg.activation_checkpoint.mode,
        ac_every=cfg.activation_checkpoint.selective_every,
        reshard=p.reshard_after_forward,
        vocab_parallel=p.vocab_parallel_embedding and n > 1 and not shape.tie_word_embeddings,
        host_embedding=resolve_host_embedding(cfg, "cuda", ngpu, shape.tie_word_embeddings).on,
        host_lm_head=resolve_host_lm_head(cfg, "cuda", ngpu, shape.tie_word_embeddings).on,
        mlp_chunk=cfg.model.mlp_chunk_tokens,
        replicate=rep,
        # As recipe.plan decides it for a CUDA run ('auto': on); step_time uses the compiled fit only on
        # the cards where compile was measured (memory is the same either way).
        compile=compiled,
        frozen_local=n == 1 and not p.cpu_offload,
        fused=cfg.model.fuse_projections,
        fsdp=needs_fsdp(cfg, ngpu),
        keep=keep.names,
        keep_every=keep.every,
        keep_auto=cfg.activation_checkpoint.keep_outputs == ["auto"],
        epilogue=cfg.model.lora_epilogue and quant is not None,  # counted only where compile is on
    )


# ---------------------------------------------------------------------------
# Bytes


def _lora_params(j: _Job, per_rank: bool) -> int:
    """LoRA parameters of the model; per rank: this rank's rows of each (FSDP shards dim 0)."""
    d = 1 if not per_rank else j.n
    per_layer = sum(
        _cdiv(j.rank, d) * i + _cdiv(o, d) * j.rank for name, (i, o) in _proj(j.shape).items() if name in j.targets
    )
    return j.shape.num_hidden_layers * per_layer if j.rank else 0


def _block_base_bytes(j: _Job, shard: int) -> int:
    """One block's frozen projections, rows padded to a multiple of ``shard`` (4-bit) and split ``shard`` ways."""
    total = 0
    for i, o in _proj(j.shape).values():
        rows = _cdiv(o, shard)
        if j.quant:  # packed codes + expanded fp32 block scales (pad_4bit_rows) + the 16-entry fp32 code book
            total += rows * i // 2 + rows * (i // j.blocksize) * 4 + 64
        else:
            total += rows * i * j.p
    return total


def _static_bytes(j: _Job) -> int:
    """One rank's GPU shards after load: base, embeddings, norms, LoRA (fp32)."""
    s, n = j.shape, j.n
    # lm_head's matrix (unless it waits on the host) and the embedding table (unless tied or on the host)
    tables = (0 if j.host_lm_head else 1) + (0 if s.tie_word_embeddings or j.host_embedding else 1)
    norms = (2 * s.num_hidden_layers + 1) * _cdiv(s.hidden_size, n) * j.p
    return (
        s.num_hidden_layers * _block_base_bytes(j, n)
        + tables * _cdiv(s.vocab_size, n) * s.hidden_size * j.p
        + norms
        + 4 * _lora_params(j, per_rank=True)
    )


def _block_saved_bytes(
    j: _Job, tokens: int, attention_only: bool = False, compiled: bool = False, gqa: bool = True
) -> int:
    """Tensors autograd saves for one block's backward when it is not checkpointed (from models/llama.py):
    2 RMSNorms (fp32 input + the normalised value), q/k and their rotated halves, GQA-expanded k/v, the
    attention output and its transposed copy, gate/up/silu/product of the MLP (of one chunk with
    ``model.mlp_chunk_tokens``: the chunks are checkpointed). ``attention_only``: what is left when the
    backward reaches the attention (the MLP's and the second norm's tensors are freed by then).
    ``compiled``: a compiled block kept whole (no checkpointing): AOTAutograd's min-cut partition saves
    the two norms' outputs, q, k and v as SDPA reads them, its output and lse, o_proj's input, and gate's
    and up's outputs with their product (down_proj's input), recomputing the norms' fp32 internals and
    silu in backward: what a compiled debug-shape block saves on CPU (7,620 bytes per token against
    7,456 counted, tests/test_estimate.py); for the 8B workload 131 KB per token against the 160 KB of the eager
    count. ``gqa``: k and v are kv-wide (the CUDA causal path's kernels group the heads), else expanded
    to every query head (CPU, or a mask tensor)."""
    s, p = j.shape, j.p
    h, i, kv = s.hidden_size, s.intermediate_size, s.num_key_value_heads * s.head_dim
    if compiled and not attention_only:
        k_v = 2 * (kv if gqa else h)
        return tokens * (p * (5 * h + k_v) + 4 * s.num_attention_heads) + _mlp_tokens(j, tokens) * 3 * p * i
    if attention_only:
        return tokens * ((4 + p) * h + 2 * p * (h + kv) + 2 * p * h + 2 * p * h)
    return tokens * (2 * (4 + p) * h + 2 * p * (h + kv) + 2 * p * h + 2 * p * h) + _mlp_tokens(j, tokens) * 4 * p * i


def _mlp_tokens(j: _Job, tokens: int) -> int:
    return min(tokens, j.mlp_chunk) if j.mlp_chunk else tokens


def _block_work_bytes(j: _Job, tokens: int, backward: bool) -> int:
    """Transient memory inside one block: MLP intermediates (gate, up, silu(gate) and their gradients in
    backward), the dequantized weight of the largest projection (gate and up together when fused), the
    block's gradient in and out."""
    s, p = j.shape, j.p
    h, i = s.hidden_size, s.intermediate_size
    deq = (2 if j.fused else 1) * i * h * p if j.quant else 0
    t_mlp = _mlp_tokens(j, tokens)
    if not backward:
        return t_mlp * 3 * p * i + deq
    block_lora = _lora_params(j, per_rank=False) // s.num_hidden_layers
    return t_mlp * 3 * p * i + tokens * 2 * p * h + deq + block_lora * (p + j.reduce)


def _attn_bwd_bytes(j: _Job, tokens: int) -> int:
    """SDPA backward on the causal path: dq, dk and dv for every query head (the GQA kernels sum dk/dv
    over the group afterwards), the fp32 dq accumulator of the flash / memory-efficient kernels, and
    the contiguous gradient of the attention output."""
    hq = j.shape.num_attention_heads * j.shape.head_dim
    return tokens * hq * (4 * j.p + 4)


def _loss_work_bytes(j: _Job, tokens: int, backward: bool) -> int:
    """One cross-entropy chunk (models.llama.chunked_cross_entropy): logits in p and fp32, log-softmax;
    backward adds their gradients and the gradient of the final hidden states."""
    v = j.shape.vocab_size
    chunk = min(tokens, max(256, 2**26 // v))
    if not backward:
        return chunk * v * (j.p + 8)
    return chunk * v * (2 * j.p + 12) + tokens * j.shape.hidden_size * j.p


def _checkpointed_blocks(j: _Job) -> int:
    L = j.shape.num_hidden_layers
    return {"full": L, "selective": math.ceil(L / j.ac_every), "none": 0}[j.ac_mode]


def _kept(j: _Job, tokens: int) -> tuple[int, int]:
    """(blocks that keep outputs, bytes one such block keeps): activation_checkpoint.keep_outputs (where
    they wait: ``_kept_offloaded``)."""
    if not j.keep:
        return 0, 0
    width = sum(o for name, (_, o) in _proj(j.shape).items() if name in j.keep)
    return math.ceil(_checkpointed_blocks(j) / j.keep_every), tokens * width * j.p


def _kept_offloaded(j: _Job) -> bool:
    return kept_outputs_on_host(j.act_offload, j.compile)


def gpu_phases(j: _Job) -> dict[str, float]:
    """GiB per phase of the memory report, one rank."""
    s = j.shape
    L, h, v = s.num_hidden_layers, s.hidden_size, s.vocab_size
    T = j.mb * j.seq
    lora_rank_bytes = 4 * _lora_params(j, per_rank=True)
    static = 0 if j.offload else _static_bytes(j)
    adam = 0 if j.offload else 2 * lora_rank_bytes
    grads = 0 if j.offload else lora_rank_bytes
    exact = 8 * _lora_params(j, per_rank=False) if j.reduce == 8 else 0  # unsharded fp64 accumulators
    # Between steps; in a step also the gradients of earlier micro-batches.
    resident = static + adam + exact + (grads if j.accum > 1 else 0)
    # One shard rank without CPU offload: frozen weights stay out of FSDP (parallel.parallelize.
    # frozen_params_left_local) and are used in place: no gathered copy of lm_head, the embedding or a
    # block's 4-bit bytes.
    local = j.frozen_local
    head = 0 if local or j.host_lm_head else v * h * j.p  # the root group stays gathered from forward to backward
    if j.offload and not j.host_lm_head:
        head += _cdiv(v, j.n) * h * j.p  # its shard, copied to the GPU for the all-gather
    # parallelism.host_lm_head: lm_head's device copy, from the forward's start to the loss's backward.
    head_copy = v * h * j.p if j.host_lm_head else 0
    emb = 0 if (s.tie_word_embeddings or j.vocab_parallel or j.host_embedding or local) else v * h * j.p
    block = (0 if local else _block_base_bytes(j, 1)) + _lora_params(j, per_rank=False) // L * j.p
    gathered = (L if not j.reshard else 2) * block
    n_ck = _checkpointed_blocks(j)
    ck_in = (2 if j.act_offload else n_ck) * T * h * j.p
    saved = ck_in + (L - n_ck) * _block_saved_bytes(j, T, compiled=j.compile)
    n_keep, kept = _kept(j, T)
    # Kept outputs: on the host, and on the GPU at the backward peak those of the block being
    # differentiated (measured on one H100, 2026-12-07 fifth session: keeping up_proj added 0.21 GiB with
    # keep_every 1 and 0.22 with 2, one block's 0.22; the next block's prefetch lands after the peak);
    # else all of them.
    saved += kept if _kept_offloaded(j) else n_keep * kept
    # Final norm: fp32 input + output (hidden-shaped: activation offload moves them to the host too).
    root_act = 0 if j.act_offload else T * h * (4 + 2 * j.p)
    w, wl = _WORK_SCALE, _LOSS_SCALE
    # World > 1: FSDP copies each group's all-gather output into the parameters and, in forward, frees
    # that output only at the next group's copy-out, so the root's output, the embedding's output and
    # its copy coexist at the start. One rank copies the shard into the parameter directly.
    start = (2 * emb + v * h * j.p * (j.n > 1)) if emb else 0
    fwd = max(
        start,
        saved + root_act + wl * _loss_work_bytes(j, T, False) + head_copy,
        saved + gathered + w * _block_work_bytes(j, T, False) + head_copy,
    )
    recompute = _block_saved_bytes(j, T) if n_ck else 0
    # Two moments of a block's backward: its MLP (the (tokens x intermediate) working set, scaled) and
    # its attention (the kernel's gradients, counted whole: no double count at long sequences).
    # Compiled blocks hold more (tokens x intermediate) tensors in the MLP's backward than eager does
    # (inductor's partition saves what eager recomputes, and its fused backward keeps gradients of gate and
    # up together). Fitted to how the compiled default's peak grows with the micro-batch (one H100,
    # 2026-12-07: 8.54 -> 9.82 GiB from micro-batch 2 to 4; in the fifth session 8.57 at micro-batch 2 and
    # 8.85 at 4 with lm_head on the host): about six such tensors (0.42 GiB per 4,096 tokens more than the
    # two counted before, which left every compiled micro-batch-4 row 9.6-10.2 % under its measured peak).
    # With the adapters' products added inside the frozen GEMMs' outputs (model.lora_epilogue), gate's and
    # up's adapter products are no separate tensors: four (measured at micro-batch 4 on one H100,
    # 2026-12-07, sixth session: 8.85 -> 8.34 GiB, and 9.35 -> 8.85 keeping o/gate/up every second block).
    # Its backward half accumulates down_proj's input gradient through the adapter into the frozen one: three
    # (measured in the seventh session, micro-batch 4 with kept outputs: 8.85 -> 8.61 GiB, one such tensor).
    n_mlp = (3 if j.epilogue_backward else 4) if j.epilogue else 6
    compiled = n_mlp * _mlp_tokens(j, T) * j.p * s.intermediate_size if j.compile else 0
    mlp_moment = w * (recompute + _block_work_bytes(j, T, True)) + compiled
    attn_moment = (
        (_block_saved_bytes(j, T, attention_only=True) if n_ck else 0) + T * 2 * j.p * h + _attn_bwd_bytes(j, T)
    )
    bwd = saved + root_act + max(wl * _loss_work_bytes(j, T, True) + head_copy, gathered + max(mlp_moment, attn_moment))
    # foreach AdamW: one temporary the size of the parameter list
    opt = static + adam + grads + exact + (lora_rank_bytes if not j.offload else 0)
    gib = lambda x: x / _GIB
    return {
        "load": gib(static),
        "after_load": gib(static),
        "forward_peak": gib(resident + head + fwd),
        "backward_peak": gib(resident + head + bwd),
        "optimizer_peak": gib(opt),
        "after_optimizer": gib(static + adam),
    }


# Host resident set per rank, fitted to the 8B runs on H200 (BENCHMARKS.md: 7.93 / 5.55 / 4.21 GiB on
# 1 / 2 / 4 GPUs): a CUDA process with torch + bitsandbytes loaded, plus 0.76 x the rank's shard (the
# safetensors pages its row reads mapped). CPU processes: 0.3 GiB measured with the debug model.
_HOST_BASE_GIB = {"cuda": 3.2, "cpu": 0.3}
_HOST_MAPPED = 0.76


def host_gib(j: _Job, device: str) -> float:
    shard = _static_bytes(j)
    lora = 4 * _lora_params(j, per_rank=True)
    on_host = _HOST_MAPPED * shard
    if j.offload or device == "cpu":  # the shards, gradients and AdamW state live in host memory
        on_host += shard + 3 * lora
    if j.act_offload:  # pinned copies of the checkpointed blocks' inputs of one micro-batch
        on_host += _checkpointed_blocks(j) * j.mb * j.seq * j.shape.hidden_size * j.p
        if _kept_offloaded(j):  # and of the kept outputs
            n_keep, kept = _kept(j, j.mb * j.seq)
            on_host += n_keep * kept
    if j.host_embedding:  # the whole table, pinned, on every rank
        on_host += j.shape.vocab_size * j.shape.hidden_size * j.p
    if j.host_lm_head:  # lm_head's matrix, pinned, on every rank
        on_host += j.shape.vocab_size * j.shape.hidden_size * j.p
    return _HOST_BASE_GIB[device] + on_host / _GIB


# ---------------------------------------------------------------------------
# Speed (the step-time model: see recipe/planner.py's docstring)

# Per card: GPU-time efficiency factor against the H100/H200 fit (the clock a card sustains under load),
# all-gather cost in seconds per GiB received by a rank (exposed: not hidden behind compute), host link in
# GB/s (pinned copies: activation / CPU offload), and whether the host overhead hides behind the GPU.
#  - h100 / h200 / a100: 0.023 s/GiB fitted to the 2- and 4-GPU H200 rows (0.020 and 0.026 each; NVLink,
#    the gathers share the SMs with compute); host link 25 GB/s.
#  - l4 / t4: PCIe without NVLink; Kaggle's T4s have no peer-to-peer, so every byte goes GPU -> host -> GPU
#    (PCIe 3.0 x16, about 12 GB/s each way, both directions on one host): 5 GiB/s effective, not hidden
#    (assumed, not measured). A T4 sustains about 0.75 of its boost clock under its 70 W cap (assumed,
#    from the card's 585-1590 MHz range under tensor load; not measured here).
# Host copy bandwidth, one way, GB/s, where measured: the H100's PCIe 5 moved 33.5 MB block inputs in
# 646 us (the profile of 2026-12-07); the H200 is assumed the same. Elsewhere _LINK's host figure.
_COPY_GBPS = {"h100": 52.0, "h200": 52.0}
_LINK = {
    "h200": (1.0, 0.023, 25.0, False),
    "h100": (1.0, 0.023, 25.0, False),
    "a100": (1.0, 0.023, 25.0, False),
    "l4": (0.9, 0.10, 20.0, True),
    "t4": (0.75, 0.20, 10.0, True),
}

# Fitted to the 1-GPU rows of recipe.estimate.CALIBRATION (``python -m recipe.estimate --calibration``
# prints predicted against measured): eager: the efficiencies E (dense matmul work) and E_attn (causal
# attention) and the host seconds per block per micro-batch C solve the three H100 rows at 4,096 / 32,768 /
# 65,536 tokens per micro-batch (6,329 / 4,867 / 3,611 tokens/s) exactly. compile: C taken as 0 (a compiled
# block launches few kernels), E from the tree that runs one rank without FSDP (H100, 2026-12-07: 10,460
# tokens/s; the earlier tree's 9,099 H200 / 9,664 H100 gave 0.46). Activation offload: seconds per GiB
# copied (both ways), on a 25 GB/s host link: eager from the lean rows (6,764 vs 6,909); compiled from the
# default (compile + host embedding + activation offload) at 10,393 against 10,460 in one call (8 GiB copied
# per step: 0.0013 s/GiB; the earlier tree's 0.043, whose copies did not overlap, is gone). Without FSDP's
# per-block hooks eager's host time hides behind the GPU: eager at 7,682 is the compute term alone, so C
# counts only where FSDP runs. The FLOP count (recipe.metrics) leaves down_proj's frozen matmul out of
# the recompute since 2026-12-07 (fourth session): a compiled block's partition never re-ran it (its output
# is not needed in backward; the H100 profile's 20 dequantizations per block and micro-batch), so compile's
# E is refitted to the same 10,460 tokens/s with the smaller count (0.515 -> 0.473), and again (0.504) when
# the dequantization became a term of its own (``_DEQUANT_BPS``, sixth session); eager re-ran it until
# models/lora.py ran the adapter first, so its E (fitted on those runs with the count that was right for
# them) now predicts the current eager code about 8 % faster than the eager rows measured: unmeasured.
# host_floor (compiled, seconds per block per micro-batch): the host's own work for a micro-batch (the
# compiled graphs' calls, the 4-bit operators' Python), hidden behind the GPU unless the GPU's work for it is
# shorter. Fitted to the planner grid's two micro-batch-1 rows (H100, seventh session: AC none 8,386 and
# selective 9,236 tokens/s, -5 % and +5 %; without it the model put AC none at micro-batch 1 at 13,176 and
# the planner chose it); it leaves every micro-batch-2+ row as it was.
SPEED_FIT = {
    "eager": {"E": 0.373, "E_attn": 0.475, "C": 0.00355, "offload_s_per_gib": 0.0064},
    "compile": {"E": 0.504, "E_attn": 0.475, "C": 0.0, "offload_s_per_gib": 0.0013, "host_floor": 0.0073},
}
# The cards where compiled runs were measured; elsewhere (t4, l4, a100) a compiled run is estimated at
# eager's speed until measured there.
COMPILE_MEASURED_ON = ("h100", "h200")
# Compiled blocks' dequantization, apart from the FLOPs term because it is paid per micro-batch, not per
# token: bitsandbytes' kernel writes every 4-bit weight out in the compute dtype for the forward, the
# recompute (down_proj's output is not needed in backward) and the backward's input gradient, 20 times
# per block and micro-batch in the H100 profile (0.094 s of a micro-batch-2 x 4 step: about 2.1 TB/s
# read and written). Without it the model gave micro-batch 4 the speed of 2 (its rows 6-7 % under the
# measured gain). The H200 is assumed to scale with its HBM (4.8 against 3.35 TB/s).
_DEQUANT_BPS = {"h100": 2.1e12, "h200": 3.0e12}
# CPU offload (not measured on a GPU): the rank's parameter shards are copied to the GPU for every
# all-gather, and AdamW runs on the host at about 1 G parameters/s (assumed).
_HOST_ADAM_PARAMS_PER_S = 1e9


def _dequant_bytes(j: _Job) -> float:
    """Bytes the dequantization kernel moves per micro-batch (4-bit read, compute dtype written): every
    block's projections twice (forward, input gradient), the checkpointed blocks' once more but down_proj
    and, in the blocks that keep them, the kept projections."""
    if not j.quant:
        return 0.0
    w = {name: i * o for name, (i, o) in _proj(j.shape).items()}
    block = sum(w.values())
    recomputed = (block - w["down_proj"]) * _checkpointed_blocks(j)
    recomputed -= _kept(j, 0)[0] * sum(w[name] for name in j.keep if name in w and name != "down_proj")
    return (2 * block * j.shape.num_hidden_layers + recomputed) * (j.p + 0.5)


def step_time(j, card: str, ngpu: int) -> tuple[float, dict[str, float], float]:
    """(seconds per optimizer step, seconds by cause, GB moved between GPUs per rank per step)."""
    s = j.shape
    L, h = s.num_hidden_layers, s.hidden_size
    T = j.mb * j.seq
    clock, gather_s, host_gbps, hides = _LINK[card]
    copy_bps = _COPY_GBPS.get(card, host_gbps) * 1e9  # pinned host <-> device, one way
    peak = dict(PEAK_FLOPS)[CARDS[card][0]]
    fit = SPEED_FIT["compile" if j.compile and card in COMPILE_MEASURED_ON else "eager"]
    f = model_flops_per_token(s, j.seq, j.rank, j.targets, j.ac_mode, j.ac_every, kept=j.keep, keep_every=j.keep_every)
    attn = 4 * L * j.seq * s.num_attention_heads * s.head_dim * (3 + ac_fraction(L, j.ac_mode, j.ac_every))
    dense = f - attn
    parts = {"compute": j.accum * T * (dense / fit["E"] + 0.5 * attn / fit["E_attn"]) / (peak * clock)}
    if fit is SPEED_FIT["compile"]:
        parts["dequant"] = j.accum * _dequant_bytes(j) / _DEQUANT_BPS[card]
    # Python launching each block's kernels; on a slow card (t4, l4) they queue ahead of the GPU instead.
    parts["host"] = 0.0 if hides or not j.fsdp else j.accum * L * fit["C"]
    if fit.get("host_floor") and not hides:
        # Compiled blocks: the host's work per micro-batch hides behind the GPU's unless the micro-batch is
        # the shorter of the two (micro-batch 1 at seq 2048 on an H100).
        gpu = (parts["compute"] + parts.get("dequant", 0.0)) / j.accum
        parts["host"] += j.accum * max(0.0, L * fit["host_floor"] - gpu)
    n, v = j.n, s.vocab_size
    base = L * _block_base_bytes(j, 1)
    emb = 0 if (s.tie_word_embeddings or j.host_embedding or j.vocab_parallel) else v * h * j.p
    head = 0 if j.host_lm_head else v * h * j.p
    gathered_per_mb = ((2 if j.reshard else 1) * base + emb + head) * (n - 1) / n if n > 1 else 0.0
    lora = 4 * _lora_params(j, per_rank=False)
    grads = lora * (n - 1) / n + (2 * lora / n * (j.replicate - 1) / j.replicate if j.replicate > 1 else 0)
    traffic = j.accum * gathered_per_mb * (2 if n > 1 else 0) / 2 + grads  # received + sent, per rank
    parts["all-gather"] = j.accum * gathered_per_mb / _GIB * gather_s
    parts["gradients"] = grads / _GIB * gather_s
    if j.act_offload:
        n_keep, kept = _kept(j, T)
        moved = 2 * (_checkpointed_blocks(j) * T * h * j.p + (n_keep * kept if _kept_offloaded(j) else 0))
        overlapped = j.accum * moved / _GIB * fit["offload_s_per_gib"] * 25.0 / host_gbps
        # The device-to-host copies of a micro-batch hide behind its forward (about a third of the
        # compute with full checkpointing: forward, recompute, backward) only while the link keeps up.
        exposed = j.accum * moved / 2 / copy_bps - parts["compute"] / 3
        parts["act. offload"] = max(overlapped, exposed)
    if j.host_lm_head:  # one copy per micro-batch, behind its forward (a third of the compute)
        parts["host lm_head"] = max(0.0, j.accum * v * h * j.p / copy_bps - parts["compute"] / 3)
    if j.offload:
        shard = (L * _block_base_bytes(j, n) + 2 * v * h * j.p / n) * (2 if j.reshard else 1)
        parts["cpu offload"] = j.accum * shard / (host_gbps * 1e9) + _lora_params(j, True) / _HOST_ADAM_PARAMS_PER_S
    return sum(parts.values()), parts, traffic / 1e9


# ---------------------------------------------------------------------------
# Checkpoint size


def checkpoint_tensors(j: _Job, ngpu: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor chunk that ``recipe/checkpoint`` writes (all ranks): each rank's rows of every LoRA
    parameter and of its exp_avg / exp_avg_sq (fp32), and one AdamW ``step`` scalar per parameter (the
    same on every rank, so DCP writes it once). Rows are split over the shard degree; replicas of HSDP
    hold the same rows and DCP keeps one copy."""
    out: list[tuple[tuple[int, ...], torch.dtype]] = []
    for name, (i, o) in _proj(j.shape).items():
        if name not in j.targets or not j.rank:
            continue
        for rows, cols in ((j.rank, i), (o, j.rank)):  # lora_A (r, in), lora_B (out, r)
            c = _cdiv(rows, j.n)
            chunks = [(min(c, rows - k * c), cols) for k in range(j.n) if k * c < rows]
            for _ in range(j.shape.num_hidden_layers):
                out += [(ch, torch.float32) for ch in chunks] * 3
                out.append(((), torch.float32))
    return out


def _saved_len(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def checkpoint_bytes(j: _Job, cfg: JobConfig, ngpu: int) -> tuple[int, int]:
    """(tensor bytes, DCP data-file bytes) of one training checkpoint, all ranks together.

    DCP stores every item with ``torch.save``: the file bytes are found by saving a zero tensor of each
    distinct chunk shape (exact, a few ms) and the optimizer's hyperparameters as this torch's AdamW holds
    them. The ``trainer`` entry (step, scheduler, scaler, data position) is a JSON text of a few hundred
    bytes, counted with a representative value."""
    tensors = checkpoint_tensors(j, ngpu)
    payload = sum(math.prod(shape) * dt.itemsize for shape, dt in tensors)
    sizes: dict[tuple, int] = {}
    data = 0
    for shape, dt in tensors:
        if shape not in sizes:
            sizes[shape] = _saved_len(torch.zeros(shape, dtype=dt))
        data += sizes[shape]
    from recipe.optim import build_lr_scheduler, build_optimizer

    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optimizer)
    build_lr_scheduler(opt, cfg.lr_scheduler, max(cfg.training.steps, 1))
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    n_params = sum(1 for shape, _ in tensors if shape == ())
    data += n_params * sum(_saved_len(v) for v in group.values())
    data += _saved_len(json.dumps({"step": cfg.training.steps, "scheduler": {}, "scaler": {}, "loader": {}}))
    return payload, data


# ---------------------------------------------------------------------------
# The estimate


def estimate(cfg: JobConfig, ngpu: int, card: str | None = None, device: str = "cuda") -> Estimate:
    """Predict one rank's memory, the checkpoint size and (with ``card``) tokens/s per GPU."""
    if card is not None and card not in CARDS:
        raise ConfigError(f"unknown card {card!r}; known cards: {', '.join(CARDS)} (or leave --card out)")
    j = _job(cfg, ngpu)
    flops = model_flops_per_token(
        j.shape, j.seq, j.rank, j.targets, j.ac_mode, j.ac_every, kept=j.keep, keep_every=j.keep_every
    )
    tps, card_gib, notes = None, None, []
    if card is not None:
        card_gib = CARDS[card][1]
        step, _, _ = step_time(j, card, ngpu)
        tps = j.accum * j.mb * j.seq / step
        if j.offload:
            notes.append("tokens/s: CPU offload's copies and host AdamW are assumed, not measured (recipe.planner)")
    payload, data = checkpoint_bytes(j, cfg, ngpu)
    return Estimate(
        shape=j.shape,
        ngpu=ngpu,
        gpu=gpu_phases(j),
        host=host_gib(j, device),
        checkpoint_tensor_bytes=payload,
        checkpoint_data_bytes=data,
        flops_per_token=flops,
        tokens_per_s=tps,
        card=card,
        card_gib=card_gib,
        notes=notes,
    )


def _peak(cfg: JobConfig, ngpu: int) -> float:
    return max(gpu_phases(_job(cfg, ngpu)).values())


def _largest(cfg: JobConfig, ngpu: int, gib: float, section, key: str, hi: int) -> int:
    """Largest value of ``section.key`` in [1, hi] whose peak fits under ``gib`` (0: none). The peak
    grows with both micro-batch and sequence length, so a bisection finds it."""
    old = getattr(section, key)
    try:
        lo, top = 0, hi
        while lo < top:
            mid = (lo + top + 1) // 2
            setattr(section, key, mid)
            if _peak(cfg, ngpu) <= gib:
                lo = mid
            else:
                top = mid - 1
        return lo
    finally:
        setattr(section, key, old)


def fit(cfg: JobConfig, ngpu: int, gib: float) -> dict[str, int]:
    """The largest micro-batch (at ``data.seq_len``) and the largest seq_len (at the micro-batch) under ``gib``.

    The global batch follows the micro-batch (no accumulation) while searching it."""
    t = cfg.training
    gb = t.global_batch_size
    t.global_batch_size = -1
    try:
        mb = _largest(cfg, ngpu, gib, t, "micro_batch_size", 4096)
        seq = _largest(cfg, ngpu, gib, cfg.data, "seq_len", 1 << 24)
    finally:
        t.global_batch_size = gb
    return {"micro_batch_size": mb, "seq_len": seq}


def format_estimate(e: Estimate) -> str:
    lines = [
        f"estimate for {e.ngpu} rank(s), per rank (GiB; gpu = CUDA allocated, as the memory report measures it)",
        "  ".join(f"{p}={e.gpu[p]:.2f}" for p in PHASES),
        f"load peak {e.load_peak:.2f} GiB, training peak {e.train_peak:.2f} GiB, host {e.host:.2f} GiB per rank",
        f"checkpoint: {e.checkpoint_tensor_bytes:,} tensor bytes, {e.checkpoint_data_bytes:,} bytes of DCP data files "
        f"({e.checkpoint_data_bytes / 1e9:.3f} GB)",
        f"model FLOPs per token: {e.flops_per_token / 1e9:.2f} G",
    ]
    if e.tokens_per_s is not None:
        lines.append(f"tokens/s per GPU on {e.card}: {e.tokens_per_s:,.0f} (card memory {e.card_gib:.1f} GiB)")
        if e.train_peak > e.card_gib:
            lines.append(f"does NOT fit on {e.card}: training peak {e.train_peak:.2f} > {e.card_gib:.1f} GiB")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def warn_if_too_big(cfg: JobConfig, ngpu: int, device_gib: float) -> str | None:
    """The one warning line the entry point logs when the predicted peak exceeds the device, else None."""
    try:
        e_gpu = gpu_phases(_job(cfg, ngpu))
    except (ConfigError, ValueError, OSError):  # the entry point reports bad input itself, later
        return None
    peak_phase = max(e_gpu, key=e_gpu.get)
    peak = e_gpu[peak_phase]
    if peak <= device_gib:
        return None
    return (
        f"warning: predicted {peak_phase} {peak:.2f} GiB per rank exceeds the device's {device_gib:.2f} GiB "
        "(recipe.estimate); lower training.micro_batch_size or data.seq_len, or set "
        "activation_checkpoint.mode=full, parallelism.cpu_offload=true, or use more GPUs"
    )


def measured_job(r: Measured, cfg: JobConfig) -> _Job:
    """The estimator's job for a measured row, in the layout of the tree that measured it."""
    j = _job(cfg, r.ngpu)
    if r.before_epilogue_backward:
        j = dataclasses.replace(j, epilogue_backward=False)
    return dataclasses.replace(j, frozen_local=False, fsdp=True) if r.frozen_in_fsdp else j


def calibration_table() -> str:
    """Markdown rows: every measured run of CALIBRATION against the estimate (memory and tokens/s)."""
    root = Path(__file__).resolve().parents[2] / "train_configs"
    out = [
        "| run | card | N | fitted | train peak GiB: est. / measured | load GiB | tokens/s/GPU: est. / measured |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in CALIBRATION:
        args = ["--job.config_file", str(root / r.config), "--model.checkpoint=/nonexistent/estimate"]
        cfg = load_config(args + [f"--{k}={v}" for k, v in r.job_overrides.items()])
        j = measured_job(r, cfg)
        g = gpu_phases(j)
        peak = max(g[p] for p in PHASES[2:])
        step, _, _ = step_time(j, r.card, r.ngpu)
        tps = j.accum * j.mb * j.seq / step

        def pair(est, meas, fmt):
            if meas is None:
                return f"{est:{fmt}} / -"
            return f"{est:{fmt}} / {meas:{fmt}} ({100 * (est / meas - 1) if meas else 0:+.1f} %)"

        speed = pair(tps, r.tokens_per_s, ",.0f") if r.tokens_per_s else "-"
        load = pair(g["load"], r.load, ".2f") if r.load is not None else "-"
        fitted = "memory" if r.fitted else "no"
        out.append(f"| {r.what} | {r.card} | {r.ngpu} | {fitted} | {pair(peak, r.train, '.2f')} | {load} | {speed} |")
    return "\n".join(out)


def device_memory_gib(device) -> float:
    """What this process may allocate on a CUDA device: its memory x the per-process memory fraction
    (``torch.cuda.set_per_process_memory_fraction``, which a job sharing one GPU between ranks sets)."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return total * (get_fraction(device) if get_fraction else 1.0)


def memory_warning(cfg: JobConfig, world: int, device) -> str | None:
    """The estimator's warning before loading (CUDA only: on CPU nothing is allocated on a device)."""
    if device.type != "cuda":
        return None
    return warn_if_too_big(cfg, world, device_memory_gib(device))
