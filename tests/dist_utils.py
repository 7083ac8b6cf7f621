"""Helpers for multi-process CPU (gloo) tests: spawn N ranks, run a list of training jobs in each.

``spawn(fn, world, *args)`` starts ``world`` processes with the ``spawn`` start method, each with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (the port picked in the parent), and
calls ``fn(rank, world, *args)``. A rank that raises writes its traceback to a file; the parent then
stops the other ranks (which would otherwise wait in a collective) and raises with every traceback.

``run_jobs`` is the worker used by tests/test_fsdp.py and tests/test_multinode.py: one process group
for the whole worker, and for every job a fresh ``recipe.train.Trainer`` (closed with the process-group
teardown disabled), the training steps up to ``training.steps`` (all of them, unless the job resumes
from a checkpoint in its own ``dump`` folder) with losses and full LoRA gradients (after backward,
before clipping and the optimizer step) captured, plus optional checks of the 4-bit shards, the
gathered weights and the all-gather inputs. Rank 0 saves the run's losses; every rank saves its rows of the gradients
(``gather_shards`` reassembles them) and its own checks.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "spawn", "run_jobs", "gather_shards", "local_tensor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, err_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # N ranks share 2 cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None  # the traceback is in the .err file


def spawn(fn, world: int, *args, err_dir: str | os.PathLike, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes; raise if any rank fails.

    Once, and only when a rank died of SIGABRT, the whole run is repeated:
    gloo's teardown sometimes aborts a process ("terminate called without an active exception", a
    transport thread still joinable when a process group's C++ object is freed; seen once in this
    machine's full-suite runs of 2026-12-07, in the 2-rank test_fsdp spawn right after jobs that create
    and destroy the checkpointer's groups). ``recipe.train.main`` avoids it with a barrier and
    ``os._exit``; a harness that runs many jobs per process cannot. A second abort, or any other failure,
    raises. A repeated run finds what the first left in its jobs' own dump folders (a checkpoint): a job
    that then starts elsewhere fails its own assertions, it cannot pass wrongly.
    """
    try:
        _spawn_once(fn, world, *args, err_dir=err_dir, timeout=timeout)
    except _GlooAbort as e:
        print(f"spawn: {e}; repeating the {world}-rank run once", file=sys.stderr)
        _spawn_once(fn, world, *args, err_dir=err_dir, timeout=timeout, retry_abort=False)


class _GlooAbort(RuntimeError):
    pass


def _spawn_once(fn, world: int, *args, err_dir, timeout: float, retry_abort: bool = True) -> None:
    err_dir = Path(err_dir)
    err_dir.mkdir(parents=True, exist_ok=True)
    for f in err_dir.glob("rank*.err"):
        f.unlink()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, str(err_dir), args), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed = timed_out = False
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = True
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # only the processes started above
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    if timed_out or failed or any(c != 0 for c in codes):
        errs = "\n".join(f"--- rank {f.stem}:\n{f.read_text()}" for f in sorted(err_dir.glob("rank*.err")))
        if retry_abort and not timed_out and -signal.SIGABRT in codes:
            raise _GlooAbort(f"{world}-rank run aborted; exit codes {codes}")
        why = f"timed out after {timeout:.0f}s" if timed_out else "failed"
        raise RuntimeError(f"{world}-rank run {why}; exit codes {codes}\n{errs}")


# ---------------------------------------------------------------------------------------------
# Worker side


