"""Tokenizing records into ``Sample``s: the ``text``, ``instruction``, ``chat`` and ``oig`` formats, and
the prompt masking of chat conversations through the tokenizer's chat template.

Per-sample rule shared by all formats: the first token of every sample (usually BOS) is labelled -100.
Inside a packed row this stops the model from being trained to predict the next document's BOS from the
previous document's EOS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from models.llama import IGNORE_INDEX
from recipe.data.errors import DataError

__all__ = ["Sample", "tokenize_records"]


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# The turn markers of LAION's OIG files (e.g. unified_chip2.jsonl): "<human>: ...\n<bot>: ...", repeated.
OIG_HUMAN, OIG_BOT = "<human>:", "<bot>:"
_OIG_MARKER = re.compile(f"({re.escape(OIG_HUMAN)}|{re.escape(OIG_BOT)})")


def _looks_oig(text) -> bool:
    return isinstance(text, str) and OIG_HUMAN in text and OIG_BOT in text


def _detect_format(rec: dict, text_field, prompt_field, response_field, messages_field) -> str:
    if messages_field in rec:
        return "chat"
    if prompt_field in rec and response_field in rec:
        return "instruction"
    if text_field in rec:
        # Trained as plain text, an OIG conversation would silently teach the prompts too.
        return "oig" if _looks_oig(rec[text_field]) else "text"
    raise DataError(
        f"cannot detect the data format from the first record's keys {sorted(rec.keys())}; "
        f"expected '{messages_field}' (chat), '{prompt_field}' + '{response_field}' (instruction) "
        f"or '{text_field}' (text, or oig with {OIG_HUMAN} / {OIG_BOT} turns). Rename fields with the [data] "
        "config keys messages_field, "
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
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
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
    turn = both[len(head) :]
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


def _oig_sample(tokenizer, text: str, idx: int, mask_prompt: bool, bos: list[int], eos: list[int]) -> Sample:
    """``bos + text + eos``; with ``mask_prompt`` only what follows each ``<bot>:`` marker, up to the
    next ``<human>:`` marker (its newline included: the model learns to end a turn), and the final eos
    after a closing bot turn are targets."""
    parts = _OIG_MARKER.split(text)  # [before the first marker, marker, body, marker, body, ...]
    turns = list(zip(parts[1::2], parts[2::2], strict=True))
    if not any(marker == OIG_BOT for marker, _ in turns):
        raise DataError(
            f"record {idx}: format 'oig' needs text with {OIG_HUMAN} / {OIG_BOT} turns, but this text has no "
            f"{OIG_BOT} turn ({text[:80]!r}); drop the record, or use format 'text' to train on all of it"
        )
    # (text, is_target) pieces, tokenized separately so that a target never shares a token with a prompt.
    pieces: list[tuple[str, bool]] = []
    prompt = parts[0]
    for marker, body in turns:
        prompt += marker
        if marker == OIG_HUMAN:
            prompt += body
            continue
        pieces += [(prompt, False), (body, True)]
        prompt = ""
    pieces.append((prompt, False))
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for piece, target in pieces:
        seg = _encode(tokenizer, piece)
        ids += seg
        labels += seg if target or not mask_prompt else [IGNORE_INDEX] * len(seg)
    # The eos closes the bot's answer; after a trailing human turn it is prompt like that turn.
    ends_with_bot = turns[-1][0] == OIG_BOT
    ids += eos
    labels += eos if ends_with_bot or not mask_prompt else [IGNORE_INDEX] * len(eos)
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
      * ``oig``: LAION OIG ``text`` with ``<human>:`` / ``<bot>:`` turns (one or many), ``bos + text +
        eos``; with ``mask_prompt`` only the bot turns (up to the next ``<human>:``) and the closing eos
        are targets.
      * ``auto``: detected from the first record's keys (``text`` holding both markers is ``oig``).
    The first token of every sample is labelled -100 (see module docstring).
    """
    records = list(records)
    if not records:
        raise DataError("no records to tokenize")
    if fmt == "auto":
        fmt = _detect_format(records[0], text_field, prompt_field, response_field, messages_field)
    if fmt not in ("text", "instruction", "chat", "oig"):
        raise DataError(f"unknown data format {fmt!r}; expected auto, text, instruction, chat, oig or synthetic")
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
        elif fmt == "oig":
            s = _oig_sample(tokenizer, _get_str(rec, text_field, idx, "oig text"), idx, mask_prompt, bos, eos)
            ids, labels = s.input_ids, s.labels
        else:
            if messages_field not in rec:
                raise DataError(f"record {idx} has no '{messages_field}' field; keys: {sorted(rec.keys())}")
            s = _chat_sample(tokenizer, rec[messages_field], idx, mask_prompt)
            ids, labels = s.input_ids, s.labels
        if labels:
            labels[0] = IGNORE_INDEX
        samples.append(Sample(list(ids), labels))
    return samples
