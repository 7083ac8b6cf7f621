"""Checkpointing: exact kill-and-resume, a kill during a save, resume on other world sizes, async
saves, keep_latest_k, the PEFT adapter export (against HF transformers + peft) and bad input.

Process spawns are the expensive part (~4 s of imports each), so one 2-rank spawn runs the whole
2-rank story in phases (module fixture ``story``), one 3-rank spawn resumes on 3 ranks, and the
1-rank runs happen in this pytest process (a world of one, its process group kept for the module).
All runs are fp32 on CPU on a bf16 synthetic checkpoint loaded without quantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.multiprocessing as mp

from recipe.checkpoint import COMPLETE_FILE, META_FILE, CheckpointLoadError, LocalStorage, list_complete_checkpoints
from recipe.config import load_config

STEPS = 6


# ---------------------------------------------------------------------------------------------- helpers


def make_cfg(base, dump, *extra):
    argv = [
        f"--model.checkpoint={base}",
        "--model.quant_type=none",
        "--training.mixed_precision_param=float32",
        "--training.device=cpu",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=48",
        "--training.global_batch_size=6",
        "--training.micro_batch_size=1",
        f"--training.steps={STEPS}",
        "--optimizer.lr=2e-3",
        "--lr_scheduler.warmup_steps=2",
        "--lora.rank=8",  # 8 rows over 3 ranks: uneven (3, 3, 2) sharding
        "--lora.alpha=16",
        "--lora.dropout=0.1",
        "--checkpoint.enable",
        "--checkpoint.interval=1",
        "--checkpoint.export_adapter=false",
        "--metrics.log_freq=100",
        "--profiling.memory_report=false",
        f"--job.dump_folder={dump}",
        *extra,
    ]
    return load_config(argv)


def finish(trainer):
    """Close a trainer but keep the process group (the next trainer in this process reuses it)."""
    trainer.checkpointer.close()
    if hasattr(trainer, "profiler"):
        trainer.profiler.close()
    trainer.metrics.close()


def run_steps(trainer, n):
    losses = []
    for _ in range(n):
        losses.append(trainer.train_step().loss)
        trainer.checkpointer.maybe_save(trainer.step)
    return losses


def probe_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 512, (2, 24), generator=g)


@torch.no_grad()
def recipe_logits(trainer):
    trainer.model.eval()
    out = trainer.model(input_ids=probe_ids()).logits
    trainer.model.train()
    return out.float()


def listing(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: sorted(x.name for x in p.iterdir()) if p.is_dir() else None for p in sorted(folder.iterdir())}


def snapshot(folder):
    """Every file under folder with its size and mtime: proves nothing was touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


