"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint).

Only trainable state is saved; the frozen base weights are the input checkpoint, referenced by path
and verified on resume by a fingerprint (``RunIdentity``, checked by ``layout.check_resumable``). The
manager is given what it saves, ``states``: any ``Stateful`` objects (``state_dict`` /
``load_state_dict``) under a name. A state whose ``state_dict`` holds tensors (``state.TrainableState``:
the LoRA weights and the optimizer state, which DCP reshards on load) is written by DCP under its own
top-level keys; the others (small Python values: the LR scheduler, the loss scaler, the data loader) are
kept together as JSON text under the ``trainer`` key, with the step, and restored in the order given. It
never sees the trainer. File names, metadata and resume checks: ``layout.py``; the file operations:
``storage.py`` (injected, so that tests fail them); error texts: ``messages.py``.

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

import contextlib
import json
import random
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from recipe.checkpoint.layout import (
    COMPLETE_FILE,
    FORMAT,
    META_FILE,
    VERSION,
    CheckpointLoadError,
    CheckpointSaveError,
    RunIdentity,
    check_no_later_steps,
    check_resumable,
    is_complete,
    is_temp_dir,
    jsonable,
    list_complete_checkpoints,
    read_checkpoint_meta,
    remove_dir,
    step_number,
)
from recipe.checkpoint.messages import describe, failures, save_error_message
from recipe.checkpoint.state import MissingTrainableError, Stateful
from recipe.checkpoint.storage import LocalStorage
from recipe.logging import log
from recipe.seeding import derive_seed

__all__ = ["Checkpointer", "Stateful"]

# DCP warns on every no_dist=True call that it assumes one process: that is the intent (see _single_process).
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to"
JSON_KEY = "trainer"  # the DCP key of the JSON text: the step and the states without tensors


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


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP's single-process warning off around a call made with ``no_dist=True``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


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


