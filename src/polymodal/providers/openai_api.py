"""OpenAI's Chat Completions API (GPT-4o and any OpenAI-compatible server) through the official `openai` SDK.

Reference: https://platform.openai.com/docs/api-reference/chat (request: messages with "system" / "user" /
"assistant" roles, content parts "text", "image_url" (here a base64 PNG data URL) and "input_audio" (base64 WAV);
response: choices[0].message.content, finish_reason, usage). Checked against a local fake that speaks that wire
protocol (tests/fake_providers.py). Audio input needs an audio-capable model (e.g. gpt-4o-audio-preview); other
models answer 400, which comes back as ProviderError(400).
"""

from __future__ import annotations

from collections.abc import Generator

from polymodal.providers.base import (
    ChatProvider,
    ChatResult,
    Messages,
    ProviderError,
    Sampling,
    b64,
    jpeg_bytes,
    parts,
    png_bytes,
    sdk_error,
    text_of,
    video_note,
    wav_bytes,
)


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{b64(data)}"


def _content(content) -> str | list[dict]:
    """A user message's canonical content -> OpenAI content parts (a plain string stays a string)."""
    if isinstance(content, str):
        return content
    out: list[dict] = []
    for p in parts(content):
        if p["type"] == "text":
            out.append({"type": "text", "text": p["text"]})
        elif p["type"] == "image":
            out.append({"type": "image_url", "image_url": {"url": _data_url(png_bytes(p["image"]), "image/png")}})
        elif p["type"] == "audio":
            wav = wav_bytes(p["audio"], p.get("sampling_rate"))
            out.append({"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}})
        elif p["type"] == "video":  # sampled frames, in order, as images
            out.append({"type": "text", "text": video_note(p)})
            out.extend({"type": "image_url", "image_url": {"url": _data_url(jpeg_bytes(f), "image/jpeg")}}
                       for f in p["frames"])
    return out


def to_openai(messages: Messages) -> list[dict]:
    """Canonical messages -> Chat Completions messages. System prompts stay system messages."""
    return [{"role": m["role"], "content": _content(m["content"]) if m["role"] == "user" else text_of(m["content"])}
            for m in messages]


class OpenAIProvider(ChatProvider):
    provider = "openai"
    label = "OpenAI"
    key_env = ("OPENAI_API_KEY",)
    sdk = "openai"
    accepts = frozenset({"text", "image", "audio", "video"})
    example = "openai:gpt-4o"

    def _make_client(self, api_key, base_url, timeout, max_retries):
        openai = self._import()
        # base_url None: the SDK reads OPENAI_BASE_URL, else api.openai.com/v1
        return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def _request(self, messages: Messages, sampling: Sampling) -> dict:
        # max_tokens rather than max_completion_tokens: GPT-4o takes both, and OpenAI-compatible servers
        # (vLLM, llama.cpp, polymodal serve) know max_tokens.
        request = dict(model=self.model, messages=to_openai(messages), max_tokens=sampling.max_new_tokens,
                       temperature=sampling.effective_temperature)
        if sampling.nucleus is not None:
            request["top_p"] = sampling.nucleus
        if sampling.seed is not None:
            request["seed"] = sampling.seed
        if sampling.stop:
            request["stop"] = list(sampling.stop)
        return request

    def _chat(self, messages, sampling):
        response = self._client.chat.completions.create(**self._request(messages, sampling))
        if not response.choices:
            raise ProviderError(502, f"{self.label} API answered without a choice")
        choice = response.choices[0]
        usage = response.usage
        return ChatResult(text=choice.message.content or "", finish_reason=choice.finish_reason or "stop",
                          prompt_tokens=usage.prompt_tokens if usage else None,
                          completion_tokens=usage.completion_tokens if usage else None)

    def _stream(self, messages, sampling) -> Generator[str, None, ChatResult]:
        # include_usage: a last chunk with no choices carries the token counts
        stream = self._client.chat.completions.create(**self._request(messages, sampling), stream=True,
                                                      stream_options={"include_usage": True})
        text, finish, usage = [], "stop", None
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    if choice.delta is not None and choice.delta.content:
                        text.append(choice.delta.content)
                        yield choice.delta.content
                    if choice.finish_reason:
                        finish = choice.finish_reason
        return ChatResult("".join(text), finish, usage.prompt_tokens if usage else None,
                          usage.completion_tokens if usage else None)

    def _error(self, exc):
        import openai

        return sdk_error(self.label, self._client.base_url, exc, openai)
