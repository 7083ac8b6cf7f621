"""Profiling, memory report, metrics (MFU) and plots.

The end-to-end test runs ``train_configs/debug_memory_profile.toml`` in-process (a world of one) once
per module and checks every artefact; the rest are unit tests. CUDA-only behaviour (snapshot pickles,
the out-of-memory dump, GPU phase numbers) is tested only where CUDA is available.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from models.llama import LORA_TARGETS
from models.shapes import LlamaShape
from recipe.config import ConfigError, load_config
from recipe.metrics import (
    JSONL_KEYS,
    MetricsLogger,
    model_flops_per_token,
    peak_flops,
    peak_flops_for_name,
    peak_memory_gib,
)
from recipe.profiling import PHASES, MemoryReport, Profiler

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CFG = ROOT / "train_configs" / "debug_memory_profile.toml"
CUDA = torch.cuda.is_available()


class _Tee(io.StringIO):
    """Collects what is printed while still showing it (pytest -s)."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def write(self, s):
        self.other.write(s)
        return super().write(s)


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """One run of the debug memory-profile config: (run dir, captured stdout)."""
    from recipe.train import main

    tmp = tmp_path_factory.mktemp("profile_run")
    dump = tmp / "run_1gpu"
    argv = [
        "--job.config_file",
        str(DEBUG_CFG),
        f"--job.dump_folder={dump}",
        f"--model.checkpoint={tmp / 'ckpt'}",
        "--training.device=cpu",
        # smaller than the config (1 micro-batch of 64 tokens per step) to keep the test fast on busy CPUs
        "--data.seq_len=64",
        "--training.global_batch_size=1",
        "--checkpoint.export_adapter=true",  # so that the end-of-run report names an adapter too
    ]
    out = _Tee(sys.stdout)
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return dump, out.getvalue()


# ---------------------------------------------------------------------------------------- end to end


def test_run_writes_memory_report(debug_run):
    dump, stdout = debug_run
    report = json.loads((dump / "metrics" / "memory_report.json").read_text())
    assert report["phases"] == list(PHASES)
    assert report["world_size"] == 1 and report["device"] == "cpu"
    cfg = load_config(["--job.config_file", str(DEBUG_CFG)])
    assert report["steps_measured"] == list(range(1, cfg.training.steps + 1))
    (rank,) = report["ranks"]
    assert rank["rank"] == 0
    for p in PHASES:
        assert rank["host_rss"][p] > 0, p
        assert rank["gpu"][p] is None, p  # CPU: GPU columns are n/a
    assert rank["host_rss_current"] > 0 and rank["host_rss_peak"] >= rank["host_rss"]["load"]
    # the table is printed at the end of the run
    assert "memory report" in stdout and "forward_peak" in stdout and "n/a" in stdout


