"""What saves GPU memory: activation offload (parallel/activation_offload.py), the host embedding table
and lm_head's matrix on the host (parallel/embedding.py) and the compiled 4-bit linear (models/quant.py).

Oracles: the same run without the option (bit-identical losses and LoRA gradients: offload and the
host table only move tensors), eager mode for the compiled path, the dense weights' shapes for what
compile saves. Their 1 vs 2 / 3 rank equality is in tests/test_fsdp.py (ac_offload, host_embedding,
host_lm_head).
"""

from __future__ import annotations

import pytest
import torch

from models.shapes import SHAPES
from recipe.config import ConfigError, load_config

BASE = [
    "--training.steps=3",
    "--training.global_batch_size=4",
    "--training.micro_batch_size=2",
    "--data.seq_len=32",
    "--data.num_synthetic_samples=32",
    "--lr_scheduler.warmup_steps=0",
    "--optimizer.lr=1e-2",
    "--checkpoint.export_adapter=false",
    "--profiling.memory_report=false",
    "--training.mixed_precision_param=float32",
]


def _full(t):
    """The whole tensor of a DTensor (FSDP), or the tensor itself (a one-rank job without FSDP)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run(tmp_path, ckpt, name, *extra):
    from recipe.train import Trainer

    cfg = load_config([f"--model.checkpoint={ckpt}", f"--job.dump_folder={tmp_path / name}", *BASE, *extra])
    tr = Trainer(cfg)
    try:
        losses, grads = [], []
        named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
        orig_clip = tr._clip

        def clip():
            grads.append({n: _full(p.grad).clone() for n, p in named})
            return orig_clip()

        tr._clip = clip
        for _ in range(3):
            losses.append(tr.train_step().loss)
        return losses, grads, getattr(tr.model, "activation_offload", None)
    finally:
        tr.close()


@pytest.fixture(scope="module")
def eager_full_ac(tmp_path_factory, debug_nf4_ckpt):
    return _run(tmp_path_factory.mktemp("ref"), debug_nf4_ckpt, "ref", "--activation_checkpoint.mode=full")


def test_offload_is_bit_identical_and_moves_every_block_input(tmp_path, debug_nf4_ckpt, eager_full_ac):
    ref_losses, ref_grads, _ = eager_full_ac
    losses, grads, off = _run(
        tmp_path, debug_nf4_ckpt, "off", "--activation_checkpoint.mode=full", "--activation_checkpoint.offload=true"
    )
    assert losses == ref_losses
    for g, r in zip(grads, ref_grads, strict=True):
        for n in r:
            assert torch.equal(g[n], r[n]), n
    # Per micro-batch: the 4 blocks' inputs, and the final norm's hidden-sized saved tensors
    # (the last block's output and its fp32 intermediates): 2 micro-batches x 3 steps.
    assert off is not None and off.offloaded >= 4 * 2 * 3
    assert off.restored == off.offloaded
    assert off._pending == []


def test_selective_offload_matches(tmp_path, debug_nf4_ckpt):
    sel = ["--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_every=2"]
    ref, _, _ = _run(tmp_path, debug_nf4_ckpt, "sel", *sel)
    got, _, off = _run(tmp_path, debug_nf4_ckpt, "sel_off", *sel, "--activation_checkpoint.offload=true")
    assert got == ref and off.offloaded > 0 and off.restored == off.offloaded


def test_compiled_offload_matches(tmp_path, debug_nf4_ckpt, eager_full_ac):
    """Compiled checkpointed blocks save their inputs through the hooks too; offload changes nothing."""
    full = ["--activation_checkpoint.mode=full", "--training.compile=true"]
    ref, _, _ = _run(tmp_path, debug_nf4_ckpt, "compiled", *full)
    got, _, off = _run(tmp_path, debug_nf4_ckpt, "compiled_off", *full, "--activation_checkpoint.offload=true")
    assert got == ref
    assert off.offloaded >= 4 * 2 * 3 and off.restored == off.offloaded
    # Compiled (4-bit linear as custom operators) against eager: same first forward, close after.
    eager = eager_full_ac[0]
    assert abs(ref[0] - eager[0]) < 1e-5 and max(abs(a - b) for a, b in zip(ref, eager, strict=True)) < 1e-3


def test_compiled_loss_matches_the_eager_loss(tmp_path, debug_nf4_ckpt, monkeypatch):
    """training.compile_loss compiles the chunks' cross-entropy (model.token_loss): the same losses and
    first-step LoRA gradients as compiled blocks with the eager loss (fp32, 3 steps), and the loss module
    is what was compiled; with compile off it stays eager, and 'auto' follows the blocks' compile."""
    from models.llama import TokenLoss

    full = ["--activation_checkpoint.mode=full", "--training.compile=true", "--training.compile_loss=false"]
    compiled = []
    real_compile = TokenLoss.compile
    monkeypatch.setattr(TokenLoss, "compile", lambda self, **kw: (compiled.append(kw), real_compile(self, **kw)))
    ref, ref_grads, _ = _run(tmp_path, debug_nf4_ckpt, "compiled", *full)
    assert compiled == []
    got, got_grads, _ = _run(tmp_path, debug_nf4_ckpt, "compiled_loss", *full, "--training.compile_loss=true")
    assert compiled == [{"fullgraph": True, "dynamic": None}]
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5
    for name, g in ref_grads[0].items():
        assert torch.allclose(got_grads[0][name], g, rtol=1e-4, atol=1e-6), name

    from recipe.plan import resolve_plan

    def planned(compile_: str, loss_: str) -> bool:
        cfg = load_config([f"--training.compile={compile_}", f"--training.compile_loss={loss_}"])
        return resolve_plan(cfg, torch.device("cpu"), 1, SHAPES["debug"]).compile_loss

    # 'auto' (the default) follows the blocks' compile; an explicit true cannot compile it alone.
    assert [planned(c, lo) for c in ("true", "false", "auto") for lo in ("auto", "true", "false")] == [
        *(True, True, False),
        *(False, False, False),
        *(False, False, False),  # compile 'auto' is off on CPU
    ]
    assert load_config([]).training.compile_loss == "auto"
    loss = TokenLoss()
    logits, targets = torch.randn(5, 11, dtype=torch.bfloat16), torch.tensor([1, -100, 3, 4, 10])
    want = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    assert torch.equal(loss(logits, targets), want)
    # Compiled as parallelize does: chunks of many lengths (varying batches) cost two graphs, not one each.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    loss.compile(fullgraph=True, dynamic=None)
    before = counters["stats"]["unique_graphs"]
    for n in (64, 64, 37, 21, 50, 9):
        x, t = torch.randn(n, 11), torch.randint(0, 11, (n,))
        want = torch.nn.functional.cross_entropy(x, t, reduction="sum")
        assert torch.allclose(loss(x, t), want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 2


def test_offload_needs_checkpointing():
    with pytest.raises(ConfigError, match="activation_checkpoint.mode=full"):
        load_config(["--activation_checkpoint.offload=true"])


def test_compiled_4bit_linear_saves_no_dense_weight(debug_nf4_ckpt):
    """Without checkpointing a compiled block keeps what backward needs; the dequantized weights must
    not be among it (traced as plain ops, the partitioner saved them: one dense copy per matrix)."""
    from tests.conftest import build_recipe_model

    model = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4).train()
    dense = {tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("_proj")}
    for block in model.model.layers:
        block.compile()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randint(0, model.args.shape.vocab_size, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=x, labels=x)
    assert saved  # the hooks saw the compiled graph's saved tensors
    floating_matrices = {s for s, dt in saved if dt.is_floating_point and len(s) == 2}
    assert not floating_matrices & dense, floating_matrices & dense
    out.loss.backward()
    eager = build_recipe_model(debug_nf4_ckpt, quant_type="nf4", lora_rank=4).train()
    ref = eager(input_ids=x, labels=x)
    assert abs(float(ref.loss) - float(out.loss)) < 1e-5


