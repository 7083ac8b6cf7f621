"""models/hf_reader.py (CheckpointReader) and parallel/materialize.py against oracles:

* HF ``from_pretrained`` + bitsandbytes' ``dequantize_4bit`` (bit-exact dequantized weights);
* full reads vs row-range reads, and the union of every rank's shard (world sizes 2 and 3);
* ``bitsandbytes.functional.quantize_4bit`` on the full weight (plain checkpoints quantized at load);
* error paths: every broken checkpoint gives a ``CheckpointError`` naming the file/key and the problem.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import parallel.materialize as materialize_mod
from models.hf_reader import CheckpointError, CheckpointReader, quantize_rows
from models.llama import LlamaForCausalLM, ModelArgs
from models.quant import Weight4bit
from models.synthetic import QUANT_LINEARS
from parallel.materialize import _load_local, materialize
from parallel.sharding import pad_4bit_rows, shard_rows
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


def _meta_model(shape, world=1, quant_type="nf4", lora_rank=4):
    """The recipe model on meta with 4-bit rows padded for ``world`` ranks (what parallelize does)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelArgs(shape, lora_rank=lora_rank, quant_type=quant_type, dtype=torch.float32))
    if world > 1:
        pad_4bit_rows(model, world)
    return model


def _gathered_4bit(name, p, reader, world):
    """Every rank's shard of the 4-bit weight ``name`` (row-shard helpers, no process group), reassembled."""
    shards = [_load_local(name, p, p.shape, r, world, reader, CPU, 3, CPU) for r in range(world)]
    packed = torch.cat([sh.packed for sh in shards])
    absmax = torch.cat([sh.absmax for sh in shards])
    return Weight4bit(packed, absmax, shards[0].code, p.n_rows, p.quant_type, p.blocksize, torch.float32)


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

    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(debug_bf16_ckpt), quantization_config=qc, dtype=torch.bfloat16, device_map="cpu"
    )
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


# ------------------------------------------------------------------------------------ 1b. float quant storage
# bnb_4bit_quant_storage=bfloat16/float16/float32 (the layout the peft/accelerate FSDP-QLoRA guides save):
# the packed bytes are stored typed as floats, (N*K/2/E, 1) for an E-byte dtype.

