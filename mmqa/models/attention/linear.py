"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): O(N d^2) instead of O(N^2 d).

The softmax kernel exp(q . k) is replaced by phi(q) . phi(k) with phi(x) = elu(x) + 1 (positive, so the
normaliser never changes sign). Associativity then lets the keys be summed once:

    out_i = phi(q_i) S / (phi(q_i) . z),   S = sum_j phi(k_j) v_j^T (d x d),   z = sum_j phi(k_j) (d)

with the sums over all keys, or over j <= i when causal. There is no 1/sqrt(d) scale: it tempers the
exponential of a softmax, and there is none here; the paper applies phi to the unscaled projections,
and so does this module.

Masked keys are excluded by zeroing their phi(k), so they add nothing to S or z. A query with no
visible key gets 0 / (0 + eps) = zeros. `eps` in the denominator only guards that case; with visible
keys the normaliser is a sum of positive terms.

Causal attention runs chunk by chunk: inside a chunk a masked (C x C) quadratic product, across chunks
a carried state S (d x d) and normaliser z (d). Memory is O(N d + B h d^2) without autograd; under
autograd each chunk's state is kept for the backward pass, N/C states of d x d, i.e. O(N d^2 / C),
which is O(N d) for the default chunk size (64) and head dims up to it. It is never the O(N d^2) of a
cumulative sum of outer products. Causal requires T == N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmqa.models.attention.dense import check_inputs


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the positive feature map of the paper."""
    return F.elu(x) + 1


def linear(
    q: torch.Tensor,  # (B, h, T, d)
    k: torch.Tensor,  # (B, h, N, d)
    v: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout=None,  # a TokenLayout; only sliding_window reads it, the rest attend to every visible key
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Linear attention; returns (B, h, T, d). Rows with no visible key -> zeros."""
    check_inputs(q, k, v, key_mask)
    T, N = q.shape[2], k.shape[2]
    if causal and T != N:
        raise ValueError(f"causal linear attention needs T == N; got T={T}, N={N}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    phi_q, phi_k = feature_map(q), feature_map(k)  # (B, h, T, d), (B, h, N, d)
    if key_mask is not None:
        phi_k = phi_k * key_mask[:, None, :, None]
    if not causal:
        state = phi_k.transpose(-2, -1) @ v  # (B, h, d, d)
        norm = phi_k.sum(-2)  # (B, h, d)
        return (phi_q @ state) / ((phi_q @ norm[..., None]) + eps)

    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])  # (B, h, d, d): sum over earlier chunks
    norm = q.new_zeros(*q.shape[:2], q.shape[-1], 1)  # (B, h, d, 1)
    outs = []
    for start in range(0, N, chunk_size):
        qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (phi_q, phi_k, v))  # (B, h, C, d)
        within = (qc @ kc.transpose(-2, -1)).tril()  # (B, h, C, C): keys of this chunk up to the query
        num = within @ vc + qc @ state  # (B, h, C, d)
        den = within.sum(-1, keepdim=True) + qc @ norm  # (B, h, C, 1)
        outs.append(num / (den + eps))
        # out of place: autograd needs each chunk's state as it was
        state = state + kc.transpose(-2, -1) @ vc
        norm = norm + kc.sum(-2)[..., None]
    return torch.cat(outs, 2)
