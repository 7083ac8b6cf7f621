"""The layout planner: for the GPUs at hand, the layout that fits with the highest predicted tokens/s.

``python -m recipe.estimate ... --ngpu N --card C --plan`` prints the plan; ``--parallelism.plan=auto``
makes ``recipe.train`` plan for the GPUs it runs on (``plan_for_run``, before anything is loaded) and
train with the chosen layout. The search covers what changes memory or speed but not the result of
training (the global batch is kept, so the optimizer sees the same batches): replicate x shard degree
(HSDP), ``reshard_after_forward``, CPU offload, activation offload, the host embedding, the
checkpointing mode and the micro-batch. It keeps the model, data, dtypes, ``training.compile`` and
``vocab_parallel_embedding`` as configured.

Fit: the memory of ``recipe.estimate`` (per rank, CUDA allocated) times ``1 + MARGIN`` plus
``RESERVE_GIB`` must stay under the card. MARGIN = 10 %: the largest under-prediction over every measured
row of ``recipe.estimate.CALIBRATION`` is 5.0 % (compiled without checkpointing), so 10 % keeps every
measured layout inside with room; RESERVE_GIB = 1 GiB for what the
allocator's peak does not count (the CUDA context and cuBLAS / NCCL workspaces, about 0.5-0.8 GiB on the
H100 / H200 runs) and its fragmentation.

Speed (``step_time``): per micro-batch of T tokens, GPU time ``T x F / (peak x E)`` (F: model FLOPs
per token with the recompute of the checkpointing mode, causal attention counted at half its square:
the kernels skip the masked half) plus a host overhead ``L x C`` per micro-batch (Python launching
each block's kernels, not hidden behind a fast GPU; compiled blocks: only what exceeds the GPU's time for
the micro-batch, ``host_floor``), plus the exposed transfers: all-gathers of the
4-bit base (two per micro-batch with resharding, one without, none at shard degree 1), the LoRA
gradients' reduce-scatter / all-reduce once per step, activation offload's copies, and CPU offload's
parameter copies and host AdamW. Constants and their rows are in ``recipe.estimate.SPEED_FIT``; what is assumed,
not measured, is said there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

from recipe.config import ConfigError, JobConfig
from recipe.estimate import SPEED_FIT, step_time
from recipe.plan import AUTO_KEEP, auto_keep_excluded

__all__ = [
    "Layout",
    "Option",
    "MARGIN",
    "RESERVE_GIB",
    "plan",
    "format_plan",
    "apply",
    "plan_for_run",
    "step_time",
    "SPEED_FIT",
]

_GIB = 2**30
MARGIN = 0.10
RESERVE_GIB = 1.0
TIE = 0.03


@dataclass(frozen=True)
class Layout:
    replicate: int
    shard: int
    reshard: bool
    cpu_offload: bool
    act_offload: bool
    host_embedding: bool
    ac_mode: str
    ac_every: int
    micro_batch: int

    def describe(self) -> str:
        dp = f"shard {self.shard}" if self.replicate == 1 else f"HSDP {self.replicate}x{self.shard}"
        ac = self.ac_mode if self.ac_mode != "selective" else f"selective/{self.ac_every}"
        parts = [dp, f"micro-batch {self.micro_batch}", f"AC {ac}"]
        if self.shard > 1:
            parts.append("reshard" if self.reshard else "no reshard")
        parts += [n for n, on in (("cpu offload", self.cpu_offload), ("act. offload", self.act_offload)) if on]
        parts += ["host embedding"] if self.host_embedding else []
        return ", ".join(parts)


@dataclass
class Option:
    layout: Layout
    peak_gib: float  # predicted training peak per rank
    load_gib: float
    host_gib: float  # per rank
    tokens_per_s: float  # per GPU
    step_s: float
    parts: dict[str, float]  # step seconds by cause
    traffic_gb: float  # bytes each rank sends + receives between GPUs per step (GB)
    fits: bool
    gpu_fits: bool = True
    kept: str = ""  # activation_checkpoint.keep_outputs as the run will resolve it ('auto'), in words


def _job_for(base, lay: Layout, accum: int):
    keep = base.keep
    if base.keep_auto:  # keep_outputs = 'auto' decided for this layout, as recipe.plan will decide it
        one = lay.replicate * lay.shard == 1 and not (base.fsdp or lay.cpu_offload)
        why = auto_keep_excluded(
            None if one else "FSDP or more than one rank",
            lay.ac_mode,
            lay.act_offload,
            base.compile,
            base.quant,
            base.mlp_chunk,
        )
        keep = () if why else AUTO_KEEP
    return dataclasses.replace(
        base,
        keep=keep,
        n=lay.shard,
        replicate=lay.replicate,
        reshard=lay.reshard,
        offload=lay.cpu_offload,
        act_offload=lay.act_offload,
        host_embedding=lay.host_embedding and not base.shape.tie_word_embeddings,
        ac_mode=lay.ac_mode,
        ac_every=lay.ac_every,
        mb=lay.micro_batch,
        accum=accum,
        vocab_parallel=base.vocab_parallel and lay.shard > 1,
        frozen_local=lay.shard == 1 and not lay.cpu_offload,
    )


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def candidates(cfg: JobConfig, ngpu: int) -> list[tuple[Layout, int]]:
    """Every layout the planner considers, with its micro-batches per step per rank."""
    t = cfg.training
    gb = t.global_batch_size if t.global_batch_size > 0 else t.micro_batch_size * ngpu
    if gb % ngpu:
        raise ConfigError(
            f"training.global_batch_size {gb} is not a multiple of the {ngpu} GPU(s): the plan keeps the global "
            "batch; set --training.global_batch_size to a multiple of the number of GPUs"
        )
    per_rank = gb // ngpu
    from recipe.estimate import job_shape

    tied = job_shape(cfg)[0].tie_word_embeddings
    out = []
    for rep in _divisors(ngpu):
        shard = ngpu // rep
        for reshard in (True, False) if shard > 1 else (True,):
            for cpu in (False, True):
                for mode, every in (("none", 1), ("selective", 2), ("full", 1)):
                    for act in (False, True) if mode != "none" else (False,):
                        for host in (
                            (False, True) if not (tied or cfg.parallelism.vocab_parallel_embedding) else (False,)
                        ):
                            for mb in _divisors(per_rank):
                                lay = Layout(rep, shard, reshard, cpu, act, host, mode, every, mb)
                                out.append((lay, per_rank // mb))
    return out


def plan(cfg: JobConfig, ngpu: int, card: str, gpu_gib: float | None = None, host_gib: float | None = None):
    """Every candidate as an ``Option``, the fitting ones first by predicted tokens/s (highest first)."""
    from recipe.estimate import CARDS, _job, gpu_phases
    from recipe.estimate import host_gib as host_of

    if card not in CARDS:
        raise ConfigError(f"unknown card {card!r}; known cards: {', '.join(CARDS)}")
    gpu_gib = CARDS[card][1] if gpu_gib is None else gpu_gib
    t = cfg.training
    saved = (
        t.global_batch_size,
        cfg.parallelism.data_parallel_replicate_degree,
        cfg.parallelism.data_parallel_shard_degree,
    )
    cands = candidates(cfg, ngpu)
    try:
        # the job as configured, with a layout the base accepts; every candidate is a replace of it
        if t.global_batch_size <= 0:
            t.global_batch_size = t.micro_batch_size * ngpu
        cfg.parallelism.data_parallel_replicate_degree, cfg.parallelism.data_parallel_shard_degree = 1, -1
        mb0 = t.micro_batch_size
        t.micro_batch_size = 1
        base = _job(cfg, ngpu)
        t.micro_batch_size = mb0
    finally:
        (
            t.global_batch_size,
            cfg.parallelism.data_parallel_replicate_degree,
            cfg.parallelism.data_parallel_shard_degree,
        ) = saved
    options = []
    for lay, accum in cands:
        j = _job_for(base, lay, accum)
        g = gpu_phases(j)
        peak = max(g[p] for p in list(g)[2:])
        host = host_of(j, "cuda")
        step, parts, traffic = step_time(j, card, ngpu)
        gpu_fits = peak * (1 + MARGIN) + RESERVE_GIB <= gpu_gib and g["load"] * (1 + MARGIN) + RESERVE_GIB <= gpu_gib
        fits = gpu_fits and (host_gib is None or host * ngpu <= host_gib)
        tps = accum * lay.micro_batch * j.seq / step
        kept = ""
        if j.keep:
            every = "every" if j.keep_every == 1 else f"1 in {j.keep_every}"
            kept = f"keeps {'/'.join(n.removesuffix('_proj') for n in j.keep)} outputs ({every} checkpointed blocks)"
        options.append(Option(lay, peak, g["load"], host, tps, step, parts, traffic, fits, gpu_fits, kept))
    # Fitting first, fastest first. Predictions within TIE of the fastest are not told apart (the model's
    # speed rows scatter by up to 12 %): among them the least GPU-to-GPU traffic, then the fewest switches
    # (CPU offload's speed is assumed, not measured), then the smaller peak wins.
    options.sort(key=lambda o: (not o.fits, -o.tokens_per_s))
    top = options[0].tokens_per_s if options[0].fits else float("inf")
    options.sort(
        key=lambda o: (
            not o.fits,
            o.tokens_per_s < (1 - TIE) * top,
            round(o.traffic_gb, 1) if o.tokens_per_s >= (1 - TIE) * top else -o.tokens_per_s,
            _switches(o.layout),
            o.peak_gib,
        )
    )
    return options


def _switches(lay: Layout) -> int:
    return 2 * lay.cpu_offload + lay.act_offload + lay.host_embedding + (not lay.reshard)


def _why(a: Option, b: Option) -> str:
    diff = {k: b.parts.get(k, 0.0) - a.parts.get(k, 0.0) for k in set(a.parts) | set(b.parts)}
    k = max(diff, key=lambda x: abs(diff[x]))
    gain = a.tokens_per_s / b.tokens_per_s - 1
    tie = ""
    if gain < TIE:
        tie = (
            f" (closer than {TIE:.0%} counts as a tie, won by less GPU-to-GPU traffic: {a.traffic_gb:.2f} against "
            f"{b.traffic_gb:.2f} GB, then fewer switches, then the smaller peak)"
        )
    return (
        f"{gain:+.1%} predicted tokens/s for the chosen{tie}; the largest difference is {k} "
        f"({a.parts.get(k, 0.0):.2f} s against {b.parts.get(k, 0.0):.2f} s per step)"
    )


def format_plan(options: list[Option], ngpu: int, card: str, gpu_gib: float, host_gib: float | None = None) -> str:
    fitting = [o for o in options if o.fits]
    head = (
        f"plan for {ngpu}x {card} ({gpu_gib:.1f} GiB each; fits = predicted peak x {1 + MARGIN:.2f} + "
        f"{RESERVE_GIB:g} GiB under it): {len(fitting)} of {len(options)} layouts fit"
    )

    def row(tag: str, o: Option) -> str:
        return (
            f"  {tag}: {o.layout.describe()}{', ' + o.kept if o.kept else ''}\n"
            f"      {o.peak_gib:.2f} GiB peak (load {o.load_gib:.2f}), host {o.host_gib:.1f} GiB/rank, "
            f"{o.tokens_per_s:,.0f} tokens/s/GPU, step {o.step_s:.1f} s, GPU-to-GPU {o.traffic_gb:.2f} GB/rank/step"
        )

    lines = [head, row("chosen", fitting[0])]
    if len(fitting) > 1:
        shape = lambda o: (o.layout.replicate, o.layout.reshard, o.layout.cpu_offload, o.layout.ac_mode)  # noqa: E731
        runner = next((o for o in fitting[1:] if shape(o) != shape(fitting[0])), fitting[1])
        lines += [row("runner-up", runner), f"  why: {_why(fitting[0], runner)}"]
    if host_gib is None:
        lines.append("  host RAM not checked (add --host-gib, e.g. 29 for Kaggle's 2x T4)")
    else:
        lines.append(f"  host RAM: {fitting[0].host_gib * ngpu:.1f} of {host_gib:.0f} GiB for all ranks")
    return "\n".join(lines)


def no_fit_message(options: list[Option], ngpu: int, card: str, gpu_gib: float, host_gib: float | None = None) -> str:
    on_gpu = [o for o in options if o.gpu_fits]
    if on_gpu and host_gib is not None:
        low = min(on_gpu, key=lambda o: o.host_gib)
        return (
            f"no layout fits {ngpu}x {card} with {host_gib:g} GiB of host RAM: the smallest host need, "
            f"{low.layout.describe()}, is {low.host_gib * ngpu:.1f} GiB for all ranks; use more GPUs or more host RAM"
        )
    low = min(options, key=lambda o: o.peak_gib)
    return (
        f"no layout fits {ngpu}x {card} ({gpu_gib:.1f} GiB): the smallest, {low.layout.describe()}, needs "
        f"{low.peak_gib:.2f} GiB x {1 + MARGIN:.2f} + {RESERVE_GIB:g} GiB; lower data.seq_len or use more "
        "or larger GPUs"
    )


def layout_keys(lay: Layout) -> dict[str, object]:
    """``lay`` as config keys: what ``apply`` writes, and what ``--plan-args`` prints as overrides."""
    return {
        "training.micro_batch_size": lay.micro_batch,
        "parallelism.data_parallel_replicate_degree": lay.replicate,
        "parallelism.data_parallel_shard_degree": lay.shard,
        "parallelism.reshard_after_forward": lay.reshard,
        "parallelism.cpu_offload": lay.cpu_offload,
        "parallelism.host_embedding": lay.host_embedding,
        "activation_checkpoint.mode": lay.ac_mode,
        "activation_checkpoint.selective_every": lay.ac_every,
        "activation_checkpoint.offload": lay.act_offload,
    }


def layout_overrides(lay: Layout) -> list[str]:
    """``lay`` as command-line overrides (``--section.key=value``)."""
    fmt = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return [f"--{key}={fmt(value)}" for key, value in layout_keys(lay).items()]


def apply(cfg: JobConfig, lay: Layout, ngpu: int) -> None:
    """Write ``lay`` into the config (the global batch is kept)."""
    if cfg.training.global_batch_size <= 0:
        cfg.training.global_batch_size = cfg.training.micro_batch_size * ngpu
    for key, value in layout_keys(lay).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)


def best(cfg: JobConfig, ngpu: int, card: str, gpu_gib: float | None = None, host_gib: float | None = None):
    """(the options, the report); ConfigError naming the smallest layout when none fits."""
    from recipe.estimate import CARDS

    gib = CARDS[card][1] if gpu_gib is None else gpu_gib
    options = plan(cfg, ngpu, card, gib, host_gib)
    if not options[0].fits:
        raise ConfigError(no_fit_message(options, ngpu, card, gib, host_gib))
    return options, format_plan(options, ngpu, card, gib, host_gib)


# ---------------------------------------------------------------------------
# The run's hook


def card_of(name: str) -> str | None:
    """The CARDS key of a CUDA device name (``NVIDIA H100 80GB HBM3`` -> h100), else None."""
    from recipe.estimate import CARDS

    low = name.lower()
    return next((k for k in CARDS if k in low.split() or f" {k}" in f" {low}"), None)


def plan_for_run(cfg: JobConfig, devices=None) -> JobConfig:
    """``parallelism.plan = "auto"``: plan for this machine's GPUs and write the layout into ``cfg``
    (every rank computes the same plan; rank 0 prints it). Called by recipe.train before loading."""
    if cfg.parallelism.plan != "auto":
        return cfg
    if cfg.parallelism.pipeline_parallel_degree > 1:
        raise ConfigError(
            "parallelism.plan=auto plans data-parallel layouts, not pipelines: set --parallelism.plan=off with "
            "parallelism.pipeline_parallel_degree > 1"
        )
    ngpu = int(os.environ.get("WORLD_SIZE", "1"))
    dev = None if cfg.training.device == "cpu" else (_detect() if devices is None else devices)
    rank0 = os.environ.get("RANK", "0") == "0"
    if dev is None:
        if rank0:
            print("plan: parallelism.plan=auto needs CUDA GPUs; none here, the configured layout is kept", flush=True)
        return cfg
    card, gib = dev
    options, report = best(cfg, ngpu, card, gib, _host_total_gib())
    apply(cfg, options[0].layout, ngpu)
    if rank0:
        print(report, flush=True)
    return cfg


def _detect() -> tuple[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(dev)
    card = card_of(name)
    if card is None:
        raise ConfigError(
            f"parallelism.plan=auto does not know the GPU {name!r} (known: h200, h100, a100, l4, t4): set the "
            "layout by hand (--parallelism.plan=off)"
        )
    total = torch.cuda.get_device_properties(dev).total_memory / _GIB
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return card, total * (frac(dev) if frac else 1.0)


def _host_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m recipe.estimate ... --plan")
