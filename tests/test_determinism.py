"""Gradient clipping that does not depend on the row split (parallel/grad_norm.py), CPU gloo.

torch's clip_grad_norm_ over Shard(0) DTensor gradients rounds each rank's partial norm in fp32, so
its norm, the clip coefficient and, once AdamW has amplified them, every LoRA weight differ in the
last bits between 1, 2 and 3 ranks, even when the gradients themselves are bit-identical
(``--training.mixed_precision_reduce=float64``). Checked here:

(a) ``exact=False`` is torch's clip_grad_norm_(foreach=True), bit for bit (DTensor and plain tensors);
(b) ``exact=True`` gives the same norm and clipped gradients, bit for bit, on 1, 2 and 3 ranks, for
    gradients whose torch (fp32) norm does differ between those layouts;
(c) the debug model trained 1 vs 2 ranks (fp32, fp64 reduce, clipping engaged every step) with
    ``Trainer._clip`` patched to the exact clip: bit-identical LoRA weights and grad norms per step.

One spawn per world size; the worker saves its results and the tests compare them.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tests.dist_utils import spawn

WORLDS = (1, 2, 3)
MAX_NORM = 0.05
# Input seeds for (b): on CPU, torch's per-shard norms accumulate in fp64 and round once per shard,
# so a given input shows the layout dependence only sometimes (about half of these seeds do).
SEEDS = range(16)
E2E_STEPS = 4
E2E_WORLDS = (1, 2)


# ----------------------------------------------------------------------------------- inputs


def _shapes() -> list[tuple[int, ...]]:
    # Row counts that 2 and 3 do not divide, one row fewer than the ranks (empty shards), and a
    # LoRA-like pair, so that the row split changes every parameter's partial sums.
    return [(37, 50), (160, 3), (1, 90), (100, 1), (2, 330), (130, 16), (16, 130)]


def _full_grads(seed: int = 0) -> list[torch.Tensor]:
    """Row magnitudes spread over 4 decades (more seeds then show torch's layout dependence)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in _shapes():
        scale = 10.0 ** (4 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g) - 2)
        out.append(torch.randn(shape, generator=g) * scale)
    return out


def _make_params(grads: list[torch.Tensor], mesh, with_none: bool = True) -> list[torch.nn.Parameter]:
    """Parameters holding ``grads`` as Shard(0) DTensors (torch.chunk rule, as FSDP2), or plain
    tensors when ``mesh`` is None; plus one parameter without a gradient."""
    from torch.distributed.tensor import Shard, distribute_tensor

    def wrap(t):
        # Every rank holds the same full tensor: slice locally, no scatter.
        return t.clone() if mesh is None else distribute_tensor(t.clone(), mesh, [Shard(0)], src_data_rank=None)

    params = []
    for gr in grads:
        p = torch.nn.Parameter(wrap(torch.zeros_like(gr)))
        p.grad = wrap(gr)
        params.append(p)
    if with_none:
        params.insert(2, torch.nn.Parameter(wrap(torch.zeros(4, 4))))  # no .grad
    return params


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads_of(params) -> list[torch.Tensor]:
    return [_full(p.grad).clone() for p in params if p.grad is not None]


# ----------------------------------------------------------------------------------- worker


