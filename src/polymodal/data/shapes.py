"""ShapesWorld, first cut: seeded images of one colored shape each, with a caption.

Every image is drawn from a seed, so a dataset is a pure function of (seed, index) and costs no download.
Some (color, shape) combinations are held out of training entirely: a model that classifies them correctly
has composed the attributes it learned separately, which is the generalization we want to measure.
(The training issue extends this world with several objects, sizes, relations, questions and boxes.)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    color: str
    shape: str


class ShapesWorld:
    """`world.sample(i)` -> Sample for index i of the chosen split ("train": seen combinations, "heldout": the
    held-out ones, "all"). Deterministic in (seed, split, i)."""

    def __init__(self, image_size: int = 64, seed: int = 0, split: str = "train"):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        self.image_size, self.seed, self.split = image_size, seed, split
        combos = [(c, s) for c in COLORS for s in SHAPES]
        if split == "train":
            combos = [cs for cs in combos if cs not in HELD_OUT]
        elif split == "heldout":
            combos = [cs for cs in combos if cs in HELD_OUT]
        self.combos = combos

    def sample(self, i: int) -> Sample:
        rng = random.Random(f"{self.seed}:{self.split}:{i}")
        color, shape = self.combos[rng.randrange(len(self.combos))]
        n = self.image_size
        bg = tuple(rng.randrange(0, 60) for _ in range(3))
        img = Image.new("RGB", (n, n), bg)
        r = rng.uniform(0.18, 0.32) * n
        cx, cy = rng.uniform(r, n - r), rng.uniform(r, n - r)
        jitter = tuple(max(0, min(255, v + rng.randrange(-20, 21))) for v in COLORS[color])
        draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, jitter, angle=rng.uniform(-0.3, 0.3))
        return Sample(img, f"a {color} {shape}", color, shape)

    def batch(self, start: int, size: int) -> list[Sample]:
        return [self.sample(i) for i in range(start, start + size)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, angle: float = 0.0):
    """Draw one filled shape of radius r centred at (cx, cy)."""

    def poly(points):
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points], fill=fill)

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        poly([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif shape == "triangle":
        poly([(0, -r), (r * 0.95, r * 0.8), (-r * 0.95, r * 0.8)])
    elif shape == "cross":
        t = r / 3
        poly([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
              (-t, -t)])
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        poly(pts)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
