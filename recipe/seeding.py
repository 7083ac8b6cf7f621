"""How the one ``job.seed`` becomes every other seed of a run: the only place seeds are mixed.

Each stream gets its own derived seed, so changing how one is drawn never shifts another: the data
order per epoch, the per-rank dropout stream, and the streams a resume onto another world size
reseeds. (LoRA initialisation hashes the parameter name instead: ``models.lora.lora_init_tensor``,
so that it is the same on any world size.)
"""

from __future__ import annotations

__all__ = ["derive_seed", "rank_seed"]

_MULT = 1_000_003
_MOD = 2**63 - 1  # torch.Generator.manual_seed takes values below 2**63


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for the stream named by ``keys`` (e.g. ``(epoch,)`` or ``(step, rank)``)."""
    out = int(seed)
    for k in keys:
        out = out * _MULT + int(k)
    return out % _MOD


def rank_seed(seed: int, rank: int) -> int:
    """The global generator's seed on ``rank`` (dropout): ranks hold different samples, so they must
    not draw the same masks."""
    return int(seed) + int(rank)
