"""Synthetic Llama checkpoints with random weights, in the on-disk format of HF transformers.

``write_synthetic_checkpoint`` writes what ``save_pretrained`` writes for a ``LlamaForCausalLM`` loaded with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` (or a plain bf16 model with ``quant_type="none"``), so that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it, plus a tiny byte-level tokenizer.

For each quantized linear ``P`` (q/k/v/o/gate/up/down inside the decoder layers) the keys are ``P.weight``
(uint8, (N*K/2, 1)) and ``P.weight.<k>`` for every ``k`` of ``QuantState.as_dict(packed=True)``:
``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` (double quant only) and
``quant_state.bitsandbytes__nf4`` / ``__fp4``.  Embeddings, norms and lm_head stay in ``dtype``.

Weights are drawn tensor by tensor from a generator seeded by (seed, parameter name), so a file's content
does not depend on the shard layout or on the quantization type (the same seed gives the same underlying
weights for nf4, fp4 and none).  Streams differ between CPU and CUDA generators: a checkpoint is
reproducible for a given (seed, device type).

CLI::

    python -m models.synthetic --shape llama3_8b --out DIR [--quant nf4|fp4|none] [--no-double-quant]
        [--blocksize 64] [--seed 0] [--shard-size-gb 2] [--device cpu|cuda] [--no-tokenizer] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import pathlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from models.dtypes import dtype_name
from models.shapes import LlamaShape, get_shape, shape_to_hf_config

__all__ = [
    "write_synthetic_checkpoint",
    "write_tokenizer",
    "quantization_config",
    "MARKER_FILE",
    "QUANT_LINEARS",
]

MARKER_FILE = "synthetic_checkpoint.json"
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
_BPE_SIZE = 384  # 256 byte tokens + 128 merges; special tokens follow at 384..389
_WEIGHT_STD = 0.02
_NORM_NOISE = 0.1

# Files this module writes (and, with overwrite=True, may remove again from a previous synthetic checkpoint).
_OWN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class _NoKernelsPackageWarning(logging.Filter):
    """Drops bitsandbytes' import-time warning that the optional ``kernels`` package is not installed.

    On AVX512-BF16 CPUs bitsandbytes 0.50 tries ``from kernels import get_kernel`` for a CPU gemm that
    writing a checkpoint never uses, and logs a warning when the package is absent: noise after every
    successful write. Only that cause is dropped: a ``kernels`` package that is installed but fails
    to load still warns.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load CPU gemm_4bit_forward") and "No module named 'kernels'" in msg)


def _quiet_missing_kernels_warning() -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger bitsandbytes creates at import
    if not any(type(f).__name__ == _NoKernelsPackageWarning.__name__ for f in logger.filters):
        logger.addFilter(_NoKernelsPackageWarning())


_quiet_missing_kernels_warning()


def _is_own_file(name: str) -> bool:
    if name in _OWN_FILES or name == MARKER_FILE:
        return True
    if name.startswith("model-") and name.endswith(".safetensors"):
        return True
    return name.startswith(".model-") and name.endswith(".partial")


# --------------------------------------------------------------------------------------------------------------
# config


def quantization_config(
    quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16"
) -> dict[str, Any]:
    """The ``quantization_config`` that transformers 5.17 ``save_pretrained`` writes for ``load_in_4bit``."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


# --------------------------------------------------------------------------------------------------------------
# tokenizer


_CORPUS = """\
The quick brown fox jumps over the lazy dog. A synthetic checkpoint holds random weights in the format
that the training recipe reads. The model learns nothing from random data, but the shapes, the keys and
the quantization are the same as those of a real Llama model. Hello world! This is a small corpus for a
tiny test tokenizer: the system prompt, the user message and the assistant answer are rendered with a
header for each role. Training with low rank adapters on a quantized base model saves memory; sharding
the parameters over several devices saves more. Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and some
punctuation, like commas, periods; colons: and (parentheses) are part of the text too.
"""

_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (bytes that print stay themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _train_merges(n_new_tokens: int) -> list[tuple[str, str]]:
    """A deterministic greedy BPE over the built-in corpus (most frequent pair; ties: smallest pair).

    Stops once the merges have produced ``n_new_tokens`` distinct new tokens (or the corpus is exhausted)."""
    import re

    table = _bytes_to_unicode()
    # GPT-2 style split: optional leading space + run of letters / digits / other.
    words = re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", _CORPUS)
    counts = Counter("".join(table[b] for b in w.encode("utf-8")) for w in words)
    seqs = {w: list(w) for w in counts}
    merges: list[tuple[str, str]] = []
    new_tokens: set[str] = set()
    while len(new_tokens) < n_new_tokens:
        pairs: Counter = Counter()
        for w, c in counts.items():
            s = seqs[w]
            for a, b in itertools.pairwise(s):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_tokens.add(best[0] + best[1])
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def _build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = _train_merges(_BPE_SIZE - 256)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = SPECIAL_TOKENS[0]
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return tok


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int | None = None) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the special ids."""
    out = pathlib.Path(out_dir)
    tok = _build_tokenizer()
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and n > vocab_size:
        raise ValueError(f"synthetic tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    bos, eos, pad = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tok_cfg = {
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=2) + "\n"
    )
    return {
        "bos_token_id": ids[bos],
        "eos_token_id": ids[eos],
        "pad_token_id": ids[pad],
        "end_of_text_id": ids["<|end_of_text|>"],
        "vocab_size": n,
    }


