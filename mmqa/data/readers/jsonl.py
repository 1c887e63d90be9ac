"""The project's JSONL manifest: `<root>/<split>.jsonl`, one JSON object per line (data/README.md).

Repeated questions (the same `question_id`, or else the same question text, about one image) are
read by `repeated_questions`: 'once' keeps an identical repeat once, counts it and says so in one
log line, and stops at a repeat with other answers, a conflict; 'annotators' reads every line as one
more annotator of its question, so the answers of all its lines are pooled (VQA soft scores).
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path

from mmqa.data.readers.base import SKIP_HINT, ImageChecker, OnBad, Samples, add_unique, is_str_list, root_dir, type_name
from mmqa.data.records import QA, ImageRecord
from mmqa.errors import ConfigError, DataError

log = logging.getLogger(__name__)
REPEATED_QUESTIONS = ("once", "annotators")


class JsonlReader:
    """The JSONL manifest: `<root>/<split>.jsonl`, one JSON object per line (see data/README.md)."""

    def __init__(self, root: str | Path, check_images: bool = True, repeated_questions: str = "once") -> None:
        if repeated_questions not in REPEATED_QUESTIONS:
            raise ConfigError(f"data.reader.repeated_questions={repeated_questions!r} is not an option; "
                              f"valid: {', '.join(REPEATED_QUESTIONS)}")
        self.root = Path(root)
        self.check_images = check_images
        self.repeated_questions = repeated_questions

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        root = root_dir(self.root)
        path = root / f"{split}.jsonl"
        if not path.is_file():
            return None
        check = ImageChecker(self.check_images)
        records: dict[str, ImageRecord] = {}
        first_seen: dict[tuple, tuple[int, QA]] = {}  # (image, question identity) -> (line, its QA)
        repeats = 0
        samples = Samples(on_bad)
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
                    earlier = first_seen.get(key)
                    if earlier is not None:
                        self._check_repeat(qa, *earlier, image, where)
                    _merge_image_labels(record, labels, where)
                    if earlier is not None:
                        repeats += 1
                        if self.repeated_questions == "annotators":
                            earlier[1].answers.extend(qa.answers)
                    elif qa is not None:
                        first_seen[key] = (lineno, qa)
                        record.questions.append(qa)
                    add_unique(record.captions, captions)
                    records.setdefault(image, record)
        if repeats:
            done = "each question kept once" if self.repeated_questions == "once" else "their answers added as annotators"
            log.info(f"{path}: {repeats} repeat(s) of an earlier line's question about the same image, {done}")
        if not records:
            why = f"all {samples.dropped} lines are bad" if samples.dropped else "the file is empty"
            raise DataError(f"{path}: no records ({why})")
        return list(records.values())

    def _check_repeat(self, qa: QA, first_line: int, first: QA, image: str, where: str) -> None:
        """A repeat is fine when it is identical, or when every line is an annotator; else a conflict."""
        if self.repeated_questions == "annotators" or (qa.question, qa.answers) == (first.question, first.answers):
            return
        raise DataError(f"{where}: conflicting repeat of line {first_line}: {qa.question!r} about {image} has "
                        f"answers {qa.answers} here and {first.answers} there; data.reader.repeated_questions="
                        f"annotators reads each line as one more annotator, {SKIP_HINT} keeps the first")


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return text.removeprefix("\ufeff") if first else text  # a byte-order mark some editors write


def _question_identity(qa: QA) -> tuple:
    """What makes two lines the same question: its `question_id` when the line has one, else its text."""
    if "question_id" in qa.extra:
        return ("question_id", json.dumps(qa.extra["question_id"]))
    return ("text", qa.question)


def _parse_line(text: str, where: str) -> tuple[str, QA | None, list[str], dict]:
    """Validate one manifest line; return (normalised image path, its question or None, captions,
    the image's other labels from `_image_labels`)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(obj)}")
    if "image" not in obj:
        raise DataError(f"{where}: missing required key 'image'")
    image = obj.pop("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a non-empty string, got {type_name(image)}")
    question, answers = obj.pop("question", None), obj.pop("answers", None)
    captions = obj.pop("captions", [])
    labels = _image_labels(obj, where)
    if question is not None and not (isinstance(question, str) and question.strip()):
        raise DataError(f"{where}: 'question' must be a non-empty string, got {type_name(question)}")
    if answers is not None and not (is_str_list(answers) and answers):
        raise DataError(f"{where}: 'answers' must be a non-empty list of strings, got {type_name(answers)}")
    if question is not None and answers is None:
        raise DataError(f"{where}: 'question' has no 'answers'")
    if answers is not None and question is None:
        raise DataError(f"{where}: 'answers' given without a 'question'")
    if not is_str_list(captions):
        raise DataError(f"{where}: 'captions' must be a list of strings, got {type_name(captions)}")
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
        if not is_str_list(ingredients):
            raise DataError(f"{where}: 'ingredients' must be a list of strings, got {type_name(ingredients)}")
    if "recipe" in obj:
        recipe = labels["recipe"] = obj.pop("recipe")
        if not isinstance(recipe, dict):
            raise DataError(f"{where}: 'recipe' must be an object with 'title', 'ingredients' and 'steps', "
                            f"got {type_name(recipe)}")
        for key, valid, kind in (("title", lambda v: isinstance(v, str), "a string"),
                                 ("ingredients", is_str_list, "a list of strings"),
                                 ("steps", is_str_list, "a list of strings")):
            if key not in recipe:
                raise DataError(f"{where}: 'recipe' is missing key '{key}'")
            if not valid(recipe[key]):
                raise DataError(f"{where}: 'recipe.{key}' must be {kind}, got {type_name(recipe[key])}")
    return labels


def _merge_image_labels(record: ImageRecord, labels: dict, where: str) -> None:
    """An image's ingredients merge across its lines (order kept); its recipe is given once, or
    repeated unchanged. Checks before it changes anything, so a skipped line leaves no trace."""
    recipe = labels.get("recipe")
    if recipe is not None and record.recipe is not None and record.recipe != recipe:
        raise DataError(f"{where}: 'recipe' differs from the one an earlier line gave image {record.id}")
    if recipe is not None:
        record.recipe = recipe
    add_unique(record.ingredients, labels.get("ingredients", []))


def _family(obj: dict, where: str) -> str | None:
    """The question family, from 'question_type' or its alias 'family' (removed from `obj`)."""
    values = {obj.pop(key) for key in ("question_type", "family") if key in obj}
    if len(values) > 1:
        raise DataError(f"{where}: 'question_type' and 'family' disagree: {sorted(map(str, values))}")
    family = values.pop() if values else None
    if family is not None and not isinstance(family, str):
        raise DataError(f"{where}: 'question_type' must be a string, got {type_name(family)}")
    return family
