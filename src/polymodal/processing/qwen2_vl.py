"""Qwen2-VL's and Qwen2.5-VL's processor (Wang et al. 2024, "Qwen2-VL: Enhancing Vision-Language Model's Perception
of the World at Any Resolution"; Bai et al. 2025, "Qwen2.5-VL Technical Report").

Images keep their aspect ratio at (nearly) their own resolution ("naive dynamic resolution"):

    image (H, W) -> smart_resize: (h, w) multiples of 28 = patch 14 x merge 2, h * w within [min_pixels, max_pixels]
                 -> bicubic resize, rescale, CLIP mean/std
                 -> patches (t * gh * gw, 3 * 2 * 14 * 14), rows ordered (t, gh/2, gw/2, 2, 2) so the 2 x 2 merge of
                    the vision tower takes four consecutive rows; an image is one temporal patch of two equal frames
                 -> image_grid_thw (1, gh, gw), and gh * gw / 4 <|image_pad|> tokens in the prompt

A video is sampled at `fps` (2.0, qwen-vl-utils' rate; processing/video.py), resized like an image within the video
processor's own pixel range, and cut into temporal patches of two frames (an odd count repeats its last frame):
grid (n / 2, gh, gw), (n / 2) * gh * gw / 4 <|video_pad|> tokens. Qwen2.5-VL also takes `second_per_grid_ts`, the
seconds one temporal patch spans (2 / the sampled fps), for its time-aligned M-RoPE.

`Qwen2VLProcessor(messages)` returns `{"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}`, only the keys that apply. Every image's and video's
token count comes from its header (image size; video frame size, rate and frame count) before anything is decoded,
so the context check, the pixel guard and the video budgets all run before a large allocation.

Checked against transformers' `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` with their torchvision (default) and PIL
image processors (tests/test_qwen2_vl_processor.py): the same ids, masks and grids, pixel values within 1e-5.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from polymodal.processing import buffers
from polymodal.processing.grounding import RELATIVE_1000, Frame
from polymodal.processing.image import CLIP_MEAN, CLIP_STD, FORMATS, ImageTooLarge, image_pool, open_image, to_rgb
from polymodal.processing.text import TextTokenizer
from polymodal.processing.video import (
    Video,
    VideoError,
    VideoTooLarge,
    frames_video,
    probe_video,
    read_video,
    sample_indices,
)
from polymodal.processing.vlm import (
    DEFAULT_MAX_PIXELS,
    ChatProcessor,
    Media,
    _is_frames,
    _is_int,
    _read,
    _token_text,
    check_token_id,
    open_media_image,
)
from polymodal.weights.checkpoint import CheckpointError

# PIL's filter numbers as preprocessor_config.json stores them; torch's uint8 antialiased kernel for the two that
# transformers' torchvision backend runs there
_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_TORCH = {"bilinear", "bicubic"}
_FRAMES_FPS = 24.0  # transformers' VideoMetadata.sampled_fps for frames given without a rate


# Qwen2-VL-7B-Instruct's chat template, as the hub ships it (Qwen2.5-VL's is the same): for tokenizers that carry
# none, such as those built for tests and the training recipes
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(h, w) for an image of (height, width): multiples of `factor`, h * w within [min_pixels, max_pixels], the
    aspect ratio kept as closely as the multiples allow.

    Each side is first rounded to the nearest multiple; when the area is then too large, both sides are scaled by
    sqrt(area / max_pixels) and floored to multiples (at least one), when too small scaled up and ceiled. Python's
    round (half to even), floor and ceil, as Qwen2-VL's reference does, so the grid (and the token count) agree."""
    if height < 1 or width < 1:
        raise ValueError(f"an image of {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height}: the aspect ratio is over 200, which Qwen2-VL's resizing "
                         "refuses; crop or pad it first")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# -------------------------------------------------------------------------------------------- images, frames


