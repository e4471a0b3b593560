"""Speech recognition behind POST /v1/audio/transcriptions, OpenAI's route and request shape: a multipart form with
`file` (the audio) and `model`, optionally `language`, `response_format` and `temperature` (0 only: greedy). The
answer is {"text": ...} ("json", the default), the text ("text"), or the segments of Whisper's sequential long-form
decoding as OpenAI returns them: "verbose_json" (task, language, duration, text, segments with id, seek, start,
end, text, tokens, temperature, avg_logprob, compression_ratio, no_speech_prob), "srt" and "vtt" (text/plain).

    worker = SpeechWorker(AutomaticSpeechRecognitionPipeline(model), max_queue=32)
    text = await worker.transcribe(audio_bytes, language="en")        # QueueFull when the queue is full

What runs where: the event loop reads the form (its size is bounded by the server's body limit before any parsing);
the audio is decoded (polymodal.processing.audio.read_audio: bounded, checked) and transcribed in a worker thread,
one request at a time per model, at most `max_queue` waiting (429 with Retry-After past that). Audio that cannot be
read is a 400 naming the reason, and the server keeps serving.

The form is parsed with the standard library's MIME parser (no python-multipart dependency).
"""

from __future__ import annotations

import asyncio
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP

from polymodal.serve.engine import QueueFull
from polymodal.serve.errors import APIError

MAX_SECONDS = 2 * 3600.0  # the longest audio one request may hold (the body limit usually binds first)
OPENAI_MODEL = "whisper-1"  # what clients written for OpenAI send; it names the one served speech model
_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
           "stream", "chunking_strategy", "include[]"}


class SpeechWorker:
    """Runs a speech pipeline's requests one at a time in worker threads; at most `max_queue` wait."""

    def __init__(self, pipe, *, max_queue: int = 32):
        self.pipe, self.max_queue = pipe, max_queue
        self._lock = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()
        self._last_seconds = 1.0

    async def transcribe(self, audio: bytes, *, language: str | None = None, segments: bool = False):
        """The text of the audio; segments: {"text", "segments", "duration"} (the pipeline's long-form segments)."""
        with self._count:
            if self._waiting >= self.max_queue + 1:
                raise QueueFull("too many transcriptions waiting", self._last_seconds * self._waiting)
            self._waiting += 1
        try:
            return await asyncio.to_thread(self._run, audio, language, segments)
        finally:
            with self._count:
                self._waiting -= 1

    def _run(self, audio: bytes, language: str | None, segments: bool = False):
        from polymodal.processing.audio import read_audio

        samples = read_audio(audio, max_seconds=MAX_SECONDS)  # AudioError (a ValueError) for bad audio
        with self._lock:
            start = time.monotonic()
            try:
                if not segments:
                    return self.pipe.transcribe(samples, language=language)["text"]
                out = self.pipe.transcribe(samples, language=language, return_segments=True)
                return {**out, "duration": len(samples) / self.pipe.features.sampling_rate}
            finally:
                self._last_seconds = max(time.monotonic() - start, 0.1)


