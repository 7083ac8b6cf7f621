"""FSDP2 + 4-bit weights on CPU (gloo), 1 vs 2 vs 3 ranks, on the synthetic debug model (nf4,
double quant).

Three spawns in all (1, 2 and 3 ranks), each running every training configuration in sequence on
one process group (tests/dist_utils.run_jobs); the tests below only compare the saved results:

1. losses and LoRA gradients (step k's, after k-1 updates) of the N-rank run == the 1-process run on
   the same global batch: fp32 (1e-5), bf16 mixed precision (1e-3), activation checkpointing full and
   selective, CPU offload, reshard_after_forward=false, with and without gradient accumulation;
2. every rank's 4-bit shard is exactly its rows of the checkpoint (zero padding rows; 3 ranks pad);
3. a gathered weight dequantizes bit-exactly like bitsandbytes' dequantize_4bit of the checkpoint;
4. the all-gather inputs are packed uint8 codes + fp32 block scales (0.5 + 4/blocksize bytes/weight);
5. the loss is normalised by the global target-token count (ranks with unequal target counts);
6. impossible layouts stop with a clear message before anything is loaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.dist_utils import gather_shards, run_jobs, spawn

STEPS = 4
WORLDS = (2, 3)
GBS = 6

# name -> (extra overrides, tolerance). Micro batch 1 (global batch 6: 3 and 2 accumulation steps on
# 2 and 3 ranks), except no_accum.
VARIANTS = {
    "fp32": ([], 1e-5),
    "bf16": (["--training.mixed_precision_param=bfloat16"], 1e-3),
    "ac_full": (["--activation_checkpoint.mode=full"], 1e-5),
    "ac_selective": (["--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_every=2"], 1e-5),
    # Checkpointed blocks' inputs kept on the host between forward and backward.
    "ac_offload": (["--activation_checkpoint.mode=full", "--activation_checkpoint.offload=true"], 1e-5),
    # The frozen embedding table in host memory, outside FSDP: every rank looks up its own batch.
    "host_embedding": (["--parallelism.host_embedding=true"], 1e-5),
    # lm_head's matrix in host memory, outside FSDP's root group: copied to the device per forward.
    "host_lm_head": (["--parallelism.host_lm_head=true"], 1e-5),
    "cpu_offload": (["--parallelism.cpu_offload=true"], 1e-5),
    "no_reshard": (["--parallelism.reshard_after_forward=false"], 1e-5),
    # JSONL instructions, packing off: unequal target tokens per rank. lr 5e-3: at 1e-2 this data
    # overshoots at step 3 (the loss jumps back up) and the run is ill-conditioned: the 1-process run
    # with micro batch 2 instead of 1 (the same sums in another order) already differs from itself by
    # 1.7e-5 in the step-3 loss and 3e-5 in the step-3 gradients. At 5e-3 it differs by < 4e-7.
    "padded_data": (["--optimizer.lr=5e-3"], 1e-5),
    "no_accum": ([], 1e-5),  # micro batch = global / ranks: one micro-batch per rank and step
    # The embedding table stays vocabulary-sharded (no all-gather); lookups are exact sums.
    "vocab_parallel": (
        ["--parallelism.vocab_parallel_embedding=true", "--training.mixed_precision_param=bfloat16"],
        1e-3,
    ),
    # fp16 parameters (GPUs without bf16, e.g. T4) with the sharded loss scaler (scaled backward,
    # per-shard unscale, all-reduced overflow flag).
    "fp16": (["--training.mixed_precision_param=float16", "--training.loss_scale_init=1024"], 1e-3),
    # Llama 3.2 style tied embeddings: embed_tokens and lm_head are one tensor in the root group.
    "tied": ([], 1e-5),
    # fp64 accumulation, reduced once per step: exact sums, hence bit-identical gradients (below).
    "bf16_exact": (["--training.mixed_precision_param=bfloat16", "--training.mixed_precision_reduce=float64"], 1e-3),
    # q/k/v and gate/up as one 4-bit matrix each: 3 ranks' shards straddle the parts (512 and 1280 rows).
    "fused": (["--model.fuse_projections=true"], 1e-5),
}
# Compiled blocks on 2 ranks, through aot_eager (the graphs inductor would get, traced in seconds), whose
# 4-bit projections run as one operator with their adapters inside (model.lora_epilogue), on FSDP shards:
# one job (compiling costs more than the other variants' runs), against the eager 1-process run.
COMPILED = ["--training.compile=true", "--activation_checkpoint.mode=full"]


# One-rank variants also run with --parallelism.single_rank_fsdp=true (test_one_rank_without_fsdp_is_fsdp_bit_for_bit).
SINGLE_RANK_FSDP = ("bf16", "fp16", "ac_offload", "fused")


def _micro(variant: str, world: int) -> int:
    return GBS // world if variant == "no_accum" else 1


def _ref_name(variant: str, world: int) -> str:
    # The 1-process reference uses the same micro-batch size (hence the same per-forward shapes).
    return f"no_accum_m{_micro(variant, world)}" if variant == "no_accum" else variant


def _overrides(env, variant: str, micro: int, gbs: int = GBS) -> list[str]:
    extra, _ = VARIANTS[variant]
    o = [
        f"--model.checkpoint={env['tied_ckpt'] if variant == 'tied' else env['ckpt']}",
        "--model.synthetic_shape=debug",
        "--training.mixed_precision_param=float32",
        f"--training.steps={STEPS}",
        f"--training.global_batch_size={gbs}",
        f"--training.micro_batch_size={micro}",
        "--optimizer.lr=1e-2",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
        "--metrics.enable_jsonl=false",
        "--metrics.log_freq=100",
    ]
    if variant == "padded_data":
        o += [f"--data.path={env['jsonl']}", "--data.packing=false", "--data.seq_len=64"]
    else:
        o += ["--data.seq_len=32", "--data.num_synthetic_samples=32"]
    return o + list(extra)


def _bad_gbs(world: int) -> int:
    return 6 if world == 2 else 8  # not multiples of micro batch 2 x ranks (4 or 6)


def _jobs(env, world: int) -> list[dict]:
    if world == 1:
        jobs = [
            {"name": v, "overrides": _overrides(env, v, 1), "checks": v == "fp32"} for v in VARIANTS if v != "no_accum"
        ]
        for w in WORLDS:
            m = GBS // w
            jobs.append({"name": f"no_accum_m{m}", "overrides": _overrides(env, "no_accum", m)})
        # The same one-rank jobs wrapped in FSDP anyway (parallelism.single_rank_fsdp): the default
        # one-rank path runs without FSDP and must give exactly these numbers.
        for v in SINGLE_RANK_FSDP:
            jobs.append(
                {"name": f"{v}_fsdp1", "overrides": _overrides(env, v, 1) + ["--parallelism.single_rank_fsdp=true"]}
            )
        return jobs
    jobs = [{"name": v, "overrides": _overrides(env, v, _micro(v, world)), "checks": v == "fp32"} for v in VARIANTS]
    if world == 2:
        jobs.append(
            {"name": "compiled", "overrides": _overrides(env, "ac_full", 1) + COMPILED, "compile_backend": "aot_eager"}
        )
        # An unfused checkpoint of step 2 resumed with fused projections to step 4; both the resumed
        # run and the uninterrupted unfused run (fp32) export their adapters.
        jobs[0]["export"] = True
        ckpt = ["--checkpoint.enable=true", "--checkpoint.export_adapter=false"]
        dump = str(env["root"] / "fused_resume")
        jobs.append(
            {
                "name": "unfused_saved",
                "dump": dump,
                "save": True,
                "overrides": _overrides(env, "fp32", 1) + ckpt + ["--training.steps=2"],
            }
        )
        jobs.append(
            {"name": "fused_resumed", "dump": dump, "export": True, "overrides": _overrides(env, "fused", 1) + ckpt}
        )
    # A global batch that is not a multiple of micro batch 2 x ranks: refused, in the already running
    # process group, before the checkpoint is written or read (it does not exist).
    bad = _overrides(env, "fp32", 2, gbs=_bad_gbs(world))
    bad = [o for o in bad if not o.startswith("--model.checkpoint=")] + [f"--model.checkpoint={env['missing_ckpt']}"]
    jobs.append({"name": "bad_batch", "overrides": bad, "expect_exit": True})
    return jobs


# -------------------------------------------------------------------------------------- fixtures


def _write_jsonl(path: Path, n: int = 24) -> None:
    """Instruction records with very different prompt and response lengths (prompts are masked),
    so the ranks of a step hold different numbers of target tokens."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            response = " ".join(rng.choice(words) for _ in range(1 + (i * 7) % 6))
            f.write(json.dumps({"instruction": prompt, "output": response}) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory, debug_nf4_ckpt, debug_tied_nf4_ckpt):
    """The conftest's debug nf4 double-quant checkpoints (several safetensors shards; untied and tied)
    + a JSONL file."""
    root = tmp_path_factory.mktemp("fsdp")
    ckpt = debug_nf4_ckpt
    jsonl = root / "instr.jsonl"
    _write_jsonl(jsonl)
    return {
        "root": root,
        "ckpt": str(ckpt),
        "tied_ckpt": str(debug_tied_nf4_ckpt),
        "jsonl": str(jsonl),
        "missing_ckpt": str(root / "never_written"),
    }


