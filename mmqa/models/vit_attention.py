"""Swapping a timm ViT's self-attention for an mmqa attention function.

`swap_attention(vit, attention)` replaces each block's `timm.layers.Attention` by `TimmAttention`,
which keeps timm's own projections, norms and dropouts under the same attribute names (the state dict
does not change, so timm's pretrained weights and earlier checkpoints load as before) and calls the
configured function where timm calls `F.scaled_dot_product_attention`. The tokens are laid out for a
sliding window as timm orders them: the prefix tokens (CLS, registers) global, then the patches on
their 2D grid. With `sdpa` the output equals timm's bit for bit (tests/test_attention_model.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Attention as TimmAttentionLayer
from torch import nn

from mmqa.models.attention.binding import attention_name, check_dropout, unbound
from mmqa.models.attention.dense import sdpa
from mmqa.models.attention.sliding_window import TokenLayout


class TimmAttention(nn.Module):
    """timm's `Attention` forward with the attention product computed by `attend` over `layout`."""

    def __init__(self, attn: TimmAttentionLayer, attend: Callable, layout: TokenLayout):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        # timm's modules, under timm's names: the state dict keys stay those of the original block
        self.qkv, self.q_norm, self.k_norm, self.attn_drop = attn.qkv, attn.q_norm, attn.k_norm, attn.attn_drop
        self.norm, self.gate, self.proj, self.proj_drop = attn.norm, attn.gate, attn.proj, attn.proj_drop
        self.attend, self.layout = attend, layout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("mmqa's ViT attention serves the unmasked self-attention of an image")
        B, N, _ = x.shape  # (B, P + n, C): prefix tokens, then patches
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        drop = {"dropout_p": self.attn_drop.p} if self.training and self.attn_drop.p else {}
        x = self.attend(q, k, v, layout=self.layout, **drop)  # (B, h, N, d)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, h * d)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def swap_attention(vit: nn.Module, attention: Callable | None) -> int:
    """Put `attention` (None: `sdpa`) into every block of a timm VisionTransformer; returns how many
    blocks were swapped. A block whose attention is not timm's standard `Attention` (some named timm
    models bring their own) keeps it under `sdpa` and is an error for any other variant."""
    attend = attention or sdpa
    grid = vit.patch_embed.grid_size
    n_patches = grid[0] * grid[1]
    layout = TokenLayout.patches(n_patches, prefix=vit.num_prefix_tokens)
    swapped = 0
    for i, blk in enumerate(vit.blocks):
        if not isinstance(blk.attn, TimmAttentionLayer):
            if unbound(attend)[0] is sdpa:
                continue
            raise ValueError(f"model/attention={attention_name(attend)} cannot serve the image encoder: block {i} "
                             f"uses {type(blk.attn).__name__}, and mmqa swaps only timm.layers.Attention; "
                             f"use model/attention=sdpa with this timm model")
        check_dropout(attend, blk.attn.attn_drop.p, "the ViT's attn_drop_rate")
        blk.attn = TimmAttention(blk.attn, attend, layout)
        swapped += 1
    return swapped
