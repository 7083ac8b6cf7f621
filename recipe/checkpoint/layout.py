"""On-disk layout of the recipe's training checkpoints: names, metadata, fingerprints, completeness.

Everything here is plain files and needs no process group: the checkpoint manager
(``recipe/checkpoint/manager.py``) writes through it, and the export CLI reads through it. Layout under
``<job.dump_folder>/<checkpoint.folder>``::

    step-N/                      a complete checkpoint (only ever created by renaming a finished temp dir)
      .metadata                  DCP metadata (tensor shapes, chunks, file offsets)
      __0_0.distcp, __1_0.distcp one data file per saving rank (DCP)
      rng-rank0.pt, rng-rank1.pt RNG states of every rank (torch CPU, CUDA if present, python)
      recipe_checkpoint.json     format tag, step, world size, base fingerprint, LoRA + model shape, config
      COMPLETE                   written last, by rank 0, after every rank finished writing
    step-M.tmp-<id>/             a save in progress or a save that was killed: ignored, removed by the
                                 next successful save

DCP keys: ``model.<fqn>`` (LoRA parameters, DTensors sharded over the data-parallel mesh),
``optim.state.<fqn>.<exp_avg|exp_avg_sq|step>`` and ``optim.param_groups.<fqn>.<lr|...>`` (flattened
optimizer state of the trainable parameters only), ``trainer`` (JSON text: step, LR scheduler,
loss scaler, data-loader state). DCP reshards DTensors on load, so a checkpoint written by N ranks
loads on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointLoadError",
    "CheckpointSaveError",
    "RunIdentity",
    "base_fingerprint",
    "fingerprint_diff",
    "is_complete",
    "list_complete_checkpoints",
    "read_checkpoint_meta",
    "step_number",
    "is_temp_dir",
    "check_resumable",
    "check_no_later_steps",
    "schedule_changes",
    "FORMAT",
    "VERSION",
    "META_FILE",
    "COMPLETE_FILE",
]

FORMAT = "qlora-fsdp2-recipe-checkpoint"
VERSION = 1
META_FILE = "recipe_checkpoint.json"
COMPLETE_FILE = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^step-\d+\.tmp-")
_SAMPLE_BYTES = 1 << 20  # bytes hashed at the head and at the tail of every safetensors file


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which one and why."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (full disk, unwritable folder, ...), raised on every rank.

    The message names the step, the folder, each failing rank's error and what to do; the previous
    complete checkpoint is untouched and the failed save leaves no ``step-N`` directory.
    """


def step_number(path: Path) -> int | None:
    """N for a ``step-N`` directory name, else None."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_temp_dir(path: Path) -> bool:
    return bool(_TMP_RE.match(path.name))


# ------------------------------------------------------------------------------------------ fingerprints


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_fingerprint(base_dir: str | os.PathLike) -> dict[str, Any]:
    """Cheap identity of a HF checkpoint directory: config.json and index hashes, and for every
    safetensors file its name, size and a hash of its first and last MiB (the header plus weight
    bytes, so a checkpoint with the same shapes but other weights differs too)."""
    base = Path(base_dir)
    index = base / "model.safetensors.index.json"
    files = []
    for f in sorted(base.glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE_BYTES))
            if size > _SAMPLE_BYTES:
                fh.seek(max(size - _SAMPLE_BYTES, _SAMPLE_BYTES))
                h.update(fh.read())
        files.append({"name": f.name, "size": size, "sample_sha256": h.hexdigest()})
    return {
        "config_sha256": _sha256_file(base / "config.json") if (base / "config.json").is_file() else None,
        "index_sha256": _sha256_file(index) if index.is_file() else None,
        "files": files,
    }


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two base fingerprints (empty when they match)."""
    out = []
    if saved.get("config_sha256") != current.get("config_sha256"):
        out.append("config.json differs")
    if saved.get("index_sha256") != current.get("index_sha256"):
        out.append("model.safetensors.index.json differs")
    a = {f["name"]: f for f in saved.get("files", [])}
    b = {f["name"]: f for f in current.get("files", [])}
    for name in sorted(a.keys() - b.keys()):
        out.append(f"{name} is missing from the current base checkpoint")
    for name in sorted(b.keys() - a.keys()):
        out.append(f"{name} is new in the current base checkpoint")
    for name in sorted(a.keys() & b.keys()):
        if a[name]["size"] != b[name]["size"]:
            out.append(f"{name}: size {a[name]['size']} -> {b[name]['size']}")
        elif a[name]["sample_sha256"] != b[name]["sample_sha256"]:
            out.append(f"{name}: contents differ")
    return out


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