def test_host_embedding_is_bit_identical(tmp_path, debug_nf4_ckpt, eager_full_ac):
    from parallel.embedding import HostEmbedding

    ref_losses, ref_grads, _ = eager_full_ac
    from recipe.train import Trainer

    cfg = load_config(
        [
            f"--model.checkpoint={debug_nf4_ckpt}",
            f"--job.dump_folder={tmp_path / 'host'}",
            *BASE,
            "--activation_checkpoint.mode=full",
            "--parallelism.host_embedding=true",
        ]
    )
    tr = Trainer(cfg)
    try:
        emb = tr.model.model.embed_tokens
        assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu"
        assert not any("embed_tokens" in n for n, _ in tr.model.named_parameters())
        assert [tr.train_step().loss for _ in range(3)] == ref_losses
        with pytest.raises(IndexError):
            emb(torch.tensor([[emb.num_embeddings]]))
    finally:
        tr.close()


def test_host_embedding_refuses_vocab_parallel():
    with pytest.raises(ConfigError, match="host_embedding=false"):
        load_config(["--parallelism.host_embedding=true", "--parallelism.vocab_parallel_embedding=true"])


@pytest.mark.parametrize("option", ["host_embedding", "host_lm_head"])
def test_host_tables_refuse_tied(tmp_path, debug_tied_nf4_ckpt, option):
    """With tied embeddings one matrix is lm_head and the embedding: neither may wait on the host (a
    ConfigError before loading that names the fix)."""
    from parallel.distributed import destroy
    from recipe.train import Trainer

    cfg = load_config(
        [
            f"--model.checkpoint={debug_tied_nf4_ckpt}",
            f"--job.dump_folder={tmp_path / 'tied'}",
            *BASE,
            f"--parallelism.{option}=true",
        ]
    )
    try:
        with pytest.raises(ConfigError, match=f"ties lm_head.*--parallelism.{option}=false"):
            Trainer(cfg)
    finally:
        destroy()  # the failed Trainer left its process group