@dataclass(frozen=True)
class Qwen2VLImageProcessor:
    """Images (or a video's frames) -> Qwen2-VL's patches `(sum t * gh * gw, C * temporal * patch * patch)` and their
    grids `(N, 3)`: smart_resize within [min_pixels, max_pixels], resize, rescale + normalize, patchify.

    backend: "torch" resizes in torch's uint8 antialiased kernel, as transformers' default (torchvision) processor
    does; "pil" in PIL, as `Qwen2VLImageProcessorPil` does."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    backend: Literal["torch", "pil"] = "torch"

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels:,} is over max_pixels={self.max_pixels:,}")
        if self.resample not in _FILTERS.values():
            raise ValueError(f"resample={self.resample!r}: expected one of {sorted(_FILTERS.values())}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"image_mean={self.image_mean}, image_std={self.image_std}: three values each, "
                             "no zero std")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: Any = "preprocessor_config.json",
                defaults: tuple[int, int] = (56 * 56, 28 * 28 * 1280)) -> Qwen2VLImageProcessor:
        """From transformers' Qwen2-VL image (or video) processor dict: `size` as {"shortest_edge", "longest_edge"}
        (the pixel range), overridden by `min_pixels` / `max_pixels` where given, as transformers reads them."""
        size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
        low = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", defaults[0])))
        high = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels", defaults[1])))
        if cfg.get("do_resize") is False or cfg.get("do_rescale") is False or cfg.get("do_normalize") is False:
            raise ValueError(f"{source}: do_resize / do_rescale / do_normalize off is not supported for Qwen2-VL")
        resample = _FILTERS.get(cfg.get("resample", 3))
        if resample is None:
            raise ValueError(f"{source}: resample={cfg.get('resample')!r} is not a PIL filter number (0-5)")
        try:
            return cls(min_pixels=low, max_pixels=high, patch_size=cfg.get("patch_size", 14),
                       temporal_patch_size=cfg.get("temporal_patch_size", 2), merge_size=cfg.get("merge_size", 2),
                       resample=resample, rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                       image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                       image_std=tuple(cfg.get("image_std", CLIP_STD)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> Qwen2VLImageProcessor:
        return replace(self, **changes)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
        """(t, gh, gw) of an image (frames=1) or of a video of `frames` frames at (height, width)."""
        h, w = self.resized(height, width)
        return -(-frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def tokens(self, height: int, width: int, frames: int = 1) -> int:
        """The placeholder tokens one image (video) becomes: its patches after the merge_size x merge_size merge."""
        t, gh, gw = self.grid(height, width, frames)
        return t * gh * gw // self.merge_size**2

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, images: Any) -> tuple[Tensor, Tensor]:
        """One image or a list (PIL images, paths, bytes, uint8 `(H, W, 3)` arrays) -> (pixel_values,
        image_grid_thw)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("Qwen2VLImageProcessor: got an empty list of images")
        return self.patches([[self.resize(_uint8(im))] for im in items])

    def resize(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """A uint8 `(H, W, C)` image (or frame) at its smart_resize size (or `size`), still uint8 `(h, w, C)`."""
        h, w = size or self.resized(x.shape[0], x.shape[1])
        if (h, w) == tuple(x.shape[:2]):
            return x  # the references skip the resampler at the same size
        if self.backend == "pil" or self.resample not in _TORCH:
            im = Image.fromarray(np.ascontiguousarray(x[:, :, :3].numpy()))
            filters = {v: k for k, v in _FILTERS.items()}
            return torch.from_numpy(np.array(im.resize((w, h), filters[self.resample])))
        # (1, C, H, W) as a channels-last view of the (H, W, C) buffer: torch's vectorized uint8 antialiased
        # resampler works in that layout without a copy; the same kernel transformers reaches through torchvision
        y = F.interpolate(x.permute(2, 0, 1)[None], size=(h, w), mode=self.resample, antialias=True,
                          align_corners=False)
        return y[0].permute(1, 2, 0)

    def patches(self, clips: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        """Resized clips (each a list of uint8 `(h, w, C)` frames of one size; an image is a clip of one frame) ->
        (pixels `(sum t * gh * gw, 3 * T * P * P)`, grids `(N, 3)`), normalized as they are written.

        The frames of a clip are padded to a multiple of the temporal patch with its last frame (an image: its one
        frame twice), the duplication Qwen2-VL's 3-D patch embedding expects."""
        grids = [self.clip_grid(frames) for frames in clips]
        out, views = self.output(grids)
        for frames, view in zip(clips, views):
            self.write(frames, view)
        return out, torch.tensor(grids, dtype=torch.long)

    def clip_grid(self, frames: list[Tensor]) -> tuple[int, int, int]:
        """(t, gh, gw) of resized frames."""
        h, w = frames[0].shape[:2]
        P, m = self.patch_size, self.merge_size
        if h % (P * m) or w % (P * m):
            raise ValueError(f"frames of {w}x{h} are not multiples of {P * m}; resize them first")
        return -(-len(frames) // self.temporal_patch_size), h // P, w // P

    def output(self, grids: list[tuple[int, int, int]]) -> tuple[Tensor, list[Tensor]]:
        """The empty pixel tensor `(sum t * gh * gw, C * T * P * P)` for clips of these grids, and each clip's rows."""
        rows = [t * gh * gw for t, gh, gw in grids]
        out = _output(sum(rows), 3 * self.temporal_patch_size * self.patch_size**2)  # (N, C * T * P * P)
        return out, list(out.split(rows))

    def write(self, frames: list[Tensor], rows: Tensor) -> None:
        """One clip's patches, normalized, into its rows of the output (the images of a batch are written side by
        side, each into its own rows)."""
        T, P, m = self.temporal_patch_size, self.patch_size, self.merge_size
        t, gh, gw = self.clip_grid(frames)
        n = t * gh * gw
        shift = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)  # fused rescale + normalize, as
        divisor = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)  # transformers' default processor
        # the uint8 pixels gathered into patch order first, (t, gh/m, gw/m, m, m, C, Tp, P, P) from
        # (t, Tp, gh/m, m, P, gw/m, m, P, C): a byte copy; the float passes then run over contiguous memory (a
        # float gather straight from the image, with its 14-pixel runs, took two to four times as long)
        if len(frames) == 1:  # an image: one frame, repeated over the temporal patch once normalized
            x = frames[0][..., :3].reshape(1, 1, gh // m, m, P, gw // m, m, P, 3)
        else:
            x = torch.stack(frames + [frames[-1]] * (t * T - len(frames)))[..., :3]  # (t * T, h, w, C)
            x = x.reshape(t, T, gh // m, m, P, gw // m, m, P, 3)
        u = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).contiguous().view(n, 3, -1, P * P)  # (n, C, Tp, P * P)
        view = rows.view(n, 3, T, P * P)
        if len(frames) == 1:
            f = u.float().sub_(shift.view(3, 1, 1)).div_(divisor.view(3, 1, 1))  # (n, C, 1, P * P)
            view.copy_(f.expand(-1, -1, T, -1))
        else:
            torch.sub(u, shift.view(3, 1, 1), out=view)  # uint8 -> float32 as it is written
            view.div_(divisor.view(3, 1, 1))


@dataclass(frozen=True)
class Qwen2VLVideoProcessor(Qwen2VLImageProcessor):
    """The video side: the same patches within the video's own pixel range (transformers' defaults: 128 x 28^2 to
    768 x 28^2 per frame), frames sampled at `fps` with at least `min_frames` and at most `max_frames`.

    max_tokens: the visual-token budget of one video (None: none). A video whose sampled frames would become more
    tokens is fitted to it as qwen-vl-utils fits its total-pixel budget: first each frame is made smaller (down to
    `min_pixels`), then fewer frames are kept, spread evenly over the whole video (a lower, "dynamic" frame rate,
    which second_per_grid_ts reports). transformers has no such budget: at 768 frames of 768 x 28^2 pixels a
    ten-minute clip became 53,760 tokens and 3.3 GB of preprocessing; within 16,384 the whole hour stays bounded."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    max_tokens: int | None = 16384

    def fit(self, frames: int, height: int, width: int) -> tuple[int, tuple[int, int]]:
        """(frames to keep, (h, w) of each) for `frames` sampled frames of height x width, within `max_tokens`."""
        size = self.resized(height, width)
        T, unit = self.temporal_patch_size, self.factor**2  # a token: factor x factor pixels of a temporal patch
        groups = -(-frames // T)
        if self.max_tokens is None or groups * (size[0] * size[1] // unit) <= self.max_tokens:
            return frames, size
        cap = self.max_tokens // groups * unit  # the pixels per frame that keep every frame
        if cap >= self.min_pixels:
            size = smart_resize(height, width, self.factor, self.min_pixels, cap)
            if groups * (size[0] * size[1] // unit) <= self.max_tokens:
                return frames, size
        size = smart_resize(height, width, self.factor, self.min_pixels, self.min_pixels)
        keep = self.max_tokens // (size[0] * size[1] // unit)  # temporal patches at the smallest frames
        if keep < 1:
            raise VideoTooLarge(f"one temporal patch of {size[1]}x{size[0]} frames is {size[0] * size[1] // unit:,} "
                                f"tokens, over the video budget of {self.max_tokens:,} (max_tokens)")
        return min(frames, keep * T), size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: Any = "video_preprocessor_config.json",
                defaults: tuple[int, int] = (128 * 28 * 28, 768 * 28 * 28)) -> Qwen2VLVideoProcessor:
        """As the image processor's, plus `min_frames`, `max_frames`, and `fps` when `do_sample_frames` is on (else
        2.0: a video file is always sampled here, never decoded whole)."""
        base = Qwen2VLImageProcessor.from_hf(cfg, source, defaults)
        fps = cfg.get("fps") if cfg.get("do_sample_frames") and cfg.get("fps") else 2.0
        return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__}, fps=float(fps),
                   min_frames=int(cfg.get("min_frames", 4)), max_frames=int(cfg.get("max_frames", 768)))


def _output(rows: int, cols: int) -> Tensor:
    """An uninitialized float32 `(rows, cols)` tensor: the patches of a few 1024-px photos are ~100 MB, whose pages
    freshly mapped on every call cost about as much as the preprocessing; `buffers.empty` recycles them."""
    return buffers.empty(rows, cols)
def _uint8(image: Any) -> Tensor:
    """A PIL image, path, bytes or uint8 array -> a uint8 `(H, W, C)` tensor (C = 4 for PIL's RGBX buffer)."""
    if isinstance(image, Tensor):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image))
    im = image if isinstance(image, Image.Image) else open_image(image)
    rgb = to_rgb(im)
    # PIL keeps RGB pixels in 4 bytes; RGBX skips its 3-byte packing, and the view needs no writable copy (every
    # later step only reads it). The 4th channel is dropped when the patches are written.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        pixels = torch.frombuffer(rgb.tobytes("raw", "RGBX"), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 4)


