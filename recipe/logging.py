"""The one log line of the recipe: printed by the main rank only, flushed at once.

Every component that talks to the user goes through ``log`` (data summaries, checkpoints, profiling,
the train loop), so the rule of who prints lives here and nowhere else. ``rank=None`` reads the rank
from the environment (torchrun's ``RANK``), for code that has no process-group handle (the data
pipeline runs before the model exists).
"""

from __future__ import annotations

import os

__all__ = ["log"]


def log(msg: str, rank: int | None = None) -> None:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(msg, flush=True)
