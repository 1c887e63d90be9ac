"""Which template of the built-in worlds worded a question. The shapes and dishes worlds write every
question from a template (the training wordings and the held-out ones of `test_paraphrase`), so a
question's template names its phrasing exactly, where its first words may not ("compared with the
red circle, is ..." and "is the red circle bigger compared to ..." are two wordings of one family):
`python -m mmqa breakdown ... --templates`."""

from __future__ import annotations

import re
from functools import cache

from mmqa.data.worlds import dishes, shapes


@cache
def _patterns() -> list[tuple[str, re.Pattern]]:
    templates = {t for source in (shapes.TEMPLATES, shapes.PARAPHRASES, dishes.PARAPHRASES) for ts in source.values() for t in ts}
    templates |= set(dishes.DISH_QUESTIONS) | set(dishes.INGREDIENT_QUESTIONS)
    # most literal text first: "is there {a_desc} in the image?" before "is there {a_desc}?", and
    # "is the {a} {cmp} than the {b}?" before "is the {a} {rel} the {b}?"
    ordered = sorted(templates, key=lambda t: (-len(re.sub(r"{\w+}", "", t)), t))
    return [(t, re.compile(re.sub(r"\\{\w+\\}", ".+", re.escape(t)))) for t in ordered]


def template_of(question: str) -> str | None:
    """The built-in template that `question` is an instance of, or None (a question of other data)."""
    return next((t for t, pattern in _patterns() if pattern.fullmatch(question)), None)
