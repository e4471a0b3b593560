"""The web UI of `polymodal serve` (src/polymodal/serve/ui) in a real browser: Playwright drives Debian's Chromium
against a real uvicorn server that serves scripted fake chat models through the provider path of ServedModel.

Checked: the page's security headers; an uploaded image reaches the model with the same pixels and the answer
streams in; a pasted and a dropped image are attached; a WAV file reaches the model as audio; an ```svg answer
renders in the sandboxed Artifacts iframe, whose scripts cannot reach the page or the network; model output is
inserted as text, never HTML; the server's 400s are shown; Stop closes the stream; a server with an API key gets it
from the page; the temperature and max-tokens controls start from a local model's generation defaults and go out
with each request; a local vision-language model (a tiny LLaVA) takes an attached and a pasted image, shows them and
streams the answer `generate` gives; a served tiny Stable Diffusion folder generates from the image view (progress
streamed, the image the pipeline makes for that seed). Screenshots go to tmp_path (and docs/img/webui.png with
POLYMODAL_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import greedy_vlm_answer, running, save_tiny_chat_llama, save_tiny_llava, save_tiny_sd

from polymodal.serve import ServedModels, create_app
from polymodal.serve.registry import ServedModel, load_model, serve_model

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"the web UI tests drive Debian's Chromium, and {CHROMIUM} is absent", allow_module_level=True)

KEY = "webui-key-42"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "webui.png"


class ScriptedChat:
    """A stand-in for a chat model with the ChatProvider interface (polymodal/providers): `stream` yields the
    scripted `answer` a few characters at a time with small sleeps, records the canonical messages it got, and
    notes when its stream is closed before the end (the server closes it when the client leaves)."""

    def __init__(self, name: str, modalities: set[str], delay: float = 0.02):
        self.name = name
        self.modalities = modalities
        self.delay = delay
        self.answer = "Hello!"
        self.calls: list[list[dict]] = []
        self.closed_early = threading.Event()

    def stream(self, messages, **options):
        self.calls.append(messages)
        text = self.answer
        try:
            for i in range(0, len(text), 6):
                time.sleep(self.delay)
                yield text[i:i + 6]
        except GeneratorExit:
            self.closed_early.set()
            raise

    def chat(self, messages, **options):
        return "".join(self.stream(messages, **options))


class PathLog:
    """ASGI wrapper that records every HTTP path the server is asked for."""

    def __init__(self, app):
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


class ChatBodies:
    """ASGI wrapper that records the JSON body of every POST /v1/chat/completions."""

    def __init__(self, app):
        self.app = app
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def recording():
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] == "http.request" and not message.get("more_body"):
                self.bodies.append(json.loads(b"".join(chunks)))
            return message

        await self.app(scope, recording, send)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fakes():
    return {"vision": ScriptedChat("fake:vision", {"text", "image"}),
            "text": ScriptedChat("fake:text", {"text"}, delay=0.05),
            "listener": ScriptedChat("fake:listener", {"text", "audio"})}


def _served(fakes) -> ServedModels:
    return ServedModels([serve_model(name, fake) for name, fake in fakes.items()])


@pytest.fixture(scope="module")
def server(fakes):
    app = PathLog(create_app(_served(fakes)))
    with running(app) as url:
        yield url, app.paths


@pytest.fixture(scope="module")
def keyed_server(fakes):
    with running(create_app(_served(fakes), api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def local_server(fakes, tmp_path_factory):
    """A local tiny Llama whose generation_config.json recommends sampling at 0.7 with a repetition penalty, beside
    a closed (fake) model that recommends nothing."""
    path = save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat"), ["Hello there, how are you? I am fine."] * 20)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, repetition_penalty=1.2)
    (path / "generation_config.json").write_text(json.dumps(config))
    served = ServedModels([load_model("local", path), serve_model("text", fakes["text"])])
    app = ChatBodies(create_app(served))
    try:
        with running(app) as url:
            yield url, app.bodies
    finally:
        served.close()


@pytest.fixture(scope="module")
def vlm_server(fakes, tmp_path_factory):
    """A local tiny LLaVA (it takes images) beside a closed text-only (fake) model."""
    path = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), ["What is in this image? A red square."] * 20)
    served = ServedModels([load_model("llava", path), serve_model("text", fakes["text"])])
    app = ChatBodies(create_app(served))
    try:
        with running(app) as url:
            yield url, app.bodies, served.get("llava")
    finally:
        served.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 720})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    yield pg
    context.close()


def _png(seed: int = 0, size=(24, 16)) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), pixels


def _record_answer_text(page) -> None:
    """From now on, window.snapshots collects the last answer's text at every change of the page: streamed in
    pieces, it holds several distinct prefixes."""
    page.evaluate("""() => {
        window.snapshots = [];
        new MutationObserver(() => {
            const body = document.querySelector('.message.assistant:last-child .body');
            if (body) window.snapshots.push(body.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def _open(page, url: str) -> None:
    page.goto(url + "/")
    page.locator("#model option").nth(1).wait_for(state="attached")  # (no wait_for_function: the CSP forbids eval)


def _ask(page, text: str, status: str = "done"):
    """Send `text` and wait until the new answer reaches `status`; returns the answer's element."""
    count = page.locator(".message.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    answer = page.locator(".message.assistant").nth(count)
    answer.and_(page.locator(f"[data-status={status}]")).wait_for()
    return answer


def _screenshot(page, tmp_path: Path, name: str, docs: bool = False) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 1000
    if docs and os.environ.get("POLYMODAL_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)
    return path


# ------------------------------------------------------------------------------------------------ tests
def test_page_headers(server, page):
    url, _ = server
    response = page.goto(url + "/")
    h = response.headers
    csp = h["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-src 'none'" in csp and "'unsafe-inline'" not in csp.split(
        "script-src")[1].split(";")[0]
    assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert page.evaluate("document.querySelector('script').nonce") == nonce  # the page's one script, external
    assert page.evaluate("[...document.scripts].every(s => s.src)")
    js = page.request.get(url + "/ui/app.js")
    assert js.status == 200 and js.headers["x-content-type-options"] == "nosniff"
    assert js.headers["content-type"].startswith("text/javascript")
    assert page.request.get(url + "/ui/../app.py").status == 404
    assert page.request.get(url + "/ui/index.html").status == 404  # only / serves the page (it needs the nonce)


def test_upload_image_streams_answer(server, fakes, page, tmp_path):
    url, _ = server
    _open(page, url)
    assert page.input_value("#model") == "vision"
    assert page.is_enabled("#attach-image") and page.is_disabled("#attach-audio")  # from the card's modalities
    _record_answer_text(page)
    fakes["vision"].answer = "I see a small picture made of random coloured pixels, like television noise."
    png, pixels = _png(1)
    page.set_input_files("#image-input", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": png}])
    page.locator("#attachments .chip img").wait_for()
    answer = _ask(page, "What is in this image?")

    assert answer.locator(".body").inner_text().strip() == fakes["vision"].answer
    updates = [s for s in dict.fromkeys(page.evaluate("window.snapshots")) if s]
    assert len(updates) > 1, updates  # the answer arrived piece by piece
    content = fakes["vision"].calls[-1][-1]["content"]
    assert [p["type"] for p in content] == ["text", "image"]
    assert content[0]["text"] == "What is in this image?"
    np.testing.assert_array_equal(np.asarray(content[1]["image"].convert("RGB")), pixels)
    assert page.locator(".message.user img.thumb").count() == 1
    assert page.locator("#attachments .chip").count() == 0  # sent attachments are cleared
    _screenshot(page, tmp_path, "upload.png")

    # multi-turn: the second request carries the first exchange
    fakes["vision"].answer = "Yes."
    _ask(page, "Are you sure?")
    sent = fakes["vision"].calls[-1]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"].startswith("I see a small picture")


def test_paste_image_attaches(server, page):
    url, _ = server
    _open(page, url)
    png, _ = _png(2)
    page.evaluate("""(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], 'clip.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", list(png))
    chip = page.locator("#attachments .chip img")
    chip.wait_for()
    src = chip.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == png

    # drag-and-drop onto the chat attaches too
    page.evaluate("""(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
        document.getElementById('chat').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", list(png))
    sync_api.expect(page.locator("#attachments .chip img")).to_have_count(2)


def test_audio_attachment(server, fakes, page):
    url, _ = server
    _open(page, url)
    page.select_option("#model", "listener")
    assert page.is_enabled("#attach-audio") and page.is_disabled("#attach-image")
    rate = 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 4) / rate) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(tone.tobytes())
    wav = {"name": "tone.wav", "mimeType": "audio/wav", "buffer": buf.getvalue()}
    page.set_input_files("#audio-input", files=[wav])
    page.locator("#attachments .chip.audio").wait_for()
    fakes["listener"].answer = "A beep."
    answer = _ask(page, "What do you hear?")
    assert answer.locator(".body").inner_text().strip() == "A beep."
    audio = fakes["listener"].calls[-1][-1]["content"][1]  # the media layer decoded the input_audio part
    assert audio["type"] == "audio" and audio["sampling_rate"] == rate
    np.testing.assert_allclose(audio["audio"], tone / 32768, atol=1e-3)  # 16-bit PCM, at most a resampling nudge


def test_svg_artifact_is_sandboxed(server, fakes, page, tmp_path):
    url, paths = server
    _open(page, url)
    # The artifact's script probes the parent page, its storage and the network, and writes what happened into
    # its own document (no '<' or '&' in it: it sits in SVG, parsed as foreign content).
    probe = ("var r = [];"
             "try { r.push('parent:' + parent.document.title); } catch (e) { r.push('parent:' + e.name); }"
             "try { localStorage.setItem('k', '1'); r.push('storage:ok'); } catch (e) { r.push('storage:' + e.name); }"
             "document.documentElement.setAttribute('data-probe', r.join(' '));"
             f"fetch('{url}/leak').then(function () {{ document.documentElement.setAttribute('data-fetch', 'sent'); }},"
             " function (e) { document.documentElement.setAttribute('data-fetch', 'blocked:' + e.name); });")
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="240" height="160" viewBox="0 0 240 160">'
           '<rect x="10" y="10" width="220" height="140" rx="16" fill="#2f6feb"/>'
           '<circle cx="120" cy="80" r="44" fill="#ffd33d"/>'
           f'<script>{probe}</script></svg>')
    fakes["vision"].answer = f"Here is a sun on a blue card:\n```svg\n{svg}\n```\nThe script inside stays in its box."
    png, _ = _png(3)
    page.set_input_files("#image-input", files=[{"name": "sketch.png", "mimeType": "image/png", "buffer": png}])
    answer = _ask(page, "Draw this as an SVG, please.")

    frame_el = page.locator("#artifact-frame")
    assert frame_el.is_visible()
    sandbox = frame_el.get_attribute("sandbox")
    assert sandbox == "allow-scripts" and "allow-same-origin" not in sandbox
    srcdoc = frame_el.get_attribute("srcdoc")
    assert "default-src 'none'" in srcdoc and "<circle" in srcdoc
    frame = page.frame_locator("#artifact-frame")
    frame.locator("svg circle").wait_for()
    frame.locator("html[data-fetch]").wait_for()
    root = frame.locator("html")
    assert root.get_attribute("data-probe") == "parent:SecurityError storage:SecurityError"  # the script ran
    assert root.get_attribute("data-fetch").startswith("blocked:")
    assert "/leak" not in paths
    assert page.title() == "polymodal"
    # the chat shows the block as code (text), with a button back to the artifact
    assert "<circle" in answer.locator(".code pre").inner_text()
    assert answer.locator(".show-artifact").count() == 1
    _screenshot(page, tmp_path, "artifact.png", docs=True)

    # an artifact cannot navigate its frame to send data out either (the page's frame-src 'none')
    fakes["vision"].answer = f"```html\n<p>bye</p><script>location.href = '{url}/nav?secret=1';</script>\n```"
    _ask(page, "Leave.")
    page.wait_for_timeout(500)
    assert "/nav" not in paths
    assert page.locator("#artifact-tabs .tab").count() == 2


def test_model_html_is_text(server, fakes, page):
    url, _ = server
    _open(page, url)
    page.on("dialog", lambda d: d.dismiss())
    fakes["vision"].answer = ("Careful: <img src=x onerror=\"document.title='pwned'; window.pwned=1\"> and "
                              "<b>bold</b> <script>window.pwned=2</script>")
    answer = _ask(page, "Say something risky.")
    assert answer.locator(".body").inner_text().strip() == fakes["vision"].answer
    assert page.locator("#messages img, #messages b, #messages script").count() == 0
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned") is None and page.title() == "polymodal"
    assert page.locator("#artifact-tabs .tab").count() == 0  # no svg, no artifact


def test_errors_and_stop(server, fakes, page):
    url, _ = server
    _open(page, url)
    png, _ = _png(4)
    page.set_input_files("#image-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png}])
    page.select_option("#model", "text")
    assert page.is_disabled("#attach-image")
    answer = _ask(page, "Describe this.", status="error")  # the image is still attached: the server refuses it
    assert "does not accept image" in answer.locator(".error").inner_text()

    page.click("#imagegen summary")
    page.fill("#image-prompt", "a red bicycle")
    page.click("#imagegen-form button")
    error = page.locator("#imagegen-out .error")
    error.wait_for()
    assert "generates images" in error.inner_text()

    fakes["text"].answer = "Once upon a time " * 40  # 114 pieces, 50 ms apart
    fakes["text"].closed_early.clear()
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    answer = page.locator(".message.assistant").last
    sync_api.expect(answer.locator(".body")).to_contain_text("Once upon a time Once upon a time")
    page.click("#stop")
    answer.and_(page.locator("[data-status=stopped]")).wait_for()
    assert fakes["text"].closed_early.wait(5)  # the server closed the model's stream
    assert len(answer.locator(".body").inner_text()) < len(fakes["text"].answer)
    assert page.is_enabled("#send")


def test_api_key(keyed_server, fakes, page):
    page.goto(keyed_server + "/")
    form = page.locator("#key-form")
    form.wait_for()
    assert "API key" in page.inner_text("#key-message")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.locator("#model option").nth(1).wait_for(state="attached")
    assert form.is_hidden()
    fakes["vision"].answer = "Authorized."
    answer = _ask(page, "Hello?")
    assert answer.locator(".body").inner_text().strip() == "Authorized."
    assert page.evaluate("sessionStorage.getItem('polymodal.apiKey')") == KEY


def test_sampling_controls_start_from_the_models_defaults_and_are_sent(local_server, fakes, page, tmp_path):
    url, bodies = local_server
    _open(page, url)
    assert page.input_value("#model") == "local"
    assert page.is_visible("#temperature") and page.is_visible("#max-tokens")
    # from the card's generation_defaults: 0.7 and half of the tiny model's 256-token context
    assert page.input_value("#temperature") == "0.7" and page.input_value("#max-tokens") == "128"
    assert "repetition penalty 1.2" in page.inner_text("#model-info")  # applied by the server, named here
    _ask(page, "Hello?")
    assert {k: bodies[-1].get(k) for k in ("model", "temperature", "max_tokens", "stream")} == {
        "model": "local", "temperature": 0.7, "max_tokens": 128, "stream": True}
    assert "repetition_penalty" not in bodies[-1]  # left to the server, which applies the model's 1.2

    page.click("#new-chat")  # (the sampled answer, read back as the next prompt, could fill the tiny context)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "3")
    _ask(page, "And now greedy, briefly.")
    assert (bodies[-1]["temperature"], bodies[-1]["max_tokens"]) == (0, 3)
    _screenshot(page, tmp_path, "settings.png")

    # a closed model recommends nothing: the controls are empty and the request leaves the fields to the server
    page.select_option("#model", "text")
    assert page.input_value("#temperature") == "" and page.input_value("#max-tokens") == ""
    assert page.get_attribute("#temperature", "placeholder") == "default"
    fakes["text"].answer = "Fine."
    _ask(page, "How are you?")
    assert bodies[-1]["model"] == "text" and "temperature" not in bodies[-1] and "max_tokens" not in bodies[-1]
    page.select_option("#model", "local")  # back: the local model's defaults again
    assert page.input_value("#temperature") == "0.7" and page.input_value("#max-tokens") == "128"


def test_a_local_vision_language_model_takes_images(vlm_server, page, tmp_path, monkeypatch):
    """The model list says the local LLaVA takes images, so the image button is on; an image from the file picker
    and, in the next turn, a pasted one reach it, show in the conversation, and each answer streams in as the
    tokens `generate` gives that conversation alone."""
    url, bodies, served = vlm_server
    # the tiny model writes its 12 tokens faster than the page repaints; 30 ms a step lets the pieces show apart
    # (the tokens do not change: only when they arrive)
    model = served.engine.model
    step = model.generation_step

    def slow_step(*args, **kwargs):
        time.sleep(0.03)
        return step(*args, **kwargs)

    monkeypatch.setattr(model, "generation_step", slow_step)
    _open(page, url)
    assert page.input_value("#model") == "llava"
    assert page.is_enabled("#attach-image") and page.is_disabled("#attach-audio")
    assert "takes image, text" in page.inner_text("#model-info")
    page.fill("#max-tokens", "12")
    _record_answer_text(page)
    png, _ = _png(5, size=(40, 30))
    page.set_input_files("#image-input", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": png}])
    page.locator("#attachments .chip img").wait_for()
    answer = _ask(page, "What is in this image?")
    first = bodies[-1]["messages"]
    assert [p["type"] for p in first[-1]["content"]] == ["text", "image_url"]
    assert base64.b64decode(first[-1]["content"][1]["image_url"]["url"].split(",", 1)[1]) == png
    want, _ = greedy_vlm_answer(served.engine.model, served.processor, first, 12)
    assert want.strip() and answer.locator(".body").inner_text().strip() == want.strip()
    assert len([s for s in dict.fromkeys(page.evaluate("window.snapshots")) if s]) > 1  # streamed in pieces
    assert page.locator(".message.user img.thumb").count() == 1
    _screenshot(page, tmp_path, "llava.png")

    pasted, _ = _png(6, size=(32, 32))
    page.evaluate("""(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], 'clip.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", list(pasted))
    page.locator("#attachments .chip img").wait_for()
    second = _ask(page, "And this one?")
    sent = bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]  # the first image goes along again
    want, _ = greedy_vlm_answer(served.engine.model, served.processor, sent, 12)
    assert second.locator(".body").inner_text().strip() == want.strip()
    assert page.locator(".message.user img.thumb").count() == 2


class _RelativeBoxes:
    """A processor that only says its model's boxes are Qwen2-VL's (0-1000 relative): the /v1/grounding side."""

    def box_frame(self, width, height):
        from polymodal.processing.grounding import RELATIVE_1000

        return RELATIVE_1000


@pytest.fixture(scope="module")
def grounded_server():
    """A scripted chat model that takes images and videos and writes Qwen2-VL-style boxes."""
    fake = ScriptedChat("fake:grounded", {"text", "image", "video"})
    served = ServedModels([ServedModel("grounded", "chat", frozenset(fake.modalities), "fake", provider=fake,
                                       provider_slots=threading.BoundedSemaphore(2), processor=_RelativeBoxes()),
                           serve_model("text", ScriptedChat("fake:text", {"text"}))])
    with running(create_app(served)) as url:
        yield url, fake


def test_video_attachment_and_boxes_drawn_over_the_image(grounded_server, page, tmp_path):
    """The video button follows the card's modalities; an attached video reaches the model as sampled frames beside
    the image; the answer's box, read by the server in the model's frame (POST /v1/grounding), is drawn over the
    image in its own pixels."""
    av = pytest.importorskip("av")
    url, fake = grounded_server
    _open(page, url)
    page.select_option("#model", "grounded")
    assert page.is_enabled("#attach-video") and page.is_enabled("#attach-image")
    fake.answer = ("<|object_ref_start|>the square<|object_ref_end|><|box_start|>(250,500),(750,900)<|box_end|>")
    png, _ = _png(7, size=(200, 100))
    page.set_input_files("#image-input", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": png}])
    clip = io.BytesIO()
    with av.open(clip, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for t in range(8):
            frame = np.full((48, 64, 3), t * 30, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    page.set_input_files("#video-input", files=[{"name": "clip.mp4", "mimeType": "video/mp4",
                                                 "buffer": clip.getvalue()}])
    page.locator("#attachments .chip[data-kind=video]").wait_for()
    answer = _ask(page, "Where is the square?")
    content = fake.calls[-1][-1]["content"]
    assert [p["type"] for p in content] == ["text", "image", "video"]
    assert len(content[2]["frames"]) == 4 and content[2]["fps"] == 2.0  # 2 s at 4 fps, sampled at 2 fps
    assert page.locator(".message.user video.thumb").count() == 1
    rect = answer.locator("svg.regions rect")
    rect.wait_for()
    # (250, 500)-(750, 900) of 1000 on a 200 x 100 image: x 50..150, y 50..90
    assert [float(rect.get_attribute(k)) for k in ("x", "y", "width", "height")] == [50, 50, 100, 40]
    assert answer.locator("svg.regions text").text_content() == "the square"
    assert answer.locator("svg.regions").get_attribute("viewBox") == "0 0 200 100"
    _screenshot(page, tmp_path, "grounding.png")


def test_several_images_in_one_turn_and_qwen_vl_boxes(grounded_server, page, tmp_path):
    """Two images attached in one turn both reach the model, in order, and both show in the conversation; an answer
    in Qwen-VL's grounding form (<ref>..</ref><box>(x1,y1),(x2,y2)</box>, 0-1000) is drawn over the first image."""
    url, fake = grounded_server
    _open(page, url)
    page.select_option("#model", "grounded")
    fake.answer = "<ref>the left shape</ref><box>(0,0),(500,1000)</box>"
    first, _ = _png(8, size=(120, 60))
    second, _ = _png(9, size=(40, 40))
    page.set_input_files("#image-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": first},
                                                {"name": "b.png", "mimeType": "image/png", "buffer": second}])
    page.locator("#attachments .chip img").nth(1).wait_for()
    answer = _ask(page, "Which shape is on the left?")
    content = fake.calls[-1][-1]["content"]
    assert [p["type"] for p in content] == ["text", "image", "image"]
    assert page.locator(".message.user img.thumb").count() == 2
    rect = answer.locator("svg.regions rect")
    rect.wait_for()
    # (0, 0)-(500, 1000) of 1000 on the first image, 120 x 60: x 0..60, y 0..60
    assert [float(rect.get_attribute(k)) for k in ("x", "y", "width", "height")] == [0, 0, 60, 60]
    assert answer.locator("svg.regions text").text_content() == "the left shape"
    assert answer.locator("svg.regions").get_attribute("viewBox") == "0 0 120 60"
    _screenshot(page, tmp_path, "two-images.png")


@pytest.fixture(scope="module")
def sd_server(fakes, tmp_path_factory):
    """A tiny random Stable Diffusion folder saved by diffusers, beside a closed text-only (fake) chat model."""
    pytest.importorskip("diffusers")
    pytest.importorskip("open_clip")
    directory = tmp_path_factory.mktemp("tiny-sd")
    save_tiny_sd(directory)
    served = ServedModels([load_model("sd", directory), serve_model("text", fakes["text"])])
    try:
        with running(create_app(served)) as url:
            yield url, served
    finally:
        served.close()


def test_image_generation_view_with_a_served_diffusion_model(sd_server, page, tmp_path, monkeypatch):
    """The image view lists the model whose card says it makes images and starts from its defaults; the prompt,
    steps, seed and size go out, each step's progress streams in, and the image shown is the pipeline's own for
    that seed, pixel for pixel; a size the model cannot make shows the server's 400."""
    import torch

    url, served = sd_server
    pipe = served.get("sd").images.pipe
    real = pipe.model.predict

    def slow(*args, **kwargs):  # slow steps, so that the page shows them
        time.sleep(0.15)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "predict", slow)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits at barriers on a busy machine
    try:
        _open(page, url)
        assert page.input_value("#model") == "text" and page.is_disabled("#model option[value=sd]")
        page.click("#imagegen summary")
        assert page.is_visible("#image-model") and page.input_value("#image-model") == "sd"
        assert page.input_value("#image-steps") == "50" and page.input_value("#image-size") == "16x16"
        page.fill("#image-prompt", "a red bicycle")
        page.fill("#image-steps", "6")
        page.fill("#image-seed", "9")
        page.fill("#image-size", "16x24")
        page.click("#image-generate")
        sync_api.expect(page.locator("#image-progress-text")).to_contain_text("of 6")  # streamed step progress
        shown = page.locator("#imagegen-out[data-status=done] img.generated")
        shown.wait_for()
        assert page.is_hidden("#imagegen-progress") and page.is_enabled("#image-generate")
        got = Image.open(io.BytesIO(base64.b64decode(shown.get_attribute("src").split(",", 1)[1])))
        expected = pipe("a red bicycle", seed=9, num_inference_steps=6, height=24, width=16)[0]
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
        # the browser decoded it: the image element has the generated image's own size
        assert page.evaluate("[...document.querySelectorAll('#imagegen-out img')].map(i => [i.naturalWidth, "
                             "i.naturalHeight])") == [[16, 24]]
        assert page.inner_text("#imagegen-out figcaption") == "16x24, seed 9"
        _screenshot(page, tmp_path, "imagegen.png")

        page.fill("#image-size", "17x16")
        page.click("#image-generate")
        error = page.locator("#imagegen-out[data-status=error] .error")
        error.wait_for()
        assert "multiple of 2" in error.inner_text()
    finally:
        torch.set_num_threads(threads)
