"""Cross-attention fusion: question tokens attend to image patches layer by layer (ViLBERT / LXMERT
style). With `bidirectional`, image patches also attend back to the question in each layer.

`attention` (conf/model/attention/) computes every attention here. A sliding window applies to the
self-attention of the question (a band) and, with `bidirectional`, of the patches (a 2D
neighbourhood); text -> image cross-attention stays dense, since a window has no meaning across
two sequences (`mmqa.models.attention.binding.for_cross_attention`).

The question tokens are pooled into one vector by their mean, or with `pool_queries` > 0 by the mean
plus that many learned attention reads (`layers.AttentionPool`), which keep two named objects apart."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmqa.models.attention.sliding_window import TokenLayout
from mmqa.models.layers import AttentionPool, Block, masked_mean
from mmqa.models.outputs import FusionOutput


class CrossFusion(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, bidirectional: bool,
                 attention: Callable | None = None, qk_norm: bool = False, pool_queries: int = 0):
        super().__init__()
        def block():
            return Block(dim, heads, mlp_ratio, dropout, cross=True, attention=attention, qk_norm=qk_norm)

        self.text_blocks = nn.ModuleList(block() for _ in range(depth))
        self.image_blocks = (
            nn.ModuleList(block() for _ in range(depth))
            if bidirectional
            else None
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, pool_queries) if pool_queries else masked_mean

    def forward(
        self,
        img_tokens: torch.Tensor,  # (B, N, D)
        img_mask: torch.Tensor,  # (B, N) bool
        txt_tokens: torch.Tensor,  # (Q, T, D)
        txt_mask: torch.Tensor,  # (Q, T) bool
        img_idx: torch.Tensor,  # (Q,) image row of each question
        return_attention: bool = False,
    ) -> FusionOutput:
        t, v, v_idx = txt_tokens, img_tokens, img_idx
        if self.image_blocks is not None:
            # image tokens will be updated per question, so each question needs its own copy
            v, img_mask, v_idx = img_tokens.index_select(0, img_idx), img_mask.index_select(0, img_idx), None
        grid = TokenLayout.patches(img_tokens.shape[1])  # the patches' 2D grid, for a sliding window
        weights = None
        for i, blk in enumerate(self.text_blocks):
            last = i == len(self.text_blocks) - 1
            t_new, weights = blk(t, txt_mask, v, img_mask, need_weights=return_attention and last, context_idx=v_idx)
            if self.image_blocks is not None:
                v, _ = self.image_blocks[i](v, img_mask, t, txt_mask, layout=grid)
            t = t_new
        t = self.norm(t)
        return FusionOutput(pooled=self.pool(t, txt_mask), tokens=t, attention=weights)  # weights (B, h, T, N)

    def readout(self, t: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        """The pooled output (Q, D) from question tokens (Q, T, D) after any layer: the logit lens reads
        intermediate layers the way the last one is read."""
        return self.pool(self.norm(t), txt_mask)
