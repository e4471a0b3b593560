"""Serving a vision-language model: a tiny random LLaVA saved by transformers, through the continuous-batching
engine (image requests are extra prefill inputs; mixed with text-only ones, each row's greedy tokens equal
`polymodal.generation.generate` on that request alone) and bounds checked before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import LLAVA_IMAGE_TOKENS, greedy_vlm_answer, save_tiny_llava, serve_subprocess

import polymodal as pm
from polymodal.generation import generate
from polymodal.pipelines.text import default_text_tokenizer
from polymodal.serve.engine import ChatEngine, Finished

CORPUS = ["Hello there, how are you? I am fine, thank you. What is in this image? A red square on blue."] * 20


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), CORPUS)


@pytest.fixture(scope="module")
def llava(llava_dir):
    return pm.load(llava_dir)


@pytest.fixture(scope="module")
def tokenizer(llava):
    return default_text_tokenizer(llava)


def image_prompt(model, images: int, text: list[int]) -> list[int]:
    """Token ids as the processor lays them out: each image's placeholder expanded to its feature count."""
    return [1] + [model.config.image_token_index] * (LLAVA_IMAGE_TOKENS * images) + text


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def alone(model, ids: list[int], max_new_tokens: int, pixel_values=None) -> list[int]:
    extras = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, **extras)
    return out[0, len(ids):].tolist()


def collect(request) -> tuple[list[int], Finished]:
    ids = []
    for event in request.events():
        if isinstance(event, Finished):
            return ids, event
        ids.append(event.token_id)
    raise AssertionError("events ended without Finished")


class Forwards:
    """Records the batch shape of every forward of the model, and whether images came with it."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def record(module, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            self.calls.append((tuple(ids.shape), kwargs.get("pixel_values") is not None))

        self.handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ the engine
def test_image_and_text_requests_share_a_batch_and_match_generate_alone(llava, tokenizer):
    """Requests with one image, two images and none decode together; each gets exactly the greedy tokens that
    `generate` gives it alone. The images go to the request's prefill only; the decode steps are shared."""
    specs = [(image_prompt(llava, 1, [40, 41, 42]), pixels(1, 0), 14),
             (image_prompt(llava, 0, [43, 44, 45, 46, 47]), None, 12),
             (image_prompt(llava, 2, [48, 49]), pixels(2, 4), 10),
             (image_prompt(llava, 1, [50]), pixels(1, 2), 16)]
    engine = ChatEngine(llava, tokenizer, max_batch=4)
    with Forwards(llava) as forwards:
        requests = [engine.submit(ids, extras=None if px is None else {"pixel_values": px}, max_new_tokens=n)
                    for ids, px, n in specs]
        with engine:  # all four wait before the start: they are prefilled one by one, then decode together
            results = [collect(r) for r in requests]
    for (ids, px, n), (got, finished) in zip(specs, results):
        assert got == alone(llava, ids, n, px)
        assert finished.prompt_tokens == len(ids) and finished.completion_tokens == n
    assert len({tuple(got) for got, _ in results}) == 4
    prefills = [(shape, images) for shape, images in forwards.calls if shape[1] > 1]
    assert prefills == [((1, len(ids)), px is not None) for ids, px, _ in specs]  # images: at their prefill only
    steps = [(shape, images) for shape, images in forwards.calls if shape[1] == 1]
    assert not any(images for _, images in steps) and max(shape[0] for shape, _ in steps) == 4


def test_an_image_request_joining_a_running_text_batch(llava, tokenizer):
    """An image request arrives while text-only rows decode (its prompt is longer than the head: the batch shifts
    right), and a text request joins after it: every row still equals `generate` alone."""
    text_a = image_prompt(llava, 0, [60, 61, 62])
    with ChatEngine(llava, tokenizer) as engine:
        a = engine.submit(text_a, max_new_tokens=20)
        events = a.events()
        first = [next(events) for _ in range(3)]  # a is decoding
        b_ids, b_px = image_prompt(llava, 1, [63, 64]), pixels(1, 3)
        b = engine.submit(b_ids, extras={"pixel_values": b_px}, max_new_tokens=12)
        c_ids = image_prompt(llava, 0, [65, 66, 67, 68])
        c = engine.submit(c_ids, max_new_tokens=8)
        got_a = [e.token_id for e in first] + [e.token_id for e in events if not isinstance(e, Finished)]
        got_b, got_c = collect(b)[0], collect(c)[0]
    assert got_a == alone(llava, text_a, 20)
    assert got_b == alone(llava, b_ids, 12, b_px)
    assert got_c == alone(llava, c_ids, 8)
    assert engine.stats["prefills"] == 3


