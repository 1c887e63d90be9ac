"""Text encoder adapters behind one contract: `forward(input_ids, attention_mask) -> EncoderOutput`
and `out_dim`. The transformers backend builds a small BERT from the config numbers (randomly
initialised, paired with a tokenizer trained on the training text) or loads any pretrained encoder
by name or path through `AutoModel.from_pretrained` (e.g. all-MiniLM-L6-v2, shipped offline)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, BertConfig

from mmqa.models.layers import masked_mean
from mmqa.models.outputs import EncoderOutput
from mmqa.models.pretrained import load_pretrained


class HFTextEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float | None = None,
        max_length: int | None = None,
        dropout: float | None = None,
        pretrained: str | None = None,
    ):
        """With `pretrained` (a path, `pkg:NAME` or a hub name) the sizes come from the checkpoint and the
        numbers here are ignored; without it they define the BERT that is built."""
        super().__init__()
        if pretrained:
            self.model = load_pretrained(
                pretrained, "text encoder", lambda src: AutoModel.from_pretrained(src, attn_implementation="sdpa")
            )
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=width,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                intermediate_size=int(width * mlp_ratio),
                max_position_embeddings=max_length,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            self.model = AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:  # (B, T) each
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        mask = attention_mask.bool()
        return EncoderOutput(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))
