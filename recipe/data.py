"""Data pipeline: tokenizer loading, record reading, tokenization, packing/padding,
a synthetic dataset and a deterministic, resumable global-batch loader.

Label convention (HF style): ``labels`` is aligned with ``input_ids`` (same length) and
the *model* shifts, i.e. position ``t`` is trained to predict ``labels[t + 1]``. Positions
excluded from the loss hold ``-100``. Consequently ``labels[:, 0]`` is never used as a
target, and "target tokens" are counted as ``(labels[:, 1:] != -100)``.

Per-sample rule shared by all formats: the first token of every sample (usually BOS) is
labelled -100. Inside a packed row this stops the model from being trained to predict the
next document's BOS from the previous document's EOS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from recipe.logging import log

IGNORE_INDEX = -100

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _say(msg: str) -> None:
    """Data summaries: printed by the first rank only (every rank builds the same data)."""
    log(msg, int(os.environ.get("RANK", "0")))


class DataError(ValueError):
    """A problem with the data, the tokenizer or the data-related configuration."""


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    """Load a tokenizer from a local directory (never touches the hub)."""
    if not path:
        raise DataError("no tokenizer path given; set [model] tokenizer = '<dir>'")
    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer directory {path!r} does not exist (or is not a directory); "
            "set [model] tokenizer = '<dir>' to a local directory holding tokenizer files"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise DataError(
            f"no tokenizer in {path}: it holds no tokenizer.json/tokenizer_config.json "
            "(the tokenizer is [model] tokenizer, or the checkpoint directory when that is empty); "
            "copy the tokenizer files there or set [model] tokenizer = '<dir>'"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # pragma: no cover - depends on broken files
        raise DataError(f"could not load the tokenizer from {path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- records


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def read_records(path: str) -> list[dict]:
    """Read JSONL (one JSON object per line), a JSON list (``.json``) or Parquet (``.parquet``)."""
    if path and os.path.isdir(path):
        raise DataError(f"data.path {path!r} is a directory; give one .jsonl, .json or .parquet file")
    if not path or not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".arrow", ".gz", ".zip"):
        raise DataError(f"{path}: {ext} files are not read; data.path takes JSONL (one JSON object per "
                        "line), a JSON list (.json) or Parquet (.parquet)")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(
                f"reading {path} needs pyarrow (an optional dependency): pip install pyarrow"
            ) from e
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"could not read parquet file {path}: {e}") from e
    else:
        # newline="": JSONL lines end at "\n" only, so no universal-newline translation either.
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if ext == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON: {e}") from e
            for i, r in enumerate(records):
                if not isinstance(r, dict):
                    raise DataError(f"{path}: element {i} is a {type(r).__name__}, expected a JSON object")
        else:
            records = []
            # Not str.splitlines(): it also splits on U+2028/U+2029, \x85 and \x1c-\x1e, which
            # json.dumps(ensure_ascii=False) leaves raw inside strings.
            for lineno, line in enumerate(text.split("\n"), start=1):
                line = line.removesuffix("\r")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: line {lineno} is not valid JSON: {e.msg}") from e
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{lineno}: line {lineno} is a JSON {type(obj).__name__}, expected a JSON object"
                    )
                records.append(obj)
    if not records:
        raise DataError(f"data file {path} is empty (no records)")
    return records


# --------------------------------------------------------------------------- tokenization


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _detect_format(rec: dict, text_field, prompt_field, response_field, messages_field) -> str:
    if messages_field in rec:
        return "chat"
    if prompt_field in rec and response_field in rec:
        return "instruction"
    if text_field in rec:
        return "text"
    raise DataError(
        f"cannot detect the data format from the first record's keys {sorted(rec.keys())}; "
        f"expected '{messages_field}' (chat), '{prompt_field}' + '{response_field}' (instruction) "
        f"or '{text_field}' (text). Rename fields with the [data] config keys messages_field, "
        "prompt_field, input_field, response_field, text_field, or set [data] format explicitly"
    )


def _get_str(rec: dict, key: str, idx: int, what: str) -> str:
    if key not in rec:
        raise DataError(f"record {idx} has no '{key}' field ({what}); keys: {sorted(rec.keys())}")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"record {idx}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def _render(tokenizer, messages, add_generation_prompt: bool, idx: int) -> str:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja errors and the template's own raise_exception(...)
        raise DataError(
            f"record {idx}: the tokenizer's chat template failed on this conversation: "
            f"{type(e).__name__}: {e}; fix the record (roles, order) or use a tokenizer whose "
            "chat template accepts it"
        ) from e
    if not isinstance(out, str):  # defensive: some versions may wrap it
        out = out[0] if isinstance(out, list) else str(out)
    return out


def _first_turn_start(tokenizer, message: dict, upto: str, idx: int) -> int | None:
    """Where the content of an opening assistant turn starts in ``upto`` (its rendering), or None.

    There is no earlier turn to render with the generation prompt, and many templates fail on an
    empty conversation, so the turn's own text (content + end-of-turn) is taken from a rendering
    behind a placeholder user turn: BOS, system defaults and the assistant header stay prompt, as
    they do when the conversation opens with a user turn."""
    user = [{"role": "user", "content": "?"}]
    head = _render(tokenizer, user, True, idx)
    both = _render(tokenizer, user + [message], False, idx)
    if not both.startswith(head):
        return None
    turn = both[len(head):]
    if not turn or not upto.endswith(turn):
        return None
    return len(upto) - len(turn)


def _chat_sample(tokenizer, messages, idx: int, mask_prompt: bool) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"record {idx}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"record {idx}: message {j}: every message needs 'role' and 'content'; got {m!r}")
        # A template would render None or a list as its Python repr, silently into the targets.
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise DataError(
                    f"record {idx}: message {j}: '{key}' must be a string, got {type(m[key]).__name__} "
                    f"({m[key]!r:.80}); give every message a string '{key}' (\"\" for an empty turn)"
                )
    full = _render(tokenizer, messages, False, idx)

    # Character spans of assistant turns: [render(msgs[:i], gen_prompt=True), render(msgs[:i+1])).
    # Everything in between (system/user turns, headers) is prompt.
    spans: list[tuple[int, int]] = []
    if mask_prompt:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            upto = _render(tokenizer, messages[: i + 1], False, idx)
            if i > 0:
                prefix = _render(tokenizer, messages[:i], True, idx)
                start, ok = len(prefix), upto.startswith(prefix)
            else:
                start = _first_turn_start(tokenizer, messages[0], upto, idx)
                ok = start is not None
            if not (ok and full.startswith(upto)):
                raise DataError(
                    f"record {idx}: the chat template does not render conversations incrementally "
                    "(a rendered prefix of the conversation is not a prefix of the full rendering), "
                    "so assistant turns cannot be located for prompt masking; set [data] mask_prompt = false"
                )
            spans.append((start, len(upto)))
    else:
        spans.append((0, len(full)))

    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for s, e in spans:
        seg = _encode(tokenizer, full[pos:s])
        ids += seg
        labels += [IGNORE_INDEX] * len(seg)
        seg = _encode(tokenizer, full[s:e])
        ids += seg
        labels += seg
        pos = e
    seg = _encode(tokenizer, full[pos:])
    ids += seg
    labels += [IGNORE_INDEX] * len(seg)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer.bos_token and not full.startswith(tokenizer.bos_token):
        ids = [bos] + ids
        labels = [IGNORE_INDEX] + labels
    if labels:
        labels[0] = IGNORE_INDEX
    return Sample(ids, labels)


def tokenize_records(
    records: Iterable[dict],
    tokenizer,
    fmt: str,
    *,
    text_field: str = "text",
    prompt_field: str = "instruction",
    input_field: str = "input",
    response_field: str = "output",
    messages_field: str = "messages",
    mask_prompt: bool = True,
) -> list[Sample]:
    """Tokenize records into Samples.

    Formats:
      * ``text``: ``bos + text + eos``; every token after the first is a target.
      * ``instruction``: ``bos + prompt + "\\n\\n"`` then ``response + eos`` where prompt is the
        instruction, plus ``"\\n\\n" + input`` when input is present and non-empty. With
        ``mask_prompt`` only ``response + eos`` are targets.
      * ``chat``: ``tokenizer.apply_chat_template``; with ``mask_prompt`` only assistant
        contents and the template's end-of-turn text (e.g. ``<|eot_id|>``) are targets.
      * ``auto``: detected from the first record's keys.
    The first token of every sample is labelled -100 (see module docstring).
    """
    records = list(records)
    if not records:
        raise DataError("no records to tokenize")
    if fmt == "auto":
        fmt = _detect_format(records[0], text_field, prompt_field, response_field, messages_field)
    if fmt not in ("text", "instruction", "chat"):
        raise DataError(f"unknown data format {fmt!r}; expected auto, text, instruction, chat or synthetic")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "format 'chat' needs a tokenizer with a chat_template, but this tokenizer has none "
            "(no chat_template in tokenizer_config.json / chat_template.jinja); use a chat/instruct "
            "tokenizer or the 'instruction'/'text' format"
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    samples: list[Sample] = []
    for idx, rec in enumerate(records):
        if fmt == "text":
            ids = bos + _encode(tokenizer, _get_str(rec, text_field, idx, "text")) + eos
            labels = list(ids)
        elif fmt == "instruction":
            prompt = _get_str(rec, prompt_field, idx, "instruction prompt")
            extra = rec.get(input_field)
            if extra is not None and not isinstance(extra, str):
                raise DataError(f"record {idx}: field '{input_field}' must be a string")
            if extra:
                prompt = prompt + "\n\n" + extra
            response = _get_str(rec, response_field, idx, "response")
            p_ids = bos + _encode(tokenizer, prompt + "\n\n")
            r_ids = _encode(tokenizer, response) + eos
            ids = p_ids + r_ids
            labels = ([IGNORE_INDEX] * len(p_ids) if mask_prompt else list(p_ids)) + list(r_ids)
        else:
            if messages_field not in rec:
                raise DataError(f"record {idx} has no '{messages_field}' field; keys: {sorted(rec.keys())}")
            s = _chat_sample(tokenizer, rec[messages_field], idx, mask_prompt)
            ids, labels = s.input_ids, s.labels
        if labels:
            labels[0] = IGNORE_INDEX
        samples.append(Sample(list(ids), labels))
    return samples


# --------------------------------------------------------------------------- packing / padding


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that actually contribute to the loss under the HF shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


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
        _say(f"[data] note: {empty_rows} of {lab.shape[0]} rows have no target tokens")
    return {"input_ids": input_ids, "labels": lab, "attention_mask": attn, "position_ids": position_ids}


# --------------------------------------------------------------------------- synthetic


def synthetic_dataset(vocab_size: int, seq_len: int, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Random but learnable data.

    Tokens are drawn from a small active sub-vocabulary (<= 256 ids) and follow a fixed random
    bigram table: with probability 0.8 the next token is ``table[cur]``, otherwise uniform over
    the active set. A model first learns the unigram support (loss drops from ln(vocab) to about
    ln(256)), then the bigram table (towards ~1.3 nats), so loss visibly falls in a short run.
    """
    if vocab_size < 2 or seq_len < 2 or num_samples < 1:
        raise DataError(f"bad synthetic dataset shape: vocab={vocab_size} seq_len={seq_len} n={num_samples}")
    g = torch.Generator().manual_seed(int(seed))
    k = min(vocab_size, 256)
    active = torch.randperm(vocab_size, generator=g)[:k]
    table = torch.randint(0, k, (k,), generator=g)
    cur = torch.randint(0, k, (num_samples,), generator=g)
    out = torch.empty((num_samples, seq_len), dtype=torch.long)
    follow = torch.rand((num_samples, seq_len), generator=g) < 0.8
    rand_next = torch.randint(0, k, (num_samples, seq_len), generator=g)
    for t in range(seq_len):
        out[:, t] = cur
        cur = torch.where(follow[:, t], table[cur], rand_next[:, t])
    input_ids = active[out]
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(seq_len, dtype=torch.long).expand(num_samples, seq_len).clone(),
    }


