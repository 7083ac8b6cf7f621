"""Training checkpoints: the on-disk layout and resume checks (``layout``), the manager that saves and
resumes any ``Stateful`` objects (``manager``), the trainable state both drivers save (``state``), the
file operations (``storage``) and the error texts (``messages``)."""

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
    schedule_changes,
)
from recipe.checkpoint.manager import Checkpointer
from recipe.checkpoint.state import Stateful, TrainableState
from recipe.checkpoint.storage import LocalStorage

__all__ = [
    "Checkpointer",
    "Stateful",
    "TrainableState",
    "LocalStorage",
    "schedule_changes",
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
