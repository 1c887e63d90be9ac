"""Memoised outputs of a frozen text encoder.

A frozen tower maps the same token row to the same vectors every time, and a training set asks the
same few thousand questions and captions epoch after epoch (the shapes world: 24,000 training
questions, 8,700 distinct). So each distinct row is encoded once and read back after: a pretrained
encoder that costs more than the rest of the model together (all-MiniLM-L6-v2) costs its forward
pass once per distinct text, not once per step.

The key is a row's real tokens (its ids where the attention mask is set), so the same text padded to
different batch lengths is one entry. The tower runs in eval mode under `no_grad` (no dropout: a
cached row must be what a fresh pass would give), on the rows not yet held only. The cache is
training-time state, never saved: a bundle holds the model, and a loaded one encodes afresh.
`fill` encodes a whole set of texts up front, shortest first, in large batches with little padding:
cheaper than meeting them a training batch at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from mmqa.models.outputs import EncoderOutput


class FrozenTextCache:
    def __init__(self, tower: nn.Module, max_rows: int):
        """`max_rows`: distinct rows kept; rows beyond it are encoded every time they come."""
        trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"only a frozen text encoder can be cached, but {len(trainable)} of its weights train "
                             f"(e.g. {trainable[0]}): freeze=[text_encoder] without LoRA on it")
        if max_rows < 1:
            raise ValueError(f"the cache needs max_rows >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> tokens (n, D), pooled (D,)
        self.hits = self.misses = 0

    def fill(self, tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_per_pass: int) -> int:
        """Encode the rows (N, L) not yet held, `rows_per_pass` at a time in order of length, each pass
        cut to its longest row; returns how many were encoded."""
        before = self.misses
        lengths = attention_mask.sum(1)  # (N,)
        order = lengths.argsort()
        for start in range(0, len(order), rows_per_pass):
            rows = order[start:start + rows_per_pass]
            width = int(lengths[rows].max())
            self(tower, input_ids[rows, :width], attention_mask[rows, :width])
        return self.misses - before

    def __call__(self, tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        mask = attention_mask.bool()  # (B, L)
        keys = [ids[m].cpu().numpy().tobytes() for ids, m in zip(input_ids, mask)]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        fresh = {}
        if missing:
            was_training = tower.training
            tower.eval()
            with torch.no_grad():
                out = tower(input_ids[missing], attention_mask[missing])  # tokens (M, L, D)
            tower.train(was_training)
            for j, i in enumerate(missing):
                row = (out.tokens[j][mask[i]].clone(), out.pooled[j].clone())  # (n, D), (D,)
                fresh[keys[i]] = row
                if len(self.rows) < self.max_rows:
                    self.rows[keys[i]] = row
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        found = [self.rows.get(k) or fresh[k] for k in keys]
        tokens_n, pooled = zip(*found)
        tokens = tokens_n[0].new_zeros(*mask.shape, tokens_n[0].shape[-1])  # (B, L, D), zeros on padding
        tokens[mask] = torch.cat(tokens_n)  # (sum n, D) back into their rows
        return EncoderOutput(tokens=tokens, mask=mask, pooled=torch.stack(pooled))  # pooled (B, D)
