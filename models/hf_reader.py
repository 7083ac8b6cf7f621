"""Reader for HF Llama checkpoints: bitsandbytes 4-bit (as ``save_pretrained`` writes them) or dense.

It never loads a whole tensor unless asked: ``safe_open(...).get_slice`` reads the byte range of the
requested rows, so every rank reads only its shard. Layout of a pre-quantized projection ``P``
(see shared/REFERENCE.md section 3):

  P.weight                              uint8 (N*K/2, 1)  packed codes, row-major over (N, K)
                                        or (N*K/2/E, 1) of an E-byte float/int (bnb_4bit_quant_storage)
  P.weight.absmax                       uint8 (N*K/B,) with double quant, else float32
  P.weight.nested_absmax                float32 (ceil(N*K/B/256),)   double quant only
  P.weight.nested_quant_map             float32 (256,)               double quant only
  P.weight.quant_map                    float32 (16,)
  P.weight.quant_state.bitsandbytes__X  uint8 JSON: quant_type, blocksize, shape, nested_offset...

Double-quantized block scales are expanded to float32 here, row range by row range, with the same
arithmetic bitsandbytes uses (code[q] * nested_absmax[group], then + offset, in fp32), so the
result is bit-identical to ``dequantize_blockwise`` and rows can be cut anywhere.

``bnb_4bit_quant_storage=bfloat16`` (what the peft/accelerate FSDP-QLoRA guides save) stores the same
packed bytes typed as bf16: they are reinterpreted as uint8, never cast (a cast canonicalizes the NaN
bit patterns that about 0.1% of byte pairs form, bitsandbytes #1945). The tensor's dtype in the
safetensors header is what decides the reinterpretation: config.json's ``bnb_4bit_quant_storage`` and the
quant_state JSON (whose ``dtype`` is the dequantized dtype, not the storage) are not needed for it. Where
config.json names another storage than the file holds, the bytes are still read right here (transformers
would convert the tensor to the configured dtype value by value, i.e. corrupt it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from models.shapes import LlamaShape, shape_from_hf_config

__all__ = ["CheckpointError", "CheckpointReader", "Rows4bit", "missing_directory_error"]

_QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# The dtypes transformers' BitsAndBytesConfig accepts for bnb_4bit_quant_storage: safetensors name ->
# (element size, the name config.json gives it).
_STORAGE = {
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F32": (4, "float32"),
    "F64": (8, "float64"),
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file and key."""


def missing_directory_error(path: Path) -> CheckpointError:
    """The error for a checkpoint path that is no directory (shared with models/hub.py)."""
    return CheckpointError(
        f"checkpoint directory {path} does not exist; set [model] checkpoint to a HF "
        "checkpoint directory, or [model] synthetic_shape to write a synthetic one there"
    )


_NOTED: set[str] = set()


def _note_once(msg: str) -> None:
    """Print ``msg`` once per process, from rank 0 only (torchrun's ``RANK``; models/ has no process group)."""
    if msg in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(msg)
    print(msg, flush=True)


@dataclass
class Rows4bit:
    packed: torch.Tensor  # uint8 (rows, K/2)
    absmax: torch.Tensor  # float32 (rows, K/blocksize)
    code: torch.Tensor  # float32 (16,)
    quant_type: str
    blocksize: int


