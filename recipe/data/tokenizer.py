"""Loading the tokenizer from a local directory.

Only local files are read, never the hub: a missing or misplaced tokenizer is an error that names the
config key to fix ([model] tokenizer), rather than a download of whatever the hub holds.
"""

from __future__ import annotations

import os

from recipe.data.errors import DataError

__all__ = ["load_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str):
    """Load a tokenizer from a local directory (never touches the hub)."""
    if not path:
        raise DataError("no tokenizer path given; set [model] tokenizer = '<dir>'")
    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer directory {path!r} does not exist (or is not a directory); "
            "set [model] tokenizer = '<dir>' to a local directory holding tokenizer files"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise DataError(
            f"no tokenizer in {path}: it holds no tokenizer.json/tokenizer_config.json "
            "(the tokenizer is [model] tokenizer, or the checkpoint directory when that is empty); "
            "copy the tokenizer files there or set [model] tokenizer = '<dir>'"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # pragma: no cover - depends on broken files
        raise DataError(f"could not load the tokenizer from {path}: {type(e).__name__}: {e}") from e
