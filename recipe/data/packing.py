"""From tokenized samples to fixed-length rows (packing or padding), and the count of target tokens.

``count_targets`` lives next to the padding because both follow the HF label shift of the model
(``models.llama``): position ``t`` is trained to predict ``labels[t + 1]``, so ``labels[:, 0]`` is never
a target and padding is labelled ``IGNORE_INDEX``.
"""

from __future__ import annotations

import math
import warnings

import torch

from models.llama import IGNORE_INDEX
from recipe.data.errors import DataError
from recipe.data.formats import Sample
from recipe.logging import log

__all__ = ["count_targets", "drop_trivial_masks", "pack_or_pad"]


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that actually contribute to the loss under the HF shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def drop_trivial_masks(mb: dict) -> dict:
    """Drop an all-ones attention_mask and position_ids equal to 0..T-1, checked on the CPU copy (or
    with one device read): the model then takes the pure-causal (flash) attention path and never
    inspects them on the GPU. Packed rows (positions restarting at 0) keep position_ids: the model
    masks attention between their documents. Used by both training loops (``recipe.train`` and
    ``recipe.hf_trainer``)."""
    mb = dict(mb)
    if "attention_mask" in mb and bool(mb["attention_mask"].all()):
        del mb["attention_mask"]
    pos = mb.get("position_ids")
    if pos is not None and torch.equal(pos, torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)):
        del mb["position_ids"]
    return mb


def pack_or_pad(samples: list[Sample], seq_len: int, packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Turn samples into fixed-length rows.

    packing=True: samples are concatenated in order and cut into rows of ``seq_len``.
    ``position_ids`` restart at 0 at every sample start *and* at every row start (a document
    that spills into the next row continues there from position 0, since the row cannot attend
    to its earlier part anyway). The final partial row is right-padded (pad_id, label -100,
    attention_mask 0, positions keep counting).

    packing=False: one sample per row, truncated to ``seq_len`` (one warning with the count),
    right-padded the same way; position_ids are 0..seq_len-1.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    samples = [s for s in samples if len(s.input_ids) > 0]
    if not samples:
        raise DataError("no tokens in the dataset (all samples are empty)")
    for s in samples:
        if len(s.input_ids) != len(s.labels):
            raise DataError("a sample has input_ids and labels of different lengths")

    if packing:
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        pos = [p for s in samples for p in range(len(s.input_ids))]
        n = math.ceil(len(ids) / seq_len)
        total = n * seq_len
        pad = total - len(ids)
        input_ids = torch.tensor(ids + [pad_id] * pad, dtype=torch.long).view(n, seq_len)
        lab = torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long).view(n, seq_len)
        attn = torch.ones(total, dtype=torch.long)
        if pad:
            attn[-pad:] = 0
        attn = attn.view(n, seq_len)
        # positions: per-document, restarted at each row start
        doc_pos = torch.tensor(pos + [0] * pad, dtype=torch.long).view(n, seq_len)
        # offset within the row for documents that started in a previous row
        starts = (doc_pos == 0).long()
        starts[:, 0] = 1
        col = torch.arange(seq_len).expand(n, seq_len)
        last_start = torch.cummax(torch.where(starts.bool(), col, torch.zeros_like(col)), dim=1).values
        position_ids = col - last_start
        if pad:  # padding continues counting after the last real token
            row = position_ids[-1]
            first_pad = seq_len - pad
            base = int(row[first_pad - 1]) + 1 if first_pad > 0 else 0
            row[first_pad:] = torch.arange(base, base + pad)
    else:
        n = len(samples)
        input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
        lab = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((n, seq_len), dtype=torch.long)
        truncated = 0
        for i, s in enumerate(samples):
            L = len(s.input_ids)
            if L > seq_len:
                truncated += 1
                L = seq_len
            input_ids[i, :L] = torch.tensor(s.input_ids[:L], dtype=torch.long)
            lab[i, :L] = torch.tensor(s.labels[:L], dtype=torch.long)
            attn[i, :L] = 1
        if truncated:
            warnings.warn(
                f"{truncated} of {n} samples were longer than seq_len={seq_len} and were truncated",
                stacklevel=2,
            )
        position_ids = torch.arange(seq_len, dtype=torch.long).expand(n, seq_len).clone()

    per_row = (lab[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if int(per_row.sum()) == 0:
        raise DataError(
            "the dataset has zero target tokens (every label is -100): check mask_prompt, the "
            "data format and seq_len (responses may have been truncated away)"
        )
    empty_rows = int((per_row == 0).sum())
    if empty_rows:
        log(f"[data] note: {empty_rows} of {lab.shape[0]} rows have no target tokens")
    return {"input_ids": input_ids, "labels": lab, "attention_mask": attn, "position_ids": position_ids}
