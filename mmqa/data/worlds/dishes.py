"""The built-in procedural "dishes" world: top-down photos of dishes with their ingredients, recipes,
captions and questions.

This module owns the world: the ingredients (their look, colours, sizes, counts and words), the
dish kinds (which ingredients they allow), sampling a dish and rendering it, its questions and
captions, and writing a cached dataset in the JSONL layout that `mmqa.data.readers.jsonl.JsonlReader`
reads (see data/README.md), with each image's `ingredients` and `recipe`, and the test questions reworded
with held-out templates (`PARAPHRASES`) as the test_paraphrase split. The strokes of each
base and look are in `mmqa.data.worlds.dish_drawing`, the recipe text in `mmqa.data.worlds.dish_recipes`.

Every ingredient a label names is drawn in the image (at least one piece, placed so that pieces
barely overlap), so the labels are ground truth for ingredient prediction and for checking that a
generated recipe names nothing absent. Like the shapes world it needs no torch.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmqa.data.worlds.cache import Asked, Paraphrases, cached_dataset, common_problems, write_splits
from mmqa.data.worlds.dish_drawing import BASES, LOOKS
from mmqa.data.worlds.dish_recipes import join_words, write_recipe
from mmqa.errors import ConfigError

# Part of the cache key: bump it whenever the same parameters would produce different files.
GENERATOR_VERSION = 2  # 2: test_paraphrase added; train, val and test are unchanged
SUPERSAMPLE = 4  # drawn at 4x and averaged down: smooth edges that survive at 64 px
REF = 64  # every size below is in pixels of a 64 px image and scales with image_size

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Ingredient:
    """One ingredient: how a piece of it looks and how many are scattered, and how it is named.

    `look` is a key of LOOKS; `size` is a piece's radius at 64 px. `noun` is how a list or a step
    says it ("tomatoes", "basil"); `plural` picks "are"/"is" in questions. `amounts` are recipe
    ingredient lines ("{n}" becomes a number in `qty`), `prep` are preparation step fragments.
    """

    name: str
    noun: str
    plural: bool
    look: str
    colour: RGB
    accent: RGB
    size: float
    count: tuple[int, int]
    amounts: tuple[str, ...]
    prep: tuple[str, ...]
    qty: tuple[int, int] = (2, 4)


def _ing(name, noun, plural, look, colour, accent, size, count, amounts, prep, qty=(2, 4)) -> Ingredient:
    return Ingredient(name, noun, plural, look, colour, accent, size, count, tuple(amounts), tuple(prep), qty)


INGREDIENTS = {i.name: i for i in (
    _ing("tomato", "tomatoes", True, "slice", (215, 30, 30), (255, 140, 120), 4.2, (2, 4),
         ["{n} tomatoes, sliced", "{n} ripe tomatoes", "a handful of cherry tomatoes"],
         ["slice the tomatoes", "cut the tomatoes into rounds"]),
    _ing("basil", "basil", False, "leaf", (25, 115, 40), (10, 70, 20), 4.0, (3, 5),
         ["a handful of basil leaves", "{n} sprigs of basil", "a small bunch of basil"],
         ["tear the basil leaves", "pick the basil leaves"]),
    _ing("olive", "olives", True, "ring", (20, 20, 20), (20, 20, 20), 3.0, (3, 5),
         ["a handful of olives", "{n} tbsp sliced olives", "12 black olives"],
         ["halve the olives", "slice the olives"]),
    _ing("mushroom", "mushrooms", True, "cap", (190, 165, 140), (105, 80, 60), 4.0, (2, 4),
         ["{n} mushrooms, sliced", "100 g mushrooms", "a handful of button mushrooms"],
         ["slice the mushrooms", "wipe and slice the mushrooms"]),
    _ing("cheese", "cheese", False, "cube", (255, 190, 0), (190, 120, 0), 2.4, (3, 5),
         ["100 g cheese, cubed", "a small block of cheese", "{n} slices of cheese"],
         ["cut the cheese into cubes", "dice the cheese"]),
    _ing("egg", "egg", False, "egg", (252, 252, 248), (255, 175, 0), 6.0, (1, 1),
         ["1 egg", "1 large egg", "1 free-range egg"],
         ["fry the egg", "poach the egg"]),
    _ing("shrimp", "shrimp", True, "arc", (250, 125, 110), (200, 70, 60), 4.0, (2, 3),
         ["200 g shrimp, peeled", "a dozen shrimp", "{n} handfuls of shrimp"],
         ["peel the shrimp", "cook the shrimp until pink"]),
    _ing("corn", "corn", False, "dot", (255, 225, 30), (200, 160, 0), 1.4, (6, 10),
         ["half a cup of corn", "{n} tbsp corn kernels", "1 small can of corn"],
         ["drain the corn", "warm the corn"]),
    _ing("bell pepper", "bell pepper", False, "strip", (40, 190, 50), (20, 110, 30), 4.5, (2, 4),
         ["1 green bell pepper, cut into strips", "half a bell pepper", "1 small bell pepper"],
         ["cut the bell pepper into strips", "slice the bell pepper"]),
    _ing("onion", "onion", False, "ring", (160, 60, 170), (235, 200, 240), 3.8, (2, 3),
         ["1 red onion, sliced into rings", "half an onion", "1 small onion"],
         ["slice the onion into rings", "cut the onion into thin rings"]),
    _ing("cucumber", "cucumber", False, "slice", (20, 95, 35), (205, 240, 170), 4.2, (2, 4),
         ["1 cucumber, sliced", "half a cucumber", "1 small cucumber"],
         ["slice the cucumber", "cut the cucumber into rounds"]),
    _ing("carrot", "carrots", True, "strip", (255, 120, 0), (190, 80, 0), 3.6, (3, 5),
         ["{n} carrots, cut into sticks", "{n} large carrots", "{n} small carrots"],
         ["cut the carrots into sticks", "peel the carrots and cut them into batons"]),
    _ing("ham", "ham", False, "slab", (245, 160, 175), (255, 215, 220), 4.5, (1, 2),
         ["{n} slices of ham", "100 g ham", "a thick slice of ham"],
         ["cut the ham into squares", "slice the ham"]),
    _ing("chicken", "chicken", False, "chunk", (205, 145, 70), (150, 95, 35), 3.4, (2, 4),
         ["1 chicken breast", "200 g cooked chicken", "{n} chicken thighs"],
         ["cook the chicken and cut it into pieces", "grill the chicken and chop it"]),
    _ing("beef", "beef", False, "chunk", (105, 50, 30), (60, 25, 15), 3.4, (2, 4),
         ["150 g beef, thinly sliced", "1 beef steak", "a handful of beef strips"],
         ["sear the beef and cut it into chunks", "brown the beef in a hot pan"]),
    _ing("avocado", "avocado", False, "crescent", (195, 225, 100), (50, 100, 30), 4.6, (2, 3),
         ["1 avocado", "half an avocado", "1 ripe avocado, sliced"],
         ["slice the avocado", "halve the avocado and cut it into slices"]),
    _ing("pea", "peas", True, "dot", (100, 215, 60), (40, 130, 30), 1.6, (5, 9),
         ["half a cup of peas", "{n} tbsp frozen peas", "a handful of peas"],
         ["thaw the peas", "blanch the peas"]),
    _ing("noodle", "noodles", True, "wave", (252, 238, 170), (170, 140, 70), 7.0, (2, 4),
         ["100 g noodles", "1 nest of noodles", "{n} handfuls of noodles"],
         ["cook the noodles", "soak the noodles in hot water"]),
    _ing("tofu", "tofu", False, "cube", (248, 244, 225), (135, 130, 115), 2.8, (2, 4),
         ["200 g firm tofu", "1 block of tofu", "half a block of tofu"],
         ["press the tofu and cut it into cubes", "cube the tofu"]),
    _ing("bean", "beans", True, "bean", (130, 20, 45), (70, 5, 20), 2.2, (4, 7),
         ["1 can of kidney beans", "half a cup of beans", "{n} tbsp red beans"],
         ["rinse the beans", "drain and rinse the beans"]),
    _ing("scallion", "scallions", True, "ring", (120, 210, 80), (120, 210, 80), 2.2, (4, 7),
         ["{n} scallions", "1 bunch of scallions", "a few scallions, sliced"],
         ["slice the scallions", "chop the scallions"]),
    _ing("anchovy", "anchovies", True, "strip", (150, 155, 170), (90, 90, 105), 4.5, (2, 3),
         ["{n} anchovies", "1 small tin of anchovies", "{n} anchovy fillets"],
         ["drain the anchovies", "halve the anchovies"], qty=(4, 8)),
    _ing("salmon", "salmon", False, "slab", (250, 120, 60), (255, 225, 200), 4.0, (2, 3),
         ["150 g salmon", "1 salmon fillet", "200 g fresh salmon, cubed"],
         ["cut the salmon into cubes", "slice the salmon"]),
    _ing("pineapple", "pineapple", False, "wedge", (250, 215, 60), (150, 115, 10), 3.6, (2, 4),
         ["{n} slices of pineapple", "half a cup of pineapple chunks", "1 small can of pineapple"],
         ["cut the pineapple into wedges", "drain the pineapple"]),
)}


@dataclass(frozen=True)
class DishKind:
    """A kind of dish: the ingredients it may hold and the words for it in questions and captions."""

    name: str
    allowed: tuple[str, ...]
    prep: str  # "on the pizza" / "in the soup"
    phrases: tuple[str, ...]  # caption phrases: "a bowl of soup", ...


KINDS = {k.name: k for k in (
    DishKind("pizza", ("tomato", "basil", "olive", "mushroom", "cheese", "bell pepper", "onion", "ham",
                       "pineapple", "anchovy", "corn", "egg", "chicken", "shrimp"),
             "on", ("a pizza", "a homemade pizza", "a round pizza")),
    DishKind("salad", ("tomato", "cucumber", "olive", "onion", "cheese", "egg", "avocado", "corn", "carrot",
                       "chicken", "shrimp", "bean", "anchovy", "tofu"),
             "in", ("a salad", "a plate of salad", "a fresh salad")),
    DishKind("soup", ("mushroom", "carrot", "noodle", "chicken", "pea", "corn", "tofu", "scallion", "egg",
                      "onion", "shrimp", "tomato"),
             "in", ("a bowl of soup", "a soup", "a hot soup")),
    DishKind("sandwich", ("tomato", "cheese", "ham", "egg", "cucumber", "avocado", "onion", "chicken", "beef",
                          "basil", "bell pepper", "salmon"),
             "on", ("a sandwich", "an open sandwich", "a toasted sandwich")),
    DishKind("bowl", ("salmon", "avocado", "cucumber", "egg", "corn", "pea", "carrot", "scallion", "beef",
                      "chicken", "shrimp", "bean", "mushroom"),
             "in", ("a rice bowl", "a bowl of rice", "a poke bowl")),
)}
TABLES = {"wood": (150, 105, 65), "slate": (70, 75, 82), "linen": (215, 205, 185),
          "blue cloth": (80, 110, 160), "green cloth": (70, 120, 90)}
TABLE_STYLES = ("plain", "noise", "grain", "gradient")
TABLE_TEXTURE = 10  # +- per channel for noise, grain and gradient
PHOTO_NOISE = 3.0  # largest standard deviation of the noise over the whole photo
SOUP_RIMS = ((60, 90, 170), (40, 125, 115), (235, 235, 230))  # never a crust-like brown
BOWL_RIMS = ((45, 45, 50), (30, 45, 85), (110, 35, 35))


# ---------------------------------------------------------------------------------------- dishes


@dataclass(frozen=True)
class Piece:
    ingredient: str
    x: float  # centre, in pixels of a 64 px image
    y: float
    angle: float  # radians


@dataclass(frozen=True)
class Dish:
    kind: str
    table: str  # a key of TABLES
    style: str  # one of TABLE_STYLES
    cx: float  # the dish's centre and radius, at 64 px
    cy: float
    radius: float
    rim: RGB  # bowls' rim colour; unused by the other kinds
    pieces: tuple[Piece, ...]

    @property
    def ingredients(self) -> list[str]:
        return sorted({p.ingredient for p in self.pieces})


def sample_dish(rng: random.Random, min_ingredients: int, max_ingredients: int) -> Dish:
    """A random dish: its kind, 2–6 of the kind's ingredients, and where each piece lies."""
    kind = KINDS[rng.choice(tuple(KINDS))]
    chosen = rng.sample(kind.allowed, rng.randint(min_ingredients, max_ingredients))
    cx, cy, radius = REF / 2 + rng.uniform(-3, 3), REF / 2 + rng.uniform(-3, 3), rng.uniform(25.5, 28.5)
    rim = rng.choice(SOUP_RIMS if kind.name == "soup" else BOWL_RIMS)
    inside = _region(kind.name, cx, cy, radius)
    # One piece of every ingredient first, so each is sure to be drawn; then the rest where they fit.
    wanted = chosen + [name for name in chosen for _ in range(rng.randint(*INGREDIENTS[name].count) - 1)]
    placed: list[Piece] = []
    for k, name in enumerate(wanted):
        spot = _find_spot(rng, inside, INGREDIENTS[name].size, placed, must=k < len(chosen))
        if spot is not None:
            placed.append(Piece(name, *spot, rng.uniform(0, 2 * math.pi)))
    return Dish(kind.name, rng.choice(tuple(TABLES)), rng.choice(TABLE_STYLES), cx, cy, radius, rim, tuple(placed))


