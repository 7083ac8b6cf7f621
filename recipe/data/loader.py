"""The batch layout rule and the deterministic, resumable global-batch loader.

The layout rule (a global batch is a positive multiple of micro_batch_size x data-parallel ranks) lives
here, next to the loader that relies on it; the trainer checks it through ``resolve_global_batch_size``
before anything is loaded, so a wrong layout costs no model load, and both report the same sentence.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from parallel.distributed import LayoutError
from recipe.data.errors import DataError
from recipe.seeding import derive_seed

__all__ = ["GlobalBatchLoader", "batch_layout_problem", "resolve_global_batch_size"]


def batch_layout_problem(global_batch_size: int, micro_batch_size: int, dp_world: int) -> str | None:
    """Why this global batch cannot be split over ``dp_world`` ranks in micro-batches, or None if it can.

    The message names the config keys for users of the trainer and the loader's arguments in parentheses
    for callers of ``GlobalBatchLoader``, so both callers raise the same sentence."""
    names = f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size}, dp_world={dp_world}"
    if micro_batch_size < 1 or dp_world < 1:
        return (
            f"training.micro_batch_size ({micro_batch_size}) and the number of ranks ({dp_world}) "
            f"must be positive ({names})"
        )
    unit = micro_batch_size * dp_world
    if global_batch_size > 0 and global_batch_size % unit == 0:
        return None
    # The nearest valid values on either side; below the first multiple (or <= 0) only `unit` is.
    lo = max(unit, (global_batch_size // unit) * unit)
    hi = max(unit, (global_batch_size // unit + 1) * unit)
    sugg = f"{lo} or {hi}" if lo != hi else f"{lo}"
    return (
        f"training.global_batch_size = {global_batch_size} is not a positive multiple of "
        f"training.micro_batch_size ({micro_batch_size}) x number of ranks ({dp_world}) = {unit} ({names}); "
        f"set training.global_batch_size to a multiple of {unit}, e.g. {sugg}"
    )


def resolve_global_batch_size(global_batch_size: int, micro_batch_size: int, dp_world: int) -> int:
    """The run's global batch: ``-1`` (the config's default) is one micro-batch per rank, no accumulation.

    Raises ``LayoutError``, the error of layouts a job cannot run, when the batch cannot be split."""
    gbs = micro_batch_size * dp_world if global_batch_size == -1 else global_batch_size
    problem = batch_layout_problem(gbs, micro_batch_size, dp_world)
    if problem is not None:
        raise LayoutError(problem)
    return gbs


class GlobalBatchLoader:
    """Deterministic global-batch loader for data parallelism with gradient accumulation.

    Global sample index ``i = step * G + j`` (``j`` in ``0..G-1``) maps to
    ``epoch = i // num_rows``, ``pos = i % num_rows``, ``row = perm(epoch)[pos]`` where
    ``perm(epoch)`` is a ``torch.randperm`` from a generator seeded by ``derive_seed(seed, epoch)``.

    Micro-batch ``a`` (``0..A-1``) of rank ``r`` holds global entries
    ``[(a * dp_world + r) * M, (a * dp_world + r + 1) * M)``. The union over ranks and
    micro-batches is exactly the global batch for any ``dp_world`` dividing ``G / M``; with one
    rank the micro-batches are the global batch in order. ``micro_batches(step)`` is a pure
    function of ``(seed, step)`` so resume is exact.
    """

    def __init__(
        self,
        data: dict[str, torch.Tensor],
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
    ):
        problem = batch_layout_problem(global_batch_size, micro_batch_size, dp_world)
        if problem is not None:
            raise DataError(problem)
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank={dp_rank} out of range for dp_world={dp_world}")
        self.num_rows = int(data["input_ids"].shape[0])
        if self.num_rows < global_batch_size:
            raise DataError(
                f"the dataset has {self.num_rows} rows, fewer than global_batch_size={global_batch_size}; "
                "add data, lower global_batch_size, or (with packing) lower seq_len"
            )
        for k, v in data.items():
            if v.shape[0] != self.num_rows:
                raise DataError(f"data tensor {k!r} has {v.shape[0]} rows, expected {self.num_rows}")
        self.data = data
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = int(seed)
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_world)

    def _perm(self, epoch: int) -> torch.Tensor:
        p = self._perms.get(epoch)
        if p is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            p = torch.randperm(self.num_rows, generator=g)
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = p
        return p

    def global_rows(self, step: int) -> list[int]:
        """Row indices of the whole global batch of optimizer step ``step`` (0-based)."""
        base = step * self.global_batch_size
        rows = []
        for j in range(self.global_batch_size):
            i = base + j
            rows.append(int(self._perm(i // self.num_rows)[i % self.num_rows]))
        return rows

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        rows = self.global_rows(step)
        M, W, r = self.micro_batch_size, self.dp_world, self.dp_rank
        out = []
        for a in range(self.grad_accum_steps):
            lo = (a * W + r) * M
            idx = torch.tensor(rows[lo : lo + M], dtype=torch.long)
            out.append({k: v.index_select(0, idx) for k, v in self.data.items()})
        return out

    @property
    def seq_len(self) -> int:
        return int(self.data["input_ids"].shape[1])

    @functools.cached_property
    def data_sha1(self) -> str:
        """Fingerprint of the token rows and labels: resuming on other data (same row count, other
        content, masking or packing) would silently train on a different sequence of batches."""
        h = hashlib.sha1()
        for key in ("input_ids", "labels"):
            h.update(self.data[key].contiguous().numpy())  # buffer protocol: no copy
        return h.hexdigest()

    _STATE_KEYS = ("seed", "num_rows", "global_batch_size", "seq_len", "data_sha1")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE_KEYS}

    def load_state_dict(self, sd: dict) -> None:
        for key in self._STATE_KEYS:  # keys a checkpoint lacks (older format) are not compared
            if key in sd and sd[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume: the checkpoint's data loader had {key}={sd[key]}, "
                    f"the current run has {key}={getattr(self, key)} (data or config changed)"
                )
