"""Non-finite guard (bf16/fp32): a NaN/inf loss or gradient norm skips that optimizer step and says where;
``training.max_nonfinite_steps`` in a row stop the run (TrainingDivergedError, exit 3) and leave the last
good checkpoint as it was.

One 2-rank gloo spawn runs the story (rank 1 alone sees the NaN losses, as a bad micro-batch would make
it), plus the check turned off; the exit code through ``recipe.train.main`` runs in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from recipe.checkpoint import list_complete_checkpoints, read_checkpoint_meta
from recipe.config import load_config
from tests.dist_utils import local_tensor, spawn

LIMIT = 3
STEPS = 14
# Step numbers as logged (1-based). 4 and 7 are good steps between bad ones: each resets the count, so
# only 9, 10, 11 make LIMIT in a row.
NAN_LOSS_STEPS = {3, 6, 9, 10, 11}  # rank 1's loss is NaN
INF_NORM_STEPS = {5}  # every rank's gradient norm is inf, the losses are fine
STOP_STEP = 11
LAST_GOOD = 8


def _argv(base, dump, *extra) -> list[str]:
    return [
        f"--model.checkpoint={base}",
        "--model.quant_type=none",
        "--training.mixed_precision_param=float32",
        "--training.device=cpu",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=64",
        "--training.global_batch_size=4",
        "--training.micro_batch_size=1",
        f"--training.steps={STEPS}",
        "--optimizer.lr=2e-3",
        "--lr_scheduler.warmup_steps=2",
        "--lora.rank=8",
        "--checkpoint.export_adapter=false",
        "--metrics.log_freq=1",
        "--profiling.memory_report=false",
        f"--job.dump_folder={dump}",
        *extra,
    ]


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: local_tensor(p).detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _poison_loss(trainer, steps: set[int]) -> None:
    """Make this rank's summed loss NaN on ``steps`` (so its gradients are NaN too)."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 in steps:  # trainer.step counts completed steps
            out.loss_sum = out.loss_sum * float("nan")
        return out

    trainer.model.forward = poisoned  # the instance attribute: FSDP's hooks still run around it


def _worker(rank: int, world: int, base: str, root: str) -> None:
    import recipe.train
    from parallel.distributed import destroy
    from recipe.train import Trainer, TrainingDivergedError

    # Two trainers on one process group: Trainer.close() must not destroy it.
    recipe.train.destroy = lambda: None
    root = Path(root)
    res: dict = {"rank": rank}
    try:
        # 1. The story: isolated bad steps are skipped, LIMIT in a row stop the run.
        cfg = load_config(
            _argv(
                base,
                root / "run",
                f"--training.max_nonfinite_steps={LIMIT}",
                "--checkpoint.enable",
                "--checkpoint.interval=1",
            )
        )
        trainer = Trainer(cfg)
        if rank == 1:
            _poison_loss(trainer, NAN_LOSS_STEPS)
        clip = trainer._clip

        def clip_inf():
            norm = clip()
            return torch.full_like(norm, float("inf")) if trainer.step + 1 in INF_NORM_STEPS else norm

        trainer._clip = clip_inf
        steps, snapshots = [], {}
        train_step = trainer.train_step

        def recording_step():
            before = _lora(trainer)
            r = train_step()
            after = _lora(trainer)
            snapshots[trainer.step] = after
            steps.append(
                {
                    "step": trainer.step,
                    "skipped": r.skipped,
                    "nonfinite_ranks": r.nonfinite_ranks,
                    "changed": [n for n in before if not torch.equal(before[n], after[n])],
                    "finite": all(bool(torch.isfinite(t).all()) for t in after.values()),
                }
            )
            return r

        trainer.train_step = recording_step
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                trainer.train()
                res["error"] = None
            except TrainingDivergedError as e:
                res["error"] = str(e)
        res["stdout"] = out.getvalue()
        res["steps"] = steps
        res["final_equals_last_good"] = all(torch.equal(v, snapshots[LAST_GOOD][n]) for n, v in _lora(trainer).items())
        res["step_at_stop"] = trainer.step
        trainer.close()

        # 2. The check off: the NaN reaches AdamW and the weights.
        cfg = load_config(_argv(base, root / "off", "--training.max_nonfinite_steps=0"))
        trainer = Trainer(cfg)
        if rank == 1:
            _poison_loss(trainer, {1})
        before = _lora(trainer)
        r = trainer.train_step()
        res["off"] = {
            "skipped": r.skipped,
            "nonfinite_ranks": r.nonfinite_ranks,
            "nan_params": sorted(n for n, v in _lora(trainer).items() if torch.isnan(v).any()),
            "n_params": len(before),
        }
        trainer.close()
        torch.save(res, root / f"rank{rank}.pt")
    finally:
        destroy()


