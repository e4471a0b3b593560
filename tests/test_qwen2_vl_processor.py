"""Qwen2-VL's and Qwen2.5-VL's processor against transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor, with a tiny
byte-level BPE tokenizer holding Qwen's special tokens and the hub's Qwen2-VL chat template, saved by transformers:
the same ids, masks and grids, pixel values within 1e-5, on scikit-image photos of several sizes and aspect ratios,
several images, images in later turns, video frames and video files, left-padded batches, min/max_pixels settings,
both image backends (torchvision and PIL); smart_resize exactly; and the refusals before anything large is
allocated (an image over the pixel guard, a prompt over the context, placeholders and media that disagree)."""

import json
import random
import resource
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processing import ImageError
from polymodal.processing.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE, Qwen2VLImageProcessor, Qwen2VLProcessor, smart_resize
from polymodal.processing.video import read_video

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
av = pytest.importorskip("av")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CORPUS = ["system You are a helpful assistant. user What is shown in this image? assistant A cat on a table.",
          "Describe the photo in detail, please. What colour is the cup? What happens in the video?"]
PHOTOS = {name: Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")}


def tiny_tokenizer():
    """A byte-level BPE without bos (as Qwen2's), with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")


def save_processor(path, qwen25: bool = False, min_pixels=56 * 56, max_pixels=28 * 28 * 256,
                   video_pixels=(16 * 28 * 28, 28 * 28 * 64)):
    """transformers' processor with a pixel range small enough for CPU tests, saved to `path`."""
    cls = transformers.Qwen2_5_VLProcessor if qwen25 else transformers.Qwen2VLProcessor
    images = transformers.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    videos = transformers.Qwen2VLVideoProcessor(min_pixels=video_pixels[0], max_pixels=video_pixels[1],
                                                cap_pixels_per_frame=False)
    cls(image_processor=images, video_processor=videos, tokenizer=tiny_tokenizer(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(path)


def reference(path, backend: str = "torchvision"):
    """transformers' processor from `path`; with backend="pil" its image processor is Qwen2VLImageProcessorPil (the
    video processor has no PIL class)."""
    ref = transformers.AutoProcessor.from_pretrained(path)
    if backend == "pil":
        size = ref.image_processor.size
        pil = transformers.Qwen2VLImageProcessorPil(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        ref = type(ref)(image_processor=pil, video_processor=ref.video_processor, tokenizer=ref.tokenizer,
                        chat_template=ref.chat_template)
    return ref


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-vl-processor")
    save_processor(path)
    return path


@pytest.fixture(scope="module")
def saved25(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2.5-vl-processor")
    save_processor(path, qwen25=True)
    return path


def ask(text: str, *images, role: str = "user") -> dict:
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def run_reference(proc, conversations) -> dict:
    out = proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"})
    return dict(out)


KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
        "second_per_grid_ts")


def assert_same(got: dict, want: dict) -> None:
    # mm_token_type_ids (transformers' image/video token mask) is not returned: the model finds its placeholders by id
    assert set(got) == set(want) & set(KEYS)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw"):
        if key in want:
            assert got[key].tolist() == want[key].tolist(), key
    for key in ("pixel_values", "pixel_values_videos"):
        if key in want:
            # the same uint8 resampling kernel and fused normalization (0 with torchvision, ~2e-7 with PIL's
            # separate rescale and normalize); 1e-5 is the bound asked of a processor
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
    if "second_per_grid_ts" in want:
        assert got["second_per_grid_ts"].tolist() == pytest.approx(torch.as_tensor(want["second_per_grid_ts"]).tolist())


# ------------------------------------------------------------------------------------------ smart_resize


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as theirs

    rng = random.Random(0)
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(3000)] + [(28, 28), (14, 5000), (1, 150)]
    for lo, hi in ((56 * 56, 28 * 28 * 1280), (3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28), (4 * 28 * 28,
                                                                                                  16 * 28 * 28)):
        for h, w in sizes:
            try:
                want = theirs(h, w, 28, lo, hi)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio is over 200"):
                    smart_resize(h, w, 28, lo, hi)
                continue
            assert smart_resize(h, w, 28, lo, hi) == want, (h, w, lo, hi)


# ------------------------------------------------------------------------------------------ images

CONVERSATIONS = {
    "one image, square": [ask("What is shown in this image?", PHOTOS["astronaut"])],
    "two images, wide": [ask("Compare the cup and the cat.", PHOTOS["coffee"], PHOTOS["chelsea"])],
    "image in a later turn": [ask("Describe the photo.", PHOTOS["chelsea"]),
                              {"role": "assistant", "content": [{"type": "text", "text": "A tabby cat."}]},
                              ask("And this one?", PHOTOS["rocket"])],
    "tall and grayscale": [ask("Two pictures.", PHOTOS["rocket"].transpose(Image.Transpose.ROTATE_90),
                               Image.fromarray(skimage_data.camera()))],
    "no image": [ask("Describe the photo in detail, please.")],
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_images_equal_transformers(saved, case):
    ours = Qwen2VLProcessor.from_pretrained(saved)
    conversation = CONVERSATIONS[case]
    got = ours(conversation)
    assert_same(got, run_reference(reference(saved), conversation))
    if "image_grid_thw" in got:
        tokens = int((got["input_ids"] == ours.image_token_id).sum())
        assert tokens == int(got["image_grid_thw"].prod(-1).sum()) // 4
        assert got["pixel_values"].shape == (int(got["image_grid_thw"].prod(-1).sum()), 3 * 2 * 14 * 14)


@pytest.mark.parametrize("case", ["two images, wide", "tall and grayscale"])
def test_pil_backend_equals_transformers_pil_processor(saved, case):
    ours = Qwen2VLProcessor.from_pretrained(saved, backend="pil")
    conversation = CONVERSATIONS[case]
    assert_same(ours(conversation), run_reference(reference(saved, backend="pil"), conversation))


def test_batch_left_padded_images_in_reading_order(saved):
    ours = Qwen2VLProcessor.from_pretrained(saved)
    batch = [CONVERSATIONS["image in a later turn"], CONVERSATIONS["no image"], CONVERSATIONS["two images, wide"]]
    got = ours(batch)
    assert_same(got, run_reference(reference(saved), batch))
    alone = [ours(c) for c in batch]
    assert torch.equal(got["pixel_values"], torch.cat([a["pixel_values"] for a in alone if "pixel_values" in a]))
    for row, a in enumerate(alone):
        n = a["input_ids"].shape[1]
        assert got["input_ids"][row, -n:].tolist() == a["input_ids"][0].tolist()
        assert got["attention_mask"][row].sum() == n


@pytest.mark.parametrize("pixels", [(56 * 56, 28 * 28 * 16), (28 * 28 * 512, 28 * 28 * 1024), (3136, 12845056)])
def test_min_max_pixels(tmp_path, pixels):
    # a small budget shrinks every photo; a large minimum enlarges them; the hub's default range keeps them whole
    save_processor(tmp_path, min_pixels=pixels[0], max_pixels=pixels[1])
    ours = Qwen2VLProcessor.from_pretrained(tmp_path)
    conversation = [ask("Compare.", PHOTOS["coffee"], PHOTOS["chelsea"].resize((60, 40)))]
    got = ours(conversation)
    assert_same(got, run_reference(reference(tmp_path), conversation))
    for _, gh, gw in got["image_grid_thw"].tolist():
        assert pixels[0] <= gh * gw * 14 * 14 <= pixels[1]


def test_overrides_and_the_image_processor_alone(saved):
    ours = Qwen2VLProcessor.from_pretrained(saved, min_pixels=28 * 28 * 4, image_max_pixels=28 * 28 * 8)
    got = ours([ask("Small.", PHOTOS["astronaut"])])
    assert got["image_grid_thw"].tolist() == [[1, 4, 4]]  # 512 x 512 within 8 x 28^2 pixels: 56 x 56
    ip = Qwen2VLImageProcessor(max_pixels=28 * 28 * 64)
    theirs = transformers.Qwen2VLImageProcessor(max_pixels=28 * 28 * 64)(list(PHOTOS.values()), return_tensors="pt")
    pixels, grids = ip(list(PHOTOS.values()))
    assert grids.tolist() == theirs["image_grid_thw"].tolist()
    torch.testing.assert_close(pixels, theirs["pixel_values"], atol=1e-5, rtol=0)


def test_loads_the_hub_layout(saved, tmp_path):
    # Qwen2-VL's hub files (transformers 4.x): preprocessor_config.json with min_pixels / max_pixels at the top,
    # chat_template.json, no video processor file (its values come from preprocessor_config.json)
    hub = tmp_path / "hub"
    shutil.copytree(saved, hub)
    config = json.loads((hub / "processor_config.json").read_text())
    image = config.pop("image_processor")
    image.pop("size")
    image.update(min_pixels=3136, max_pixels=28 * 28 * 100)
    (hub / "preprocessor_config.json").write_text(json.dumps(image))
    config.pop("video_processor")
    (hub / "processor_config.json").write_text(json.dumps(config))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": (hub / "chat_template.jinja").read_text()}))
    (hub / "chat_template.jinja").unlink()
    ours = Qwen2VLProcessor.from_pretrained(hub)
    assert (ours.image_processor.min_pixels, ours.image_processor.max_pixels) == (3136, 28 * 28 * 100)
    conversation = CONVERSATIONS["two images, wide"]
    assert_same(ours(conversation), run_reference(reference(hub), conversation))


# ------------------------------------------------------------------------------------------ videos


def clip_frames(n: int, size=(90, 120)) -> list[np.ndarray]:
    """n frames of one photo, shifted a little each time (a pan)."""
    base = np.asarray(PHOTOS["astronaut"])
    return [np.ascontiguousarray(base[t * 4 : t * 4 + size[0], t * 3 : t * 3 + size[1]]) for t in range(n)]


def with_videos(ref, conversation, videos, metadata=None) -> dict:
    prompt = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    kwargs = {"videos_kwargs": {"video_metadata": metadata}} if metadata else {}
    images = [p["image"] for m in conversation for p in m["content"] if p["type"] == "image"] or None
    return dict(ref(text=[prompt], images=images, videos=videos, return_tensors="pt", **kwargs))


@pytest.mark.parametrize("n", [4, 5])
def test_video_frames_equal_transformers(saved25, n):
    # an odd count repeats its last frame to fill the temporal patch, as transformers pads it
    frames = clip_frames(n)
    ours = Qwen2VLProcessor.from_pretrained(saved25)
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames},
                                                 {"type": "text", "text": "What happens in the video?"}]}]
    got = ours(conversation)
    assert_same(got, with_videos(reference(saved25), conversation, [np.stack(frames)]))
    assert got["video_grid_thw"][0, 0] == (n + 1) // 2
    assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])  # frames without a rate: 24 fps
    pil = ours([{"role": "user", "content": [{"type": "video", "video": [Image.fromarray(f) for f in frames]}]}])
    assert torch.equal(pil["pixel_values_videos"], got["pixel_values_videos"])


