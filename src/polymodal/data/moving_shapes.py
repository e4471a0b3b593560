"""MovingShapes: seeded short videos of ShapesWorld's shapes that move or appear, with timed questions; no download.

A clip is a scene in continuous time, sampled at a frame rate: frame k shows the scene at t = k / fps seconds. The
same scene (same index) sampled at 1, 2 or 4 fps shows the same events at the same seconds but at different frame
indices, which is what separates a model that places frames in time (Qwen2.5-VL's absolute-time M-RoPE, Bai et al.
2025, sec. 2.1.3) from one that counts frames (Qwen2-VL's M-RoPE, Wang et al. 2024). Like ShapesWorld
(`polymodal.data.shapes`), every clip is a pure function of (seed, split, index) and the rate it is sampled at.

Two kinds of clip, two objects of distinct colors each, on a dark background:

    appear  both objects still; the second one is absent until second s (an integer, 0 to duration - 1) and visible
            from then on.             "at what second did the red circle appear?" -> "2"
    move    one object glides from one place to another (left, right, up or down) between two whole seconds; the
            other stays.              "what moved?" -> "red circle", "where did the red circle go?" -> "left"

Color-shape combinations follow ShapesWorld's splits ("train" never draws a held-out pair, "heldout" only those).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from polymodal.data.shapes import COLORS, HELD_OUT, SHAPES, draw_shape

KINDS = ("appear", "move")
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards


@dataclass(frozen=True)
class Track:
    """One object over time: visible from `appear` seconds on; at `start` until `move[0]`, then linearly to `end`,
    which it reaches at `move[1]` and keeps (a still object has move=None and start == end)."""

    shape: str
    color: str
    fill: tuple[int, int, int]  # the exact RGB it is drawn with (the color name's RGB, jittered)
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]
    appear: int = 0
    move: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def visible(self, t: float) -> bool:
        return t >= self.appear

    def center(self, t: float) -> tuple[float, float]:
        if self.move is None or t <= self.move[0]:
            return self.start
        a = min(1.0, (t - self.move[0]) / (self.move[1] - self.move[0]))
        return (self.start[0] + a * (self.end[0] - self.start[0]), self.start[1] + a * (self.end[1] - self.start[1]))


@dataclass(frozen=True)
class Clip:
    frames: tuple[Image.Image, ...]  # RGB, frame k at times[k]
    fps: float
    duration: int  # seconds; the clip has duration * fps frames
    kind: str  # "appear" or "move"
    tracks: tuple[Track, ...]
    qa: tuple[tuple[str, str], ...]  # (question, answer)
    direction: str | None = None  # where the mover went (move clips)

    @property
    def times(self) -> list[float]:
        return [k / self.fps for k in range(len(self.frames))]


class MovingShapes:
    """A seeded world of short clips. `world.sample(i)` -> Clip at the rate index i draws from `fps`;
    `world.sample(i, fps=r)` -> the same scene sampled at r frames per second.

    frame_size: frames are frame_size x frame_size pixels. fps: the rates clips are drawn at. duration: an int or an
    inclusive (min, max) range of whole seconds. kinds: which kinds of clip to draw ("appear", "move")."""

    def __init__(self, frame_size: int = 56, seed: int = 0, split: str = "train", *,
                 fps: tuple[float, ...] = (1.0, 2.0, 4.0), duration: int | tuple[int, int] = (4, 8),
                 kinds: tuple[str, ...] = KINDS):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        lo, hi = (duration, duration) if isinstance(duration, int) else duration
        if not 2 <= lo <= hi <= 60:
            raise ValueError(f"duration must be whole seconds between 2 and 60 (an int or a (min, max) range), "
                             f"got {duration!r}")
        fps = tuple(float(r) for r in fps)
        if not fps or any(not math.isfinite(r) or r <= 0 or r * hi > 1000 for r in fps):
            raise ValueError(f"fps must be positive rates giving at most 1000 frames per clip, got {fps!r}")
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be some of {KINDS}, got {kinds!r}")
        if frame_size < 16:
            raise ValueError(f"frame_size must be at least 16 pixels, got {frame_size}")
        combos = [(c, s) for c in COLORS for s in SHAPES]
        if split == "train":
            combos = [cs for cs in combos if cs not in HELD_OUT]
        elif split == "heldout":
            combos = [cs for cs in combos if cs in HELD_OUT]
        self.frame_size, self.seed, self.split = frame_size, seed, split
        self.fps, self.duration, self.kinds, self.combos = fps, (lo, hi), tuple(kinds), combos

    def sample(self, i: int, fps: float | None = None) -> Clip:
        rng = random.Random(f"moving:{self.seed}:{self.split}:{i}")
        # the scene first, from its own stream: the rate never changes what happens, only when frames are taken
        kind = rng.choice(self.kinds)
        duration = rng.randint(*self.duration)
        a, b = self._pair(rng)
        n = self.frame_size
        bg = tuple(rng.randrange(0, 60) for _ in range(3))
        if kind == "appear":
            # two distinct quadrants of the frame; the second object appears at a whole second
            cells = rng.sample(range(4), 2)
            tracks = []
            for (color, shape), cell, appear in zip((a, b), cells, (0, rng.randrange(duration))):
                r = rng.uniform(0.28, 0.4) * n / 2
                x0, y0 = (cell % 2) * n / 2, (cell // 2) * n / 2
                c = (rng.uniform(x0 + r, x0 + n / 2 - r), rng.uniform(y0 + r, y0 + n / 2 - r))
                tracks.append(Track(shape, color, _jitter(rng, color), r, c, c, appear=appear))
            target = tracks[1]
            qa = ((f"at what second did the {target.name} appear?", str(target.appear)),)
            direction = None
        else:
            # the mover crosses its half of the frame along the direction; the other object sits in the other half
            direction = rng.choice(DIRECTIONS)
            dx, dy = _STEP[direction]
            r, r2 = rng.uniform(0.28, 0.4) * n / 2, rng.uniform(0.28, 0.4) * n / 2
            along = (r + 1, n - r - 1)  # the mover's centre stays inside the frame
            lo, hi = along[0] + rng.uniform(0, 0.1 * n), along[1] - rng.uniform(0, 0.1 * n)
            first, last = (lo, hi) if dx + dy > 0 else (hi, lo)
            side = rng.random() < 0.5  # which half (top/bottom for horizontal motion, left/right for vertical)
            across = rng.uniform(r, n / 2 - r) + (n / 2 if side else 0)
            other = rng.uniform(r2, n / 2 - r2) + (0 if side else n / 2)
            if dx:
                start, end, still = (first, across), (last, across), (rng.uniform(r2, n - r2), other)
            else:
                start, end, still = (across, first), (across, last), (other, rng.uniform(r2, n - r2))
            t0 = rng.randrange(duration - 1)
            t1 = rng.randint(t0 + 1, duration - 1)
            mover = Track(a[1], a[0], _jitter(rng, a[0]), r, start, end, move=(t0, t1))
            tracks = [mover, Track(b[1], b[0], _jitter(rng, b[0]), r2, still, still)]
            qa = (("what moved?", mover.name), (f"where did the {mover.name} go?", direction))
        angles = [rng.uniform(-0.3, 0.3) for _ in tracks]
        rate = fps if fps is not None else random.Random(f"moving-fps:{self.seed}:{self.split}:{i}").choice(self.fps)
        if not rate > 0:
            raise ValueError(f"fps must be positive, got {rate!r}")
        frames = []
        for k in range(max(1, round(duration * rate))):
            t = k / rate
            img = Image.new("RGB", (n, n), bg)
            draw = ImageDraw.Draw(img)
            for track, angle in zip(tracks, angles):
                if track.visible(t):
                    cx, cy = track.center(t)
                    draw_shape(draw, track.shape, cx, cy, track.radius, track.fill, angle=angle)
            frames.append(img)
        return Clip(tuple(frames), float(rate), duration, kind, tuple(tracks), qa, direction)

    def _pair(self, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
        """Two combinations of distinct colors, so that a color alone also names each object."""
        a = self.combos[rng.randrange(len(self.combos))]
        others = [cs for cs in self.combos if cs[0] != a[0]]
        return a, others[rng.randrange(len(others))]


def _jitter(rng: random.Random, color: str) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randrange(-20, 21))) for v in COLORS[color])
