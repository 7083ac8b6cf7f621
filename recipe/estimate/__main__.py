"""``python -m recipe.estimate``: the command line of the estimator and the planner (``--help``)."""

from __future__ import annotations

import sys

from recipe.config import ConfigError, load_config
from recipe.estimate import calibration_table, estimate, fit, format_estimate
from recipe.planner import best, layout_overrides

__all__ = ["USAGE", "main"]

USAGE = """usage: python -m recipe.estimate --job.config_file FILE [--section.key=value ...] [options]

Predicts, from the config alone (no weights, no GPU), one rank's GPU memory per phase, host memory,
the training checkpoint's size and tokens/s per GPU.

options:
  --ngpu N            ranks (GPUs) of the job (default 1)
  --card NAME         the GPU: h200, h100, a100, l4, t4 (adds tokens/s and the fit against its memory)
  --fit-gpu-gib G     also print the largest micro-batch and the largest seq_len under G GiB per GPU
  --plan              choose the layout for --ngpu x --card (recipe.planner): the fastest that fits,
                      with the runner-up and why; exit 2 when none fits (needs --card)
  --gpu-gib G         with --plan: the GPU memory to plan for instead of the card's (e.g. a capped GPU)
  --host-gib G        with --plan: host RAM of the machine (all ranks together), e.g. 29 on Kaggle
  --plan-args         with --plan: end with one line, the chosen layout as --section.key=value overrides
                      (what --parallelism.plan=auto would run on those GPUs; benchmarks/t4_emulation.sh)
  --calibration       predicted against every measured row (BENCHMARKS.md's estimator table)
  -h, --help          this help; the job keys (--section.key) are those of `python -m recipe.train --help`

The model's shape comes from model.checkpoint's config.json: a directory, or a hub repo id (the hub
cache, else config.json alone is fetched when online), else model.synthetic_shape."""


def _pop(argv: list[str], name: str) -> str | None:
    """Remove ``--name=V`` / ``--name V`` from argv; return V (the last occurrence)."""
    value = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
        elif a.startswith(name + "="):
            value = argv.pop(i).split("=", 1)[1]
        else:
            i += 1
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    try:
        want_plan = "--plan" in argv
        want_args = "--plan-args" in argv
        want_cal = "--calibration" in argv
        argv = [a for a in argv if a not in ("--plan", "--plan-args", "--calibration")]
        if want_args and not want_plan:
            raise ConfigError("--plan-args prints the plan's layout: add --plan (and --card)")
        ngpu_s, gib_s, card = _pop(argv, "--ngpu"), _pop(argv, "--fit-gpu-gib"), _pop(argv, "--card")
        gpu_s, host_s = _pop(argv, "--gpu-gib"), _pop(argv, "--host-gib")
        if want_cal:
            print(calibration_table())
            return 0
        try:
            ngpu = int(ngpu_s) if ngpu_s is not None else 1
            gib = float(gib_s) if gib_s is not None else None
            gpu_gib = float(gpu_s) if gpu_s is not None else None
            host = float(host_s) if host_s is not None else None
        except ValueError:
            raise ConfigError(
                f"--ngpu takes an integer and --fit-gpu-gib, --gpu-gib, --host-gib a number, got {ngpu_s!r} / "
                f"{gib_s!r} / {gpu_s!r} / {host_s!r}"
            ) from None
        if card is not None:
            card = card.lower()
        if want_plan and card is None:
            raise ConfigError("--plan needs the GPU: add --card (h200, h100, a100, l4, t4)")
        cfg = load_config(argv)
        e = estimate(cfg, ngpu, card)
        print(format_estimate(e))
        if gib is not None:
            f = fit(cfg, ngpu, gib)
            print(
                f"fits under {gib:g} GiB: micro_batch_size <= {f['micro_batch_size']} at seq_len {cfg.data.seq_len}; "
                f"seq_len <= {f['seq_len']:,} at micro_batch_size {cfg.training.micro_batch_size}"
            )
        if want_plan:
            options, report = best(cfg, ngpu, card, gpu_gib, host)
            print(report)
            if want_args:
                print(" ".join(layout_overrides(options[0].layout)))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
