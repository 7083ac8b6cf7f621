"""`python -m recipe.export` with a bad --out: a clean error (exit 2) that names the path, and no data
is ever renamed, overwritten or deleted. The checkpoint read is stubbed: only the output side is tested
here (the end-to-end export is in test_checkpoint.py)."""

import json

import pytest
import torch

from recipe import export
from recipe.export import main, write_adapter

CKPT = "DUMP/checkpoint/step-1"


@pytest.fixture
def fake_checkpoint(monkeypatch):
    meta = {"lora": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["q_proj"]}, "base_checkpoint": "base"}
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
    }
    monkeypatch.setattr(export, "read_checkpoint_lora", lambda ckpt_dir: (meta, tensors))


def _listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_is_a_file(fake_checkpoint, tmp_path, capsys, overwrite):
    f = tmp_path / "adapter"
    f.write_text("precious")
    assert main(["--checkpoint", CKPT, "--out", str(f), *overwrite]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "not a directory" in err and "Traceback" not in err
    assert f.read_text() == "precious" and _listing(tmp_path) == ["adapter"]


def test_out_below_a_file(fake_checkpoint, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    for out in (f / "adapter", f / "a" / "b"):
        assert main(["--checkpoint", CKPT, "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and "not a directory" in err
    assert f.read_text() == "precious" and _listing(tmp_path) == ["notes.txt"]


def test_out_directory_still_works(fake_checkpoint, tmp_path):
    out = tmp_path / "x" / "adapter"
    assert main(["--checkpoint", CKPT, "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert main(["--checkpoint", CKPT, "--out", str(out)]) == 2  # not empty, no --overwrite
    assert main(["--checkpoint", CKPT, "--out", str(out), "--overwrite"]) == 0
    assert _listing(tmp_path) == [
        "x",
        "x/adapter",
        "x/adapter/adapter_config.json",
        "x/adapter/adapter_model.safetensors",
    ]


def test_write_adapter_never_replaces_a_file(tmp_path):
    f = tmp_path / "adapter"
    f.write_text("precious")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_adapter(f, {"a.lora_A.weight": torch.ones(1, 1)}, {}, overwrite=True)
    assert f.read_text() == "precious" and _listing(tmp_path) == ["adapter"]
