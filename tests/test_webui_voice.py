"""The web UI's push-to-talk (src/polymodal/serve/ui/app.js, "voice") in a real Chromium whose microphone is a WAV
file (`--use-file-for-fake-audio-capture`): the page streams it as 16-kHz PCM16 over the real WS /v1/realtime of a
real uvicorn server, whose cascade is light (the packaged Whisper tiny.en hears the question; the scripted chat model
and the tone voice of tests/test_talk.py answer fast). Checked: the transcript of what the microphone said, the
answer's text and its audio played; the Talk button disabled, saying why, when the server has no realtime route."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serve_helpers import running
from test_talk import HAS_ESPEAK, RATE, _have_models, fake_cascade, say

from polymodal.serve import ServedModels, create_app

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"the web UI tests drive Debian's Chromium, and {CHROMIUM} is absent", allow_module_level=True)
ANSWER = "Paris is the capital. It is in France."  # fake_cascade's; its voice: 0.1 s of tone (1000) per word


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> Path:
    from polymodal.speech import to_pcm16, wav_bytes

    if not HAS_ESPEAK:
        pytest.skip("needs espeak-ng to make the spoken question")
    speech = np.concatenate([np.zeros(RATE // 2, np.float32), say("What is the capital of France?"),
                             np.zeros(RATE, np.float32)])
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    path.write_bytes(wav_bytes(to_pcm16(speech), RATE))
    return path


@pytest.fixture(scope="module")
def browser(question_wav):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={question_wav}%noloop"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 720})
    context.grant_permissions(["microphone"])
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    yield pg
    context.close()


def test_push_to_talk_sends_the_microphone_and_plays_the_spoken_answer(page):
    why = _have_models()
    if why:
        pytest.skip(why)
    import polymodal as pm
    from polymodal.speech.dialogue import Cascade

    asr = pm.pipeline("automatic-speech-recognition")
    base = fake_cascade()

    def factory():
        return Cascade(asr, base.chat, base.tts, system=base.system)

    with running(create_app(ServedModels([]), realtime=factory)) as url:
        page.goto(url + "/")
        talk = page.locator("#talk")
        talk.and_(page.locator(":enabled")).wait_for()
        talk.click()  # a click: on until the next click
        assert talk.get_attribute("aria-pressed") == "true"
        user = page.locator(".message.user[data-voice]")
        user.wait_for(timeout=30_000)  # the end of the turn: the file's trailing silence
        talk.click()  # off: silence goes on until the answer is over
        assert talk.get_attribute("aria-pressed") == "false"
        answer = page.locator(".message.assistant[data-voice]")
        answer.and_(page.locator("[data-status=done]")).wait_for(timeout=30_000)
        said = user.locator(".text").text_content()
        assert said.strip().lower().rstrip("?.") == "what is the capital of france", said
        assert answer.locator(".body").text_content().strip() == ANSWER
        # the 8 words' tone was played: 0.8 s (at most a window of silence on either side), at the tone's level
        seconds = float(answer.get_attribute("data-audio-seconds"))
        assert 0.8 <= seconds < 0.8 + 2 * 512 / RATE + 1e-3, seconds
        assert int(answer.get_attribute("data-audio-peak")) == 1000


def test_talk_is_disabled_with_the_reason_when_the_server_has_no_realtime_route(page):
    with running(create_app(ServedModels([]))) as url:
        page.goto(url + "/")
        page.locator("#talk[title*='--realtime']").wait_for()
        assert page.locator("#talk").is_disabled()


def test_holding_talk_on_polymodal_serve_realtime_with_the_real_models(page, tmp_path):
    """The whole way: `polymodal serve --realtime --voice espeak` (the embedded SmolLM2 through its engine, Whisper
    tiny.en, espeak-ng) run as a subprocess, the Talk button held while the microphone file speaks, then released:
    the question transcribed, and a spoken answer about Paris shown and played."""
    why = _have_models()
    if why:
        pytest.skip(why)
    from serve_helpers import serve_subprocess

    with serve_subprocess(tmp_path, "--realtime", "--voice", "espeak") as url:
        page.goto(url + "/")
        talk = page.locator("#talk")
        talk.and_(page.locator(":enabled")).wait_for()
        box = talk.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()  # held: push-to-talk
        user = page.locator(".message.user[data-voice]")
        user.wait_for(timeout=30_000)
        assert talk.get_attribute("aria-pressed") == "true"
        page.mouse.up()
        assert talk.get_attribute("aria-pressed") == "false"
        answer = page.locator(".message.assistant[data-voice]")
        answer.and_(page.locator("[data-status=done]")).wait_for(timeout=60_000)
        said = user.locator(".text").text_content()
        assert said.strip().lower().rstrip("?.") == "what is the capital of france", said
        assert "paris" in answer.locator(".body").text_content().lower()
        assert float(answer.get_attribute("data-audio-seconds")) > 0.5
        assert int(answer.get_attribute("data-audio-peak")) > 1000  # speech, not silence
