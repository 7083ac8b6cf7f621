"""``model.fuse_projections``: q/k/v and gate/up each as one frozen 4-bit matrix (models/lora.py
``FusedQLoRALinear``) against the unfused model and HF + peft.

* the fused weight is the checkpoint's rows of its parts, concatenated: also each rank's shard for any
  shard degree (shards that straddle q/k/v or gate/up, zero padding rows), from pre-quantized, dense
  quantized-at-load and dense checkpoints;
* losses and LoRA gradients equal the unfused model's (fp32: summation order only), with and without LoRA
  dropout, and HF + peft's on the same bnb 4-bit checkpoint;
* LoRA parameter names, the resumable state dict and the exported PEFT adapter are the unfused model's;
  the adapter loads in peft and reproduces the fused model's logits;
* under torch.compile each group is one 4-bit linear operator (4 per block instead of 7), and the
  compiled gradients equal eager's.

The 1-vs-N-rank FSDP runs (fused, and an unfused checkpoint resumed fused) are in tests/test_fsdp.py.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from models.hf_reader import CheckpointReader
from models.llama import LORA_TARGETS, LlamaForCausalLM, ModelArgs
from models.lora import FusedQLoRALinear
from models.quant import Weight4bit
from parallel.materialize import materialize
from parallel.sharding import pad_4bit_rows
from tests.conftest import build_hf_model, build_recipe_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5  # fp32 against fp32: only summation order may differ
GROUPS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def _ids(vocab, seed=0, shape=(2, 40)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_lora_(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in _lora(model).items()}


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _pair(ckpt, **kw):
    kw.setdefault("quant_type", "nf4")
    kw.setdefault("lora_rank", 4)
    unfused = build_recipe_model(ckpt, **kw)
    fused = build_recipe_model(ckpt, fuse_projections=True, **kw)
    _randomize_lora_(unfused)
    _randomize_lora_(fused)
    return unfused, fused


# ------------------------------------------------------------------------------- 1. the fused rows


def _parts(model, layer: int, group: str):
    mods = dict(model.named_modules())
    block = f"model.layers.{layer}.{group.split('.')[0]}"
    return [mods[f"{block}.{p}"].weight for p in GROUPS[group]]


@pytest.mark.parametrize(
    "ckpt_fixture,quant", [("debug_nf4_ckpt", "nf4"), ("debug_bf16_ckpt", "nf4"), ("debug_bf16_ckpt", None)]
)
def test_fused_weight_is_the_parts_rows(request, ckpt_fixture, quant):
    """Pre-quantized (double-quant scales expanded per row), dense quantized at load, and dense."""
    unfused, fused = _pair(request.getfixturevalue(ckpt_fixture), quant_type=quant, lora_rank=0)
    mods = dict(fused.named_modules())
    for layer in range(fused.args.shape.num_hidden_layers):
        for group in GROUPS:
            w, parts = mods[f"model.layers.{layer}.{group}"].weight, _parts(unfused, layer, group)
            if quant is None:
                assert torch.equal(w, torch.cat(parts))
                continue
            assert isinstance(w, Weight4bit) and w.n_rows == sum(p.n_rows for p in parts)
            assert torch.equal(w.packed, torch.cat([p.packed for p in parts]))
            assert torch.equal(w.absmax, torch.cat([p.absmax for p in parts]))
            assert torch.equal(w.code, parts[0].code)
            assert torch.equal(w.dequantize(), torch.cat([p.dequantize() for p in parts]))
    # no per-part frozen weights left: the parts hold only their adapters
    assert not [n for n, _ in fused.named_parameters() if n.endswith(("q_proj.weight", "gate_proj.weight"))]


def _shard_model(ckpt, rank: int, world: int, quant_type="nf4"):
    """The fused model as rank ``rank`` of ``world`` materializes it: its rows of every padded weight
    (no process group: the row arithmetic of parallel/materialize.py called with an explicit rank)."""
    import parallel.materialize as M

    reader = CheckpointReader(ckpt)
    args = ModelArgs(reader.shape, lora_rank=0, quant_type=quant_type, dtype=torch.float32, fuse_projections=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    pad_4bit_rows(model, world)
    real = M._rank_world
    M._rank_world = lambda p: (rank, world)
    try:
        materialize(model, reader, device=torch.device("cpu"), lora_seed=0)
    finally:
        M._rank_world = real
    return model


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_shards_straddle_parts(debug_nf4_ckpt, world):
    """Every rank reads exactly its rows of the concatenation (q/k/v: 256 + 128 + 128 rows; gate/up:
    640 + 640): with 3 or 5 ranks shards start inside q, k, gate and up, and the last is padded."""
    whole = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", fuse_projections=True)
    full = dict(whole.named_parameters())
    shards = [dict(_shard_model(debug_nf4_ckpt, r, world).named_parameters()) for r in range(world)]
    straddles = 0
    for name, w in full.items():
        if not isinstance(w, Weight4bit) or not name.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
            continue
        rows = w.n_rows
        chunk = -(-rows // world)
        got = [s[name] for s in shards]
        assert all(g.packed.shape[0] == chunk for g in got)
        packed, absmax = torch.cat([g.packed for g in got]), torch.cat([g.absmax for g in got])
        assert torch.equal(packed[:rows], w.packed) and torch.equal(absmax[:rows], w.absmax), name
        assert not packed[rows:].any() and not absmax[rows:].any()  # zero padding rows
        assert all(torch.equal(g.code, w.code) for g in got)
        bounds = {256, 384} if "qkv" in name else {640}
        straddles += sum(any(r * chunk < b < (r + 1) * chunk for b in bounds) for r in range(world))
    assert straddles > 0 or world == 2


def test_code_book_mismatch_is_refused(debug_nf4_ckpt, tmp_path):
    """One matrix has one code book: parts quantized differently are refused with the fix named."""
    import shutil

    from safetensors.torch import load_file, save_file

    from models.hf_reader import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(debug_nf4_ckpt, ckpt)
    key = "model.layers.0.self_attn.k_proj.weight.quant_map"
    for f in ckpt.glob("*.safetensors"):
        sd = load_file(f)
        if key in sd:
            sd[key] = sd[key] * 2
            save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="fuse_projections=false"):
        build_recipe_model(ckpt, quant_type="nf4", fuse_projections=True)


# --------------------------------------------------------------------------------- 2. the numbers


def test_losses_and_lora_grads_equal_unfused(debug_nf4_ckpt):
    unfused, fused = _pair(debug_nf4_ckpt)
    assert _lora(unfused).keys() == _lora(fused).keys()
    for n, p in _lora(unfused).items():
        assert torch.equal(p, _lora(fused)[n]), n
    ids = _ids(unfused.args.shape.vocab_size)
    labels = ids.clone()
    labels[:, :5] = -100
    la, ga = _loss_and_grads(unfused, ids, labels)
    lb, gb = _loss_and_grads(fused, ids, labels)
    d = max(_maxdiff(ga[n], gb[n]) for n in ga)
    print(f"\n[fused vs unfused] loss diff {abs(la - lb):.3e}, LoRA grad diff {d:.3e}")
    assert abs(la - lb) <= TOL
    assert d <= TOL
    assert all(float(g.abs().max()) > 0 for g in gb.values())


def test_lora_dropout_draws_the_same_masks(debug_nf4_ckpt):
    """With dropout each adapter keeps its own mask, drawn in the unfused order: same numbers."""
    unfused, fused = _pair(debug_nf4_ckpt, lora_dropout=0.3)
    unfused.train(), fused.train()
    ids = _ids(unfused.args.shape.vocab_size, seed=3)
    out = []
    for m in (unfused, fused):
        torch.manual_seed(7)
        out.append(_loss_and_grads(m, ids, ids))
    (la, ga), (lb, gb) = out
    assert abs(la - lb) <= TOL
    assert max(_maxdiff(ga[n], gb[n]) for n in ga) <= TOL
    torch.manual_seed(8)  # another mask: other numbers (the dropout is live)
    assert abs(_loss_and_grads(fused, ids, ids)[0] - lb) > 1e-6


def test_fused_matches_hf_peft(debug_nf4_ckpt):
    """Loss and LoRA gradients against HF + peft + bitsandbytes (fp32 compute). The loss is HF's exactly;
    the gradients differ from peft's by up to ~2e-4 (of up to ~7e-2) in the unfused model already (HF's
    backward: measured, not this change), so fused must be as close to peft's as unfused is, per tensor."""
    peft = pytest.importorskip("peft")
    r, alpha = 8, 16.0
    ids = _ids(512, seed=9)
    labels = ids.clone()
    labels[:, :6] = -100
    hf = build_hf_model(debug_nf4_ckpt, dtype=torch.float32)
    pm = peft.get_peft_model(
        hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    )
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    key = lambda n: "base_model.model." + n.replace(".weight", ".default.weight")
    ours = {}
    for fused in (False, True):
        m = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=r, lora_alpha=alpha, fuse_projections=fused)
        _randomize_lora_(m, seed=2)
        assert set(theirs) == {key(n) for n in _lora(m)}
        ours[fused] = _loss_and_grads(m, ids, labels)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in hf.modules()) == 7 * 4
    with torch.no_grad():
        for n, p in _lora(m).items():
            theirs[key(n)].copy_(p)
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    (lu, gu), (lf, gf) = ours[False], ours[True]
    d_loss = abs(lf - out.loss.item())
    d_fused = {n: _maxdiff(g, theirs[key(n)].grad) for n, g in gf.items()}
    d_unfused = {n: _maxdiff(g, theirs[key(n)].grad) for n, g in gu.items()}
    print(
        f"\n[vs HF+peft] loss: fused {d_loss:.3e}, unfused {abs(lu - out.loss.item()):.3e}; worst LoRA grad diff: "
        f"fused {max(d_fused.values()):.3e}, unfused {max(d_unfused.values()):.3e}"
    )
    assert d_loss <= TOL
    assert all(d_fused[n] <= d_unfused[n] + TOL for n in gf), {n: (d_fused[n], d_unfused[n]) for n in gf}
    assert max(d_fused.values()) <= 1e-3  # and that distance is small


