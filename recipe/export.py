"""Export the LoRA adapter in PEFT's on-disk format, from a live (sharded) model or from a checkpoint.

Output directory::

    adapter_config.json         what ``peft.LoraConfig(...).to_dict()`` gives for task_type CAUSAL_LM
                                (written through peft when it is installed, else the same core fields)
    adapter_model.safetensors   ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``
                                (fp32 by default, bf16 with ``--dtype bfloat16``)

``PeftModel.from_pretrained(<HF model of the base checkpoint>, OUT)`` loads it. CLI::

    python -m recipe.export --checkpoint DUMP/checkpoint/step-N --out OUT [--dtype bfloat16] [--overwrite]

The CLI builds no model and needs no process group: it reads only the LoRA tensors of the DCP
checkpoint, in one process, whatever number of ranks wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import torch

from models.dtypes import DTYPES
from parallel.sharding import gather_rows
from recipe.checkpoint.layout import CheckpointLoadError, read_checkpoint_meta

__all__ = ["adapter_config", "peft_key", "write_adapter", "export_model_adapter", "export_checkpoint", "main"]

_EXPORT_DTYPES = ("bfloat16", "float32")


def peft_key(fqn: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.weight`` -> PEFT's saved key
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"base_model.model.{fqn}"


def adapter_config(rank: int, alpha: float, dropout: float, target_modules, base_model: str) -> dict:
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    targets = sorted(target_modules)
    kwargs = dict(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
        fan_in_fan_out=False,
    )
    try:
        from peft import LoraConfig

        cfg = LoraConfig(**kwargs).to_dict()
    except ImportError:  # the same core fields without peft
        cfg = dict(
            kwargs,
            peft_type="LORA",
            init_lora_weights=True,
            use_rslora=False,
            use_dora=False,
            modules_to_save=None,
            layers_to_transform=None,
            layers_pattern=None,
            rank_pattern={},
            alpha_pattern={},
            revision=None,
        )
    # JSON has no sets/enums: write them as PEFT's save_pretrained does.
    out = {}
    for k, v in cfg.items():
        if isinstance(v, set):
            v = sorted(v)
        elif hasattr(v, "value") and not isinstance(v, (str, int, float, bool)):
            v = v.value
        out[k] = v
    out["target_modules"] = targets
    out["base_model_name_or_path"] = base_model
    out["inference_mode"] = True
    return out


def _check_out_dir(out: Path) -> None:
    # A file at or above the output path is someone's data: the rename-into-place below would move it
    # aside (and mkdir would fail with a bare errno), so refuse before touching anything.
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():
                return
            where = "exists and is" if p == out else f"cannot be created: {p} is"
            raise NotADirectoryError(
                f"output path {out} {where} a file, not a directory; choose another output directory "
                "(the file is left untouched)"
            )


def write_adapter(
    out_dir, tensors: dict[str, torch.Tensor], config: dict, dtype: torch.dtype = torch.float32, overwrite: bool = True
) -> Path:
    """Write ``tensors`` (recipe FQNs -> full tensors) and ``config`` as a PEFT adapter directory.

    Written to a temp dir first, then moved into place, so ``out_dir`` is never half written.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    _check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        sd = {peft_key(k): v.detach().to("cpu", dtype).contiguous() for k, v in sorted(tensors.items())}
        save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_model_adapter(
    model,
    out_dir,
    lora,
    *,
    base_model,
    dtype=torch.float32,
    is_main=True,
    verbose=True,
    pp_group=None,
) -> Path | None:
    """Gather every trainable (LoRA) parameter with ``gather_rows`` (a collective: call it on every
    rank) and write the adapter on the main rank. Returns the directory on the main rank.

    ``lora`` is the ``[lora]`` config section (rank, alpha, dropout, target_modules). ``pp_group``: the
    pipeline ranks whose stages hold the other blocks; their tensors are gathered to the main rank."""
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"trainable parameter {name} is not a LoRA weight; cannot export it as an adapter")
        full = gather_rows(p.detach())
        if is_main or pp_group is not None:
            tensors[name] = full.detach().cpu()
    if pp_group is not None:
        # Every pipeline (one per data-parallel rank) gathers to its first rank; the main rank writes.
        parts = [None] * torch.distributed.get_world_size(pp_group)
        torch.distributed.all_gather_object(parts, tensors, group=pp_group)
        tensors = {k: v for part in parts for k, v in part.items()} if is_main else {}
    out = None
    if is_main:
        config = adapter_config(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules), base_model)
        out = write_adapter(out_dir, tensors, config, dtype)
        if verbose:
            print(f"exported PEFT adapter ({len(tensors)} tensors) to {out}", flush=True)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return out


def read_checkpoint_lora(ckpt_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, {fqn: full tensor}) of a complete recipe checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = read_checkpoint_meta(ckpt_dir)
    reader = FileSystemReader(str(ckpt_dir))
    md = reader.read_metadata().state_dict_metadata
    keys = [k for k in md if k.startswith("model.") and (".lora_A." in k or ".lora_B." in k)]
    if not keys:
        raise CheckpointLoadError(f"checkpoint {ckpt_dir} holds no LoRA tensors")
    sd = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return meta, {k.removeprefix("model."): v for k, v in sd.items()}


def export_checkpoint(ckpt_dir, out_dir, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    meta, tensors = read_checkpoint_lora(ckpt_dir)
    lora = meta["lora"]
    cfg = adapter_config(
        lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["target_modules"], meta["base_checkpoint"]
    )
    return write_adapter(out_dir, tensors, cfg, dtype, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipe.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a complete checkpoint directory (.../step-N)")
    ap.add_argument("--out", required=True, help="output directory of the PEFT adapter")
    ap.add_argument("--dtype", choices=_EXPORT_DTYPES, default="float32", help="dtype of the saved tensors")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, DTYPES[args.dtype], overwrite=args.overwrite)
    except (CheckpointLoadError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported PEFT adapter from {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