@dataclass
class RunIdentity:
    """What a checkpoint records about the run that wrote it, and what a resume must match.

    Built by the entry point from the config, the loaded model and the data loader (``recipe.train``);
    the manager only writes it and ``check_resumable`` compares it. ``config`` is the whole job config as
    a dict (saved for reference; ``schedule_changes`` lists the lr-schedule keys changed since).
    """

    base_path: Path
    lora: dict[str, Any]  # rank, alpha, target_modules (what the LoRA shapes depend on), dropout
    model_shape: dict[str, Any]
    base_quant: str  # 'nf4/64', 'fp4/64', ... or 'none': how the frozen base is stored in this run
    quant_type: str  # model.quant_type as configured
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    data_order: dict[str, Any] = field(default_factory=dict)  # what fixes the data order (the loader's state)
    trainable: dict[str, list[int]] = field(default_factory=dict)  # trainable parameter name -> shape

    @functools.cached_property
    def fingerprint(self) -> dict:
        return base_fingerprint(self.base_path)

    def lora_spec(self) -> dict[str, Any]:
        """The LoRA fields that change tensor shapes or meaning (dropout does not)."""
        return {k: self.lora[k] for k in ("rank", "alpha", "target_modules")}

    @staticmethod
    def shape_dict(shape) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(shape))


