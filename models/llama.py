"""Llama 3.x in plain PyTorch, with QLoRA projections. No parallelism lives here.

Parameter names equal the HF checkpoint keys (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``...), so loading needs no renaming, and LoRA parameters sit beside them as
``...q_proj.lora_A.weight`` (PEFT's names without the adapter name).

Shape of the module tree, chosen for the parallel code that wraps it:
  LlamaForCausalLM
    model: LlamaModel
      embed_tokens   nn.Embedding
      layers         nn.ModuleList of DecoderLayer (indexable: FSDP wraps each; ``part`` slices it into
                     pipeline stages, an nn.ModuleDict keyed by the block index so names do not change)
      norm           RMSNorm
      rotary_emb     RotaryEmbedding (a non-persistent buffer; recomputed after materialization)
    lm_head          nn.Linear (frozen, or the embedding matrix when tied)

``forward`` takes ``input_ids`` (or ``inputs_embeds``), ``attention_mask``, ``labels`` (aligned with
input_ids; the model shifts them) and ``position_ids``, HF's names for them, and nothing else; it returns
``CausalLMOutput`` with ``.loss``, ``.logits``, ``.loss_sum`` and ``.num_tokens``. HF ``Trainer``'s calling
convention (extra keywords, ``num_items_in_batch``, indexing the output) lives in ``recipe.hf_model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.lora import FusedQLoRALinear, QLoRALinear
from models.packed_attention import DocumentSegments, document_segments, segment_attention
from models.quant import Weight4bit
from models.shapes import LlamaShape

__all__ = ["ModelArgs", "LlamaForCausalLM", "LlamaPart", "CausalLMOutput", "LORA_TARGETS", "IGNORE_INDEX"]

IGNORE_INDEX = -100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArgs:
    """Everything needed to build the module tree (on any device, usually meta)."""

    shape: LlamaShape
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # None: dense frozen projections. Otherwise "nf4" / "fp4" 4-bit base weights.
    quant_type: str | None = "nf4"
    quant_blocksize: int = 64
    # Dtype the frozen weights are stored/dequantized in (the compute dtype).
    dtype: torch.dtype = torch.bfloat16
    # Tokens per cross-entropy chunk (0: about 64 Mi logits per chunk, ~0.25 GiB in fp32): the
    # full-vocabulary logits of a whole batch (2 x 2048 x 128256 fp32 = 2 GiB for Llama 3) never exist.
    loss_chunk_tokens: int = 0
    # Tokens per MLP chunk (0: the whole sequence at once). For long sequences: the MLP's (tokens x
    # intermediate) tensors (four of them, 11 GiB at 100k tokens for Llama 3 8B) exist for one chunk at
    # a time, each chunk recomputed in backward. The MLP is per token, so the result is the same.
    mlp_chunk_tokens: int = 0
    # Packed rows: "mask" (a boolean (seq x seq) mask per row) or "segments" (causal attention per
    # document, models/packed_attention.py: memory linear in the sequence).
    packed_attention: str = "mask"
    # q/k/v and gate/up each as one frozen matrix (models/lora.py FusedQLoRALinear): one dequantization
    # and one GEMM per group; LoRA parameters keep their per-projection names.
    fuse_projections: bool = False
    # Compiled blocks run each 4-bit projection as one operator with its adapters inside
    # (models/qlora_op.py): no adapter tensors of the projection's size for the compiler to keep.
    lora_epilogue: bool = True


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # Sum of per-token losses and number of target tokens: what a global-token-count
    # normalisation across ranks and micro-batches needs.
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as HF Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def llama3_inv_freq(shape: LlamaShape) -> torch.Tensor:
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = shape.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    if rs.get("rope_type", rs.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {rs!r}: only 'llama3' (or none) is implemented")
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.register_buffer("inv_freq", llama3_inv_freq(shape), persistent=False)

    def reset_buffers(self, device) -> None:
        self.inv_freq = llama3_inv_freq(self.shape).to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x, cos, sin):
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, linear):
        super().__init__()
        s = args.shape
        self.n_heads, self.n_kv, self.head_dim = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # Fused: the frozen rows in qkv_proj; q_proj/k_proj/v_proj hold only their adapters.
        self.qkv_proj = _make_fused(args, s.hidden_size, (("q_proj", q), ("k_proj", kv), ("v_proj", kv)))
        part = _part_factory(args, linear, self.qkv_proj)
        self.q_proj = part("q_proj", s.hidden_size, q)
        self.k_proj = part("k_proj", s.hidden_size, kv)
        self.v_proj = part("v_proj", s.hidden_size, kv)
        self.o_proj = linear("o_proj", q, s.hidden_size)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv
        # Grouped-query attention inside the kernel where that kernel has it: flash and cuDNN on CUDA
        # (causal rows, or one document at a time) read each kv head for its `rep` query heads, with no
        # (b, heads, t, head_dim) copies of K and V. Otherwise expand: with a mask the memory-efficient
        # kernel runs, which has no GQA (with enable_gqa SDPA would fall back to the math kernel and its
        # (t x t) score matrices); on CPU, with enable_gqa 1 process and 2 or 3 processes (fewer threads
        # each) gave bf16 gradient norms 1.8e-3 apart in tests/test_fsdp.py (expanded: within 1e-3).
        gqa = rep > 1 and q.is_cuda and not isinstance(mask, torch.Tensor)
        if rep > 1 and not gqa:
            k = k[:, :, None].expand(b, self.n_kv, rep, t, self.head_dim).reshape(b, self.n_heads, t, -1)
            v = v[:, :, None].expand(b, self.n_kv, rep, t, self.head_dim).reshape(b, self.n_heads, t, -1)
        if isinstance(mask, DocumentSegments):
            out = segment_attention(q, k, v, mask, gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, linear):
        super().__init__()
        h, i = args.shape.hidden_size, args.shape.intermediate_size
        self.gate_up_proj = _make_fused(args, h, (("gate_proj", i), ("up_proj", i)))
        part = _part_factory(args, linear, self.gate_up_proj)
        self.gate_proj = part("gate_proj", h, i)
        self.up_proj = part("up_proj", h, i)
        self.down_proj = linear("down_proj", i, h)
        self.chunk_tokens = args.mlp_chunk_tokens

    def _mlp(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x, (self.gate_proj, self.up_proj))
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x):
        b, t, h = x.shape
        chunk = self.chunk_tokens
        if not chunk or b * t <= chunk:
            return self._mlp(x)
        flat = x.reshape(b * t, h)
        # Each chunk's intermediates are dropped after its forward and rebuilt in its backward, also
        # inside a checkpointed block's recompute (nested non-reentrant checkpoints).
        parts = [
            torch.utils.checkpoint.checkpoint(self._mlp, flat[i : i + chunk], use_reentrant=False)
            for i in range(0, b * t, chunk)
        ]
        return torch.cat(parts).view(b, t, h)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        s = args.shape
        linear = lambda name, i, o: _make_linear(args, name, i, o)
        self.self_attn = Attention(args, linear)
        self.mlp = MLP(args, linear)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, args.dtype)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, args.dtype)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _frozen_weight(args: ModelArgs, in_features: int, out_features: int) -> torch.Tensor:
    if args.quant_type is None:
        return torch.empty(out_features, in_features, dtype=args.dtype)
    return Weight4bit.empty(
        out_features,
        in_features,
        quant_type=args.quant_type,
        blocksize=args.quant_blocksize,
        dtype=args.dtype,
        device=torch.get_default_device(),
    )


def _make_linear(args: ModelArgs, name: str, in_features: int, out_features: int, base: bool = True) -> QLoRALinear:
    """A projection with its frozen weight, or (``base=False``) only its adapter, when its rows live in
    a fused matrix."""
    weight = _frozen_weight(args, in_features, out_features) if base else None
    rank = args.lora_rank if name in args.lora_targets else 0
    return QLoRALinear(
        in_features,
        out_features,
        rank=rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        weight=weight,
        epilogue=args.lora_epilogue,
    )


def _part_factory(args: ModelArgs, linear, fused: FusedQLoRALinear | None):
    """What builds the projections of a fusable group: ``linear``, or adapters only (no frozen weight)
    when ``fused`` holds their rows."""
    if fused is None:
        return linear
    return lambda name, i, o: _make_linear(args, name, i, o, base=False)


def _make_fused(args: ModelArgs, in_features: int, parts) -> FusedQLoRALinear | None:
    """The frozen weights of ``parts`` ((name, out_features), sharing the input) as one matrix, or None
    when ``args.fuse_projections`` is off."""
    if not args.fuse_projections:
        return None
    weight = _frozen_weight(args, in_features, sum(n for _, n in parts))
    return FusedQLoRALinear(in_features, parts, weight=weight, epilogue=args.lora_epilogue)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        s = args.shape
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size, dtype=args.dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps, args.dtype)
        self.rotary_emb = RotaryEmbedding(s)
        self.packed_attention = args.packed_attention

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        documents = None
        if position_ids is None:
            position_ids = torch.arange(t, device=h.device)[None].expand(b, t)
        else:
            # Packed rows: a position id of 0 after the first token starts a new document, and a
            # token attends only within its own document (consistent with its restarted RoPE positions).
            documents = (position_ids == 0).cumsum(-1)
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        mask = None
        if documents is not None and self.packed_attention == "segments":
            mask = document_segments(position_ids, attention_mask)
        if mask is None:
            mask = _attention_mask(attention_mask, documents, t, h.device)
        for layer in self.blocks():
            h = layer(h, cos, sin, mask)
        return self.norm(h) if self.norm is not None else h

    def blocks(self) -> list[DecoderLayer]:
        """The decoder blocks in order: all of them, or a part's (``LlamaForCausalLM.part``)."""
        return list(self.layers.values()) if isinstance(self.layers, nn.ModuleDict) else list(self.layers)


