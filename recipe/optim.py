"""Optimizer, learning-rate schedule and the fp16 loss scaler.

The loss scaler is written for sharded gradients: each rank unscales its own shard and the
overflow flag is all-reduced, so every rank skips the same steps (``torch.amp.GradScaler`` assumes
unsharded gradients on one device). A skipped step still advances the step counter and the
schedule, so the learning rate stays a function of the step number (no silent shift); each skip is
logged by the training loop.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from parallel.distributed import all_reduce_sum
from recipe.config import ConfigError

__all__ = ["build_optimizer", "build_lr_scheduler", "apply_hyperparameters", "LossScaler", "lr_lambda"]


def build_optimizer(params, cfg_opt) -> torch.optim.Optimizer:
    if cfg_opt.name.lower() != "adamw":
        # validate() already rejects this; kept for configs built without it.
        raise ConfigError(f"optimizer.name = {cfg_opt.name!r}: only 'AdamW' is supported; set --optimizer.name=AdamW")
    return torch.optim.AdamW(
        params,
        lr=cfg_opt.lr,
        betas=(cfg_opt.beta1, cfg_opt.beta2),
        eps=cfg_opt.eps,
        weight_decay=cfg_opt.weight_decay,
        foreach=True,
    )


def lr_lambda(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_lr_scheduler(optimizer, cfg_sched, total_steps: int):
    fn = lambda s: lr_lambda(
        s,
        warmup=cfg_sched.warmup_steps,
        total=total_steps,
        decay=cfg_sched.decay_type,
        min_ratio=cfg_sched.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg_opt) -> list[str]:
    """Set the ``[optimizer]`` section's lr, betas, eps and weight decay on a restored optimizer and
    schedule; returns what changed ("lr 0.002 -> 0.1", ...).

    A checkpoint's optimizer state carries the hyperparameters it was saved with; a user who resumes
    with another lr or weight decay means the config's. The current lr is recomputed from the
    restored step and the config's peak lr through the schedule's own lambdas.
    """
    want = {
        "betas": (float(cfg_opt.beta1), float(cfg_opt.beta2)),
        "eps": float(cfg_opt.eps),
        "weight_decay": float(cfg_opt.weight_decay),
    }
    changed = []
    for g in optimizer.param_groups:
        for k, v in want.items():
            cur = tuple(g[k]) if k == "betas" else g[k]
            if cur != v:
                changed.append(f"{k} {g[k]} -> {v}")
                g[k] = v
        g["initial_lr"] = float(cfg_opt.lr)
    old = list(scheduler.base_lrs)
    scheduler.base_lrs = [float(cfg_opt.lr)] * len(old)
    if old != scheduler.base_lrs:
        changed.append(f"lr {old[0]} -> {cfg_opt.lr}")
    for g, fn, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
        g["lr"] = base * fn(scheduler.last_epoch)
    # LambdaLR has no public setter for what get_last_lr() reports.
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return list(dict.fromkeys(changed))


class LossScaler:
    """Dynamic loss scaling for fp16 over FSDP-sharded gradients (a no-op when disabled)."""

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params) -> bool:
        """Divide gradients by the scale; True when any rank saw inf/nan (then skip the step)."""
        if not self.enabled:
            return False
        inv = 1.0 / self.scale
        bad = None  # stays on the gradients' device: one host sync per step, not one per parameter
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(inv)
            flag = (~torch.isfinite(g)).any()
            bad = flag if bad is None else bad | flag
        if bad is None:  # no gradient on this rank: still join the all-reduce, on the params' device
            bad = torch.zeros((), dtype=torch.bool, device=params[0].device if params else "cpu")
        return bool(all_reduce_sum(bad.float()).item() > 0)

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self.good_steps, self.skipped = sd["scale"], sd["good_steps"], sd["skipped"]