# ------------------------------------------------------------------------------------------ files


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_FILE).is_file() and (path / META_FILE).is_file()


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a complete recipe checkpoint, or CheckpointLoadError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        tmps = sorted(p.name for p in path.parent.glob(f"{path.name}.tmp-*")) if path.parent.is_dir() else []
        hint = f"; only incomplete temp dir(s) {tmps} exist (a save that did not finish)" if tmps else ""
        done = [p.name for _, p in list_complete_checkpoints(path.parent)]
        hint += (
            f"; complete checkpoints there: {', '.join(done)}" if done else "; there is no complete checkpoint there"
        )
        raise CheckpointLoadError(f"checkpoint {path} does not exist{hint}")
    if not path.is_dir():
        raise CheckpointLoadError(f"checkpoint {path} is not a directory")
    if is_temp_dir(path):
        raise CheckpointLoadError(
            f"checkpoint {path} is a temporary directory of a save that did not finish (partial); "
            "use a complete step-N directory"
        )
    has_meta = (path / META_FILE).is_file()
    has_dcp = (path / ".metadata").is_file()
    if not (path / COMPLETE_FILE).is_file():
        if has_meta or has_dcp:
            raise CheckpointLoadError(
                f"checkpoint {path} is partial: it has no {COMPLETE_FILE} marker, so its save did not "
                "finish; resume from an earlier complete checkpoint"
            )
        steps = [p.name for _, p in list_complete_checkpoints(path)]
        hint = f"; it holds the checkpoints {', '.join(steps)}: give one of those step directories" if steps else ""
        raise CheckpointLoadError(
            f"{path} is not a recipe checkpoint (no {META_FILE}, no {COMPLETE_FILE}, no DCP .metadata){hint}"
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointLoadError(f"{path} is not a recipe checkpoint: cannot read {META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointLoadError(
            f"{path} is not a recipe checkpoint: {META_FILE} has format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}"
        )
    if meta.get("version") != VERSION:
        raise CheckpointLoadError(
            f"{path}: checkpoint format version {meta.get('version')!r} is not supported (expected {VERSION})"
        )
    if not has_dcp:
        raise CheckpointLoadError(f"{path} is damaged: the DCP .metadata file is missing")
    return meta


def list_complete_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``step-N`` directory, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        n = step_number(p)
        if n is not None and p.is_dir() and is_complete(p):
            out.append((n, p))
    return sorted(out)


def remove_dir(path: Path) -> None:
    """Rename first (so a kill mid-delete never leaves something that looks complete), then delete."""
    doomed = path.with_name(f"{path.name}.tmp-delete-{uuid.uuid4().hex[:8]}") if step_number(path) is not None else path
    if doomed != path:
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------------ resume checks


def check_resumable(path: Path, meta: dict, identity: RunIdentity) -> None:
    """CheckpointLoadError, naming what to change, unless the checkpoint at ``path`` (metadata ``meta``)
    was written by a run that this one (``identity``) may continue: same base weights, LoRA shape, base
    quantization, model shape and data order."""
    current = identity.fingerprint
    why = fingerprint_diff(meta.get("base_fingerprint") or {}, current)
    if why:
        raise CheckpointLoadError(
            f"checkpoint {path} was trained on a different base model: it was saved from "
            f"{meta.get('base_checkpoint')}, this run uses {identity.base_path}, and the fingerprints differ "
            f"({'; '.join(why)}). Point model.checkpoint at the base it was trained on, or start a new "
            "run in another job.dump_folder"
        )
    saved_lora = {k: meta.get("lora", {}).get(k) for k in ("rank", "alpha", "target_modules")}
    if saved_lora != identity.lora_spec():
        raise CheckpointLoadError(
            f"checkpoint {path} has a different LoRA shape: saved {saved_lora}, "
            f"this run has {identity.lora_spec()}; set [lora] rank/alpha/target_modules to the saved values"
        )
    saved_quant, quant = meta.get("base_quant"), identity.base_quant
    if saved_quant is not None and saved_quant != quant:
        raise CheckpointLoadError(
            f"checkpoint {path} was trained against a {saved_quant} base, this run uses {quant}: "
            f"set model.quant_type so the base is {saved_quant} again (an adapter learns the "
            "quantization error of its base)"
        )
    if meta.get("model_shape") != identity.model_shape:
        raise CheckpointLoadError(
            f"checkpoint {path} has a different model shape: saved {meta.get('model_shape')}, "
            f"this run has {identity.model_shape}"
        )
    saved_loader, cur = meta.get("loader") or {}, jsonable(identity.data_order)
    diff = {k: (saved_loader[k], v) for k, v in cur.items() if k in saved_loader and saved_loader[k] != v}
    if diff:
        raise CheckpointLoadError(
            f"checkpoint {path}: the data order changed since it was saved "
            f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); resume needs the same "
            "data (file, tokenizer, seq_len, packing, masking), job.seed and global batch size"
        )


def check_no_later_steps(folder: Path, start: int, total_steps: int) -> None:
    """Going back to an older checkpoint in the same folder would reach steps whose directories
    exist; those saves would be skipped (never overwritten), the final state included."""
    later = sorted(
        (n, p.name) for p in folder.iterdir() if (n := step_number(p)) is not None and start < n <= total_steps
    )
    if later:
        raise CheckpointLoadError(
            f"checkpoint.load_step = {start}, but {folder} already holds later step(s) "
            f"{', '.join(n for _, n in later)} that this run would reach and could not save without "
            "overwriting; resume into a new job.dump_folder (copy the step directory there), or move "
            "the later steps away yourself"
        )


def schedule_changes(saved_config: dict, config: dict) -> list[str]:
    """``section.key old -> new`` for training.steps and every lr_scheduler key that changed between a
    checkpoint's config and this run's (the lr schedule follows the run's config from the resumed step)."""
    saved, now = saved_config or {}, jsonable(config)
    keys = [("training", "steps")] + [("lr_scheduler", k) for k in now.get("lr_scheduler", {})]
    return [
        f"{sec}.{k} {saved[sec][k]} -> {now[sec][k]}"
        for sec, k in keys
        if k in saved.get(sec, {}) and sec in now and saved[sec][k] != now[sec][k]
    ]
