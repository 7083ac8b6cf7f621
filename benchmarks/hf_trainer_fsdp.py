"""Baseline: what users run today. HF Trainer + peft + bitsandbytes 4-bit, FSDP2 through accelerate.

    torchrun --standalone --nproc_per_node 2 benchmarks/hf_trainer_fsdp.py --checkpoint DIR --out result.json

Same workload as the recipe benchmark (LoRA r/alpha on all seven projections, seq, micro-batch,
global batch, gradient checkpointing, bf16, random tokens from the same generator family) so that
numbers can be put side by side. Records per rank: peak GPU memory after load, peak in training,
host peak RSS, and tokens/s per GPU (median step time over steps after the warm-up ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=128.0)
    ap.add_argument("--no-fsdp", action="store_true", help="single-process HF Trainer (no FSDP)")
    ap.add_argument(
        "--recipe",
        action="store_true",
        help="the same Trainer workload on this recipe's model (recipe.hf_trainer: build_hf_model + RecipeTrainer)",
    )
    ap.add_argument("--ddp-backend", default=None, help="e.g. gloo for several ranks on one GPU (one_gpu_ranks.py)")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    accum = args.global_batch // (args.micro_batch * world)
    fsdp_kwargs = {}
    if world > 1 and not args.no_fsdp and not args.recipe:
        fsdp_kwargs = dict(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "fsdp_version": 2,
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "activation_checkpointing": True,
            },
        )
    targs = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "hf_out"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum,
        max_steps=args.steps,
        learning_rate=2e-4,
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # The recipe model checkpoints itself (built with activation_checkpointing="full").
        gradient_checkpointing=not fsdp_kwargs and not args.recipe,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_backend=args.ddp_backend,
        **fsdp_kwargs,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.recipe:
        from recipe.hf_trainer import RecipeModelArguments, RecipeTrainer, build_hf_model

        margs = RecipeModelArguments(
            model_name_or_path=args.checkpoint,
            lora_r=args.rank,
            lora_alpha=args.alpha,
            activation_checkpointing="full",
        )
        model = build_hf_model(margs, targs)
    else:
        device_map = {"": local_rank} if cuda else {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map=device_map, dtype=torch.bfloat16)
        for m in model.modules():  # the CPU repacking pitfall (REFERENCE.md section 4)
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        from models.llama import LORA_TARGETS

        targets = list(LORA_TARGETS)
        lora = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora)
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    vocab = model.config.vocab_size
    n_rows = args.global_batch * (args.steps + 1)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, min(vocab, 256), (n_rows, args.seq_len), generator=gen)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n_rows

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i].clone()}

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    trainer_cls = RecipeTrainer if args.recipe else Trainer
    trainer = trainer_cls(model=model, args=targs, train_dataset=DS(), callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = step_times[args.warmup :] or step_times
    tok_per_gpu = args.global_batch * args.seq_len / statistics.median(timed) / world
    record = {
        "path": "recipe_hf_trainer" if args.recipe else "hf_trainer_fsdp2" if fsdp_kwargs else "hf_trainer",
        "world": world,
        "rank": int(os.environ.get("RANK", "0")),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "load_peak_gib": load_peak,
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tokens_per_s_per_gpu": tok_per_gpu,
        "step_times_s": step_times,
        "losses": losses,
    }
    records = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(records, record)
    else:
        records = [record]
    if record["rank"] == 0:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        print(json.dumps({k: v for k, v in record.items() if k != "step_times_s"}))


if __name__ == "__main__":
    main()
