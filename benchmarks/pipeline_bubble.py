"""Idle fraction per pipeline rank for several schedules, the same layout and micro-batches, in one run.

    python benchmarks/pipeline_bubble.py [--ngpu 2] [--schedules 1F1B,ZBVZeroBubble,...] [-- --section.key=value ...]

Runs ``run_train.sh`` once per schedule (``NGPU`` ranks, ``pipeline_parallel_degree = NGPU``) with the
given overrides and prints, per schedule and rank, the seconds spent in forward (F), input backward (B),
weight backward (W) and the rest of the step (idle: send/recv waits and the bubble), from the
``pipeline`` entry each run writes into ``<dump>/summary.json`` (``parallel.pipeline.ActionTimer``; the
first step, which also infers the stage shapes, is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "1F1B,Interleaved1F1B,InterleavedZeroBubble,ZBVZeroBubble,DualPipeV"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ngpu", type=int, default=2)
    ap.add_argument("--schedules", default=DEFAULT)
    ap.add_argument("--dump", default="./outputs/pipeline_bubble")
    ap.add_argument("overrides", nargs="*", help="--section.key=value overrides for every run (after --)")
    args = ap.parse_args(argv)
    print(f"{'schedule':<22} {'rank':>4} {'F s':>7} {'B s':>7} {'W s':>7} {'idle s':>7} {'step s':>7} {'idle %':>7}")
    for sched in args.schedules.split(","):
        dump = Path(args.dump) / sched
        cmd = [
            str(REPO / "run_train.sh"),
            f"--parallelism.pipeline_parallel_degree={args.ngpu}",
            f"--parallelism.pipeline_parallel_schedule={sched}",
            f"--job.dump_folder={dump}",
            "--checkpoint.export_adapter=false",
            *args.overrides,
        ]
        env = dict(os.environ, NGPU=str(args.ngpu))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{sched}: failed ({done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        for r in json.loads((dump / "summary.json").read_text())["pipeline"]["ranks"]:
            print(
                f"{sched:<22} {r['rank']:>4} {r['F']:>7.3f} {r['B']:>7.3f} {r['W']:>7.3f} {r['idle']:>7.3f} "
                f"{r['step']:>7.3f} {100 * r['idle_fraction']:>6.1f}%"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
