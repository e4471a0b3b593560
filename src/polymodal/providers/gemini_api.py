"""Google's Gemini API (Gemini 1.5 Pro and later) through the official `google-genai` SDK.

Reference: https://ai.google.dev/api/generate-content (POST /v1beta/models/{model}:generateContent and
:streamGenerateContent?alt=sse; request: `contents` of "user" / "model" turns whose parts are {"text"} and
{"inline_data": {"mime_type", "data"}}, `systemInstruction`, `generationConfig` (maxOutputTokens, temperature,
topP, stopSequences, seed); response: candidates[0].content.parts, finishReason, usageMetadata). Checked against a
local fake of that protocol (tests/fake_providers.py). Videos go as their sampled frames (JPEG images after a
short note), like for the other providers: the media layer's sampling stays the one truth, and no mp4 is
re-encoded.
"""

from __future__ import annotations

import os
from collections.abc import Generator

from polymodal.providers.base import (
    ChatProvider,
    ChatResult,
    Messages,
    ProviderError,
    Sampling,
    jpeg_bytes,
    parts,
    png_bytes,
    retry_after,
    split_system,
    status_message,
    transport_error,
    video_note,
    wav_bytes,
)

BASE_URL_ENV = "POLYMODAL_GEMINI_BASE_URL"
# Gemini's finish reasons in OpenAI's vocabulary; anything else (OTHER, LANGUAGE, ...) reads as "stop"
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
                  "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
                  "IMAGE_SAFETY": "content_filter", "MALFORMED_FUNCTION_CALL": "tool_calls"}


def _finish(reason) -> str:
    name = getattr(reason, "value", reason)
    return FINISH_REASONS.get(str(name), "stop") if name else "stop"


def to_gemini(messages: Messages) -> tuple[str | None, list]:
    """Canonical messages -> (system_instruction, contents); the assistant's role is "model"."""
    from google.genai import types

    system, rest = split_system(messages)
    contents = []
    for m in rest:
        out = []
        for p in parts(m["content"]):
            if p["type"] == "text":
                out.append(types.Part(text=p["text"]))
            elif p["type"] == "image":
                out.append(types.Part.from_bytes(data=png_bytes(p["image"]), mime_type="image/png"))
            elif p["type"] == "audio":
                wav = wav_bytes(p["audio"], p.get("sampling_rate"))
                out.append(types.Part.from_bytes(data=wav, mime_type="audio/wav"))
            elif p["type"] == "video":
                out.append(types.Part(text=video_note(p)))
                out.extend(types.Part.from_bytes(data=jpeg_bytes(f), mime_type="image/jpeg") for f in p["frames"])
        contents.append(types.Content(role="model" if m["role"] == "assistant" else "user", parts=out))
    return system, contents


def _text(response) -> str:
    """The answer's text in one response (or stream chunk): text parts of the first candidate, thoughts left out."""
    if not response.candidates or response.candidates[0].content is None:
        return ""
    return "".join(p.text for p in response.candidates[0].content.parts or () if p.text and not p.thought)


class GeminiProvider(ChatProvider):
    provider = "gemini"
    label = "Gemini"
    key_env = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    sdk = "google.genai"
    accepts = frozenset({"text", "image", "audio", "video"})
    example = "gemini:gemini-1.5-pro"

    def _make_client(self, api_key, base_url, timeout, max_retries):
        genai = self._import()
        from google.genai import types

        # Retries always through HttpRetryOptions: without it the SDK retries connection errors by itself, after
        # sleeping 1-10 s. attempts counts the first call too. The API version is v1beta, the one Gemini's API
        # reference documents (recent SDKs default to v1), unless GOOGLE_GENAI_API_VERSION says otherwise.
        options = types.HttpOptions(base_url=base_url or os.environ.get(BASE_URL_ENV) or None,
                                    api_version=None if os.environ.get("GOOGLE_GENAI_API_VERSION") else "v1beta",
                                    timeout=int(timeout * 1000),
                                    retry_options=types.HttpRetryOptions(attempts=max_retries + 1))
        return genai.Client(api_key=api_key, vertexai=False, http_options=options)

    def _request(self, messages: Messages, sampling: Sampling) -> dict:
        from google.genai import types

        system, contents = to_gemini(messages)
        config = types.GenerateContentConfig(
            system_instruction=system, max_output_tokens=sampling.max_new_tokens,
            temperature=sampling.effective_temperature, top_p=sampling.nucleus, seed=sampling.seed,
            stop_sequences=list(sampling.stop) or None)
        return dict(model=self.model, contents=contents, config=config)

    def _chat(self, messages, sampling):
        response = self._client.models.generate_content(**self._request(messages, sampling))
        return self._result(_text(response), response, response)

    def _stream(self, messages, sampling) -> Generator[str, None, ChatResult]:
        chunks = self._client.models.generate_content_stream(**self._request(messages, sampling))
        text, last, usage = [], None, None
        try:
            for chunk in chunks:
                piece = _text(chunk)
                if piece:
                    text.append(piece)
                    yield piece
                last = chunk
                usage = chunk if chunk.usage_metadata is not None else usage
        finally:
            chunks.close()
        return self._result("".join(text), last, usage)

    @staticmethod
    def _result(text: str, last, usage) -> ChatResult:
        if last is not None and last.candidates:
            finish = _finish(last.candidates[0].finish_reason)
        elif last is not None and last.prompt_feedback is not None and last.prompt_feedback.block_reason:
            finish = "content_filter"  # the prompt itself was blocked: no candidate at all
        else:
            finish = "stop"
        meta = usage.usage_metadata if usage is not None else None
        return ChatResult(text, finish, meta.prompt_token_count if meta else None,
                          meta.candidates_token_count if meta else None)

    def _error(self, exc):
        from google.genai import errors

        if isinstance(exc, errors.APIError):
            status = int(exc.code or 500)
            headers = getattr(exc.response, "headers", None)
            return ProviderError(status, status_message(self.label, status, exc.details, exc.message or str(exc)),
                                 retry_after=retry_after(headers))
        return transport_error(self.label, exc)
