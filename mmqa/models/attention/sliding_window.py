"""Longformer-style local + global self-attention with banded work: cost O(N (W + G)), not O(N^2).

A `TokenLayout` describes the sequence as consecutive segments:
  ("global", n)  n tokens that attend to every token and are attended by every token (CLS, a fusion
                 token, or the question tokens of early fusion, as Longformer makes question tokens global);
  ("grid", g)    g*g image patches, row-major; each attends to its (2w+1) x (2w+1) neighbourhood on the
                 2D grid (clipped at the borders) plus all global tokens;
  ("seq", n)     n text tokens; each attends to tokens of its own segment within distance w (a band of
                 2w+1; with causal=True the band j in [i-w, i]) plus all global tokens.
`window` w counts neighbours on each side (w = 1: a 3 x 3 patch neighbourhood, a band of 3 tokens).
Local tokens see neighbours inside their own segment only; segments talk to each other through the
global tokens. A window at least the grid side / segment length simply covers the whole segment (it is
clamped, so the neighbour table never grows past the segment).

The work is banded: for the L local tokens a cached neighbour table (L, W) lists the keys each one
sees, whose keys/values are gathered to (B, h, L, W, d) and scored together with the G global keys;
the G global queries attend densely to all N keys (O(G N)). Global tokens are never in the neighbour
table, so no key is counted twice. `sliding_window_mask` builds the equivalent dense (N, N) mask from
token coordinates, independently of the table; the tests check the two against each other, and
`binding.attention_weights` uses it to materialise the window's weights for inspection.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmqa.models.attention.dense import check_inputs, eager, masked_softmax

KINDS = ("global", "grid", "seq")


@dataclass(frozen=True)
class TokenLayout:
    """Consecutive segments of (kind, size); a grid's size is its side g (g*g tokens)."""

    segments: tuple[tuple[str, int], ...]

    def __post_init__(self):
        # tuples all the way down, so a layout given as lists still hashes (it keys the table cache)
        object.__setattr__(self, "segments", tuple((str(kind), int(n)) for kind, n in self.segments))
        for kind, n in self.segments:
            if kind not in KINDS or n < 1:
                raise ValueError(f"bad segment ({kind!r}, {n}): kind must be one of {KINDS} and size >= 1")

    def __len__(self) -> int:
        return sum(n * n if kind == "grid" else n for kind, n in self.segments)

    @classmethod
    def seq(cls, n: int) -> TokenLayout:
        """Plain 1D Longformer without global tokens."""
        return cls((("seq", n),))

    @classmethod
    def patches(cls, n: int, prefix: int = 0, suffix: int = 0) -> TokenLayout:
        """n image patch tokens between `prefix` and `suffix` global tokens: `grid` when n is a square,
        else a 1D band over the patches (an encoder whose patches do not form a square)."""
        g = math.isqrt(n)
        if g * g == n:
            return cls.grid(g, prefix, suffix)
        return cls((("global", prefix),) * (prefix > 0) + (("seq", n),) + (("global", suffix),) * (suffix > 0))

    @classmethod
    def grid(cls, g: int, prefix: int = 1, suffix: int = 0) -> TokenLayout:
        """A g x g patch grid between `prefix` and `suffix` global tokens (e.g. CLS, question tokens)."""
        segments = (("global", prefix),) * (prefix > 0) + (("grid", g),) + (("global", suffix),) * (suffix > 0)
        return cls(segments)


class _Tables(NamedTuple):
    local: torch.Tensor  # (L,) positions of the local tokens
    glob: torch.Tensor  # (G,) positions of the global tokens
    neighbours: torch.Tensor  # (L, W) positions each local token attends to (padding where not valid)
    valid: torch.Tensor  # (L, W) bool
    inverse: torch.Tensor  # (N,) puts [local outputs, global outputs] back in sequence order


def _check_causal(layout: TokenLayout, causal: bool) -> None:
    # a global token sees the future by definition, and a 2D neighbourhood has no order
    if causal and any(kind != "seq" for kind, _ in layout.segments):
        raise ValueError(f"causal sliding_window needs a layout of 'seq' segments only; got {layout.segments}")


@functools.lru_cache(maxsize=64)
def _tables(layout: TokenLayout, window: int, causal: bool, device: torch.device) -> _Tables:
    """The neighbour table of a layout, built once per (layout, window, causal, device)."""
    # each list starts with an empty piece, so that layouts without local or without global tokens concatenate
    local, glob = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    rows, valids = [torch.zeros(0, 0, dtype=torch.long)], [torch.zeros(0, 0, dtype=torch.bool)]
    start = 0
    for kind, n in layout.segments:
        size = n * n if kind == "grid" else n
        positions = torch.arange(size)
        if kind == "global":
            glob.append(start + positions)
        elif kind == "grid":
            r = min(window, n - 1)
            dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
            y = positions[:, None] // n + dy.reshape(1, -1)  # (g*g, (2r+1)^2)
            x = positions[:, None] % n + dx.reshape(1, -1)
            valids.append((y >= 0) & (y < n) & (x >= 0) & (x < n))
            rows.append(start + y.clamp(0, n - 1) * n + x.clamp(0, n - 1))
            local.append(start + positions)
        else:
            r = min(window, n - 1)
            j = positions[:, None] + torch.arange(-r, 1 if causal else r + 1)  # (n, 2r+1) or (n, r+1)
            valids.append((j >= 0) & (j < n))
            rows.append(start + j.clamp(0, n - 1))
            local.append(start + positions)
        start += size
    width = max(t.shape[1] for t in rows)
    # segments with narrower neighbourhoods are padded with invalid entries up to the widest one
    neighbours = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in rows])
    valid = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in valids])
    local_idx, glob_idx = torch.cat(local), torch.cat(glob)
    inverse = torch.cat([local_idx, glob_idx]).argsort()
    return _Tables(*(t.to(device) for t in (local_idx, glob_idx, neighbours, valid, inverse)))


