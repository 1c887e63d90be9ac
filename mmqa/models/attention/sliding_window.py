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
clamped, so the neighbourhood never grows past the segment).

The work is banded and gathers nothing: each local segment is laid out as a plane (a grid g x g, a
sequence 1 x n) and zero-padded by the window; the W neighbours of every query are then W shifted
slices of that plane (strided views), each scored by one elementwise product, so a query costs
O(W + G) and no (N, N) or (N, W, d) tensor is built. The G global queries attend densely to all N keys
(O(G N)). `sliding_window_mask` builds the equivalent dense (N, N) mask from token coordinates,
independently of the slices; the tests check the two against each other, and
`binding.attention_weights` uses it to materialise the window's weights for inspection.
"""

from __future__ import annotations

import functools
import itertools
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


class Neighbourhood(NamedTuple):
    """How one local segment is laid out for the shifted-slice computation."""

    rows: int  # a grid's side, or 1 for a sequence
    cols: int  # a grid's side, or the sequence length
    pad: tuple[int, int, int, int]  # (left, right, top, bottom) padding of the (rows, cols) plane
    offsets: tuple[tuple[int, int], ...]  # (dy, dx) of each neighbour slice into the padded plane: W of them


def _check_causal(layout: TokenLayout, causal: bool) -> None:
    # a global token sees the future by definition, and a 2D neighbourhood has no order
    if causal and any(kind != "seq" for kind, _ in layout.segments):
        raise ValueError(f"causal sliding_window needs a layout of 'seq' segments only; got {layout.segments}")


def neighbourhood(kind: str, n: int, window: int, causal: bool) -> Neighbourhood:
    """The (2r+1)^2 offsets of a grid segment of side n, or the 2r+1 (causal: r+1) of a sequence of n,
    with r = min(window, n - 1): the number of keys a query sees does not grow with n."""
    r = min(window, n - 1)
    if kind == "grid":
        span = range(2 * r + 1)
        return Neighbourhood(n, n, (r, r, r, r), tuple((dy, dx) for dy in span for dx in span))
    right = 0 if causal else r  # a causal band ends at the query itself
    return Neighbourhood(1, n, (r, right, 0, 0), tuple((0, dx) for dx in range(r + 1 + right)))


@functools.lru_cache(maxsize=64)
def _global_positions(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(G,) positions of the global tokens, built once per (layout, device)."""
    starts = itertools.accumulate((n * n if kind == "grid" else n for kind, n in layout.segments), initial=0)
    pieces = [torch.arange(s, s + n) for (kind, n), s in zip(layout.segments, starts) if kind == "global"]
    return torch.cat([torch.zeros(0, dtype=torch.long), *pieces]).to(device)


def _local(
    q: torch.Tensor,  # (B, h, S, d) the segment's queries, already scaled
    k: torch.Tensor,  # (B, h, S, d) the segment's keys
    v: torch.Tensor,  # (B, h, S, d)
    visible: torch.Tensor,  # (B | 1, S) bool, the segment's key mask
    hood: Neighbourhood,
):
    """Scores of each query against its W neighbours by shifted slices of the zero-padded key plane
    (no gather, no N x N): returns scores (B, h, S, W), their visibility (B | 1, 1, S, W) and a function
    that takes weights (B, h, S, W) to outputs (B, h, S, d)."""
    B, h, S, d = q.shape
    plane = (B, h, hood.rows, hood.cols, d)
    k_pad = F.pad(k.reshape(plane), (0, 0, *hood.pad))  # (B, h, rows + pads, cols + pads, d)
    v_pad = F.pad(v.reshape(plane), (0, 0, *hood.pad))
    vis_pad = F.pad(visible.reshape(-1, hood.rows, hood.cols), hood.pad, value=False)  # outside = invisible
    q_plane = q.reshape(plane)

    def shifted(t, dy, dx):  # the neighbour at offset (dy, dx) of every query, a strided view
        return t[..., dy:dy + hood.rows, dx:dx + hood.cols, :] if t.dim() == 5 else t[:, dy:dy + hood.rows, dx:dx + hood.cols]

    scores = torch.stack([(q_plane * shifted(k_pad, dy, dx)).sum(-1) for dy, dx in hood.offsets], -1)
    seen = torch.stack([shifted(vis_pad, dy, dx) for dy, dx in hood.offsets], -1)  # (B | 1, rows, cols, W)

    def read(weights: torch.Tensor) -> torch.Tensor:
        w = weights.reshape(B, h, hood.rows, hood.cols, -1)
        out = sum(w[..., i, None] * shifted(v_pad, dy, dx) for i, (dy, dx) in enumerate(hood.offsets))
        return out.reshape(B, h, S, d)

    return scores.reshape(B, h, S, -1), seen.reshape(seen.shape[0], 1, S, -1), read


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
    glob = _global_positions(layout, q.device)
    k_glob, v_glob = k[:, :, glob], v[:, :, glob]  # (B, h, G, d)
    keys = torch.ones(1, N, dtype=torch.bool, device=q.device) if key_mask is None else key_mask  # (B | 1, N)
    glob_visible = keys[:, glob][:, None, None, :]  # (B | 1, 1, 1, G)
    scale = q.shape[-1] ** -0.5

    outs, start = [], 0
    for kind, n in layout.segments:
        size = n * n if kind == "grid" else n
        part = slice(start, start + size)
        start += size
        if kind == "global":  # global queries see everything: O(G N)
            outs.append(eager(q[:, :, part], k, v, key_mask))  # (B, h, n, d)
            continue
        q_part = q[:, :, part] * scale  # (B, h, S, d)
        near, near_visible, read = _local(q_part, k[:, :, part], v[:, :, part], keys[:, part],
                                          neighbourhood(kind, n, window, causal))  # (B, h, S, W)
        glob_scores = q_part @ k_glob.transpose(-2, -1)  # (B, h, S, G)
        # one softmax over the local band and the global keys together: they share the normaliser
        W = near.shape[-1]
        visible = torch.cat([near_visible, glob_visible.expand(-1, -1, size, -1)], -1)
        weights = masked_softmax(torch.cat([near, glob_scores], -1), visible)  # (B, h, S, W + G)
        outs.append(read(weights[..., :W]) + weights[..., W:] @ v_glob)  # (B, h, S, d)
    return torch.cat(outs, 2)  # (B, h, N, d): segments are consecutive, so this is sequence order


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
