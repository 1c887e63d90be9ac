"""Official VQAv2: the questions and annotations JSON files with the COCO images."""

from __future__ import annotations

from mmqa.data.readers.base import ImageChecker, OnBad, Samples, SplitMapReader, entries, field, load_json
from mmqa.data.records import QA, ImageRecord
from mmqa.errors import DataError


class VQAv2Reader(SplitMapReader):
    """Official VQAv2: `v2_OpenEnded_mscoco_<name>_questions.json`, `v2_mscoco_<name>_annotations.json`
    and the COCO images `<name>/COCO_<name>_<image_id:012d>.jpg`, all under `root`.

    `splits` maps our split names to VQAv2's (train2014, val2014). Each QA keeps all annotators'
    answers (10), the answer type as its family, and question_id, question_type and
    multiple_choice_answer in `extra`.
    """

    DEFAULT_SPLITS = {"train": "train2014", "val": "val2014"}

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        if (found := self.located(split)) is None:
            return None
        root, name = found
        q_path = root / f"v2_OpenEnded_mscoco_{name}_questions.json"
        a_path = root / f"v2_mscoco_{name}_annotations.json"
        if not q_path.is_file() and not a_path.is_file():
            return None
        # One file alone is a broken download (or test2015, which has no answers to train on).
        for have, lack in ((q_path, a_path), (a_path, q_path)):
            if have.is_file() and not lack.is_file():
                raise DataError(f"found {have} but not {lack}; VQAv2 needs both files for a split")

        samples = Samples(on_bad)
        annotations: dict[int, tuple[int, dict]] = {}  # question_id -> (index, annotation)
        for i, ann in enumerate(entries(load_json(a_path), "annotations", a_path)):
            where = f"{a_path}: annotations[{i}]"
            with samples.one(where):
                qid = field(ann, "question_id", int, where)
                raw_answers = field(ann, "answers", list, where)
                if not raw_answers:
                    raise DataError(f"{where}: 'answers' is empty")
                for k, a in enumerate(raw_answers):
                    field(a, "answer", str, f"{where}.answers[{k}]")
                field(ann, "image_id", int, where)
                field(ann, "answer_type", str, where)
                field(ann, "question_type", str, where)
                if qid in annotations:
                    raise DataError(f"{where}: question_id {qid} already annotated at annotations[{annotations[qid][0]}]")
                annotations[qid] = (i, ann)

        check = ImageChecker(self.check_images)
        records: dict[int, ImageRecord] = {}
        seen_questions: dict[int, int] = {}  # question_id -> index in the questions file
        for i, q in enumerate(entries(load_json(q_path), "questions", q_path)):
            where = f"{q_path}: questions[{i}]"
            with samples.one(where):
                qid = field(q, "question_id", int, where)
                image_id = field(q, "image_id", int, where)
                text = field(q, "question", str, where)
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
