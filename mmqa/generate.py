"""Text generation from image tokens: one function that the LightningModule (validation captions),
`Bundle.caption` and the demo all call."""

from __future__ import annotations

import torch

from mmqa.models.mmqa_model import MMQAModel
from mmqa.models.outputs import EncoderOutput


@torch.no_grad()
def generate_captions(model: MMQAModel, tokenizer, img: EncoderOutput, **generate_kwargs) -> list[str]:
    """img tokens (B, N, D) -> B strings; kwargs go to transformers' `generate` (num_beams, do_sample,
    temperature, top_k, top_p, max_new_tokens, ...)."""
    prompt = torch.full((len(img.tokens), 1), tokenizer.bos_token_id, dtype=torch.long, device=img.tokens.device)
    ids = model.generate(img, prompt, **generate_kwargs)  # (B, 1 + new)
    return tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)
