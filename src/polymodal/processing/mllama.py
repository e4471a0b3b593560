"""Llama 3.2 Vision's processor (Meta 2024, "Llama 3.2: Revolutionizing edge AI and vision with open, customizable
models"; the model card's image preprocessing, as transformers' `MllamaImageProcessor` and `MllamaProcessor` implement
it).

An image is cut into square tiles, each seen by the vision tower on its own; the decoder reads the tiles' features
through cross-attention, so each image is a single <|image|> token in the prompt:

    image (H, W) -> the best canvas of a x b tiles, a * b <= max_image_tiles (4): the smallest upscale that fits the
                    image, else the largest downscale, the smaller canvas on a tie (`optimal_canvas`)
                 -> resized to fit that canvas, aspect ratio kept (bilinear, antialiased), never below one tile a side
                 -> zero-padded at the bottom and right to the canvas, rescaled and normalized (the padding too: a
                    padded pixel is (0 - mean) / std, as the reference pads before normalizing)
                 -> a * b tiles of 3 x tile_size x tile_size, row by row
    pixel_values (B, max_images, max_image_tiles, 3, tile, tile): missing tiles and images are zeros
    aspect_ratio_ids (B, max_images): 1 + the index of (a, b) in `supported_aspect_ratios`, 0 for no image
    aspect_ratio_mask (B, max_images, max_image_tiles): 1 for the tiles an image has (the first always, as the
                    reference sets it even for missing images)
    cross_attention_mask (B, T, max_images, max_image_tiles): which tiles each token attends to. A token attends to
                    the image of the last <|image|> before it, up to the next one; <|image|> tokens in a row are one
                    group, and each of them is attended to until the group's span ends (`cross_attention_mask`)

`MllamaProcessor(messages)` returns `{"input_ids", "attention_mask", "cross_attention_mask", "pixel_values",
"aspect_ratio_ids", "aspect_ratio_mask"}` (only the first two without an image), keys and values as transformers'
`MllamaProcessor` returns them, rows left-padded. Checked against transformers' `MllamaProcessor` with its
torchvision (default) and its PIL image processor (tests/test_mllama_processor.py): the same ids and masks, pixel values
within 1e-5.

Why it is fast (benchmarks/bench_mllama_processor.py): the output is allocated once and every image is decoded,
resized (torch's uint8 antialiased kernel on the PIL buffer, as in `ImageProcessor`) and written tile by tile straight
into its slots, normalized as it is written, on the shared image pool; no padded canvas, no split copy, no stacking.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from polymodal.processing import buffers
from polymodal.processing.image import _PIL_FILTERS, CLIP_MEAN, CLIP_STD, HALF, ImageProcessor, _normalize, image_pool
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

MAX_IMAGE_TILES = 64  # released checkpoints use 4; each tile of an image is 3 x 560^2 floats (3.8 MB) in the output
MAX_TILE_SIZE = 4096
DEFAULT_MAX_IMAGES = 8  # images per prompt: each is max_image_tiles x 3.8 MB of pixels, and cross-attention keys
_BY_NUMBER = {v: k for k, v in _PIL_FILTERS.items()}

# Llama-3.2-11B-Vision-Instruct's chat template, as the hub ships it: for tokenizers that carry none, such as those
# built for tests. Images allow no system message; without images a system header with the date comes first. (One
# long string is written as two joined by ~, for the line length; the rendered text is the same.)
LLAMA32_VISION_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a " ~
            "function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# -------------------------------------------------------------------------------------------- tiling


@lru_cache(maxsize=64)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every arrangement of a x b tiles with a * b <= max_image_tiles, a the outer loop: ((1, 1), (1, 2), (1, 3),
    (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)) for 4. An image's aspect_ratio_id is 1 + the index of its (rows, columns)
    here, the order the vision tower's aspect-ratio embeddings are stored in."""
    return tuple((a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1)
                 if a * b <= max_image_tiles)


