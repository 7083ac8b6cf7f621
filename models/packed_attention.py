"""Attention over packed documents without a (seq x seq) mask: causal attention per document.

The default path for packed rows (``models.llama._attention_mask``) builds a boolean
(batch, 1, seq, seq) mask that keeps every token inside its own document: 16 GiB at seq 131,072, and
it forces SDPA off the flash kernels. ``model.packed_attention = "segments"`` instead cuts each row at
its document starts (a position id of 0) and runs causal SDPA on every document: memory linear in
the sequence, flash kernels allowed, one kernel call per document and row (meant for long rows
with few documents; many short documents cost many small calls).

Right padding (the recipe's packer pads the last row at its end, positions still counting) joins the
last document: real tokens never attend to later positions, so their outputs, the loss and the
gradients are those of the masked path; only the padded positions' own outputs, which nothing
trains on, differ. A row with padding elsewhere (left padding) falls back to the mask.

The document starts are read on the host once per forward (one device-to-host copy of the position
ids), not per block: the blocks and their recomputation reuse them. Not with torch.compile (every
new document layout would compile again; ``recipe.config`` refuses the pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DocumentSegments", "document_segments", "segment_attention"]


@dataclass(frozen=True)
class DocumentSegments:
    """Per batch row, the (start, end) token ranges of its documents, in order, covering the row."""

    rows: tuple[tuple[tuple[int, int], ...], ...]


def document_segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> DocumentSegments | None:
    """The documents of each row from its position ids; None where the mask path must be used (a row
    whose padding is not a suffix)."""
    pos = position_ids.detach().to("cpu")
    b, t = pos.shape
    if attention_mask is not None:
        am = attention_mask.detach().to("cpu").bool()
        n_real = am.sum(-1, keepdim=True)
        if not torch.equal(am, torch.arange(t)[None].expand(b, t) < n_real):
            return None
    rows = []
    for r in range(b):
        starts = [0] + [int(i) for i in torch.nonzero(pos[r, 1:] == 0).flatten() + 1]
        rows.append(tuple(zip(starts, starts[1:] + [t], strict=True)))
    return DocumentSegments(tuple(rows))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: DocumentSegments, gqa: bool):
    """Causal SDPA within each document of each row; q (b, heads, t, d), k and v (b, kv heads, t, d)
    (``gqa``: the kernel shares kv heads; otherwise k and v already have q's heads)."""
    rows = []
    for r, docs in enumerate(segments.rows):
        parts = [
            F.scaled_dot_product_attention(
                q[r : r + 1, :, s:e], k[r : r + 1, :, s:e], v[r : r + 1, :, s:e], is_causal=True, enable_gqa=gqa
            )
            for s, e in docs
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)
