"""Qwen2-VL and Qwen2.5-VL end to end: a tiny random model and its processor, both saved by transformers into one
directory, through `pm.pipeline("image-text-to-text")` (answers equal transformers' processor + generate on the same
messages, images and videos; a batch equal to its rows alone), `polymodal chat --image/--video/--fps/--draw`, and
`polymodal serve` with image_url and video_url parts."""

import base64
import io
import json

import pytest
import torch
from PIL import Image
from test_qwen2_vl_processor import PHOTOS, save_processor
from test_video import encode_video, video_bytes

import polymodal as pm
from polymodal.cli import main
from polymodal.processing.grounding import RELATIVE_1000, Frame
from polymodal.processing.qwen2_vl import Qwen2VLProcessor

transformers = pytest.importorskip("transformers")

IMG, VID, START, END = 5, 6, 3, 4  # the tiny tokenizer's special ids: <|image_pad|>, <|video_pad|>, vision start/end
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=56,
                       fullatt_block_indexes=[1], tokens_per_second=2),
}


def save_model(path, family: str):
    """A tiny random Qwen2-VL (Qwen2.5-VL) over the tiny tokenizer's 300 ids, saved beside its processor."""
    save_processor(path, qwen25=family == "qwen2_5_vl")
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
           else transformers.Qwen2VLForConditionalGeneration)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    cfg = cls.config_class(vision_config=VISION[family], text_config=text, image_token_id=IMG, video_token_id=VID,
                           vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # wider than transformers' init, so that the tiny model does not repeat one token
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_model(path, request.param)


def reference_answer(path, model, conversation, max_new_tokens: int, fps: float | None = None) -> str:
    """transformers' answer: its processor and generate for images; for video files, generate on our processor's
    inputs (transformers 5 reads video files with torchcodec, absent here; tests/test_qwen2_vl_processor.py shows
    our video inputs equal to its processor's on the frames its PyAV reader gives)."""
    proc = transformers.AutoProcessor.from_pretrained(path)
    has_video = any(p.get("type") == "video" for m in conversation for p in m["content"])
    if has_video:
        ours = Qwen2VLProcessor.from_pretrained(path)
        if fps is not None:
            ours.video_processor = ours.video_processor.replace(fps=fps)
        inputs = dict(ours(conversation))
        ids = inputs["input_ids"]
        inputs["mm_token_type_ids"] = (ids == IMG).long() + 2 * (ids == VID).long()
    else:
        inputs = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def ask(text: str, *media) -> list[dict]:
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]


def test_pipeline_answers_as_transformers_for_images_and_videos(checkpoint, tmp_path):
    family, path, ref = checkpoint
    clip = tmp_path / "clip.mp4"
    encode_video(str(clip), frames=16, fps=8, size=(56, 84))
    pipe = pm.pipeline("image-text-to-text", model=path)
    assert pipe.family == family
    conversations = [
        ask("What is shown in this image?", {"type": "image", "image": PHOTOS["coffee"]}),
        ask("Describe the photo and the video.", {"type": "image", "image": PHOTOS["chelsea"]},
            {"type": "video", "path": str(clip)}),
        ask("What happens in the video?", {"type": "video", "path": str(clip)}),
    ]
    answers = []
    for conversation in conversations:
        (out,) = pipe(conversation, max_new_tokens=8)
        answers.append(out["generated_text"][-1]["content"])
        assert answers[-1] == reference_answer(path, ref, conversation, 8)
    assert len(set(answers)) > 1
    batched = pipe(conversations, max_new_tokens=8)  # one left-padded batch, each row as it was alone
    assert [o[0]["generated_text"][-1]["content"] for o in batched] == answers


def test_boxes_are_read_in_each_familys_frame(checkpoint):
    family, path, _ = checkpoint
    processor = pm.pipeline("image-text-to-text", model=path).processor
    frame = processor.box_frame(1024, 768)
    if family == "qwen2_vl":
        assert frame == RELATIVE_1000
    else:  # Qwen2.5-VL's boxes are in the pixels of the image as its processor resized it
        h, w = processor.image_processor.resized(768, 1024)
        assert frame == Frame("resized", (w, h)) and h % 28 == 0 and w % 28 == 0


