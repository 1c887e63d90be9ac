"""The built-in procedural "shapes" world: scenes of coloured shapes with questions and captions.

This module owns everything about the world: the scene vocabulary (shapes, colours, sizes,
backgrounds), sampling and rendering scenes, the question families and their templates, the
captions, and writing a cached dataset in the JSONL layout that `mmqa.data.readers.jsonl.JsonlReader`
reads (see data/README.md).

Every question is built from the scene itself, so each has one correct answer: a referring
expression is only used when it picks out exactly one object, and a spatial relation is only asked
when no object sits too close to the dividing line to call. It needs no torch (PIL, numpy and tqdm
only), so a dataset can be generated without the training stack.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmqa.data.worlds.cache import Asked, Paraphrases, cached_dataset, common_problems, write_splits
from mmqa.errors import ConfigError

# Part of the cache key: bump it whenever the same parameters would produce different files.
GENERATOR_VERSION = 2  # 2: test_paraphrase added; train, val and test are unchanged

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Dark or neutral, so that even with noise or a gradient no background pixel comes near an object
# colour (tests/test_shapes.py checks the distance).
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "dark gray": (64, 64, 64),
    "black": (16, 16, 16),
    "brown": (100, 70, 45),
    "navy": (20, 28, 72),
}
BACKGROUND_STYLES = ("plain", "noise", "gradient")
NOISE_AMPLITUDE = 12  # +- per channel, uniform
GRADIENT_AMPLITUDE = 24  # +- brightness across the image
# Bounding-box side as a fraction of the image side: ~10 px vs ~18 px at 64 px, told apart at a glance.
SIZES = {"small": 10 / 64, "large": 18 / 64}

# Question templates by kind; "{a_desc}" carries its article ("a red circle", "an orange square").
TEMPLATES = {
    "colour_of": ("what colour is the {ref}?", "what is the colour of the {ref}?", "which colour is the {ref}?"),
    "shape_of": ("what shape is the {ref}?", "what is the shape of the {ref}?", "which shape is the {ref}?"),
    "size_of": ("what size is the {ref}?", "is the {ref} small or large?", "how big is the {ref}?"),
    "exists": (
        "is there {a_desc}?",
        "is there {a_desc} in the image?",
        "does the picture contain {a_desc}?",
        "can you see {a_desc}?",
    ),
    "count": (
        "how many {plural} are there?",
        "how many {plural} are in the image?",
        "what is the number of {plural}?",
        "how many {plural} can you see?",
    ),
    "shape_beside": (
        "what shape is {rel} the {ref}?",
        "which shape is {rel} the {ref}?",
        "what is the shape of the object {rel} the {ref}?",
    ),
    "is_beside": ("is the {a} {rel} the {b}?", "is the {a} located {rel} the {b}?"),
    "compare_yn": ("is the {a} {cmp} than the {b}?", "does the {a} look {cmp} than the {b}?"),
    "compare_which": (
        "which is {cmp}, the {a} or the {b}?",
        "which object is {cmp}: the {a} or the {b}?",
        "what shape is {cmp}, the {a} or the {b}?",
    ),
    # The relational families (not in DEFAULT_FAMILIES): nearest / furthest, counting under a
    # relation, and which of two named objects lies further in a direction.
    "nearest": (
        "what {what} is the object {extreme} the {ref}?",
        "what is the {what} of the object {extreme} the {ref}?",
        "which {what} does the object {extreme} the {ref} have?",
    ),
    "count_beside": (
        "how many {plural} are {rel} the {ref}?",
        "what is the number of {plural} {rel} the {ref}?",
        "how many {plural} can you see {rel} the {ref}?",
    ),
    "further_which": (
        "which is {side}, the {a} or the {b}?",
        "which object is {side}: the {a} or the {b}?",
        "what shape is {side}, the {a} or the {b}?",
    ),
}
# Held-out wordings of the same questions, used only in the test_paraphrase split: other spellings
# (color), imperatives ("tell me ..."), the question word last, and synonyms (count, number, visible).
# tests/test_shapes.py checks that no paraphrase question is ever a training question.
PARAPHRASES = {
    "colour_of": ("what color is the {ref}?", "tell me the colour of the {ref}", "the {ref} is which color?",
                  "name the colour of the {ref}"),
    "shape_of": ("tell me the shape of the {ref}", "the {ref} has what shape?", "what kind of shape is the {ref}?",
                 "name the shape of the {ref}"),
    "size_of": ("tell me the size of the {ref}", "is the {ref} large or small?", "the {ref} is how big?",
                "how large is the {ref}?"),
    "exists": ("do you see {a_desc}?", "is {a_desc} visible?", "is {a_desc} shown in the picture?",
               "does the image have {a_desc}?"),
    "count": ("count the {plural}", "number of {plural}?", "how many {plural} do you see?",
              "tell me how many {plural} there are"),
    "shape_beside": ("tell me the shape {rel} the {ref}", "name the shape {rel} the {ref}",
                     "{rel} the {ref}, what shape is there?"),
    "is_beside": ("is the {a} positioned {rel} the {b}?", "the {a} is {rel} the {b}, yes or no?",
                  "tell me if the {a} is {rel} the {b}"),
    "compare_yn": ("is the {a} {cmp} compared to the {b}?", "compared with the {b}, is the {a} {cmp}?",
                   "tell me if the {a} is {cmp} than the {b}"),
    "compare_which": ("tell me which is {cmp}, the {a} or the {b}", "of the {a} and the {b}, which is {cmp}?",
                      "which one is {cmp}: the {a} or the {b}?"),
    "nearest": ("tell me the {what} of the object {extreme} the {ref}", "the object {extreme} the {ref} has what {what}?",
                "name the {what} of the thing {extreme} the {ref}"),
    "count_beside": ("count the {plural} {rel} the {ref}", "number of {plural} {rel} the {ref}?",
                     "tell me how many {plural} there are {rel} the {ref}"),
    "further_which": ("tell me which is {side}, the {a} or the {b}", "of the {a} and the {b}, which is {side}?",
                      "which one is {side}: the {a} or the {b}?"),
}
# Alternative wordings of one relation; the renderer picks one per question.
RELATIONS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
EXTREMES = {"nearest": ("closest to", "nearest to"), "furthest": ("furthest from", "farthest from")}
SIDES = {"left": ("further left", "more to the left"), "right": ("further right", "more to the right"),
         "above": ("higher", "higher up"), "below": ("lower", "lower down")}
# Every caption holds the canonical object list, so a captioning model can learn it exactly.
CAPTION_TEMPLATES = (
    "{objects}",
    "{objects} on a {background} background",
    "there is {objects}",
    "there is {objects} on a {background} background",
    "a picture of {objects}",
    "an image showing {objects}",
    "a {background} background with {objects}",
    "a drawing of {objects} on a {background} background",
)


# ----------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; (x, y) is the centre pixel, `extent` the side of its bounding box."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    extent: int


@dataclass(frozen=True)
class Scene:
    background: str  # a key of BACKGROUNDS
    style: str  # one of BACKGROUND_STYLES
    objects: tuple[ShapeObject, ...]


def size_pixels(size: str, image_size: int) -> int:
    return max(3, round(SIZES[size] * image_size))


def sample_scene(rng: random.Random, image_size: int, min_objects: int, max_objects: int) -> Scene:
    """Draw a random scene whose objects' bounding boxes are apart by at least a small margin."""
    margin = max(2, image_size // 32)
    # Rejection sampling: place objects one by one; if one finds no room, start the scene again.
    for _ in range(1000):
        placed: list[ShapeObject] = []
        for _ in range(rng.randint(min_objects, max_objects)):
            size = rng.choice(tuple(SIZES))
            extent = size_pixels(size, image_size)
            low, high = extent // 2 + 1, image_size - extent + extent // 2 - 1
            for _ in range(100):
                x, y = rng.randint(low, high), rng.randint(low, high)
                if all(_apart(x, y, extent, o, margin) for o in placed):
                    placed.append(ShapeObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, x, y, extent))
                    break
            else:
                break
        else:
            return Scene(rng.choice(tuple(BACKGROUNDS)), rng.choice(BACKGROUND_STYLES), tuple(placed))
    raise ConfigError(f"cannot fit {max_objects} objects in a {image_size}px image; raise image_size")


