"""A configured attention function and what a model layer asks of it.

conf/model/attention/<name>.yaml builds one of this package's functions with its parameters bound
(`_partial_: true`, so a `functools.partial`); every attention layer mmqa owns receives it, or None
for the default `sdpa`. This module answers the questions those layers have:

- `attention_name(fn)`: the variant's registry name, for messages and logs;
- `check_dropout(fn, p, key)`: attention dropout exists only in `sdpa`; asking another variant for
  it is an error naming the config key, not a silently ignored setting;
- `for_cross_attention(fn)`: the function text -> image cross-attention uses. A sliding window needs
  queries and keys on one sequence, so it has no meaning between modalities; cross-attention then
  stays dense (`sdpa`) and the model says so at start-up. Every other variant serves both;
- `attention_weights(fn, q, k, ...)`: the (B, h, T, N) weights the variant applies, materialised for
  heatmaps and per-head inspection, such that `weights @ v` equals `fn(q, k, v)`: softmax weights for
  the exact variants, softmax restricted to the window for `sliding_window`, and the normalised
  kernel phi(q) phi(k)^T for `linear`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mmqa.models.attention.dense import masked_softmax, sdpa, visibility
from mmqa.models.attention.linear import feature_map, linear
from mmqa.models.attention.sliding_window import TokenLayout, sliding_window, sliding_window_mask


def unbound(fn: Callable | None) -> tuple[Callable, dict]:
    """(the attention function, its bound parameters); None is `sdpa` without parameters."""
    if fn is None:
        return sdpa, {}
    fn = getattr(fn, "__wrapped__", fn)  # a probe of mmqa.inspect.capture stands in for the function it wraps
    if isinstance(fn, functools.partial):
        return fn.func, dict(fn.keywords)
    return fn, {}


def attention_name(fn: Callable | None) -> str:
    return unbound(fn)[0].__name__


def check_dropout(fn: Callable | None, p: float, key: str) -> None:
    """Raise ValueError when attention dropout `p` (config `key`) is asked of a variant without it."""
    if p > 0 and unbound(fn)[0] is not sdpa:
        raise ValueError(f"{key}={p} drops attention weights, which only model/attention=sdpa does; "
                         f"{attention_name(fn)} has no attention dropout (set {key}=0.0)")


def for_cross_attention(fn: Callable | None) -> Callable | None:
    """The function cross-attention (queries and keys from different sequences) runs: `fn`, or
    `sdpa` when `fn` is the sliding window, which only defines neighbours within one sequence."""
    return sdpa if unbound(fn)[0] is sliding_window else fn


def attention_weights(
    fn: Callable | None,
    q: torch.Tensor,  # (B, h, T, d)
    k: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout: TokenLayout | None = None,
) -> torch.Tensor:  # (B, h, T, N)
    """The weights `fn` applies to the values, materialised (O(T N) memory: for inspection only)."""
    func, params = unbound(fn)
    T, N = q.shape[2], k.shape[2]
    visible = visibility(key_mask, causal, T, N, q.device)  # (B | 1, 1, T | 1, N) or None
    if func is linear:
        kernel = feature_map(q) @ feature_map(k).transpose(-2, -1)  # (B, h, T, N), positive
        if visible is not None:
            kernel = kernel * visible
        return kernel / (kernel.sum(-1, keepdim=True) + params.get("eps", 1e-6))
    if func is sliding_window:
        local = sliding_window_mask(layout or TokenLayout.seq(N), params.get("window", 1), causal).to(q.device)
        visible = local if visible is None else visible & local  # (N, N) or (B, 1, N, N)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, T, N)
    return masked_softmax(scores, visible)
