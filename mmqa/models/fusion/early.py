"""Early fusion: image patches and question tokens, tagged with modality embeddings, go through one
shared transformer, so every layer can mix the two modalities.

`attention` (conf/model/attention/) computes the transformer's self-attention. For a sliding window
the sequence is laid out Longformer-style: the fusion token and the question tokens are global (they
see and are seen by every token, as Longformer makes a question global), and each image patch
attends to its 2D neighbourhood plus those global tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmqa.models.attention.sliding_window import TokenLayout
from mmqa.models.layers import Block
from mmqa.models.outputs import FusionOutput


class EarlyFusion(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float,
                 attention: Callable | None = None, qk_norm: bool = False):
        super().__init__()
        self.fuse_token = nn.Parameter(torch.zeros(1, 1, dim))  # pooled output, like BERT's [CLS]
        self.modality = nn.Parameter(torch.zeros(2, dim))  # 0 = image, 1 = text
        nn.init.normal_(self.fuse_token, std=0.02)
        nn.init.normal_(self.modality, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, cross=False, attention=attention, qk_norm=qk_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        img_tokens: torch.Tensor,  # (B, N, D)
        img_mask: torch.Tensor,  # (B, N) bool
        txt_tokens: torch.Tensor,  # (Q, T, D)
        txt_mask: torch.Tensor,  # (Q, T) bool
        img_idx: torch.Tensor,  # (Q,) image row of each question
        return_attention: bool = False,
    ) -> FusionOutput:
        img_tokens, img_mask = img_tokens.index_select(0, img_idx), img_mask.index_select(0, img_idx)  # (Q, N, D): one joint sequence per question
        B, N, _ = img_tokens.shape
        fuse = self.fuse_token.expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([fuse, img_tokens + self.modality[0], txt_tokens + self.modality[1]], dim=1)  # (B, 1+N+T, D)
        ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        mask = torch.cat([ones, img_mask, txt_mask], dim=1)  # (B, 1+N+T)
        T = txt_tokens.shape[1]
        layout = TokenLayout.patches(N, prefix=1, suffix=T)  # fusion token, patches, question (global)
        weights = None
        for i, blk in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, weights = blk(x, mask, need_weights=return_attention and last, layout=layout)
        x = self.norm(x)
        attention = weights[:, :, 1 + N :, 1 : 1 + N] if weights is not None else None  # (B, h, T, N)
        return FusionOutput(pooled=x[:, 0], tokens=x[:, 1 + N :], attention=attention)

    def readout(self, x: torch.Tensor, txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled output (B, D) from the joint sequence (B, 1+N+T, D) after any layer (the logit lens)."""
        return self.norm(x)[:, 0]
