"""Shared fixtures: synthetic checkpoints written once per session, and builders for the two models
compared in the tests (the recipe's ``LlamaForCausalLM`` and HF transformers' reference).

Everything runs on CPU without the model hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# ---------------------------------------------------------------------------------------- checkpoints


def _write(tmp_path_factory, name: str, **kwargs) -> Path:
    from models.synthetic import write_synthetic_checkpoint

    out = tmp_path_factory.mktemp(name)
    # A small shard limit, so that the index maps keys to several files (the reader must follow it).
    kwargs.setdefault("max_shard_bytes", 1 << 20)
    return write_synthetic_checkpoint(out, device="cpu", **kwargs)


@pytest.fixture(scope="session")
def debug_nf4_ckpt(tmp_path_factory) -> Path:
    """``debug`` shape, nf4 with double quantization (the QLoRA default)."""
    return _write(tmp_path_factory, "debug_nf4", shape="debug", quant_type="nf4", double_quant=True)


@pytest.fixture(scope="session")
def debug_fp4_ckpt(tmp_path_factory) -> Path:
    """``debug`` shape, fp4 without double quantization."""
    return _write(tmp_path_factory, "debug_fp4", shape="debug", quant_type="fp4", double_quant=False)


@pytest.fixture(scope="session")
def debug_bf16_ckpt(tmp_path_factory) -> Path:
    """``debug`` shape, plain bf16 (no quantization_config): the same underlying weights as nf4/fp4."""
    return _write(tmp_path_factory, "debug_bf16", shape="debug", quant_type="none")


@pytest.fixture(scope="session")
def debug_tied_ckpt(tmp_path_factory) -> Path:
    """``debug_tied`` shape (lm_head tied to the embedding, no lm_head key), plain bf16."""
    return _write(tmp_path_factory, "debug_tied", shape="debug_tied", quant_type="none")


@pytest.fixture(scope="session")
def debug_tied_nf4_ckpt(tmp_path_factory) -> Path:
    """``debug_tied`` shape, nf4 with double quantization."""
    return _write(tmp_path_factory, "debug_tied_nf4", shape="debug_tied", quant_type="nf4")


# ---------------------------------------------------------------------------------------- model builders


def build_recipe_model(ckpt, *, quant_type=None, dtype=torch.float32, lora_rank=0, lora_alpha=16.0, lora_seed=0, **kw):
    """The recipe model built on meta and materialized from ``ckpt`` on CPU (no process group)."""
    from models.hf_reader import CheckpointReader
    from models.llama import LlamaForCausalLM, ModelArgs
    from parallel.materialize import materialize

    reader = CheckpointReader(ckpt)
    args = ModelArgs(reader.shape, lora_rank=lora_rank, lora_alpha=lora_alpha, quant_type=quant_type, dtype=dtype, **kw)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    materialize(model, reader, device=torch.device("cpu"), lora_seed=lora_seed)
    for name, p in model.named_parameters():
        assert not p.is_meta, name
    return model.eval()


def build_hf_model(ckpt, *, dtype=torch.float32, compute_dtype=None):
    """HF transformers' LlamaForCausalLM loaded from ``ckpt`` with ``dtype`` dense parameters.

    For a bnb 4-bit checkpoint every ``Linear4bit`` is made safe to run on CPU (no in-place AVX512-BF16
    repacking) and computes in ``compute_dtype`` (default ``dtype``): the checkpoint's
    quantization_config (bf16 compute) wins over one passed to from_pretrained, so the modules are set
    directly.
    """
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        bnb = None
    if bnb is not None:
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False
                mod.compute_dtype = compute_dtype or dtype
                mod.compute_type_is_set = True
    return model.eval()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: these tests multiply tiny matrices, where OpenMP's
    threads only add overhead (several times the run time on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Variables of an outer launcher (torchrun around pytest, a run_train.sh status dir) that must not
# leak into a run_train.sh a test starts.
_LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
    "RECIPE_EXIT_STATUS_DIR",
    "CONFIG_FILE",
)


def run_train_env(ngpu: int) -> dict[str, str]:
    """The environment for a ``run_train.sh`` subprocess: this interpreter, NGPU ranks, one thread each."""
    env = dict(os.environ, PYTHON=sys.executable, NGPU=str(ngpu), OMP_NUM_THREADS="1")
    for key in _LAUNCHER_VARS:
        env.pop(key, None)
    return env
