"""Do compiled blocks train like eager ones? The first step's LoRA gradients, side by side.

    python benchmarks/compile_vs_eager.py [--section.key=value ...]     # e.g. the 8B config on a GPU

Builds the recipe's Trainer three times in one process (eager, eager again, compiled), runs one
optimizer step each on the same batch and compares the gradients before clipping: the eager-vs-eager
difference is the run-to-run noise of the kernels (non-deterministic reductions), the eager-vs-compiled
one what compile changes. Prints, per comparison, the step loss difference and the worst and median
relative difference ||g_a - g_b|| / ||g_a|| over the LoRA parameters.
"""

from __future__ import annotations

import statistics
import sys

import torch

from recipe.config import load_config
from recipe.train import Trainer


def first_step(argv: list[str], compile_: bool, tag: str) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = load_config([*argv, f"--training.compile={str(compile_).lower()}", "--training.steps=1"])
    cfg.job.dump_folder = f"{cfg.job.dump_folder}/compile_vs_eager_{tag}"
    cfg.checkpoint.export_adapter = False
    tr = Trainer(cfg)
    try:
        named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
        grads: dict[str, torch.Tensor] = {}
        clip = tr._clip

        def spy():
            grads.update({n: p.grad.full_tensor().float().cpu() for n, p in named})
            return clip()

        tr._clip = spy
        tr.model.train()
        loss = tr.train_step().loss
        return float(loss), grads
    finally:
        tr.close()


def compare(name: str, a, b) -> None:
    (la, ga), (lb, gb) = a, b
    rel = {n: float((ga[n] - gb[n]).norm() / ga[n].norm().clamp(min=1e-30)) for n in ga}
    worst = max(rel, key=rel.get)
    print(
        f"{name:<22} loss diff {abs(la - lb):.3e}  relative grad diff: median {statistics.median(rel.values()):.2e}, "
        f"worst {rel[worst]:.2e} ({worst})"
    )


def main() -> None:
    argv = sys.argv[1:]
    eager = first_step(argv, False, "eager")
    again = first_step(argv, False, "eager2")
    compiled = first_step(argv, True, "compiled")
    compare("eager vs eager", eager, again)
    compare("eager vs compiled", eager, compiled)


if __name__ == "__main__":
    main()