def _apart(x: int, y: int, extent: int, other: ShapeObject, margin: int) -> bool:
    gap = (extent + other.extent) / 2 + margin
    return abs(x - other.x) >= gap or abs(y - other.y) >= gap


def render_scene(scene: Scene, image_size: int, np_rng: np.random.Generator) -> Image.Image:
    """Paint the background (plain, noisy or a gradient), then every object in one solid colour."""
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    pixels = np.broadcast_to(base, (image_size, image_size, 3)).copy()  # (H, W, 3)
    if scene.style == "noise":
        pixels += np_rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=pixels.shape)
    elif scene.style == "gradient":
        ramp = np.linspace(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, image_size, dtype=np.float32)
        ramp = ramp[:, None, None] if np_rng.random() < 0.5 else ramp[None, :, None]
        pixels += ramp
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o)
    return image


def recolour(scene: Scene, index: int, colour: str) -> Scene:
    """`scene` with object `index` painted `colour` and nothing else changed: drawn by `render_scene`
    with the same noise, the two images differ only inside that object (activation patching's pairs,
    mmqa/inspect/patching.py)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], colour=colour)
    return replace(scene, objects=tuple(objects))


def _draw_object(draw: ImageDraw.ImageDraw, o: ShapeObject) -> None:
    colour = COLOURS[o.colour]
    x0, y0 = o.x - o.extent // 2, o.y - o.extent // 2
    x1, y1 = x0 + o.extent - 1, y0 + o.extent - 1  # PIL boxes include both ends
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif o.shape == "triangle":
        draw.polygon([(o.x, y0), (x1, y1), (x0, y1)], fill=colour)  # apex up; the centre is inside
    else:  # cross: arms a third of the box thick, so it stays a cross even when small
        t = max(2, round(o.extent / 3))
        draw.rectangle((x0, o.y - t // 2, x1, o.y - t // 2 + t - 1), fill=colour)
        draw.rectangle((o.x - t // 2, y0, o.x - t // 2 + t - 1, y1), fill=colour)


# ------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Desc:
    """A description such as "large red circle"; a None attribute is left unsaid."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    @functools.cache  # a handful of distinct descriptions, worded hundreds of times per scene
    def text(self, plural: bool = False) -> str:
        noun = (PLURALS[self.shape] if plural else self.shape) if self.shape else ("objects" if plural else "object")
        return " ".join([w for w in (self.size, self.colour) if w] + [noun])