# --------------------------------------------------------------------------- loader


class GlobalBatchLoader:
    """Deterministic global-batch loader for data parallelism with gradient accumulation.

    Global sample index ``i = step * G + j`` (``j`` in ``0..G-1``) maps to
    ``epoch = i // num_rows``, ``pos = i % num_rows``, ``row = perm(epoch)[pos]`` where
    ``perm(epoch)`` is a ``torch.randperm`` from a generator seeded by ``(seed, epoch)``.

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
        if micro_batch_size < 1 or dp_world < 1 or global_batch_size < 1:
            raise DataError(
                f"batch sizes must be positive: global_batch_size={global_batch_size}, "
                f"micro_batch_size={micro_batch_size}, dp_world={dp_world}"
            )
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank={dp_rank} out of range for dp_world={dp_world}")
        unit = micro_batch_size * dp_world
        if global_batch_size % unit:
            lo = max(unit, (global_batch_size // unit) * unit)
            hi = (global_batch_size // unit + 1) * unit
            sugg = f"{lo} or {hi}" if lo != hi and lo != global_batch_size else f"{hi}"
            raise DataError(
                f"global_batch_size={global_batch_size} is not divisible by micro_batch_size="
                f"{micro_batch_size} x dp_world={dp_world} (= {unit}); use a multiple of {unit}, "
                f"e.g. global_batch_size = {sugg}"
            )
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
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
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


# --------------------------------------------------------------------------- entry point


def build_data(cfg_data: Any, tokenizer_or_none, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Build the full row tensor dict from the [data] config section."""
    path = getattr(cfg_data, "path", "") or ""
    fmt = getattr(cfg_data, "format", "auto") or "auto"
    seq_len = int(cfg_data.seq_len)
    if path and fmt == "synthetic":
        # The shipped configs set format = "synthetic"; a path added on top must not be dropped.
        raise DataError(
            f"data.path is set ({path!r}) but data.format = 'synthetic', which ignores it; use "
            "--data.format=auto (or text/instruction/chat) to train on the file, or clear data.path"
        )
    if path == "" or fmt == "synthetic":
        n = int(getattr(cfg_data, "num_synthetic_samples", 0) or 0)
        if n < 1:
            raise DataError("synthetic data needs [data] num_synthetic_samples >= 1")
        data = synthetic_dataset(vocab_size, seq_len, n, seed)
        _say(f"[data] synthetic: {n} rows x {seq_len} tokens, vocab {vocab_size}")
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
    _say(
        f"[data] {path}: {len(records)} records, {n_tok} tokens, {data['input_ids'].shape[0]} rows "
        f"x {seq_len} ({'packed' if cfg_data.packing else 'padded'}), "
        f"{count_targets(data['labels'])} target tokens"
    )
    return data
