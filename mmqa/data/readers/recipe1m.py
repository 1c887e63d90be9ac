"""The public Recipe1M layout, read into one `ImageRecord` per image with its recipe.

```
recipe1m/
├── layer1.json     [{"id", "title", "ingredients": [{"text"}], "instructions": [{"text"}], "partition", "url"}]
├── layer2.json     [{"id", "images": [{"id", "url"}]}]      the images of each recipe (many have none)
├── det_ingrs.json  optional: [{"id", "ingredients": [{"text"}], "valid": [bool]}]  cleaned ingredient names
└── images/<partition>/a/b/c/d/<image id>       the first four characters of the image id as folders
```

Each image of a recipe in the split's partition becomes a record: the recipe as {"title",
"ingredients" (the raw lines, "2 cups flour, sifted"), "steps"}, the title as its caption, and the
ingredient names for the multi-label target. Those names come from det_ingrs.json where it is
present (its valid entries), else from the raw lines; either way through `normalise_ingredient`,
a rule-based normaliser (drop quantities, units, preparation words, lower-case, singularise) that
is approximate: "1 (8 ounce) package cream cheese, softened" gives "cream cheese", but it keeps
whatever words it does not know. Recipes without images are skipped. Bad data raises `DataError`
naming the file, the entry (index and recipe id) and the problem, like the other readers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmqa.data.readers.base import ImageChecker, OnBad, Samples, field, load_json, root_dir, type_name
from mmqa.data.recipe_text import singularise
from mmqa.data.records import ImageRecord
from mmqa.errors import DataError

UNITS = {
    "cup", "cups", "c", "tablespoon", "tablespoons", "tbsp", "tbs", "tbl", "teaspoon", "teaspoons", "tsp",
    "ounce", "ounces", "oz", "pound", "pounds", "lb", "lbs", "gram", "grams", "g", "kg", "kilogram", "kilograms",
    "ml", "milliliter", "milliliters", "millilitre", "millilitres", "l", "liter", "liters", "litre", "litres",
    "pint", "pints", "quart", "quarts", "qt", "gallon", "gallons", "can", "cans", "package", "packages", "pkg",
    "jar", "jars", "bottle", "bottles", "box", "boxes", "bag", "bags", "envelope", "envelopes", "stick", "sticks",
    "slice", "slices", "clove", "cloves", "pinch", "pinches", "dash", "dashes", "handful", "handfuls", "bunch",
    "bunches", "sprig", "sprigs", "piece", "pieces", "container", "containers", "inch", "inches", "head", "heads",
}
DESCRIPTORS = {
    "chopped", "minced", "diced", "sliced", "grated", "shredded", "fresh", "freshly", "large", "small", "medium",
    "finely", "thinly", "roughly", "coarsely", "peeled", "crushed", "softened", "melted", "packed", "beaten",
    "cooked", "uncooked", "frozen", "thawed", "drained", "rinsed", "divided", "optional", "whole", "boneless",
    "skinless", "lean", "extra", "virgin", "ripe", "cubed", "halved", "quartered", "trimmed", "seeded", "pitted",
    "about", "approximately", "plus", "more", "of", "a", "an", "to", "taste", "lightly", "well", "room",
    "temperature",
}
_PARENTHESES = re.compile(r"\([^)]*\)")
_TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def normalise_ingredient(text: str) -> str:
    """An approximate ingredient name from a recipe line: "2 cups all-purpose flour, sifted" ->
    "all-purpose flour", "3 large eggs" -> "egg", "salt, to taste" -> "salt". The first of
    alternatives ("butter or margarine") is kept; "" when nothing is left."""
    text = _PARENTHESES.sub(" ", text.lower()).split(",")[0]
    text = re.split(r"\bor\b", text)[0]
    words = [w for w in _TOKEN.findall(text) if w not in UNITS and w not in DESCRIPTORS]
    if words:
        words[-1] = singularise(words[-1])
    return " ".join(words)


def _texts(entry: dict, key: str, where: str) -> list[str]:
    """The stripped, non-empty "text" of each item of entry[key] (a list of {"text": str})."""
    items = field(entry, key, list, where)
    texts = (field(item, "text", str, f"{where}.{key}[{k}]").strip() for k, item in enumerate(items))
    return [t for t in texts if t]


def entries(data: Any, path: Path) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type_name(data)}")
    return data


class Recipe1MReader:
    """Recipe1M under `root`; `image_root` (relative to root, or absolute) holds the partitions'
    image folders. `splits` maps mmqa's split names to Recipe1M partitions; a split with no recipe
    that has an image reads as None. `max_images_per_recipe` keeps each recipe's first images
    (None: all). The JSON files are read once per reader and shared by its splits, so with an
    `on_bad` callback a bad entry of them is reported by the first read only."""

    DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}

    def __init__(
        self,
        root: str | Path,
        image_root: str | Path = "images",
        splits: Mapping[str, str] | None = None,
        max_images_per_recipe: int | None = 5,
        detected_ingredients: bool = True,
        check_images: bool = True,
    ) -> None:
        self.root = Path(root)
        self.image_root = Path(image_root)
        self.splits = dict(self.DEFAULT_SPLITS if splits is None else splits)
        self.max_images_per_recipe = max_images_per_recipe
        self.detected_ingredients = detected_ingredients
        self.check_images = check_images
        self._recipes: list[dict] | None = None

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        root = root_dir(self.root)
        if split not in self.splits:
            return None
        partition = self.splits[split]
        image_dir = root / self.image_root  # an absolute image_root replaces root
        check = ImageChecker(self.check_images)
        samples = Samples(on_bad)
        records = []
        for r in self._load(root, samples):
            if r["partition"] != partition:
                continue
            captions = [r["recipe"]["title"]] if r["recipe"]["title"] else []
            for k, image_id in enumerate(r["images"][: self.max_images_per_recipe]):
                image = f"{partition}/{'/'.join(image_id[:4])}/{image_id}"  # val/e/f/3/d/ef3dc0de11.jpg
                where = f"{r['images_where']}.images[{k}]"
                with samples.one(where):
                    check(image_dir / image, where)
                    records.append(ImageRecord(image=image_dir / image, id=image, captions=list(captions), source=where,
                                               ingredients=list(r["ingredients"]), recipe=r["recipe"]))
        return records or None

    def _load(self, root: Path, samples: Samples) -> list[dict]:
        """Every recipe that has images, in layer1 order, with its normalised ingredient names."""
        if self._recipes is not None:
            return self._recipes
        paths = {name: root / f"{name}.json" for name in ("layer1", "layer2", "det_ingrs")}
        for name in ("layer1", "layer2"):
            if not paths[name].is_file():
                raise DataError(f"{root}: no {name}.json; Recipe1M needs layer1.json (recipes) and "
                                "layer2.json (images)")
        recipes: dict[str, dict] = {}
        listed: dict[str, int] = {}  # recipe id -> its entry in layer2.json

        def add_recipe(i: int, entry: dict, rid: str, where: str) -> None:
            if rid in recipes:
                raise DataError(f"{where}: id already used by entry [{recipes[rid]['index']}]")
            title = field(entry, "title", str, where).strip()
            lines, steps = _texts(entry, "ingredients", where), _texts(entry, "instructions", where)
            recipes[rid] = {
                "index": i,
                "partition": field(entry, "partition", str, where),
                "recipe": {"title": title, "ingredients": lines, "steps": steps},
                "ingredients": _names(lines),
                "images": [],
            }

        def add_detected(i: int, entry: dict, rid: str, where: str) -> None:
            recipe = _recipe_of(rid, recipes, where)
            texts = [field(item, "text", str, f"{where}.ingredients[{k}]")
                     for k, item in enumerate(field(entry, "ingredients", list, where))]
            valid = field(entry, "valid", list, where)
            if len(valid) != len(texts) or not all(isinstance(v, bool) for v in valid):
                raise DataError(f"{where}: 'valid' must be a list of {len(texts)} booleans, one per ingredient")
            recipe["ingredients"] = _names([t for t, ok in zip(texts, valid) if ok])

        def add_images(i: int, entry: dict, rid: str, where: str) -> None:
            recipe = _recipe_of(rid, recipes, where)
            if rid in listed:
                raise DataError(f"{where}: recipe id already listed by entry [{listed[rid]}]")
            image_ids = [_image_id(image, f"{where}.images[{k}]")
                         for k, image in enumerate(field(entry, "images", list, where))]
            listed[rid] = i
            recipe.update(images=image_ids, images_where=where)

        _each_entry(paths["layer1"], samples, add_recipe)
        if self.detected_ingredients and paths["det_ingrs"].is_file():
            _each_entry(paths["det_ingrs"], samples, add_detected)
        _each_entry(paths["layer2"], samples, add_images)
        self._recipes = [r for r in recipes.values() if r["images"]]
        return self._recipes


def _each_entry(path: Path, samples: Samples, handle: Callable[[int, dict, str, str], None]) -> None:
    """handle(index, entry, recipe id, where) for each entry of the JSON list in `path`; `where`
    names the file, the index and the id. Each entry is one sample for `samples`."""
    for i, entry in enumerate(entries(load_json(path), path)):
        with samples.one(where := f"{path}: [{i}]"):
            rid = field(entry, "id", str, where)
            handle(i, entry, rid, f"{where} (id '{rid}')")


def _recipe_of(rid: str, recipes: dict[str, dict], where: str) -> dict:
    if rid not in recipes:
        raise DataError(f"{where}: recipe id has no entry in layer1.json")
    return recipes[rid]


def _image_id(image: Any, where: str) -> str:
    image_id = field(image, "id", str, where)
    if len(image_id) < 5 or "/" in image_id or "\\" in image_id or image_id.startswith("."):
        raise DataError(f"{where}: image id {image_id!r} is not a Recipe1M image file name")
    return image_id


def _names(texts: list[str]) -> list[str]:
    return sorted({n for n in map(normalise_ingredient, texts) if n})