# --------------------------------------------------------------------------------------------------------------
# weights


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _randn(shape: tuple[int, ...], seed: int, key: str, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(_key_seed(seed, key))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _param_plan(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in the order HF lists them; kind is 'embed', 'norm', 'linear' or 'lm_head'."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * shape.head_dim
    out_in = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    yield "model.embed_tokens.weight", (shape.vocab_size, h), "embed"
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,), "norm"
        for name in QUANT_LINEARS[:4]:
            yield p + name + ".weight", out_in[name], "linear"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        for name in QUANT_LINEARS[4:]:
            yield p + name + ".weight", out_in[name], "linear"
    yield "model.norm.weight", (h,), "norm"
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (shape.vocab_size, h), "lm_head"


def _make_group(
    name: str,
    pshape: tuple[int, ...],
    kind: str,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    quant_type: str,
    double_quant: bool,
    blocksize: int,
) -> dict[str, torch.Tensor]:
    """The tensors (on CPU) stored for one parameter: the weight, plus its quant state when quantized."""
    w = _randn(pshape, seed, name, device)
    if kind == "norm":
        w = 1.0 + _NORM_NOISE * w
    else:
        w = w * _WEIGHT_STD
    w = w.to(dtype)
    if kind != "linear" or quant_type == "none":
        return {name: w.cpu().contiguous()}
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant, quant_storage=torch.uint8
    )
    group = {name: packed.cpu().contiguous()}
    for k, v in state.as_dict(packed=True).items():
        group[f"{name}.{k}"] = v.cpu().contiguous()
    return group


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER_FILE).is_file():
        raise FileExistsError(
            f"refusing to write into non-empty directory {out}: it is not a synthetic checkpoint "
            f"(no {MARKER_FILE}); choose an empty or new directory"
        )
    if not overwrite:
        try:
            unfinished = json.loads((out / MARKER_FILE).read_text()).get("status") != "complete"
        except (OSError, ValueError):
            unfinished = True
        what = (
            "an unfinished synthetic checkpoint (a write that was interrupted)"
            if unfinished
            else "a synthetic checkpoint"
        )
        raise FileExistsError(
            f"{out} already holds {what}; to replace it, pass --force (python -m models.synthetic) or "
            "overwrite=True (write_synthetic_checkpoint)"
        )
    for p in out.iterdir():  # remove only files this module writes; anything else is left alone
        if p.is_file() and _is_own_file(p.name):
            p.unlink()


