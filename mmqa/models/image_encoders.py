"""Image encoder adapters: a timm ViT (default) or open_clip's visual tower, behind one contract —
`forward(images) -> EncoderOutput` with patch tokens (B, N, D), mask (B, N), pooled (B, D), and
`out_dim`, `grid` (patches per side, for attention heatmaps) and `normalization`, the (mean, std) its
images are normalised with: a pretrained model's own (timm's pretrained config, open_clip's
preprocess config), or the config's for a ViT built from numbers."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmqa.models.outputs import EncoderOutput
from mmqa.models.pretrained import load_pretrained
from mmqa.models.vit_attention import swap_attention


def stem_problem(channels: list[int], strides: list[int] | None, patch_size: int) -> str | None:
    """What is wrong with a stem of these channels and strides for this patch size, or None."""
    strides = list(strides or [])
    if len(strides) != len(channels) or math.prod(strides) != patch_size:
        return (f"model.image_encoder.stem_strides={strides} must give one stride per stem_channels entry "
                f"({len(channels)}) and multiply to model.image_encoder.patch_size={patch_size}")
    return None


def conv_stem(channels: list[int], strides: list[int], in_chans: int = 3) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU per entry; one output cell per prod(strides) pixels a side.

    Early convolutions let a ViT trained from scratch see shapes inside a patch far sooner (Xiao et
    al., "Early Convolutions Help Transformers See Better"); `ConvStemPatchEmbed` adds them to the
    linear projection rather than replacing it."""
    layers, c_in = [], in_chans
    for c, s in zip(channels, strides, strict=True):
        layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


class ConvStemPatchEmbed(PatchEmbed):
    """timm's linear patch embedding plus a convolutional stem's features of the same patch, added.

    The linear path keeps what a patch projection sees at once (colour); the stem adds local shape.
    Its output projection starts at zero, so training starts from the plain ViT."""

    def __init__(self, stem_channels: list[int], stem_strides: list[int], **kwargs):
        super().__init__(**kwargs)
        self.stem = conv_stem(stem_channels, stem_strides, kwargs.get("in_chans", 3))
        self.stem_proj = nn.Conv2d(stem_channels[-1], self.proj.out_channels, 1)
        nn.init.zeros_(self.stem_proj.weight)
        nn.init.zeros_(self.stem_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, D)
        conv = self.stem_proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, N, D)
        return super().forward(x) + conv


class TimmImageEncoder(nn.Module):
    """A timm ViT. With `name` any timm ViT is created (pretrained weights optional: `true` for timm's
    default source, or a local weights file), normalising images as its pretrained config says;
    without it a small ViT is built from the numbers given, normalising with `mean` and `std`, with
    timm's linear patch projection, to which `stem_channels` and `stem_strides` (strides that
    multiply to `patch_size`) add a convolutional stem's features (`ConvStemPatchEmbed`)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        drop_path: float,
        mean: list[float],
        std: list[float],
        stem_channels: list[int] | None,
        stem_strides: list[int] | None,
        name: str | None,
        pretrained: bool | str,
        attention: Callable | None = None,
        qk_norm: bool = False,
        reg_tokens: int = 0,
    ):
        """`attention`: the function of `mmqa.models.attention` (parameters bound) that computes the
        ViT's self-attention, swapped into timm's blocks by `mmqa.models.vit_attention`; None: sdpa.
        `qk_norm`: timm's QK-layernorm in every block; `reg_tokens`: timm's register tokens (Darcet et
        al. 2023), extra prefix tokens that soak up the high-norm artefacts patches would otherwise
        carry. A named model gets them only when set (its pretrained weights have neither)."""
        super().__init__()
        extras = {k: v for k, v in dict(qk_norm=qk_norm, reg_tokens=reg_tokens).items() if v}
        if name:
            kwargs = dict(num_classes=0, img_size=image_size, **extras)
            if isinstance(pretrained, str):
                kwargs["pretrained_cfg_overlay"] = dict(file=pretrained)
            self.vit = load_pretrained(
                name if pretrained else f"{name} (random init)",
                "image encoder",
                lambda _: timm.create_model(name, pretrained=bool(pretrained), **kwargs),
            )
        else:
            embed = dict(patch_size=patch_size)
            if stem_channels:
                problem = stem_problem(stem_channels, stem_strides, patch_size)
                if problem:
                    raise ValueError(problem)
                embed["embed_layer"] = partial(ConvStemPatchEmbed, stem_channels=list(stem_channels), stem_strides=list(stem_strides))
            self.vit = VisionTransformer(
                img_size=image_size,
                embed_dim=width,
                depth=depth,
                num_heads=heads,
                mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path,
                num_classes=0,
                **embed,
                **extras,
            )
        swap_attention(self.vit, attention)
        self.out_dim = self.vit.num_features
        self.grid = self.vit.patch_embed.grid_size[0]
        own = getattr(self.vit, "pretrained_cfg", None) or {}  # only models timm created have one
        self.normalization = (list(own.get("mean", mean)), list(own.get("std", std)))

    def forward(self, images: torch.Tensor) -> EncoderOutput:  # images (B, 3, H, W)
        x = self.vit.forward_features(images)  # (B, P + N, D), P prefix (class) tokens
        pooled = self.vit.forward_head(x, pre_logits=True)  # (B, D)
        tokens = x[:, self.vit.num_prefix_tokens :]  # (B, N, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)


class OpenClipImageEncoder(nn.Module):
    """open_clip's visual tower (ViT models): any open_clip model name, with `pretrained` a tag or a
    local weights file. Patch tokens are taken before CLIP's projection; `pooled` is their mean, so
    both share one width."""

    def __init__(self, name: str, pretrained: str | None = None):
        super().__init__()
        import open_clip  # only needed for this backend

        model = load_pretrained(
            pretrained or f"{name} (random init)",
            "open_clip image tower",
            lambda _: open_clip.create_model(name, pretrained=pretrained or None),
        )
        self.visual = model.visual
        if not hasattr(self.visual, "output_tokens"):
            raise ValueError(f"open_clip model '{name}' has no ViT visual tower with patch tokens")
        self.visual.output_tokens = True
        self.out_dim = self.visual.transformer.width
        self.grid = self.visual.grid_size[0]
        cfg = self.visual.preprocess_cfg  # the mean and std open_clip's own preprocessing uses
        self.normalization = (list(cfg["mean"]), list(cfg["std"]))

    def forward(self, images: torch.Tensor) -> EncoderOutput:  # images (B, 3, H, W)
        _, tokens = self.visual(images)  # (B, N, D) patch tokens, class token removed by open_clip
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=tokens.mean(1))
