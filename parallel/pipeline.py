"""Pipeline parallelism: layout validation, stage cutting, the schedule, and its per-action timing.

Order of use (``recipe.builder.build_pipeline_model`` and ``recipe.train``):
  1. ``plan_pipeline`` checks the layout against the model's block count and the step's micro-batches and
     decides which blocks each stage holds and which stages each pipeline rank runs; everything it
     refuses (too few blocks, a micro-batch count the schedule cannot use, a V schedule without two
     stages per rank, compile with a split backward) raises ``LayoutError`` before any weight is read;
  2. ``cut_stages`` slices the meta model into this rank's stages (``LlamaForCausalLM.part``: the blocks
     keep their full-model names, so checkpoints, the optimizer state and the adapter are keyed the
     same as without a pipeline) and a ``rank_model`` that holds all of this rank's blocks (what the
     optimizer, the checkpointer and the export see); each stage is then parallelized (FSDP2 over the
     data-parallel mesh, the stage as its root) and materialized on its own, so a rank reads only its
     stages' tensors, and with FSDP only its rows;
  3. ``PipelineRunner`` wraps the stages in ``PipelineStage`` objects and builds the schedule with
     ``scale_grads=False``: the last stage's forward returns the summed token loss, and the loss
     function divides it by the global target-token count (and multiplies the fp16 loss scale), which
     is exactly the backward loss of the non-pipeline loop. FSDP's gradient reduction happens once per
     step (the stage runs its post-backward after the last micro-batch);
  4. ``ActionTimer`` times each stage's forward (F), input backward (B, or the full backward) and weight
     backward (W) calls; the rest of a step's wall time is the schedule's send/recv waits and
     bookkeeping, i.e. the bubble: ``idle = 1 - (F + B + W) / step time``.

Stage -> rank placement is torch's: ``loop`` (stage s on pipeline rank s % P) for GPipe, 1F1B,
Interleaved1F1B and InterleavedZeroBubble; ``v`` (rank r holds stages r and 2P - 1 - r) for ZBVZeroBubble
and DualPipeV. Only public ``torch.distributed.pipelining`` APIs are used (``PipelineStage``,
``get_schedule_class``, ``schedule.step``), present in torch 2.11 and 2.13.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from parallel.distributed import LayoutError

__all__ = ["SCHEDULES", "PipelinePlan", "plan_pipeline", "cut_stages", "PipelineRunner", "ActionTimer"]


@dataclass(frozen=True)
class _Schedule:
    style: str  # stage placement: "loop" or "v"
    stages_per_rank: int  # the default
    exact: bool  # exactly stages_per_rank stages per rank
    split_backward: bool  # separate B and W passes (no torch.compile)


SCHEDULES = {
    "ZBVZeroBubble": _Schedule("v", 2, True, True),
    "DualPipeV": _Schedule("v", 2, True, True),
    "InterleavedZeroBubble": _Schedule("loop", 2, False, True),
    "Interleaved1F1B": _Schedule("loop", 2, False, False),
    "1F1B": _Schedule("loop", 1, True, False),
    "GPipe": _Schedule("loop", 1, True, False),
}

_KEY = "parallelism.pipeline_parallel_"


@dataclass(frozen=True)
class PipelinePlan:
    degree: int
    schedule: str
    n_microbatches: int
    stage_layers: tuple[tuple[int, ...], ...]  # blocks of each stage, in stage order

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def keep_unsharded(self) -> bool:
        """Split-backward schedules find the weights' autograd nodes when the input backward (B) starts;
        a block resharded after forward is not in the graph then, and W would skip its LoRA weights."""
        return SCHEDULES[self.schedule].split_backward

    def stage_rank(self, stage: int) -> int:
        """The pipeline rank that runs ``stage``."""
        p = self.degree
        if SCHEDULES[self.schedule].style == "loop":
            return stage % p
        # V: down the ranks, then back up (rank r holds r and 2P - 1 - r; more rounds alternate).
        rnd, pos = divmod(stage, p)
        return pos if rnd % 2 == 0 else p - 1 - pos

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.n_stages) if self.stage_rank(s) == pp_rank]


def plan_pipeline(
    degree: int,
    schedule: str,
    n_layers: int,
    n_microbatches: int,
    layers_per_stage: int = -1,
    split_points: list[int] | tuple[int, ...] = (),
    compile: bool = False,
) -> PipelinePlan:
    """The stages of a ``degree``-rank pipeline over ``n_layers`` blocks, or ``LayoutError`` saying what to change."""
    if schedule not in SCHEDULES:
        raise LayoutError(f"{_KEY}schedule = {schedule!r} is not one of {', '.join(SCHEDULES)}")
    sch = SCHEDULES[schedule]
    if sch.split_backward and compile:
        raise LayoutError(
            f"{_KEY}schedule = {schedule} splits the backward into input and weight passes, which "
            "torch.compile does not support: set training.compile = false, or use 1F1B, GPipe or Interleaved1F1B"
        )
    if split_points:
        pts = list(split_points)
        if pts != sorted(set(pts)) or pts[0] < 1 or pts[-1] >= n_layers:
            raise LayoutError(
                f"{_KEY}split_points = {pts}: must be increasing block indices in 1..{n_layers - 1} "
                f"(the model has {n_layers} blocks), each the first block of a stage"
            )
        bounds = [0, *pts, n_layers]
    else:
        n_stages = degree * sch.stages_per_rank
        if layers_per_stage != -1:
            if n_layers % layers_per_stage:
                raise LayoutError(
                    f"{_KEY}layers_per_stage = {layers_per_stage} does not divide the model's {n_layers} "
                    f"blocks: use a divisor of {n_layers}, or set {_KEY}split_points"
                )
            n_stages = n_layers // layers_per_stage
        if n_stages > n_layers:
            raise LayoutError(
                f"{schedule} on {degree} pipeline ranks needs {n_stages} stages but the model has only "
                f"{n_layers} blocks (one at least per stage): lower {_KEY}degree"
                + (", or use 1F1B" if sch.stages_per_rank > 1 else "")
            )
        bounds = [s * n_layers // n_stages for s in range(n_stages + 1)]
    stage_layers = tuple(tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    n_stages = len(stage_layers)
    per_rank, rest = divmod(n_stages, degree)
    if rest or (sch.exact and per_rank != sch.stages_per_rank) or per_rank < 1:
        want = (
            f"exactly {sch.stages_per_rank * degree}"
            if sch.exact
            else f"a multiple of {degree} ({sch.stages_per_rank * degree} by default)"
        )
        raise LayoutError(
            f"{n_stages} pipeline stage(s) on {degree} pipeline ranks, but {schedule} needs {want} stages "
            f"({sch.stages_per_rank if sch.exact else 'any number of'} per rank): change {_KEY}layers_per_stage "
            f"or {_KEY}split_points"
            + (", or pick a schedule with one stage per rank (1F1B, GPipe)" if sch.exact and per_rank != 1 else "")
        )
    _check_microbatches(schedule, degree, n_stages, n_microbatches)
    return PipelinePlan(degree, schedule, n_microbatches, stage_layers)


def _check_microbatches(schedule: str, degree: int, n_stages: int, n: int) -> None:
    # The rules torch's schedules enforce (or silently rely on) when they are built.
    fix = (
        f"set training.global_batch_size = data-parallel ranks x {_KEY}microbatch_size x the micro-batches "
        "per step you want"
    )
    need = {"1F1B": degree, "ZBVZeroBubble": n_stages, "DualPipeV": n_stages}.get(schedule, 1)
    if n < need:
        raise LayoutError(
            f"{schedule} with {n_stages} stages needs at least {need} micro-batches per step, this step has {n} "
            f"(global batch / data-parallel ranks / {_KEY}microbatch_size): {fix}"
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n // degree)
        if n % rounds:
            raise LayoutError(
                f"{schedule} needs the micro-batches per step ({n}) to be a multiple of the rounds "
                f"(max(1, {n} // {degree}) = {rounds}), e.g. a multiple of {degree}: {fix}"
            )


def cut_stages(model: nn.Module, plan: PipelinePlan, pp_rank: int) -> tuple[nn.Module, list[nn.Module]]:
    """(rank_model, stages) of ``pp_rank`` from the meta ``model`` (``LlamaForCausalLM``): see the module docstring."""
    ids = plan.stages_of(pp_rank)
    last = plan.n_stages - 1
    stages = [model.part(plan.stage_layers[s], first=s == 0, last=s == last) for s in ids]
    blocks = sorted(i for s in ids for i in plan.stage_layers[s])
    return model.part(blocks, first=False, last=False), stages


class _Clock:
    """Wall time on the CPU, CUDA events on a GPU (read once, when the totals are asked for)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class ActionTimer:
    """Per-rank time of each schedule action (F, B, W) per step, from wrapping the stages' own calls."""

    KINDS = ("F", "B", "W")

    def __init__(self, device: torch.device):
        self.clock = _Clock(device)
        self.steps: list[tuple[object, object, list[tuple[str, object, object]]]] = []
        self._actions: list[tuple[str, object, object]] | None = None
        self._start = None

    def wrap(self, stage) -> None:
        for name, kind in (
            ("forward_one_chunk", "F"),
            ("backward_one_chunk", "B"),
            ("backward_weight_one_chunk", "W"),
        ):
            setattr(stage, name, self._timed(getattr(stage, name), kind))

    def _timed(self, fn, kind):
        def call(*args, **kwargs):
            if self._actions is None:
                return fn(*args, **kwargs)
            a = self.clock.mark()
            out = fn(*args, **kwargs)
            self._actions.append((kind, a, self.clock.mark()))
            return out

        return call

    def begin(self) -> None:
        self._actions, self._start = [], self.clock.mark()

    def end(self) -> None:
        self.steps.append((self._start, self.clock.mark(), self._actions))
        self._actions = None

    def totals(self, skip: int = 1) -> dict[str, float]:
        """Seconds per kind, ``step`` (wall) and ``idle`` over the steps after the first ``skip``
        (the first step also infers the stages' shapes)."""
        if self.clock.cuda:
            torch.cuda.synchronize()
        steps = self.steps[skip:] if len(self.steps) > skip else self.steps
        out = dict.fromkeys((*self.KINDS, "step"), 0.0)
        for start, end, actions in steps:
            out["step"] += self.clock.seconds(start, end)
            for kind, a, b in actions:
                out[kind] += self.clock.seconds(a, b)
        busy = sum(out[k] for k in self.KINDS)
        out["idle"] = max(out["step"] - busy, 0.0)
        out["idle_fraction"] = out["idle"] / out["step"] if out["step"] > 0 else 0.0
        out["steps"] = len(steps)
        return out