_RESULTS: dict[int, Path | BaseException] = {}


@pytest.fixture(scope="module")
def results(env):
    """results(world) -> folder with that world's saved runs (each world spawned once, lazily; a
    failed spawn is not retried: every test that needs it reports the same error)."""

    def get(world: int) -> Path:
        if world not in _RESULTS:
            out = env["root"] / f"w{world}"
            out.mkdir()
            try:
                spawn(run_jobs, world, _jobs(env, world), str(out), err_dir=out / "errors", timeout=240)
                _RESULTS[world] = out
            except Exception as e:
                _RESULTS[world] = e
        r = _RESULTS[world]
        if isinstance(r, BaseException):
            raise r
        return r

    yield get
    _RESULTS.clear()


def _load(results, world: int, name: str, rank: int | None = None) -> dict:
    suffix = "" if rank is None else f"_rank{rank}"
    return torch.load(results(world) / f"{name}_w{world}{suffix}.pt", weights_only=False)


def _load_run(results, world: int, name: str) -> dict:
    """Rank 0's losses plus the full gradients of every step, concatenated from the ranks' rows."""
    run = _load(results, world, name)
    ranks = [_load(results, world, name, r)["grads"] for r in range(world)]
    run["grads"] = [gather_shards([r[step] for r in ranks]) for step in range(len(ranks[0]))]
    return run