def test_run_writes_metrics_jsonl(debug_run):
    dump, _ = debug_run
    cfg = load_config(["--job.config_file", str(DEBUG_CFG)])
    lines = (dump / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg.training.steps
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == list(range(1, cfg.training.steps + 1))
    for r in recs:
        assert set(JSONL_KEYS) <= set(r), set(JSONL_KEYS) - set(r)
        assert r["mfu"] is None  # CPU
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_global"] == r["tokens_per_s"]
        assert r["tflops"] > 0 and r["peak_mem_gib"] > 0 and r["loss"] > 0


def test_run_writes_chrome_trace_and_skips_snapshots(debug_run):
    dump, stdout = debug_run
    cfg = load_config(["--job.config_file", str(DEBUG_CFG)])
    (step,) = cfg.profiling.profile_steps
    trace = json.loads((dump / "profiling" / "traces" / f"rank0_step{step}.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)
    assert (dump / "profiling" / "traces" / f"rank0_step{step}_ops.txt").stat().st_size > 0
    # only the profiled step is traced
    assert len(list((dump / "profiling" / "traces").glob("*.json"))) == 1
    # memory snapshots: skipped on CPU, with one message
    assert cfg.profiling.enable_memory_snapshot
    assert stdout.count("memory snapshots need CUDA; skipped") == 1
    assert not (dump / "profiling" / "memory_snapshot").exists()


def test_plot_renders_pngs(debug_run, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from recipe.plot import main as plot_main

    dump, _ = debug_run
    # A second run to overlay (as if 2 GPUs): the same files with other losses, another dir name.
    other = tmp_path / "run_2gpu"
    shutil.copytree(dump / "metrics", other / "metrics")
    shutil.copy(dump / "config.toml", other / "config.toml")
    recs = [json.loads(x) for x in (other / "metrics" / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics" / "metrics.jsonl").write_text(
        "".join(json.dumps({**r, "loss": r["loss"] + 0.1}) + "\n" for r in recs)
    )
    out = tmp_path / "plots"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert plot_main([str(dump), str(other), "--out", str(out)]) == 0
    written = {Path(p).name for p in buf.getvalue().split()}
    assert {"loss.png", "tokens_per_s.png", "memory.png"} <= written
    assert "mfu.png" not in written  # MFU is null on CPU: no empty chart
    for name in written:
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
        assert len(torch.unique(torch.from_numpy(img.reshape(-1, img.shape[-1])), dim=0)) > 1, name


def test_plot_needs_matplotlib_message(monkeypatch, tmp_path):
    from recipe import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="optional dependency: pip install matplotlib"):
        plot.plot_runs([tmp_path], tmp_path / "out")


def test_plot_rejects_empty_run_dir(tmp_path):
    pytest.importorskip("matplotlib")
    from recipe.plot import plot_runs

    with pytest.raises(SystemExit, match="no metrics.jsonl or memory_report.json"):
        plot_runs([tmp_path], tmp_path / "out")


def test_plot_cli_bad_input_exits_2(tmp_path, capsys):
    from recipe.plot import main

    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "png")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- MFU


TINY = LlamaShape(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def test_flops_formula_by_hand():
    # TINY: L=2, h=8, head_dim=4, kv dim=4, i=16, V=32; s=4, LoRA r=2 on all seven projections.
    # Frozen weights per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up/down 3*8*16 = 576 -> N_blocks = 1152
    # lm_head N_head = 32*8 = 256
    # LoRA per layer: q 2*(8+8)=32, k 2*(8+4)=24, v 24, o 32, gate/up/down 3 * 2*(8+16)=144 -> 256; P_lora = 512
    # attention forward 4*L*s*h = 4*2*4*8 = 256
    # forward   = 2*(1152+256) + 2*512 + 256        = 4096
    # backward  = 2*(1152+256) + 4*512 + 2*256      = 5376
    # recompute (full AC) = 2*1152 + 2*512 + 256 - D + 2*256 (lm_head, chunked CE) = 3520, where
    # D = 2*L*(i*h + r*h) = 576: down_proj's lora_B and then its frozen matmul are not re-run (early stop)
    assert model_flops_per_token(TINY, 4, 2, ac_mode="full") == 4096 + 5376 + 3520
    # keep_outputs o_proj, gate_proj, up_proj: their frozen matmuls not re-run either, in every block
    # (2*L*(8*8 + 2*8*16) = 1280) or every second one (640)
    assert model_flops_per_token(TINY, 4, 2, ac_mode="full", kept=("o_proj", "gate_proj", "up_proj")) == (
        4096 + 5376 + 3520 - 1280
    )
    assert model_flops_per_token(TINY, 4, 2, ac_mode="full", kept=("o_proj", "gate_proj", "up_proj"), keep_every=2) == (
        4096 + 5376 + 3520 - 640
    )
    # no AC: only the lm_head recompute of the chunked cross-entropy
    assert model_flops_per_token(TINY, 4, 2, ac_mode="none") == 4096 + 5376 + 512
    # selective every 2 of 2 layers: block 0 recomputed -> half of the block recompute
    assert (
        model_flops_per_token(TINY, 4, 2, ac_mode="selective", ac_every=2)
        == 4096 + 5376 + 512 + (2304 + 1024 + 256 - 576) / 2
    )
    # PaLM-style (no recompute counted)
    assert model_flops_per_token(TINY, 4, 2, ac_mode="full", recompute=False) == 4096 + 5376
    # LoRA only on q_proj, v_proj: P_lora = 2 * (32 + 24) = 112
    fwd = 2 * 1408 + 2 * 112 + 256
    bwd = 2 * 1408 + 4 * 112 + 512
    assert model_flops_per_token(TINY, 4, 2, ["q_proj", "v_proj"], "none") == fwd + bwd + 512
    # no LoRA at all
    assert model_flops_per_token(TINY, 4, 0, ac_mode="none") == 2 * 1408 + 256 + 2 * 1408 + 512 + 512


@pytest.mark.parametrize("ac", ["full", "none"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), LORA_TARGETS])
def test_flops_formula_matches_torch_flop_counter(ac, targets):
    """The formula against torch's FlopCounterMode on a real forward+backward (4-bit base, LoRA,
    chunked loss, activation checkpointing as the recipe applies it). The counter sees matmuls only
    (SDPA on CPU is not counted), so attention is taken out; the one remaining difference is
    layer 0's q/k/v input gradients, which the formula counts and autograd skips (nothing upstream
    trains): 0.2 % of the total for Llama 3.1 8B."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.llama import LlamaForCausalLM, ModelArgs
    from models.shapes import get_shape
    from parallel.parallelize import apply_activation_checkpointing

    shape, r, s = get_shape("debug").replace(num_key_value_heads=2), 8, 64
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        ModelArgs(
            shape=shape,
            lora_rank=r,
            quant_type="nf4",
            dtype=torch.float32,
            lora_targets=tuple(targets),
            loss_chunk_tokens=64,
        )
    )
    if ac == "full":
        apply_activation_checkpointing(m, "full", 1)
    ids = torch.randint(0, shape.vocab_size, (2, s))
    counter = FlopCounterMode(display=False)
    with counter:
        m(input_ids=ids, labels=ids).loss_sum.backward()
    # Matmuls only: from torch 2.15 the counter also counts SDPA's CPU kernels, which the formula's
    # attention term (taken out below) stands for.
    per_op = counter.get_flop_counts()["Global"]
    measured = sum(n for op, n in per_op.items() if "attention" not in str(op)) / ids.numel()
    L, h = shape.num_hidden_layers, shape.hidden_size
    attention = (16 if ac == "full" else 12) * L * s * h
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    layer0 = 2 * (h * q + 2 * h * kv) + sum(2 * r * h for t in ("q_proj", "k_proj", "v_proj") if t in targets)
    assert model_flops_per_token(shape, s, r, targets, ac) - attention - layer0 == measured


def test_flops_8b_order_of_magnitude():
    from models.shapes import get_shape

    shape = get_shape("llama3_1_8b")
    f = model_flops_per_token(shape, 2048, 64, ac_mode="full")
    n = shape.num_params - shape.vocab_size * shape.hidden_size  # matmul weights (no embedding)
    # full AC: 6N + 8 P_lora + 16 L s h, P_lora ~ 168M for r=64 on all seven
    assert 6 * n < f < 6 * n + 8 * 0.2e9 + 16 * 32 * 2048 * 4096 * 1.01


@pytest.mark.parametrize(
    "name,flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", 65e12),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_table(name, flops):
    assert peak_flops_for_name(name) == flops


def test_peak_flops_cpu_and_override():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == 100e12


def test_metrics_logger_mfu_and_old_api(tmp_path, capsys):
    # the original positional API still works and adds no MFU
    m = MetricsLogger(tmp_path / "a", 2, 0, 1, True)
    rec = {
        "loss": 1.0,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 100.0,
        "step_time_s": 1.0,
        "peak_mem_gib": 1.0,
        "host_rss_gib": 1.0,
        "skipped": False,
        "loss_scale": 1.0,
    }
    m.step(1, rec)
    m.close()
    (line,) = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["mfu"] is None and json.loads(line)["tflops"] is None
    m = MetricsLogger(tmp_path / "b", 2, 0, flops_per_token=1e9, peak_flops=1e12, world_size=4)
    m.step(1, rec)
    m.close()
    r = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    assert r["mfu"] == pytest.approx(0.1) and r["tflops"] == pytest.approx(0.1)
    assert r["tokens_per_s_global"] == 400.0
    assert "mfu 10.0%" in capsys.readouterr().out
    # other ranks write nothing
    MetricsLogger(tmp_path / "c", 2, 1).step(1, rec)
    assert not (tmp_path / "c").exists()


def test_fresh_run_into_a_used_folder_keeps_runs_apart(tmp_path):
    """A run from step 0 moves an earlier run's metrics.jsonl aside (kept); a resumed run appends."""
    from recipe.plot import load_run

    rec = {
        "loss": 5.0,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 100.0,
        "step_time_s": 1.0,
        "peak_mem_gib": 1.0,
        "host_rss_gib": 1.0,
        "skipped": False,
        "loss_scale": 1.0,
    }
    folder = tmp_path / "run" / "metrics"

    def run(first, last, loss, start):
        m = MetricsLogger(folder, last, 0)
        m.begin(start)
        for step in range(first, last + 1):
            m.step(step, {**rec, "loss": loss})
        m.close()

    run(1, 6, 5.0, start=0)  # a 6-step run
    run(1, 3, 1.0, start=0)  # a new, shorter run from scratch in the same folder
    assert [(r["step"], r["loss"]) for r in load_run(tmp_path / "run")["steps"]] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    (old,) = folder.glob("metrics.jsonl.prev-*")
    assert len(old.read_text().splitlines()) == 6  # the earlier run's steps are kept
    run(4, 5, 2.0, start=3)  # resumed after step 3: appended
    assert [r["loss"] for r in load_run(tmp_path / "run")["steps"]] == [1.0, 1.0, 1.0, 2.0, 2.0]


def test_tensorboard_missing_is_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    m = MetricsLogger(tmp_path, 1, 0, enable_tensorboard=True)
    assert m.tb is None
    assert "pip install tensorboard" in capsys.readouterr().out
    m.close()


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    m = MetricsLogger(tmp_path, 1, 0, enable_jsonl=False, enable_tensorboard=True)
    m.step(
        1,
        {
            "loss": 1.0,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 10.0,
            "step_time_s": 1.0,
            "peak_mem_gib": 1.0,
            "host_rss_gib": 1.0,
            "skipped": False,
            "loss_scale": 1.0,
        },
    )
    m.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------- config


def test_profiling_config_fields(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        "[profiling]\nmemory_snapshot_on_oom = false\nmemory_snapshot_max_entries = 5\n[metrics]\npeak_tflops = 500\n"
    )
    cfg = load_config(["--job.config_file", str(p)])
    assert cfg.profiling.memory_snapshot_on_oom is False and cfg.profiling.memory_snapshot_max_entries == 5
    assert cfg.metrics.peak_tflops == 500.0
    d = load_config([])
    assert not d.profiling.enable_memory_snapshot and not d.profiling.enable_profiling
    assert d.profiling.memory_snapshot_on_oom and d.metrics.peak_tflops == 0.0
    with pytest.raises(ConfigError, match="profiling.memory_snapshot_max_entries must be >= 1"):
        load_config(["--profiling.memory_snapshot_max_entries=0"])
    with pytest.raises(ConfigError, match="metrics.peak_tflops must be >= 0"):
        load_config(["--metrics.peak_tflops=-1"])


def test_8b_profile_config():
    cfg = load_config(["--job.config_file", str(ROOT / "train_configs" / "llama3_8b_memory_profile.toml")])
    assert cfg.model.synthetic_shape == "llama3_1_8b" and cfg.model.checkpoint == "./outputs/ckpt/llama3_1_8b_nf4"
    assert (cfg.lora.rank, cfg.lora.alpha, len(cfg.lora.target_modules)) == (64, 128.0, 7)
    assert (cfg.data.seq_len, cfg.training.micro_batch_size, cfg.training.global_batch_size) == (2048, 2, 8)
    assert cfg.activation_checkpoint.mode == "full" and cfg.training.mixed_precision_param == "bfloat16"
    assert cfg.training.steps == 6 and cfg.profiling.memory_snapshot_steps == [3, 4]
    assert cfg.profiling.profile_steps == [5] and cfg.profiling.memory_report
    assert cfg.profiling.enable_memory_snapshot and cfg.profiling.enable_profiling


# ---------------------------------------------------------------------------------------- units


def _tiny_model(device="cpu"):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _steps(prof, model, opt, n, device="cpu", start=1):
    for step in range(start, start + n):
        prof.step_start(step)
        with prof.oom_guard(step):
            for _ in range(2):  # two micro-batches
                model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        prof.step_end(step)


def test_disabled_profiler_costs_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must not be called when profiling is off")

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", boom)
    monkeypatch.setattr(torch.profiler, "profile", boom)
    cfg = load_config(["--profiling.memory_report=false", "--training.steps=3"])
    prof = Profiler(
        cfg.profiling,
        cfg.training.steps,
        0,
        1,
        torch.device("cpu"),
        tmp_path / cfg.profiling.save_folder,
        tmp_path / cfg.metrics.save_folder / "memory_report.json",
    )
    model, opt = _tiny_model()
    prof.after_load()
    prof.start(model, opt)
    assert not model._forward_pre_hooks and not model._forward_hooks and not opt._optimizer_step_pre_hooks
    assert isinstance(prof.oom_guard(1), contextlib.nullcontext)
    _steps(prof, model, opt, 3)
    assert prof.finish() is None
    prof.close()
    assert not list(tmp_path.rglob("*"))


def test_memory_report_cpu_units(tmp_path):
    model, opt = _tiny_model()
    rep = MemoryReport(True, torch.device("cpu"), path=tmp_path / "m.json")
    rep.after_load()
    rep.attach(model, opt)
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    model(torch.randn(2, 64))  # a forward outside a step is not measured
    assert rep.host["forward_peak"] is None
    for step in (1, 2):
        rep.step_start(step)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        rep.step_end(step)
    report = rep.finish()
    assert not model._forward_pre_hooks and not model._forward_hooks  # hooks removed
    assert report["steps_measured"] == [1, 2]
    assert all(report["ranks"][0]["host_rss"][p] > 0 for p in PHASES)
    assert json.loads((tmp_path / "m.json").read_text()) == report


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_snapshots_oom_and_phases(tmp_path):
    cfg = load_config(
        [
            "--profiling.enable_memory_snapshot",
            "--profiling.memory_snapshot_steps=2,3",
            "--profiling.enable_profiling",
            "--profiling.profile_steps=3",
            "--training.steps=4",
        ]
    )
    dev = torch.device("cuda", torch.cuda.current_device())
    prof = Profiler(
        cfg.profiling,
        cfg.training.steps,
        0,
        1,
        dev,
        tmp_path / cfg.profiling.save_folder,
        tmp_path / cfg.metrics.save_folder / "memory_report.json",
    )
    model, opt = _tiny_model(dev)
    prof.after_load()
    prof.start(model, opt)
    assert prof.recording  # on-OOM recording from the first step
    _steps(prof, model, opt, 4, dev)
    snap = tmp_path / "profiling" / "memory_snapshot"
    assert sorted(p.name for p in snap.iterdir()) == ["rank0_step3.pickle"]
    import pickle

    with open(snap / "rank0_step3.pickle", "rb") as f:
        data = pickle.load(f)
    assert data["segments"] and any(t for t in data["device_traces"])
    trace = json.loads((tmp_path / "profiling" / "traces" / "rank0_step3.json").read_text())
    assert trace["traceEvents"]
    # GPU phase numbers
    gpu = prof.memory.gpu
    assert all(gpu[p] is not None and gpu[p] > 0 for p in PHASES), gpu
    assert gpu["backward_peak"] >= gpu["after_load"] and gpu["optimizer_peak"] >= gpu["after_optimizer"]
    assert peak_memory_gib(dev) >= max(gpu[p] for p in PHASES[2:]) - 1e-9  # resets keep the run peak
    # OOM inside the guarded region: the pickle is dumped and the error re-raised
    free, _ = torch.cuda.mem_get_info(dev)
    with pytest.raises(torch.OutOfMemoryError):
        with prof.oom_guard(5):
            torch.empty(free * 4, dtype=torch.uint8, device=dev)
    assert (snap / "rank0_oom.pickle").stat().st_size > 0
    prof.close()
    assert not prof.recording
    report = prof.finish()
    assert report["device"] == "cuda" and report["ranks"][0]["gpu"]["load"] is not None


def test_snapshot_window_past_the_last_step_is_still_dumped(tmp_path, monkeypatch):
    """memory_snapshot_steps = [2, 50] in a 4-step run: recording starts at step 2 and the window is
    dumped at step 4, the last step that runs (it used to wait for step 50 and write nothing).
    The CUDA memory API is stubbed: this checks the window logic, not CUDA."""
    import recipe.profiling as profiling

    calls = []
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda enabled="all", **k: calls.append(("record", enabled))
    )
    monkeypatch.setattr(
        torch.cuda.memory,
        "_dump_snapshot",
        lambda path: (calls.append(("dump", Path(path).name)), Path(path).write_bytes(b"x")),
    )
    monkeypatch.setattr(profiling, "reset_peak_memory", lambda *a, **k: None)
    cfg = load_config(
        [
            "--profiling.memory_report=false",
            "--training.steps=4",
            "--profiling.enable_memory_snapshot",
            "--profiling.memory_snapshot_steps=2,50",
            "--profiling.memory_snapshot_on_oom=false",
        ]
    )
    prof = Profiler(
        cfg.profiling,
        cfg.training.steps,
        0,
        1,
        torch.device("cuda"),
        tmp_path / cfg.profiling.save_folder,
        tmp_path / cfg.metrics.save_folder / "memory_report.json",
    )
    prof.start(torch.nn.Linear(2, 2))
    for step in range(1, 5):
        prof.step_start(step)
        assert prof.recording == (step >= 2), step
        prof.step_end(step)
    prof.close()
    dumps = [c[1] for c in calls if c[0] == "dump"]
    assert len(dumps) == 1 and "step4" in dumps[0], calls
    assert any("step4" in str(p) for p in prof.written)


def test_host_rss_peak_is_never_below_the_current_rss():
    """Linux raises ru_maxrss only when the RSS is about to shrink: after a growth with no unmap since,
    it lagged the current RSS and the memory table printed "RSS now" above "peak"."""
    from recipe.metrics import host_rss_gib

    held = [torch.ones(8_000_000)]  # 32 MB, then freed: the high-water mark is set once
    del held[0]
    for _ in range(4):
        held.append(torch.ones(16_000_000))  # 64 MB more each time, nothing freed in between
        now, peak = host_rss_gib(), host_rss_gib(peak=True)
        assert peak >= now, (now, peak)


def test_the_end_of_a_run_names_where_everything_is(debug_run):
    """The run's last lines list each result with its path; every listed path exists; the PNGs were
    written (matplotlib is installed for the tests); ``metrics.plots = false`` writes and lists none."""
    from recipe.config import load_config
    from recipe.run_report import report_results

    dump, out = debug_run
    block = out[out.index(f"results in {dump}:") :].splitlines()[1:]
    listed = {line.split()[-1] for line in block if line.startswith("  ") and not line.startswith("  (")}
    want = [
        dump / "metrics" / "metrics.jsonl",
        dump / "summary.json",
        dump / "config.toml",
        dump / "adapter",
        dump / "metrics" / "memory_report.json",
    ]
    pngs = sorted((dump / "metrics" / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"loss.png", "tokens_per_s.png", "memory.png"}
    assert listed >= {str(p) for p in want + pngs}, block
    assert all(Path(p).exists() for p in listed) and "(missing)" not in out

    cfg = load_config(["--job.config_file", str(dump / "config.toml"), "--metrics.plots=false"])
    for p in pngs:
        p.unlink()
    rows = report_results(cfg, rank=0)
    assert not any("plot" in what for what, _ in rows) and not list((dump / "metrics" / "plots").glob("*.png"))
