"""Tests for the built-in dishes world (determinism, caching, splits, every kind and ingredient,
questions, captions, recipes that parse back and name only what is drawn), the recipe text format,
and the JSONL reader's image labels ('ingredients', 'recipe')."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import read_lines
from PIL import Image

from mmqa.data.readers.dishes import DishesReader
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.recipe_text import format_recipe, ingredient_names, parse_recipe, singularise
from mmqa.data.worlds.cache import cached_dataset
from mmqa.data.worlds.dish_recipes import KIND_RECIPES, write_recipe
from mmqa.data.worlds import dishes
from mmqa.data.worlds.dishes import INGREDIENTS, KINDS, generate_dishes
from mmqa.errors import ConfigError, DataError

TINY = dict(n_train=12, n_val=4, n_test=4, image_size=64, min_ingredients=2, max_ingredients=6,
            questions_per_image=3, min_captions=2, max_captions=3, seed=0, progress=False)
# Enough dishes that every kind and ingredient shows up; about a second to generate.
SMALL = {**TINY, "n_train": 160, "n_val": 20, "n_test": 20, "questions_per_image": 5}
VOCAB = sorted(INGREDIENTS)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_dishes(tmp_path_factory.mktemp("dishes"), **SMALL)


def truth(dataset: Path) -> dict[str, dict]:
    return {row["image"]: row for row in read_lines(dataset / "dishes.jsonl")}


# --------------------------------------------------------------------------------- files, caching


def test_same_parameters_give_identical_bytes_and_another_seed_differs(tmp_path):
    first, again = generate_dishes(tmp_path / "a", **TINY), generate_dishes(tmp_path / "b", **TINY)
    assert again.name == first.name and again.name.startswith("dishes-")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json", "dishes.jsonl", "images/val_000003.png"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    other = generate_dishes(tmp_path / "c", **{**TINY, "seed": 1})
    assert other.name != first.name
    assert (other / "train.jsonl").read_bytes() != (first / "train.jsonl").read_bytes()


def test_cache_is_reused_and_a_killed_run_leaves_nothing(tmp_path):
    first = generate_dishes(tmp_path / "ok", **TINY)
    mtime = (first / "train.jsonl").stat().st_mtime_ns
    assert generate_dishes(tmp_path / "ok", **TINY) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == mtime

    def dying_write(out: Path) -> None:  # killed half way through the shared cached write
        (out / "images").mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dataset(tmp_path / "killed", "dishes", 1, {"seed": 0}, dying_write)
    assert list((tmp_path / "killed").iterdir()) == []


def test_n_train_leaves_val_and_test_unchanged(tmp_path):
    a = generate_dishes(tmp_path, **TINY)
    b = generate_dishes(tmp_path, **{**TINY, "n_train": 13})
    assert a != b
    assert (a / "test.jsonl").read_bytes() == (b / "test.jsonl").read_bytes()


def test_invalid_parameters_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="max_ingredients <= 6"):
        generate_dishes(tmp_path, **{**TINY, "max_ingredients": 7})
    with pytest.raises(ConfigError, match="max_captions <= 5"):
        generate_dishes(tmp_path, **{**TINY, "max_captions": 6})
    assert list(tmp_path.iterdir()) == []


def test_meta_lists_kinds_ingredients_and_counts(small):
    meta = json.loads((small / "meta.json").read_text())
    assert meta["params"] == {k: v for k, v in SMALL.items() if k != "progress"}
    assert meta["kinds"] == list(KINDS) and meta["ingredients"] == VOCAB and meta["families"] == ["dish", "ingredient"]
    assert {s: meta["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 160, "val": 20, "test": 20}
    assert meta["splits"]["train"]["questions"] == 160 * 5


# ------------------------------------------------------------------------------------ the world


def test_the_world_has_enough_kinds_and_distinct_ingredients():
    assert {"pizza", "salad", "soup", "sandwich", "bowl"} <= set(KINDS) and len(INGREDIENTS) >= 20
    # No two ingredients share both their look and their colour.
    assert len({(i.look, i.colour) for i in INGREDIENTS.values()}) == len(INGREDIENTS)
    assert set().union(*(k.allowed for k in KINDS.values())) == set(INGREDIENTS)
    assert set(KIND_RECIPES) == set(KINDS)


def test_every_kind_and_every_ingredient_appears(small):
    rows = [r for s in ("train", "val", "test") for r in read_lines(small / f"{s}.jsonl") if "ingredients" in r]
    kinds = {t["kind"] for t in truth(small).values()}
    assert kinds == set(KINDS)
    assert {i for r in rows for i in r["ingredients"]} == set(INGREDIENTS)
    for image, t in truth(small).items():
        assert set(p[0] for p in t["pieces"]) <= set(KINDS[t["kind"]].allowed), image
        assert 2 <= len({p[0] for p in t["pieces"]}) <= 6


def test_splits_use_disjoint_images(small):
    paths = {split: [r.image for r in JsonlReader(small).read(split)] for split in ("train", "val", "test")}
    assert {split: len(p) for split, p in paths.items()} == {"train": 160, "val": 20, "test": 20}
    assert all(p.name.startswith(f"{split}_") for split, ps in paths.items() for p in ps)
    everything = [p for ps in paths.values() for p in ps]
    # No two images alike, within a split or across splits.
    assert len({hashlib.md5(p.read_bytes()).hexdigest() for p in everything}) == len(everything)


def test_labels_ride_on_each_images_first_line_and_match_the_drawn_pieces(small):
    truths = truth(small)
    first_line: dict[str, int] = {}
    for lineno, row in enumerate(read_lines(small / "train.jsonl")):
        first_line.setdefault(row["image"], lineno)
        if first_line[row["image"]] != lineno:
            assert not {"captions", "ingredients", "recipe"} & set(row), row
            continue
        assert row["ingredients"] == sorted({p[0] for p in truths[row["image"]]["pieces"]})
        assert 2 <= len(row["captions"]) <= 3


def test_each_piece_is_drawn_where_the_truth_says(small):
    for image, t in list(truth(small).items())[:40]:
        with Image.open(small / image) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            pixels = np.asarray(im).astype(int)
        for name, x, y in t["pieces"]:
            ing = INGREDIENTS[name]
            r = max(1, round(ing.size))
            window = pixels[max(0, round(y) - r): round(y) + r + 1, max(0, round(x) - r): round(x) + r + 1]
            dist = min(np.abs(window - np.array(c)).max(axis=-1).min() for c in (ing.colour, ing.accent))
            assert dist < 40, (image, name, x, y)


# ---------------------------------------------------------------------------- questions, captions


def test_questions_are_answered_by_the_dish(small):
    truths = truth(small)
    nouns = {("an egg" if i.name == "egg" else i.noun): i.name for i in INGREDIENTS.values()}
    answers = defaultdict(list)
    for row in read_lines(small / "train.jsonl"):
        present = {p[0] for p in truths[row["image"]]["pieces"]}
        answer, family = row["answers"][0], row["question_type"]
        assert row["question"].endswith("?") and row["question"].islower()
        if family == "dish":
            assert answer == truths[row["image"]]["kind"]
        else:
            asked = [name for noun, name in nouns.items() if re.search(rf"\b{noun}\b", row["question"])]
            assert len(asked) == 1, row["question"]
            assert answer == ("yes" if asked[0] in present else "no"), row
            assert asked[0] in KINDS[truths[row["image"]]["kind"]].allowed
        answers[family].append(answer)
    assert set(answers["dish"]) == set(KINDS)
    assert 0.4 <= answers["ingredient"].count("yes") / len(answers["ingredient"]) <= 0.6


def test_captions_name_the_ingredients_in_one_canonical_list(small):
    for row in read_lines(small / "train.jsonl"):
        if "captions" in row:
            names = [INGREDIENTS[i].noun for i in row["ingredients"]]
            canonical = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            assert all(canonical in c and c == c.lower() for c in row["captions"]), row["captions"]
            assert len(set(row["captions"])) == len(row["captions"])


# ---------------------------------------------------------------------------------------- recipes


def test_recipes_parse_back_and_name_only_what_is_drawn(small):
    for split in ("train", "val", "test"):
        for record in JsonlReader(small).read(split):
            recipe, present = record.recipe, set(record.ingredients)
            text = format_recipe(recipe)
            assert parse_recipe(text) == recipe, text
            assert 3 <= len(recipe["steps"]) <= 8 and recipe["title"]
            assert set(ingredient_names(text, VOCAB)) <= present, text  # never an ingredient not drawn
            assert ingredient_names(recipe["ingredients"], VOCAB) == sorted(present)  # a line for each


def test_recipe_text_varies_for_one_kind_and_set_of_ingredients():
    ingredients = [INGREDIENTS[n] for n in ("basil", "olive", "tomato")]
    texts = [format_recipe(write_recipe("pizza", ingredients, random.Random(s))) for s in range(30)]
    parsed = [parse_recipe(t) for t in texts]
    assert len(set(texts)) == 30
    assert len({p["title"] for p in parsed}) >= 6
    assert len({tuple(p["steps"]) for p in parsed}) >= 20 and len({len(p["steps"]) for p in parsed}) >= 2
    assert len({tuple(p["ingredients"]) for p in parsed}) >= 20
    # ...and it depends on the kind: the same ingredients make another frame of steps in a salad.
    salad = parse_recipe(format_recipe(write_recipe("salad", ingredients, random.Random(0))))
    assert not any("dough" in s for s in salad["steps"]) and any("dough" in s for s in parsed[0]["steps"])


def test_every_kind_writes_3_to_8_steps_with_every_ingredient(tmp_path):
    rng = random.Random(0)
    for kind in KINDS.values():
        for _ in range(50):
            names = rng.sample(kind.allowed, rng.randint(1, 6))
            recipe = write_recipe(kind.name, [INGREDIENTS[n] for n in names], rng)
            assert 3 <= len(recipe["steps"]) <= 8
            assert ingredient_names(format_recipe(recipe), VOCAB) == sorted(names), recipe
            assert parse_recipe(format_recipe(recipe)) == recipe


# ---------------------------------------------------------------------------------- recipe format


def test_format_is_three_labelled_lines():
    recipe = {"title": "tomato pizza", "ingredients": ["1 pizza base", "2 tomatoes, sliced"],
              "steps": ["slice the tomatoes.", "bake for 10 minutes."]}
    assert format_recipe(recipe) == ("title: tomato pizza\ningredients: 1 pizza base; 2 tomatoes, sliced\n"
                                     "steps: 1. slice the tomatoes. 2. bake for 10 minutes.")


def test_parse_reads_what_a_wordpiece_tokenizer_decodes():
    decoded = ("title : tomato pizza ingredients : 1 pizza base ; 2 tomatoes , sliced "
               "steps : 1 . slice . 2 . bake 10 minutes .")
    assert parse_recipe(decoded) == {"title": "tomato pizza", "ingredients": ["1 pizza base", "2 tomatoes , sliced"],
                                     "steps": ["slice .", "bake 10 minutes ."]}


@pytest.mark.parametrize("text, expected", [
    ("", {"title": "", "ingredients": [], "steps": []}),
    ("garbage garbage", {"title": "", "ingredients": [], "steps": []}),
    ("title: soup", {"title": "soup", "ingredients": [], "steps": []}),
    ("ingredients: ; ;a;; steps:", {"title": "", "ingredients": ["a"], "steps": []}),
    ("steps: stir well 1. boil 3. skip 2. serve",
     {"title": "", "ingredients": [], "steps": ["stir well", "boil 3. skip", "serve"]}),
    ("steps: 1. 2. 3.", {"title": "", "ingredients": [], "steps": []}),
    ("TITLE: a steps: 1. x title: b", {"title": "a", "ingredients": [], "steps": ["x"]}),
    (None, {"title": "", "ingredients": [], "steps": []}),
])
def test_parse_never_raises_and_missing_sections_are_empty(text, expected):
    assert parse_recipe(text) == expected


def test_ingredient_names_match_plurals_whole_words_and_the_longest_name():
    vocab = ["tomato", "pepper", "bell pepper", "pea", "anchovy", "egg", "cheese"]
    text = "2 ripe tomatoes; red bell peppers; black pepper; chickpeas; 4 anchovies; eggplant; peas"
    assert ingredient_names(text, vocab) == ["anchovy", "bell pepper", "pea", "pepper", "tomato"]
    assert ingredient_names(["3 eggs", "cheeses"], vocab) == ["cheese", "egg"]
    assert ingredient_names("", vocab) == [] and ingredient_names("tomato", []) == []
    assert [singularise(w) for w in ("tomatoes", "berries", "leaves", "glass", "hummus", "peas", "dishes")] == [
        "tomato", "berry", "leaf", "glass", "hummus", "pea", "dish"]


# -------------------------------------------------------------------------- the JSONL image labels


def write_manifest(root: Path, rows: list) -> Path:
    (root / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    path = root / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


RECIPE = {"title": "t", "ingredients": ["1 egg"], "steps": ["fry the egg."]}


def test_jsonl_reads_ingredients_and_recipe_as_image_labels(tmp_path):
    write_manifest(tmp_path, [
        {"image": "images/a.png", "question": "q?", "answers": ["yes"], "ingredients": ["egg", "basil"],
         "recipe": RECIPE, "note": 1},
        {"image": "images/a.png", "question": "r?", "answers": ["no"], "ingredients": ["basil", "corn"]},
        {"image": "./images/a.png", "recipe": RECIPE},  # the same recipe again is fine
        {"image": "images/b.png", "ingredients": []},  # a line with only image labels
    ])
    a, b = JsonlReader(tmp_path).read("train")
    assert a.ingredients == ["egg", "basil", "corn"] and a.recipe == RECIPE
    assert a.questions[0].extra == {"note": 1}  # the image labels are not the question's extras
    assert b.ingredients == [] and b.recipe is None and b.questions == [] and b.captions == []


@pytest.mark.parametrize("labels, problem", [
    ({"ingredients": "egg"}, "'ingredients' must be a list of strings, got str"),
    ({"ingredients": ["egg", 3]}, "'ingredients' must be a list of strings, got list"),
    ({"recipe": ["t"]}, "'recipe' must be an object with 'title', 'ingredients' and 'steps', got list"),
    ({"recipe": {"title": "t", "ingredients": []}}, "'recipe' is missing key 'steps'"),
    ({"recipe": {**RECIPE, "title": 5}}, "'recipe.title' must be a string, got int"),
    ({"recipe": {**RECIPE, "steps": "stir"}}, "'recipe.steps' must be a list of strings, got str"),
    ({"recipe": {**RECIPE, "title": "other"}}, "'recipe' differs from the one an earlier line gave image images/a.png"),
])
def test_bad_image_labels_name_file_line_and_key(tmp_path, labels, problem):
    path = write_manifest(tmp_path, [{"image": "images/a.png", "captions": ["x"], "recipe": RECIPE}, "",
                                     {"image": "images/a.png", **labels}])
    with pytest.raises(DataError, match=f"^{re.escape(str(path.resolve()))}:3: {re.escape(problem)}; data\\.on_bad_sample=skip"):
        JsonlReader(tmp_path).read("train")


def test_the_dishes_reader_generates_then_reads_the_jsonl(tmp_path):
    reader = DishesReader(tmp_path, **{k: v for k, v in TINY.items()})
    records = reader.read("train")
    assert reader.dataset_dir.parent == tmp_path and len(records) == TINY["n_train"]
    assert all(r.recipe and r.ingredients and len(r.questions) == 3 for r in records)
    assert {q.family for r in records for q in r.questions} == {"dish", "ingredient"}


def test_paraphrase_split_asks_the_test_questions_again_in_held_out_wordings(small):
    test, para = read_lines(small / "test.jsonl"), read_lines(small / "test_paraphrase.jsonl")
    assert [(p["image"], p["answers"], p["question_type"]) for p in para] == \
        [(t["image"], t["answers"], t["question_type"]) for t in test]
    seen = {row["question"] for split in ("train", "val", "test") for row in read_lines(small / f"{split}.jsonl")
            if "question" in row}
    assert not seen & {p["question"] for p in para}
    assert not set(dishes.PARAPHRASES["dish"]) & set(dishes.DISH_QUESTIONS)
    assert not set(dishes.PARAPHRASES["ingredient"]) & set(dishes.INGREDIENT_QUESTIONS)
    assert json.loads((small / "meta.json").read_text())["splits"]["test_paraphrase"]["questions"] == len(para)
