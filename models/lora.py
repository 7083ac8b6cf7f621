"""The QLoRA linear layer: a frozen base weight plus a trainable low-rank update.

    y = x @ W.T + (alpha / r) * dropout(x) @ A.T @ B.T

W is either a ``Weight4bit`` (dequantized through bitsandbytes on every use, never given a gradient)
or a dense frozen tensor (plain checkpoints loaded without quantization, and the HF oracle tests).
A and B are ``nn.Linear`` modules named ``lora_A`` / ``lora_B`` so the adapter maps one-to-one onto
PEFT's ``...q_proj.lora_A.weight`` keys. Initialisation follows PEFT: A Kaiming-uniform with
a=sqrt(5) (nn.Linear's default), B zeros, so the adapted model starts equal to the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.quant import Weight4bit, linear_4bit

__all__ = ["QLoRALinear", "init_lora_", "lora_init_tensor"]


class QLoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 0,
        alpha: float = 1.0,
        dropout: float = 0.0,
        weight: torch.Tensor,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Linear(in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, out_features, bias=False)
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if isinstance(w, Weight4bit):
            y = linear_4bit(x, w)
        else:
            y = nn.functional.linear(x, w.to(x.dtype))
        if self.rank > 0:
            # The adapter runs in its own parameters' dtype (fp32 master weights when no FSDP
            # mixed-precision policy casts them; then a no-op), its output in the base output's dtype.
            # The scale multiplies the rank-r intermediate, not the (tokens x out_features) output:
            # r/out as many elements (1/224 for gate/up of Llama 3 8B at r=64), same product.
            xa = self.lora_dropout(x).to(self.lora_A.weight.dtype)
            y = y + self.lora_B(self.lora_A(xa) * self.scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        kind = "4bit" if isinstance(w, Weight4bit) else str(w.dtype)
        return f"in={self.in_features}, out={self.out_features}, base={kind}, rank={self.rank}"


def lora_init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full initial value of a LoRA parameter, a pure function of (seed, name).

    Every rank computes the same full tensor and keeps its rows, so a run on N ranks starts from
    exactly the weights a 1-rank run starts from.
    """
    if ".lora_B." in name:
        return torch.zeros(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(_stable_hash(f"{seed}:{name}"))
    fan_in = shape[1]
    # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear and PEFT do.
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def init_lora_(model: nn.Module, seed: int) -> None:
    """Initialise every LoRA parameter of a non-sharded model in place (tests, single process)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(lora_init_tensor(name, tuple(p.shape), seed))


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; ranks must agree.
    import zlib

    return zlib.crc32(text.encode()) & 0x7FFFFFFF
