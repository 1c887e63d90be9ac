"""Transformer building blocks used by the fusion variants.

Attention runs through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
Attention weights are only materialised when a caller asks for them, so the normal forward pass
pays nothing for the demo's heatmaps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention from queries `x` to a context (itself for self-attention)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        context: torch.Tensor,  # (B, N, D)
        context_mask: torch.Tensor,  # (B, N) bool, True = attend
        need_weights: bool = False,
        context_idx: torch.Tensor | None = None,  # (Q,): query row i reads context row context_idx[i]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        h = self.heads
        q = self.q(x).view(B, T, h, D // h).transpose(1, 2)  # (B, h, T, d)
        Bc = context.shape[0]
        k, v = self.kv(context).view(Bc, -1, 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2 x (Bc, h, N, d)
        if context_idx is not None:
            # keys/values are projected once per image and gathered per question, not once per question
            k, v, context_mask = k[context_idx], v[context_idx], context_mask[context_idx]  # (B, h, N, d)
        bias = context_mask[:, None, None, :]  # (B, 1, 1, N)
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (D // h) ** 0.5  # (B, h, T, N)
            weights = scores.masked_fill(~bias, float("-inf")).softmax(-1)
            y = weights @ v
        else:
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), weights


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross = cross
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.norm_ctx = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        mask: torch.Tensor,  # (B, T) bool
        context: torch.Tensor | None = None,  # (B, N, D)
        context_mask: torch.Tensor | None = None,  # (B, N) bool
        need_weights: bool = False,
        context_idx: torch.Tensor | None = None,  # (B,) row of `context` for each row of x; None: same row
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        a, self_w = self.self_attn(h, h, mask, need_weights=need_weights and not self.cross)
        x = x + self.drop(a)
        weights = self_w
        if self.cross:
            a, weights = self.cross_attn(self.norm_x(x), self.norm_ctx(context), context_mask, need_weights, context_idx)
            x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, weights


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: (B, N, D), (B, N) -> (B, D)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, N, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
