"""Image encoder adapters: a timm ViT (default) or open_clip's visual tower, behind one contract —
`forward(images) -> EncoderOutput` with patch tokens (B, N, D), mask (B, N), pooled (B, D), and
`out_dim` and `grid` (patches per side, for attention heatmaps)."""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmqa.models.outputs import EncoderOutput
from mmqa.models.pretrained import load_pretrained


class TimmImageEncoder(nn.Module):
    """A timm ViT. With `name` any timm ViT is created (pretrained weights optional: `true` for timm's
    default source, or a local weights file); without it a small ViT is built from the numbers given."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        drop_path: float,
        name: str | None = None,
        pretrained: bool | str = False,
    ):
        super().__init__()
        if name:
            kwargs = dict(num_classes=0, img_size=image_size)
            if isinstance(pretrained, str):
                kwargs["pretrained_cfg_overlay"] = dict(file=pretrained)
            self.vit = load_pretrained(
                name if pretrained else f"{name} (random init)",
                "image encoder",
                lambda _: timm.create_model(name, pretrained=bool(pretrained), **kwargs),
            )
        else:
            self.vit = VisionTransformer(
                img_size=image_size,
                patch_size=patch_size,
                embed_dim=width,
                depth=depth,
                num_heads=heads,
                mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path,
                num_classes=0,
            )
        self.out_dim = self.vit.num_features
        self.grid = self.vit.patch_embed.grid_size[0]

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

    def forward(self, images: torch.Tensor) -> EncoderOutput:  # images (B, 3, H, W)
        _, tokens = self.visual(images)  # (B, N, D) patch tokens, class token removed by open_clip
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=tokens.mean(1))