def format_bubble_table(rows: list[dict], schedule: str) -> str:
    """The end-of-run table: one line per rank (``ActionTimer.totals`` plus ``rank``)."""
    lines = [
        f"pipeline actions ({schedule}, seconds over {rows[0]['steps']} step(s); idle = step - F - B - W: "
        "send/recv waits and the bubble)",
        f"{'rank':>4} {'F':>8} {'B':>8} {'W':>8} {'idle':>8} {'step':>8} {'idle %':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['rank']:>4} {r['F']:>8.3f} {r['B']:>8.3f} {r['W']:>8.3f} {r['idle']:>8.3f} {r['step']:>8.3f} "
            f"{100 * r['idle_fraction']:>6.1f}%"
        )
    return "\n".join(lines)


class PipelineRunner:
    """This rank's stages and the schedule that runs one optimizer step's micro-batches through them."""

    def __init__(self, stages: list[nn.Module], plan: PipelinePlan, pp_rank: int, pp_group, device: torch.device):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        self.plan = plan
        self.modules = stages
        ids = plan.stages_of(pp_rank)
        self.has_first = 0 in ids
        self.has_last = plan.n_stages - 1 in ids
        self.stages = [
            PipelineStage(m, s, plan.n_stages, device, group=pp_group) for m, s in zip(stages, ids, strict=True)
        ]
        self.timer = ActionTimer(device)
        for st in self.stages:
            self.timer.wrap(st)
        cls = get_schedule_class(plan.schedule)
        single = SCHEDULES[plan.schedule].stages_per_rank == 1 and SCHEDULES[plan.schedule].exact
        # scale_grads=False: the loss is already divided by the global token count (see _loss).
        self.schedule = cls(
            self.stages[0] if single else self.stages, plan.n_microbatches, loss_fn=self._loss, scale_grads=False
        )
        self._scale = None

    def _loss(self, loss_sum: torch.Tensor, _target) -> torch.Tensor:
        return self._scale(loss_sum)

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def step(self, batch: dict[str, torch.Tensor], scale_loss, loss_sum: torch.Tensor) -> torch.Tensor:
        """Forward and backward of ``batch`` (this data-parallel rank's micro-batches, concatenated);
        ``scale_loss(loss_sum_of_a_micro_batch)`` is the backward loss. Adds the micro-batches' summed
        token losses to ``loss_sum`` on the rank of the last stage (elsewhere it is left as it is)."""
        kwargs = dict(batch)
        ids = kwargs.pop("input_ids")
        self._scale = scale_loss
        self.timer.begin()
        # The last stage's outputs of this step, (micro-batches,): the schedule's loss function may
        # also be called for its first step's shape inference, so losses are not collected there.
        out = self.schedule.step(*((ids,) if self.has_first else ()), target=kwargs["labels"], **kwargs)
        self.timer.end()
        if self.has_last:
            for s in out.detach().to(loss_sum.dtype):  # in micro-batch order, as the loop without pipeline adds
                loss_sum += s
        return loss_sum
