"""The realtime route, WS /v1/realtime: a spoken conversation over one websocket, with `Dialogue`'s turn-taking
(polymodal/speech/dialogue.py: Silero VAD end of turn, barge-in) and the cascade Whisper -> chat model -> voice.

Each connection gets its own `Cascade` (its own conversation) from the factory given to `create_app(realtime=...)`,
and its own `Dialogue(realtime=True)`: the client's audio is the clock, as a microphone's would be, and the answer's
audio comes back as it is ready, never waited for. Events are JSON text messages shaped after OpenAI's realtime API
(a subset, docs/dialogue.md):

    in   binary message                       16-kHz 16-bit little-endian mono PCM
         {"type": "input_audio_buffer.append", "audio": base64 of the same}
    out  session.created                      {"session": {"input_audio_format": "pcm16", "input_sample_rate",
                                              "output_audio_format": "pcm16", "output_sample_rate"}}
         input_audio_buffer.speech_started    {"audio_start_ms"}: the VAD heard the user start
         input_audio_buffer.speech_stopped    {"audio_end_ms"}: end of turn decided
         conversation.item.input_audio_transcription.completed   {"transcript"}: what Whisper heard
         response.audio_transcript.delta      {"delta"}: a sentence of the answer, as its audio starts to be sent
         response.audio.delta                 {"delta": base64 pcm16 at output_sample_rate}
         response.done                        {"response": {"status": "completed" | "cancelled" (barge-in)}}
         error                                {"error": {"type", "code", "message"}}: a message that could not be
                                              used (the connection stays open) or a failed answer

What runs where: the event loop only reads and writes messages; `Dialogue.feed` (VAD windows, a few ms each) runs
in a worker thread, the cascade in the dialogue's own threads. A client that leaves mid-turn has its answer
cancelled (generation and voice) and its threads joined off the loop; other connections are not affected.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import Callable

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from polymodal.speech.dialogue import SAMPLING_RATE, Dialogue

PATH = "/v1/realtime"
# The API key as a websocket subprotocol, as OpenAI's realtime API takes it from browsers (which cannot send an
# Authorization header on a websocket): protocols ["realtime", "openai-insecure-api-key.<key>"]
KEY_PROTOCOL = "openai-insecure-api-key."
MAX_SESSIONS = 4  # conversations at once, by default
MAX_APPEND_BYTES = 1 << 20  # the most PCM one message may carry (~33 s at 16 kHz); longer ones are refused unread


class MessageError(ValueError):
    """A client message the route cannot use; answered with an error event, the connection stays open."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def decode_message(message: dict) -> np.ndarray:
    """A websocket message (starlette's receive() dict) -> its int16 samples. Raises MessageError."""
    if message.get("bytes") is not None:
        return _pcm(message["bytes"])
    text = message.get("text")
    if text is None:
        raise MessageError("invalid_message", "empty websocket message")
    if len(text) > 2 * MAX_APPEND_BYTES:  # before parsing it (base64 is 4/3 of the bytes)
        raise MessageError("message_too_large", f"a message carries at most {MAX_APPEND_BYTES} bytes of audio")
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise MessageError("invalid_json", f"not a JSON event ({e.msg} at character {e.pos})") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise MessageError("invalid_event", 'an event is a JSON object with a string "type"')
    if event["type"] != "input_audio_buffer.append":
        raise MessageError("unsupported_event", f"event type {event['type'][:80]!r} is not supported; this server "
                                                "takes input_audio_buffer.append (or binary PCM messages)")
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise MessageError("invalid_event", 'input_audio_buffer.append needs "audio": base64 of 16-bit PCM')
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("invalid_audio", '"audio" is not valid base64') from None
    return _pcm(raw)