@pytest.fixture(scope="module")
def story(tmp_path_factory, debug_bf16_ckpt):
    root = tmp_path_factory.mktemp("nonfinite")
    spawn(_worker, 2, str(debug_bf16_ckpt), str(root), err_dir=root / "errors", timeout=300)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_a_bad_step_is_skipped_on_every_rank_and_names_its_cause(story):
    _, ranks = story
    for res in ranks:
        by_step = {s["step"]: s for s in res["steps"]}
        assert sorted(by_step) == list(range(1, STOP_STEP + 1)), res["rank"]
        for step, s in by_step.items():
            if step in NAN_LOSS_STEPS:
                assert (s["skipped"], s["nonfinite_ranks"]) == (True, (1,)), (res["rank"], s)
            elif step in INF_NORM_STEPS:
                assert (s["skipped"], s["nonfinite_ranks"]) == (True, (-1,)), (res["rank"], s)
            else:
                assert (s["skipped"], s["nonfinite_ranks"]) == (False, ()), (res["rank"], s)
            bad = step in NAN_LOSS_STEPS | INF_NORM_STEPS
            # A skipped step leaves this rank's shards exactly as they were; a good one moves them.
            assert (s["changed"] == []) == bad, (res["rank"], step, s["changed"][:3])
            assert s["finite"], (res["rank"], step)


def test_the_log_names_the_step_the_rank_and_the_count_and_good_steps_reset_it(story):
    _, ranks = story
    out = ranks[0]["stdout"]
    expected = {
        3: ("the loss on rank(s) [1]", 1),
        5: ("the gradient norm", 1),
        6: ("the loss on rank(s) [1]", 2),
        9: ("the loss on rank(s) [1]", 1),
        10: ("the loss on rank(s) [1]", 2),
        11: ("the loss on rank(s) [1]", 3),
    }
    for step, (where, k) in expected.items():
        line = f"step {step}: {where} is NaN/inf: optimizer step skipped ({k} in a row, the run stops at {LIMIT})"
        assert out.count(line) == 1, f"{line!r} not in:\n{out}"
    assert out.count("optimizer step skipped") == len(expected), out
    assert ranks[1]["stdout"].count("optimizer step skipped") == 0  # rank 0 alone logs


def test_limit_in_a_row_stops_every_rank_without_saving(story):
    root, ranks = story
    for res in ranks:
        assert res["step_at_stop"] == STOP_STEP
        assert res["error"] is not None, res["rank"]
        assert res["error"].startswith(f"{LIMIT} optimizer steps in a row (up to step {STOP_STEP}) had a NaN/inf"), res[
            "error"
        ]
        assert f"The last checkpoint, step {STOP_STEP - 1}, is untouched" in res["error"], res["error"]
        # What is in memory when it stops is still the last good step's adapter.
        assert res["final_equals_last_good"], res["rank"]
    # Every step's metrics row is written, the one that stopped the run included.
    rows = [json.loads(line) for line in (root / "run" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STOP_STEP + 1))
    assert [r["step"] for r in rows if r["skipped"]] == sorted(NAN_LOSS_STEPS | INF_NORM_STEPS)
    assert math.isnan(rows[-1]["loss"])
    folder = root / "run" / "checkpoint"
    # A save after every step up to the one before the stop, each complete; nothing started for the stop.
    assert [s for s, _ in list_complete_checkpoints(folder)] == list(range(1, STOP_STEP))
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"step-{s}" for s in range(1, STOP_STEP))
    for s in range(1, STOP_STEP):
        read_checkpoint_meta(folder / f"step-{s}")