class CheckpointReader:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise missing_directory_error(self.path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file} is missing: a HF checkpoint directory holds config.json")
        try:
            self.hf_config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
        try:
            self.shape: LlamaShape = shape_from_hf_config(self.hf_config)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: {e}") from e
        qc = self.hf_config.get("quantization_config") or {}
        self.prequantized = bool(qc.get("load_in_4bit"))
        if qc and not self.prequantized:
            kind = f"quant_method {qc.get('quant_method')!r}" + (", load_in_8bit" if qc.get("load_in_8bit") else "")
            raise CheckpointError(
                f"{cfg_file}: quantization_config ({kind}) is not bitsandbytes 4-bit (load_in_4bit); "
                "use a bnb-4bit checkpoint or a plain bf16/fp16 one"
            )
        self._handles: dict[str, object] = {}  # before the weight map: a single-file checkpoint opens its file
        self.weight_map = self._read_weight_map()
        self.notes = self._skip_module_notes(qc.get("llm_int8_skip_modules") or [])
        for note in self.notes:
            _note_once(note)

    # -- files -------------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from e
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"no model.safetensors.index.json or model.safetensors in {self.path}")
            weight_map = {k: single.name for k in self._open(single.name).keys()}
        for fname in sorted(set(weight_map.values())):
            if not (self.path / fname).is_file():
                raise CheckpointError(f"{self.path / fname} is listed in model.safetensors.index.json but missing")
        return weight_map

    def _skip_module_notes(self, skip: list[str]) -> list[str]:
        """What ``llm_int8_skip_modules`` says against what the checkpoint holds. The tensors decide: a
        layer stored in 4-bit is read as 4-bit whatever the list says, and a listed name the checkpoint
        holds dense is simply dense. The first case is said (once per entry), not silently ignored."""
        four_bit = sorted(k.removesuffix(".weight.absmax") for k in self.weight_map if k.endswith(".weight.absmax"))
        notes = []
        for entry in skip if isinstance(skip, list) else [skip]:
            hits = [p for p in four_bit if f".{entry}." in f".{p}."]
            if hits:
                notes.append(
                    f"note: {self.path / 'config.json'}: quantization_config.llm_int8_skip_modules lists {entry!r}, "
                    f"but the checkpoint holds {len(hits)} such layer(s) in 4-bit (e.g. {hits[0]}): they are used "
                    "as stored, in 4-bit (the list only tells a quantizer what to leave dense)"
                )
        return notes

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.path / fname} is not a readable safetensors file: {e}") from e
            self._handles[fname] = h
        return h

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise CheckpointError(
                f"key {key!r} is missing from the checkpoint {self.path} "
                f"({len(self.weight_map)} keys); is this checkpoint of the model in config.json?"
            )
        return self.weight_map[key], self._open(self.weight_map[key]).get_slice(key)

    def info(self, key: str) -> tuple[list[int], str]:
        _, sl = self._slice(key)
        return list(sl.get_shape()), sl.get_dtype()

    def read(self, key: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of a tensor (all of it when both are None)."""
        fname, sl = self._slice(key)
        try:
            t = sl[start:end] if (start is not None or end is not None) else sl[:]
        except Exception as e:
            raise CheckpointError(
                f"cannot read {key!r} from {self.path / fname} (truncated or corrupt file?): {e}"
            ) from e
        if start is not None and end is not None and t.shape[0] != end - start:
            raise CheckpointError(
                f"{self.path / fname}: {key!r} has fewer rows than requested ({t.shape[0]} < {end - start})"
            )
        return t

    # -- typed readers -----------------------------------------------------------------------------
    def is_4bit(self, prefix: str) -> bool:
        return self.has(f"{prefix}.weight.absmax") and self.has(f"{prefix}.weight.quant_map")

    def quant_meta(self, prefix: str) -> dict:
        keys = [k for k in self.weight_map if k.startswith(f"{prefix}.weight.quant_state.bitsandbytes__")]
        if not keys:
            raise CheckpointError(f"{self.path}: {prefix}.weight has block scales but no quant_state key")
        raw = self.read(keys[0])
        try:
            meta = json.loads(bytes(raw.flatten().tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: {keys[0]} does not hold quant-state JSON ({e})") from e
        missing = [f for f in ("quant_type", "blocksize") if f not in meta]
        if missing or meta.get("quant_type") not in ("nf4", "fp4"):
            what = f"lacks {', '.join(missing)}" if missing else f"has quant_type {meta['quant_type']!r}"
            raise CheckpointError(
                f"{self.path}: {keys[0]} {what}; a bitsandbytes 4-bit quant state names "
                "quant_type ('nf4' or 'fp4') and blocksize"
            )
        return meta

    def dense_rows(self, key: str, expect_shape: tuple[int, ...], start: int, end: int, dtype) -> torch.Tensor:
        shape, sdtype = self.info(key)
        missing = [f"{key}.{s}" for s in ("absmax", "quant_map") if not self.has(f"{key}.{s}")]
        # Block scales beside it make a tensor packed 4-bit codes whatever its dtype: with
        # bnb_4bit_quant_storage=bfloat16 the codes are a BF16 (N*K/4, 1) tensor, which must not be
        # reported as a dense weight of the wrong shape.
        packed_like = len(missing) < 2 or (self.prequantized and self._packed_shape_ok(shape, sdtype, expect_shape))
        if sdtype not in _FLOAT_DTYPES or packed_like:
            storage = "" if sdtype == "U8" else f" (bnb_4bit_quant_storage {_STORAGE.get(sdtype, ('', sdtype))[1]})"
            verb = "is" if len(missing) == 1 else "are"
            looks = f"it looks like a packed 4-bit weight{storage}, but {' and '.join(missing)} {verb} missing"
            if packed_like and not missing:
                what = f"a packed 4-bit weight{storage}, not a dense one: build the model with quant_type nf4/fp4"
            elif packed_like:
                what = f"not a dense weight: {looks}"
            else:
                what = "not a floating-point tensor" + (f"; {looks}" if sdtype == "U8" and self.prequantized else "")
            raise CheckpointError(f"{self.path / self.weight_map[key]}: {key!r} is {sdtype} {tuple(shape)}, {what}")
        if tuple(shape) != tuple(expect_shape):
            raise CheckpointError(
                f"{self.path}: {key!r} has shape {tuple(shape)} but the model built from config.json "
                f"expects {tuple(expect_shape)}"
            )
        return self.read(key, start, end).to(dtype)

    @staticmethod
    def _packed_shape_ok(shape, sdtype: str, dense_shape) -> bool:
        """Whether a (M, 1) tensor of ``sdtype`` holds the packed codes of a 4-bit (N, K) weight."""
        e = _STORAGE.get(sdtype, (None,))[0]
        if e is None or len(dense_shape) != 2 or len(shape) != 2 or shape[1] != 1:
            return False
        return shape[0] * e * 2 == dense_shape[0] * dense_shape[1]

    def rows_4bit(self, prefix: str, n_rows: int, k: int, start: int, end: int) -> Rows4bit:
        """Packed codes and fp32 block scales of rows [start, end) of a pre-quantized weight."""
        meta = self.quant_meta(prefix)
        bs = int(meta["blocksize"])
        if tuple(meta.get("shape", (n_rows, k))) != (n_rows, k):
            raise CheckpointError(
                f"{self.path}: {prefix}.weight was quantized with shape {tuple(meta['shape'])}, "
                f"but config.json implies {(n_rows, k)}"
            )
        if k % bs:
            raise CheckpointError(f"{prefix}: in_features {k} is not a multiple of blocksize {bs}")
        packed = self._packed_rows(prefix, n_rows, k, start, end)
        bpr = k // bs  # blocks per row
        b0, b1 = start * bpr, end * bpr
        _, adtype = self.info(f"{prefix}.weight.absmax")
        nested = self.has(f"{prefix}.weight.nested_absmax") or "nested_blocksize" in meta or adtype == "U8"
        if nested:
            # uint8 block scales are only meaningful with their nested scales, code book and offset:
            # a missing one must not be papered over (reading uint8 codes as scales is silently wrong).
            for key in (f"{prefix}.weight.nested_absmax", f"{prefix}.weight.nested_quant_map"):
                self._slice(key)  # raises "key ... is missing"
            if "nested_blocksize" not in meta or "nested_offset" not in meta or adtype != "U8":
                raise CheckpointError(
                    f"{self.path}: {prefix}.weight is double-quantized, but its quant_state lacks "
                    f"nested_blocksize/nested_offset or {prefix}.weight.absmax is {adtype}, not U8"
                )
            nb = int(meta["nested_blocksize"])
            q = self.read(f"{prefix}.weight.absmax", b0, b1).long()
            g0, g1 = b0 // nb, -(-b1 // nb)
            nested = self.read(f"{prefix}.weight.nested_absmax", g0, g1)
            ncode = self.read(f"{prefix}.weight.nested_quant_map")
            group = torch.arange(b0, b1) // nb - g0
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
            absmax = ncode[q] * nested[group] + offset
        else:
            if adtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self.path}: {prefix}.weight.absmax is {adtype}; without double quantization the "
                    "block scales are floating point"
                )
            absmax = self.read(f"{prefix}.weight.absmax", b0, b1).float()
        return Rows4bit(
            packed=packed,
            absmax=absmax.reshape(end - start, bpr),
            code=self.read(f"{prefix}.weight.quant_map").float(),
            quant_type=meta["quant_type"],
            blocksize=bs,
        )

    def _packed_rows(self, prefix: str, n_rows: int, k: int, start: int, end: int) -> torch.Tensor:
        """uint8 (end - start, K/2): the packed codes of rows [start, end), from any storage dtype."""
        key = f"{prefix}.weight"
        pshape, pdtype = self.info(key)
        e, storage = _STORAGE.get(pdtype, (None, None))
        half = k // 2  # bytes per row
        layout = f"a packed 4-bit weight of {(n_rows, k)} is U8 ({n_rows * half}, 1)"
        if e is not None and e > 1:
            layout += f", or {pdtype} ({n_rows * half / e:g}, 1) with bnb_4bit_quant_storage {storage}"
        elif e is None:
            names = "/".join(name for _, name in _STORAGE.values())
            layout += f", or (N*K/2/E, 1) of an E-byte bnb_4bit_quant_storage dtype ({names})"
        if e is None or len(pshape) not in (1, 2) or (len(pshape) == 2 and pshape[1] != 1):
            raise CheckpointError(f"{self.path}: {key} is {pdtype} {pshape}; {layout}")
        if pshape[0] * e != n_rows * half:
            cast = ""
            if e > 1 and pshape[0] == n_rows * half:
                # One element per byte: the uint8 codes were converted to floats value by value
                # (e.g. a model.to(dtype) before saving), not stored as bytes; they cannot be recovered.
                cast = (
                    f"; it holds one {pdtype} per packed byte: the uint8 codes were cast to {pdtype} "
                    "(values, not bytes) before saving, which this reader cannot undo"
                )
            raise CheckpointError(f"{self.path}: {key} is {pdtype} {pshape}; {layout}{cast}")
        if half % e:
            raise CheckpointError(
                f"{self.path}: {key} is stored as {pdtype} ({e} bytes per element), but a row of {k} codes is "
                f"{half} bytes, not a whole number of elements: its rows cannot be read separately"
            )
        per_row = half // e
        t = self.read(key, start * per_row, end * per_row)
        # Reinterpret, never cast: converting float storage would canonicalize NaN bit patterns.
        return t.contiguous().view(torch.uint8).reshape(end - start, half)

    def quant_scheme(self, quantize_dense_as: str = "none") -> tuple[str, int] | None:
        """(quant_type, blocksize) of the pre-quantized projections. A dense checkpoint gives None,
        or (``quantize_dense_as``, 64) when its projections are to be quantized at load."""
        if not self.prequantized:
            return None if quantize_dense_as == "none" else (quantize_dense_as, 64)
        qc = self.hf_config["quantization_config"]
        prefix = "model.layers.0.self_attn.q_proj"
        if self.is_4bit(prefix):
            meta = self.quant_meta(prefix)
            return meta["quant_type"], int(meta["blocksize"])
        return qc.get("bnb_4bit_quant_type", "nf4"), 64


def quantize_rows(dense: torch.Tensor, quant_type: str, blocksize: int) -> Rows4bit:
    """Quantize rows of a dense weight (a plain checkpoint quantized at load), no double quant.

    Blocks never straddle rows (K % blocksize == 0), so quantizing a row range gives exactly the
    bytes that quantizing the whole matrix would give for those rows.
    """
    from models.quant import bnb_functional

    bnbF = bnb_functional()

    rows, k = dense.shape
    q, state = bnbF.quantize_4bit(
        dense.contiguous(), blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    return Rows4bit(
        packed=q.reshape(rows, k // 2),
        absmax=state.absmax.float().reshape(rows, k // blocksize),
        code=state.code.float(),
        quant_type=quant_type,
        blocksize=blocksize,
    )