def _pcm(raw: bytes) -> np.ndarray:
    if len(raw) > MAX_APPEND_BYTES:
        raise MessageError("message_too_large", f"a message carries at most {MAX_APPEND_BYTES} bytes of audio, "
                                                f"got {len(raw)}")
    if len(raw) % 2:
        raise MessageError("invalid_audio", f"16-bit PCM has an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


class Session:
    """One connection's dialogue, and what of it has been told to the client."""

    def __init__(self, dialogue: Dialogue):
        self.dialogue = dialogue
        self.events_seen = 0  # dialogue.events already translated
        self.transcribed = 0  # turns whose transcript was sent
        self.sentences_sent = 0  # of the current turn's answer
        self.finished = 0  # turns whose response.done was sent

    def feed(self, samples: np.ndarray) -> list[dict]:
        """Feed the samples window by window -> the events for the client (worker thread)."""
        d, out = self.dialogue, []
        window = d.window
        for i in range(0, len(samples), window):
            before = d.speaking and bool(d.turns) and d.turns[-1].audio_start is not None
            audio = d.feed(samples[i : i + window])
            playing = d.speaking and bool(d.turns) and d.turns[-1].audio_start is not None
            out += self._events()
            if audio.size and (before or playing):  # the answer's windows (not the silence before it)
                out += self._sentences()
                out.append({"type": "response.audio.delta", "delta": base64.b64encode(audio.astype("<i2").tobytes())
                            .decode()})
            out += self._turn_progress()
        return out

    def _events(self) -> list[dict]:
        d, out = self.dialogue, []
        for e in d.events[self.events_seen :]:
            ms = round(e.time * 1000)
            if e.kind == "speech":
                out.append({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms})
            elif e.kind == "turn_end":
                out.append({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms})
                self.sentences_sent = 0
            elif e.kind == "error":
                out.append(error_event("server_error", "response_failed", e.detail))
        self.events_seen = len(d.events)
        return out

    def _sentences(self) -> list[dict]:
        reply = self.dialogue.turns[-1].reply
        new = reply.sentences[self.sentences_sent :]
        self.sentences_sent += len(new)
        return [{"type": "response.audio_transcript.delta", "delta": s} for s in new]

    def _turn_progress(self) -> list[dict]:
        d, out = self.dialogue, []
        turns = d.turns
        done = len(turns) - (1 if d.speaking else 0)  # every turn but the one being answered is over
        while self.transcribed < len(turns):
            turn = turns[self.transcribed]
            if turn.reply.latency["asr"] is not None:
                out.append({"type": "conversation.item.input_audio_transcription.completed",
                            "transcript": turn.transcript.strip()})
            elif self.transcribed >= done:  # still transcribing
                break
            self.transcribed += 1  # (a turn over without a transcript: its ASR failed, told by an error event)
        while self.finished < min(done, self.transcribed):
            turn = turns[self.finished]
            out.append({"type": "response.done", "response": {
                "status": "cancelled" if turn.interrupted else "completed", "output_transcript": turn.spoken}})
            self.finished += 1
        return out


def error_event(type_: str, code: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type_, "code": code, "message": message}}


def add_realtime_route(app, cascade_factory: Callable | None, *, api_key: str | None = None,
                       max_sessions: int = MAX_SESSIONS) -> None:
    """WS /v1/realtime on `app`. cascade_factory: () -> a Cascade for each connection (None: the route answers
    that realtime is not enabled). api_key: the server's key, checked on the websocket's Authorization header
    (the HTTP middleware does not see websockets). max_sessions: conversations at once; one more is told the server
    is busy and closed (each holds a VAD, a conversation and, while it answers, the cascade's threads)."""
    key = f"Bearer {api_key}".encode() if api_key else None
    open_sessions = 0  # (changed on the event loop only)

    @app.get(PATH)
    async def realtime_info():
        """Whether the websocket holds conversations (the web UI's Talk button follows it), and its audio format."""
        return {"object": "realtime.info", "enabled": cascade_factory is not None, "input_audio_format": "pcm16",
                "input_sample_rate": SAMPLING_RATE, "sessions": open_sessions, "max_sessions": max_sessions}

    @app.websocket(PATH)
    async def realtime(ws: WebSocket):
        offered = list(ws.scope.get("subprotocols") or [])
        given = ws.headers.get("authorization", "")
        for protocol in offered:  # a browser cannot set headers on a websocket: the key may come as a subprotocol
            if protocol.startswith(KEY_PROTOCOL):
                given = f"Bearer {protocol[len(KEY_PROTOCOL):]}"
        if key and not hmac.compare_digest(given.encode(), key):
            await ws.close(code=1008, reason="missing or incorrect API key (Authorization: Bearer <key>)")
            return
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)  # a browser needs one chosen
        if cascade_factory is None:
            await ws.send_json(error_event("invalid_request_error", "realtime_disabled",
                                           "realtime conversation is not enabled on this server"))
            await ws.close(code=1008)
            return
        nonlocal open_sessions
        if open_sessions >= max_sessions:
            await ws.send_json(error_event("rate_limit_error", "too_many_sessions",
                                           f"this server holds at most {max_sessions} realtime conversations at "
                                           "once; try again when one has ended"))
            await ws.close(code=1013)  # try again later
            return
        open_sessions += 1
        try:
            try:
                dialogue = Dialogue(await asyncio.to_thread(cascade_factory), realtime=True)
            except Exception as e:  # noqa: BLE001 - the models could not be made: told, then closed
                await ws.send_json(error_event("server_error", "realtime_unavailable", f"{type(e).__name__}: {e}"))
                await ws.close(code=1011)
                return
            await _converse(ws, Session(dialogue))
        finally:
            open_sessions -= 1


