"""Before a long job: will this machine run it? One line per check (the Kaggle notebook's preflight cell).

Checks, in order (each a ``Check``: ok, warn, FAIL or skipped, with the reason):

* torch: inside the supported range (``recipe.versions``);
* GPUs: at least ``ngpu`` CUDA devices of compute capability >= 7.5 (a T4's; below it the recipe's fp16
  kernels are not built), and the torch build has kernels for them;
* hub: the model's repo answers (its ``config.json`` is fetched: the estimate below needs the shape);
* estimate: ``recipe.estimate`` for this config on ``card`` x ``ngpu``: fits or not, and the time for
  the run's steps at the estimated tokens/s;
* host RAM: available memory against the estimate's host memory per rank x ranks;
* disk: free space where the model download and the checkpoints go against their sizes;
* layout: ``recipe.planner``'s choice for ``ngpu`` x ``card`` (the fastest layout that fits, with the
  runner-up and why in the report) next to the config's own.

A FAIL stops the notebook (``raise SystemExit``: one message, no traceback); warn does not. Without a
GPU the GPU check is skipped (CPU ranks, as in tests/test_notebook.py) unless this is a Kaggle session
(``KAGGLE_KERNEL_RUN_TYPE`` set), where no GPU means the accelerator was not switched on.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recipe.versions import torch_message

__all__ = ["Check", "check_disk", "check_gpus", "check_host_ram", "check_hub", "check_layout", "preflight"]

_GIB = 2**30
T4_CAPABILITY = (7, 5)


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "FAIL" or "skipped"
    detail: str

    def line(self) -> str:
        return f"{self.name:<9} {self.status:<7} {self.detail}"


def check_torch(version: str) -> Check:
    level, line = torch_message(version)
    return Check("torch", ("ok", "warn", "FAIL")[level], line)


def check_gpus(ngpu: int, devices: list[tuple[str, tuple[int, int]]], arch_list: list[str], on_kaggle: bool) -> Check:
    """``devices``: (name, compute capability) per visible GPU; ``arch_list``: torch.cuda.get_arch_list()."""
    if not devices:
        if on_kaggle:
            return Check("GPUs", "FAIL", "no GPU: set Settings > Accelerator to 'GPU T4 x2' and run again")
        return Check(
            "GPUs", "skipped", "no CUDA device here: the ranks run on CPU over gloo (the T4 checks need a GPU)"
        )
    names = ", ".join(f"{n} (compute capability {c[0]}.{c[1]})" for n, c in devices)
    if len(devices) < ngpu:
        return Check("GPUs", "FAIL", f"{len(devices)} GPU(s), NGPU={ngpu} needs {ngpu}: {names}; pick 'GPU T4 x2'")
    old = [n for n, c in devices if c < T4_CAPABILITY]
    if old:
        return Check("GPUs", "FAIL", f"{names}: below compute capability 7.5 (a T4); pick 'GPU T4 x2'")
    missing = sorted({f"sm_{c[0]}{c[1]}" for _, c in devices} - set(arch_list))
    if missing and not any(a.startswith("compute_") for a in arch_list):
        return Check(
            "GPUs", "FAIL", f"this torch build has no kernels for {missing} (it has {arch_list}): reinstall it"
        )
    t4 = all(c == T4_CAPABILITY for _, c in devices[:ngpu])
    detail = f"{names}" + ("" if t4 else "; not T4s: the T4 settings run, the T4 estimate does not apply")
    return Check("GPUs", "ok", detail)


def check_hub(
    model: str, fetch_config: Callable[[str], str], model_bytes: Callable[[str], int]
) -> tuple[Check, str, int]:
    """(check, directory holding config.json, bytes to download) for a hub repo id."""
    try:
        config = fetch_config(model)
        size = model_bytes(model)
    except Exception as e:  # any failure to reach the hub reads the same
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return (
            Check("hub", "FAIL", f"cannot reach {model!r} ({msg}); switch Settings > Internet on, check the id"),
            "",
            0,
        )
    return Check("hub", "ok", f"{model}: reachable, {size / 1e9:.2f} GB to download"), str(Path(config).parent), size


def available_ram_gib(meminfo: str | None = None) -> float | None:
    """MemAvailable of /proc/meminfo in GiB; None where there is none (not Linux)."""
    if meminfo is None:
        meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in meminfo.splitlines() if ":" in ln)}
    return kib["MemAvailable"] / 2**20 if "MemAvailable" in kib else None


def check_host_ram(need_gib: float, ngpu: int, per_rank: float, meminfo: str | None = None) -> Check:
    have = available_ram_gib(meminfo)
    if have is None:
        return Check("host RAM", "skipped", "/proc/meminfo has no MemAvailable (not Linux)")
    status = "ok" if have >= need_gib else "FAIL"
    fix = "" if status == "ok" else "; lower data.seq_len or NGPU, or turn parallelism.cpu_offload off"
    return Check(
        "host RAM",
        status,
        f"{have:.1f} GiB available, the estimate needs {ngpu} x {per_rank:.2f} = {need_gib:.1f} GiB{fix}",
    )


def check_disk(needs: dict[str, int]) -> Check:
    """``needs``: directory -> bytes it must take; directories on one file system add up."""
    by_dev: dict[int, tuple[list[str], str, int]] = {}
    for path, need in needs.items():
        p = Path(path)
        while not p.exists():
            p = p.parent
        paths, where, total = by_dev.get(os.stat(p).st_dev, ([], str(p), 0))
        by_dev[os.stat(p).st_dev] = (paths + [path], where, total + need)
    parts, status = [], "ok"
    for paths, where, need in by_dev.values():
        free = shutil.disk_usage(where).free
        if free < need:
            status = "FAIL"
        parts.append(f"{' + '.join(paths)}: {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB")
    fix = "" if status == "ok" else " (delete old runs in /kaggle/working, or lower checkpoint.keep_latest_k)"
    return Check("disk", status, "; ".join(parts) + fix)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _hub_fetchers():
    from huggingface_hub import HfApi, hf_hub_download

    def size(model: str) -> int:
        info = HfApi().model_info(model, files_metadata=True)
        return sum(s.size or 0 for s in info.siblings)

    return (lambda model: hf_hub_download(model, "config.json")), size


def preflight(
    config_file: str,
    model: str,
    synthetic_shape: str,
    ngpu: int,
    overrides: list[str],
    work: str,
    card: str = "t4",
    checkpointed_runs: int = 1,
) -> tuple[list[Check], str]:
    """Every check for a run of ``config_file`` (with ``overrides``) on ``ngpu`` ``card`` GPUs; returns the
    checks and the estimator's full report. ``checkpointed_runs``: runs under ``work`` that keep checkpoints."""
    import torch

    from recipe.config import load_config
    from recipe.estimate import estimate, format_estimate

    checks = [check_torch(torch.__version__)]
    cuda = torch.cuda.is_available()
    devices = [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())
    ]
    arch = torch.cuda.get_arch_list() if cuda else []
    checks.append(check_gpus(ngpu, devices, arch, on_kaggle=bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))))

    download, shape_dir = 0, model
    if synthetic_shape:
        checks.append(Check("hub", "skipped", f"a synthetic {synthetic_shape!r} checkpoint is written locally"))
    elif Path(model).is_dir():
        checks.append(Check("hub", "skipped", f"{model} is a local directory"))
    else:
        hub, shape_dir, download = check_hub(model, *_hub_fetchers())
        checks.append(hub)

    argv = ["--job.config_file", config_file, *overrides]
    argv += [f"--model.checkpoint={shape_dir}", f"--model.synthetic_shape={synthetic_shape}"]
    try:
        cfg = load_config(argv)
        e = estimate(cfg, ngpu, card, device="cuda" if cuda else "cpu")
    except Exception as err:  # the estimate informs: it must not hide the other checks
        checks.append(Check("estimate", "warn", f"recipe.estimate could not run: {err}"))
        return checks, ""
    t = cfg.training
    tokens = (t.global_batch_size if t.global_batch_size > 0 else t.micro_batch_size * ngpu) * cfg.data.seq_len
    seconds = t.steps * tokens / (e.tokens_per_s * ngpu)
    fits = e.train_peak <= e.card_gib
    checks.append(
        Check(
            "estimate",
            "ok" if fits else "warn",
            f"{ngpu} x {card.upper()}: training peak {e.train_peak:.2f} GiB per GPU of {e.card_gib:.1f}: "
            f"{'fits' if fits else 'does NOT fit'}; {t.steps} steps x {tokens:,} tokens at "
            f"{e.tokens_per_s * ngpu:,.0f} tokens/s: ~{_duration(seconds)} (recipe.estimate)",
        )
    )
    checks.append(check_host_ram(e.host * ngpu, ngpu, e.host))
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    keep = max(cfg.checkpoint.keep_latest_k, 1) + 1 if cfg.checkpoint.enable else 0  # +1: the one being written
    checks.append(check_disk({cache: download, work: checkpointed_runs * keep * e.checkpoint_data_bytes + _GIB}))
    layout, plan_report = check_layout(cfg, ngpu, card, available_ram_gib())
    checks.append(layout)
    return checks, format_estimate(e) + ("\n" + plan_report if plan_report else "")


