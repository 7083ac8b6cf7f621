"""Exit codes that survive torchrun: 2 for bad input (config, checkpoint, data, layout), exact under any
number of ranks; also a preempted run's 75 and a diverged run's 3 (``record_exit``).

torchrun reports any failed rank as exit 1, so ``run_train.sh`` learns the real code from status
records: it creates an empty directory with ``mktemp -d`` and exports it as ``RECIPE_EXIT_STATUS_DIR``.
A rank stopped by bad input writes ``<dir>/rank<R>``::

    2
    Type: message

and ``run_train.sh`` exits with 2 and prints the message, once, when any complete record exists (rank
0's when there is one), naming the log file that holds torchrun's own report (``recipe/launcher.py``).

Why one file per rank, written by rename: once the first rank exits, torchrun sends SIGTERM to the
others, which may be anywhere -- still importing torch, or halfway through their own write. With one
shared file opened for writing, such a rank truncated the record a peer had already completed and died
before refilling it (exit 1, no message). Here each rank writes a temp file in the same directory and
``os.replace``-s it onto its own name: a kill at any moment leaves that rank's record complete or
absent, never another rank's touched. The first rank to exit has recorded before it returned, so some
record always exists; a rank killed before main() ran (still importing) simply has none.

Printing: under ``run_train.sh`` (``RECIPE_EXIT_STATUS_DIR`` set) no rank prints the message: the
launcher prints it once from the records, below everything else, so a failure reads as one line.
Without it (a bare ``torchrun`` or ``python -m recipe.train``) the one-line ``error (Type): message``
goes to stderr from rank 0 only (every rank hits the same config error; N copies said nothing more).
The rank is the caller's, else the process group's, else torchrun's ``RANK`` (a config that fails to
parse has no process group yet), else 0. So that rank 0's record (the one ``run_train.sh`` prints) is
written before torchrun stops rank 0 -- a peer that fails first would otherwise make torchrun kill it
-- the other ranks, after recording, wait for rank 0's record for at most ``RANK0_WAIT_S``. That
bound only costs time when the bad input is seen by some ranks and not by rank 0; it is a file poll,
not a barrier, because the error may come before any process group.
On a multi-node job every node's run_train.sh has its own directory: ranks on the nodes without rank 0
do not wait (rank 0's record never appears there), and their run_train.sh repeats their own record.
Without ``RECIPE_EXIT_STATUS_DIR`` (a bare ``torchrun``), nothing is recorded and no rank waits:
rank 0 still prints, and may be cut short by a peer that fails first.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ENV", "RANK0_WAIT_S", "BAD_INPUT", "report_bad_input", "report_failure", "record_exit", "write_record"]

ENV = "RECIPE_EXIT_STATUS_DIR"
BAD_INPUT = 2
# Generous against a slow rank 0 (N ranks importing torch at once on a few busy cores).
RANK0_WAIT_S = 30.0
_POLL_S = 0.05


def _resolve_rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _rank0_on_this_node(rank: int) -> bool:
    """Whether rank 0 runs under the same torchrun (one node) as ``rank``: torchrun numbers the ranks of
    a node consecutively from ``RANK - LOCAL_RANK``. On the other nodes of a multi-node job rank 0's
    record never reaches this node's status directory (each node's run_train.sh makes its own)."""
    try:
        return rank - int(os.environ["LOCAL_RANK"]) == 0
    except (KeyError, ValueError):
        return True


def write_record(directory: str | os.PathLike, rank: int, code: int, text: str) -> Path:
    """Atomically (re)place ``<directory>/rank<rank>`` with ``code`` and ``text``: complete or absent."""
    directory = Path(directory)
    final = directory / f"rank{rank}"
    # A hidden, per-process temp name: readers look only at rank<N>, and two writers never share one.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".rank{rank}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{code}\n{text}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


def record_exit(code: int, text: str, rank: int | None = None) -> int:
    """Record a non-zero exit ``code`` other than bad input (a preempted or diverged run) for
    ``run_train.sh``, when it runs us; returns ``code``. Every rank of such a stop records the same."""
    directory = os.environ.get(ENV)
    if directory:
        try:
            write_record(directory, _resolve_rank(rank), code, text)
        except OSError as e:
            print(f"warning: could not record exit status in {directory}: {e}", file=sys.stderr, flush=True)
    return code


def report_failure(exc: BaseException, code: int, rank: int | None = None) -> int:
    """Report ``exc`` once (``run_train.sh`` prints it from the record; without it rank 0 prints it) and
    record ``code`` for ``run_train.sh``; returns ``code``. Every rank of such a stop calls it."""
    rank = _resolve_rank(rank)
    text = f"{type(exc).__name__}: {exc}"
    directory = os.environ.get(ENV)
    if not directory:
        if rank == 0:
            print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr, flush=True)
        return code
    try:
        write_record(directory, rank, code, text)
    except OSError as e:  # the directory vanished (launcher gone): say it here, the exit code still holds
        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr, flush=True)
        print(f"warning: could not record exit status in {directory}: {e}", file=sys.stderr, flush=True)
    return code


def report_bad_input(exc: BaseException, rank: int | None = None) -> int:
    """Report ``exc`` (bad input) once and record exit code 2 for ``run_train.sh``; returns 2."""
    rank = _resolve_rank(rank)
    report_failure(exc, BAD_INPUT, rank)
    directory = os.environ.get(ENV)
    if not directory:
        return BAD_INPUT
    if rank != 0 and _rank0_on_this_node(rank):
        deadline = time.monotonic() + RANK0_WAIT_S
        rank0 = Path(directory) / "rank0"
        while not rank0.exists() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    return BAD_INPUT
