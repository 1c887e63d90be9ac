"""Anchored fusion: cross fusion whose cross-attention knows where each patch lies relative to a point
the question token chooses, and reads back where it looked.

"What shape is left of the red circle?" asks for patches on one side of another object; "which is
further left, the cross or the square?" asks to compare two objects' places. Dot-product attention
over absolute position embeddings can do neither directly: a query cannot say "left of *that*", and
the pooled read of an object mixes its place into its content. Here each question token t, in each
head, predicts an anchor c_t in the patch plane ([-1, 1]^2), and its attention logits get a bias
learned from the offset of every patch to that anchor:

    bias(t, j) = g_t . phi(p_j - c_t),
    phi(d) = (relu(dx), relu(dy), relu(-dx), relu(-dy), |d|, relu(1 - |d| / radius))

with g_t a linear function of the token (the word "left" can weigh relu(-dx), "closest" -|d|). The
last feature marks the patches at the anchor itself, so a token can leave out (or pick) the object it
anchors on: the object closest to the red circle is otherwise the red circle. The attention-weighted
patch position r_t each head read, and r_t - c_t, are added back to the token through a linear map,
so where a token looked is in its state, linearly, for the next layer to compare. Only the first
`anchored_heads` heads get the bias; the others read by content alone, as in cross fusion. With the
bias and the read maps at zero at step 0, the variant starts as plain cross fusion. Tokens attend over the
whole patch plane: the bias is a relative 2D position bias (as in Swin or T5, but anchored on a
point the question picks rather than on the query's own place, which a text token does not have).

With `sink`, each head also has a null key (an attention sink, the "+1" of a quiet softmax) whose
logit s_t is a linear function of the token and whose value is zero: the weights on the patches are
exp(l_j) / (exp(s_t) + sum_k exp(l_k)) and sum to less than one, so the mass a head puts on the
patches (the `1` channel it reads back) says how much of the image matched what it looked for, near
the anchor or on one side of it (is the red circle left of the square? how many objects are above
it?), where a plain softmax spends a mass of one whatever matched. With its map at zero at step 0,
the sink holds 1 / (N + 1) of the mass when the logits are level. The mass joins r_t and r_t - c_t
in what each head reads back into the token.

The biased cross-attention runs through `biased_attention` below (softmax of QK^T/sqrt(d) + bias,
materialised: N is the patch count, 64 at the default size), held as the module's `attend` like
every mmqa attention, so the inspect capture sees each call with its bias and head masks reach it.
The position read rides in the values: each head reads [v_j, p_j, 1], so a head's output carries
its content, where it looked and how much it attended, and a head masked or pruned away
(mmqa.compress.prune) takes its position read with it. The self-attention of the question keeps the
configured attention function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmqa.models.attention.dense import masked_softmax, visibility
from mmqa.models.fusion.cross import CrossFusion
from mmqa.models.fusion.relation import grid_positions, grid_shape

OFFSET_FEATURES = 6  # phi's outputs: four half-plane distances, the Euclidean one, "at the anchor"


def sink_softmax(logits: torch.Tensor, visible: torch.Tensor | None, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax of logits (B, h, T, N) over the visible keys and, with `sink` (B, h, T), a null key of that
    logit whose weight is dropped: the (B, h, T, N) weights then sum to less than one (zero where no
    key is visible). Without a sink, `masked_softmax`."""
    if sink is None:
        return masked_softmax(logits, visible)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return torch.cat([logits, sink[..., None]], dim=-1).softmax(-1)[..., :-1]  # (B, h, T, N)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, dropout_p: float = 0.0, return_weights: bool = False,
                     sink: torch.Tensor | None = None, **unused) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T / sqrt d + bias) V for q (B, h, T, d), k (B, h, N, d), values v (B, h, N, e) of any
    width, key_mask (B, N) bool (True = attend) and bias (B, h, T, N); returns (B, h, T, e), and the
    (B, h, T, N) weights with `return_weights`. Dropout (`dropout_p`) drops weights after the softmax.
    `sink` (B, h, T): the logit of a null key with a zero value (`sink_softmax`).
    `unused`: the attention call's other keywords (causal, layout), which this cross-attention has not."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, T, N)
    if bias is not None:
        logits = logits + bias
    weights = sink_softmax(logits, visibility(key_mask, False, q.shape[2], k.shape[2], q.device), sink)
    attend = F.dropout(weights, dropout_p) if dropout_p else weights
    out = attend @ v  # (B, h, T, e)
    return (out, weights) if return_weights else out