def sliding_window(
    q: torch.Tensor,  # (B, h, N, d)
    k: torch.Tensor,  # (B, h, N, d)
    v: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout: TokenLayout | None = None,
    window: int = 1,
) -> torch.Tensor:
    """Local (band / 2D neighbourhood) + global attention; returns (B, h, N, d). `layout=None` is
    `TokenLayout.seq(N)`. Causal needs a layout of "seq" segments only. Fully masked rows -> zeros."""
    check_inputs(q, k, v, key_mask)
    T, N = q.shape[2], k.shape[2]
    if T != N:
        raise ValueError(f"sliding_window attention serves self-attention only (T == N); got T={T}, N={N}")
    layout = TokenLayout.seq(N) if layout is None else layout
    if len(layout) != N:
        raise ValueError(f"layout has {len(layout)} tokens but the sequence has N={N}")
    if window < 0:
        raise ValueError(f"sliding_window: window (model.attention.window) must be >= 0; got {window}")
    _check_causal(layout, causal)
    tab = _tables(layout, window, causal, q.device)
    L, W = tab.neighbours.shape
    G = tab.glob.numel()

    q_local = q[:, :, tab.local]  # (B, h, L, d)
    k_near, v_near = k[:, :, tab.neighbours], v[:, :, tab.neighbours]  # (B, h, L, W, d)
    k_glob, v_glob = k[:, :, tab.glob], v[:, :, tab.glob]  # (B, h, G, d)
    scale = q.shape[-1] ** -0.5
    near_scores = torch.einsum("bhld,bhlwd->bhlw", q_local, k_near) * scale  # (B, h, L, W)
    glob_scores = (q_local @ k_glob.transpose(-2, -1)) * scale  # (B, h, L, G)

    batch = 1 if key_mask is None else key_mask.shape[0]
    near_visible = tab.valid.expand(batch, 1, L, W)  # (B | 1, 1, L, W)
    glob_visible = torch.ones(batch, 1, L, G, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        near_visible = near_visible & key_mask[:, tab.neighbours][:, None]
        glob_visible = glob_visible & key_mask[:, tab.glob][:, None, None, :]
    # one softmax over the local band and the global keys together: they share the normaliser
    weights = masked_softmax(torch.cat([near_scores, glob_scores], -1), torch.cat([near_visible, glob_visible], -1))
    out_local = torch.einsum("bhlw,bhlwd->bhld", weights[..., :W], v_near) + weights[..., W:] @ v_glob  # (B, h, L, d)

    out_glob = eager(q[:, :, tab.glob], k, v, key_mask)  # (B, h, G, d): global queries see everything
    return torch.cat([out_local, out_glob], 2)[:, :, tab.inverse]  # (B, h, N, d)


def sliding_window_mask(layout: TokenLayout, window: int, causal: bool = False) -> torch.Tensor:
    """The dense (N, N) bool mask (True = query row may attend key column) equivalent to
    `sliding_window`, derived from token coordinates rather than from the neighbour table."""
    _check_causal(layout, causal)
    kind, segment, row, col = [], [], [], []
    for s, (name, n) in enumerate(layout.segments):
        size = n * n if name == "grid" else n
        positions = torch.arange(size)
        kind.append(torch.full((size,), KINDS.index(name)))
        segment.append(torch.full((size,), s))
        # grid: (row, column) on the grid; seq: (0, position); global tokens need no coordinates
        row.append(positions // n if name == "grid" else torch.zeros(size, dtype=torch.long))
        col.append(positions % n if name == "grid" else positions)
    kind, segment, row, col = (torch.cat(t) for t in (kind, segment, row, col))  # (N,) each

    is_global = kind == KINDS.index("global")
    same = segment[:, None] == segment[None, :]  # (N, N)
    dy = row[:, None] - row[None, :]  # query minus key
    dx = col[:, None] - col[None, :]
    grid_pair = same & (kind == KINDS.index("grid"))[:, None] & (dy.abs() <= window) & (dx.abs() <= window)
    band = (dx >= 0) & (dx <= window) if causal else dx.abs() <= window
    seq_pair = same & (kind == KINDS.index("seq"))[:, None] & band
    return is_global[:, None] | is_global[None, :] | grid_pair | seq_pair
