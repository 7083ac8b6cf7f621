"""Reading the records of ``data.path``: JSONL (one JSON object per line), a JSON list (``.json``) or
Parquet (``.parquet``), each record a dict.

Kept apart from tokenization: what counts as a line and a record (``\\n`` only, JSON objects only) is
a property of the file, whatever format the records are tokenized as later.
"""

from __future__ import annotations

import json
import os

from recipe.data.errors import DataError

__all__ = ["read_records"]


def read_records(path: str) -> list[dict]:
    """Read JSONL (one JSON object per line), a JSON list (``.json``) or Parquet (``.parquet``)."""
    if path and os.path.isdir(path):
        raise DataError(f"data.path {path!r} is a directory; give one .jsonl, .json or .parquet file")
    if not path or not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".arrow", ".gz", ".zip"):
        raise DataError(
            f"{path}: {ext} files are not read; data.path takes JSONL (one JSON object per "
            "line), a JSON list (.json) or Parquet (.parquet)"
        )
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"reading {path} needs pyarrow (an optional dependency): pip install pyarrow") from e
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"could not read parquet file {path}: {e}") from e
    else:
        # newline="": JSONL lines end at "\n" only, so no universal-newline translation either.
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if ext == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON: {e}") from e
            for i, r in enumerate(records):
                if not isinstance(r, dict):
                    raise DataError(f"{path}: element {i} is a {type(r).__name__}, expected a JSON object")
        else:
            records = []
            # Not str.splitlines(): it also splits on U+2028/U+2029, \x85 and \x1c-\x1e, which
            # json.dumps(ensure_ascii=False) leaves raw inside strings.
            for lineno, line in enumerate(text.split("\n"), start=1):
                line = line.removesuffix("\r")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    # e.colno counts from 1 on this line (one line per json.loads): where the editor's cursor goes.
                    raise DataError(
                        f"{path}:{lineno}:{e.colno}: line {lineno}, column {e.colno} is not valid JSON: {e.msg}"
                    ) from e
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path}:{lineno}: line {lineno} is a JSON {type(obj).__name__}, expected a JSON object"
                    )
                records.append(obj)
    if not records:
        raise DataError(f"data file {path} is empty (no records)")
    return records
