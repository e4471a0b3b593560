"""What every hosted chat model shares: the chat interface, canonical messages, media encoding, errors.

A provider takes the same canonical messages as our local chat models (see `polymodal.serve.media`):
{"role": "system"|"user"|"assistant", "content": str | list[part]} with text, image (PIL), audio (float32 mono
samples + sampling rate) and video (sampled PIL frames + fps) parts. Subclasses translate them into their API's
shape (`_chat`, `_stream`) and translate their SDK's exceptions into `ProviderError` (`_error`); everything else,
input checks and the pipeline-shaped `__call__`, lives here.

Media encoding, chosen once for all providers:
- images: PNG (lossless: the provider sees exactly the pixels we were given);
- video frames: JPEG at quality 90 (up to 64 frames per video: PNG would multiply request size several times
  over for no visible gain), preceded by a short text note "[video: N frames sampled at F fps]";
- audio: 16-bit PCM WAV, mono, at the given sampling rate.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import wave
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Messages = list[dict[str, Any]]
_ROLES = ("system", "user", "assistant")
_PART_TYPES = ("text", "image", "audio", "video")
VIDEO_JPEG_QUALITY = 90


class ProviderError(RuntimeError):
    """A hosted model could not answer. `status` is an HTTP status: the provider's own for API errors (401 bad key,
    429 rate limit, 400 bad request, ...), 400 for input we refuse before sending, 401 for a missing key, 502/504
    when the provider cannot be reached. `retry_after` (seconds) when the provider said so."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ProviderError({self.status}, {self.message!r})"


@dataclass(frozen=True)
class ChatResult:
    """One answer. `finish_reason` in OpenAI's vocabulary: "stop", "length", "content_filter", "tool_calls".
    Token counts are the provider's, None when it did not say."""

    text: str
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Sampling:
    """Generation options, checked once; each provider maps them onto its API's names."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ProviderError(400, f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ProviderError(400, f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ProviderError(400, f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def of(cls, *, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None) -> Sampling:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(max_new_tokens, bool(do_sample), float(temperature), float(top_p), seed, stops)

    @property
    def effective_temperature(self) -> float:
        """Greedy decoding (do_sample=False) is temperature 0 on every hosted API."""
        return self.temperature if self.do_sample else 0.0

    @property
    def nucleus(self) -> float | None:
        """top_p to send: only when sampling and actually truncating (some APIs refuse temperature and top_p
        together, so the default sends neither)."""
        return self.top_p if self.do_sample and self.top_p < 1 else None


# ---------------------------------------------------------------------------------------------------- messages
def is_chat(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def canonical(inputs, system: str | None = None) -> Messages:
    """A string (one user message) or canonical messages -> checked canonical messages, `system` prepended unless
    the conversation already starts with a system message."""
    if isinstance(inputs, str):
        messages = [{"role": "user", "content": inputs}]
    elif is_chat(inputs):
        messages = list(inputs)
    else:
        raise ProviderError(400, "a chat model takes a string or a list of messages {'role': ..., 'content': ...}; "
                                 f"got {type(inputs).__name__}")
    if system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    for i, m in enumerate(messages):
        if m.get("role") not in _ROLES:
            raise ProviderError(400, f"message {i}: role must be one of {_ROLES}, got {m.get('role')!r}")
        for part in parts(m.get("content")):
            kind = part.get("type")
            if kind not in _PART_TYPES:
                raise ProviderError(400, f"message {i}: unknown content part type {kind!r}; expected one of "
                                         f"{_PART_TYPES}")
            if kind != "text" and m["role"] != "user":
                raise ProviderError(400, f"message {i}: {kind} parts are only allowed in user messages, not in "
                                         f"{m['role']!r} messages")
    return messages


def parts(content) -> list[dict]:
    """A message's content as a list of parts ("Hi" -> [{"type": "text", "text": "Hi"}])."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise ProviderError(400, f"message content must be a string or a list of parts, got {type(content).__name__}")


def text_of(content) -> str:
    """The text of a text-only message (system prompts)."""
    return "".join(p["text"] for p in parts(content) if p["type"] == "text")


