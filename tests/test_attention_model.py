"""The attention variants inside the model (conf/model/attention/): the ViT adapter leaves timm's
numbers and weights unchanged under sdpa; every layer's fast path equals its materialised weights;
a sliding window really is local inside the ViT and early fusion; bad settings fail naming the key;
and every variant trains through train.py."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import ROOT, TINY
from hydra.errors import MissingConfigException
from test_train_e2e import run
from timm.models.vision_transformer import VisionTransformer

from mmqa.models.attention import eager, linear, sdpa, sliding_window, tiled
from mmqa.models.attention.binding import attention_name, attention_weights, for_cross_attention
from mmqa.models.attention.sliding_window import TokenLayout
from mmqa.models.fusion import EarlyFusion
from mmqa.models.layers import Attention
from mmqa.models.vit_attention import TimmAttention, swap_attention

VARIANTS = sorted(p.stem for p in (ROOT / "conf" / "model" / "attention").glob("*.yaml"))
BOUND = {
    "sdpa": sdpa,
    "eager": eager,
    "sliding_window": functools.partial(sliding_window, window=1),
    "linear": functools.partial(linear, eps=1e-6, chunk_size=64),
    "tiled": functools.partial(tiled, block_q=8, block_k=8),
}


def test_every_config_has_a_variant_here():
    assert VARIANTS == sorted(BOUND)


def vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, **kw).eval()


def test_vit_adapter_with_sdpa_equals_timm_bit_for_bit_and_keeps_the_weights():
    ref, ours = vit(), vit()
    keys = list(ref.state_dict())
    assert swap_attention(ours, None) == 2
    assert all(isinstance(b.attn, TimmAttention) for b in ours.blocks)
    assert list(ours.state_dict()) == keys  # timm's names: pretrained weights and old checkpoints load
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("name", ["eager", "tiled", "linear", "sliding_window"])
def test_vit_adapter_runs_each_variant(name):
    ref, ours = vit(), vit()
    swap_attention(ours, BOUND[name])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    if name in ("eager", "tiled"):  # exact attention: the same function up to float rounding
        assert torch.allclose(a, b, atol=1e-5)
    else:  # an approximation (linear) or a 3 x 3 window on a 4 x 4 grid: a different function
        assert not torch.allclose(a, b, atol=1e-3)


def test_sliding_window_in_the_vit_is_local():
    """One block: the patch at grid (3, 3) does not see the patch at (0, 0); its neighbour (0, 1) does."""
    attn = vit().blocks[0].attn
    layer = TimmAttention(attn, BOUND["sliding_window"], TokenLayout.patches(16, prefix=1))
    x = torch.randn(1, 17, 32)
    y = x.clone()
    y[0, 1] += 1.0  # token 1 = patch (0, 0), after CLS
    with torch.no_grad():
        dx = (layer(y) - layer(x))[0].abs().amax(-1)  # (17,)
    assert dx[1 + 3 * 4 + 3] == 0  # patch (3, 3): outside the 3 x 3 neighbourhood
    assert dx[1 + 1] > 0 and dx[0] > 0  # patch (0, 1) and the global CLS token see it


def test_swap_refuses_a_block_it_cannot_serve():
    model = vit()
    model.blocks[1].attn = torch.nn.Identity()
    assert swap_attention(vit(), None) == 2
    with pytest.raises(ValueError, match=r"model/attention=linear cannot serve the image encoder: block 1 uses Identity"):
        swap_attention(model, BOUND["linear"])


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("cross", [False, True])
def test_fast_path_equals_the_materialised_weights(name, cross):
    """Each layer's output equals (weights it reports) @ v, so heatmaps show what the variant does;
    padded keys get no weight."""
    torch.manual_seed(0)
    fn = BOUND[name]
    layer = Attention(32, 4, attention=for_cross_attention(fn) if cross else fn).eval()
    x = torch.randn(3, 7 if cross else 17, 32)
    ctx = torch.randn(3, 16, 32) if cross else x
    mask = torch.ones(3, ctx.shape[1], dtype=torch.bool)
    mask[1, -3:] = False
    layout = None if cross else TokenLayout.patches(16, prefix=1)
    with torch.no_grad():
        fast, none = layer(x, ctx, mask, layout=layout)
        slow, weights = layer(x, ctx, mask, need_weights=True, layout=layout)
    assert none is None and weights.shape == (3, 4, x.shape[1], ctx.shape[1])
    assert torch.allclose(fast, slow, atol=1e-5)
    assert weights[1, :, :, -3:].abs().max() == 0
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


def test_cross_attention_stays_dense_for_a_sliding_window_only():
    assert for_cross_attention(BOUND["sliding_window"]) is sdpa
    assert for_cross_attention(BOUND["linear"]) is BOUND["linear"]
    assert attention_name(BOUND["tiled"]) == "tiled" and attention_name(None) == "sdpa"


def test_early_fusion_sliding_window_keeps_question_tokens_global():
    """The question sees every patch (global); a far patch does not reach a patch directly."""
    torch.manual_seed(0)
    fusion = EarlyFusion(32, depth=1, heads=2, mlp_ratio=2.0, dropout=0.0, attention=BOUND["sliding_window"]).eval()
    img, txt = torch.randn(1, 16, 32), torch.randn(1, 5, 32)
    ones = lambda n: torch.ones(1, n, dtype=torch.bool)  # noqa: E731
    with torch.no_grad():
        base = fusion(img, ones(16), txt, ones(5), torch.tensor([0]), return_attention=True)
        img2 = img.clone()
        img2[0, 15] += 1.0  # patch (3, 3)
        moved = fusion(img2, ones(16), txt, ones(5), torch.tensor([0]))
    assert (moved.tokens - base.tokens).abs().amax(-1).min() > 0  # every question token sees patch (3, 3)
    assert base.attention.shape == (1, 2, 5, 16) and (base.attention > 0).all()


def test_attention_dropout_only_for_sdpa():
    Attention(32, 4, dropout=0.1)  # sdpa has it
    with pytest.raises(ValueError, match=r"model.dropout=0.1 drops attention weights.*linear has no attention dropout"):
        Attention(32, 4, dropout=0.1, attention=BOUND["linear"])


def test_weights_of_linear_follow_its_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    w = attention_weights(BOUND["linear"], q, k)
    assert torch.allclose(w @ v, linear(q, k, v), atol=1e-6)


def test_unknown_variant_lists_the_valid_ones(tiny_cfg):
    with pytest.raises(MissingConfigException) as err:
        tiny_cfg("model/attention=flash")
    assert all(name in str(err.value) for name in VARIANTS)


def test_every_variant_trains_through_train_py(data_dir, tmp_path):
    """One Hydra multirun, one job a variant, early fusion (the ViT and fusion both run the variant)."""
    sweep = tmp_path / "sweep"
    proc = run(["train.py", "-m", *TINY, f"model/attention={','.join(VARIANTS)}", "model/fusion=early",
                f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"])
    for i, name in enumerate(VARIANTS):
        metrics = json.loads((sweep / str(i) / "metrics.json").read_text())
        assert 0 <= metrics["test/vqa_acc"] <= 1 and metrics["val/vqa_loss"] == metrics["val/vqa_loss"]  # not NaN
        log = (sweep / str(i) / "train.log").read_text()
        assert f"attention {name}" in log and "3 of 3 attention layers" in log, log[-2000:]
    assert proc.returncode == 0


def test_patch_layouts_are_a_grid_when_square_else_a_band():
    assert TokenLayout.patches(64, prefix=1, suffix=5).segments == (("global", 1), ("grid", 8), ("global", 5))
    assert TokenLayout.patches(65, prefix=1).segments == (("global", 1), ("seq", 65))
    assert len(TokenLayout.patches(50, suffix=3)) == 53