@lru_cache(maxsize=1024)
def optimal_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """(canvas height, canvas width) in pixels, multiples of tile_size, for an image of height x width.

    Each arrangement's scale is the smaller of canvas / image along the two sides (the image fits it at that scale).
    The smallest scale >= 1 wins (the least upscaling); with none, the largest below 1 (the least downscaling); among
    equal scales, the smallest canvas area, the first in `supported_aspect_ratios` order on a tie. The same float64
    divisions and exact comparisons as transformers' `get_optimal_tiled_canvas`, so the choice agrees."""
    canvases = [(a * tile_size, b * tile_size) for a, b in supported_aspect_ratios(max_image_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    best = None
    for (ch, cw), s in zip(canvases, scales):
        if s == chosen and (best is None or ch * cw < best[0] * best[1]):
            best = (ch, cw)
    assert best is not None
    return best


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """(h, w) an image of height x width is resized to inside its canvas: each side's target is the image's side
    clamped to [tile_size, canvas side], and the side that needs the smaller scale takes its target while the other
    follows at that scale (floored, at least 1, at most its own target), as transformers'
    `get_image_size_fit_to_canvas`."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """The [start, end) positions each image of a row is attended from: from its <|image|> token to the next one
    (the last: to the end of the row); a token directly followed by another <|image|> (a group of images) keeps
    attending until the group's span ends. transformers' `get_cross_attention_token_mask`."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(at, at[1:] + [len(ids)])]
    end = len(ids)
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(input_ids: Tensor, num_tiles: list[list[int]], max_image_tiles: int,
                         image_token_id: int) -> Tensor:
    """input_ids (B, T) and each row's images' tile counts -> (B, T, max_images, max_image_tiles) int64: 1 where a
    token attends to a tile (`cross_attention_spans`; only the tiles an image has)."""
    B, T = input_ids.shape
    out = torch.zeros(B, T, max(len(n) for n in num_tiles), max_image_tiles, dtype=torch.long)
    for b, (row, tiles) in enumerate(zip(input_ids.tolist(), num_tiles)):
        for j, ((start, end), n) in enumerate(zip(cross_attention_spans(row, image_token_id), tiles)):
            out[b, start:end, j, :n] = 1
    return out


# -------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class MllamaImageProcessor:
    """Images -> Llama 3.2 Vision's tiles: `{"pixel_values" (B, I, max_image_tiles, 3, tile, tile), "aspect_ratio_ids"
    (B, I), "aspect_ratio_mask" (B, I, max_image_tiles), "num_tiles" [[a * b, ...], ...]}` (the last is not a model
    input: the processor builds the cross-attention mask from it).

    The defaults are Llama-3.2-11B-Vision's preprocessor_config.json (560-px tiles, at most 4, CLIP's mean and std);
    `from_hf` takes transformers' class defaults for what a config leaves out. backend: "torch" resizes in torch's
    uint8 antialiased kernel, as transformers' default (torchvision) processor does; "pil" in PIL, as
    `MllamaImageProcessorPil` does."""

    tile_size: int = 560
    max_image_tiles: int = 4
    resample: str = "bilinear"
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = CLIP_MEAN
    image_std: tuple[float, ...] | None = CLIP_STD
    backend: Literal["torch", "pil"] = "torch"

    def __post_init__(self):
        if not _is_int(self.tile_size) or not 1 <= self.tile_size <= MAX_TILE_SIZE:
            raise ValueError(f"tile_size={self.tile_size!r}: expected an integer in [1, {MAX_TILE_SIZE}] (560 for "
                             "Llama 3.2 Vision)")
        if not _is_int(self.max_image_tiles) or not 1 <= self.max_image_tiles <= MAX_IMAGE_TILES:
            raise ValueError(f"max_image_tiles={self.max_image_tiles!r}: expected an integer in [1, "
                             f"{MAX_IMAGE_TILES}] (4 for Llama 3.2 Vision)")
        if self.backend not in ("torch", "pil"):
            raise ValueError(f"backend={self.backend!r}: expected 'torch' or 'pil'")
        # the resize and normalization are ImageProcessor's (same kernels, same fused arithmetic); it checks
        # resample, mean and std
        object.__setattr__(self, "_images", ImageProcessor(
            size=None, crop_size=None, resample=self.resample, rescale_factor=self.rescale_factor,
            image_mean=self.image_mean, image_std=self.image_std, backend=self.backend))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: Any = "preprocessor_config.json") -> MllamaImageProcessor:
        """From transformers' MllamaImageProcessor dict (`size` {"height", "width"}, equal: the tile; `max_image_tiles`,
        `resample`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`); what it leaves out
        takes the class's defaults (224-px tiles, 4 tiles, bilinear, mean = std = 0.5), as transformers reads it."""
        if cfg.get("do_resize") is False or cfg.get("do_pad") is False:
            raise ValueError(f"{source}: do_resize / do_pad off: Llama 3.2 Vision's images are always resized and "
                             "padded to their tiles (transformers refuses it too)")
        size = cfg.get("size", {"height": 224, "width": 224})
        if not isinstance(size, dict) or not _is_int(size.get("height")) or size.get("height") != size.get("width"):
            raise ValueError(f"{source}: size={size!r}: expected {{'height': n, 'width': n}}, the square tile")
        resample = _BY_NUMBER.get(cfg.get("resample", 2))
        if resample is None:
            raise ValueError(f"{source}: resample={cfg.get('resample')!r} is not a PIL filter number (0-5)")
        try:
            return cls(tile_size=size["height"], max_image_tiles=cfg.get("max_image_tiles", 4), resample=resample,
                       rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True)
                       else None,
                       image_mean=tuple(cfg.get("image_mean", HALF)) if cfg.get("do_normalize", True) else None,
                       image_std=tuple(cfg.get("image_std", HALF)) if cfg.get("do_normalize", True) else None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> MllamaImageProcessor:
        return replace(self, **changes)

    def plan(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((rows, columns) of tiles, (h, w) the image is resized to) for an image of height x width."""
        if height < 1 or width < 1:
            raise ValueError(f"an image of {width}x{height} has no pixels")
        ch, cw = optimal_canvas(height, width, self.max_image_tiles, self.tile_size)
        return (ch // self.tile_size, cw // self.tile_size), fit_to_canvas(height, width, ch, cw, self.tile_size)

    def aspect_ratio_id(self, rows: int, columns: int) -> int:
        return supported_aspect_ratios(self.max_image_tiles).index((rows, columns)) + 1

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, images: Any) -> dict[str, Any]:
        """One image, a list (the images of one prompt) or a list of lists (one per prompt) of PIL images, paths,
        bytes, uint8 `(H, W, 3)` arrays or uint8 `(C, H, W)` tensors -> the tiles, as transformers nests them."""
        samples = _nested(images)
        if not any(samples):
            raise ValueError("MllamaImageProcessor: got no images")
        return self.tiles(samples, lambda image, where: self._images._array(image, where))

    def inputs(self, images: Any) -> dict[str, Tensor]:
        """The model's image inputs: `{"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}`."""
        out = self(images)
        out.pop("num_tiles")
        return out

    def uint8(self, image: Any, index: Any = 0) -> Tensor:
        """Any accepted image -> uint8 `(H, W, C)` (C = 4: PIL's RGBX buffer, the 4th channel never read)."""
        return self._images._array(image, index)

    def tiles(self, samples: list[list[Any]], load: Callable[[Any, str], Tensor]) -> dict[str, Any]:
        """Each sample's images, loaded by `load(item, where) -> uint8 (H, W, C)` on the image pool, written into one
        output: the slots of missing images and tiles are zeroed, every other value is written once."""
        B, I, T, S = len(samples), max(len(s) for s in samples), self.max_image_tiles, self.tile_size
        # (B, I, T, C, S, S); ~15 MB per image slot at 560-px tiles, over recycled maps (faulting fresh pages in
        # cost more than the writing), every element written below
        pixels = buffers.empty(B, I, T, 3, S, S)
        view = pixels.numpy()
        shift, divisor, factor = self._images._affine_arrays(3)
        pad = np.empty((3, 1, 1), np.float32)  # a zero pixel, normalized: what the canvas is padded with
        _normalize(np.zeros((3, 1, 1), np.uint8), pad, shift, divisor, factor)
        jobs = [(b, i) for b, s in enumerate(samples) for i in range(len(s))]

        def prepare(job: tuple[int, int]) -> tuple[int, int]:
            b, i = job
            x = load(samples[b][i], f"images[{b}][{i}]")
            return self._write(x, view[b, i], (shift, divisor, factor), pad)

        grids = list(image_pool().map(prepare, jobs)) if len(jobs) > 1 else [prepare(jobs[0])]
        ids = torch.zeros(B, I, dtype=torch.long)
        mask = torch.zeros(B, I, T, dtype=torch.long)
        mask[:, :, 0] = 1  # the reference marks the first tile of every slot, empty ones too
        num_tiles: list[list[int]] = [[] for _ in samples]
        for (b, i), (rows, cols) in zip(jobs, grids):
            ids[b, i] = self.aspect_ratio_id(rows, cols)
            mask[b, i, : rows * cols] = 1
            num_tiles[b].append(rows * cols)
        for b, s in enumerate(samples):
            if len(s) < I:
                pixels[b, len(s):] = 0
        return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask, "num_tiles": num_tiles}

    def _write(self, x: Tensor, dst: np.ndarray, affine: tuple, pad: np.ndarray) -> tuple[int, int]:
        """One uint8 `(H, W, C)` image -> its tiles in dst `(max_image_tiles, 3, S, S)`, normalized as they are
        written; the canvas beyond the resized image is `pad`, the tiles beyond the canvas zeros."""
        (rows, cols), (h, w) = self.plan(x.shape[0], x.shape[1])
        y = self._images._resize(x, (h, w)).numpy()  # (h, w, C) uint8
        S = self.tile_size
        for r in range(rows):
            th = min(max(h - r * S, 0), S)  # the image's rows in this tile row
            for c in range(cols):
                tw = min(max(w - c * S, 0), S)
                tile = dst[r * cols + c]  # (3, S, S)
                if th < S:
                    tile[:, th:, :] = pad
                if tw < S and th:
                    tile[:, :th, tw:] = pad
                if th and tw:
                    src = y[r * S : r * S + th, c * S : c * S + tw, :3].transpose(2, 0, 1)  # (3, th, tw) view
                    _normalize(src, tile[:, :th, :tw], *affine)
        dst[rows * cols :] = 0
        return rows, cols


def _nested(images: Any) -> list[list[Any]]:
    """One image -> [[image]]; a list of images -> [images] (one prompt's); a list of lists as it is."""
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(x, (list, tuple)) for x in images):
            return [list(x) for x in images]
        return [list(images)]
    return [[images]]


