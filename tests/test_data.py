import itertools
import json
import types
from collections import Counter

import pytest
import torch

from recipe.data import (
    DataError,
    GlobalBatchLoader,
    Sample,
    build_data,
    count_targets,
    load_tokenizer,
    pack_or_pad,
    read_records,
    synthetic_dataset,
    tokenize_records,
)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_tokenizer_dir(path, chat_template=CHAT_TEMPLATE):
    """A tiny byte-level tokenizer (256 byte tokens + Llama-3-style specials), saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    kw = dict(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
    )
    fast = PreTrainedTokenizerFast(**kw)
    if chat_template is not None:
        fast.chat_template = chat_template
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_nochat(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok_nochat"), chat_template=None))


def target_spans(tokenizer, s: Sample):
    """Decode each contiguous run of target tokens (labels != -100)."""
    spans, cur = [], []
    for i, lab in zip(s.input_ids, s.labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tokenizer.decode(c) for c in spans]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tok):
    ids = tok("héllo <|eot_id|> world", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in ids
    assert tok.decode(ids) == "héllo <|eot_id|> world"
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    empty = tmp_path / "ckpt"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(DataError) as ei:
        load_tokenizer(str(empty))
    msg = str(ei.value)
    assert f"no tokenizer in {empty}" in msg
    assert "[model] tokenizer = '<dir>'" in msg and "tokenizer.json" in msg


# ----------------------------------------------------------------- formats


def test_text_format(tok):
    (s,) = tokenize_records([{"text": "hello world"}], tok, "text")
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
    assert tok.decode(s.input_ids[1:-1]) == "hello world"
    assert s.labels[0] == -100 and s.labels[1:] == s.input_ids[1:]


def test_instruction_format_masking(tok):
    recs = [
        {"instruction": "Add", "input": "2+2", "output": "4 it is"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "No input key", "output": "ok"},
    ]
    samples = tokenize_records(recs, tok, "instruction")
    for s, r in zip(samples, recs, strict=True):
        assert target_spans(tok, s) == [r["output"] + "<|end_of_text|>"]
    assert tok.decode(samples[0].input_ids) == "<|begin_of_text|>Add\n\n2+2\n\n4 it is<|end_of_text|>"
    assert tok.decode(samples[1].input_ids) == "<|begin_of_text|>Say hi\n\nhi<|end_of_text|>"
    # no masking: everything but the first token
    (s,) = tokenize_records(recs[:1], tok, "instruction", mask_prompt=False)
    assert s.labels[0] == -100 and s.labels[1:] == s.input_ids[1:]


def test_chat_format_masking(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (s,) = tokenize_records([{"messages": msgs}], tok, "chat")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(s.input_ids) == full
    assert s.input_ids.count(tok.bos_token_id) == 1  # template adds bos; we don't add another
    assert target_spans(tok, s) == ["Hello there.<|eot_id|>", "4<|eot_id|>"]
    (s2,) = tokenize_records([{"messages": msgs}], tok, "chat", mask_prompt=False)
    assert s2.input_ids == s.input_ids
    assert s2.labels[0] == -100 and s2.labels[1:] == s2.input_ids[1:]


@pytest.mark.parametrize("content", [None, ["part"], {"type": "text"}, 3])
def test_chat_content_must_be_str(tok, content):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    with pytest.raises(DataError) as ei:
        tokenize_records([good, bad], tok, "chat")
    msg = str(ei.value)
    assert "record 1" in msg and "message 1" in msg and "'content'" in msg and "string" in msg
    with pytest.raises(DataError, match="record 0: message 0"):
        tokenize_records([{"messages": [{"role": "user", "content": None}]}], tok, "chat", mask_prompt=False)


def test_chat_template_error_is_data_error(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok", chat_template=template))
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}
    tokenize_records([ok], tok, "chat")
    with pytest.raises(DataError) as ei:
        tokenize_records([ok, bad], tok, "chat")
    msg = str(ei.value)
    assert "record 1" in msg and "chat template" in msg and "no tool turns" in msg


def test_chat_assistant_first_masking(tok):
    # Only assistant contents + end-of-turn are targets, whichever role opens the conversation.
    msgs = [
        {"role": "assistant", "content": "Welcome!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (s,) = tokenize_records([{"messages": msgs}], tok, "chat")
    assert tok.decode(s.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert target_spans(tok, s) == ["Welcome!<|eot_id|>", "4<|eot_id|>"]
    (one,) = tokenize_records([{"messages": msgs[:1]}], tok, "chat")
    assert target_spans(tok, one) == ["Welcome!<|eot_id|>"]


def test_chat_without_template(tok_nochat):
    with pytest.raises(DataError, match="chat_template"):
        tokenize_records([{"messages": [{"role": "user", "content": "x"}]}], tok_nochat, "chat")
    with pytest.raises(DataError, match="chat_template"):
        tokenize_records([{"messages": [{"role": "user", "content": "x"}]}], tok_nochat, "auto")


def test_auto_detection_and_custom_fields(tok):
    chat = tokenize_records(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], tok, "auto"
    )
    assert target_spans(tok, chat[0]) == ["a<|eot_id|>"]
    inst = tokenize_records([{"instruction": "q", "output": "a", "text": "ignored"}], tok, "auto")
    assert target_spans(tok, inst[0]) == ["a<|end_of_text|>"]
    text = tokenize_records([{"text": "abc"}], tok, "auto")
    assert target_spans(tok, text[0]) == ["abc<|end_of_text|>"]
    custom = tokenize_records([{"q": "Q", "a": "A"}], tok, "auto", prompt_field="q", response_field="a")
    assert target_spans(tok, custom[0]) == ["A<|end_of_text|>"]
    with pytest.raises(DataError) as ei:
        tokenize_records([{"foo": 1, "bar": 2}], tok, "auto")
    msg = str(ei.value)
    for s in ("'bar'", "'foo'", "messages", "instruction", "output", "text", "[data]", "text_field"):
        assert s in msg
    with pytest.raises(DataError, match="record 1"):
        tokenize_records([{"text": "a"}, {"other": "b"}], tok, "text")
    with pytest.raises(DataError, match="unknown data format"):
        tokenize_records([{"text": "a"}], tok, "weird")


def test_oig_format_masking(tok):
    one = "<human>: What is 2+2?\n<bot>: 4, of course."
    multi = "<human>: Hi\n<bot>: Hello!\n<human>: Name a color.\n<bot>: Blue."
    trailing_human = "<human>: A\n<bot>: B\n<human>: C?"
    recs = [{"text": t, "metadata": {"source": "unified_chip2"}} for t in (one, multi, trailing_human)]
    samples = tokenize_records(recs, tok, "oig")
    # The oracle: the decoded token runs the loss sees, and the whole sample.
    assert target_spans(tok, samples[0]) == [" 4, of course.<|end_of_text|>"]
    assert target_spans(tok, samples[1]) == [" Hello!\n", " Blue.<|end_of_text|>"]
    assert target_spans(tok, samples[2]) == [" B\n"]  # an unanswered human turn and its eos stay prompt
    for s, t in zip(samples, (one, multi, trailing_human), strict=True):
        assert tok.decode(s.input_ids) == "<|begin_of_text|>" + t + "<|end_of_text|>"
    # Detected from the markers in the text field; without them it stays plain text.
    assert tokenize_records(recs[:2], tok, "auto") == samples[:2]
    assert target_spans(tok, tokenize_records([{"text": "<human>: only"}], tok, "auto")[0]) == [
        "<human>: only<|end_of_text|>"
    ]
    # No masking: everything but the first token.
    (s,) = tokenize_records(recs[1:2], tok, "oig", mask_prompt=False)
    assert s.input_ids == samples[1].input_ids and s.labels[0] == -100 and s.labels[1:] == s.input_ids[1:]
    (s,) = tokenize_records([{"body": one}], tok, "oig", text_field="body")
    assert s == samples[0]


def test_oig_format_errors(tok):
    with pytest.raises(DataError, match=r"record 1: format 'oig' needs .*<bot>: turn.*format 'text'"):
        tokenize_records([{"text": "<human>: a\n<bot>: b"}, {"text": "<human>: no answer"}], tok, "oig")
    with pytest.raises(DataError, match="record 0 has no 'text' field"):
        tokenize_records([{"messages_x": "<human>: a\n<bot>: b"}], tok, "oig")


def test_build_data_oig_file(tok, tmp_path):
    recs = [{"text": f"<human>: {i} plus one?\n<bot>: {i + 1}."} for i in range(20)]
    # Padded rows (packing would split a record over two rows, whose first label is never a target).
    cfg = _cfg(path=write_jsonl(tmp_path / "chip2.jsonl", recs), format="oig", seq_len=64, packing=False)
    data = build_data(cfg, tok, vocab_size=len(tok), seed=0)
    # Targets: the answer " {i+1}." and eos of each record (byte-level tokenizer: one token per byte).
    assert count_targets(data["labels"]) == sum(len(f" {i + 1}.") + 1 for i in range(20))


# ----------------------------------------------------------------- reading


def test_read_records_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    assert read_records(p) == [{"text": "a"}, {"text": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DataError) as ei:
        read_records(str(bad))
    assert "bad.jsonl" in str(ei.value) and "line 3" in str(ei.value)
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(str(notobj))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_records(str(empty))
    with pytest.raises(DataError, match="missing.jsonl"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_malformed_jsonl_line_names_its_column(tmp_path):
    """The message keeps json's column (the line's own, 1-based), as path:line:column and in words."""
    line = '{"text": "ok", "label": oops}'
    try:
        json.loads(line)
    except json.JSONDecodeError as e:
        col = e.colno  # the oracle: json's own position of the error on this line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as ei:
        read_records(str(bad))
    assert col == 25 and f"{bad}:2:{col}: line 2, column {col} is not valid JSON" in str(ei.value), str(ei.value)


def test_read_records_jsonl_unicode_line_breaks(tmp_path):
    # json.dumps(ensure_ascii=False) writes these raw inside strings; str.splitlines() would split on them.
    weird = "a\u2028b\u2029c\x85d\x1ce\x1df\x1eg\x0bh\x0ci"
    recs = [{"text": weird}, {"text": "next"}]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert "\u2028" in p.read_text(encoding="utf-8")
    assert read_records(str(p)) == recs
    # CRLF line ends are fine, and line numbers in errors still count only "\n"
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(
        (json.dumps({"text": weird}, ensure_ascii=False) + "\r\n\r\n" + '{"text": oops}\r\n').encode("utf-8")
    )
    with pytest.raises(DataError) as ei:
        read_records(str(crlf))
    assert "crlf.jsonl:3:" in str(ei.value) and "line 3" in str(ei.value)
    crlf.write_bytes((json.dumps({"text": weird}, ensure_ascii=False) + "\r\n").encode("utf-8"))
    assert read_records(str(crlf)) == [{"text": weird}]


def test_read_records_parquet_missing_pyarrow(tmp_path, monkeypatch):
    import builtins

    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_records(str(p))


def test_read_records_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = [{"instruction": "i", "output": "o"}, {"instruction": "j", "output": "p"}]
    pq.write_table(pa.Table.from_pylist(recs), str(tmp_path / "d.parquet"))
    assert read_records(str(tmp_path / "d.parquet")) == recs


# ----------------------------------------------------------------- packing / padding


def _s(ids, labels=None):
    return Sample(list(ids), list(ids) if labels is None else list(labels))


def test_packing_rows_and_positions():
    samples = [_s([1, 2, 3]), _s([4, 5, 6, 7, 8], [-100, -100, 6, 7, 8]), _s([9, 10])]
    out = pack_or_pad(samples, 4, packing=True, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert out["labels"].tolist() == [[1, 2, 3, -100], [-100, 6, 7, 8], [9, 10, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    # restart at each document start and at each row start; padding keeps counting
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3]]
    for k in out:
        assert out[k].dtype == torch.long and out[k].shape == (3, 4)


def test_packing_exact_fit_and_long_doc():
    out = pack_or_pad([_s(range(1, 9)), _s([20, 21])], 4, packing=True, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [20, 21, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    out = pack_or_pad([_s([1, 2]), _s([3, 4])], 4, packing=True, pad_id=0)
    assert out["position_ids"].tolist() == [[0, 1, 0, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1]]


def test_padding_and_truncation():
    samples = [_s([1, 2, 3], [-100, 2, 3]), _s([4, 5, 6, 7, 8, 9])]
    with pytest.warns(UserWarning, match="1 of 2 samples"):
        out = pack_or_pad(samples, 4, packing=False, pad_id=99)
    assert out["input_ids"].tolist() == [[1, 2, 3, 99], [4, 5, 6, 7]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [4, 5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_zero_targets(capsys):
    with pytest.raises(DataError, match="zero target tokens"):
        pack_or_pad([_s([1, 2, 3], [-100] * 3)], 4, packing=False, pad_id=0)
    out = pack_or_pad([_s([1, 2], [-100, -100]), _s([3, 4])], 4, packing=False, pad_id=0)
    assert count_targets(out["labels"]) == 1
    assert "1 of 2 rows have no target tokens" in capsys.readouterr().out


# ----------------------------------------------------------------- synthetic


def test_synthetic_dataset():
    a = synthetic_dataset(1000, 64, 8, seed=3)
    b = synthetic_dataset(1000, 64, 8, seed=3)
    c = synthetic_dataset(1000, 64, 8, seed=4)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    x = a["input_ids"]
    assert x.shape == (8, 64) and x.dtype == torch.long and 0 <= x.min() and x.max() < 1000
    assert torch.equal(a["labels"], x) and a["attention_mask"].eq(1).all()
    assert a["position_ids"][3].tolist() == list(range(64))
    # learnable: the most frequent successor of each token accounts for most transitions
    succ = {}
    for row in x.tolist():
        for u, v in itertools.pairwise(row):
            succ.setdefault(u, Counter())[v] += 1
    top = sum(c.most_common(1)[0][1] for c in succ.values())
    assert top / (8 * 63) > 0.6
    assert synthetic_dataset(5, 8, 2, 0)["input_ids"].max() < 5


# ----------------------------------------------------------------- loader


def _rows_data(n, seq=3):
    ids = torch.arange(n).unsqueeze(1) * 10 + torch.arange(seq)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(seq).expand(n, seq).clone(),
    }


def _row_ids(mb):
    return (mb["input_ids"][:, 0] // 10).tolist()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_loader_union_matches_single_rank(world):
    data = _rows_data(37)
    G, M = 16, 2
    ref = GlobalBatchLoader(data, G, M, 0, 1, seed=7)
    assert ref.grad_accum_steps == G // M
    for step in range(5):
        ref_rows = [r for mb in ref.micro_batches(step) for r in _row_ids(mb)]
        assert ref_rows == ref.global_rows(step)
        union = []
        for rank in range(world):
            ld = GlobalBatchLoader(data, G, M, rank, world, seed=7)
            assert ld.grad_accum_steps == G // (M * world)
            mbs = ld.micro_batches(step)
            assert len(mbs) == ld.grad_accum_steps
            for a, mb in enumerate(mbs):
                assert mb["input_ids"].shape == (M, 3)
                assert set(mb) == set(data)
                lo = (a * world + rank) * M
                assert _row_ids(mb) == ref_rows[lo : lo + M]
                union += _row_ids(mb)
        assert Counter(union) == Counter(ref_rows)


def test_loader_epochs_and_determinism():
    n, G = 10, 4
    data = _rows_data(n)
    a = GlobalBatchLoader(data, G, 2, 0, 1, seed=1)
    b = GlobalBatchLoader(data, G, 2, 0, 1, seed=1)
    c = GlobalBatchLoader(data, G, 2, 0, 1, seed=2)
    stream = [r for s in range(10) for r in a.global_rows(s)]  # 40 = 4 epochs
    for e in range(4):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))  # each epoch is a permutation
    assert stream[:n] != stream[n : 2 * n]  # epochs reshuffle
    # pure function of (seed, step): order of calls / fresh instances don't matter
    for s in (7, 2, 0, 9):
        for x, y in zip(a.micro_batches(s), b.micro_batches(s), strict=True):
            for k in x:
                assert torch.equal(x[k], y[k])
    assert [a.global_rows(s) for s in range(3)] != [c.global_rows(s) for s in range(3)]
    # step 2 straddles the epoch boundary (indices 8..11)
    assert a.global_rows(2) == stream[8:12]


def test_loader_state_dict():
    data = _rows_data(12)
    ld = GlobalBatchLoader(data, 4, 1, 0, 2, seed=5)
    sd = ld.state_dict()
    assert sd["seed"] == 5 and sd["num_rows"] == 12
    GlobalBatchLoader(data, 4, 1, 1, 2, seed=5).load_state_dict(sd)
    with pytest.raises(DataError, match="seed"):
        GlobalBatchLoader(data, 4, 1, 0, 2, seed=6).load_state_dict(sd)
    with pytest.raises(DataError, match="num_rows"):
        GlobalBatchLoader(_rows_data(13), 4, 1, 0, 2, seed=5).load_state_dict(sd)


def test_loader_errors():
    data = _rows_data(20)
    with pytest.raises(DataError) as ei:
        GlobalBatchLoader(data, 6, 2, 0, 2, seed=0)
    msg = str(ei.value)
    assert "global_batch_size=6" in msg and "micro_batch_size=2" in msg and "dp_world=2" in msg
    assert "4 or 8" in msg
    with pytest.raises(DataError, match="fewer than global_batch_size=32"):
        GlobalBatchLoader(data, 32, 2, 0, 2, seed=0)
    with pytest.raises(DataError, match="dp_rank"):
        GlobalBatchLoader(data, 8, 2, 2, 2, seed=0)


# ----------------------------------------------------------------- build_data


def _cfg(**kw):
    base = dict(
        path="",
        format="auto",
        seq_len=32,
        packing=True,
        mask_prompt=True,
        text_field="text",
        prompt_field="instruction",
        input_field="input",
        response_field="output",
        messages_field="messages",
        num_synthetic_samples=6,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_build_data_synthetic():
    d = build_data(_cfg(), None, vocab_size=500, seed=0)
    assert d["input_ids"].shape == (6, 32) and d["input_ids"].max() < 500
    d2 = build_data(_cfg(format="synthetic"), None, vocab_size=500, seed=0)
    assert torch.equal(d["input_ids"], d2["input_ids"])


def test_build_data_path_with_synthetic_format(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    # a path that is set must never be silently ignored
    with pytest.raises(DataError) as ei:
        build_data(_cfg(path=p, format="synthetic"), tok, vocab_size=len(tok), seed=0)
    msg = str(ei.value)
    assert "data.path" in msg and "'synthetic'" in msg and "--data.format=auto" in msg and p in msg


def test_build_data_from_file(tok, tmp_path, capsys):
    recs = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]
    p = write_jsonl(tmp_path / "d.jsonl", recs)
    vocab = len(tok)
    d = build_data(_cfg(path=p, seq_len=16), tok, vocab_size=vocab, seed=0)
    assert d["input_ids"].shape[1] == 16
    out = capsys.readouterr().out
    assert "10 records" in out and "target tokens" in out
    # the packed stream decodes back to the concatenated samples
    total = int(d["attention_mask"].sum())
    stream = d["input_ids"].flatten()[:total].tolist()
    assert tok.decode(stream).count("<|begin_of_text|>question") == 10
    d = build_data(_cfg(path=p, seq_len=64, packing=False), tok, vocab_size=vocab, seed=0)
    assert d["input_ids"].shape == (10, 64)
    assert d["input_ids"][0, -1].item() == tok.pad_token_id
    with pytest.raises(DataError, match="does not match the model"):
        build_data(_cfg(path=p), tok, vocab_size=100, seed=0)
    with pytest.raises(DataError, match="tokenizer"):
        build_data(_cfg(path=p), None, vocab_size=vocab, seed=0)


def test_read_records_says_what_it_reads(tmp_path):
    with pytest.raises(DataError, match="is a directory; give one .jsonl, .json or .parquet file"):
        read_records(str(tmp_path))
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"\.csv files are not read; data.path takes JSONL"):
        read_records(str(tmp_path / "d.csv"))
