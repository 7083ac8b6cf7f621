"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint).

Only trainable state is saved; the frozen base weights are the input checkpoint, referenced by path
and verified on resume by a fingerprint (``RunIdentity``). The manager is given what it saves: the
model and optimizer (through DCP's state-dict helpers, which reshard DTensors on load) and a few
small stateful objects (``state_dict`` / ``load_state_dict``: the LR scheduler, the loss scaler, the
data loader) kept as JSON; it never sees the trainer. File names and metadata: ``layout.py``.

Commit protocol (``_commit``): every rank finished its DCP write -> the ranks agree that all of them
succeeded -> rank 0 writes ``recipe_checkpoint.json`` and then ``COMPLETE`` (both fsynced) -> renames
``step-N.tmp-<id>`` to ``step-N`` -> fsyncs the folder -> cleanup (stale temp dirs, ``keep_latest_k``)
-> rank 0 broadcasts the outcome. A process killed anywhere before the rename leaves only a temp dir;
the previous checkpoint is untouched.

Failed saves (a full disk, an unwritable folder, any error of DCP, the RNG file, the metadata or the
rename) raise ``CheckpointSaveError`` on every rank, never on one rank alone: the other ranks would wait
in the next collective forever. Each fallible step is followed by a collective on a CPU (gloo) group
that carries the outcome: rank 0's folder preparation by a broadcast, every rank's RNG file and DCP
write by an all-gather (``_agree``; DCP itself gathers its per-rank write errors, so a rank whose shard
write fails does not leave the others inside ``dcp.save``), rank 0's metadata, marker and rename by the
closing broadcast. A failed save's temp dir is removed (a resume ignores it anyway) and no ``step-N``
appears. With ``checkpoint.enable`` the folder is also probed for writing before training starts
(``maybe_resume``), so an unwritable folder fails at once and not at the first save.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from recipe.checkpoint.layout import (
    COMPLETE_FILE,
    FORMAT,
    META_FILE,
    VERSION,
    CheckpointLoadError,
    CheckpointSaveError,
    RunIdentity,
    fingerprint_diff,
    fsync_dir,
    is_complete,
    is_temp_dir,
    jsonable,
    list_complete_checkpoints,
    read_checkpoint_meta,
    remove_dir,
    step_number,
    write_durable,
)
from recipe.logging import log
from recipe.seeding import derive_seed

__all__ = ["Checkpointer", "Stateful"]

# DCP warns on every no_dist=True call (async_save from its background thread) that it assumes one
# process: that is the intent (see _single_process).
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to"
)

# The small stateful objects, in the order they are restored, under their keys in the ``trainer`` JSON.
STATEFUL_KEYS = ("scheduler", "scaler", "loader")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


def _single_process() -> bool:
    """True when this job is one process: DCP then runs with ``no_dist=True`` (no collectives).

    With one process DCP's plan exchange (gather / all_gather / broadcast of pickled plans over the
    default gloo group) changes nothing, but gloo runs it on its long-lived worker threads, and a
    pickled plan above at::parallel_for's grain size makes libgomp start an OpenMP team for each of
    them. libgomp then manages more threads than there are CPUs and cuts the spin-wait of every thread
    in the process from 300000 to 100 iterations before a futex sleep: every parallel region of every
    later step ends in a sleep and a wake-up (steps ~60% slower on a 2-core CPU; torchrun's
    OMP_NUM_THREADS=1 for 2+ ranks hides it). Without collectives DCP writes and reads the same files.
    """
    return not (dist.is_initialized() and dist.get_world_size() > 1)


def _broadcast(obj: Any, group=None) -> Any:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        return box[0]
    return obj


def _all_gather(obj: Any, group=None) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    return [obj]


# DCP's CheckpointException derives from BaseException, not Exception.
_SAVE_ERRORS = (Exception, CheckpointException)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_DIR = {errno.ENOTDIR, errno.EEXIST}


