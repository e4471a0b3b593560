"""Opening images safely and turning them into model inputs.

`open_image` reads a path, bytes, a file object or a PIL image into an RGB `PIL.Image`, refusing what should
not be decoded (missing files, non-images, truncated files, decompression bombs, absurd frame counts) with
an `ImageError` that names the input and says what to do.

`ImageProcessor` is the inference transform of CLIP (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") and ViT (Dosovitskiy et al. 2020): resize, center crop,
rescale by 1/255, normalize by mean/std, batched into a float32 `(B, C, H, W)` tensor. Checked against
transformers' `CLIPImageProcessor` / `ViTImageProcessor` (both the default torchvision-backed class and the
PIL one) and open_clip's `image_transform` (tests/test_processing.py).

Why it is fast (benchmarks/bench_preprocess.py): the resize runs on the uint8 image in torch's vectorized
antialiased kernel, read straight from the PIL buffer as a channels-last view (no CHW copy, no float
image); only the cropped result is converted to float, and rescale + normalize is one fused pass over the
batch. That kernel is the one transformers' default processor reaches through torchvision, so the outputs
agree bit for bit.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from polymodal.weights.checkpoint import read_json

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image
Resample = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's dataset statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN/STD, used by ViT

# Decoders we let PIL use. Formats such as EPS hand the file to Ghostscript; we never want that on input
# that came from a user or the network.
FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "AVIF", "QOI")

# PIL's resampling filter numbers, as stored in `preprocessor_config.json` ("resample": 3 is bicubic).
_PIL_FILTERS: dict[Resample, int] = {
    "nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
}
_BY_NUMBER = {v: k for k, v in _PIL_FILTERS.items()}
# The filters torch's `interpolate` has; transformers' torchvision backend maps PIL NEAREST to nearest-exact.
_TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the input, the reason and what to do."""


class ImageTooLarge(ImageError):
    """An image refused for its size (pixels from the header, or frame count) before it was decoded."""


# --------------------------------------------------------------------------------------------- opening


def open_image(src: ImageSource, *, max_pixels: int = 64_000_000, max_frames: int = 10_000) -> Image.Image:
    """A decoded RGB `PIL.Image` from a path, bytes, a binary file object or a PIL image.

    The header is read first (`Image.open` is lazy): a pixel count above `max_pixels` or a frame count above
    `max_frames` is refused before anything is decoded, whatever PIL's global `MAX_IMAGE_PIXELS` says. The
    EXIF orientation is applied; transparent images are composited on white (as transformers' `convert_to_rgb`
    does); 16-bit and 32-bit grayscale is scaled to 8 bits instead of saturating.
    """
    name = _name(src)
    if isinstance(src, Image.Image):
        return _decode(src, name, max_pixels, max_frames)
    try:
        with _opened(src, name) as im:
            return _decode(im, name, max_pixels, max_frames)
    except Image.DecompressionBombError as e:  # Image.open's own check, for sizes above PIL's global limit
        raise ImageTooLarge(f"{name}: {e}; refusing to decode it") from None


