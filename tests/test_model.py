"""The recipe's Llama + QLoRA model (models/llama.py, models/lora.py, models/quant.py) against oracles:

* HF transformers' ``LlamaForCausalLM`` on the same bf16 weights (logits, loss);
* bitsandbytes' own ``dequantize_4bit`` on the raw safetensors keys (the QLoRA layer, forward + backward);
* HF + peft on the same bnb 4-bit checkpoint with the same LoRA weights (logits, loss);
* plain ``F.cross_entropy`` (chunked loss, gradients);
* HF's llama3 RoPE initialisation.

All in fp32 on CPU. The model is built on meta and materialized from a checkpoint without a process
group (non-DTensor parameters get all rows).
"""

from __future__ import annotations

import copy
import ctypes
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from models.hf_reader import CheckpointReader
from models.llama import LORA_TARGETS, LlamaForCausalLM, ModelArgs, llama3_inv_freq
from models.lora import QLoRALinear, init_lora_, lora_init_tensor
from models.quant import Weight4bit
from models.shapes import SHAPES, shape_to_hf_config
from tests.conftest import build_hf_model, build_recipe_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5  # fp32 against fp32: only summation order may differ
B, T = 2, 48


def _ids(vocab, seed=0, shape=(B, T)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_lora_(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


# ------------------------------------------------------------------------------------ 1. dense vs HF


# LoRA with B = 0 on one, none on the other (test_initial_lora_model_equals_base shows the two are equal)
@pytest.mark.parametrize("ckpt_fixture,lora", [("debug_bf16_ckpt", True), ("debug_tied_ckpt", False)])
def test_logits_match_hf(request, ckpt_fixture, lora):
    ckpt = request.getfixturevalue(ckpt_fixture)
    ours = build_recipe_model(ckpt, lora_rank=8 if lora else 0)
    if lora:  # B = 0: the adapter must add exactly nothing
        assert all(torch.count_nonzero(p) == 0 for n, p in _lora_params(ours).items() if ".lora_B." in n)
    hf = build_hf_model(ckpt)
    vocab = ours.args.shape.vocab_size
    if ckpt_fixture == "debug_tied_ckpt":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _ids(vocab)

    with torch.no_grad():
        # plain causal
        a, b = ours(ids).logits, hf(ids).logits
        assert a.shape == b.shape == (B, T, vocab) and a.dtype == torch.float32
        d = _maxdiff(a, b)
        print(f"[{ckpt_fixture}] causal logits vs HF: {d:.3g}")
        assert d <= TOL, f"causal logits differ by {d}"

        # right padding: compare real positions only
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 29:] = 0
        mask[0, 45:] = 0
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
        keep = mask.bool()
        d = _maxdiff(a[keep], b[keep])
        print(f"[{ckpt_fixture}] right-padded logits vs HF: {d:.3g}")
        assert d <= TOL, f"padded logits differ by {d}"
        # padding must change nothing at the real positions of the unpadded reference either
        a_full = ours(ids).logits
        assert _maxdiff(a[keep], a_full[keep]) <= TOL

        # explicit (non-contiguous, per-row) position ids
        pos = torch.stack(
            [torch.arange(T) + 7, torch.randperm(4096, generator=torch.Generator().manual_seed(3))[:T].sort().values]
        )
        a, b = ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits
        d = _maxdiff(a, b)
        print(f"[{ckpt_fixture}] logits with position_ids vs HF: {d:.3g}")
        assert d <= TOL, f"logits with position_ids differ by {d}"
        assert _maxdiff(a, ours(ids).logits) > 1e-3  # the positions really were used


def test_loss_matches_hf(debug_bf16_ckpt):
    ours = build_recipe_model(debug_bf16_ckpt)
    hf = build_hf_model(debug_bf16_ckpt)
    vocab = ours.args.shape.vocab_size
    ids = _ids(vocab, seed=5)
    labels = ids.clone()
    labels[0, :10] = -100  # prompt masking
    labels[1, 20:23] = -100
    labels[1, -1] = -100
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref = hf(ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        assert int(out.num_tokens) == n
        print(f"loss vs HF: {abs(out.loss.item() - ref.loss.item()):.3g}")
        assert abs(out.loss.item() - ref.loss.item()) <= TOL, (out.loss.item(), ref.loss.item())
        assert torch.allclose(out.loss_sum / out.num_tokens, out.loss, rtol=0, atol=0)
        # manual oracle on HF's logits: mean over non-ignored shifted tokens
        manual = F.cross_entropy(ref.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert abs(out.loss.item() - manual.item()) <= TOL

        # num_items_in_batch divides the sum (HF's gradient-accumulation convention, the HF driver's
        # wrapper around this model's modules)
        from recipe.hf_trainer import HFLlamaForCausalLM

        out2 = HFLlamaForCausalLM.forward(ours, ids, labels=labels, num_items_in_batch=torch.tensor(1000))
        ref2 = hf(ids, labels=labels, num_items_in_batch=torch.tensor(1000))
        assert torch.equal(out2.loss_sum, out.loss_sum)
        assert abs(out2.loss.item() - out.loss_sum.item() / 1000) <= 1e-7
        assert abs(out2.loss.item() - ref2.loss.item()) <= TOL
        # labels given: logits only on request
        assert out.logits is None
        out3 = ours.causal_lm_output(ours.model(ids), labels, with_logits=True)
        assert _maxdiff(out3.logits, ref.logits) <= TOL


def test_forward_refuses_unknown_keywords():
    """The model's forward takes its five inputs only: HF's calling convention (num_items_in_batch,
    return_logits, use_cache, ...) is recipe.hf_trainer's wrapper's, and a misspelt keyword is an error,
    not silently ignored."""
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelArgs(SHAPES["debug"], lora_rank=0, quant_type=None))
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    for kw in ("num_items_in_batch", "return_logits", "use_cache", "labels_"):
        with pytest.raises(TypeError, match=kw):
            model(ids, **{kw: 1})


# ------------------------------------------------------------------------------------ 2. the QLoRA layer


def _file_quant_state(ckpt, prefix):
    """bitsandbytes' QuantState rebuilt from the raw safetensors keys of ``prefix``.weight."""
    import json

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for key, fname in index.items():
        if key == f"{prefix}.weight" or key.startswith(f"{prefix}.weight."):
            with safe_open(str(ckpt / fname), "pt") as f:
                raw[key] = f.get_tensor(key)
    packed = raw.pop(f"{prefix}.weight")
    state = bnbF.QuantState.from_dict(
        {k[len(prefix) + len(".weight.") :]: v for k, v in raw.items()}, device=torch.device("cpu")
    )
    return packed, state


def _bnb_dequant_fp32(packed, state):
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnbF.dequantize_4bit(packed, state)


@pytest.mark.parametrize("ckpt_fixture", ["debug_nf4_ckpt", "debug_fp4_ckpt"])
@pytest.mark.parametrize("proj", ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.k_proj"])
def test_qlora_layer_forward_backward(request, ckpt_fixture, proj):
    ckpt = request.getfixturevalue(ckpt_fixture)
    quant = "nf4" if "nf4" in ckpt_fixture else "fp4"
    model = build_recipe_model(ckpt, quant_type=quant, lora_rank=8, lora_alpha=16.0)
    _randomize_lora_(model, seed=11, std=0.1)
    layer: QLoRALinear = model.get_submodule(proj)
    assert isinstance(layer.weight, Weight4bit) and layer.scaling == 2.0

    packed, state = _file_quant_state(ckpt, proj)
    W = _bnb_dequant_fp32(packed, state)
    assert W.shape == (layer.out_features, layer.in_features)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    Bm = layer.lora_B.weight.detach().clone().requires_grad_(True)
    assert A.abs().sum() > 0 and Bm.abs().sum() > 0

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    gy = torch.randn(3, 5, layer.out_features, generator=g)

    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    (y * gy).sum().backward()

    x2 = x.clone().requires_grad_(True)
    y_ref = x2 @ W.T + layer.scaling * (x2 @ A.T) @ Bm.T
    (y_ref * gy).sum().backward()

    d_fwd = _maxdiff(y, y_ref)
    d_gx = _maxdiff(x1.grad, x2.grad)
    d_gA = _maxdiff(layer.lora_A.weight.grad, A.grad)
    d_gB = _maxdiff(layer.lora_B.weight.grad, Bm.grad)
    print(
        f"[{quant} {proj}] QLoRA layer vs bnb oracle: fwd {d_fwd:.3g} grad_x {d_gx:.3g} "
        f"grad_A {d_gA:.3g} grad_B {d_gB:.3g}"
    )
    assert d_fwd <= TOL, f"forward differs by {d_fwd}"
    assert d_gx <= TOL, f"input gradient differs by {d_gx}"
    assert d_gA <= 1e-4 * A.grad.abs().max().item() and d_gB <= 1e-4 * Bm.grad.abs().max().item(), (d_gA, d_gB)

    # the frozen base weight never gets a gradient
    assert layer.weight.requires_grad is False
    assert layer.weight.grad is None
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    # ... anywhere in the model: only LoRA parameters are trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_qlora_model_backward_only_lora_grads(debug_nf4_ckpt):
    model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4)
    _randomize_lora_(model)
    ids = _ids(model.args.shape.vocab_size)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


# ------------------------------------------------------------------------------------ 3. 4-bit model vs HF + peft


# fp32 compute (the oracle setting), and bf16 compute: HF's default bnb_4bit_compute_dtype for these
# checkpoints, against the recipe model in bf16 (fp32 LoRA master weights, as peft keeps them).
@pytest.mark.parametrize(
    "ckpt_fixture,dtype",
    [("debug_nf4_ckpt", torch.float32), ("debug_fp4_ckpt", torch.float32), ("debug_nf4_ckpt", torch.bfloat16)],
    ids=["nf4-fp32", "fp4-fp32", "nf4-bf16"],
)
def test_qlora_model_matches_hf_peft(request, ckpt_fixture, dtype):
    peft = pytest.importorskip("peft")
    ckpt = request.getfixturevalue(ckpt_fixture)
    quant = "nf4" if "nf4" in ckpt_fixture else "fp4"
    R, ALPHA = 8, 16.0
    ours = build_recipe_model(ckpt, quant_type=quant, lora_rank=R, lora_alpha=ALPHA, dtype=dtype)
    _randomize_lora_(ours, seed=2)

    hf = build_hf_model(ckpt, dtype=dtype)
    n4 = [m for m in hf.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(n4) == 7 * ours.args.shape.num_hidden_layers
    assert all(m.support_avx512bf16_for_cpu is False and m.compute_dtype == dtype for m in n4)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg).eval()
    peft_params = dict(pm.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in _lora_params(ours).items():
            key = "base_model.model." + name.replace(".weight", ".default.weight")
            assert peft_params[key].shape == p.shape and peft_params[key].dtype == p.dtype == torch.float32, key
            peft_params[key].copy_(p)
            copied += 1
    assert copied == 2 * 7 * ours.args.shape.num_hidden_layers
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        "base_model.model." + n.replace(".weight", ".default.weight") for n in _lora_params(ours)
    }

    ids = _ids(ours.args.shape.vocab_size, seed=9)
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        a = ours.causal_lm_output(ours.model(ids), labels, with_logits=True)
        b = pm(input_ids=ids, labels=labels)
    d_logits = _maxdiff(a.logits, b.logits)
    d_loss = abs(a.loss.item() - b.loss.item())
    print(f"[{quant} {dtype}] recipe vs HF+peft: max |logits diff| = {d_logits:.3g}, |loss diff| = {d_loss:.3g}")
    if dtype == torch.float32:
        assert d_logits <= 1e-4, d_logits  # measured: 0
        assert d_loss <= 1e-5, d_loss  # measured: 0
    else:  # bf16: one bf16 ulp of a logit of size ~1 is 2**-7 (measured: 0 and 5e-7)
        assert d_logits <= 2**-7, d_logits
        assert d_loss <= 1e-3, d_loss
    # the adapter matters: the same model without LoRA differs
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    assert _maxdiff(base, b.logits) > 1e-3


# ------------------------------------------------------------------------------------ 4. loss


def _reference_loss_sum(model, ids, labels):
    logits = model(ids).logits  # full logits, one cross-entropy over everything
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_cross_entropy_matches_unchunked(debug_nf4_ckpt, chunk):
    model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4, loss_chunk_tokens=chunk)
    _randomize_lora_(model, seed=3)
    params = _lora_params(model)
    ids = _ids(model.args.shape.vocab_size, seed=6)
    labels = ids.clone()
    labels[0, :20] = -100  # whole chunks without targets are skipped: must not change anything
    labels[1, 33:40] = -100

    ref = _reference_loss_sum(model, ids, labels)
    ref_grads = torch.autograd.grad(ref, list(params.values()))

    out = model(ids, labels=labels)
    assert model.args.loss_chunk_tokens == chunk
    grads = torch.autograd.grad(out.loss_sum, list(params.values()))
    assert abs(out.loss_sum.item() - ref.item()) <= 1e-5 * abs(ref.item())
    n = int((labels[:, 1:] != -100).sum())
    assert int(out.num_tokens) == n
    assert abs(out.loss.item() - ref.item() / n) <= TOL
    worst = max(_maxdiff(g, r) / max(r.abs().max().item(), 1e-12) for g, r in zip(grads, ref_grads, strict=True))
    print(
        f"[chunk {chunk}] loss_sum diff {abs(out.loss_sum.item() - ref.item()):.3g}, "
        f"worst relative LoRA grad diff {worst:.3g}"
    )
    assert worst <= 1e-4, f"relative LoRA gradient difference {worst}"
    assert all(r.abs().sum() > 0 for r in ref_grads)


def test_loss_all_targets_ignored_is_zero_and_differentiable(debug_bf16_ckpt):
    """A micro-batch whose labels are all -100 (a prompt longer than seq_len, say) contributes 0 and
    must still run backward (FSDP needs every rank's backward, grad accumulation needs a graph)."""
    model = build_recipe_model(debug_bf16_ckpt, lora_rank=4, loss_chunk_tokens=7)
    _randomize_lora_(model)
    ids = _ids(model.args.shape.vocab_size)
    labels = torch.full_like(ids, -100)
    out = model(ids, labels=labels)
    assert out.loss.item() == 0.0 and out.loss_sum.item() == 0.0 and int(out.num_tokens) == 0
    out.loss_sum.backward()
    for name, p in _lora_params(model).items():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


# ------------------------------------------------------------------------------------ 5. LoRA init


def test_lora_init_tensor_distribution_and_determinism():
    name_a = "model.layers.3.mlp.down_proj.lora_A.weight"
    shape = (16, 640)
    a = lora_init_tensor(name_a, shape, seed=0)
    bound = 1.0 / math.sqrt(shape[1])
    assert a.shape == shape and a.dtype == torch.float32
    assert a.abs().max().item() <= bound
    # a uniform sample of 10240 values fills the interval
    assert a.max().item() > 0.98 * bound and a.min().item() < -0.98 * bound
    assert abs(a.mean().item()) < 0.02 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    # pure function of (seed, name)
    assert torch.equal(a, lora_init_tensor(name_a, shape, seed=0))
    assert not torch.equal(a, lora_init_tensor(name_a, shape, seed=1))
    assert not torch.equal(a, lora_init_tensor(name_a.replace("down_proj", "up_proj"), shape, seed=0))
    # B starts at zero
    b = lora_init_tensor(name_a.replace("lora_A", "lora_B"), (640, 16), seed=0)
    assert b.shape == (640, 16) and torch.count_nonzero(b) == 0


def test_materialized_lora_init(debug_nf4_ckpt):
    m0 = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=8, lora_seed=0)
    m0b = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=8, lora_seed=0)
    m1 = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=8, lora_seed=1)
    p0, p0b, p1 = _lora_params(m0), _lora_params(m0b), _lora_params(m1)
    assert len(p0) == 2 * 7 * m0.args.shape.num_hidden_layers
    for name, p in p0.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert torch.equal(p, p0b[name])
        assert torch.equal(p, lora_init_tensor(name, tuple(p.shape), 0))
        if ".lora_A." in name:
            assert p.abs().max().item() <= 1.0 / math.sqrt(p.shape[1])
            assert not torch.equal(p, p1[name])
        else:
            assert torch.count_nonzero(p) == 0
    # different modules get different draws
    a_vals = [p for n, p in p0.items() if ".lora_A." in n and p.shape == (8, 256)]
    assert len(a_vals) > 1 and not torch.equal(a_vals[0], a_vals[1])
    # init_lora_ (single process) gives the same values
    m2 = copy.deepcopy(m1)
    init_lora_(m2, seed=0)
    for name, p in _lora_params(m2).items():
        assert torch.equal(p, p0[name])


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_initial_lora_model_equals_base(debug_nf4_ckpt, debug_bf16_ckpt, quant):
    ckpt = debug_nf4_ckpt if quant else debug_bf16_ckpt
    base = build_recipe_model(ckpt, quant_type=quant, lora_rank=0)
    lora = build_recipe_model(ckpt, quant_type=quant, lora_rank=8, lora_seed=123)
    ids = _ids(base.args.shape.vocab_size, seed=8)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, lora(ids).logits)


