"""notebooks/kaggle_2xT4.ipynb on CPU (nbclient). Top to bottom: the parameter cell switched to the debug
model, a local OIG JSONL written here and 2 CPU ranks, with the code found as a Kaggle user gets it (this
repository's sdist, built here, in an attached-dataset folder); any cell error fails the test, and the
printed results are checked against the runs' own files. Then the code-finding cell's other two ways
(a git URL; neither: one message, no traceback)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


def _parameters(tmp: Path, **changes) -> str:
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
        "REPO_URL": "",
        "REPO": "",
        "CODE_INPUT": str(tmp / "input"),
        "INSTALL": False,
        "WORK": str(tmp / "runs"),
    } | changes
    return "\n".join(f"{k} = {v!r}" for k, v in params.items())


def _stdout(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == name)


def _build(tmp: Path) -> tuple[Path, Path]:
    """This repository's sdist and wheel, built by setuptools from a copy of the tree (the build writes
    its egg-info next to the sources)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp / "src"
    for f in files:
        if (REPO / f).is_file() and not f.startswith(".venv"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    # build_sdist rewrites sys.argv: the folder is read first.
    code = "import sys; d = sys.argv[1]; from setuptools import build_meta as b; b.build_sdist(d); b.build_wheel(d)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp / "dist")], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,), (wheel,) = (tmp / "dist").glob("*.tar.gz"), (tmp / "dist").glob("*.whl")
    return sdist, wheel


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook with its outputs cleared"
    )
    (param_cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    kaggle_defaults = param_cell.source
    assert 'MODEL = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"' in kaggle_defaults and "NGPU = 2" in kaggle_defaults
    (tmp_path / "oig.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _oig_records(300)))
    # The code as a Kaggle dataset: the sdist (README, "Kaggle 2x T4") under CODE_INPUT/<dataset>/.
    sdist, wheel = _build(tmp_path)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        assert tar.getmember(f"{tar.getnames()[0].split('/')[0]}/run_train.sh").mode & 0o100
    assert {"run_train.sh", "train_configs/llama3_8b_qlora_t4.toml", "examples/hf_trainer_sft.py"} <= names
    assert {"requirements.txt", "recipe/versions.py", "notebooks/kaggle_2xT4.ipynb"} <= names
    in_wheel = zipfile.ZipFile(wheel).namelist()
    assert "recipe/versions.py" in in_wheel and "models/quant.py" in in_wheel
    assert not [n for n in in_wheel if n.startswith(("tests/", "train_configs/"))]
    (tmp_path / "input" / "qlora-fsdp2").mkdir(parents=True)
    shutil.copy(sdist, tmp_path / "input" / "qlora-fsdp2")
    param_cell.source = _parameters(tmp_path)

    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert f"code: {tmp_path / 'qlora-fsdp2'}" in out  # the sdist, unpacked next to WORK
    # The preflight: one line per check; on CPU the GPU check is skipped with its reason.
    assert re.search(r"^torch +ok +torch \S+: inside the supported range >=", out, re.M)
    assert "GPUs      skipped no CUDA device here: the ranks run on CPU over gloo" in out
    assert re.search(r"^estimate +ok +2 x T4: training peak \S+ GiB per GPU of 15.0: fits; 3 steps x", out, re.M)
    assert re.search(r"^host RAM +ok +\S+ GiB available, the estimate needs 2 x", out, re.M)
    assert re.search(r"^disk +ok ", out, re.M) and "recipe.estimate for this config on 2 x T4" in out
    assert re.search(r"^layout +ok +planned .+; this config: shard 2, micro-batch 2, AC full, reshard", out, re.M)

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


def test_code_cell_clones_a_git_url_and_without_code_says_the_two_ways(tmp_path):
    """The code-finding cell alone (one kernel): nothing attached and no REPO_URL -> one message naming both
    ways and no traceback; a git URL -> cloned and used."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    find = next(c for c in nb.cells[i + 1 :] if c.cell_type == "code")
    (tmp_path / "input" / "some-other-dataset").mkdir(parents=True)
    url = f"file://{REPO}"
    cells = [_parameters(tmp_path), find.source, _parameters(tmp_path / "b", REPO_URL=url), find.source]
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    none = nb.cells[1]
    assert [o.get("ename") for o in none.outputs if o.output_type == "error"] == []  # no traceback shown
    message = _stdout(none, "stderr").strip()
    assert message.startswith("No code for this notebook: attach this repository's sdist as a Kaggle dataset")
    assert "set REPO_URL in the parameter cell" in message and "\n" not in message
    assert _stdout(none) == ""
    cloned = tmp_path / "b" / "qlora-fsdp2"
    assert f"code: {cloned}" in _stdout(nb.cells[3]), nb.cells[3].outputs
    assert (cloned / "run_train.sh").is_file() and (cloned / ".git").is_dir()
