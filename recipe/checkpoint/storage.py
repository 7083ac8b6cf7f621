"""Where a checkpoint's files go: the file operations of a save, as one object the manager is given.

``LocalStorage`` is the local (or network) filesystem. The manager calls nothing else to write, so a
test injects a storage whose operations fail (a full disk, a read-only folder, a failed rename) or stop
the process at a given point, instead of patching modules. DCP writes the shards itself, through its
own ``FileSystemWriter``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from recipe.checkpoint.layout import fsync_dir, write_durable

__all__ = ["LocalStorage"]


class LocalStorage:
    def makedirs(self, path: Path) -> None:
        os.makedirs(path)

    def save_object(self, obj: Any, path: Path) -> None:
        """A small per-rank file (the RNG states)."""
        torch.save(obj, path)

    def write_durable(self, path: Path, text: str) -> None:
        write_durable(path, text)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fsync_dir(path)

    def files_written(self, step: int, tmp: Path) -> None:
        """Called on every rank once its files of the save of ``step`` are in ``tmp`` (shards, RNG file,
        on rank 0 the metadata), before the COMPLETE marker: a storage whose writes are not durable on
        return flushes here. Local files are (DCP and ``write_durable`` fsync them): nothing to do."""
