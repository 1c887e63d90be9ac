"""Readers for the built-in procedural datasets: generate (or reuse the cached copy) on first read,
then read it like any JSONL dataset, so the built-in data takes the same path as users' data."""

from __future__ import annotations

from pathlib import Path

from mmqa.data.dishes import generate_dishes
from mmqa.data.readers import JsonlReader, OnBad
from mmqa.data.records import ImageRecord
from mmqa.data.shapes import generate_shapes


class GeneratedReader:
    """A built-in dataset: `generate(root, progress=..., **params)` returns its cached folder."""

    generate = None  # each subclass names its generator

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


class ShapesReader(GeneratedReader):
    """The shapes world (mmqa/data/shapes.py)."""

    generate = generate_shapes


class DishesReader(GeneratedReader):
    """The dishes world with ingredients and recipes (mmqa/data/dishes.py)."""

    generate = generate_dishes
