"""The table of a benchmarks/single_gpu.sh output folder, and OUTDIR/single_gpu.json.

    python benchmarks/single_gpu_report.py OUTDIR

Reads NAME.summary.json (recipe runs, recipe/train.py's summary), hf_loop.json / hf_trainer.json /
adapter*.json (benchmarks/hf_plain_loop.py, benchmarks/hf_trainer_fsdp.py) and unsloth.json (the RESULT
line of .whl/tools/unsloth/run.sh); oracle.json (benchmarks/oracle.py) is printed as a table of its own.
All runs train the same workload, so one FLOP count serves them all:

  MFU = tokens/s x FLOPs per token without recomputation / the card's dense bf16 peak
  HFU = tokens/s x FLOPs per token with the recomputation full activation checkpointing does / that peak

(``recipe.metrics.model_flops_per_token`` with ``recompute=False`` / ``True``; the peak from
``recipe.metrics.PEAK_FLOPS`` by card name.) Runs on several ranks of one GPU report memory only.
Then issue 20's targets (``TARGETS``) for the runs the folder has, each met or not, also in the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOKENS_PER_STEP = 2 * 2048 * 4


def _load(f: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*.summary.json")):
        s = _load(f)
        if not s:
            continue
        rk = s["ranks"][0]
        rows.append(
            {
                "run": f.name.removesuffix(".summary.json"),
                "world": s["world"],
                "device": s["device"],
                "tokens_per_s": rk["tokens_per_s_per_gpu"] if s["world"] == 1 else None,
                "train_peak_gib": max(r["train_peak_gib"] or 0 for r in s["ranks"]),
                "load_peak_gib": max(r["load_peak_gib"] or 0 for r in s["ranks"]),
                "host_peak_gib": max(r["host_peak_rss_gib"] or 0 for r in s["ranks"]),
                "losses": s["losses"],
            }
        )
    for name in ("hf_loop", "hf_trainer", "adapter", "adapter2"):
        r = _load(out / f"{name}.json")
        if r is None:
            continue
        recs = r if isinstance(r, list) else [r]
        r0 = recs[0]
        world = r0.get("world", 1)
        rows.append(
            {
                "run": name,
                "world": world,
                "device": r0.get("device"),
                "tokens_per_s": (r0.get("tokens_per_s") or r0.get("tokens_per_s_per_gpu")) if world == 1 else None,
                "train_peak_gib": max(x["train_peak_gib"] for x in recs),
                "load_peak_gib": max(x["load_peak_gib"] for x in recs),
                "host_peak_gib": max(x.get("host_peak_gib") or x.get("host_peak_rss_gib") or 0 for x in recs),
                "losses": r0.get("losses"),
            }
        )
    for path in sorted(out.glob("unsloth*.json")):  # unsloth.json, unsloth_mb4.json (micro-batch 4 x 2)
        u = _load(path)
        if not u:
            continue
        rows.append(
            {
                "run": path.stem,
                "world": 1,
                "device": u.get("device"),
                "tokens_per_s": u.get("tok_per_s"),
                "train_peak_gib": u.get("train_peak_gib"),
                "load_peak_gib": u.get("load_peak_gib"),
                "host_peak_gib": u.get("host_peak_gib"),
                "losses": u.get("losses"),
                "error": u.get("error"),
            }
        )
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# Issue 20's targets, each (what, run, baseline run(s) in order of preference, measure, bound): tokens/s
# ratios must reach the bound, the memory difference (GiB) must not exceed it. A target is checked only
# when both of its runs are in the folder (one call: compare within it).
TARGETS = (
    ("default tokens/s >= 1.2x Unsloth's", "default", ("unsloth",), "speed", 1.2),
    ("default train peak <= Unsloth's", "default", ("unsloth",), "memory", 0.0),
    ("eager tokens/s >= the plain HF loop's", "eager", ("hf_loop",), "speed", 1.0),
    ("HF Trainer adapter >= 95 % of the recipe loop", "adapter", ("default", "compiled"), "speed", 0.95),
    ("moonshot: default >= 1.4x Unsloth", "default", ("unsloth",), "speed", 1.4),
)


def targets(rows: list[dict]) -> list[dict]:
    """Each target of ``TARGETS`` whose runs are present: the measured ratio (or GiB over) and whether it
    is met."""
    by = {r["run"]: r for r in rows}
    out = []
    for what, run, bases, kind, bound in TARGETS:
        base = next((b for b in bases if b in by), None)
        if run not in by or base is None:
            continue
        a, b = by[run], by[base]
        if kind == "speed":
            if not a["tokens_per_s"] or not b["tokens_per_s"]:
                continue
            value = a["tokens_per_s"] / b["tokens_per_s"]
            met, shown = value >= bound, f"{value:.3f}x ({a['tokens_per_s']:,.0f} / {b['tokens_per_s']:,.0f})"
        else:
            if a["train_peak_gib"] is None or b["train_peak_gib"] is None:
                continue
            value = a["train_peak_gib"] - b["train_peak_gib"]
            met, shown = value <= bound, f"{value:+.2f} GiB ({a['train_peak_gib']:.2f} / {b['train_peak_gib']:.2f})"
        out.append({"target": what, "run": run, "baseline": base, "value": value, "met": met, "shown": shown})
    return out


def main(out: Path) -> dict:
    from models.shapes import get_shape
    from recipe.metrics import model_flops_per_token, peak_flops_for_name

    shape = get_shape("llama3_1_8b")
    f_model = model_flops_per_token(shape, 2048, 64, ac_mode="full", recompute=False)
    f_hw = model_flops_per_token(shape, 2048, 64, ac_mode="full", recompute=True)
    rows = _rows(out)
    card = next((r["device"] for r in rows if r.get("device") and r["device"] != "cpu"), "?")
    peak = peak_flops_for_name(card) if card != "?" else None
    print(f"\ncard: {card}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s dense bf16")
    print(f"FLOPs/token: {f_model / 1e9:.1f} G without recompute (MFU), {f_hw / 1e9:.1f} G with (HFU)")
    name_w = max([18] + [len(r["run"]) for r in rows])  # long run names (a+section.key=value) stay aligned
    cols = [("run", name_w), ("ranks", 5), ("tok/s", 8), ("MFU", 6), ("HFU", 6), ("step s", 7)]
    cols += [("train", 7), ("load", 6), ("host", 6)]
    print(" ".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w) in enumerate(cols)) + "  (peaks GiB)")
    for r in rows:
        tps = r["tokens_per_s"]
        if tps and peak:
            r["mfu"], r["hfu"] = tps * f_model / peak, tps * f_hw / peak
        r["step_time_s"] = TOKENS_PER_STEP / tps if tps else None
        cells = [r["run"], str(r["world"]), _fmt(tps, ",.0f"), _fmt(r.get("mfu"), ".1%"), _fmt(r.get("hfu"), ".1%")]
        cells += [_fmt(r["step_time_s"], ".2f")]
        cells += [_fmt(r[k], ".2f") for k in ("train_peak_gib", "load_peak_gib", "host_peak_gib")]
        line = " ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, cols, strict=True))
        )
        print(line + (" ERROR: " + str(r["error"])[:80] if r.get("error") else ""))
    res = {"card": card, "peak_flops": peak, "flops_per_token": {"mfu": f_model, "hfu": f_hw}, "runs": rows}
    res["targets"] = targets(rows)
    if res["targets"]:
        print("\ntargets (issue 20; runs of this folder only):")
        for t in res["targets"]:
            verdict = "met    " if t["met"] else "NOT met"
            print(f"  {verdict}  {t['target']}: {t['shown']} [{t['run']} vs {t['baseline']}]")
    oracle = _load(out / "oracle.json")
    if oracle:
        from recipe.oracle import format_table

        print("\n" + format_table(oracle))
        res["oracle"] = {k: v for k, v in oracle.items() if k != "variants"}
        res["oracle"]["variants"] = [{k: v for k, v in r.items() if k != "rel"} for r in oracle["variants"]]
    (out / "single_gpu.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
