"""The recipe's own operators (``qlora_recipe::*``), registered for a small host cost per call.

Under torch.compile the 4-bit projections are opaque operators (models/quant.py, models/qlora_op.py):
a compiled micro-batch of Llama 3 8B calls them about 2,600 times (forward, recompute and backward of
7 projections x 32 blocks x 4 micro-batches), and at micro-batch 2 the GPU waits on the host inside
them (BENCHMARKS.md, 2026-12-07 seventh session). ``torch.library.custom_op`` runs every call through
five Python layers above the kernel (its autograd kernel, a redispatch, its backend wrapper, an alias
check and a dynamo-disable wrapper), also where nothing needs a gradient: inside compiled graphs,
which run under no_grad. Measured on a 2-core CPU for the projection's signature and an empty kernel
(``benchmarks/host_cost.py`` has the real one): about 50 us per call through ``custom_op``, about 16
here.

``define`` registers the same things as ``custom_op``: a schema, the kernel for every device
(CompositeExplicitAutograd), a fake kernel for tracing and an autograd kernel. The autograd kernel
calls the kernel directly when no input needs a gradient, no dispatch mode is active and the first
input is a plain tensor (not a fake or functional one): what the dispatcher would reach anyway, one
dispatch later. Otherwise it redispatches below autograd like ``custom_op`` (so that fake tensors,
functionalization and the activation-checkpointing policy's mode see the operator itself), through an
``autograd.Function`` whose forward calls ``setup_context`` and whose backward calls ``backward``, with
``custom_op``'s conventions: ``setup_context(ctx, inputs, output)``, ``backward(ctx, grad)`` returning
one gradient per input (a list for a ``Tensor[]`` input), ``ctx.needs_input_grad`` per input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["define"]

NAMESPACE = "qlora_recipe"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def define(
    name: str,
    schema: str,
    kernel: Callable,
    *,
    fake: Callable,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
) -> torch._ops.OpOverload:
    """``qlora_recipe::<name><schema>`` with ``kernel`` on every device; returns its OpOverload."""
    _LIB.define(name + schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    lists = tuple(str(a.type) == "List[Tensor]" for a in op._schema.arguments)
    function = _function(op, setup_context, backward)

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            layout = tuple(len(a) if is_list else -1 for a, is_list in zip(args, lists, strict=True))
            return function.apply(layout, *_flatten(args, layout))
        if type(args[0]) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0:
            return kernel(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _LIB.impl(name, autograd_kernel, "Autograd")
    return op


# ``Tensor[]`` inputs travel through autograd.Function flattened (autograd tracks only tensors passed as
# arguments); ``layout`` holds each input's list length (-1: not a list).
def _flatten(values, layout) -> list:
    """One entry per list element (a None list: as many Nones), one per other value."""
    flat = []
    for v, n in zip(values, layout, strict=True):
        flat.extend(([None] * n if v is None else v) if n >= 0 else (v,))
    return flat


def _unflatten(flat, layout) -> list:
    values, i = [], 0
    for n in layout:
        values.append(list(flat[i : i + n]) if n >= 0 else flat[i])
        i += n if n >= 0 else 1
    return values


def _function(op, setup_context, backward) -> type[torch.autograd.Function]:
    """The autograd.Function of ``op``, with custom_op's conventions for ``setup_context`` / ``backward``."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layout, *flat):
            args = _unflatten(flat, layout)
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            ctx._operator_layout = layout
            if setup_context is not None:
                setup_context(ctx, tuple(args), out)
            return out

        @staticmethod
        def backward(ctx, grad):
            if backward is None:
                raise RuntimeError(f"{op} has no backward: it is only called where nothing needs its gradient")
            layout = ctx._operator_layout
            per_input = _unflatten(ctx.needs_input_grad[1:], layout)
            needs = tuple(any(v) if n >= 0 else v for v, n in zip(per_input, layout, strict=True))
            saved_needs, ctx.needs_input_grad = ctx.needs_input_grad, needs
            try:
                grads = backward(ctx, grad)
            finally:
                ctx.needs_input_grad = saved_needs
            return (None, *_flatten(grads, layout))

    Function.__name__ = f"{op._opname}_function"
    return Function