def _synthetic_checks(rank: int, world: int, mesh) -> dict:
    from torch.distributed.tensor import DTensor

    from parallel.grad_norm import clip_grad_norm_

    res: dict = {}
    full = _full_grads()

    # (a) exact=False against torch, on the same inputs.
    for max_norm in (MAX_NORM, 1e9, 0.0, -1.0):
        ref_params = _make_params(full, mesh)
        mine_params = _make_params(full, mesh)
        # Today's Trainer._clip: <= 0 is passed to torch as inf.
        ref = torch.nn.utils.clip_grad_norm_(ref_params, max_norm if max_norm > 0 else math.inf, foreach=True)
        ref = _full(ref)
        got = clip_grad_norm_(mine_params, max_norm, exact=False)
        assert not isinstance(got, DTensor) and got.dim() == 0
        res[f"torch_equal_{max_norm}"] = bool(torch.equal(ref, got)) and all(
            torch.equal(a, b) for a, b in zip(_grads_of(ref_params), _grads_of(mine_params), strict=True)
        )
        res[f"torch_norm_{max_norm}"] = ref.item()

    # (b) exact=True: norms, clipped gradients; the fp32 (torch) norms of the same inputs for contrast.
    res["exact_norm"], res["exact_clipped"], res["fp32_norm"] = {}, {}, {}
    for seed in SEEDS:
        grads = _full_grads(seed)
        params = _make_params(grads, mesh)
        norm = clip_grad_norm_(params, MAX_NORM, exact=True)
        assert not isinstance(norm, DTensor) and norm.dim() == 0 and norm.dtype == torch.float32
        res["exact_norm"][seed] = norm.clone()
        res["exact_clipped"][seed] = _grads_of(params)
        ref = torch.nn.utils.clip_grad_norm_(_make_params(grads, mesh), math.inf, foreach=True)
        res["fp32_norm"][seed] = _full(ref).clone()
    unclipped = _make_params(full, mesh)
    res["exact_norm_noclip"] = clip_grad_norm_(unclipped, 0.0, exact=True).clone()
    res["noclip_untouched"] = all(torch.equal(a, b) for a, b in zip(_grads_of(unclipped), full, strict=True))

    # Non-finite gradients propagate (NaN wins over inf), identically on every layout.
    for kind, vals in (("inf", (math.inf,)), ("nan", (math.nan,)), ("nan_inf", (math.inf, math.nan))):
        bad = [t.clone() for t in full]
        for i, v in enumerate(vals):
            bad[3 + i].view(-1)[i] = v  # rows held by different ranks on 2 and 3 ranks
        res[f"exact_{kind}"] = clip_grad_norm_(_make_params(bad, mesh), MAX_NORM, exact=True).item()
        res[f"torch_{kind}"] = _full(
            torch.nn.utils.clip_grad_norm_(_make_params(bad, mesh), MAX_NORM, foreach=True)
        ).item()

    # No gradients at all: a 0 norm, as torch.
    res["empty"] = clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], MAX_NORM, exact=True).item()

    if world == 1:  # plain tensors (no DTensor) give the same bits as DTensors on a mesh of one
        plain = _make_params(full, None)
        res["plain_exact_norm"] = clip_grad_norm_(plain, MAX_NORM, exact=True).clone()
        res["plain_exact_clipped"] = _grads_of(plain)
        ref_plain = _make_params(full, None)
        ref = torch.nn.utils.clip_grad_norm_(ref_plain, MAX_NORM, foreach=True)
        mine_plain = _make_params(full, None)
        got = clip_grad_norm_(mine_plain, MAX_NORM, exact=False)
        res["plain_torch_equal"] = bool(torch.equal(ref, got)) and all(
            torch.equal(a, b) for a, b in zip(_grads_of(ref_plain), _grads_of(mine_plain), strict=True)
        )
    return res


def _e2e_overrides(ckpt: str, dump: Path) -> list[str]:
    return [
        f"--model.checkpoint={ckpt}",
        "--model.synthetic_shape=debug",
        "--training.mixed_precision_param=float32",
        "--training.mixed_precision_reduce=float64",
        f"--training.steps={E2E_STEPS}",
        "--training.global_batch_size=4",
        "--training.micro_batch_size=1",
        f"--training.max_norm={MAX_NORM}",
        "--optimizer.lr=1e-2",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
        "--lora.dropout=0",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=32",
        "--metrics.enable_jsonl=false",
        "--metrics.log_freq=100",
        "--checkpoint.export_adapter=false",
        f"--job.dump_folder={dump}",
    ]


def _e2e(rank: int, world: int, ckpt: str, out: Path, exact: bool) -> dict:
    """A few trainer steps; with ``exact`` the clip is parallel.grad_norm's exact one whatever the
    config says (Trainer._clip patched on the instance, like tests/dist_utils.py wraps it)."""
    from torch.distributed.tensor import DTensor

    import recipe.train
    from parallel.grad_norm import clip_grad_norm_
    from recipe.config import load_config
    from recipe.train import Trainer

    recipe.train.destroy = lambda: None  # the worker owns the process group
    cfg = load_config(_e2e_overrides(ckpt, out / f"dump_{'exact' if exact else 'torch'}_w{world}"))
    trainer = Trainer(cfg)
    if exact:
        trainer._clip = lambda: clip_grad_norm_(trainer.params, cfg.training.max_norm, exact=True)
    trainer.model.train()
    losses, norms, weights = [], [], []
    try:
        for _ in range(cfg.training.steps):
            r = trainer.train_step()
            losses.append(r.loss)
            norms.append(float(r.grad_norm))
            weights.append(
                {
                    n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in trainer.model.named_parameters()
                    if p.requires_grad
                }
            )
    finally:
        trainer.close()
    return {"losses": losses, "norms": norms, "weights": weights}


