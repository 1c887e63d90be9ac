"""Dataset readers: turn a dataset on disk into `ImageRecord`s, one per image with all its labels.

Every reader has the same contract (`DatasetReader`): built from a root folder (so Hydra can
instantiate it with `_target_`), `read(split, on_bad=None)` returns the split's records, or None when
the dataset has no such split; bad data raises `DataError` naming the file, the line or entry, and
the problem. Given an `on_bad` callback (`data.on_bad_sample=skip`), a problem confined to one
sample (a line, an entry) is handed to it and that sample dropped instead; problems with a whole
file always raise. Layouts: the project's JSONL manifest (`JsonlReader`, see data/README.md), official
VQAv2 (`VQAv2Reader`) and COCO captions (`CocoCaptionsReader`). `split_by_image` holds out a
validation set when a dataset has none.
"""

from __future__ import annotations

import json
import posixpath
import random
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mmqa.data.records import QA, ImageRecord
from mmqa.errors import ConfigError, DataError


# With data.on_bad_sample=skip, receives (where, error) for each sample that is dropped; `where` is
# "file:line" or "file: entry[i]", and the error's message starts with it.
OnBad = Callable[[str, DataError], None]


class DatasetReader(Protocol):
    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None: ...


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _root_dir(root: str | Path) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"dataset root not found: {path}")
    return path


def _add_unique(target: list[str], items: list[str]) -> None:
    """Append the items not yet in `target`, keeping their order."""
    for item in items:
        if item not in target:
            target.append(item)


