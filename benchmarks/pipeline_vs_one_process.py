"""A pipeline run against one process on the same job: losses, exported adapter, per-rank memory.

    python benchmarks/pipeline_vs_one_process.py [--ngpu 2] [--ref-micro 1,4] [--dump DIR] [-- --section.key=value ...]

Runs ``run_train.sh`` once with ``NGPU`` pipeline ranks (``pipeline_parallel_degree = NGPU``,
``pipeline_parallel_microbatch_size`` 1 unless overridden) and once per ``--ref-micro`` value on one
process with that ``training.micro_batch_size``, all with the given overrides, then prints per
reference: the largest loss difference over the steps, the adapter's largest element difference and
the count of elements above 1e-4 (0 and 0 mean bit-identical), and each run's per-rank load / train
peaks from ``summary.json`` (CUDA allocated; null on CPU, where the host RSS peak is printed instead).

Why two references: the pipeline runs ``global batch / microbatch size`` micro-batches of
``pipeline_parallel_microbatch_size`` sequences. A one-process run with the same micro-batch size does
the same sums in the same order (bit-identical adapter); one with another micro-batch size computes
the same gradient with other fp32/bf16 roundings, which AdamW turns into updates of up to about the
learning rate on elements whose gradient is near zero (see README, "Pipeline parallelism").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(dump: Path, ngpu: int, overrides: list[str]) -> dict:
    cmd = [str(REPO / "run_train.sh"), f"--job.dump_folder={dump}", "--checkpoint.export_adapter=true", *overrides]
    env = dict(os.environ, NGPU=str(ngpu))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{dump.name}: failed ({done.returncode})\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((dump / "summary.json").read_text())


def _adapter(dump: Path):
    from safetensors.torch import load_file

    return load_file(str(dump / "adapter" / "adapter_model.safetensors"))


def _peaks(summary: dict) -> str:
    out = []
    for r in summary["ranks"]:
        if r["train_peak_gib"] is not None:
            out.append(f"rank {r['rank']}: load {r['load_peak_gib']:.2f} / train {r['train_peak_gib']:.2f} GiB")
        else:
            out.append(f"rank {r['rank']}: host RSS peak {r['host_peak_rss_gib']:.2f} GiB")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ngpu", type=int, default=2)
    ap.add_argument("--schedule", default="ZBVZeroBubble")
    ap.add_argument("--ref-micro", default="1,4", help="training.micro_batch_size of each one-process run")
    ap.add_argument("--dump", default="./outputs/pipeline_vs_one_process")
    ap.add_argument("overrides", nargs="*", help="--section.key=value overrides for every run (after --)")
    args = ap.parse_args(argv)
    root = Path(args.dump)
    pp = [
        f"--parallelism.pipeline_parallel_degree={args.ngpu}",
        f"--parallelism.pipeline_parallel_schedule={args.schedule}",
    ]
    pipe = _run(root / "pipeline", args.ngpu, [*pp, *args.overrides])
    got = _adapter(root / "pipeline")
    print(f"pipeline {args.schedule} x {args.ngpu}: losses {pipe['losses']}\n  {_peaks(pipe)}")
    for micro in args.ref_micro.split(","):
        ref = _run(root / f"one_micro{micro}", 1, [*args.overrides, f"--training.micro_batch_size={micro}"])
        want = _adapter(root / f"one_micro{micro}")
        dloss = max(abs(a - b) for a, b in zip(pipe["losses"], ref["losses"], strict=True))
        diffs = [(got[k].float() - want[k].float()).abs() for k in want]
        dmax = max(float(d.max()) for d in diffs)
        above = sum(int((d > 1e-4).sum()) for d in diffs)
        n = sum(d.numel() for d in diffs)
        print(
            f"1 process, micro_batch_size {micro}: losses {ref['losses']}\n"
            f"  max |loss diff| {dloss:.3e}; adapter max |diff| {dmax:.3e}, {above} of {n:,} elements above 1e-4\n"
            f"  {_peaks(ref)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
