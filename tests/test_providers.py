"""Hosted chat models (polymodal.providers) against local fakes of the OpenAI, Anthropic and Gemini wire protocols.

The official SDKs make real HTTP requests to tests/fake_providers.py; we check what they send (roles, system prompt
placement, media encodings decoded back, max tokens, stream flag, API key header) and what we make of the answers
(text, streamed pieces in order, finish reason, usage, errors with their HTTP status).
"""

from __future__ import annotations

import base64
import io
import socket
import wave

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from fake_providers import FakeAnthropic, FakeGemini, FakeOpenAI  # noqa: E402

import polymodal as pm  # noqa: E402
from polymodal.providers import ChatResult, ProviderError, load_provider  # noqa: E402
from polymodal.providers.anthropic_api import AnthropicProvider  # noqa: E402
from polymodal.providers.gemini_api import GeminiProvider  # noqa: E402
from polymodal.providers.openai_api import OpenAIProvider  # noqa: E402

KEY = "test-key-123"
PROVIDERS = ["openai", "anthropic", "gemini"]
ENV = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_BASE_URL",
       "ANTHROPIC_BASE_URL", "POLYMODAL_GEMINI_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI"]


@pytest.fixture(scope="module")
def fakes():
    with FakeOpenAI() as o, FakeAnthropic() as a, FakeGemini() as g:
        yield {"openai": o, "anthropic": a, "gemini": g}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)


def _base_url(kind: str, fake) -> str:
    return fake.url + "/v1" if kind == "openai" else fake.url


@pytest.fixture(params=PROVIDERS)
def setup(request, fakes):
    """(kind, fake reset to its default reply, provider pointed at it with no retries)."""
    kind = request.param
    fake = fakes[kind]
    fake.requests.clear()
    fake.pieces, fake.finish, fake.usage, fake.error = ["Hello", ", ", "world", "!"], fake.default_finish, (12, 4), None
    model = {"openai": "gpt-4o", "anthropic": "claude-3-5-sonnet-20241022", "gemini": "gemini-1.5-pro"}[kind]
    provider = load_provider(f"{kind}:{model}", api_key=KEY, base_url=_base_url(kind, fake), max_retries=0)
    return kind, fake, provider


def _key_sent(kind: str, headers: dict) -> str | None:
    """The API key as each SDK sends it: OpenAI a bearer token, Anthropic x-api-key (or a bearer token in newer
    SDKs), Gemini x-goog-api-key."""
    if kind == "gemini":
        return headers.get("x-goog-api-key")
    if kind == "anthropic" and "x-api-key" in headers:
        return headers["x-api-key"]
    return headers.get("authorization", "").removeprefix("Bearer ")


def _max_tokens(kind: str, body: dict):
    return body["generationConfig"]["maxOutputTokens"] if kind == "gemini" else body["max_tokens"]


def _turns(kind: str, body: dict) -> list[dict]:
    return body["contents"] if kind == "gemini" else body["messages"]


def _media(kind: str, body: dict) -> list[tuple[str, bytes]]:
    """Every image/audio part the request carried, as (mime type, decoded bytes), in order."""
    out = []
    for turn in _turns(kind, body):
        content = turn.get("parts") if kind == "gemini" else turn["content"]
        for p in content if isinstance(content, list) else []:
            if kind == "openai" and p["type"] == "image_url":
                head, data = p["image_url"]["url"].split(",", 1)
                out.append((head.removeprefix("data:").removesuffix(";base64"), base64.b64decode(data)))
            elif kind == "openai" and p["type"] == "input_audio":
                out.append(("audio/" + p["input_audio"]["format"], base64.b64decode(p["input_audio"]["data"])))
            elif kind == "anthropic" and p["type"] == "image":
                out.append((p["source"]["media_type"], base64.b64decode(p["source"]["data"])))
            elif kind == "gemini" and "inlineData" in p:  # protobuf JSON: either field spelling, either base64
                blob = p["inlineData"]
                data = base64.b64decode(blob["data"].replace("-", "+").replace("_", "/"))
                out.append((blob.get("mimeType", blob.get("mime_type")), data))
    return out


