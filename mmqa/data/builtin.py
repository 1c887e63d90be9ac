"""Readers for the built-in procedural datasets: generate (or reuse the cached copy) on first read,
then read it like any JSONL dataset, so the built-in data takes the same path as users' data."""

from __future__ import annotations

from pathlib import Path

from mmqa.data.readers import JsonlReader
from mmqa.data.records import ImageRecord
from mmqa.data.shapes import generate_shapes


class ShapesReader:
    def __init__(self, root: str | Path, progress: bool = True, **params):
        self.root = Path(root)
        self.progress = progress
        self.params = params  # generate_shapes' keyword arguments, straight from the config
        self._reader: JsonlReader | None = None

    @property
    def dataset_dir(self) -> Path:
        if self._reader is None:
            path = generate_shapes(self.root, progress=self.progress, **self.params)
            self._reader = JsonlReader(path)
        return self._reader.root

    def read(self, split: str) -> list[ImageRecord] | None:
        self.dataset_dir  # generates on first use
        return self._reader.read(split)
