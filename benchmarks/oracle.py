"""The accuracy oracle on one GPU: every fast path against an fp32 eager reference (``recipe/oracle.py``).

    python benchmarks/oracle.py [--steps 20] [--variants a,b,...] [--out oracle.json] [--section.key=value ...]

e.g. on the 8B synthetic checkpoint, one process (``benchmarks/single_gpu.sh`` with ``RUNS=oracle`` runs
exactly this):

    python benchmarks/oracle.py --out /tmp/oracle.json --job.config_file train_configs/llama3_8b_qlora.toml \\
        --model.checkpoint=/tmp/ck_llama3_1_8b_nf4 --training.global_batch_size=2

Builds the fp32 eager reference, then each variant below, on the same checkpoint, batches and initial
LoRA weights; prints, per variant, the relative difference of the first step's LoRA gradients (median and
worst tensor), the largest loss difference over ``--steps`` steps and the verdict (median and worst each
at most 1.5x bf16 eager's), and writes them as JSON. Exit code 0 when every variant passes, 1 when one
fails, 2 on bad input. A variant whose switch this tree lacks (a config key that does not exist) is
listed as not run.

A new fast path is one more line in ``VARIANTS``: its name and the config overrides that select it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.config import ConfigError, load_config  # noqa: E402
from recipe.oracle import Variant, format_table, run_oracle, write_json  # noqa: E402
from recipe.train import Trainer  # noqa: E402

BF16 = "--training.mixed_precision_param=bfloat16"
EAGER, COMPILED = "--training.compile=false", "--training.compile=true"
AUTO = (
    "--training.compile=auto",
    "--training.compile_loss=auto",
    "--parallelism.host_embedding=auto",
    "--activation_checkpoint.offload=auto",
    "--activation_checkpoint.keep_outputs=auto",
)
FUSED = "--model.fuse_projections=true"  # q/k/v and gate/up as one 4-bit matrix each (issue 20, point 4)

VARIANTS = [
    Variant("bf16_eager", (BF16, EAGER)),  # the baseline the verdict scales
    Variant("bf16_compiled", (BF16, COMPILED)),
    # What a one-GPU run does by default: compile (blocks and loss), host embedding, activation offload.
    Variant("bf16_default", (BF16, *AUTO)),
    Variant("bf16_fused", (BF16, EAGER, FUSED)),
    Variant("bf16_fused_compiled", (BF16, COMPILED, FUSED)),
    # The T4 path: fp16 with the loss scaler, and the memory-efficient SDPA kernel, the one a T4 has.
    Variant(
        "fp16_eager",
        ("--training.mixed_precision_param=float16", EAGER, "--training.attention_backend=efficient"),
    ),
]
# By name only (--variants): bf16 eager again, the kernels' run-to-run noise; the compiled loss chunks.
EXTRA = [
    Variant("bf16_eager_again", (BF16, EAGER)),
    Variant("bf16_compiled_loss", (BF16, COMPILED, "--training.compile_loss=true")),
    # Compiled with the adapters' products added apart (before model.lora_epilogue, 2026-12-07 sixth session).
    Variant("bf16_compiled_apart", (BF16, COMPILED, "--model.lora_epilogue=false")),
    # The default keeping o/gate/up's frozen outputs in every second block (activation_checkpoint.keep_outputs).
    Variant(
        "bf16_keep",
        (
            BF16,
            *AUTO,
            "--activation_checkpoint.keep_outputs=o_proj,gate_proj,up_proj",
            "--activation_checkpoint.keep_every=2",
        ),
    ),
]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (losses compared)")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma-separated names")
    ap.add_argument("--out", default="", help="JSON file (default: <job.dump_folder>/oracle/oracle.json)")
    ap.add_argument("--tolerance", type=float, default=1.5, help="pass: at most this many times bf16 eager's")
    args, overrides = ap.parse_known_args(argv)
    known = {v.name: v for v in VARIANTS + EXTRA}
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or "bf16_eager" not in names or args.steps < 1:
        print(
            f"error: --variants must name bf16_eager (the baseline) and only known variants {sorted(known)}, "
            f"got unknown {unknown}; --steps must be >= 1. Fix the arguments.",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(overrides)  # bad overrides fail here, before any model is loaded
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dump = Path(cfg.job.dump_folder) / "oracle"
    result = run_oracle(Trainer, overrides, [known[n] for n in names], args.steps, dump, tolerance=args.tolerance)
    out = Path(args.out) if args.out else dump / "oracle.json"
    write_json(result, out)
    print(format_table(result))
    print(f"written: {out}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
