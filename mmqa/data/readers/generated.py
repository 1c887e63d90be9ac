"""The reader of a built-in procedural dataset: generate it (or reuse the cached copy) on first
read, then read it like any JSONL dataset, so the built-in data takes the same path as users' data.
`shapes.py` and `dishes.py` beside this file name the generator of each world (`mmqa.data.worlds`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mmqa.data.readers.base import OnBad
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.records import ImageRecord


class GeneratedReader:
    """A built-in dataset: `generate(root, progress=..., **params)` returns its cached folder."""

    generate: Callable[..., Path]  # each subclass names its world's generator

    def __init__(self, root: str | Path, progress: bool = True, **params):
        self.root = Path(root)
        self.progress = progress
        self.params = params  # the generator's keyword arguments, straight from the config
        self._reader: JsonlReader | None = None

    @property
    def dataset_dir(self) -> Path:
        if self._reader is None:
            path = type(self).generate(self.root, progress=self.progress, **self.params)
            self._reader = JsonlReader(path)
        return self._reader.root

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        self.dataset_dir  # generates on first use
        return self._reader.read(split, on_bad)
