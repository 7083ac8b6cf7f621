"""End-to-end checks of the training entry points: run_train.sh on the default debug job, and the
fp16 loss scaler's skip behaviour."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from recipe.config import load_config
from recipe.optim import lr_lambda
from tests.dist_utils import local_tensor

REPO = Path(__file__).resolve().parents[1]


def test_run_train_sh_trains_debug_model_and_loss_falls(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NGPU="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [
            "./run_train.sh",
            f"--job.dump_folder={tmp_path / 'run'}",
            f"--model.checkpoint={tmp_path / 'ckpt'}",
            "--metrics.log_freq=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines]
    assert len(losses) == 40
    # The debug job must visibly learn: ln(512) = 6.24 at the start, well under 5.5 after 40 steps.
    assert losses[0] > 6.0 and losses[-1] < losses[0] - 0.7, losses
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(step_lines) == 40
    for field in ("loss", "lr", "gnorm", "tok/s", "mem", "eta"):
        assert field in step_lines[-1], step_lines[-1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_run_train_sh_two_processes_on_cpu_use_gloo(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NGPU="2")
    proc = subprocess.run(
        [
            "./run_train.sh",
            f"--job.dump_folder={tmp_path / 'run'}",
            f"--model.checkpoint={tmp_path / 'ckpt'}",
            "--training.steps=3",
            "--checkpoint.export_adapter=false",
            "--metrics.log_freq=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s), backend gloo, device cpu" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("step")]) == 3  # rank 0 logs


def test_run_train_sh_rejects_bad_ngpu_and_config(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NGPU="zero")
    p = subprocess.run(["./run_train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "NGPU must be a positive integer" in p.stderr
    env = dict(os.environ, PYTHON=sys.executable, CONFIG_FILE=str(tmp_path / "nope.toml"))
    p = subprocess.run(["./run_train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "nope.toml" in p.stderr and "does not exist" in p.stderr


def test_run_train_sh_paths_are_the_callers_and_bad_input_exits_2(tmp_path):
    """Called from another directory: a relative CONFIG_FILE is found there; a bad key on 2 ranks
    exits with 2 (torchrun alone would report 1), with the one-line message."""
    import shutil

    shutil.copy(REPO / "train_configs" / "debug_model.toml", tmp_path / "my.toml")
    env = dict(os.environ, PYTHON=sys.executable, NGPU="2", CONFIG_FILE="my.toml")
    p = subprocess.run(
        [str(REPO / "run_train.sh"), "--training.stps=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "unknown config key 'training.stps'" in p.stderr and "Did you mean 'training.steps'" in p.stderr
    last = p.stderr.strip().splitlines()[-1]  # the one message: run_train.sh's, from rank 0's record
    assert last.startswith("run_train.sh: stopped on bad input: ConfigError: unknown config key 'training.stps'"), last


def test_fp16_overflow_skips_steps_without_shifting_the_schedule(tmp_path, debug_nf4_ckpt, capsys):
    from recipe.train import Trainer

    cfg = load_config(
        [
            f"--model.checkpoint={debug_nf4_ckpt}",
            f"--job.dump_folder={tmp_path}",
            "--training.mixed_precision_param=float16",
            "--training.steps=12",
            "--training.global_batch_size=2",
            "--training.micro_batch_size=2",
            "--data.seq_len=32",
            "--data.num_synthetic_samples=16",
            # 2**26 overflows fp16 activation gradients: the first steps must be skipped, halving each time.
            "--training.loss_scale_init=67108864",
            "--lr_scheduler.warmup_steps=2",
            "--checkpoint.export_adapter=false",
            "--profiling.memory_report=false",
        ]
    )
    tr = Trainer(cfg)
    try:
        lora = [p for p in tr.params]
        results, lrs = [], []
        for _step in range(12):
            before = [local_tensor(p.detach()).clone() for p in lora]
            lrs.append(tr.scheduler.get_last_lr()[0])
            r = tr.train_step()
            changed = any(not torch.equal(b, local_tensor(p.detach())) for b, p in zip(before, lora, strict=True))
            results.append((r.skipped, changed, r.loss))
        skipped = [s for s, _, _ in results]
        assert skipped[0] and skipped[1], results  # 2**26 and 2**25 overflow
        assert not skipped[-1], results  # the scale came down far enough to train
        for s, changed, loss in results:
            assert changed != s, results  # a skipped step leaves every LoRA weight untouched
            assert math.isfinite(loss)
        assert tr.scaler.skipped == sum(skipped)
        assert tr.scaler.scale == 2.0**26 / 2 ** sum(skipped)
        # The schedule is a function of the step number: skips do not shift it.
        for step, lr in enumerate(lrs):
            expect = cfg.optimizer.lr * lr_lambda(step, warmup=2, total=12, decay="cosine", min_ratio=0.0)
            assert abs(lr - expect) < 1e-12, (step, lr, expect)
    finally:
        tr.close()


def test_compiled_blocks_match_eager(tmp_path, debug_nf4_ckpt):
    """training.compile compiles every block with inductor (Weight4bit weights, the adapters inside the
    4-bit operator of models/qlora_op.py, checkpoint-free path) and trains to the same losses as eager
    mode (where the adapters' products are separate adds)."""
    from recipe.train import Trainer

    def losses(compile_: bool) -> list[float]:
        cfg = load_config(
            [
                f"--model.checkpoint={debug_nf4_ckpt}",
                f"--job.dump_folder={tmp_path / str(compile_)}",
                "--training.mixed_precision_param=float32",
                "--training.steps=3",
                "--training.global_batch_size=2",
                "--training.micro_batch_size=2",
                "--data.seq_len=32",
                "--data.num_synthetic_samples=16",
                f"--training.compile={str(compile_).lower()}",
                "--lr_scheduler.warmup_steps=0",
                "--optimizer.lr=1e-3",
                "--checkpoint.export_adapter=false",
                "--profiling.memory_report=false",
            ]
        )
        tr = Trainer(cfg)
        try:
            return [tr.train_step().loss for _ in range(3)]
        finally:
            tr.close()

    eager, compiled = losses(False), losses(True)
    assert abs(eager[0] - compiled[0]) < 1e-5, (eager, compiled)  # same forward before any update
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 1e-3, (eager, compiled)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    """Config and checkpoint mistakes end the run with the error's message, no traceback, exit 2."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "recipe.train", "--job.config_file", "train_configs/debug_model.toml"]
    p = subprocess.run(cmd + ["--training.stps=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "training.stps" in p.stderr and "Did you mean 'training.steps'" in p.stderr
    p = subprocess.run(
        cmd + [f"--model.checkpoint={tmp_path / 'none'}", "--model.synthetic_shape="],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "does not exist" in p.stderr and str(tmp_path / "none") in p.stderr


def test_data_mistakes_are_reported_before_the_weights_are_read(tmp_path, debug_nf4_ckpt):
    """The data is built before the model: with a broken weight file *and* a missing data file, the
    run stops on the data (seconds), not on the weights (minutes for an 8B model)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(debug_nf4_ckpt, ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated: unreadable weights
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env["PYTHONPATH"] = str(REPO)
    cmd = [
        sys.executable,
        "-m",
        "recipe.train",
        "--job.config_file",
        "train_configs/debug_model.toml",
        f"--model.checkpoint={ckpt}",
        "--model.synthetic_shape=",
        f"--job.dump_folder={tmp_path / 'run'}",
        "--data.format=text",
        f"--data.path={tmp_path / 'missing.jsonl'}",
        f"--model.tokenizer={tmp_path}",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "DataError" in p.stderr and "CheckpointError" not in p.stderr, p.stderr
    # The weights really are broken: with the synthetic data the same checkpoint fails on them.
    p = subprocess.run(cmd[:-3], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CheckpointError" in p.stderr, p.stderr


def test_synthetic_checkpoint_write_is_redone_or_refused(tmp_path):
    """model.synthetic_shape with a checkpoint directory that has no config.json: an interrupted
    synthetic write (its marker, no config.json) is redone; a directory of other files is refused
    with exit 2 and left as it was."""
    from models.synthetic import MARKER_FILE

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env["PYTHONPATH"] = str(REPO)
    cmd = [
        sys.executable,
        "-m",
        "recipe.train",
        "--job.config_file",
        "train_configs/debug_model.toml",
        "--training.steps=1",
        "--checkpoint.export_adapter=false",
        f"--job.dump_folder={tmp_path / 'run'}",
    ]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / MARKER_FILE).write_text('{"status": "writing"}')
    (interrupted / "model-00001-of-00002.safetensors").write_bytes(b"half a file")
    p = subprocess.run(
        cmd + [f"--model.checkpoint={interrupted}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "redoing an interrupted write" in p.stdout and (interrupted / "config.json").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    p = subprocess.run(
        cmd + [f"--model.checkpoint={foreign}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "ConfigError" in p.stderr and "not a synthetic checkpoint" in p.stderr, p.stderr
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"
