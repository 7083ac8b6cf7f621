"""Supervised fine-tuning with HF ``transformers.Trainer`` on the recipe's sharded QLoRA model.

    torchrun --nproc-per-node 2 examples/hf_trainer_sft.py --output_dir out/hf_sft --max_steps 4 --logging_steps 1
    python examples/hf_trainer_sft.py --output_dir out/hf_sft                  # one process

Every ``TrainingArguments`` option works as usual (``--bf16``, ``--gradient_accumulation_steps``,
``--save_steps``, ``--resume_from_checkpoint`` ...), next to the recipe's model and LoRA options
(``recipe.hf_trainer.RecipeModelArguments``: ``--model_name_or_path``, ``--lora_r``, ``--cpu_offload`` ...)
and the data options below. Without ``--model_name_or_path`` it trains the synthetic debug model (written
to ./outputs/ckpt/debug_nf4 on first use) on a small built-in chat data set, on CPU or GPU.

The data goes through the recipe's own pipeline (``recipe.data``: JSONL/Parquet text, instruction or chat
records, the tokenizer's chat template, prompt masking, packing) into fixed-length rows.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from recipe.data import pack_or_pad, read_records, tokenize_records  # noqa: E402
from recipe.hf_trainer import RecipeModelArguments, RecipeTrainer, build_hf_model, load_hf_tokenizer  # noqa: E402

DEBUG_CHECKPOINT = "./outputs/ckpt/debug_nf4"


@dataclass
class DataArguments:
    data_path: str = field(default="", metadata={"help": "JSONL or Parquet file; empty: a small built-in chat set."})
    data_format: str = field(default="auto", metadata={"help": "auto, text, instruction, chat or oig."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training row."})
    packing: bool = field(default=False, metadata={"help": "Pack samples into full rows (else pad each one)."})
    mask_prompt: bool = field(default=True, metadata={"help": "Train on responses / assistant turns only."})


def builtin_chat(n: int = 64) -> list[dict]:
    """Short arithmetic conversations (enough to watch the loss fall on the debug model)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            ]
        }
        for a, b in ((i % 9 + 1, (7 * i) % 11 + 1) for i in range(n))
    ]


def rows_dataset(data_args: DataArguments, tokenizer) -> list[dict]:
    records = read_records(data_args.data_path) if data_args.data_path else builtin_chat()
    samples = tokenize_records(records, tokenizer, data_args.data_format, mask_prompt=data_args.mask_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pack_or_pad(samples, data_args.seq_len, data_args.packing, int(pad))
    return [{k: v[i] for k, v in rows.items()} for i in range(rows["input_ids"].shape[0])]


def main() -> None:
    argv = sys.argv[1:]
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv.append("--use_cpu")  # accelerate needs it to see a torchrun launch on CPU as one distributed job
    parser = HfArgumentParser((RecipeModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not model_args.model_name_or_path:
        model_args.model_name_or_path, model_args.synthetic_shape = DEBUG_CHECKPOINT, "debug"
    training_args.report_to = [] if training_args.report_to == ["all"] else training_args.report_to

    model = build_hf_model(model_args, training_args)  # was: from_pretrained(..., quantization_config) + get_peft_model
    tokenizer = load_hf_tokenizer(model)
    trainer = RecipeTrainer(
        model=model, args=training_args, train_dataset=rows_dataset(data_args, tokenizer), processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the complete PEFT adapter (every rank's rows), in --output_dir
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"losses: {losses}", flush=True)
        print(f"adapter: {os.path.abspath(training_args.output_dir)}", flush=True)


if __name__ == "__main__":
    main()
