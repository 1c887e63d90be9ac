"""Noise on training questions, so that a model learns to answer through words it does not know.

People ask in words a dataset never used ("tell me", "visible", "count the ..."). To a fitted
tokenizer such a word is unknown and falls apart into letters; a model that never saw that in
training reads it as a different question. `QuestionNoise` shows it the case on purpose: some words
of a training question become made-up words (spelt out in letters the same way), and a made-up word
is sometimes slipped in, so the question's own words carry the answer wherever they stand. Only
training batches are changed; evaluation and serving read questions as they are. A question may
also be rotated (its tail moved to the front: "is the circle small or large" -> "small or large is
the circle"), so that the order of its words matters less: people put the question word last ("the
square has what shape?").
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from mmqa.errors import ConfigError

MADE_UP_LENGTH = (3, 7)  # letters in a made-up word, inclusive


@dataclass(frozen=True)
class QuestionNoise:
    """`replace`: the chance that each word becomes a made-up word; `insert`: the chance that a made-up
    word is inserted at a random place of the question; `rotate`: the chance that the question is cut
    at a random word and its two parts swapped. All 0: the question is left as it is."""

    replace: float = 0.0
    insert: float = 0.0
    rotate: float = 0.0

    def __post_init__(self):
        for key in ("replace", "insert", "rotate"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"data.question_noise.{key} must be in [0, 1), got {getattr(self, key)}")

    @property
    def active(self) -> bool:
        return self.replace > 0 or self.insert > 0 or self.rotate > 0

    def __call__(self, question: str, rng: random.Random) -> str:
        words = [made_up(rng) if rng.random() < self.replace else w for w in question.split()]
        if rng.random() < self.insert:
            words.insert(rng.randint(0, len(words)), made_up(rng))
        if len(words) > 1 and rng.random() < self.rotate:
            cut = rng.randint(1, len(words) - 1)
            words = words[cut:] + words[:cut]
        return " ".join(words)


def made_up(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*MADE_UP_LENGTH)))
