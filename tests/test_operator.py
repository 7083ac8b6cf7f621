"""models/operator.py: the recipe's operator registration against plain autograd and torch.library.

Oracles: the same function written with torch ops (values and gradients, also of ``Tensor[]`` inputs and
with only some inputs needing a gradient), torch.library.opcheck, a dispatch mode (it must see the
operator itself, not what its kernel calls), and a counter of kernel calls (one per call, on the direct
path too).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.operator import define

CALLS = {"kernel": 0}


def _kernel(x, ws, scale, tag):
    CALLS["kernel"] += 1
    return x * scale + sum(w.sum() for w in ws)


def _fake(x, ws, scale, tag):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, ws, scale, _tag = inputs
    ctx.save_for_backward(x, *ws)
    ctx.scale = scale


def _backward(ctx, grad):
    x, *ws = ctx.saved_tensors
    gx = grad * ctx.scale if ctx.needs_input_grad[0] else None
    gws = [grad.sum().expand_as(w) for w in ws] if ctx.needs_input_grad[1] else None
    return gx, gws, None, None


OP = define(
    "test_operator_mix",
    "(Tensor x, Tensor[] ws, float scale, str tag) -> Tensor",
    _kernel,
    fake=_fake,
    setup_context=_setup,
    backward=_backward,
)
NO_BACKWARD = define("test_operator_nobackward", "(Tensor x) -> Tensor", lambda x: x * 2, fake=torch.empty_like)


def _reference(x, ws, scale):
    return x * scale + sum(w.sum() for w in ws)


@pytest.mark.parametrize("needs", ["x", "ws", "both"])
def test_values_and_gradients_equal_plain_autograd(needs):
    torch.manual_seed(0)
    x0, ws0 = torch.randn(3, 4), [torch.randn(2), torch.randn(5)]
    x = x0.clone().requires_grad_(needs in ("x", "both"))
    ws = [w.clone().requires_grad_(needs in ("ws", "both")) for w in ws0]
    xr = x0.clone().requires_grad_(x.requires_grad)
    wr = [w.clone().requires_grad_(needs in ("ws", "both")) for w in ws0]
    out, ref = OP(x, ws, 1.5, "t"), _reference(xr, wr, 1.5)
    assert torch.equal(out, ref)
    g = torch.randn(3, 4)
    out.backward(g)
    ref.backward(g)
    for got, want in ((x, xr), *zip(ws, wr, strict=True)):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            assert torch.allclose(got.grad, want.grad)


def test_the_direct_path_runs_the_kernel_once_and_a_mode_still_sees_the_operator():
    x, ws = torch.randn(3, 4), [torch.randn(2)]
    CALLS["kernel"] = 0
    with torch.no_grad():
        out = OP(x, ws, 2.0, "")
    assert CALLS["kernel"] == 1 and torch.equal(out, _reference(x, ws, 2.0))

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        OP(x, ws, 2.0, "")
    assert seen[0] is OP  # the mode sees the operator (activation checkpointing's policy matches on it)
    with Record():
        OP(x.requires_grad_(), ws, 2.0, "")  # through the autograd.Function
    assert OP in seen[1:]


def test_torch_library_opcheck_passes():
    x, ws = torch.randn(3, 4, requires_grad=True), [torch.randn(2, requires_grad=True)]
    torch.library.opcheck(OP, (x, ws, 1.5, "t"))


def test_an_operator_without_backward_says_so():
    y = NO_BACKWARD(torch.ones(2, requires_grad=True))
    with pytest.raises(RuntimeError, match="has no backward"):
        y.sum().backward()


def test_compiled_graph_calls_the_operator():
    x, ws = torch.randn(3, 4, requires_grad=True), [torch.randn(2, requires_grad=True)]
    f = torch.compile(lambda x, ws: OP(x, ws, 1.5, "t") * 2, backend="aot_eager", fullgraph=True)
    out = f(x, ws)
    out.sum().backward()
    assert torch.allclose(out, 2 * _reference(x, ws, 1.5))
    assert torch.allclose(x.grad, torch.full_like(x, 3.0)) and torch.allclose(ws[0].grad, torch.full((2,), 24.0))


def test_host_cost_benchmark_runs_both_registrations(capsys):
    """benchmarks/host_cost.py on CPU: every path gives bitsandbytes' result (it asserts that itself) and
    the table has a row per path, the projection through both registrations."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "host_cost.py"
    spec = importlib.util.spec_from_file_location("host_cost", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--calls", "20"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["functional", "operator", "recipe", "projection", "projection (custom_op)"]
