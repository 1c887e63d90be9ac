"""Model inspection (mmqa/inspect/maps.py, faithfulness.py, `python -m mmqa inspect`): rollout rows sum
to 1, early fusion's modality blocks are told apart, the maps of one example lie on the patch grid and
are written with a CSV of every weight, the deletion / insertion curves start and end where they must
and rank an occlusion-ordered map above its reverse, the logit lenses read their last layer as the model
does, patching the fusion's input restores the clean answer, and bad requests name what is valid."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_demo import session_bundle, shapes_test_images, tiny_bundle

from conftest import CONF, compose_cfg
from mmqa.build import build_lit_module, data_for_bundle
from mmqa.cli.inspect import inspect
from mmqa.data.worlds.shapes import COLOURS, Scene, read_scenes, recolour, render_scene
from mmqa.errors import ConfigError
from mmqa.inspect.faithfulness import curves, patch_masks
from mmqa.inspect.compare import check_comparable, compare, js_divergence
from mmqa.inspect.heads import evaluate, head_counts, head_mask, importance, pruning_curve
from mmqa.inspect.lens import decoder_lens, fusion_layers, logit_lens
from mmqa.inspect.maps import METHODS, InspectError, caption_maps, explain, modality_blocks, patch_relevance, rollout
from mmqa.inspect.patching import colour_pairs, object_patches, patching, probabilities, restored, sites, trace, world_pairs
from mmqa.models.fusion.late import LateFusion
from mmqa.models.layers import Attention

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
    with pytest.raises(InspectError, match=r"chefer: not computed \(explain\(\.\.\., relevance=False\)\)"):
        patch_relevance(explain(bundle, image, QUESTION, relevance=False), "chefer")


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


def test_caption_maps_give_each_word_a_map_over_the_patches(bundle, data_dir):
    image = shapes_test_images(data_dir)[0]
    words = caption_maps(bundle, image)
    caption = bundle.caption(image, num_beams=1, do_sample=False)
    assert words and bundle.decoder_tokenizer.convert_tokens_to_string([w for w, _ in words]).strip() == caption.strip()
    g = bundle.model.grid
    for _, m in words:
        assert m.shape == (g, g) and m.sum().item() == pytest.approx(1.0, abs=1e-5)


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
    assert {"report.md", "maps.csv", "vit_heads.png", "question_heads.png", "question_tokens.png", "methods.png",
            "caption_words.png"} <= written
    rows = [r for r in csv.DictReader((tmp_path / "ex" / "maps.csv").open()) if r["site"] != "decoder/cross (caption)"]
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


# ---------------------------------------------------------------------------- heads and the logit lens


def test_masking_a_head_removes_only_that_heads_contribution():
    torch.manual_seed(0)
    layer = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        (site,) = head_counts(layer)  # a layer alone: the site has no stack or block
        with head_mask(layer, {site: torch.tensor([1.0, 0.0, 1.0, 1.0])}):
            masked, _ = layer(x, x, mask)
        q = layer.q(x).view(2, 5, 4, 4).transpose(1, 2)
        k, v = layer.kv(x).view(2, 5, 2, 4, 4).permute(2, 0, 3, 1, 4)
        y = torch.softmax(q @ k.transpose(-2, -1) / 2, -1) @ v  # (B, h, T, d)
        y[:, 1] = 0
        expected = layer.out(y.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)


def test_head_importance_and_the_masking_curve(bundle, data_dir, tmp_path):
    cfg = compose_cfg(data_dir, tmp_path, ["bundle=x", "n=20"], config_name="inspect")
    dm = data_for_bundle(cfg.data, bundle, "test")
    lit = build_lit_module(bundle.cfg, bundle.model, dm, split="test", train=False)
    batches = [next(iter(dm.loader("test", train=False)))]
    counts = head_counts(bundle.model)
    assert {"image/blocks.0/self", "text/layer.0/self", "fusion/text_blocks.0/cross", "decoder/h.0/cross"} <= set(counts)
    scores = importance(lit, batches)
    assert all(v.shape == (counts[s],) and torch.isclose(v.norm(), torch.tensor(1.0)) for s, v in scores.items())
    assert all(p.requires_grad for p in lit.parameters())  # given back as they were
    curve = pruning_curve(lit, batches, scores, [0.0, 1.0])
    none = evaluate(lit, batches, {})
    for row in curve:
        if row["fraction"] == 0.0:
            assert row["vqa_acc"] == none["vqa_acc"] and row["caption_loss"] == pytest.approx(none["caption_loss"])
            assert row["bleu4"] == pytest.approx(none["bleu4"])
    assert 0 <= none["bleu4"] <= 1
    assert math.isnan(evaluate(lit, batches, {}, captions=False)["bleu4"])  # no captions written
    text_all = next(r for r in curve if r["stack"] == "text" and r["fraction"] == 1.0)
    assert text_all["bleu4"] == pytest.approx(none["bleu4"])  # captions do not read the question
    decoder_all = next(r for r in curve if r["stack"] == "decoder" and r["fraction"] == 1.0)
    assert decoder_all["vqa_acc"] == none["vqa_acc"]  # the decoder does not answer questions
    assert decoder_all["caption_loss"] > none["caption_loss"]  # but without its heads it captions worse


def test_logit_lens_reads_the_last_layer_as_the_model_does(bundle, data_dir, tmp_path, tiny_cfg):
    cfg = compose_cfg(data_dir, tmp_path, ["bundle=x"], config_name="inspect")
    dm = data_for_bundle(cfg.data, bundle, "test")
    lit = build_lit_module(bundle.cfg, bundle.model, dm, split="test", train=False)
    batches = [next(iter(dm.loader("test", train=False)))]
    rows = logit_lens(lit, batches)
    assert [r["layer"] for r in rows] == list(range(len(bundle.model.fusion.text_blocks)))
    assert rows[-1]["vqa_acc"] == evaluate(lit, batches, {})["vqa_acc"]
    with pytest.raises(InspectError, match="LateFusion has no layers to read"):
        fusion_layers(LateFusion(8, 2.0, 0.0))


def test_compare_against_itself_shows_no_change_and_other_architectures_are_refused(bundle, data_dir, tmp_path):
    cfg = compose_cfg(data_dir, tmp_path, ["bundle=x"], config_name="inspect")
    dm = data_for_bundle(cfg.data, bundle, "test")
    lit = build_lit_module(bundle.cfg, bundle.model, dm, split="test", train=False)
    batches = [next(iter(dm.loader("test", train=False)))]
    result = compare(lit, lit, batches, bundle.text_tokenizer)
    assert {r["site"] for r in result["heads"]} == set(head_counts(bundle.model))
    assert all(r["js"] == pytest.approx(0.0, abs=1e-9) and r["entropy_a"] == r["entropy_b"] for r in result["heads"])
    assert result["cka"] and all(r["cka"] == pytest.approx(1.0, abs=1e-9) for r in result["cka"])
    assert "colour" in {w["word"] for w in result["words"]} and all(w["gain"] == 0 for w in result["words"])
    torch.testing.assert_close(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])), torch.tensor(1.0))
    early = tiny_bundle(data_dir, tmp_path / "early", "model/fusion=early")
    with pytest.raises(InspectError, match="differ in architecture"):
        check_comparable(bundle, early)


# ---------------------------------------------------------------------------- decoder lens and activation patching


def _test_data(bundle, data_dir, tmp_path):
    cfg = compose_cfg(data_dir, tmp_path, ["bundle=x"], config_name="inspect")
    return data_for_bundle(cfg.data, bundle, "test")


def test_decoder_lens_reads_the_last_layer_as_the_model_does(bundle, data_dir, tmp_path):
    dm = _test_data(bundle, data_dir, tmp_path)
    lit = build_lit_module(bundle.cfg, bundle.model, dm, split="test", train=False)
    batch = next(iter(dm.loader("test", train=False)))
    rows = decoder_lens(lit, [batch])
    assert [r["layer"] for r in rows] == list(range(len(bundle.model.decoder.gpt2.transformer.h)))
    with torch.no_grad():
        img = bundle.model.encode_images(batch.images)
        loss, logits = bundle.model.lm_loss(img, batch.c_img_idx, batch.c_dec_input_ids, batch.c_dec_attention_mask,
                                            batch.c_dec_labels, return_logits=True)  # logits (C, L, V)
    target = batch.c_dec_labels[:, 1:]
    keep = target != -100
    assert rows[-1]["tokens"] == int(keep.sum())
    assert rows[-1]["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert rows[-1]["accuracy"] == int((logits[:, :-1].argmax(-1) == target)[keep].sum()) / int(keep.sum())
    assert decoder_lens(lit, [replace(batch, c_img_idx=batch.c_img_idx[:0])]) == []  # no captions, no rows


def test_recolour_changes_one_objects_colour_and_only_its_pixels(bundle, data_dir, tmp_path):
    dataset = _test_data(bundle, data_dir, tmp_path).reader.dataset_dir
    scenes = read_scenes(dataset, "test")
    assert len(scenes) == len(shapes_test_images(data_dir))
    scene = Scene("gray", "noise", scenes[0].objects)  # noise: both images must share it
    o = scene.objects[0]
    colour = next(c for c in COLOURS if c != o.colour)
    changed = recolour(scene, 0, colour)
    assert changed.objects[0] == replace(o, colour=colour) and changed.objects[1:] == scene.objects[1:]
    assert (changed.background, changed.style) == (scene.background, scene.style)
    size = 32
    clean, corrupted = (np.asarray(render_scene(s, size, np.random.default_rng(0)), dtype=int) for s in (scene, changed))
    differs = (clean != corrupted).any(-1)  # (H, W)
    ys, xs = np.nonzero(differs)
    x0, y0 = o.x - o.extent // 2, o.y - o.extent // 2
    assert differs.any() and x0 <= xs.min() and xs.max() < x0 + o.extent and y0 <= ys.min() and ys.max() < y0 + o.extent
    pairs = colour_pairs(scenes, size, 5, seed=0)
    assert len(pairs) == 5 and pairs == colour_pairs(scenes, size, 5, seed=0)
    for p in pairs:
        assert p.answer != p.colour and p.question.startswith(("what colour is the", "what is the colour of the",
                                                                 "which colour is the"))
        assert p.colour not in p.question and (np.asarray(p.clean) != np.asarray(p.corrupted)).any()


def test_patching_the_fusion_input_restores_the_clean_answer_and_nothing_restores_nothing(bundle, data_dir, tmp_path):
    model = bundle.model
    pairs = world_pairs(_test_data(bundle, data_dir, tmp_path), "test", 16, seed=0)
    site_list = sites(model)
    assert [s.name for s in site_list] == [*(f"image/blocks.{i}" for i in range(len(model.image_encoder.vit.blocks))),
                                           "fusion/input", *(f"fusion/text_blocks.{i}" for i in range(len(model.fusion.text_blocks)))]
    clean, corrupted = bundle._images([p.clean for p in pairs]), bundle._images([p.corrupted for p in pairs])
    with torch.no_grad():
        question = bundle._text([p.question for p in pairs], bundle.cfg.data.max_question_length)
        probs = trace(model, clean, corrupted, question, site_list)
        again = probabilities(model, corrupted, question)  # every hook is off again: nothing patched
    answer = probs["clean"].argmax(-1)
    assert (probs["clean"] != probs["corrupted"]).gather(1, answer[:, None]).all()  # the model tells each pair apart
    fractions = restored({**probs, "nothing": again}, answer)
    ones = torch.ones(len(pairs))
    torch.testing.assert_close(fractions["fusion/input"], ones, atol=1e-5, rtol=0)  # all downstream is the clean run
    torch.testing.assert_close(fractions["nothing"], torch.zeros(len(pairs)), atol=1e-5, rtol=0)
    # the first fusion layer's output alone: the second layer still reads the corrupted image
    assert not torch.allclose(fractions["fusion/text_blocks.0"], ones, atol=1e-2)
    # object patches: the patches the recolouring touched; all of them patched is the whole site, none is nothing
    region = object_patches(clean, corrupted, model.grid)  # (P, N)
    assert region.any(1).all() and not region.all(1).any()
    with torch.no_grad():
        every = restored(trace(model, clean, corrupted, question, site_list, torch.ones_like(region)), answer)
        none = restored(trace(model, clean, corrupted, question, site_list, torch.zeros_like(region)), answer)
    for name in ("fusion/input", "image/blocks.0"):
        torch.testing.assert_close(every[f"{name} (object patches)"], ones, atol=1e-5, rtol=0)
        torch.testing.assert_close(none[f"{name} (object patches)"], torch.zeros(len(pairs)), atol=1e-5, rtol=0)
    assert "fusion/text_blocks.0 (object patches)" not in every  # the question stream has no patches
    site = site_list[-1]
    with pytest.raises(RuntimeError, match="boom"), patching(site, torch.zeros(1)):
        raise RuntimeError("boom")
    assert not site.module._forward_hooks and not model.fusion._forward_pre_hooks  # restored on error too


def test_patching_needs_fusion_layers_and_the_shapes_world(bundle):
    late = SimpleNamespace(fusion=LateFusion(8, 2.0, 0.0), image_encoder=bundle.model.image_encoder)
    with pytest.raises(InspectError, match="LateFusion has no layers to read.*activation patching needs model/fusion=cross or early"):
        sites(late)
    with pytest.raises(InspectError, match="recolours objects of the shapes world.*valid: data=shapes, data=shapes_relational"):
        world_pairs(SimpleNamespace(reader=object()), "test", 4, seed=0)


def test_inspect_cli_writes_the_decoder_lens_and_one_patching_row_per_site(bundle, data_dir, tmp_path):
    path = "bundle=" + str(data_dir.parent / "demo-cross" / "bundle")
    inspect(compose_cfg(data_dir, tmp_path / "lens", [path, "task=lens", "n=10"], config_name="inspect"))
    decoder = list(csv.DictReader((tmp_path / "lens" / "decoder_lens.csv").open()))
    assert [int(r["layer"]) for r in decoder] == list(range(len(bundle.model.decoder.gpt2.transformer.h)))
    assert (tmp_path / "lens" / "decoder_lens.png").is_file() and "| layer | next-token accuracy | loss |" in \
        (tmp_path / "lens" / "report.md").read_text()
    written = {p.name for p in inspect(compose_cfg(data_dir, tmp_path / "patch", [path, "task=patching", "pairs=6"],
                                                   config_name="inspect"))}
    assert written == {"patching.csv", "patching.png", "report.md"}
    rows = list(csv.DictReader((tmp_path / "patch" / "patching.csv").open()))
    assert [r["site"] for r in rows] == [n for s in sites(bundle.model)
                                         for n in (s.name, *([f"{s.name} (object patches)"] if s.prefix is not None else []))]
    assert all(int(r["pairs"]) + int(r["skipped"]) == 6 for r in rows)
    assert "6 pairs tried" in (tmp_path / "patch" / "report.md").read_text()
    with pytest.raises(ConfigError, match="task=patching needs pairs >= 1; got pairs=0"):
        inspect(compose_cfg(data_dir, tmp_path / "none", [path, "task=patching", "pairs=0"], config_name="inspect"))