def _describe(e: BaseException) -> tuple[str, int | None]:
    """One line naming an error, and the errno of the OSError in it or behind it (None if there is none)."""
    code, x, seen = None, e, set()
    while x is not None and id(x) not in seen and code is None:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            code = x.errno
        x = x.__cause__ or x.__context__
    text = str(e).strip().splitlines()
    text = text[0] if len(text) == 1 else " ".join(t.strip() for t in text)
    return f"{type(e).__name__}: {text[:400]}", code


def _failures(e: BaseException, rank: int) -> dict[int, tuple[str, int | None]]:
    """rank -> (error line, errno). DCP gathers every rank's write errors into one CheckpointException
    raised on all ranks: each error is reported under the rank it happened on (and once)."""
    if isinstance(e, CheckpointException):
        out: dict[int, tuple[str, int | None]] = {}
        for r, (exc, _) in e.failures.items():
            out.update(_failures(exc, r) if isinstance(exc, CheckpointException) else {r: _describe(exc)})
        return out
    return {rank: _describe(e)}


def _remove_tmp(tmp: Path | None) -> bool:
    """Remove a failed save's temp dir; True when it is gone."""
    if tmp is None:
        return True
    shutil.rmtree(tmp, ignore_errors=True)
    return not tmp.exists()


def _dir_mib(path: Path) -> float | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    except OSError:
        return None


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


@dataclass
class _Pending:
    future: Any  # None when dcp.async_save itself raised (``error``)
    step: int
    tmp: Path
    final: Path
    meta: dict
    error: BaseException | None = None  # this rank's RNG file or async_save call failed