def local_tensor(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gather_shards(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's Shard(0) pieces (FSDP2's torch.chunk rule: rank order)."""
    return {name: torch.cat([r[name] for r in per_rank], 0) for name in per_rank[0]}


def _spy_pre_all_gather(records: list):
    """Wrap Weight4bit.fsdp_pre_all_gather (same five-parameter signature) to record its outputs."""
    from models.quant import Weight4bit

    orig = Weight4bit.fsdp_pre_all_gather

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        inputs, meta = orig(self, mesh, outer_size, outer_stride, module, mp_policy)
        records.append(
            {
                "local_shape": tuple(self.shape),
                "outer_size": tuple(outer_size),
                "blocksize": self.blocksize,
                "param_dtype": mp_policy.param_dtype,
                "dtypes": [t.dtype for t in inputs],
                "numels": [t.numel() for t in inputs],
                "nbytes": [t.numel() * t.element_size() for t in inputs],
                "subclass": [type(t) is not torch.Tensor for t in inputs],
            }
        )
        return inputs, meta

    Weight4bit.fsdp_pre_all_gather = fsdp_pre_all_gather
    return lambda: setattr(Weight4bit, "fsdp_pre_all_gather", orig)


def _check_shards(trainer, rank: int, world: int) -> dict:
    """Every Weight4bit shard == rows [r*c, (r+1)*c) of the checkpoint (zero rows past n_rows). With
    HSDP, r and the padding multiple are the rank in the shard group and the shard degree."""
    from torch.distributed.tensor import DTensor

    from models.quant import Weight4bit

    rank, world = trainer.dist.shard_mesh.get_local_rank(), trainer.dist.dp_shard
    errors, n_checked, n_padded = [], 0, 0
    for name, p in trainer.model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if not isinstance(local, Weight4bit):
            continue
        n_checked += 1
        prefix = name.removesuffix(".weight")
        padded, k = p.shape
        n_rows = local.n_rows
        if padded != -(-n_rows // world) * world:
            errors.append(f"{name}: {padded} rows, expected {n_rows} padded to a multiple of {world}")
            continue
        n_padded += padded != n_rows
        c = padded // world
        full = trainer.reader.rows_4bit(prefix, n_rows, k, 0, n_rows)
        packed = torch.zeros(padded, k // 2, dtype=torch.uint8)
        absmax = torch.zeros(padded, k // local.blocksize, dtype=torch.float32)
        packed[:n_rows] = full.packed
        absmax[:n_rows] = full.absmax
        lo, hi = rank * c, (rank + 1) * c
        if tuple(local.packed.shape) != (c, k // 2) or local.packed.dtype != torch.uint8:
            errors.append(
                f"{name}: local packed {local.packed.dtype} {tuple(local.packed.shape)}, expected uint8 {(c, k // 2)}"
            )
            continue
        if not torch.equal(local.packed.cpu(), packed[lo:hi]):
            errors.append(f"{name}: packed shard != checkpoint rows [{lo}, {hi})")
        if not torch.equal(local.absmax.cpu(), absmax[lo:hi]):
            errors.append(f"{name}: absmax shard != checkpoint rows [{lo}, {hi})")
        if not torch.equal(local.code.cpu(), full.code):
            errors.append(f"{name}: code book differs from the checkpoint's quant_map")
    return {"errors": errors, "n_checked": n_checked, "n_padded": n_padded}


def _check_unsharded(trainer, world: int) -> dict:
    """Gather layer 0 (FSDPModule.unshard; a one-rank job without FSDP holds it whole) and compare each
    projection's dequantization, bit for bit, with bitsandbytes' dequantize_4bit of the whole checkpoint
    weight (QuantState.from_dict)."""
    import bitsandbytes.functional as bnbF
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from models.quant import Weight4bit

    reader = trainer.reader
    block = trainer.model.model.layers[0]
    results = {}
    fsdp = isinstance(block, FSDPModule)
    if fsdp:
        block.unshard()
    try:
        for mod_name, mod in block.named_modules():
            w = getattr(mod, "weight", None)
            if not mod_name.endswith("_proj") or w is None:
                continue
            prefix = f"model.layers.0.{mod_name}"
            entry = {"type": type(w).__name__, "is_dtensor": isinstance(w, DTensor)}
            if isinstance(w, Weight4bit):
                mine = w.dequantize(torch.float32)
                keys = [k for k in reader.weight_map if k.startswith(f"{prefix}.weight.")]
                qs = bnbF.QuantState.from_dict(
                    {k[len(f"{prefix}.weight.") :]: reader.read(k) for k in keys}, torch.device("cpu")
                )
                qs.dtype = torch.float32
                ref = bnbF.dequantize_4bit(reader.read(f"{prefix}.weight"), qs)
                entry.update(
                    shape=tuple(w.shape),
                    n_rows=w.n_rows,
                    deq_shape=tuple(mine.shape),
                    ref_shape=tuple(ref.shape),
                    equal=bool(mine.shape == ref.shape and torch.equal(mine.cpu(), ref)),
                    max_diff=float((mine.cpu() - ref).abs().max()) if mine.shape == ref.shape else float("inf"),
                )
            results[mod_name] = entry
    finally:
        if fsdp:
            block.reshard()
    return results


def run_jobs(rank: int, world: int, jobs: list[dict], out_dir: str) -> None:
    """Run every job in order on one process group. A job is a dict with
    ``name``, ``overrides`` (CLI strings), optional ``checks`` (shard / gather / spy checks),
    optional ``save`` / ``export`` (write the final checkpoint / the adapter), optional
    ``expect_exit`` (the Trainer must refuse the layout: record the message) and optional
    ``compile_backend`` (what ``nn.Module.compile`` compiles with, e.g. "aot_eager": dynamo and
    AOTAutograd trace the blocks as inductor would take them, in seconds on CPU instead of minutes)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import recipe.train
    from parallel.distributed import LayoutError, destroy
    from recipe.config import load_config
    from recipe.data import count_targets
    from recipe.train import Trainer

    # Trainer.close() closes everything the trainer opened and destroys the process group: keep
    # the group for the next job, destroy it once at the end.
    recipe.train.destroy = lambda: None
    out = Path(out_dir)
    try:
        for job in jobs:
            name = job["name"]
            dump = Path(job["dump"]) if job.get("dump") else out / "dump" / f"{name}_w{world}"
            cfg = load_config(list(job["overrides"]) + [f"--job.dump_folder={dump}"])
            if job.get("expect_exit"):
                try:
                    Trainer(cfg)
                except LayoutError as e:
                    msg = f"{type(e).__name__}: {e}"
                else:
                    msg = None
                torch.save({"message": msg}, out / f"{name}_w{world}_rank{rank}.pt")
                continue

            t_job = time.perf_counter()
            spy: list = []
            undo = _spy_pre_all_gather(spy) if job.get("checks") else None
            compile_ = torch.nn.Module.compile
            if job.get("compile_backend"):
                torch.nn.Module.compile = functools.partialmethod(compile_, backend=job["compile_backend"])
            try:
                trainer = Trainer(cfg)
                named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
                grads: list[dict[str, torch.Tensor]] = []
                orig_clip = trainer._clip

                def clip(orig_clip=orig_clip, grads=grads, named=named):
                    # After every micro-batch's backward (and the gradient reduce-scatter),
                    # before clipping and the optimizer step: this rank's rows of every gradient
                    # (no collective; the parent concatenates the ranks' rows).
                    grads.append({n: local_tensor(p.grad).detach().float().cpu().clone() for n, p in named})
                    return orig_clip()

                trainer._clip = clip
                trainer.model.train()
                losses, norms, targets = [], [], []
                start_step = trainer.step  # > 0 after a resume (a job with its own "dump" folder)
                while trainer.step < cfg.training.steps:
                    micro = trainer.loader.micro_batches(trainer.step)
                    targets.append(sum(count_targets(mb["labels"]) for mb in micro))
                    r = trainer.train_step()
                    losses.append(r.loss)
                    norms.append(r.grad_norm)
                if job.get("save"):  # the final checkpoint Trainer.train() would write
                    trainer.checkpointer.maybe_save(trainer.step, force=True)
                    trainer.checkpointer.wait()
                if job.get("export"):  # the adapter Trainer.train() would write
                    trainer.export_adapter(dump / "adapter")
                rank_targets = [None] * world
                dist.all_gather_object(rank_targets, targets)
                local = {
                    "targets": targets,
                    "rank_targets": rank_targets,
                    "grads": grads,
                    "embed": repr(trainer.model.model.embed_tokens),
                    "fsdp_modules": sum(isinstance(m, FSDPModule) for m in trainer.model.modules()),
                }
                if job.get("checks"):
                    local["shards"] = _check_shards(trainer, rank, world)
                    local["unsharded"] = _check_unsharded(trainer, world)
                    local["spy"] = spy
                if rank == 0:
                    torch.save(
                        {
                            "losses": losses,
                            "grad_norms": norms,
                            "rank_targets": rank_targets,
                            "accum": trainer.loader.grad_accum_steps,
                            "start_step": start_step,
                            "seconds": time.perf_counter() - t_job,
                        },
                        out / f"{name}_w{world}.pt",
                    )
                torch.save(local, out / f"{name}_w{world}_rank{rank}.pt")
                trainer.close()
                del trainer
            finally:
                if undo is not None:
                    undo()
                if torch.nn.Module.compile is not compile_:
                    torch.nn.Module.compile = compile_
                    torch._dynamo.reset()
            dist.barrier()
    finally:
        destroy()
