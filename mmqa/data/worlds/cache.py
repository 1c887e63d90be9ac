"""What every built-in procedural dataset shares: the cache it is written through, the checks of
the parameters all generators take, one random stream per split, the files of a split, and the
questions as asked (`Asked`), which the test_paraphrase split rewords with templates training never uses.

A generated dataset lives in `<root>/<prefix>-<hash>/`, where the hash covers the generator's version
and every generation parameter: the same call reuses the folder, any change generates anew. Files
are written into a hidden temporary sibling and renamed into place at the end, so a killed run never
leaves a half dataset under the final name.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmqa.atomic import atomic_dir

SPLITS = ("train", "val", "test")
PARAPHRASE_SPLIT = "test_paraphrase"  # the test questions, each reworded with a held-out template


@dataclass(frozen=True)
class Asked:
    """A question as asked: its wording, answer and family, and the template kind and fields it was
    worded from (each field's wording already picked), so that it can be worded again."""

    question: str
    answer: str
    family: str
    kind: str  # a key of the world's question templates and of its held-out paraphrase templates
    fields: Mapping[str, str]

    def paraphrase(self, templates: Mapping[str, tuple[str, ...]], rng: random.Random) -> str:
        """The same question in one of the held-out `templates` of its kind."""
        return rng.choice(templates[self.kind]).format(**self.fields)


class Paraphrases:
    """The test_paraphrase split of a world: each test question reworded with one of `templates`
    (the world's held-out wordings), drawn from a stream of its own so that the other splits are
    what they were before this split existed."""

    def __init__(self, world: str, params: dict, templates: Mapping[str, tuple[str, ...]]):
        self.rng = random.Random(f"mmqa-{world}:{params['seed']}:{PARAPHRASE_SPLIT}")
        self.templates = templates
        self.rows: list[dict] = []

    def add(self, split: str, image: str, questions: list[Asked]) -> None:
        if split == "test":
            self.rows.extend({"image": image, "question": q.paraphrase(self.templates, self.rng), "answers": [q.answer],
                              "question_type": q.family} for q in questions)

    def write(self, out: Path, stats: dict) -> None:
        """Write the split's file and add its counts to `stats` (the test split's, without captions)."""
        if self.rows:
            with open(out / f"{PARAPHRASE_SPLIT}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.rows)
            stats[PARAPHRASE_SPLIT] = {**stats["test"], "captions": 0}


def cached_dataset(root: str | Path, prefix: str, version: int, params: dict, write: Callable[[Path], None]) -> Path:
    """Return `<root>/<prefix>-<hash>`, calling `write(tmp_dir)` to fill it first if it is absent."""
    digest = hashlib.sha256(json.dumps([version, params], sort_keys=True).encode()).hexdigest()[:10]
    final = Path(root) / f"{prefix}-{digest}"
    if final.is_dir():
        return final
    with atomic_dir(final, replace=False) as tmp:  # another process may finish first: its copy is identical
        write(tmp)
    return final


def common_problems(p: dict, n_caption_templates: int) -> list[str]:
    """What is wrong with the split sizes, image size or captions per image in `p`."""
    problems = []
    if min(p["n_train"], p["n_val"], p["n_test"]) < 0 or p["n_train"] < 1:
        problems.append("n_train must be >= 1 and n_val, n_test >= 0")
    if p["image_size"] < 32:
        problems.append(f"image_size must be >= 32, got {p['image_size']}")
    if not 0 <= p["min_captions"] <= p["max_captions"] <= n_caption_templates:
        problems.append(f"need 0 <= min_captions <= max_captions <= {n_caption_templates}")
    return problems


def progress_bar(world: str, params: dict, progress: bool) -> tqdm:
    total = sum(params[f"n_{split}"] for split in SPLITS)
    return tqdm(total=total, desc=f"generating {world}", unit="img", disable=not progress)


def split_streams(world: str, params: dict) -> Iterator[tuple[str, int, random.Random, np.random.Generator]]:
    """(split, number of images, rng, numpy rng) for each split that has images.

    One stream per split, seeded from the world's name, the seed and the split: val and test stay
    the same when only n_train changes. A split of 0 images is left out, so that no file is
    written and readers report the split as missing, not empty.
    """
    for index, split in enumerate(SPLITS):
        if params[f"n_{split}"] > 0:
            yield (split, params[f"n_{split}"], random.Random(f"mmqa-{world}:{params['seed']}:{split}"),
                   np.random.default_rng([params["seed"], index]))


def write_splits(out: Path, world: str, params: dict, progress: bool, truth_name: str,
                 make_image: Callable[[str, str, random.Random, np.random.Generator], tuple[list[dict], dict]]) -> None:
    """Fill `out` with images/, one <split>.jsonl per split and the ground truth `truth_name`.

    `make_image(split, image, rng, np_rng)` saves the image at out/image (a path such as
    images/train_000000.png: the file name carries the split, so no image is shared) and returns
    its manifest lines and its ground truth, written as one line of `truth_name`.
    """
    (out / "images").mkdir(parents=True)
    bar = progress_bar(world, params, progress)
    with bar, open(out / truth_name, "w", encoding="utf-8") as truth:
        for split, size, rng, np_rng in split_streams(world, params):
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as lines:
                for i in range(size):
                    image = f"images/{split}_{i:06d}.png"
                    rows, facts = make_image(split, image, rng, np_rng)
                    lines.writelines(json.dumps(row) + "\n" for row in rows)
                    truth.write(json.dumps({"image": image, "split": split, **facts}) + "\n")
                    bar.update()