def _has_tensors(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensors(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensors(v) for v in x)
    return False


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

    ``ck`` is the ``[checkpoint]`` config section; ``folder`` the checkpoint folder; ``states`` the
    ``Stateful`` objects to save, by name (see the module docstring); ``identity`` is what the run must
    match to resume (``layout.check_resumable``); ``total_steps`` is ``training.steps`` (a resume must not
    reach saved later steps); ``storage`` the file operations (``storage.LocalStorage``).
    """

    def __init__(
        self,
        ck,
        folder: Path,
        *,
        states: dict[str, Stateful],
        identity: RunIdentity,
        total_steps: int,
        rank: int,
        world: int,
        device: torch.device,
        storage: LocalStorage | None = None,
    ):
        if JSON_KEY in states:
            raise ValueError(f"Checkpointer: {JSON_KEY!r} is the name of the JSON states' key, not a state's")
        self.ck = ck
        self.folder = Path(folder)
        self.states = dict(states)
        self.identity = identity
        self.total_steps = total_steps
        self.rank, self.world, self.device = rank, world, device
        self.storage = storage or LocalStorage()
        self.enabled = bool(ck.enable)
        self.base_path = identity.base_path
        self.resumed_from: Path | None = None
        self.resumed_meta: dict | None = None  # the metadata of the checkpoint resumed from
        self._pending: _Pending | None = None
        self._last_saved_step: int | None = None
        if self.enabled and ck.async_mode and _single_process():
            # The background thread of a single-process async save warns outside any catch_warnings
            # scope of the caller (which is not thread-safe either): filter that one message here.
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
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
            "trainable_params": dict(ident.trainable),
            "loader": jsonable(ident.data_order),
            "config": jsonable(ident.config),
        }

    def _state_dict(self, step: int | None) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """(what DCP saves or loads into, each tensor state's top-level keys). ``step`` None: a template
        to load into."""
        sd: dict[str, Any] = {}
        tensor_keys: dict[str, list[str]] = {}
        small: dict[str, Any] = {}
        for name, state in self.states.items():
            part = state.state_dict()
            if not _has_tensors(part):
                small[name] = part
                continue
            clash = sorted(set(part) & (set(sd) | {JSON_KEY}))
            if clash:
                raise ValueError(f"Checkpointer: state {name!r} reuses the key(s) {clash}")
            sd.update(part)
            tensor_keys[name] = list(part)
        sd[JSON_KEY] = json.dumps({"step": step, **small}) if step is not None else ""
        return sd, tensor_keys

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
            self.storage.save_object(_rng_state(self.device), tmp / f"rng-rank{self.rank}.pt")
        except Exception as e:  # reported on every rank by _agree
            err = e
        meta = self._meta(step) if self.rank == 0 else {}
        sd, _ = self._state_dict(step)
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
                with _quiet_no_dist():
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
            self.storage.makedirs(tmp)
            return "tmp", str(tmp)
        except Exception as e:  # the other ranks wait for this answer
            return "error", self._save_error(step, {0: describe(e)}, None)

    def _agree(self, step: int, tmp: Path, err: BaseException | None) -> None:
        """Collective: return when every rank's part of the save succeeded, else raise
        CheckpointSaveError on every rank (rank 0 removes the temp dir first)."""
        fails: dict[int, tuple[str, int | None]] = {}
        for f in _all_gather(failures(err, self.rank) if err is not None else {}, self._ctl_pg):
            fails.update(f)
        if not fails:
            return
        self._last_saved_step = None
        msg = self._save_error(step, fails, tmp) if self.rank == 0 else None
        raise CheckpointSaveError(_broadcast(msg, self._ctl_pg)) from err

    def _save_error(self, step: int | None, fails: dict[int, tuple[str, int | None]], tmp: Path | None) -> str:
        """Rank 0: the user-facing message of a failed save (``step`` None: the probe before training)."""
        return save_error_message(step, fails, self.folder, self.world, tmp)

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        # Every rank's shards and RNG file are written (``_agree`` returned on every rank).
        err = None
        if self.rank == 0:
            try:
                self.storage.write_durable(tmp / META_FILE, json.dumps(meta, indent=1))
            except Exception as e:  # the other ranks wait for the outcome
                err = e
        # Outside the error handling: a storage that stops the process here (a test's) surfaces as itself.
        self.storage.files_written(step, tmp)
        msg = None
        if self.rank == 0:
            if err is None:
                try:
                    self.storage.write_durable(tmp / COMPLETE_FILE, f"step {step}\n")
                    self.storage.fsync_dir(tmp)
                    self.storage.rename(tmp, final)
                except Exception as e:
                    err = e
            if err is None:
                self.storage.fsync_dir(self.folder)
                try:
                    self._cleanup(keep=final)
                except OSError as e:  # the new checkpoint is complete: only old ones are left behind
                    log(
                        f"checkpoint: saved step {step}, but removing old checkpoints or temp dirs failed: "
                        f"{describe(e)[0]}",
                        self.rank,
                    )
            else:
                msg = self._save_error(step, {0: describe(err)}, tmp)
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
            check_resumable(path, meta, self.identity)
            if self.ck.load_step >= 0 and self.enabled:
                check_no_later_steps(self.folder, int(meta.get("step", self.ck.load_step)), self.total_steps)
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
            return self._save_error(None, {0: describe(e)}, None)
        return None

    def maybe_resume(self) -> int:
        """Load the latest complete checkpoint (or ``load_step``); returns the step to start from.

        Restores every state (the optimizer's with the hyperparameters it was saved with: the caller
        applies the config's, see ``recipe.optim.apply_hyperparameters``) and the RNG streams.
        ``resumed_from`` is the checkpoint loaded, or None; ``resumed_meta`` its metadata.
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
        sd, tensor_keys = self._state_dict(None)
        try:
            with _quiet_no_dist():
                dcp.load(sd, checkpoint_id=str(path), no_dist=_single_process())
        except Exception as e:  # a damaged checkpoint: say which one
            raise CheckpointLoadError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
        state = json.loads(sd[JSON_KEY])
        for name, st in self.states.items():
            try:
                if name in tensor_keys:
                    st.load_state_dict({k: sd[k] for k in tensor_keys[name]})
                elif name not in state:
                    raise CheckpointLoadError(f"checkpoint {path} holds no state {name!r} (it has {sorted(state)})")
                else:
                    st.load_state_dict(state[name])
            except MissingTrainableError as e:
                raise CheckpointLoadError(f"checkpoint {path} {e.args[0]}") from None
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
        self.resumed_meta = meta
        if step >= self.total_steps:
            log(
                f"checkpoint: {path.name} is at or past training.steps = {self.total_steps}: nothing "
                "to train (raise training.steps to continue training)",
                self.rank,
            )
        return step
