"""recipe/preflight.py: each check's verdict and its one line on fake machines (GPUs, hub, RAM, disk), and
the whole preflight on this CPU machine against recipe.estimate's own numbers."""

from __future__ import annotations

import re

import pytest
import torch

from recipe.config import load_config
from recipe.estimate import estimate
from recipe.preflight import check_disk, check_gpus, check_host_ram, check_hub, preflight
from tests.conftest import ROOT

T4 = ("Tesla T4", (7, 5))
ARCH = ["sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(
    "devices, arch, kaggle, status, text",
    [
        ([T4, T4], ARCH, True, "ok", "Tesla T4 (compute capability 7.5), Tesla T4 (compute capability 7.5)"),
        ([], [], False, "skipped", "no CUDA device here"),
        ([], [], True, "FAIL", "set Settings > Accelerator to 'GPU T4 x2'"),
        ([T4], ARCH, True, "FAIL", "1 GPU(s), NGPU=2 needs 2"),
        ([("Tesla P100-PCIE-16GB", (6, 0))] * 2, ARCH, True, "FAIL", "below compute capability 7.5"),
        ([T4, T4], ["sm_80", "sm_90"], True, "FAIL", "no kernels for ['sm_75']"),
        ([("NVIDIA H100", (9, 0))] * 2, ARCH, False, "ok", "not T4s"),
    ],
)
def test_gpu_check(devices, arch, kaggle, status, text):
    c = check_gpus(2, devices, arch, on_kaggle=kaggle)
    assert c.status == status and text in c.detail and "\n" not in c.line()


def test_hub_check_reports_an_unreachable_hub_with_the_fix():
    def offline(model):
        raise OSError("Temporary failure in name resolution")

    c, shape_dir, size = check_hub("unsloth/x", offline, lambda m: 0)
    assert c.status == "FAIL" and "switch Settings > Internet on" in c.detail and "name resolution" in c.detail
    c, shape_dir, size = check_hub("unsloth/x", lambda m: "/cache/snap/abc/config.json", lambda m: 5_700_000_000)
    assert (c.status, shape_dir, size) == ("ok", "/cache/snap/abc", 5_700_000_000) and "5.70 GB" in c.detail


def test_host_ram_and_disk():
    meminfo = "MemTotal:       32000000 kB\nMemAvailable:   30408704 kB\n"  # 29.0 GiB available
    assert check_host_ram(13.5, 2, 6.75, meminfo).status == "ok"
    low = check_host_ram(30.0, 2, 15.0, meminfo)
    assert low.status == "FAIL" and "29.0 GiB available, the estimate needs 2 x 15.00 = 30.0 GiB" in low.detail
    assert check_host_ram(1.0, 1, 1.0, "").status == "skipped"
    assert check_disk({str(ROOT): 1}).status == "ok"
    # Two folders on one file system add up; a missing folder is measured where it would be made.
    c = check_disk({str(ROOT): 1 << 60, str(ROOT / "not" / "there"): 1})
    assert c.status == "FAIL" and " + " in c.detail and "keep_latest_k" in c.detail


def test_preflight_on_this_machine_prints_the_estimators_numbers(tmp_path):
    config = str(ROOT / "train_configs" / "llama3_8b_qlora_t4.toml")
    checks, report = preflight(config, str(tmp_path / "ckpt"), "llama3_1_8b", 2, [], str(tmp_path))
    by = {c.name: c for c in checks}
    assert list(by) == ["torch", "GPUs", "hub", "estimate", "host RAM", "disk", "layout"]
    assert by["hub"].status == "skipped" and by["torch"].status == "ok"
    cfg = load_config(["--job.config_file", config, "--model.synthetic_shape=llama3_1_8b"])
    e = estimate(cfg, 2, "t4", device="cuda" if torch.cuda.is_available() else "cpu")
    m = re.search(
        r"training peak (\S+) GiB per GPU of 15.0: (fits|does NOT fit); 60 steps x 16,384 tokens at (\S+)",
        by["estimate"].detail,
    )
    assert m and float(m.group(1)) == round(e.train_peak, 2) and m.group(2) == "fits"
    assert int(m.group(3).replace(",", "")) == round(2 * e.tokens_per_s)
    assert f"2 x {e.host:.2f}" in by["host RAM"].detail
    assert report.startswith("estimate for 2 rank(s)")
    # The layout line names recipe.planner's choice, the one its report calls chosen.
    (chosen,) = re.findall(r"^  chosen: (.+)$", report, re.M)
    assert by["layout"].detail.startswith(f"planned {chosen}; this config: shard 2, micro-batch 2, AC full, reshard")
