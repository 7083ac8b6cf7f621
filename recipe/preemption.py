"""Stop cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit with ``PREEMPTED_EXIT_CODE``.

Kaggle (at the end of a session), Slurm (before a time limit or a preemption) and spot instances
send SIGTERM and give the job a grace period; torchrun forwards it to every worker (and sends
SIGKILL about 30 s later). The first signal only sets a flag; the train loop asks ``should_stop``
after every optimizer step, and all ranks agree on it (a signal reaches ranks at slightly different
moments, and a rank that stops alone would hang the others in the next collective). The flag is
all-reduced on a CPU (gloo) group, so the check adds no host-device synchronisation. A second
signal (``FORWARD_WINDOW_S`` or more after the first: a launcher's forwarded copy of the first one does
not count) restores the default action and re-sends itself: the process stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

__all__ = ["PreemptionWatcher", "PREEMPTED_EXIT_CODE"]

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (here: rerun the same
# command, it resumes from the checkpoint just saved). Distinct from 1 (a failure) and 2 (bad input).
PREEMPTED_EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARD_WINDOW_S = 2.0


def _say(msg: str) -> None:
    """Write from a signal handler. Not print(): the handler runs inside whatever the main thread was
    doing, and a main thread blocked writing to a full stdout pipe holds the stream's buffer, so a print()
    here raises "reentrant call inside <_io.BufferedWriter>" into the train loop, which then crashes
    instead of saving. os.write on the file descriptor takes no Python-level lock."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an in-memory stream (tests, notebooks)
        print(msg, end="", flush=True)
        return
    try:
        os.write(fd, msg.encode())
    except OSError:  # a closed or non-blocking full stdout: the message is not worth a crash
        pass


class PreemptionWatcher:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.signal: int | None = None
        self._previous = {}
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # Created by every rank together (a collective); the default group when it is gloo already.
        self._group = None
        if world > 1:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        # A launcher that forwards the signal it got (torchrun, run_train.sh) delivers a second copy of
        # the first one within moments: only a signal sent later means "stop now".
        if self.signal is not None and time.monotonic() - self._first_at > FORWARD_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signal is not None:
            return
        self.signal, self._first_at = signum, time.monotonic()
        # Not log(): every rank that gets the signal says so.
        _say(
            f"rank {self.rank}: got {signal.Signals(signum).name}: finishing this step, then saving a "
            "checkpoint and stopping (send it again to stop at once)\n"
        )

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank got a signal."""
        flag = torch.tensor([0.0 if self.signal is None else 1.0])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev)
        self._previous = {}
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def describe(self) -> str:
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal on another rank"
        return name