class _ImageChecker:
    """Checks each distinct image once, by stat alone: opening every image would cost minutes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: set[Path] = set()

    def __call__(self, path: Path, where: str) -> None:
        if self.enabled and path not in self.seen:
            if not path.is_file():
                raise DataError(f"{where}: image not found: {path}")
            self.seen.add(path)


class _Samples:
    """Runs the handling of each sample (a line, an entry), which changes nothing until all of its
    checks pass: a `DataError` in it goes to `on_bad`, and the sample is dropped and counted, when
    there is an `on_bad`; otherwise it stops the read."""

    def __init__(self, on_bad: OnBad | None) -> None:
        self.on_bad = on_bad
        self.dropped = 0

    @contextmanager
    def one(self, where: str):
        try:
            yield
        except DataError as e:
            if self.on_bad is None:
                raise
            self.dropped += 1
            self.on_bad(where, e)


# ------------------------------------------------------------------------------------------ JSONL


class JsonlReader:
    """The JSONL manifest: `<root>/<split>.jsonl`, one JSON object per line (see data/README.md)."""

    def __init__(self, root: str | Path, check_images: bool = True) -> None:
        self.root = Path(root)
        self.check_images = check_images

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        root = _root_dir(self.root)
        path = root / f"{split}.jsonl"
        if not path.is_file():
            return None
        check = _ImageChecker(self.check_images)
        records: dict[str, ImageRecord] = {}
        first_seen: dict[tuple, int] = {}  # (image, question identity) -> line, to find duplicates
        samples = _Samples(on_bad)
        with open(path, "rb") as f:
            # Bytes in, decoded line by line, so a bad byte is reported with its line number.
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                with samples.one(where):
                    text = _decode_line(raw, where, first=lineno == 1)
                    if not text.strip():
                        continue
                    image, qa, captions, labels = _parse_line(text, where)
                    record = records.get(image)
                    if record is None:
                        check(root / image, where)
                        record = ImageRecord(image=root / image, id=image, source=where)
                    key = (image, *_question_identity(qa)) if qa is not None else None
                    if key in first_seen:
                        raise DataError(f"{where}: duplicate question {qa.question!r} about {image} "
                                        f"(first at line {first_seen[key]})")
                    _merge_image_labels(record, labels, where)
                    if qa is not None:
                        first_seen[key] = lineno
                        record.questions.append(qa)
                    _add_unique(record.captions, captions)
                    records.setdefault(image, record)
        if not records:
            why = f"all {samples.dropped} lines are bad" if samples.dropped else "the file is empty"
            raise DataError(f"{path}: no records ({why})")
        return list(records.values())


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return text.removeprefix("\ufeff") if first else text  # a byte-order mark some editors write


def _question_identity(qa: QA) -> tuple:
    """What makes two lines the same question: its `question_id` when the line has one, else the
    question with its answers (the same question asked again with other answers is more annotators)."""
    if "question_id" in qa.extra:
        return ("question_id", json.dumps(qa.extra["question_id"]))
    return ("text", qa.question, tuple(qa.answers))


def _parse_line(text: str, where: str) -> tuple[str, QA | None, list[str], dict]:
    """Validate one manifest line; return (normalised image path, its question or None, captions,
    the image's other labels from `_image_labels`)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "image" not in obj:
        raise DataError(f"{where}: missing required key 'image'")
    image = obj.pop("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a non-empty string, got {_type_name(image)}")
    question, answers = obj.pop("question", None), obj.pop("answers", None)
    captions = obj.pop("captions", [])
    labels = _image_labels(obj, where)
    if question is not None and not (isinstance(question, str) and question.strip()):
        raise DataError(f"{where}: 'question' must be a non-empty string, got {_type_name(question)}")
    if answers is not None and not (_is_str_list(answers) and answers):
        raise DataError(f"{where}: 'answers' must be a non-empty list of strings, got {_type_name(answers)}")
    if question is not None and answers is None:
        raise DataError(f"{where}: 'question' has no 'answers'")
    if answers is not None and question is None:
        raise DataError(f"{where}: 'answers' given without a 'question'")
    if not _is_str_list(captions):
        raise DataError(f"{where}: 'captions' must be a list of strings, got {_type_name(captions)}")
    if question is None and not captions and not labels:
        raise DataError(f"{where}: a line needs a 'question' with 'answers', or 'captions', or both")
    qa = None
    if question is not None:
        family = _family(obj, where)
        qa = QA(question=question, answers=answers, family=family, extra=obj)  # what is left is extra
    # "./images/a.png" and "images/a.png" are one image.
    return posixpath.normpath(image), qa, captions, labels


def _image_labels(obj: dict, where: str) -> dict:
    """The optional image labels of a line, checked and removed from `obj`: 'ingredients' (a list
    of strings) and 'recipe' (an object with 'title' a string, 'ingredients' and 'steps' lists of
    strings). Returns the keys present."""
    labels = {}
    if "ingredients" in obj:
        ingredients = labels["ingredients"] = obj.pop("ingredients")
        if not _is_str_list(ingredients):
            raise DataError(f"{where}: 'ingredients' must be a list of strings, got {_type_name(ingredients)}")
    if "recipe" in obj:
        recipe = labels["recipe"] = obj.pop("recipe")
        if not isinstance(recipe, dict):
            raise DataError(f"{where}: 'recipe' must be an object with 'title', 'ingredients' and 'steps', "
                            f"got {_type_name(recipe)}")
        for key, valid, kind in (("title", lambda v: isinstance(v, str), "a string"),
                                 ("ingredients", _is_str_list, "a list of strings"),
                                 ("steps", _is_str_list, "a list of strings")):
            if key not in recipe:
                raise DataError(f"{where}: 'recipe' is missing key '{key}'")
            if not valid(recipe[key]):
                raise DataError(f"{where}: 'recipe.{key}' must be {kind}, got {_type_name(recipe[key])}")
    return labels


def _merge_image_labels(record: ImageRecord, labels: dict, where: str) -> None:
    """An image's ingredients merge across its lines (order kept); its recipe is given once, or
    repeated unchanged. Checks before it changes anything, so a skipped line leaves no trace."""
    recipe = labels.get("recipe")
    if recipe is not None and record.recipe is not None and record.recipe != recipe:
        raise DataError(f"{where}: 'recipe' differs from the one an earlier line gave image {record.id}")
    if recipe is not None:
        record.recipe = recipe
    _add_unique(record.ingredients, labels.get("ingredients", []))


def _family(obj: dict, where: str) -> str | None:
    """The question family, from 'question_type' or its alias 'family' (removed from `obj`)."""
    values = {obj.pop(key) for key in ("question_type", "family") if key in obj}
    if len(values) > 1:
        raise DataError(f"{where}: 'question_type' and 'family' disagree: {sorted(map(str, values))}")
    family = values.pop() if values else None
    if family is not None and not isinstance(family, str):
        raise DataError(f"{where}: 'question_type' must be a string, got {_type_name(family)}")
    return family


# ------------------------------------------------------------------------------- official layouts


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _entries(data: Any, key: str, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a list under '{key}'")
    return data[key]


def _field(entry: Any, key: str, kind: type, where: str) -> Any:
    """entry[key], checked to be of `kind`; `where` names the entry, e.g. "file: annotations[12]"."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(entry)}")
    if key not in entry:
        raise DataError(f"{where}: missing key '{key}'")
    value = entry[key]
    # bool is an int in Python, but never a valid id.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' has the wrong type ({_type_name(value)})")
    return value


class VQAv2Reader:
    """Official VQAv2: `v2_OpenEnded_mscoco_<name>_questions.json`, `v2_mscoco_<name>_annotations.json`
    and the COCO images `<name>/COCO_<name>_<image_id:012d>.jpg`, all under `root`.

    `splits` maps our split names to VQAv2's (train2014, val2014). Each QA keeps all annotators'
    answers (10), the answer type as its family, and question_id, question_type and
    multiple_choice_answer in `extra`.
    """

    DEFAULT_SPLITS = {"train": "train2014", "val": "val2014"}

    def __init__(self, root: str | Path, splits: Mapping[str, str] | None = None, check_images: bool = True) -> None:
        self.root = Path(root)
        self.splits = dict(self.DEFAULT_SPLITS if splits is None else splits)
        self.check_images = check_images

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        root = _root_dir(self.root)
        if split not in self.splits:
            return None
        name = self.splits[split]
        q_path = root / f"v2_OpenEnded_mscoco_{name}_questions.json"
        a_path = root / f"v2_mscoco_{name}_annotations.json"
        if not q_path.is_file() and not a_path.is_file():
            return None
        # One file alone is a broken download (or test2015, which has no answers to train on).
        for have, lack in ((q_path, a_path), (a_path, q_path)):
            if have.is_file() and not lack.is_file():
                raise DataError(f"found {have} but not {lack}; VQAv2 needs both files for a split")

        samples = _Samples(on_bad)
        annotations: dict[int, tuple[int, dict]] = {}  # question_id -> (index, annotation)
        for i, ann in enumerate(_entries(_load_json(a_path), "annotations", a_path)):
            where = f"{a_path}: annotations[{i}]"
            with samples.one(where):
                qid = _field(ann, "question_id", int, where)
                raw_answers = _field(ann, "answers", list, where)
                if not raw_answers:
                    raise DataError(f"{where}: 'answers' is empty")
                for k, a in enumerate(raw_answers):
                    _field(a, "answer", str, f"{where}.answers[{k}]")
                _field(ann, "image_id", int, where)
                _field(ann, "answer_type", str, where)
                _field(ann, "question_type", str, where)
                if qid in annotations:
                    raise DataError(f"{where}: question_id {qid} already annotated at annotations[{annotations[qid][0]}]")
                annotations[qid] = (i, ann)

        check = _ImageChecker(self.check_images)
        records: dict[int, ImageRecord] = {}
        seen_questions: dict[int, int] = {}  # question_id -> index in the questions file
        for i, q in enumerate(_entries(_load_json(q_path), "questions", q_path)):
            where = f"{q_path}: questions[{i}]"
            with samples.one(where):
                qid = _field(q, "question_id", int, where)
                image_id = _field(q, "image_id", int, where)
                text = _field(q, "question", str, where)
                if qid in seen_questions:
                    raise DataError(f"{where}: question_id {qid} appears twice (first at questions[{seen_questions[qid]}])")
                if qid not in annotations:
                    raise DataError(f"{where}: question_id {qid} has no annotation in {a_path.name}")
                j, ann = annotations[qid]
                if ann["image_id"] != image_id:
                    raise DataError(f"{a_path}: annotations[{j}]: image_id {ann['image_id']} differs from "
                                    f"image_id {image_id} of question_id {qid} in {q_path.name}")
                record = records.get(image_id)
                if record is None:
                    image = f"{name}/COCO_{name}_{image_id:012d}.jpg"
                    check(root / image, where)
                    record = records[image_id] = ImageRecord(image=root / image, id=image, source=where)
                seen_questions[qid] = i
                record.questions.append(QA(
                    question=text,
                    answers=[a["answer"] for a in ann["answers"]],
                    family=ann["answer_type"],
                    extra={"question_id": qid, "question_type": ann["question_type"],
                           "multiple_choice_answer": ann.get("multiple_choice_answer")},
                ))
        for qid, (j, _) in annotations.items():
            if qid not in seen_questions:
                where = f"{a_path}: annotations[{j}]"
                with samples.one(where):
                    raise DataError(f"{where}: question_id {qid} has no question in {q_path.name}")
        return list(records.values())


class CocoCaptionsReader:
    """COCO captions: `annotations/captions_<name>.json` and the images `<name>/<file_name>` under `root`.

    Records follow the file's "images" order; an image without any caption carries no label and is
    left out. Captions are stripped of surrounding whitespace; duplicates on one image are dropped.
    """

    DEFAULT_SPLITS = {"train": "train2017", "val": "val2017"}

    def __init__(self, root: str | Path, splits: Mapping[str, str] | None = None, check_images: bool = True) -> None:
        self.root = Path(root)
        self.splits = dict(self.DEFAULT_SPLITS if splits is None else splits)
        self.check_images = check_images

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        root = _root_dir(self.root)
        if split not in self.splits:
            return None
        name = self.splits[split]
        path = root / "annotations" / f"captions_{name}.json"
        if not path.is_file():
            return None
        data = _load_json(path)
        samples = _Samples(on_bad)
        images: dict[int, tuple[str, list[str], str]] = {}  # image id -> (file_name, captions, where)
        for i, entry in enumerate(_entries(data, "images", path)):
            where = f"{path}: images[{i}]"
            with samples.one(where):
                image_id = _field(entry, "id", int, where)
                file_name = _field(entry, "file_name", str, where)
                if image_id in images:
                    raise DataError(f"{where}: image id {image_id} appears twice")
                images[image_id] = (file_name, [], where)
        for i, ann in enumerate(_entries(data, "annotations", path)):
            where = f"{path}: annotations[{i}]"
            with samples.one(where):
                image_id = _field(ann, "image_id", int, where)
                caption = _field(ann, "caption", str, where)
                if image_id not in images:
                    raise DataError(f"{where}: image_id {image_id} has no entry in 'images'")
                _add_unique(images[image_id][1], [caption.strip()])

        check = _ImageChecker(self.check_images)
        records = []
        for file_name, captions, where in images.values():
            if not captions:
                continue
            image = f"{name}/{file_name}"
            with samples.one(where):
                check(root / image, where)
                records.append(ImageRecord(image=root / image, id=image, captions=captions, source=where))
        return records


# ----------------------------------------------------------------------------------------- splits


def split_by_image(
    records: list[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out round(len * fraction) images (at least 1), chosen by `seed`: returns (rest, held_out).

    Splitting whole records keeps every question of an image on one side, so no image is seen in
    training and scored in validation. Both parts keep the input order.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"split_by_image: fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise DataError(f"split_by_image: need at least 2 images to hold some out, got {len(records)}")
    n_held = min(len(records) - 1, max(1, round(len(records) * fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    rest = [r for i, r in enumerate(records) if i not in held]
    return rest, [r for i, r in enumerate(records) if i in held]
