"""Late fusion: image and question are each pooled on their own and only the two vectors meet, in an
MLP over [i, t, i*t, |i-t|]. The cheapest variant, and the baseline the others must beat. It has no
patch-level attention, so it returns no attention maps."""

from __future__ import annotations

import torch
from torch import nn

from mmqa.models.layers import masked_mean
from mmqa.models.outputs import FusionOutput


class LateFusion(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.LayerNorm(4 * dim), nn.Linear(4 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(
        self,
        img_tokens: torch.Tensor,  # (B, N, D)
        img_mask: torch.Tensor,  # (B, N) bool
        txt_tokens: torch.Tensor,  # (Q, T, D)
        txt_mask: torch.Tensor,  # (Q, T) bool
        img_idx: torch.Tensor,  # (Q,) image row of each question
        return_attention: bool = False,
    ) -> FusionOutput:
        i = masked_mean(img_tokens, img_mask).index_select(0, img_idx)  # (Q, D), pooled once per image
        t = masked_mean(txt_tokens, txt_mask)  # (Q, D)
        pooled = self.mlp(torch.cat([i, t, i * t, (i - t).abs()], dim=-1))  # (Q, D)
        return FusionOutput(pooled=pooled, tokens=txt_tokens, attention=None)
