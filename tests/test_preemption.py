"""Preemption: SIGTERM / SIGINT finish the step, save a checkpoint and exit 75; a rerun resumes to the
losses of an uninterrupted run; a second signal stops at once.

The end-to-end runs go through ``NGPU=2 ./run_train.sh`` on CPU (gloo), signalled the way Kaggle or
Slurm signal a job: the launcher script alone gets the signal and forwards it. The watcher's own rules
(a forwarded copy within ``FORWARD_WINDOW_S`` is ignored, a later one kills) are checked in process
and in a tiny subprocess, where the timing is exact.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from recipe.checkpoint import list_complete_checkpoints, read_checkpoint_meta
from recipe.preemption import FORWARD_WINDOW_S, PREEMPTED_EXIT_CODE, PreemptionWatcher
from tests.conftest import run_train_env

REPO = Path(__file__).resolve().parents[1]
# Small steps (2 ranks x 1 micro-batch of 32 tokens) and a constant lr after warmup: the schedule does not
# depend on training.steps, so a 200-step run stopped at step N and an (N+3)-step run train alike.
FAST = (
    "--data.seq_len=32",
    "--checkpoint.enable=true",
    "--checkpoint.interval=1000",
    "--checkpoint.export_adapter=false",
    "--metrics.log_freq=1",
    "--profiling.memory_report=false",
    "--lr_scheduler.decay_type=constant",
)
STEP_LINE = re.compile(r"^step\s+(\d+)/")


def _env() -> dict[str, str]:
    return run_train_env(2)


class Run:
    """``./run_train.sh`` in a session of its own (so that its whole tree can be found and cleaned up),
    with stdout and stderr drained by threads (a full pipe would stall the ranks)."""

    def __init__(self, dump: Path, ckpt: Path, *overrides: str):
        self.dump = dump
        args = [f"--job.dump_folder={dump}", f"--model.checkpoint={ckpt}", *overrides]
        self.proc = subprocess.Popen(
            ["./run_train.sh", *args],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._new_line = threading.Condition()
        self._threads = [
            threading.Thread(target=self._drain, args=(s, buf), daemon=True)
            for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream, buf: list[str]) -> None:
        for line in stream:
            with self._new_line:
                buf.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_step(self, step: int, timeout: float = 180.0) -> int:
        """Block until rank 0 logged a step >= ``step``; returns the step it logged."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.out:
                    m = STEP_LINE.match(line)
                    if m and int(m.group(1)) >= step:
                        return int(m.group(1))
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no step {step} logged (rc={self.proc.poll()})\n{self.text()}")
                self._new_line.wait(min(left, 1.0))

    def wait(self, timeout: float = 180.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"run did not stop within {timeout:.0f}s\n{self.text()}") from None
        for t in self._threads:
            t.join(10)
        return rc

    def text(self) -> str:
        return "--- stdout:\n" + "".join(self.out)[-4000:] + "\n--- stderr:\n" + "".join(self.err)[-4000:]

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def cleanup(self) -> None:
        # Only this run's own session (its pgid is the launcher's pid): never another job's torchrun.
        if self.group_alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def losses(self) -> dict[int, float]:
        path = self.dump / "metrics" / "metrics.jsonl"
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The synthetic debug checkpoint, written by the first run and shared by the others."""
    return tmp_path_factory.mktemp("preempt_base") / "ckpt"


def _stopped_step(run: Run) -> int:
    lines = [m for line in run.out if (m := re.match(r"stopped at step (\d+) on (\w+): checkpoint saved", line))]
    assert len(lines) == 1, run.text()
    return int(lines[0].group(1))


def _check_preempted(run: Run, rc: int) -> int:
    """Exit 75 with the launcher's line, one complete step-N checkpoint; returns N."""
    assert rc == PREEMPTED_EXIT_CODE, run.text()
    assert not run.group_alive(), "a rank outlived run_train.sh"
    err = "".join(run.err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("run_train.sh: preempted: Preempted: preempted after step"), last
    # A clean stop: no traceback, no torchrun report (torchrun's own lines go to the launcher log).
    for noise in ("Traceback", "SignalException", "ChildFailedError", "Sending process"):
        assert noise not in err + "".join(run.out), err
    n = _stopped_step(run)
    # Every rank saw the signal and said so (torchrun forwards it as SIGTERM).
    for r in (0, 1):
        assert any(line.startswith(f"rank {r}: got SIGTERM: finishing this step") for line in run.out), run.text()
    folder = run.dump / "checkpoint"
    assert [s for s, _ in list_complete_checkpoints(folder)] == [n], sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{n}"]  # no temp dir left behind
    read_checkpoint_meta(folder / f"step-{n}")  # raises unless complete and readable
    return n


def test_sigterm_saves_exits_75_and_a_rerun_resumes_to_identical_losses(tmp_path, base):
    run = Run(tmp_path / "run", base, *FAST, "--training.steps=200")
    try:
        run.wait_for_step(5)
        os.kill(run.proc.pid, signal.SIGTERM)  # run_train.sh only, as a scheduler would
        n = _check_preempted(run, run.wait())
    finally:
        run.cleanup()
    assert 5 <= n < 200
    first = run.losses()
    assert sorted(first) == list(range(1, n + 1))  # every saved step's metrics are on disk

    resumed = Run(tmp_path / "run", base, *FAST, f"--training.steps={n + 3}")
    try:
        assert resumed.wait() == 0, resumed.text()
    finally:
        resumed.cleanup()
    assert any(
        f"checkpoint: resumed from {tmp_path / 'run' / 'checkpoint' / f'step-{n}'} (step {n}" in line
        for line in resumed.out
    ), resumed.text()

    ref = Run(tmp_path / "ref", base, *FAST, f"--training.steps={n + 3}")
    try:
        assert ref.wait() == 0, ref.text()
    finally:
        ref.cleanup()
    expected = ref.losses()
    got = resumed.losses()
    assert sorted(got) == sorted(expected) == list(range(1, n + 4))
    # Same world size, LoRA, optimizer, data position and RNG restored: bit for bit, not just close.
    assert [got[s] for s in range(1, n + 4)] == [expected[s] for s in range(1, n + 4)]


def test_sigint_to_the_launcher_also_saves_and_exits_75(tmp_path, base):
    run = Run(tmp_path / "run", base, *FAST, "--training.steps=200")
    try:
        run.wait_for_step(2)
        os.kill(run.proc.pid, signal.SIGINT)  # Ctrl-C reaching the script alone
        n = _check_preempted(run, run.wait())
    finally:
        run.cleanup()
    assert n >= 2


def test_a_second_sigterm_later_than_the_window_stops_the_run_at_once(tmp_path, base):
    # Steps of about 10 s on 2 idle cores (192 sequences of 256 tokens over 2 ranks): the second signal,
    # 2.5 s after the first, lands while the step the first one asked to finish is still running, also
    # when the first one came late in its step (with 64 sequences that raced about one run in several).
    run = Run(
        tmp_path / "run",
        base,
        "--data.seq_len=256",
        "--training.global_batch_size=192",
        "--training.steps=50",
        "--checkpoint.enable=true",
        "--checkpoint.interval=1000",
        "--checkpoint.export_adapter=false",
        "--metrics.log_freq=1",
        "--profiling.memory_report=false",
    )
    try:
        run.wait_for_step(1)
        os.kill(run.proc.pid, signal.SIGTERM)
        time.sleep(FORWARD_WINDOW_S + 0.5)
        assert run.proc.poll() is None, "the step finished before the second signal: make it slower\n" + run.text()
        t0 = time.monotonic()
        os.kill(run.proc.pid, signal.SIGTERM)
        rc = run.wait(60)
        stopped_in = time.monotonic() - t0
        # Not the time a step and a save would take: the ranks died with the signal.
        assert not run.group_alive(), "a rank outlived run_train.sh"
    finally:
        run.cleanup()
    assert rc not in (0, PREEMPTED_EXIT_CODE), run.text()
    assert not any(line.startswith("stopped at step") for line in run.out), run.text()
    assert "run_train.sh: preempted" not in "".join(run.err)
    assert list_complete_checkpoints(run.dump / "checkpoint") == []
    assert stopped_in < 10, f"{stopped_in:.1f}s after the second signal"


# ------------------------------------------------------------------------------- the watcher alone


def _deliver(w: PreemptionWatcher, sig: int) -> None:
    os.kill(os.getpid(), sig)
    # The Python-level handler runs at the next bytecode boundary of the main thread; allow a moment.
    for _ in range(100):
        if w.signal is not None:
            return
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_watcher_first_signal_only_sets_the_flag_and_a_forwarded_copy_is_ignored(sig, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    w = PreemptionWatcher(rank=0, world=1)  # a world of one needs no process group
    try:
        assert w.should_stop() is False
        _deliver(w, sig)
        assert w.signal == sig and w.should_stop() is True
        # A launcher's forwarded copy, within the window: the process lives on, the flag stays.
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert w.should_stop() is True and w.describe() == signal.Signals(sig).name
    finally:
        w.close()
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    out = capsys.readouterr().out
    assert out.count(f"rank 0: got {signal.Signals(sig).name}: finishing this step") == 1, out


_TWICE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from recipe.preemption import FORWARD_WINDOW_S, PreemptionWatcher

    w = PreemptionWatcher(rank=0, world=1)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # within the window: a forwarded copy
    time.sleep(0.1)
    print("alive after two quick signals", w.should_stop(), flush=True)
    time.sleep(FORWARD_WINDOW_S + 0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("survived the late signal", flush=True)
""")


def test_watcher_a_signal_after_the_window_kills_the_process():
    p = subprocess.run(
        [sys.executable, "-c", _TWICE.format(repo=str(REPO))], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert p.returncode == -signal.SIGTERM, (p.returncode, p.stdout, p.stderr)
    assert "alive after two quick signals True" in p.stdout
    assert "survived" not in p.stdout


_BLOCKED_WRITER = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {repo!r})
    from recipe.preemption import PreemptionWatcher

    w = PreemptionWatcher(rank=0, world=1)
    while not w.should_stop():
        print("x" * 1000, flush=True)
    print("stopping cleanly", flush=True)
""")


def _wait_until_pipe_full(p: subprocess.Popen, timeout: float) -> None:
    """Until ``p``'s stdout pipe is full (within PIPE_BUF of its capacity, as the kernel fills it by pages,
    and no growth for 0.2 s): its writer's write() blocks (it writes nothing else to stdout before the
    loop that waits for the signal)."""
    import fcntl
    import termios

    fd = p.stdout.fileno()
    capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + timeout
    last, still = -1, 0
    while True:
        unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        # Full: the kernel fills a pipe by pages, so a 1 kB line can block with up to PIPE_BUF bytes free.
        still = still + 1 if unread == last else 0
        if unread > capacity - select.PIPE_BUF and still >= 4:
            break
        last = unread
        if p.poll() is not None:
            raise AssertionError(f"the writer exited ({p.returncode}) before filling the pipe")
        if time.monotonic() > deadline:
            raise AssertionError(f"the pipe held {unread} of {capacity} bytes after {timeout:.0f}s")
        time.sleep(0.05)
    time.sleep(0.2)  # the writer's flush of the next line now blocks in write()


def test_watcher_survives_a_signal_while_the_main_thread_is_blocked_printing():
    """A slow reader of the job's stdout (tee, a log collector) leaves the main thread blocked in a
    write; the handler's message must not re-enter that same buffered stream ("reentrant call inside
    <_io.BufferedWriter>"), which would crash the run instead of stopping it cleanly."""
    env = _env()
    env.pop("PYTHONUNBUFFERED", None)  # the default: a buffered stdout, as most jobs have
    p = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_WRITER.format(repo=str(REPO))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Nobody reads: the pipe fills and the child blocks in write(). Poll until it is full (the
        # child has imported torch, made its watcher and is printing: a fixed sleep lost that race on a
        # loaded machine), then signal.
        _wait_until_pipe_full(p, timeout=180.0)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()[-2000:]
    assert b"rank 0: got SIGTERM: finishing this step" in out
    assert out.rstrip().endswith(b"stopping cleanly")
