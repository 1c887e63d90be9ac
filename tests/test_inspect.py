"""Model inspection (mmqa/inspect/maps.py, faithfulness.py, `python -m mmqa inspect`): rollout rows sum
to 1, early fusion's modality blocks are told apart, the maps of one example lie on the patch grid and
are written with a CSV of every weight, the deletion / insertion curves start and end where they must
and rank an occlusion-ordered map above its reverse, and bad requests name what is valid."""

from __future__ import annotations

import csv

import pytest
import torch
from omegaconf import OmegaConf
from test_demo import session_bundle, shapes_test_images, tiny_bundle

from conftest import CONF, compose_cfg
from mmqa.cli.inspect import inspect
from mmqa.errors import ConfigError
from mmqa.inspect.faithfulness import curves, patch_masks
from mmqa.inspect.maps import METHODS, InspectError, explain, modality_blocks, patch_relevance, rollout

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def bundle(data_dir):
    return session_bundle(data_dir)


def test_rollout_rows_sum_to_one_and_identity_layers_change_nothing():
    layers = [torch.softmax(torch.randn(5, 5), -1) for _ in range(3)]
    joint = rollout(layers)
    torch.testing.assert_close(joint.sum(-1), torch.ones(5))
    assert torch.allclose(rollout([torch.zeros(4, 4)]), torch.eye(4))  # no attention: only the residual


def test_modality_blocks_split_the_joint_sequence():
    w = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).reshape(2, 1, 8, 8)  # 1 fusion token, 4 patches, 3 words
    blocks = modality_blocks(w, 4)
    assert blocks["text->image"].shape == (2, 1, 3, 4) and blocks["image->text"].shape == (2, 1, 4, 3)
    assert blocks["text->image"][0, 0, 0, 0] == w[0, 0, 5, 1] and blocks["image->image"][0, 0, 0, 0] == w[0, 0, 1, 1]


def test_explain_lays_every_map_on_the_patch_grid(bundle, data_dir):
    image = shapes_test_images(data_dir)[0]
    ex = explain(bundle, image, QUESTION)
    g = bundle.model.grid
    assert ex.answer == bundle.answer(image, QUESTION).answer  # capture changes nothing
    assert ex.tokens[0] == "[CLS]" and "colour" in ex.tokens
    assert set(ex.vit) == {f"image/blocks.{i}/self" for i in range(len(bundle.model.image_encoder.vit.blocks))}
    for maps in ex.question.values():
        assert maps.shape[1:] == (len(ex.tokens), g, g)
        torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(maps.shape[:2]))  # each token's weights over patches
    assert 0 < ex.rollout.sum() <= 1 + 1e-5  # the CLS row of the rollout, restricted to the patches
    torch.testing.assert_close(ex.vit_rollout_matrix.sum(-1), torch.ones(g * g))
    for method in METHODS:
        assert patch_relevance(ex, method, torch.Generator().manual_seed(0)).shape == (g, g)


def test_late_fusion_says_it_has_no_patch_attention(data_dir, tmp_path):
    late = tiny_bundle(data_dir, tmp_path / "late", "model/fusion=late")
    ex = explain(late, shapes_test_images(data_dir)[0], QUESTION)
    assert not ex.question
    with pytest.raises(InspectError, match=r"no question -> patch attention in this model \(late fusion.*valid here: vit_rollout, random"):
        patch_relevance(ex, "last_layer")
    assert patch_relevance(ex, "vit_rollout").shape == (late.model.grid,) * 2


def test_bad_requests_name_what_is_valid(bundle, data_dir):
    with pytest.raises(InspectError, match="unknown method 'gradcam'; valid: last_layer, mean_layers"):
        patch_relevance(explain(bundle, shapes_test_images(data_dir)[0], QUESTION), "gradcam")
    long = " ".join(["what"] * 200)
    with pytest.raises(InspectError, match=r"the question has \d+ tokens; this model reads at most \d+ \(data.max_question_length\)"):
        explain(bundle, shapes_test_images(data_dir)[0], long)