_STORAGE_NAMES = {torch.uint8: "uint8", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_SAFETENSORS_NAMES = {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _hf_quantize_and_save(dense_ckpt, out, storage, double_quant):
    """transformers quantizes the dense checkpoint at load (nf4) and ``save_pretrained`` writes it."""
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(dense_ckpt), quantization_config=qc, dtype=torch.bfloat16, device_map="cpu"
    )
    for mod in hf.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # no in-place repacking (REFERENCE.md section 4)
    hf.save_pretrained(str(out))
    return hf.eval()


@pytest.fixture(scope="module")
def hf_saved(debug_bf16_ckpt, tmp_path_factory):
    """(storage, double_quant) -> (checkpoint dir, the HF model that was saved); written once per module."""
    cache = {}

    def get(storage, double_quant):
        key = (storage, double_quant)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_{_STORAGE_NAMES[storage]}_{'dq' if double_quant else 'nodq'}")
            cache[key] = out, _hf_quantize_and_save(debug_bf16_ckpt, out, storage, double_quant)
        return cache[key]

    return get


FLOAT_STORAGES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("storage", FLOAT_STORAGES, ids=lambda d: _STORAGE_NAMES[d])
def test_reads_hf_save_pretrained_float_storage(hf_saved, storage, double_quant):
    """A checkpoint transformers quantized with ``bnb_4bit_quant_storage`` = bf16/fp16/fp32 and saved: every
    projection dequantizes exactly to bitsandbytes' dequantization of the HF model that was saved."""
    out, hf = hf_saved(storage, double_quant)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_quant_storage"] == _STORAGE_NAMES[storage]
    reader = CheckpointReader(out)
    assert reader.prequantized and reader.quant_scheme() == ("nf4", 64)
    e = torch.tensor([], dtype=storage).element_size()
    ours = build_recipe_model(out, quant_type="nf4")
    for prefix in _projections(reader.shape):
        h = hf.get_submodule(prefix)
        n, k = h.out_features, h.in_features
        assert reader.info(prefix + ".weight") == ([n * k // 2 // e, 1], _SAFETENSORS_NAMES[storage]), prefix
        assert h.weight.dtype == storage and h.weight.quant_state.nested == double_quant
        w = ours.get_submodule(prefix).weight
        assert w.packed.dtype == torch.uint8
        assert torch.equal(w.packed, h.weight.data.view(torch.uint8).reshape(n, k // 2)), prefix
        a = w.dequantize(torch.float32)
        assert torch.equal(a, _bnb_dequant_fp32(h.weight.data, h.weight.quant_state)), prefix
    assert torch.equal(ours.model.norm.weight, hf.model.norm.weight.float())
    assert torch.equal(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight.float())


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("storage", FLOAT_STORAGES, ids=lambda d: _STORAGE_NAMES[d])
def test_float_storage_materializes_like_uint8_storage(hf_saved, storage, double_quant, world):
    """Through ``materialize`` (world 1) and every rank's row shard (2, 3 ranks): a float-storage checkpoint
    gives the very bytes, scales and dequantized weights of the same model saved with uint8 storage."""
    out, _ = hf_saved(storage, double_quant)
    ref_dir, _ = hf_saved(torch.uint8, double_quant)
    assert CheckpointReader(ref_dir).info("model.layers.0.self_attn.q_proj.weight")[1] == "U8"
    ref = build_recipe_model(ref_dir, quant_type="nf4", lora_rank=4, lora_seed=3)
    reader = CheckpointReader(out)
    if world == 1:
        model = _meta_model(reader.shape)
        materialize(model, reader, device=CPU, lora_seed=3)
        got = {n: p for n, p in model.named_parameters() if isinstance(p, Weight4bit)}
    else:
        meta = _meta_model(reader.shape, world)
        got = {n: _gathered_4bit(n, p, reader, world) for n, p in meta.named_parameters() if isinstance(p, Weight4bit)}
    assert len(got) == 7 * reader.shape.num_hidden_layers
    for name, w in got.items():
        r = ref.get_parameter(name)
        assert torch.equal(w.packed[: r.n_rows], r.packed) and torch.equal(w.absmax[: r.n_rows], r.absmax), name
        assert torch.equal(w.dequantize(torch.float32), r.dequantize(torch.float32)), name


# Little-endian bytes of NaNs in each float storage dtype, signaling ones (quiet bit clear) included: a
# float op or cast quiets or canonicalizes them (bitsandbytes #1945), which changes the packed codes.
_NAN_BYTES = {
    torch.bfloat16: [b"\x81\x7f", b"\xff\x7f", b"\xc1\xff", b"\x81\xff"],  # 0x7F81 0x7FFF 0xFFC1 0xFF81
    torch.float16: [b"\x01\x7c", b"\x00\x7e", b"\xff\xff", b"\x01\xfc"],  # 0x7C01 0x7E00 0xFFFF 0xFC01
    torch.float32: [b"\x01\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\xff\xff\xff\xff", b"\x01\x00\x80\xff"],
}


def _raw_bytes(path, key) -> bytes:
    """A tensor's bytes straight from a safetensors file (8-byte header length, JSON header, data)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    a, b = json.loads(data[8 : 8 + n])[key]["data_offsets"]
    return data[8 + n + a : 8 + n + b]


def _nan_checkpoint(src, out, storage, crafted):
    """``src`` rewritten as one model.safetensors whose projections hold the ``crafted`` uint8 codes, stored
    as ``storage`` by reinterpreting the bytes (``.view``), the way bitsandbytes lays out float storage."""
    tensors = {}
    for fname in sorted(set(_index(src)["weight_map"].values())):
        with safe_open(str(src / fname), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    e = torch.tensor([], dtype=storage).element_size()
    for key, codes in crafted.items():
        assert tensors[key].shape == codes.shape and tensors[key].dtype == torch.uint8
        tensors[key] = codes.reshape(-1, e).view(storage)  # (N*K/2/E, 1)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_storage"] = _STORAGE_NAMES[storage]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("storage", FLOAT_STORAGES, ids=lambda d: _STORAGE_NAMES[d])
def test_nan_bit_patterns_in_float_storage_survive(debug_nf4_ckpt, tmp_path, storage):
    """Packed bytes that read as NaN in the storage dtype come back byte-identical (never cast), and
    dequantize exactly as the same bytes in uint8 storage do, whole and row-sharded."""
    reader0 = CheckpointReader(debug_nf4_ckpt)
    e = torch.tensor([], dtype=storage).element_size()
    g = torch.Generator().manual_seed(7)
    crafted = {}
    for i, prefix in enumerate(_projections(reader0.shape)):
        key = prefix + ".weight"
        shape, _ = reader0.info(key)
        codes = torch.randint(0, 256, (shape[0] // e, e), generator=g, dtype=torch.uint8)
        patterns = torch.tensor(list(b"".join(_NAN_BYTES[storage])), dtype=torch.uint8).reshape(-1, e)
        # every 37th element (and the first and last) a NaN pattern: ~3% of the elements, vs ~0.1% by chance
        at = torch.cat([torch.arange(i % 37, codes.shape[0], 37), torch.tensor([0, codes.shape[0] - 1])])
        codes[at] = patterns[torch.arange(len(at)) % len(patterns)]
        crafted[key] = codes.reshape(shape)
    ref_dir = _nan_checkpoint(debug_nf4_ckpt, tmp_path / "u8", torch.uint8, crafted)
    ckpt = _nan_checkpoint(debug_nf4_ckpt, tmp_path / "float", storage, crafted)

    reader = CheckpointReader(ckpt)
    s = reader.shape
    prefix = "model.layers.3.mlp.down_proj"
    key = prefix + ".weight"
    raw = _raw_bytes(ckpt / "model.safetensors", key)
    assert raw == bytes(crafted[key].reshape(-1).tolist())  # the file itself holds the crafted bytes
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        as_float = f.get_tensor(key)
    assert as_float.dtype == storage and torch.isnan(as_float).float().mean() > 0.02
    # the test would see a cast: a round trip through another float type changes the bytes
    other = torch.float64 if storage == torch.float32 else torch.float32
    assert not torch.equal(as_float.to(other).to(storage).view(torch.uint8), as_float.view(torch.uint8))

    n, k = s.hidden_size, s.intermediate_size
    want = crafted[key].reshape(n, k // 2)
    for a, b in [(0, n), (0, 1), (5, 6), (37, 101), (n - 7, n)]:
        got = reader.rows_4bit(prefix, n, k, a, b)
        assert got.packed.dtype == torch.uint8 and torch.equal(got.packed, want[a:b]), (a, b)

    ref = build_recipe_model(ref_dir, quant_type="nf4")
    ours = build_recipe_model(ckpt, quant_type="nf4")
    hf = build_hf_model(ckpt)  # HF keeps float storage as is: its bytes are the oracle too
    with safe_open(str(ref_dir / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metas = {1: None, 2: _meta_model(s, 2), 3: _meta_model(s, 3)}
    for p in _projections(s):
        key = p + ".weight"
        w = ours.get_submodule(p).weight
        assert torch.equal(w.packed.reshape(-1), crafted[key].reshape(-1)), key
        # bitsandbytes' own dequantization of the crafted uint8 bytes with the file's quant state
        state = bnbF.QuantState.from_dict(
            {k[len(key) + 1 :]: v for k, v in tensors.items() if k.startswith(key + ".")}, device=CPU
        )
        want_w = _bnb_dequant_fp32(crafted[key], state)
        assert torch.equal(w.dequantize(torch.float32), want_w), key
        assert torch.equal(ref.get_submodule(p).weight.dequantize(torch.float32), want_w), key
        h = hf.get_submodule(p).weight
        assert h.dtype == storage and torch.equal(h.data.view(torch.uint8).reshape(-1), crafted[key].reshape(-1))
        assert torch.equal(_bnb_dequant_fp32(h.data, h.quant_state), want_w), key
        for world in (2, 3):
            meta_p = metas[world].get_parameter(key)
            gathered = _gathered_4bit(key, meta_p, reader, world)
            assert torch.equal(gathered.packed[: w.n_rows], w.packed), (key, world)
            assert torch.equal(gathered.dequantize(torch.float32), want_w), (key, world)


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
            for (_, e0), (s1, _) in zip(ranges, ranges[1:], strict=False):
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
    meta = _meta_model(reader.shape, world)
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


class _RecordingReader(CheckpointReader):
    """Logs every (key, start, end) read from the files."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = []

    def read(self, key, start=None, end=None):
        self.reads.append((key, start, end))
        return super().read(key, start, end)


@pytest.mark.parametrize("world", [2, 3])
def test_dense_checkpoint_each_rank_reads_and_quantizes_only_its_rows(debug_bf16_ckpt, monkeypatch, world):
    """A plain bf16 checkpoint quantized at load: each rank reads only its rows of every projection from the
    files and quantizes only those, and its shard is bitsandbytes' quantization of the full matrix's rows."""
    reader = _RecordingReader(debug_bf16_ckpt)
    quantized = []
    real_quantize_rows = materialize_mod.quantize_rows

    def recording_quantize_rows(dense, quant_type, blocksize):
        quantized.append(tuple(dense.shape))
        return real_quantize_rows(dense, quant_type, blocksize)

    monkeypatch.setattr(materialize_mod, "quantize_rows", recording_quantize_rows)
    meta = _meta_model(reader.shape, world, lora_rank=0)
    n_4bit = 0
    for name, p in meta.named_parameters():
        if not isinstance(p, Weight4bit):
            continue
        with safe_open(str(debug_bf16_ckpt / _index(debug_bf16_ckpt)["weight_map"][name]), "pt") as f:
            full = f.get_tensor(name)
        q, st = bnbF.quantize_4bit(full.float(), blocksize=64, quant_type="nf4", compress_statistics=False)
        q, absmax = q.reshape(p.n_rows, -1), st.absmax.reshape(p.n_rows, -1)
        chunk = p.shape[0] // world
        for r in range(world):
            reader.reads.clear()
            quantized.clear()
            shard = _load_local(name, p, p.shape, r, world, reader, CPU, 0, CPU)
            s, e = r * chunk, min((r + 1) * chunk, p.n_rows)
            rows = (s, e) if e > s else (0, 1)  # a rank past the last row reads one row for the code book
            assert [(k, a, b) for k, a, b in reader.reads if k == name] == [(name, *rows)], (name, r, reader.reads)
            assert all(a is not None for _, a, _ in reader.reads), reader.reads  # nothing read whole
            assert quantized == [(rows[1] - rows[0], p.shape[1])], (name, r)
            assert torch.equal(shard.packed[: e - s], q[s:e]) and torch.equal(shard.absmax[: e - s], absmax[s:e])
            assert torch.count_nonzero(shard.packed[max(e - s, 0) :]) == 0
        n_4bit += 1
    assert n_4bit == 7 * reader.shape.num_hidden_layers


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


def _rewrite_single_file(ckpt, drop=(), **replace):
    """Rewrite a single-file (no index) checkpoint without the keys ``drop``, or with new values."""
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(replace)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_error_dense_model_on_float_storage_checkpoint(hf_saved):
    out, _ = hf_saved(torch.bfloat16, True)
    with pytest.raises(CheckpointError, match="packed 4-bit weight") as e:
        _load(out, quant_type=None)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "BF16" in msg and "bfloat16" in msg, msg
    assert "quant_type nf4/fp4" in msg and "not a dense one" in msg and "expects" not in msg, msg


def test_error_float_storage_block_scales_missing(hf_saved, tmp_path):
    """A BF16 (N*K/4, 1) tensor beside one of its block-scale keys is named as packed codes, not as a
    dense weight of the wrong shape."""
    src, _ = hf_saved(torch.bfloat16, True)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    key = "model.layers.1.mlp.up_proj.weight.quant_map"
    _rewrite_single_file(ckpt, drop={key})
    with pytest.raises(CheckpointError, match="looks like a packed 4-bit weight") as e:
        _load(ckpt)
    msg = str(e.value)
    assert key in msg and "missing" in msg and "bfloat16" in msg and "expects" not in msg, msg


def test_error_packed_codes_cast_to_float_values(hf_saved, tmp_path):
    """uint8 codes converted value by value to bf16 (a cast, not a reinterpretation) cannot be read back."""
    src, _ = hf_saved(torch.uint8, True)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    key = "model.layers.0.self_attn.k_proj.weight"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        codes = f.get_tensor(key)
    _rewrite_single_file(ckpt, **{key: codes.to(torch.bfloat16)})
    with pytest.raises(CheckpointError, match="cast") as e:
        _load(ckpt)
    msg = str(e.value)
    assert key in msg and "BF16" in msg and f"[{codes.shape[0]}, 1]" in msg, msg


def test_error_packed_storage_dtype_unsupported(broken_nf4):
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_shard(broken_nf4, key, torch.zeros(128 * 256 // 8, 1, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_storage") as e:
        _load(broken_nf4)
    msg = str(e.value)
    assert key in msg and "I32" in msg and "bfloat16" in msg, msg


def test_error_storage_element_wider_than_a_row(debug_nf4_ckpt, tmp_path):
    """Rows of K/2 bytes that are not whole storage elements cannot be read row range by row range."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(debug_nf4_ckpt / "config.json", ckpt / "config.json")
    save_file({"x.weight": torch.zeros(2, 1, dtype=torch.float64)}, str(ckpt / "model.safetensors"))
    reader = CheckpointReader(ckpt)
    with pytest.raises(CheckpointError, match="not a whole number of elements") as e:
        reader._packed_rows("x", 4, 8, 0, 4)  # 4 rows of 8 codes: 4 bytes per row, 8-byte elements
    assert "x.weight" in str(e.value) and "F64" in str(e.value)


# ------------------------------------------------------------------------------------ 5. the synthetic-checkpoint CLI
# (here rather than in tests/test_synthetic.py only because of file ownership in this change)


def test_synthetic_cli_output_has_no_kernels_warning(tmp_path):
    """`python -m models.synthetic` on CPU: bitsandbytes' warning that the optional `kernels` package is
    missing must not follow a successful write."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(root))
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "-m", "models.synthetic", "--shape", "debug", "--out", str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    text = proc.stdout + proc.stderr
    assert "kernels" not in text and "gemm_4bit_forward" not in text, text
    assert CheckpointReader(out).prequantized


def test_kernels_warning_filter_drops_only_the_missing_package(caplog):
    import logging

    import models.synthetic  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    msg = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1"
    )
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(msg, ModuleNotFoundError("No module named 'kernels'"))
        logger.warning(msg, RuntimeError("kernels 0.9.0 is too old"))  # installed but broken: still reported
        logger.warning("another bitsandbytes CPU warning")
    got = [r.getMessage() for r in caplog.records]
    assert len(got) == 2 and "too old" in got[0] and got[1] == "another bitsandbytes CPU warning", got


def test_skip_modules_naming_a_4bit_layer_is_said_once(broken_nf4, monkeypatch, capsys):
    """llm_int8_skip_modules lists down_proj (held in 4-bit here) and lm_head (held dense): the reader
    follows the tensors, and says once that the down_proj entry does not apply; lm_head is not mentioned."""
    monkeypatch.delenv("RANK", raising=False)
    cfg_file = broken_nf4 / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "down_proj"]
    cfg_file.write_text(json.dumps(cfg))
    reader = CheckpointReader(broken_nf4)
    # The oracle: the checkpoint's own keys (block scales of every down_proj, none for lm_head).
    four_bit = [k for k in reader.weight_map if k.endswith("down_proj.weight.absmax")]
    assert len(four_bit) == reader.shape.num_hidden_layers and not reader.has("lm_head.weight.absmax")
    CheckpointReader(broken_nf4)  # a second reader in the same process says nothing more
    out = capsys.readouterr().out
    assert out.count("llm_int8_skip_modules") == 1, out
    assert f"lists 'down_proj', but the checkpoint holds {len(four_bit)} such layer(s) in 4-bit" in out
    assert "'lm_head'" not in out
    assert reader.is_4bit("model.layers.0.mlp.down_proj")  # used as stored