class SimulatedKill(Exception):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, scenario, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        SCENARIOS[scenario](rank, world, **args)
    except BaseException:
        Path(args["root"], f"error-{scenario}-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def spawn(world, scenario, timeout=300, **args):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, scenario, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [f.read_text() for f in sorted(Path(args["root"]).glob(f"error-{scenario}-rank*.txt"))]
    assert all(p.exitcode == 0 for p in procs), f"{scenario}: exit codes {[p.exitcode for p in procs]}\n" + "\n".join(
        errors
    )


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_story(rank, world, root, base):
    """The 2-rank story. Writes story.json (losses and directory listings) and logits.pt."""
    import torch.distributed as dist

    from recipe.train import Trainer

    root = Path(root)
    res = {}
    a = root / "a"
    # 1. uninterrupted reference run
    t = Trainer(make_cfg(base, root / "ref", "--checkpoint.enable=false"))
    rng = [None] * world  # the generator dropout draws from, per rank
    dist.all_gather_object(rng, hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())
    res["dropout_rng_per_rank"] = rng
    res["ref"] = t.train()
    finish(t)

    # 2. a run "killed" after step 3 (saved every step, then discarded)
    t = Trainer(make_cfg(base, a))
    res["killed"] = run_steps(t, 3)
    finish(t)
    del t
    if rank == 0:
        for d in ("x1", "x2", "x3"):
            shutil.copytree(a / "checkpoint" / "step-3", root / d / "checkpoint" / "step-3")
    dist.barrier()
    step3 = snapshot(a / "checkpoint" / "step-3")

    # 3. resume; the save of step 5 dies after the shards (and metadata) are written, before COMPLETE
    t = Trainer(make_cfg(base, a))
    res["resumed_at_1"] = t.step
    t.checkpointer._last_saved_step = None
    t.checkpointer.maybe_save(3, force=True)  # step-3 exists and is complete: must not be clobbered
    res["step3_untouched"] = snapshot(a / "checkpoint" / "step-3") == step3

    class DieAt5(LocalStorage):  # injected storage: the process "dies" once step 5's files are written
        def files_written(self, step, tmp):
            if step == 5:
                raise SimulatedKill(f"killed while saving step {step}")

    t.checkpointer.storage = DieAt5()
    res["before_kill"] = []
    try:
        while t.step < STEPS:
            res["before_kill"].append(t.train_step().loss)
            t.checkpointer.maybe_save(t.step)
        res["killed_in_save"] = False
    except SimulatedKill:
        res["killed_in_save"] = True
    del t
    dist.barrier()
    res["after_kill_listing"] = listing(a / "checkpoint")

    # 4. resume again (latest complete is step-4), async saves, keep the latest 2, export the adapter
    t = Trainer(
        make_cfg(base, a, "--checkpoint.async_mode", "--checkpoint.keep_latest_k=2", "--checkpoint.export_adapter=true")
    )
    res["resumed_at_2"] = t.step
    res["final"] = t.train()
    res["final_listing"] = listing(a / "checkpoint")
    logits = recipe_logits(t)
    finish(t)

    # 5. reference for the other world sizes: 2 ranks, no dropout, from the copied step-3
    t = Trainer(make_cfg(base, root / "x2", "--lora.dropout=0", "--checkpoint.interval=100"))
    res["x2_start"] = t.step
    res["x2"] = t.train()
    finish(t)
    if rank == 0:
        torch.save(logits, root / "logits.pt")
        (root / "story.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def scenario_resume3(rank, world, root, base):
    import torch.distributed as dist

    from recipe.train import Trainer

    root = Path(root)
    # With the vocabulary-sharded embedding: its per-rank table rows must stay out of the checkpoints
    # (they come from the base model), or loading would see one rank's rows as everyone's.
    t = Trainer(
        make_cfg(
            base,
            root / "x3",
            "--lora.dropout=0",
            "--checkpoint.async_mode",
            "--parallelism.vocab_parallel_embedding=true",
        )
    )
    res = {"start": t.step, "losses": t.train(), "listing": listing(root / "x3" / "checkpoint")}
    finish(t)
    if rank == 0:
        (root / "x3.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def scenario_resume_from_one_rank(rank, world, root, base):
    """N ranks resume from a checkpoint one rank wrote without FSDP (plain tensors, not DTensors): the
    LoRA weights each rank loads, gathered, and the next step's loss."""
    import torch.distributed as dist

    from parallel.sharding import gather_rows
    from recipe.train import Trainer

    root = Path(root)
    t = Trainer(make_cfg(base, root / "x1to2", "--lora.dropout=0", f"--training.steps={STEPS + 1}"))
    loaded = {n: gather_rows(p.detach()).clone() for n, p in t.model.named_parameters() if p.requires_grad}
    res = {"start": t.step, "losses": t.train()}
    finish(t)
    if rank == 0:
        torch.save(loaded, root / "x1to2_loaded.pt")
        (root / "x1to2.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


SCENARIOS = {
    "story": scenario_story,
    "resume3": scenario_resume3,
    "resume_from_one_rank": scenario_resume_from_one_rank,
}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def base(root):
    from models.synthetic import write_synthetic_checkpoint

    d = root / "base"
    write_synthetic_checkpoint(d, shape="debug", quant_type="none", seed=0)
    return d


@pytest.fixture(scope="module")
def story(root, base):
    spawn(2, "story", root=str(root), base=str(base))
    return json.loads((root / "story.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    """In-process trainers are a world of one; keep their process group until the module ends."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def close(a, b, tol=1e-6):
    assert len(a) == len(b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol, (a, b)


# ---------------------------------------------------------------------------------------------- tests


def test_kill_and_resume_is_exact(story):
    assert len(set(story["dropout_rng_per_rank"])) == 2  # ranks draw different dropout masks
    ref = story["ref"]
    assert len(ref) == STEPS and len(set(ref)) == STEPS  # the loss moves, so equality means something
    close(story["killed"], ref[:3])
    assert story["resumed_at_1"] == 3
    close(story["before_kill"], ref[3:5])  # dropout 0.1: equal only with every rank's RNG restored
    assert story["step3_untouched"]


def test_kill_during_save_leaves_previous_checkpoint(story):
    assert story["killed_in_save"]
    ls = story["after_kill_listing"]
    assert {"step-1", "step-2", "step-3", "step-4"} <= set(ls)
    assert "step-5" not in ls
    (tmp,) = [n for n in ls if n.startswith("step-5.tmp-")]
    assert ".metadata" in ls[tmp] and META_FILE in ls[tmp] and COMPLETE_FILE not in ls[tmp]
    for n in ("step-1", "step-2", "step-3", "step-4"):
        assert COMPLETE_FILE in ls[n] and "rng-rank0.pt" in ls[n] and "rng-rank1.pt" in ls[n]
    # the next run resumed from the previous complete checkpoint and still matches the reference
    assert story["resumed_at_2"] == 4
    close(story["final"], story["ref"][4:])


def test_async_save_and_keep_latest_k(story, root):
    # async saves + keep_latest_k=2: only step-5 and step-6 remain, the stale temp dir is gone
    assert set(story["final_listing"]) == {"step-5", "step-6"}
    steps = [s for s, _ in list_complete_checkpoints(root / "a" / "checkpoint")]
    assert steps == [5, 6]
    meta = json.loads((root / "a" / "checkpoint" / "step-6" / META_FILE).read_text())
    assert meta["step"] == 6 and meta["world_size"] == 2
    assert meta["lora"]["rank"] == 8 and meta["lora"]["alpha"] == 16.0
    assert meta["model_shape"]["hidden_size"] == 256
    assert meta["base_checkpoint"] == os.path.abspath(root / "base")


def test_resume_on_other_world_sizes(story, root, base):
    """2 -> 1 (in this process) and 2 -> 3 (spawned) resume from step-3 give the 2-rank losses; a
    checkpoint one rank wrote (without FSDP) resumes on 2 ranks."""
    from torch.distributed.tensor import DTensor

    from recipe.train import Trainer

    assert story["x2_start"] == 3
    ref = story["x2"]
    # 2 -> 1, with a partial step dir and a stale temp dir lying around, and keep_latest_k=1
    ck = root / "x1" / "checkpoint"
    shutil.copytree(ck / "step-3", ck / "step-9")
    (ck / "step-9" / COMPLETE_FILE).unlink()
    shutil.copytree(ck / "step-3", ck / "step-8.tmp-stale")
    partial = snapshot(ck / "step-9")
    t = Trainer(make_cfg(base, root / "x1", "--lora.dropout=0", "--checkpoint.keep_latest_k=1"))
    assert t.step == 3  # the partial step-9 and the temp dir are ignored
    losses = t.train()
    finish(t)
    close(losses, ref)
    # keep_latest_k removed only complete checkpoints; the partial dir is left alone, the temp dir cleaned
    assert set(listing(ck)) == {"step-6", "step-9"}
    assert snapshot(ck / "step-9") == partial

    # 1 -> 2: step-6 as one rank wrote it (no FSDP: plain tensors) loads into two ranks' shards exactly,
    # and their next step equals one rank's next step from the same checkpoint.
    for d in ("x1to2", "x1to1"):
        shutil.copytree(ck / "step-6", root / d / "checkpoint" / "step-6")
    t = Trainer(make_cfg(base, root / "x1to1", "--lora.dropout=0", f"--training.steps={STEPS + 1}"))
    assert t.step == 6 and not any(isinstance(p, DTensor) for p in t.model.parameters())
    one_rank = t.train()
    finish(t)
    spawn(2, "resume_from_one_rank", root=str(root), base=str(base))
    res = json.loads((root / "x1to2.json").read_text())
    assert res["start"] == 6 and len(res["losses"]) == len(one_rank) == 1
    close(res["losses"], one_rank)
    from recipe.export import read_checkpoint_lora

    meta1, w1 = read_checkpoint_lora(ck / "step-6")
    loaded = torch.load(root / "x1to2_loaded.pt")
    assert meta1["world_size"] == 1 and loaded.keys() == w1.keys()
    assert all(torch.equal(loaded[k], w1[k]) for k in w1)

    # 2 -> 3 (LoRA rank 8 -> uneven 3/3/2 rows), async saves
    spawn(3, "resume3", root=str(root), base=str(base))
    res = json.loads((root / "x3.json").read_text())
    assert res["start"] == 3
    close(res["losses"], ref)
    assert {"step-4", "step-5", "step-6"} <= set(res["listing"])
    assert all(COMPLETE_FILE in res["listing"][f"step-{s}"] for s in (4, 5, 6))
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(root / "x3" / "checkpoint" / "step-6")).read_metadata().state_dict_metadata
    assert not [k for k in saved if "embed_tokens" in k], sorted(saved)
    # the LoRA weights written by 3 ranks (uneven rows) equal those written by 2 ranks
    _, w3 = read_checkpoint_lora(root / "x3" / "checkpoint" / "step-6")
    meta2, w2 = read_checkpoint_lora(root / "x2" / "checkpoint" / "step-6")
    assert meta2["world_size"] == 2 and w3.keys() == w2.keys() and len(w2) == 56
    assert max((w3[k] - w2[k]).abs().max().item() for k in w2) <= 1e-6


def _hf_logits(base, adapter, nf4=False):
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if nf4:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
                m.compute_dtype = torch.float32
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits.float()


def test_peft_adapter_round_trip(story, root, base):
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter = root / "a" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    expect = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=cfg["target_modules"], task_type="CAUSAL_LM"
    ).to_dict()
    assert set(cfg) == set(expect)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8
    assert cfg["lora_alpha"] == 16 and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
    assert cfg["inference_mode"] is True and cfg["base_model_name_or_path"] == os.path.abspath(base)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(sd) == 4 * 7 * 2
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert sd[k].shape == (8, 256) and sd[k].dtype == torch.float32
    assert sd["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"].shape == (256, 8)
    assert any(float(v.abs().max()) > 0 for n, v in sd.items() if "lora_B" in n)  # trained

    ours = torch.load(root / "logits.pt")
    theirs = _hf_logits(base, adapter)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_export_cli_from_checkpoint(story, root):
    from safetensors.torch import load_file

    from recipe.export import main

    out = root / "cli_adapter"
    assert main(["--checkpoint", str(root / "a" / "checkpoint" / "step-6"), "--out", str(out)]) == 0
    live = load_file(str(root / "a" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == live.keys() and all(torch.equal(got[k], live[k]) for k in live)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (root / "a" / "adapter" / "adapter_config.json").read_text()
    )
    # an existing adapter is not overwritten without --overwrite; bf16 option
    assert main(["--checkpoint", str(root / "a" / "checkpoint" / "step-6"), "--out", str(out)]) == 2
    assert (
        main(
            [
                "--checkpoint",
                str(root / "a" / "checkpoint" / "step-6"),
                "--out",
                str(out),
                "--overwrite",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "adapter_model.safetensors")).values())
    # not a checkpoint
    assert main(["--checkpoint", str(root / "a" / "checkpoint" / "step-1"), "--out", str(root / "nope")]) == 2
    assert not (root / "nope").exists()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_root(story, root):
    """A dump folder holding one complete checkpoint (step-6, written by 2 ranks) plus bad entries."""
    d = root / "bad"
    ck = d / "checkpoint"
    ck.mkdir(parents=True)
    shutil.copytree(root / "a" / "checkpoint" / "step-6", ck / "step-6")
    shutil.copytree(ck / "step-6", ck / "step-5.tmp-20240101-dead")  # a killed save
    shutil.copytree(ck / "step-6", ck / "step-7")  # partial: no COMPLETE
    (ck / "step-7" / COMPLETE_FILE).unlink()
    (ck / "step-8").mkdir()  # foreign
    (ck / "step-8" / "notes.txt").write_text("hello")
    shutil.copytree(ck / "step-6", ck / "step-9")  # foreign, claims complete
    (ck / "step-9" / META_FILE).write_text(json.dumps({"format": "something-else"}))
    return d


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--checkpoint.load_step=3"], r"step-3 does not exist; complete checkpoints there: step-6"),
        (["--checkpoint.load_step=5"], r"step-5 does not exist; only incomplete temp dir"),
        (["--checkpoint.load_step=7"], r"step-7 is partial: it has no COMPLETE marker"),
        (["--checkpoint.load_step=8"], r"step-8 is not a recipe checkpoint"),
        (["--checkpoint.load_step=9"], r"step-9 is not a recipe checkpoint: .* format 'something-else'"),
        (["--checkpoint.load_step=6", "--lora.rank=4"], r"step-6 has a different LoRA shape"),
        (["--checkpoint.load_step=6", "--lora.target_modules=q_proj,v_proj"], r"different LoRA shape"),
        (["--checkpoint.load_step=6", "--training.global_batch_size=12"], r"data order changed"),
        (["--checkpoint.load_step=6", "--data.seq_len=16"], r"data order changed .*seq_len: 32 -> 16, data_sha1"),
        (["--checkpoint.load_step=6", "--model.quant_type=nf4"], r"trained against a none base, this run uses nf4/64"),
        (["--checkpoint.load_step=6", "BASE2"], r"different base model.*contents differ"),
        (["--checkpoint.load_step=6", "--training.steps=8"], r"load_step = 6, but .* later step\(s\) step-7, step-8"),
        ([], r"step-9 is not a recipe checkpoint"),  # auto: the latest 'complete' one is foreign
    ],
    ids=[
        "missing",
        "tmp-only",
        "partial",
        "foreign",
        "foreign-complete",
        "lora-rank",
        "lora-targets",
        "data",
        "data-content",
        "quant",
        "base-model",
        "later-steps",
        "auto-foreign",
    ],
)
def test_bad_checkpoint_stops_before_training(bad_root, root, extra, match):
    from models.synthetic import write_synthetic_checkpoint
    from recipe.train import Trainer

    base = root / "base"
    if "BASE2" in extra:  # same shapes and sizes, other weights
        base = root / "base2"
        if not base.exists():
            write_synthetic_checkpoint(base, shape="debug", quant_type="none", seed=1)
        extra = [e for e in extra if e != "BASE2"]
    (bad_root / "config.toml").write_text("# the config of the run that wrote these checkpoints\n")
    before = snapshot(bad_root / "checkpoint")
    with pytest.raises(CheckpointLoadError, match=match):
        Trainer(make_cfg(base, bad_root, "--lora.dropout=0", *extra))
    assert snapshot(bad_root / "checkpoint") == before  # nothing written, moved or deleted
    assert (bad_root / "config.toml").read_text().startswith("# the config of the run")  # not overwritten


def test_resume_takes_optimizer_settings_from_the_config(story, root, base, capsys):
    """A resumed run with another peak lr / weight decay / betas / length uses them (and says so);
    the schedule position comes from the checkpoint."""
    from recipe.optim import lr_lambda
    from recipe.train import Trainer

    shutil.copytree(root / "x2" / "checkpoint" / "step-3", root / "lr" / "checkpoint" / "step-3")
    t = Trainer(
        make_cfg(
            base,
            root / "lr",
            "--lora.dropout=0",
            "--optimizer.lr=0.1",
            "--optimizer.weight_decay=0.05",
            "--optimizer.beta2=0.9",
            "--training.steps=8",
        )
    )
    out = capsys.readouterr().out
    assert "optimizer settings from the config, not the checkpoint: " in out and "lr 0.002 -> 0.1" in out, out
    assert "the lr schedule follows the config from step 3: training.steps 6 -> 8" in out, out
    try:
        assert t.step == 3
        expect = [0.1 * lr_lambda(s, warmup=2, total=8, decay="cosine", min_ratio=0.0) for s in (3, 4)]
        for g in t.optimizer.param_groups:
            assert g["lr"] == pytest.approx(expect[0], rel=1e-12) and g["weight_decay"] == 0.05
            assert tuple(g["betas"]) == (0.9, 0.9)
        t.train_step()
        assert t.optimizer.param_groups[0]["lr"] == pytest.approx(expect[1], rel=1e-12)
        # the optimizer moments were restored, not reset
        assert all(st["step"].item() == 4 for st in t.optimizer.state.values())
    finally:
        finish(t)
    shutil.copytree(root / "x2" / "checkpoint" / "step-3", root / "short" / "checkpoint" / "step-3")
    t = Trainer(make_cfg(base, root / "short", "--lora.dropout=0", "--training.steps=2"))
    finish(t)
    assert "step-3 is at or past training.steps = 2: nothing to train" in capsys.readouterr().out


def test_checkpoint_folder_instead_of_a_step_names_the_steps(bad_root):
    from recipe.checkpoint import read_checkpoint_meta

    with pytest.raises(CheckpointLoadError, match=r"holds the checkpoints step-6.*give one of those step directories"):
        read_checkpoint_meta(bad_root / "checkpoint")


def test_auto_resume_skips_partial_and_temp(bad_root, root):
    """Auto resume picks the latest *complete* recipe checkpoint (once the foreign one is gone)."""
    from recipe.train import Trainer

    shutil.rmtree(bad_root / "checkpoint" / "step-9")
    t = Trainer(
        make_cfg(root / "base", bad_root, "--lora.dropout=0", "--checkpoint.enable=false", "--checkpoint.load_step=-1")
    )
    assert t.step == 0  # checkpoint.enable=false and no load_step: no resume
    finish(t)
    t = Trainer(make_cfg(root / "base", bad_root, "--lora.dropout=0"))
    assert t.step == 6  # step-7 (partial), step-8 (foreign, incomplete) and the temp dir are skipped
    finish(t)


def test_peft_adapter_round_trip_nf4(root):
    """The same round trip on a pre-quantized nf4 checkpoint (HF bnb Linear4bit on CPU, fp32 compute)."""
    from safetensors.torch import load_file

    from models.synthetic import write_synthetic_checkpoint
    from recipe.train import Trainer

    base = root / "base_nf4"
    write_synthetic_checkpoint(base, shape="debug", quant_type="nf4", seed=0)
    t = Trainer(
        make_cfg(
            base,
            root / "nf4",
            "--model.quant_type=nf4",
            "--training.steps=1",
            "--training.global_batch_size=1",
            "--checkpoint.export_adapter=true",
        )
    )
    t.train()
    ours = recipe_logits(t)
    finish(t)
    sd = load_file(str(root / "nf4" / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for n, v in sd.items() if "lora_B" in n)
    theirs = _hf_logits(base, root / "nf4" / "adapter", nf4=True)
    assert (ours - theirs).abs().max().item() <= 1e-4
