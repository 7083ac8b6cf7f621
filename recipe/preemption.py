"""Stop cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit with ``PREEMPTED_EXIT_CODE``.

Kaggle (at the end of a session), Slurm (before a time limit or a preemption) and spot instances
send SIGTERM and give the job a grace period; torchrun forwards it to every worker (and sends
SIGKILL about 30 s later). The first signal only sets a flag; the train loop asks ``should_stop``
after every optimizer step, and all ranks agree on it (a signal reaches ranks at slightly different
moments, and a rank that stops alone would hang the others in the next collective). The flag is
all-reduced on a CPU (gloo) group, so the check adds no host-device synchronisation. A second
signal restores the default action and re-sends itself: the process stops at once.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from recipe.logging import log

__all__ = ["PreemptionWatcher", "PREEMPTED_EXIT_CODE"]

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (here: rerun the same
# command, it resumes from the checkpoint just saved). Distinct from 1 (a failure) and 2 (bad input).
PREEMPTED_EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        if self.signal is not None:  # the second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        # print(), not log(): every rank that gets the signal says so, and a handler must not block.
        print(f"rank {self.rank}: got {signal.Signals(signum).name}: finishing this step, then saving a "
              "checkpoint and stopping (send it again to stop at once)", flush=True)

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