def test_host_lm_head_is_bit_identical(tmp_path, debug_nf4_ckpt, eager_full_ac, monkeypatch):
    """parallelism.host_lm_head: the same losses and LoRA gradients as lm_head on the device (the loss
    reads the same matrix, only from a copy), with the host embedding too; the matrix stays on the host,
    out of the parameters, and each forward consumes the copy its prefetch started, which starts after
    the embedding lookup (whose host-to-device copy must not queue behind it) and before the blocks."""
    from parallel.embedding import HostLMHead

    ref_losses, ref_grads, _ = eager_full_ac
    from recipe.train import Trainer

    cfg = load_config(
        [
            f"--model.checkpoint={debug_nf4_ckpt}",
            f"--job.dump_folder={tmp_path / 'head'}",
            *BASE,
            "--activation_checkpoint.mode=full",
            "--parallelism.host_lm_head=true",
            "--parallelism.host_embedding=true",
        ]
    )
    tr = Trainer(cfg)
    try:
        head = tr.model.lm_head
        assert isinstance(head, HostLMHead) and head.weight.device.type == "cpu"
        assert not any("lm_head" in n for n, _ in tr.model.named_parameters())
        assert "lm_head.weight" not in tr.model.state_dict()  # stays out of training checkpoints
        named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
        grads, orig_clip = [], tr._clip

        def clip():
            grads.append({n: _full(p.grad).clone() for n, p in named})
            return orig_clip()

        tr._clip = clip
        order = []
        prefetch = HostLMHead.prefetch
        monkeypatch.setattr(HostLMHead, "prefetch", lambda self: order.append("prefetch") or prefetch(self))
        tr.model.model.embed_tokens.register_forward_pre_hook(lambda *_: order.append("embed"))
        tr.model.model.layers[0].register_forward_pre_hook(lambda *_: order.append("block 0"))
        assert [tr.train_step().loss for _ in range(3)] == ref_losses
        micro = len(order) // 3
        assert order == ["embed", "prefetch", "block 0"] * micro and micro >= 3
        for got, want in zip(grads, ref_grads, strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        x = torch.randint(0, head.out_features, (1, 5))
        with torch.no_grad():  # logits without labels: the same single read of the matrix
            logits = tr.model(input_ids=x).logits
        assert logits.shape == (1, 5, head.out_features)
    finally:
        tr.close()


def test_host_lm_head_prefetch_hands_out_the_copy():
    """prefetch / device_weight on CUDA: the copy started by prefetch is the tensor the loss gets, once;
    without a prefetch (or off CUDA) device_weight copies on the spot."""
    from parallel.embedding import HostLMHead

    head = HostLMHead(8, 16, dtype=torch.float32, key="lm_head.weight")
    head.weight = torch.randn(16, 8)
    head.prefetch()  # CPU: a no-op
    assert head._pending is None and torch.equal(head.device_weight(), head.weight)
    if not torch.cuda.is_available():
        pytest.skip("the side-stream prefetch needs CUDA (run on a GPU machine)")
    head.device, head.weight = torch.device("cuda"), head.weight.pin_memory()
    head.prefetch()
    pending = head._pending[0]
    got = head.device_weight()
    assert got is pending and got.is_cuda and torch.equal(got.cpu(), head.weight)
    assert head._pending is None and head.device_weight() is not pending


@pytest.mark.parametrize("mode", ["full", "none"])
def test_chunked_mlp_matches(tmp_path, debug_nf4_ckpt, eager_full_ac, mode, monkeypatch):
    """model.mlp_chunk_tokens: the MLP is per token, so chunks (here 24 of the 64 tokens of a
    micro-batch, the last one shorter) give the unchunked losses, and LoRA gradients up to the order
    in which their sums over tokens are added (fp32: within 1e-5, as 1 vs N ranks)."""
    ref_losses, ref_grads, _ = eager_full_ac
    if mode == "none":
        ref_losses, ref_grads, _ = _run(tmp_path, debug_nf4_ckpt, "plain", "--activation_checkpoint.mode=none")
    from models.llama import MLP

    sizes = []
    inner = MLP._mlp
    monkeypatch.setattr(MLP, "_mlp", lambda self, x: sizes.append(x.shape[0]) or inner(self, x))
    losses, grads, _ = _run(
        tmp_path, debug_nf4_ckpt, "chunked", f"--activation_checkpoint.mode={mode}", "--model.mlp_chunk_tokens=24"
    )
    assert set(sizes) == {24, 16}  # 64 tokens per micro-batch: 24 + 24 + 16
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-6, (losses, ref_losses)
    for g, r in zip(grads, ref_grads, strict=True):
        for n in r:
            torch.testing.assert_close(g[n], r[n], atol=1e-5, rtol=0)


def test_document_segments_from_position_ids():
    from models.packed_attention import document_segments

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [3, 4, 0, 1, 2, 3, 4, 5]])
    assert document_segments(pos, None).rows == (((0, 3), (3, 5), (5, 8)), ((0, 2), (2, 8)))
    right = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    assert document_segments(pos, right).rows == document_segments(pos, None).rows
    left = torch.tensor([[1] * 8, [0] * 2 + [1] * 6])
    assert document_segments(pos, left) is None  # not a suffix: the mask path


