"""The recipe task, model side: ingredient metrics against hand-computed values, recipe batches (the
prompt is read but not learnt), batched generation with left-padded prompts and a
batch whose captions end at different steps (no false padding warning), and
`train.py experiment=recipes` end to end (ingredient metrics written, bundle writes a recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_cfg

from mmqa.build import build_experiment
from mmqa.bundle import Bundle
from mmqa.data.recipe_text import parse_recipe
from mmqa.errors import ConfigError
from mmqa.metrics.ingredients import HallucinationRate, IngredientScores, ingredient_scores
from mmqa.recipe_generation import write_recipes

DISHES = [
    "experiment=recipes",
    "data.reader.n_train=32",
    "data.reader.n_val=8",
    "data.reader.n_test=8",
    "data.reader.progress=false",
    "recipe.generation.max_new_tokens=24",
]


def test_ingredient_scores_match_hand_computed_values():
    # dish 1: pred {a, b}, truth {a, c}: tp 1, fp 1, fn 1; dish 2: pred {c}, truth {c}: tp 1
    metric = IngredientScores()
    metric.update(torch.tensor([[1, 1, 0], [0, 0, 1]]), torch.tensor([[1, 0, 1], [0, 0, 1]]))
    got = {k: round(v.item(), 6) for k, v in metric.compute().items()}
    assert got == {"precision": round(2 / 3, 6), "recall": round(2 / 3, 6), "f1": round(4 / 6, 6), "iou": 0.5,
                   "best_f1": round(4 / 6, 6), "best_threshold": 0.5}  # a set scores the same at every threshold
    assert ingredient_scores(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0}
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.ones(2, 3), torch.ones(2, 4))


def test_ingredient_scores_find_the_best_threshold_of_the_grid():
    probs, truth = torch.tensor([[0.9, 0.4, 0.2], [0.1, 0.3, 0.6]]), torch.tensor([[1, 0, 1], [0, 0, 1]])
    metric = IngredientScores(threshold=0.7)
    metric.update(probs, truth)
    got = {k: round(v.item(), 6) for k, v in metric.compute().items()}
    # at 0.7: {0}, {} -> tp 1, fn 2, F1 0.5; at 0.45 to 0.6: {0}, {2} -> tp 2, fn 1, F1 0.8 (0.6 is nearest 0.7);
    # at 0.2: {0, 1, 2}, {1, 2} -> tp 3, fp 2, F1 0.75
    assert (got["f1"], got["recall"], got["best_f1"], got["best_threshold"]) == (0.5, round(1 / 3, 6), 0.8, 0.6)


def test_hallucination_counts_recipes_naming_an_absent_ingredient():
    metric = HallucinationRate()
    metric.update([{"egg"}, {"egg", "ham"}, set()], [{"egg", "tofu"}, {"egg"}, {"corn"}])
    assert metric.compute().item() == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def dish_parts(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("dishes"), tmp_path_factory.mktemp("run")
    cfg = compose_cfg(data, out, DISHES)
    dm, lit = build_experiment(cfg)
    batch = next(iter(dm.loader("train", train=False)))
    return cfg, dm, lit, batch


def test_recipe_batches_teach_the_recipe_not_the_prompt(dish_parts):
    _, dm, lit, batch = dish_parts
    tok = dm.tokenizers[1]
    assert batch.num_recipes == len(batch.images)  # every dish has a recipe
    assert batch.ingredient_targets.shape == (len(batch.images), len(dm.ingredients))
    for r, row in enumerate(batch.r_img_idx.tolist()):
        ids, labels = batch.r_input_ids[r], batch.r_labels[r]
        taught = labels != -100
        first = int(taught.nonzero()[0])
        prompt = tok.decode(ids[1 : first - 1])  # between [BOS] and [SEP]
        assert prompt == "using : " + ", ".join(sorted(batch.ingredients[row]))
        # the taught tokens decode to the whole recipe, exactly (the tokenizer lowercases; so does the world)
        assert parse_recipe(tok.decode(ids[taught], skip_special_tokens=True)) == batch.recipes[row]
        assert taught[batch.r_attention_mask[r] == 0].sum() == 0  # padding is never a label
        hot = {dm.ingredients[j] for j in batch.ingredient_targets[row].nonzero().flatten().tolist()}
        assert hot == set(batch.ingredients[row])


def test_left_padded_batch_generation_matches_one_at_a_time(dish_parts):
    _, dm, lit, batch = dish_parts
    model, tok = lit.model.eval(), dm.tokenizers[1]
    img = model.encode_images(batch.images[:3])
    sets = [["egg"], ["basil", "cheese", "tomato", "olive"], []]  # prompts of different lengths
    together = write_recipes(model, tok, img, sets, max_new_tokens=8, do_sample=False)
    for i, s in enumerate(sets):
        one = type(img)(tokens=img.tokens[i : i + 1], mask=img.mask[i : i + 1], pooled=img.pooled[i : i + 1])
        assert write_recipes(model, tok, one, [s], max_new_tokens=8, do_sample=False) == [together[i]]


def test_a_caption_ending_before_the_others_raises_no_padding_warning(monkeypatch):
    """transformers' `generate` drops an all-ones mask, then GPT-2 warns about the pad tokens it feeds a
    finished row; the decoder filters that one message while it generates (mmqa/models/decoder.py)."""
    import logging

    from mmqa.models import decoder

    dec = decoder.GPT2Decoder(vocab_size=20, context_dim=16, width=32, depth=1, heads=2, max_length=40, dropout=0.0,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0).eval()
    log = logging.getLogger("transformers.modeling_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)

    def run():
        logging.Logger.warning_once.cache_clear()  # transformers warns once a process: start afresh
        seen.clear()
        torch.manual_seed(3)
        return dec.generate(torch.randn(6, 5, 16), torch.full((6, 1), 2), max_new_tokens=24, do_sample=True)

    try:
        out = run()  # (6, 25)
        ended_early = (out[:, -1] == 0).any() and (out[:, -1] != 0).any()
        assert ended_early, "the check needs one row padded after its end and one still writing"
        assert not any(decoder.PAD_WARNING in m for m in seen)
        assert decoder._drop_generate_pad_warning not in log.filters  # only while generating
        monkeypatch.setattr(decoder, "_drop_generate_pad_warning", lambda record: True)  # a filter that keeps all
        run()
        assert any(decoder.PAD_WARNING in m for m in seen)  # without the filter, the same call warns
    finally:
        log.removeHandler(handler)


def test_absent_ingredients_cannot_be_written_in_any_spelling():
    from mmqa.data.tokenizer import train_tokenizer
    from mmqa.recipe_generation import BanAbsentIngredients, spellings

    assert spellings("tomato") == ["tomato", "tomatoes"] and spellings("anchovy") == ["anchovy", "anchovies"]
    tok = train_tokenizer(["tomato tomatoes egg eggs bell pepper bell peppers sour cream cream the"], 100, 1)
    vocab = ["bell pepper", "cream", "egg", "sour cream", "tomato"]
    ban = BanAbsentIngredients(tok, vocab, [["egg"], ["sour cream", "tomato"]], num_beams=2)
    ids = tok.convert_tokens_to_ids
    V = len(tok)
    prefix = torch.tensor([[ids("the")], [ids("bell")], [ids("the")], [ids("bell")]])  # rows 0-1: set 0; 2-3: set 1
    scores = ban(prefix, torch.zeros(4, V))
    banned = {r: {tok.convert_ids_to_tokens(i) for i in (scores[r] == float("-inf")).nonzero().flatten().tolist()}
              for r in range(4)}
    assert banned[0] == {"tomato", "tomatoes", "cream"}  # not "sour": only "sour cream" as a whole is absent
    assert banned[1] == banned[0] | {"pepper", "peppers"}  # after "bell", "pepper" would spell "bell pepper"
    # set 1 has "sour cream": "cream" stays allowed (part of it); "egg" and "bell pepper" are banned
    assert banned[2] == {"egg", "eggs"} and banned[3] == {"egg", "eggs", "pepper", "peppers"}


def test_dishes_without_the_recipe_decoder_length_fail_at_start(tmp_path):
    cfg = compose_cfg(tmp_path / "data", tmp_path / "run", [*DISHES[1:], "data=dishes"])
    with pytest.raises(ConfigError, match=r"data.max_recipe_length=224 exceeds the decoder's 64 positions.*experiment=recipes"):
        build_experiment(cfg)


def test_train_py_experiment_recipes_writes_ingredient_metrics_and_a_recipe_bundle(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [*TINY, *DISHES, f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("ingredient_f1", "ingredient_iou", "ingredient_precision", "ingredient_recall",
                    "recipe_bleu4", "recipe_hallucination"):
            assert 0 <= metrics[f"{split}/{key}"] <= 1, key
        assert metrics[f"{split}/recipe_perplexity"] > 1
        assert metrics[f"{split}/ingredient_best_f1"] >= metrics[f"{split}/ingredient_f1"]
        assert 0 < metrics[f"{split}/ingredient_best_threshold"] < 1
    bundle = Bundle.load(out / "bundle")
    assert bundle.writes_recipes and len(bundle.ingredients) >= 20
    image = next((tmp_path / "data").rglob("test_*.png"))
    recipe = bundle.recipe(image, ingredients=["egg", "tomato"], max_new_tokens=10)
    assert recipe.used == ["egg", "tomato"]
    assert [n for n, _ in recipe.ingredients] == sorted(bundle.ingredients, key=lambda n: -dict(recipe.ingredients)[n])
    assert all(0 <= p <= 1 for _, p in recipe.ingredients)
    assert parse_recipe(recipe.text) == {"title": recipe.title, "ingredients": recipe.lines, "steps": recipe.steps}

    # the demo's Describe tab: the ingredients with their probabilities, then the recipe, streamed
    from gradio_client import handle_file
    from test_demo import client_of, serve

    from mmqa.app import build_demo

    demo = build_demo(bundle)
    client = client_of(serve(demo), tmp_path / "downloads")
    try:
        job = client.submit(handle_file(image), "greedy", 2, 1.0, 50, 1.0, 12, api_name="/recipe")
        shown, text = job.result()
        assert text == bundle.recipe(image, max_new_tokens=12).text
        assert [c["label"] for c in shown["confidences"]] == [n for n, _ in bundle.ingredients_of(image)[:8]]
        steps = [t for _, t in job.outputs()]
        assert steps[-1] == text and all(b.startswith(a.strip()) for a, b in zip(steps, steps[1:]))
    finally:
        client.close()
        demo.close()


def test_ingredient_head_keeps_each_ingredients_best_patch():
    from mmqa.models.heads import PatchSetHead

    head = PatchSetHead(8, 5, 2.0, 0.0).eval()
    tokens, mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool)
    logits = head(tokens, mask)  # (B, I)
    assert logits.shape == (2, 5)
    assert torch.allclose(head(tokens[:, torch.randperm(6)], mask), logits)  # where a patch is does not matter
    per_patch = head.net(tokens)  # (B, N, I)
    assert torch.allclose(logits, per_patch.amax(1))
    mask[:, 0] = False  # a padded patch never counts
    assert torch.allclose(head(tokens, mask), per_patch[:, 1:].amax(1))
