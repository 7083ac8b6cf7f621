"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint) and adapter export.

Only trainable state is saved; the frozen base weights are the input checkpoint, referenced by path
and verified on resume by a fingerprint. On-disk layout under ``<job.dump_folder>/<checkpoint.folder>``::

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

Commit protocol (``_commit``): every rank finished its DCP write -> barrier -> rank 0 writes
``recipe_checkpoint.json`` and then ``COMPLETE`` (both fsynced) -> renames ``step-N.tmp-<id>`` to
``step-N`` -> fsyncs the folder -> cleanup (stale temp dirs, ``keep_latest_k``) -> barrier. A process
killed anywhere before the rename leaves only a temp dir; the previous checkpoint is untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from recipe.config import config_to_dict
from recipe.logging import log

__all__ = [
    "Checkpointer",
    "CheckpointLoadError",
    "base_fingerprint",
    "list_complete_checkpoints",
    "read_checkpoint_meta",
    "FORMAT",
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


# ------------------------------------------------------------------------------------------ helpers


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


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def base_quant(cfg, reader) -> str:
    """How the frozen base weights are stored in this run: 'nf4/64', 'fp4/64', ... or 'none'
    (a pre-quantized checkpoint's own scheme wins over model.quant_type, as in the model build)."""
    scheme = reader.quant_scheme(quantize_dense_as=cfg.model.quant_type)
    return f"{scheme[0]}/{scheme[1]}" if scheme else "none"


def lora_spec(cfg) -> dict[str, Any]:
    """What the LoRA tensors' shapes and meaning depend on (dropout does not change them)."""
    return {
        "rank": int(cfg.lora.rank),
        "alpha": float(cfg.lora.alpha),
        "target_modules": sorted(cfg.lora.target_modules),
    }


def shape_dict(shape) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(shape))


def _fsync_dir(path: Path) -> None:
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


def _write_durable(path: Path, text: str) -> None:
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
        hint += f"; complete checkpoints there: {', '.join(done)}" if done else "; there is no complete checkpoint there"
        raise CheckpointLoadError(f"checkpoint {path} does not exist{hint}")
    if not path.is_dir():
        raise CheckpointLoadError(f"checkpoint {path} is not a directory")
    if _TMP_RE.match(path.name):
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
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def _remove_dir(path: Path) -> None:
    """Rename first (so a kill mid-delete never leaves something that looks complete), then delete."""
    doomed = path.with_name(f"{path.name}.tmp-delete-{uuid.uuid4().hex[:8]}") if _STEP_RE.match(path.name) else path
    if doomed != path:
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _broadcast(obj: Any, group=None) -> Any:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        return box[0]
    return obj


def _barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


# ------------------------------------------------------------------------------------------ checkpointer


@dataclass
class _Pending:
    future: Any
    step: int
    tmp: Path
    final: Path
    meta: dict