def _worker(rank: int, world: int, out_dir: str, ckpt: str | None) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    out = Path(out_dir)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        res = _synthetic_checks(rank, world, mesh)
        if ckpt is not None:
            for exact in (False, True):
                res[f"e2e_{'exact' if exact else 'torch'}"] = _e2e(rank, world, ckpt, out, exact)
                dist.barrier()
        if rank == 0:
            torch.save(res, out / f"w{world}.pt")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- fixtures


_RESULTS: dict[int, dict | BaseException] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory, debug_nf4_ckpt):
    """results(world) -> rank 0's saved results (each world spawned once, lazily)."""
    root = tmp_path_factory.mktemp("determinism")

    def get(world: int) -> dict:
        if world not in _RESULTS:
            out = root / f"w{world}"
            out.mkdir()
            ckpt = str(debug_nf4_ckpt) if world in E2E_WORLDS else None
            try:
                spawn(_worker, world, str(out), ckpt, err_dir=out / "errors", timeout=240)
                _RESULTS[world] = torch.load(out / f"w{world}.pt", weights_only=False)
            except Exception as e:
                _RESULTS[world] = e
        r = _RESULTS[world]
        if isinstance(r, BaseException):
            raise r
        return r

    yield get
    _RESULTS.clear()


# ------------------------------------------------------------------------- (a) exact=False


@pytest.mark.parametrize("world", WORLDS)
def test_inexact_is_torch_clip_grad_norm(results, world):
    r = results(world)
    for max_norm in (MAX_NORM, 1e9, 0.0, -1.0):
        assert r[f"torch_equal_{max_norm}"], (world, max_norm)
    assert r[f"torch_norm_{MAX_NORM}"] > 10 * MAX_NORM  # clipping engaged
    if world == 1:
        assert r["plain_torch_equal"]


# ------------------------------------------------------------------------- (b) exact=True


def test_fp32_norm_depends_on_the_layout(results):
    """The inputs of the next test do expose torch's layout dependence (else it proves nothing)."""
    fp32 = {w: results(w)["fp32_norm"] for w in WORLDS}
    differ = [s for s in SEEDS if all(not torch.equal(fp32[1][s], fp32[w][s]) for w in WORLDS[1:])]
    print(f"\n[fp32 norm] 1 rank != 2 ranks and != 3 ranks for {len(differ)}/{len(SEEDS)} inputs")
    if differ:
        s = differ[0]
        print("  e.g. seed", s, ", ".join(f"{w} ranks {fp32[w][s].item()!r}" for w in WORLDS))
    assert differ


def test_exact_norm_and_clip_are_layout_independent(results):
    ref = results(1)
    assert torch.equal(ref["plain_exact_norm"], ref["exact_norm"][0])  # plain tensors == DTensors, world 1
    for a, b in zip(ref["plain_exact_clipped"], ref["exact_clipped"][0], strict=True):
        assert torch.equal(a, b)
    for world in WORLDS[1:]:
        got = results(world)
        assert torch.equal(ref["exact_norm_noclip"], got["exact_norm_noclip"])
        for s in SEEDS:
            assert torch.equal(ref["exact_norm"][s], got["exact_norm"][s]), (world, s)
            for i, (a, b) in enumerate(zip(ref["exact_clipped"][s], got["exact_clipped"][s], strict=True)):
                assert torch.equal(a, b), (world, s, i, float((a - b).abs().max()))
    for world in WORLDS:
        assert results(world)["noclip_untouched"]  # max_norm <= 0: gradients left as they are


def test_exact_norm_is_the_norm(results):
    """The layout-independent norm is also the accurate one: fp64 sum of the exact fp32 squares."""
    r = results(1)
    for s in SEEDS:
        full = _full_grads(s)
        ref = math.sqrt(sum(float(t.double().square().sum()) for t in full))
        assert r["exact_norm"][s].item() == pytest.approx(ref, rel=1e-7)
        # The coefficient from the fp64 norm, rounded once to fp32.
        coef = torch.tensor(min(MAX_NORM / (ref + 1e-6), 1.0), dtype=torch.float64).float()
        for g, c in zip(full, r["exact_clipped"][s], strict=True):
            assert torch.equal(g * coef, c)


@pytest.mark.parametrize("world", WORLDS)
def test_non_finite_norms_propagate(results, world):
    r = results(world)
    assert r["exact_inf"] == math.inf and r["torch_inf"] == math.inf
    assert math.isnan(r["exact_nan"]) and math.isnan(r["torch_nan"])
    assert math.isnan(r["exact_nan_inf"]) and math.isnan(r["torch_nan_inf"])
    assert r["empty"] == 0.0