# ------------------------------------------------------------------------------------ 6. RoPE


@pytest.mark.parametrize("shape_name", ["debug", "llama3_2_1b", "llama3_1_8b"])
def test_llama3_rope_inv_freq_matches_hf(shape_name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    shape = SHAPES[shape_name]
    assert shape.rope_scaling["rope_type"] == "llama3"
    cfg = LlamaConfig(**{k: v for k, v in shape_to_hf_config(shape).items() if k not in ("architectures",)})
    ref, scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    ours = llama3_inv_freq(shape)
    assert scaling == 1.0
    assert ours.shape == ref.shape == (shape.head_dim // 2,)
    assert torch.equal(ours, ref.to(ours.dtype)), _maxdiff(ours, ref)
    # scaling really applies: differs from plain RoPE in the low frequencies
    plain = llama3_inv_freq(shape.replace(rope_scaling=None))
    assert not torch.equal(ours, plain) and torch.equal(ours[:2], plain[:2])


def test_rope_buffer_after_materialize_matches_hf_model(debug_bf16_ckpt):
    ours = build_recipe_model(debug_bf16_ckpt)
    hf = build_hf_model(debug_bf16_ckpt)
    assert not ours.model.rotary_emb.inv_freq.is_meta
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq.to(torch.float32))


# --- device placement under CPU offload (the GPU run that found these used CUDA; meta stands in here)


def test_gathered_weight_takes_code_book_to_the_data_device():
    """With CPU offload FSDP calls fsdp_post_all_gather on the CPU shard while the gathered bytes are
    on the GPU; the code book must follow the data or dequantize mixes devices."""
    shard = Weight4bit.empty(8, 128, quant_type="nf4", blocksize=64, dtype=torch.float32, device="cpu")
    packed = torch.zeros(16, 64, dtype=torch.uint8, device="meta")
    absmax = torch.ones(16, 2, dtype=torch.float32, device="meta")
    full, _ = shard.fsdp_post_all_gather((packed, absmax), None, torch.float32)
    assert full.code.device == packed.device == full.packed.device
    buf = torch.zeros(shard.packed.numel() + 4 * shard.absmax.numel(), dtype=torch.uint8, device="meta")
    full1, _ = shard.fsdp_post_all_gather((buf,), None, torch.float32)
    assert full1.code.device == buf.device


def test_weight4bit_to_dtype_is_a_copy_that_dequantizes_the_same():
    """``.to(dtype)`` changes only the dequantization dtype and, like any ``_to_copy``, shares no storage."""
    w = Weight4bit.empty(4, 128, quant_type="nf4", blocksize=64, dtype=torch.float32, device="cpu")
    w.packed.copy_(torch.randint(0, 256, w.packed.shape, dtype=torch.uint8))
    w.absmax.copy_(torch.rand(w.absmax.shape) + 0.5)
    h = w.to(torch.bfloat16)
    assert isinstance(h, Weight4bit) and h.dtype == torch.bfloat16 and h.packed.dtype == torch.uint8
    assert torch.equal(h.dequantize(torch.float32), w.dequantize(torch.float32))
    assert h.packed.data_ptr() != w.packed.data_ptr() and h.absmax.data_ptr() != w.absmax.data_ptr()


_DEQUANT_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEQUANT_DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_entry_matches_bitsandbytes(device, quant_type, dtype, monkeypatch):
    """The recipe's dequantization (on CUDA bitsandbytes' C entry point called directly, elsewhere its
    registered operator) is bit for bit ``bitsandbytes.functional.dequantize_4bit``, also for the real
    rows of a row-padded weight."""
    from models import quant

    calls = []
    entry = quant._bnb_dequantize_entry

    def counted(*key):
        fn = entry(*key)
        return None if fn is None else lambda *a: (calls.append(key), fn(*a))

    monkeypatch.setattr(quant, "_bnb_dequantize_entry", counted)
    torch.manual_seed(0)
    dense = torch.randn(24, 256, device=device)
    q, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type=quant_type)
    want = bnbF.dequantize_4bit(
        q, state.__class__(absmax=state.absmax, shape=state.shape, blocksize=64, quant_type=quant_type, dtype=dtype)
    )
    packed, absmax = q.reshape(24, -1), state.absmax.reshape(24, -1).float()
    padded = torch.cat([packed, torch.zeros_like(packed[:8])]), torch.cat([absmax, torch.ones_like(absmax[:8])])
    for p, a in ((packed, absmax), padded):
        got = quant._dequantize_rows(p, a, 24, 256, quant_type, 64, dtype)
        assert got.dtype == dtype and got.shape == (24, 256) and torch.equal(got, want)
    # CUDA: both went through the C entry point (not the fallback); elsewhere neither did
    assert calls == ([(dtype, quant_type)] * 2 if device == "cuda" else [])


