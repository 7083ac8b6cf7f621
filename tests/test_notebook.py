"""notebooks/kaggle_2xT4.ipynb top to bottom on CPU (nbclient): the parameter cell switched to the
debug model, a local OIG JSONL written here and 2 CPU ranks; any cell error fails the test, and the
printed results are checked against the runs' own files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "kaggle_2xT4.ipynb"


def _oig_records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        a, b = i % 17 + 1, (5 * i) % 13 + 1
        text = f"<human>: What is {a} plus {b}?\n<bot>: {a} plus {b} is {a + b}."
        if i % 3 == 0:  # multi-turn, as some OIG records are
            text += f"\n<human>: And {a} times {b}?\n<bot>: {a * b}."
        recs.append({"text": text, "metadata": {"source": "test"}})
    return recs


def _parameters(tmp: Path) -> str:
    params = {
        "MODEL": str(tmp / "ckpt"),
        "SYNTHETIC_SHAPE": "debug",
        "DATASET": str(tmp / "oig.jsonl"),
        "DATASET_URL": "",
        "DATA_RECORDS": 300,
        "NGPU": 2,
        "STEPS": 3,
        "OFFLOAD_STEPS": 2,
        # The SIGTERM lands a few steps before the end: ~0.3 s steps leave it several seconds.
        "RESUME_STEPS": 16,
        "HF_STEPS": 2,
        "SEQ_LEN": 64,
        "OVERRIDES": [],
        "REPO": str(REPO),
        "REPO_URL": "",
        "INSTALL": False,
        "WORK": str(tmp / "runs"),
    }
    return "\n".join(f"{k} = {v!r}" for k, v in params.items())


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook with its outputs cleared"
    )
    (param_cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    kaggle_defaults = param_cell.source
    assert 'MODEL = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"' in kaggle_defaults and "NGPU = 2" in kaggle_defaults
    (tmp_path / "oig.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _oig_records(300)))
    param_cell.source = _parameters(tmp_path)

    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")

    runs = tmp_path / "runs"
    one = [json.loads(line)["loss"] for line in (runs / "one_gpu/metrics/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line)["loss"] for line in (runs / "fsdp2/metrics/metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    # 2 ranks give the 1-rank losses (fp16 compute on CPU), and the notebook prints that difference.
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    assert diff < 2e-3, (one, two)
    printed = float(re.search(r"max \|loss\(1 GPU\) - loss\(2 GPUs\)\| over 3 steps: (\S+)", out).group(1))
    assert abs(printed - diff) < 1e-4
    for name, world in (("fsdp2", 2), ("one_gpu", 1), ("offload", 2)):
        assert f"{name}: {world} rank(s) on cpu" in out
    assert "host RAM, all ranks:" in out
    # The interrupted run saved and exited 75, and its resumed metrics hold every step once.
    assert re.search(r"interrupted: exit code 75 .*checkpoints: \['step-\d+'\]", out), out[-3000:]
    resumed = [json.loads(line)["step"] for line in (runs / "resume/metrics/metrics.jsonl").read_text().splitlines()]
    assert resumed == list(range(1, 17))
    assert (runs / "hf_trainer/adapter_model.safetensors").is_file()
    assert (runs / "fsdp2/adapter/adapter_model.safetensors").is_file()
    assert "<human>: What is the capital of France?\n<bot>:" in out
