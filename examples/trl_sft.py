"""Supervised fine-tuning with TRL's ``SFTTrainer`` / ``SFTConfig`` on the recipe's sharded QLoRA model.

    torchrun --nproc-per-node 2 examples/trl_sft.py --output_dir out/trl_sft --max_steps 4 --logging_steps 1
    python examples/trl_sft.py --output_dir out/trl_sft --packing true       # one process, packed rows

Every ``SFTConfig`` option works as usual (``--packing``, ``--max_length``, ``--completion_only_loss``,
``--bf16``, ``--save_steps`` ...), next to the recipe's model and LoRA options
(``recipe.hf_trainer.RecipeModelArguments``). Without ``--model_name_or_path`` it trains the synthetic
debug model (written to ./outputs/ckpt/debug_nf4 on first use) on a small built-in chat set, on CPU or GPU.

Data (``--data_path``, JSONL): chat records (``messages``) become TRL's conversational prompt-completion
records (every turn before the last assistant turn is the prompt), instruction records
(``instruction`` / optional ``input`` / ``output``) plain prompt-completion ones, so the loss is on the
completions only (TRL's ``completion_only_loss``); ``text`` records train on everything.
Needs TRL (``pip install trl==1.16.0``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from recipe.data import read_records  # noqa: E402
from recipe.hf_trainer import RecipeModelArguments, build_hf_model, load_hf_tokenizer  # noqa: E402

DEBUG_CHECKPOINT = "./outputs/ckpt/debug_nf4"


@dataclass
class DataArguments:
    data_path: str = field(default="", metadata={"help": "JSONL file; empty: a small built-in chat set."})


def builtin_chat(n: int = 64) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            ]
        }
        for a, b in ((i % 9 + 1, (7 * i) % 11 + 1) for i in range(n))
    ]


def to_trl(record: dict) -> dict:
    """One record in a form TRL trains on the completion only (or, for text, on everything)."""
    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "completion": msgs[last : last + 1]}
    if "instruction" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "") + "\n\n"
        return {"prompt": prompt, "completion": record["output"]}
    return {"text": record["text"]}


def main() -> None:
    from datasets import Dataset
    from trl import SFTConfig

    from recipe.hf_trainer import RecipeSFTTrainer

    argv = sys.argv[1:]
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv.append("--use_cpu")  # accelerate needs it to see a torchrun launch on CPU as one distributed job
    parser = HfArgumentParser((RecipeModelArguments, DataArguments, SFTConfig))
    model_args, data_args, sft_args = parser.parse_args_into_dataclasses(args=argv)
    if not model_args.model_name_or_path:
        model_args.model_name_or_path, model_args.synthetic_shape = DEBUG_CHECKPOINT, "debug"
    if sft_args.report_to == ["all"]:
        sft_args.report_to = []

    model = build_hf_model(model_args, sft_args)  # was: from_pretrained(..., quantization_config) + peft_config
    tokenizer = load_hf_tokenizer(model)
    records = read_records(data_args.data_path) if data_args.data_path else builtin_chat()
    dataset = Dataset.from_list([to_trl(r) for r in records])
    trainer = RecipeSFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    trainer.save_model()  # the complete PEFT adapter (every rank's rows), in --output_dir
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"losses: {losses}", flush=True)
        print(f"adapter: {os.path.abspath(sft_args.output_dir)}", flush=True)


if __name__ == "__main__":
    main()