def _texts(kind: str, turn: dict) -> list[str]:
    content = turn.get("parts") if kind == "gemini" else turn["content"]
    if isinstance(content, str):
        return [content]
    return [p["text"] for p in content if "text" in p and (kind == "gemini" or p.get("type") == "text")]


# ------------------------------------------------------------------------------------------------ answers
def test_chat_text_finish_and_usage(setup):
    kind, fake, provider = setup
    result = provider.chat([{"role": "user", "content": "Say hello"}], max_new_tokens=33)
    assert result == ChatResult("Hello, world!", "stop", 12, 4)
    assert len(fake.requests) == 1
    req = fake.requests[0]
    assert _key_sent(kind, req.headers) == KEY
    assert _max_tokens(kind, req.body) == 33
    temperature = req.body["generationConfig"]["temperature"] if kind == "gemini" else req.body["temperature"]
    assert temperature == 0  # do_sample=False is greedy
    if kind == "gemini":
        assert req.path == "/v1beta/models/gemini-1.5-pro:generateContent"
    else:
        assert req.body["model"] == provider.model and not req.body.get("stream")
    assert _texts(kind, _turns(kind, req.body)[0]) == ["Say hello"]


def test_stream_pieces_in_order(setup):
    kind, fake, provider = setup
    fake.pieces = ["One", " two", " three", "."]
    stream = provider.stream("Count", max_new_tokens=5)
    got = []
    while True:
        try:
            got.append(next(stream))
        except StopIteration as stop:
            result = stop.value
            break
    assert got == ["One", " two", " three", "."]
    assert result == ChatResult("One two three.", "stop", 12, 4)
    req = fake.requests[-1]
    if kind == "gemini":
        assert req.path.endswith(":streamGenerateContent") and req.query["alt"] == ["sse"]
    else:
        assert req.body["stream"] is True
    assert _max_tokens(kind, req.body) == 5


def test_length_finish_reason(setup):
    kind, fake, provider = setup
    fake.finish = {"openai": "length", "anthropic": "max_tokens", "gemini": "MAX_TOKENS"}[kind]
    assert provider.chat("Hi", max_new_tokens=2).finish_reason == "length"


def test_stream_result_via_yield_from(setup):
    """The streamed answer's finish reason and usage come back as the generator's return value."""
    kind, fake, provider = setup
    fake.finish = {"openai": "length", "anthropic": "max_tokens", "gemini": "MAX_TOKENS"}[kind]
    results = []

    def consume():
        results.append((yield from provider.stream("Hi")))

    assert "".join(consume()) == "Hello, world!"
    assert results == [ChatResult("Hello, world!", "length", 12, 4)]


# ------------------------------------------------------------------------------------------------ what is sent
def test_system_prompt_and_roles(setup):
    kind, fake, provider = setup
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    provider.chat(conversation)
    body = fake.requests[-1].body
    turns = _turns(kind, body)
    if kind == "openai":
        assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
        assert turns[0]["content"] == "Be brief."
    elif kind == "anthropic":
        assert body["system"] == "Be brief."
        assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    else:
        assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
        assert [t["role"] for t in turns] == ["user", "model", "user"]
    assert [_texts(kind, t) for t in turns[-3:]] == [["Hi"], ["Hello."], ["Again"]]


def test_system_argument(setup):
    kind, fake, provider = setup
    provider.chat("Hi", system="You are terse.")
    body = fake.requests[-1].body
    if kind == "openai":
        assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    elif kind == "anthropic":
        assert body["system"] == "You are terse." and len(body["messages"]) == 1
    else:
        assert body["systemInstruction"]["parts"][0]["text"] == "You are terse." and len(body["contents"]) == 1


def test_image_is_lossless_png(setup):
    kind, fake, provider = setup
    pixels = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    provider.chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image", "image": image}]}])
    turn = _turns(kind, fake.requests[-1].body)[0]
    assert _texts(kind, turn) == ["What is this?"]
    (mime, data), = _media(kind, fake.requests[-1].body)
    assert mime == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)


