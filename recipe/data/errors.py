"""``DataError``: the one exception of the data pipeline.

A module of its own so that every file of the package can raise it without importing another file of
the package for it (no import cycles through ``__init__``).
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the data, the tokenizer or the data-related configuration."""