class Checkpointer:
    """Saves and resumes the trainable state of a run.

    ``ck`` is the ``[checkpoint]`` config section; ``folder`` the checkpoint folder; ``stateful``
    maps ``scheduler``, ``scaler``, ``loader`` to their objects; ``identity`` is what the run must
    match to resume; ``total_steps`` is ``training.steps`` (a resume must not reach saved later steps).
    """

    def __init__(
        self,
        ck,
        folder: Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stateful: dict[str, Stateful],
        identity: RunIdentity,
        total_steps: int,
        rank: int,
        world: int,
        device: torch.device,
    ):
        missing = set(STATEFUL_KEYS) - set(stateful)
        if missing:
            raise ValueError(f"Checkpointer needs the stateful objects {sorted(missing)}")
        self.ck = ck
        self.folder = Path(folder)
        self.model, self.optimizer, self.stateful = model, optimizer, stateful
        self.identity = identity
        self.total_steps = total_steps
        self.rank, self.world, self.device = rank, world, device
        self.enabled = bool(ck.enable)
        self.base_path = identity.base_path
        self.resumed_from: Path | None = None
        self._pending: _Pending | None = None
        self._last_saved_step: int | None = None
        self._opts = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
        self._load_opts = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)
        # Async saves run their collectives in a background thread: give them their own gloo group
        # so they never interleave with the collectives of the main thread. The main thread's save
        # control (the "is every rank's write done?" poll, the agreement on success, the outcome of
        # rank 0's commit) needs a CPU group too, but a different one: on the save's group it would be
        # matched against the background thread's collectives (a deadlock). Sync saves use it as well:
        # a plain NCCL default group has no CPU backend for those small flags and messages.
        self._pg = self._ctl_pg = None
        if self.enabled and dist.is_initialized():
            if ck.async_mode:
                self._pg = dist.new_group(backend="gloo")
            if dist.get_world_size() > 1:
                self._ctl_pg = dist.new_group(backend="gloo")

    # -- metadata --------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return self.identity.fingerprint

    def _meta(self, step: int) -> dict[str, Any]:
        ident = self.identity
        trainable = {n: list(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": self.world,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_checkpoint": str(self.base_path),
            "base_fingerprint": self.fingerprint(),
            "lora": dict(ident.lora),
            "model_shape": ident.model_shape,
            "quant_type": ident.quant_type,
            "base_quant": ident.base_quant,
            "trainable_params": trainable,
            "loader": jsonable(self.stateful["loader"].state_dict()),
            "config": jsonable(ident.config),
        }

    def _trainer_state(self, step: int) -> str:
        return json.dumps({"step": step, **{k: self.stateful[k].state_dict() for k in STATEFUL_KEYS}})

    def _state_dict(self, step: int | None) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model, options=self._opts),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=self._opts),
            "trainer": self._trainer_state(step) if step is not None else "",
        }

    # -- save ------------------------------------------------------------------------------------
    def due(self, step: int, force: bool = False) -> bool:
        """Whether ``maybe_save(step, force)`` writes a checkpoint."""
        if not self.enabled or (not force and step % self.ck.interval):
            return False
        return step > 0 and step != self._last_saved_step  # nothing trained yet / already saved

    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save after optimizer step ``step`` when it is a multiple of the interval (or ``force``)."""
        if not self.enabled:
            return
        self._poll_pending()
        if self.due(step, force):
            self._save(step)

    def _save(self, step: int) -> None:
        self.wait()  # one save in flight at most
        final = self.folder / f"step-{step}"
        kind, value = _broadcast(self._prepare(step, final) if self.rank == 0 else None, self._ctl_pg)
        if kind == "error":
            self._last_saved_step = None
            raise CheckpointSaveError(value)
        if kind == "exists":
            log(f"checkpoint: {final} already exists ({value}); not overwriting it", self.rank)
            self._last_saved_step = step
            return
        tmp = Path(value)
        t0 = time.perf_counter()
        err = None
        try:
            torch.save(_rng_state(self.device), tmp / f"rng-rank{self.rank}.pt")
        except Exception as e:  # reported on every rank by _agree
            err = e
        meta = self._meta(step) if self.rank == 0 else {}
        sd = self._state_dict(step)
        self._last_saved_step = step
        # DCP is entered on every rank even after a failed RNG write: its collectives need them all.
        if self.ck.async_mode:
            fut = None
            try:
                fut = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self._pg, no_dist=_single_process())
                if not hasattr(fut, "result"):  # AsyncSaveResponse (staging + upload futures)
                    fut = fut.upload_completion
            except _SAVE_ERRORS as e:
                err = err or e
            self._pending = _Pending(fut, step, tmp, final, meta, err)
            log(
                f"checkpoint: step {step} staged in {time.perf_counter() - t0:.2f}s, writing in the background",
                self.rank,
            )
        else:
            try:
                dcp.save(sd, checkpoint_id=str(tmp), no_dist=_single_process())
            except _SAVE_ERRORS as e:
                err = err or e
            self._agree(step, tmp, err)
            self._commit(step, tmp, final, meta)
            log(f"checkpoint: saved step {step} to {final} in {time.perf_counter() - t0:.2f}s", self.rank)

    def _prepare(self, step: int, final: Path) -> tuple[str, str]:
        """Rank 0: ("tmp", the new temp dir), ("exists", why not) or ("error", the message)."""
        try:
            if final.exists():
                return "exists", "complete" if is_complete(final) else "not a complete recipe checkpoint"
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f"step-{step}.tmp-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
            os.makedirs(tmp)
            return "tmp", str(tmp)
        except Exception as e:  # the other ranks wait for this answer
            return "error", self._save_error(step, {0: _describe(e)}, None)

    def _agree(self, step: int, tmp: Path, err: BaseException | None) -> None:
        """Collective: return when every rank's part of the save succeeded, else raise
        CheckpointSaveError on every rank (rank 0 removes the temp dir first)."""
        failures: dict[int, tuple[str, int | None]] = {}
        for f in _all_gather(_failures(err, self.rank) if err is not None else {}, self._ctl_pg):
            failures.update(f)
        if not failures:
            return
        self._last_saved_step = None
        msg = self._save_error(step, failures, tmp) if self.rank == 0 else None
        raise CheckpointSaveError(_broadcast(msg, self._ctl_pg)) from err

    def _save_error(self, step: int | None, failures: dict[int, tuple[str, int | None]], tmp: Path | None) -> str:
        """Rank 0: the user-facing message of a failed save (``step`` None: the probe before training)."""
        why = "; ".join((f"rank {r}: " if self.world > 1 else "") + d for r, (d, _) in sorted(failures.items()))
        codes = {c for _, c in failures.values() if c}
        try:
            done = list_complete_checkpoints(self.folder)
        except OSError:
            done = []
        where = "checkpoint.folder or job.dump_folder"
        if codes & _NO_SPACE:
            mib = _dir_mib(done[-1][1]) if done else None
            size = f" (the last checkpoint takes {mib:.1f} MiB)" if mib is not None else ""
            hint = (
                f"The filesystem is full or over quota: free space on it{size}, keep fewer checkpoints "
                f"(checkpoint.keep_latest_k), or point {where} at a filesystem with room."
            )
        elif codes & _NO_ACCESS:
            hint = (
                f"The folder is not writable (permissions or a read-only filesystem): fix its "
                f"permissions, or point {where} at a writable folder."
            )
        elif codes & _NOT_A_DIR:
            hint = f"A part of that path is a file, not a folder: move the file, or point {where} elsewhere."
        else:
            hint = f"Check that filesystem, or point {where} elsewhere."
        if step is None:
            return (
                f"checkpoint.enable is set, but the checkpoint folder {self.folder} cannot be written: "
                f"{why}. {hint} Nothing was trained yet."
            )
        if done:
            last = (
                f"The last complete checkpoint is {done[-1][1].name}: restarting the job resumes "
                f"from step {done[-1][0]}."
            )
        else:
            last = "There is no complete checkpoint yet: restarting the job starts from step 0."
        gone = ""
        if tmp is not None:
            gone = (
                f" The partial save {tmp.name} was removed."
                if _remove_tmp(tmp)
                else f" The partial save {tmp} could not be removed; a resume ignores it."
            )
        return f"could not save the checkpoint of step {step} to {self.folder}: {why}. {hint} {last}{gone}"

    def _before_complete(self, step: int) -> None:
        """Called on every rank after the shards (and on rank 0 the metadata) are written, just
        before the COMPLETE marker: a fault-injection point for tests."""

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        # Every rank's shards and RNG file are written (``_agree`` returned on every rank).
        err = None
        if self.rank == 0:
            try:
                write_durable(tmp / META_FILE, json.dumps(meta, indent=1))
            except Exception as e:  # the other ranks wait for the outcome
                err = e
        # Outside the error handling: a test's simulated kill must surface as itself.
        self._before_complete(step)
        msg = None
        if self.rank == 0:
            if err is None:
                try:
                    write_durable(tmp / COMPLETE_FILE, f"step {step}\n")
                    fsync_dir(tmp)
                    os.rename(tmp, final)
                except Exception as e:
                    err = e
            if err is None:
                fsync_dir(self.folder)
                try:
                    self._cleanup(keep=final)
                except OSError as e:  # the new checkpoint is complete: only old ones are left behind
                    log(
                        f"checkpoint: saved step {step}, but removing old checkpoints or temp dirs failed: "
                        f"{_describe(e)[0]}",
                        self.rank,
                    )
            else:
                msg = self._save_error(step, {0: _describe(err)}, tmp)
        # The outcome, from rank 0 (it also holds the others until the rename is done).
        msg = _broadcast(msg, self._ctl_pg)
        if msg is not None:
            self._last_saved_step = None
            raise CheckpointSaveError(msg) from err

    def _cleanup(self, keep: Path) -> None:
        """Rank 0, after a successful commit: delete stale temp dirs and checkpoints beyond keep_latest_k."""
        for p in self.folder.iterdir():
            if p.is_dir() and is_temp_dir(p):
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
            for _, p in ours[:-k]:
                if p != keep:
                    log(f"checkpoint: keep_latest_k={k}: removing {p}", self.rank)
                    remove_dir(p)

    def _poll_pending(self) -> None:
        """Commit a finished async save as soon as every rank's background write is done."""
        if self._pending is None:
            return
        fut = self._pending.future
        done = torch.tensor([1.0 if fut is None or fut.done() else 0.0])  # a failed future is done too
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU flag (a plain NCCL default group has no CPU backend), never on the save's group.
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._ctl_pg)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written, then commit it."""
        p, self._pending = self._pending, None
        if p is None:
            return
        err = p.error
        if p.future is not None:
            try:
                p.future.result()
            except _SAVE_ERRORS as e:
                err = err or e
        self._agree(p.step, p.tmp, err)
        self._commit(p.step, p.tmp, p.final, p.meta)
        log(f"checkpoint: saved step {p.step} to {p.final} (async)", self.rank)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for pg in (self._pg, self._ctl_pg):
                if pg is not None:
                    dist.destroy_process_group(pg)
            self._pg = self._ctl_pg = None

    def last_complete_step(self) -> int | None:
        found = list_complete_checkpoints(self.folder)
        return found[-1][0] if found else None

    # -- resume ----------------------------------------------------------------------------------
    def _choose(self) -> tuple[str | None, str | None]:
        """Rank 0: (path to resume from or None, error message or None)."""
        try:
            if self.ck.load_step >= 0:
                path = self.folder / f"step-{self.ck.load_step}"
            else:
                if self.folder.is_dir():
                    for p in sorted(self.folder.iterdir()):
                        if step_number(p) is not None and p.is_dir() and not is_complete(p):
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

    def _probe_writable(self) -> str | None:
        """Rank 0: None if a file can be created in the checkpoint folder, else the error message."""
        probe = self.folder / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "w") as fh:
                fh.write("probe\n")
            probe.unlink()
        except OSError as e:
            try:
                probe.unlink(missing_ok=True)  # created, but the write or the unlink failed
            except OSError:
                pass
            return self._save_error(None, {0: _describe(e)}, None)
        return None

    def _check_no_later_steps(self, start: int) -> None:
        """Going back to an older checkpoint in the same folder would reach steps whose directories
        exist; those saves would be skipped (never overwritten), the final state included."""
        later = sorted(
            (n, p.name)
            for p in self.folder.iterdir()
            if (n := step_number(p)) is not None and start < n <= self.total_steps
        )
        if later:
            raise CheckpointLoadError(
                f"checkpoint.load_step = {start}, but {self.folder} already holds later step(s) "
                f"{', '.join(n for _, n in later)} that this run would reach and could not save without "
                "overwriting; resume into a new job.dump_folder (copy the step directory there), or move "
                "the later steps away yourself"
            )

    def _validate(self, path: Path, meta: dict) -> None:
        ident = self.identity
        why = fingerprint_diff(meta.get("base_fingerprint") or {}, self.fingerprint())
        if why:
            raise CheckpointLoadError(
                f"checkpoint {path} was trained on a different base model: it was saved from "
                f"{meta.get('base_checkpoint')}, this run uses {self.base_path}, and the fingerprints differ "
                f"({'; '.join(why)}). Point model.checkpoint at the base it was trained on, or start a new "
                "run in another job.dump_folder"
            )
        saved_lora = {k: meta.get("lora", {}).get(k) for k in ("rank", "alpha", "target_modules")}
        if saved_lora != ident.lora_spec():
            raise CheckpointLoadError(
                f"checkpoint {path} has a different LoRA shape: saved {saved_lora}, "
                f"this run has {ident.lora_spec()}; set [lora] rank/alpha/target_modules to the saved values"
            )
        saved_quant, quant = meta.get("base_quant"), ident.base_quant
        if saved_quant is not None and saved_quant != quant:
            raise CheckpointLoadError(
                f"checkpoint {path} was trained against a {saved_quant} base, this run uses {quant}: "
                f"set model.quant_type so the base is {saved_quant} again (an adapter learns the "
                "quantization error of its base)"
            )
        if meta.get("model_shape") != ident.model_shape:
            raise CheckpointLoadError(
                f"checkpoint {path} has a different model shape: saved {meta.get('model_shape')}, "
                f"this run has {ident.model_shape}"
            )
        saved_loader, cur = meta.get("loader") or {}, jsonable(self.stateful["loader"].state_dict())
        diff = {k: (saved_loader[k], v) for k, v in cur.items() if k in saved_loader and saved_loader[k] != v}
        if diff:
            raise CheckpointLoadError(
                f"checkpoint {path}: the data order changed since it was saved "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); resume needs the same "
                "data (file, tokenizer, seq_len, packing, masking), job.seed and global batch size"
            )

    def maybe_resume(self) -> int:
        """Load the latest complete checkpoint (or ``load_step``); returns the step to start from.

        Restores the model's LoRA weights, the optimizer state (with the hyperparameters it was saved
        with: the caller applies the config's, see ``recipe.optim.apply_hyperparameters``), the
        stateful objects and the RNG streams. ``resumed_from`` is the checkpoint loaded, or None.
        """
        if not self.enabled and self.ck.load_step < 0:
            return 0
        choice = None
        if self.rank == 0:
            path, err = self._choose()
            # Only once the resume checks passed: a rejected resume leaves the folder as it was.
            unwritable = self._probe_writable() if self.enabled and not err else None
            choice = path, err, unwritable
        path, err, unwritable = _broadcast(choice)
        if err:
            raise CheckpointLoadError(err)
        if unwritable:
            raise CheckpointSaveError(unwritable)
        if path is None:
            log(f"checkpoint: no complete checkpoint in {self.folder}; starting from step 0", self.rank)
            return 0
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        t0 = time.perf_counter()
        sd = self._state_dict(None)
        try:
            dcp.load(sd, checkpoint_id=str(path), no_dist=_single_process())
        except Exception as e:  # a damaged checkpoint: say which one
            raise CheckpointLoadError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
        # strict=False: the frozen base weights are (by design) not in the checkpoint.
        res = set_model_state_dict(self.model, sd["model"], options=self._load_opts)
        missing = [k for k in getattr(res, "missing_keys", []) if ".lora_" in k]
        if missing:
            raise CheckpointLoadError(f"checkpoint {path} lacks LoRA weights {missing[:4]}...")
        set_optimizer_state_dict(self.model, self.optimizer, sd["optim"], options=self._load_opts)
        state = json.loads(sd["trainer"])
        for key in STATEFUL_KEYS:
            self.stateful[key].load_state_dict(state[key])
        step = int(state["step"])
        rng_file = path / f"rng-rank{self.rank}.pt"
        if meta.get("world_size") == self.world and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False), self.device)
        else:
            seed = derive_seed(self.identity.seed, step, self.rank)
            torch.manual_seed(seed)
            random.seed(seed)
            if self.identity.lora.get("dropout", 0) > 0:
                log(
                    f"checkpoint: saved on {meta.get('world_size')} rank(s), resuming on {self.world}: RNG "
                    "streams reseeded from (seed, step, rank), so dropout masks differ from an uninterrupted run",
                    self.rank,
                )
        self._last_saved_step = step
        self.resumed_from = path
        log(
            f"checkpoint: resumed from {path} (step {step}, saved on {meta.get('world_size')} rank(s)) "
            f"in {time.perf_counter() - t0:.2f}s",
            self.rank,
        )
        saved, now = meta.get("config") or {}, jsonable(self.identity.config)
        keys = [("training", "steps")] + [("lr_scheduler", k) for k in now.get("lr_scheduler", {})]
        moved = [
            f"{sec}.{k} {saved[sec][k]} -> {now[sec][k]}"
            for sec, k in keys
            if k in saved.get(sec, {}) and sec in now and saved[sec][k] != now[sec][k]
        ]
        if moved:
            log(f"checkpoint: the lr schedule follows the config from step {step}: {', '.join(moved)}", self.rank)
        if step >= self.total_steps:
            log(
                f"checkpoint: {path.name} is at or past training.steps = {self.total_steps}: nothing "
                "to train (raise training.steps to continue training)",
                self.rank,
            )
        return step
