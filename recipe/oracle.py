"""The accuracy oracle: is a fast path as close to an fp32 eager reference as bf16 eager is?

A *variant* is a name and config overrides (``--training.compile=true``, a fused-kernel switch, fp16 with
the loss scaler, ...) on top of one base config. ``run_oracle`` builds the Trainer of the fp32 eager
reference and of every variant in turn, in one process, from the same checkpoint, seed, data and initial
LoRA weights, and records for each

* the first optimizer step's LoRA gradients, as the Trainer clips them: summed over the step's
  micro-batches, unscaled (fp16), before clipping, gathered whole in fp32;
* the loss of each of ``steps`` optimizer steps (and which steps were skipped).

``compare`` sets each variant against the reference: per LoRA tensor ``rel = ||g - g_ref|| / ||g_ref||``,
its median and its worst tensor (named), and ``max |loss - loss_ref|`` over the steps. ``judge`` gives the
verdict: a variant passes when its median and its worst are each at most ``tolerance`` (1.5) times those
of the baseline, bf16 eager, the precision every fast path replaces. The loss difference is reported, not
judged: after a few AdamW steps it follows chaotically from first-step differences of any size.

Settings the oracle fixes for every run, reference included (the reasons):

* LoRA B starts nonzero. PEFT's init (B = 0) makes every first-step gradient of A exactly zero
  (dL/dA = scaling * B^T dL/dy x), so half the tensors would compare zero with zero. Each B starts from
  U(-b, b), b = ``LORA_B_INIT`` = 0.02, drawn from a generator seeded by (job.seed, the parameter's name),
  so every variant and world size starts from the same weights; A keeps the recipe's own init. 0.02 is
  about what a hundred AdamW steps at lr 2e-4 give B: with r=64 on the 8B shape the update is ~10 % of a
  projection's output, a trained adapter's size, not a perturbation that swamps the base. Comparing the
  second step's gradients instead (B nonzero after one update) would measure the first update's rounding
  rather than the kernels: AdamW's first update is about +-lr per element whatever the gradient's size,
  so near-zero gradient elements get updates of opposite signs in the two runs.
* ``lora.dropout = 0``: compiled code draws dropout masks from its own generator, so masks would differ.
* No checkpoint saving, no adapter export; TF32 off (on a GPU an "fp32" reference with TF32 matmuls
  would have a 10-bit mantissa, between bf16's and fp16's).

The Trainer class is passed in (``make_trainer``): ``recipe/train.py`` is the entry point, which no other
module of ``recipe/`` imports. ``benchmarks/oracle.py`` is the command line; ``tests/test_oracle.py`` runs
the same machinery on a tiny model on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from parallel.sharding import row_shard_dim, shard_rows
from recipe.config import ConfigError, JobConfig, load_config

__all__ = [
    "LORA_B_INIT",
    "REFERENCE",
    "Variant",
    "Run",
    "Comparison",
    "available",
    "set_lora_b_",
    "run_variant",
    "compare",
    "judge",
    "run_oracle",
    "format_table",
    "write_json",
]

LORA_B_INIT = 0.02
# Wrappers that activation checkpointing or compile may put into parameter names; stripped so that every
# variant's tensors are named alike.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class Variant:
    """A named set of config overrides (``--section.key=value``) applied after the base config."""

    name: str
    overrides: tuple[str, ...] = ()


REFERENCE = Variant("fp32_eager", ("--training.mixed_precision_param=float32", "--training.compile=false"))


@dataclass
class Run:
    """One variant's record: first-step LoRA gradients (name -> fp32 CPU tensor) and per-step losses."""

    name: str
    grads: dict[str, torch.Tensor]
    losses: list[float]
    skipped: list[bool]
    seconds: float  # build + all steps (compile time included)


