"""Several nodes and HSDP on CPU (gloo): two "nodes" of 2 processes on localhost through torchrun's c10d
rendezvous (``run_train.sh`` with NNODES=2), and the in-process 4-rank harness (tests/dist_utils.py) for
gradients, on the synthetic debug model (nf4, double quant), fp32, dropout 0.

Spawns, each reused for several checks (about 2 minutes on 2 cores in all):

- torchrun, 2 nodes x 2 (``run_train.sh``, both nodes started at once): HSDP 2 x 2 with checkpoints
  at steps 2 and 4 and the adapter export; pure FSDP (shard 4); an impossible mesh (replicate 3 on 4
  ranks), which must stop with exit code 2 on both nodes before anything is loaded;
- the harness on 1 process: the reference runs, and a resume of the HSDP step-2 checkpoint;
- the harness on 4 processes: HSDP 2 x 2 (losses, LoRA gradients, grad norms, 4-bit shards), HSDP with
  the exact modes (fp64 reduction, deterministic gradient norm: bit-identical to 1 process), HSDP with
  the vocabulary-sharded embedding, and a resume of the HSDP step-2 checkpoint on pure 4-way FSDP;
- the harness on 3 processes: replicate 3 x shard 1, where 4-bit rows must be padded for the shard
  degree (1: no padding), not the world size (3 would pad every projection).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port, gather_shards, run_jobs, spawn

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "debug_model.toml"
STEPS = 4
GBS = 8  # micro batch 1: 8 accumulation steps on 1 process, 2 on 4 ranks
TOL = 1e-5
MAX_NORM = 0.05  # below the debug model's gradient norms: clipping engages at every step
REP_KEY, SHARD_KEY = "parallelism.data_parallel_replicate_degree", "parallelism.data_parallel_shard_degree"
HSDP = [f"--{REP_KEY}=2"]
EXACT = ["--training.mixed_precision_reduce=float64", "--job.deterministic"]


def _common(ckpt) -> list[str]:
    """The same job for every launcher: run_train.sh reads debug_model.toml (its CONFIG_FILE default),
    the harness is given it."""
    return [
        f"--model.checkpoint={ckpt}",
        "--model.synthetic_shape=debug",
        "--training.device=cpu",
        "--training.mixed_precision_param=float32",
        f"--training.steps={STEPS}",
        f"--training.global_batch_size={GBS}",
        "--training.micro_batch_size=1",
        f"--training.max_norm={MAX_NORM}",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=32",
        "--optimizer.lr=1e-2",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
        "--lora.dropout=0",
        "--metrics.log_freq=100",
        "--profiling.memory_report=false",
    ]


# ------------------------------------------------------------------------------------ launchers


def _node_env(node: int, port: int, job_id: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", NGPU="2", NNODES="2")
    # A launcher around pytest must not leak its rendezvous, status directory or config into ours.
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_ERROR_FILE",
        "RECIPE_EXIT_STATUS_DIR",
        "CONFIG_FILE",
        "SLURM_JOB_ID",
    ):
        env.pop(key, None)
    env.update(NODE_RANK=str(node), RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=job_id)
    return env


def two_nodes(args: list[str], timeout: float = 240.0) -> list[subprocess.CompletedProcess]:
    """``run_train.sh args`` as node 0 and node 1 of one job (2 processes each), started together."""
    port, job_id = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen(
            [str(REPO / "run_train.sh"), *args],
            env=_node_env(node, port, job_id),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout stops exactly this job
        )
        for node in (0, 1)
    ]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def _summary(dump: Path) -> dict:
    return json.loads((dump / "summary.json").read_text())


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory, debug_nf4_ckpt):
    root = tmp_path_factory.mktemp("multinode")
    return {"root": root, "ckpt": str(debug_nf4_ckpt), "missing_ckpt": str(root / "never_written")}


@pytest.fixture(scope="module")
def torchrun(env):
    """The three 2-node launches: name -> (dump folder, [node 0, node 1] CompletedProcess)."""
    root, common = env["root"], _common(env["ckpt"])
    runs = {}
    hsdp = ["--checkpoint.enable", "--checkpoint.interval=2", *HSDP]
    for name, extra in (("hsdp", hsdp), ("fsdp4", [f"--{SHARD_KEY}=4"])):
        dump = root / f"torchrun_{name}"
        runs[name] = dump, two_nodes([*common, *extra, f"--job.dump_folder={dump}"])
    bad = [o for o in common if not o.startswith("--model.checkpoint=")] + [
        f"--model.checkpoint={env['missing_ckpt']}",
        f"--{REP_KEY}=3",
        f"--job.dump_folder={root / 'torchrun_bad'}",
    ]
    runs["bad_mesh"] = root / "torchrun_bad", two_nodes(bad)
    return runs


def _ok(run) -> Path:
    dump, procs = run
    for node, p in enumerate(procs):
        assert p.returncode == 0, f"node {node}: rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return dump


@pytest.fixture(scope="module")
def harness(env, torchrun):
    """harness(world) -> folder with that world's saved runs (tests/dist_utils.run_jobs; each world
    spawned once, lazily). The resume jobs start from a copy of the 2-node HSDP run's step-2 checkpoint."""
    results: dict[int, Path | BaseException] = {}
    root = env["root"]
    common = [f"--job.config_file={CONFIG}", *_common(env["ckpt"])]

    def resume_job(name: str, world: int, *extra: str) -> dict:
        source = _ok(torchrun["hsdp"]) / "checkpoint" / "step-2"
        dump = root / f"resume_{name}_w{world}"
        shutil.copytree(source, dump / "checkpoint" / "step-2")
        return {"name": name, "dump": str(dump), "overrides": [*common, "--checkpoint.enable", *extra]}

    def jobs(world: int) -> list[dict]:
        if world == 1:
            return [
                {"name": "fp32", "overrides": common},
                {"name": "exact", "overrides": [*common, *EXACT]},
                resume_job("resume", 1),
                {"name": "gbs6", "overrides": [*common, "--training.global_batch_size=6"]},
            ]
        if world == 4:
            return [
                {"name": "hsdp", "overrides": [*common, *HSDP], "checks": True},
                {"name": "exact", "overrides": [*common, *HSDP, *EXACT]},
                {"name": "vocab", "overrides": [*common, *HSDP, "--parallelism.vocab_parallel_embedding=true"]},
                resume_job("resume", 4, f"--{SHARD_KEY}=4"),
            ]
        assert world == 3
        gbs6 = [*common, "--training.global_batch_size=6", f"--{REP_KEY}=3"]
        return [{"name": "replicate3", "overrides": gbs6, "checks": True}]

    def get(world: int) -> Path:
        if world not in results:
            out = root / f"harness_w{world}"
            out.mkdir()
            try:
                spawn(run_jobs, world, jobs(world), str(out), err_dir=out / "errors", timeout=240)
                results[world] = out
            except Exception as e:
                results[world] = e
        r = results[world]
        if isinstance(r, BaseException):
            raise r
        return r

    return get