@pytest.mark.parametrize("mode", ["none", "full"])
def test_segment_attention_matches_the_mask(tmp_path, debug_nf4_ckpt, mode, monkeypatch):
    """model.packed_attention = 'segments' on packed rows (several documents per row, a padded last
    row) gives the mask path's losses and LoRA gradients (the first step's loss exactly; then within fp32
    reordering, 1e-5, as 1 vs N ranks)."""
    import json
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    data = tmp_path / "instr.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            f.write(json.dumps({"instruction": prompt, "output": " ".join(words[: 1 + i % 7])}) + "\n")
    common = [f"--data.path={data}", "--data.packing=true", "--data.seq_len=48", f"--activation_checkpoint.mode={mode}"]
    common.append("--optimizer.lr=5e-3")  # at 1e-2 this data amplifies fp32 reordering (see test_fsdp padded_data)
    ref_losses, ref_grads, _ = _run(tmp_path, debug_nf4_ckpt, "mask", *common)
    import models.llama

    docs = []
    inner = models.llama.segment_attention
    monkeypatch.setattr(
        models.llama, "segment_attention", lambda q, k, v, seg, gqa: docs.append(seg) or inner(q, k, v, seg, gqa)
    )
    losses, grads, _ = _run(tmp_path, debug_nf4_ckpt, "seg", *common, "--model.packed_attention=segments")
    assert docs and max(len(r) for seg in docs for r in seg.rows) > 1  # rows of several documents
    assert abs(losses[0] - ref_losses[0]) < 1e-9
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-5, (losses, ref_losses)
    for g, r in zip(grads, ref_grads, strict=True):
        for n in r:
            torch.testing.assert_close(g[n], r[n], atol=1e-5, rtol=0)


def test_segments_refuse_compile():
    with pytest.raises(ConfigError, match="packed_attention"):
        load_config(["--model.packed_attention=segments", "--training.compile=true"])