def _attention_mask(attention_mask, documents, t, device):
    """None (pure causal, lets SDPA pick flash kernels) unless there is padding or packing.

    ``documents`` (batch, t) holds a document index per token when the caller passed position_ids;
    then attention is causal within each document only.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and documents is None:
        return None
    keep = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    if documents is not None:
        keep = keep & (documents[:, None, :, None] == documents[:, None, None, :])
    if padded:
        keep = keep & attention_mask[:, None, None, :].bool()
    # A fully padded query row would give NaN softmax; let it attend to itself.
    return keep | torch.eye(t, dtype=torch.bool, device=device)[None, None]


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        s = args.shape
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False, dtype=args.dtype)
        self.lm_head.weight.requires_grad_(False)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.token_loss = TokenLoss()  # no parameters; parallel/ may compile it (training.compile_loss)

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, position_ids=None, inputs_embeds=None
    ) -> CausalLMOutput:
        """Logits without ``labels``; with them the summed token loss, the target count and their quotient.
        Any other keyword is a TypeError: the HF Trainer's calling convention (``num_items_in_batch``,
        logits next to the loss, extra keywords) is ``recipe.hf_model``'s wrapper's."""
        h = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        return self.causal_lm_output(h, labels)

    def causal_lm_output(self, h: torch.Tensor, labels=None, *, with_logits: bool = False) -> CausalLMOutput:
        """lm_head and the loss over the final hidden states ``h``. With ``labels`` the logits are
        computed only when ``with_logits`` (the chunked loss never holds them all)."""
        w = output_weight(self.lm_head)  # read once: a head kept on the host copies it per read
        if labels is None:
            return CausalLMOutput(logits=F.linear(h, w).float())
        loss_sum, n_tokens = chunked_cross_entropy(h, w, labels, self.loss_chunk(), self.token_loss)
        logits = F.linear(h, w).float() if with_logits else None
        return CausalLMOutput(
            loss=loss_sum / n_tokens.clamp(min=1), logits=logits, loss_sum=loss_sum, num_tokens=n_tokens
        )

    def loss_chunk(self) -> int:
        return self.args.loss_chunk_tokens or max(256, 2**26 // self.args.shape.vocab_size)

    def part(self, layer_ids, *, first: bool, last: bool) -> LlamaPart:
        """A contiguous slice of this model that shares its modules: the blocks ``layer_ids`` (kept under
        their own indices, so parameter names stay the full model's), plus the embeddings when ``first``
        and the final norm and lm_head when ``last``. With tied embeddings a last part that is not also
        the first gets its own copy of the (frozen) embedding module to hold lm_head's weight, so that
        two parts never share a parameter. Build it on the meta device, before any sharding."""
        import copy

        part = LlamaPart.__new__(LlamaPart)
        nn.Module.__init__(part)
        part.args, part.is_first, part.is_last = self.args, first, last
        inner = LlamaModel.__new__(LlamaModel)
        nn.Module.__init__(inner)
        tied = self.args.shape.tie_word_embeddings
        embed = self.model.embed_tokens
        if last and tied and not first:
            embed = copy.deepcopy(embed)
        inner.embed_tokens = embed if first or (last and tied) else None
        inner.layers = nn.ModuleDict({str(i): self.model.layers[i] for i in layer_ids})
        inner.norm = self.model.norm if last else None
        inner.rotary_emb = self.model.rotary_emb
        inner.packed_attention = self.model.packed_attention
        part.model = inner
        part.lm_head = None
        part.token_loss = self.token_loss if last else None
        if last:
            part.lm_head = self.lm_head if not tied or first else copy.deepcopy(self.lm_head)
            if tied:
                part.lm_head.weight = inner.embed_tokens.weight
        return part


class LlamaPart(LlamaForCausalLM):
    """A slice of the model (``LlamaForCausalLM.part``): what one pipeline stage runs.

    ``forward(x, labels, attention_mask, position_ids)`` takes token ids in the first part and the
    previous part's hidden states otherwise; it returns the hidden states, or in the last part the
    summed token loss of ``chunked_cross_entropy`` (an fp32 tensor of shape (1,)), computed as
    ``LlamaForCausalLM.forward`` computes it."""

    is_first: bool
    is_last: bool

    def forward(self, x, labels=None, attention_mask=None, position_ids=None) -> torch.Tensor:
        ids, embeds = (x, None) if self.is_first else (None, x)
        h = self.model(ids, attention_mask, position_ids, embeds)
        if not self.is_last:
            return h
        # (1,), not 0-dim: the schedule concatenates the last stage's outputs over micro-batches. Not a
        # view (reshape would be): FSDP's pre-backward hook does not survive in-place use of a view output.
        loss = chunked_cross_entropy(h, output_weight(self.lm_head), labels, self.loss_chunk(), self.token_loss)[0]
        return torch.stack([loss])


class TokenLoss(nn.Module):
    """The summed cross-entropy of one chunk's logits (any dtype; upcast to fp32 first). A module of its
    own so that ``parallel.parallelize`` can compile it (``training.compile_loss``): the upcast, the
    log-softmax and the target gather then run as fused kernels instead of materialising fp32 logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def output_weight(lm_head: nn.Module) -> torch.Tensor:
    """lm_head's matrix on the compute device, read once per forward by the loss. A head module that
    keeps it elsewhere (``parallel.embedding.HostLMHead``: in host memory) hands out a device copy
    through ``device_weight``; the loss's checkpointed chunks keep that copy until their backward."""
    fetch = getattr(lm_head, "device_weight", None)
    return fetch() if fetch is not None else lm_head.weight


def chunked_cross_entropy(h, weight: torch.Tensor, labels, chunk_tokens: int, token_loss: nn.Module):
    """Sum of next-token losses and the number of target tokens, computed chunk by chunk.

    Each chunk's logits are recomputed in backward (checkpoint), so peak memory holds one chunk of
    (chunk_tokens x vocab) fp32 logits instead of the whole batch's. Chunks whose targets are all
    ignored are still computed (they add 0): skipping them would need a GPU->CPU sync per chunk,
    and a batch without any target must still produce a graph for backward.
    """
    # Shift the labels, not the hidden states: h[:, :-1] would copy (batch x seq x hidden) and the
    # checkpointed chunks would keep that copy alive until backward. The last position has no target.
    targets = F.pad(labels[:, 1:].to(h.device), (0, 1), value=IGNORE_INDEX).reshape(-1)
    h = h.reshape(-1, h.shape[-1])
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, tc = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        total = total + torch.utils.checkpoint.checkpoint(_ce_chunk, hc, tc, weight, token_loss, use_reentrant=False)
    return total, (targets != IGNORE_INDEX).sum()


def _ce_chunk(h, targets, weight, token_loss):
    return token_loss(F.linear(h, weight), targets)
