"""The pen of the dishes world: how each dish kind's base and each ingredient's look are drawn.

`BASES[kind](draw, dish, k, rng)` paints a dish's base (crust, plate and leaves, bowl and broth,
bread, bowl and rice) and `LOOKS[look](draw, x, y, r, angle, ingredient, rng)` one piece of an
ingredient, both with PIL on the supersampled canvas: `k` is canvas pixels per pixel of a 64 px
image, and x, y, r are already in canvas pixels. Colours come from the ingredient (`colour`,
`accent`) or the dish (`rim`); `mmqa.data.worlds.dishes` owns the world and calls these.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
from PIL import ImageDraw

if TYPE_CHECKING:  # dishes.py imports this module
    from mmqa.data.worlds.dishes import Dish, Ingredient

RGB = tuple[int, int, int]
Draw = ImageDraw.ImageDraw


def _darker(c: RGB, f: float = 0.65) -> RGB:
    return tuple(int(v * f) for v in c)


def _disc(draw: Draw, x: float, y: float, r: float, fill: RGB, outline: RGB | None = None, width: float = 0) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=int(width))


def _poly(x: float, y: float, points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    """`points` around (0, 0), turned by `angle` and moved to (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(x + px * c - py * s, y + px * s + py * c) for px, py in points]


def _oval(rx: float, ry: float, n: int = 24) -> list[tuple[float, float]]:
    return [(rx * math.cos(2 * math.pi * i / n), ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _base_pizza(draw: Draw, d: Dish, k: float, rng: random.Random) -> None:
    x, y, r = d.cx * k, d.cy * k, d.radius * k
    _disc(draw, x, y, r, (205, 145, 60), (140, 90, 35), k * 0.8)
    _disc(draw, x, y, r - 4 * k, (240, 215, 160))
    for _ in range(rng.randint(2, 4)):  # sauce showing through the cheese
        a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, r - 12 * k)
        _disc(draw, x + dist * math.cos(a), y + dist * math.sin(a), rng.uniform(3, 5) * k, (238, 200, 145))


def _base_salad(draw: Draw, d: Dish, k: float, rng: random.Random) -> None:
    x, y, r = d.cx * k, d.cy * k, d.radius * k
    _disc(draw, x, y, r, (243, 243, 238), (175, 175, 170), k * 0.6)
    draw.ellipse((x - r + 3 * k, y - r + 3 * k, x + r - 3 * k, y + r - 3 * k), outline=(215, 215, 210),
                 width=int(k * 0.5))
    # Lettuce: a ring of leaves and a few in the middle, covering where the ingredients lie.
    start = rng.uniform(0, 2 * math.pi)
    spots = [(r - 13 * k, start + 2 * math.pi * i / 7) for i in range(7)]
    spots += [(rng.uniform(0, 5 * k), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
    for dist, a in spots:
        green = rng.choice(((80, 160, 60), (100, 175, 65), (70, 145, 55)))
        draw.polygon(_poly(x + dist * math.cos(a), y + dist * math.sin(a), _oval(9 * k, 6 * k),
                           rng.uniform(0, math.pi)), fill=green)


def _bowl_rim(draw: Draw, d: Dish, k: float, inset: float, inner: RGB) -> None:
    x, y, r = d.cx * k, d.cy * k, d.radius * k
    _disc(draw, x, y, r, d.rim, _darker(d.rim), k * 0.8)
    _disc(draw, x, y, r - inset * k, inner)


def _base_soup(draw: Draw, d: Dish, k: float, rng: random.Random) -> None:
    _bowl_rim(draw, d, k, 4.5, (140, 85, 45))  # a dark broth: pale, bright and red pieces all show
    x, y, r = d.cx * k, d.cy * k, (d.radius - 6.5) * k
    draw.arc((x - r, y - r, x + r, y + r), 200, 250, fill=(180, 125, 75), width=int(1.2 * k))  # a gleam


def _base_bowl(draw: Draw, d: Dish, k: float, rng: random.Random) -> None:
    _bowl_rim(draw, d, k, 4.0, (246, 243, 232))
    x, y, r = d.cx * k, d.cy * k, (d.radius - 5) * k
    for _ in range(70):  # rice grains
        a, dist = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.random())
        draw.polygon(_poly(x + dist * math.cos(a), y + dist * math.sin(a), _oval(1.2 * k, 0.5 * k, 8),
                           rng.uniform(0, math.pi)), fill=(218, 214, 200))


def _base_sandwich(draw: Draw, d: Dish, k: float, rng: random.Random) -> None:
    x, y, r = d.cx * k, d.cy * k, d.radius * k
    _disc(draw, x, y, r, (243, 243, 238), (175, 175, 170), k * 0.6)  # the plate
    half = r * 0.72
    crust, crumb = (175, 110, 45), (245, 222, 170)
    for c, inset in ((crust, 0.0), (crumb, 2.5 * k)):
        h = half - inset
        draw.rectangle((x - h, y - h * 0.55, x + h, y + h), fill=c)
        draw.ellipse((x - h, y - h * 1.15, x + h, y + h * 0.05), fill=c)  # the domed top of a slice


BASES = {"pizza": _base_pizza, "salad": _base_salad, "soup": _base_soup, "bowl": _base_bowl,
         "sandwich": _base_sandwich}


# One function per look: (draw, x, y, r, angle, ingredient, rng), in supersampled pixels.
def _look_slice(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    _disc(draw, x, y, r, ing.colour)
    _disc(draw, x, y, r * 0.6, ing.accent)


def _look_ring(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), outline=ing.colour, width=int(max(r * 0.45, 4)))


def _look_leaf(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, [(-r, 0), (-r * 0.3, -r * 0.55), (r * 0.5, -r * 0.4), (r, 0), (r * 0.5, r * 0.4),
                              (-r * 0.3, r * 0.55)], a), fill=ing.colour)
    draw.line(_poly(x, y, [(-r, 0), (r * 0.7, 0)], a), fill=ing.accent, width=int(r * 0.15))


def _look_cap(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    deg = math.degrees(a)
    draw.pieslice((x - r, y - r, x + r, y + r), deg + 180, deg + 360, fill=ing.colour, outline=ing.accent,
                  width=int(r * 0.12))
    draw.polygon(_poly(x, y, [(-r * 0.25, 0), (r * 0.25, 0), (r * 0.25, r * 0.6), (-r * 0.25, r * 0.6)], a),
                 fill=ing.accent)


def _look_cube(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, [(-r, -r), (r, -r), (r, r), (-r, r)], a % (math.pi / 2)), fill=ing.colour,
                 outline=ing.accent, width=int(r * 0.25))


def _look_egg(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, _oval(r, r * 0.85, 16), a), fill=ing.colour, outline=(200, 200, 195),
                 width=int(r * 0.08))
    _disc(draw, x + r * 0.1, y, r * 0.38, ing.accent)


