"""The plain single-GPU baseline: HF LlamaForCausalLM + peft LoRA + bitsandbytes 4-bit, a hand loop.

    python benchmarks/hf_plain_loop.py --checkpoint CKPT --out RESULT.json [--steps 12] [--no-ac]

What most QLoRA users run on one GPU without a framework: ``from_pretrained`` of the pre-quantized
checkpoint, LoRA r=64 alpha=128 on the seven projections, non-reentrant gradient checkpointing, bf16
autocast, fused AdamW; random token ids, micro-batch 2 x seq 2048, accumulation 4 (16,384 tokens per
step). Writes tokens/s (median over the steps after 3 warm-up steps), load and train peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from models.llama import LORA_TARGETS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--no-ac", action="store_true")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, device_map={"": 0})
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    model.config.use_cache = False
    model.train()  # HF checkpoints (and drops out) only in training mode
    if not args.no_ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for _ in range(args.accum):
            ids = torch.randint(0, vocab, (args.micro, args.seq), device=dev, generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / args.accum
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(total))
    tokens = args.micro * args.seq * args.accum
    timed = times[3:] or times
    res = {
        "path": "HF + peft + bitsandbytes, plain loop" + (", no AC" if args.no_ac else ", full AC"),
        "device": torch.cuda.get_device_name(dev),
        "tokens_per_s": tokens / statistics.median(timed),
        "step_time_s": statistics.median(timed),
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "load_peak_gib": load_peak,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        "losses": losses,
    }
    print("RESULT " + json.dumps(res))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
