"""Recipes of the built-in dishes world: a title, ingredient lines with quantities and 3–8 steps,
written from varied templates for a dish kind and the ingredients drawn on it.

The text depends on both: the kind gives the base lines (dough, stock, rice, ...) and the frame of
the steps, every drawn ingredient gets one quantity line and usually a preparation fragment, and
titles, quantities, step wordings, the order of the ingredients and where the preparation steps go
are drawn at random, so the same dish gets different recipes. Only drawn ingredients are named:
the base lines use words outside the ingredient vocabulary (no "tomato sauce", "chicken stock" or
"salt and pepper"), which tests/test_dishes.py checks with `mmqa.data.recipe_text.ingredient_names`.
All text is lowercase, like the captions; see `mmqa.data.recipe_text` for the canonical text form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dishes.py imports this module
    from mmqa.data.worlds.dishes import Ingredient

ADJECTIVES = ("easy", "quick", "classic", "simple", "weeknight", "rustic")
PREP = ("prep",)  # where a kind's preparation steps go; see KindRecipe.prep_at
MAX_STEPS = 8


@dataclass(frozen=True)
class KindRecipe:
    """The frame of one kind's recipes. Each inner tuple lists alternative wordings; a step tuple
    whose first item is "?" is optional. Preparation steps go before one of the `prep_at` steps
    (indices into `steps`). `values` fill the {placeholders} of every line, once per recipe."""

    titles: tuple[str, ...]
    base: tuple[tuple[str, ...], ...]
    extras: tuple[str, ...]  # lines each added with probability 1/2
    steps: tuple[tuple[str, ...], ...]
    prep_at: tuple[int, ...]
    values: dict[str, tuple[str, ...]]


KIND_RECIPES = {
    "pizza": KindRecipe(
        titles=("{a} pizza", "{a} and {b} pizza", "homemade {a} pizza", "pizza with {A} and {B}",
                "{adj} {a} pizza", "{adj} {a} and {b} pizza"),
        base=(("1 ball of pizza dough", "250 g pizza dough", "300 g pizza dough"),
              ("4 tbsp pizza sauce", "half a cup of pizza sauce", "3 tbsp pizza sauce")),
        extras=("a drizzle of oil", "a pinch of salt"),
        steps=(("?", "preheat the oven to {temp} degrees", "heat the oven as hot as it will go"),
               ("stretch the dough into a thin round", "roll out the dough on a floured surface",
                "press the dough out into a circle"),
               ("spread the sauce over the base", "cover the dough with a thin layer of sauce"),
               ("scatter the {list} over the top", "arrange the {list} on the sauce", "top with the {list}"),
               ("bake for {mins} minutes until the crust is golden", "bake for about {mins} minutes",
                "slide into the oven and bake for {mins} minutes"),
               ("?", "slice and serve hot", "cut into slices and serve")),
        prep_at=(0, 1, 2, 3),
        values={"temp": ("220", "230", "250"), "mins": ("8", "10", "12", "15")},
    ),
    "salad": KindRecipe(
        titles=("{a} salad", "{a} and {b} salad", "fresh {a} salad", "salad with {A} and {B}",
                "{adj} {a} salad", "{a} and {b} garden salad"),
        base=(("1 head of lettuce", "4 handfuls of mixed leaves", "1 bag of salad leaves"),
              ("2 tbsp oil", "3 tbsp oil"), ("1 tbsp {acid}", "a splash of {acid}")),
        extras=("a pinch of salt", "1 tsp honey"),
        steps=(("wash and dry the leaves", "rinse the salad leaves and pat them dry"),
               ("put the leaves in a large bowl", "arrange the leaves on a plate"),
               ("add the {list}", "scatter the {list} over the leaves", "top the leaves with the {list}"),
               ("whisk the oil and {acid} into a dressing", "shake the oil and {acid} together in a jar"),
               ("toss with the dressing and serve", "drizzle with the dressing and serve at once")),
        prep_at=(0, 1, 2),
        values={"acid": ("vinegar", "lemon juice")},
    ),
    "soup": KindRecipe(
        titles=("{a} soup", "{a} and {b} soup", "hearty {a} soup", "soup with {A} and {B}",
                "{adj} {a} soup", "{a} and {b} broth"),
        base=(("1 litre of stock", "4 cups of stock", "1 l vegetable stock"), ("1 tbsp {fat}", "a little {fat}")),
        extras=("salt to taste", "1 bay leaf"),
        steps=(("heat the {fat} in a large pot", "warm the {fat} in a saucepan"),
               ("pour in the stock and bring to a boil", "add the stock and bring it to a simmer"),
               ("add the {list} and simmer for {mins} minutes", "stir in the {list} and cook for {mins} minutes"),
               ("?", "season with salt", "taste and adjust the seasoning"),
               ("ladle into bowls and serve", "serve hot")),
        prep_at=(0, 1, 2),
        values={"fat": ("oil", "butter"), "mins": ("10", "15", "20", "25")},
    ),
    "sandwich": KindRecipe(
        titles=("{a} sandwich", "{a} and {b} sandwich", "open {a} sandwich", "sandwich with {A} and {B}",
                "{adj} {a} sandwich", "toasted {a} and {b} sandwich"),
        base=(("2 slices of {bread}", "1 thick slice of {bread}"), ("1 tbsp {spread}", "a thin layer of {spread}")),
        extras=("a pinch of salt",),
        steps=(("toast the bread", "lightly toast the bread", "toast the bread until golden"),
               ("spread the {spread} on the bread", "cover the toast with {spread}"),
               ("layer the {list} on the bread", "pile the {list} onto the toast", "arrange the {list} on top"),
               ("?", "season with a pinch of salt", "add a pinch of salt"),
               ("serve open, cut in half", "cut in half and serve", "serve at once")),
        prep_at=(0, 1, 2),
        values={"bread": ("bread", "sourdough", "rye bread"), "spread": ("butter", "mayonnaise", "mustard")},
    ),
    "bowl": KindRecipe(
        titles=("{a} rice bowl", "{a} and {b} bowl", "{a} poke bowl", "rice bowl with {A} and {B}",
                "{adj} {a} bowl", "{a} and {b} rice bowl"),
        base=(("1 cup of {rice}", "200 g {rice}"), ("2 tbsp soy sauce", "1 tbsp soy sauce")),
        extras=("1 tsp sesame oil", "a pinch of sesame seeds"),
        steps=(("cook the {rice} and let it cool a little", "rinse and cook the {rice}"),
               ("spoon the rice into a wide bowl", "press the rice into a bowl"),
               ("arrange the {list} on top of the rice", "top the rice with the {list}",
                "lay the {list} over the rice"),
               ("drizzle with the soy sauce and serve", "spoon the soy sauce over and serve")),
        prep_at=(0, 1, 2),
        values={"rice": ("rice", "sushi rice", "brown rice")},
    ),
}


def join_words(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def write_recipe(kind: str, ingredients: list[Ingredient], rng: random.Random) -> dict:
    """{"title", "ingredients", "steps"} for a dish of `kind` holding `ingredients` (at least one)."""
    spec = KIND_RECIPES[kind]
    values = {k: rng.choice(v) for k, v in spec.values.items()}
    order = rng.sample(ingredients, len(ingredients))
    a, b = order[0], order[-1]
    titles = spec.titles if len(order) > 1 else [t for t in spec.titles if "{b}" not in t and "{B}" not in t]
    title = rng.choice(titles).format(a=a.name, b=b.name, A=a.noun, B=b.noun, adj=rng.choice(ADJECTIVES))
    lines = [rng.choice(alternatives).format(**values) for alternatives in spec.base]
    lines += [rng.choice(i.amounts).format(n=rng.randint(*i.qty)) for i in rng.sample(ingredients, len(ingredients))]
    lines += [line for line in spec.extras if rng.random() < 0.5]
    return {"title": title, "ingredients": lines, "steps": _steps(spec, order, values, rng)}


def _steps(spec: KindRecipe, order: list[Ingredient], values: dict, rng: random.Random) -> list[str]:
    at = rng.choice(spec.prep_at)
    frame = [s for s in (*spec.steps[:at], PREP, *spec.steps[at:]) if s[0] != "?" or rng.random() < 0.5]
    fragments = [rng.choice(i.prep) for i in order if rng.random() < 0.8] or [rng.choice(order[0].prep)]
    # Split the fragments into 1-3 steps, as many as fit under MAX_STEPS.
    n_groups = rng.randint(1, max(1, min(3, len(fragments), MAX_STEPS - len(frame) + 1)))
    cuts = sorted(rng.sample(range(1, len(fragments)), n_groups - 1))
    groups = [fragments[i:j] for i, j in zip([0, *cuts], [*cuts, len(fragments)])]
    words = join_words([i.noun for i in rng.sample(order, len(order))])
    steps: list[str] = []
    for step in frame:
        if step is PREP:
            # "x and y" reads badly when a fragment has its own "and": then "x, then y".
            steps += [(", then ".join(g) if any(" and " in f for f in g) else join_words(g)) + "." for g in groups]
        else:
            steps.append(rng.choice([s for s in step if s != "?"]).format(list=words, **values) + ".")
    return steps