def _look_arc(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    deg = math.degrees(a)
    box = (x - r, y - r, x + r, y + r)
    draw.arc(box, deg, deg + 220, fill=ing.accent, width=int(r * 0.75))
    draw.arc((x - r * 0.92, y - r * 0.92, x + r * 0.92, y + r * 0.92), deg + 8, deg + 212, fill=ing.colour,
             width=int(r * 0.55))


def _look_dot(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    _disc(draw, x, y, r, ing.colour, ing.accent, r * 0.3)


def _look_strip(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    w = r * 0.3
    draw.polygon(_poly(x, y, [(-r, -w), (r, -w), (r, w), (-r, w)], a), fill=ing.colour, outline=ing.accent,
                 width=int(w * 0.4))


def _look_slab(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    w, h = r, r * 0.7
    draw.polygon(_poly(x, y, [(-w, -h), (w, -h), (w, h), (-w, h)], a), fill=ing.colour, outline=_darker(ing.colour),
                 width=int(r * 0.1))
    for t in (-0.35, 0.35):  # fat lines / marbling
        draw.line(_poly(x, y, [(w * t, -h * 0.9), (w * t, h * 0.9)], a), fill=ing.accent, width=int(r * 0.15))


def _look_chunk(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    points = [(r * rng.uniform(0.75, 1.1) * math.cos(t), r * rng.uniform(0.75, 1.1) * math.sin(t))
              for t in (2 * math.pi * i / 6 for i in range(6))]
    draw.polygon(_poly(x, y, points, a), fill=ing.colour, outline=ing.accent, width=int(r * 0.18))


def _look_crescent(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, _oval(r, r * 0.5), a), fill=ing.accent)
    draw.polygon(_poly(x, y, [(px * 0.92, py * 0.8 - r * 0.08) for px, py in _oval(r, r * 0.5)], a), fill=ing.colour)


def _look_wave(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    points = [(t, r * 0.3 * math.sin(t / r * 3 * math.pi)) for t in np.linspace(-r, r, 16)]
    draw.line(_poly(x, y, points, a), fill=ing.accent, width=int(r * 0.36))
    draw.line(_poly(x, y, points, a), fill=ing.colour, width=int(r * 0.22))


def _look_bean(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, _oval(r, r * 0.6, 12), a), fill=ing.colour, outline=ing.accent, width=int(r * 0.2))


def _look_wedge(draw: Draw, x: float, y: float, r: float, a: float, ing: Ingredient, rng: random.Random) -> None:
    draw.polygon(_poly(x, y, [(-r, r * 0.7), (r, r * 0.7), (0, -r)], a), fill=ing.colour, outline=ing.accent,
                 width=int(r * 0.18))


LOOKS = {"slice": _look_slice, "ring": _look_ring, "leaf": _look_leaf, "cap": _look_cap, "cube": _look_cube,
         "egg": _look_egg, "arc": _look_arc, "dot": _look_dot, "strip": _look_strip, "slab": _look_slab,
         "chunk": _look_chunk, "crescent": _look_crescent, "wave": _look_wave, "bean": _look_bean,
         "wedge": _look_wedge}