def _load(harness, world: int, name: str, rank: int | None = None) -> dict:
    suffix = "" if rank is None else f"_rank{rank}"
    return torch.load(harness(world) / f"{name}_w{world}{suffix}.pt", weights_only=False)


def _run(harness, world: int, name: str, shard: int | None = None) -> dict:
    """Rank 0's losses and norms, the full gradients of every step from the first replica's ranks
    (0..shard-1: their rows make up each gradient), and every rank's own rows."""
    run = _load(harness, world, name)
    shard = world if shard is None else shard
    run["rank_grads"] = [_load(harness, world, name, r)["grads"] for r in range(world)]
    first = run["rank_grads"][:shard]
    run["grads"] = [gather_shards([r[step] for r in first]) for step in range(len(first[0]))]
    return run


def _max_diff(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    assert len(a) == len(b)
    diff = 0.0
    for ga, gb in zip(a, b, strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert ga[name].shape == gb[name].shape, name
            diff = max(diff, float((ga[name] - gb[name]).abs().max()))
    return diff


# ------------------------------------------------------------------- 1. two nodes == one process


@pytest.mark.parametrize("name", ["fsdp4", "hsdp"])
def test_two_nodes_through_rendezvous_match_one_process(torchrun, harness, name):
    dump = _ok(torchrun[name])
    ref = _load(harness, 1, "fp32")["losses"]
    got = _summary(dump)
    assert got["world"] == 4
    diff = max(abs(a - b) for a, b in zip(ref, got["losses"], strict=True))
    print(f"\n[2 nodes x 2, {name}] loss diff {diff:.3e}: {got['losses']}")
    assert len(got["losses"]) == STEPS and ref[-1] < ref[0]
    assert diff <= TOL, (got["losses"], ref)
    logs = "".join(p.stdout for p in torchrun[name][1])
    layout = "4 rank(s) (HSDP: 2 replicas x 2 shards)" if name == "hsdp" else "4 rank(s), backend gloo"
    assert layout in logs


def test_hsdp_gradients_match_one_process(harness):
    """HSDP 2 x 2, 2 accumulation steps per rank: LoRA gradients (step k's, after k-1 updates) of
    the shard group == 1 process; the replicas hold bit-identical gradients (FSDP's all-reduce)."""
    ref, got = _run(harness, 1, "fp32"), _run(harness, 4, "hsdp", shard=2)
    assert got["accum"] == 2 and ref["accum"] == GBS
    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"], got["losses"], strict=True))
    grad_diff = _max_diff(ref["grads"], got["grads"])
    print(f"\n[hsdp 2x2] loss diff {loss_diff:.3e}, LoRA grad diff {grad_diff:.3e}")
    assert loss_diff <= TOL and grad_diff <= TOL
    b_grads = [g for n, g in ref["grads"][0].items() if ".lora_B." in n]
    assert b_grads and all(float(g.abs().max()) > 0 for g in b_grads)
    for r in (0, 1):  # replica 1 (ranks 2, 3) holds the rows of replica 0 (ranks 0, 1)
        for step, (g0, g1) in enumerate(zip(got["rank_grads"][r], got["rank_grads"][r + 2], strict=True)):
            assert all(torch.equal(g0[n], g1[n]) for n in g0), (r, step)
    # The gradient norm (torch's clip_grad_norm_ on (Replicate, Shard(0)) DTensors): over the shard dim
    # only. Summing the replicas as well would report sqrt(2) times the norm.
    for a, b in zip(ref["grad_norms"], got["grad_norms"], strict=True):
        assert a > MAX_NORM and abs(a - b) <= TOL * a, (ref["grad_norms"], got["grad_norms"])


def test_hsdp_exact_modes_are_bit_identical_to_one_process(harness):
    """fp64 reduction (micro-batches accumulated unsharded, reduce-scatter then all-reduce once per
    step) and the exact gradient norm over the shard dim (deterministic mode, clipping engaged)."""
    ref, got = _run(harness, 1, "exact"), _run(harness, 4, "exact", shard=2)
    assert got["losses"] == ref["losses"]
    assert got["grad_norms"] == ref["grad_norms"] and min(ref["grad_norms"]) > MAX_NORM
    for step, (gr, gg) in enumerate(zip(ref["grads"], got["grads"], strict=True)):
        for name in gr:
            assert torch.equal(gr[name], gg[name]), (step, name, float((gr[name] - gg[name]).abs().max()))


def test_hsdp_vocab_sharded_embedding_uses_the_shard_group(harness):
    """With HSDP the embedding table is split over the shard group (2 ranks: half the vocabulary per
    rank, a whole table per replica); lookups stay exact."""
    ref, got = _run(harness, 1, "fp32"), _run(harness, 4, "vocab", shard=2)
    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"], got["losses"], strict=True))
    assert loss_diff <= TOL and _max_diff(ref["grads"], got["grads"]) <= TOL
    embeds = [_load(harness, 4, "vocab", r)["embed"] for r in range(4)]
    halves = [f"VocabShardedEmbedding(rows [{a}, {b}) of 512, dim=256)" for a, b in ((0, 256), (256, 512))]
    assert embeds == halves * 2, embeds  # rank r is shard r % 2 of replica r // 2


# ------------------------------------------------------------------------- 2. 4-bit shard rows


def test_hsdp_4bit_shards_are_the_shard_groups_rows(harness):
    """Each rank holds its shard-group rows of every 4-bit weight (ranks r and r + 2 the same ones);
    gathered weights dequantize bit-exactly; all-gathers move packed bytes over the shard group."""
    for rank in range(4):
        local = _load(harness, 4, "hsdp", rank)
        assert local["shards"]["errors"] == [] and local["shards"]["n_checked"] == 28
        assert all(e["equal"] for e in local["unsharded"].values())
        spy = local["spy"]
        assert spy and all(rec["outer_size"][0] == 2 * rec["local_shape"][0] for rec in spy)
        assert all(rec["dtypes"] == [torch.uint8, torch.float32] for rec in spy)


def test_4bit_rows_are_padded_for_the_shard_degree(harness):
    """replicate 3 x shard 1 on 3 ranks: no padding (the shard degree is 1; padding for the world size
    would give every projection zero rows up to a multiple of 3), and the losses of 1 process."""
    ref = _load(harness, 1, "gbs6")
    got = _load(harness, 3, "replicate3")
    assert max(abs(a - b) for a, b in zip(ref["losses"], got["losses"], strict=True)) <= TOL
    for rank in range(3):
        shards = _load(harness, 3, "replicate3", rank)["shards"]
        assert shards["errors"] == [] and shards["n_checked"] == 28 and shards["n_padded"] == 0


# --------------------------------------------------------------------- 3. checkpoints and export


@pytest.mark.parametrize("world", [1, 4])
def test_hsdp_checkpoint_resumes_on_another_layout(torchrun, harness, world):
    """The 2-node HSDP run's step-2 checkpoint, resumed on 1 process and on 4-way FSDP: steps 3 and 4
    give the uninterrupted run's losses."""
    uninterrupted = _summary(_ok(torchrun["hsdp"]))["losses"]
    got = _load(harness, world, "resume")
    assert got["start_step"] == 2 and len(got["losses"]) == STEPS - 2
    diff = max(abs(a - b) for a, b in zip(uninterrupted[2:], got["losses"], strict=True))
    print(f"\n[resume HSDP step 2 on {world} rank(s)] loss diff {diff:.3e}")
    assert diff <= TOL, (got["losses"], uninterrupted)


def test_hsdp_adapter_export_is_complete(torchrun):
    """The adapter exported at the end of the 2-node HSDP run (gather_rows over the shard dim) holds
    exactly the full LoRA weights of its step-4 checkpoint (DCP, read back in one process), and equals
    the pure-FSDP run's adapter."""
    from recipe.export import peft_key, read_checkpoint_lora

    dump = _ok(torchrun["hsdp"])
    meta, ckpt = read_checkpoint_lora(dump / "checkpoint" / "step-4")
    assert meta["world_size"] == 4
    adapter = _adapter(dump / "adapter")
    assert len(adapter) == len(ckpt) == 56
    for fqn, t in ckpt.items():
        assert torch.equal(adapter[peft_key(fqn)], t), fqn
    q = ckpt["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert tuple(q.shape) == (16, 256) and float(q.abs().max()) > 0
    # Not bit-identical: the two layouts sum the fp32 gradients in different orders, and AdamW (lr 1e-2,
    # 4 steps) turns the last-bit differences of near-zero gradient elements into up to ~2e-5 here.
    fsdp = _adapter(_ok(torchrun["fsdp4"]) / "adapter")
    diff = max(float((fsdp[k] - v).abs().max()) for k, v in adapter.items())
    top = max(float(v.abs().max()) for v in adapter.values())
    print(f"\n[adapter] HSDP vs FSDP-4 max diff {diff:.3e} (max |weight| {top:.3e})")
    assert diff <= 1e-4


# -------------------------------------------------------------------------- 4. impossible mesh


def test_impossible_mesh_stops_before_loading_on_both_nodes(torchrun, env):
    _, procs = torchrun["bad_mesh"]
    for node, p in enumerate(procs):
        assert p.returncode == 2, f"node {node}: rc={p.returncode}\n{p.stderr[-3000:]}"
        assert "run_train.sh: stopped on bad input: LayoutError: " in p.stderr, p.stderr[-3000:]
    msg = f"{REP_KEY} = 3 x {SHARD_KEY} = -1 but the job has 4 rank(s), not a multiple of 3"
    both = procs[0].stderr + procs[1].stderr
    # One line per node, run_train.sh's (each node's own ranks' record); no rank prints it besides.
    assert both.count(f"stopped on bad input: LayoutError: {msg}") == 2, both[-3000:]
    assert both.count(msg) == 2 and "Traceback" not in both, both[-3000:]
    assert not Path(env["missing_ckpt"]).exists()  # stopped before the checkpoint was written or read


def test_run_train_sh_multinode_arguments(tmp_path):
    """NNODES > 1 needs RDZV_ENDPOINT=host:port and a NODE_RANK below NNODES: exit 2 before torchrun."""
    base = _node_env(0, 1, "x")
    cases = [
        ({"RDZV_ENDPOINT": ""}, "needs RDZV_ENDPOINT=host:port"),
        ({"RDZV_ENDPOINT": "node0"}, "needs RDZV_ENDPOINT=host:port"),
        ({"NODE_RANK": "2"}, "needs NODE_RANK in 0..1"),
        ({"NODE_RANK": ""}, "needs NODE_RANK in 0..1"),
        ({"NNODES": "0"}, "NNODES must be a positive integer"),
    ]
    for change, msg in cases:
        p = subprocess.run(
            [str(REPO / "run_train.sh"), f"--job.dump_folder={tmp_path}"],
            env={**base, **change},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and msg in p.stderr, (change, p.returncode, p.stderr)


def test_a_rank_on_a_node_without_rank_0_does_not_wait_for_its_record(tmp_path, monkeypatch):
    """Each node's run_train.sh has its own status folder: rank 0's record never appears on the others."""
    import time

    from recipe import exit_status

    monkeypatch.setenv(exit_status.ENV, str(tmp_path))
    monkeypatch.setattr(exit_status, "RANK0_WAIT_S", 30.0)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first rank of the second node
    t0 = time.monotonic()
    assert exit_status.report_bad_input(ValueError("bad value"), rank=None) == 2
    assert time.monotonic() - t0 < 5.0
    assert (tmp_path / "rank2").read_text() == "2\nValueError: bad value\n"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert exit_status._rank0_on_this_node(1)  # rank 1, local rank 1: rank 0 is on this node


@pytest.mark.parametrize(
    ("backend", "bound"), [("gloo", False), ("nccl", True), ("auto", True)], ids=["gloo", "nccl", "auto"]
)
def test_cuda_device_is_bound_only_for_nccl(monkeypatch, backend, bound):
    """Found on torch 2.11 (one-GPU emulation of 2x T4, HSDP 2x1, 2026-12-07): a gloo group bound to a CUDA
    device makes init_device_mesh split it, which deep-copies gloo's options ("cannot pickle ... _Options")
    and stops an HSDP run before training. Bind the device (eager NCCL init) only where NCCL is the backend;
    CUDA faked so that the arguments can be checked on CPU."""
    import parallel.distributed as pd

    calls = {}
    monkeypatch.setattr(pd, "resolve_device", lambda kind, local_rank: torch.device("cuda", local_rank))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(pd.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(pd.dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(pd, "init_device_mesh", lambda *a, **kw: calls.setdefault("mesh", (a, kw)))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    pd.init_distributed(device="cuda", backend=backend, dp_replicate=2, dp_shard=1)
    assert ("device_id" in calls["init"]) is bound, calls["init"]
    assert calls["init"]["backend"] == ("gloo" if backend == "gloo" else "nccl")
    assert calls["mesh"] == (("cuda", (2, 1)), {"mesh_dim_names": ("dp_replicate", "dp_shard")})