def test_audio(setup):
    kind, fake, provider = setup
    samples = (0.5 * np.sin(np.linspace(0, 40, 1600))).astype(np.float32)
    message = [{"role": "user", "content": [{"type": "audio", "audio": samples, "sampling_rate": 16000},
                                            {"type": "text", "text": "Transcribe."}]}]
    if kind == "anthropic":
        with pytest.raises(ProviderError) as e:
            provider.chat(message)
        assert e.value.status == 400 and "audio" in e.value.message
        assert fake.requests == []  # refused before any request
        return
    provider.chat(message)
    (mime, data), = _media(kind, fake.requests[-1].body)
    assert mime == "audio/wav"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        decoded = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767
    np.testing.assert_allclose(decoded, samples, atol=1 / 32767)  # 16-bit quantization


def test_video_as_frames(setup):
    kind, fake, provider = setup
    frames = [Image.new("RGB", (32, 24), (10 * i, 100, 200)) for i in range(5)]
    provider.chat([{"role": "user", "content": [{"type": "video", "frames": frames, "fps": 2.0},
                                                {"type": "text", "text": "What happens?"}]}])
    turn = _turns(kind, fake.requests[-1].body)[0]
    media = _media(kind, fake.requests[-1].body)
    assert [m for m, _ in media] == ["image/jpeg"] * 5
    assert _texts(kind, turn) == ["[video: 5 frames sampled at 2 fps]", "What happens?"]
    red = [np.asarray(Image.open(io.BytesIO(d)))[12, 16, 0] for _, d in media]
    np.testing.assert_allclose(red, [0, 10, 20, 30, 40], atol=3)  # in order; JPEG is close, not exact


def test_sampling_options(setup):
    kind, fake, provider = setup
    provider.chat("Hi", do_sample=True, temperature=0.7, top_p=0.9, seed=3, stop=["END"], max_new_tokens=9)
    body = fake.requests[-1].body
    if kind == "openai":
        assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (0.7, 0.9, 3, ["END"])
    elif kind == "anthropic":
        assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.7, 0.9, ["END"])
        assert "seed" not in body  # the Messages API has none
    else:
        cfg = body["generationConfig"]
        assert (cfg["temperature"], cfg["topP"], cfg["seed"], cfg["stopSequences"]) == (0.7, 0.9, 3, ["END"])


# ------------------------------------------------------------------------------------------------ the pipeline shape
def test_call_matches_text_pipeline_shape(setup):
    kind, fake, provider = setup
    assert provider("Hi ") == [{"generated_text": "Hi Hello, world!"}]
    assert provider("Hi", return_full_text=False) == [{"generated_text": "Hello, world!"}]
    chat = [{"role": "user", "content": "Hi"}]
    assert provider(chat) == [{"generated_text": [*chat, {"role": "assistant", "content": "Hello, world!"}]}]
    assert provider(["a", chat], return_full_text=False) == [[{"generated_text": "Hello, world!"}]] * 2
    assert provider.name == f"{kind}:{provider.model}" and "image" in provider.modalities


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("status", [401, 429])
def test_api_errors_keep_status(setup, status):
    kind, fake, provider = setup
    fake.error = (status, "upstream says no")
    with pytest.raises(ProviderError) as e:
        provider.chat("Hi")
    assert e.value.status == status and "upstream says no" in e.value.message
    with pytest.raises(ProviderError) as e:
        list(provider.stream("Hi"))
    assert e.value.status == status
    assert len(fake.requests) == 2  # max_retries=0: one request each
    if status == 429 and kind != "gemini":
        assert e.value.retry_after == 7


@pytest.mark.parametrize("spec,env", [("openai:gpt-4o", "OPENAI_API_KEY"),
                                      ("anthropic:claude-3-5-sonnet-20241022", "ANTHROPIC_API_KEY"),
                                      ("gemini:gemini-1.5-pro", "GEMINI_API_KEY"),
                                      ("google:gemini-1.5-pro", "GOOGLE_API_KEY")])
def test_missing_key_before_any_request(spec, env):
    with pytest.raises(ProviderError) as e:
        pm.pipeline("text-generation", model=spec)
    assert e.value.status == 401 and env in e.value.message


