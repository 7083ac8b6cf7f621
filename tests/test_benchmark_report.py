"""benchmarks/single_gpu_report.py: the issue-20 targets it prints from a single_gpu.sh folder are the
ratios of the runs' own numbers, checked only where both runs of a target are present."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("single_gpu_report", REPO / "benchmarks" / "single_gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recipe_run(out: Path, name: str, tps: float, train: float) -> None:
    rank = {"tokens_per_s_per_gpu": tps, "train_peak_gib": train, "load_peak_gib": 5.0, "host_peak_rss_gib": 7.0}
    (out / f"{name}.summary.json").write_text(json.dumps({"world": 1, "device": "cpu", "ranks": [rank], "losses": []}))


def test_targets_are_ratios_of_the_folders_runs(tmp_path, capsys):
    rep = _report()
    _recipe_run(tmp_path, "default", 12000.0, 8.5)
    _recipe_run(tmp_path, "compiled", 13000.0, 10.0)
    _recipe_run(tmp_path, "eager", 7000.0, 10.2)
    (tmp_path / "unsloth.json").write_text(json.dumps({"tok_per_s": 10000.0, "train_peak_gib": 8.94}))
    (tmp_path / "adapter.json").write_text(
        json.dumps({"tokens_per_s": 11300.0, "train_peak_gib": 8.5, "load_peak_gib": 5.0, "host_peak_gib": 6.0})
    )
    res = rep.main(tmp_path)
    got = {t["target"]: t for t in res["targets"]}
    speed = got["default tokens/s >= 1.2x Unsloth's"]
    assert speed["met"] and abs(speed["value"] - 1.2) < 1e-12
    memory = got["default train peak <= Unsloth's"]
    assert memory["met"] and abs(memory["value"] - (8.5 - 8.94)) < 1e-12
    assert not got["moonshot: default >= 1.4x Unsloth"]["met"]
    adapter = got["HF Trainer adapter >= 95 % of the recipe loop"]
    assert adapter["baseline"] == "default" and not adapter["met"]  # 11,300 / 12,000 = 0.94
    assert "eager tokens/s >= the plain HF loop's" not in got  # no hf_loop run in the folder
    out = capsys.readouterr().out
    assert "NOT met  HF Trainer adapter >= 95 % of the recipe loop: 0.942x (11,300 / 12,000)" in out
    assert json.loads((tmp_path / "single_gpu.json").read_text())["targets"] == res["targets"]
