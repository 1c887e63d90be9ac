"""Dense attention: `sdpa` (PyTorch's fused kernel) and `eager` (the explicit softmax reference).

`eager` is the "naive attention" every other function in this package is tested and benchmarked
against, so it stays as plain as possible. This module also owns the small pieces the other variants
share (input checks, the causal mask, the softmax that tolerates fully masked rows), so that the
masking rules are written down once.

Masking rules common to the package: `key_mask` (B, N) is True where a key may be attended; a query
whose every key is masked gets an output of zeros (and zero gradients), never NaN. Causal attention
is bottom-right aligned: query i sees keys j <= i + (N - T), which is the usual j <= i when T == N
and lets the last T queries of a longer sequence attend to its N cached keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    """Raise ValueError unless q (B, h, T, d), k/v (B, h, N, d) and key_mask (B, N) bool agree."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, h, T, d) and k, v (B, h, N, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_mask must be bool (B, N) = {(k.shape[0], k.shape[2])}; "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")


def causal_mask(T: int, N: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, N) bool, True where query i may see key j, i.e. j <= i + (N - T) (bottom-right aligned)."""
    return torch.ones(T, N, dtype=torch.bool, device=device).tril(N - T)


def visibility(key_mask: torch.Tensor | None, causal: bool, T: int, N: int,
               device: torch.device) -> torch.Tensor | None:
    """The combined boolean mask, broadcastable to (B, h, T, N), or None when everything is visible."""
    visible = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
    if causal:
        tri = causal_mask(T, N, device)  # (T, N)
        visible = tri if visible is None else visible & tri  # (B, 1, T, N)
    return visible


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim that gives masked entries exactly zero weight, and whole rows of zeros
    (with zero gradients) where nothing is visible, instead of the NaN a plain softmax of -inf gives."""
    if visible is None:
        return scores.softmax(-1)
    row_any = visible.any(-1, keepdim=True)
    # an empty row is softmaxed unmasked (finite) and then zeroed, so no NaN reaches the backward pass
    weights = scores.masked_fill(~(visible | ~row_any), float("-inf")).softmax(-1)
    return weights * row_any


def sdpa(
    q: torch.Tensor,  # (B, h, T, d)
    k: torch.Tensor,  # (B, h, N, d)
    v: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout=None,  # a TokenLayout; only sliding_window reads it, the rest attend to every visible key
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` under the package's masking rules; returns (B, h, T, d).
    `dropout_p` drops attention weights (pass 0.0 outside training); the one variant that has it."""
    check_inputs(q, k, v, key_mask)
    T, N = q.shape[2], k.shape[2]
    if key_mask is None and (not causal or T == N):
        # no boolean mask lets PyTorch pick its flash / memory-efficient kernels
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    visible = visibility(key_mask, causal, T, N, q.device)  # (B | 1, 1, T | 1, N)
    row_any = visible.any(-1, keepdim=True)  # (B | 1, 1, T | 1, 1)
    # empty rows attend to everything (finite, no NaN in either pass) and are zeroed afterwards
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~row_any, dropout_p=dropout_p)
    return out * row_any


def eager(
    q: torch.Tensor,  # (B, h, T, d)
    k: torch.Tensor,  # (B, h, N, d)
    v: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout=None,  # a TokenLayout; only sliding_window reads it, the rest attend to every visible key
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T / sqrt d) V with the (B, h, T, N) weights materialised; `return_weights=True`
    returns (out, weights). Memory O(T N) per head: the reference, not the fast path."""
    check_inputs(q, k, v, key_mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, T, N)
    weights = masked_softmax(scores, visibility(key_mask, causal, q.shape[2], k.shape[2], q.device))
    out = weights @ v  # (B, h, T, d)
    return (out, weights) if return_weights else out