async def _converse(ws: WebSocket, session: Session) -> None:
    d = session.dialogue
    try:
        await ws.send_json({"type": "session.created", "session": {
            "input_audio_format": "pcm16", "input_sample_rate": SAMPLING_RATE,
            "output_audio_format": "pcm16", "output_sample_rate": d.sampling_rate}})
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                samples = decode_message(message)
            except MessageError as e:
                await ws.send_json(error_event("invalid_request_error", e.code, str(e)))
                continue
            for event in await asyncio.to_thread(session.feed, samples):
                await ws.send_json(event)
    except WebSocketDisconnect:
        return
    finally:  # the answer in progress is cancelled and its threads joined, off the event loop
        await asyncio.to_thread(d.close)


class ServedChat:
    """A served local chat model as a Cascade's chat: `stream(messages, max_new_tokens, **options)` yields the
    answer's text pieces from the model's ChatEngine (so conversations share its batches with the HTTP requests)
    with the model's generation defaults (`ServedModel.defaults`, as a chat request that sets nothing gets);
    closing the stream early cancels the request."""

    def __init__(self, model):
        from polymodal.serve.engine import MIN_TEMPERATURE

        self.model = model
        d = model.defaults
        temperature = d.get("temperature", 1.0)
        sample = temperature >= MIN_TEMPERATURE  # colder is greedy, as the chat route decodes it
        self.sampling = {"do_sample": sample, "temperature": temperature if sample else 1.0,
                         **{k: d[k] for k in ("top_p", "top_k", "repetition_penalty") if k in d}}

    def stream(self, messages, *, max_new_tokens: int = 96, **options):
        m = self.model
        text = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = m.tokenizer.encode(text, add_special_tokens=False)  # the template placed the special tokens
        request = m.engine.submit(ids, max_new_tokens=max_new_tokens, **{**self.sampling, **options})
        return self._pieces(request)

    @staticmethod
    def _pieces(request):
        from polymodal.providers.base import ChatResult
        from polymodal.serve.engine import Finished

        events, text = request.events(), ""
        try:
            for event in events:
                if isinstance(event, Finished):
                    if event.reason == "error":
                        raise RuntimeError(f"the chat model failed: {event.error}")
                    return ChatResult(text, event.reason, event.prompt_tokens, event.completion_tokens)
                if event.text:
                    text += event.text
                    yield event.text
        finally:
            events.close()  # before the end: the request is cancelled


def served_chat(served, name: str | None = None):
    """The chat model a server's spoken conversations talk through: the served chat model `name` (any served chat
    model when None), as a Cascade's chat (a local model through its engine, a hosted one through its provider);
    None when no chat model is served. A `name` that is served but does not chat raises ValueError."""
    if name is not None:
        m = served.models.get(name)
        if m is None or m.kind != "chat":
            what = "is not served" if m is None else f"is a {m.kind} model, not a chat model"
            raise ValueError(f"--realtime-model {name}: that model {what}")
    else:
        m = next((m for m in served.models.values() if m.kind == "chat"), None)
        if m is None:
            return None
    return ServedChat(m) if m.engine is not None else m.provider
