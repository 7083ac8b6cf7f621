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
* tokens/s per GPU on ``--card``: its dense bf16 peak (``recipe.metrics.PEAK_FLOPS``) x a measured
  model-FLOPs utilisation (``MFU``) / ``recipe.metrics.model_flops_per_token``.

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

import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.dtypes import DTYPES
from models.shapes import LlamaShape, get_shape, shape_from_hf_config
from recipe.config import ConfigError, JobConfig, load_config
from recipe.metrics import PEAK_FLOPS, model_flops_per_token
from recipe.profiling import PHASES

__all__ = ["CARDS", "CALIBRATION", "Estimate", "estimate", "fit", "checkpoint_tensors", "main", "memory_warning"]

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

# Model-FLOPs utilisation per GPU by number of GPUs, measured on H200 (BENCHMARKS.md, 4x H200 call: 8B
# shape, seq 2048, micro-batch 2, full AC, eager): 6,958 / 5,494 / 4,838 tokens/s/GPU on 1 / 2 / 4 GPUs
# x 50.65 GFLOP/token / 989 TFLOP/s. Other cards are assumed to reach the same fraction (not measured);
# small micro-batches are overhead-bound and slower (1B, seq 512, micro-batch 1: 1.4 %), CPU offload and
# gloo are not covered. More than 4 GPUs use the 4-GPU figure.
MFU = {1: 0.356, 2: 0.281, 4: 0.248}

# Scale the counted working sets to the caching allocator's peaks: the pair that minimises the largest
# relative error over CALIBRATION (a grid over 0.2-1.6 in steps of 0.05; max error 2.3 %). What is
# counted double-counts tensors the allocator frees early (silu's input, the fp32 logits).
_WORK_SCALE = 0.6  # block recompute / backward and the embedding-free phases
_LOSS_SCALE = 0.7  # the cross-entropy chunk