def write_synthetic_checkpoint(
    out_dir: str | os.PathLike,
    shape: str | LlamaShape = "debug",
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a random-weight Llama checkpoint loadable by ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    quant_type: "nf4" / "fp4" (bitsandbytes 4-bit, HF pre-quantized format) or "none" (plain ``dtype``).
    max_shard_bytes: a shard is closed (and written) before it would exceed this size; the tensors of one
        parameter (weight + quant state) always share a shard.
    device: where weights are generated and quantized ("cuda" when available, else "cpu").
    overwrite: replace a previous synthetic checkpoint in ``out_dir`` (a non-empty directory that is not one
        is always refused).
    Returns the output directory.
    """
    if quant_type not in ("nf4", "fp4", "none"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'none', got {quant_type!r}")
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    from safetensors.torch import save_file

    shp = get_shape(shape)
    shape_name = shape if isinstance(shape, str) else None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    # Every argument is checked before the first file is written: bad input leaves no half folder.
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is visible; use --device cpu")
    if quant_type != "none":
        if blocksize not in _BLOCKSIZES:
            raise ValueError(f"invalid blocksize {blocksize}: bitsandbytes 4-bit takes one of {list(_BLOCKSIZES)}")
        bad = sorted(
            {
                k
                for k in (shp.hidden_size, shp.intermediate_size, shp.num_attention_heads * shp.head_dim)
                if k % blocksize
            }
        )
        if bad:
            raise ValueError(
                f"blocksize {blocksize} does not divide the input width(s) {bad} of this shape's "
                "projections (blocks must not straddle rows); pick a smaller blocksize"
            )
    out = pathlib.Path(out_dir)
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    marker = {
        "generator": "models.synthetic",
        "status": "writing",
        "shape": shape_name,
        "quant_type": quant_type,
        "double_quant": bool(double_quant) if quant_type != "none" else None,
        "blocksize": blocksize if quant_type != "none" else None,
        "seed": seed,
        "dtype": dtype_name(dtype),
        "device_type": device.type,
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    # Tokenizer first: config.json's bos / eos ids must be the tokenizer's.
    cfg = shape_to_hf_config(shp, dtype=dtype_name(dtype))
    if tokenizer:
        ids = write_tokenizer(out, vocab_size=shp.vocab_size)
        cfg["bos_token_id"] = ids["bos_token_id"]
        cfg["eos_token_id"] = ids["eos_token_id"]
    if quant_type != "none":
        cfg["quantization_config"] = quantization_config(quant_type, double_quant, dtype_name(dtype))
    cfg["transformers_version"] = _transformers_version()

    # Weights, shard by shard; each shard is written (under a temporary name) as soon as it is full.
    partial: list[tuple[pathlib.Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if not current:
            return
        path = out / f".model-{len(partial) + 1:05d}.safetensors.partial"
        save_file(current, str(path), metadata={"format": "pt"})
        partial.append((path, list(current)))
        current, current_bytes = {}, 0

    with torch.no_grad():
        for name, pshape, kind in _param_plan(shp):
            group = _make_group(
                name,
                pshape,
                kind,
                seed=seed,
                device=device,
                dtype=dtype,
                quant_type=quant_type,
                double_quant=double_quant,
                blocksize=blocksize,
            )
            size = sum(_nbytes(t) for t in group.values())
            if current and current_bytes + size > max_shard_bytes:
                flush()
            current.update(group)
            current_bytes += size
            total_bytes += size
        flush()

    n = len(partial)
    weight_map: dict[str, str] = {}
    for idx, (path, keys) in enumerate(partial, start=1):
        final = f"model-{idx:05d}-of-{n:05d}.safetensors"
        path.rename(out / final)
        os.chmod(out / final, 0o644)  # safetensors creates files 0600
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen_cfg = {
        "_from_model_config": True,
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "transformers_version": cfg["transformers_version"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    marker.update(status="complete", num_tensors=len(weight_map), total_size=total_bytes, num_shards=n)
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # transformers is not needed to write a checkpoint
        return "5.17.0"


# --------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m models.synthetic", description="Write a random-weight (4-bit) Llama checkpoint in HF format."
    )
    ap.add_argument("--shape", default="debug", help="model shape name (see models/shapes.py SHAPES)")
    ap.add_argument(
        "--out", required=True, help="output directory (new, empty, or a previous synthetic one with --force)"
    )
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--no-double-quant", action="store_true", help="do not quantize the absmax statistics")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size-gb", type=float, default=2.0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--force", action="store_true", help="overwrite a previous synthetic checkpoint in --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = write_synthetic_checkpoint(
            args.out,
            shape=args.shape,
            quant_type=args.quant,
            double_quant=not args.no_double_quant,
            blocksize=args.blocksize,
            seed=args.seed,
            max_shard_bytes=int(args.shard_size_gb * 1024**3),
            device=args.device,
            tokenizer=not args.no_tokenizer,
            overwrite=args.force,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    print(f"wrote {out}")
    print(
        f"tensors: {len(index['weight_map'])}  shards: {len(set(index['weight_map'].values()))}  "
        f"total bytes: {index['metadata']['total_size']}  elapsed: {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
