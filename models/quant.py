"""Frozen 4-bit (nf4/fp4) weights as a tensor subclass that FSDP2 can shard.

Why a subclass: bitsandbytes keeps the packed codes in a uint8 tensor and the block statistics in a
``QuantState`` hanging off the module, so FSDP2 neither shards the statistics nor accepts the uint8
parameter (torch < 2.13 refuses uint8 parameters). ``Weight4bit`` looks like a floating (rows, K)
tensor from the outside, holds the packed codes and the fp32 block scales as inner tensors split by
rows, and implements FSDP2's all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``)
so that the collective moves only packed bytes and scales; the block dequantizes after the gather.

Layout (one row of the original (N, K) weight per row of each inner tensor):
  packed  uint8   (R, K/2)        two 4-bit codes per byte, bitsandbytes' order
  absmax  float32 (R, K/block)    one scale per block; double quantization is undone at load so
                                  that rows can be split anywhere (nested groups span rows)
  code    float32 (16,)           the nf4/fp4 code book, replicated

R >= N: the parallel code may pad the row count with zero rows so that FSDP always shards evenly
(``parallel.sharding.pad_4bit_rows``; its uneven-shard path needs inner tensors of the outer shape,
which a packed layout cannot have). ``dequantize`` drops the padding rows.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from models.operator import define

aten = torch.ops.aten


@functools.cache
def bnb_functional():
    """bitsandbytes.functional, imported on first use: it takes over a second to import (it loads
    torch's compiler stack), which every start paid, also a run that stops on a config error."""
    # On AVX512-BF16 CPUs bitsandbytes warns at import that an optional CPU gemm kernel package is
    # missing. The recipe never uses bitsandbytes' CPU gemm (it dequantizes, then calls torch), so
    # the warning is noise on every start.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbF

    return bnbF


__all__ = ["Weight4bit", "linear_4bit"]


class Weight4bit(torch.Tensor):
    """A frozen 4-bit weight. Outer shape (R, K) and a floating dtype: the dtype it dequantizes to."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor

    @staticmethod
    def __new__(cls, packed, absmax, code, n_rows: int, quant_type: str, blocksize: int, dtype):
        shape = (packed.shape[0], packed.shape[1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, packed, absmax, code, n_rows: int, quant_type: str, blocksize: int, dtype):
        self.packed = packed
        self.absmax = absmax
        self.code = code
        self.n_rows = n_rows  # rows of the real (unpadded, unsharded) weight
        self.quant_type = quant_type
        self.blocksize = blocksize

    # -- construction helpers ------------------------------------------------------------------
    def _with(self, packed, absmax, code=None, dtype=None) -> Weight4bit:
        return Weight4bit(
            packed,
            absmax,
            self.code if code is None else code,
            self.n_rows,
            self.quant_type,
            self.blocksize,
            self.dtype if dtype is None else dtype,
        )

    @classmethod
    def empty(cls, n_rows, in_features, *, quant_type, blocksize, dtype, device, rows=None):
        """Uninitialised; ``rows`` >= ``n_rows`` adds zero padding rows (see the module docstring)."""
        rows = n_rows if rows is None else rows
        if in_features % blocksize:
            raise ValueError(
                f"in_features={in_features} is not a multiple of the 4-bit blocksize {blocksize}: "
                "rows could not be sharded on block boundaries"
            )
        packed = torch.empty(rows, in_features // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(rows, in_features // blocksize, dtype=torch.float32, device=device)
        code = torch.empty(16, dtype=torch.float32, device=device)
        return cls(packed, absmax, code, n_rows, quant_type, blocksize, dtype)

    # -- compute -------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (n_rows, K) weight in ``dtype`` through bitsandbytes' own kernel."""
        dtype = dtype or self.dtype
        return _dequantize_rows(
            self.packed, self.absmax, self.real_rows, self.shape[1], self.quant_type, self.blocksize, dtype
        )

    @property
    def real_rows(self) -> int:
        """Rows of this tensor that hold the real weight (the rest are padding rows)."""
        return min(self.n_rows, self.packed.shape[0])

    def __repr__(self):
        return (
            f"Weight4bit({self.quant_type}, shape={tuple(self.shape)}, rows={self.n_rows}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- torch.compile / subclass protocol -----------------------------------------------------
    def __tensor_flatten__(self):
        return ["packed", "absmax", "code"], (self.n_rows, self.quant_type, self.blocksize, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        n_rows, quant_type, blocksize, dtype = meta
        return Weight4bit(inner["packed"], inner["absmax"], inner["code"], n_rows, quant_type, blocksize, dtype)

    # -- FSDP2 all-gather extension ------------------------------------------------------------
    # Five parameters: the signature every supported torch (2.11 to 2.15) calls (mesh, outer size, outer stride,
    # module, mixed-precision policy). The packed bytes are never cast, whatever the policy says.
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if mesh.size() == 1:
            # FSDP's world-size-1 shortcut copies only the first all-gather input: hand it one
            # byte buffer holding both inner tensors.
            return (torch.cat([self.packed.reshape(-1), self.absmax.reshape(-1).view(torch.uint8)]),), None
        return (self.packed, self.absmax), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        if out is not None:
            # Later iterations: FSDP re-filled the same storages that ``out`` views.
            return
        if len(all_gather_outputs) == 1:
            (buf,) = all_gather_outputs
            n = self.packed.numel()
            packed = buf[:n].view(self.packed.shape)
            absmax = buf[n:].view(torch.float32).view(self.absmax.shape)
            return self._with(packed, absmax, code=self.code.to(buf.device), dtype=param_dtype), (buf,)
        packed, absmax = all_gather_outputs
        # With CPU offload ``self`` is the CPU shard while the gathered data is on the GPU: the
        # 16-entry code book follows the data.
        return self._with(packed, absmax, code=self.code.to(packed.device), dtype=param_dtype), (packed, absmax)

    # -- the few aten ops that sharding, device moves and state handling need ------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"{func} is not supported on a frozen 4-bit weight (Weight4bit); "
                "call .dequantize() to get a dense tensor"
            )
        return handler(*args, **kwargs)


def _rows_only(dim: int, op: str) -> None:
    if dim != 0:
        raise NotImplementedError(f"Weight4bit supports {op} along rows (dim 0) only, got dim={dim}")


def _detach(w, *a, **k):
    return w._with(w.packed.detach(), w.absmax.detach(), w.code.detach())


def _to_copy(w, dtype=None, device=None, non_blocking=False, **kwargs):
    # ``dtype`` changes only what the weight dequantizes to: packed codes are never cast. A copy is a
    # copy also when only the dtype changes (the training loop never takes this path; FSDP's CPU
    # offload moves shards across devices, which copies anyway).
    move = lambda t: t.to(device=device, non_blocking=non_blocking, copy=True) if device is not None else t.clone()
    return w._with(move(w.packed), move(w.absmax), move(w.code), dtype=dtype)


def _split(w, split_size, dim=0):
    _rows_only(dim, "split")
    # packed and absmax have the same rows (module docstring), so they split into the same number of chunks.
    parts = zip(torch.split(w.packed, split_size, 0), torch.split(w.absmax, split_size, 0), strict=True)
    return [w._with(p, a) for p, a in parts]


def _split_with_sizes(w, sizes, dim=0):
    return _split(w, list(sizes), dim)


def _slice(w, dim=0, start=None, end=None, step=1):
    _rows_only(dim, "slicing")
    return w._with(w.packed[start:end:step], w.absmax[start:end:step])


def _new_zeros(w, size, dtype=None, device=None, **kwargs):
    rows, cols = size
    device = device or w.device
    return Weight4bit(
        torch.zeros(rows, cols // 2, dtype=torch.uint8, device=device),
        torch.zeros(rows, cols // w.blocksize, dtype=torch.float32, device=device),
        w.code.to(device),
        w.n_rows,
        w.quant_type,
        w.blocksize,
        dtype or w.dtype,
    )


def _empty_like(w, dtype=None, device=None, **kwargs):
    device = device or w.device
    return w._with(
        torch.empty_like(w.packed, device=device),
        torch.empty_like(w.absmax, device=device),
        torch.empty_like(w.code, device=device),
        dtype=dtype,
    )


def _copy_(dst, src, non_blocking=False):
    if not isinstance(src, Weight4bit):
        raise NotImplementedError("copying a dense tensor into a Weight4bit would need re-quantization")
    dst.packed.copy_(src.packed, non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking)
    dst.code.copy_(src.code, non_blocking)
    return dst


def _view(w, size):
    size = list(size)
    if size == list(w.shape):
        return w._with(w.packed, w.absmax)
    if size == [-1] or size == [w.numel()]:
        # FSDP keeps a flat alias of each shard (it reads it only for plain parameters). A one-row
        # view over the same storages stands in for it; the row layout of the data is unchanged.
        return w._with(w.packed.reshape(1, -1), w.absmax.reshape(1, -1))
    raise NotImplementedError(f"Weight4bit cannot be viewed as {size}")


def _as_strided(w, size, stride, storage_offset=0):
    if list(size) == list(w.shape) and storage_offset in (0, None):
        return w._with(w.packed, w.absmax)
    raise NotImplementedError(f"Weight4bit.as_strided to {list(size)} (own shape {list(w.shape)})")


def _clone(w, **kwargs):
    return w._with(w.packed.clone(), w.absmax.clone(), w.code.clone())


def _is_pinned(w, device=None):
    return w.packed.is_pinned()


def _pin_memory(w, device=None):
    return w._with(w.packed.pin_memory(), w.absmax.pin_memory(), w.code.pin_memory())


def _equal(a, b):
    return (
        isinstance(b, Weight4bit)
        and torch.equal(a.packed, b.packed)
        and torch.equal(a.absmax, b.absmax)
        and torch.equal(a.code, b.code)
    )


_OPS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten._to_copy.default: _to_copy,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.empty_like.default: _empty_like,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.clone.default: _clone,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
    aten.equal.default: _equal,
}


# bitsandbytes' C entry points by compute dtype, and their arguments (code, A, absmax, out, blocksize,
# numel, stream), as its 0.50 CUDA backend names and declares them.
_BNB_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_BNB_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]


@functools.cache
def _bnb_dequantize_entry(dtype: torch.dtype, quant_type: str):
    """bitsandbytes' C function that dequantizes 4-bit codes into ``dtype`` on CUDA, or None.

    Why call it directly: a training step dequantizes about 2,600 times (8B, micro-batch 2 x 4), each time
    through Python around the kernel (QuantState, argument checks, two operator dispatches, a device
    guard; ``benchmarks/host_cost.py`` times it), and at micro-batch 2 the GPU waits on the host inside
    the 4-bit operators (BENCHMARKS.md, 2026-12-07 seventh session's profile). It is the same kernel with
    the same arguments, so the result is bit for bit bitsandbytes' own (``tests/test_model.py -k
    dequantize_entry`` on CUDA). None where this bitsandbytes has no such entry point declared with these
    argument types (a version that changed them): then its registered operator is called.
    """
    bnb_functional()  # imports the CUDA backend, which declares the entry points' argument types
    try:
        from bitsandbytes.cextension import lib

        fn = getattr(lib, f"cdequantize_blockwise_{_BNB_DTYPE[dtype]}_{quant_type}")
    except (ImportError, AttributeError, KeyError):
        return None
    return fn if list(getattr(fn, "argtypes", None) or ()) == _BNB_ARGTYPES else None


def _dequantize_rows(packed, absmax, rows: int, in_features: int, quant_type: str, blocksize: int, dtype):
    """The first ``rows`` rows of a packed weight as a dense (rows, in_features) tensor (bitsandbytes' kernel)."""
    if packed.shape[0] != rows:
        packed, absmax = packed[:rows], absmax[:rows]
    shape = (rows, in_features)
    if (
        packed.is_cuda
        and type(packed) is torch.Tensor  # not a fake or subclass tensor: the C call needs real memory
        and packed.is_contiguous()
        and absmax.is_contiguous()
        and packed.device.index == torch.cuda.current_device()
        and rows * in_features < 2**31  # the entry point counts elements in an int32
    ):
        fn = _bnb_dequantize_entry(dtype, quant_type)
        if fn is not None:
            out = torch.empty(shape, dtype=dtype, device=packed.device)
            stream = torch._C._cuda_getCurrentRawStream(packed.device.index)
            fn(None, packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), blocksize, out.numel(), stream)
            return out
    bnb_functional()  # registers torch.ops.bitsandbytes
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.reshape(-1, 1), absmax.reshape(-1), blocksize, quant_type, shape, dtype
    )


