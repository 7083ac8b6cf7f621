"""A QLoRA projection as one operator: the frozen 4-bit product with its adapters inside it.

    y = x @ W.T + sum_i s_i * (xd @ A_i.T) @ B_i.T      (each adapter i into its output columns)

Used by compiled blocks (``models.lora``, ``model.lora_epilogue``). Written as separate operations, the
adapter's path leaves tensors of the frozen path's size that inductor keeps apart: in forward the
adapter's product (tokens x out) beside the frozen one, because the add is fused into its consumers
(silu(gate) * up and its backward), which then read both; in backward the adapter's input gradient
(tokens x in) beside the frozen one, for the same reason. For Llama 3 8B's MLP at 8,192 tokens each is
224 MiB, and they are alive at the training peak (a block's MLP backward; BENCHMARKS.md 2026-12-07 sixth
session, ``benchmarks/memory_at_peak.py``). Here both are accumulated in place instead: each B GEMM
adds into its slice of the frozen product's output, each A GEMM of the backward into the frozen input
gradient (cuBLAS beta = 1: the sum is formed in fp32 and rounded once, where the separate adds rounded
each product first). The adapters' rank-r intermediate is recomputed in backward (tokens x r: 1/64 of
the input for r = 64 on a 4096-wide input) rather than saved.

``xd``: the adapters' input when it differs from ``x`` (LoRA dropout), else None: then the A GEMMs' input
gradient goes into x's. ``As`` / ``Bs`` / ``scalings`` / ``offsets``: one entry per adapter (a fused
q/k/v or gate/up matrix has one per adapted part; ``offsets`` is its first output column). ``tag`` is
``models.quant.linear_4bit``'s (activation checkpointing's selective policy keeps the tagged outputs).
"""

from __future__ import annotations

import torch

from models import quant  # its kernels by module attribute: the tests count them by patching there
from models.operator import define
from models.quant import Weight4bit

__all__ = ["lora_linear_4bit"]


def _cat(As):
    # One adapter (an unfused projection) needs no copy: a cat is a kernel launch on every call.
    return As[0] if len(As) == 1 else torch.cat(As)


def _rank_slices(As):
    r0 = 0
    for a in As:
        yield slice(r0, r0 + a.shape[0])
        r0 += a.shape[0]


def _kernel(x, packed, absmax, rows, quant_type, blocksize, xd, As, Bs, scalings, offsets, tag):
    y = quant._forward(x, packed, absmax, rows, quant_type, blocksize)
    src = x if xd is None else xd
    xa = src.reshape(-1, src.shape[-1]) @ _cat(As).t()  # (tokens, sum of ranks), unscaled
    y2 = y.view(-1, rows)
    for b, s, off, r in zip(Bs, scalings, offsets, _rank_slices(As), strict=True):
        y2[:, off : off + b.shape[0]].addmm_(xa[:, r], b.t(), alpha=s)
    return y


def _fake(x, packed, absmax, rows, quant_type, blocksize, xd, As, Bs, scalings, offsets, tag):
    return x.new_empty((*x.shape[:-1], rows))


# The backward's input gradient with the adapters' part accumulated into it, opaque like the forward: as
# two operations (the frozen gradient, then an in-place addmm) inductor would unfuse the addmm and fuse
# its add into the consumer (silu's backward), keeping both gradients alive again.
def _grad_input_kernel(grad, packed, absmax, in_features, quant_type, blocksize, grad_xa, a_cat):
    grad_x = quant._grad_input(grad, packed, absmax, in_features, quant_type, blocksize)
    grad_x.view(-1, in_features).addmm_(grad_xa, a_cat)
    return grad_x


def _grad_input_fake(grad, packed, absmax, in_features, quant_type, blocksize, grad_xa, a_cat):
    return grad.new_empty((*grad.shape[:-1], in_features))


_grad_input_op = define(
    "lora_linear_4bit_grad_input",
    "(Tensor grad, Tensor packed, Tensor absmax, SymInt in_features, str quant_type, SymInt blocksize, "
    "Tensor grad_xa, Tensor a_cat) -> Tensor",
    _grad_input_kernel,
    fake=_grad_input_fake,
)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, rows, quant_type, blocksize, xd, As, Bs, scalings, offsets, _tag = inputs
    ctx.save_for_backward(packed, absmax, x if xd is None else xd, *As, *Bs)
    ctx.meta = (x.shape[-1], quant_type, blocksize)
    ctx.layout = (len(As), list(scalings), list(offsets), xd is None)


def _backward(ctx, grad_out):
    packed, absmax, src, *ab = ctx.saved_tensors
    n, scalings, offsets, into_x = ctx.layout
    As, Bs = ab[:n], ab[n:]
    g2, s2 = grad_out.reshape(-1, grad_out.shape[-1]), src.reshape(-1, src.shape[-1])
    a_cat = _cat(As)
    xa = s2 @ a_cat.t()
    grad_xa, grad_bs = [], []
    for b, s, off, r in zip(Bs, scalings, offsets, _rank_slices(As), strict=True):
        g = g2[:, off : off + b.shape[0]]
        grad_xa.append((g @ b) * s)
        grad_bs.append((g.t() @ xa[:, r]) * s)
    grad_xa = grad_xa[0] if n == 1 else torch.cat(grad_xa, -1)  # (tokens, sum of ranks)
    grad_a = grad_xa.t() @ s2
    grad_as = [grad_a[r] for r in _rank_slices(As)]
    grad_x = grad_xd = None
    if ctx.needs_input_grad[0] and into_x:  # the adapters read x itself: one input gradient for both
        grad_x = _grad_input_op(grad_out, packed, absmax, *ctx.meta, grad_xa, a_cat)
    elif ctx.needs_input_grad[0]:
        grad_x = quant._linear_4bit_grad_input_op(grad_out, packed, absmax, *ctx.meta)
    if not into_x and ctx.needs_input_grad[6]:
        grad_xd = (grad_xa @ a_cat).view(src.shape)
    return grad_x, None, None, None, None, None, grad_xd, grad_as, grad_bs, None, None, None


_op = define(
    "lora_linear_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, SymInt rows, str quant_type, SymInt blocksize, Tensor? xd, "
    "Tensor[] As, Tensor[] Bs, float[] scalings, SymInt[] offsets, str tag) -> Tensor",
    _kernel,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
)


def lora_linear_4bit(x, weight: Weight4bit, xd, As, Bs, scalings, offsets, tag: str = "") -> torch.Tensor:
    """x @ W.T plus each adapter's scaled product in its output columns (see the module docstring)."""
    args = (weight.packed, weight.absmax, weight.real_rows, weight.quant_type, weight.blocksize)
    return _op(x, *args, xd, list(As), list(Bs), [float(s) for s in scalings], list(offsets), tag)
