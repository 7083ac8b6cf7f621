"""``models.quant.lora_linear_4bit`` (``model.lora_epilogue``): the adapters' products accumulated into the
frozen 4-bit product's output, against the same sum written out with the weight bitsandbytes dequantizes.

* forward: x @ W.T + xa_i @ B_i.T in each adapter's output columns (a fused q/k/v matrix whose k part
  has no adapter included); gradients of x, xa and every B equal autograd's through the written-out sum;
* in bf16 the sum is rounded once: no further from an fp32 reference than the separate add, which
  rounds the adapter's product first;
* the operator passes torch.library's own checks (schema, fake tensor, autograd registration);
* a compiled model (inductor) runs it and trains as the eager model does: losses and LoRA gradients of
  the whole model within fp32 summation order.
"""

from __future__ import annotations

import pytest
import torch

from models.hf_reader import quantize_rows
from models.quant import Weight4bit, _lora_linear_4bit_op, lora_linear_4bit

pytestmark = pytest.mark.usefixtures("single_thread")


def _weight(rows: int, k: int, seed: int = 0, dtype=torch.float32) -> Weight4bit:
    dense = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    q = quantize_rows(dense, "nf4", 64)
    return Weight4bit(q.packed, q.absmax, q.code, rows, "nf4", 64, dtype)


def _inputs(dtype=torch.float32, rows=(48, 16, 16), ranks=(4, 4), offsets=(0, 64)):
    """x (2 x 5 x 64), a fused (q 48 | k 16 | v 16) weight, adapters on q and v only."""
    g = torch.Generator().manual_seed(1)
    w = _weight(sum(rows), 64, dtype=dtype)
    x = torch.randn(2, 5, 64, generator=g).to(dtype).requires_grad_()
    xa = torch.randn(2, 5, sum(ranks), generator=g).to(dtype).requires_grad_()
    outs = [rows[0], rows[2]]
    bs = [(torch.randn(o, r, generator=g) * 0.5).to(dtype).requires_grad_() for o, r in zip(outs, ranks, strict=True)]
    return w, x, xa, bs, list(offsets)


def _written_out(w, x, xa, bs, offsets):
    cols, r0 = list((x @ w.dequantize(x.dtype).t()).split([48, 16, 16], -1)), 0
    for b, i in zip(bs, (0, 2), strict=True):  # offsets 0 and 64: the q and v parts
        cols[i] = cols[i] + xa[..., r0 : r0 + b.shape[1]] @ b.t()
        r0 += b.shape[1]
    return torch.cat(cols, -1)


def test_sum_and_gradients_equal_the_written_out_sum():
    w, x, xa, bs, offsets = _inputs()
    y = lora_linear_4bit(x, w, xa, bs, offsets)
    ref = _written_out(w, x, xa, bs, offsets)
    assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, [x, xa, *bs], g)
    want = torch.autograd.grad(ref, [x, xa, *bs], g)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)


def test_bf16_sum_is_rounded_once():
    """Against fp32 on the same bf16 inputs: the epilogue's error is at most the separate add's."""
    w, x, xa, bs, offsets = _inputs(torch.bfloat16)
    with torch.no_grad():
        exact = _written_out(w, x.float(), xa.float(), [b.float() for b in bs], offsets)
        fused = lora_linear_4bit(x, w, xa, bs, offsets).float()
        apart = _written_out(w, x, xa, bs, offsets).float()
    err_fused, err_apart = (fused - exact).abs().mean(), (apart - exact).abs().mean()
    assert err_fused <= err_apart, (err_fused, err_apart)


def test_opcheck():
    w, x, xa, bs, offsets = _inputs()
    args = (x, w.packed, w.absmax, w.real_rows, w.quant_type, w.blocksize, xa, bs, offsets, "")
    torch.library.opcheck(_lora_linear_4bit_op, args)


def test_compiled_model_trains_as_eager(debug_nf4_ckpt, monkeypatch):
    """The whole model under torch.compile (inductor on CPU: the operator and its backward inside the
    compiled graphs) against eager (separate adds): losses and LoRA gradients within fp32 summation
    order, over three AdamW steps."""
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
                block.compile()
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