def _forward(x, packed, absmax, rows: int, quant_type: str, blocksize: int):
    w = _dequantize_rows(packed, absmax, rows, x.shape[-1], quant_type, blocksize, x.dtype)
    return torch.nn.functional.linear(x, w)


def _grad_input(grad, packed, absmax, in_features: int, quant_type: str, blocksize: int):
    return grad @ _dequantize_rows(packed, absmax, grad.shape[-1], in_features, quant_type, blocksize, grad.dtype)


# Under torch.compile the 4-bit linear is two opaque operators. Traced as ordinary ops, the dense
# weight is a value in the joint graph: the partitioner may save it for backward (or merge the forward
# and backward dequantizations into one), which holds a dense copy of every frozen matrix until
# backward. An operator that takes the packed bytes and returns only its product leaves nothing dense
# to save. Eager mode runs the same two functions from an autograd.Function, which skips the custom
# operators' dispatch cost (hundreds of calls per micro-batch).
# ``tag`` names the projection for activation checkpointing's selective policy
# (``activation_checkpoint.keep_outputs``: parallel/parallelize.py keeps the outputs of the tagged
# projections instead of recomputing them); it changes nothing computed. A tagged projection runs
# through the operator in eager mode too, so that the policy sees it.
# The kernels look ``_forward`` / ``_grad_input`` up when called (tests count them by patching there).
def _linear_4bit_kernel(x, packed, absmax, rows, quant_type, blocksize, tag):
    return _forward(x, packed, absmax, rows, quant_type, blocksize)