def configured_layout(cfg, ngpu: int) -> str:
    """The config's layout in the planner's words (recipe.planner.Layout.describe)."""
    p, ac = cfg.parallelism, cfg.activation_checkpoint
    parts = [f"shard {ngpu}", f"micro-batch {cfg.training.micro_batch_size}", f"AC {ac.mode}"]
    parts += (["reshard" if p.reshard_after_forward else "no reshard"] if ngpu > 1 else []) + (
        ["cpu offload"] if p.cpu_offload else []
    )
    return ", ".join(parts)


def check_layout(cfg, ngpu: int, card: str, host_gib: float | None) -> tuple[Check, str]:
    """recipe.planner's choice for ``ngpu`` x ``card`` next to the config's layout, and its report."""
    from recipe.planner import best

    try:
        options, report = best(cfg, ngpu, card, None, host_gib)
    except Exception as err:  # no layout fits, or the planner cannot run: the runs below still use the config
        return Check("layout", "warn", f"recipe.planner: {str(err).splitlines()[0][:300]}"), ""
    chosen = options[0].layout.describe()
    mine = configured_layout(cfg, ngpu)
    same = chosen == mine
    detail = f"planned {chosen}; this config: {mine}" + (
        "" if same else " (--parallelism.plan=auto takes the plan; the notebook's 2-GPU run passes it)"
    )
    return Check("layout", "ok", detail), report
