"""The output contracts shared by every encoder and every fusion variant."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """What every image or text encoder adapter returns."""

    tokens: torch.Tensor  # (B, N, D) one vector per patch / word piece
    mask: torch.Tensor  # (B, N) bool, True where the token is real (not padding)
    pooled: torch.Tensor  # (B, D) one vector per input

    def take(self, idx) -> EncoderOutput:
        """The rows `idx` (indices or a (B,) index tensor) of every field."""
        return EncoderOutput(tokens=self.tokens[idx], mask=self.mask[idx], pooled=self.pooled[idx])


@dataclass
class FusionOutput:
    """What every fusion variant returns."""

    pooled: torch.Tensor  # (B, D) the joint image-question vector the VQA head reads
    tokens: torch.Tensor  # (B, T, D) fused token sequence
    attention: torch.Tensor | None = None  # (B, heads, T, N_img) text -> image patches, only on request
