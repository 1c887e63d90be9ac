"""The assembled multi-task model: image encoder + text encoder -> fusion -> VQA head; pooled
vectors -> contrastive projections; image tokens -> GPT-2 decoder (captions, recipes); image ->
ingredient head (recipes; only when the data has an ingredient vocabulary).

Images are encoded once per batch; questions and captions carry the index of their image
(`q_img_idx`, `c_img_idx`) and gather its tokens, so the image tower's cost does not grow with the
number of questions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from mmqa.models.attention.binding import attention_name, for_cross_attention, unbound
from mmqa.models.decoder import GPT2Decoder
from mmqa.models.frozen_cache import FrozenTextCache
from mmqa.models.fusion.anchored import AnchoredCrossAttention
from mmqa.models.heads import ContrastiveHead, PatchSetHead, VQAHead
from mmqa.models.layers import Attention
from mmqa.models.outputs import EncoderOutput, FusionOutput
from mmqa.models.qk_norm import add_qk_norm
from mmqa.models.sigma_reparam import apply_sigma_reparam
from mmqa.models.vit_attention import TimmAttention

log = logging.getLogger(__name__)


def _project(out: EncoderOutput, proj: nn.Module) -> EncoderOutput:
    return EncoderOutput(tokens=proj(out.tokens), mask=out.mask, pooled=proj(out.pooled))


def attention_plan(attention: Callable | None, model: nn.Module) -> str:
    """Which attentions of `model` run the configured variant, and which stay dense SDPA and why."""
    name, params = attention_name(attention), unbound(attention)[1]
    runs = [m.attend for m in model.modules() if isinstance(m, (Attention, TimmAttention))]
    served = sum(unbound(f)[0] is unbound(attention)[0] for f in runs)
    dense = ["the text encoder and the GPT-2 decoder (transformers' own SDPA)"]
    if for_cross_attention(attention) is not attention and any(hasattr(m, "cross_attn") for m in model.modules()):
        dense.append("text -> image cross-attention (a sliding window needs one sequence)")
    if any(isinstance(m, AnchoredCrossAttention) for m in model.modules()):
        dense.append("the anchored text -> image cross-attention (its own biased softmax)")
    if not any(isinstance(m, TimmAttention) for m in model.image_encoder.modules()):
        dense.append("the image encoder (its own attention)")
    return (f"attention {name}{' ' + str(params) if params else ''}: {served} of {len(runs)} attention layers; "
            f"dense SDPA in {'; '.join(dense)}")


class MMQAModel(nn.Module):
    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        fusion: nn.Module,
        decoder: GPT2Decoder,
        dim: int,
        num_answers: int,
        embed_dim: int,
        head_mlp_ratio: float,
        dropout: float,
        init_temperature: float,
        num_ingredients: int,
        image_position_scale: float,
        attention: Callable | None = None,
        qk_norm: bool = False,
        sigma_reparam: bool = False,
    ):
        """`image_position_scale`: a fixed 2D sin-cos encoding of each patch's grid position, times
        this, is added to the image tokens that fusion, decoder and ingredient head read (0: none).
        `attention`: the variant conf/model/attention/ gave the encoders and fusion (they receive it
        through their own configs); here it is only reported, with where it runs, at start-up. `qk_norm`:
        the ViT and fusion get it through their configs, the transformers text encoder and decoder here
        (mmqa/models/qk_norm.py). `sigma_reparam`: σReparam on the projections of every attention
        (mmqa/models/sigma_reparam.py)."""
        super().__init__()
        self.dim, self.head_mlp_ratio, self.dropout = dim, head_mlp_ratio, dropout  # for heads built outside
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.text_cache: FrozenTextCache | None = None  # `cache_text`: a frozen tower's outputs, memoised
        # encoder widths are read from the built modules, never typed twice in the config
        self.image_proj = nn.Linear(image_encoder.out_dim, dim) if image_encoder.out_dim != dim else nn.Identity()
        self.text_proj = nn.Linear(text_encoder.out_dim, dim) if text_encoder.out_dim != dim else nn.Identity()
        self.fusion = fusion
        self.vqa_head = VQAHead(dim, num_answers, head_mlp_ratio, dropout)
        self.contrastive = ContrastiveHead(dim, dim, embed_dim, init_temperature)
        self.decoder = decoder
        self.ingredient_head = PatchSetHead(dim, num_ingredients, head_mlp_ratio, dropout) if num_ingredients else None
        grid = image_encoder.grid
        position = build_sincos2d_pos_embed([grid, grid], dim) * image_position_scale  # (N, D)
        self.register_buffer("image_position", position, persistent=False)  # fixed: not in the weights
        if sigma_reparam:  # before the QK-norm wrappers, which hide the projections' weights
            log.info(f"sigma_reparam: {apply_sigma_reparam(self)} attention projections reparametrised")
        plan = attention_plan(attention, self)
        if qk_norm:  # the ViT and fusion built it from their configs; transformers' modules get it here
            plan += f"; QK-layernorm everywhere ({add_qk_norm(self)} transformers attention modules wrapped)"
        log.info(plan)

    def compile_towers(self) -> None:
        """`torch.compile` the image encoder, text encoder and fusion in place (`nn.Module.compile`:
        the weights keep their names, so checkpoints and bundles are unchanged). The decoder stays
        eager: transformers' `generate` calls the same module, and compiles its own decoding step
        with a static cache (`GPT2Decoder.generate`)."""
        for tower in (self.image_encoder, self.text_encoder, self.fusion):
            tower.compile()

    @property
    def grid(self) -> int:
        """Patches per image side, to lay attention maps over the image."""
        return self.image_encoder.grid

    def encode_images(self, images: torch.Tensor) -> EncoderOutput:  # (B, 3, H, W) -> tokens (B, N, D)
        out = _project(self.image_encoder(images), self.image_proj)
        # the ViT's own position embedding fades through its layers; this tells fusion where each patch is
        tokens = out.tokens + self.image_position.to(out.tokens.dtype)  # (B, N, D)
        return EncoderOutput(tokens=tokens, mask=out.mask, pooled=out.pooled)

    def cache_text(self, max_rows: int) -> None:
        """Encode each distinct text once from now on: the text encoder must be frozen
        (mmqa/models/frozen_cache.py). Its projection still trains."""
        self.text_cache = FrozenTextCache(self.text_encoder, max_rows)

    def cache_text_if_frozen(self, max_rows: int) -> bool:
        """`cache_text` when none of the text encoder's weights train (a frozen pretrained tower, a
        distillation teacher) and `max_rows` > 0; whether it now has a cache."""
        if max_rows > 0 and not any(p.requires_grad for p in self.text_encoder.parameters()):
            self.cache_text(max_rows)
            return True
        return False

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:  # (T, L)
        if self.text_cache is not None:
            return _project(self.text_cache(self.text_encoder, input_ids, attention_mask), self.text_proj)
        return _project(self.text_encoder(input_ids, attention_mask), self.text_proj)

    def answer_logits(
        self,
        img: EncoderOutput,  # tokens (B, N, D)
        q_img_idx: torch.Tensor,  # (Q,) image row of each question
        question: EncoderOutput,  # tokens (Q, T, D)
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, FusionOutput]:
        fused = self.fusion(img.tokens, img.mask, question.tokens, question.mask, q_img_idx, return_attention)
        return self.vqa_head(fused.pooled), fused  # (Q, K)

    def ingredient_logits(self, img: EncoderOutput) -> torch.Tensor:  # -> (B, I)
        if self.ingredient_head is None:
            raise ValueError("this model has no ingredient head: it was built without an ingredient vocabulary")
        return self.ingredient_head(img.tokens, img.mask)

    def embed_image(self, img: EncoderOutput) -> torch.Tensor:  # -> (B, E) unit norm
        return self.contrastive.embed_image(img.pooled)

    def embed_text(self, text: EncoderOutput) -> torch.Tensor:  # -> (T, E) unit norm
        return self.contrastive.embed_text(text.pooled)

    def lm_loss(
        self,
        img: EncoderOutput,
        c_img_idx: torch.Tensor,  # (C,) image row of each text (caption or recipe)
        input_ids: torch.Tensor,  # (C, L)
        attention_mask: torch.Tensor,  # (C, L)
        labels: torch.Tensor,  # (C, L), -100 on padding
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The LM loss; with `return_logits`, (loss, logits (C, L, V))."""
        return self.decoder.loss(img.tokens.index_select(0, c_img_idx), input_ids, attention_mask, labels, return_logits)

    def generate(
        self, img: EncoderOutput, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor:
        return self.decoder.generate(img.tokens, prompt_ids, attention_mask, **generate_kwargs)  # (B, P + new)