@dataclass
class Comparison:
    name: str
    overrides: tuple[str, ...]
    rel: dict[str, float]  # per LoRA tensor: ||g - g_ref|| / ||g_ref||
    median: float
    worst: float
    worst_tensor: str
    max_loss_diff: float
    loss_diffs: list[float]
    losses: list[float]
    skipped_steps: int
    seconds: float
    first_step_skipped: bool
    verdict: str = ""  # "baseline", "pass" or "FAIL"
    reason: str = ""
    limits: dict[str, float] = field(default_factory=dict)


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def available(variant: Variant) -> str | None:
    """None when every override names an existing config key, else why not (e.g. a switch that another
    change has not added to this tree yet): such a variant is reported as not run, not as a failure."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]
    for ov in variant.overrides:
        section, _, key = ov.removeprefix("--").split("=", 1)[0].partition(".")
        if section not in sections or key not in {f.name for f in dataclasses.fields(sections[section]())}:
            return f"config key {section}.{key} does not exist in this tree"
    return None


@torch.no_grad()
def set_lora_b_(model: torch.nn.Module, seed: int, bound: float = LORA_B_INIT) -> int:
    """Overwrite every LoRA B with U(-bound, bound) drawn from (seed, name) (see the module docstring);
    each rank writes its own rows of the same full tensor. Returns how many tensors were set."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_B." not in name:
            continue
        name = _clean(name)
        gen = torch.Generator().manual_seed(zlib.crc32(f"oracle:{seed}:{name}".encode()) & 0x7FFFFFFF)
        full = torch.empty(tuple(p.shape), dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        local = p
        if isinstance(p, DTensor):
            dim = row_shard_dim(p)
            if dim is None:
                raise NotImplementedError(f"{name}: placement {p.placements} is not row-sharded")
            mesh = p.device_mesh
            start, end = shard_rows(full.shape[0], mesh.get_local_rank(dim), mesh.size(dim))
            full, local = full[start:end], p.to_local()
        local.copy_(full)
        n += 1
    return n


def _full_fp32(g: torch.Tensor) -> torch.Tensor:
    if isinstance(g, DTensor):
        g = g.full_tensor()
    return g.detach().float().cpu()


def run_variant(
    make_trainer: Callable[[JobConfig], Any],
    argv: Sequence[str],
    variant: Variant,
    steps: int,
    dump: Path,
    perturb: Callable[[torch.nn.Module], None] | None = None,
) -> Run:
    """Build ``make_trainer(config)`` for ``argv`` + the variant's overrides and train ``steps`` steps.

    ``perturb`` (tests) changes the model after the oracle's initialisation, e.g. to show that a wrong
    model fails the verdict."""
    fixed = [
        "--lora.dropout=0",
        f"--training.steps={steps}",
        "--checkpoint.enable=false",
        "--checkpoint.export_adapter=false",
        f"--job.dump_folder={dump / variant.name}",
    ]
    cfg = load_config([*argv, *variant.overrides, *fixed])
    # Process-wide, but the recipe never turns TF32 on: this only guards against a caller that did.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    tr = make_trainer(cfg)
    try:
        set_lora_b_(tr.model, cfg.job.seed)
        if perturb is not None:
            perturb(tr.model)
        named = [(_clean(n), p) for n, p in tr.model.named_parameters() if p.requires_grad]
        grads: dict[str, torch.Tensor] = {}
        clip = tr._clip  # called by train_step after the fp16 unscale, before clipping

        def spy():
            grads.update({n: _full_fp32(p.grad) for n, p in named})
            return clip()

        tr._clip = spy
        tr.model.train()
        losses, skipped = [], []
        for i in range(steps):
            r = tr.train_step()
            if i == 0:
                del tr._clip  # back to the method
                if not grads:
                    raise RuntimeError("Trainer.train_step no longer calls Trainer._clip: update recipe/oracle.py")
            losses.append(r.loss)
            skipped.append(bool(r.skipped))
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
        return Run(variant.name, grads, losses, skipped, time.perf_counter() - t0)
    finally:
        tr.close()
        torch._dynamo.reset()  # a compiled variant's graphs hold its blocks; the next variant compiles afresh
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(ref: Run, run: Run, overrides: tuple[str, ...] = ()) -> Comparison:
    if set(ref.grads) != set(run.grads):
        missing, extra = sorted(set(ref.grads) - set(run.grads)), sorted(set(run.grads) - set(ref.grads))
        raise ValueError(
            f"variant {run.name!r} trains other LoRA tensors than the reference (missing {missing[:3]}, extra "
            f"{extra[:3]}): a fast path must keep the parameters' names and shapes (map them before comparing)"
        )
    rel = {}
    for n, g_ref in ref.grads.items():
        den = float(g_ref.norm())
        if den == 0.0:
            raise ValueError(f"the reference's first-step gradient of {n} is zero: nothing to compare it with")
        d = float((run.grads[n] - g_ref).norm()) / den
        rel[n] = d if math.isfinite(d) else math.inf
    worst = max(rel, key=rel.get)
    diffs = [abs(a - b) for a, b in zip(run.losses, ref.losses, strict=True)]
    diffs = [d if math.isfinite(d) else math.inf for d in diffs]
    return Comparison(
        name=run.name,
        overrides=tuple(overrides),
        rel=rel,
        median=statistics.median(rel.values()),
        worst=rel[worst],
        worst_tensor=worst,
        max_loss_diff=max(diffs) if diffs else 0.0,
        loss_diffs=diffs,
        losses=run.losses,
        skipped_steps=sum(run.skipped),
        seconds=run.seconds,
        first_step_skipped=bool(run.skipped and run.skipped[0]),
    )


def judge(rows: list[Comparison], baseline: str = "bf16_eager", tolerance: float = 1.5) -> bool:
    """Set every row's verdict against ``baseline``'s row; True when all pass."""
    base = next((r for r in rows if r.name == baseline), None)
    if base is None:
        raise ValueError(f"the baseline variant {baseline!r} is not among {[r.name for r in rows]}")
    limits = {"median": tolerance * base.median, "worst": tolerance * base.worst}
    ok = True
    for r in rows:
        r.limits = dict(limits)
        if r is base:
            r.verdict, r.reason = "baseline", ""
            continue
        why = []
        if r.first_step_skipped:
            why.append("the first step overflowed (fp16): lower training.loss_scale_init in its overrides")
        if not r.median <= limits["median"]:
            why.append(f"median {r.median:.3g} > {tolerance:g} x {base.median:.3g}")
        if not r.worst <= limits["worst"]:
            why.append(f"worst {r.worst:.3g} ({r.worst_tensor}) > {tolerance:g} x {base.worst:.3g}")
        r.verdict, r.reason = ("FAIL", "; ".join(why)) if why else ("pass", "")
        ok = ok and not why
    return ok


def run_oracle(
    make_trainer: Callable[[JobConfig], Any],
    argv: Sequence[str],
    variants: Sequence[Variant],
    steps: int,
    dump: Path,
    baseline: str = "bf16_eager",
    tolerance: float = 1.5,
    log: Callable[[str], None] = print,
) -> dict:
    """The reference, then every available variant; returns the JSON-ready result (``format_table``).

    A variant whose config the recipe refuses (``ConfigError``: a switch this tree lacks, a kernel this
    device lacks, conflicting settings) is listed as not run; one that raises anything else is reported
    (``errors``) and counts as a failure; the others still run. The reference and the baseline must run:
    without them nothing can be judged."""
    ref = run_variant(make_trainer, argv, REFERENCE, steps, dump)
    log(f"[oracle] {REFERENCE.name}: {ref.seconds:.1f}s, losses {ref.losses[0]:.4f} .. {ref.losses[-1]:.4f}")
    rows, not_run, errors = [], {}, {}
    for v in variants:
        why = available(v)
        if why:
            not_run[v.name] = why
            log(f"[oracle] {v.name}: not run ({why})")
            continue
        try:
            run = run_variant(make_trainer, argv, v, steps, dump)
        except ConfigError as e:  # refused before training (a kernel this device lacks, a conflicting switch)
            not_run[v.name] = f"refused: {e}"
            log(f"[oracle] {v.name}: not run ({not_run[v.name]})")
            continue
        except Exception as e:  # one broken fast path must not cost the others' results
            traceback.print_exc()
            errors[v.name] = f"{type(e).__name__}: {e}"
            log(f"[oracle] {v.name}: failed to run ({errors[v.name]})")
            continue
        rows.append(compare(ref, run, v.overrides))
        del run
        log(f"[oracle] {v.name}: {rows[-1].seconds:.1f}s, median {rows[-1].median:.2e}, worst {rows[-1].worst:.2e}")
    ok = judge(rows, baseline, tolerance)
    return {
        "argv": list(argv),
        "steps": steps,
        "baseline": baseline,
        "tolerance": tolerance,
        "lora_b_init": LORA_B_INIT,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "reference": {"name": REFERENCE.name, "overrides": list(REFERENCE.overrides), "losses": ref.losses},
        "reference_seconds": ref.seconds,
        "all_pass": ok and not errors,
        "variants": [dataclasses.asdict(r) for r in rows],
        "not_run": not_run,
        "errors": errors,
    }


def format_table(result: dict) -> str:
    """The result of ``run_oracle`` (or its JSON) as a table, one row per variant."""
    lines = [
        f"oracle: {len(result['variants'])} variant(s) against {result['reference']['name']} on {result['device']}, "
        f"first-step LoRA gradients (relative difference per tensor) and {result['steps']} steps of losses",
        f"{'variant':<22} {'median':>9} {'worst':>9} {'max|dloss|':>10} {'skips':>5} {'s':>6}  verdict  worst tensor",
    ]
    for r in result["variants"]:
        lines.append(
            f"{r['name']:<22} {r['median']:>9.2e} {r['worst']:>9.2e} {r['max_loss_diff']:>10.2e} "
            f"{r['skipped_steps']:>5} {r['seconds']:>6.1f}  {r['verdict']:<8} {r['worst_tensor']}"
            + (f"\n{'':<22} {r['reason']}" if r["reason"] else "")
        )
    for name, why in result.get("errors", {}).items():
        lines.append(f"{name:<22} FAIL: did not run: {why[:300]}")
    for name, why in result.get("not_run", {}).items():
        lines.append(f"{name:<22} not run: {why}")
    lim = result["variants"][0]["limits"] if result["variants"] else {}
    if lim:
        lines.append(
            f"pass: median <= {lim['median']:.2e} and worst <= {lim['worst']:.2e} "
            f"({result['tolerance']:g} x {result['baseline']}'s)"
        )
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
