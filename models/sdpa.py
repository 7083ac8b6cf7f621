"""Which ``scaled_dot_product_attention`` kernels a device may run, and which compute dtypes it has.

The attention calls SDPA and lets torch pick a kernel per call; this module narrows that choice to
what the card has (or to one forced kernel, e.g. to emulate a T4's set on a newer GPU) and says so
before anything is loaded, instead of a "No available kernel" deep inside the first step. The
caller applies the result with ``sdpa_context`` around forward *and* backward: activation
checkpointing recomputes the forward there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "SDPA_BACKENDS",
    "DeviceSupportError",
    "SdpaChoice",
    "compute_capability",
    "check_compute_dtype",
    "choose_sdpa_backends",
    "sdpa_context",
]

SDPA_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn")

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Kernel:
    backend: SDPBackend
    title: str
    min_capability: tuple[int, int]  # CUDA compute capability
    dtypes: tuple[torch.dtype, ...]  # on CUDA (torch's CPU kernels take every float dtype)
    on_cpu: bool


# What torch's CUDA dispatcher (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, torch 2.11 and
# 2.13) accepts. On CPU torch has its own flash kernel and math, nothing else.
_KERNELS = {
    "flash": _Kernel(SDPBackend.FLASH_ATTENTION, "FlashAttention", (8, 0), _HALF, True),
    "cudnn": _Kernel(SDPBackend.CUDNN_ATTENTION, "cuDNN attention", (8, 0), _HALF, False),
    "efficient": _Kernel(
        SDPBackend.EFFICIENT_ATTENTION, "memory-efficient attention", (5, 0), _HALF + (torch.float32,), False
    ),
    "math": _Kernel(SDPBackend.MATH, "math (unfused) attention", (0, 0), _HALF + (torch.float32,), True),
}
# bf16 arithmetic (and every bf16 kernel) starts with Ampere; fp16 with sm53.
_DTYPE_MIN_CAPABILITY = {torch.bfloat16: (8, 0), torch.float16: (5, 3)}


class DeviceSupportError(ValueError):
    """A kernel or dtype this device does not have; the message names it and what to use instead."""


@dataclass(frozen=True)
class SdpaChoice:
    backends: tuple[SDPBackend, ...] | None  # None: torch picks among all its kernels
    reason: str  # for the log line

    def describe(self) -> str:
        names = "torch's choice" if self.backends is None else ", ".join(_name(b) for b in self.backends)
        return f"SDPA kernels: {names} ({self.reason})"


def _name(backend: SDPBackend) -> str:
    return next(k for k, v in _KERNELS.items() if v.backend == backend)


def _cap(c: tuple[int, int]) -> str:
    return f"{c[0]}.{c[1]}"


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``; None for a CPU."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def check_compute_dtype(dtype: torch.dtype, capability: tuple[int, int] | None, device_name: str = "this GPU") -> None:
    """Raise ``DeviceSupportError`` if a GPU of ``capability`` cannot compute in ``dtype``. CPUs compute
    in every dtype (slowly in half precision); torch would emulate bf16 on old GPUs far below fp16 speed."""
    need = _DTYPE_MIN_CAPABILITY.get(dtype)
    if capability is None or need is None or capability >= need:
        return
    fix = "train in float16 (with the loss scaler)" if dtype == torch.bfloat16 else "train in float32"
    raise DeviceSupportError(
        f"{str(dtype).removeprefix('torch.')} needs compute capability {_cap(need)}+, but {device_name} has "
        f"{_cap(capability)}: {fix}"
    )


def choose_sdpa_backends(
    requested: str, capability: tuple[int, int] | None, dtype: torch.dtype, deterministic: bool = False
) -> SdpaChoice:
    """The SDPA kernels for ``requested`` (one of ``SDPA_BACKENDS``) on a device of ``capability``
    (None: CPU) computing in ``dtype``.

    ``auto``: on a GPU every kernel it has (all of them from 8.0 on: torch's own choice; memory-efficient
    and math on a 7.x card such as the T4, never flash); on a CPU torch's own choice. ``deterministic``
    on CUDA: math only (the fused kernels' backward passes accumulate with atomics). A forced kernel the
    device or dtype lacks raises ``DeviceSupportError`` naming it."""
    if requested not in SDPA_BACKENDS:
        raise DeviceSupportError(f"unknown SDPA backend {requested!r}; choose one of {', '.join(SDPA_BACKENDS)}")
    where = "CPU" if capability is None else f"compute capability {_cap(capability)}"
    if requested == "auto":
        if capability is None:
            return SdpaChoice(None, "auto, CPU")
        if deterministic:
            return SdpaChoice((SDPBackend.MATH,), f"auto, deterministic mode, {where}")
        fits = [k for k in _KERNELS.values() if capability >= k.min_capability and dtype in k.dtypes]
        if len(fits) == len(_KERNELS):
            return SdpaChoice(None, f"auto, {where}")
        missing = ", ".join(k.title for k in _KERNELS.values() if k not in fits)
        dt = str(dtype).removeprefix("torch.")
        return SdpaChoice(tuple(k.backend for k in fits), f"auto, {where}, {dt}: without {missing}")
    kernel = _KERNELS[requested]
    others = "'auto' or 'math'"
    if capability is None and not kernel.on_cpu:
        raise DeviceSupportError(
            f"{kernel.title} ({requested!r}) is a CUDA kernel, not available on a CPU; use {others}"
        )
    if capability is not None and capability < kernel.min_capability:
        raise DeviceSupportError(
            f"{kernel.title} ({requested!r}) needs compute capability {_cap(kernel.min_capability)}+, this GPU has "
            f"{_cap(capability)}; use {others}" + (" or 'efficient'" if capability >= (5, 0) else "")
        )
    if capability is not None and dtype not in kernel.dtypes:
        raise DeviceSupportError(
            f"{kernel.title} ({requested!r}) has no {str(dtype).removeprefix('torch.')} kernel; use {others} or a "
            "float16/bfloat16 compute dtype"
        )
    if deterministic and capability is not None and requested != "math":
        raise DeviceSupportError(
            f"deterministic mode runs SDPA's math kernels (the backward of {kernel.title} is not deterministic); "
            f"use 'auto' or 'math', or turn deterministic mode off"
        )
    return SdpaChoice((kernel.backend,), f"forced, {where}")


def sdpa_context(choice: SdpaChoice | None):
    """A context that restricts SDPA to ``choice``'s kernels (nothing to do when torch may choose)."""
    if choice is None or choice.backends is None:
        return contextlib.nullcontext()
    return sdpa_kernel(list(choice.backends))
