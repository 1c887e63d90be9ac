"""Tests for the dataset readers (JSONL manifest, VQAv2, COCO captions) and split_by_image, on tiny
hand-made datasets; every bad input must name its file and line (or entry)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from mmqa.data.readers.base import split_by_image
from mmqa.data.readers.coco_captions import CocoCaptionsReader
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.readers.vqav2 import VQAv2Reader
from mmqa.data.records import QA, ImageRecord
from mmqa.errors import ConfigError, DataError


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def write_jsonl(root: Path, split: str, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    path = root / f"{split}.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / "images" / name)
    return tmp_path


# ------------------------------------------------------------------------------------------ JSONL


def test_lines_are_grouped_by_image_with_all_their_labels(root):
    path = write_jsonl(root, "train", [
        {"image": "images/a.png", "question": "what colour?", "answers": ["red", "red", "dark red"],
         "captions": ["a red square"], "question_type": "attribute"},
        {"image": "images/b.png", "captions": ["nothing but b", "b again"]},
        "",
        {"image": "./images/a.png", "question": "how many?", "answers": ["1"], "family": "counting",
         "captions": ["a red square", "one red square"], "annotator": "x", "difficulty": 2},
        {"image": "images/c.png", "question": "is it red?", "answers": ["yes"]},
    ])
    records = JsonlReader(root).read("train")
    assert [r.id for r in records] == ["images/a.png", "images/b.png", "images/c.png"]
    a, b, c = records
    assert a.image == root.resolve() / "images/a.png" and a.source == f"{path.resolve()}:1"
    assert a.captions == ["a red square", "one red square"]  # merged, duplicate dropped, order kept
    assert a.questions == [
        QA("what colour?", ["red", "red", "dark red"], "attribute", {}),
        QA("how many?", ["1"], "counting", {"annotator": "x", "difficulty": 2}),
    ]
    assert b.questions == [] and b.captions == ["nothing but b", "b again"] and b.source.endswith(":2")
    assert c.captions == [] and c.questions == [QA("is it red?", ["yes"], None, {})]
    assert c.source.endswith(":5")  # the blank line still counts


def test_missing_split_file_is_none_and_missing_root_is_an_error(root, tmp_path):
    write_jsonl(root, "train", [{"image": "images/a.png", "captions": ["x"]}])
    assert JsonlReader(root).read("val") is None
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"dataset root not found: {re.escape(str(missing))}"):
        JsonlReader(missing).read("train")


@pytest.mark.parametrize("line, problem", [
    ('{"image": "images/a.png", "captions": ["x"],}',
     r"malformed JSON \(Expecting property name enclosed in double quotes: line 1 column 45\)"),
    ('["images/a.png"]', "expected a JSON object, got list"),
    ('{"question": "q?", "answers": ["a"]}', "missing required key 'image'"),
    ('{"image": 3, "captions": ["x"]}', "'image' must be a non-empty string, got int"),
    ('{"image": "images/a.png", "question": "q?", "answers": "yes"}',
     "'answers' must be a non-empty list of strings, got str"),
    ('{"image": "images/a.png", "question": "q?", "answers": []}',
     "'answers' must be a non-empty list of strings, got list"),
    ('{"image": "images/a.png", "question": "q?"}', "'question' has no 'answers'"),
    ('{"image": "images/a.png", "answers": ["yes"]}', "'answers' given without a 'question'"),
    ('{"image": "images/a.png", "captions": "a red square"}', "'captions' must be a list of strings, got str"),
    ('{"image": "images/a.png"}', "a line needs a 'question' with 'answers', or 'captions', or both"),
    ('{"image": "images/a.png", "question": "q?", "answers": ["a"], "question_type": "x", "family": "y"}',
     r"'question_type' and 'family' disagree: \['x', 'y'\]"),
    ('{"image": "images/nope.png", "captions": ["x"]}', "image not found: .*/images/nope.png"),
])
def test_each_bad_line_names_file_line_and_problem(root, line, problem):
    path = write_jsonl(root, "train", [{"image": "images/a.png", "captions": ["fine"]}, "", line])
    go_on = r"; data\.on_bad_sample=skip drops such samples and goes on"  # the option that lets the user go on
    with pytest.raises(DataError, match=f"^{re.escape(str(path.resolve()))}:3: {problem}{go_on}$"):
        JsonlReader(root).read("train")


def test_invalid_utf8_names_the_line(root):
    path = root / "train.jsonl"
    latin1 = '{"image": "images/b.png", "captions": ["café"]}'.encode("latin-1")
    path.write_bytes(b'{"image": "images/a.png", "captions": ["ok"]}\n' + latin1 + b"\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: line is not valid UTF-8 \(invalid continuation byte"):
        JsonlReader(root).read("train")


def test_image_check_can_be_turned_off_and_empty_files_are_errors(root):
    write_jsonl(root, "train", [{"image": "images/not_yet.png", "captions": ["x"]}])
    (record,) = JsonlReader(root, check_images=False).read("train")
    assert record.image == root.resolve() / "images/not_yet.png"
    write_jsonl(root, "val", ["", "  "])
    with pytest.raises(DataError, match=r"val\.jsonl: no records"):
        JsonlReader(root).read("val")


# ---------------------------------------------------------------------------------------- splits


def records(n: int) -> list[ImageRecord]:
    return [ImageRecord(image=Path(f"/x/{i}.png"), id=f"{i}.png") for i in range(n)]


QA_A = {"image": "images/a.png", "question": "what colour?", "answers": ["red"]}


def test_identical_repeats_load_once_and_are_counted_in_one_log_line(root, caplog):
    caplog.set_level(logging.INFO, logger="mmqa")
    rows = [QA_A, {"image": "images/b.png", "question": "what colour?", "answers": ["blue"]}]  # b: another image
    path = write_jsonl(root, "train", rows + [QA_A] * 5000 + [{**QA_A, "question_id": 7}, {**QA_A, "question_id": 7}])
    a, b = JsonlReader(root).read("train")
    # the 5000 copies are one question; a question_id makes its own identity, repeated once
    assert [(qa.question, qa.answers, qa.extra) for qa in a.questions] == [
        ("what colour?", ["red"], {}), ("what colour?", ["red"], {"question_id": 7})]
    assert [qa.answers for qa in b.questions] == [["blue"]]
    said = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert said == [f"{path.resolve()}: 5001 repeat(s) of an earlier line's question about the same image, "
                    "each question kept once"]


def test_a_repeat_with_other_answers_is_a_conflict_unless_lines_are_annotators(root):
    path = write_jsonl(root, "train", [QA_A, {**QA_A, "answers": ["pink"]}, {**QA_A, "answers": ["red"]}])
    with pytest.raises(DataError, match=re.escape(
            f"{path.resolve()}:2: conflicting repeat of line 1: 'what colour?' about images/a.png has answers "
            "['pink'] here and ['red'] there; data.reader.repeated_questions=annotators reads each line as one "
            "more annotator, data.on_bad_sample=skip keeps the first") + "$"):
        JsonlReader(root).read("train")
    skipped = []
    (a,) = JsonlReader(root).read("train", on_bad=lambda where, e: skipped.append(where))
    assert [qa.answers for qa in a.questions] == [["red"]] and skipped == [f"{path.resolve()}:2"]
    (a,) = JsonlReader(root, repeated_questions="annotators").read("train")
    assert [qa.answers for qa in a.questions] == [["red", "pink", "red"]]  # three annotators of one question
    with pytest.raises(ConfigError, match=r"data\.reader\.repeated_questions='twice' is not an option; valid: once"):
        JsonlReader(root, repeated_questions="twice")


def test_split_by_image_is_seeded_disjoint_and_ordered():
    data = records(20)
    rest, held = split_by_image(data, 0.2, seed=3)
    assert len(held) == 4 and len(rest) == 16
    assert {r.id for r in rest} | {r.id for r in held} == {r.id for r in data}
    assert not {r.id for r in rest} & {r.id for r in held}
    assert [r.id for r in held] == sorted((r.id for r in held), key=lambda s: int(s.split(".")[0]))
    assert split_by_image(data, 0.2, seed=3) == (rest, held)
    assert split_by_image(data, 0.2, seed=4)[1] != held


def test_split_by_image_holds_out_at_least_one_and_checks_its_inputs():
    assert [len(part) for part in split_by_image(records(3), 0.01, seed=0)] == [2, 1]
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\), got 1.5"):
        split_by_image(records(3), 1.5, seed=0)
    with pytest.raises(DataError, match="need at least 2 images"):
        split_by_image(records(1), 0.5, seed=0)


# ----------------------------------------------------------------------------------------- VQAv2


def vqa_image(root: Path, name: str, image_id: int) -> None:
    make_image(root / name / f"COCO_{name}_{image_id:012d}.jpg")


def write_vqa(root: Path, name: str, questions: list[dict], annotations: list[dict]) -> tuple[Path, Path]:
    q_path = root / f"v2_OpenEnded_mscoco_{name}_questions.json"
    a_path = root / f"v2_mscoco_{name}_annotations.json"
    q_path.write_text(json.dumps({"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    a_path.write_text(json.dumps({"data_type": "mscoco", "annotations": annotations}))
    return q_path, a_path


def vqa_annotation(qid: int, image_id: int, answers: list[str], answer_type: str, question_type: str) -> dict:
    return {
        "question_id": qid, "image_id": image_id, "answer_type": answer_type, "question_type": question_type,
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
    }


@pytest.fixture
def vqa_root(tmp_path) -> Path:
    for image_id in (9, 42):
        vqa_image(tmp_path, "val2014", image_id)
    ten_twos = ["2"] * 8 + ["two", "3"]
    write_vqa(tmp_path, "val2014", questions=[
        {"image_id": 42, "question": "Is it red?", "question_id": 420},
        {"image_id": 9, "question": "How many dogs?", "question_id": 90},
        {"image_id": 42, "question": "What is it?", "question_id": 421},
    ], annotations=[
        vqa_annotation(90, 9, ten_twos, "number", "how many"),
        vqa_annotation(420, 42, ["yes"] * 9 + ["no"], "yes/no", "is it"),
        vqa_annotation(421, 42, ["ball"] * 10, "other", "what is"),
    ])
    return tmp_path


def test_vqav2_groups_questions_by_image_with_ten_answers(vqa_root):
    reader = VQAv2Reader(vqa_root, splits={"train": "train2014", "val": "val2014"})
    assert reader.read("train") is None  # files absent
    assert reader.read("test") is None  # not a configured split
    dogs, ball = sorted(reader.read("val"), key=lambda r: r.id)
    assert ball.id == "val2014/COCO_val2014_000000000042.jpg"
    assert ball.image == vqa_root.resolve() / ball.id
    assert [q.question for q in ball.questions] == ["Is it red?", "What is it?"]
    red = ball.questions[0]
    assert red.answers == ["yes"] * 9 + ["no"] and red.family == "yes/no"
    assert red.extra == {"question_id": 420, "question_type": "is it", "multiple_choice_answer": "yes"}
    assert dogs.questions[0].answers == ["2"] * 8 + ["two", "3"] and dogs.questions[0].family == "number"
    assert dogs.captions == [] and "questions[1]" in dogs.source


def test_vqav2_errors_name_the_file_and_entry(vqa_root):
    q_path, a_path = write_vqa(vqa_root, "val2014",
                               questions=[{"image_id": 9, "question": "How many dogs?", "question_id": 90}],
                               annotations=[vqa_annotation(90, 9, ["2"] * 10, "number", "how many"),
                                            vqa_annotation(77, 9, ["1"] * 10, "number", "how many")])
    with pytest.raises(DataError, match=rf"{re.escape(a_path.name)}: annotations\[1\]: question_id 77 has no question"):
        VQAv2Reader(vqa_root).read("val")
    bad = vqa_annotation(90, 9, ["2"] * 10, "number", "how many")
    del bad["answers"][3]["answer"]
    write_vqa(vqa_root, "val2014", questions=[{"image_id": 9, "question": "q?", "question_id": 90}], annotations=[bad])
    with pytest.raises(DataError, match=r"annotations\.json: annotations\[0\]\.answers\[3\]: missing key 'answer'"):
        VQAv2Reader(vqa_root).read("val")
    write_vqa(vqa_root, "val2014", questions=[{"image_id": 5, "question": "q?", "question_id": 50}],
              annotations=[vqa_annotation(50, 5, ["a"] * 10, "other", "what")])
    missing = r"questions\.json: questions\[0\]: image not found: .*COCO_val2014_000000000005\.jpg"
    with pytest.raises(DataError, match=missing):
        VQAv2Reader(vqa_root).read("val")
    a_path.unlink()
    with pytest.raises(DataError, match=f"found {re.escape(str(q_path.resolve()))} but not"):
        VQAv2Reader(vqa_root).read("val")


# ---------------------------------------------------------------------------------- COCO captions


def write_coco(root: Path, name: str, images: list[dict], annotations: list[dict]) -> Path:
    path = root / "annotations" / f"captions_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


@pytest.fixture
def coco_root(tmp_path) -> Path:
    for file_name in ("000000000139.jpg", "000000000285.jpg"):
        make_image(tmp_path / "val2017" / file_name)
    write_coco(tmp_path, "val2017", images=[
        {"id": 285, "file_name": "000000000285.jpg", "height": 8, "width": 8},
        {"id": 139, "file_name": "000000000139.jpg", "height": 8, "width": 8},
        {"id": 1, "file_name": "000000000001.jpg", "height": 8, "width": 8},  # no captions: left out
    ], annotations=[
        {"id": 1, "image_id": 139, "caption": "A living room with a TV. "},
        {"id": 2, "image_id": 285, "caption": "A big brown bear."},
        {"id": 3, "image_id": 139, "caption": "A room with chairs."},
        {"id": 4, "image_id": 139, "caption": "A living room with a TV."},
    ])
    return tmp_path


def test_coco_captions_per_image_in_file_order(coco_root):
    reader = CocoCaptionsReader(coco_root)
    assert reader.read("train") is None
    bear, room = reader.read("val")
    assert (bear.id, room.id) == ("val2017/000000000285.jpg", "val2017/000000000139.jpg")
    assert room.image == coco_root.resolve() / "val2017/000000000139.jpg"
    assert room.captions == ["A living room with a TV.", "A room with chairs."]
    assert bear.captions == ["A big brown bear."] and bear.questions == []


def test_coco_captions_errors_name_the_file_and_entry(coco_root):
    images = [{"id": 139, "file_name": "000000000139.jpg"}]
    write_coco(coco_root, "val2017", images, [{"id": 1, "image_id": 139, "caption": "ok"}, {"id": 2, "image_id": 139}])
    with pytest.raises(DataError, match=r"captions_val2017\.json: annotations\[1\]: missing key 'caption'"):
        CocoCaptionsReader(coco_root).read("val")
    write_coco(coco_root, "val2017", images, [{"id": 1, "image_id": 7, "caption": "lost"}])
    with pytest.raises(DataError, match=r"captions_val2017\.json: annotations\[0\]: image_id 7 has no entry"):
        CocoCaptionsReader(coco_root).read("val")
    path = write_coco(coco_root, "val2017", images, [])
    path.write_text(path.read_text()[:-1])
    with pytest.raises(DataError, match=r"captions_val2017\.json: malformed JSON"):
        CocoCaptionsReader(coco_root).read("val")