def test_cli_chat_with_an_image_a_video_and_draw(checkpoint, tmp_path, capsys):
    family, path, ref = checkpoint
    photo, clip, drawn = tmp_path / "rocket.png", tmp_path / "clip.mp4", tmp_path / "drawn.png"
    PHOTOS["rocket"].save(photo)
    encode_video(str(clip), frames=16, fps=8, size=(56, 84))
    rc = main(["chat", "--json", "--model", str(path), "--image", str(photo), "--video", str(clip), "--fps", "4",
               "--max-new-tokens", "6", "--draw", str(drawn), "What is this?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (result,) = json.loads(captured.out)
    assert result["generated_text"][-2]["content"][:2] == [{"type": "image", "path": str(photo)},
                                                            {"type": "video", "path": str(clip)}]
    conversation = ask("What is this?", {"type": "image", "image": Image.open(photo).convert("RGB")},
                       {"type": "video", "path": str(clip)})
    want = reference_answer(path, ref, conversation, 6, fps=4.0)  # the file sampled at 4 fps on both sides
    assert result["generated_text"][-1]["content"] == want
    assert isinstance(result["regions"], list)  # a random model writes no boxes; the image is still drawn
    assert Image.open(drawn).size == Image.open(photo).size


def test_cli_refuses_bad_video_settings_before_loading(checkpoint, tmp_path, capsys):
    _, path, _ = checkpoint
    clip = tmp_path / "clip.mp4"
    encode_video(str(clip), frames=4, fps=8, size=(56, 84))
    for argv, message in (
        (["--fps", "2", "hello"], "--fps is the rate videos are sampled at"),
        (["--video", str(clip), "--fps", "0", "hi"], "--fps is the rate videos are sampled at"),
        (["--draw", str(tmp_path / "x.png"), "hi"], "--draw draws the boxes"),
        (["--video", str(tmp_path / "missing.mp4"), "hi"], "missing.mp4"),
    ):
        assert main(["chat", "--model", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    for argv, message in ((["--max-video-frames", "0"], "--max-video-frames=0 must be positive"),
                          (["--max-visual-tokens", "0"], "--max-visual-tokens must be at least 1"),
                          (["--video-fps", "-1"], "--video-fps=-1.0 must be positive")):
        assert main(["serve", "--model", str(path), *argv]) == 2  # before the port is bound or a model loads
        assert message in capsys.readouterr().err


def test_server_takes_image_url_and_video_url_parts(checkpoint):
    import httpx
    from serve_helpers import running

    from polymodal.serve import ServedModels, create_app
    from polymodal.serve.registry import load_model

    family, path, ref = checkpoint
    served = ServedModels([load_model("vl", path)])
    assert {"text", "image", "video"} <= set(served.get("vl").modalities)
    png = io.BytesIO()
    PHOTOS["astronaut"].resize((112, 84)).save(png, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    video_url = "data:video/mp4;base64," + base64.b64encode(video_bytes(frames=8, fps=4, size=(56, 84))).decode()
    try:
        with running(create_app(served)) as url:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vl", "max_tokens": 6,
                           "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": image_url}},
                               {"type": "video_url", "video_url": {"url": video_url}},
                               {"type": "text", "text": "What is this?"}]}]})
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            pipe = pm.pipeline("image-text-to-text", model=path)
            (want,) = pipe(ask("What is this?", {"type": "image", "image": Image.open(io.BytesIO(png.getvalue()))},
                               {"type": "video", "video": pipe_frames(video_url), "fps": 2.0}), max_new_tokens=6)
            assert answer == want["generated_text"][-1]["content"]
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vl", "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                             {"type": "text", "text": "?"}]}]})
            assert r.status_code in (400, 415) and "video" in r.text
            assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 200  # the server goes on
            # the answer's boxes in the image's pixels, read in this family's frame
            text = ('```json\n[{"bbox_2d": [0, 0, 56, 28], "label": "a"}]\n```' if family == "qwen2_5_vl"
                    else "<|box_start|>(0,0),(500,250)<|box_end|>")
            r = httpx.post(f"{url}/v1/grounding", timeout=60, json={"model": "vl", "text": text,
                                                                   "image_size": [1000, 600]})
            assert r.status_code == 200, r.text
            (region,) = r.json()["data"]
            frame = served.get("vl").processor.box_frame(1000, 600)
            assert region["frame"] == "image" and region["frame_size"] == [1000, 600]
            assert region["bbox_2d"] == pytest.approx(
                [0, 0, 1000 * (56 if frame.kind == "resized" else 500) / frame.size[0],
                 600 * (28 if frame.kind == "resized" else 250) / frame.size[1]], abs=0.01)
            for body in ({"model": "vl", "text": text, "image_size": [0, 5]}, {"model": "vl", "text": 3},
                         {"model": "vl", "text": text, "image_size": [10, 10], "extra": 1}):
                assert httpx.post(f"{url}/v1/grounding", timeout=60, json=body).status_code == 400
            # the server's own limits (polymodal serve --max-visual-tokens, --disable video)
            served.limit(max_visual_tokens=4)
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vl", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "?"}]}]})
            assert r.status_code == 400 and "over the limit of 4 (max_visual_tokens)" in r.text, r.text
            served.limit(disable=("video",))
            assert "video" not in httpx.get(f"{url}/v1/models/vl", timeout=60).json()["modalities"]
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vl", "messages": [
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                             {"type": "text", "text": "?"}]}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_modality"
            with pytest.raises(ValueError, match="image, video and audio"):
                served.limit(disable=("text",))
    finally:
        served.close()


def pipe_frames(video_url: str) -> list:
    """The frames the server's media layer samples from a video URL (2 fps, its default)."""
    from polymodal.serve.media import MediaPolicy, load_video

    frames, fps = load_video(video_url, MediaPolicy())
    assert fps == 2.0
    return frames