ALL_DESCS = tuple(
    Desc(size, colour, shape)
    for size, colour, shape in itertools.product((None, *SIZES), (None, *COLOURS), (None, *SHAPES))
)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass
class Candidate:
    """A question that may be asked: `key` names what it asks about, so an image never asks twice.

    A field holding a tuple lists alternative wordings; one is picked when the question is rendered.
    """

    key: tuple
    answer: str
    kind: str  # a key of TEMPLATES
    fields: dict[str, str | tuple[str, ...]]


def _candidate(key: tuple, answer: str, kind: str, **fields: str | tuple[str, ...]) -> Candidate:
    return Candidate(key, answer, kind, fields)


def _subsets(o: ShapeObject) -> list[Desc]:
    """The 8 descriptions that fit `o`: each of its attributes said or left unsaid."""
    return [Desc(*d) for d in itertools.product((None, o.size), (None, o.colour), (None, o.shape))]


@dataclass(frozen=True)
class SceneFacts:
    """What the question families read from a scene, worked out once per scene."""

    scene: Scene
    counts: Counter  # Desc -> number of objects it fits (missing: 0)
    refs: list[tuple[Desc, ...]]  # per object, the descriptions that fit it and no other object
    tol: int  # centres closer than this on an axis are level: neither left nor right of each other

    @classmethod
    def of(cls, scene: Scene, image_size: int) -> SceneFacts:
        counts = Counter(d for o in scene.objects for d in _subsets(o))
        refs = [tuple(d for d in _subsets(o)[1:] if counts[d] == 1) for o in scene.objects]  # [0] says nothing
        return cls(scene, counts, refs, max(2, image_size // 16))

    def ref_texts(self, i: int, unsaid: str | None = None) -> tuple[str, ...]:
        """Wordings that single out object i, optionally leaving one attribute unsaid."""
        return tuple(d.text() for d in self.refs[i] if unsaid is None or getattr(d, unsaid) is None)


def _attribute(facts: SceneFacts) -> list[Candidate]:
    out = []
    for i, o in enumerate(facts.scene.objects):
        # Ask only for an attribute the description leaves unsaid; the renderer picks one wording.
        for attribute, kind in (("colour", "colour_of"), ("shape", "shape_of"), ("size", "size_of")):
            if refs := facts.ref_texts(i, unsaid=attribute):
                out.append(_candidate((attribute, i), getattr(o, attribute), kind, ref=refs))
    return out


def _existence(facts: SceneFacts) -> list[Candidate]:
    return [
        _candidate(("exists", d), "yes" if facts.counts[d] else "no", "exists", a_desc=with_article(d.text()))
        for d in ALL_DESCS[1:]  # [0] would ask "is there an object?"
    ]


def _counting(facts: SceneFacts) -> list[Candidate]:
    return [_candidate(("count", d), str(facts.counts[d]), "count", plural=d.text(plural=True)) for d in ALL_DESCS]


def _offset(a: ShapeObject, b: ShapeObject, direction: str) -> int:
    """How far `a` lies from `b` in `direction`, in pixels (negative: the other way)."""
    return {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[direction]


def _spatial(facts: SceneFacts) -> list[Candidate]:
    objs, tol, out = facts.scene.objects, facts.tol, []
    for i, j in itertools.permutations(range(len(objs)), 2):
        if not (facts.refs[i] and facts.refs[j]):
            continue
        for direction, words in RELATIONS.items():
            offset = _offset(objs[i], objs[j], direction)
            if abs(offset) >= tol:  # else too close to the line to call
                out.append(_candidate(("is_beside", i, j, direction), "yes" if offset > 0 else "no", "is_beside",
                                      a=facts.ref_texts(i), b=facts.ref_texts(j), rel=words))
    for j in range(len(objs)):
        if not facts.refs[j]:
            continue
        for direction, words in RELATIONS.items():
            beside = _beside(facts, j, direction)
            if beside is not None and len(beside) == 1:
                out.append(_candidate(("beside", j, direction), objs[beside[0]].shape, "shape_beside",
                                      ref=facts.ref_texts(j), rel=words))
    return out


def _beside(facts: SceneFacts, j: int, direction: str) -> list[int] | None:
    """The objects lying in `direction` from object j, or None when one sits within `tol` of the
    dividing line (too close to call)."""
    objs = facts.scene.objects
    offsets = {i: _offset(o, objs[j], direction) for i, o in enumerate(objs) if i != j}
    if any(abs(off) < facts.tol for off in offsets.values()):
        return None
    return [i for i, off in offsets.items() if off > 0]


def _comparison(facts: SceneFacts) -> list[Candidate]:
    objs, out = facts.scene.objects, []
    for i, j in itertools.permutations(range(len(objs)), 2):
        # Descriptions that name the size would give the answer away.
        a, b = facts.ref_texts(i, unsaid="size"), facts.ref_texts(j, unsaid="size")
        if objs[i].size == objs[j].size or not (a and b):
            continue
        big, small = (i, j) if objs[i].size == "large" else (j, i)
        pair = ("compare", min(i, j), max(i, j))
        for cmp, winner in (("bigger", big), ("smaller", small)):
            out.append(_candidate(pair, "yes" if winner == i else "no", "compare_yn", a=a, b=b, cmp=cmp))
            if objs[i].shape != objs[j].shape:  # else the shape name would not tell them apart
                out.append(_candidate(pair, objs[winner].shape, "compare_which", a=a, b=b, cmp=cmp))
    return out


def _nearest(facts: SceneFacts) -> list[Candidate]:
    """The shape or colour of the object closest to (or furthest from) a named one, asked only when
    the runner-up is at least `tol` pixels further off (or nearer), so the answer is clear at a glance."""
    objs, out = facts.scene.objects, []
    for j, ref in enumerate(objs):
        others = sorted((math.dist((o.x, o.y), (ref.x, ref.y)), i) for i, o in enumerate(objs) if i != j)
        if not (facts.refs[j] and others):
            continue
        for extreme, (d, i), runner_up in (("nearest", others[0], others[1:2]), ("furthest", others[-1], others[-2:-1])):
            if runner_up and abs(runner_up[0][0] - d) < facts.tol:
                continue
            for what in ("shape", "colour"):
                out.append(_candidate((extreme, j, what), getattr(objs[i], what), "nearest",
                                      what=what, extreme=EXTREMES[extreme], ref=facts.ref_texts(j)))
    return out


def _count_beside(facts: SceneFacts) -> list[Candidate]:
    """How many objects (of a shape, of a colour, or any) lie in a direction from a named one, asked
    only when no other object sits within `tol` of the dividing line."""
    objs, out = facts.scene.objects, []
    for j in range(len(objs)):
        if not facts.refs[j]:
            continue
        for direction, words in RELATIONS.items():
            beside = _beside(facts, j, direction)
            if beside is None:
                continue
            for d in (Desc(), *(Desc(shape=s) for s in SHAPES), *(Desc(colour=c) for c in COLOURS)):
                n = sum(d in _subsets(objs[i]) for i in beside)
                out.append(_candidate(("count_beside", j, direction, d), str(n), "count_beside",
                                      plural=d.text(plural=True), rel=words, ref=facts.ref_texts(j)))
    return out


def _further_which(facts: SceneFacts) -> list[Candidate]:
    """Which of two named objects of different shapes lies further in a direction; the answer is its shape."""
    objs, out = facts.scene.objects, []
    for i, j in itertools.permutations(range(len(objs)), 2):  # both orders, one key: either may be asked
        if objs[i].shape == objs[j].shape or not (facts.refs[i] and facts.refs[j]):
            continue
        for direction, words in SIDES.items():
            offset = _offset(objs[i], objs[j], direction)
            if abs(offset) >= facts.tol:
                winner = objs[i] if offset > 0 else objs[j]
                out.append(_candidate(("further", min(i, j), max(i, j), direction), winner.shape, "further_which",
                                      a=facts.ref_texts(i), b=facts.ref_texts(j), side=words))
    return out


FAMILY_CANDIDATES = {
    "attribute": _attribute,
    "existence": _existence,
    "counting": _counting,
    "spatial": _spatial,
    "comparison": _comparison,
    "nearest": _nearest,
    "count_beside": _count_beside,
    "further": _further_which,
}
FAMILIES = tuple(FAMILY_CANDIDATES)
DEFAULT_FAMILIES = FAMILIES[:5]  # the world as it was; the relational three are asked when listed


def ask_questions(
    scene: Scene, n: int, image_size: int, rng: random.Random, family_counts: Counter,
    families: tuple[str, ...] = DEFAULT_FAMILIES,
) -> list[Asked]:
    """Pick `n` questions for a scene, keeping families balanced over the split.

    Each question goes to the family asked least so far (in `family_counts`, updated here) among
    those the scene allows. Within a family the answer is drawn first, uniformly over the answers
    the scene allows, then a question with that answer: this keeps yes/no near 50/50 and stops
    one answer from dominating a family.
    """
    facts = SceneFacts.of(scene, image_size)
    pools = {family: FAMILY_CANDIDATES[family](facts) for family in families}
    asked: set[tuple] = set()
    out = []
    for _ in range(n):
        open_families = [f for f in families if any(c.key not in asked for c in pools[f])]
        if not open_families:
            break
        rng.shuffle(open_families)  # ties go to a random family
        family = min(open_families, key=lambda f: family_counts[f])
        pool = [c for c in pools[family] if c.key not in asked]
        answer = rng.choice(sorted({c.answer for c in pool}))
        chosen = rng.choice([c for c in pool if c.answer == answer])
        fields = {k: rng.choice(v) if isinstance(v, tuple) else v for k, v in chosen.fields.items()}
        out.append(Asked(rng.choice(TEMPLATES[chosen.kind]).format(**fields), answer, family, chosen.kind, fields))
        asked.add(chosen.key)
        family_counts[family] += 1
    return out


# -------------------------------------------------------------------------------------- captions


def describe_objects(scene: Scene) -> str:
    """The canonical object list, left to right: "a large red circle, a small blue square and a ..."."""
    phrases = [with_article(f"{o.size} {o.colour} {o.shape}") for o in sorted(scene.objects, key=lambda o: (o.x, o.y))]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_captions(scene: Scene, n: int, rng: random.Random) -> list[str]:
    objects = describe_objects(scene)
    return [t.format(objects=objects, background=scene.background) for t in rng.sample(CAPTION_TEMPLATES, n)]


# --------------------------------------------------------------------------------------- dataset


def generate_shapes(
    root: str | Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int,
    min_objects: int,
    max_objects: int,
    questions_per_image: int,
    min_captions: int,
    max_captions: int,
    seed: int,
    families: Sequence[str] = DEFAULT_FAMILIES,
    progress: bool = True,
) -> Path:
    """Generate (or reuse) a shapes dataset under `root` and return its directory.

    The directory name holds a hash of every parameter, so the same call reuses the cache and any
    change generates anew. Files are written to a temporary sibling and renamed into place at the
    end: a killed run leaves no half dataset under the final name.
    """
    params = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                  min_objects=min_objects, max_objects=max_objects, questions_per_image=questions_per_image,
                  min_captions=min_captions, max_captions=max_captions, seed=seed, families=list(families))
    _check_params(params)
    return cached_dataset(root, "shapes", GENERATOR_VERSION, params, lambda out: _write_dataset(out, params, progress))


def read_scenes(dataset: str | Path, split: str) -> list[Scene]:
    """The scenes of one split of a generated dataset (its `scenes.jsonl`), in image order."""
    scenes = []
    with open(Path(dataset) / "scenes.jsonl", encoding="utf-8") as f:
        for row in map(json.loads, f):
            if row["split"] == split:
                scenes.append(Scene(row["background"], row["style"], tuple(ShapeObject(**o) for o in row["objects"])))
    return scenes


def _check_params(p: dict) -> None:
    problems = common_problems(p, len(CAPTION_TEMPLATES))
    if not 1 <= p["min_objects"] <= p["max_objects"] <= 5:
        problems.append("need 1 <= min_objects <= max_objects <= 5 (counting answers are 0..5)")
    if p["questions_per_image"] < 0 or p["questions_per_image"] + p["min_captions"] == 0:
        problems.append("every image needs a question or a caption: questions_per_image >= 0 and "
                        "questions_per_image + min_captions >= 1")
    if unknown := [f for f in p["families"] if f not in FAMILIES]:
        problems.append(f"families: {unknown} not known; valid: {', '.join(FAMILIES)}")
    if not p["families"] and p["questions_per_image"]:
        problems.append("families is empty but questions_per_image > 0")
    if problems:
        raise ConfigError("generate_shapes: " + "; ".join(problems) + f" (got {p})")


def _write_dataset(out: Path, params: dict, progress: bool) -> None:
    families = tuple(params["families"])
    family_counts: dict[str, Counter] = defaultdict(lambda: Counter({f: 0 for f in families}))  # per split
    answers: dict[str, Counter] = defaultdict(Counter)
    n_captions: Counter = Counter()
    paraphrases = Paraphrases("shapes", params, PARAPHRASES)

    def make_image(split: str, image: str, rng: random.Random, np_rng: np.random.Generator):
        scene = sample_scene(rng, params["image_size"], params["min_objects"], params["max_objects"])
        render_scene(scene, params["image_size"], np_rng).save(out / image)
        questions = ask_questions(scene, params["questions_per_image"], params["image_size"], rng, family_counts[split],
                                  families)
        captions = make_captions(scene, rng.randint(params["min_captions"], params["max_captions"]), rng)
        answers[split].update((q.family, q.answer) for q in questions)
        n_captions[split] += len(captions)
        paraphrases.add(split, image, questions)
        return _rows(image, [(q.question, q.answer, q.family) for q in questions], captions), asdict(scene)

    write_splits(out, "shapes", params, progress, "scenes.jsonl", make_image)
    stats = {
        split: {
            "images": params[f"n_{split}"],
            "questions": sum(counts.values()),
            "captions": n_captions[split],
            "families": dict(counts),
            "answers": {f: {a: n for (fam, a), n in sorted(answers[split].items()) if fam == f} for f in families},
        }
        for split, counts in family_counts.items()
    }
    paraphrases.write(out, stats)
    meta = {
        "generator": "mmqa.data.worlds.shapes",
        "version": GENERATOR_VERSION,
        "params": params,
        "families": list(families),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "backgrounds": list(BACKGROUNDS),
        "splits": stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _rows(image: str, questions: list[tuple[str, str, str]], captions: list[str]) -> list[dict]:
    """One line per question; the captions ride on the image's first line (alone if no question)."""
    rows = []
    for k, (question, answer, family) in enumerate(questions):
        row = {"image": image, "question": question, "answers": [answer]}
        if k == 0 and captions:
            row["captions"] = captions
        rows.append({**row, "question_type": family})
    if not questions and captions:
        rows.append({"image": image, "captions": captions})
    return rows
