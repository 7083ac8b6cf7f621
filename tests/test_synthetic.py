"""Synthetic checkpoints (models/synthetic.py) load in HF transformers exactly as written.

How HF is made to load bnb 4-bit on CPU: nothing special is needed with transformers 5.17 +
bitsandbytes 0.50.2 -- ``AutoModelForCausalLM.from_pretrained(dir)`` reads the pre-quantized checkpoint's
``quantization_config`` and builds ``bnb.nn.Linear4bit`` modules on CPU (no ``device_map`` needed;
``device_map="cpu"`` works too).  Only the module forward is avoided: on CPUs with AVX512-BF16 bnb's
``Linear4bit`` forward repacks the weight in place (REFERENCE.md section 4), so these tests dequantize
through ``bitsandbytes.functional`` only and never run the HF model.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below must work without the hub

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors import safe_open

from models.shapes import SHAPES, LlamaShape, get_shape, shape_from_hf_config, shape_to_hf_config
from models.synthetic import MARKER_FILE, QUANT_LINEARS, main, write_synthetic_checkpoint

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------- helpers


def read_index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def read_tensors(d):
    """Every tensor of the checkpoint, read straight from the safetensors files named by the index."""
    index = read_index(d)
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert k not in out
                out[k] = f.get_tensor(k)
    return out


def file_quant_state(tensors, prefix):
    raw = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return bnbf.QuantState.from_dict(raw, device=torch.device("cpu"))


def load_hf(d):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def assert_hf_matches_files(d, quant_type, double_quant=True):
    """HF-loaded parameters equal the file contents (quantized ones bit-exactly after dequantization)."""
    import bitsandbytes as bnb

    tensors = read_tensors(d)
    model = load_hf(d)
    shape = get_shape(json.loads((d / MARKER_FILE).read_text())["shape"])
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            prefix = name + ".weight"
            assert quant_type != "none"
            assert any(name.endswith(s) for s in QUANT_LINEARS), name
            qs_file = file_quant_state(tensors, prefix)
            qs_hf = module.weight.quant_state
            assert qs_hf.quant_type == quant_type and qs_file.quant_type == quant_type
            assert qs_hf.nested == double_quant
            assert torch.equal(module.weight.data, tensors[prefix])
            w_hf = bnbf.dequantize_4bit(module.weight.data, qs_hf)
            w_file = bnbf.dequantize_4bit(tensors[prefix], qs_file)
            assert w_hf.dtype == torch.bfloat16
            assert w_hf.shape == (module.out_features, module.in_features) == qs_file.shape
            assert torch.equal(w_hf, w_file), name
            quantized.add(prefix)
    n_linear = shape.num_hidden_layers * len(QUANT_LINEARS)
    assert len(quantized) == (0 if quant_type == "none" else n_linear)
    # every other parameter (and the unquantized linears of quant "none") equals the file
    for name, p in model.named_parameters():
        if name in quantized:
            continue
        if name == "lm_head.weight" and shape.tie_word_embeddings:
            assert name not in tensors
            assert torch.equal(p, tensors["model.embed_tokens.weight"])
            continue
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p.detach(), tensors[name]), name
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    return tensors


def assert_index_ok(d):
    index = read_index(d)
    tensors = read_tensors(d)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    on_disk = sorted(p.name for p in d.iterdir() if p.name.endswith(".safetensors"))
    assert on_disk == files
    for k, f in index["weight_map"].items():  # quant-state keys share their weight's shard
        base = k.split(".weight.")[0] + ".weight" if ".weight." in k else k
        assert index["weight_map"][base] == f
    return index


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    out["nf4"] = write_synthetic_checkpoint(root / "nf4", "debug", quant_type="nf4", double_quant=True, seed=0)
    out["fp4"] = write_synthetic_checkpoint(root / "fp4", "debug", quant_type="fp4", double_quant=False, seed=0)
    out["none"] = write_synthetic_checkpoint(root / "none", "debug", quant_type="none", seed=0)
    return out


# ---------------------------------------------------------------------------------------------------- checkpoint


def test_nf4_double_quant_loads_bit_exact(ckpts):
    d = ckpts["nf4"]
    tensors = assert_hf_matches_files(d, "nf4", double_quant=True)
    p = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[p].dtype == torch.uint8 and tensors[p].shape == (256 * 256 // 2, 1)
    assert set(k for k in tensors if k.startswith(p + ".")) == {
        p + ".absmax",
        p + ".quant_map",
        p + ".nested_absmax",
        p + ".nested_quant_map",
        p + ".quant_state.bitsandbytes__nf4",
    }
    assert tensors[p + ".absmax"].dtype == torch.uint8 and tensors[p + ".absmax"].shape == (256 * 256 // 64,)
    assert tensors[p + ".nested_absmax"].dtype == torch.float32 and tensors[p + ".nested_absmax"].shape == (4,)
    assert tensors[p + ".quant_map"].shape == (16,) and tensors[p + ".nested_quant_map"].shape == (256,)
    meta = json.loads(bytes(tensors[p + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [256, 256] and meta["nested_blocksize"] == 256
    for k in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.3.input_layernorm.weight",
    ):
        assert tensors[k].dtype == torch.bfloat16
    # norms are 1 + noise, other weights ~N(0, 0.02)
    norm = tensors["model.layers.0.input_layernorm.weight"].float()
    assert 0.9 < norm.mean() < 1.1 and 0.05 < norm.std() < 0.15
    emb = tensors["model.embed_tokens.weight"].float()
    assert abs(emb.mean()) < 2e-3 and 0.018 < emb.std() < 0.022

    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert shape_from_hf_config(cfg).replace(bos_token_id=384, eos_token_id=388) == get_shape("debug")


def test_fp4_without_double_quant(ckpts):
    d = ckpts["fp4"]
    tensors = assert_hf_matches_files(d, "fp4", double_quant=False)
    p = "model.layers.1.mlp.down_proj.weight"
    assert set(k for k in tensors if k.startswith(p + ".")) == {
        p + ".absmax",
        p + ".quant_map",
        p + ".quant_state.bitsandbytes__fp4",
    }
    assert tensors[p + ".absmax"].dtype == torch.float32
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False


def test_none_is_plain_bf16_and_matches_quantized(ckpts):
    d = ckpts["none"]
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    plain = assert_hf_matches_files(d, "none")
    assert all(t.dtype == torch.bfloat16 for t in plain.values())
    # the same seed gives the same underlying weights whatever the quantization
    nf4 = read_tensors(ckpts["nf4"])
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        w = bnbf.dequantize_4bit(nf4[name], file_quant_state(nf4, name)).float()
        ref = plain[name].float()
        assert (w - ref).abs().mean() < 0.1 * ref.abs().mean()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(nf4[name], plain[name])


def test_tied_shape(tmp_path):
    d = write_synthetic_checkpoint(tmp_path / "tied", "debug_tied", tokenizer=False)
    tensors = assert_hf_matches_files(d, "nf4")
    assert "lm_head.weight" not in tensors
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 2
    assert not (d / "tokenizer.json").exists()


def test_index_and_sharding(ckpts, tmp_path):
    index = assert_index_ok(ckpts["nf4"])
    assert len(set(index["weight_map"].values())) == 1  # index is written even for one shard
    max_bytes = 512 * 1024
    d = write_synthetic_checkpoint(tmp_path / "sharded", "debug", max_shard_bytes=max_bytes)
    index = assert_index_ok(d)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    tensors = read_tensors(d)
    for f in files:  # tensor bytes per shard stay under the limit (no single parameter is larger here)
        assert (
            sum(tensors[k].numel() * tensors[k].element_size() for k, v in index["weight_map"].items() if v == f)
            <= max_bytes
        )
    assert not any(p.name.endswith(".partial") for p in d.iterdir())
    assert_hf_matches_files(d, "nf4")
    # contents do not depend on the shard layout
    a, b = read_tensors(ckpts["nf4"]), read_tensors(d)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reproducible(ckpts, tmp_path):
    same = read_tensors(write_synthetic_checkpoint(tmp_path / "same", "debug", seed=0, tokenizer=False))
    ref = read_tensors(ckpts["nf4"])
    assert same.keys() == ref.keys() and all(torch.equal(same[k], ref[k]) for k in ref)
    other = read_tensors(write_synthetic_checkpoint(tmp_path / "other", "debug", seed=1, tokenizer=False))
    for k in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight.absmax",
        "model.norm.weight",
    ):
        assert not torch.equal(other[k], ref[k]), k
    # different parameters get different streams
    assert not torch.equal(ref["model.layers.0.mlp.gate_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_offline(ckpts):
    d = ckpts["nf4"]
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    assert len(tok) <= get_shape("debug").vocab_size
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == cfg["bos_token_id"]
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == cfg["eos_token_id"]
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"] and gen["eos_token_id"] == cfg["eos_token_id"]
    for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert tok.convert_tokens_to_ids(t) < len(tok)

    text = "Hello world! The quick brown fox -- ünïcode 日本語, tabs\tand\nnewlines  ok."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode())  # merges do something

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    s2 = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert s2.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    ids = tok(s2, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 3
    assert tok.decode(ids) == s2


# ---------------------------------------------------------------------------------------------------- safety / CLI


def test_refuses_foreign_dir_and_overwrites_only_with_force(ckpts, tmp_path):
    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic checkpoint"):
        write_synthetic_checkpoint(foreign, "debug")
    assert [p.name for p in foreign.iterdir()] == ["important.txt"]
    assert main(["--out", str(foreign), "--shape", "debug", "--force"]) == 2  # --force never touches user data
    assert [p.name for p in foreign.iterdir()] == ["important.txt"]

    d = write_synthetic_checkpoint(tmp_path / "prev", "debug", tokenizer=False)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_checkpoint(d, "debug")
    write_synthetic_checkpoint(d, "debug", quant_type="none", overwrite=True, tokenizer=False)
    assert (d / "notes.txt").read_text() == "mine"
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert_index_ok(d)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--shape",
            "debug_tied",
            "--out",
            str(out),
            "--quant",
            "fp4",
            "--no-double-quant",
            "--blocksize",
            "128",
            "--seed",
            "3",
            "--shard-size-gb",
            "0.0005",
            "--device",
            "cpu",
            "--no-tokenizer",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert str(out) in text and "tensors:" in text and "total bytes:" in text and "elapsed:" in text
    index = assert_index_ok(out)
    assert len(set(index["weight_map"].values())) > 1
    tensors = read_tensors(out)
    qs = file_quant_state(tensors, "model.layers.1.self_attn.o_proj.weight")
    assert qs.quant_type == "fp4" and qs.blocksize == 128 and not qs.nested
    assert main(["--shape", "debug_tied", "--out", str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["--shape", "debug_tied", "--out", str(out), "--force", "--no-tokenizer"]) == 0
    assert main(["--shape", "nope", "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes():
    assert get_shape("llama3_8b") is get_shape("llama3_1_8b")
    assert get_shape("llama3_70b") is get_shape("llama3_1_70b")
    assert round(get_shape("llama3_1_8b").num_params / 1e9, 2) == 8.03
    assert round(get_shape("llama3_2_1b").num_params / 1e9, 2) == 1.24
    assert round(get_shape("llama3_1_70b").num_params / 1e9, 1) == 70.6
    assert get_shape("llama3_2_1b").rope_scaling["factor"] == 32.0 and get_shape("llama3_2_1b").tie_word_embeddings
    dbg = get_shape("debug")
    assert dbg.head_dim == 32 and dbg.intermediate_size % 64 == 0 and dbg.rope_scaling["rope_type"] == "llama3"
    assert get_shape("debug_tied").tie_word_embeddings and get_shape("debug_tied").num_hidden_layers == 2
    hash(dbg)
    with pytest.raises(ValueError, match="llama3_8b"):
        get_shape("llama4")
    for name, shape in SHAPES.items():
        cfg = shape_to_hf_config(shape)
        assert shape_from_hf_config(cfg) == shape, name
        # transformers parses the dict and writes back something we read the same way
        hf = transformers.LlamaConfig.from_dict(cfg)
        assert hf.head_dim == shape.head_dim
        assert shape_from_hf_config(hf.to_dict()) == shape, name


def test_shape_from_hf_config_errors():
    cfg = shape_to_hf_config("debug")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        bad = dict(cfg)
        del bad[key]
        with pytest.raises(ValueError, match=key):
            shape_from_hf_config(bad)
    with pytest.raises(ValueError, match="model_type"):
        shape_from_hf_config(dict(cfg, model_type="mistral"))
    # transformers 4.x layout: rope_theta + rope_scaling with the legacy "type" key
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in cfg["rope_scaling"].items()}
    assert shape_from_hf_config(legacy) == get_shape("debug")
    plain = dict(cfg, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    plain.pop("rope_theta")
    s = shape_from_hf_config(plain)
    assert s.rope_scaling is None and s.rope_theta == 10000.0
    assert isinstance(s, LlamaShape)


def test_bad_arguments_write_nothing(tmp_path, capsys):
    """Every argument is checked before the first file: nothing is left behind to be mistaken for a
    checkpoint later."""
    with pytest.raises(ValueError, match=r"invalid blocksize 100: bitsandbytes 4-bit takes one of \[32, 64"):
        write_synthetic_checkpoint(tmp_path / "a", "debug", blocksize=100)
    with pytest.raises(ValueError, match=r"blocksize 4096 does not divide the input width"):
        write_synthetic_checkpoint(tmp_path / "b", "debug", blocksize=4096)
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "c"), "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unfinished_write_is_named_as_such(tmp_path):
    from models.synthetic import MARKER_FILE

    d = tmp_path / "d"
    d.mkdir()
    (d / MARKER_FILE).write_text('{"generator": "models.synthetic", "status": "writing"}')
    with pytest.raises(FileExistsError, match=r"an unfinished synthetic checkpoint .* pass --force"):
        write_synthetic_checkpoint(d, "debug", quant_type="none", tokenizer=False)
