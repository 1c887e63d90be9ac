"""Statistics of captured attention and of block activations, per head or per block, as plain tensors.

- `attention_entropy`: per head, the entropy of each query's attention over the keys it may see,
  normalised by log(number of those keys) so that uniform attention is 1 and one-hot attention 0
  whatever the sequence length (Zhai et al. 2023 track the unnormalised Ent(A_i) = -sum_j A_ij log A_ij;
  normalising lets layers of different lengths share one scale and one alarm threshold). Queries that
  see at most one key (entropy undefined) and padded queries are left out of the mean.
- `max_logit`: per head, the largest attention logit (q . k) * scale over visible keys: the quantity
  that grows without bound before an entropy collapse, and that QK-norm bounds.
- `activation_stats`: a block's output RMS, and the fraction of its tokens whose norm is over
  `factor` x the median token norm of their sequence (the high-norm "artefact" tokens of Darcet et al.
  2023).
"""

from __future__ import annotations

import torch

from mmqa.inspect.capture import AttentionCall


def attention_entropy(
    weights: torch.Tensor,  # (B, h, T, N), rows sum to 1 over visible keys (or are all zero)
    visible: torch.Tensor | None = None,  # bool, broadcastable to (B, h, T, N)
    query_mask: torch.Tensor | None = None,  # (B, T) bool, True = a real query
) -> torch.Tensor:  # (h,) in [0, 1]; NaN for a head with no query that sees two keys or more
    B, h, T, N = weights.shape
    p = weights.double()
    row_entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)  # (B, h, T)
    keys = torch.full((1, 1, 1), float(N), dtype=torch.float64) if visible is None else \
        visible.expand(B, -1, T, N).sum(-1).double()  # (B | 1, h | 1, T | 1) visible keys per query
    keys = keys.expand(B, h, T)
    counted = keys > 1
    if query_mask is not None:
        counted = counted & query_mask[:, None, :]
    normalised = row_entropy / keys.clamp_min(2).log()  # (B, h, T)
    total = (normalised * counted).sum((0, 2))
    n = counted.sum((0, 2))
    return (total / n).float()  # 0 / 0 = NaN where nothing counted


def max_logit(call: AttentionCall) -> torch.Tensor:  # (h,)
    logits = call.logits()  # (B, h, T, N), -inf where not visible
    if call.query_mask is not None:
        logits = logits.masked_fill(~call.query_mask[:, None, :, None], float("-inf"))
    return logits.amax((0, 2, 3))


def call_entropy(call: AttentionCall) -> torch.Tensor:  # (h,)
    return attention_entropy(call.weights(), call.visible, call.query_mask)


def activation_stats(x: torch.Tensor, factor: float = 5.0) -> tuple[float, float]:
    """(RMS of every element, fraction of tokens with norm > factor x their sequence's median norm)
    of a block output x (B, N, D)."""
    x = x.detach().float()
    rms = x.pow(2).mean().sqrt().item()
    norms = x.norm(dim=-1)  # (B, N)
    median = norms.median(dim=-1, keepdim=True).values  # (B, 1)
    artefacts = (norms > factor * median).float().mean().item()
    return rms, artefacts