# ------------------------------------------------------------------------------------------------ headers


def image_size(src: Any, max_pixels: int, where: str) -> tuple[int, int]:
    """(height, width) of an image as `open_image` will give it (EXIF rotation applied), from its header alone.
    Whatever cannot be read, or claims more than `max_pixels`, is handed to `open_image` for its error."""
    if isinstance(src, Image.Image):
        w, h = src.size
        orientation = _orientation(src)
    else:
        try:
            fp: Any = src
            if isinstance(src, (bytes, bytearray, memoryview)):
                fp = io.BytesIO(bytes(src))
            elif isinstance(src, (str, os.PathLike)):
                fp = str(src)
            position = fp.tell() if hasattr(fp, "tell") and not isinstance(fp, io.BytesIO) else None
            with Image.open(fp, formats=[f for f in FORMATS if f in Image.OPEN]) as im:
                w, h = im.size
                orientation = _orientation(im)
            if position is not None:
                fp.seek(position)
        except Exception:  # noqa: BLE001 - open_image says what is wrong with it, in its words
            _refuse(src, max_pixels, where)
            raise
    if w * h > max_pixels or w < 1 or h < 1:
        _refuse(src, max_pixels, where)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # transposed by exif_transpose


def _refuse(src: Any, max_pixels: int, where: str) -> None:
    try:
        open_image(src, max_pixels=max_pixels)
    except ImageTooLarge as e:
        raise type(e)(f"{where}: {e}") from None
    except ValueError as e:
        raise type(e)(f"{where}: {e}") from None
    raise ValueError(f"{where}: the image's header could not be read")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is read as no rotation, as open_image does
        return 1