# (description, overrides of llama3_8b_qlora.toml, ngpu, measured train peak GiB, measured load peak GiB)
# on H200, from shared/REFERENCE.md section 0 and BENCHMARKS.md; tests/test_estimate.py checks the
# estimator against every row.
_1B = {
    "model.synthetic_shape": "llama3_2_1b",
    "data.seq_len": 512,
    "training.micro_batch_size": 1,
    "training.global_batch_size": 6,
    "training.mixed_precision_reduce": "float64",
}
_LEAN = {"activation_checkpoint.offload": True, "parallelism.host_embedding": True}
CALIBRATION: list[tuple[str, dict, int, float, float]] = [
    ("8B, 1 GPU", {}, 1, 11.32, 6.27),
    ("8B, 2 GPUs", {}, 2, 8.04, 3.12),
    ("8B, 2 GPUs, vocab_parallel_embedding", {"parallelism.vocab_parallel_embedding": True}, 2, 7.39, 3.12),
    ("8B, 2 GPUs, cpu_offload", {"parallelism.cpu_offload": True}, 2, 4.47, 0.0),
    # Measured after the two constants were fitted (BENCHMARKS.md, second session of 2026-12-01): the
    # model of activation offload and the host embedding, not a fit.
    ("8B, 1 GPU, activation offload + host embedding", _LEAN, 1, 9.35, 5.29),
    ("8B, 2 GPUs, activation offload + host embedding", _LEAN, 2, 5.25, 2.63),
    ("1B det (seq 512, mb 1, fp64 reduce), 1 GPU", _1B, 1, 3.17, 1.17),
    ("1B det, 2 ranks on one GPU", _1B, 2, 2.41, 0.58),
    ("1B det, 3 ranks on one GPU", _1B, 3, 2.16, 0.39),
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


def job_shape(cfg: JobConfig) -> tuple[LlamaShape, bool, int]:
    """(shape, 4-bit base?, blocksize) from the checkpoint's config.json, else ``model.synthetic_shape``."""
    path = Path(cfg.model.checkpoint) / "config.json"
    if cfg.model.checkpoint and path.is_file():
        hf = json.loads(path.read_text())
        q = hf.get("quantization_config") or {}
        if q.get("load_in_4bit"):
            return shape_from_hf_config(hf), True, int(q.get("bnb_4bit_blocksize", 64) or 64)
        return shape_from_hf_config(hf), cfg.model.quant_type != "none", 64
    if cfg.model.synthetic_shape:
        # models.synthetic writes nf4 double-quantized files with blocksize 64.
        return get_shape(cfg.model.synthetic_shape), True, 64
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
    mlp_chunk: int  # model.mlp_chunk_tokens (0: whole sequence)


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
        # The lead's activation-offload key, when that section has it.
        act_offload=cfg.activation_checkpoint.offload,
        ac_mode=cfg.activation_checkpoint.mode,
        ac_every=cfg.activation_checkpoint.selective_every,
        reshard=p.reshard_after_forward,
        vocab_parallel=p.vocab_parallel_embedding and n > 1 and not shape.tie_word_embeddings,
        host_embedding=p.host_embedding and not shape.tie_word_embeddings,
        mlp_chunk=cfg.model.mlp_chunk_tokens,
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
    tables = 1 if s.tie_word_embeddings or j.host_embedding else 2
    norms = (2 * s.num_hidden_layers + 1) * _cdiv(s.hidden_size, n) * j.p
    return (
        s.num_hidden_layers * _block_base_bytes(j, n)
        + tables * _cdiv(s.vocab_size, n) * s.hidden_size * j.p
        + norms
        + 4 * _lora_params(j, per_rank=True)
    )


def _block_saved_bytes(j: _Job, tokens: int) -> int:
    """Tensors autograd saves for one block's backward when it is not checkpointed (from models/llama.py):
    2 RMSNorms (fp32 input + the normalised value), q/k and their rotated halves, GQA-expanded k/v, the
    attention output and its transposed copy, gate/up/silu/product of the MLP (of one chunk with
    ``model.mlp_chunk_tokens``: the chunks are checkpointed)."""
    s, p = j.shape, j.p
    h, i, kv = s.hidden_size, s.intermediate_size, s.num_key_value_heads * s.head_dim
    return tokens * (2 * (4 + p) * h + 2 * p * (h + kv) + 2 * p * h + 2 * p * h) + _mlp_tokens(j, tokens) * 4 * p * i


def _mlp_tokens(j: _Job, tokens: int) -> int:
    return min(tokens, j.mlp_chunk) if j.mlp_chunk else tokens


def _block_work_bytes(j: _Job, tokens: int, backward: bool) -> int:
    """Transient memory inside one block: MLP intermediates (gate, up, silu(gate) and their gradients in
    backward), the dequantized weight of the largest projection, the block's gradient in and out."""
    s, p = j.shape, j.p
    h, i = s.hidden_size, s.intermediate_size
    deq = i * h * p if j.quant else 0
    t_mlp = _mlp_tokens(j, tokens)
    if not backward:
        return t_mlp * 3 * p * i + deq
    block_lora = _lora_params(j, per_rank=False) // s.num_hidden_layers
    return t_mlp * 3 * p * i + tokens * 2 * p * h + deq + block_lora * (p + j.reduce)


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
    head = v * h * j.p  # the root group stays gathered from forward to backward
    if j.offload:
        head += _cdiv(v, j.n) * h * j.p  # its shard, copied to the GPU for the all-gather
    emb = 0 if (s.tie_word_embeddings or j.vocab_parallel or j.host_embedding) else v * h * j.p
    block = _block_base_bytes(j, 1) + _lora_params(j, per_rank=False) // L * j.p
    gathered = (L if not j.reshard else 2) * block
    n_ck = _checkpointed_blocks(j)
    ck_in = (2 if j.act_offload else n_ck) * T * h * j.p
    saved = ck_in + (L - n_ck) * _block_saved_bytes(j, T)
    # Final norm: fp32 input + output (hidden-shaped: activation offload moves them to the host too).
    root_act = 0 if j.act_offload else T * h * (4 + 2 * j.p)
    w, wl = _WORK_SCALE, _LOSS_SCALE
    # World > 1: FSDP copies each group's all-gather output into the parameters and, in forward, frees
    # that output only at the next group's copy-out, so the root's output, the embedding's output and
    # its copy coexist at the start. One rank copies the shard into the parameter directly.
    start = (2 * emb + v * h * j.p * (j.n > 1)) if emb else 0
    fwd = max(
        start,
        saved + root_act + wl * _loss_work_bytes(j, T, False),
        saved + gathered + w * _block_work_bytes(j, T, False),
    )
    recompute = _block_saved_bytes(j, T) if n_ck else 0
    bwd = (
        saved
        + root_act
        + max(wl * _loss_work_bytes(j, T, True), gathered + w * (recompute + _block_work_bytes(j, T, True)))
    )
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
    if j.host_embedding:  # the whole table, pinned, on every rank
        on_host += j.shape.vocab_size * j.shape.hidden_size * j.p
    return _HOST_BASE_GIB[device] + on_host / _GIB


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
        j.shape, j.seq, j.rank, j.targets, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_every
    )
    tps, card_gib, notes = None, None, []
    if card is not None:
        key, card_gib = CARDS[card]
        peak = dict(PEAK_FLOPS)[key]
        mfu = MFU[max(k for k in MFU if k <= min(ngpu, 4))]
        tps = mfu * peak / flops
        if j.offload:
            notes.append("tokens/s: CPU offload moves every step's gradients and AdamW work to the host; not measured")
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


def _pop(argv: list[str], name: str) -> str | None:
    """Remove ``--name=V`` / ``--name V`` from argv; return V (the last occurrence)."""
    value = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
        elif a.startswith(name + "="):
            value = argv.pop(i).split("=", 1)[1]
        else:
            i += 1
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ngpu_s, gib_s, card = _pop(argv, "--ngpu"), _pop(argv, "--fit-gpu-gib"), _pop(argv, "--card")
        try:
            ngpu = int(ngpu_s) if ngpu_s is not None else 1
            gib = float(gib_s) if gib_s is not None else None
        except ValueError:
            raise ConfigError(
                f"--ngpu takes an integer and --fit-gpu-gib a number, got {ngpu_s!r} / {gib_s!r}"
            ) from None
        if card is not None:
            card = card.lower()
        cfg = load_config(argv)
        e = estimate(cfg, ngpu, card)
        print(format_estimate(e))
        if gib is not None:
            f = fit(cfg, ngpu, gib)
            print(
                f"fits under {gib:g} GiB: micro_batch_size <= {f['micro_batch_size']} at seq_len {cfg.data.seq_len}; "
                f"seq_len <= {f['seq_len']:,} at micro_batch_size {cfg.training.micro_batch_size}"
            )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


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
