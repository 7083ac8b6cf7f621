"""One optimizer step's rules, shared by both drivers (``recipe.train`` and ``recipe.hf_trainer``).

What a step needs besides the forward/backward itself, in the order it happens:

1. ``count_tokens``: the target tokens of the global batch (``labels[:, 1:] != -100``, the count the
   model's loss sums over), all-reduced before the first micro-batch, so every micro-batch's summed
   loss is divided by the same global count (``backward_loss``) and N ranks with accumulation compute
   exactly the gradients of one rank over the same global batch;
2. ``finish``: after the last backward, the fp16 unscale (overflow flag all-reduced), the DTensor-aware
   clip (``parallel.grad_norm``), and the non-finite check of bf16/fp32 (every rank's summed loss and the
   gradient norm, read on the host in one go). It returns whether the optimizer step must be skipped
   (the same decision on every rank) and updates the loss scale;
3. ``NonfiniteGuard``: skipped non-finite steps are logged with the ranks that saw them, and
   ``training.max_nonfinite_steps`` of them in a row raise ``TrainingDivergedError`` (exit code 3).

The drivers keep what differs: how micro-batches reach the model (the recipe's loader and pipeline, or
HF's dataloader and accumulation) and how a skip is carried out (the recipe does not call
``optimizer.step``; HF's loop does, so its gradients are dropped first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.distributed import all_reduce_sum
from parallel.grad_norm import clip_grad_norm_
from recipe.data import count_targets
from recipe.logging import log
from recipe.optim import LossScaler

__all__ = [
    "StepRules",
    "StepOutcome",
    "NonfiniteGuard",
    "TrainingDivergedError",
    "DIVERGED_EXIT_CODE",
    "batch_to_device",
]

DIVERGED_EXIT_CODE = 3


def batch_to_device(batch: dict, device: torch.device, *, host_embedding: bool) -> dict:
    """A micro-batch's tensors on ``device`` (asynchronously), except the token ids when the embedding
    table lives on the host (``parallel.embedding.HostEmbedding``): its lookup would otherwise copy them
    back, which waits for every kernel queued so far (the previous micro-batch's backward) and leaves
    the GPU idle while the host catches up."""
    return {k: v if host_embedding and k == "input_ids" else v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class StepOutcome:
    """What ``StepRules.finish`` decided. ``grad_norm`` stays on the device (read when logged)."""

    grad_norm: torch.Tensor  # the trainable parameters' gradient norm before clipping
    found_inf: bool  # fp16: the loss scaler saw an overflow
    nonfinite_ranks: tuple[int, ...]  # bf16/fp32: ranks whose loss was NaN/inf; (-1,): the gradient norm

    @property
    def skip(self) -> bool:
        return self.found_inf or bool(self.nonfinite_ranks)


class StepRules:
    """Token count, loss scale, unscale, clip and the non-finite check of one optimizer step.

    ``params``: the trainable parameters; ``scaler``: the run's ``LossScaler`` (enabled for fp16);
    ``max_norm``: clipping (``<= 0``: none); ``exact_norm``: the split-independent norm of deterministic
    mode; ``check_nonfinite``: read the bf16/fp32 non-finite flags (``training.max_nonfinite_steps > 0``);
    ``pp_group``: the pipeline ranks whose stages hold the other parameters (None without a pipeline)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        scaler: LossScaler,
        *,
        max_norm: float,
        exact_norm: bool,
        check_nonfinite: bool,
        rank: int,
        world: int,
        device: torch.device,
        pp_group=None,
    ):
        self.params = params
        self.scaler = scaler
        self.max_norm = max_norm
        self.exact_norm = exact_norm
        self.check_nonfinite = check_nonfinite
        self.rank, self.world, self.device = rank, world, device
        self.pp_group = pp_group

    def count_tokens(self, labels: list[torch.Tensor], *, across_ranks: bool = True, pp: int = 1) -> torch.Tensor:
        """The global number of target tokens of the step (fp64 on the device, >= 1): this rank's
        micro-batches' ``labels`` summed over the ranks (``across_ranks``; otherwise this rank's count
        times the world, HF's meaning of ``average_tokens_across_devices = False``). Every pipeline rank
        of a data-parallel rank counted the same batch: divided by ``pp`` (exact: integers in fp64)."""
        n = torch.tensor(float(sum(count_targets(x) for x in labels)), dtype=torch.float64, device=self.device)
        n = all_reduce_sum(n) if across_ranks else n * self.world
        return (n / pp).clamp(min=1.0)

    def backward_loss(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """What a micro-batch backpropagates: its summed token loss over the step's global count
        (``n_tokens`` in fp32, like the loss), times the fp16 loss scale."""
        return self.scaler.scale_loss(loss_sum / n_tokens)

    def clip(self) -> torch.Tensor:
        """Clip the gradients in place; the norm before clipping, on the device."""
        return clip_grad_norm_(
            self.params, self.max_norm, exact=self.exact_norm, pp_group=self.pp_group, device=self.device
        )

    def finish(self, loss_sum: torch.Tensor, clip=None) -> StepOutcome:
        """After the last backward: unscale, clip, check. ``loss_sum``: this rank's summed loss of the step;
        ``clip``: a callable in place of ``self.clip`` (the recipe's ``Trainer._clip``, which tests wrap)."""
        found_inf = self.scaler.unscale_(self.params)
        norm = (clip or self.clip)()
        bad = self._nonfinite_ranks(loss_sum, norm) if not self.scaler.enabled else ()
        self.scaler.update(found_inf)
        return StepOutcome(norm, found_inf, bad)

    def _nonfinite_ranks(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[int, ...]:
        """Ranks whose summed loss is NaN/inf (-1 stands for "the gradient norm" when no loss is),
        read on the host in one go; () when the step is fine or the check is off."""
        if not self.check_nonfinite:
            return ()
        # One slot per rank, summed: every rank learns which ranks saw a non-finite loss.
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.device)
        flags[self.rank] = (~torch.isfinite(loss_sum)).float().to(self.device)
        all_reduce_sum(flags)
        norm_bad = (~torch.isfinite(grad_norm)).float().reshape(1).to(flags.device)
        read = torch.cat([flags, norm_bad]).tolist()
        ranks = tuple(r for r in range(self.world) if read[r])
        return ranks or ((-1,) if read[-1] else ())


class NonfiniteGuard:
    """Counts skipped non-finite steps in a row; ``limit`` of them raise ``TrainingDivergedError``."""

    def __init__(self, limit: int, rank: int):
        self.limit, self.rank = limit, rank
        self.in_a_row = 0

    def after_step(self, step: int, outcome: StepOutcome, loss_scale: float, last_checkpoint=None, before_raise=None):
        """Log a skipped step; raise after ``limit`` non-finite ones in a row. ``step``: 1-based, as logged.
        ``last_checkpoint``: a callable giving the last complete checkpoint's step (named in the error);
        ``before_raise``: called first when the run stops (the recipe writes its pending metrics rows)."""
        if outcome.found_inf:
            log(f"step {step}: fp16 overflow, optimizer step skipped, loss scale -> {loss_scale:g}", self.rank)
            return
        if not outcome.nonfinite_ranks:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        ranks = outcome.nonfinite_ranks
        where = "the gradient norm" if ranks == (-1,) else f"the loss on rank(s) {list(ranks)}"
        log(
            f"step {step}: {where} is NaN/inf: optimizer step skipped "
            f"({self.in_a_row} in a row, the run stops at {self.limit})",
            self.rank,
        )
        if self.in_a_row >= self.limit:
            if before_raise is not None:
                before_raise()
            last = last_checkpoint() if last_checkpoint is not None else None
            raise TrainingDivergedError(
                f"{self.limit} optimizer steps in a row (up to step {step}) had a NaN/inf loss or gradient norm; "
                "the run stops without saving. "
                + (f"The last checkpoint, step {last}, is untouched. " if last is not None else "")
                + "Lower optimizer.lr, check the data at these steps, or use bfloat16/float32 compute"
            )