def test_video_frames_with_a_rate_and_images_beside(saved25):
    frames = clip_frames(6)
    ours = Qwen2VLProcessor.from_pretrained(saved25)
    conversation = [{"role": "user", "content": [{"type": "image", "image": PHOTOS["coffee"]},
                                                 {"type": "video", "video": frames, "fps": 3.0},
                                                 {"type": "text", "text": "Is the cup in the video?"}]}]
    got = ours(conversation)
    want = with_videos(reference(saved25), [{"role": "user", "content": [
        {"type": "image", "image": PHOTOS["coffee"]}, {"type": "video"},
        {"type": "text", "text": "Is the cup in the video?"}]}], [np.stack(frames)],
        metadata=[{"total_num_frames": 6, "fps": 3.0}])
    assert_same(got, want)
    assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / 3.0])


def test_video_file_equals_transformers_pyav_reader(saved, saved25, tmp_path):
    from functools import partial

    from test_video import encode_video
    from transformers.video_utils import read_video_pyav

    path = tmp_path / "clip.mp4"
    encode_video(path, frames=36, fps=12, size=(100, 140))
    ref = reference(saved25)
    want_frames, meta = read_video_pyav(str(path), sample_indices_fn=partial(ref.video_processor.sample_frames,
                                                                             fps=2.0))
    conversation = [{"role": "user", "content": [{"type": "video", "path": str(path)},
                                                 {"type": "text", "text": "What happens in the video?"}]}]
    want = with_videos(ref, conversation, [want_frames], metadata=[dict(meta)])
    got = Qwen2VLProcessor.from_pretrained(saved25)(conversation)
    assert_same(got, want)
    assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / (6 / 36 * 12)])
    plain = Qwen2VLProcessor.from_pretrained(saved)(conversation)  # Qwen2-VL: no second_per_grid_ts
    assert "second_per_grid_ts" not in plain
    assert torch.equal(plain["pixel_values_videos"], got["pixel_values_videos"])
    assert len(read_video(path).frames) == 6  # 36 frames at 12 fps, sampled at 2 fps


