"""Tests for the built-in shapes world: determinism, caching, splits, question families, captions,
and that what the labels say is what the pixels show."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import read_lines
from PIL import Image

from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.worlds import shapes
from mmqa.data.worlds.shapes import (
    COLOURS,
    DEFAULT_FAMILIES,
    FAMILIES,
    SHAPES,
    SIZES,
    Desc,
    Scene,
    SceneFacts,
    ShapeObject,
    generate_shapes,
)
from mmqa.errors import ConfigError

TINY = dict(n_train=20, n_val=5, n_test=5, image_size=64, min_objects=1, max_objects=5,
            questions_per_image=3, min_captions=2, max_captions=5, seed=0, progress=False)
# Enough questions per family for the balance checks, still about a second to generate.
SMALL = {**TINY, "n_train": 80, "n_val": 12, "n_test": 12, "questions_per_image": 5}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), **SMALL)


def read_scenes(dataset: Path) -> dict[str, Scene]:
    scenes = {}
    for row in read_lines(dataset / "scenes.jsonl"):
        objects = tuple(ShapeObject(**o) for o in row["objects"])
        scenes[row["image"]] = Scene(row["background"], row["style"], objects)
    return scenes


def parse_desc(phrase: str) -> Desc:
    """Invert Desc.text: "large red circle" -> Desc("large", "red", "circle"); plural nouns too."""
    words = phrase.split()
    noun = words.pop()
    singular = {v: k for k, v in shapes.PLURALS.items()}.get(noun, noun)
    size = words.pop(0) if words and words[0] in SIZES else None
    colour = words.pop(0) if words and words[0] in COLOURS else None
    assert not words, phrase
    return Desc(size, colour, None if singular in ("object", "objects") else singular)


def fits(desc: Desc, o: ShapeObject) -> bool:
    said = ((desc.size, o.size), (desc.colour, o.colour), (desc.shape, o.shape))
    return all(want is None or want == got for want, got in said)


def match_template(kind: str, question: str, templates: dict = shapes.TEMPLATES) -> dict[str, str] | None:
    # Longest first: "is there {a_desc}?" would also swallow "is there ... in the image?".
    for template in sorted(templates[kind], key=len, reverse=True):
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"{(\w+)}", r"(?P<\1>.+)", pattern)
        m = re.fullmatch(pattern, question)
        if m:
            return m.groupdict()
    return None


# --------------------------------------------------------------------------------- files, caching


def test_same_parameters_give_identical_bytes_and_another_seed_differs(tmp_path, small):
    again = generate_shapes(tmp_path / "a", **SMALL)
    assert again.name == small.name
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "test_paraphrase.jsonl", "meta.json", "scenes.jsonl",
                 "images/val_000003.png"):
        assert (again / name).read_bytes() == (small / name).read_bytes(), name
    other = generate_shapes(tmp_path / "b", **{**SMALL, "seed": 1})
    assert other.name != small.name
    assert (other / "train.jsonl").read_bytes() != (small / "train.jsonl").read_bytes()


def test_cache_is_reused_and_any_parameter_change_regenerates(tmp_path):
    first = generate_shapes(tmp_path, **TINY)
    mtime = (first / "train.jsonl").stat().st_mtime_ns
    assert generate_shapes(tmp_path, **TINY) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == mtime
    bigger = generate_shapes(tmp_path, **{**TINY, "n_val": 6})
    assert bigger != first and bigger.parent == first.parent
    assert len(read_lines(bigger / "val.jsonl")) == 6 * TINY["questions_per_image"]
    # Both datasets, nothing half-written beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, bigger.name])


def test_an_empty_split_writes_no_file_so_readers_report_it_missing(tmp_path):
    dataset = generate_shapes(tmp_path, **{**TINY, "n_val": 0})
    assert not (dataset / "val.jsonl").exists()
    assert JsonlReader(dataset).read("val") is None
    assert "val" not in json.loads((dataset / "meta.json").read_text())["splits"]


def test_killed_generation_leaves_no_dataset_and_no_temp_dir(tmp_path, monkeypatch):
    calls = []

    def dying_render(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_render(*args)

    real_render = shapes.render_scene
    monkeypatch.setattr(shapes, "render_scene", dying_render)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shapes, "render_scene", real_render)
    done = generate_shapes(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir()] == [done.name]
    assert (done / "meta.json").is_file()


def test_meta_records_parameters_families_and_counts(small):
    meta = json.loads((small / "meta.json").read_text())
    assert meta["params"] == {**{k: v for k, v in SMALL.items() if k != "progress"}, "families": list(DEFAULT_FAMILIES)}
    assert meta["families"] == ["attribute", "existence", "counting", "spatial", "comparison"]
    assert {s: meta["splits"][s]["images"] for s in ("train", "val", "test")} == {"train": 80, "val": 12, "test": 12}
    assert meta["splits"]["train"]["questions"] == 80 * 5
    assert sum(meta["splits"]["val"]["families"].values()) == 12 * 5


def test_invalid_parameters_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="max_objects <= 5"):
        generate_shapes(tmp_path, **{**TINY, "max_objects": 6})
    with pytest.raises(ConfigError, match="max_captions <= 8"):
        generate_shapes(tmp_path, **{**TINY, "max_captions": 9})
    with pytest.raises(ConfigError, match=r"families: \['closest'\] not known; valid: attribute, .*, further"):
        generate_shapes(tmp_path, **{**TINY, "families": ["attribute", "closest"]})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ splits, questions


def test_splits_use_disjoint_images(small):
    by_split = {s: {row["image"] for row in read_lines(small / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [80, 12, 12]
    for split, images in by_split.items():
        assert all(re.fullmatch(rf"images/{split}_\d{{6}}\.png", im) for im in images)
    digests = {s: {hashlib.md5((small / im).read_bytes()).hexdigest() for im in ims} for s, ims in by_split.items()}
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_every_family_in_every_split_with_its_answer_types(small):
    shape_or_yes_no = set(SHAPES) | {"yes", "no"}
    allowed = {
        "attribute": set(COLOURS) | set(SHAPES) | set(SIZES),
        "existence": {"yes", "no"},
        "counting": {"0", "1", "2", "3", "4", "5"},
        "spatial": shape_or_yes_no,
        "comparison": shape_or_yes_no,
    }
    for split in ("train", "val", "test"):
        rows = [r for r in read_lines(small / f"{split}.jsonl") if "question" in r]
        answers = defaultdict(set)
        for r in rows:
            assert len(r["answers"]) == 1 and r["question"].endswith("?") and r["question"].islower()
            answers[r["question_type"]].add(r["answers"][0])
        assert set(answers) == set(allowed), split
        for family, seen in answers.items():
            assert seen <= allowed[family], (split, family, seen - allowed[family])
        per_family = [sum(r["question_type"] == f for r in rows) for f in allowed]
        assert max(per_family) - min(per_family) <= 0.2 * max(per_family), (split, per_family)


def test_yes_no_answers_are_balanced(small):
    rows = [r for s in ("train", "val", "test") for r in read_lines(small / f"{s}.jsonl") if "question" in r]
    for family in ("existence", "spatial", "comparison"):
        yes_no = [r["answers"][0] for r in rows if r["question_type"] == family and r["answers"][0] in ("yes", "no")]
        assert len(yes_no) >= 30, family
        assert 0.35 <= yes_no.count("yes") / len(yes_no) <= 0.65, family


def test_attribute_counting_and_existence_answers_agree_with_the_scene(small):
    scenes = read_scenes(small)
    checked = defaultdict(int)
    for row in read_lines(small / "train.jsonl"):
        if "question" not in row:
            continue
        objects, question, answer = scenes[row["image"]].objects, row["question"], row["answers"][0]
        for kind, attribute in (("colour_of", "colour"), ("shape_of", "shape"), ("size_of", "size")):
            fields = match_template(kind, question) if row["question_type"] == "attribute" else None
            if fields:
                hits = [o for o in objects if fits(parse_desc(fields["ref"]), o)]
                assert len(hits) == 1, question  # the reference is unambiguous
                assert getattr(hits[0], attribute) == answer, question
                checked[kind] += 1
        if row["question_type"] == "counting" and (fields := match_template("count", question)):
            assert answer == str(sum(fits(parse_desc(fields["plural"]), o) for o in objects)), question
            checked["count"] += 1
        if row["question_type"] == "existence" and (fields := match_template("exists", question)):
            desc = parse_desc(fields["a_desc"].split(" ", 1)[1])  # drop the article
            assert answer == ("yes" if any(fits(desc, o) for o in objects) else "no"), question
            checked["exists"] += 1
    assert set(checked) == {"colour_of", "shape_of", "size_of", "count", "exists"}


def test_spatial_shape_questions_have_exactly_one_object_on_that_side(small):
    scenes = read_scenes(small)
    tol = SMALL["image_size"] // 16
    checked = 0
    for row in read_lines(small / "train.jsonl"):
        fields = match_template("shape_beside", row["question"]) if row.get("question_type") == "spatial" else None
        if not fields:
            continue
        objects = scenes[row["image"]].objects
        (ref,) = [o for o in objects if fits(parse_desc(fields["ref"]), o)]
        direction = next(d for d, words in shapes.RELATIONS.items() if fields["rel"] in words)
        side = [o for o in objects if o is not ref and shapes._offset(o, ref, direction) >= tol]
        assert [o.shape for o in side] == row["answers"], row["question"]
        checked += 1
    assert checked >= 5


def answers_by_key(scene: Scene, family: str) -> dict[tuple, set[str]]:
    """What a family would ask of `scene`: candidate key -> its answers (one, when the world is right)."""
    out = defaultdict(set)
    for c in shapes.FAMILY_CANDIDATES[family](SceneFacts.of(scene, 64)):
        out[c.key].add(c.answer)
    return out


# A large red circle on the left, a small blue square 20 px to its right on the same level, a small
# green triangle far off at the top right; tol is 4 px at 64 px.
HAND_BUILT = Scene("gray", "plain", (ShapeObject("circle", "red", "large", 10, 32, 18),
                                     ShapeObject("square", "blue", "small", 30, 32, 10),
                                     ShapeObject("triangle", "green", "small", 54, 10, 10)))


def test_relational_families_answer_hand_built_scenes():
    nearest = answers_by_key(HAND_BUILT, "nearest")
    assert nearest[("nearest", 0, "shape")] == {"square"} and nearest[("nearest", 0, "colour")] == {"blue"}
    assert nearest[("furthest", 0, "shape")] == {"triangle"} and nearest[("furthest", 1, "colour")] == {"green"}
    # from the triangle the circle (49 px) and the square (32 px) are both far: furthest is the circle
    assert nearest[("furthest", 2, "shape")] == {"circle"} and nearest[("nearest", 2, "shape")] == {"square"}
    count = answers_by_key(HAND_BUILT, "count_beside")
    assert count[("count_beside", 0, "right", Desc())] == {"2"}
    assert count[("count_beside", 0, "right", Desc(shape="square"))] == {"1"}
    assert count[("count_beside", 2, "below", Desc(colour="red"))] == {"1"}
    assert count[("count_beside", 2, "left", Desc(shape="cross"))] == {"0"}
    assert ("count_beside", 0, "above", Desc()) not in count  # the square sits level with the circle: not asked
    further = answers_by_key(HAND_BUILT, "further")
    assert further[("further", 0, 2, "left")] == {"circle"} and further[("further", 0, 2, "above")] == {"triangle"}
    assert ("further", 0, 1, "above") not in further  # level: too close to call
    # swapping the circle's and the triangle's places swaps every left/right answer between them
    c, sq, t = HAND_BUILT.objects
    swapped = Scene("gray", "plain", (ShapeObject("circle", "red", "large", 54, 10, 18), sq,
                                      ShapeObject("triangle", "green", "small", 10, 32, 10)))
    assert answers_by_key(swapped, "further")[("further", 0, 2, "left")] == {"triangle"}
    assert answers_by_key(swapped, "count_beside")[("count_beside", 2, "right", Desc())] == {"2"}


def test_relational_world_asks_every_family_in_wordings_that_read_back(tmp_path):
    dataset = generate_shapes(tmp_path, **{**TINY, "families": list(FAMILIES), "questions_per_image": 8})
    rows = [r for r in read_lines(dataset / "train.jsonl") if "question" in r]
    asked = {r["question_type"] for r in rows}
    assert asked == set(FAMILIES)
    kinds = {"nearest": "nearest", "count_beside": "count_beside", "further": "further_which"}
    for r in rows:
        if r["question_type"] in kinds:
            assert match_template(kinds[r["question_type"]], r["question"]), r["question"]
    for r in read_lines(dataset / "test_paraphrase.jsonl"):
        if r["question_type"] in kinds:
            assert match_template(kinds[r["question_type"]], r["question"], shapes.PARAPHRASES), r["question"]


def test_the_default_world_is_what_it_was(small):
    """Pinned bytes: the relational families are asked only when listed, so the default world's
    questions are the ones every earlier result was measured on. Bump GENERATOR_VERSION to change them."""
    digests = [hashlib.md5((small / f"{split}.jsonl").read_bytes()).hexdigest() for split in ("train", "test")]
    assert digests == ["075e50a1b85fcbb247cc171db1892a62", "6725e225321ec5911e5ba9e00bd807ac"]


# ---------------------------------------------------------------------------------- captions, pixels


def test_captions_hold_the_canonical_object_list_in_varied_phrasings(small):
    scenes = read_scenes(small)
    templates_per_image = []
    for split in ("train", "val", "test"):
        first_line_of = {}
        for lineno, row in enumerate(read_lines(small / f"{split}.jsonl")):
            first_line_of.setdefault(row["image"], lineno)
            if "captions" not in row:
                continue
            assert first_line_of[row["image"]] == lineno  # captions sit on the image's first line only
            captions = row["captions"]
            assert 2 <= len(captions) <= 5 and len(set(captions)) == len(captions)
            objects = shapes.describe_objects(scenes[row["image"]])
            background = f"a {scenes[row['image']].background} background"
            for caption in captions:
                assert objects in caption and caption == caption.lower() and not caption.endswith(".")
            templates_per_image.append(frozenset(
                c.replace(objects, "{objects}").replace(background, "a {background} background") for c in captions
            ))
        assert len(first_line_of) == SMALL[f"n_{split}"]
    assert frozenset().union(*templates_per_image) == set(shapes.CAPTION_TEMPLATES)
    assert len(set(templates_per_image)) > len(templates_per_image) / 2  # images differ in phrasing


def test_object_list_is_left_to_right():
    scene = Scene("gray", "plain", (
        ShapeObject("square", "blue", "small", 50, 10, 10),
        ShapeObject("circle", "red", "large", 12, 40, 18),
    ))
    assert shapes.describe_objects(scene) == "a large red circle and a small blue square"


def test_each_object_is_drawn_in_its_colour_at_its_position(small):
    scenes = read_scenes(small)
    assert len(scenes) == 104
    for image, scene in scenes.items():
        with Image.open(small / image) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            pixels = np.asarray(im)
        for o in scene.objects:
            assert tuple(pixels[o.y, o.x]) == COLOURS[o.colour], (image, o)
            assert o.extent == shapes.size_pixels(o.size, 64)


def test_objects_never_overlap(small):
    for scene in read_scenes(small).values():
        assert 1 <= len(scene.objects) <= 5
        for a, b in [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:]]:
            assert shapes._apart(a.x, a.y, a.extent, b, margin=2)


def test_no_background_pixel_comes_near_an_object_colour():
    spread = shapes.NOISE_AMPLITUDE + shapes.GRADIENT_AMPLITUDE
    for bg in shapes.BACKGROUNDS.values():
        for colour in COLOURS.values():
            # Distance from the object colour to the box of colours the background can take.
            gap = np.maximum(np.abs(np.subtract(colour, bg)) - spread, 0)
            assert np.linalg.norm(gap) > 40, (bg, colour)


def test_generated_dataset_reads_back_through_the_jsonl_reader(small):
    meta = json.loads((small / "meta.json").read_text())
    for split in ("train", "val", "test", "test_paraphrase"):
        records = JsonlReader(small).read(split)
        assert len(records) == meta["splits"][split]["images"]
        assert sum(len(r.questions) for r in records) == meta["splits"][split]["questions"]
        assert sum(len(r.captions) for r in records) == meta["splits"][split]["captions"]
        assert {q.family for r in records for q in r.questions} == set(meta["families"])


# ------------------------------------------------------------------------------- test_paraphrase


def test_paraphrase_split_asks_the_test_questions_again_in_wordings_training_never_uses(small):
    test, para = read_lines(small / "test.jsonl"), read_lines(small / "test_paraphrase.jsonl")
    assert len(para) == len(test)
    for t, p in zip(test, para):  # the same image, answer and family, question by question
        assert (p["image"], p["answers"], p["question_type"]) == (t["image"], t["answers"], t["question_type"])
        assert "captions" not in p
    seen = {row["question"] for split in ("train", "val", "test") for row in read_lines(small / f"{split}.jsonl")
            if "question" in row}
    assert not seen & {p["question"] for p in para}
    kinds = list(shapes.TEMPLATES)
    for p in para:  # each in a held-out template (none of which is a training one: the test below)
        assert any(match_template(k, p["question"], shapes.PARAPHRASES) for k in kinds), p["question"]
    templates = set(shapes.PARAPHRASES["colour_of"]) | set(shapes.PARAPHRASES["count"])
    assert any("color" in t for t in templates) and any(t.startswith("count") for t in templates)
    meta = json.loads((small / "meta.json").read_text())["splits"]
    assert meta["test_paraphrase"]["questions"] == len(para) and meta["test_paraphrase"]["images"] == 12


def test_no_training_template_is_a_paraphrase_template():
    assert set(shapes.PARAPHRASES) == set(shapes.TEMPLATES)
    for kind, held_out in shapes.PARAPHRASES.items():
        assert not set(held_out) & {t for ts in shapes.TEMPLATES.values() for t in ts}, kind
        assert len(set(held_out)) == len(held_out) >= 3