def _linear_4bit_fake(x, packed, absmax, rows, quant_type, blocksize, tag):
    return x.new_empty((*x.shape[:-1], rows))


def _grad_input_kernel(grad, packed, absmax, in_features, quant_type, blocksize):
    return _grad_input(grad, packed, absmax, in_features, quant_type, blocksize)


def _grad_input_fake(grad, packed, absmax, in_features, quant_type, blocksize):
    return grad.new_empty((*grad.shape[:-1], in_features))


_linear_4bit_grad_input_op = define(
    "linear_4bit_grad_input",
    "(Tensor grad, Tensor packed, Tensor absmax, SymInt in_features, str quant_type, SymInt blocksize) -> Tensor",
    _grad_input_kernel,
    fake=_grad_input_fake,
)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, rows, quant_type, blocksize, _tag = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.meta = (x.shape[-1], quant_type, blocksize)


def _backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    packed, absmax = ctx.saved_tensors
    return _linear_4bit_grad_input_op(grad_out, packed, absmax, *ctx.meta), None, None, None, None, None, None


_linear_4bit_op = define(
    "linear_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, SymInt rows, str quant_type, SymInt blocksize, str tag) -> Tensor",
    _linear_4bit_kernel,
    fake=_linear_4bit_fake,
    setup_context=_setup_context,
    backward=_backward,
)


class _Linear4bitFn(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly in forward and again in backward (eager mode).

    Saving the dequantized weight would hold a dense copy of every frozen matrix until backward;
    holding the 4-bit weight and dequantizing twice trades a memory-bound kernel for that memory.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, rows, quant_type, blocksize):
        # The packed tensors are held as attributes, not saved tensors: FSDP refills their storage
        # in place before backward.
        ctx.args = (packed, absmax, x.shape[-1], quant_type, blocksize)
        return _forward(x, packed, absmax, rows, quant_type, blocksize)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = _grad_input(grad_out, *ctx.args) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def linear_4bit(x: torch.Tensor, weight: Weight4bit, tag: str = "") -> torch.Tensor:
    args = (weight.packed, weight.absmax, weight.real_rows, weight.quant_type, weight.blocksize)
    if tag or torch.compiler.is_compiling():
        return _linear_4bit_op(x, *args, tag)
    return _Linear4bitFn.apply(x, *args)
