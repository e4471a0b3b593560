"""One endpoint for local and closed models: the official `openai` client talks to `polymodal serve`, which routes
each model name to its provider (polymodal/providers), whose own SDK talks to a local fake of that provider's wire
protocol (tests/fake_providers.py). What the client sends arrives at the provider in the provider's own format;
what the provider answers (text, streamed pieces, finish reason, usage, errors) comes back in OpenAI's."""

from __future__ import annotations

import base64
import io

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from fake_providers import FakeAnthropic, FakeGemini, FakeOpenAI  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import running  # noqa: E402
from test_providers import _media, _turns  # noqa: E402

from polymodal.providers import load_provider  # noqa: E402
from polymodal.serve import ServedModels, create_app  # noqa: E402
from polymodal.serve.registry import load_served, serve_model  # noqa: E402

MODELS = {"gpt": ("openai", "gpt-4o"), "claude": ("anthropic", "claude-3-5-sonnet-20241022"),
          "gemini": ("gemini", "gemini-1.5-pro")}


@pytest.fixture(scope="module")
def fakes():
    with FakeOpenAI() as o, FakeAnthropic() as a, FakeGemini() as g:
        yield {"openai": o, "anthropic": a, "gemini": g}


@pytest.fixture(scope="module")
def server(fakes):

    served = []
    for name, (kind, model) in MODELS.items():
        base = fakes[kind].url + ("/v1" if kind == "openai" else "")
        provider = load_provider(f"{kind}:{model}", api_key="provider-key", base_url=base, max_retries=0)
        served.append(serve_model(name, provider))
    models = ServedModels(served)
    models.start()
    with running(create_app(models)) as url:
        yield url
    models.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(params=list(MODELS))
def routed(request, fakes):
    name = request.param
    fake = fakes[MODELS[name][0]]
    fake.requests.clear()
    fake.pieces, fake.finish, fake.usage, fake.error = ["Hello", ", ", "world", "!"], fake.default_finish, (12, 4), None
    return name, MODELS[name][0], fake


def _png() -> tuple[str, Image.Image]:
    img = Image.new("RGB", (24, 16), (10, 200, 30))
    img.putpixel((3, 4), (255, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), img


def test_models_list_names_every_provider(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(MODELS) <= set(cards)


def test_chat_through_each_provider(client, routed):
    name, kind, fake = routed
    url, img = _png()
    r = client.chat.completions.create(model=name, max_tokens=20, temperature=0, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}])
    assert r.choices[0].message.content == "Hello, world!"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (12, 4)  # the provider's own counts
    body = fake.requests[-1].body
    (mime, data), = _media(kind, body)  # the image reached the provider in its own format, pixel for pixel
    assert mime == "image/png" and Image.open(io.BytesIO(data)).convert("RGB").tobytes() == img.tobytes()
    system = {"openai": lambda b: b["messages"][0]["content"], "anthropic": lambda b: b["system"],
              "gemini": lambda b: b["systemInstruction"]["parts"][0]["text"]}[kind](body)
    assert "Be brief." in str(system)
    assert len(_turns(kind, body)) == (2 if kind == "openai" else 1)  # the system prompt where each API wants it


def test_streaming_through_each_provider(client, routed):
    name, kind, fake = routed
    fake.finish = {"openai": "length", "anthropic": "max_tokens", "gemini": "MAX_TOKENS"}[kind]
    stream = client.chat.completions.create(model=name, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Hi"}])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["Hello", ", ", "world", "!"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 4


def test_provider_errors_keep_their_meaning(client, routed):
    name, _, fake = routed
    fake.error = (429, "slow down")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}])
    fake.error = (401, "bad key")
    with pytest.raises(openai.APIStatusError) as e:  # our server is fine; its upstream refused: 502
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 502 and "bad key" in e.value.message


def test_served_specs_resolve_hosted_models_through_their_provider(fakes, monkeypatch):
    """`polymodal serve --model openai:gpt-4o` (and NAME=SPEC): the spec parser hands a hosted model to
    load_provider, which takes its key and base URL from the environment; pm.load is for checkpoints."""
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", fakes["openai"].url + "/v1")
    monkeypatch.setenv("GOOGLE_API_KEY", "env-key")
    monkeypatch.setenv("POLYMODAL_GEMINI_BASE_URL", fakes["gemini"].url)
    served = load_served(["openai:gpt-4o", "g=google:gemini-1.5-pro"])
    assert served.ids() == ["openai:gpt-4o", "g"]
    gpt, gemini = served.get("openai:gpt-4o"), served.get("g")
    assert gpt.provider.name == "openai:gpt-4o" and gpt.owned_by == "openai" and gpt.engine is None
    assert gemini.provider.name == "gemini:gemini-1.5-pro" and gemini.owned_by == "gemini"
    fake = fakes["openai"]
    fake.requests.clear()
    fake.pieces, fake.finish, fake.error = ["ok"], fake.default_finish, None
    assert gpt.provider.chat("Hi").text == "ok"
    assert fake.requests[-1].headers.get("authorization") == "Bearer env-key"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match=r"cannot serve --model 'openai:gpt-4o': no OpenAI API key"):
        load_served(["openai:gpt-4o"])