def _region(kind: str, cx: float, cy: float, radius: float) -> tuple:
    """Where ingredients may lie: ("circle", cx, cy, r) or ("rect", x0, y0, x1, y1), at 64 px."""
    if kind == "sandwich":
        half = radius * 0.72 - 4
        return ("rect", cx - half, cy - half + 1, cx + half, cy + half)
    inset = {"pizza": 6.0, "salad": 9.0, "soup": 7.5, "bowl": 6.5}[kind]
    return ("circle", cx, cy, radius - inset)


def _find_spot(rng: random.Random, region: tuple, size: float, placed: list[Piece], must: bool):
    """A centre for a piece of radius `size` whose distance to every placed piece is at least ~their
    radii summed; an ingredient's first piece relaxes the spacing rather than go missing."""
    for spacing in ((1.0, 0.8, 0.6, 0.4) if must else (1.0,)):
        for _ in range(60):
            if region[0] == "circle":
                _, cx, cy, r = region
                a, d = rng.uniform(0, 2 * math.pi), (r - size * 0.8) * math.sqrt(rng.random())
                x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            else:
                _, x0, y0, x1, y1 = region
                x, y = rng.uniform(x0 + size * 0.8, x1 - size * 0.8), rng.uniform(y0 + size * 0.8, y1 - size * 0.8)
            if all(math.dist((x, y), (p.x, p.y)) >= spacing * (size + INGREDIENTS[p.ingredient].size)
                   for p in placed):
                return x, y
    if must:
        raise ConfigError("dish too crowded to place every ingredient; lower max_ingredients")
    return None