def test_written_out_prompts_with_images_and_videos(saved):
    ours = Qwen2VLProcessor.from_pretrained(saved)
    ref = reference(saved)
    texts = ["<|vision_start|><|image_pad|><|vision_end|>What is this?",
             "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Compare."]
    frames = clip_frames(4)
    want = dict(ref(text=texts, images=[PHOTOS["rocket"], PHOTOS["coffee"]], videos=[np.stack(frames)],
                    padding=True, padding_side="left", return_tensors="pt"))
    assert_same(ours(text=texts, images=[PHOTOS["rocket"], PHOTOS["coffee"]], videos=[frames]), want)
    assert_same(ours(text=texts, images=[[PHOTOS["rocket"]], [PHOTOS["coffee"]]], videos=frames), want)


# ------------------------------------------------------------------------------------------ refusals


def test_image_over_the_pixel_guard_is_refused_from_its_header(saved):
    from test_processing import _png  # a PNG header claiming a size, nothing behind it

    ours = Qwen2VLProcessor.from_pretrained(saved)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"messages\[0\].content\[0\]: <\d+ bytes>: the header claims 10000x7000 "
                                         r"= 70,000,000 pixels, over the limit of 64,000,000"):
        ours([ask("What is it?", _png(10_000, 7_000))])
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200  # MiB: nothing was decoded
    small = Qwen2VLProcessor.from_pretrained(saved, max_pixels=100_000)
    with pytest.raises(ImageError, match="over the limit of 100,000"):
        small([ask("What is it?", PHOTOS["astronaut"])])


