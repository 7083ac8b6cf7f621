"""Exit code 2 for bad input through run_train.sh, exact under several ranks, with the message once.

torchrun reports any failed rank as 1 and stops the other ranks with SIGTERM wherever they are; the
code and message survive through per-rank status records (recipe/exit_status.py). The race lost about
1 run in 20 at NGPU=4, so the loop below repeats the launch; each try imports torch in 5 processes
(about 13 s on 2 busy cores), which bounds the count.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recipe import exit_status
from tests.conftest import run_train_env

REPO = Path(__file__).resolve().parents[1]
# The issue's own loop ran 20 at NGPU=4; 10 keep the suite under its 15 minutes on 2 cores (the test took
# 132 s of it at 20). A regression to the old 1-in-20 loss shows in 40 % of runs, so within a few CI runs.
TRIES = 10
CONCURRENCY = 2  # each try has its own status directory and port (--standalone)
CONFIG_MSG = "training.steps: expected int, got 'ten'"


def _env(ngpu: int) -> dict[str, str]:
    return run_train_env(ngpu)


def _run(tmp: Path, ngpu: int, *overrides: str, checkpoint: Path | None = None) -> subprocess.CompletedProcess:
    # Dump and checkpoint under tmp: nothing lands in ./outputs even if a check fails late.
    args = [f"--job.dump_folder={tmp / 'run'}", f"--model.checkpoint={checkpoint or tmp / 'ckpt'}", *overrides]
    return subprocess.run(
        ["./run_train.sh", *args], cwd=REPO, env=_env(ngpu), capture_output=True, text=True, timeout=300
    )


def _check_bad_input(p: subprocess.CompletedProcess, kind: str, msg: str) -> str | None:
    """None when ``p`` exited 2 with one message: run_train.sh's last line, naming the log file that holds
    torchrun's report; no other line of the message, no torchrun report, no traceback."""
    out = p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if (p.returncode, out.count(msg), out.count(f"{kind}:")) != (2, 1, 1):
        return f"rc={p.returncode} message {out.count(msg)} times\n{p.stderr[-3000:]}"
    for noise in ("Traceback", "ChildFailedError", "error (", "FAILED", "Root Cause"):
        if noise in out:
            return f"{noise!r} printed:\n{p.stderr[-3000:]}"
    if not last.startswith(f"run_train.sh: stopped on bad input: {kind}: {msg}"):
        return f"last stderr line: {last!r}"
    m = re.search(r"\[torchrun's report: (\S+)\]$", last)
    if m is None or "ChildFailedError" not in Path(m.group(1)).read_text():
        return f"the line names no log file with torchrun's report: {last!r}"
    return None


def test_bad_config_exits_2_every_time_at_4_ranks_and_says_so_once(tmp_path):
    """A config error comes before any process group: every rank hits it while torchrun may be
    stopping the others, which is where a shared status file lost the code."""

    def one(i: int) -> str | None:
        p = _run(tmp_path / f"try{i}", 4, "--training.steps=ten")
        return _check_bad_input(p, "ConfigError", CONFIG_MSG)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        problems = [(i, r) for i, r in enumerate(pool.map(one, range(TRIES))) if r is not None]
    assert not problems, f"{len(problems)} of {TRIES} tries: " + "\n---\n".join(f"try {i}: {r}" for i, r in problems)


def test_bad_checkpoint_after_process_group_exits_2_and_says_so_once(tmp_path):
    """Bad input found once the process group exists (every rank reads the checkpoint)."""
    missing = tmp_path / "nonexistent"
    p = _run(tmp_path, 2, "--model.synthetic_shape=", checkpoint=missing)
    problem = _check_bad_input(p, "CheckpointError", f"checkpoint directory {missing} does not exist")
    assert problem is None, problem
    assert "2 rank(s), backend gloo" in p.stdout  # the group was up: this is not a config-time error


# ------------------------------------------------------------------------ exit_status in process


def test_under_run_train_sh_no_rank_prints_and_every_rank_records_atomically(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(exit_status.ENV, str(tmp_path))
    monkeypatch.setattr(exit_status, "RANK0_WAIT_S", 0.2)  # rank 0's record is not coming here
    monkeypatch.setenv("RANK", "3")
    assert exit_status.report_bad_input(ValueError("bad value"), rank=None) == 2
    assert capsys.readouterr().err == ""
    assert exit_status.report_bad_input(ValueError("bad value"), rank=0) == 2
    assert capsys.readouterr().err == ""  # run_train.sh prints it once, from the record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank3"]  # no temp files left
    assert (tmp_path / "rank3").read_text() == "2\nValueError: bad value\n"


def test_a_peer_waits_for_rank_0s_record_only_as_long_as_it_is_missing(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv(exit_status.ENV, str(tmp_path))
    monkeypatch.setattr(exit_status, "RANK0_WAIT_S", 30.0)
    exit_status.write_record(tmp_path, 0, 2, "ValueError: bad value")
    t0 = time.monotonic()
    exit_status.report_bad_input(ValueError("bad value"), rank=1)
    assert time.monotonic() - t0 < 5.0


def test_without_a_status_dir_nothing_is_written_and_rank_0_still_prints(monkeypatch, capsys):
    monkeypatch.delenv(exit_status.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)  # a plain ``python -m recipe.train``: one process, rank 0
    assert exit_status.report_bad_input(KeyError("x")) == 2
    assert capsys.readouterr().err == "error (KeyError): 'x'\n"
