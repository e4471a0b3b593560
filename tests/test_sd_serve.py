"""Stable Diffusion as a task, a command and a route, on a tiny random SD 1.x pipeline that diffusers builds and
saves (model_index.json + components, as tests/test_sd_pipeline.py builds them).

Checked: `pm.pipeline("text-to-image")` returns diffusers' images for the same prompt and seed (also with a sampler
taken by its short name, and img2img through "image-to-image"), its callback and progress bar see every step, bad
options are refused before any denoising; `polymodal generate-image` writes the pipeline's images and `--json`
says where and with which seed, bad input exits 2 with one line naming the flag; `polymodal serve`'s
/v1/images/generations through the official `openai` client returns PNGs equal to the pipeline's own images for
the seed, refuses url responses, bad sizes and chat models with OpenAI's error body, streams the steps' progress,
answers 429 when its queue is full and stops a run whose client left between steps.

Tolerance: pixels are compared as uint8 within 1 level where diffusers computes them (the same float operations,
reordered sums of ~1e-6, can round a value to the next level); polymodal's own images through the server and the
CLI are compared exactly (lossless PNG, the same code on the same thread settings).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
openai = pytest.importorskip("openai")

from serve_helpers import running, save_tiny_sd  # noqa: E402

import polymodal as pm  # noqa: E402
from polymodal import cli  # noqa: E402
from polymodal.pipelines.diffusion import StableDiffusionPipeline  # noqa: E402
from polymodal.serve import ServedModels, create_app  # noqa: E402
from polymodal.serve.registry import load_model  # noqa: E402

FAST = dict(num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second OpenMP thread only waits at barriers on a busy machine (as tests/test_sd_pipeline.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny random StableDiffusionPipeline (VAE factor 2, 16 px images) saved by diffusers (serve_helpers)."""
    d = tmp_path_factory.mktemp("sd15")
    return save_tiny_sd(d), d


@pytest.fixture(scope="module")
def pipe(sd):
    return pm.pipeline("text-to-image", model=sd[1])


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def _assert_near(ours, theirs):
    a, b = _pixels(ours), _pixels(theirs)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1  # see the module docstring


# ------------------------------------------------------------------------------------------------ the task
def test_text_to_image_matches_diffusers(sd, pipe):
    ref, _ = sd
    ours = pipe("a red bicycle", seed=5, num_images_per_prompt=2, negative_prompt="blurry", **FAST)
    theirs = ref("a red bicycle", generator=torch.Generator().manual_seed(5), num_images_per_prompt=2,
                 negative_prompt="blurry", **FAST).images
    assert len(ours) == 2 and ours[0].size == (16, 16) and pipe.default_size == (16, 16)
    _assert_near(ours, theirs)
    # another sampler by its short name, as diffusers swaps it in from the same config
    ours = pipe("a red bicycle", seed=5, scheduler="dpm++", height=24, width=16, **FAST)
    swapped = diffusers.StableDiffusionPipeline(**ref.components)
    swapped.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    swapped.set_progress_bar_config(disable=True)
    theirs = swapped("a red bicycle", generator=torch.Generator().manual_seed(5), height=24, width=16, **FAST).images
    assert ours[0].size == (16, 24)
    _assert_near(ours, theirs)


def test_image_to_image_matches_diffusers(sd):
    ref, d = sd
    edit = pm.pipeline("image-to-image", model=d)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    ours = edit(buf.getvalue(), "a woodcut", strength=0.6, seed=2, num_inference_steps=5)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img("a woodcut", image=photo, strength=0.6, generator=torch.Generator().manual_seed(2),
                     num_inference_steps=5).images
    _assert_near(ours, theirs)
    with pytest.raises(ValueError, match="strength"):
        edit(photo, "x", strength=0)
    with pytest.raises(ValueError, match="size from the image"):
        edit(photo, "x", height=16)


def test_callback_and_progress_bar_see_every_step(pipe, capsys):
    seen = []
    pipe("a cat", seed=0, callback=lambda done, total: seen.append((done, total)), progress=True, **FAST)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert "denoising" in capsys.readouterr().err  # tqdm's bar, on stderr
    pipe("a cat", seed=0, **FAST)
    assert capsys.readouterr().err == ""  # off unless asked for

    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):  # a callback's exception ends the run between steps (the server's cancellation)
        pipe("a cat", seed=0, callback=stop, **FAST)