def read_form(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """A multipart/form-data body -> {field: (bytes, filename or None)}; 400 for anything else."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError(400, "This route takes a multipart/form-data body with the audio as `file` (OpenAI's "
                       f"audio transcriptions request), not {content_type or 'a body without a Content-Type'}.")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                              + body)
    if not msg.is_multipart() or msg.defects:
        raise APIError(400, "The multipart/form-data body could not be parsed (a missing or wrong boundary?).")
    fields: dict[str, tuple[bytes, str | None]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise APIError(400, "A part of the form has no name (Content-Disposition: form-data; name=...).")
        if name not in _FIELDS:
            raise APIError(400, f"Unknown form field {name!r}; this route takes file, model, language, "
                           "response_format and temperature.", param=name)
        fields[name] = (part.get_payload(decode=True) or b"", part.get_filename())
    return fields


def _text(fields: dict, name: str, default: str | None = None) -> str | None:
    if name not in fields:
        return default
    try:
        return fields[name][0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise APIError(400, f"The form field {name!r} is not UTF-8 text.", param=name) from None


def speech_model(served, model_id: str | None):
    """The served speech model a request names (OpenAI's `whisper-1` names the only one)."""
    speech = [m for m in served.models.values() if m.kind == "speech"]
    if model_id in (None, "", OPENAI_MODEL) and len(speech) == 1:
        return speech[0]
    if not model_id:
        raise APIError(400, "The form needs a `model` field naming the speech model.", param="model")
    m = served.get(model_id)
    if m.kind != "speech":
        names = ", ".join(repr(s.id) for s in speech) or "none is served"
        raise APIError(400, f"The model {m.id!r} does not transcribe audio (speech models: {names}).",
                       param="model", code="model_not_supported")
    return m


async def transcription(served, body: bytes, content_type: str):
    """The route's work -> the answer: {"text"} for response_format "json", the text itself for "text"."""
    fields = read_form(body, content_type)
    m = speech_model(served, _text(fields, "model"))
    if "file" not in fields or not fields["file"][0]:
        raise APIError(400, "The form has no audio: send it as the `file` field.", param="file")
    response_format = _text(fields, "response_format", "json")
    if response_format not in FORMATS:
        raise APIError(400, f"response_format {response_format!r} is not supported: one of "
                       f"{', '.join(map(repr, FORMATS))}.", param="response_format")
    temperature = _text(fields, "temperature", "0")
    try:
        greedy = float(temperature) == 0
    except ValueError:
        raise APIError(400, f"temperature must be a number, got {temperature!r}.", param="temperature") from None
    if not greedy:
        raise APIError(400, "Only temperature 0 (greedy decoding) is supported.", param="temperature")
    if _text(fields, "prompt"):
        raise APIError(400, "A `prompt` is not supported yet by polymodal's Whisper.", param="prompt")
    language = _text(fields, "language") or None
    try:
        text = await m.speech.transcribe(fields["file"][0], language=language,
                                         segments=response_format not in ("json", "text"))
    except QueueFull as e:
        raise APIError(429, f"The model {m.id!r} has too many transcriptions waiting; retry in a moment.",
                       headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    except ValueError as e:  # AudioError: the audio; an unknown language
        raise APIError(400, f"{str(e).splitlines()[0]}", param="file" if language is None else None) from None
    if response_format in ("json", "text"):
        return text if response_format == "text" else {"text": text}
    if response_format == "verbose_json":
        return verbose_json(text, language, m.speech.pipe.model.is_multilingual)
    return subtitles(text["segments"], vtt=response_format == "vtt")


FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def verbose_json(out: dict, language: str | None, multilingual: bool) -> dict:
    """The pipeline's segments -> OpenAI's verbose_json transcription."""
    from polymodal.models.whisper import LANGUAGE_CODES

    names = {code: name for name, code in LANGUAGE_CODES.items()}
    lang = names.get(language, language) if language else None if multilingual else "english"
    return {"task": "transcribe", "language": lang, "duration": round(out["duration"], 3), "text": out["text"],
            "segments": [{"id": i, "seek": s["seek"], "start": round(s["start"], 2), "end": round(s["end"], 2),
                          "text": s["text"], "tokens": list(s["tokens"]), "temperature": s["temperature"],
                          "avg_logprob": s["avg_logprob"], "compression_ratio": s["compression_ratio"],
                          "no_speech_prob": s["no_speech_prob"]} for i, s in enumerate(out["segments"])]}


def _clock(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


def subtitles(segments: list[dict], *, vtt: bool) -> str:
    """Segments -> SubRip (numbered cues, hh:mm:ss,mmm) or WebVTT (a WEBVTT header, hh:mm:ss.mmm), as OpenAI
    returns them."""
    mark = "." if vtt else ","
    cues = [f"{_clock(s['start'], mark)} --> {_clock(s['end'], mark)}\n{s['text'].strip()}\n" for s in segments]
    if vtt:
        return "WEBVTT\n\n" + "\n".join(cues)
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
