"""HF Trainer (recipe.hf_trainer.RecipeTrainer) and TRL's SFTTrainer (RecipeSFTTrainer) on the sharded
QLoRA model, on CPU with gloo and the synthetic debug model (nf4, double quant), in fp32.

Two spawns (1 and 2 ranks) run every job in sequence on one process group (``_worker``); the tests
compare what they saved:

1. the Trainer's logged losses over 4 optimizer steps == the recipe loop's (``recipe.train.Trainer
   .train_step``) on the same batches, and 2 ranks == 1 rank (1e-5);
2. the same for ``RecipeSFTTrainer`` on a chat JSONL with completion-only loss, whose targets equal
   the recipe data path's;
3. the adapter ``save_model`` writes on 2 ranks is complete, and HF + peft on it reproduce the trained
   model's logits;
4. a run resumed from a Trainer checkpoint logs the uninterrupted run's later losses;
5. each refused TrainingArguments setting stops with a message naming the field;
6. ``examples/hf_trainer_sft.py`` and ``examples/trl_sft.py`` under ``torchrun --nproc-per-node 2``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import local_tensor, spawn

ROOT = Path(__file__).resolve().parents[1]
STEPS, GBS, SEQ, ROWS, LR = 4, 4, 32, 32, 1e-2
TOL = 1e-5
CHAT_SEQ, SFT_LR, PACKED_STEPS = 96, 5e-3, 2


def _chat_records(n: int = 16) -> list[dict]:
    """Conversations with prompts and answers of very different lengths (unequal targets per rank)."""
    out = []
    for i in range(n):
        q = "Tell me " + "more " * (i % 5) + f"about {i}?"
        a = f"Item {i} " + "is fine " * ((3 * i) % 4) + "ok."
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def _training_args(out, world: int, cls=None, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        logging_steps=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=GBS // world,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=42,
    )
    base.update(kw)
    return (cls or TrainingArguments)(**base)


def _losses(trainer, after: int = 0) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after]


def _sft_dataset(records):
    """TRL's conversational prompt-completion form: completion-only loss on the assistant turn."""
    import datasets

    return datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records])


def _recipe_losses(ckpt: str, dump: Path, extra: list[str]) -> list[float]:
    """The recipe's own loop on the same batches: the loader's order is made the identity (the HF runs
    sample sequentially), so micro-batch a of rank r of step s is row (s*A + a)*W + r on both sides."""
    import recipe.train
    from recipe.config import load_config

    cfg = load_config(
        [
            f"--model.checkpoint={ckpt}",
            "--training.mixed_precision_param=float32",
            f"--training.steps={STEPS}",
            f"--training.global_batch_size={GBS}",
            "--training.micro_batch_size=1",
            f"--optimizer.lr={LR}",
            "--lr_scheduler.warmup_steps=0",
            "--lr_scheduler.decay_type=constant",
            "--metrics.enable_jsonl=false",
            "--checkpoint.export_adapter=false",
            "--profiling.memory_report=false",
            f"--job.dump_folder={dump}",
            *extra,
        ]
    )
    t = recipe.train.Trainer(cfg)
    try:
        t.loader._perm = lambda epoch: torch.arange(t.loader.num_rows)
        t.model.train()
        return [t.train_step().loss for _ in range(STEPS)]
    finally:
        t.close()