@pytest.mark.parametrize("layout", ["default", "single_rank_fsdp", "cpu_offload"])
def test_one_rank_leaves_frozen_weights_out_of_fsdp(tmp_path, debug_nf4_ckpt, layout):
    """On a shard group of one rank FSDP would only copy frozen weights into all-gather buffers (for the
    8B shape on one GPU: lm_head's 1 GiB kept gathered from forward to backward). They stay plain tensors
    used in place. A one-rank job (default) has no FSDP at all: the LoRA weights are plain fp32 tensors
    too. With ``single_rank_fsdp`` LoRA stays FSDP's; with CPU offload FSDP keeps every weight (it moves
    them to the GPU). Their values are the same either way: tests/test_fsdp.py compares this 1-process
    path with 2 and 3 ranks, where every weight is sharded, and with FSDP on one rank, bit for bit."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from models.quant import Weight4bit
    from recipe.train import Trainer

    extra = {
        "default": [],
        "single_rank_fsdp": ["--parallelism.single_rank_fsdp=true"],
        "cpu_offload": ["--parallelism.cpu_offload=true"],
    }[layout]
    cfg = load_config([f"--model.checkpoint={debug_nf4_ckpt}", f"--job.dump_folder={tmp_path}", *BASE, *extra])
    tr = Trainer(cfg)
    try:
        params = dict(tr.model.named_parameters())
        frozen = {n: p for n, p in params.items() if not p.requires_grad}
        lora = {n: p for n, p in params.items() if p.requires_grad}
        fsdp = layout != "default"
        assert tr.plan.fsdp is fsdp
        assert any(isinstance(m, FSDPModule) for m in tr.model.modules()) is fsdp
        assert lora and {isinstance(p, DTensor) for p in lora.values()} == {fsdp}
        assert all(p.dtype == torch.float32 for p in lora.values())
        assert {isinstance(p, DTensor) for p in frozen.values()} == {layout == "cpu_offload"}
        q = frozen["model.layers.0.self_attn.q_proj.weight"]
        assert isinstance(q.to_local() if layout == "cpu_offload" else q, Weight4bit)
        assert tr.train_step().loss > 0
    finally:
        tr.close()


KEEP = ("--activation_checkpoint.mode=full", "--activation_checkpoint.keep_outputs=o_proj,gate_proj,up_proj")


def _count_frozen_products(monkeypatch):
    """Calls of the 4-bit product per (phase, output rows): 'backward' ones are the recompute's."""
    import collections

    import models.quant as q

    calls, phase = collections.Counter(), ["forward"]
    real, real_backward = q._forward, torch.autograd.backward

    def forward(x, packed, absmax, rows, *rest):
        calls[(phase[0], rows)] += 1
        return real(x, packed, absmax, rows, *rest)

    def backward(*a, **k):
        phase[0] = "backward"
        try:
            return real_backward(*a, **k)
        finally:
            phase[0] = "forward"

    monkeypatch.setattr(q, "_forward", forward)
    monkeypatch.setattr(torch.autograd, "backward", backward)
    return calls


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_kept_outputs_are_not_recomputed(tmp_path, debug_nf4_ckpt, monkeypatch, compiled):
    """activation_checkpoint.keep_outputs: the recompute skips the kept projections' 4-bit products
    (counted per output width: debug shape hidden 256 = q/o/down, 640 = gate/up, 128 = k/v), the losses
    and LoRA gradients are those of plain full checkpointing, and with activation offload the kept
    outputs of compiled blocks go to the host too. down_proj's product is never recomputed (the
    adapter runs first: checkpointing stops after it)."""
    mode = ["--training.compile=true"] if compiled else []
    offload = ["--activation_checkpoint.offload=true"]
    calls = _count_frozen_products(monkeypatch)
    ref, ref_grads, ref_off = _run(
        tmp_path, debug_nf4_ckpt, "full", "--activation_checkpoint.mode=full", *mode, *offload
    )
    plain = dict(calls)
    calls.clear()
    got, got_grads, off = _run(tmp_path, debug_nf4_ckpt, "keep", *KEEP, *mode, *offload)
    kept = dict(calls)
    block_mbs = 4 * 2 * 3  # blocks x micro-batches x steps
    # Plain: q and o again (not down), gate and up, k and v; kept: q only, no gate/up, k and v.
    assert {w: plain.get(("backward", w), 0) for w in (256, 640, 128)} == {
        256: 2 * block_mbs,
        640: 2 * block_mbs,
        128: 2 * block_mbs,
    }
    assert {w: kept.get(("backward", w), 0) for w in (256, 640, 128)} == {256: block_mbs, 640: 0, 128: 2 * block_mbs}
    assert {k: v for k, v in kept.items() if k[0] == "forward"} == {k: v for k, v in plain.items() if k[0] == "forward"}
    # The losses are not bit for bit even in eager: a tagged projection runs as the epilogue operator
    # (models/qlora_op.py, the adapter's product added into the frozen one by addmm, one rounding), an
    # untagged eager one as two products and an add. Equal while B is zero, so the first step's gradients
    # (compared below) are; later losses an ulp apart on some BLAS builds (this machine's MKL, 2026-12-07).
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= 1e-5
    tol = 1e-5 if compiled else 0.0
    for name, g in ref_grads[0].items():
        assert torch.allclose(got_grads[0][name], g, rtol=tol, atol=tol), name
    assert off.restored == off.offloaded and off._pending == []
    if compiled:  # the block input, o's output (hidden wide), gate's and up's outputs: 3 more per block
        assert off.offloaded - ref_off.offloaded == 3 * block_mbs
    else:  # eager checkpointing keeps them in its own cache, on the device
        assert off.offloaded == ref_off.offloaded


