"""Every fusion variant, listed from conf/model/fusion/ (the registry): shapes, masks, that the output
depends on the right image and on the question, and attention maps on request."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

VARIANTS = sorted(p.stem for p in (CONF / "model" / "fusion").glob("*.yaml"))
D, N, T, B, Q = 32, 16, 7, 3, 5


def test_registry_lists_the_three_designs():
    assert VARIANTS == ["cross", "early", "late"]


def build(name: str, **extra):
    cfg = OmegaConf.load(CONF / "model" / "fusion" / f"{name}.yaml")
    cfg.dim, cfg.dropout = D, 0.0  # the YAML reads both from ${model.*}
    if "attention" in cfg:
        cfg.attention = None  # ${model.attention}: None is sdpa (tests/test_attention_model.py tries the rest)
    if "qk_norm" in cfg:
        cfg.qk_norm = False  # ${model.qk_norm} (tests/test_diagnostics.py tries it)
    for k, v in extra.items():
        cfg[k] = v
    torch.manual_seed(0)
    return instantiate(cfg).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(B, N, D, generator=g)  # (B, N, D)
    img_mask = torch.ones(B, N, dtype=torch.bool)
    txt = torch.randn(Q, T, D, generator=g)  # (Q, T, D)
    txt_mask = torch.ones(Q, T, dtype=torch.bool)
    txt_mask[0, 4:] = False  # question 0 has 4 real tokens
    img_idx = torch.tensor([0, 0, 1, 2, 2])  # (Q,)
    return img, img_mask, txt, txt_mask, img_idx


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shapes(name):
    out = build(name)(*inputs())
    assert out.pooled.shape == (Q, D)
    assert out.tokens.shape == (Q, T, D)
    assert torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_is_ignored(name):
    fusion = build(name)
    img, img_mask, txt, txt_mask, idx = inputs()
    before = fusion(img, img_mask, txt, txt_mask, idx).pooled
    txt2 = txt.clone()
    txt2[0, 4:] = 100.0  # garbage in question 0's padding
    assert torch.allclose(before, fusion(img, img_mask, txt2, txt_mask, idx).pooled, atol=1e-5)
    img_mask[1, 10:] = False  # image 1's last patches are padding from here on
    img2 = img.clone()
    img2[1, 10:] = 100.0  # garbage in image 1's masked patches
    assert torch.allclose(fusion(img, img_mask, txt, txt_mask, idx).pooled,
                          fusion(img2, img_mask, txt, txt_mask, idx).pooled, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_output_depends_on_its_own_image_and_question(name):
    fusion = build(name)
    img, img_mask, txt, txt_mask, idx = inputs()
    base = fusion(img, img_mask, txt, txt_mask, idx).pooled
    img2 = img.clone()
    img2[1] += torch.randn(N, D)  # only question 2 looks at image 1
    changed = (fusion(img2, img_mask, txt, txt_mask, idx).pooled - base).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, True, False, False]
    txt2 = txt.clone()
    txt2[3] += torch.randn(T, D)
    changed = (fusion(img, img_mask, txt2, txt_mask, idx).pooled - base).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_maps_on_request(name):
    fusion = build(name)
    plain = fusion(*inputs())
    out = fusion(*inputs(), return_attention=True)
    assert plain.attention is None
    assert torch.allclose(plain.pooled, out.pooled, atol=1e-5)  # asking for maps changes nothing
    if name == "late":
        assert out.attention is None  # no patch-level attention to show
        return
    assert out.attention.shape == (Q, 4, T, N)
    assert (out.attention >= 0).all()
    sums = out.attention.sum(-1)  # over image patches
    if name == "cross":
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    else:  # early fusion also attends to text tokens, so only part of the mass is on the image
        assert (sums <= 1 + 1e-5).all() and (sums > 0).all()


def test_bidirectional_cross_fusion_lets_the_image_attend_back():
    fusion = build("cross", bidirectional=True)
    img, img_mask, txt, txt_mask, idx = inputs()
    out = fusion(img, img_mask, txt, txt_mask, idx)
    assert out.pooled.shape == (Q, D)
    assert len(fusion.image_blocks) == len(fusion.text_blocks)
    # with depth 2, the second text layer reads image tokens that have seen the question
    txt2 = txt.clone()
    txt2[3] += torch.randn(T, D)
    changed = (fusion(img, img_mask, txt2, txt_mask, idx).pooled - out.pooled).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, False, True, False]