def test_exact_sum_is_exact_and_order_free():
    """No process group: plain tensors. The fp64 result equals the exactly rounded rational sum of
    the squares (up to the last fp64 bits), for values from subnormal to near fp32 max, and is the
    same bits however the values are split into tensors and ordered."""
    from parallel.grad_norm import exact_sum_of_squares

    rng = random.Random(0)
    vals = torch.tensor(
        [rng.uniform(-1, 1) * 2.0 ** rng.randint(-140, 120) for _ in range(3000)] + [1e-45, -3e38, 0.0],
        dtype=torch.float32,
    )
    exact = sum(Fraction(v) ** 2 for v in vals.tolist())
    got = exact_sum_of_squares([vals])
    assert got.dtype == torch.float64
    assert abs(Fraction(got.item()) - exact) <= exact * Fraction(1, 2**50)
    for seed in range(5):
        perm = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(seed))]
        cuts = sorted(random.Random(seed).sample(range(1, vals.numel()), 7))
        pieces = [p.reshape(-1, 1) if i % 2 else p for i, p in enumerate(torch.tensor_split(perm, cuts))]
        assert torch.equal(exact_sum_of_squares(pieces), got)
    # bf16 / fp16 gradients: their squares are exact too.
    h = vals[(vals.abs() < 6e4) & (vals.abs() > 1e-4)]
    assert torch.equal(exact_sum_of_squares([h.half()]), exact_sum_of_squares([h.half().float()]))
    assert torch.equal(exact_sum_of_squares([vals.bfloat16()]), exact_sum_of_squares([vals.bfloat16().float()]))
    with pytest.raises(TypeError):
        exact_sum_of_squares([vals.double()])


# ------------------------------------------------------------------- (c) end to end, trainer


def test_trainer_exact_clip_is_bit_identical(results):
    """fp32, fp64 reduce, max_norm 0.05 (every step clips): 1 vs 2 ranks, LoRA weights after every
    step and the grad norms bit-identical with the exact clip. The reported loss is compared with
    a tolerance: Trainer.train_step sums it in fp32 across micro-batches and ranks (one last bit)."""
    ref, got = results(1)["e2e_exact"], results(2)["e2e_exact"]
    assert all(n > MAX_NORM for n in ref["norms"]), ref["norms"]  # clipping engaged at every step
    assert ref["norms"] == got["norms"]
    for step, (a, b) in enumerate(zip(ref["weights"], got["weights"], strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name, float((a[name] - b[name]).abs().max()))
    assert ref["losses"] == pytest.approx(got["losses"], rel=1e-6, abs=0)
    lora_b = [w for n, w in ref["weights"][-1].items() if ".lora_B." in n]
    assert lora_b and all(bool(w.abs().max() > 0) for w in lora_b)  # B starts at zero: it trained

    # For contrast (not asserted, it depends on rounding luck): torch's clip on the same runs.
    t1, t2 = results(1)["e2e_torch"], results(2)["e2e_torch"]
    diff = max(float((a[n] - b[n]).abs().max()) for a, b in zip(t1["weights"], t2["weights"], strict=True) for n in a)
    print(
        f"\n[e2e] torch clip 1 vs 2 ranks: max |dLoRA| {diff:.3e}, norms {t1['norms']} vs {t2['norms']}; exact clip: 0"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_sum_on_cuda_matches_cpu():
    """The GPU path (frexp, int64 scatter_add into lane copies of the buckets) gives the CPU's bits,
    for any split of the values, zeros (lora_A's first gradients) included."""
    from parallel.grad_norm import exact_sum_of_squares

    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(shape, generator=g) * 10.0 ** (4 * torch.rand(shape[0], 1, generator=g) - 2)
        for shape in [(4096, 16), (16, 4096), (1024, 16), (3, 5)] * 4
    ]
    grads[1].zero_()
    cpu = exact_sum_of_squares(grads)
    cuda = [t.cuda() for t in grads]
    assert torch.equal(exact_sum_of_squares(cuda).cpu(), cpu)
    pieces = [p for t in reversed(cuda) for p in t.chunk(3)]
    assert torch.equal(exact_sum_of_squares(pieces).cpu(), cpu)
    assert torch.equal(
        exact_sum_of_squares([t.bfloat16() for t in cuda]).cpu(), exact_sum_of_squares([t.bfloat16() for t in grads])
    )