# -------------------------------------------------------------------------------------------- processor


class MllamaProcessor(ChatProcessor):
    """Chat messages with image parts -> Llama 3.2 Vision's inputs: `{"input_ids", "attention_mask",
    "cross_attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}` (see the module's docstring).

    Each image is one <|image|> token (the chat template writes it for each image part). A prompt that does not
    contain the bos token gets it after its leading <|image|> tokens, as transformers' processor writes it
    (`build_string_from_input`). max_images: the most images one prompt may hold, refused before any is read (each
    is up to max_image_tiles tiles of pixels and cross-attention keys). max_pixels: the largest image accepted, read
    from its header before it is decoded.
    """

    string_contents = True  # the template trims a system message's string content; it reads strings itself

    def __init__(self, tokenizer: TextTokenizer, image_processor: MllamaImageProcessor | None = None, *,
                 image_token: str = "<|image|>", max_images: int = DEFAULT_MAX_IMAGES,
                 context_length: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not _is_int(max_images) or max_images < 1:
            raise ValueError(f"max_images={max_images!r}: expected a positive number of images per prompt")
        super().__init__(tokenizer, {"image": image_token}, context_length=context_length, max_pixels=max_pixels)
        self.image_processor = image_processor or MllamaImageProcessor()
        self.image_token, self.image_token_id = self.media_tokens["image"]
        self.max_images = max_images

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: Literal["torch", "pil"] = "torch",
                        max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int = DEFAULT_MAX_PIXELS,
                        context_length: int | None = None) -> MllamaProcessor:
        """From what transformers' `MllamaProcessor.save_pretrained` writes: processor_config.json with the image
        processor nested (transformers 5), or the hub's preprocessor_config.json; the tokenizer files and chat
        template. config.json, when present, gives the context length and the image token id the model expects, and
        its vision tower's tile size and tile count must be the image processor's.

        backend: how images are resized, "torch" (transformers' default processor) or "pil" (its
        MllamaImageProcessorPil). max_pixels: the decode guard, the largest image read at all."""
        d = Path(directory)
        config = _read(d / "processor_config.json")
        model = _read(d / "config.json")
        nested = config.get("image_processor")
        where = d / "processor_config.json" if isinstance(nested, dict) else d / "preprocessor_config.json"
        cfg = nested if isinstance(nested, dict) else _read(d / "preprocessor_config.json")
        if not cfg:
            raise FileNotFoundError(f"{d}: no processor_config.json with an image_processor, and no "
                                    "preprocessor_config.json; is this a Llama 3.2 Vision checkpoint?")
        try:
            images = MllamaImageProcessor.from_hf(cfg, where).replace(backend=backend)
        except ValueError as e:
            raise CheckpointError(d, str(e)) from None
        vision = model.get("vision_config") if isinstance(model.get("vision_config"), dict) else {}
        for field, value, mine in (("image_size", vision.get("image_size"), images.tile_size),
                                   ("max_num_tiles", vision.get("max_num_tiles"), images.max_image_tiles)):
            if _is_int(value) and value != mine:
                raise CheckpointError(d, f"config.json's vision_config.{field} is {value}, but the image processor's "
                                      f"is {mine}: the vision tower would not take these tiles")
        tokenizer = TextTokenizer.from_pretrained(d)
        token = _token_text(_read(d / "tokenizer_config.json").get("image_token")) or "<|image|>"
        check_token_id(tokenizer, token, model.get("image_token_index", model.get("image_token_id")), d,
                       "image_token_index")
        text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
        context = context_length if context_length is not None else text.get("max_position_embeddings")
        return cls(tokenizer, images, image_token=token, max_images=max_images,
                   context_length=context if _is_int(context) else None, max_pixels=max_pixels)

    def __repr__(self) -> str:
        ip = self.image_processor
        return (f"MllamaProcessor(tile_size={ip.tile_size}, max_image_tiles={ip.max_image_tiles}, "
                f"max_images={self.max_images}, backend={ip.backend!r}, context_length={self.context_length})")

    # ---------------------------------------------------------------------------------------- family hooks

    def _prompt(self, text: str) -> str:
        """transformers' `build_string_from_input`: a prompt without the bos token gets it, after its leading
        <|image|> tokens (the chat template writes bos itself)."""
        bos = self.tokenizer.bos_token
        if not bos or bos in text:
            return text
        rest = text
        while rest.startswith(self.image_token):
            rest = rest[len(self.image_token):]
        return text[: len(text) - len(rest)] + bos + rest

    def _check(self, rows: list[list[int]], found: list[list[Media]], kind: str) -> None:
        for k, parts in enumerate(found):
            if len(parts) > self.max_images:
                name = f"{kind} {k}" if len(rows) > 1 else f"the {kind}"
                raise ValueError(f"{name} has {len(parts)} images, over the limit of {self.max_images} per prompt "
                                 "(max_images); send fewer images")
        super()._check(rows, found, kind)

    def _measure(self, media: Media) -> None:
        """One token per image whatever its size; the header is still read, so an image over the pixel guard (or not
        an image) is refused before anything is decoded or allocated."""
        media.state = image_size(media.source, self.max_pixels, media.where)
        media.tokens = 1

    def _inputs(self, rows: list[list[int]], found: list[list[Media]]) -> dict[str, Tensor]:
        ids, mask = self._batch(rows, found)  # left-padded; <|image|> is not expanded (one token each)
        if not any(found):
            return {"input_ids": ids, "attention_mask": mask}
        ip = self.image_processor
        out = ip.tiles(found, self._load)
        cross = cross_attention_mask(ids, out.pop("num_tiles"), ip.max_image_tiles, self.image_token_id)
        return {"input_ids": ids, "attention_mask": mask, "cross_attention_mask": cross, **out}

    def _load(self, media: Media, where: str) -> Tensor:
        x = self.image_processor.uint8(open_media_image(media, self.max_pixels), media.where)
        if tuple(x.shape[:2]) != media.state:  # the header was checked; the pixels must be what it said
            raise ValueError(f"{media.where}: the image decoded to {x.shape[1]}x{x.shape[0]}, but its header said "
                             f"{media.state[1]}x{media.state[0]}")
        return x
