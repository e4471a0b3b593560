"""Boxes and points in a vision-language model's answer, parsed as data, converted to the original image's pixels,
and drawn.

Grounding models write coordinates in their own frame, and the frame is where answers go wrong silently:

    Qwen-VL, Qwen2-VL   <|object_ref_start|>the cat<|object_ref_end|><|box_start|>(120,340),(560,980)<|box_end|>
                        (Qwen-VL: <ref>the cat</ref><box>(120,340),(560,980)</box>), relative: 0-1000 on each axis
    Qwen2.5-VL          ```json [{"bbox_2d": [52, 148, 240, 421], "label": "cat"}, {"point_2d": [88, 190]}] ```
                        absolute, in the pixels of the image as the processor resized it (multiples of 28)

`parse_regions(text, frame)` returns `Region`s that carry their frame; `region.to_image((W, H))` converts one to the
original image's pixels (what `draw` and every caller outside the model should use). Malformed answers are normal
output, not errors: what does not parse is skipped, and a region is never invented from stray numbers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from PIL import Image, ImageDraw

FrameKind = Literal["relative", "resized", "image"]


@dataclass(frozen=True)
class Frame:
    """A coordinate space: `relative` (0..size on each axis, 1000 x 1000 for Qwen-VL and Qwen2-VL), `resized` (the
    pixels of the image as the processor resized it, size = its (width, height)), or `image` (the original
    image's pixels)."""

    kind: FrameKind
    size: tuple[float, float]  # (width, height) of the space

    def __post_init__(self):
        if not (len(self.size) == 2 and all(s > 0 for s in self.size)):
            raise ValueError(f"a frame's size is (width, height) > 0, got {self.size}")


RELATIVE_1000 = Frame("relative", (1000, 1000))


@dataclass(frozen=True)
class Region:
    """A box (x1, y1, x2, y2) or a point (x, y) in `frame`, with the label the model gave it (None if none)."""

    kind: Literal["box", "point"]
    coords: tuple[float, ...]
    label: str | None
    frame: Frame

    def to_image(self, image_size: tuple[int, int]) -> Region:
        """The region in the pixels of the original image (width, height), clamped to the image."""
        W, H = image_size
        sx, sy = W / self.frame.size[0], H / self.frame.size[1]
        xs = [min(max(v * sx, 0.0), W) for v in self.coords[0::2]]
        ys = [min(max(v * sy, 0.0), H) for v in self.coords[1::2]]
        coords = tuple(c for pair in zip(xs, ys) for c in pair)
        return replace(self, coords=coords, frame=Frame("image", (W, H)))

    def as_dict(self) -> dict[str, Any]:
        key = "bbox_2d" if self.kind == "box" else "point_2d"
        return {key: [round(c, 2) for c in self.coords], "label": self.label, "frame": self.frame.kind,
                "frame_size": list(self.frame.size)}


# ------------------------------------------------------------------------------------------------ parsing

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
# Qwen2-VL's special tokens, Qwen-VL's tags; the markers may be gone when the answer was decoded without special
# tokens, leaving "the cat(120,340),(560,980)", which the bare pattern still reads
_TAGGED = re.compile(
    r"(?:<\|object_ref_start\|>|<ref>)(?P<label>.*?)(?:<\|object_ref_end\|>|</ref>)\s*"
    rf"(?:<\|box_start\|>|<box>)(?P<boxes>(?:\s*{_PAIR}\s*,?)+)(?:<\|box_end\|>|</box>)", re.S)
_BOXED = re.compile(rf"(?:<\|box_start\|>|<box>)(?P<boxes>(?:\s*{_PAIR}\s*,?)+)(?:<\|box_end\|>|</box>)")
_BARE = re.compile(rf"(?P<label>[^()\n,.;:]*?)\s*{_PAIR}\s*,\s*{_PAIR}")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_regions(text: str, frame: Frame = RELATIVE_1000) -> list[Region]:
    """Every box and point the answer states, in `frame` (the model's: `RELATIVE_1000` for Qwen-VL/Qwen2-VL, the
    resized image's `Frame("resized", (w, h))` for Qwen2.5-VL). JSON items (`bbox_2d`, `point_2d`, with `label`)
    are read first; failing those, tagged boxes, then `(x1,y1),(x2,y2)` pairs in the text."""
    if not isinstance(text, str):
        raise TypeError(f"parse_regions takes the answer's text, not {type(text).__name__}")
    found = _json_regions(text, frame)
    if found:
        return found
    found = [r for m in _TAGGED.finditer(text) for r in _boxes(m["boxes"], m["label"].strip() or None, frame)]
    if found:
        return found
    found = [r for m in _BOXED.finditer(text) for r in _boxes(m["boxes"], None, frame)]
    if found:
        return found
    out = []
    for m in _BARE.finditer(text):
        label = m["label"].strip() or None
        out.append(Region("box", tuple(float(m[i]) for i in range(2, 6)), label, frame))
    return out


def _boxes(pairs: str, label: str | None, frame: Frame) -> list[Region]:
    """'(x1,y1),(x2,y2),(x1,y1),(x2,y2)' -> one box per two corners (an odd corner left over is dropped)."""
    corners = [(float(a), float(b)) for a, b in re.findall(_PAIR, pairs)]
    return [Region("box", (*corners[i], *corners[i + 1]), label, frame) for i in range(0, len(corners) - 1, 2)]


def _json_regions(text: str, frame: Frame) -> list[Region]:
    blocks = _FENCE.findall(text) or [text]
    out: list[Region] = []
    for block in blocks:
        value = _first_json(block)
        items = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
        for item in items:
            region = _json_item(item, frame)
            if region is not None:
                out.append(region)
    return out


def _first_json(block: str) -> Any:
    """The first JSON array or object in the block (models wrap it in prose), or None."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", block):
        try:
            return decoder.raw_decode(block, m.start())[0]
        except ValueError:
            continue
    return None


def _json_item(item: Any, frame: Frame) -> Region | None:
    if not isinstance(item, dict):
        return None
    label = item.get("label")
    label = label if isinstance(label, str) and label.strip() else None
    for key, kind, n in (("bbox_2d", "box", 4), ("point_2d", "point", 2)):
        value = item.get(key)
        if (isinstance(value, list) and len(value) == n
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return Region(kind, tuple(float(v) for v in value), label, frame)
    return None


# ------------------------------------------------------------------------------------------------ drawing

_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def draw(image: Image.Image, regions: list[Region]) -> Image.Image:
    """A copy of the image with each region drawn (boxes as rectangles, points as rings, labels above), every
    region first converted to the image's pixels."""
    out = image.convert("RGB").copy()
    pen = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    for k, region in enumerate(regions):
        color = _COLORS[k % len(_COLORS)]
        r = region.to_image(out.size)
        if r.kind == "box":
            x1, y1, x2, y2 = r.coords
            box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
            pen.rectangle(box, outline=color, width=width)
            anchor = (box[0], max(box[1] - 12, 0))
        else:
            x, y = r.coords
            radius = 3 * width
            pen.ellipse((x - radius, y - radius, x + radius, y + radius), outline=color, width=width)
            anchor = (x + radius, max(y - radius - 12, 0))
        if r.label:
            pen.text(anchor, r.label, fill=color)
    return out