# ------------------------------------------------------------------------------------------------ processor


class Qwen2VLProcessor(ChatProcessor):
    """Chat messages with image and video parts -> Qwen2-VL's (Qwen2.5-VL's) inputs.

    Video parts: `{"type": "video", "video": <path, bytes or a list of frames>}` (also "path", "url" with a data:
    URL, "base64", and `{"type": "video_url", "video_url": {"url": ...}}`); a part may carry `"fps"`, the rate of
    its frames (a list of frames without one is taken at 24 fps, as transformers takes it). Video files are sampled
    at the video processor's `fps` (2.0) and decoded in one streaming pass.

    second_per_grid_ts: also return the seconds each temporal patch spans (Qwen2.5-VL's input).
    """

    def __init__(self, tokenizer: TextTokenizer, image_processor: Qwen2VLImageProcessor | None = None,
                 video_processor: Qwen2VLVideoProcessor | None = None, *, image_token: str = "<|image_pad|>",
                 video_token: str = "<|video_pad|>", second_per_grid_ts: bool = False,
                 boxes: Literal["relative", "resized"] | None = None, context_length: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(tokenizer, {"image": image_token, "video": video_token}, context_length=context_length,
                         max_pixels=max_pixels)
        self.image_processor = image_processor or Qwen2VLImageProcessor()
        self.video_processor = video_processor or Qwen2VLVideoProcessor()
        self.image_token, self.image_token_id = self.media_tokens["image"]
        self.video_token, self.video_token_id = self.media_tokens["video"]
        self.second_per_grid_ts = second_per_grid_ts
        # the frame of the boxes the model writes: Qwen2-VL's 0-1000 relative ones; Qwen2.5-VL (the processor that
        # gives second_per_grid_ts) was trained on absolute coordinates in the resized image's pixels
        self.boxes = boxes or ("resized" if second_per_grid_ts else "relative")

    def box_frame(self, width: int, height: int) -> Frame:
        """The frame of the boxes and points the model writes about an image of width x height (the original):
        `processing.grounding.parse_regions(answer, frame)` reads them, `region.to_image((width, height))` maps
        them back to that image's pixels."""
        if self.boxes == "relative":
            return RELATIVE_1000
        h, w = self.image_processor.resized(height, width)
        return Frame("resized", (w, h))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backend: Literal["torch", "pil"] = "torch",
                        max_pixels: int = DEFAULT_MAX_PIXELS, context_length: int | None = None,
                        min_pixels: int | None = None, image_max_pixels: int | None = None) -> Qwen2VLProcessor:
        """From what transformers' `Qwen2VLProcessor` / `Qwen2_5_VLProcessor.save_pretrained` writes:
        processor_config.json with the image and video processors nested (transformers 5), or the hub's
        preprocessor_config.json (+ video_preprocessor_config.json); the tokenizer files and chat template.
        `processor_class` Qwen2_5_VLProcessor (or config.json's model_type qwen2_5_vl) adds second_per_grid_ts.
        config.json, when present, gives the context length and the image / video token ids the model expects.

        min_pixels / image_max_pixels override the image processor's pixel range (transformers' min_pixels /
        max_pixels); max_pixels is the decode guard, the largest image or frame read at all. backend: how images are
        resized, "torch" (transformers' default processor) or "pil" (its Qwen2VLImageProcessorPil)."""
        d = Path(directory)
        config = _read(d / "processor_config.json")
        model = _read(d / "config.json")
        pre = _read(d / "preprocessor_config.json")
        images_cfg = config.get("image_processor") if isinstance(config.get("image_processor"), dict) else pre
        videos_cfg = (config.get("video_processor") if isinstance(config.get("video_processor"), dict)
                      else _read(d / "video_preprocessor_config.json") or pre)
        if not images_cfg and not videos_cfg:
            raise FileNotFoundError(f"{d}: no processor_config.json with an image_processor, and no "
                                    "preprocessor_config.json; is this a Qwen2-VL checkpoint?")
        try:
            images = Qwen2VLImageProcessor.from_hf(images_cfg, d / "processor_config.json").replace(backend=backend)
            # transformers' video processor has no PIL class: its frames are always resized by torch's kernel
            videos = Qwen2VLVideoProcessor.from_hf(videos_cfg, d / "processor_config.json")
            if min_pixels is not None or image_max_pixels is not None:
                images = images.replace(min_pixels=min_pixels or images.min_pixels,
                                        max_pixels=image_max_pixels or images.max_pixels)
        except ValueError as e:
            raise CheckpointError(d, str(e)) from None
        tokenizer = TextTokenizer.from_pretrained(d)
        tok_cfg = _read(d / "tokenizer_config.json")
        image_token = _token_text(tok_cfg.get("image_token")) or "<|image_pad|>"
        video_token = _token_text(tok_cfg.get("video_token")) or "<|video_pad|>"
        check_token_id(tokenizer, image_token, model.get("image_token_id"), d, "image_token_id")
        check_token_id(tokenizer, video_token, model.get("video_token_id"), d, "video_token_id")
        kind = str(config.get("processor_class") or pre.get("processor_class") or "")
        qwen25 = kind.startswith("Qwen2_5_VL") or model.get("model_type") == "qwen2_5_vl"
        text = model.get("text_config") if isinstance(model.get("text_config"), dict) else model
        context = context_length if context_length is not None else text.get("max_position_embeddings")
        return cls(tokenizer, images, videos, image_token=image_token, video_token=video_token,
                   second_per_grid_ts=qwen25, context_length=context if _is_int(context) else None,
                   max_pixels=max_pixels)

    def __repr__(self) -> str:
        return (f"Qwen2VLProcessor(images={self.image_processor.min_pixels:,}-{self.image_processor.max_pixels:,} px, "
                f"videos={self.video_processor.min_pixels:,}-{self.video_processor.max_pixels:,} px at "
                f"{self.video_processor.fps} fps, second_per_grid_ts={self.second_per_grid_ts}, "
                f"context_length={self.context_length})")

    # ---------------------------------------------------------------------------------------- family hooks

    def _measure(self, media: Media) -> None:
        """Tokens from the header: an image's size; a video's frame size and the frames its sampling keeps."""
        if media.kind == "image":
            h, w = image_size(media.source, self.max_pixels, media.where)
            media.state = (h, w)
            media.tokens = self.image_processor.tokens(h, w)
            return
        vp = self.video_processor
        src, fps = media.source, None
        if isinstance(src, dict):  # a part's {"video": ..., "fps": ...}, see _media_source
            src, fps = src["video"], src.get("fps")
        try:
            if _is_frames(src):
                video = frames_video(src, media.where, fps=fps, max_pixels=self.max_pixels)
                first = video.frames[0]
                h, w = (first.height, first.width) if isinstance(first, Image.Image) else first.shape[:2]
                frames, size = vp.fit(len(video.frames), h, w)
                if frames < len(video.frames):  # over the budget: fewer frames, spread over the whole video
                    picked = [i * len(video.frames) // frames for i in range(frames)]
                    video = Video([video.frames[i] for i in picked], picked, video.fps, video.total_frames)
                media.state = (video, None, size)
            else:
                position = src.tell() if hasattr(src, "seek") else None  # a file object is read again later
                info = probe_video(src, max_pixels=self.max_pixels)
                if position is not None:
                    src.seek(position)
                indices = sample_indices(info.total_frames, info.fps, fps=vp.fps, min_frames=vp.min_frames,
                                         max_frames=vp.max_frames, temporal_patch_size=vp.temporal_patch_size)
                h, w = info.height, info.width
                frames, size = vp.fit(len(indices), h, w)
                if frames < len(indices):  # over the budget: fewer frames, spread over the whole video
                    indices = sample_indices(info.total_frames, info.fps, fps=None, num_frames=frames,
                                             temporal_patch_size=vp.temporal_patch_size)
                    frames = len(indices)
                # every frame goes to the size the header's frame size gives, the one its tokens were counted at
                media.state = (src, indices, size)
        except (VideoError, ValueError) as e:
            raise type(e)(f"{media.where}: {e}") from None
        t = -(-frames // vp.temporal_patch_size)
        media.tokens = t * (size[0] // vp.patch_size) * (size[1] // vp.patch_size) // vp.merge_size**2

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        if kind == "image":
            ip = self.image_processor

            sizes = [ip.resized(*m.state) for m in media]  # from the headers: the output is allocated first
            grids = [(1, h // ip.patch_size, w // ip.patch_size) for h, w in sizes]
            pixels, views = ip.output(grids)

            def prepare(k: int) -> None:
                m = media[k]
                x = _uint8(open_media_image(m, self.max_pixels))
                if tuple(x.shape[:2]) != m.state:  # the header and the pixels must agree, or the count is wrong
                    raise ValueError(f"{m.where}: the image decoded to {x.shape[1]}x{x.shape[0]}, but its header "
                                     f"said {m.state[1]}x{m.state[0]}")
                ip.write([ip.resize(x, sizes[k])], views[k])

            # each image decoded, resized and written into its own rows; PIL's decoding and torch's kernels release
            # the GIL, so the images of a batch overlap
            if len(media) > 1:
                list(image_pool().map(prepare, range(len(media))))
            else:
                prepare(0)
            grids = torch.tensor(grids, dtype=torch.long)
            return {"pixel_values": pixels, "image_grid_thw": grids}
        vp = self.video_processor
        clips, rates = [], []
        for m in media:
            video = self._frames(m)
            clips.append(video.frames)
            rate = video.sampled_fps or _FRAMES_FPS
            rates.append(vp.temporal_patch_size / rate)
        pixels, grids = vp.patches(clips)
        out = {"pixel_values_videos": pixels, "video_grid_thw": grids}
        if self.second_per_grid_ts:
            out["second_per_grid_ts"] = torch.tensor(rates)
        return out

    def _frames(self, media: Media) -> Video:
        """The video's frames, each resized as it is decoded (a file's) or converted (given frames)."""
        vp = self.video_processor
        first, indices, size = media.state
        try:
            if indices is None:
                video: Video = first
                video.frames = [vp.resize(_uint8(f), size) for f in video.frames]
                return video
            return read_video(first, indices=indices, max_pixels=self.max_pixels,
                              transform=lambda rgb: vp.resize(torch.from_numpy(rgb), size))
        except (VideoError, ValueError) as e:
            raise type(e)(f"{media.where}: {e}") from None
