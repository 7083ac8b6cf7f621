"""Names of the floating dtypes a config or a command line may give, and the torch dtype of each."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "COMPUTE_DTYPES", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# What parameters and activations may compute in (float64 only serves exact gradient reduction).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF config.json files use too)."""
    return str(dtype).removeprefix("torch.")
