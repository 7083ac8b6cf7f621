"""One live run per dump folder, and no rank left running once its launcher is gone.

**The dump-folder lock.** ``<dump_folder>/.run.lock`` names the run that holds the folder: a JSON
record of the run id (a uuid rank 0 draws and broadcasts, so every node of one job has the same), the
host, the pid and the process start time of the rank that wrote it. Taking it, before anything is
loaded (``acquire``, a collective):

* every node's local rank 0 tries to create the file (written to a temp name, then ``os.link``-ed onto
  ``.run.lock``: the link fails when the file exists, and a reader never sees half a record);
* the file exists with our run id: another node of this job took it (the nodes share the folder); fine;
* the file names a live run: every rank stops with ``RunFolderBusy`` (bad input, exit 2), naming the
  holder's host and pid;
* the file names a dead run: it is renamed away (one taker wins the rename) and taken, with a note.

Whether the holder lives: on this host, its pid exists and has the recorded start time (a reused pid
does not count); on another host (a folder shared between nodes), its watchdog touches the lock every
``HEARTBEAT_S`` and the lock counts as dead once its mtime is ``STALE_S`` older than the file system's
clock (read from a probe file's mtime, so the hosts' clocks need not agree). Nodes that do not share
the folder each hold their own copy. The holder removes the file at the end of the run (also after
bad input); a run killed with SIGKILL leaves it, and the next run takes it over.

**The launcher watchdog.** torchrun starts each rank in a session of its own, so ``kill -9 -- -PGID``
of ``run_train.sh`` (or of torchrun alone) leaves the ranks running, reparented to init: they used to
train on, save and export, and to race a rerun on the same folder. A daemon thread polls every
``POLL_S`` whether the rank's parent (torchrun) and ``RECIPE_LAUNCHER_PID`` (``run_train.sh``, when it
launched us) are still there. When one is gone: if the train loop's SIGTERM handler
(``recipe.preemption``) is installed, the rank sends itself SIGTERM, so the step ends, a checkpoint is
saved and the rank exits 75 as on a scheduler's SIGTERM (every rank of the node notices within
``POLL_S``, and they agree in the usual all-reduce); whatever is still running ``ORPHAN_GRACE_S``
later (a peer died and a collective hangs, a save that cannot finish) exits at once. Before the loop
exists (loading) there is nothing to save: the rank releases the lock and exits at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from recipe.config import ConfigError

__all__ = ["RunFolderBusy", "RunGuard", "acquire", "release", "LOCK_NAME", "LAUNCHER_ENV", "ORPHANED_EXIT_CODE"]

LOCK_NAME = ".run.lock"
LAUNCHER_ENV = "RECIPE_LAUNCHER_PID"  # run_train.sh's pid, exported by it
POLL_S = 0.5
ORPHAN_GRACE_S = 20.0  # below torchrun's own 30 s between SIGTERM and SIGKILL
HEARTBEAT_S = 5.0
STALE_S = 30.0
ORPHANED_EXIT_CODE = 1  # nobody is left to read it; the preempted path's 75 when a save completed


class RunFolderBusy(ConfigError):
    """The dump folder is held by another live run."""


def _say(msg: str) -> None:
    """To stderr without Python's stream lock (the watchdog thread may run while the main thread prints),
    and without raising when the terminal went away with the launcher."""
    try:
        os.write(sys.stderr.fileno(), msg.encode())
    except (AttributeError, OSError, ValueError):
        pass


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rindex(")") + 2 :].startswith("Z"):  # a zombie: dead, not yet reaped
            return False
    except OSError:
        pass
    return start is None or _start_time(pid) in (None, start)


def _fs_now(folder: Path) -> float:
    """The folder's file system's clock: the mtime of a file created now (a server's clock on NFS)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".run.lock.probe-")
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _read(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or foreign: treated as a dead holder (the note names the file)


def _holder_alive(lock: Path, rec: dict) -> bool:
    if rec.get("host") == socket.gethostname():
        try:
            return _pid_alive(int(rec["pid"]), rec.get("start"))
        except (KeyError, TypeError, ValueError):
            return False
    try:  # another host: its heartbeat
        return _fs_now(lock.parent) - lock.stat().st_mtime < STALE_S
    except FileNotFoundError:
        return False


def _describe(rec: dict) -> str:
    if not rec:
        return "an unreadable record"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("time", 0)))
    return f"host {rec.get('host')}, pid {rec.get('pid')}, started {started}"


