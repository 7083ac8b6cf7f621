"""Training checkpoints: the on-disk layout (``layout``) and the manager that saves and resumes (``manager``)."""

from recipe.checkpoint.layout import (
    COMPLETE_FILE,
    FORMAT,
    META_FILE,
    VERSION,
    CheckpointLoadError,
    CheckpointSaveError,
    RunIdentity,
    base_fingerprint,
    list_complete_checkpoints,
    read_checkpoint_meta,
)
from recipe.checkpoint.manager import Checkpointer

__all__ = [
    "Checkpointer",
    "CheckpointLoadError",
    "CheckpointSaveError",
    "RunIdentity",
    "base_fingerprint",
    "list_complete_checkpoints",
    "read_checkpoint_meta",
    "FORMAT",
    "VERSION",
    "META_FILE",
    "COMPLETE_FILE",
]