class Checkpointer:
    """Saves, resumes and exports the trainable state of a ``recipe.train.Trainer``.

    Uses from the trainer: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``loader``, ``reader``,
    ``dist``, ``device``, ``step``.
    """

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.ck = cfg.checkpoint
        self.trainer = trainer
        self.folder = Path(cfg.job.dump_folder) / self.ck.folder
        self.rank = trainer.dist.rank
        self.world = trainer.dist.world_size
        self.enabled = bool(self.ck.enable)
        self.base_path = Path(os.path.abspath(trainer.reader.path))
        self._fingerprint: dict | None = None
        self._pending: _Pending | None = None
        self._last_saved_step: int | None = None
        self._opts = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
        self._load_opts = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)
        # Async saves run their collectives in a background thread: give them their own gloo group
        # so they never interleave with the collectives of the main thread. The main thread's "is
        # every rank's write done?" poll needs a CPU group too, but a different one: on the save's
        # group it would be matched against the background thread's collectives (a deadlock).
        self._pg = self._poll_pg = None
        if self.enabled and self.ck.async_mode and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")
            self._poll_pg = dist.new_group(backend="gloo")

    # -- metadata --------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.base_path)
        return self._fingerprint

    def _meta(self, step: int) -> dict[str, Any]:
        t = self.trainer
        trainable = {
            n: list(p.shape) for n, p in t.model.named_parameters() if p.requires_grad
        }
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": self.world,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_checkpoint": str(self.base_path),
            "base_fingerprint": self.fingerprint(),
            "lora": {**lora_spec(self.cfg), "dropout": float(self.cfg.lora.dropout)},
            "model_shape": shape_dict(t.reader.shape),
            "quant_type": self.cfg.model.quant_type,
            "base_quant": base_quant(self.cfg, t.reader),
            "trainable_params": trainable,
            "loader": _jsonable(t.loader.state_dict()),
            "config": _jsonable(config_to_dict(self.cfg)),
        }

    def _trainer_state(self, step: int) -> str:
        t = self.trainer
        return json.dumps({
            "step": step,
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "loader": t.loader.state_dict(),
        })

    def _state_dict(self, step: int | None) -> dict[str, Any]:
        t = self.trainer
        return {
            "model": get_model_state_dict(t.model, options=self._opts),
            "optim": get_optimizer_state_dict(t.model, t.optimizer, options=self._opts),
            "trainer": self._trainer_state(step) if step is not None else "",
        }

    # -- save ------------------------------------------------------------------------------------
    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save after optimizer step ``step`` when it is a multiple of the interval (or ``force``)."""
        if not self.enabled:
            return
        self._poll_pending()
        if not force and step % self.ck.interval:
            return
        if step <= 0 or step == self._last_saved_step:
            return  # nothing trained yet / already saved (e.g. the step we resumed from)
        self._save(step)

    def _save(self, step: int) -> None:
        self.wait()  # one save in flight at most
        final = self.folder / f"step-{step}"
        tmp = None
        if self.rank == 0:
            if final.exists():
                state = "complete" if is_complete(final) else "not a complete recipe checkpoint"
                tmp = f"exists:{state}"
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = str(self.folder / f"step-{step}.tmp-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}")
                os.makedirs(tmp)
        tmp = _broadcast(tmp)
        if tmp.startswith("exists:"):
            log(f"checkpoint: {final} already exists ({tmp[7:]}); not overwriting it", self.rank)
            self._last_saved_step = step
            return
        tmp = Path(tmp)
        t0 = time.perf_counter()
        torch.save(_rng_state(self.trainer.device), tmp / f"rng-rank{self.rank}.pt")
        meta = self._meta(step) if self.rank == 0 else {}
        sd = self._state_dict(step)
        self._last_saved_step = step
        if self.ck.async_mode:
            fut = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self._pg)
            if not hasattr(fut, "result"):  # AsyncSaveResponse (staging + upload futures)
                fut = fut.upload_completion
            self._pending = _Pending(fut, step, tmp, final, meta)
            log(f"checkpoint: step {step} staged in {time.perf_counter() - t0:.2f}s, writing in the background",
                self.rank)
        else:
            dcp.save(sd, checkpoint_id=str(tmp))
            self._commit(step, tmp, final, meta)
            log(f"checkpoint: saved step {step} to {final} in {time.perf_counter() - t0:.2f}s", self.rank)

    def _before_complete(self, step: int) -> None:
        """Called on every rank after the shards (and on rank 0 the metadata) are written, just
        before the COMPLETE marker: a fault-injection point for tests."""

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        _barrier()  # every rank finished writing its shards and RNG file
        if self.rank == 0:
            _write_durable(tmp / META_FILE, json.dumps(meta, indent=1))
        self._before_complete(step)
        if self.rank == 0:
            _write_durable(tmp / COMPLETE_FILE, f"step {step}\n")
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.folder)
            self._cleanup(keep=final)
        _barrier()

    def _cleanup(self, keep: Path) -> None:
        """Rank 0, after a successful commit: delete stale temp dirs and checkpoints beyond keep_latest_k."""
        for p in self.folder.iterdir():
            if p.is_dir() and _TMP_RE.match(p.name):
                log(f"checkpoint: removing stale temp dir {p}", self.rank)
                shutil.rmtree(p, ignore_errors=True)
        k = self.ck.keep_latest_k
        if k > 0:
            ours = []
            for s, p in list_complete_checkpoints(self.folder):
                try:
                    if read_checkpoint_meta(p).get("base_fingerprint") == self.fingerprint():
                        ours.append((s, p))
                except CheckpointLoadError:
                    continue
            for s, p in ours[:-k]:
                if p != keep:
                    log(f"checkpoint: keep_latest_k={k}: removing {p}", self.rank)
                    _remove_dir(p)

    def _poll_pending(self) -> None:
        """Commit a finished async save as soon as every rank's background write is done."""
        if self._pending is None:
            return
        done = torch.tensor([1.0 if self._pending.future.done() else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU flag (a plain NCCL default group has no CPU backend), never on the save's group.
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_pg)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written, then commit it."""
        p, self._pending = self._pending, None
        if p is None:
            return
        p.future.result()
        self._commit(p.step, p.tmp, p.final, p.meta)
        log(f"checkpoint: saved step {p.step} to {p.final} (async)", self.rank)

    def close(self) -> None:
        self.wait()
        for pg in (self._pg, self._poll_pg):
            if pg is not None:
                dist.destroy_process_group(pg)
        self._pg = self._poll_pg = None

    # -- resume ----------------------------------------------------------------------------------
    def _choose(self) -> tuple[str | None, str | None]:
        """Rank 0: (path to resume from or None, error message or None)."""
        try:
            if self.ck.load_step >= 0:
                path = self.folder / f"step-{self.ck.load_step}"
            else:
                if self.folder.is_dir():
                    for p in sorted(self.folder.iterdir()):
                        if _STEP_RE.match(p.name) and p.is_dir() and not is_complete(p):
                            log(f"checkpoint: ignoring {p}: not a complete checkpoint", self.rank)
                found = list_complete_checkpoints(self.folder)
                if not found:
                    return None, None
                path = found[-1][1]
            meta = read_checkpoint_meta(path)
            self._validate(path, meta)
            if self.ck.load_step >= 0 and self.enabled:
                self._check_no_later_steps(int(meta.get("step", self.ck.load_step)))
            return str(path), None
        except CheckpointLoadError as e:
            return None, str(e)

    def _check_no_later_steps(self, start: int) -> None:
        """Going back to an older checkpoint in the same folder would reach steps whose directories
        exist; those saves would be skipped (never overwritten), the final state included."""
        later = sorted(
            (int(m.group(1)), p.name) for p in self.folder.iterdir()
            if (m := _STEP_RE.match(p.name)) and start < int(m.group(1)) <= self.cfg.training.steps
        )
        if later:
            raise CheckpointLoadError(
                f"checkpoint.load_step = {start}, but {self.folder} already holds later step(s) "
                f"{', '.join(n for _, n in later)} that this run would reach and could not save without "
                "overwriting; resume into a new job.dump_folder (copy the step directory there), or move "
                "the later steps away yourself"
            )

    def _validate(self, path: Path, meta: dict) -> None:
        why = fingerprint_diff(meta.get("base_fingerprint") or {}, self.fingerprint())
        if why:
            raise CheckpointLoadError(
                f"checkpoint {path} was trained on a different base model: it was saved from "
                f"{meta.get('base_checkpoint')}, this run uses {self.base_path}, and the fingerprints differ "
                f"({'; '.join(why)}). Point model.checkpoint at the base it was trained on, or start a new "
                "run in another job.dump_folder"
            )
        saved_lora = {k: meta.get("lora", {}).get(k) for k in ("rank", "alpha", "target_modules")}
        if saved_lora != lora_spec(self.cfg):
            raise CheckpointLoadError(
                f"checkpoint {path} has a different LoRA shape: saved {saved_lora}, "
                f"this run has {lora_spec(self.cfg)}; set [lora] rank/alpha/target_modules to the saved values"
            )
        saved_quant, quant = meta.get("base_quant"), base_quant(self.cfg, self.trainer.reader)
        if saved_quant is not None and saved_quant != quant:
            raise CheckpointLoadError(
                f"checkpoint {path} was trained against a {saved_quant} base, this run uses {quant}: "
                f"set model.quant_type so the base is {saved_quant} again (an adapter learns the "
                "quantization error of its base)"
            )
        if meta.get("model_shape") != shape_dict(self.trainer.reader.shape):
            raise CheckpointLoadError(
                f"checkpoint {path} has a different model shape: saved {meta.get('model_shape')}, "
                f"this run has {shape_dict(self.trainer.reader.shape)}"
            )
        saved_loader, cur = meta.get("loader") or {}, _jsonable(self.trainer.loader.state_dict())
        diff = {k: (saved_loader[k], v) for k, v in cur.items() if k in saved_loader and saved_loader[k] != v}
        if diff:
            raise CheckpointLoadError(
                f"checkpoint {path}: the data order changed since it was saved "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); resume needs the same "
                "data (file, tokenizer, seq_len, packing, masking), job.seed and global batch size"
            )

    def maybe_resume(self) -> int:
        """Load the latest complete checkpoint (or ``load_step``); returns the step to start from."""
        if not self.enabled and self.ck.load_step < 0:
            return 0
        choice = self._choose() if self.rank == 0 else None
        path, err = _broadcast(choice)
        if err:
            raise CheckpointLoadError(err)
        if path is None:
            log(f"checkpoint: no complete checkpoint in {self.folder}; starting from step 0", self.rank)
            return 0
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        t0 = time.perf_counter()
        t = self.trainer
        sd = self._state_dict(None)
        try:
            dcp.load(sd, checkpoint_id=str(path))
        except Exception as e:  # a damaged checkpoint: say which one
            raise CheckpointLoadError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
        # strict=False: the frozen base weights are (by design) not in the checkpoint.
        res = set_model_state_dict(t.model, sd["model"], options=self._load_opts)
        missing = [k for k in getattr(res, "missing_keys", []) if ".lora_" in k]
        if missing:
            raise CheckpointLoadError(f"checkpoint {path} lacks LoRA weights {missing[:4]}...")
        set_optimizer_state_dict(t.model, t.optimizer, sd["optim"], options=self._load_opts)
        state = json.loads(sd["trainer"])
        t.scheduler.load_state_dict(state["scheduler"])
        self._apply_config_hyperparameters()
        t.scaler.load_state_dict(state["scaler"])
        t.loader.load_state_dict(state["loader"])
        step = int(state["step"])
        rng_file = path / f"rng-rank{self.rank}.pt"
        if meta.get("world_size") == self.world and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False), t.device)
        else:
            seed = (self.cfg.job.seed * 1_000_003 + step * 1009 + self.rank) % (2**63 - 1)
            torch.manual_seed(seed)
            random.seed(seed)
            if self.cfg.lora.dropout > 0:
                log(f"checkpoint: saved on {meta.get('world_size')} rank(s), resuming on {self.world}: RNG "
                    "streams reseeded from (seed, step, rank), so dropout masks differ from an uninterrupted run",
                    self.rank)
        self._last_saved_step = step
        log(f"checkpoint: resumed from {path} (step {step}, saved on {meta.get('world_size')} rank(s)) "
            f"in {time.perf_counter() - t0:.2f}s", self.rank)
        saved, now = meta.get("config") or {}, _jsonable(config_to_dict(self.cfg))
        keys = [("training", "steps")] + [("lr_scheduler", k) for k in now["lr_scheduler"]]
        moved = [f"{sec}.{k} {saved[sec][k]} -> {now[sec][k]}" for sec, k in keys
                 if k in saved.get(sec, {}) and saved[sec][k] != now[sec][k]]
        if moved:
            log(f"checkpoint: the lr schedule follows the config from step {step}: {', '.join(moved)}", self.rank)
        if step >= self.cfg.training.steps:
            log(f"checkpoint: {path.name} is at or past training.steps = {self.cfg.training.steps}: nothing "
                "to train (raise training.steps to continue training)", self.rank)
        return step

    def _apply_config_hyperparameters(self) -> None:
        """The optimizer state holds the hyperparameters it was saved with; the run's config wins
        (a user who resumes with another lr or weight decay means it), and each change is logged."""
        t, sched, o = self.trainer, self.trainer.scheduler, self.cfg.optimizer
        want = {"betas": (float(o.beta1), float(o.beta2)), "eps": float(o.eps), "weight_decay": float(o.weight_decay)}
        changed = []
        for g in t.optimizer.param_groups:
            for k, v in want.items():
                cur = tuple(g[k]) if k == "betas" else g[k]
                if cur != v:
                    changed.append(f"{k} {g[k]} -> {v}")
                    g[k] = v
            g["initial_lr"] = float(o.lr)
        old = list(sched.base_lrs)
        sched.base_lrs = [float(o.lr)] * len(old)
        if old != sched.base_lrs:
            changed.append(f"lr {old[0]} -> {o.lr}")
        # The current lr from the (restored) step and the (config's) schedule and peak lr.
        for g, fn, base in zip(t.optimizer.param_groups, sched.lr_lambdas, sched.base_lrs):
            g["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in t.optimizer.param_groups]  # what get_last_lr() reports
        if changed:
            log(f"checkpoint: optimizer settings from the config, not the checkpoint: {', '.join(dict.fromkeys(changed))}",
                self.rank)

    # -- export ----------------------------------------------------------------------------------
    def export_adapter(self, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path | None:
        """Gather the LoRA weights (collective: every rank calls it) and write a PEFT adapter on rank 0."""
        from recipe.export import export_model_adapter

        return export_model_adapter(
            self.trainer.model,
            out_dir,
            rank=self.cfg.lora.rank,
            alpha=self.cfg.lora.alpha,
            dropout=self.cfg.lora.dropout,
            target_modules=list(self.cfg.lora.target_modules),
            base_model=str(self.base_path),
            dtype=dtype,
            is_main=self.rank == 0,
        )
