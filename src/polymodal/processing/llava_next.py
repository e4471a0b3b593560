"""LLaVA-NeXT's (LLaVA-1.6, Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") "anyres"
preprocessing and chat processor.

    image (H, W)
      -> the best canvas among image_grid_pinpoints      most of the image kept, least canvas wasted
      -> resized into it, aspect kept, centered, black   (e.g. 1024 x 1024 -> 672 x 672: a 2 x 2 grid of 336-px crops)
      -> crops of the tower's size, row by row, after    [whole image squashed to 336 x 336, crop 1, crop 2, ...]
         the whole image squashed to that size
    pixel_values (N, n_max, 3, S, S), image_sizes (N, 2) = the original (H, W); rows of images with fewer crops are
    zero after their last crop

Each <image> becomes the features the model packs for that image (models/llava_next.py): the whole image's grid,
then the crops' grid with the black bands' rows or columns cut away and one newline feature after each row. The
count depends only on (H, W), so it is read from the header before the image is decoded (`image_tokens`).

The geometry (`select_best_resolution`, `canvas_size`, `unpadded`) is shared with the model, which must cut the same
rows and columns out of its feature grid as this count assumes. Checked against transformers' LlavaNextProcessor
with its default (torchvision) image processor (tests/test_llava_next.py): the same ids, mask and image_sizes,
pixel values within 1e-5.

Why it is fast (benchmarks/bench_llava_next_processor.py): each image is resized twice in torch's uint8 kernel, as
the reference does, and then every crop is normalized straight from the resized image into its slot of the one
output tensor; the black canvas is never built (a crop's band outside the image is filled with the normalized value
of black), and no crop is copied, stacked or padded afterwards. Images run side by side on the shared image pool.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from polymodal.processing import buffers
from polymodal.processing.image import ImageProcessor, _normalize, image_pool
from polymodal.processing.qwen2_vl import image_size
from polymodal.processing.text import TextTokenizer
from polymodal.processing.vlm import (
    DEFAULT_MAX_PIXELS,
    ChatProcessor,
    Media,
    _is_int,
    _read,
    _token_text,
    check_token_id,
    open_media_image,
)
from polymodal.weights.checkpoint import CheckpointError

# transformers' LlavaNextConfig / LlavaNextImageProcessor default, and every llava-hf v1.6 checkpoint's: (h, w)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
MAX_CROPS = 64  # the released grids have at most 3 crops a side (4 + 1); each crop is 3 x 336^2 floats (1.35 MB)

# ------------------------------------------------------------------------------------------ the geometry


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (h, w) among `pinpoints` that keeps most of the image's pixels once it is scaled to fit (at most
    its own count: upscaling adds none), the one wasting least canvas on a tie; the first such in the list."""
    best, kept_best, wasted_best = pinpoints[0], -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > kept_best or (kept == kept_best and wasted < wasted_best):
            best, kept_best, wasted_best = (h, w), kept, wasted
    return tuple(best)


