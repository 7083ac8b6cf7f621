"""models/hf_reader.py (CheckpointReader) and parallel/materialize.py against oracles:

* HF ``from_pretrained`` + bitsandbytes' ``dequantize_4bit`` (bit-exact dequantized weights);
* full reads vs row-range reads, and the union of every rank's shard (world sizes 2 and 3);
* ``bitsandbytes.functional.quantize_4bit`` on the full weight (plain checkpoints quantized at load);
* error paths: every broken checkpoint gives a ``CheckpointError`` naming the file/key and the problem.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from safetensors import safe_open
from safetensors.torch import save_file

from models.hf_reader import CheckpointError, CheckpointReader, quantize_rows
from models.llama import LlamaForCausalLM, ModelArgs
from models.quant import Weight4bit
from models.synthetic import QUANT_LINEARS
from parallel.materialize import _load_local, materialize, shard_rows
from tests.conftest import build_hf_model, build_recipe_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


def _projections(shape):
    return [f"model.layers.{i}.{p}" for i in range(shape.num_hidden_layers) for p in QUANT_LINEARS]


def _dense_names(model):
    return [n for n, p in model.named_parameters() if not isinstance(p, Weight4bit) and ".lora_" not in n]


def _bnb_dequant_fp32(packed, state):
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnbF.dequantize_4bit(packed, state)


# ------------------------------------------------------------------------------------ 1. bit-exact vs HF


@pytest.mark.parametrize("ckpt_fixture", ["debug_nf4_ckpt", "debug_fp4_ckpt", "debug_tied_nf4_ckpt"])
def test_dequantized_weights_equal_hf(request, ckpt_fixture):
    ckpt = request.getfixturevalue(ckpt_fixture)
    reader = CheckpointReader(ckpt)
    assert reader.prequantized
    quant = "fp4" if "fp4" in ckpt_fixture else "nf4"
    assert reader.quant_scheme() == (quant, 64)
    ours = build_recipe_model(ckpt, quant_type=quant, lora_rank=4)
    hf = build_hf_model(ckpt)

    n = 0
    for prefix in _projections(reader.shape):
        w = ours.get_submodule(prefix).weight
        h = hf.get_submodule(prefix)
        assert isinstance(w, Weight4bit) and isinstance(h, bnb.nn.Linear4bit)
        assert h.weight.quant_state.quant_type == quant
        assert (h.weight.quant_state.nested) == (quant == "nf4")
        a = w.dequantize(torch.float32)
        b = _bnb_dequant_fp32(h.weight.data, h.weight.quant_state)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (h.out_features, h.in_features)
        assert torch.equal(a, b), f"{prefix}: max diff {(a - b).abs().max().item()}"
        n += 1
    assert n == 7 * reader.shape.num_hidden_layers

    hf_params = dict(hf.named_parameters())
    for name in _dense_names(ours):
        p = ours.get_parameter(name)
        ref = hf_params.get(name, hf_params.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        assert ref is not None, name
        assert torch.equal(p, ref.float()), name
    if reader.shape.tie_word_embeddings:
        assert not reader.has("lm_head.weight")
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_reads_hf_save_pretrained_single_file(debug_bf16_ckpt, tmp_path):
    """A bnb-4bit checkpoint written by HF itself: transformers quantizes the dense checkpoint at load
    (nf4, double quant) and ``save_pretrained`` writes one ``model.safetensors`` without an index (what
    small models get). The reader takes it, and every weight dequantizes exactly to bnb's
    dequantization of the HF model that was saved."""
    import transformers

    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(debug_bf16_ckpt), quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
    out = tmp_path / "hf_bnb"
    hf.save_pretrained(str(out))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()

    reader = CheckpointReader(out)
    assert reader.prequantized and reader.quant_scheme() == ("nf4", 64)
    ours = build_recipe_model(out, quant_type="nf4")
    for prefix in _projections(reader.shape):
        h = hf.get_submodule(prefix)
        assert h.weight.quant_state.nested
        a = ours.get_submodule(prefix).weight.dequantize(torch.float32)
        assert torch.equal(a, _bnb_dequant_fp32(h.weight.data, h.weight.quant_state)), prefix
    assert torch.equal(ours.model.norm.weight, hf.model.norm.weight.float())


def test_dense_checkpoint_reads_equal_files(debug_bf16_ckpt):
    reader = CheckpointReader(debug_bf16_ckpt)
    assert not reader.prequantized and reader.quant_scheme() is None
    ours = build_recipe_model(debug_bf16_ckpt, quant_type=None, dtype=torch.bfloat16)
    index = json.loads((debug_bf16_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # several shards
    seen = 0
    for key, fname in index.items():
        with safe_open(str(debug_bf16_ckpt / fname), "pt") as f:
            ref = f.get_tensor(key)
        assert ref.dtype == torch.bfloat16
        assert torch.equal(ours.get_parameter(key), ref), key
        seen += 1
    assert seen == len(_dense_names(ours))


# ------------------------------------------------------------------------------------ 2. row ranges and shards


@pytest.mark.parametrize("ckpt_fixture", ["debug_nf4_ckpt", "debug_fp4_ckpt"])
def test_rows_4bit_ranges_equal_full_read(request, ckpt_fixture):
    ckpt = request.getfixturevalue(ckpt_fixture)
    reader = CheckpointReader(ckpt)
    hf = build_hf_model(ckpt)
    s = reader.shape
    for prefix, (n, k) in {
        "model.layers.0.self_attn.q_proj": (s.hidden_size, s.hidden_size),  # 4 blocks/row: 64 rows per nested group
        "model.layers.1.self_attn.k_proj": (s.num_key_value_heads * s.head_dim, s.hidden_size),
        "model.layers.3.mlp.down_proj": (s.hidden_size, s.intermediate_size),  # 10 blocks/row: groups cut rows
        "model.layers.2.mlp.gate_proj": (s.intermediate_size, s.hidden_size),
    }.items():
        full = reader.rows_4bit(prefix, n, k, 0, n)
        assert full.packed.shape == (n, k // 2) and full.packed.dtype == torch.uint8
        assert full.absmax.shape == (n, k // 64) and full.absmax.dtype == torch.float32
        # the expanded fp32 block scales are exactly bitsandbytes' (double quantization undone the bnb way)
        st = hf.get_submodule(prefix).weight.quant_state
        ref_absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
        assert torch.equal(full.absmax.reshape(-1), ref_absmax.float())
        assert torch.equal(full.packed.reshape(-1), hf.get_submodule(prefix).weight.data.reshape(-1))
        assert torch.equal(full.code, st.code.float())

        # ranges: a single row, cuts inside a nested group of 256 blocks, across groups, the tail
        for a, b in [(0, 1), (5, 6), (3, 17), (37, 101), (63, 65), (n // 3, 2 * n // 3), (n - 7, n), (0, n)]:
            part = reader.rows_4bit(prefix, n, k, a, b)
            assert torch.equal(part.packed, full.packed[a:b]), (prefix, a, b)
            assert torch.equal(part.absmax, full.absmax[a:b]), (prefix, a, b)
            assert torch.equal(part.code, full.code)
            assert (part.quant_type, part.blocksize) == (full.quant_type, full.blocksize)


def test_shard_rows_partition():
    for n in (1, 2, 5, 128, 256, 640, 641):
        for world in (1, 2, 3, 4, 8):
            ranges = [shard_rows(n, r, world) for r in range(world)]
            chunk = -(-n // world)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            for (s0, e0), (s1, _) in zip(ranges, ranges[1:]):
                assert e0 == s1
            assert all(0 <= e - s <= chunk for s, e in ranges)
            # torch.chunk's rule (what FSDP2 puts in each rank's local tensor)
            sizes = [c.shape[0] for c in torch.arange(n).chunk(world)]
            assert [e - s for s, e in ranges][: len(sizes)] == sizes


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("ckpt_fixture", ["debug_nf4_ckpt", "debug_bf16_ckpt", "debug_tied_nf4_ckpt"])
def test_rank_shards_union_is_full(request, ckpt_fixture, world):
    """Every rank's shard is exactly its rows; the union over ranks is the 1-rank tensor."""
    ckpt = request.getfixturevalue(ckpt_fixture)
    reader = CheckpointReader(ckpt)
    full = build_recipe_model(ckpt, quant_type="nf4", lora_rank=4, lora_seed=3)
    with torch.device("meta"):
        meta = LlamaForCausalLM(ModelArgs(reader.shape, lora_rank=4, quant_type="nf4", dtype=torch.float32, row_multiple=world))
    full_params = dict(full.named_parameters())
    for name, p in meta.named_parameters():  # a tied weight is listed once
        ref = full_params[name]
        if isinstance(p, Weight4bit):
            R = p.shape[0]
            assert R % world == 0 and R >= p.n_rows and R - p.n_rows < world
            shards = [_load_local(name, p, p.shape, r, world, reader, CPU, 3, CPU) for r in range(world)]
            for r, sh in enumerate(shards):
                assert isinstance(sh, Weight4bit) and sh.shape == (R // world, p.shape[1]) and sh.n_rows == p.n_rows
                s, e = r * (R // world), min((r + 1) * (R // world), p.n_rows)
                assert torch.equal(sh.packed[: e - s], ref.packed[s:e]), (name, r)
                assert torch.equal(sh.absmax[: e - s], ref.absmax[s:e]), (name, r)
                assert torch.equal(sh.code, ref.code)
            packed = torch.cat([sh.packed for sh in shards])
            absmax = torch.cat([sh.absmax for sh in shards])
            assert torch.equal(packed[: p.n_rows], ref.packed) and torch.equal(absmax[: p.n_rows], ref.absmax)
            assert torch.count_nonzero(packed[p.n_rows :]) == 0 and torch.count_nonzero(absmax[p.n_rows :]) == 0
            gathered = Weight4bit(packed, absmax, shards[0].code, p.n_rows, "nf4", 64, torch.float32)
            assert torch.equal(gathered.dequantize(torch.float32), ref.dequantize(torch.float32))
        else:
            shards = [_load_local(name, p, p.shape, r, world, reader, CPU, 3, CPU) for r in range(world)]
            for r, sh in enumerate(shards):
                s, e = shard_rows(p.shape[0], r, world)
                assert sh.dtype == p.dtype and tuple(sh.shape) == (e - s, *p.shape[1:]), (name, r)
                assert torch.equal(sh, ref[s:e]), (name, r)
            assert torch.equal(torch.cat(shards), ref), name


# ------------------------------------------------------------------------------------ 3. quantize at load


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_dense_checkpoint_quantized_at_load_equals_bnb(debug_bf16_ckpt, quant):
    reader = CheckpointReader(debug_bf16_ckpt)
    ours = build_recipe_model(debug_bf16_ckpt, quant_type=quant, lora_rank=0)
    index = json.loads((debug_bf16_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for prefix in _projections(reader.shape)[::3] + ["model.layers.3.mlp.down_proj"]:
        key = prefix + ".weight"
        with safe_open(str(debug_bf16_ckpt / index[key]), "pt") as f:
            w_bf16 = f.get_tensor(key)
        n, k = w_bf16.shape
        q, st = bnbF.quantize_4bit(w_bf16.float(), blocksize=64, quant_type=quant, compress_statistics=False)
        w = ours.get_submodule(prefix).weight
        assert isinstance(w, Weight4bit) and w.n_rows == n
        assert torch.equal(w.packed, q.reshape(n, k // 2)), key
        assert torch.equal(w.absmax, st.absmax.reshape(n, k // 64)), key
        assert torch.equal(w.code, st.code)
        st32 = copy.copy(st)
        st32.dtype = torch.float32
        assert torch.equal(w.dequantize(torch.float32), bnbF.dequantize_4bit(q, st32)), key
        # quantizing a row range gives those rows' bytes of the full quantization (what each rank does)
        for a, b in [(0, 1), (7, 40), (n // 3, n)]:
            part = quantize_rows(w_bf16[a:b].float(), quant, 64)
            assert torch.equal(part.packed, w.packed[a:b]) and torch.equal(part.absmax, w.absmax[a:b])


# ------------------------------------------------------------------------------------ 4. error paths


@pytest.fixture
def broken_nf4(debug_nf4_ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(debug_nf4_ckpt, out)
    return out


@pytest.fixture
def broken_bf16(debug_bf16_ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(debug_bf16_ckpt, out)
    return out


def _load(ckpt, quant_type="nf4"):
    """Reader + materialize: where a broken checkpoint must be reported."""
    reader = CheckpointReader(ckpt)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelArgs(reader.shape, lora_rank=2, quant_type=quant_type, dtype=torch.float32))
    materialize(model, reader, device=CPU, lora_seed=0)
    return model


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _index(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _rewrite_shard(ckpt, key, new_value=None):
    """Rewrite the shard holding ``key`` without it (new_value None; the index is fixed) or with a new value."""
    index = _index(ckpt)
    fname = index["weight_map"][key]
    with safe_open(str(ckpt / fname), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if new_value is None:
        del tensors[key]
        del index["weight_map"][key]
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[key] = new_value
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    return fname


def test_error_missing_directory(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        CheckpointReader(missing)
    assert str(missing) in str(e.value)


def test_error_missing_config(broken_nf4):
    (broken_nf4 / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing") as e:
        CheckpointReader(broken_nf4)
    assert str(broken_nf4 / "config.json") in str(e.value)


def test_error_malformed_config(broken_nf4):
    (broken_nf4 / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(broken_nf4)
    msg = str(e.value)
    assert str(broken_nf4 / "config.json") in msg and "not valid JSON" in msg, msg


def test_error_config_missing_field(broken_nf4):
    cfg = json.loads((broken_nf4 / "config.json").read_text())
    del cfg["hidden_size"]
    (broken_nf4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size") as e:
        CheckpointReader(broken_nf4)
    assert "config.json" in str(e.value)


def test_error_model_type_not_llama(broken_nf4):
    _edit_config(broken_nf4, model_type="mistral")
    with pytest.raises(CheckpointError, match="model_type") as e:
        CheckpointReader(broken_nf4)
    assert "mistral" in str(e.value) and "llama" in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False},
    ],
    ids=["gptq", "bnb8bit"],
)
def test_error_non_bnb4_quantization_config(broken_nf4, qc):
    _edit_config(broken_nf4, quantization_config=qc)
    with pytest.raises(CheckpointError, match="4-bit") as e:
        CheckpointReader(broken_nf4)
    assert "config.json" in str(e.value) and qc["quant_method"] in str(e.value)


def test_error_index_lists_missing_shard(broken_nf4):
    fname = sorted(set(_index(broken_nf4)["weight_map"].values()))[-1]
    (broken_nf4 / fname).unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        CheckpointReader(broken_nf4)
    assert fname in str(e.value)


def test_error_no_weights(broken_nf4):
    for f in broken_nf4.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        CheckpointReader(broken_nf4)
    assert str(broken_nf4) in str(e.value)


@pytest.mark.parametrize(
    "key",
    [
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.2.mlp.up_proj.weight",  # the packed 4-bit codes
        "model.layers.2.mlp.up_proj.weight.absmax",  # the block scales of a pre-quantized weight
        "model.layers.2.mlp.up_proj.weight.quant_map",
        # double quantization: without these the uint8 scales would be read as numbers (silently wrong)
        "model.layers.3.mlp.gate_proj.weight.nested_absmax",
        "model.layers.3.mlp.gate_proj.weight.nested_quant_map",
        "model.layers.1.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4",
    ],
)
def test_error_key_missing(broken_nf4, key):
    _rewrite_shard(broken_nf4, key)
    with pytest.raises(CheckpointError) as e:
        _load(broken_nf4)
    msg = str(e.value)
    if "quant_state" in key:
        assert key.split(".weight")[0] + ".weight" in msg and "no quant_state key" in msg, msg
    else:
        assert key in msg and "missing" in msg, msg


def test_error_key_missing_dense(broken_bf16):
    key = "model.layers.1.self_attn.o_proj.weight"
    _rewrite_shard(broken_bf16, key)
    for quant in (None, "nf4"):
        with pytest.raises(CheckpointError, match="missing") as e:
            _load(broken_bf16, quant_type=quant)
        assert key in str(e.value)


def test_error_shape_mismatch_prequantized(broken_nf4):
    _edit_config(broken_nf4, intermediate_size=768)
    with pytest.raises(CheckpointError, match="shape") as e:
        _load(broken_nf4)
    msg = str(e.value)
    assert "mlp.gate_proj.weight" in msg and "640" in msg and "768" in msg, msg


def test_error_shape_mismatch_dense(broken_bf16):
    _edit_config(broken_bf16, intermediate_size=768)
    for quant in (None, "nf4"):
        with pytest.raises(CheckpointError, match="shape") as e:
            _load(broken_bf16, quant_type=quant)
        msg = str(e.value)
        assert "mlp.gate_proj.weight" in msg and "640" in msg and "768" in msg, msg


def test_error_packed_weight_wrong_dtype(broken_nf4):
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_shard(broken_nf4, key, torch.zeros(128, 256, dtype=torch.float32))
    with pytest.raises(CheckpointError, match="U8") as e:
        _load(broken_nf4)
    msg = str(e.value)
    assert key in msg and "F32" in msg, msg


@pytest.mark.parametrize("drop,match", [("blocksize", "lacks blocksize"), ("quant_type", "lacks quant_type")])
def test_error_quant_state_json_incomplete(broken_nf4, drop, match):
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    with safe_open(str(broken_nf4 / _index(broken_nf4)["weight_map"][key]), "pt") as f:
        meta = json.loads(bytes(f.get_tensor(key).tolist()).decode())
    del meta[drop]
    _rewrite_shard(broken_nf4, key, torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8))
    with pytest.raises(CheckpointError, match=match) as e:
        _load(broken_nf4)
    assert key in str(e.value), str(e.value)


def test_error_dense_weight_not_floating(broken_nf4):
    key = "model.norm.weight"
    fname = _rewrite_shard(broken_nf4, key, torch.ones(256, dtype=torch.int64))
    with pytest.raises(CheckpointError, match="not a floating-point tensor") as e:
        _load(broken_nf4)
    assert key in str(e.value) and fname in str(e.value) and "I64" in str(e.value)


def test_error_dense_model_on_4bit_checkpoint(debug_nf4_ckpt):
    with pytest.raises(CheckpointError, match="packed 4-bit weight") as e:
        _load(debug_nf4_ckpt, quant_type=None)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value) and "U8" in str(e.value)


def test_error_quant_type_mismatch(debug_fp4_ckpt):
    with pytest.raises(CheckpointError, match="fp4") as e:
        _load(debug_fp4_ckpt, quant_type="nf4")
    assert "nf4" in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 40], ids=["half", "last_bytes", "inside_header"])
def test_error_truncated_shard(broken_nf4, keep):
    fname = _index(broken_nf4)["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    path = broken_nf4 / fname
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        _load(broken_nf4)
    msg = str(e.value)
    assert fname in msg, msg
    assert "safetensors" in msg or "truncated" in msg, msg
