"""The accuracy oracle (recipe/oracle.py) on a 2-block debug model on CPU: bf16 eager, fp16 eager (loss
scaler) and compiled bf16 against the fp32 eager reference, the verdict, and a perturbed model that must
fail it.

Compile runs through the "aot_eager" backend: inductor takes 90 s for the debug model on a busy 2-core
machine, aot_eager a few seconds. It traces each block through dynamo and AOTAutograd like inductor but
runs the traced aten ops unfused, so on CPU its numbers equal eager's: this checks the plumbing (the
switch, the names, the gradient capture through compiled blocks), the GPU benchmark the kernels.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from recipe.oracle import LORA_B_INIT, REFERENCE, Comparison, Run, Variant, available, compare, judge, run_variant
from tests.dist_utils import local_tensor

STEPS = 4
PERTURBED = "model.layers.1.self_attn.v_proj.lora_B.weight"
BF16 = ("--training.mixed_precision_param=bfloat16",)
VARIANTS = [
    Variant("bf16_eager", BF16),
    Variant("fp16_eager", ("--training.mixed_precision_param=float16",)),
    Variant("bf16_compiled", (*BF16, "--training.compile=true")),
    Variant("bf16_fused", (*BF16, "--model.fuse_projections=true")),  # q/k/v and gate/up as one matrix each
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from models.shapes import get_shape
    from models.synthetic import write_synthetic_checkpoint

    shape = get_shape("debug").replace(num_hidden_layers=2)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("oracle_ckpt"), shape=shape, device="cpu")


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory, single_thread):
    """name -> Run: the reference, the variants and a bf16 model with one LoRA B scaled by 1.05."""
    from recipe.train import Trainer

    argv = [
        f"--model.checkpoint={ckpt}",
        "--training.device=cpu",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=16",
        "--training.micro_batch_size=2",
        "--training.global_batch_size=4",  # two micro-batches: the captured gradient is their sum
        "--lora.rank=8",
        "--lora.alpha=16",
        "--optimizer.lr=1e-3",
        "--lr_scheduler.warmup_steps=1",
        "--profiling.memory_report=false",
        "--metrics.log_freq=100",
    ]
    dump = tmp_path_factory.mktemp("oracle_runs")
    out = {}
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs dynamo hands it
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    with pytest.MonkeyPatch.context() as mp:
        compile_ = torch.nn.Module.compile
        mp.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **{**kw, "backend": backend}))
        for v in [REFERENCE, *VARIANTS]:
            graphs.clear()
            out[v.name] = run_variant(Trainer, argv, v, STEPS, dump)
            out[v.name].graphs = len(graphs)

    def perturb(model):
        with torch.no_grad():
            local_tensor(dict(model.named_parameters())[PERTURBED]).mul_(1.05)

    out["perturbed"] = run_variant(Trainer, argv, Variant("perturbed", BF16), STEPS, dump, perturb=perturb)
    return out


def test_fast_paths_pass_against_the_fp32_reference(runs):
    ref = runs["fp32_eager"]
    # The oracle's nonzero B makes every first-step gradient nonzero, A's included (B = 0 zeroes them).
    a_norms = [float(g.norm()) for n, g in ref.grads.items() if ".lora_A." in n]
    assert len(a_norms) == 2 * 7 and min(a_norms) > 0, a_norms
    rows = [compare(ref, runs[v.name], v.overrides) for v in VARIANTS]
    for r in rows:
        print(f"\n[oracle] {r.name}: median {r.median:.3e}, worst {r.worst:.3e}, max loss diff {r.max_loss_diff:.3e}")
    assert judge(rows), [(r.name, r.verdict, r.reason) for r in rows]
    by = {r.name: r for r in rows}
    bf16, fp16 = by["bf16_eager"], by["fp16_eager"]
    # bf16 keeps 8 mantissa bits, fp16 11: bf16 is off by about its rounding (2**-8 = 3.9e-3) times the
    # depth of the computation, fp16 several times closer; neither is exact.
    assert 2e-3 < bf16.median < 5e-2 and bf16.worst < 0.1, (bf16.median, bf16.worst)
    assert 0 < fp16.median < bf16.median / 3 and fp16.worst < bf16.worst, (fp16.median, fp16.worst)
    assert fp16.skipped_steps == 0 and not fp16.first_step_skipped
    for r in rows:
        assert len(r.losses) == STEPS and all(math.isfinite(x) for x in r.losses), r.losses
        assert r.max_loss_diff < 1e-2, (r.name, r.loss_diffs)
    assert bf16.verdict == "baseline" and by["bf16_compiled"].verdict == "pass"
    # The compiled variant did run compiled blocks, the others none.
    assert runs["bf16_compiled"].graphs > 0 and runs["bf16_eager"].graphs == runs["fp32_eager"].graphs == 0
    # The reference trains: its losses are not one repeated number.
    assert len(set(ref.losses)) == STEPS, ref.losses


def test_a_perturbed_model_fails_the_verdict(runs):
    """One LoRA tensor scaled by 5 % (a kernel that gets one projection's LoRA path slightly wrong)."""
    ref = runs["fp32_eager"]
    rows = [compare(ref, runs["bf16_eager"]), compare(ref, runs["perturbed"])]
    assert not judge(rows)
    bad = rows[1]
    assert bad.verdict == "FAIL" and "worst" in bad.reason, bad.reason
    # The gradients that see the scaled B most: its own layer's v_proj A (dL/dA is proportional to B).
    assert bad.worst_tensor.startswith("model.layers.1.self_attn.v_proj."), bad.worst_tensor
    assert bad.worst > 2 * rows[0].worst


def _run(name, grads, losses=(1.0, 1.0), skipped=(False, False)):
    return Run(name, grads, list(losses), list(skipped), 0.0)


def _row(name, median, worst, skipped=False):
    return Comparison(name, (), {}, median, worst, "t", 0.0, [], [], int(skipped), 0.0, skipped)


def test_verdict_limits_are_inclusive_and_overflow_fails():
    rows = [_row("bf16_eager", 1e-2, 1e-1), _row("at_limit", 1.5e-2, 1.5e-1), _row("over", 1e-2, 1.51e-1)]
    rows.append(_row("overflow", 1e-3, 1e-2, skipped=True))
    assert not judge(rows)
    assert [r.verdict for r in rows] == ["baseline", "pass", "FAIL", "FAIL"]
    assert "worst" in rows[2].reason and "median" not in rows[2].reason
    assert "overflowed" in rows[3].reason
    assert rows[1].limits == {"median": 1.5e-2, "worst": pytest.approx(1.5e-1)}
    with pytest.raises(ValueError, match="baseline"):
        judge(rows[1:])


def test_compare_handles_nonfinite_zero_and_renamed_gradients():
    g = {"a": torch.ones(3), "b": torch.full((2,), 2.0)}
    ref = _run("ref", g, losses=(1.0, 2.0))
    inf = compare(ref, _run("x", {"a": torch.full((3,), math.inf), "b": g["b"]}, losses=(1.0, math.nan)))
    assert inf.worst == math.inf and inf.worst_tensor == "a" and inf.max_loss_diff == math.inf
    exact = compare(ref, _run("y", {"a": 2 * g["a"], "b": g["b"]}, losses=(1.5, 2.0)))
    assert exact.rel == {"a": 1.0, "b": 0.0} and exact.median == 0.5 and exact.max_loss_diff == 0.5
    with pytest.raises(ValueError, match="other LoRA tensors"):
        compare(ref, _run("z", {"a": g["a"]}))
    with pytest.raises(ValueError, match="zero"):
        compare(_run("ref0", {"a": torch.zeros(3)}), _run("w", {"a": torch.ones(3)}))


def test_variants_whose_switch_this_tree_lacks_are_not_run():
    assert available(Variant("ok", ("--training.compile=true", "--model.quant_type=nf4"))) is None
    why = available(Variant("fused", ("--model.no_such_switch=true",)))
    assert why and "model.no_such_switch" in why
    assert 0 < LORA_B_INIT < 0.1


class _FakeTrainer:
    """What run_variant uses of the Trainer, on a one-layer LoRA model (for run_oracle's bookkeeping)."""

    def __init__(self, cfg):
        from models.dtypes import DTYPES
        from recipe.config import ConfigError

        if cfg.training.attention_backend == "efficient":
            raise ConfigError("efficient attention is a CUDA kernel")  # what the Trainer refuses early
        if cfg.training.loss_scale_init == 3.0:
            raise RuntimeError("a broken kernel")
        torch.manual_seed(cfg.job.seed)  # as the Trainer does: the same A in every run
        self.dtype = DTYPES[cfg.training.mixed_precision_param]
        self.device = torch.device("cpu")
        self.model = torch.nn.Module()
        self.model.proj = torch.nn.Module()
        self.model.proj.lora_A = torch.nn.Linear(16, 4, bias=False)
        self.model.proj.lora_B = torch.nn.Linear(4, 8, bias=False)
        self.x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))

    def _clip(self):
        return torch.zeros(())

    def train_step(self):
        p = self.model.proj
        h = (self.x.to(self.dtype) @ p.lora_A.weight.to(self.dtype).T) @ p.lora_B.weight.to(self.dtype).T
        loss = h.float().square().mean()
        loss.backward()
        self._clip()
        with torch.no_grad():
            for w in (p.lora_A.weight, p.lora_B.weight):
                w -= 0.1 * w.grad
                w.grad = None
        return type("R", (), {"loss": float(loss.detach()), "skipped": False})()

    def close(self):
        pass


def test_run_oracle_reports_refused_and_broken_variants(tmp_path):
    from recipe.oracle import format_table, run_oracle, write_json

    variants = [
        Variant("bf16_eager", BF16),
        Variant("fp16", ("--training.mixed_precision_param=float16",)),
        Variant("refused", ("--training.attention_backend=efficient",)),
        Variant("broken", ("--training.loss_scale_init=3",)),
        Variant("absent", ("--model.no_such_switch=1",)),
    ]
    res = run_oracle(_FakeTrainer, [f"--job.dump_folder={tmp_path}"], variants, 3, tmp_path, log=lambda s: None)
    assert [r["name"] for r in res["variants"]] == ["bf16_eager", "fp16"]
    assert res["variants"][1]["verdict"] == "pass" and 0 < res["variants"][1]["median"] < res["variants"][0]["median"]
    assert set(res["not_run"]) == {"refused", "absent"} and "CUDA kernel" in res["not_run"]["refused"]
    assert "a broken kernel" in res["errors"]["broken"] and not res["all_pass"]
    write_json(res, tmp_path / "o.json")
    table = format_table(json.loads((tmp_path / "o.json").read_text()))
    assert "FAIL: did not run: RuntimeError: a broken kernel" in table and "baseline" in table, table