def split_system(messages: Messages) -> tuple[str | None, Messages]:
    """APIs that take the system prompt apart (Anthropic, Gemini): the system messages joined by a blank line, and
    the rest of the conversation."""
    system = [text_of(m["content"]) for m in messages if m["role"] == "system"]
    return ("\n\n".join(system) if system else None), [m for m in messages if m["role"] != "system"]


def video_note(part: dict) -> str:
    """The text placed before a video's frames, so that the model knows they are one clip in time order."""
    return f"[video: {len(part['frames'])} frames sampled at {float(part.get('fps', 0)):g} fps]"


# ---------------------------------------------------------------------------------------------------- media
def _check_image(image):
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ProviderError(400, f"an image part must hold a PIL image, got {type(image).__name__}")
    return image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    _check_image(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image, quality: int = VIDEO_JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    _check_image(image).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def wav_bytes(samples, sampling_rate: int) -> bytes:
    """Float samples in [-1, 1] (mono) -> a 16-bit PCM WAV file."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1 or not x.size:
        raise ProviderError(400, f"an audio part must hold mono samples of shape (samples,), got shape {x.shape}")
    if not isinstance(sampling_rate, int) or sampling_rate <= 0:
        raise ProviderError(400, f"audio sampling_rate must be a positive integer, got {sampling_rate!r}")
    pcm = (np.clip(x, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sampling_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------------- the model
class ChatProvider:
    """A hosted chat model behind the same interface as `TextGenerationPipeline`:

        model = pm.pipeline("text-generation", model="openai:gpt-4o")   # key from OPENAI_API_KEY
        model("Hello!")                                    # [{"generated_text": "Hello!..."}]
        model.chat([{"role": "user", "content": "Hi"}])    # ChatResult(text, finish_reason, prompt_tokens, ...)
        for piece in model.stream("Tell me a story"): print(piece, end="")

    Not an nn.Module: there are no weights here, only requests."""

    provider: ClassVar[str]  # "openai": the prefix of the model's name
    label: ClassVar[str]  # "OpenAI": for messages
    key_env: ClassVar[tuple[str, ...]]  # where the API key is looked for, in order
    sdk: ClassVar[str]  # the SDK's import name, for the "pip install" hint
    accepts: ClassVar[frozenset[str]]
    example: ClassVar[str]  # "openai:gpt-4o": for messages
    refusals: ClassVar[dict[str, str]] = {}  # modality -> what to do instead, appended to the refusal

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 120.0, max_retries: int = 2):
        if not model:
            raise ProviderError(400, f"no model name: write {self.provider}:MODEL, e.g. {self.example}")
        self.model = model
        self.name = f"{self.provider}:{model}"
        self.modalities: set[str] = set(self.accepts)
        key = api_key or next((os.environ[k] for k in self.key_env if os.environ.get(k)), None)
        if not key:  # checked here, before any request: the SDKs would only fail at the first call
            raise ProviderError(401, f"no {self.label} API key for {self.name}: set "
                                     f"{' or '.join(self.key_env)}, or pass api_key=...")
        self._client = self._make_client(key, base_url, float(timeout), int(max_retries))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --------------------------------------------------------------------------------- to implement per provider
    def _make_client(self, api_key: str, base_url: str | None, timeout: float, max_retries: int):
        raise NotImplementedError

    def _chat(self, messages: Messages, sampling: Sampling) -> ChatResult:
        raise NotImplementedError

    def _stream(self, messages: Messages, sampling: Sampling) -> Generator[str, None, ChatResult]:
        raise NotImplementedError

    def _error(self, exc: Exception) -> ProviderError | None:
        """The SDK's exception as a ProviderError; None for exceptions that are not the SDK's (they propagate)."""
        raise NotImplementedError

    def _import(self):
        import importlib

        try:
            return importlib.import_module(self.sdk)
        except ImportError:
            raise ProviderError(500, f"{self.name} needs the `{self.sdk}` package: pip install "
                                     "polymodal[providers]") from None

    # --------------------------------------------------------------------------------- the chat interface
    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except ProviderError:
            raise
        except Exception as e:
            err = self._error(e)
            if err is None:
                raise
            raise err from e

    def _prepare(self, inputs, system: str | None) -> Messages:
        messages = canonical(inputs, system)
        for m in messages:
            for p in parts(m["content"]):
                if p["type"] != "text" and p["type"] not in self.modalities:
                    why = self.refusals.get(p["type"], "")
                    raise ProviderError(400, f"{self.name} does not take {p['type']} input (it takes "
                                             f"{', '.join(sorted(self.modalities))}){why}")
        return messages

    def chat(self, messages, *, system: str | None = None, **options) -> ChatResult:
        """One answer to a conversation (or a string, sent as one user message). Options: max_new_tokens,
        do_sample, temperature, top_p, seed, stop."""
        sampling = Sampling.of(**options)
        messages = self._prepare(messages, system)
        with self._translated():
            return self._chat(messages, sampling)

    def stream(self, inputs, *, system: str | None = None, **options) -> Generator[str, None, ChatResult]:
        """Yield the answer's text pieces as the provider sends them. Input is checked now; the request is made at
        the first `next()`. When exhausted, the generator returns the ChatResult (finish reason and usage):
        `result = yield from model.stream(...)`. Closing it early closes the connection."""
        sampling = Sampling.of(**options)
        messages = self._prepare(inputs, system)

        def pieces() -> Generator[str, None, ChatResult]:
            with self._translated():
                return (yield from self._stream(messages, sampling))

        return pieces()

    def __call__(self, inputs, *, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 system: str | None = None, return_full_text: bool = True):
        """Like `TextGenerationPipeline.__call__`: a string or a conversation -> [{"generated_text": ...}] (a list of
        those for a list of inputs, answered one after the other). A conversation comes back with the assistant's
        answer appended; a string (sent as one user message) comes back as prompt + answer, or the answer alone
        with return_full_text=False."""
        single = isinstance(inputs, str) or is_chat(inputs)
        items = [inputs] if single else list(inputs)
        if not items:
            raise ProviderError(400, "empty input list")
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                       seed=seed, stop=stop, system=system)
        results = []
        for item in items:
            answer = self.chat(item, **options).text
            if is_chat(item):
                text = [*item, {"role": "assistant", "content": answer}] if return_full_text else answer
            elif isinstance(item, str):
                text = item + answer if return_full_text else answer
            else:
                raise ProviderError(400, f"each input must be a string or a conversation, got {type(item).__name__}")
            results.append([{"generated_text": text}])
        return results[0] if single else results


def status_message(label: str, status: int, body, fallback: str) -> str:
    """The provider's own message from an error body ({"error": {"message": ...}}, Anthropic's and Gemini's
    shapes too), prefixed so a reader knows where it came from."""
    message = None
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message")
        elif isinstance(inner, str):
            message = inner
    return f"{label} API error {status}: {message or fallback}"


def transport_error(label: str, exc: Exception) -> ProviderError | None:
    """httpx's (or httpx2's) connection errors, which some SDKs let through: 504 for a timeout, 502 otherwise."""
    for name in ("httpx", "httpx2"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        if isinstance(exc, mod.TimeoutException):
            return ProviderError(504, f"{label} API did not answer in time ({exc})")
        if isinstance(exc, mod.TransportError):
            return ProviderError(502, f"could not reach the {label} API ({type(exc).__name__}: {exc})")
    return None


def sdk_error(label: str, base_url, exc: Exception, sdk) -> ProviderError | None:
    """The exceptions of the SDKs generated from one template (`openai`, `anthropic`: APIStatusError,
    APITimeoutError, APIConnectionError) as ProviderError; None for anything else."""
    if isinstance(exc, sdk.APIStatusError):
        return ProviderError(exc.status_code, status_message(label, exc.status_code, exc.body, exc.message),
                             retry_after=retry_after(exc.response.headers))
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError(504, f"{label} API did not answer in time")
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError(502, f"could not reach the {label} API at {base_url} ({exc})")
    return None


def retry_after(headers) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):  # an HTTP date: not worth parsing, the caller backs off by itself
        return None
