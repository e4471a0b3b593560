"""Speech out behind POST /v1/audio/speech, OpenAI's text-to-speech route and request shape: a JSON body with `model`,
`input` (the text, at most 4096 characters as OpenAI allows), `voice`, optionally `response_format` and `speed`.
The answer is the audio itself, what the official client's `audio.speech.create` returns:

* "wav" (the default here: OpenAI's default, mp3, needs an encoder polymodal does not ship): 16-bit mono WAV at the
  voice's rate;
* "pcm": raw 16-bit little-endian mono samples at 24 kHz, the rate OpenAI's pcm format promises (the voice's
  22,050 Hz resampled by polymodal.processing.audio.resample), streamed: each sentence is sent as soon as it is
  spoken, so a client can start playing after the first;
* mp3, opus, aac, flac: 400 naming the supported formats.

`voice`: OpenAI's voice names (alloy, echo, ...) all speak with the served voice; the served voice's own name too.
Synthesis runs in a worker thread, one request at a time per voice, at most `max_queue` waiting (429 past that).

    polymodal serve --model joe            # the packaged Piper voice (or --model espeak, --model piper:<voice.onnx>)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator

import numpy as np

from polymodal.serve.engine import QueueFull
from polymodal.serve.errors import APIError

MAX_INPUT = 4096  # OpenAI's limit on `input`
PCM_RATE = 24000  # OpenAI's pcm: 24 kHz 16-bit signed little-endian
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # what clients written for OpenAI send
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}
_FIELDS = {"model", "input", "voice", "response_format", "speed", "instructions", "stream_format"}


def is_voice_spec(source) -> bool:
    """A `--model` SOURCE that names a voice: joe / piper / espeak, piper:<voice.onnx>, espeak:<voice>."""
    text = str(source)
    return text in ("joe", "piper", "espeak", "espeak-ng", "en_US-joe-medium") or text.startswith(
        ("piper:", "espeak:", "espeak-ng:"))


class VoiceWorker:
    """Runs a text-to-speech pipeline's requests one at a time (the voice in a worker thread); at most `max_queue`
    wait. `speak` returns the whole answer; `sentences` streams it, each sentence's audio as soon as it is spoken
    (the request keeps its turn until its last sentence, or until its client leaves)."""

    def __init__(self, pipe, *, max_queue: int = 32):
        self.pipe, self.max_queue = pipe, max_queue
        self._turn = asyncio.Lock()  # a request that is cancelled while it waits leaves the queue cleanly
        self._count = threading.Lock()
        self._waiting = 0
        self._last_seconds = 1.0

    def _check(self) -> None:
        if self._waiting >= self.max_queue + 1:
            raise QueueFull("too many speech requests waiting", self._last_seconds * self._waiting)

    def _enter(self) -> None:
        with self._count:
            self._check()
            self._waiting += 1

    def _leave(self) -> None:
        with self._count:
            self._waiting -= 1

    async def speak(self, text: str, *, speed: float) -> dict:
        """The whole text spoken: the pipeline's {"audio", "sampling_rate"}."""
        self._enter()
        try:
            async with self._turn:
                start = time.monotonic()
                try:
                    return await asyncio.to_thread(self.pipe, text, speed=speed)
                finally:
                    self._last_seconds = max(time.monotonic() - start, 0.1)
        finally:
            self._leave()

    def sentences(self, text: str, *, speed: float) -> AsyncIterator[dict]:
        """Each sentence's {"audio", "sampling_rate"}, the pipeline's pause before every one after the first. The
        queue and the text are checked now (QueueFull, ValueError), before the caller starts answering; the request
        joins the queue when the stream is first read (so a stream never read holds no place)."""
        with self._count:
            self._check()
        parts = self.pipe.stream(text, speed=speed)

        async def run():
            with self._count:
                self._waiting += 1
            try:
                async with self._turn:
                    start = time.monotonic()
                    try:
                        first = True
                        while (part := await asyncio.to_thread(next, parts, None)) is not None:
                            if not first:
                                pause = np.zeros(round(self.pipe.pause * part["sampling_rate"]), np.int16)
                                part = {**part, "audio": np.concatenate([pause, part["audio"]])}
                            first = False
                            yield part
                    finally:
                        self._last_seconds = max(time.monotonic() - start, 0.1)
            finally:
                self._leave()

        return run()


