"""What every dataset reader shares: the reader contract (`DatasetReader`), the `OnBad` callback of
`data.on_bad_sample=skip`, the checks each format runs on its files (root folder, JSON, typed fields,
images by stat), and `split_by_image`, which holds out a validation set when a dataset has none.

Every reader is built from a root folder (so Hydra can instantiate it with `_target_`) and
`read(split, on_bad=None)` returns the split's records, or None when the dataset has no such split;
bad data raises `DataError` naming the file, the line or entry, and the problem. Given an `on_bad`
callback, a problem confined to one sample (a line, an entry) is handed to it and that sample dropped
instead; problems with a whole file always raise. One file per format beside this one, mirroring
`conf/data/reader/`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mmqa.data.records import ImageRecord
from mmqa.errors import ConfigError, DataError

# With data.on_bad_sample=skip, receives (where, error) for each sample that is dropped; `where` is
# "file:line" or "file: entry[i]", and the error's message starts with it.
OnBad = Callable[[str, DataError], None]
SKIP_HINT = "data.on_bad_sample=skip"  # named in every error of one sample, so the user knows how to go on


class DatasetReader(Protocol):
    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None: ...


def type_name(value: Any) -> str:
    return type(value).__name__


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def root_dir(root: str | Path) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"dataset root not found: {path}")
    return path


def add_unique(target: list[str], items: list[str]) -> None:
    """Append the items not yet in `target`, keeping their order."""
    for item in items:
        if item not in target:
            target.append(item)


class SplitMapReader:
    """A reader of an official layout whose files are named after the dataset's own splits:
    `splits` maps mmqa's split names (train, val, test) to those (train2014, val2017, ...)."""

    DEFAULT_SPLITS: dict[str, str] = {}

    def __init__(self, root: str | Path, splits: Mapping[str, str] | None = None, check_images: bool = True) -> None:
        self.root = Path(root)
        self.splits = dict(self.DEFAULT_SPLITS if splits is None else splits)
        self.check_images = check_images

    def located(self, split: str) -> tuple[Path, str] | None:
        """(the checked root folder, the dataset's name of `split`), or None for a split not mapped."""
        root = root_dir(self.root)
        return (root, self.splits[split]) if split in self.splits else None


class ImageChecker:
    """Checks each distinct image once, by stat alone: opening every image would cost minutes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: set[Path] = set()

    def __call__(self, path: Path, where: str) -> None:
        if self.enabled and path not in self.seen:
            if not path.is_file():
                raise DataError(f"{where}: image not found: {path}")
            self.seen.add(path)


class Samples:
    """Runs the handling of each sample (a line, an entry), which changes nothing until all of its
    checks pass: a `DataError` in it goes to `on_bad`, and the sample is dropped and counted, when
    there is an `on_bad`; otherwise it stops the read, its message naming the option that skips."""

    def __init__(self, on_bad: OnBad | None) -> None:
        self.on_bad = on_bad
        self.dropped = 0

    @contextmanager
    def one(self, where: str):
        try:
            yield
        except DataError as e:
            if self.on_bad is None:
                if SKIP_HINT in str(e):
                    raise
                raise DataError(f"{e}; {SKIP_HINT} drops such samples and goes on") from None
            self.dropped += 1
            self.on_bad(where, e)


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def entries(data: Any, key: str, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a list under '{key}'")
    return data[key]


def field(entry: Any, key: str, kind: type, where: str) -> Any:
    """entry[key], checked to be of `kind`; `where` names the entry, e.g. "file: annotations[12]"."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(entry)}")
    if key not in entry:
        raise DataError(f"{where}: missing key '{key}'")
    value = entry[key]
    # bool is an int in Python, but never a valid id.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' has the wrong type ({type_name(value)})")
    return value


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
