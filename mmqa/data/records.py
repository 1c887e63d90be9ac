"""The in-memory form every reader produces: one record per image, carrying all of its labels.

Grouping by image lets a batch encode each image once and gather its tokens per question
(see DESIGN.md, "Encode each image once").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QA:
    """One question about an image, with every annotator's answer."""

    question: str
    answers: list[str]  # one entry per annotator; VQAv2 has 10, built-in data 1
    family: str | None = None  # question family / type, used for per-family metrics
    extra: dict = field(default_factory=dict)  # any other keys of the source record, kept as-is


@dataclass
class ImageRecord:
    """One image and all of its labels; any of them may be empty."""

    image: Path  # absolute path of the image file
    id: str  # unique within a dataset (the image path relative to the dataset root by default)
    questions: list[QA] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    source: str = ""  # "file:line" where the record first appeared, for error messages
    ingredients: list[str] = field(default_factory=list)  # ingredient names in the image (a set, as a list)
    recipe: dict | None = None  # {"title": str, "ingredients": [str], "steps": [str]} (mmqa.data.recipe_text)