def try_lock(folder: Path, run_id: str) -> tuple[bool, str | None]:
    """Take ``folder``'s lock for ``run_id`` (this process). Returns (created, note): created when this
    process wrote the lock (it removes it at the end); note is a line to print (a stale lock taken over).
    Raises RunFolderBusy when a live run of another id holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {
        "run": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "time": time.time(),
        "launcher": os.environ.get(LAUNCHER_ENV),
    }
    note = None
    for _ in range(5):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".run.lock.new-")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            os.link(tmp, lock)
            return True, note
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        rec = _read(lock)
        if rec is None:  # released between our link and our read
            continue
        if rec.get("run") == run_id:
            return False, note  # another node of this job (a shared folder) holds it for us
        if rec.get("pid") == me["pid"] and rec.get("host") == me["host"]:
            lock.unlink(missing_ok=True)  # an earlier run in this very process that was not closed
            continue
        if _holder_alive(lock, rec):
            launcher = f" (launcher pid {rec['launcher']})" if rec.get("launcher") else ""
            raise RunFolderBusy(
                f"job.dump_folder {folder} is in use by a live run: {_describe(rec)}{launcher}. Wait for it "
                f"to finish or stop it, or pass another --job.dump_folder (if no such run exists, delete {lock})"
            )
        # A dead holder: rename it away first, so that of two runs taking it over one wins.
        stale = folder / f".run.lock.stale-{os.getpid()}"
        try:
            os.replace(lock, stale)
        except FileNotFoundError:
            continue
        stale.unlink(missing_ok=True)
        note = f"note: {lock} was left by a run that is gone ({_describe(rec)}): taking the folder over"
    raise RunFolderBusy(f"could not take the lock {lock} (other runs keep taking it): retry")


class RunGuard:
    """This process's lock on a dump folder (when it took one) and its launcher watchdog."""

    def __init__(self, folder: Path, run_id: str, created: bool, created_folder: bool):
        self.folder, self.run_id = folder, run_id
        self.created, self.created_folder = created, created_folder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lock(self) -> Path:
        return self.folder / LOCK_NAME

    # ---------------------------------------------------------------- watchdog

    def start_watchdog(self) -> None:
        # The parent now: torchrun, or whatever started us. Not "is it init (pid 1)": in a container the
        # launcher itself may be pid 1. A launcher that died before this point took the process group's
        # store with it, so the rank fails in its next collective anyway.
        parent = os.getppid()
        launcher = os.environ.get(LAUNCHER_ENV)
        watched = [("parent", parent, _start_time(parent))]
        if launcher and launcher.isdigit() and int(launcher) != parent:
            watched.append(("run_train.sh", int(launcher), _start_time(int(launcher))))
        self._thread = threading.Thread(
            target=self._watch, args=(parent, watched), name="launcher-watchdog", daemon=True
        )
        self._thread.start()

    def _launcher_gone(self, parent: int, watched) -> tuple[str, int] | None:
        if os.getppid() != parent:
            return ("launcher", parent)
        for what, pid, start in watched[1:]:
            if not _pid_alive(pid, start):
                return (what, pid)
        return None

    def _watch(self, parent: int, watched) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(POLL_S):
            if self.created and time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                try:
                    os.utime(self.lock)
                except OSError:
                    pass
            gone = self._launcher_gone(parent, watched)
            if gone is not None:
                self._orphaned(*gone)
                return

    def _orphaned(self, what: str, pid: int) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):  # the train loop's preemption handler: finish the step, save, exit 75
            _say(f"pid {os.getpid()}: the {what} (pid {pid}) is gone: stopping as on SIGTERM\n")
            os.kill(os.getpid(), signal.SIGTERM)
            if self._stop.wait(ORPHAN_GRACE_S):
                return  # released by a clean exit
            _say(f"pid {os.getpid()}: not stopped {ORPHAN_GRACE_S:.0f}s later: exiting now\n")
        else:
            _say(f"pid {os.getpid()}: the {what} (pid {pid}) is gone: exiting\n")
        self._release_lock()
        os._exit(ORPHANED_EXIT_CODE)

    # ---------------------------------------------------------------- release

    def _release_lock(self) -> None:
        if not self.created:
            return
        self.created = False
        rec = _read(self.lock)
        if rec and rec.get("run") == self.run_id and rec.get("pid") == os.getpid():
            self.lock.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.folder.rmdir()  # only when the run wrote nothing else (bad input found early)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        self._release_lock()


_current: RunGuard | None = None


def acquire(folder: str | os.PathLike, rank: int, world: int, watch: bool = True) -> RunGuard:
    """Collective (every rank, right after the process group exists, before anything is loaded): take
    ``folder``'s lock on each node's local rank 0 and start this rank's launcher watchdog. Raises
    ``RunFolderBusy`` on every rank when a live run holds the folder on any node."""
    global _current
    import torch.distributed as dist

    folder = Path(folder).absolute()
    ids = [uuid.uuid4().hex if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(ids, src=0)
    run_id = ids[0]
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    created, error, existed = False, None, folder.exists()
    if local_rank == 0:
        try:
            created, note = try_lock(folder, run_id)
            if note:
                _say(note + "\n")
        except (RunFolderBusy, OSError) as e:
            error = str(e) if isinstance(e, RunFolderBusy) else f"job.dump_folder {folder}: cannot write the lock: {e}"
    guard = RunGuard(folder, run_id, created, created_folder=created and not existed)
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        guard.release()
        raise RunFolderBusy(first)
    if rank == 0 and os.environ.get("RECIPE_EXIT_STATUS_DIR"):
        # run_train.sh moves its launcher log next to the run's results (recipe/launcher.py).
        try:
            (Path(os.environ["RECIPE_EXIT_STATUS_DIR"]) / "dump_folder").write_text(str(folder))
        except OSError:
            pass
    if _current is not None:
        _current.release()
    _current = guard
    if watch:
        guard.start_watchdog()
    return guard


def release() -> None:
    """Release this process's lock and stop its watchdog (idempotent; also after bad input)."""
    global _current
    if _current is not None:
        _current.release()
        _current = None
