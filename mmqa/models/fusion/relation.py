"""Relation fusion: cross-attention fusion plus a relation module over pairs of image tokens,
conditioned on the question (Relation Networks, Santoro et al. 2017).

Cross-attention reads *what* is where the question points; a relational question ("what shape is
left of the red circle?", "which is higher, the cross or the square?") needs an operation over
*pairs* of objects and where they lie relative to each other. Per image, the `tokens` highest-scoring
patch tokens (a learned score, most of the 64 patches being background) are paired, all K x K of
them, and each pair (i, j) gets g(o_i, o_j, p_i - p_j, q): both tokens, their grid offset and
distance, and the question through FiLM (Perez et al. 2018). The pairs, weighted by both tokens'
scores, are summed into one vector that is added to the cross-attention's pooled output.

The pair terms that do not depend on the question are computed once per image; only the FiLM and
the rest of g run per question. Subclassing `CrossFusion` keeps its module names, so attention maps
and head importance read its blocks as before; `readout` (the logit lens) reads the cross-attention
part alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mmqa.models.fusion.cross import CrossFusion
from mmqa.models.outputs import FusionOutput


class RelationFusion(CrossFusion):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, bidirectional: bool,
                 relation_dim: int, tokens: int, attention: Callable | None = None, qk_norm: bool = False):
        super().__init__(dim, depth, heads, mlp_ratio, dropout, bidirectional, attention=attention, qk_norm=qk_norm)
        self.tokens = tokens
        self.score = nn.Linear(dim, 1)  # which patch tokens enter the pairs
        self.first = nn.Linear(dim, relation_dim)  # o_i's part of g's first layer
        self.second = nn.Linear(dim, relation_dim, bias=False)  # o_j's part
        self.offset = nn.Sequential(nn.Linear(3, relation_dim), nn.GELU(), nn.Linear(relation_dim, relation_dim))
        self.film = nn.Linear(dim, 2 * relation_dim)  # question -> (scale, shift) of each pair's features
        self.g = nn.Sequential(nn.GELU(), nn.Linear(relation_dim, relation_dim), nn.GELU())
        self.f = nn.Sequential(nn.LayerNorm(relation_dim), nn.Linear(relation_dim, dim))
        nn.init.zeros_(self.f[1].weight)  # starts as plain cross fusion
        nn.init.zeros_(self.f[1].bias)

    def forward(self, img_tokens: torch.Tensor, img_mask: torch.Tensor, txt_tokens: torch.Tensor,
                txt_mask: torch.Tensor, img_idx: torch.Tensor, return_attention: bool = False) -> FusionOutput:
        """The fusion contract (mmqa/models/fusion/__init__.py; shapes as in `CrossFusion.forward`)."""
        fused = super().forward(img_tokens, img_mask, txt_tokens, txt_mask, img_idx, return_attention)
        positions = grid_positions(img_tokens.shape[1], img_tokens.device, img_tokens.dtype)  # (N, 2)
        fused.pooled = fused.pooled + self.relate(img_tokens, img_mask, positions, fused.pooled, img_idx)  # (Q, D)
        return fused

    def relate(
        self,
        tokens: torch.Tensor,  # (B, N, D)
        mask: torch.Tensor,  # (B, N) bool
        positions: torch.Tensor,  # (N, 2) or (B, N, 2): (x, y) of each token
        question: torch.Tensor,  # (Q, D)
        img_idx: torch.Tensor,  # (Q,)
    ) -> torch.Tensor:
        """The relation term (Q, D): the sum over the K x K pairs of each image's top-K tokens of
        g(o_i, o_j, p_i - p_j, question), weighted by both tokens' scores. It does not depend on the
        order of the tokens, only on what they hold and where they are."""
        b, n, d = tokens.shape
        positions = positions.expand(b, n, 2)
        score = self.score(tokens).squeeze(-1).masked_fill(~mask, -1e4)  # (B, N)
        top = score.topk(min(self.tokens, n), dim=1).indices  # (B, K)
        picked = tokens.gather(1, top[..., None].expand(-1, -1, d))  # (B, K, D)
        w = torch.sigmoid(score.gather(1, top))  # (B, K)
        pos = positions.gather(1, top[..., None].expand(-1, -1, 2))  # (B, K, 2)
        delta = pos[:, :, None] - pos[:, None, :]  # (B, K, K, 2): i relative to j
        geometry = torch.cat([delta, delta.norm(dim=-1, keepdim=True)], dim=-1)  # (B, K, K, 3)
        # g's first layer without the question: once per image
        pairs = self.first(picked)[:, :, None] + self.second(picked)[:, None, :] + self.offset(geometry)  # (B, K, K, R)
        weight = w[:, :, None] * w[:, None, :]  # (B, K, K)
        scale, shift = self.film(question).chunk(2, dim=-1)  # (Q, R) each
        h = self.g(pairs.index_select(0, img_idx) * (1 + scale[:, None, None]) + shift[:, None, None])  # (Q, K, K, R)
        return self.f(torch.einsum("qijr,qij->qr", h, weight.index_select(0, img_idx)) / top.shape[1])  # (Q, D)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of n patch tokens: a square grid, or one row when n is not a square."""
    g = math.isqrt(n)
    return (g, g) if g * g == n else (1, n)


def grid_positions(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(x, y) in [-1, 1] of each of n patch tokens in row-major order on the grid of `grid_shape`.
    Only differences between positions are used."""
    rows, cols = grid_shape(n)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows, device=device, dtype=dtype),
                            torch.linspace(-1, 1, cols, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (N, 2)
