"""QK-layernorm (Dehghani et al. 2023) for transformers' attention modules, which have no such option:
`add_qk_norm(module)` wraps the query and key projections of every BERT / MiniLM self-attention and
GPT-2 self- and cross-attention in `HeadNorm`, which layer-normalises each head's slice of their output.
The attention then runs as before (SDPA), on normalised queries and keys, so its logits are bounded by
sqrt(head_dim) times the norms' gains. mmqa's own attention (fusion) and timm's ViT have the option
built in (`layers.Attention(qk_norm=)`, timm's `qk_norm`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention


class HeadNorm(nn.Module):
    """A projection whose output is chunks of `heads * head_dim` ([q | k | v] or a subset), followed by
    a LayerNorm over head_dim for each chunk marked in `normed`."""

    def __init__(self, proj: nn.Module, heads: int, width: int, normed: tuple[bool, ...]):
        super().__init__()
        self.proj, self.heads, self.width = proj, heads, width
        self.norms = nn.ModuleList(nn.LayerNorm(width // heads) if n else nn.Identity() for n in normed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., len(normed) * width)
        chunks = self.proj(x).split(self.width, -1)
        return torch.cat([norm(c.unflatten(-1, (self.heads, -1))).flatten(-2) for norm, c in zip(self.norms, chunks)], -1)


def add_qk_norm(module: nn.Module) -> int:
    """Wrap the query / key projections of every transformers attention inside `module`; returns how many modules."""
    n = 0
    for m in list(module.modules()):
        if isinstance(m, BertSelfAttention):
            m.query = HeadNorm(m.query, m.num_attention_heads, m.all_head_size, (True,))
            m.key = HeadNorm(m.key, m.num_attention_heads, m.all_head_size, (True,))
        elif isinstance(m, GPT2Attention) and m.is_cross_attention:
            m.q_attn = HeadNorm(m.q_attn, m.num_heads, m.embed_dim, (True,))
            m.c_attn = HeadNorm(m.c_attn, m.num_heads, m.embed_dim, (True, False))  # [k | v]
        elif isinstance(m, GPT2Attention):
            m.c_attn = HeadNorm(m.c_attn, m.num_heads, m.embed_dim, (True, True, False))  # [q | k | v]
        else:
            continue
        n += 1
    return n