def _decode(im: Image.Image, name: str, max_pixels: int, max_frames: int) -> Image.Image:
    _check_size(im, name, max_pixels, max_frames)
    try:
        im.load()
    except Image.DecompressionBombError as e:  # PIL's own limit, met while decoding (e.g. a larger frame)
        raise ImageTooLarge(f"{name}: {e}; refusing to decode it") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error) as e:
        raise ImageError(f"{name}: the image is truncated or corrupt ({e}); re-export or re-download it") from None
    if _orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` in mode RGB: transparency composited on white, high-bit-depth grayscale scaled to 8 bits.

    Compositing on white is what transformers' `convert_to_rgb` does (its CLIP and ViT processors call it);
    open_clip's `convert("RGB")` drops the alpha channel instead, so transparent pixels keep their stored color.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{_name(im)}: cannot convert image mode {im.mode!r} to RGB ({e})") from None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8: values beyond 255 are taken as 16-bit (0..65535)."""
    a = a.astype(np.float64)
    if a.size and a.max() > 255:
        a = a / 257.0  # 65535 -> 255
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _name(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or f"<PIL image {src.mode} {src.width}x{src.height}>"
    return str(getattr(src, "name", "") or f"<{type(src).__name__}>")


def source_file(src: Any, name: str, kind: str, error: type[ValueError], alternative: str) -> Any:
    """A path, bytes or a binary file object -> what a decoder opens (a path string, a BytesIO, the file object);
    `error` naming `name` for a missing path, a directory or any other value (`alternative`: the other form the
    caller takes, "a PIL image" or "a list of frames")."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise error(f"{name}: no such file; check the path")
        if path.is_dir():
            raise error(f"{name}: is a directory, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} file")
        return str(path)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if hasattr(src, "read"):
        return src
    raise error(f"{name}: not {'an' if kind[0] in 'aeiou' else 'a'} {kind} source; pass a path, bytes, a binary file "
                f"object or {alternative}")


def _opened(src: Any, name: str) -> Image.Image:
    fp = source_file(src, name, "image", ImageError, "a PIL image")
    try:
        return Image.open(fp, formats=_formats())
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image (none of {', '.join(FORMATS)} recognizes it); check that it is an image file"
        ) from None
    except Image.DecompressionBombError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise ImageError(f"{name}: cannot read the image header ({e}); the file looks corrupt") from None


def _formats() -> list[str]:
    Image.init()  # registers every plugin, as Image.open itself would
    return [f for f in FORMATS if f in Image.OPEN]


def _check_size(im: Image.Image, name: str, max_pixels: int, max_frames: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the header claims an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"{name}: the header claims {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            f"(possible decompression bomb); refusing to decode it. Pass max_pixels= if you trust this file"
        )
    frames = getattr(im, "n_frames", 1)
    if frames > max_frames:
        raise ImageTooLarge(
            f"{name}: the file claims {frames:,} frames, over the limit of {max_frames:,}; refusing to read it. "
            f"Pass max_frames= if you trust this file"
        )


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))  # EXIF Orientation tag
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1


# -------------------------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class ImageProcessor:
    """Images -> `(B, C, H, W)` float32: resize, center crop, rescale, normalize.

    size / resize_mode: `"shortest"` with an int scales the short side to `size` and the long side to
    `int(size * long / short)` (transformers' `{"shortest_edge": n}`, torchvision's `Resize(n)`); with
    `(h, w)` it keeps the aspect ratio so that the image covers `(h, w)` (timm/open_clip `ResizeKeepRatio`,
    rounded sizes). `"longest"` fits the image inside `(h, w)`. `"squash"` resizes to exactly `(h, w)`.
    `size=None` skips resizing.
    crop_size: center crop `(h, w)`, padding with `fill` where the image is smaller; None: no crop.
    crop_rounding: the crop offset of an odd margin: transformers floors it, torchvision (open_clip) rounds.
    backend: `"torch"` resizes in torch's uint8 kernel (transformers' default processor); `"pil"` in PIL
    (transformers' PIL processor, open_clip). lanczos / box / hamming always use PIL.
    pad_to_square: first pad the image to a square with the mean color, centered (the original LLaVA-1.5's
    `expand2square`, transformers' `LlavaImageProcessor(do_pad=True)`), so that the crop keeps the whole image.
    """

    size: int | tuple[int, int] | None = 224
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    resample: Resample = "bicubic"
    crop_size: tuple[int, int] | None = (224, 224)
    crop_rounding: Literal["floor", "round"] = "floor"
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = CLIP_MEAN
    image_std: tuple[float, ...] | None = CLIP_STD
    fill: int = 0
    mode: Literal["RGB", "L"] = "RGB"
    backend: Literal["torch", "pil"] = "torch"
    pad_to_square: bool = False

    def __post_init__(self):
        if self.resample not in _PIL_FILTERS:
            raise ValueError(f"resample={self.resample!r}: expected one of {sorted(_PIL_FILTERS)}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode={self.resize_mode!r}: expected 'shortest', 'longest' or 'squash'")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean and image_std must be given together")
        channels = 3 if self.mode == "RGB" else 1
        for field in ("image_mean", "image_std"):
            stats = getattr(self, field)
            if stats is not None and len(stats) != channels:
                raise ValueError(f"{field}={stats}: needs {channels} values for mode {self.mode!r}")

    # ---------------------------------------------------------------------------------------- presets

    @classmethod
    def clip(cls, size: int = 224) -> ImageProcessor:
        """OpenAI CLIP: short side to `size` (bicubic), center crop, CLIP mean/std (transformers' defaults)."""
        return cls(size=size, crop_size=(size, size))

    @classmethod
    def vit(cls, size: int = 224) -> ImageProcessor:
        """transformers' `ViTImageProcessor`: resize to exactly `size x size` (bilinear), mean = std = 0.5."""
        return cls(size=(size, size), resize_mode="squash", resample="bilinear", crop_size=None,
                   image_mean=HALF, image_std=HALF)

    @classmethod
    def blip(cls, size: int = 384) -> ImageProcessor:
        """transformers' `BlipImageProcessor` (BLIP, BLIP-2): resize to exactly `size x size` (bicubic), CLIP
        mean/std."""
        return cls(size=(size, size), resize_mode="squash", crop_size=None)

    @classmethod
    def imagenet(cls, size: int = 224) -> ImageProcessor:
        """The ImageNet evaluation recipe: short side to `size / 0.875` (256 for 224), bicubic, center crop,
        ImageNet mean/std (transformers' ResNet/ConvNeXt processors and timm's default crop_pct)."""
        return cls(size=int(size / 0.875), crop_size=(size, size), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)

    @classmethod
    def lenet(cls, size: int = 32) -> ImageProcessor:
        """LeNet-5 (LeCun et al. 1998): grayscale `size x size` (bilinear), MNIST mean/std."""
        return cls(size=(size, size), resize_mode="squash", resample="bilinear", crop_size=None,
                   image_mean=(0.1307,), image_std=(0.3081,), mode="L")

    # ---------------------------------------------------------------------------------- config files

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        """From a checkpoint directory: transformers' `preprocessor_config.json`, else the `image_processor` that
        transformers 5 nests in a processor's `processor_config.json`, else the `preprocess_cfg` of open_clip's
        `open_clip_config.json`."""
        d = Path(directory)
        hf, processor, oc = d / "preprocessor_config.json", d / "processor_config.json", d / "open_clip_config.json"
        if os.path.lexists(hf):
            return cls.from_hf(read_json(hf), source=hf)
        nested = read_json(processor).get("image_processor") if os.path.lexists(processor) else None
        if isinstance(nested, dict):
            return cls.from_hf(nested, source=f"{processor} (image_processor)")
        if os.path.lexists(oc):
            return cls.from_open_clip(read_json(oc).get("preprocess_cfg") or {})
        raise FileNotFoundError(
            f"{d}: no preprocessor_config.json, processor_config.json with an image_processor, or "
            "open_clip_config.json; use a preset such as ImageProcessor.clip()"
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: Any = "preprocessor_config.json") -> ImageProcessor:
        """From the dict of a transformers `preprocessor_config.json`. Missing fields take the defaults of its
        `image_processor_type` (CLIP, ViT, ConvNeXt or BLIP; CLIP's otherwise, LLaVA's too). `do_pad` is read for
        `LlavaImageProcessor` only, where it means `pad_to_square` (other processors pad to a size instead)."""
        kind = str(cfg.get("image_processor_type", "CLIPImageProcessor")).removesuffix("Fast").removesuffix("Pil")
        default = {"ViTImageProcessor": _HF_VIT, "ConvNextImageProcessor": _HF_CONVNEXT,
                   "BlipImageProcessor": _HF_BLIP}.get(kind, _HF_CLIP)
        c = {**default, **{k: v for k, v in cfg.items() if v is not None}}
        resample = _BY_NUMBER.get(int(c["resample"]))
        if resample is None:
            raise ValueError(f"{source}: resample={c['resample']!r} is not a PIL filter number (0-5)")
        size = _hf_size(c["size"], square=not default["shortest_default"], source=source)
        crop = _hf_size(c["crop_size"], square=True, source=source) if c["do_center_crop"] else None
        if kind == "ConvNextImageProcessor":  # short side to size/crop_pct, then crop; warped from 384 up
            edge = size if isinstance(size, int) else size[0]
            size, crop = (int(edge / c["crop_pct"]), (edge, edge)) if edge < 384 else ((edge, edge), None)
        return cls(
            size=size if c["do_resize"] else None,
            resize_mode="shortest" if isinstance(size, int) else "squash",
            resample=resample,
            crop_size=crop if crop is None else tuple(crop),
            rescale_factor=float(c["rescale_factor"]) if c["do_rescale"] else None,
            image_mean=tuple(c["image_mean"]) if c["do_normalize"] else None,
            image_std=tuple(c["image_std"]) if c["do_normalize"] else None,
            pad_to_square=kind == "LlavaImageProcessor" and bool(c.get("do_pad")),
        )

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict[str, Any], size: int | Sequence[int] | None = None) -> ImageProcessor:
        """From open_clip's `preprocess_cfg` (`open_clip_config.json`): `size`, `mean`, `std`, `interpolation`,
        `resize_mode`, `fill_color`. `size` (the model's image size) wins over the config's, as in open_clip."""
        c = {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
             "resize_mode": "shortest", "fill_color": 0, **preprocess_cfg}
        if size is not None:
            c["size"] = size
        s = c["size"]
        hw = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
        mode = c["resize_mode"]
        if mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"open_clip preprocess_cfg: unknown resize_mode {mode!r}")
        if mode == "squash":
            target: int | tuple[int, int] = hw
        elif mode == "shortest" and hw[0] == hw[1]:
            target = hw[0]  # open_clip uses torchvision's Resize(int) here: the truncating rule
        else:
            target = hw
        return cls(
            size=target, resize_mode=mode,
            resample="bilinear" if c["interpolation"] == "bilinear" else "bicubic",  # "random" is bicubic at eval
            crop_size=None if mode == "squash" else hw, crop_rounding="round",
            image_mean=tuple(c["mean"]), image_std=tuple(c["std"]), fill=int(c["fill_color"]),
        )

    def replace(self, **changes: Any) -> ImageProcessor:
        return replace(self, **changes)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(h, w) of every output, when it does not depend on the input: the crop, or a squashed size."""
        if self.crop_size is not None:
            return self.crop_size
        if self.size is not None and self.resize_mode == "squash":
            return (self.size, self.size) if isinstance(self.size, int) else self.size
        return None

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, images: ImageSource | np.ndarray | Tensor | Sequence[Any]) -> Tensor:
        """One image or a list of them (PIL images, paths, bytes, uint8 arrays `(H, W, C)`, uint8 tensors
        `(C, H, W)`) -> `(B, C, H, W)` float32."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("ImageProcessor: got an empty list of images")
        c = 3 if self.mode == "RGB" else 1
        affine = self._affine_arrays(c)
        size = self.output_size
        out = torch.empty(len(items), c, *size) if size is not None else None  # (B, C, H, W)

        def prepare(i: int) -> np.ndarray:
            # Each image's whole preparation, normalization included, runs in one worker: PIL's pixel copies, torch's
            # uint8 resampler and numpy's arithmetic all release the GIL, so a batch's images overlap. The
            # arithmetic is numpy's, not torch's: a torch op from a worker thread starts its own OpenMP team, and
            # teams from two workers on two cores cost more than the work (a batch of four 1024-px photos took
            # 1.6x as long).
            pixels = self._geometry(self._array(items[i], i)).numpy()  # (h, w, C) uint8
            src = pixels[:, :, :c].transpose(2, 0, 1)  # (c, h, w) view
            dst = out[i].numpy() if out is not None else np.empty(src.shape, np.float32)
            _normalize(src, dst, *affine)
            return dst

        if len(items) > 1:
            arrays = list(image_pool().map(prepare, range(len(items))))
        else:
            arrays = [prepare(0)]
        if out is not None:
            return out
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"images come out in different sizes {sorted(shapes)}; set crop_size or resize_mode='squash'"
            )
        return torch.from_numpy(np.stack(arrays))

    def inputs(self, images: ImageSource | np.ndarray | Tensor | Sequence[Any]) -> dict[str, Tensor]:
        """The model inputs of one image or a list: `{"pixel_values": (B, C, H, W)}`, what a pipeline passes to
        the model's image methods unchanged. Every image processor answers `inputs` with a dict named as the
        model's arguments, so a family whose images need more than pixels (a grid per image, tile ids) returns
        those beside them and no pipeline changes."""
        return {"pixel_values": self(images)}

    def _array(self, image: Any, index: int) -> Tensor:
        """Any accepted input -> a uint8 `(H, W, C)` tensor (PIL images are converted as `to_rgb` does)."""
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(
                    f"image {index}: tensors must be uint8 (C, H, W) with C = 1 or 3, got {image.dtype} "
                    f"{tuple(image.shape)}"
                )
            image = image.permute(1, 2, 0).cpu().numpy()
        if isinstance(image, np.ndarray):
            channels = image.shape[2] if image.ndim == 3 else 1
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3):
                raise ValueError(
                    f"image {index}: arrays must be uint8 (H, W), (H, W, 1) or (H, W, 3), got {image.dtype} "
                    f"{image.shape}"
                )
            image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        if not isinstance(image, Image.Image):
            image = open_image(image)
        rgb = to_rgb(image)
        if self.mode == "L":
            return torch.from_numpy(np.array(rgb.convert("L")))[:, :, None]
        # PIL keeps RGB pixels in 4 bytes; taking them as RGBX skips its 3-byte packing and torch's unpacking
        # (its vectorized resampler works on 4-byte pixels). The 4th channel is dropped after the crop. The tensor
        # views PIL's bytes without a writable copy (copying a 1024x1024 image into a bytearray took ~10x as long
        # as PIL's own export, most of LLaVA's preprocessing time): every later step only reads it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            pixels = torch.frombuffer(rgb.tobytes("raw", "RGBX"), dtype=torch.uint8)
        return pixels.view(rgb.height, rgb.width, 4)

    def _geometry(self, x: Tensor) -> Tensor:
        """Pad to a square (if asked), resize and center crop a uint8 `(H, W, C)` image."""
        if self.pad_to_square:
            x = self._pad_square(x)
        if self.size is not None:
            x = self._resize(x, self._resized_size(x.shape[0], x.shape[1]))
        if self.crop_size is not None:
            x = self._center_crop(x, *self.crop_size)
        return x

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.size
        if self.resize_mode == "shortest" and isinstance(s, int):
            # torchvision's rule (transformers' `get_resize_output_image_size`): truncate the long side
            return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        th, tw = (s, s) if isinstance(s, int) else s
        if self.resize_mode == "squash":
            return th, tw
        ratios = (h / th, w / tw)
        ratio = min(ratios) if self.resize_mode == "shortest" else max(ratios)
        return round(h / ratio), round(w / ratio)  # timm / open_clip ResizeKeepRatio

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if size == tuple(x.shape[:2]):
            return x  # the references skip the resampler too, so an image already at size passes unchanged
        if self.backend == "pil" or self.resample not in _TORCH_MODES:
            im = Image.fromarray(x[:, :, :3].numpy() if x.shape[2] >= 3 else x[:, :, 0].numpy())
            y = torch.from_numpy(np.array(im.resize(size[::-1], _PIL_FILTERS[self.resample])))
            return y if y.dim() == 3 else y[:, :, None]
        mode = _TORCH_MODES[self.resample]
        smooth = mode != "nearest-exact"
        # (1, C, H, W) as a channels-last view of the (H, W, C) buffer: the layout torch's vectorized uint8
        # antialiased resampler works in, so there is no copy in or out
        y = F.interpolate(x.permute(2, 0, 1)[None], size=size, mode=mode, antialias=smooth,
                          align_corners=False if smooth else None)
        return y[0].permute(1, 2, 0)

    def _pad_square(self, x: Tensor) -> Tensor:
        """The image centered on a square of its longer side, filled with the mean color as LLaVA-1.5's
        `expand2square` fills it: `int(255 * mean)` per channel ((122, 116, 104) for CLIP's mean)."""
        h, w, c = x.shape
        if h == w:
            return x
        side = max(h, w)
        color = [int(m * 255) for m in self.image_mean] if self.image_mean is not None else [0]
        out = x.new_empty((side, side, c))
        out[...] = torch.tensor(color + [0] * (c - len(color)), dtype=x.dtype)[:c]  # RGBX: X is dropped later
        top, left = (side - h) // 2, (side - w) // 2
        out[top : top + h, left : left + w] = x
        return out

    def _center_crop(self, x: Tensor, ch: int, cw: int) -> Tensor:
        h, w, c = x.shape
        if ch > h or cw > w:  # pad with `fill` first, the extra pixel of an odd margin going bottom/right
            padded = x.new_full((max(h, ch), max(w, cw), c), self.fill)
            top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
            padded[top : top + h, left : left + w] = x
            x, (h, w) = padded, padded.shape[:2]
        offset = (lambda m: m // 2) if self.crop_rounding == "floor" else (lambda m: int(round(m / 2.0)))
        top, left = offset(h - ch), offset(w - cw)
        return x[top : top + ch, left : left + cw]

    def _affine_arrays(self, c: int) -> tuple[np.ndarray | None, np.ndarray | None, np.float32 | None]:
        """(shift, divisor, factor) with output = (x - shift) / divisor, or x * factor; shift and divisor (c, 1, 1).

        Rescale and normalize are fused as transformers' default processor fuses them,
        (x - mean / r) / (std / r) with r the rescale factor, computed in float32 as torch computes it (mean/r and
        std/r rounded to float32 first; one rounding per subtraction and division), so the two agree to the last
        bit."""
        mean, std, r = self.image_mean, self.image_std, self.rescale_factor
        if mean is None or std is None:
            return None, None, None if r is None else np.float32(r)
        m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if r is not None:
            m, s = m * np.float32(1.0 / r), s * np.float32(1.0 / r)
        if bool((s == 0).any()):
            raise ValueError(f"image_std={std} contains a zero")
        if m.shape[0] != c and m.shape[0] == 1:
            m, s = np.repeat(m, c), np.repeat(s, c)
        return m[:c].reshape(-1, 1, 1), s[:c].reshape(-1, 1, 1), None


def _normalize(src: np.ndarray, dst: np.ndarray, shift: np.ndarray | None, divisor: np.ndarray | None,
               factor: np.float32 | None) -> None:
    """dst (c, h, w) float32 = (src - shift) / divisor, src * factor, or src, from uint8 src (c, h, w)."""
    if shift is not None:
        np.subtract(src, shift, out=dst, dtype=np.float32)
        np.divide(dst, divisor, out=dst)
    elif factor is not None:
        np.multiply(src, factor, out=dst, dtype=np.float32)
    else:
        dst[...] = src


_POOL: ThreadPoolExecutor | None = None


def image_pool() -> ThreadPoolExecutor:
    """The small thread pool every processor prepares the images of a batch on, side by side (one for all: two
    pools would put twice the threads on the same cores)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="polymodal-image")
    return _POOL


# transformers' class defaults, for configs that leave fields out
_HF_CLIP = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "shortest_default": True,
}
_HF_VIT = {
    **_HF_CLIP, "size": {"height": 224, "width": 224}, "resample": 2, "do_center_crop": False,
    "image_mean": HALF, "image_std": HALF, "shortest_default": False,
}
_HF_BLIP = {**_HF_CLIP, "size": {"height": 384, "width": 384}, "do_center_crop": False, "shortest_default": False}
_HF_CONVNEXT = {
    **_HF_CLIP, "size": {"shortest_edge": 384}, "do_center_crop": False, "crop_pct": 224 / 256,
    "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
}


def _hf_size(size: Any, square: bool, source: Any) -> int | tuple[int, int]:
    """transformers' size dict -> an int (shortest edge) or (h, w). A bare int means a square when `square`."""
    if isinstance(size, int):
        return (size, size) if square else size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            return int(size["shortest_edge"])
        if {"height", "width"} <= set(size):
            return int(size["height"]), int(size["width"])
    raise ValueError(
        f"{source}: size={size!r} is not supported; expected {{'shortest_edge': n}} or {{'height', 'width'}}"
    )
