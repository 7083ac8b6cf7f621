"""Data pipeline: from the [data] config section to the row tensors the loader serves.

One file per job; ``build_data`` below chains them:

* ``tokenizer``: ``load_tokenizer``, local directories only.
* ``records``: ``read_records``, JSONL / JSON list / Parquet into dicts.
* ``formats``: ``tokenize_records``, the text / instruction / chat / oig formats into ``Sample``s.
* ``packing``: ``pack_or_pad`` into fixed-length rows; ``count_targets``.
* ``synthetic``: ``synthetic_dataset``, for runs without a data file.
* ``loader``: ``GlobalBatchLoader`` and the batch layout rule (``resolve_global_batch_size``).
* ``errors``: ``DataError``, raised by all of them.

Label convention (HF style): ``labels`` is aligned with ``input_ids`` (same length) and the *model*
shifts, i.e. position ``t`` is trained to predict ``labels[t + 1]``. Positions excluded from the loss hold
``IGNORE_INDEX`` (-100, from ``models.llama``). Consequently ``labels[:, 0]`` is never used as a target,
and "target tokens" are counted as ``(labels[:, 1:] != IGNORE_INDEX)``.
"""

from __future__ import annotations

from typing import Any

import torch

from recipe.data.errors import DataError
from recipe.data.formats import Sample, tokenize_records
from recipe.data.loader import GlobalBatchLoader, batch_layout_problem, resolve_global_batch_size
from recipe.data.packing import count_targets, drop_trivial_masks, pack_or_pad
from recipe.data.records import read_records
from recipe.data.synthetic import synthetic_dataset
from recipe.data.tokenizer import load_tokenizer
from recipe.logging import log

__all__ = [
    "DataError",
    "GlobalBatchLoader",
    "Sample",
    "batch_layout_problem",
    "build_data",
    "count_targets",
    "drop_trivial_masks",
    "load_tokenizer",
    "pack_or_pad",
    "read_records",
    "resolve_global_batch_size",
    "synthetic_dataset",
    "tokenize_records",
]


def build_data(cfg_data: Any, tokenizer_or_none, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Build the full row tensor dict from the [data] config section."""
    path = getattr(cfg_data, "path", "") or ""
    fmt = getattr(cfg_data, "format", "auto") or "auto"
    seq_len = int(cfg_data.seq_len)
    if path and fmt == "synthetic":
        # The shipped configs set format = "synthetic"; a path added on top must not be dropped.
        raise DataError(
            f"data.path is set ({path!r}) but data.format = 'synthetic', which ignores it; use "
            "--data.format=auto (or text/instruction/chat/oig) to train on the file, or clear data.path"
        )
    if path == "" or fmt == "synthetic":
        n = int(getattr(cfg_data, "num_synthetic_samples", 0) or 0)
        if n < 1:
            raise DataError("synthetic data needs [data] num_synthetic_samples >= 1")
        data = synthetic_dataset(vocab_size, seq_len, n, seed)
        log(f"[data] synthetic: {n} rows x {seq_len} tokens, vocab {vocab_size}")
        return data
    if tokenizer_or_none is None:
        raise DataError(f"[data] path = {path!r} needs a tokenizer, but none was loaded")
    tok = tokenizer_or_none
    records = read_records(path)
    samples = tokenize_records(
        records,
        tok,
        fmt,
        text_field=cfg_data.text_field,
        prompt_field=cfg_data.prompt_field,
        input_field=cfg_data.input_field,
        response_field=cfg_data.response_field,
        messages_field=cfg_data.messages_field,
        mask_prompt=bool(cfg_data.mask_prompt),
    )
    max_id = max((max(s.input_ids) for s in samples if s.input_ids), default=-1)
    if max_id >= vocab_size:
        raise DataError(
            f"token id {max_id} >= the model's vocab_size {vocab_size}: the tokenizer does not "
            "match the model (set [model] tokenizer to the model's own tokenizer)"
        )
    pad_id = tok.pad_token_id
    if pad_id is None:
        pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0
    data = pack_or_pad(samples, seq_len, bool(cfg_data.packing), int(pad_id))
    n_tok = sum(len(s.input_ids) for s in samples)
    log(
        f"[data] {path}: {len(records)} records, {n_tok} tokens, {data['input_ids'].shape[0]} rows "
        f"x {seq_len} ({'packed' if cfg_data.packing else 'padded'}), "
        f"{count_targets(data['labels'])} target tokens"
    )
    return data
