"""WS /v1/realtime (polymodal/serve/realtime.py): a spoken question (espeak-ng audio, the real Silero VAD) through
Dialogue's turn-taking with the fast fake models of tests/test_talk.py -> speech events, the transcript, the
answer's sentences and audio deltas; garbage messages -> error events on an open connection; a client that leaves
mid-turn -> its answer cancelled, and the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_talk import (  # noqa: F401 (a fixture)
    OUT_RATE,
    RATE,
    FakeASR,
    FakeChat,
    FakeVoice,
    _needs_vad,
    fake_cascade,
    needs_espeak,
    real_pipelines,
    say,
)

from polymodal.serve.app import create_app
from polymodal.serve.realtime import MAX_APPEND_BYTES, MAX_SESSIONS
from polymodal.serve.registry import ServedModels

ANSWER = "Paris is the capital. It is in France."  # fake_cascade's; FakeVoice: 0.1 s of tone per word


def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def append(samples: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm(samples)).decode()})


def app_with(cascades: list, **kw):
    def factory():
        cascades.append(fake_cascade(**kw))
        return cascades[-1]

    return create_app(ServedModels([]), realtime=factory)


class Reader:
    """Reads the server's events in a thread (the server sends them when it has them, not once per message)."""

    def __init__(self, ws):
        self.ws, self.events = ws, queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                self.events.put(self.ws.receive_json())
        except Exception as e:  # noqa: BLE001 - the connection closed
            self.events.put(e)

    def until(self, kind: str, feed, timeout: float = 30.0) -> list[dict]:
        """Events until one of `kind`, calling feed() (sending silence) while none is there."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.02)
            except queue.Empty:
                feed()
                continue
            assert not isinstance(event, Exception), f"the connection closed: {event!r}"
            got.append(event)
            if event["type"] == kind:
                return got
        raise AssertionError(f"no {kind} event in {timeout} s; got {[e['type'] for e in got]}")


def speak_question(ws) -> None:
    question = np.concatenate([np.zeros(RATE // 2, np.float32), say("What is the capital of France?")])
    for i in range(0, len(question), RATE // 10):  # 0.1-s base64 events, as a microphone's blocks
        ws.send_text(append(question[i : i + RATE // 10]))


def send_silence(ws):
    return lambda: ws.send_bytes(bytes(2 * 512))  # one VAD window of binary PCM


@needs_espeak
def test_a_spoken_question_gets_its_transcript_and_the_answer_audio():
    _needs_vad()
    cascades = []
    with TestClient(app_with(cascades)) as client, client.websocket_connect("/v1/realtime") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "session.created"
        assert hello["session"]["input_sample_rate"] == RATE and hello["session"]["output_sample_rate"] == OUT_RATE
        reader = Reader(ws)
        speak_question(ws)
        events = reader.until("response.done", send_silence(ws))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]
    assert "error" not in kinds
    (transcript,) = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcript["transcript"] == "What is the capital of France?"
    assert kinds.index("conversation.item.input_audio_transcription.completed") < kinds.index("response.audio.delta")
    sentences = [e["delta"] for e in events if e["type"] == "response.audio_transcript.delta"]
    assert sentences == ["Paris is the capital.", "It is in France."]
    audio = np.concatenate([np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in events
                            if e["type"] == "response.audio.delta"])
    # the answer's 8 words of 0.1-s tone (value 1000), sent whole; the windows around it at most a window of silence
    assert np.count_nonzero(audio == 1000) == 8 * round(0.1 * OUT_RATE)
    assert len(audio) - 8 * round(0.1 * OUT_RATE) < 2 * 512 * OUT_RATE / RATE
    assert events[-1]["response"] == {"status": "completed", "output_transcript": ANSWER}
    assert cascades[0].history[-2:] == [{"role": "user", "content": "What is the capital of France?"},
                                        {"role": "assistant", "content": ANSWER}]


@needs_espeak
def test_speech_during_the_answer_barges_in():
    """As Dialogue's barge-in (tests/test_talk.py): the user speaks while the answer plays -> that answer's
    response.done is "cancelled" with what was heard of it, and the new speech is the next turn, answered."""
    _needs_vad()
    cascades = []
    app = app_with(cascades, answer="This answer goes on and on. " * 8, asr=("Tell me a story.", "Stop, please."),
                   delay=0.005)
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        reader = Reader(ws)
        speak_question(ws)
        reader.until("response.audio.delta", send_silence(ws))
        interruption = say("Stop, please.")
        for i in range(0, len(interruption), RATE // 10):
            ws.send_bytes(pcm(interruption[i : i + RATE // 10]))
        first = reader.until("response.done", send_silence(ws))
        second = reader.until("response.done", send_silence(ws))
    assert first[-1]["response"]["status"] == "cancelled"
    heard = first[-1]["response"]["output_transcript"]
    assert heard.startswith("This answer goes on and on.") and len(heard) < len("This answer goes on and on. " * 8)
    kinds = [e["type"] for e in second]
    assert "input_audio_buffer.speech_stopped" in kinds and "response.audio.delta" in kinds
    (transcript,) = [e["transcript"] for e in second
                     if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcript == "Stop, please."
    assert second[-1]["response"]["status"] == "completed"
    assert [m["role"] for m in cascades[0].history] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("message, code", [
    ("not json", "invalid_json"),
    ('["a list"]', "invalid_event"),
    ('{"type": "session.update"}', "unsupported_event"),
    ('{"type": "input_audio_buffer.append"}', "invalid_event"),
    ('{"type": "input_audio_buffer.append", "audio": "***"}', "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), "invalid_audio"),
    (b"\x00\x01\x02", "invalid_audio"),
    (bytes(MAX_APPEND_BYTES + 2), "message_too_large"),
    ("x" * (2 * MAX_APPEND_BYTES + 1), "message_too_large"),
])
def test_garbage_messages_get_an_error_event_and_the_connection_stays_open(message, code):
    _needs_vad()
    with TestClient(app_with([])) as client, client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        (ws.send_bytes if isinstance(message, bytes) else ws.send_text)(message)
        event = ws.receive_json()
        assert event["type"] == "error" and event["error"]["code"] == code, event
        assert event["error"]["message"]
        ws.send_bytes(bytes(2 * 16000))  # a second of silence: heard, nothing to say
        ws.send_text("still here?")  # answered: the connection is open and in order
        assert ws.receive_json()["error"]["code"] == "invalid_json"


@needs_espeak
def test_a_client_leaving_mid_turn_cancels_its_answer_and_the_server_keeps_serving():
    _needs_vad()
    cascades = []
    # an answer that never ends by itself: a word every 20 ms, repeated
    app = app_with(cascades, answer="and so on. " * 3, delay=0.02, repeat=True)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime") as ws:
            ws.receive_json()
            reader = Reader(ws)
            speak_question(ws)
            reader.until("response.audio.delta", send_silence(ws))
        chat = cascades[0].chat
        assert chat.closed.wait(10), "the answer's generation was not stopped when the client left"
        produced = chat.produced
        time.sleep(0.2)
        assert chat.produced == produced  # nothing generated after the stop
        # a second connection: a conversation of its own, answered
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            ws.send_text("{")
            assert ws.receive_json()["error"]["code"] == "invalid_json"
        assert len(cascades) == 2 and cascades[1].history == [{"role": "system", "content": "Be brief."}]


def test_realtime_not_enabled_and_the_api_key():
    with TestClient(create_app(ServedModels([]))) as client, client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["error"]["code"] == "realtime_disabled"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
        assert client.get("/v1/realtime").json()["enabled"] is False  # what the web UI reads
    app = create_app(ServedModels([]), api_key="sesame", realtime=fake_cascade)
    with TestClient(app) as client:
        assert client.get("/v1/realtime").status_code == 401  # as every /v1 route
        info = client.get("/v1/realtime", headers={"Authorization": "Bearer sesame"}).json()
        assert info["enabled"] is True and info["input_sample_rate"] == RATE and info["max_sessions"] == MAX_SESSIONS
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/realtime"):
            pass
        assert closed.value.code == 1008
        with client.websocket_connect("/v1/realtime", headers={"Authorization": "Bearer sesame"}) as ws:
            assert ws.receive_json()["type"] == "session.created"
        # a browser's way (it cannot set headers on a websocket): the key as a subprotocol, as OpenAI's realtime API
        with client.websocket_connect("/v1/realtime", subprotocols=["realtime", "openai-insecure-api-key.sesame"]
                                      ) as ws:
            assert ws.accepted_subprotocol == "realtime" and ws.receive_json()["type"] == "session.created"
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(
                "/v1/realtime", subprotocols=["realtime", "openai-insecure-api-key.wrong"]):
            pass
        assert closed.value.code == 1008


@needs_espeak
def test_over_a_real_socket():
    """The same conversation through uvicorn and the websockets client: a spoken question answered, as a client
    outside the process would see it."""
    _needs_vad()
    pytest.importorskip("websockets", reason="uvicorn's websocket support needs the websockets package")
    from serve_helpers import running
    from websockets.sync.client import connect

    with running(app_with([])) as url, connect(url.replace("http", "ws") + "/v1/realtime") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        question = np.concatenate([np.zeros(RATE // 2, np.float32), say("What is the capital of France?")])
        ws.send(pcm(question))  # one binary message
        events, deadline = [], time.monotonic() + 30
        while not events or events[-1]["type"] != "response.done":
            assert time.monotonic() < deadline, [e["type"] for e in events]
            try:
                events.append(json.loads(ws.recv(timeout=0.02)))
            except TimeoutError:
                ws.send(bytes(2 * 512))
    transcripts = [e["transcript"] for e in events
                   if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcripts == ["What is the capital of France?"]
    assert any(e["type"] == "response.audio.delta" for e in events)
    assert events[-1]["response"] == {"status": "completed", "output_transcript": ANSWER}


def test_one_conversation_more_than_the_limit_is_told_the_server_is_busy():
    _needs_vad()
    cascades = []
    with TestClient(app_with(cascades)) as client, contextlib.ExitStack() as stack:
        held = [stack.enter_context(client.websocket_connect("/v1/realtime")) for _ in range(MAX_SESSIONS)]
        for ws in held:
            assert ws.receive_json()["type"] == "session.created"
        with client.websocket_connect("/v1/realtime") as extra:
            assert extra.receive_json()["error"]["code"] == "too_many_sessions"
            with pytest.raises(WebSocketDisconnect) as closed:
                extra.receive_json()
            assert closed.value.code == 1013
        held[0].close()
        deadline = time.monotonic() + 10
        while True:  # the freed place is taken by the next one (once the server has seen the close)
            with client.websocket_connect("/v1/realtime") as again:
                if again.receive_json()["type"] == "session.created":
                    break
            assert time.monotonic() < deadline, "the closed conversation's place was never freed"
            time.sleep(0.05)
    assert len(cascades) == MAX_SESSIONS + 1


def test_real_models_answer_a_spoken_question(real_pipelines):  # noqa: F811 - the fixture of test_talk
    """Whisper tiny.en, SmolLM2 and espeak-ng behind the route (the pipelines shared by the connections, as a server
    would): the question is transcribed exactly and the answer, sent as audio, is about Paris."""
    from polymodal.speech.dialogue import Cascade

    asr, chat, tts = real_pipelines
    app = create_app(ServedModels([]), realtime=lambda: Cascade(asr, chat, tts, max_new_tokens=40))
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["session"]["output_sample_rate"] == tts.sampling_rate
        reader = Reader(ws)
        speak_question(ws)
        events = reader.until("response.done", send_silence(ws), timeout=120)
    (transcript,) = [e["transcript"] for e in events
                     if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcript == "What is the capital of France?"
    audio = np.concatenate([np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in events
                            if e["type"] == "response.audio.delta"])
    assert np.abs(audio).max() > 1000  # speech, not silence
    done = events[-1]["response"]
    assert done["status"] == "completed" and "paris" in done["output_transcript"].lower(), done


# ------------------------------------------------------------------------------------------------ serve --realtime
class FakeHosted:
    """A served chat model of the provider kind (serve_model takes anything with `chat`), streaming one answer."""

    name, modalities = "fake:hosted", {"text"}

    def stream(self, messages, **options):
        yield "Paris."

    def chat(self, messages, **options):
        return "Paris."


def _serve_cli(monkeypatch, served: ServedModels, *argv: str) -> tuple[int, dict, list]:
    """`polymodal serve ARGV` with the model loading, the server and the pipelines' loaders replaced by fakes ->
    (exit status, what serve() was given, the pipelines asked for as (task, model))."""
    import polymodal
    import polymodal.serve.app as app_module
    import polymodal.serve.registry as registry
    from polymodal.cli import main

    given, asked = {}, []

    def fake_serve(served_, *, sock, **options):
        sock.close()
        given.update(options, served=served_)

    def fake_pipeline(task, model=None, **_):
        asked.append((task, model))
        return {"text-to-speech": FakeVoice, "automatic-speech-recognition": FakeASR}.get(
            task, lambda: FakeChat("Hello."))()

    monkeypatch.setattr(app_module, "serve", fake_serve)
    monkeypatch.setattr(registry, "load_served", lambda specs, **_: served)
    monkeypatch.setattr(polymodal, "pipeline", fake_pipeline)
    return main(["serve", "--port", "0", *argv]), given, asked


def test_serve_realtime_builds_a_cascade_factory_over_the_served_chat_model(monkeypatch):
    from polymodal.serve.registry import serve_model

    hosted = FakeHosted()
    served = ServedModels([serve_model("hosted", hosted)])
    code, given, asked = _serve_cli(monkeypatch, served, "--realtime", "--voice", "espeak",
                                    "--realtime-max-tokens", "7")
    assert code == 0
    assert asked == [("text-to-speech", "espeak"), ("automatic-speech-recognition", None)]  # loaded once, here
    first, second = given["realtime"](), given["realtime"]()
    assert first.chat is hosted and second.chat is hosted and first.tts is second.tts and first.asr is second.asr
    assert first.history is not second.history and first.generation["max_new_tokens"] == 7
    assert len(asked) == 2  # a connection loads nothing
    # no chat model served: the embedded default, loaded once at start
    code, given, asked = _serve_cli(monkeypatch, ServedModels([]), "--realtime", "--asr-model", "/w")
    assert code == 0 and asked == [("text-to-speech", None), ("automatic-speech-recognition", "/w"),
                                   ("text-generation", None)]
    # without the flag the route stays off and nothing extra loads
    code, given, asked = _serve_cli(monkeypatch, served)
    assert code == 0 and given["realtime"] is None and asked == []


@pytest.mark.parametrize("argv, says", [
    (("--voice", "espeak"), "--voice set the realtime voice route: add --realtime"),
    (("--realtime", "--realtime-model", "other"), "--realtime-model other: no served model has that name"),
    (("--realtime", "--realtime-max-tokens", "0"), "--realtime-max-tokens must be at least 1"),
])
def test_serve_realtime_bad_options_exit_2_before_loading(monkeypatch, capsys, argv, says):
    served = ServedModels([])
    code, given, asked = _serve_cli(monkeypatch, served, *argv)
    assert code == 2 and given == {} and asked == []
    assert says in capsys.readouterr().err


def test_served_chat_streams_the_engines_answer_and_cancels_when_closed(tmp_path):
    """A served local model as the cascade's chat: the same greedy text the text-generation pipeline gives on the
    same checkpoint and messages, through the model's engine; closing the stream early frees its row."""
    from serve_helpers import save_tiny_chat_llama

    import polymodal as pm
    from polymodal.serve.realtime import ServedChat, served_chat
    from polymodal.serve.registry import load_model

    path = save_tiny_chat_llama(tmp_path, ["Hello there, how are you? I am fine."] * 20)
    served = ServedModels([load_model("local", path)])
    served.start()
    try:
        chat = served_chat(served)
        assert isinstance(chat, ServedChat) and chat.model is served.get("local")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        stream = chat.stream(messages, max_new_tokens=12)
        pieces = []
        with contextlib.suppress(StopIteration):
            while True:
                pieces.append(next(stream))
        expected = "".join(pm.pipeline("text-generation", model=str(path)).stream(messages, max_new_tokens=12))
        assert "".join(pieces) == expected and pieces
        stream = chat.stream(messages, max_new_tokens=200)
        next(stream)
        stream.close()
        engine, deadline = served.get("local").engine, time.monotonic() + 5
        while engine.num_active or engine.num_waiting:
            assert time.monotonic() < deadline, "the closed stream's request still runs"
            time.sleep(0.01)
        with pytest.raises(ValueError, match="not served"):
            served_chat(served, "other")
    finally:
        served.close()