def test_prompt_over_the_context_is_refused_before_decoding(saved, tmp_path):
    from test_processing import _png
    from test_video import encode_video

    # tokens come from the header: a 4000 x 4000 PNG with no pixel data behind it is counted, never decoded
    ours = Qwen2VLProcessor.from_pretrained(saved, context_length=300)
    with pytest.raises(ValueError, match=r"the conversation is \d+ tokens once its 2 image\(s\) are expanded to \d+ "
                                         r"tokens, over the model's context of 300"):
        ours([ask("Describe it.", _png(4000, 4000)), ask("And again.", PHOTOS["rocket"])])
    path = tmp_path / "long.mp4"
    encode_video(path, frames=120, fps=4, size=(64, 96))  # 30 s at 2 fps: 60 frames, 30 temporal patches of 20

    def no_decode(*a, **k):
        raise AssertionError("decoded the video")

    import polymodal.processing.qwen2_vl as qwen2_vl

    original, qwen2_vl.read_video = qwen2_vl.read_video, no_decode
    try:
        with pytest.raises(ValueError, match=r"once its 1 video\(s\) are expanded to \d+ tokens each, over"):
            ours([{"role": "user", "content": [{"type": "video", "video": str(path)}]}])
    finally:
        qwen2_vl.read_video = original


