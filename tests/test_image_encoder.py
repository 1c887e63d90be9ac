"""The built small ViT and its convolutional stem (mmqa/models/image_encoders.py), and the position
encoding `MMQAModel` adds to the image tokens."""

from __future__ import annotations

import pytest
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from mmqa.models.image_encoders import ConvStemPatchEmbed, TimmImageEncoder

SMALL = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_ratio=2.0, drop_path=0.0,
             mean=[0.5] * 3, std=[0.25] * 3, name=None, pretrained=False, stem_channels=None, stem_strides=None)
STEM = dict(stem_channels=[8, 16, 32, 32], stem_strides=[2, 2, 2, 1])


def test_stem_gives_one_token_per_patch():
    enc = TimmImageEncoder(**{**SMALL, **STEM})
    assert isinstance(enc.vit.patch_embed, ConvStemPatchEmbed)
    out = enc(torch.randn(3, 3, 32, 32))
    assert out.tokens.shape == (3, 16, 32) and enc.grid == 4 and out.pooled.shape == (3, 32)


def test_stem_starts_as_the_plain_vit_and_then_learns():
    torch.manual_seed(0)
    plain = TimmImageEncoder(**SMALL)
    stem = TimmImageEncoder(**{**SMALL, **STEM})
    missing, unexpected = stem.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vit.patch_embed.stem") for k in missing)
    images = torch.randn(4, 3, 32, 32)
    plain.eval(), stem.eval()
    assert torch.allclose(stem(images).tokens, plain(images).tokens, atol=1e-6)  # zero-initialised stem output

    stem.train()
    stem(images).tokens.pow(2).sum().backward()
    proj = stem.vit.patch_embed.stem_proj
    assert proj.weight.grad.abs().sum() > 0  # the stem's projection learns from the first step


def test_stem_strides_must_make_up_the_patch():
    with pytest.raises(ValueError, match=r"stem_strides=\[2, 2\] must give one stride per stem_channels entry \(4\) "
                                         r"and multiply to model.image_encoder.patch_size=8"):
        TimmImageEncoder(**{**SMALL, "stem_channels": [8, 16, 32, 32], "stem_strides": [2, 2]})


def test_image_tokens_carry_their_grid_position(tiny_parts):
    _, _, with_pos, _, batch = tiny_parts("model.image_position_scale=0.5")
    _, _, without, _, _ = tiny_parts("model.image_position_scale=0")
    assert "image_position" not in with_pos.state_dict()  # fixed: bundles without it load unchanged
    without.load_state_dict(with_pos.state_dict())
    with_pos.eval(), without.eval()
    a, b = with_pos.encode_images(batch.images), without.encode_images(batch.images)
    grid = with_pos.grid  # 32 px / 8 px patches = 4
    expected = 0.5 * build_sincos2d_pos_embed([grid, grid], a.tokens.shape[-1])  # (N, D)
    assert torch.allclose(a.tokens - b.tokens, expected.expand_as(a.tokens), atol=1e-6)
    assert torch.equal(a.pooled, b.pooled)  # the contrastive vector is left alone
    assert len({tuple(row.tolist()) for row in expected}) == grid * grid  # one code per patch
