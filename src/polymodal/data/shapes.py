"""ShapesWorld: seeded images of colored shapes with captions, questions and boxes; no download.

Every sample is a pure function of (seed, split, index), so a dataset of any size costs nothing to store and is the
same on every machine. The world follows the synthetic benchmarks that isolate composition: CLEVR (Johnson et al.,
2017) for objects with attributes, relations and question-answer pairs, and ShapeWorld (Kuhnle & Copestake, 2017)
for captions checked against a generated scene. Some (color, shape) combinations are held out of training
entirely: a model that handles them has composed attributes it learned separately, which is the generalization
we want to measure.

Two vocabularies:
- "classic" (the default, what `polymodal demo` uses): one object per image, 6 colors x 5 shapes, no size word in
  the caption ("a red circle"). Its pixels are those of the first ShapesWorld, draw for draw.
- "full": 10 colors x 8 shapes x 2 sizes, usually with 1-4 objects per image
  (`ShapesWorld(64, objects=(1, 4), vocab="full")`): "a large red circle left of a small blue square".

Each `Sample` carries the picture, a caption and alternative captions, question-answer pairs (count, color, shape,
existence, relative position) and one pixel box (x0, y0, x1, y1) per object for grounding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")

# combinations never shown in training; one per color and per shape, so every attribute is still seen
HELD_OUT = frozenset({("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "cross"),
                      ("purple", "square"), ("white", "triangle")})

ALL_COLORS: dict[str, tuple[int, int, int]] = {
    **COLORS,
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "pink": (245, 130, 190),
    "brown": (140, 85, 40),
}
ALL_SHAPES = (*SHAPES, "heart", "diamond", "hexagon")
ALL_HELD_OUT = HELD_OUT | {("orange", "heart"), ("cyan", "diamond"), ("pink", "hexagon"), ("brown", "star")}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Vocabulary:
    """The attributes a world draws from. `sizes=None` means one continuous size range and no size word."""

    colors: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    held_out: frozenset[tuple[str, str]]
    sizes: tuple[str, ...] | None = None


VOCABULARIES = {
    "classic": Vocabulary(COLORS, SHAPES, HELD_OUT),
    "full": Vocabulary(ALL_COLORS, ALL_SHAPES, ALL_HELD_OUT, sizes=("small", "large")),
}
# radius as a fraction of the cell an object lives in (the whole image when one object at most)
RADIUS = {None: (0.18, 0.32), "small": (0.20, 0.26), "large": (0.36, 0.46)}


@dataclass(frozen=True)
class Object:
    shape: str
    color: str
    size: str | None  # None in the classic vocabulary
    box: tuple[float, float, float, float]  # pixels, (x0, y0, x1, y1)
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """'large red circle' (or 'red circle' without sizes)."""
        return f"{self.size} {self.color} {self.shape}" if self.size else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    objects: tuple[Object, ...]
    captions: tuple[str, ...]  # the caption first, then other true descriptions
    qa: tuple[tuple[str, str], ...]  # (question, answer)

    @property
    def color(self) -> str:
        """The first object's color (the image's, in a one-object world)."""
        return self.objects[0].color

    @property
    def shape(self) -> str:
        """The first object's shape (the image's, in a one-object world)."""
        return self.objects[0].shape

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]


class ShapesWorld(torch.utils.data.Dataset):
    """A seeded world of shapes. `world.sample(i)` -> Sample; `world[i]` -> dict of tensors and strings.

    split: "train" (only seen color-shape combinations), "heldout" (only held-out ones) or "all".
    objects: objects per image, an int or an inclusive (min, max) range (at most 9).
    vocab: "classic", "full" or a Vocabulary.
    length: the size of the map-style dataset (`len(world)`); `sample(i)` works for any i >= 0.
    transform: applied to the dict that `world[i]` returns (see docs/data.md for its keys).
    """

    def __init__(self, image_size: int = 64, seed: int = 0, split: str = "train", *,
                 objects: int | tuple[int, int] = 1, vocab: str | Vocabulary = "classic", length: int = 10_000,
                 transform: Callable[[dict], object] | None = None):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        lo, hi = (objects, objects) if isinstance(objects, int) else objects
        if not 1 <= lo <= hi <= 9:
            raise ValueError(f"objects must be between 1 and 9 (an int or a (min, max) range), got {objects!r}")
        if isinstance(vocab, str):
            if vocab not in VOCABULARIES:
                raise ValueError(f"unknown vocab {vocab!r}; known: {sorted(VOCABULARIES)} or a Vocabulary")
            vocab = VOCABULARIES[vocab]
        self.image_size, self.seed, self.split = image_size, seed, split
        self.objects, self.vocab, self.length, self.transform = (lo, hi), vocab, length, transform
        combos = [(c, s) for c in vocab.colors for s in vocab.shapes]
        if split == "train":
            combos = [cs for cs in combos if cs not in vocab.held_out]
        elif split == "heldout":
            combos = [cs for cs in combos if cs in vocab.held_out]
        if len(combos) < hi:
            raise ValueError(f"split {split!r} has {len(combos)} color-shape combinations, fewer than {hi} objects")
        self.combos = combos
        self.grid = math.ceil(math.sqrt(hi))  # objects sit in distinct cells of a grid x grid layout: no overlap

    # ------------------------------------------------------------------------------------------ drawing

    def sample(self, i: int) -> Sample:
        rng = random.Random(f"{self.seed}:{self.split}:{i}")
        # With one object and no sizes these draws come in the first ShapesWorld's order (combination, background,
        # radius, centre, color jitter, angle), which keeps its images pixel for pixel: keep the order.
        k = rng.randint(*self.objects) if self.objects[0] != self.objects[1] else self.objects[0]
        picked: list[tuple[str, str]] = []
        while len(picked) < k:  # distinct combinations, so "the red circle" always names one object
            cs = self.combos[rng.randrange(len(self.combos))]
            if cs not in picked:
                picked.append(cs)
        n = self.image_size
        bg = tuple(rng.randrange(0, 60) for _ in range(3))
        img = Image.new("RGB", (n, n), bg)
        draw = ImageDraw.Draw(img)
        cell = n / self.grid
        cells = rng.sample(range(self.grid**2), k) if self.grid > 1 else [0]
        objs = []
        for (color, shape), c in zip(picked, cells):
            size = rng.choice(self.vocab.sizes) if self.vocab.sizes else None
            r = rng.uniform(*RADIUS[size]) * cell
            x0, y0 = (c % self.grid) * cell, (c // self.grid) * cell
            cx, cy = rng.uniform(x0 + r, x0 + cell - r), rng.uniform(y0 + r, y0 + cell - r)
            jitter = tuple(max(0, min(255, v + rng.randrange(-20, 21))) for v in self.vocab.colors[color])
            box = draw_shape(draw, shape, cx, cy, r, jitter, angle=rng.uniform(-0.3, 0.3))
            box = (max(0.0, box[0]), max(0.0, box[1]), min(float(n), box[2]), min(float(n), box[3]))
            objs.append(Object(shape, color, size, box, (cx, cy)))
        captions = _captions(objs)
        return Sample(img, captions[0], tuple(objs), captions, _questions(objs, self.combos, rng))

    def batch(self, start: int, size: int) -> list[Sample]:
        return [self.sample(i) for i in range(start, start + size)]

    # ---------------------------------------------------------------------------------- torch dataset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesWorld of length {self.length}")
        s = self.sample(i)
        item = {
            "image": torch.from_numpy(np.asarray(s.image).copy()).permute(2, 0, 1),  # (3, H, W) uint8
            "caption": s.caption,
            "boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),  # (K, 4) pixel xyxy
            "colors": [o.color for o in s.objects],
            "shapes": [o.shape for o in s.objects],
            "questions": [q for q, _ in s.qa],
            "answers": [a for _, a in s.qa],
        }
        return self.transform(item) if self.transform else item


# ---------------------------------------------------------------------------------------- language


def relation(a: Object, b: Object) -> str:
    """Where a is relative to b, along the axis that separates them most (image y grows downwards)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _a(phrase: str) -> str:
    """'a red circle', 'an orange heart'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _captions(objs: list[Object]) -> tuple[str, ...]:
    k = len(objs)
    count = f"{NUMBER_WORDS[k]} shape{'s' if k > 1 else ''}"
    if k == 1:
        return (_a(objs[0].name), count)
    if k == 2:
        a, b = objs
        return (f"{_a(a.name)} {relation(a, b)} {_a(b.name)}", f"{_a(b.name)} {relation(b, a)} {_a(a.name)}", count)
    names = [_a(o.name) for o in sorted(objs, key=lambda o: o.center[0])]  # left to right
    return (", ".join(names[:-1]) + f" and {names[-1]}", f"{count}: " + ", ".join(names), count)


def _questions(objs: list[Object], combos: list[tuple[str, str]], rng: random.Random) -> tuple[tuple[str, str], ...]:
    """Count, color, shape, existence (one yes, one no) and, with two objects or more, relative position.
    The absent object of the "no" question comes from the split's own combinations, so that the training text
    never names a held-out combination either."""
    k = len(objs)
    qa = [("how many shapes are there?", NUMBER_WORDS[k])]
    unique_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        qa.append((f"what color is the {o.shape}?", o.color))
    unique_color = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if unique_color:
        o = rng.choice(unique_color)
        qa.append((f"what shape is the {o.color} object?", o.shape))
    o = rng.choice(objs)
    qa.append((f"is there {_a(f'{o.color} {o.shape}')}?", "yes"))
    present = {(p.color, p.shape) for p in objs}
    absent = rng.choice([cs for cs in combos if cs not in present] or combos)
    qa.append((f"is there {_a(f'{absent[0]} {absent[1]}')}?", "no"))
    if k >= 2:
        a, b = rng.sample(objs, 2)
        rel = relation(a, b)
        asked = rel if rng.random() < 0.5 else OPPOSITE[rel]
        qa.append((f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?", "yes" if asked == rel else "no"))
        qa.append((f"where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", rel.split()[0]))
    return tuple(qa)


# ------------------------------------------------------------------------------------------ shapes


def shape_points(shape: str, r: float) -> list[tuple[float, float]]:
    """The outline of a polygon shape of radius r around (0, 0), before rotation."""
    if shape == "square":
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if shape == "triangle":
        return [(0, -r), (r * 0.95, r * 0.8), (-r * 0.95, r * 0.8)]
    if shape == "cross":
        t = r / 3
        return [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
                (-t, -t)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "heart":  # the classic parametric heart curve, scaled to radius r, point down
        pts = []
        for k in range(24):
            t = 2 * math.pi * k / 24
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 16, (-y - 2.5) * r / 14.5))
        return pts
    if shape == "diamond":
        return [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    if shape == "hexagon":
        return [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    raise ValueError(f"unknown shape {shape!r}; known: circle, {', '.join(ALL_SHAPES[1:])}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill,
               angle: float = 0.0) -> tuple[float, float, float, float]:
    """Draw one filled shape of radius r centred at (cx, cy), rotated by angle; return its box (x0, y0, x1, y1)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return (cx - r, cy - r, cx + r, cy + r)
    c, s = math.cos(angle), math.sin(angle)
    pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in shape_points(shape, r)]
    draw.polygon(pts, fill=fill)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))
