"""Safe image opening and ImageProcessor parity with transformers and open_clip.

Tolerances: where both sides run the same resampler on the same uint8 pixels (our torch backend and
transformers' default torchvision-backed processor call the same kernel) the tensors must be identical.
Where the resamplers differ (torch vs PIL bicubic) a pixel may round one level apart, 1/255/std ~ 0.015 after
normalization; the issue allows 0.05. Where only the float arithmetic differs (same pixels, rescale and
normalize written differently) 1e-5 covers float32 rounding of values of size ~2.
"""

from __future__ import annotations

import io
import resource
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processing import ImageError, ImageProcessor, open_image

skimage_data = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")

RESAMPLED_ATOL = 0.05  # the bound for a different resampler (one uint8 level is ~0.015)
ARITH_ATOL = 1e-5  # same pixels, float32 arithmetic in another order


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage_data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]


def _png(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height RGB, written by hand: nothing of that size is ever allocated."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


def _save(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ open_image


def test_open_image_sources(tmp_path):
    im = Image.new("RGB", (5, 3), (10, 20, 30))
    path = tmp_path / "a.png"
    im.save(path)
    for src in (path, str(path), path.read_bytes(), open(path, "rb"), im):
        out = open_image(src)
        assert out.mode == "RGB" and out.size == (5, 3) and out.getpixel((0, 0)) == (10, 20, 30)


def test_missing_file_directory_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such file"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        open_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello, not an image")
    with pytest.raises(ImageError, match="notes.txt: not an image"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="not an image source"):
        open_image(42)


def test_eps_is_not_decoded(tmp_path):
    # EPS would be handed to Ghostscript: it is not among the formats we let PIL open
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "x.eps")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _save(noise, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(data[: len(data) * 6 // 10])


def test_decompression_bomb_refused_without_allocating():
    bomb = _png(100_000, 100_000)  # claims 10^10 pixels, 30 GB decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageError, match="pixels"):
        open_image(bomb)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200


def test_pixel_limit_is_ours_not_pils(monkeypatch):
    # with PIL's global check switched off (restored after the test) our header check still refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match=r"100000x100000 = 10,000,000,000 pixels, over the limit of 64,000,000"):
        open_image(_png(100_000, 100_000))
    monkeypatch.undo()
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="over the limit of 50"):
        open_image(_save(Image.new("RGB", (10, 10))), max_pixels=50)
    assert open_image(_save(Image.new("RGB", (10, 10))), max_pixels=100).size == (10, 10)
    assert Image.MAX_IMAGE_PIXELS == limit  # we never touch PIL's global


def test_absurd_frame_counts():
    # an APNG whose acTL chunk claims a billion frames: refused from the header
    actl = struct.pack(">II", 10**9, 0)
    apng = _png(2, 2, struct.pack(">I", 8) + b"acTL" + actl + struct.pack(">I", zlib.crc32(b"acTL" + actl)))
    with pytest.raises(ImageError, match=r"claims 1,000,000,00\d frames"):
        open_image(apng)
    frames = [Image.new("L", (4, 4), 20 * i) for i in range(12)]
    gif = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="12 frames, over the limit of 10"):
        open_image(gif, max_frames=10)
    assert open_image(gif).size == (4, 4)  # the first frame, under the default limit


def test_exif_orientation():
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    im.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = open_image(_save(im, exif=exif.tobytes()))
    assert out.size == (10, 20)  # portrait after rotation
    assert out.getpixel((5, 2)) == (255, 0, 0) and out.getpixel((5, 17)) == (0, 0, 255)  # left edge went on top


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    out = open_image(_save(rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> background
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and abs(g - 127) <= 1 and g == b  # half red over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert open_image(_save(la)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = open_image(_save(pal, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)
    # matches transformers' convert_to_rgb, the conversion its CLIP/ViT processors apply
    from transformers.image_transforms import convert_to_rgb

    assert np.array_equal(np.asarray(open_image(rgba)), convert_to_rgb(rgba, return_numpy=True))


def test_other_modes():
    assert open_image(_save(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), "TIFF")).getpixel((0, 0)) == (0, 255, 255)
    assert open_image(_save(Image.new("L", (2, 2), 77))).getpixel((1, 1)) == (77, 77, 77)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    out = open_image(_save(bits))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    # 16-bit grayscale is scaled to 8 bits (PIL's own convert would saturate everything above 255 to white)
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    out = open_image(_save(deep))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    ints = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert ints.mode == "I"
    assert [open_image(ints).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


# ------------------------------------------------------------------------------------------ processor


def _hf(kind: str, pil: bool = False, **kw):
    if kind == "clip":
        if pil:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
        else:
            cls = transformers.CLIPImageProcessor
    elif pil:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as cls
    else:
        cls = transformers.ViTImageProcessor
    return lambda images: cls(**kw)(images, return_tensors="pt").pixel_values


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_parity_with_transformers_on_photos(photos, kind):
    ours = ImageProcessor.clip() if kind == "clip" else ImageProcessor.vit()
    got = ours(photos)
    assert got.shape == (4, 3, 224, 224) and got.dtype == torch.float32
    # the default (torchvision-backed) processor runs the same uint8 kernel: identical tensors
    assert torch.equal(got, _hf(kind)(photos))
    # the PIL processor resamples with PIL: within a rounding level
    assert (got - _hf(kind, pil=True)(photos)).abs().max() <= RESAMPLED_ATOL
    # and our PIL backend is that processor up to float arithmetic
    assert torch.allclose(ours.replace(backend="pil")(photos), _hf(kind, pil=True)(photos), rtol=0, atol=ARITH_ATOL)


def test_exact_without_resampling(photos):
    im = photos[0].resize((224, 224))
    assert torch.equal(ImageProcessor.clip()(im), _hf("clip")([im]))
    assert torch.equal(ImageProcessor.vit()(im), _hf("vit")([im]))
    assert torch.allclose(ImageProcessor.clip()(im), _hf("clip", pil=True)([im]), rtol=0, atol=ARITH_ATOL)


def test_small_images_are_padded_like_transformers():
    tiny = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    ours = ImageProcessor(size=None, crop_size=(64, 64))  # no resize: the crop pads the height
    ref = _hf("clip", do_resize=False, crop_size={"height": 64, "width": 64})
    assert torch.equal(ours(tiny), ref([tiny]))


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("clip", {"size": {"shortest_edge": 160}, "crop_size": {"height": 128, "width": 144}}),
        ("clip", {"resample": 2, "do_center_crop": False, "size": {"height": 100, "width": 120}}),
        ("vit", {"size": {"height": 96, "width": 128}, "image_mean": [0.1, 0.2, 0.3]}),
        ("vit", {"do_normalize": False}),
    ],
)
def test_from_pretrained_reads_preprocessor_config(tmp_path, photos, kind, kw):
    cls = transformers.CLIPImageProcessor if kind == "clip" else transformers.ViTImageProcessor
    cls(**kw).save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(ours(photos), _hf(kind, **kw)(photos))


def test_from_pretrained_convnext(tmp_path, photos):
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}).save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours.size == 256 and ours.crop_size == (224, 224)
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path)(photos, return_tensors="pt").pixel_values
    assert torch.equal(ours(photos), ref)