def test_patch_masks_take_the_first_patches_of_the_order():
    order = torch.tensor([3, 0, 2, 1])
    masks = patch_masks(order, steps=2)  # 0, 2, 4 patches
    assert masks.tolist() == [[False] * 4, [True, False, False, True], [True] * 4]


def test_curves_start_and_end_where_they_must_and_occlusion_order_beats_its_reverse(bundle, data_dir):
    image = shapes_test_images(data_dir)[0]
    ex = explain(bundle, image, QUESTION)
    answer = bundle.answers.index(ex.answer)
    pixels = bundle._images([image])
    enc = bundle.text_tokenizer([QUESTION], return_tensors="pt")
    q = bundle.model.encode_text(enc["input_ids"], enc["attention_mask"])
    n = bundle.model.grid ** 2
    with torch.no_grad():
        c = curves(bundle, pixels, q, answer, torch.arange(n), steps=4)
        assert c.deletion[0] == pytest.approx(ex.probability, abs=1e-5)  # nothing deleted: the answer's probability
        assert c.insertion[-1] == pytest.approx(ex.probability, abs=1e-5)  # everything inserted: the same
        assert c.deletion[-1] == pytest.approx(c.insertion[0], abs=1e-6)  # both: the blank image
        # occlusion sensitivity: how far deleting each patch alone lowers the answer's probability
        drops = torch.tensor([ex.probability - curves(bundle, pixels, q, answer, torch.tensor([i, *range(i), *range(i + 1, n)]),
                                                      steps=n).deletion[1] for i in range(n)])
        order = drops.argsort(descending=True)
        best, worst = (curves(bundle, pixels, q, answer, o, steps=n) for o in (order, order.flip(0)))
    assert best.deletion_auc <= worst.deletion_auc and best.insertion_auc >= worst.insertion_auc


def test_inspect_cli_writes_a_report_and_every_weight(bundle, data_dir, tmp_path):
    cfg = compose_cfg(data_dir, tmp_path / "ex", ["bundle=" + str(data_dir.parent / "demo-cross" / "bundle"),
                                                   f"image={shapes_test_images(data_dir)[0]}", f"question='{QUESTION}'"],
                      config_name="inspect")
    written = {p.name for p in inspect(cfg)}
    assert {"report.md", "maps.csv", "vit_heads.png", "question_heads.png", "question_tokens.png", "methods.png"} <= written
    rows = list(csv.DictReader((tmp_path / "ex" / "maps.csv").open()))
    g = bundle.model.grid
    vit_heads = sum(b.attn.num_heads for b in bundle.model.image_encoder.vit.blocks)
    tokens = len(explain(bundle, shapes_test_images(data_dir)[0], QUESTION).tokens)
    fusion = bundle.model.fusion.text_blocks
    fusion_heads = sum(b.cross_attn.heads for b in fusion)
    assert len(rows) == g * g * (vit_heads + fusion_heads * tokens)
    faith = compose_cfg(data_dir, tmp_path / "faith", ["bundle=" + str(data_dir.parent / "demo-cross" / "bundle"),
                                                        "task=faithfulness", "n=3", "steps=4", "methods=[last_layer,random]"],
                        config_name="inspect")
    inspect(faith)
    summary = list(csv.DictReader((tmp_path / "faith" / "summary.csv").open()))
    assert [r["method"] for r in summary] == ["last_layer", "random"] and all(r["n"] == "3" for r in summary)
    assert "| last_layer |" in (tmp_path / "faith" / "report.md").read_text()
    with pytest.raises(ConfigError, match="methods: unknown \\['saliency'\\]; valid: last_layer"):
        inspect(OmegaConf.merge(faith, {"methods": ["saliency"]}))
    assert (CONF / "inspect.yaml").is_file()