def test_dequantize_entry_needs_the_declared_argument_types(monkeypatch):
    """The C entry point is called only where bitsandbytes declares it with the argument types it had in
    0.50: a version that changed them (or has no CUDA backend) gets the registered operator instead."""
    import types

    from bitsandbytes import cextension

    from models import quant

    find = quant._bnb_dequantize_entry.__wrapped__  # uncached
    same = types.SimpleNamespace(argtypes=tuple(quant._BNB_ARGTYPES))
    changed = types.SimpleNamespace(
        argtypes=tuple(quant._BNB_ARGTYPES[:4]) + (ctypes.c_int64,) * 2 + (ctypes.c_void_p,)
    )
    undeclared = types.SimpleNamespace()
    lib = types.SimpleNamespace(
        cdequantize_blockwise_bf16_nf4=same,
        cdequantize_blockwise_fp16_nf4=changed,
        cdequantize_blockwise_fp32_nf4=undeclared,
    )
    monkeypatch.setattr(cextension, "lib", lib)
    assert find(torch.bfloat16, "nf4") is same
    assert find(torch.float16, "nf4") is None and find(torch.float32, "nf4") is None
    assert find(torch.bfloat16, "fp4") is None  # no such entry point


def test_buffers_live_on_the_compute_device_when_shards_do_not(debug_nf4_ckpt):
    from parallel.materialize import materialize

    reader = CheckpointReader(debug_nf4_ckpt)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelArgs(reader.shape, lora_rank=4, dtype=torch.float32))
    materialize(model, reader, device=torch.device("cpu"), lora_seed=0, buffer_device=torch.device("meta"))
    assert model.model.rotary_emb.inv_freq.device.type == "meta"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_packed_documents_do_not_attend_to_each_other(debug_bf16_ckpt):
    """A row packing two documents (position ids restarting at 0) gives each document exactly the
    logits it gets alone: attention stops at document boundaries, consistent with the positions."""
    m = build_recipe_model(debug_bf16_ckpt)
    V = m.args.shape.vocab_size
    d1, d2 = _ids(V, seed=1, shape=(1, 20)), _ids(V, seed=2, shape=(1, 28))
    row = torch.cat([d1, d2], dim=1)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    with torch.no_grad():
        packed = m(row, position_ids=pos).logits
        alone1, alone2 = m(d1).logits, m(d2).logits
        leaky = m(row).logits  # plain causal over the whole row: document 2 sees document 1
    assert _maxdiff(packed[:, :20], alone1) <= 1e-5
    assert _maxdiff(packed[:, 20:], alone2) <= 1e-5
    assert _maxdiff(leaky[:, 20:], alone2) > 1e-3


def test_inputs_embeds_equal_input_ids(debug_nf4_ckpt):
    """HF's calling convention: inputs_embeds instead of input_ids gives the same logits; passing both
    or neither is an error."""
    model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4)
    ids = torch.randint(0, model.args.shape.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = model(inputs_embeds=model.model.embed_tokens(ids)).logits
        assert torch.equal(out, ref)
        for kwargs in ({}, {"input_ids": ids, "inputs_embeds": model.model.embed_tokens(ids)}):
            with pytest.raises(ValueError, match="exactly one"):
                model(**kwargs)
