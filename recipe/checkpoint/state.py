"""The trainable state of a run as one ``Stateful``: the LoRA weights and the optimizer state.

Both drivers save it (``recipe.checkpoint.Checkpointer`` for the recipe loop, ``recipe.hf_trainer``'s
``recipe_state/`` for the HF Trainer) through DCP's state-dict helpers, with one set of options: frozen
parameters left out (the base checkpoint holds them), optimizer state flattened to parameter names, and
DTensors resharded on load, so a state saved by N ranks loads on any number of ranks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["Stateful", "TrainableState", "MissingTrainableError"]

_SAVE = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
# strict=False: the frozen base weights are (by design) not in a checkpoint.
_LOAD = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


class MissingTrainableError(KeyError):
    """A saved state lacks LoRA weights of this model (``.missing``: their names)."""

    def __init__(self, missing: list[str]):
        super().__init__(f"lacks LoRA weights {missing[:4]}...")
        self.missing = missing


class TrainableState:
    """``{"model": LoRA weights, "optim": optimizer state}`` of ``model`` and ``optimizer``; with
    ``include_model=False`` only ``"optim"`` (the HF driver saves the weights in HF's own file)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, include_model: bool = True):
        self.model, self.optimizer, self.include_model = model, optimizer, include_model

    def state_dict(self) -> dict:
        sd = {"model": get_model_state_dict(self.model, options=_SAVE)} if self.include_model else {}
        sd["optim"] = get_optimizer_state_dict(self.model, self.optimizer, options=_SAVE)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if self.include_model:
            res = set_model_state_dict(self.model, sd["model"], options=_LOAD)
            missing = [k for k in getattr(res, "missing_keys", []) if ".lora_" in k]
            if missing:
                raise MissingTrainableError(missing)
        set_optimizer_state_dict(self.model, self.optimizer, sd["optim"], options=_LOAD)
