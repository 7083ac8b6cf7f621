"""The QLoRA linear layer: a frozen base weight plus a trainable low-rank update.

    y = x @ W.T + (alpha / r) * dropout(x) @ A.T @ B.T

W is either a ``Weight4bit`` (dequantized through bitsandbytes on every use, never given a gradient)
or a dense frozen tensor (plain checkpoints loaded without quantization, and the HF oracle tests).
A and B are ``nn.Linear`` modules named ``lora_A`` / ``lora_B`` so the adapter maps one-to-one onto
PEFT's ``...q_proj.lora_A.weight`` keys. Initialisation follows PEFT: A Kaiming-uniform with
a=sqrt(5) (nn.Linear's default), B zeros, so the adapted model starts equal to the base model.

``FusedQLoRALinear`` (``model.fuse_projections``) holds the frozen weights of several projections that
read the same input (q/k/v, gate/up) as one matrix, rows concatenated: one dequantization and one GEMM
instead of one per projection. Their adapters stay ``QLoRALinear`` modules without a base weight, under
their own names (``self_attn.q_proj.lora_A.weight``), so checkpoints, resumption, the optimizer state
and the exported adapter are those of the unfused model; the forward concatenates their A matrices
(one small copy, r x in per projection, each forward) to run one A GEMM, and applies each B to its slice of the
rank dimension. Why per-projection parameters and not one concatenated A parameter: a concatenated
parameter would need a name mapping at every place that names parameters (LoRA init by name, DCP
checkpoints and their resumption across the switch, export, the optimizer state), and its FSDP shard
would straddle projections; the concatenation costs one kernel per forward (its backward is a view).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.qlora_op import lora_linear_4bit
from models.quant import Weight4bit, linear_4bit

__all__ = ["QLoRALinear", "FusedQLoRALinear", "init_lora_", "lora_init_tensor"]


class QLoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 0,
        alpha: float = 1.0,
        dropout: float = 0.0,
        weight: torch.Tensor | None,
        epilogue: bool = True,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # None: an adapter only; its base rows live in a FusedQLoRALinear, which calls ``lora_input``
        # and ``lora_up``.
        self.weight = nn.Parameter(weight, requires_grad=False) if weight is not None else None
        self.rank = rank
        # The dtype the adapter computes in; None: its parameters' own (fp32 masters compute in fp32, as
        # PEFT does, and under FSDP's mixed precision they already arrive in the compute dtype). A
        # one-rank job without FSDP (``parallel.parallelize``) sets the compute dtype here: the weights are
        # then cast where they are used, as FSDP would cast them, and their gradients come back in fp32.
        self.compute_dtype: torch.dtype | None = None
        if rank > 0:
            self.lora_A = nn.Linear(in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, out_features, bias=False)
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.scaling = alpha / rank
        # Non-empty: activation checkpointing keeps this projection's frozen output for backward instead
        # of recomputing it (``activation_checkpoint.keep_outputs``; set by parallel/parallelize.py).
        self.keep_tag = ""
        # Compiled (or tagged) 4-bit projections run as one operator with the adapter inside
        # (``models.qlora_op.lora_linear_4bit``); ``model.lora_epilogue``.
        self.epilogue = epilogue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("an adapter without a base weight runs through its FusedQLoRALinear")
        if self.rank == 0:
            return base_linear(x, self.weight, self.keep_tag)
        a = self.lora_weight("A")
        if _in_epilogue(self.epilogue, self.weight, self.keep_tag, a.dtype, x):
            xd = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
            return lora_linear_4bit(
                x, self.weight, xd, [a], [self.lora_weight("B")], [self.scaling], [0], self.keep_tag
            )
        # The scale multiplies the rank-r intermediate, not the (tokens x out_features) output:
        # r/out as many elements (1/224 for gate/up of Llama 3 8B at r=64), same product.
        xa = nn.functional.linear(self.lora_input(x), a) * self.scaling
        lora = nn.functional.linear(xa, self.lora_weight("B"))
        # The adapter before the frozen product (the same sum as lora_up): in a checkpointed block's
        # recompute, nothing after down_proj's adapter is saved for backward, so non-reentrant
        # checkpointing stops there and never runs down_proj's frozen GEMM again (a compiled block's
        # partition already leaves it out).
        return base_linear(x, self.weight, self.keep_tag) + lora.to(x.dtype)

    def lora_weight(self, which: str) -> torch.Tensor:
        """``lora_A`` or ``lora_B``'s weight in the adapter's compute dtype (a no-op cast unless a
        ``compute_dtype`` is set)."""
        w = (self.lora_A if which == "A" else self.lora_B).weight
        return w if self.compute_dtype is None else w.to(self.compute_dtype)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (``lora_weight``'s), without casting anything."""
        return self.compute_dtype or self.lora_A.weight.dtype

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        # The adapter's input in its compute dtype; its output goes back to the base output's dtype.
        return self.lora_dropout(x).to(self.adapter_dtype)

    def lora_up(self, xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + B(xa) for the scaled rank-r intermediate ``xa``, in y's dtype."""
        return y + nn.functional.linear(xa, self.lora_weight("B")).to(y.dtype)

    def extra_repr(self) -> str:
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        kind = "none (fused)" if w is None else "4bit" if isinstance(w, Weight4bit) else str(w.dtype)
        return f"in={self.in_features}, out={self.out_features}, base={kind}, rank={self.rank}"


def _in_epilogue(on: bool, w, tag: str, adapter_dtype: torch.dtype, x: torch.Tensor) -> bool:
    """Whether the projection runs as one operator with its adapters inside (``models.qlora_op``): a
    4-bit weight, adapters computing in the input's dtype, and a compiled or tagged block (eager blocks
    keep the separate products: there the adapter runs before the frozen GEMM, so that a checkpoint's
    recompute stops before down_proj's frozen GEMM; see ``QLoRALinear.forward``)."""
    return (
        on and isinstance(w, Weight4bit) and adapter_dtype == x.dtype and (bool(tag) or torch.compiler.is_compiling())
    )


def base_linear(x: torch.Tensor, w: torch.Tensor, tag: str = "") -> torch.Tensor:
    """x @ w.T for a frozen 4-bit or dense weight; ``tag``: see ``QLoRALinear.keep_tag`` (4-bit only)."""
    if isinstance(w, Weight4bit):
        return linear_4bit(x, w, tag)
    return nn.functional.linear(x, w.to(x.dtype))


class FusedQLoRALinear(nn.Module):
    """The frozen weights of projections that share their input, as one (sum of out_features, in) matrix.

    ``parts``: (name, out_features) of each projection in row order, e.g. (("q_proj", 4096),
    ("k_proj", 1024), ("v_proj", 1024)): the weight's rows are read from the checkpoint tensors of
    those sibling names (parallel/materialize.py), and ``forward`` returns one output per part, each
    with its adapter (a weightless ``QLoRALinear`` passed in by the owner) added.

    Adapters: one GEMM for the A matrices of all adapted parts (concatenated along the rank dim),
    then each part's B on its slice of the rank dim, added to its slice of the base output. Not one
    block-diagonal B GEMM: building the block-diagonal matrix costs a zero fill plus a copy per part
    each forward (the kernels the loop would save) and multiplies the B FLOPs of forward and of both
    backward GEMMs by the number of parts; the outputs are consumed per part anyway (q/k/v; silu(gate)
    * up). Under torch.compile the loop's casts and adds fuse into neighbours. With LoRA dropout each
    adapter keeps its own mask (as PEFT and the unfused model draw them, in the same order), so A runs
    per part then.
    """

    def __init__(
        self, in_features: int, parts: tuple[tuple[str, int], ...], *, weight: torch.Tensor, epilogue: bool = True
    ):
        super().__init__()
        self.epilogue = epilogue  # as QLoRALinear.epilogue
        self.in_features = in_features
        self.parts = tuple(parts)
        self.sizes = [n for _, n in self.parts]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # each part's first output column
        self.out_features = sum(self.sizes)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.keep_tag = ""  # as QLoRALinear.keep_tag, for the group's one output

    def forward(self, x: torch.Tensor, adapters) -> tuple[torch.Tensor, ...]:
        live = [(i, a) for i, a in enumerate(adapters) if a.rank > 0]
        if not live:
            # split's backward is one concatenation of the parts' gradients.
            return tuple(base_linear(x, self.weight, self.keep_tag).split(self.sizes, dim=-1))
        dropout = any(not isinstance(a.lora_dropout, nn.Identity) for _, a in live)
        if not dropout and _in_epilogue(self.epilogue, self.weight, self.keep_tag, live[0][1].adapter_dtype, x):
            out = lora_linear_4bit(
                x,
                self.weight,
                None,
                [a.lora_weight("A") for _, a in live],
                [a.lora_weight("B") for _, a in live],
                [a.scaling for _, a in live],
                [self.starts[i] for i, _ in live],
                self.keep_tag,
            )
            return tuple(out.split(self.sizes, dim=-1))
        if dropout:
            xas = [nn.functional.linear(a.lora_input(x), a.lora_weight("A")) * a.scaling for _, a in live]
        else:
            first = live[0][1]
            a_cat = torch.cat([a.lora_weight("A") for _, a in live])
            xa = nn.functional.linear(first.lora_input(x), a_cat)
            if all(a.scaling == first.scaling for _, a in live):
                xas = (xa * first.scaling).split([a.rank for _, a in live], dim=-1)
            else:
                xas = [p * a.scaling for p, (_, a) in zip(xa.split([a.rank for _, a in live], -1), live, strict=True)]
        outs = list(base_linear(x, self.weight, self.keep_tag).split(self.sizes, dim=-1))
        for (i, a), xa_i in zip(live, xas, strict=True):
            outs[i] = a.lora_up(xa_i, outs[i])
        return tuple(outs)

    def extra_repr(self) -> str:
        w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        kind = "4bit" if isinstance(w, Weight4bit) else str(w.dtype)
        parts = "+".join(f"{n}({o})" for n, o in self.parts)
        return f"in={self.in_features}, out={parts}, base={kind}"


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