class AnchoredCrossAttention(nn.Module):
    """Cross-attention from question tokens to image patches with an anchored relative 2D position bias
    and a read of the attended position; same call as `mmqa.models.layers.Attention`."""

    def __init__(self, dim: int, heads: int, radius: float, anchored_heads: int | None = None, dropout: float = 0.0,
                 qk_norm: bool = False, sink: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        anchored_heads = heads if anchored_heads is None else anchored_heads
        if not 1 <= anchored_heads <= heads:
            raise ValueError(f"anchored_heads {anchored_heads} must be between 1 and heads ({heads})")
        self.heads, self.anchored, self.radius, self.dropout = heads, anchored_heads, radius, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.anchor = nn.Linear(dim, 2 * heads)  # c_t per head, through tanh into [-1, 1]^2
        self.gate = nn.Linear(dim, OFFSET_FEATURES * anchored_heads)  # g_t of each biased head (the first ones)
        self.reads = 5 if sink else 4  # per head: r_t, r_t - c_t and, with a sink, the mass on the patches
        self.read = nn.Linear(self.reads * heads, dim)  # every head's reads -> the token
        self.sink = nn.Linear(dim, heads) if sink else None  # s_t per head: the null key's logit
        self.attend = biased_attention  # an attribute, as in `layers.Attention`: the inspect capture wraps it
        for layer in (self.gate, self.read) + ((self.sink,) if sink else ()):  # at step 0: plain cross-attention (but the sink's share)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D) question tokens
        context: torch.Tensor,  # (Bc, N, D) image patches on a square grid, row-major
        context_mask: torch.Tensor,  # (Bc, N) bool, True = attend
        need_weights: bool = False,
        context_idx: torch.Tensor | None = None,  # (B,): query row i reads context row context_idx[i]
        layout=None,  # unused: cross-attention has no token layout (the Attention call's keyword)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        h = self.heads
        q = self.q_norm(self.q(x).view(B, T, h, -1).transpose(1, 2))  # (B, h, T, d)
        Bc, N, d = context.shape[0], context.shape[1], q.shape[-1]
        k, v = self.kv(context).view(Bc, N, 2, h, d).permute(2, 0, 3, 1, 4)  # 2 x (Bc, h, N, d)
        k = self.k_norm(k)
        if context_idx is not None:
            k, v, context_mask = (t.index_select(0, context_idx) for t in (k, v, context_mask))  # (B, h, N, d)
        p = grid_positions(N, x.device, x.dtype)  # (N, 2)
        anchor = torch.tanh(self.anchor(x)).view(B, T, h, 2).transpose(1, 2)  # (B, h, T, 2)
        a = self.anchored
        gate = self.gate(x).view(B, T, a, OFFSET_FEATURES).transpose(1, 2)  # (B, a, T, 6)
        bias = self.offset_bias(p, anchor[:, :a], gate)  # (B, a, T, N)
        if a < h:  # the heads past `anchored` read by content alone
            bias = torch.cat([bias, bias.new_zeros(B, h - a, T, N)], dim=1)  # (B, h, T, N)
        # every patch visible (a ViT's patches): nothing to mask; an image with no patch reads nothing
        visible = None if context_mask.all() else context_mask
        # each head reads [content, position, 1]: (B, h, N, d + 3)
        values = torch.cat([v, p.expand(B, h, N, 2), v.new_ones(B, h, N, 1)], dim=-1)
        sink = None if self.sink is None else self.sink(x).transpose(1, 2)  # (B, h, T)
        weights = None
        if need_weights:
            out, weights = biased_attention(q, k, values, visible, bias=bias, return_weights=True, sink=sink)
        else:
            drop = self.dropout if self.training else 0.0
            out = self.attend(q, k, values, key_mask=visible, bias=bias, dropout_p=drop, sink=sink)  # (B, h, T, d + 3)
        # looked: where each head read, r_t (its weighted sum); mass: 1, or what the sink left (0 if masked)
        y, looked, mass = out.split([d, 2, 1], dim=-1)
        where = [looked, looked - anchor * mass] + ([mass] if self.sink is not None else [])
        where = torch.cat(where, dim=-1).transpose(1, 2).reshape(B, T, self.reads * h)  # (B, T, 4h or 5h)
        return self.out(y.transpose(1, 2).reshape(B, T, h * d)) + self.read(where), weights

    def offset_bias(
        self,
        p: torch.Tensor,  # (N, 2) patch positions on a grid, row-major (grid_positions)
        anchor: torch.Tensor,  # (B, h, T, 2)
        gate: torch.Tensor,  # (B, h, T, 6): g_t, the weight of each offset feature
    ) -> torch.Tensor:
        """g_t . phi(p_j - c_t) for every patch: (B, h, T, N). The half-plane terms depend on a patch's
        column (x) or row (y) alone, so they are computed per column and per row and broadcast; only the
        distance terms take a (B, h, T, rows, cols) tensor. relu(a) = (a + |a|) / 2 pairs each half-plane
        with its opposite. (Materialising phi (B, h, T, N, 6) and contracting it took 4-5x as long, and
        computing every term at (B, h, T, N) 1.3x as long, forward and backward.)"""
        cols = grid_shape(p.shape[0])[1]  # as grid_positions lays them out
        dx = p[:cols, 0] - anchor[..., :1]  # (B, h, T, cols)
        dy = p[::cols, 1] - anchor[..., 1:]  # (B, h, T, rows)
        right, down, left, up, far, at = gate[..., None].unbind(-2)  # each (B, h, T, 1)
        by_col = ((right - left) * dx + (right + left) * dx.abs()) / 2  # (B, h, T, cols)
        by_row = ((down - up) * dy + (down + up) * dy.abs()) / 2  # (B, h, T, rows)
        # the epsilon keeps the gradient finite at the anchor
        distance = (dy.square()[..., :, None] + dx.square()[..., None, :] + 1e-12).sqrt()  # (B, h, T, rows, cols)
        near = (1 - distance / self.radius).relu()
        bias = by_row[..., :, None] + by_col[..., None, :] + far[..., None] * distance + at[..., None] * near
        return bias.flatten(-2)  # (B, h, T, N)


class AnchoredFusion(CrossFusion):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, bidirectional: bool,
                 anchor_radius: float, anchored_heads: int, attention: Callable | None = None, qk_norm: bool = False,
                 pool_queries: int = 0, sink: bool = False):
        super().__init__(dim, depth, heads, mlp_ratio, dropout, bidirectional, attention=attention, qk_norm=qk_norm,
                         pool_queries=pool_queries)
        for block in self.text_blocks:  # the question's cross-attentions; image blocks (bidirectional) keep theirs
            block.cross_attn = AnchoredCrossAttention(dim, heads, anchor_radius, anchored_heads, dropout, qk_norm,
                                                     sink)
