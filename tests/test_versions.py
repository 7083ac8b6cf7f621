"""recipe/versions.py: the supported ranges (one home, repeated by pyproject.toml and pinned inside by
requirements.txt), the torch check at the start of training, and the notebook's install plan on fake
installed versions, driver and PyTorch indexes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from recipe import versions
from recipe.config import ConfigError
from recipe.versions import NOTEBOOK, SUPPORTED, plan_install, read_pins, satisfies, torch_message
from tests.conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _deps(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in reqs:
        r = r.split(";")[0].strip()
        name = r.split(">")[0].split("<")[0].split("=")[0].split("!")[0].strip()
        out[name.replace("-", "_").lower()] = r[len(name) :].strip()
    return out


def test_pyproject_declares_the_supported_ranges_and_pins_sit_inside():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = _deps(project["dependencies"])
    deps.pop("tomli")
    extras = project["optional-dependencies"]
    assert deps == {k: v for k, v in SUPPORTED.items() if k != "torch"}
    assert _deps(extras["torch"]) == {"torch": SUPPORTED["torch"]}
    assert _deps(extras["notebook"]) == NOTEBOOK
    pins = read_pins(ROOT / "requirements.txt") | read_pins(ROOT / "requirements-dev.txt")
    for name, spec in {**SUPPORTED, **NOTEBOOK}.items():
        if name != "torch":
            assert satisfies(pins[name], spec), (name, pins[name], spec)
    # CI runs the whole suite on one torch and a subset on the lowest and the newest of the range (.ci/run).
    ci = (ROOT / ".ci" / "run").read_text()
    low, below = (versions.release(c.strip().lstrip("<>=")) for c in SUPPORTED["torch"].split(","))
    (ends,) = re.findall(r"^for torch_version in (.+); do$", ci, re.M)
    lowest, newest = ends.split()
    assert lowest == f"{low[0]}.{low[1]}.0" and newest.startswith(f"{below[0]}.{below[1] - 1}."), ends
    assert satisfies(torch.__version__, SUPPORTED["torch"]), "the suite's own torch must be a supported one"


@pytest.mark.parametrize(
    "version, spec, ok",
    [
        ("2.13.0+cpu", ">=2.11,<2.16", True),
        ("2.11.0", ">=2.11,<2.16", True),
        ("2.10.1", ">=2.11,<2.16", False),
        ("2.15.9", ">=2.11,<2.16", True),
        ("2.16.0.dev20261201+cu130", ">=2.11,<2.16", False),
        ("0.50.2", ">=0.50.2,<1", True),
        ("0.50.1", ">=0.50.2,<1", False),
        ("3.2", "", True),
        ("1.0", "==1", True),
    ],
)
def test_satisfies(version, spec, ok):
    assert satisfies(version, spec) is ok


def test_torch_check_levels_and_the_line(monkeypatch, capsys):
    level, line = torch_message("2.10.0+cu126")
    assert level == 2 and "2.10.0+cu126" in line and SUPPORTED["torch"] in line and "pip install" in line
    assert torch_message("2.13.0")[0] == 0
    level, line = torch_message("2.16.1")
    assert level == 1 and line.startswith("warning: torch 2.16.1") and "pip install" in line
    with pytest.raises(ConfigError, match="older than the supported range"):
        versions.check_torch("2.10.0")
    monkeypatch.setenv("RANK", "1")
    versions.check_torch("2.16.0")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    versions.check_torch("2.16.0")
    assert capsys.readouterr().err.startswith("warning: torch 2.16.0")
    versions.check_torch()  # the suite's own torch passes


def test_training_below_the_range_exits_2_with_one_line(tmp_path):
    """The check sits at the start of recipe.train: the real entry point, torch's version faked below the range."""
    code = (
        "import sys, torch; torch.__version__ = '2.10.0'; from recipe.train import main; "
        f"sys.exit(main(['--job.dump_folder={tmp_path}']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "torch 2.10.0 is older than the supported range >=2.11,<2.16" in r.stderr
    assert "Traceback" not in r.stderr


def _index(offers: dict[str, list[str]]):
    asked = []

    def versions_on(url):
        asked.append(url.rsplit("/", 1)[1])
        return offers.get(url.rsplit("/", 1)[1], [])

    return versions_on, asked


PINS = {"bitsandbytes": "0.50.2", "safetensors": "0.8.0", "huggingface_hub": "1.33.0", "transformers": "5.17.0"}
PINS |= {"peft": "0.21.2", "accelerate": "1.15.0", "matplotlib": "3.11.2"}
GOOD = {"bitsandbytes": "0.50.2", "safetensors": "0.8.1", "huggingface_hub": "1.40.0", "transformers": "5.20.0"}
GOOD |= {"peft": "0.22.0", "accelerate": "1.15.0", "matplotlib": "3.7.2"}


def test_plan_keeps_a_supported_image_as_it_is():
    index, asked = _index({})
    commands, notes = plan_install({"torch": "2.12.1+cu126", **GOOD}, PINS, (12, 6), index)
    assert commands == [] and asked == []
    assert any(n.startswith("torch 2.12.1+cu126: kept") for n in notes) and len(notes) == 8


def test_plan_replaces_an_old_torch_with_the_newest_build_the_driver_runs():
    index, asked = _index({"cu126": ["2.9.1+cu126", "2.13.0+cu126", "2.14.1+cu126"], "cu128": ["2.15.0+cu128"]})
    have = {"torch": "2.6.0+cu124", "torchvision": "0.21.0", **GOOD, "transformers": "4.53.0", "peft": None}
    commands, notes = plan_install(have, PINS, (12, 6), index)
    # cu12.6 driver: the cu13x and cu128 indexes are never asked; the newest supported torch on cu126.
    assert asked == ["cu126"]
    assert commands == [
        ["install", "-q", "torch==2.14.1", "--index-url", "https://download.pytorch.org/whl/cu126"],
        ["uninstall", "-q", "-y", "torchvision"],
        ["install", "-q", "transformers==5.17.0", "peft==0.21.2"],
    ]
    assert "transformers 4.53.0: outside >=5.17,<6; installing transformers==5.17.0" in notes


def test_plan_replaces_a_torch_built_for_a_newer_cuda_than_the_driver():
    index, asked = _index({"cu128": ["2.15.0+cu128"]})
    commands, _ = plan_install({"torch": "2.15.0+cu130", **GOOD}, PINS, (12, 8), index)
    assert commands == [["install", "-q", "torch==2.15.0", "--index-url", "https://download.pytorch.org/whl/cu128"]]
    assert asked == ["cu128"]  # cu129 and newer need a newer driver


def test_plan_without_a_reachable_index_says_what_to_switch_on():
    index, _ = _index({})
    with pytest.raises(RuntimeError, match="is Internet on"):
        plan_install({"torch": None, **GOOD}, PINS, (12, 4), index)


def test_driver_cuda_and_pins():
    assert versions.driver_cuda("| NVIDIA-SMI 560.35.03   Driver Version: 560.35.03   CUDA Version: 12.6 |") == (12, 6)
    assert versions.driver_cuda("") is None
    pins = read_pins(ROOT / "requirements.txt")
    assert pins["transformers"] == "5.17.0" and "tomli" not in pins


def test_install_here_keeps_everything():
    """install() on this machine (the suite's own environment, inside every range): no pip command runs."""
    calls = []
    notes = versions.install(ROOT / "requirements.txt", run=lambda *a, **k: calls.append(a))
    assert calls == [] and len(notes) == len(SUPPORTED) + len(NOTEBOOK) and all(": kept" in n for n in notes), notes
