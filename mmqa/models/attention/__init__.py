"""Attention functions with one contract, so a model or a benchmark can swap them by name.

    attend(q, k, v, key_mask=None, causal=False, **variant_params) -> out

- q (B, h, T, d), k and v (B, h, N, d); out (B, h, T, d). Scores are scaled by 1/sqrt(d) (except in
  `linear`, which has no softmax to temper).
- key_mask: None or bool (B, N), True where the key may be attended (padding is False). Masked keys
  never receive weight. A query whose every key is masked returns zeros, not NaN, with zero gradients.
- causal=True: query i sees keys j <= i + (N - T), i.e. j <= i for self-attention; bottom-right aligned
  in `sdpa`, `eager`, `tiled` and `triton_tiled`. `sliding_window` and `linear` serve causal
  self-attention only and raise ValueError unless T == N.
- All support autograd except `triton_tiled` (forward only; NotImplementedError when a gradient would
  be needed).

The functions:
    sdpa            F.scaled_dot_product_attention (PyTorch's fused kernels)
    eager           softmax(QK^T/sqrt d) V materialised; the reference the others are tested against;
                    return_weights=True also returns the (B, h, T, N) weights
    sliding_window  Longformer-style local + global self-attention over a `TokenLayout` (1D bands,
                    2D patch neighbourhoods, global tokens); O(N (W + G)); params layout, window
    linear          Katharopoulos et al. 2020, phi(x) = elu(x) + 1; O(N d^2); params eps, chunk_size
    tiled           FlashAttention-2 forward and backward in PyTorch tiles, exact; params block_q, block_k
    triton_tiled    the same forward as a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)

Triton is not imported here; `triton_tiled` imports it on first call.
"""

from collections.abc import Callable

from mmqa.models.attention.dense import eager, sdpa
from mmqa.models.attention.linear import linear
from mmqa.models.attention.sliding_window import TokenLayout, sliding_window, sliding_window_mask
from mmqa.models.attention.tiled import tiled
from mmqa.models.attention.triton_tiled import triton_tiled

ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "sdpa": sdpa,
    "eager": eager,
    "sliding_window": sliding_window,
    "linear": linear,
    "tiled": tiled,
    "triton_tiled": triton_tiled,
}


def get_attention(name: str) -> Callable:
    """The attention function registered under `name`."""
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTION_FUNCTIONS)}")
    return ATTENTION_FUNCTIONS[name]


__all__ = [
    "ATTENTION_FUNCTIONS",
    "TokenLayout",
    "eager",
    "get_attention",
    "linear",
    "sdpa",
    "sliding_window",
    "sliding_window_mask",
    "tiled",
    "triton_tiled",
]
