"""Recipe text: the one canonical form a decoder is trained on, parsing it back, and finding which
ingredients of a vocabulary a text names.

A recipe is a dict {"title": str, "ingredients": [str], "steps": [str]}. Its canonical text is

    title: tomato and basil pizza
    ingredients: 1 ball of pizza dough; 3 tomatoes, sliced; a handful of basil
    steps: 1. preheat the oven to 250 degrees. 2. tear the basil. 3. bake for 10 minutes.

Three labelled sections, ingredients apart by ";", steps numbered 1, 2, 3, ... Parsing relies only
on the section labels, ";" and the step numbers, never on line breaks, case or the spaces around
punctuation, so it also reads what a lowercasing word-piece tokenizer decodes ("title : ... ;").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SECTIONS = ("title", "ingredients", "steps")
_SECTION = re.compile(r"\b(title|ingredients|steps)\s*:", re.IGNORECASE)
_STEP_NUMBER = re.compile(r"(?:^|(?<=\s))(\d+)\s*[.)](?=\s|$)")
_WORD = re.compile(r"[a-z]+")
# Plurals that dropping an "s" or "es" would get wrong; singular forms that end in "s".
_IRREGULAR = {"leaves": "leaf", "halves": "half", "loaves": "loaf", "knives": "knife", "mice": "mouse"}
_KEEP = ("ss", "us", "is", "ous")


def _clean(text: str) -> str:
    """One line, single spaces: the separators of the canonical text never appear inside a field."""
    return " ".join(str(text).split())


def format_recipe(recipe: dict) -> str:
    """The canonical text of `recipe` (see the module docstring); whitespace inside fields collapses."""
    ingredients = "; ".join(_clean(i).replace(";", ",") for i in recipe.get("ingredients", []))
    steps = " ".join(f"{k}. {_clean(s)}" for k, s in enumerate(recipe.get("steps", []), start=1))
    return f"title: {_clean(recipe.get('title', ''))}\ningredients: {ingredients}\nsteps: {steps}"


def parse_recipe(text: str) -> dict:
    """{"title", "ingredients", "steps"} read from `text`; never raises.

    A section runs from its label to the next label; a missing section gives "" or []. Steps are
    cut at the numbers 1., 2., 3., ... taken in order, so a number inside a step ("bake for 10
    minutes.") does not start a new one unless it is the next step's number; text before "1." is a
    step of its own.
    """
    text = text if isinstance(text, str) else ""
    marks = list(_SECTION.finditer(text))
    found: dict[str, str] = {}
    for k, m in enumerate(marks):
        name = m.group(1).lower()
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        found.setdefault(name, _clean(text[m.end():end]))  # the first occurrence wins
    ingredients = [_clean(i) for i in found.get("ingredients", "").split(";")]
    return {
        "title": found.get("title", ""),
        "ingredients": [i for i in ingredients if i],
        "steps": _split_steps(found.get("steps", "")),
    }


def _split_steps(text: str) -> list[str]:
    cuts, expected = [], 1
    for m in _STEP_NUMBER.finditer(text):
        if int(m.group(1)) == expected:
            cuts.append(m)
            expected += 1
    pieces = [text[: cuts[0].start()] if cuts else text]
    pieces += [text[m.end(): (cuts[k + 1].start() if k + 1 < len(cuts) else len(text))] for k, m in enumerate(cuts)]
    return [p for p in (_clean(p) for p in pieces) if p]


def recipe_prompt(ingredients: Iterable[str]) -> str:
    """The decoder's prefix before a recipe: the ingredient set to cook with, e.g. "using: basil, tomato".
    Training puts the true set here, generation the predicted one (see mmqa/recipe.py)."""
    return "using: " + ", ".join(sorted(ingredients))


# ------------------------------------------------------------------------------------ ingredients


def singularise(word: str) -> str:
    """An approximate English singular: tomatoes -> tomato, anchovies -> anchovy, peas -> pea.

    Rules, not a dictionary: good enough to match ingredient names, and documented as approximate.
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(_KEEP):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("oes", "ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    return word[:-1]


def _words(text: str) -> list[str]:
    return [singularise(w) for w in _WORD.findall(text.lower())]


def ingredient_names(text: str | Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """The vocabulary entries that `text` (a string, or a list such as a recipe's ingredient lines)
    names, sorted. Matching is by whole words after lowercasing and singularising both sides, so
    "2 ripe tomatoes" names "tomato" and "bell peppers" names "bell pepper"; the longest name wins
    where names overlap ("bell pepper" over "pepper"), and "chickpeas" does not name "pea"."""
    if not isinstance(text, str):
        text = " ; ".join(text)
    names = {tuple(_words(v)): v for v in vocabulary}
    names.pop((), None)
    longest = max(map(len, names), default=0)
    words, found, i = _words(text), set(), 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            if (key := tuple(words[i: i + n])) in names:
                found.add(names[key])
                i += n
                break
        else:
            i += 1
    return sorted(found)
