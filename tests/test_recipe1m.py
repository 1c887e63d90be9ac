"""Tests for the Recipe1M reader on a small hand-made dataset in the public layout (layer1.json,
layer2.json, det_ingrs.json, images/<partition>/a/b/c/d/<id>), its ingredient normaliser, and that
every bad input names its file and entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mmqa.data.readers.recipe1m import Recipe1MReader, normalise_ingredient
from mmqa.errors import DataError

LAYER1 = [
    {"id": "000018c8a5", "title": "Worlds Best Mac and Cheese", "partition": "train", "url": "http://x/1",
     "ingredients": [{"text": "6 ounces penne"}, {"text": "2 cups Beechers Flagship Cheese Sauce (recipe follows)"},
                     {"text": "1 ounce Cheddar, grated"}, {"text": "  "}],
     "instructions": [{"text": "Preheat the oven to 350 F."}, {"text": "Cook the penne 2 minutes less."}]},
    {"id": "000033e39b", "title": "Dilly Macaroni Salad", "partition": "val", "url": "http://x/2",
     "ingredients": [{"text": "1 c. elbow macaroni"}, {"text": "3 large eggs, hard-boiled"},
                     {"text": "Salt and pepper, to taste"}],
     "instructions": [{"text": "Cook macaroni."}, {"text": "Combine and chill."}]},
    {"id": "00003a70b1", "title": "No Pictures", "partition": "train", "url": "http://x/3",
     "ingredients": [{"text": "1 tsp salt"}], "instructions": [{"text": "Eat."}]},
    {"id": "0000631d90", "title": "Two Photo Stir Fry", "partition": "train", "url": "http://x/4",
     "ingredients": [{"text": "2 tomatoes, diced"}, {"text": "1 lb boneless skinless chicken breasts"}],
     "instructions": [{"text": "Stir fry."}]},
]
LAYER2 = [
    {"id": "000018c8a5", "images": [{"id": "3e233001e2.jpg", "url": "http://i/1.jpg"}]},
    {"id": "000033e39b", "images": [{"id": "7f749987f9.jpg", "url": "http://i/2.jpg"}]},
    {"id": "0000631d90", "images": [{"id": "ab12cd34ef.jpg", "url": "http://i/3.jpg"},
                                    {"id": "ab12ffffff.jpg", "url": "http://i/4.jpg"}]},
]


def image_path(root: Path, partition: str, image_id: str) -> Path:
    return root / "images" / partition / "/".join(image_id[:4]) / image_id


def write(root: Path, name: str, data) -> Path:
    path = root / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    write(tmp_path, "layer1", LAYER1)
    write(tmp_path, "layer2", LAYER2)
    for partition, image_id in (("train", "3e233001e2.jpg"), ("val", "7f749987f9.jpg"),
                                ("train", "ab12cd34ef.jpg"), ("train", "ab12ffffff.jpg")):
        path = image_path(tmp_path, partition, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    return tmp_path


def test_one_record_per_image_with_its_recipe(root):
    reader = Recipe1MReader(root)
    mac, stir_a, stir_b = reader.read("train")  # "No Pictures" has no image: left out
    assert mac.id == "train/3/e/2/3/3e233001e2.jpg"
    assert mac.image == image_path(root.resolve(), "train", "3e233001e2.jpg")
    assert mac.captions == ["Worlds Best Mac and Cheese"]
    assert mac.recipe == {
        "title": "Worlds Best Mac and Cheese",
        "ingredients": ["6 ounces penne", "2 cups Beechers Flagship Cheese Sauce (recipe follows)",
                        "1 ounce Cheddar, grated"],
        "steps": ["Preheat the oven to 350 F.", "Cook the penne 2 minutes less."],
    }
    assert mac.ingredients == ["beechers flagship cheese sauce", "cheddar", "penne"]
    assert mac.questions == [] and "layer2.json: [0] (id '000018c8a5').images[0]" in mac.source
    assert stir_a.recipe is stir_b.recipe and stir_a.ingredients == ["chicken breast", "tomato"]
    assert [r.id for r in (stir_a, stir_b)] == ["train/a/b/1/2/ab12cd34ef.jpg", "train/a/b/1/2/ab12ffffff.jpg"]
    (salad,) = reader.read("val")
    assert salad.ingredients == ["egg", "elbow macaroni", "salt and pepper"]
    assert reader.read("test") is None  # no recipe of that partition
    assert Recipe1MReader(root, splits={"train": "train"}).read("val") is None
    assert len(Recipe1MReader(root, max_images_per_recipe=1).read("train")) == 2


def test_image_root_is_configurable_and_images_can_go_unchecked(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("photos")
    (root / "images").rename(elsewhere / "recipe1m-images")
    with pytest.raises(DataError, match="image not found"):
        Recipe1MReader(root).read("val")
    (salad,) = Recipe1MReader(root, image_root=elsewhere / "recipe1m-images").read("val")
    assert salad.image == elsewhere / "recipe1m-images/val/7/f/7/4/7f749987f9.jpg"
    (salad,) = Recipe1MReader(root, image_root="nowhere", check_images=False).read("val")
    assert salad.image == root.resolve() / "nowhere/val/7/f/7/4/7f749987f9.jpg"


def test_detected_ingredients_replace_the_normalised_lines_when_present(root):
    write(root, "det_ingrs", [
        {"id": "000018c8a5", "ingredients": [{"text": "penne"}, {"text": "cheese sauce"}, {"text": "cheddar"}],
         "valid": [True, True, False]},
    ])
    mac = Recipe1MReader(root).read("train")[0]
    assert mac.ingredients == ["cheese sauce", "penne"]
    assert Recipe1MReader(root, detected_ingredients=False).read("train")[0].ingredients == [
        "beechers flagship cheese sauce", "cheddar", "penne"]


@pytest.mark.parametrize("text, name", [
    ("2 cups all-purpose flour, sifted", "all-purpose flour"),
    ("3 large eggs", "egg"),
    ("salt, to taste", "salt"),
    ("1 (8 ounce) package cream cheese, softened", "cream cheese"),
    ("butter or margarine", "butter"),
    ("2 Tbsp extra virgin olive oil", "olive oil"),
    ("1/2 cup chopped fresh basil leaves", "basil leaf"),
    ("4 tomatoes", "tomato"),
    ("1 1/2", ""),
])
def test_normaliser_strips_quantities_units_and_plurals(text, name):
    assert normalise_ingredient(text) == name


# ----------------------------------------------------------------------------------------- errors


def entry(i: int, **changes) -> dict:
    e = json.loads(json.dumps(LAYER1[i]))
    e.update(changes)
    return {k: v for k, v in e.items() if v is not None}


@pytest.mark.parametrize("layer1, problem", [
    ([LAYER1[0], entry(1, title=None)], r"layer1\.json: \[1\] \(id '000033e39b'\): missing key 'title'"),
    ([LAYER1[0], entry(1, id=None)], r"layer1\.json: \[1\]: missing key 'id'"),
    ([entry(0, partition=3)], r"layer1\.json: \[0\] \(id '000018c8a5'\): 'partition' has the wrong type \(int\)"),
    ([entry(0, ingredients="penne")], r"\[0\] \(id '000018c8a5'\): 'ingredients' has the wrong type \(str\)"),
    ([entry(0, instructions=[{"text": "a"}, {"txt": "b"}])],
     r"layer1\.json: \[0\] \(id '000018c8a5'\)\.instructions\[1\]: missing key 'text'"),
    ([LAYER1[0], LAYER1[1], entry(2, id="000018c8a5")], r"\[2\] \(id '000018c8a5'\): id already used by entry \[0\]"),
    ([LAYER1[0], "oops"], r"layer1\.json: \[1\]: expected a JSON object, got str"),
    ({"recipes": LAYER1}, r"layer1\.json: expected a JSON list of entries, got dict"),
])
def test_layer1_errors_name_the_file_entry_and_problem(root, layer1, problem):
    write(root, "layer1", layer1)
    write(root, "layer2", LAYER2[:1])
    with pytest.raises(DataError, match=problem):
        Recipe1MReader(root).read("train")


@pytest.mark.parametrize("layer2, problem", [
    ([{"id": "000018c8a5", "images": [{"url": "u"}]}],
     r"layer2\.json: \[0\] \(id '000018c8a5'\)\.images\[0\]: missing key 'id'"),
    ([{"id": "ffffffffff", "images": []}],
     r"layer2\.json: \[0\] \(id 'ffffffffff'\): recipe id has no entry in layer1\.json"),
    ([LAYER2[0], LAYER2[0]], r"layer2\.json: \[1\] \(id '000018c8a5'\): recipe id already listed by entry \[0\]"),
    ([{"id": "000018c8a5", "images": [{"id": "../../x.jpg"}]}], r"\.images\[0\]: image id '\.\./\.\./x\.jpg' is not"),
    ([{"id": "000018c8a5", "images": [{"id": "0123456789.jpg"}]}],
     r"layer2\.json: \[0\] \(id '000018c8a5'\)\.images\[0\]: image not found: .*/images/train/0/1/2/3/0123456789\.jpg"),
])
def test_layer2_errors_name_the_file_entry_and_problem(root, layer2, problem):
    write(root, "layer2", layer2)
    with pytest.raises(DataError, match=problem):
        Recipe1MReader(root).read("train")


def test_malformed_or_missing_files_are_named(root):
    path = write(root, "layer1", json.dumps(LAYER1)[:-2])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path.resolve()))}: malformed JSON \("):
        Recipe1MReader(root).read("train")
    path.unlink()
    with pytest.raises(DataError, match=r"no layer1\.json; Recipe1M needs layer1\.json"):
        Recipe1MReader(root).read("train")
    write(root, "layer1", LAYER1)
    write(root, "det_ingrs", [{"id": "000018c8a5", "ingredients": [{"text": "penne"}], "valid": [True, False]}])
    with pytest.raises(DataError, match=r"det_ingrs\.json: \[0\] \(id '000018c8a5'\): 'valid' must be a list of 1"):
        Recipe1MReader(root).read("train")


def test_bad_entries_can_be_skipped_and_reported(root):
    write(root, "layer1", [LAYER1[0], entry(1, title=None), LAYER1[2], LAYER1[3]])
    write(root, "layer2", [LAYER2[0], LAYER2[1], LAYER2[2], {"id": "000018c8a5", "images": []}])
    (image_path(root, "train", "ab12ffffff.jpg")).unlink()
    bad = []
    records = Recipe1MReader(root).read("train", on_bad=lambda where, e: bad.append(str(e)))
    assert [r.id for r in records] == ["train/3/e/2/3/3e233001e2.jpg", "train/a/b/1/2/ab12cd34ef.jpg"]
    assert [re.sub(r"^.*?\.json: ", "", b).split(":")[0] for b in bad] == [
        "[1] (id '000033e39b')", "[1] (id '000033e39b')", "[3] (id '000018c8a5')", "[2] (id '0000631d90').images[1]"]