def test_media_and_placeholders_must_agree(saved, tmp_path):
    ours = Qwen2VLProcessor.from_pretrained(saved)
    missing = tmp_path / "never-opened.png"
    with pytest.raises(ValueError, match=r"has 0 image\(s\) but its prompt has 1 <\|image_pad\|> token"):
        ours([ask("<|image_pad|> where is the picture?")])
    with pytest.raises(ValueError, match=r"has 1 video\(s\) but its prompt has 2 <\|video_pad\|>"):
        ours([{"role": "user", "content": [{"type": "video", "path": str(missing)},
                                           {"type": "text", "text": "<|video_pad|>"}]}])
    with pytest.raises(ValueError, match=r"2 image\(s\) given for 1 <\|image_pad\|> token"):
        ours(text="<|image_pad|>", images=[missing, missing])
    with pytest.raises(ValueError, match=r"frames of different sizes"):
        ours([{"role": "user", "content": [{"type": "video", "video": clip_frames(2) + clip_frames(1, (80, 80))}]}])
    with pytest.raises(ValueError, match="messages\\[0\\].content\\[0\\]: .*not a readable video"):
        ours([{"role": "user", "content": [{"type": "video", "video": b"not a video at all" * 10}]}])
    with pytest.raises(ValueError, match="remote URL, which is never fetched here; download the video"):
        ours([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}]}])


def test_checkpoint_whose_token_ids_disagree_with_the_model(saved, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(saved, d)
    image_id = Qwen2VLProcessor.from_pretrained(saved).image_token_id
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "image_token_id": 7,
                                               "max_position_embeddings": 4096}))
    with pytest.raises(ValueError, match=rf"the tokenizer's '<\|image_pad\|>' is id {image_id}, but config.json's "
                                         "image_token_id is 7"):
        Qwen2VLProcessor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "image_token_id": image_id,
                                               "text_config": {"max_position_embeddings": 4096}}))
    loaded = Qwen2VLProcessor.from_pretrained(d)
    assert loaded.context_length == 4096 and loaded.second_per_grid_ts  # model_type qwen2_5_vl


def test_every_video_part_form_gives_the_same_inputs(saved, tmp_path):
    import base64
    import io

    from test_video import encode_video

    path = tmp_path / "clip.mp4"
    encode_video(path, frames=16, fps=8, size=(64, 96))
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    ours = Qwen2VLProcessor.from_pretrained(saved)
    want = ours([{"role": "user", "content": [{"type": "video", "path": str(path)}]}])
    forms = [{"type": "video", "video": str(path)}, {"type": "video", "video": data},
             {"type": "video", "video": io.BytesIO(data)}, {"type": "video", "base64": b64},
             {"type": "video", "url": f"data:video/mp4;base64,{b64}"},
             {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64}"}}]
    for part in forms:
        got = ours([{"role": "user", "content": [part]}])
        assert got["input_ids"].tolist() == want["input_ids"].tolist(), str(part)[:60]
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"]), str(part)[:60]
        assert got["video_grid_thw"].tolist() == want["video_grid_thw"].tolist()


def test_pil_backend_resizes_images_only(saved):
    # transformers' video processor has no PIL class: with backend="pil" the frames still go through torch's kernel
    frames = clip_frames(4)
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames}]}]
    pil = Qwen2VLProcessor.from_pretrained(saved, backend="pil")
    assert pil.image_processor.backend == "pil" and pil.video_processor.backend == "torch"
    assert torch.equal(pil(conversation)["pixel_values_videos"],
                       Qwen2VLProcessor.from_pretrained(saved)(conversation)["pixel_values_videos"])


