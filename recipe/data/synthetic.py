"""A synthetic dataset for runs without a data file (the shipped configs, tests).

It needs no tokenizer and depends only on (vocab size, shape, seed), so such runs are reproducible
anywhere and still show a falling loss.
"""

from __future__ import annotations

import torch

from recipe.data.errors import DataError

__all__ = ["synthetic_dataset"]


def synthetic_dataset(vocab_size: int, seq_len: int, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Random but learnable data.

    Tokens are drawn from a small active sub-vocabulary (<= 256 ids) and follow a fixed random
    bigram table: with probability 0.8 the next token is ``table[cur]``, otherwise uniform over
    the active set. A model first learns the unigram support (loss drops from ln(vocab) to about
    ln(256)), then the bigram table (towards ~1.3 nats), so loss visibly falls in a short run.
    """
    if vocab_size < 2 or seq_len < 2 or num_samples < 1:
        raise DataError(f"bad synthetic dataset shape: vocab={vocab_size} seq_len={seq_len} n={num_samples}")
    g = torch.Generator().manual_seed(int(seed))
    k = min(vocab_size, 256)
    active = torch.randperm(vocab_size, generator=g)[:k]
    table = torch.randint(0, k, (k,), generator=g)
    cur = torch.randint(0, k, (num_samples,), generator=g)
    out = torch.empty((num_samples, seq_len), dtype=torch.long)
    follow = torch.rand((num_samples, seq_len), generator=g) < 0.8
    rand_next = torch.randint(0, k, (num_samples, seq_len), generator=g)
    for t in range(seq_len):
        out[:, t] = cur
        cur = torch.where(follow[:, t], table[cur], rand_next[:, t])
    input_ids = active[out]
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(seq_len, dtype=torch.long).expand(num_samples, seq_len).clone(),
    }
