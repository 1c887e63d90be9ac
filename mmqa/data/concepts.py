"""Visual concepts from captions: the words an image's captions use, as a multi-label target.

The concept loss (`loss.concepts`, `mmqa.lit_module`) teaches the image encoder to say, from its
best patch, which of the training captions' most frequent content words an image's captions hold:
multiple-instance learning of visual words from captions (Fang et al., "From Captions to Visual
Concepts and Back", 2015). It gives every patch a direct signal for what objects look like, which
the caption decoder and the VQA fusion only pass back through their attention. This module owns
the words: how captions are split and which function words are never concepts (the vocabulary, the
`data.concept_top_k` words most images use, is `MMQADataModule.concept_vocab`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Function words: they say nothing about what an image shows.
STOPWORDS = frozenset(
    "a an the and or but of on in at to with from by for as is are was were be been being it its "
    "this that these those there here their his her some any each which who what".split()
)
_WORD = re.compile(r"[a-z0-9]+")


def caption_words(captions: Iterable[str]) -> set[str]:
    """The content words of an image's captions, lower-cased: "A red circle, a cat" -> {red, circle, cat}."""
    return {w for c in captions for w in _WORD.findall(c.lower())} - STOPWORDS