def test_a_video_over_its_token_budget_is_fitted_smaller_then_sparser(saved25, tmp_path):
    """Within `max_tokens` a video keeps every sampled frame at a smaller size while it can, then keeps fewer frames
    spread over the whole clip (a lower rate, which second_per_grid_ts reports); the tokens, the grid and the
    pixel rows agree, and the file is never decoded past what is kept."""
    from test_video import encode_video

    ours = Qwen2VLProcessor.from_pretrained(saved25)
    vp = ours.video_processor  # 16 x 28^2 .. 64 x 28^2 pixels per frame in these tests
    frames = clip_frames(8, size=(224, 224))
    ask_video = lambda video, **part: [{"role": "user", "content": [{"type": "video", "video": video, **part},  # noqa
                                                                    {"type": "text", "text": "What happens?"}]}]
    full = ours(ask_video(frames, fps=4.0))
    t, gh, gw = full["video_grid_thw"][0].tolist()
    assert (t, gh * gw // 4) == (4, 64)  # 4 temporal patches of 64 tokens: 256 tokens

    ours.video_processor = vp.replace(max_tokens=128)  # half: every frame kept, each smaller
    smaller = ours(ask_video(frames, fps=4.0))
    t2, gh2, gw2 = smaller["video_grid_thw"][0].tolist()
    assert t2 == 4 and t2 * gh2 * gw2 // 4 <= 128 and gh2 * gw2 < gh * gw
    assert int((smaller["input_ids"] == ours.video_token_id).sum()) == t2 * gh2 * gw2 // 4
    assert smaller["pixel_values_videos"].shape[0] == t2 * gh2 * gw2
    assert smaller["second_per_grid_ts"].tolist() == pytest.approx([2 / 4.0])

    ours.video_processor = vp.replace(max_tokens=40)  # below the smallest frames x 4 patches: fewer frames
    sparser = ours(ask_video(frames, fps=4.0))
    t3, gh3, gw3 = sparser["video_grid_thw"][0].tolist()
    assert t3 < 4 and t3 * gh3 * gw3 // 4 <= 40 and gh3 * gw3 * 28 * 28 // 4 >= vp.min_pixels * 0.8
    assert sparser["second_per_grid_ts"].tolist() == pytest.approx([2 / (4.0 * 2 * t3 / 8)])

    path = tmp_path / "long.mp4"  # 30 s at 8 fps, sampled at 2 fps: 60 frames, 30 patches
    encode_video(path, frames=240, fps=8, size=(56, 84))
    ours.video_processor = vp.replace(max_tokens=24)
    got = ours(ask_video(str(path)))
    t4, gh4, gw4 = got["video_grid_thw"][0].tolist()
    assert t4 * gh4 * gw4 // 4 <= 24 and t4 < 30
    assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / (2 * t4 / 240 * 8)])

    ours.video_processor = vp.replace(max_tokens=2)  # not even one patch of the smallest frames fits
    with pytest.raises(ValueError, match="over the video budget of 2"):
        ours(ask_video(frames))


def test_max_visual_tokens_refuses_a_prompt_before_decoding(saved, tmp_path, monkeypatch):
    import polymodal.processing.qwen2_vl as qwen2_vl

    ours = Qwen2VLProcessor.from_pretrained(saved)
    ours.max_visual_tokens = 100
    big = tmp_path / "big.png"
    PHOTOS["astronaut"].save(big)
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(big)},
                                                 {"type": "image", "path": str(big)}, {"type": "text", "text": "?"}]}]
    opened = []
    real = qwen2_vl.open_media_image
    monkeypatch.setattr(qwen2_vl, "open_media_image", lambda *a, **k: opened.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"become 512 visual tokens, over the limit of 100 \(max_visual_tokens\)"):
        ours(conversation)
    assert not opened  # refused from the headers
    ours.max_visual_tokens = 512
    assert ours(conversation)["image_grid_thw"].shape == (2, 3) and len(opened) == 2
