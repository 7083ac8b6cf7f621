"""Print the table of a benchmarks/gpu_speed_and_determinism.sh output folder (and write compare.json).

    python benchmarks/compare_runs.py OUTDIR

Speed: tokens/s per GPU (median step after 3 warm-up steps, from each run's summary.json) and peaks.
Determinism: the det* runs' per-step losses and exported adapters, compared bit for bit against det1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _summary(run: Path) -> dict | None:
    f = run / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _adapter(run: Path):
    f = run / "adapter" / "adapter_model.safetensors"
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(f))


def main(out: Path) -> dict:
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    table = {}
    print(f"\n{'run':<12} {'tok/s/GPU':>10} {'train peak GiB':>15} {'load peak GiB':>14} {'last loss':>10}")
    for r in runs:
        s = _summary(r)
        if s is None:
            print(f"{r.name:<12} (no summary)")
            continue
        rk = s["ranks"][0]
        table[r.name] = {
            "device": s["device"],
            "tokens_per_s_per_gpu": rk["tokens_per_s_per_gpu"],
            "train_peak_gib": rk["train_peak_gib"],
            "load_peak_gib": rk["load_peak_gib"],
            "losses": s["losses"],
        }
        tps = rk["tokens_per_s_per_gpu"] or 0.0
        print(
            f"{r.name:<12} {tps:>10,.0f} {rk['train_peak_gib'] or 0:>15.2f} {rk['load_peak_gib'] or 0:>14.2f} "
            f"{s['losses'][-1] if s['losses'] else float('nan'):>10.6f}  ({s['device']}, {s['world']} rank(s))"
        )
    ref = out / "det1"
    if _summary(ref) is not None:
        base_losses, base_ad = _summary(ref)["losses"], _adapter(ref)
        print("\ndeterminism against det1 (1 rank, --job.deterministic, fp64 reduction):")
        for name in ("det2", "det3", "det_plain1"):
            s = _summary(out / name)
            if s is None:
                continue
            diffs = [abs(a - b) for a, b in zip(base_losses, s["losses"], strict=False)]
            ad = _adapter(out / name)
            same_ad = None
            if ad is not None and base_ad is not None:
                same_ad = ad.keys() == base_ad.keys() and all(bool((ad[k] == base_ad[k]).all()) for k in ad)
            same = s["losses"] == base_losses
            table[f"{name}_vs_det1"] = {
                "losses_identical": same,
                "max_abs_diff": max(diffs, default=None),
                "adapter_identical": same_ad,
            }
            print(
                f"  {name}: losses identical {same} (max |diff| {max(diffs, default=0):.3g} over {len(diffs)} "
                f"steps), adapter identical {same_ad}"
            )
        print("  det1 losses:", [f"{x:.9f}" for x in base_losses])
    (out / "compare.json").write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main(Path(sys.argv[1]))