# ------------------------------------------------------------------------------ 1. equivalence


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_single_process(results, variant, world):
    _, tol = VARIANTS[variant]
    ref = _load_run(results, 1, _ref_name(variant, world))
    got = _load_run(results, world, variant)
    if variant == "no_accum":
        assert got["accum"] == 1
    else:
        assert got["accum"] == GBS // world > 1  # gradient accumulation on N ranks
    assert len(ref["losses"]) == len(got["losses"]) == STEPS
    assert len(ref["grads"]) == len(got["grads"]) == STEPS

    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"], got["losses"], strict=True))
    grad_diff, grad_max = 0.0, 0.0
    for _step, (gr, gg) in enumerate(zip(ref["grads"], got["grads"], strict=True)):
        assert gr.keys() == gg.keys()
        for name in gr:
            assert gr[name].shape == gg[name].shape, name
            grad_diff = max(grad_diff, float((gr[name] - gg[name]).abs().max()))
            grad_max = max(grad_max, float(gr[name].abs().max()))
    print(
        f"\n[diff] {variant} world={world}: loss {loss_diff:.3e}, LoRA grad {grad_diff:.3e} "
        f"(max |grad| {grad_max:.3e}), losses {[f'{x:.6f}' for x in got['losses']]}"
    )

    # The run learns: the loss moves, B got nonzero, so step >= 1 gradients of A are nontrivial.
    assert ref["losses"][-1] < ref["losses"][0]
    a_grads = [g for n, g in ref["grads"][1].items() if ".lora_A." in n]
    assert a_grads and all(float(g.abs().max()) > 0 for g in a_grads)
    b_grads = [g for n, g in ref["grads"][0].items() if ".lora_B." in n]
    assert b_grads and all(float(g.abs().max()) > 0 for g in b_grads)

    assert loss_diff <= tol, f"{variant}, {world} ranks: losses {got['losses']} vs 1-process {ref['losses']}"
    assert grad_diff <= tol, f"{variant}, {world} ranks: LoRA gradients differ by {grad_diff:.3e}"
    for a, b in zip(ref["grad_norms"], got["grad_norms"], strict=True):
        assert abs(a - b) <= tol * max(1.0, abs(a))


