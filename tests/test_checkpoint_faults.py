"""Checkpoint saves that fail (a full disk, an unwritable folder, a failing metadata write or rename) and
metrics.jsonl after a resume.

A failed save must raise ``CheckpointSaveError`` on every rank (a rank left alone in a collective would
hang the job), leave the previous checkpoint complete and untouched and no complete-looking ``step-N``,
and a restart must resume from the previous checkpoint exactly. Faults are injected by patching the
write path (the tests run as root, where a chmod does not stop writes). The 1-rank runs happen in this
pytest process; one 2-rank spawn (gloo, with a timeout, so a hang fails the test) injects the faults
on one rank only. Same setup as tests/test_checkpoint.py: fp32 on CPU, a bf16 synthetic checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from recipe.checkpoint import COMPLETE_FILE, META_FILE, CheckpointSaveError, LocalStorage, list_complete_checkpoints
from tests.test_checkpoint import STEPS, close, finish, listing, make_cfg, run_steps, snapshot

# ---------------------------------------------------------------------------------------------- faults


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _oserror(code, path):
    return OSError(code, os.strerror(code), str(path))


def no_space_in_dcp_writer(ckpt=None):
    """DCP's file writer (also in the async save's thread) hits a full disk on its shard files."""
    from torch.distributed.checkpoint import filesystem as fs

    orig = fs.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and str(path).endswith(".distcp"):
            raise _oserror(errno.ENOSPC, path)
        with orig(self, path, mode) as stream:
            yield stream

    return patched(fs.FileSystem, "create_stream", create_stream)


def _inject(ckpt, op: str, fail):
    """The checkpointer ``ckpt`` saves through a storage whose ``op`` is ``fail`` (injected, not patched)."""
    storage = LocalStorage()
    setattr(storage, op, fail)
    return patched(ckpt, "storage", storage)


def rng_file_denied(ckpt):
    """Saving this rank's RNG file fails (the manager's only per-rank file outside DCP)."""
    orig = LocalStorage().save_object

    def save_object(obj, path):
        if Path(str(path)).name.startswith("rng-rank"):
            raise _oserror(errno.EACCES, path)
        return orig(obj, path)

    return _inject(ckpt, "save_object", save_object)


def metadata_no_space(ckpt):
    orig = LocalStorage().write_durable

    def write_durable(path, text):
        if Path(path).name == META_FILE:
            raise _oserror(errno.ENOSPC, path)
        return orig(path, text)

    return _inject(ckpt, "write_durable", write_durable)


def rename_fails(ckpt):
    """The rename that publishes step-N fails (after COMPLETE is written into the temp dir)."""

    def rename(src, dst):
        raise _oserror(errno.EROFS, src)

    return _inject(ckpt, "rename", rename)


def read_only_folder(ckpt):
    """The temp dir of a save cannot be created: a read-only filesystem."""

    def makedirs(path):
        raise _oserror(errno.EROFS, path)

    return _inject(ckpt, "makedirs", makedirs)


def state_of(folder):
    """What a resume sees, and what would wrongly look complete."""
    folder = Path(folder)
    ls = listing(folder)
    return {
        "complete": [s for s, _ in list_complete_checkpoints(folder)],
        "step_dirs": sorted(n for n in ls if n.startswith("step-") and ".tmp-" not in n),
        "tmp_dirs": sorted(n for n in ls if ".tmp-" in n),
        "tmp_with_complete": sorted(n for n, files in ls.items() if ".tmp-" in n and COMPLETE_FILE in (files or [])),
    }


def expect_save_error(fn):
    """Run fn; return the CheckpointSaveError's message (or a description of what happened instead)."""
    try:
        fn()
    except CheckpointSaveError as e:
        return {"type": "CheckpointSaveError", "msg": str(e)}
    except BaseException as e:  # recorded for the assertion message
        return {"type": type(e).__name__, "msg": str(e)}
    return {"type": None, "msg": "no error"}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_faults")


