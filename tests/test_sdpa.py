"""The SDPA kernel choice (``models.sdpa``, ``training.attention_backend``) and the compute-dtype check:
the capability table, CPU's real dispatcher as an oracle for what a CPU has, the kernels every SDPA
call of a training step (forward and checkpointed recompute) runs under, and the exit code 2 of a
kernel the device lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.sdpa import _KERNELS, DeviceSupportError, check_compute_dtype, choose_sdpa_backends
from tests.dist_utils import spawn

REPO = Path(__file__).resolve().parents[1]
T4, A100, H200 = (7, 5), (8, 0), (9, 0)
E, M = SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH


def test_auto_follows_the_capability():
    # A T4: memory-efficient and math, never flash or cuDNN.
    t4 = choose_sdpa_backends("auto", T4, torch.float16)
    assert t4.backends == (E, M)
    assert "FlashAttention" in t4.describe() and "7.5" in t4.describe()
    # Ampere and later: torch's own choice, as without this module.
    assert choose_sdpa_backends("auto", A100, torch.bfloat16).backends is None
    assert choose_sdpa_backends("auto", H200, torch.float16).backends is None
    # fp32 has no flash / cuDNN kernel on any card.
    assert choose_sdpa_backends("auto", H200, torch.float32).backends == (E, M)
    assert choose_sdpa_backends("auto", (6, 0), torch.float16).backends == (E, M)
    assert choose_sdpa_backends("auto", (3, 7), torch.float32).backends == (M,)
    assert choose_sdpa_backends("auto", T4, torch.float16, deterministic=True).backends == (M,)
    assert choose_sdpa_backends("auto", None, torch.float32).backends is None  # CPU: torch's choice
    assert choose_sdpa_backends("auto", None, torch.float32, deterministic=True).backends is None


def test_forced_backends_and_their_errors():
    # The T4 emulation on a newer GPU.
    assert choose_sdpa_backends("efficient", H200, torch.float16).backends == (E,)
    assert choose_sdpa_backends("math", T4, torch.float16).backends == (M,)
    assert choose_sdpa_backends("flash", None, torch.float32).backends == (SDPBackend.FLASH_ATTENTION,)
    with pytest.raises(DeviceSupportError, match=r"FlashAttention \('flash'\) needs compute capability 8.0\+.*7.5.*"):
        choose_sdpa_backends("flash", T4, torch.float16)
    with pytest.raises(DeviceSupportError, match="'efficient'"):  # named as the way out on a T4
        choose_sdpa_backends("cudnn", T4, torch.float16)
    with pytest.raises(DeviceSupportError, match="no float32 kernel"):
        choose_sdpa_backends("flash", H200, torch.float32)
    with pytest.raises(DeviceSupportError, match="CUDA kernel"):
        choose_sdpa_backends("efficient", None, torch.float32)
    with pytest.raises(DeviceSupportError, match="deterministic"):
        choose_sdpa_backends("efficient", H200, torch.float16, deterministic=True)
    with pytest.raises(DeviceSupportError, match="unknown SDPA backend"):
        choose_sdpa_backends("xformers", H200, torch.float16)


def test_compute_dtype_check():
    with pytest.raises(DeviceSupportError, match=r"bfloat16 needs compute capability 8.0\+.*Tesla T4.*7.5.*float16"):
        check_compute_dtype(torch.bfloat16, T4, "Tesla T4")
    check_compute_dtype(torch.float16, T4)
    check_compute_dtype(torch.bfloat16, A100)
    check_compute_dtype(torch.bfloat16, None)  # CPU
    with pytest.raises(DeviceSupportError, match="float32"):
        check_compute_dtype(torch.float16, (5, 2))


@pytest.mark.parametrize("name", sorted(_KERNELS))
def test_cpu_kernels_match_torchs_dispatcher(name):
    """The table's CPU column against torch itself: a kernel runs on CPU exactly when the table says so."""
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    try:
        with sdpa_kernel([_KERNELS[name].backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        runs = True
    except RuntimeError as e:
        assert "No available kernel" in str(e) or "No viable backend" in str(e)
        runs = False
    assert runs == _KERNELS[name].on_cpu
    if runs:
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)


def _spy_run(rank, world, out, backend):
    """Two training steps with full activation checkpointing; record the kernels each SDPA call may use."""
    import recipe.train as train_mod
    from recipe.config import load_config

    calls, real = [], F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append({"math": torch.backends.cuda.math_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled()})
        return real(*a, **kw)

    F.scaled_dot_product_attention = spy  # models/llama.py calls it through torch.nn.functional
    cfg = load_config(
        [
            f"--job.config_file={REPO / 'train_configs/debug_model.toml'}",
            f"--job.dump_folder={out}/run",
            f"--model.checkpoint={out}/ckpt",
            "--training.steps=2",
            "--training.global_batch_size=4",
            "--training.micro_batch_size=4",
            "--data.seq_len=32",
            "--activation_checkpoint.mode=full",
            "--checkpoint.export_adapter=false",
            f"--training.attention_backend={backend}",
        ]
    )
    t = train_mod.Trainer(cfg)
    losses = t.train()
    t.close()
    Path(out, f"{backend}.json").write_text(json.dumps({"calls": calls, "losses": losses}))


def test_every_sdpa_call_of_a_step_runs_under_the_choice(tmp_path):
    for backend in ("math", "auto"):
        spawn(_spy_run, 1, str(tmp_path), backend, err_dir=tmp_path / "err")
    forced = json.loads((tmp_path / "math.json").read_text())
    auto = json.loads((tmp_path / "auto.json").read_text())
    # 4 blocks x 2 steps, each in forward and again in the recompute of backward.
    assert len(forced["calls"]) == len(auto["calls"]) == 4 * 2 * 2
    assert all(c == {"math": True, "flash": False} for c in forced["calls"])
    assert all(c == {"math": True, "flash": True} for c in auto["calls"])
    # The math kernel trains like torch's own choice (CPU flash) to fp32 rounding.
    assert forced["losses"] == pytest.approx(auto["losses"], abs=1e-4)


def test_a_kernel_the_device_lacks_exits_2_before_loading(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NGPU="1")
    p = subprocess.run(
        [
            "./run_train.sh",
            f"--job.dump_folder={tmp_path / 'run'}",
            f"--model.checkpoint={tmp_path / 'ckpt'}",
            "--training.attention_backend=efficient",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "training.attention_backend = 'efficient' on the CPU" in p.stderr and "'math'" in p.stderr
    assert not (tmp_path / "ckpt").exists()  # stopped before the synthetic checkpoint was written