@pytest.mark.parametrize("options, match", [
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(guidance_scale="high"), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(height=15), "height must be a positive multiple of 2"),
    (dict(width=100_000), "over the 8192 pixels"), (dict(seed=-1), "seed"),
    (dict(num_images_per_prompt=0), "num_images"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'"),
])
def test_bad_options_are_refused_before_denoising(pipe, monkeypatch, options, match):
    def never(*args, **kwargs):
        raise AssertionError("the denoiser ran")

    monkeypatch.setattr(pipe.model, "predict", never)
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **options)


def test_the_task_refuses_what_is_no_diffusion_folder(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="no model_index.json"):
        pm.pipeline("text-to-image", model=clip_dir)
    with pytest.raises(ValueError, match="needs model="):
        pm.pipeline("text-to-image")


# ------------------------------------------------------------------------------------------------ the CLI
def test_generate_image_command(sd, pipe, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = cli.main(["generate-image", "a red bicycle", "-o", str(out), "--model", str(sd[1]), "--steps", "3",
                     "--seed", "7", "--guidance", "6", "-n", "2", "--scheduler", "euler", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result == {"images": [str(tmp_path / "out-1.png"), str(tmp_path / "out-2.png")], "seed": 7}
    assert captured.err == ""  # --json: no progress bar
    expected = pipe("a red bicycle", seed=7, num_images_per_prompt=2, scheduler="euler", **FAST)
    np.testing.assert_array_equal(_pixels([Image.open(p) for p in result["images"]]), _pixels(expected))

    # human output: the path and the seed drawn for the run on stdout, the bar on stderr; that seed repeats the run
    code = cli.main(["generate-image", "a cat", "-o", str(out), "--model", str(sd[1]), "--steps", "3",
                     "--size", "16x24", "--negative", "blurry"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"{out}\n(seed ") and "denoising" in captured.err
    seed = int(captured.out.split("(seed ")[1].rstrip(")\n"))
    again = pipe("a cat", "blurry", seed=seed, num_inference_steps=3, width=16, height=24)
    assert Image.open(out).size == (16, 24)
    np.testing.assert_array_equal(_pixels([Image.open(out)]), _pixels(again))
    code = cli.main(["generate-image", "a cat", "-o", str(out), "--model", str(sd[1]), "--steps", "1", "--quiet"])
    assert code == 0 and capsys.readouterr().err == ""


def test_generate_image_without_model_uses_the_cached_default(sd, tmp_path, monkeypatch, capsys):
    """No --model: polymodal's tiny ldm-shapes model from its first-use cache, at the steps and guidance its
    evaluation used (20, 5.0) unless given."""
    import polymodal.train.ldm as ldm

    calls = []
    monkeypatch.setattr(ldm, "cached_default", lambda say=None: calls.append(say) or sd[1])
    seen = {}
    real = StableDiffusionPipeline.__call__

    def spy(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=None, *a, **k):
        seen.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        return real(self, prompt, negative_prompt, 1, guidance_scale, *a, **k)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    out = tmp_path / "d.png"
    assert cli.main(["generate-image", "a red circle", "-o", str(out), "--seed", "1", "--quiet"]) == 0
    assert len(calls) == 1 and out.is_file()
    assert seen["num_inference_steps"] == 20 and seen["guidance_scale"] == 5.0
    assert cli.main(["generate-image", "a red circle", "-o", str(out), "--steps", "2", "--guidance", "3",
                     "--quiet"]) == 0
    assert seen["num_inference_steps"] == 2 and seen["guidance_scale"] == 3.0
    capsys.readouterr()


@pytest.mark.parametrize("args, flag", [
    (["--size", "17x16"], "--size 17x16"), (["--size", "big"], "--size big"),
    (["--steps", "0"], "--steps"), (["--guidance", "strong"], "--guidance"), (["--guidance", "nan"], "--guidance"),
    (["-n", "0"], "-n must be"), (["--scheduler", "heun"], "--scheduler"),
    (["-o", "out.txt"], "-o out.txt"), (["-o", "/nonexistent/dir/x.png"], "does not exist"),
])
def test_generate_image_bad_input_exits_2_with_one_line(sd, tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.chdir(tmp_path)

    def never(*a, **k):
        raise AssertionError("denoising started")

    monkeypatch.setattr("polymodal.pipelines.diffusion.StableDiffusionPipeline.predict", never)
    model = ["--model", str(sd[1])]
    out = [] if any(a == "-o" for a in args) else ["-o", "x.png"]
    code = cli.main(["generate-image", "a cat", *out, *model, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and flag in err, err
    assert not (tmp_path / "x.png").exists()


def test_generate_image_missing_or_wrong_model_dir(tmp_path, clip_dir, capsys):
    for model, says in ((tmp_path / "nothing-here", "no such file or directory"),
                        (clip_dir, "no model_index.json")):
        code = cli.main(["generate-image", "a cat", "-o", str(tmp_path / "x.png"), "--model", str(model)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err


# ------------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(sd, tmp_path_factory):
    from serve_helpers import save_tiny_chat_llama

    chat = save_tiny_chat_llama(tmp_path_factory.mktemp("chat"), ["Hello there, how are you?"] * 20)
    served = ServedModels([load_model("sd", sd[1], max_queue=0), load_model("chat", chat)])
    try:
        with running(create_app(served)) as url:
            yield url, served
    finally:
        served.close()


def test_openai_client_images_equal_the_pipelines(server, pipe):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    result = client.images.generate(model="sd", prompt="a red bicycle", n=2, size="16x24", response_format="b64_json",
                                    extra_body={"seed": 11, "steps": 3, "guidance_scale": 6.0})
    assert len(result.data) == 2 and result.created > 0
    got = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(im.format == "PNG" and im.size == (16, 24) for im in got)
    expected = pipe("a red bicycle", seed=11, num_images_per_prompt=2, width=16, height=24, **FAST)
    np.testing.assert_array_equal(_pixels(got), _pixels(expected))

    cards = {m.id: m for m in client.models.list().data}
    card = cards["sd"].model_dump()
    assert card["kind"] == "image" and card["output_modalities"] == ["image"] and card["modalities"] == ["text"]
    assert card["image_defaults"] == {"size": "16x16", "steps": 50, "size_multiple": 2}
    assert cards["chat"].model_dump().get("output_modalities") is None


@pytest.mark.parametrize("body, status, param, says", [
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "'url' is not supported"),
    ({"prompt": "x", "size": "17x16"}, 400, "size", "multiple of 2"),
    ({"prompt": "x", "size": "large"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size", "per request"),
    ({"prompt": "x", "steps": 0}, 400, "steps", "steps"),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale", "guidance_scale"),
    ({"prompt": "x", "n": 11}, 400, "n", "n"),
    ({"prompt": " "}, 400, "prompt", "empty"),
    ({"prompt": "x", "model": "chat"}, 400, "model", "does not generate images"),
    ({"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ({"prompt": "x", "output_format": "jpeg"}, 400, "output_format", "output_format"),
])
def test_bad_image_requests_are_refused(server, body, status, param, says):
    url, _ = server
    r = httpx.post(f"{url}/v1/images/generations", json={"model": "sd", **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and says in err["message"]
    assert "Traceback" not in r.text and "/" not in err["message"].replace("WIDTHxHEIGHT", "")  # no paths leak


def test_url_format_through_the_client_is_a_bad_request(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model="sd", prompt="x", response_format="url")


def test_streamed_progress_then_the_images(server, pipe):
    url, _ = server
    events = []
    with httpx.stream("POST", f"{url}/v1/images/generations", timeout=30, json={
            "model": "sd", "prompt": "a cat", "stream": True, "seed": 4, "steps": 3, "guidance_scale": 6.0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [(e["type"], e.get("step")) for e in events] == [
        ("image_generation.progress", 1), ("image_generation.progress", 2), ("image_generation.progress", 3),
        ("image_generation.completed", None)]
    got = Image.open(io.BytesIO(base64.b64decode(events[-1]["b64_json"])))
    np.testing.assert_array_equal(_pixels([got]), _pixels(pipe("a cat", seed=4, **FAST)))


def test_a_full_queue_answers_429_and_a_client_that_leaves_stops_its_run(server, monkeypatch):
    url, served = server
    model = served.get("sd").images.pipe.model
    calls, real = [], model.predict

    def slow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "predict", slow)
    body = {"model": "sd", "prompt": "a slow cat", "steps": 40, "seed": 1}
    left = threading.Event()

    def leaving_client():
        try:
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=1.0)
        except httpx.TimeoutException:
            left.set()

    thread = threading.Thread(target=leaving_client)
    thread.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls, "the first request never started"
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=30)  # max_queue=0: nothing may wait
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"]
    thread.join()
    assert left.is_set()
    time.sleep(1.0)  # the server notices within its 0.25 s poll; the run stops after the step it is in
    stopped = len(calls)
    time.sleep(0.6)
    assert len(calls) == stopped < 40