def test_from_pretrained_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"size": 160, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
        {"size": [128, 160]},
        {"size": 192, "resize_mode": "squash"},
        {"size": 192, "resize_mode": "longest", "fill_color": 0},
    ],
)
def test_from_open_clip(photos, cfg):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    ref_transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    ref = torch.stack([ref_transform(p) for p in photos])
    ours = ImageProcessor.from_open_clip(cfg)
    assert open_clip is not None and ours(photos).shape == ref.shape
    # open_clip resizes with PIL (through torchvision): our PIL backend matches it up to arithmetic
    assert torch.allclose(ours.replace(backend="pil")(photos), ref, rtol=0, atol=ARITH_ATOL)
    assert (ours(photos) - ref).abs().max() <= RESAMPLED_ATOL


def test_from_open_clip_model_size_wins():
    assert ImageProcessor.from_open_clip({"size": 224}, size=336).crop_size == (336, 336)


def test_input_kinds_agree(photos, tmp_path):
    ours = ImageProcessor.clip(size=64)
    im = photos[1]
    want = ours(im)
    arr = np.array(im)
    path = tmp_path / "coffee.png"
    im.save(path)
    for other in (arr, torch.from_numpy(arr).permute(2, 0, 1), path, path.read_bytes()):
        assert torch.equal(ours(other), want)
    gray = im.convert("L")
    assert torch.equal(ours(gray), ours(gray.convert("RGB")))
    assert torch.equal(ours(np.asarray(gray)), ours(gray.convert("RGB")))
    assert ours([im, photos[0], im]).shape == (3, 3, 64, 64)


def test_lenet_is_grayscale(photos):
    out = ImageProcessor.lenet()(photos[:2])
    assert out.shape == (2, 1, 32, 32)
    gray = np.asarray(photos[0].convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    want = (gray / 255 - 0.1307) / 0.3081
    assert np.abs(out[0, 0].numpy() - want).max() <= RESAMPLED_ATOL


def test_presets():
    assert ImageProcessor.imagenet().size == 256 and ImageProcessor.imagenet().crop_size == (224, 224)
    assert ImageProcessor.clip(336).crop_size == (336, 336)
    assert ImageProcessor.vit(384).size == (384, 384) and ImageProcessor.vit().crop_size is None


def test_processor_errors(photos):
    ours = ImageProcessor.clip()
    with pytest.raises(ValueError, match="empty"):
        ours([])
    with pytest.raises(ValueError, match="image 0: arrays must be uint8"):
        ours(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="image 1: tensors must be uint8"):
        ours([photos[0], torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="different sizes"):
        ImageProcessor(crop_size=None)(photos)
    with pytest.raises(ValueError, match="resample="):
        ImageProcessor(resample="cubic")
    with pytest.raises(ValueError, match="needs 1 values"):
        ImageProcessor(mode="L")
    with pytest.raises(ImageError, match="no such file"):
        ours("/nonexistent/cat.jpg")