# ------------------------------------------------------------------------------------- rendering


def render_dish(dish: Dish, image_size: int, rng: random.Random, np_rng: np.random.Generator) -> Image.Image:
    """Table, dish base, then every piece; drawn at SUPERSAMPLE x and averaged down, then mild noise."""
    side = image_size * SUPERSAMPLE
    k = side / REF  # pixels per 64 px unit
    table = np.broadcast_to(np.array(TABLES[dish.table], np.float32), (side, side, 3)).copy()
    t = TABLE_TEXTURE
    if dish.style == "noise":  # one value per output pixel
        table += np_rng.uniform(-t, t, size=(image_size, image_size, 1)).repeat(SUPERSAMPLE, 0).repeat(SUPERSAMPLE, 1)
    elif dish.style == "grain":  # one value per output row
        table += np_rng.uniform(-t, t, size=(image_size, 1, 1)).repeat(SUPERSAMPLE, 0)
    elif dish.style == "gradient":
        table += np.linspace(-t, t, side, dtype=np.float32)[:, None, None]
    image = Image.fromarray(np.clip(table, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    BASES[dish.kind](draw, dish, k, rng)
    for piece in dish.pieces:
        ing = INGREDIENTS[piece.ingredient]
        LOOKS[ing.look](draw, piece.x * k, piece.y * k, ing.size * k, piece.angle, ing, rng)
    small = np.asarray(image.resize((image_size, image_size), Image.BOX), dtype=np.float32)
    small += np_rng.normal(0, np_rng.uniform(0, PHOTO_NOISE), size=small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------ questions, captions

DISH_QUESTIONS = ("what kind of dish is this?", "what dish is this?", "what type of food is shown?",
                  "what is this dish?")
INGREDIENT_QUESTIONS = ("{be} there {x} {prep} the {dish}?", "does the {dish} have {x}?",
                        "can you see {x} {prep} the {dish}?", "does this dish contain {x}?")
CAPTION_TEMPLATES = ("{dish} with {list}", "a photo of {dish} with {list}", "{list} {prep} {dish}",
                     "top view of {dish} with {list}", "{dish} made with {list}")
# Held-out wordings, used only in the test_paraphrase split (tests/test_dishes.py: never a training question).
PARAPHRASES = {
    "dish": ("name this dish", "which dish do you see?", "tell me what dish this is", "the food shown is which dish?"),
    "ingredient": ("do you see {x} {prep} the {dish}?", "{be} {x} visible {prep} the {dish}?",
                   "tell me if the {dish} has {x}", "{x} {prep} the {dish}: yes or no?"),
}
FAMILIES = ("dish", "ingredient")


def _ask_noun(ing: Ingredient) -> str:
    return "an egg" if ing.name == "egg" else ing.noun


def ask_questions(dish: Dish, n: int, rng: random.Random) -> list[Asked]:
    """First what the dish is, then whether an ingredient is there,
    alternating yes and no from a random start. A "no" asks about an ingredient the kind allows but
    this dish lacks, so it cannot be answered from the dish kind alone."""
    kind, present = KINDS[dish.kind], dish.ingredients
    out = [Asked(rng.choice(DISH_QUESTIONS), dish.kind, "dish", "dish", {})][:n]
    yes = rng.sample(present, len(present))
    no = rng.sample([i for i in kind.allowed if i not in present], len(kind.allowed) - len(present))
    want_yes = rng.random() < 0.5
    while len(out) < n and (yes or no):
        pool = yes if (want_yes and yes) or not no else no
        ing = INGREDIENTS[pool.pop()]
        fields = dict(be="are" if ing.plural else "is", x=_ask_noun(ing), prep=kind.prep, dish=dish.kind)
        question = rng.choice(INGREDIENT_QUESTIONS).format(**fields)
        out.append(Asked(question, "yes" if pool is yes else "no", "ingredient", "ingredient", fields))
        want_yes = not want_yes
    return out


def make_captions(dish: Dish, n: int, rng: random.Random) -> list[str]:
    """`n` captions around one canonical list of the ingredients (alphabetical by name)."""
    kind = KINDS[dish.kind]
    words = join_words([INGREDIENTS[i].noun for i in dish.ingredients])
    return [t.format(dish=rng.choice(kind.phrases), list=words, prep=kind.prep)
            for t in rng.sample(CAPTION_TEMPLATES, n)]


# --------------------------------------------------------------------------------------- dataset


def generate_dishes(
    root: str | Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int,
    min_ingredients: int,
    max_ingredients: int,
    questions_per_image: int,
    min_captions: int,
    max_captions: int,
    seed: int,
    progress: bool = True,
) -> Path:
    """Generate (or reuse) a dishes dataset under `root` and return its directory,
    `<root>/dishes-<hash of the parameters>` (see `mmqa.data.worlds.cache`)."""
    params = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                  min_ingredients=min_ingredients, max_ingredients=max_ingredients,
                  questions_per_image=questions_per_image, min_captions=min_captions, max_captions=max_captions,
                  seed=seed)
    _check_params(params)
    return cached_dataset(root, "dishes", GENERATOR_VERSION, params, lambda out: _write_dataset(out, params, progress))


def _check_params(p: dict) -> None:
    problems = common_problems(p, len(CAPTION_TEMPLATES))
    fewest = min(len(k.allowed) for k in KINDS.values())
    if not 1 <= p["min_ingredients"] <= p["max_ingredients"] <= 6:
        problems.append("need 1 <= min_ingredients <= max_ingredients <= 6")
    elif p["max_ingredients"] >= fewest:
        problems.append(f"max_ingredients must be below {fewest}, so that every kind has absent ones to ask about")
    if p["questions_per_image"] < 0:
        problems.append("questions_per_image must be >= 0")
    if problems:
        raise ConfigError("generate_dishes: " + "; ".join(problems) + f" (got {p})")


def _write_dataset(out: Path, params: dict, progress: bool) -> None:
    tallies: dict[str, dict[str, Counter]] = {}  # per split: kinds, ingredients, families, answers
    n_captions: Counter = Counter()  # per split
    paraphrases = Paraphrases("dishes", params, PARAPHRASES)

    def make_image(split: str, image: str, rng: random.Random, np_rng: np.random.Generator):
        dish = sample_dish(rng, params["min_ingredients"], params["max_ingredients"])
        render_dish(dish, params["image_size"], rng, np_rng).save(out / image)
        questions = ask_questions(dish, params["questions_per_image"], rng)
        captions = make_captions(dish, rng.randint(params["min_captions"], params["max_captions"]), rng)
        recipe = write_recipe(dish.kind, [INGREDIENTS[name] for name in dish.ingredients], rng)
        tally = tallies.setdefault(split, {k: Counter() for k in ("kinds", "ingredients", "families", "answers")})
        tally["kinds"][dish.kind] += 1
        tally["ingredients"].update(dish.ingredients)
        tally["families"].update(q.family for q in questions)
        tally["answers"].update(f"{q.family}: {q.answer}" for q in questions)
        n_captions[split] += len(captions)
        facts = {"kind": dish.kind, "table": dish.table, "style": dish.style,
                 "pieces": [[p.ingredient, round(p.x, 2), round(p.y, 2)] for p in dish.pieces]}
        paraphrases.add(split, image, questions)
        return _rows(image, [(q.question, q.answer, q.family) for q in questions], captions, dish.ingredients,
                     recipe), facts

    write_splits(out, "dishes", params, progress, "dishes.jsonl", make_image)
    stats = {split: {"images": params[f"n_{split}"], "questions": sum(t["families"].values()),
                     "captions": n_captions[split], **{k: dict(sorted(v.items())) for k, v in t.items()}}
             for split, t in tallies.items()}
    paraphrases.write(out, stats)
    meta = {
        "generator": "mmqa.data.worlds.dishes",
        "version": GENERATOR_VERSION,
        "params": params,
        "families": list(FAMILIES),
        "kinds": list(KINDS),
        "ingredients": sorted(INGREDIENTS),
        "allowed": {k.name: sorted(k.allowed) for k in KINDS.values()},
        "splits": stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _rows(image: str, questions: list[tuple[str, str, str]], captions: list[str], ingredients: list[str],
          recipe: dict) -> list[dict]:
    """One line per question; captions, ingredients and the recipe ride on the image's first line."""
    labels = {"ingredients": ingredients, "recipe": recipe}
    if captions:
        labels = {"captions": captions, **labels}
    rows = [{"image": image, "question": q, "answers": [a], **(labels if k == 0 else {}), "question_type": f}
            for k, (q, a, f) in enumerate(questions)]
    return rows or [{"image": image, **labels}]