@needs_espeak
def test_polymodal_serve_realtime_answers_a_spoken_question(tmp_path):
    """The real flag end to end: `polymodal serve --realtime --voice espeak` (the embedded SmolLM2 served, and the
    conversation's chat model through its engine; the packaged Whisper tiny.en), its /health saying so, and a
    spoken question over a real websocket answered about Paris, as audio."""
    from test_talk import _have_models

    why = _have_models()
    if why:
        pytest.skip(why)
    pytest.importorskip("websockets", reason="uvicorn's websocket support needs the websockets package")
    import httpx
    from serve_helpers import serve_subprocess
    from websockets.sync.client import connect

    with serve_subprocess(tmp_path, "--realtime", "--voice", "espeak") as url:
        assert httpx.get(url + "/v1/realtime").json()["enabled"] is True
        with connect(url.replace("http", "ws") + "/v1/realtime") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
            question = np.concatenate([np.zeros(RATE // 2, np.float32), say("What is the capital of France?")])
            ws.send(pcm(question))
            events, deadline = [], time.monotonic() + 60
            while not events or events[-1]["type"] != "response.done":
                assert time.monotonic() < deadline, [e["type"] for e in events]
                try:
                    events.append(json.loads(ws.recv(timeout=0.02)))
                except TimeoutError:
                    ws.send(bytes(2 * 512))
    transcripts = [e["transcript"] for e in events
                   if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcripts == ["What is the capital of France?"]
    audio = np.concatenate([np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in events
                            if e["type"] == "response.audio.delta"])
    assert np.abs(audio).max() > 1000
    done = events[-1]["response"]
    assert done["status"] == "completed" and "paris" in done["output_transcript"].lower(), done