def test_bad_input_refused_before_sending(setup):
    kind, fake, provider = setup
    bad = [
        [{"role": "robot", "content": "Hi"}],
        [{"role": "assistant", "content": [{"type": "image", "image": Image.new("RGB", (4, 4))}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "image", "image": "not an image"}]}],
    ]
    for messages in bad:
        with pytest.raises(ProviderError) as e:
            provider.chat(messages)
        assert e.value.status == 400
    with pytest.raises(ProviderError):
        provider.chat("Hi", max_new_tokens=0)
    assert fake.requests == []


def test_unreachable_is_502():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for kind in PROVIDERS:
        url = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
        provider = load_provider(f"{kind}:m", api_key=KEY, base_url=url, max_retries=0, timeout=5)
        with pytest.raises(ProviderError) as e:
            provider.chat("Hi")
        assert e.value.status == 502, kind


# ------------------------------------------------------------------------------------------------ pm.pipeline
def test_pipeline_with_environment(fakes, monkeypatch):
    for fake in fakes.values():
        fake.requests.clear()
        fake.pieces, fake.finish, fake.error = ["ok"], fake.default_finish, None
    monkeypatch.setenv("OPENAI_API_KEY", "o-key")
    monkeypatch.setenv("OPENAI_BASE_URL", fakes["openai"].url + "/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fakes["anthropic"].url)
    monkeypatch.setenv("GOOGLE_API_KEY", "g-key")
    monkeypatch.setenv("POLYMODAL_GEMINI_BASE_URL", fakes["gemini"].url)
    cases = [("openai:gpt-4o", OpenAIProvider, "openai", "o-key"),
             ("anthropic:claude-3-5-sonnet-20241022", AnthropicProvider, "anthropic", "a-key"),
             ("google:gemini-1.5-pro", GeminiProvider, "gemini", "g-key")]
    for spec, cls, kind, key in cases:
        model = pm.pipeline("text-generation", model=spec)
        assert type(model) is cls
        assert model("Hi", return_full_text=False) == [{"generated_text": "ok"}]
        assert _key_sent(kind, fakes[kind].requests[-1].headers) == key
    assert pm.pipeline("text-generation", model="google:gemini-1.5-pro").name == "gemini:gemini-1.5-pro"


def test_pipeline_passes_the_provider_options_on(fakes):
    fake = fakes["openai"]
    fake.requests.clear()
    fake.pieces, fake.finish, fake.error = ["fine"], fake.default_finish, None
    model = pm.pipeline("text-generation", model="openai:gpt-4o", api_key=KEY, base_url=fake.url + "/v1",
                        max_retries=0, timeout=30)
    assert type(model) is OpenAIProvider and model.name == "openai:gpt-4o"
    assert "".join(model.stream("Hi")) == "fine"
    assert _key_sent("openai", fake.requests[-1].headers) == KEY


def test_pipeline_refuses_what_a_hosted_model_does_not_do():
    with pytest.raises(ValueError, match=r"'openai:gpt-4o' is a hosted chat model: it serves the text-generation "
                                         r"pipeline, not image-to-text"):
        pm.pipeline("image-to-text", model="openai:gpt-4o")
    with pytest.raises(ValueError, match=r"takes the options api_key, base_url, timeout, max_retries; not dtype"):
        pm.pipeline("text-generation", model="openai:gpt-4o", api_key=KEY, dtype="float16")


@pytest.mark.parametrize("spec", ["openai:gpt-4o", "anthropic:claude-3-5-sonnet-20241022", "gemini:gemini-1.5-pro",
                                  "google:gemini-1.5-pro"])
def test_pm_load_loads_models_only(spec, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # with a key too: a hosted model is not a checkpoint
    with pytest.raises(ValueError) as e:
        pm.load(spec)
    message = str(e.value)
    assert f"{spec!r} is a hosted model, and pm.load loads checkpoints only" in message
    assert f"pm.pipeline('text-generation', model={spec!r})" in message
    assert f"polymodal serve --model {spec}" in message


def test_stream_closed_early(setup):
    kind, fake, provider = setup
    stream = provider.stream("Hi")
    assert next(stream) == "Hello"
    stream.close()  # a client that left: the connection is closed, nothing raised
    assert provider.chat("Hi").text == "Hello, world!"  # and the provider still works
