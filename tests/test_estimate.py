"""recipe.estimate: memory by phase against measured GPU peaks and a real model's bytes, the checkpoint
size against a checkpoint the recipe wrote, the CLI, the fit search, and the entry point's warning."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe import estimate as E
from recipe.config import ConfigError, load_config
from recipe.estimate import __main__ as CLI

REPO = Path(__file__).resolve().parents[1]
CFG_8B = str(REPO / "train_configs/llama3_8b_qlora.toml")
CFG_70B = str(REPO / "train_configs/llama3_70b_qlora_2gpu.toml")
CFG_DEBUG = str(REPO / "train_configs/debug_model.toml")


def _cfg(path: str, *overrides: str, checkpoint: str = "/nonexistent/estimate"):
    return load_config(["--job.config_file", path, f"--model.checkpoint={checkpoint}", *overrides])


@pytest.mark.parametrize("row", E.CALIBRATION, ids=[f"{r.what} {r.card} {r.ngpu}" for r in E.CALIBRATION])
def test_within_10_percent_of_measured_gpu_peaks(row):
    # The oracle: peaks measured on H100 / H200 (shared/REFERENCE.md sections 0 and 0b, BENCHMARKS.md),
    # fitted rows and the others alike (long context, compile, the T4 job's fp16 runs).
    cfg = _cfg(str(REPO / "train_configs" / row.config), *(f"--{k}={v}" for k, v in row.job_overrides.items()))
    g = E.gpu_phases(E.measured_job(row, cfg))
    train = max(g[p] for p in E.PHASES[2:])
    assert abs(train - row.train) <= 0.1 * row.train, (train, row.train)
    if row.load is not None:
        assert abs(g["load"] - row.load) <= 0.05  # the shards, counted byte by byte


def test_long_context_grows_as_measured():
    # 8B at 32,768 and 65,536 tokens (H100, REFERENCE.md 0): 13.23 -> 18.14 GiB, 4.91 GiB per 32k tokens;
    # none of the fitted rows has more than 4,096 tokens per micro-batch.
    rows = [r for r in E.CALIBRATION if r.what.startswith("8B, long context")]
    peaks = []
    for r in rows:
        cfg = _cfg(CFG_8B, *(f"--{k}={v}" for k, v in r.job_overrides.items()))
        peaks.append(max(E.gpu_phases(E.measured_job(r, cfg)).values()))
    assert abs((peaks[1] - peaks[0]) - (rows[1].train - rows[0].train)) < 0.1 * (rows[1].train - rows[0].train)


def test_calibration_table_lists_every_row():
    table = E.calibration_table()
    assert len(table.splitlines()) == 2 + len(E.CALIBRATION)
    assert "13.23" in table and "18.14" in table and "4,867" in table


def test_load_bytes_equal_a_materialized_model(debug_nf4_ckpt):
    # Every tensor of the real model (4-bit codes, scales, code books, norms, embeddings, fp32 LoRA).
    from tests.conftest import build_recipe_model

    model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", dtype=torch.float32, lora_rank=16)
    real = 0
    for p in model.parameters():
        inner = [p.packed, p.absmax, p.code] if hasattr(p, "packed") else [p]
        real += sum(t.numel() * t.element_size() for t in inner)
    # The embedding table and lm_head on the GPU too: one CUDA rank would keep them on the host ('auto').
    cfg = _cfg(
        CFG_DEBUG,
        "--parallelism.host_embedding=false",
        "--parallelism.host_lm_head=false",
        checkpoint=str(debug_nf4_ckpt),
    )
    assert E._static_bytes(E._job(cfg, 1)) == real


def test_checkpoint_size_equals_a_saved_checkpoint(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tests.conftest import run_train_env

    args = [f"--job.dump_folder={tmp_path / 'run'}", f"--model.checkpoint={tmp_path / 'ckpt'}", "--training.steps=1"]
    args += ["--checkpoint.enable", "--checkpoint.interval=1", "--checkpoint.export_adapter=false"]
    proc = subprocess.run(
        ["./run_train.sh", *args], cwd=REPO, env=run_train_env(2), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    step = tmp_path / "run" / "checkpoint" / "step-1"
    meta = FileSystemReader(str(step)).read_metadata()
    tensor_bytes = sum(
        math.prod(c.sizes) * m.properties.dtype.itemsize
        for m in meta.state_dict_metadata.values()
        if isinstance(m, TensorStorageMetadata)
        for c in m.chunks
    )
    data_bytes = sum(f.stat().st_size for f in step.glob("*.distcp"))
    e = E.estimate(load_config(["--job.config_file", CFG_DEBUG, *args]), 2)
    assert e.checkpoint_tensor_bytes == tensor_bytes
    # Exact but for the trainer entry's JSON text (scheduler, scaler and loader state).
    assert abs(e.checkpoint_data_bytes - data_bytes) <= 512, (e.checkpoint_data_bytes, data_bytes)


def test_cli_prints_phases_speed_and_fit():
    cmd = [sys.executable, "-m", "recipe.estimate", "--job.config_file", CFG_8B, "--ngpu", "2", "--card", "H200"]
    cmd += ["--fit-gpu-gib=24", "--model.checkpoint=/nonexistent/estimate", "--data.seq_len=4096"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for phase in ("load=", "forward_peak=", "backward_peak=", "optimizer_peak=", "after_optimizer="):
        assert phase in out
    assert "tokens/s per GPU on h200" in out and "at seq_len 4096" in out


def test_help_lists_the_estimators_own_options(capsys):
    assert CLI.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--ngpu", "--card", "--fit-gpu-gib", "--plan", "--host-gib", "--calibration"):
        assert opt in out
    assert "[training]" not in out  # not the training help


def _hub_cache(tmp_path, repo: str, config: dict) -> Path:
    # The hub cache layout huggingface_hub reads: refs/main -> commit, snapshots/<commit>/config.json.
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    return tmp_path / "hub"


def test_hub_id_from_the_cache(tmp_path, monkeypatch):
    from models.shapes import shape_to_hf_config

    repo = "someone/tiny-llama-bnb-4bit"
    hf = shape_to_hf_config("llama3_2_1b") | {"quantization_config": {"load_in_4bit": True}}
    cache = _hub_cache(tmp_path, repo, hf)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    E._hub_config.cache_clear()
    e = E.estimate(_cfg(CFG_8B, "--model.synthetic_shape=", checkpoint=repo), 1)
    assert e.shape.hidden_size == 2048 and e.shape.num_hidden_layers == 16


def test_hub_id_not_cached_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    E._hub_config.cache_clear()
    args = ["--job.config_file", CFG_8B, "--model.synthetic_shape=", "--model.checkpoint=someone/not-cached"]
    assert CLI.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "someone/not-cached" in err
    assert "hf download someone/not-cached config.json" in err and "--model.synthetic_shape" in err
    # a repo the configs name has a known shape: the T4 job's command works offline
    E._hub_config.cache_clear()
    t4 = ["--job.config_file", str(REPO / "train_configs/llama3_8b_qlora_t4.toml"), "--ngpu", "2", "--card", "t4"]
    assert CLI.main(t4) == 0
    assert "tokens/s per GPU on t4" in capsys.readouterr().out


def test_hub_unreachable_is_the_same_message(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(E, "_reachable", lambda: False)
    E._hub_config.cache_clear()
    args = ["--job.config_file", CFG_8B, "--model.synthetic_shape=", "--model.checkpoint=someone/not-cached"]
    assert CLI.main(args) == 2
    assert "cannot be reached" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--ngpu", "0"], "--ngpu must be >= 1"),
        (["--card", "v100"], "unknown card 'v100'"),
        (["--ngpu", "3", "--parallelism.data_parallel_replicate_degree=2"], "replicate 2 x shard"),
        (["--model.synthetic_shape="], "model.synthetic_shape is empty"),
        (["--training.micro_batch_sise=2"], "training.micro_batch_size"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_fix(extra, needle, capsys):
    assert CLI.main(["--job.config_file", CFG_8B, "--model.checkpoint=/nonexistent/estimate", *extra]) == 2
    assert needle in capsys.readouterr().err


def test_fit_is_the_largest_value_under_the_cap():
    cfg = _cfg(CFG_8B)
    f = E.fit(cfg, 2, 24.0)
    cfg.training.global_batch_size = -1
    for key, section in (("micro_batch_size", cfg.training), ("seq_len", cfg.data)):
        old = getattr(section, key)
        setattr(section, key, f[key])
        assert E._peak(cfg, 2) <= 24.0
        setattr(section, key, f[key] + 1)
        assert E._peak(cfg, 2) > 24.0
        setattr(section, key, old)
    assert cfg.training.micro_batch_size == 2 and cfg.data.seq_len == 2048  # the search restores the config


def test_peaks_grow_with_tokens_and_shrink_with_ranks():
    base = E.estimate(_cfg(CFG_8B), 2)
    assert E.estimate(_cfg(CFG_8B, "--data.seq_len=8192"), 2).train_peak > base.train_peak
    assert E.estimate(_cfg(CFG_8B, "--activation_checkpoint.mode=none"), 2).train_peak > base.train_peak + 10
    assert E.estimate(_cfg(CFG_8B), 4).train_peak < base.train_peak


def test_memory_options_lower_the_estimate():
    """Each of the memory options takes off what it should: the host embedding the table (8B: 0.98 GiB
    of bf16) at load, activation offload most of the saved block inputs (in backward), MLP chunks the MLP's
    (tokens x intermediate) working set at long sequences."""
    none = [
        "--parallelism.host_embedding=false",
        "--activation_checkpoint.offload=false",
        "--parallelism.host_lm_head=false",
    ]
    base = E.estimate(_cfg(CFG_8B, *none), 1)
    host = E.estimate(_cfg(CFG_8B, *none, "--parallelism.host_embedding=true"), 1)
    assert abs(base.load_peak - host.load_peak - 128256 * 4096 * 2 / 2**30) < 0.01
    off = E.estimate(_cfg(CFG_8B, *none, "--activation_checkpoint.offload=true"), 1)
    auto = E.estimate(_cfg(CFG_8B), 1)  # one CUDA rank: all three on ('auto')
    table = 128256 * 4096 * 2 / 2**30
    assert abs(host.load_peak - auto.load_peak - table) < 0.01 and auto.train_peak < min(
        host.train_peak, off.train_peak
    )
    assert off.gpu["backward_peak"] < base.gpu["backward_peak"] - 0.5 and off.host > base.host + 0.9
    # lm_head on the host: off the device at load and at the blocks' backward; its copy in the forward.
    head = E.estimate(_cfg(CFG_8B, *none, "--parallelism.host_lm_head=true"), 1)
    assert abs(base.load_peak - head.load_peak - table) < 0.01 and abs(head.host - base.host - 0.24 * table) < 0.01
    assert head.gpu["forward_peak"] == pytest.approx(base.gpu["forward_peak"], abs=1e-6)
    assert head.gpu["backward_peak"] < base.gpu["backward_peak"]
    long = ["--data.seq_len=65536", "--training.micro_batch_size=1", "--training.global_batch_size=1"]
    j_chunked = E._job(_cfg(CFG_8B, *long, "--model.mlp_chunk_tokens=4096"), 1)
    j_whole = E._job(_cfg(CFG_8B, *long), 1)
    mlp = lambda j: E._block_saved_bytes(j, j.seq) + E._block_work_bytes(j, j.seq, True)  # noqa: E731
    assert mlp(j_chunked) < mlp(j_whole) - 3 * 2**30  # the MLP's moment of a block's backward
    assert E._peak(_cfg(CFG_8B, *long, "--model.mlp_chunk_tokens=4096"), 1) <= E._peak(_cfg(CFG_8B, *long), 1)


def test_70b_config_parses_and_fits_two_24_gib_cards():
    cfg = load_config(["--job.config_file", CFG_70B])
    assert (cfg.model.synthetic_shape, cfg.data.seq_len, cfg.training.micro_batch_size) == ("llama3_1_70b", 2048, 1)
    assert cfg.parallelism.cpu_offload and cfg.activation_checkpoint.mode == "full"
    e = E.estimate(_cfg(CFG_70B), 2, card="l4")
    assert e.shape.hidden_size == 8192 and e.shape.num_hidden_layers == 80
    assert e.load_peak == 0.0 and e.train_peak < 24
    # no rank holds the whole model in host memory either: 4-bit 70B is about 37 GiB
    assert e.host < 37 + 10
    without = E.estimate(_cfg(CFG_70B, "--parallelism.cpu_offload=false"), 2)
    assert without.train_peak > 24


def _fake_cuda(monkeypatch, gib: float):
    props = type("P", (), {"total_memory": int(gib * 2**30)})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: props)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0, raising=False)


def test_entry_point_warns_when_the_prediction_exceeds_the_device(monkeypatch):
    from recipe.train import memory_warning

    cfg = _cfg(CFG_8B)
    peak = E.estimate(cfg, 1).train_peak
    _fake_cuda(monkeypatch, 7.0)
    msg = memory_warning(cfg, 1, torch.device("cuda", 0))
    assert msg is not None and f"{peak:.2f} GiB" in msg and "7.00 GiB" in msg and "micro_batch_size" in msg
    _fake_cuda(monkeypatch, 80.0)
    assert memory_warning(cfg, 1, torch.device("cuda", 0)) is None
    assert memory_warning(cfg, 1, torch.device("cpu")) is None  # CPU: skipped


def test_bad_shape_is_a_config_error():
    with pytest.raises(ConfigError, match="synthetic_shape"):
        E.job_shape(_cfg(CFG_8B, "--model.synthetic_shape="))


def test_reads_config_json_not_weights(tmp_path):
    from models.shapes import shape_to_hf_config

    hf = shape_to_hf_config("llama3_2_1b") | {"quantization_config": {"load_in_4bit": True}}
    (tmp_path / "config.json").write_text(json.dumps(hf))  # no safetensors at all
    e = E.estimate(_cfg(CFG_8B, "--model.synthetic_shape=", checkpoint=str(tmp_path)), 1)
    assert e.shape.hidden_size == 2048 and e.shape.tie_word_embeddings


@pytest.mark.parametrize("epilogue", [True, False], ids=["epilogue", "adds_apart"])
def test_compiled_block_saves_what_is_counted(debug_nf4_ckpt, epilogue):
    """``_block_saved_bytes(compiled=True)`` against what a compiled, not checkpointed debug-shape block
    (bf16, LoRA on the seven projections, adapters in bf16 as on one rank) hands autograd to save: AOTAutograd
    with inductor's decompositions and min-cut partition (inductor's own saved set, measured on CPU: 7,688
    against this 7,620 bytes per token), without inductor's code generation. The block's input, the
    parameters and the 4-bit weights' bytes are not activations. With the adapters' products added apart
    (no epilogue) 4.6 % more is saved here (7,800 bytes per token), the adapters' rank-r products among
    it (r = 8 on a 256-wide model; for the 8B workload at r = 64 they are 0.7 %): not counted. The count
    before this (norms' fp32 inputs, two MLP tensors) gave 9,216 here."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.decomposition import select_decomp_table

    from tests.conftest import build_recipe_model

    model = build_recipe_model(
        debug_nf4_ckpt, quant_type="nf4", lora_rank=8, dtype=torch.bfloat16, lora_epilogue=epilogue
    ).train()
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.bfloat16  # as parallel/parallelize.py sets it for one rank without FSDP
    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    backend = aot_autograd(
        fw_compiler=nop,
        bw_compiler=nop,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    block = model.model.blocks()[1]
    block.compile(backend=backend)
    t = 512
    h = torch.randn(1, t, model.args.shape.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.model.rotary_emb(torch.arange(t)[None], h.dtype)
    skip = {id(x) for x in [*model.parameters(), *model.buffers(), h, cos, sin]}
    saved: dict[int, int] = {}

    def pack(x):
        if id(x) not in skip and x.dtype != torch.uint8 and x.numel() >= t:  # not the packed 4-bit bytes
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(h, cos, sin, None).sum().backward()
    cfg = _cfg(CFG_DEBUG, "--training.mixed_precision_param=bfloat16", f"--data.seq_len={t}")
    counted = E._block_saved_bytes(E._job(cfg, 1), t, compiled=True, gqa=False)  # CPU: k/v expanded
    assert sum(saved.values()) == pytest.approx(counted, rel=0.05)
