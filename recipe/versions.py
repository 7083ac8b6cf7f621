"""The versions this recipe supports, the check at the start of training, and the notebook's install plan.

``SUPPORTED`` is the one home of the supported ranges; ``pyproject.toml`` repeats them as the package's
dependencies (and torch as its ``torch`` extra) and ``requirements.txt`` pins one tested version of
each inside them (``tests/test_versions.py`` checks that the three agree).

Why the ranges are what they are:

* torch ``>=2.11,<2.16``: FSDP2's extension points that ``models/quant.py`` and ``parallel/parallelize.py``
  use (``fsdp_pre_all_gather`` with five parameters, ``fsdp_post_all_gather(..., *, out=None)``,
  ``set_gradient_divide_factor``, ``set_force_sum_reduction_for_comms``) live in the private package
  ``torch.distributed.fsdp._fully_shard`` and may change in any minor release, so the range ends at the
  newest release that CI runs (``.ci/run``: the FSDP, 4-bit and checkpoint tests on the lowest and the
  newest; the whole suite on 2.13). A torch below the range stops training with exit code 2 (the GPU
  runs and the tests never ran it: a failure would come deep inside FSDP, or worse, as wrong numbers). A
  newer torch only warns: a new release usually keeps these hooks, and a user who has one (a fresh
  image) is better served by a run that says it is untested than by a refusal.
* the other packages: from the version the tests ran with (``requirements.txt``) up to the next major
  release, whose API breaks are announced; newer minors are not tested.

This module imports no third-party package at import time: the notebook runs it before it installs
anything (importing torch there would keep the image's torch loaded in the kernel after an upgrade).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "SUPPORTED",
    "NOTEBOOK",
    "TORCH_INDEX",
    "check_torch",
    "driver_cuda",
    "install",
    "installed_versions",
    "plan_install",
    "read_pins",
    "satisfies",
    "torch_message",
    "versions_line",
]

# Package -> supported range (PEP 440 subset: comma-separated >=, >, <=, <, ==, != on release numbers).
SUPPORTED: dict[str, str] = {
    "torch": ">=2.11,<2.16",
    "bitsandbytes": ">=0.50.2,<1",
    "safetensors": ">=0.8,<1",
    "huggingface_hub": ">=1.33,<2",
    "transformers": ">=5.17,<6",
    "peft": ">=0.21.2,<1",
}
# What the notebook needs beyond the runtime: the HF Trainer cell (accelerate) and the loss plot.
# "" accepts any installed version (matplotlib's pyplot calls used there are decades old).
NOTEBOOK: dict[str, str] = {"accelerate": ">=1.15,<2", "matplotlib": ""}

# PyTorch's own wheel indexes, one per CUDA build (PyPI's Linux torch is the newest CUDA only, which an
# older driver cannot run). Newest first; ``plan_install`` takes the newest the driver runs that has a
# supported torch.
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
CUDA_VARIANTS = ["cu132", "cu130", "cu129", "cu128", "cu126", "cu124", "cu121", "cu118"]

_OPS = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9.]*)\s*$")


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0), '2.16.0.dev20261201' -> (2, 16, 0)."""
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` is inside ``spec`` (e.g. '>=2.11,<2.16'; '' is any version). Local labels
    (+cu126) and pre-release suffixes are ignored: 2.16.0.dev is treated as 2.16.0."""
    v = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = _OPS.match(clause)
        if not m:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r}")
        op, bound = m.group(1), release(m.group(2))
        c = _cmp(v, bound)
        ok = {">=": c >= 0, ">": c > 0, "<=": c <= 0, "<": c < 0, "==": c == 0, "!=": c != 0}[op]
        if not ok:
            return False
    return True


def torch_message(version: str) -> tuple[int, str]:
    """(level, one line) for an installed torch: level 0 inside the range, 1 newer than tested (a
    warning), 2 older or unreadable (training stops with exit code 2)."""
    spec = SUPPORTED["torch"]
    install = f"pip install 'torch{spec}' (a CUDA build your driver runs: README, 'Install')"
    try:
        inside = satisfies(version, spec)
    except ValueError:
        return 2, f"torch {version!r} is not a version this recipe can read; supported: {spec}; {install}"
    if inside:
        return 0, f"torch {version}: inside the supported range {spec}"
    low = [c for c in spec.split(",") if c.strip().startswith(">")]
    if low and not satisfies(version, low[0]):
        return 2, f"torch {version} is older than the supported range {spec}; install a supported one: {install}"
    return 1, (
        f"warning: torch {version} is newer than the supported range {spec} (not tested; FSDP2's hooks may "
        f"have changed); to run a tested one: {install}"
    )


def check_torch(version: str | None = None) -> None:
    """The start-of-training check: a ConfigError (exit code 2) below the range, one warning line on
    stderr from rank 0 above it, nothing inside it."""
    if version is None:
        import torch

        version = torch.__version__
    level, line = torch_message(version)
    if level == 2:
        from recipe.config import ConfigError

        raise ConfigError(line)
    if level == 1 and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# What is installed, and what the notebook installs


def _dist_name(name: str) -> str:
    return name.replace("_", "-").lower()


def installed_versions(names) -> dict[str, str | None]:
    """Installed distribution versions (None where absent), read from package metadata: nothing is imported."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(_dist_name(name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_pins(requirements: str | os.PathLike) -> dict[str, str]:
    """``name==version`` lines of a requirements file -> {name: version} (markers and comments dropped)."""
    pins = {}
    for line in Path(requirements).read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).replace("-", "_").lower()] = m.group(2)
    return pins


def driver_cuda(nvidia_smi_output: str | None = None) -> tuple[int, int] | None:
    """The newest CUDA the installed driver runs, from nvidia-smi's header ('CUDA Version: 12.6'); None without one."""
    if nvidia_smi_output is None:
        try:
            nvidia_smi_output = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _variant_cuda(variant: str) -> tuple[int, int]:
    digits = variant[2:]
    return int(digits[:-1]), int(digits[-1])


def _torch_build_ok(version: str, cuda: tuple[int, int] | None) -> bool:
    """Whether an installed torch's build runs here: a +cuXYZ build needs a driver for at least that CUDA.
    Builds without a local label (PyPI's) are taken as they are."""
    m = re.search(r"\+cu(\d+)", version)
    if not m or cuda is None:
        return True
    return _cmp(_variant_cuda("cu" + m.group(1)), cuda) <= 0


def index_versions(index_url: str) -> list[str]:
    """torch versions an index offers (``pip index versions``); [] when it cannot be read."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "torch", "--index-url", index_url]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    m = re.search(r"Available versions:\s*(.*)", out)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def _newest(versions, spec: str) -> str | None:
    ok = [v for v in versions if satisfies(v, spec)]
    return max(ok, key=release) if ok else None


def plan_install(
    installed: Mapping[str, str | None],
    pins: Mapping[str, str],
    cuda: tuple[int, int] | None,
    torch_versions: Callable[[str], list[str]] = index_versions,
) -> tuple[list[list[str]], list[str]]:
    """The pip commands (argument lists after ``python -m pip``) that bring ``installed`` inside the ranges
    (``SUPPORTED`` and ``NOTEBOOK``), and one line per decision.

    Packages inside their range are kept as they are. A missing or out-of-range package gets its tested
    pin from ``pins`` (requirements.txt), else its range. torch, when it must change, comes from PyTorch's
    index of the newest CUDA build that the driver (``cuda``, from nvidia-smi) runs and that has a
    supported torch (``torch_versions(index_url)`` lists an index's versions; the CPU index without a
    driver); torchvision and torchaudio, built against the image's torch, are then removed (the recipe
    uses neither, and they fail to import beside another torch)."""
    ranges = {**SUPPORTED, **NOTEBOOK}
    commands: list[list[str]] = []
    notes: list[str] = []
    torch_v = installed.get("torch")
    if torch_v is not None and satisfies(torch_v, ranges["torch"]) and _torch_build_ok(torch_v, cuda):
        notes.append(f"torch {torch_v}: kept (supported: {ranges['torch']})")
    else:
        why = "missing" if torch_v is None else f"{torch_v} outside {ranges['torch']} or built for a newer CUDA"
        variants = [v for v in CUDA_VARIANTS if cuda is not None and _cmp(_variant_cuda(v), cuda) <= 0]
        variants = variants or (["cpu"] if cuda is None else [])
        chosen = None
        for variant in variants:
            url = TORCH_INDEX.format(variant=variant)
            best = _newest(torch_versions(url), ranges["torch"])
            if best is not None:
                chosen = (release_str(best), url, variant)
                break
        if chosen is None:
            raise RuntimeError(
                f"torch is {why}, and no PyTorch index for this driver (CUDA {cuda}) offers torch{ranges['torch']}: "
                "is Internet on (notebook settings)? A newer driver needs another machine image"
            )
        version, url, variant = chosen
        commands.append(["install", "-q", f"torch=={version}", "--index-url", url])
        stale = [p for p in ("torchvision", "torchaudio") if installed.get(p) is not None]
        if stale:
            commands.append(["uninstall", "-q", "-y", *stale])
        notes.append(f"torch {torch_v or '-'}: {why}; installing {version} ({variant} build) from {url}")
    wanted = []
    for name, spec in ranges.items():
        if name == "torch":
            continue
        have = installed.get(name)
        if have is not None and satisfies(have, spec):
            notes.append(f"{name} {have}: kept (supported: {spec or 'any'})")
            continue
        req = f"{_dist_name(name)}=={pins[name]}" if name in pins else f"{_dist_name(name)}{spec}"
        wanted.append(req)
        notes.append(f"{name} {have or '-'}: {'missing' if have is None else 'outside ' + spec}; installing {req}")
    if wanted:
        commands.append(["install", "-q", *wanted])
    return commands, notes


def release_str(version: str) -> str:
    """'2.15.0+cu126' -> '2.15.0' (pip takes the build from the index)."""
    return ".".join(str(p) for p in release(version))


def versions_line() -> str:
    """One line with the versions in this environment (metadata only; nothing imported)."""
    have = installed_versions([*SUPPORTED, *NOTEBOOK])
    return ", ".join(f"{k} {v or 'missing'}" for k, v in have.items())


def install(requirements: str | os.PathLike, run: Callable = subprocess.run) -> list[str]:
    """Plan and run the notebook's install (``plan_install`` on this machine); returns the decision lines."""
    names = [*SUPPORTED, *NOTEBOOK, "torchvision", "torchaudio"]
    commands, notes = plan_install(installed_versions(names), read_pins(requirements), driver_cuda())
    for args in commands:
        run([sys.executable, "-m", "pip", *args], check=True)
    return notes


if __name__ == "__main__":
    # python -m recipe.versions: the torch line and the versions in this environment.
    torch_v = installed_versions(["torch"])["torch"]
    print(torch_message(torch_v)[1] if torch_v else f"torch is not installed; supported: {SUPPORTED['torch']}")
    print(versions_line())
