"""Task heads on top of the encoders and the fusion: the VQA answer classifier, the multi-label
patch-set classifier (ingredients, caption concepts) and the CLIP-style contrastive projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VQAHead(nn.Module):
    """Scores every answer of the vocabulary; trained with soft-score BCE (one logit per answer)."""

    def __init__(self, dim: int, num_answers: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_answers)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (Q, D) -> (Q, K)
        return self.net(pooled)


class PatchSetHead(nn.Module):
    """Scores every label of a vocabulary from the image alone, as a set (one sigmoid each, BCE).
    Each patch token scores every label and the image keeps each label's best patch (multiple-instance
    pooling): a label is present when some patch shows it, however small it is. Used for a dish's
    ingredients (predicted before its recipe is written, as in Inverse Cooking) and for the words of
    an image's captions (the concept loss, `mmqa.data.concepts`)."""

    def __init__(self, dim: int, num_labels: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels)
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, N) -> (B, V)
        scores = self.net(tokens)  # (B, N, V)
        return scores.masked_fill(~mask[..., None], float("-inf")).amax(1)


class ContrastiveHead(nn.Module):
    """Projects pooled image and text vectors into one embedding space, with CLIP's learned temperature."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, init_temperature: float):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, Di) -> (B, E), unit norm
        return F.normalize(self.image_proj(pooled), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, Dt) -> (B, E), unit norm
        return F.normalize(self.text_proj(pooled), dim=-1)
