"""Text encoder adapters behind one contract: `forward(input_ids, attention_mask) -> EncoderOutput`
and `out_dim`. The transformers backend builds a small BERT from the config numbers (randomly
initialised, paired with a tokenizer trained on the training text) or loads any pretrained encoder
by name or path through `AutoModel.from_pretrained` (e.g. all-MiniLM-L6-v2, shipped offline). The
open_clip backend is open_clip's text tower (`TextTransformer`), built from the config numbers or
taken from any open_clip model, with pretrained weights optional."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BertConfig

from mmqa.errors import ConfigError
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
        trainable: bool = True,
        token_layer: int | None = None,
        keep_layers: int | None = None,
    ):
        """With `pretrained` (a path, `pkg:NAME` or a hub name) the sizes come from the checkpoint and the
        numbers here are ignored; without it they define the BERT that is built. `keep_layers`: a
        pretrained encoder keeps only its first k layers (None: all), a shallower tower such as a
        distilled student's (bottom layers kept, as in Sajjad et al. 2020); a built one takes `depth`.
        `trainable=False` keeps the weights as loaded (a frozen tower, whose outputs a training run
        caches).
        `token_layer`: the hidden state whose tokens the output carries (0: the embeddings, k: layer k's
        output; None: the last). An early layer's tokens still say mostly their own word and phrase
        ("blue square"), where the last layer's have mixed in the whole sentence (docs/relational.md).
        The pooled vector (retrieval, the contrastive loss) is always the last layer's mean."""
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
        layers = self.model.config.num_hidden_layers
        if pretrained and keep_layers is not None:
            if not 1 <= keep_layers <= layers:
                raise ConfigError(f"model.text_encoder.keep_layers={keep_layers}: the pretrained encoder has {layers} "
                                  f"layers; keep 1 to {layers} of them, or null for all")
            stack = next(m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers)
            del stack[keep_layers:]  # the bottom k layers, as loaded
            self.model.config.num_hidden_layers = layers = keep_layers
        if token_layer is not None and not 0 <= token_layer <= layers:
            raise ConfigError(f"model.text_encoder.token_layer must be between 0 (the embeddings) and {layers} "
                              f"(this encoder's layers), or null for the last; got {token_layer}")
        self.token_layer = token_layer
        self.requires_grad_(trainable)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:  # (B, T) each
        hidden = self.token_layer is not None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        mask = attention_mask.bool()
        last = out.last_hidden_state  # (B, T, D)
        tokens = out.hidden_states[self.token_layer] if hidden else last  # (B, T, D)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=masked_mean(last, mask))


class OpenClipTextEncoder(nn.Module):
    """open_clip's text tower. With `name`, the tower of that open_clip model (e.g. ViT-B-32): random,
    or with `pretrained` an open_clip tag or a local weights file. It is causal, as CLIP trained it,
    so inputs are padded to its context length; its vocabulary is open_clip's BPE, so `tokenizer`
    (the model config's key, read by `mmqa.build`) should name an HF tokenizer with the same ids (for
    OpenAI-CLIP towers, a local copy of openai/clip-vit-base-patch32's tokenizer). Without `name`, a
    tower is built from the numbers here, bidirectional with padding masked (`pad_id`: the fitted
    tokenizer's [PAD] is 0). Tokens are those after open_clip's final LayerNorm; `pooled` is their
    masked mean, as in the transformers backend."""

    def __init__(
        self,
        vocab_size: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float | None = None,
        max_length: int | None = None,
        pad_id: int = 0,
        name: str | None = None,
        pretrained: str | None = None,
        tokenizer: str | None = None,
    ):
        super().__init__()
        if name:
            import open_clip  # only needed for this backend

            model = load_pretrained(
                pretrained or f"{name} (random init)",
                "open_clip text tower",
                lambda _: open_clip.create_model(name, pretrained=pretrained or None, force_custom_text=True),
            )
            self.text = model.text
            if not hasattr(self.text, "output_tokens"):
                raise ValueError(f"open_clip model '{name}' has no open_clip TextTransformer text tower")
        else:
            from open_clip.transformer import TextTransformer

            self.text = TextTransformer(
                context_length=max_length,
                vocab_size=vocab_size,
                width=width,
                heads=heads,
                layers=depth,
                mlp_ratio=mlp_ratio,
                output_dim=0,  # no CLIP projection: the fusion reads the tokens
                no_causal_mask=True,
                use_pad_mask=True,
                pad_id=pad_id,
                pool_type="none",
            )
        self.text.output_tokens = True
        self.causal = self.text.attn_mask is not None
        self.out_dim = self.text.transformer.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:  # (B, T) each
        length = input_ids.shape[1]
        if self.causal:  # open_clip's causal mask spans the whole context: pad to it (after the text, so unseen)
            input_ids = F.pad(input_ids, (0, self.text.num_pos - length), value=self.text.pad_id)
        _, tokens = self.text(input_ids)  # (B, T', D)
        tokens = tokens[:, :length]  # (B, T, D)
        mask = attention_mask.bool()
        return EncoderOutput(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))