def canvas_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image resized into `canvas` with its aspect kept: the limiting side fills it, the other is
    rounded up (never past the canvas), as transformers' `get_patch_output_size` rounds it (400 x 600 into 672 x 672
    is 449 x 672: 400 * 1.12 is 448.00000000000006 in floating point)."""
    ch, cw = canvas
    scale_w, scale_h = cw / width, ch / height  # the scale first, then the product: its rounding decides the ceil
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), ch), cw
    return ch, min(math.ceil(width * scale_h), cw)


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The part of a (rows, cols) feature grid over the canvas that the image (height, width) covers, the black bands
    cut away -> (top, bottom, left, right). The grid is rescaled to the image's aspect and the band split evenly;
    the count of rows (columns) kept rounds as LLaVA-NeXT's `unpad_image` does (to 7 decimals, then truncated)."""
    if width / height > cols / rows:  # wider than the grid: bands above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def crop_grid(height: int, width: int, pinpoints: Sequence[tuple[int, int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tower-sized crops the image's best canvas is cut into."""
    ch, cw = select_best_resolution(height, width, pinpoints)
    return -(-ch // tile), -(-cw // tile)


def image_tokens(height: int, width: int, pinpoints: Sequence[tuple[int, int]], tile: int, patch: int,
                 base: int) -> int:
    """The features LLaVA-NeXT packs for an image of (height, width): `base` for the whole image, then its crops'
    feature grid (tile // patch features a side per crop) unpadded, with one newline feature per row."""
    rows, cols = crop_grid(height, width, pinpoints, tile)
    side = tile // patch
    top, bottom, left, right = unpadded(height, width, rows * side, cols * side)
    return base + (bottom - top) * (right - left + 1)


def check_pinpoints(pinpoints: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints as (h, w) pairs, each a grid of whole tower-sized crops (ValueError otherwise)."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    out = []
    for p in pinpoints:
        if (not isinstance(p, (list, tuple)) or len(p) != 2 or not all(_is_int(v) and v > 0 for v in p)):
            raise ValueError(f"image_grid_pinpoints: {p!r} is not a [height, width] pair of positive integers")
        h, w = p
        if h % tile or w % tile:
            raise ValueError(f"image_grid_pinpoints: {h}x{w} is not a grid of whole {tile}-px crops (the tower's "
                             "size); LLaVA-NeXT cuts each canvas into crops of that size")
        if (h // tile) * (w // tile) + 1 > MAX_CROPS:
            raise ValueError(f"image_grid_pinpoints: {h}x{w} makes {(h // tile) * (w // tile)} crops of {tile} px, "
                             f"over the limit of {MAX_CROPS - 1}")
        out.append((h, w))
    return tuple(out)


def _pairs(value: Any) -> Any:
    """Pinpoints as comparable (h, w) tuples (whatever they hold is checked later)."""
    try:
        return [tuple(p) for p in value]
    except TypeError:
        return value


# ------------------------------------------------------------------------------------------ processor


class LlavaNextProcessor(ChatProcessor):
    """Chat messages with image parts -> `{"input_ids", "attention_mask", "pixel_values", "image_sizes"}` for
    LLaVA-NeXT (pixel_values (N, n_max, 3, S, S), image_sizes (N, 2) as (height, width), N the images in reading
    order).

    image_processor: the crops' resampling and normalization (its crop_size is the tower's size S, and a crop of that
    size must pass its resize and center crop unchanged, as in every released checkpoint). pinpoints: the canvases
    (h, w), multiples of S. patch_size: the tower's patch. base_tokens: the features of the whole image (576 for
    LLaVA-NeXT's 336-px ViT-L/14, [CLS] dropped)."""

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor, *, pinpoints=DEFAULT_PINPOINTS,
                 patch_size: int = 14, base_tokens: int | None = None, image_token: str = "<image>",
                 context_length: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_visual_tokens: int | None = None):
        crop = image_processor.crop_size
        if crop is None or crop[0] != crop[1]:
            raise ValueError(f"LLaVA-NeXT's image processor needs a square crop_size (the tower's size), got {crop}")
        tile = crop[0]
        if image_processor.pad_to_square:
            raise ValueError("LLaVA-NeXT pads each image onto its canvas; pad_to_square is LLaVA-1.5's")
        passes = image_processor.size is None or image_processor._resized_size(tile, tile) == (tile, tile)
        if not passes:
            raise ValueError(f"the image processor resizes a {tile}-px crop (size={image_processor.size}); "
                             "LLaVA-NeXT's crops are already the tower's size, so size and crop_size must agree")
        if not _is_int(patch_size) or not 0 < patch_size <= tile:
            raise ValueError(f"patch_size={patch_size!r}: the tower's patch, at most the crop size {tile}")
        super().__init__(tokenizer, {"image": image_token}, context_length=context_length, max_pixels=max_pixels,
                         max_visual_tokens=max_visual_tokens)
        self.image_processor = image_processor
        self.tile = tile
        self.pinpoints = check_pinpoints(pinpoints, tile)
        self.patch_size = patch_size
        self.base_tokens = (tile // patch_size) ** 2 if base_tokens is None else base_tokens
        self.image_token, self.image_token_id = self.media_tokens["image"]
        s = image_processor.size
        self.base_size = (s, s) if isinstance(s, int) else tuple(s) if s is not None else (tile, tile)

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: Literal["torch", "pil"] = "torch",
                        max_pixels: int = DEFAULT_MAX_PIXELS, context_length: int | None = None,
                        max_visual_tokens: int | None = None) -> LlavaNextProcessor:
        """From what transformers' `LlavaNextProcessor.save_pretrained` writes: processor_config.json (`patch_size`,
        `vision_feature_select_strategy`, `num_additional_image_tokens`; transformers 5 nests the image processor
        there), else the hub's preprocessor_config.json (`image_grid_pinpoints`, sizes, normalization); the
        tokenizer files and chat template. config.json, when present, gives the context length and the image token
        id, and its pinpoints (the canvases the model packs with) must be the image processor's. backend: "torch"
        resizes as transformers' default image processor, "pil" as its LlavaNextImageProcessorPil."""
        d = Path(directory)
        config = _read(d / "processor_config.json")
        model = _read(d / "config.json")
        nested = config.get("image_processor")
        images_cfg = nested if isinstance(nested, dict) else _read(d / "preprocessor_config.json")
        if not images_cfg:
            raise FileNotFoundError(f"{d}: no processor_config.json with an image_processor, and no "
                                    "preprocessor_config.json; is this a LLaVA-NeXT checkpoint?")
        vision = model.get("vision_config") if isinstance(model.get("vision_config"), dict) else {}
        text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
        where = d / "processor_config.json"
        try:
            images = ImageProcessor.from_hf(images_cfg, source=where).replace(backend=backend)
        except ValueError as e:
            raise CheckpointError(d, str(e)) from None
        patch = config.get("patch_size", vision.get("patch_size"))
        strategy = config.get("vision_feature_select_strategy", model.get("vision_feature_select_strategy", "default"))
        extra = config.get("num_additional_image_tokens", 0)
        if not _is_int(patch) or patch < 1:
            raise CheckpointError(where, f"patch_size {patch!r}: the vision tower's patch size (e.g. 14) is needed "
                                  "to count each image's features")
        if strategy not in ("default", "full"):
            raise CheckpointError(where, f"vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
        if not _is_int(extra) or extra < 0:
            raise CheckpointError(where, f"num_additional_image_tokens {extra!r}: expected an integer >= 0")
        pinpoints = images_cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        packed = model.get("image_grid_pinpoints")
        if packed is not None and _pairs(packed) != _pairs(pinpoints):
            raise CheckpointError(d, f"the image processor's image_grid_pinpoints {_pairs(pinpoints)} differ from "
                                  f"config.json's {_pairs(packed)}: the model would lay the crops out on other "
                                  "canvases than they were cut from")
        token = _token_text(_read(d / "tokenizer_config.json").get("image_token")) or config.get("image_token")
        token = token if isinstance(token, str) else "<image>"
        tokenizer = TextTokenizer.from_pretrained(d)
        check_token_id(tokenizer, token, model.get("image_token_index", model.get("image_token_id")), d,
                       "image_token_index")
        context = context_length if context_length is not None else text.get("max_position_embeddings")
        crop = images.crop_size[0] if images.crop_size else 0
        # transformers' count: the whole image's patches, plus the extra tokens ([CLS]) it is told of, minus the one
        # "default" drops
        base = (crop // patch) ** 2 + extra - (strategy == "default")
        try:
            return cls(tokenizer, images, pinpoints=pinpoints, patch_size=patch, base_tokens=base, image_token=token,
                       context_length=context if _is_int(context) else None, max_pixels=max_pixels,
                       max_visual_tokens=max_visual_tokens)
        except ValueError as e:
            raise CheckpointError(d, str(e)) from None

    def __repr__(self) -> str:
        return (f"LlavaNextProcessor(tile={self.tile}, pinpoints={[list(p) for p in self.pinpoints]}, "
                f"patch_size={self.patch_size}, base_tokens={self.base_tokens}, image_token={self.image_token!r}, "
                f"context_length={self.context_length}, backend={self.image_processor.backend!r})")

    def tokens(self, height: int, width: int) -> int:
        """The tokens an image of (height, width) becomes (what its <image> expands to)."""
        return image_tokens(height, width, self.pinpoints, self.tile, self.patch_size, self.base_tokens)

    # ---------------------------------------------------------------------------------------- family hooks

    def _measure(self, media: Media) -> None:
        h, w = image_size(media.source, self.max_pixels, media.where)  # the header alone
        media.state = (h, w)
        media.tokens = self.tokens(h, w)

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        """Every image's crops written into one output, allocated from the headers' sizes before any decoding."""
        S = self.tile
        grids = [crop_grid(*m.state, self.pinpoints, S) for m in media]
        n_max = 1 + max(r * c for r, c in grids)
        out = buffers.empty(len(media), n_max, 3, S, S)  # (N, n_max, 3, S, S)

        def prepare(k: int) -> None:
            m = media[k]
            x = self.image_processor._array(open_media_image(m, self.max_pixels), k)  # (H, W, 4) uint8, RGBX
            if tuple(x.shape[:2]) != m.state:  # the header and the pixels must agree, or the count is wrong
                raise ValueError(f"{m.where}: the image decoded to {x.shape[1]}x{x.shape[0]}, but its header said "
                                 f"{m.state[1]}x{m.state[0]}")
            rows, cols = grids[k]
            self._write(x, out[k].numpy(), rows, cols)

        if len(media) > 1:
            list(image_pool().map(prepare, range(len(media))))
        else:
            prepare(0)
        return {"pixel_values": out, "image_sizes": torch.tensor([m.state for m in media], dtype=torch.long)}

    def _write(self, x: Tensor, dst: np.ndarray, rows: int, cols: int) -> None:
        """One image (H, W, C) uint8 -> its slots dst (n_max, 3, S, S): the whole image squashed to the tower's size,
        then the crops of its canvas row by row, normalized as they are written; the slots after them zero (the
        reference pads the batch with zeros after normalizing)."""
        ip, S = self.image_processor, self.tile
        H, W = x.shape[:2]
        affine = ip._affine_arrays(3)
        base = ip._geometry(ip._resize(x, self.base_size)).numpy()  # (S, S, C): the crop passes it unchanged
        _normalize(base[:, :, :3].transpose(2, 0, 1), dst[0], *affine)
        canvas = (rows * S, cols * S)
        h, w = canvas_size(H, W, select_best_resolution(H, W, self.pinpoints))
        resized = ip._resize(x, (h, w)).numpy()  # (h, w, C), centered on the black canvas
        top, left = (canvas[0] - h) // 2, (canvas[1] - w) // 2
        black = np.empty((3, 1, 1), np.float32)
        _normalize(np.zeros((3, 1, 1), np.uint8), black, *affine)  # what the canvas's zeros normalize to
        for r in range(rows):
            for c in range(cols):
                slot = dst[1 + r * cols + c]  # (3, S, S)
                y0, y1 = max(r * S, top), min((r + 1) * S, top + h)
                x0, x1 = max(c * S, left), min((c + 1) * S, left + w)
                if (y0, y1, x0, x1) != (r * S, (r + 1) * S, c * S, (c + 1) * S):
                    slot[...] = black  # a crop reaching into the bands
                if y0 < y1 and x0 < x1:
                    src = resized[y0 - top : y1 - top, x0 - left : x1 - left, :3].transpose(2, 0, 1)
                    _normalize(src, slot[:, y0 - r * S : y1 - r * S, x0 - c * S : x1 - c * S], *affine)
        dst[1 + rows * cols :] = 0