def voice_model(served, model_id):
    """The served voice a request names (OpenAI's tts-1 / tts-1-hd / gpt-4o-mini-tts name the only one)."""
    voices = [m for m in served.models.values() if m.kind == "tts"]
    if model_id in OPENAI_MODELS and len(voices) == 1:
        return voices[0]
    if not isinstance(model_id, str) or not model_id:
        raise APIError(400, "The body needs a `model` naming the text-to-speech model.", param="model")
    m = served.get(model_id)
    if m.kind != "tts":
        names = ", ".join(repr(v.id) for v in voices) or "none is served (start the server with --model joe)"
        raise APIError(400, f"The model {m.id!r} does not speak (text-to-speech models: {names}).", param="model",
                       code="model_not_supported")
    return m


def _request(body: bytes) -> dict:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The body is not valid JSON (this route takes OpenAI's speech request: model, input, "
                       "voice, response_format, speed).") from None
    if not isinstance(req, dict):
        raise APIError(400, "The body must be a JSON object (model, input, voice, response_format, speed).")
    unknown = sorted(set(req) - _FIELDS)
    if unknown:
        raise APIError(400, f"Unknown field {unknown[0]!r}; this route takes model, input, voice, response_format "
                       "and speed.", param=unknown[0])
    return req


def _text(req: dict) -> str:
    text = req.get("input")
    if not isinstance(text, str):
        raise APIError(400, "`input` must be the text to speak, a string.", param="input")
    if len(text) > MAX_INPUT:
        raise APIError(400, f"`input` is {len(text)} characters, more than the {MAX_INPUT} allowed.", param="input")
    if not any(ch.isalnum() for ch in text):
        raise APIError(400, "`input` holds no text to speak (it is empty, blank or only punctuation).",
                       param="input")
    from polymodal.pipelines.tts import check_text

    try:
        return check_text(text)
    except ValueError as e:
        raise APIError(400, f"`input`: {e}.", param="input") from None


def _options(req: dict, m) -> tuple[str, float]:
    voice = req.get("voice")
    if isinstance(voice, dict):  # the newer API's custom voice object {"id": ...}
        voice = voice.get("id")
    own = m.voice.pipe.voice.name
    if voice not in (*OPENAI_VOICES, m.id, own):
        raise APIError(400, f"Unknown voice {voice!r}: this server speaks with {own!r} (OpenAI's voice names, such "
                       "as 'alloy', choose it too).", param="voice")
    if req.get("instructions"):
        raise APIError(400, "`instructions` (a speaking style) is not supported by this voice.",
                       param="instructions")
    if req.get("stream_format") not in (None, "audio"):
        raise APIError(400, "Only stream_format 'audio' is supported (no server-sent events).",
                       param="stream_format")
    fmt = req.get("response_format", "wav")
    if fmt not in FORMATS:
        raise APIError(400, f"response_format {fmt!r} is not supported: 'wav' or 'pcm' (24 kHz 16-bit).",
                       param="response_format")
    speed = req.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
        raise APIError(400, f"speed must be a number from 0.25 to 4.0, got {json.dumps(speed)}.", param="speed")
    return fmt, float(speed)


def encode(out: dict, fmt: str) -> bytes:
    """The pipeline's {"audio": int16, "sampling_rate"} in a response format."""
    from polymodal.speech.voices import wav_bytes

    return wav_bytes(out["audio"], out["sampling_rate"]) if fmt == "wav" else pcm_bytes(out)


def pcm_bytes(out: dict) -> bytes:
    """int16 audio -> OpenAI's pcm: 16-bit little-endian at 24 kHz."""
    from polymodal.processing.audio import resample
    from polymodal.speech.voices import to_pcm16

    samples = resample(out["audio"].astype(np.float32) / 32768.0, out["sampling_rate"], PCM_RATE)
    return to_pcm16(samples).astype("<i2").tobytes()


async def _pcm_stream(parts: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    async for part in parts:  # a voice that fails mid-answer ends the stream early: the status is already sent
        yield pcm_bytes(part)


async def speech(served, body: bytes) -> tuple[bytes | AsyncIterator[bytes], str]:
    """The route's work -> (the audio: bytes for wav, for pcm an async stream of each sentence's bytes as soon as it
    is spoken; their media type)."""
    from polymodal.speech.voices import VoiceError

    req = _request(body)
    m = voice_model(served, req.get("model"))
    text = _text(req)
    fmt, speed = _options(req, m)
    try:
        if fmt == "pcm":
            return _pcm_stream(m.voice.sentences(text, speed=speed)), FORMATS[fmt]
        out = await m.voice.speak(text, speed=speed)
    except QueueFull as e:
        raise APIError(429, f"The model {m.id!r} has too many speech requests waiting; retry in a moment.",
                       headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    except VoiceError as e:  # the voice failed (espeak-ng crashed, ...): not the request's fault
        raise APIError(500, f"The voice could not speak: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # the pipeline's own refusals of the text
        raise APIError(400, str(e).splitlines()[0], param="input") from None
    return encode(out, fmt), FORMATS[fmt]