def test_bad_image_requests_are_refused_at_submit_before_any_forward(llava, tokenizer, llama):
    """Each refusal names what was wrong, comes from `submit` (so a server answers 400, not a failed stream) and
    happens before the model runs or a cache is allocated."""
    engine = ChatEngine(llava, tokenizer, max_pixels=2 * 32 * 32)
    one = image_prompt(llava, 1, [40])
    with Forwards(llava) as forwards, engine:
        with pytest.raises(ValueError, match=r"holds 16 placeholder tokens \(id \d+\) but its images fill 32"):
            engine.submit(one, extras={"pixel_values": pixels(2, 0)})  # more images than image tokens
        with pytest.raises(ValueError, match=r"holds 32 placeholder tokens .* but its images fill 16"):
            engine.submit(image_prompt(llava, 2, [40]), extras={"pixel_values": pixels(1, 0)})  # the reverse
        with pytest.raises(ValueError, match="holds 16 placeholder tokens .* but its images fill 0"):
            engine.submit(one)  # image tokens without images
        with pytest.raises(ValueError, match="3,072 pixels, over the limit of 2,048 per request"):
            engine.submit(image_prompt(llava, 3, [40]), extras={"pixel_values": pixels(3, 0)})
        with pytest.raises(ValueError, match=r"\(images, channels, height, width\)"):
            engine.submit(one, extras={"pixel_values": torch.zeros(3, 32, 32)})
        with pytest.raises(ValueError, match="Llava takes no input 'image_sizes'; it takes: pixel_values"):
            engine.submit(one, extras={"pixel_values": pixels(1, 0), "image_sizes": torch.tensor([[32, 32]])})
        with pytest.raises(ValueError, match="must be a tensor"):
            engine.submit(one, extras={"pixel_values": [[0.0]]})
        # the prompt after expansion: 12 images fill 192 of the 256 positions, 70 more tokens do not fit
        with pytest.raises(ValueError, match=r"prompt \(195 tokens, 192 of them for its images\) plus max_new_tokens "
                                             r"\(70\) is over the model's context of 256 tokens.*send fewer images"):
            ChatEngine(llava, tokenizer).submit(image_prompt(llava, 12, [40, 41]),
                                                extras={"pixel_values": pixels(12, 0)}, max_new_tokens=70)
        ok = engine.submit(one, extras={"pixel_values": pixels(1, 5)}, max_new_tokens=4)  # the engine goes on
        assert collect(ok)[1].reason == "length"
    assert len([c for c in forwards.calls if c[0][1] > 1]) == 1  # only the good request was prefilled

    # a text-only decoder takes no images at all
    text_engine = ChatEngine(llama, tokenizer)
    with pytest.raises(ValueError, match="Llama takes no input 'pixel_values'; it takes: text only"):
        text_engine.submit([1, 5, 6], extras={"pixel_values": pixels(1, 0)})
    text_engine.close()


@pytest.fixture(scope="module")
def llama(llava):
    return llava.language_model


