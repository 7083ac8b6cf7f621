"""Llama model shapes: the architecture hyper-parameters, in HF ``config.json`` terms.

``LlamaShape`` mirrors the fields of a HF ``LlamaConfig`` that the recipe needs.  ``SHAPES`` holds the
named shapes (tiny debug shapes for CPU tests and the real Llama 3.x sizes), ``get_shape`` looks one up,
and ``shape_from_hf_config`` / ``shape_to_hf_config`` convert from / to a ``config.json`` dict.

``shape_from_hf_config`` reads both config layouts: the transformers 4.x one (``rope_theta`` +
``rope_scaling``) and the transformers 5.x one (``rope_parameters``, which holds ``rope_theta``).
``shape_to_hf_config`` writes both, so either transformers major version reads the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LlamaShape", "SHAPES", "get_shape", "shape_from_hf_config", "shape_to_hf_config"]


def _llama3_rope(factor: float, original_max: int = 8192) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": float(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original_max),
    }


@dataclass(frozen=True)
class LlamaShape:
    """Architecture of a Llama decoder-only model (field names as in HF ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    # None (plain RoPE) or an HF rope-scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.
    # Excluded from hashing (dicts are unhashable); still compared by ==.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    bos_token_id: int | None = 128000
    # An int or a tuple of ints (HF configs may list several end-of-sequence ids).
    eos_token_id: int | tuple[int, ...] | None = 128001

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        """Total number of parameters (lm_head counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * h * 2 + h * self.num_key_value_heads * d * 2  # q, o + k, v
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * layer + emb * (1 if self.tie_word_embeddings else 2) + h

    def replace(self, **changes: Any) -> LlamaShape:
        return dataclasses.replace(self, **changes)


_DEBUG = LlamaShape(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_scaling=_llama3_rope(8.0),
    # ids of the synthetic tokenizer written by models.synthetic (<|begin_of_text|>, <|eot_id|>)
    bos_token_id=384,
    eos_token_id=388,
)

_LLAMA3_1_8B = LlamaShape(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_scaling=_llama3_rope(8.0),
    bos_token_id=128000,
    eos_token_id=128001,
)

SHAPES: dict[str, LlamaShape] = {
    "debug": _DEBUG,
    "debug_tied": _DEBUG.replace(tie_word_embeddings=True, num_hidden_layers=2),
    "llama3_2_1b": LlamaShape(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling=_llama3_rope(32.0),
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama3_1_8b": _LLAMA3_1_8B,
    "llama3_8b": _LLAMA3_1_8B,
    "llama3_1_70b": _LLAMA3_1_8B.replace(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
}
SHAPES["llama3_70b"] = SHAPES["llama3_1_70b"]


def get_shape(name: str | LlamaShape) -> LlamaShape:
    """Return the named shape (a ``LlamaShape`` passes through unchanged)."""
    if isinstance(name, LlamaShape):
        return name
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; valid names: {', '.join(sorted(SHAPES))}") from None


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def shape_from_hf_config(cfg: dict[str, Any]) -> LlamaShape:
    """Build a ``LlamaShape`` from a HF Llama ``config.json`` dict (transformers 4.x or 5.x layout)."""
    if not isinstance(cfg, dict):
        raise TypeError(f"expected a config dict, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type != "llama":
        raise ValueError(
            f"unsupported model_type {model_type!r}: only Llama checkpoints (model_type 'llama') are supported"
        )
    for key in _REQUIRED:
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"HF config is missing required key {key!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"unsupported config: {flag}=true (Llama linears without bias only)")

    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ValueError(
            f"unsupported config: head_dim {head_dim} * num_attention_heads {heads} != hidden_size {hidden}"
        )
    kv = cfg.get("num_key_value_heads")

    # RoPE: transformers 5 writes "rope_parameters" (with rope_theta inside); 4.x writes rope_theta + rope_scaling.
    rope_params = cfg.get("rope_parameters")
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    if isinstance(rope_params, dict):
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta")
        if rope_scaling is None:
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if isinstance(rope_scaling, dict):
        rope_scaling = dict(rope_scaling)
        if "type" in rope_scaling and "rope_type" not in rope_scaling:
            rope_scaling["rope_type"] = rope_scaling.pop("type")
        rope_scaling.pop("rope_theta", None)
        if rope_scaling.get("rope_type", "default") == "default":
            rope_scaling = None
    else:
        rope_scaling = None

    eos = cfg.get("eos_token_id", None)
    return LlamaShape(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(kv) if kv is not None else heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


def shape_to_hf_config(shape: LlamaShape | str, dtype: str = "bfloat16") -> dict[str, Any]:
    """A full ``LlamaForCausalLM`` ``config.json`` dict for ``shape`` (no quantization_config)."""
    shape = get_shape(shape)
    eos = list(shape.eos_token_id) if isinstance(shape.eos_token_id, tuple) else shape.eos_token_id
    rope_parameters = {"rope_type": "default"} if shape.rope_scaling is None else dict(shape.rope_scaling)
    rope_parameters["rope_theta"] = float(shape.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": shape.bos_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4.x name of "dtype"
        "eos_token_id": eos,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        # transformers 4.x layout
        "rope_scaling": None if shape.rope_scaling is None else dict(shape.rope_scaling),
        "rope_theta": float(shape.rope_theta),
        # transformers 5.x layout
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }
