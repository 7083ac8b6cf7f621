"""``models.qlora_op.lora_linear_4bit`` (``model.lora_epilogue``): a QLoRA projection as one operator, the
adapters' products accumulated into the frozen product's output and, in backward, the adapters' input
gradient into the frozen one; against the same sum written out with the weight bitsandbytes dequantizes.

* forward: x @ W.T + s_i (x @ A_i.T) @ B_i.T in each adapter's output columns (a fused q/k/v matrix whose
  k part has no adapter); the gradients of x, every A and every B equal autograd's through the
  written-out sum, also with a separate adapter input (LoRA dropout), whose gradient then stays apart;
* in bf16 the sums are rounded once: no further from fp32 than the written-out sum, which rounds each
  product first;
* both operators pass torch.library's own checks (schema, fake tensor, autograd registration);
* a compiled model runs it and trains as the eager model does: losses and LoRA gradients of the whole
  model within fp32 summation order (through aot_eager, the graphs inductor would get, as
  tests/test_oracle.py; inductor itself runs it in tests/test_train.py's compiled run).
"""

from __future__ import annotations

import pytest
import torch

from models.hf_reader import quantize_rows
from models.qlora_op import _grad_input_op, _op, lora_linear_4bit
from models.quant import Weight4bit

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES, RANKS, SCALES, OFFSETS = [48, 16, 16], (4, 2), (2.0, 0.5), [0, 64]  # adapters on the q and v parts


def _weight(rows: int, k: int, seed: int = 0, dtype=torch.float32) -> Weight4bit:
    dense = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    q = quantize_rows(dense, "nf4", 64)
    return Weight4bit(q.packed, q.absmax, q.code, rows, "nf4", 64, dtype)


def _inputs(dtype=torch.float32, dropout=False):
    g = torch.Generator().manual_seed(1)
    w = _weight(sum(SIZES), 64, dtype=dtype)
    leaf = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype).requires_grad_()
    x = leaf(2, 5, 64)
    xd = leaf(2, 5, 64) if dropout else None
    As = [leaf(r, 64, std=0.2) for r in RANKS]
    Bs = [leaf(o, r, std=0.5) for o, r in zip((SIZES[0], SIZES[2]), RANKS, strict=True)]
    return w, x, xd, As, Bs


def _written_out(w, x, xd, As, Bs):
    cols = list((x @ w.dequantize(x.dtype).t()).split(SIZES, -1))
    src = x if xd is None else xd
    for a, b, s, i in zip(As, Bs, SCALES, (0, 2), strict=True):
        cols[i] = cols[i] + s * ((src @ a.t()) @ b.t())
    return torch.cat(cols, -1)


@pytest.mark.parametrize("dropout", [False, True])
def test_sum_and_gradients_equal_the_written_out_sum(dropout):
    w, x, xd, As, Bs = _inputs(dropout=dropout)
    y = lora_linear_4bit(x, w, xd, As, Bs, SCALES, OFFSETS)
    ref = _written_out(w, x, xd, As, Bs)
    assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    leaves = [x, *([xd] if dropout else []), *As, *Bs]
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)


def test_bf16_sums_are_rounded_once():
    """Against fp32 on the same bf16 inputs: the operator's error (output, and x's gradient, where the
    adapters' part is accumulated into the frozen one) is at most the written-out sum's."""
    w, x, _, As, Bs = _inputs(torch.bfloat16)
    f32 = lambda ts: [t.detach().float().requires_grad_() for t in ts]
    xf, Af, Bf = f32([x])[0], f32(As), f32(Bs)
    g = torch.randn(2, 5, sum(SIZES), generator=torch.Generator().manual_seed(3))
    exact = _written_out(w, xf, None, Af, Bf)
    (exact_gx,) = torch.autograd.grad(exact, [xf], g)
    one = lora_linear_4bit(x, w, None, As, Bs, SCALES, OFFSETS)
    apart = _written_out(w, x, None, As, Bs)
    (one_gx,) = torch.autograd.grad(one, [x], g.bfloat16())
    (apart_gx,) = torch.autograd.grad(apart, [x], g.bfloat16())
    err = lambda t, ref: (t.detach().float() - ref.detach()).abs().mean()
    assert err(one, exact) <= err(apart, exact)
    assert err(one_gx, exact_gx) <= err(apart_gx, exact_gx)


def test_opcheck():
    w, x, _, As, Bs = _inputs()
    meta = (w.packed, w.absmax, w.real_rows, w.quant_type, w.blocksize)
    torch.library.opcheck(_op, (x, *meta, None, As, Bs, list(SCALES), OFFSETS, ""))
    grad = torch.randn(2, 5, sum(SIZES))
    args = (grad, w.packed, w.absmax, 64, w.quant_type, w.blocksize, torch.randn(10, sum(RANKS)), torch.cat(As))
    torch.library.opcheck(_grad_input_op, tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args))


def test_compiled_model_trains_as_eager(debug_nf4_ckpt, monkeypatch):
    """Every block under torch.compile (aot_eager: the operator and its backward inside the traced
    graphs) against eager (separate adds): losses and LoRA gradients within fp32 summation order, over
    three AdamW steps."""
    import models.lora
    from tests.conftest import build_recipe_model

    calls = []
    monkeypatch.setattr(models.lora, "lora_linear_4bit", lambda *a, **k: calls.append(1) or lora_linear_4bit(*a, **k))
    runs = {}
    for mode in ("eager", "compiled"):
        calls.clear()
        model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for name, p in sorted(model.named_parameters()):
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if mode == "compiled":
            torch._dynamo.reset()
            for block in model.model.layers:
                block.compile(backend="aot_eager")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, model.args.shape.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            losses.append(loss.item())
        runs[mode] = losses, grads
        assert bool(calls) == (mode == "compiled"), mode  # the epilogue where compiled, only there
    (la, ga), (lb, gb) = runs["eager"], runs["compiled"]
    assert max(abs(a - b) for a, b in zip(la, lb, strict=True)) < 1e-4, (la, lb)
    scale = max(float(t.abs().max()) for t in ga.values())
    assert max(float((ga[n] - gb[n]).abs().max()) for n in ga) <= 1e-4 * scale