@pytest.fixture(scope="module")
def base(root):
    from models.synthetic import write_synthetic_checkpoint

    d = root / "base"
    write_synthetic_checkpoint(d, shape="debug", quant_type="none", seed=0)
    return d


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    """In-process trainers are a world of one; keep their process group until the module ends."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ref(root, base):
    """Losses of an uninterrupted 1-rank run."""
    from recipe.train import Trainer

    t = Trainer(make_cfg(base, root / "ref", "--checkpoint.enable=false"))
    losses = t.train()
    finish(t)
    assert len(losses) == STEPS and len(set(losses)) == STEPS
    return losses


# ---------------------------------------------------------------------------------------------- 1 rank


def test_full_disk_in_dcp_write_keeps_previous_checkpoint_and_resumes(root, base, ref):
    from recipe.train import Trainer

    dump = root / "nospace"
    folder = dump / "checkpoint"
    t = Trainer(make_cfg(base, dump))
    try:
        close(run_steps(t, 3), ref[:3])
        step3 = snapshot(folder / "step-3")
        close([t.train_step().loss], ref[3:4])
        with no_space_in_dcp_writer(), pytest.raises(CheckpointSaveError) as ei:
            t.checkpointer.maybe_save(t.step)
    finally:
        finish(t)
    msg = str(ei.value)
    assert f"could not save the checkpoint of step 4 to {folder}" in msg, msg
    assert "[Errno 28] No space left on device" in msg and "__0_0.distcp" in msg, msg
    assert "free space on it" in msg and "checkpoint.folder or job.dump_folder" in msg, msg
    assert "The last complete checkpoint is step-3: restarting the job resumes from step 3" in msg, msg
    assert "was removed" in msg and "rank 0:" not in msg, msg  # one rank: no rank prefix
    assert isinstance(ei.value.__cause__, BaseException)
    assert state_of(folder) == {
        "complete": [1, 2, 3],
        "step_dirs": ["step-1", "step-2", "step-3"],
        "tmp_dirs": [],
        "tmp_with_complete": [],
    }
    assert snapshot(folder / "step-3") == step3

    t = Trainer(make_cfg(base, dump))
    try:
        assert t.step == 3
        close(t.train(), ref[3:])
    finally:
        finish(t)
    assert state_of(folder)["complete"] == [1, 2, 3, 4, 5, 6]


def test_failing_rng_metadata_rename_and_folder_then_a_retry_succeeds(root, base, ref):
    """Every fallible part of a save on one rank; each leaves step-3 as the latest complete checkpoint,
    and once the fault is gone the same step saves."""
    from recipe.train import Trainer

    dump = root / "commit"
    folder = dump / "checkpoint"
    t = Trainer(make_cfg(base, dump, "--checkpoint.interval=3"))
    try:
        run_steps(t, 4)
        assert state_of(folder)["complete"] == [3]
        step3 = snapshot(folder / "step-3")
        cases = [
            (rng_file_denied, ["[Errno 13] Permission denied", "rng-rank0.pt", "fix its permissions"]),
            (metadata_no_space, ["[Errno 28] No space left on device", "recipe_checkpoint.json", "free space"]),
            (rename_fails, ["[Errno 30] Read-only file system", "fix its permissions"]),
            (read_only_folder, ["[Errno 30] Read-only file system", "step-4.tmp-"]),
        ]
        for fault, parts in cases:
            with fault(t.checkpointer), pytest.raises(CheckpointSaveError) as ei:
                t.checkpointer.maybe_save(t.step, force=True)
            msg = str(ei.value)
            assert "step 4" in msg and "restarting the job resumes from step 3" in msg, (fault, msg)
            assert all(p in msg for p in parts), (fault, parts, msg)
            assert state_of(folder) == {
                "complete": [3],
                "step_dirs": ["step-3"],
                "tmp_dirs": [],
                "tmp_with_complete": [],
            }, fault
            assert snapshot(folder / "step-3") == step3
        t.checkpointer.maybe_save(t.step, force=True)  # space freed: the same step saves
        assert state_of(folder)["complete"] == [3, 4]
    finally:
        finish(t)


def test_async_save_failure_is_raised_at_wait(root, base, ref):
    from recipe.train import Trainer

    dump = root / "async"
    folder = dump / "checkpoint"
    t = Trainer(make_cfg(base, dump, "--checkpoint.async_mode"))
    try:
        run_steps(t, 3)
        t.checkpointer.wait()
        with no_space_in_dcp_writer():
            close([t.train_step().loss], ref[3:4])
            t.checkpointer.maybe_save(t.step)  # staged; the write fails in the background
            with pytest.raises(CheckpointSaveError, match=r"step 4 .*No space left on device.*resumes from step 3"):
                t.checkpointer.wait()
        t.checkpointer.wait()  # nothing pending any more
    finally:
        finish(t)
    assert state_of(folder) == {
        "complete": [1, 2, 3],
        "step_dirs": ["step-1", "step-2", "step-3"],
        "tmp_dirs": [],
        "tmp_with_complete": [],
    }


def test_unwritable_checkpoint_folder(root, base):
    """A folder below a regular file fails before training (the folder is probed when the run starts);
    a folder that turns read-only fails at the first save, with no checkpoint to resume from."""
    from recipe.train import Trainer

    blocker = root / "blocker"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(CheckpointSaveError) as ei:
        Trainer(make_cfg(base, root / "below_file", f"--checkpoint.folder={blocker / 'checkpoint'}"))
    msg = str(ei.value)
    assert f"the checkpoint folder {blocker / 'checkpoint'} cannot be written" in msg, msg
    assert "Not a directory" in msg and "is a file, not a folder" in msg and "Nothing was trained yet" in msg, msg
    assert blocker.read_text() == "a file, not a folder\n"

    dump = root / "first_save"
    t = Trainer(make_cfg(base, dump))
    try:
        t.train_step()
        with read_only_folder(t.checkpointer), pytest.raises(CheckpointSaveError) as ei:
            t.checkpointer.maybe_save(t.step)
    finally:
        finish(t)
    msg = str(ei.value)
    assert f"step 1 to {dump / 'checkpoint'}" in msg and "Read-only file system" in msg, msg
    assert "There is no complete checkpoint yet: restarting the job starts from step 0" in msg, msg
    assert listing(dump / "checkpoint") == {}


def test_save_error_is_reported_as_bad_input():
    """The entry point reports CheckpointSaveError like the other user errors (exit code 2, no traceback)."""
    from recipe.train import _user_errors

    if not any(issubclass(CheckpointSaveError, e) for e in _user_errors()):
        pytest.xfail("recipe/train.py: _user_errors() does not list CheckpointSaveError yet")


# ---------------------------------------------------------------------------------------------- 2 ranks


def scenario_two_ranks(rank, world, root, base):
    """Faults on one rank only; every rank must raise, the folder must stay resumable."""
    import torch.distributed as dist

    from recipe.train import Trainer

    root = Path(root)
    res = {"errors": {}, "states": {}}
    t = Trainer(make_cfg(base, root / "ref2", "--checkpoint.enable=false"))
    res["ref"] = t.train()
    finish(t)

    folder = root / "sync2" / "checkpoint"
    t = Trainer(make_cfg(base, root / "sync2"))
    res["first"] = run_steps(t, 3)
    step3 = snapshot(folder / "step-3")
    res["first"].append(t.train_step().loss)
    faults = {
        "dcp_write_rank1": (no_space_in_dcp_writer, 1),
        "rng_file_rank1": (rng_file_denied, 1),
        "metadata_rank0": (metadata_no_space, 0),
        "rename_rank0": (rename_fails, 0),
        "read_only_rank0": (read_only_folder, 0),
    }
    for name, (fault, on_rank) in faults.items():
        with fault(t.checkpointer) if rank == on_rank else contextlib.nullcontext():
            res["errors"][name] = expect_save_error(lambda: t.checkpointer.maybe_save(t.step))
        dist.barrier()
        res["states"][name] = state_of(folder)
    res["step3_untouched"] = snapshot(folder / "step-3") == step3
    finish(t)

    folder = root / "async2" / "checkpoint"
    t = Trainer(make_cfg(base, root / "async2", "--checkpoint.async_mode"))
    run_steps(t, 3)
    t.checkpointer.wait()
    t.train_step()
    with no_space_in_dcp_writer() if rank == 1 else contextlib.nullcontext():
        t.checkpointer.maybe_save(t.step)
        res["errors"]["async_rank1"] = expect_save_error(t.checkpointer.wait)
    dist.barrier()
    res["states"]["async_rank1"] = state_of(folder)
    finish(t)

    t = Trainer(make_cfg(base, root / "sync2"))
    res["resumed_at"] = t.step
    res["resumed"] = t.train()
    finish(t)
    (root / f"two_ranks-rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(root, base):
    from tests.dist_utils import spawn

    spawn(scenario_two_ranks, 2, str(root), str(base), err_dir=root / "errors", timeout=480)
    return [json.loads((root / f"two_ranks-rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_every_rank_raises_and_the_folder_stays_resumable(two_ranks, root):
    ok = {"complete": [1, 2, 3], "step_dirs": ["step-1", "step-2", "step-3"], "tmp_dirs": [], "tmp_with_complete": []}
    parts = {
        "dcp_write_rank1": ["rank 1: OSError: [Errno 28] No space left on device", "__1_0.distcp", "free space"],
        "rng_file_rank1": ["rank 1: PermissionError: [Errno 13] Permission denied", "rng-rank1.pt"],
        "metadata_rank0": ["rank 0: OSError: [Errno 28] No space left on device", "recipe_checkpoint.json"],
        "rename_rank0": ["rank 0: OSError: [Errno 30] Read-only file system"],
        "read_only_rank0": ["rank 0: OSError: [Errno 30] Read-only file system", "step-4.tmp-"],
        "async_rank1": ["rank 1: OSError: [Errno 28] No space left on device", "__1_0.distcp"],
    }
    for name, expect in parts.items():
        msgs = [r["errors"][name] for r in two_ranks]
        for rank, e in enumerate(msgs):
            assert e["type"] == "CheckpointSaveError", (name, rank, e)
            assert "could not save the checkpoint of step 4" in e["msg"], (name, rank, e)
            assert "restarting the job resumes from step 3" in e["msg"], (name, rank, e)
            assert all(p in e["msg"] for p in expect), (name, rank, expect, e["msg"])
        assert msgs[0]["msg"] == msgs[1]["msg"], name  # one message, from rank 0, on every rank
        assert "rank 0" not in msgs[0]["msg"] or "rank 1" not in msgs[0]["msg"], msgs[0]  # only the failing rank
        assert two_ranks[0]["states"][name] == ok, name
    assert two_ranks[0]["step3_untouched"]


def test_two_ranks_resume_after_failed_saves_is_exact(two_ranks):
    r = two_ranks[0]
    ref = r["ref"]
    assert len(set(ref)) == STEPS
    close(r["first"], ref[:4])
    assert r["resumed_at"] == 3
    close(r["resumed"], ref[3:])  # dropout 0.1: equal only with both ranks' RNG restored from step-3


# ---------------------------------------------------------------------------------------------- metrics


def _rec(loss=1.0):
    return {
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 100.0,
        "step_time_s": 1.0,
        "peak_mem_gib": 1.0,
        "host_rss_gib": 1.0,
        "skipped": False,
        "loss_scale": 1.0,
    }


def _steps(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


def test_metrics_resume_drops_rows_after_the_checkpoint(tmp_path, capsys):
    from recipe.metrics import MetricsLogger

    folder = tmp_path / "metrics"
    m = MetricsLogger(folder, 6, 0, 100)
    m.begin(0)
    for s in range(1, 6):
        m.step(s, _rec(float(s)))
    m.close()
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # killed while appending
    capsys.readouterr()
    m = MetricsLogger(folder, 6, 0, 100)
    m.begin(3)
    out = capsys.readouterr().out
    assert "resuming after step 3: dropped 2 row(s) of steps 4-5" in out and "1 malformed or partial line" in out, out
    assert _steps(folder / "metrics.jsonl") == [1, 2, 3]
    for s in range(4, 7):
        m.step(s, _rec(10.0 + s))
    m.close()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl"]  # no temp file, nothing moved aside


def test_metrics_resume_with_nothing_to_drop_keeps_the_file(tmp_path, capsys):
    from recipe.metrics import MetricsLogger

    folder = tmp_path / "metrics"
    m = MetricsLogger(folder, 6, 0, 100)
    for s in range(1, 4):
        m.step(s, _rec())
    m.close()
    before = (folder / "metrics.jsonl").read_bytes()
    ino = (folder / "metrics.jsonl").stat().st_ino
    capsys.readouterr()
    m = MetricsLogger(folder, 6, 0, 100)
    m.begin(3)
    m.close()
    assert (folder / "metrics.jsonl").read_bytes() == before and (folder / "metrics.jsonl").stat().st_ino == ino
    assert "dropped" not in capsys.readouterr().out
    # a torn last line alone is dropped (and the file ends with a newline again)
    with open(folder / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "lo')
    m = MetricsLogger(folder, 6, 0, 100)
    m.begin(3)
    m.close()
    assert (folder / "metrics.jsonl").read_bytes() == before


def test_metrics_after_a_killed_run_list_every_step_once(root, base, ref):
    """A run killed after logging steps 4-5 past its last checkpoint (step 3), mid-append of step 6's
    row; the resumed run trains 4-6: metrics.jsonl holds steps 1-6 once each."""
    from recipe.train import Trainer

    class SimulatedKill(Exception):
        pass

    dump = root / "metrics_kill"
    args = ("--checkpoint.interval=3", "--metrics.log_freq=1")
    t = Trainer(make_cfg(base, dump, *args))
    save = t.checkpointer.maybe_save

    def save_then_die(step, force=False):
        save(step, force)
        if step == 5:
            raise SimulatedKill

    t.checkpointer.maybe_save = save_then_die
    try:
        with pytest.raises(SimulatedKill):
            t.train()
    finally:
        finish(t)
    path = dump / "metrics" / "metrics.jsonl"
    assert _steps(path) == [1, 2, 3, 4, 5]
    assert state_of(dump / "checkpoint")["complete"] == [3]
    with open(path, "a") as f:
        f.write('{"step": 6, "loss"')
    t = Trainer(make_cfg(base, dump, *args))
    try:
        assert t.step == 3
        close(t.train(), ref[3:])
    finally:
        finish(t)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    close([r["loss"] for r in rows], ref)
    assert not list(path.parent.glob("metrics.jsonl.prev-*")) and not list(path.parent.glob(".metrics*"))