def _probe(vocab: int) -> torch.Tensor:
    return (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % vocab


def _refusals(model, out: Path) -> dict[str, str]:
    from recipe.hf_trainer import RecipeTrainer

    cases = {
        "fsdp": dict(fsdp="full_shard"),
        "optim": dict(optim="sgd"),
        "bf16": dict(bf16=True),
        "gradient_checkpointing": dict(gradient_checkpointing=True),
        "torch_compile": dict(torch_compile=True),
        "label_smoothing_factor": dict(label_smoothing_factor=0.1),
        "auto_find_batch_size": dict(auto_find_batch_size=True),
        "neftune_noise_alpha": dict(neftune_noise_alpha=5.0),
    }
    msgs = {}
    rows = [{"input_ids": torch.zeros(4, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)}]
    for name, kw in [*cases.items(), ("deepspeed", {})]:
        try:
            args = _training_args(out / f"refuse_{name}", 1, **kw)
        except Exception as e:  # TrainingArguments itself refused it
            msgs[name] = f"TrainingArguments: {type(e).__name__}: {e}"
            continue
        if name == "deepspeed":  # TrainingArguments needs the deepspeed package to accept the field
            args.deepspeed = "ds_config.json"
        try:
            RecipeTrainer(model=model, args=args, train_dataset=rows)
        except Exception as e:
            msgs[name] = f"{type(e).__name__}: {e}"
        else:
            msgs[name] = "accepted"
    return msgs


def _worker(rank: int, world: int, out_dir: str, ckpt: str, chat: str) -> None:
    import recipe.train
    from recipe.data import synthetic_dataset
    from recipe.hf_trainer import RecipeModelArguments, RecipeTrainer, build_hf_model

    recipe.train.destroy = lambda: None  # one process group for every job of this worker
    out = Path(out_dir)
    res: dict = {}
    model_args = RecipeModelArguments(model_name_or_path=ckpt)

    # 1. HF Trainer, checkpoints every 2 steps; the adapter; the trained model's logits.
    hf_dir = out / f"hf_w{world}"
    args = _training_args(hf_dir, world, save_strategy="steps", save_steps=2)
    model = build_hf_model(model_args, args)
    data = synthetic_dataset(model.args.shape.vocab_size, SEQ, ROWS, 42)
    rows = [{k: v[i] for k, v in data.items()} for i in range(ROWS)]
    trainer = RecipeTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    res["hf"] = _losses(trainer)
    trainer.save_model()
    model.eval()
    with torch.no_grad():
        res["logits"] = model(input_ids=_probe(model.args.shape.vocab_size)).logits.float()
    if world == 1:
        res["refused"] = _refusals(model, out)
    del trainer, model

    # 2. Resume from checkpoint-2 of that run: steps 3 and 4 again.
    args = _training_args(hf_dir, world, save_strategy="steps", save_steps=2)
    model = build_hf_model(model_args, args)
    trainer = RecipeTrainer(model=model, args=args, train_dataset=rows)
    trainer.train(resume_from_checkpoint=str(hf_dir / "checkpoint-2"))
    res["resumed"] = _losses(trainer, after=2)
    del trainer, model

    # 3. The recipe's loop on the same batches.
    res["recipe"] = _recipe_losses(
        ckpt, out / f"recipe_w{world}", ["--data.seq_len=32", "--data.num_synthetic_samples=32"]
    )

    try:
        import trl  # noqa: F401
    except ImportError:  # optional (Python >= 3.11): the SFT tests skip
        if rank == 0:
            torch.save(res, out / f"w{world}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return

    # 4. RecipeSFTTrainer on the chat records, completion-only loss, packing off; the recipe loop on the
    # same JSONL through recipe.data (chat template, prompt masking, padded rows).
    from trl import SFTConfig

    from recipe.hf_trainer import RecipeSFTTrainer, load_hf_tokenizer

    records = _chat_records()
    # bf16=False: SFTConfig defaults to bf16 (build_hf_model follows it), the comparison is in fp32.
    sft = dict(cls=SFTConfig, completion_only_loss=True, max_length=CHAT_SEQ, learning_rate=SFT_LR, bf16=False)
    # Padded to the recipe rows' length: the very tensors the recipe loop sees (attention mask included).
    args = _training_args(out / f"sft_w{world}", world, packing=False, pad_to_multiple_of=CHAT_SEQ, **sft)
    model = build_hf_model(model_args, args)
    tok = load_hf_tokenizer(model)
    trainer = RecipeSFTTrainer(model=model, args=args, train_dataset=_sft_dataset(records), processing_class=tok)
    res["sft_rows"] = [(list(d["input_ids"]), list(d["labels"])) for d in trainer.train_dataset]
    trainer.train()
    res["sft"] = _losses(trainer)
    del trainer, model
    res["sft_recipe"] = _recipe_losses(
        ckpt,
        out / f"sft_recipe_w{world}",
        [
            f"--data.path={chat}",
            "--data.format=chat",
            "--data.packing=false",
            f"--data.seq_len={CHAT_SEQ}",
            f"--optimizer.lr={SFT_LR}",
        ],
    )

    # 5. Packing on (TRL's best-fit packing, padding-free rows with restarting position ids).
    args = _training_args(out / f"sft_packed_w{world}", world, packing=True, max_steps=PACKED_STEPS, **sft)
    model = build_hf_model(model_args, args)
    trainer = RecipeSFTTrainer(model=model, args=args, train_dataset=_sft_dataset(records), processing_class=tok)
    res["packed_rows"] = len(trainer.train_dataset)
    trainer.train()
    res["sft_packed"] = _losses(trainer)
    del trainer, model

    if rank == 0:
        torch.save(res, out / f"w{world}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _chat_records()))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, debug_nf4_ckpt, chat_jsonl) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("hf_trainer")
    for world in (1, 2):
        spawn(_worker, world, str(out), str(debug_nf4_ckpt), str(chat_jsonl), err_dir=out / f"err{world}", timeout=400)
    return {w: torch.load(out / f"w{w}.pt", weights_only=False) for w in (1, 2)} | {"dir": out}


def _close(a, b, tol=TOL, steps=STEPS):
    assert len(a) == len(b) == steps, (a, b)
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    assert diff <= tol, (a, b, diff)


@pytest.mark.parametrize("world", [1, 2])
def test_trainer_losses_equal_recipe_loop(runs, world):
    _close(runs[world]["hf"], runs[world]["recipe"])


def test_trainer_two_ranks_equal_one(runs):
    _close(runs[2]["hf"], runs[1]["hf"])
    assert runs[1]["hf"][-1] < runs[1]["hf"][0]  # it trains


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_trainer_checkpoint(runs, world):
    resumed, full = runs[world]["resumed"], runs[world]["hf"]
    assert len(resumed) == 2, resumed
    assert max(abs(a - b) for a, b in zip(resumed, full[2:], strict=True)) <= TOL, (resumed, full)


def test_saved_adapter_complete_and_reproduces_logits(runs, debug_nf4_ckpt):
    import bitsandbytes as bnb
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = runs["dir"] / "hf_w2"
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert len(sd) == 4 * 7 * 2 and cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    q = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert q.shape == (16, 256)  # every rank's rows, not one rank's half
    assert sd["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"].shape == (256, 16)
    assert all(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_B" in k)  # trained
    model = transformers.AutoModelForCausalLM.from_pretrained(str(debug_nf4_ckpt), dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see README: no in-place AVX512-BF16 repacking
            m.compute_dtype = torch.float32
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ours = runs[2]["logits"]
    with torch.no_grad():
        theirs = model(input_ids=_probe(ours.shape[-1])).logits.float()
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "name",
    [
        "fsdp",
        "deepspeed",
        "optim",
        "bf16",
        "gradient_checkpointing",
        "torch_compile",
        "label_smoothing_factor",
        "auto_find_batch_size",
        "neftune_noise_alpha",
    ],
)
def test_refused_settings_name_the_field(runs, name):
    msg = runs[1]["refused"][name]
    assert msg.startswith("UnsupportedSettingError"), msg
    assert f"TrainingArguments.{name} =" in msg, msg
    assert re.search(r"\b(set|remove|build|leave)\b", msg), msg


def test_sft_targets_equal_recipe_data_path(runs, debug_nf4_ckpt):
    pytest.importorskip("trl")
    from recipe.data import load_tokenizer, tokenize_records

    ours = tokenize_records(_chat_records(), load_tokenizer(str(debug_nf4_ckpt)), "chat", mask_prompt=True)
    theirs = runs[1]["sft_rows"]
    assert len(theirs) == len(ours)
    for s, (ids, labels) in zip(ours, theirs, strict=True):
        assert ids == s.input_ids
        assert labels == s.labels  # the assistant turn and its end-of-turn token, nothing else
        assert any(t != -100 for t in labels)


@pytest.mark.parametrize("world", [1, 2])
def test_sft_losses_equal_recipe_loop(runs, world):
    pytest.importorskip("trl")
    _close(runs[world]["sft"], runs[world]["sft_recipe"])


def test_sft_two_ranks_equal_one(runs):
    pytest.importorskip("trl")
    _close(runs[2]["sft"], runs[1]["sft"])
    assert runs[1]["packed_rows"] >= GBS * PACKED_STEPS  # one pass, no wrap-around
    assert runs[1]["packed_rows"] < len(_chat_records())  # rows hold several conversations
    _close(runs[2]["sft_packed"], runs[1]["sft_packed"], steps=PACKED_STEPS)


def _torchrun(script: str, out: Path, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "examples" / script)]
    cmd += ["--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1"]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


@pytest.mark.parametrize("script", ["hf_trainer_sft.py", "trl_sft.py"])
def test_example_under_torchrun(script, tmp_path, debug_nf4_ckpt):
    if script == "trl_sft.py":
        pytest.importorskip("trl")
    # The debug checkpoint the examples default to (./outputs/ckpt/debug_nf4), already written.
    (tmp_path / "outputs" / "ckpt").mkdir(parents=True)
    os.symlink(debug_nf4_ckpt, tmp_path / "outputs" / "ckpt" / "debug_nf4")
    out = tmp_path / "run"
    stdout = _torchrun(script, out, tmp_path)
    losses = json.loads(re.search(r"^losses: (.*)$", stdout, re.M).group(1))
    assert len(losses) == 4 and all(0 < x < 20 for x in losses), stdout
    from safetensors.torch import load_file

    sd = load_file(str(out / "adapter_model.safetensors"))
    assert len(sd) == 4 * 7 * 2
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 256)


def test_trainer_stops_after_max_nonfinite_steps(tmp_path, debug_nf4_ckpt):
    """The HF driver runs the recipe loop's step rules (recipe.step): a step whose loss is NaN is skipped
    and logged, and ``max_nonfinite_steps`` of them in a row stop ``train`` with TrainingDivergedError
    (the recipe loop's exit 3), instead of skipping forever. One process, 2 steps of one micro-batch."""
    import torch.distributed as dist

    from recipe.data import synthetic_dataset
    from recipe.hf_trainer import RecipeModelArguments, RecipeTrainer, build_hf_model
    from recipe.step import TrainingDivergedError

    args = _training_args(tmp_path, 1, max_steps=5, gradient_accumulation_steps=1)
    model = build_hf_model(RecipeModelArguments(model_name_or_path=str(debug_nf4_ckpt), max_nonfinite_steps=2), args)
    try:
        data = synthetic_dataset(model.args.shape.vocab_size, SEQ, 8, 42)
        rows = [{k: v[i] for k, v in data.items()} for i in range(8)]
        lora_b = next(p for n, p in model.named_parameters() if n.endswith("q_proj.lora_B.weight"))
        with torch.no_grad():
            local_tensor(lora_b).fill_(float("nan"))  # every forward's loss is NaN from now on
        trainer = RecipeTrainer(model=model, args=args, train_dataset=rows)
        with pytest.raises(TrainingDivergedError, match=r"2 optimizer steps in a row \(up to step 2\)"):
            trainer.train()
        assert trainer.state.global_step == 1  # step 1 skipped, step 2 stopped the run
        assert all(p.grad is None for p in model.parameters())  # nothing reached the optimizer
    finally:
        dist.destroy_process_group()