# ------------------------------------------------------------------------------------------------ the server
KEY = "vlm-key"
QUESTION = "What is in this image?"
# images only in user turns: an image in another message is never written into the prompt
USER_IMAGES_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' and message['role'] == 'user' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def png(seed: int, size=(40, 30)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(text: str, *urls: str, role: str = "user") -> list[dict]:
    """One OpenAI message: the text, then an image_url part per URL."""
    return [{"role": role, "content": [{"type": "text", "text": text},
                                       *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]


@pytest.fixture(scope="module")
def image_server():
    """A plain HTTP server on loopback serving /photo.png (reached as http://images.test/photo.png through the
    media policy's resolver)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = png(7)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            found = self.path == "/photo.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], body
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def served(llava_dir, tmp_path_factory):
    from serve_helpers import save_tiny_chat_llama

    from polymodal.serve import ServedModels
    from polymodal.serve.registry import load_model

    text_dir = save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat"), CORPUS)
    user_images = save_tiny_llava(tmp_path_factory.mktemp("user-images"), CORPUS, template=USER_IMAGES_TEMPLATE)
    s = ServedModels([load_model("llava", llava_dir, max_batch=4), load_model("text", text_dir),
                      load_model("user-images", user_images)])
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(served, image_server):
    from serve_helpers import running

    from polymodal.serve import create_app
    from polymodal.serve.media import MediaPolicy

    port, _ = image_server
    policy = MediaPolicy(allow_remote=True, allowed_domains=("images.test",), allow_private_networks=True,
                         resolver=lambda host, p: ["127.0.0.1"])
    with running(create_app(served, api_key=KEY, media_policy=policy)) as url:
        yield url, port


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def processor(served):
    return served.get("llava").processor


def test_the_model_card_says_it_takes_images(oai):
    cards = {m.id: m for m in oai.models.list()}
    assert cards["llava"].modalities == ["image", "text"] and cards["text"].modalities == ["text"]
    assert cards["llava"].context_length == 256


def test_image_chat_with_the_openai_client_equals_generate_alone(oai, llava, processor):
    """An image_url part (a data: URL) reaches the model: the answer, streamed or not, is what `generate` gives
    that conversation alone, and the prompt's usage counts the image's expanded tokens."""
    messages = ask(QUESTION, data_url(png(1)))
    want, prompt_tokens = greedy_vlm_answer(llava, processor, messages, 12)
    out = oai.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want and want
    assert out.usage.prompt_tokens == prompt_tokens > LLAVA_IMAGE_TOKENS
    stream = oai.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came piece by piece
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    # two images in one turn, an image in a later turn, and a text-only chat with the same model
    two = ask("Compare them.", data_url(png(2)), data_url(png(3)))
    later = [*ask("Hello there.", data_url(png(4))), {"role": "assistant", "content": "I am fine."},
             *ask("And this one?", data_url(png(5)))]
    text = [{"role": "user", "content": "Hello there, how are you?"}]
    for messages in (two, later, text):
        want, _ = greedy_vlm_answer(llava, processor, messages, 10)
        got = oai.chat.completions.create(model="llava", messages=messages, max_tokens=10, temperature=0)
        assert got.choices[0].message.content == want


def test_concurrent_image_and_text_requests_share_the_engine(oai, served, llava, processor):
    """Image requests and text-only ones sent at once decode in one batch; each answer equals its own `generate`."""
    from concurrent.futures import ThreadPoolExecutor

    conversations = [ask(QUESTION, data_url(png(10))), [{"role": "user", "content": "How are you?"}],
                     ask("Compare them.", data_url(png(11)), data_url(png(12))), ask("Thank you.")]
    wants = [greedy_vlm_answer(llava, processor, c, 16)[0] for c in conversations]
    engine = served.get("llava").engine
    before = dict(engine.stats)

    def send(messages):
        out = oai.chat.completions.create(model="llava", messages=messages, max_tokens=16, temperature=0)
        return out.choices[0].message.content, out.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, conversations))
    assert [a for a, _ in answers] == wants
    steps = engine.stats["steps"] - before["steps"]
    assert engine.stats["prefills"] - before["prefills"] == 4
    assert steps < sum(n for _, n in answers)  # rows shared decode steps


def test_an_allow_listed_remote_image_reaches_the_model(oai, server, llava, processor):
    url, port = server
    body = png(7)  # what the image server sends
    want, _ = greedy_vlm_answer(llava, processor, ask(QUESTION, data_url(body)), 10)
    out = oai.chat.completions.create(model="llava", messages=ask(QUESTION, f"http://images.test:{port}/photo.png"),
                                      max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want


def _post(server, body: dict):
    import httpx

    return httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def _refused(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


GARBAGE = "data:image/png;base64,AAAA"  # not an image: a refusal that names it shows nothing was decoded


@pytest.mark.parametrize("body, code, says", [
    # an image part sent to a text-only model
    ({"model": "text", "messages": ask(QUESTION, data_url(png(1)))}, "unsupported_modality",
     "does not accept image input"),
    # more image tokens than images: the user typed the image placeholder into the text
    ({"model": "llava", "messages": ask("What does <image> mean here?", data_url(png(1)))}, None,
     r"has 1 image\(s\) but its prompt has 2 <image> token\(s\)"),
    ({"model": "llava", "messages": ask("Is <image> a tag?")}, None, r"has 0 image\(s\) but its prompt has 1"),
    # more images than image tokens: this model's template writes images in user turns only
    ({"model": "user-images", "messages": [*ask("Look.", data_url(png(1)), role="system"), *ask(QUESTION)]}, None,
     r"has 1 image\(s\) but its prompt has 0 <image> token"),
    # images that alone fill the context (16 x 16 tokens of 256): refused before any of them is decoded
    ({"model": "llava", "messages": ask(QUESTION, *[GARBAGE] * 16)}, "context_length_exceeded",
     "16 images, which take 16 tokens each .* 256 tokens, and its context is 256. Send at most 15 images"),
    # a prompt that overflows the context once its images are expanded (15 x 16 = 240 tokens, and the text)
    ({"model": "llava", "messages": ask("Hello there, how are you? " * 4, *[data_url(png(1))] * 15)},
     "context_length_exceeded", "once its 15 image.* are expanded to 16 tokens each, over the model's context of 256"),
    # ... or together with the answer it asks for
    ({"model": "llava", "messages": ask(QUESTION, *[data_url(png(1))] * 10), "max_tokens": 100},
     "context_length_exceeded", r"prompt \(\d+ tokens, 160 of them for its images\) plus max_new_tokens \(100\)"),
])
def test_bad_image_requests_are_400_and_the_server_goes_on(server, body, code, says):
    import re

    err = _refused(_post(server, body))
    assert err["code"] == code and re.search(says, err["message"]), err
    assert err["param"] == ("max_tokens" if "max_tokens" in body else
                            "messages[0].content[1]" if code == "unsupported_modality" else "messages")
    r = _post(server, {"model": "llava", "messages": ask(QUESTION, data_url(png(1))), "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_grounding_needs_a_model_whose_boxes_have_a_frame(server):
    """LLaVA writes no boxes in a known frame: POST /v1/grounding says so (400, OpenAI's error shape); the card
    does not offer it."""
    import httpx

    r = httpx.post(f"{server[0]}/v1/grounding", json={"model": "llava", "text": "(1,2),(3,4)", "image_size": [8, 8]},
                   timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    err = _refused(r)
    assert err["code"] == "model_not_supported" and "no boxes in a known frame" in err["message"]
    card = httpx.get(f"{server[0]}/v1/models/llava", timeout=60, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "grounding" not in card


def test_an_image_over_the_pixel_budget_is_refused_unread(served):
    """The media layer reads each image's size from its header and refuses one over `max_pixels` (413, as every
    media limit) before decoding it; the next request is served."""
    from fastapi.testclient import TestClient

    from polymodal.serve import create_app
    from polymodal.serve.media import MediaPolicy

    app = create_app(served, media_policy=MediaPolicy(max_pixels=1000))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "llava", "messages": ask(QUESTION, data_url(png(1)))})
        err = _refused(r, 413)
        assert "40x30 = 1,200 pixels, over the limit of 1,000" in err["message"] and "content[1]" in err["message"]
        small = data_url(png(1, size=(30, 30)))
        r = client.post("/v1/chat/completions", json={"model": "llava", "messages": ask(QUESTION, small),
                                                      "max_tokens": 3})
        assert r.status_code == 200


def test_polymodal_serve_a_llava_directory_with_the_openai_client(llava_dir, llava, tmp_path):
    """`polymodal serve --model <llava dir>` in its own process, driven by the official client: the card takes
    images, an image_url answer streams and equals `generate` alone, a bad request is a 400 and the server goes on,
    and a remote URL is refused naming the flags that would allow it."""


    from polymodal.processing.vlm import LlavaProcessor

    openai = pytest.importorskip("openai")
    with serve_subprocess(tmp_path, "--model", f"llava={llava_dir}", env={"OMP_NUM_THREADS": "1"}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.models.retrieve("llava").modalities == ["image", "text"]
        messages = ask(QUESTION, data_url(png(20)))
        want, _ = greedy_vlm_answer(llava, LlavaProcessor.from_pretrained(llava_dir), messages, 12)
        stream = client.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        with pytest.raises(openai.BadRequestError, match="prompt has 2 <image> token") as e:
            client.chat.completions.create(model="llava", messages=ask("A <image> tag?", data_url(png(20))))
        assert e.value.status_code == 400
        with pytest.raises(openai.BadRequestError, match="--allow-remote-media --allowed-domain"):
            client.chat.completions.create(model="llava", messages=ask(QUESTION, "https://example.com/cat.png"))
        again = client.chat.completions.create(model="llava", messages=messages, max_tokens=12, temperature=0)
        assert again.choices[0].message.content == want


# ------------------------------------------------------------------------------------------------ Qwen2-VL
def qwen2_vl_request(model, kind: str | None, grid: tuple[int, int, int], text: list[int], seed: int):
    """(ids, extras) as Qwen2-VL's processor lays a request out: <|vision_start|>, the placeholder expanded to the
    grid's merged patches, <|vision_end|>, then the text; pixel rows as its patchifier gives them."""
    c = model.config
    if kind is None:
        return [1, *text], {}
    t, h, w = grid
    fill = [c.token_id(kind)] * (t * h * w // c.vision.spatial_merge_size ** 2)
    rows = torch.randn(t * h * w, c.vision.patch_dim, generator=torch.Generator().manual_seed(seed))
    names = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    return ([1, c.vision_start_token_id, *fill, c.vision_end_token_id, *text],
            {names[0]: rows, names[1]: torch.tensor([grid])})


def test_qwen2_vl_requests_carry_their_m_rope_offsets_through_the_shared_batch(tokenizer):
    """Qwen2-VL's images and videos take 3-D positions, and each row continues from its own offset (rope_deltas)
    after its prompt: an image request, a video request and a text request decoding together, one joining late,
    each equal to `generate` alone; the engine checks a request's placeholders against its grids at submit."""
    model = pm.build("qwen2_vl", "qwen2-vl-tiny-test")
    torch.manual_seed(0)
    for p in model.parameters():  # wider than the default init, so the tiny model does not repeat one token
        p.data.normal_(0, 0.3)
    specs = [(*qwen2_vl_request(model, "image", (1, 4, 6), [40, 41], 0), 10),
             (*qwen2_vl_request(model, None, (0, 0, 0), [43, 44, 45, 46], 1), 12),
             (*qwen2_vl_request(model, "video", (2, 4, 4), [48], 2), 9)]
    late_ids, late_extras = qwen2_vl_request(model, "image", (1, 2, 2), [50, 51, 52], 3)
    with ChatEngine(model, tokenizer, max_batch=4) as engine:
        requests = [engine.submit(ids, extras=extras, max_new_tokens=n) for ids, extras, n in specs]
        events = requests[0].events()
        first = [next(events) for _ in range(2)]
        late = engine.submit(late_ids, extras=late_extras, max_new_tokens=8)
        got = [[e.token_id for e in first] + [e.token_id for e in events if not isinstance(e, Finished)]]
        got += [collect(r)[0] for r in requests[1:]] + [collect(late)[0]]
        with pytest.raises(ValueError, match=r"holds 2 placeholder tokens .* but its images fill 1"):
            engine.submit(late_ids[:3] + late_ids[2:], extras=late_extras)  # one placeholder too many
        with pytest.raises(ValueError, match=r"image_grid_thw .* describes 4 patches .* pixel_values has shape \(3, "):
            engine.submit(late_ids, extras={**late_extras, "pixel_values": late_extras["pixel_values"][:3]})
    for (ids, extras, n), tokens in zip([*specs, (late_ids, late_extras, 8)], got):
        out = generate(model, torch.tensor([ids]), max_new_tokens=n, **extras)
        assert tokens == out[0, len(ids):].tolist()
    assert len({tuple(t) for t in got}) > 1
