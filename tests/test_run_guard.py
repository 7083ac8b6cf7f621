"""No rank outlives its launcher, and one live run per dump folder (recipe/run_guard.py).

End to end through ``NGPU=2 ./run_train.sh`` on CPU: a second run on a folder a live run holds exits 2
before loading anything, naming the holder's host and pid; ``kill -9`` of the first run's launcher
process group (run_train.sh and torchrun; torchrun starts the ranks in sessions of their own, so they
are not in it) leaves no rank alive within 30 s, and the ranks stop as on SIGTERM: a complete
checkpoint, the lock released. The lock's rules (a dead holder taken over with a note, another
host's heartbeat, the nodes of one job sharing a folder) are checked in process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe import run_guard
from recipe.checkpoint import list_complete_checkpoints
from tests.test_preemption import FAST, Run, _env

REPO = Path(__file__).resolve().parents[1]


def _ranks_of(launcher_pid: int) -> list[int]:
    """The recipe.train processes started under the run_train.sh of ``launcher_pid`` (from their
    environment: they are in sessions of their own, not in the launcher's process group)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        mine = f"RECIPE_LAUNCHER_PID={launcher_pid}".encode() in env
        if mine and b"recipe.launcher" not in cmd and b"recipe.train" in cmd:
            found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    return run_guard._pid_alive(pid)


def test_killed_launcher_leaves_no_rank_and_a_held_folder_refuses_a_second_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = Run(tmp_path / "run", ckpt, *FAST, "--training.steps=2000")
    try:
        run.wait_for_step(2)
        ranks = _ranks_of(run.proc.pid)
        assert len(ranks) == 2, (ranks, run.text())
        lock = json.loads((tmp_path / "run" / run_guard.LOCK_NAME).read_text())
        assert lock["pid"] in ranks and lock["host"] == socket.gethostname()

        # A second run on the held folder: exit 2 before loading, naming the holder.
        p = subprocess.run(
            ["./run_train.sh", f"--job.dump_folder={tmp_path / 'run'}", f"--model.checkpoint={tmp_path / 'other'}"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"is in use by a live run: host {socket.gethostname()}, pid {lock['pid']}" in p.stderr, p.stderr
        assert "model ready" not in p.stdout and not (tmp_path / "other").exists()  # nothing loaded or written
        assert p.stderr.count("RunFolderBusy") == 1 and "Traceback" not in p.stderr, p.stderr

        os.killpg(run.proc.pid, signal.SIGKILL)  # run_train.sh and torchrun; not the ranks
        deadline = time.monotonic() + 30.0
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [r for r in ranks if _alive(r)]
        assert not left, f"ranks {left} outlived their launcher by 30 s\n{run.text()}"
    finally:
        for r in _ranks_of(run.proc.pid):  # only this test's ranks, should the assertion above fail
            os.kill(r, signal.SIGKILL)
        run.cleanup()
    # They stopped as on SIGTERM: a complete checkpoint, and the lock released.
    assert list_complete_checkpoints(tmp_path / "run" / "checkpoint"), run.text()
    assert not (tmp_path / "run" / run_guard.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ the lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder: Path, **rec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / run_guard.LOCK_NAME
    lock.write_text(json.dumps({"run": "other", "time": time.time(), **rec}))
    return lock


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    lock = _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid())
    created, note = run_guard.try_lock(tmp_path, "mine")
    assert created and note and "was left by a run that is gone" in note and str(lock) in note
    assert json.loads(lock.read_text())["run"] == "mine"


def test_a_live_holder_on_this_host_is_refused_with_its_host_and_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(
            tmp_path, host=socket.gethostname(), pid=holder.pid, start=run_guard._start_time(holder.pid), launcher="7"
        )
        with pytest.raises(run_guard.RunFolderBusy, match=f"host {socket.gethostname()}, pid {holder.pid}"):
            run_guard.try_lock(tmp_path, "mine")
        # The same pid with another start time is a reused pid: the holder is gone.
        _write_lock(tmp_path, host=socket.gethostname(), pid=holder.pid, start="1")
        assert run_guard.try_lock(tmp_path, "mine")[0]
    finally:
        holder.kill()
        holder.wait()


def test_another_hosts_lock_lives_while_its_heartbeat_is_fresh(tmp_path):
    lock = _write_lock(tmp_path, host="node-that-is-not-here", pid=1)
    with pytest.raises(run_guard.RunFolderBusy, match="host node-that-is-not-here, pid 1"):
        run_guard.try_lock(tmp_path, "mine")
    old = time.time() - run_guard.STALE_S - 5
    os.utime(lock, (old, old))
    created, note = run_guard.try_lock(tmp_path, "mine")
    assert created and "node-that-is-not-here" in note


def test_nodes_of_one_job_share_a_folder_and_only_the_taker_removes_the_lock(tmp_path):
    assert run_guard.try_lock(tmp_path / "dump", "job") == (True, None)
    assert run_guard.try_lock(tmp_path / "dump", "job") == (False, None)  # another node, same run id
    joiner = run_guard.RunGuard(tmp_path / "dump", "job", created=False, created_folder=False)
    joiner.release()
    assert (tmp_path / "dump" / run_guard.LOCK_NAME).exists()
    taker = run_guard.RunGuard(tmp_path / "dump", "job", created=True, created_folder=True)
    taker.release()
    assert not (tmp_path / "dump").exists()  # it made the folder and nothing else was written there


# ------------------------------------------------------------------------------------ the watchdog

_ORPHAN = """
import os, signal, sys, time
from recipe.run_guard import RunGuard
if sys.argv[1] == "handler":  # the train loop's SIGTERM handler: finish, save, exit 75
    signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[2], "w").write("saved"), os._exit(75)))
RunGuard(None, "x", created=False, created_folder=False).start_watchdog()
open(sys.argv[2] + ".ready", "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["handler", "loading"])
def test_an_orphaned_rank_stops_within_seconds(tmp_path, mode):
    """A middle process (the launcher) starts a rank in a session of its own, as torchrun does, and dies
    with SIGKILL: the rank notices its parent is gone and stops, through its SIGTERM handler when it
    has one (the train loop's: save, exit 75), else at once (still loading)."""
    marker = tmp_path / "saved"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]],"
            " start_new_session=True); print(p.pid, flush=True); time.sleep(60)",
            _ORPHAN,
            mode,
            str(marker),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    rank = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 60.0
        while not Path(f"{marker}.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the watchdog runs
        assert _alive(rank)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10.0
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(rank), "the orphaned rank is still running 10 s after its launcher died"
        assert marker.exists() == (mode == "handler")
    finally:
        if _alive(rank):
            os.kill(rank, signal.SIGKILL)