@pytest.mark.parametrize("variant", SINGLE_RANK_FSDP)
def test_one_rank_without_fsdp_is_fsdp_bit_for_bit(results, variant):
    """One rank, default plan: no FSDP module at all (nothing to shard or reduce), the adapters cast their
    fp32 weights to the compute dtype where used and autograd accumulates fp32 gradients. FSDP on one rank
    (``single_rank_fsdp``) casts the same way and accumulates the same fp32 sums in the same order: the
    losses, every step's LoRA gradients and the gradient norms are equal bit for bit, in bf16 and fp16
    with the loss scaler, with activation offload and with fused projections."""
    plain, wrapped = _load_run(results, 1, variant), _load_run(results, 1, f"{variant}_fsdp1")
    assert _load(results, 1, variant, 0)["fsdp_modules"] == 0
    assert _load(results, 1, f"{variant}_fsdp1", 0)["fsdp_modules"] > 0
    assert plain["accum"] == wrapped["accum"] == GBS  # micro-batch 1: six micro-batches accumulated per step
    assert plain["losses"] == wrapped["losses"]
    assert plain["grad_norms"] == wrapped["grad_norms"]
    assert len(plain["grads"]) == len(wrapped["grads"]) == STEPS
    for step, (a, b) in enumerate(zip(plain["grads"], wrapped["grads"], strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (variant, step, name, float((a[name] - b[name]).abs().max()))


def _max_diffs(ref: dict, got: dict, first_step: int = 0) -> tuple[float, float]:
    """The largest |loss difference| and |LoRA gradient difference| of two runs, from ``ref``'s step
    ``first_step`` on (a resumed run starts later); every step's gradients name the same parameters."""
    pairs = list(zip(ref["grads"][first_step:], got["grads"], strict=True))
    assert all(gr.keys() == gg.keys() for gr, gg in pairs)
    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"][first_step:], got["losses"], strict=True))
    return loss_diff, max(float((gr[n] - gg[n]).abs().max()) for gr, gg in pairs for n in gr)


def test_compiled_matches_eager(results):
    """Compiled blocks (the adapters inside the 4-bit operator) on 2 ranks against the eager 1-process
    run with the same full checkpointing: the same losses and LoRA gradients (fp32)."""
    world = 2
    loss_diff, grad_diff = _max_diffs(_load_run(results, 1, "ac_full"), _load_run(results, world, "compiled"))
    print(f"\n[diff] compiled world={world} vs eager 1 process: loss {loss_diff:.3e}, LoRA grad {grad_diff:.3e}")
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5


@pytest.mark.parametrize("world", (1,) + WORLDS)
def test_fused_matches_unfused(results, world):
    """model.fuse_projections on N ranks against the unfused 1-process run: the same losses and LoRA
    gradients (tests/test_fused.py checks the fused rows themselves)."""
    loss_diff, grad_diff = _max_diffs(_load_run(results, 1, "fp32"), _load_run(results, world, "fused"))
    print(f"\n[diff] fused world={world} vs unfused 1 process: loss {loss_diff:.3e}, LoRA grad {grad_diff:.3e}")
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5


def test_unfused_checkpoint_resumes_fused_and_exports_the_same_adapter(results, env):
    """The checkpoint holds the per-projection LoRA names either way: an unfused run's step-2 checkpoint
    resumes with fused projections, continues as the uninterrupted unfused run does, and the adapter it
    exports equals that run's (same keys, values within fp32 summation order)."""
    from safetensors.torch import load_file

    ref, got = _load_run(results, 2, "fp32"), _load_run(results, 2, "fused_resumed")
    assert got["start_step"] == 2 and len(got["losses"]) == STEPS - 2
    loss_diff, grad_diff = _max_diffs(ref, got, first_step=2)
    a = load_file(results(2) / "dump" / "fp32_w2" / "adapter" / "adapter_model.safetensors")
    b = load_file(env["root"] / "fused_resume" / "adapter" / "adapter_model.safetensors")
    adapter_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\n[resume unfused -> fused] loss {loss_diff:.3e}, LoRA grad {grad_diff:.3e}, adapter {adapter_diff:.3e}")
    assert loss_diff <= 1e-5 and grad_diff <= 1e-5
    assert a.keys() == b.keys() and len(a) == 56
    assert adapter_diff <= 1e-5


@pytest.mark.parametrize("world", WORLDS)
def test_exact_accumulation_gives_bit_identical_gradients(results, world):
    """With reduce dtype float64 the per-step gradient is the exact sum of the micro-batch gradients,
    rounded once: however the batch is split over ranks and accumulation steps, it is bit-identical
    (the first step, before optimizer rounding could differ, is compared with torch.equal)."""
    ref = _load_run(results, 1, "bf16_exact")
    got = _load_run(results, world, "bf16_exact")
    assert got["accum"] == GBS // world > 1
    for name, g in ref["grads"][0].items():
        assert torch.equal(g, got["grads"][0][name]), (name, float((g - got["grads"][0][name]).abs().max()))
    plain_ref, plain = _load_run(results, 1, "bf16"), _load_run(results, world, "bf16")
    plain_diff = max(float((g - plain["grads"][0][n]).abs().max()) for n, g in plain_ref["grads"][0].items())
    print(f"\n[exact] world={world}: bf16 fp32-reduce step-0 grad diff {plain_diff:.3e}, fp64-reduce 0")


# ----------------------------------------------------------------------- 2. shards == checkpoint


@pytest.mark.parametrize("world", WORLDS)
def test_4bit_shards_are_checkpoint_rows(results, world):
    for rank in range(world):
        shards = _load(results, world, "fp32", rank)["shards"]
        assert shards["errors"] == [], shards["errors"]
        # 4 layers x 7 projections
        assert shards["n_checked"] == 28
        if world == 3:  # 256, 128 and 640 rows are not multiples of 3: every projection is padded
            assert shards["n_padded"] == 28
        else:
            assert shards["n_padded"] == 0


# ------------------------------------------------------------- 3. gather dequantizes bit-exactly


@pytest.mark.parametrize("world", (1,) + WORLDS)
def test_gathered_weight_dequantizes_bit_exactly(results, world):
    for rank in range(world):
        unsharded = _load(results, world, "fp32", rank)["unsharded"]
        assert set(unsharded) == {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        }
        for name, e in unsharded.items():
            assert e["type"] == "Weight4bit" and not e["is_dtensor"], (name, e)
            rows = e["n_rows"]
            assert e["shape"][0] == -(-rows // world) * world  # padded rows gathered ...
            assert e["deq_shape"] == e["ref_shape"] == (rows, e["shape"][1])  # ... and dropped
            assert e["equal"], f"{name} on rank {rank}: max diff {e['max_diff']}"
        q = unsharded["self_attn.q_proj"]
        assert q["deq_shape"] == (256, 256)


# --------------------------------------------------------------- 4. the all-gather moves bytes


@pytest.mark.parametrize("world", (1,) + WORLDS)
def test_all_gather_moves_packed_bytes(results, world):
    for rank in range(world):
        spy = _load(results, world, "fp32", rank)["spy"]
        if world == 1:
            # one rank: the frozen weights are not FSDP's and are used in place, nothing is gathered
            # (parallel.parallelize.frozen_params_left_local)
            assert spy == []
            continue
        # every 4-bit weight is gathered at least in forward and again in backward, every step
        assert len(spy) >= 28 * 2 * STEPS
        for rec in spy:
            rows, k = rec["local_shape"]
            assert rec["outer_size"] == (rows * world, k)
            weights = rows * k
            expect_bytes = weights // 2 + 4 * weights // rec["blocksize"]
            assert not any(rec["subclass"])
            assert rec["dtypes"] == [torch.uint8, torch.float32]
            assert rec["numels"] == [weights // 2, weights // rec["blocksize"]]
            assert sum(rec["nbytes"]) == expect_bytes
            assert sum(rec["nbytes"]) / weights == pytest.approx(0.5 + 4 / rec["blocksize"])


# ----------------------------------------------------------- 5. global token-count normalisation


@pytest.mark.parametrize("world", WORLDS)
def test_padded_data_has_unequal_tokens_per_rank(results, world):
    """The padded_data case of test_matches_single_process is meaningful: ranks hold different
    numbers of target tokens in the same step."""
    run = _load(results, world, "padded_data")
    per_step = list(zip(*run["rank_targets"], strict=True))  # step -> tokens per rank
    assert len(per_step) == STEPS
    assert any(len(set(counts)) > 1 for counts in per_step), per_step
    ref = _load(results, 1, "padded_data")
    assert [sum(c) for c in per_step] == ref["rank_targets"][0]


# -------------------------------------------------------------------------- 6. layout errors


@pytest.fixture
def clean_env(monkeypatch):
    """Restore os.environ and leave no process group behind (init_distributed may set both)."""
    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _cfg(tmp_path, *extra):
    from recipe.config import load_config

    return load_config(
        [
            f"--model.checkpoint={tmp_path / 'ckpt'}",
            "--model.synthetic_shape=debug",
            f"--job.dump_folder={tmp_path / 'dump'}",
            "--data.seq_len=32",
            *extra,
        ]
    )


def test_dp_shard_degree_mismatch(tmp_path, clean_env):
    from parallel.distributed import LayoutError
    from recipe.train import Trainer

    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    clean_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(LayoutError, match=r"data_parallel_shard_degree = 3 but the job has 2 rank"):
        Trainer(_cfg(tmp_path, "--parallelism.data_parallel_shard_degree=3", "--training.device=cpu"))
    assert not (tmp_path / "ckpt").exists()  # stopped before writing or reading the checkpoint
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path, clean_env):
    from parallel.distributed import LayoutError
    from recipe.train import Trainer

    with pytest.raises(LayoutError, match=r"training.device = 'cuda' but no CUDA device"):
        Trainer(_cfg(tmp_path, "--training.device=cuda"))
    assert not (tmp_path / "ckpt").exists()


def test_global_batch_not_divisible_single_process(tmp_path, clean_env):
    from parallel.distributed import LayoutError
    from recipe.train import Trainer

    with pytest.raises(LayoutError) as e:
        Trainer(
            _cfg(tmp_path, "--training.global_batch_size=5", "--training.micro_batch_size=2", "--training.device=cpu")
        )
    msg = str(e.value)
    assert "global_batch_size = 5" in msg and "micro_batch_size (2)" in msg and "ranks (1)" in msg, msg
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("world", WORLDS)
def test_global_batch_not_divisible_multi_rank(results, env, world):
    gbs = _bad_gbs(world)
    for rank in range(world):
        msg = _load(results, world, "bad_batch", rank)["message"]
        assert msg is not None, "the Trainer accepted an impossible batch layout"
        assert msg.startswith("LayoutError")
        assert f"global_batch_size = {gbs}" in msg and "micro_batch_size (2)" in msg and f"ranks ({world})" in msg, msg
    assert not Path(env["missing_ckpt"]).exists()


def test_plain_run_with_only_master_addr_set(clean_env):
    """A shell that exports MASTER_ADDR (SLURM, some clusters) but no WORLD_SIZE/MASTER_PORT: a plain
    `python -m recipe.train` is still a world of one on a private port."""
    from parallel.distributed import init_distributed

    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    info = init_distributed(device="cpu")
    assert info.world_size == 1 and info.rank == 0
    assert "MASTER_PORT" not in os.environ


def test_vocab_sharded_embedding_rejects_out_of_range_ids(clean_env):
    """Like nn.Embedding, an id outside the table is an error, not a silent zero vector."""
    import torch.distributed as dist

    from parallel.distributed import init_distributed
    from parallel.embedding import VocabShardedEmbedding

    init_distributed(device="cpu")
    emb = VocabShardedEmbedding(16, 4, dtype=torch.float32, rank=0, world=1, group=dist.group.WORLD, key="e")
    emb.weight = torch.randn(16, 4)
    ids = torch.tensor([[0, 15, 3]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, emb.weight))
    assert emb.state_dict() == {}  # per-rank rows of the base model: never in a training checkpoint
    for bad in (16, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            emb(torch.tensor([[0, bad]]))