def test_checkpoints_after_the_last_good_step_hold_its_weights(story, tmp_path):
    """Saves made on skipped steps (9, 10) carry the adapter and AdamW state of step 8 unchanged, so
    resuming from the latest checkpoint never resumes from a NaN."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, _ = story
    folder = root / "run" / "checkpoint"

    def load(step):
        dcp_to_torch_save(folder / f"step-{step}", tmp_path / f"{step}.pt")
        return torch.load(tmp_path / f"{step}.pt", weights_only=False)

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    good, before = load(LAST_GOOD), load(LAST_GOOD - 1)
    assert not same(good["model"], before["model"])  # step 8 trained
    for step in range(LAST_GOOD + 1, STOP_STEP):
        sd = load(step)
        assert same(sd["model"], good["model"]), step
        # The AdamW moments and step counts; the lr in param_groups moves on (the schedule still advances).
        state = lambda o: {k: v for k, v in o.items() if k.startswith("state.")}
        assert state(sd["optim"]) and same(state(sd["optim"]), state(good["optim"])), step
        assert all(torch.isfinite(v).all() for v in sd["model"].values()), step


def test_max_nonfinite_steps_0_turns_the_check_off(story):
    _, ranks = story
    for res in ranks:
        off = res["off"]
        assert (off["skipped"], off["nonfinite_ranks"]) == (False, ()), off
        # Rank 1's NaN gradients are summed into every rank's shards: all weights get NaN.
        assert len(off["nan_params"]) == off["n_params"] > 0, off


def test_main_returns_3_and_records_it_for_run_train_sh(tmp_path, debug_bf16_ckpt, monkeypatch, capsys):
    import recipe.train
    from recipe import exit_status

    status = tmp_path / "status"
    status.mkdir()
    monkeypatch.setenv(exit_status.ENV, str(status))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # a 1-process run with its own rendezvous
    orig = recipe.train.Trainer._forward_backward

    def nan_at_step_2(self, *args):
        loss_sum = orig(self, *args)
        return loss_sum * float("nan") if self.step + 1 == 2 else loss_sum

    monkeypatch.setattr(recipe.train.Trainer, "_forward_backward", nan_at_step_2)
    argv = _argv(
        debug_bf16_ckpt,
        tmp_path / "run",
        "--training.max_nonfinite_steps=1",
        "--checkpoint.enable",
        "--checkpoint.interval=1",
        "--training.global_batch_size=2",
    )
    assert recipe.train.main(argv) == recipe.train.DIVERGED_EXIT_CODE == 3
    err = capsys.readouterr()
    assert "step 2: the loss on rank(s) [0] is NaN/inf: optimizer step skipped (1 in a row, the run stops at 1)" in (
        err.out
    )
    # Under run_train.sh (its status directory set) no rank prints the message: run_train.sh prints the record.
    assert "TrainingDivergedError" not in err.err
    record = (status / "rank0").read_text()
    assert record.startswith("3\nTrainingDivergedError: 1 optimizer steps in a row (up to step 2)"), record
    assert "The last checkpoint, step 1, is untouched" in record
    assert [s for s, _ in list_complete_checkpoints(tmp_path / "run" / "checkpoint")] == [1]
    assert os.listdir(tmp_path / "run" / "checkpoint") == ["step-1"]
    assert not torch.distributed.is_initialized()  # main tore its group down