# ------------------------------------------------------------------ 3. names, resume state, export


def test_resumable_state_dict_is_the_unfused_one(debug_nf4_ckpt):
    """The checkpointed state (trainable parameters, ignore_frozen_params as recipe/checkpoint saves it)
    has the same keys and shapes fused or not; an unfused state loads strictly into the fused model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    unfused, fused = _pair(debug_nf4_ckpt)
    opts = StateDictOptions(ignore_frozen_params=True)
    sa, sb = get_model_state_dict(unfused, options=opts), get_model_state_dict(fused, options=opts)
    assert {k: tuple(v.shape) for k, v in sa.items()} == {k: tuple(v.shape) for k, v in sb.items()}
    assert len(sa) == 2 * 7 * unfused.args.shape.num_hidden_layers
    with torch.no_grad():
        for p in _lora(fused).values():
            p.zero_()
    set_model_state_dict(fused, sa, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    assert all(torch.equal(p, sa[n]) for n, p in _lora(fused).items())


def test_exported_adapter_equals_unfused_and_loads_in_peft(debug_nf4_ckpt, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from recipe.config import Lora
    from recipe.export import export_model_adapter

    unfused, fused = _pair(debug_nf4_ckpt)
    lora = Lora(rank=4, alpha=16.0)
    outs = [
        export_model_adapter(m, tmp_path / name, lora, base_model=str(debug_nf4_ckpt), verbose=False)
        for name, m in (("unfused", unfused), ("fused", fused))
    ]
    a, b = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * fused.args.shape.num_hidden_layers
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (outs[0] / "adapter_config.json").read_text() == (outs[1] / "adapter_config.json").read_text()

    hf = build_hf_model(debug_nf4_ckpt, dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(outs[1])).eval()
    ids = _ids(fused.args.shape.vocab_size, seed=4)
    with torch.no_grad():
        ours = fused(ids).logits
        theirs = pm(input_ids=ids).logits
        base = build_hf_model(debug_nf4_ckpt, dtype=torch.float32)(input_ids=ids).logits
    assert _maxdiff(ours, theirs) <= 1e-4
    assert _maxdiff(base, theirs) > 1e-3  # the adapter was loaded and matters


# ------------------------------------------------------------------------------- 4. torch.compile


def test_compiled_block_is_four_4bit_operators(debug_nf4_ckpt):
    """One DecoderLayer under torch.compile (aot_eager: the autograd graph of the custom operators,
    no inductor): the fused block runs 4 4-bit operators (qkv, o, gate_up, down) instead of 7, each
    with its adapters' product added in its output (``lora_linear_4bit``; ``model.lora_epilogue``), and
    its output and LoRA gradients equal eager's (where the adapters' products are separate adds)."""
    counts = {}

    def backend(gm, example_inputs):
        counts[len(counts)] = sum(
            n.op == "call_function" and "qlora_recipe.lora_linear_4bit" in str(n.target) for n in gm.graph.nodes
        )
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    unfused, fused = _pair(debug_nf4_ckpt)
    s = fused.args.shape
    x = torch.randn(2, 16, s.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, 16)
    cos, sin = fused.model.rotary_emb(pos, x.dtype)
    results = {}
    for tag, model in (("unfused", unfused), ("fused", fused)):
        layer = model.model.layers[1]
        torch._dynamo.reset()
        counts.clear()
        for run, fn in (("eager", layer), ("compiled", torch.compile(layer, backend=backend, fullgraph=True))):
            layer.zero_grad(set_to_none=True)
            y = fn(x, cos, sin)
            y.square().sum().backward()
            results[tag, run] = (y.detach(), {n: p.grad.clone() for n, p in _lora(layer).items()})
        assert sum(counts.values()) == (7 if tag == "unfused" else 4), (tag, counts)
    # Relative to the largest gradient (|sum y^2|' is large): fp32 summation order only.
    scale = max(float(g.abs().max()) for g in results["unfused", "eager"][1].values())
    for a, b in [(("unfused", "eager"), ("unfused", "compiled")), (("unfused", "eager"), ("fused", "compiled"))]:
        (ya, ga), (yb, gb) = results[a], results[b]
        assert _maxdiff(ya, yb) <= TOL, (a, b)
        assert max(_maxdiff(ga[n], gb[n]) for n in ga) <= TOL * scale, (a, b)


def test_fused_module_repr_and_layout(debug_nf4_ckpt):
    fused = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4, fuse_projections=True)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FusedQLoRALinear)
    assert attn.qkv_proj.parts == (("q_proj", 256), ("k_proj", 128), ("v_proj", 128))
    assert attn.q_proj.weight is None and attn.q_proj.rank == 4
    assert "base=none (fused)" in repr(attn.q_proj) and "q_proj(256)+k_proj(128)+v_proj(128)" in repr(attn.qkv_proj)


# ---------------------------------------------------------------------------------- 5. the estimate


def test_estimate_counts_the_fused_gate_up_dequantization():
    """Same weights (load peak), plus the dequantized gate+up matrix at once in the block's working set
    (8B: 2 x 14336 x 4096 bf16 = 224 MiB instead of 112 MiB)."""
    from pathlib import Path

    from recipe import estimate as E
    from recipe.config import load_config

    toml = str(Path(__file__).resolve().parents[1] / "train_configs/llama3_8b_qlora.toml")
    cfg = lambda *o: load_config(["--job.config_file", toml, "--model.checkpoint=/nonexistent/estimate", *o])
    a, b = E.estimate(cfg(), 1), E.estimate(cfg("--model.fuse_projections=true"), 1)
    assert b.load_peak == a.load_peak
    assert a.train_peak <= b.train_peak < a.train_peak + 0.25, (a.train_peak, b.train_peak)
    ja, jb = E._job(cfg(), 1), E._job(cfg("--model.fuse_projections=true"), 1)
    s = ja.shape
    for backward in (False, True):
        extra = E._block_work_bytes(jb, 4096, backward) - E._block_work_bytes(ja, 4096, backward)
        assert extra == s.intermediate_size * s.hidden_size * 2  # one more bf16 (14336 x 4096): 112 MiB