def test_keep_every_k_th_block(tmp_path, debug_nf4_ckpt, monkeypatch):
    calls = _count_frozen_products(monkeypatch)
    _run(tmp_path, debug_nf4_ckpt, "keep2", *KEEP, "--activation_checkpoint.keep_every=2")
    # Blocks 0 and 2 keep gate/up; blocks 1 and 3 recompute them: 2 blocks x 2 x 6 micro-batches.
    assert calls[("backward", 640)] == 2 * 2 * 6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--activation_checkpoint.keep_outputs=gate_proj"], "mode=full"),
        (["--activation_checkpoint.mode=full", "--activation_checkpoint.keep_outputs=down_proj"], "not recomputed"),
        (["--activation_checkpoint.mode=full", "--activation_checkpoint.keep_outputs=lm_head"], "unknown projection"),
        ([*KEEP, "--model.quant_type=none"], "4-bit"),
        ([*KEEP, "--model.mlp_chunk_tokens=64"], "mlp_chunk_tokens=0"),
        (["--activation_checkpoint.keep_every=-1"], "keep_every must be >= 0"),
        (["--activation_checkpoint.keep_outputs=auto,o_proj"], "'auto' stands alone"),
    ],
)
def test_keep_outputs_refuses(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(args)


def test_kept_fused_group(tmp_path, debug_nf4_ckpt, monkeypatch):
    """With fused projections, naming one part keeps the group's one product (gate+up: 1280 rows)."""
    calls = _count_frozen_products(monkeypatch)
    fused = ["--model.fuse_projections=true", "--activation_checkpoint.mode=full"]
    ref, _, _ = _run(tmp_path, debug_nf4_ckpt, "fused", *fused)
    assert calls[("backward", 1280)] == 4 * 2 * 3
    calls.clear()
    got, _, _ = _run(tmp_path, debug_nf4_ckpt, "fused_keep", *fused, "--activation_checkpoint.keep_outputs=gate_proj")
    assert calls[("backward", 1280)] == 0 and calls[("forward", 1280)] == 4 * 2 * 3
    assert got == ref


def test_keep_outputs_are_logged_with_where_they_wait(capsys):
    from recipe.plan import resolve_plan

    keep = [*KEEP, "--activation_checkpoint.offload=true", "--activation_checkpoint.keep_every=2"]
    for compile_, where in (("true", "on the host (activation offload)"), ("false", "eager checkpointing keeps")):
        plan = resolve_plan(
            load_config([*keep, f"--training.compile={compile_}"]), torch.device("cpu"), 1, SHAPES["debug"]
        )
        assert plan.ac_keep == ("o_proj", "gate_proj", "up_proj") and plan.ac_keep_every == 2
        out = capsys.readouterr().out
        assert "keep_outputs: o_proj, gate_proj, up_proj kept in one of every 2 checkpointed blocks" in out, out
        assert where in out, out


def test_keep_outputs_auto_keeps_where_the_outputs_wait_on_the_host(tmp_path, capsys):
    """keep_outputs = 'auto' (the default): o/gate/up in every second checkpointed block on one CUDA rank
    with compiled blocks and activation offload; nothing where they would wait on the GPU or where the
    savers are not measured; the run (plan), the estimator and the planner decide alike."""
    from recipe import estimate as E
    from recipe import planner as P
    from recipe.plan import AUTO_KEEP, resolve_keep_outputs, resolve_plan

    full = ["--activation_checkpoint.mode=full"]
    assert load_config([]).activation_checkpoint.keep_outputs == ["auto"]

    def keep(args, device="cuda", world=1, offload=True, compiled=True):
        d = resolve_keep_outputs(load_config([*full, *args]), device, world, offload, compiled)
        return d.names, d.every

    assert keep([]) == (AUTO_KEEP, 2)
    assert keep(["--activation_checkpoint.keep_every=3"]) == (AUTO_KEEP, 3)
    for off in (
        {"device": "cpu"},
        {"world": 2},
        {"offload": False},
        {"compiled": False},
    ):
        assert keep([], **off)[0] == (), off
    for args in (
        ["--parallelism.single_rank_fsdp=true"],
        ["--model.mlp_chunk_tokens=64"],
        ["--model.quant_type=none"],
        ["--activation_checkpoint.mode=none"],
    ):
        assert keep(args)[0] == (), args
    assert keep(["--activation_checkpoint.keep_outputs=up_proj"], device="cpu") == (("up_proj",), 1)
    assert keep(["--activation_checkpoint.keep_outputs="]) == ((), 1)
    # a TOML file may give the bare word
    toml = tmp_path / "k.toml"
    toml.write_text('[activation_checkpoint]\nmode = "full"\nkeep_outputs = "auto"\n')
    assert load_config(["--job.config_file", str(toml)]).activation_checkpoint.keep_outputs == ["auto"]

    plan = resolve_plan(load_config([*full, "--training.compile=true"]), torch.device("cuda"), 1, SHAPES["debug"])
    assert (plan.ac_keep, plan.ac_keep_every) == (AUTO_KEEP, 2)
    assert "o_proj, gate_proj, up_proj kept in one of every 2 checkpointed blocks" in capsys.readouterr().out
    plan = resolve_plan(load_config(full), torch.device("cpu"), 1, SHAPES["debug"])
    assert plan.ac_keep == () and "keep_outputs: none (CPU device" in capsys.readouterr().out

    job8 = ["--job.config_file", "train_configs/llama3_8b_qlora.toml", "--model.checkpoint=/nonexistent/x"]
    base = E._job(load_config(job8), 1)
    assert (base.keep, base.keep_every, E._job(load_config(job8), 2).keep) == (AUTO_KEEP, 2, ())
    for lay, accum in P.candidates(load_config(job8), 1):  # the planner decides per layout as the run will
        cfg = load_config(job8)
        P.apply(cfg, lay, 1)
        assert P._job_for(base, lay, accum).keep == E._job(cfg, 1).keep, lay.describe()


def test_offload_prefetches_whole_blocks():
    """Backward asks for a block's saved tensors together: unpacking the first of block k prefetches
    the rest of block k and every tensor of block k-1 (with one tensor per block: the one before)."""
    from torch import nn

    from parallel.activation_offload import BlockInputOffload

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            wide = torch.cat([x, x[..., :2]], dim=-1) * self.w  # (b, s, 6): saves the (b, s, 6) input
            return x * self.w + wide[..., :4].sin()  # saves x (b, s, 4) and the sin input (a slice)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    for by_block in (True, False):
        root, off = Root(), BlockInputOffload(4, extra_widths=(6,))
        off.install(root, blocks=list(root.blocks) if by_block else ())
        stored = []
        real = off._offload
        off._offload = lambda t, stored=stored, real=real: stored.append(real(t)) or stored[-1]
        root(torch.randn(1, 2, 4)).sum()
        groups = [s.group for s in stored]
        if by_block:
            assert groups == sorted(groups) and len(set(groups)) == 3 and len(stored) >= 6
            last = [s for s in stored if s.group == groups[-1]]
            nxt = off._next_needed(last[0])
            # the rest of the last block, then all of the block before it
            assert set(map(id, nxt)) == set(map(id, last[1:] + [s for s in stored if s.group == groups[-1] - 1]))
        else:
            assert groups == list(range(1, len(stored) + 1))  # one group per tensor: as before blocks
            assert [id(s) for s in off._next_needed(stored[-1])] == [id(stored[-2])]
