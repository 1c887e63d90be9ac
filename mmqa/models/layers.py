"""Transformer building blocks used by the fusion variants.

Attention runs through the configured attention function (conf/model/attention/, default `sdpa`:
PyTorch's fused kernels). Attention weights are only materialised when a caller asks for them, so the
normal forward pass pays nothing for the demo's heatmaps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmqa.models.attention import sdpa
from mmqa.models.attention.dense import masked_softmax
from mmqa.models.attention.binding import attention_weights, check_dropout, for_cross_attention
from mmqa.models.attention.sliding_window import TokenLayout


class Attention(nn.Module):
    """Multi-head attention from queries `x` to a context (itself for self-attention), computed by
    `attention` (a function of `mmqa.models.attention`, parameters bound; None: `sdpa`). With `qk_norm`
    each head's queries and keys are layer-normalised before their dot product (QK-layernorm,
    Dehghani et al. 2023), which bounds the attention logits."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, attention: Callable | None = None,
                 qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        check_dropout(attention, dropout, "model.dropout")
        self.heads = heads
        self.dropout = dropout
        self.attend = attention or sdpa
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        context: torch.Tensor,  # (B, N, D)
        context_mask: torch.Tensor,  # (B, N) bool, True = attend
        need_weights: bool = False,
        context_idx: torch.Tensor | None = None,  # (Q,): query row i reads context row context_idx[i]
        layout: TokenLayout | None = None,  # token kinds of a self-attention sequence (sliding_window)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        h = self.heads  # fewer than dim // head_dim once heads are pruned (mmqa/compress/prune.py)
        q = self.q_norm(self.q(x).view(B, T, h, -1).transpose(1, 2))  # (B, h, T, d)
        Bc, d = context.shape[0], q.shape[-1]
        k, v = self.kv(context).view(Bc, -1, 2, h, d).permute(2, 0, 3, 1, 4)  # 2 x (Bc, h, N, d)
        k = self.k_norm(k)
        if context_idx is not None:
            # keys/values are projected once per image and gathered per question, not once per question
            k, v, context_mask = (t.index_select(0, context_idx) for t in (k, v, context_mask))  # (B, h, N, d)
        weights = None
        if need_weights:
            weights = attention_weights(self.attend, q, k, context_mask, layout=layout)  # (B, h, T, N)
            y = weights @ v
        else:
            drop = {"dropout_p": self.dropout} if self.training and self.dropout else {}
            y = self.attend(q, k, v, key_mask=context_mask, layout=layout, **drop)  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, h * d)), weights


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP.
    `attention` and `qk_norm` serve both; cross-attention falls back to `sdpa` for a sliding window."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool,
                 attention: Callable | None = None, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout, attention, qk_norm)
        self.cross = cross
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.norm_ctx = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, dropout, for_cross_attention(attention), qk_norm)
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
        layout: TokenLayout | None = None,  # token kinds of x, for a sliding window; None: a text sequence
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        a, self_w = self.self_attn(h, h, mask, need_weights=need_weights and not self.cross, layout=layout)
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


class AttentionPool(nn.Module):
    """Mean pooling plus `queries` learned attention reads over the tokens, each picking its own
    token(s) by content: pooled = mean + W [read_1, ..., read_P]. A mean adds the tokens up, so two
    named objects' states arrive as one sum and which was asked about is lost ("is the A left of the
    B?" and "is the B left of the A?" pool alike when each noun carries its object's place); separate
    reads keep them apart for the head. W starts at zero: at step 0 this is the mean."""

    def __init__(self, dim: int, queries: int):
        super().__init__()
        self.score = nn.Linear(dim, queries)  # one logit per token and read
        self.mix = nn.Linear(queries * dim, dim)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, T) -> (B, D)
        logits = self.score(tokens).transpose(1, 2)  # (B, P, T)
        weights = masked_softmax(logits, mask[:, None, :])  # (B, P, T); a row of padding only reads nothing
        reads = weights @ tokens  # (B, P, D)
        return masked_mean(tokens, mask) + self.mix(reads.flatten(1))
