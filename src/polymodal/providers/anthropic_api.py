"""Anthropic's Messages API (Claude 3.5 Sonnet and later) through the official `anthropic` SDK.

Reference: https://docs.anthropic.com/en/api/messages (request: top-level `system`, `messages` of "user" /
"assistant" turns whose content blocks are {"type": "text"} and {"type": "image", "source": {"type": "base64",
"media_type", "data"}}, required `max_tokens`, `stop_sequences`; response: content blocks, `stop_reason`,
`usage.input_tokens` / `output_tokens`; streaming: message_start, content_block_start, content_block_delta
(text_delta), content_block_stop, message_delta (stop_reason, usage), message_stop). Checked against a local fake
of that protocol (tests/fake_providers.py). The Messages API takes no audio: audio parts are refused (400) before
any request. It has no seed either: `seed` is not sent.
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
    split_system,
    video_note,
)

# Anthropic's stop reasons in OpenAI's vocabulary
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter", "pause_turn": "stop"}


def _image(data: bytes, media_type: str) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": b64(data)}}


def _content(content) -> str | list[dict]:
    if isinstance(content, str):
        return content
    out: list[dict] = []
    for p in parts(content):
        if p["type"] == "text":
            out.append({"type": "text", "text": p["text"]})
        elif p["type"] == "image":
            out.append(_image(png_bytes(p["image"]), "image/png"))
        elif p["type"] == "video":  # sampled frames, in order, as images
            out.append({"type": "text", "text": video_note(p)})
            out.extend(_image(jpeg_bytes(f), "image/jpeg") for f in p["frames"])
        else:  # audio: _prepare refused it already; kept as a guard for direct callers
            raise ProviderError(400, "Anthropic's Messages API does not take audio input")
    return out


def to_anthropic(messages: Messages) -> tuple[str | None, list[dict]]:
    """Canonical messages -> (system, messages): the system prompt is a top-level field, not a message."""
    system, rest = split_system(messages)
    return system, [{"role": m["role"], "content": _content(m["content"])} for m in rest]


class AnthropicProvider(ChatProvider):
    provider = "anthropic"
    label = "Anthropic"
    key_env = ("ANTHROPIC_API_KEY",)
    sdk = "anthropic"
    accepts = frozenset({"text", "image", "video"})
    example = "anthropic:claude-3-5-sonnet-20241022"
    refusals = {"audio": ": Anthropic's Messages API has no audio input; transcribe it first, or use an OpenAI or "
                         "Gemini model"}

    def _make_client(self, api_key, base_url, timeout, max_retries):
        anthropic = self._import()
        # base_url None: the SDK reads ANTHROPIC_BASE_URL, else api.anthropic.com
        return anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)

    def _request(self, messages: Messages, sampling: Sampling) -> dict:
        system, turns = to_anthropic(messages)
        # temperature and top_p go through extra_body: the API takes them (Claude 3.x), but recent SDKs no longer
        # list them as arguments.
        knobs = {"temperature": sampling.effective_temperature}
        if sampling.nucleus is not None:
            knobs["top_p"] = sampling.nucleus
        request = dict(model=self.model, messages=turns, max_tokens=sampling.max_new_tokens, extra_body=knobs)
        if system is not None:
            request["system"] = system
        if sampling.stop:
            request["stop_sequences"] = list(sampling.stop)
        return request

    def _chat(self, messages, sampling):
        message = self._client.messages.create(**self._request(messages, sampling))
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        return ChatResult(text, FINISH_REASONS.get(message.stop_reason or "end_turn", "stop"),
                          usage.input_tokens if usage else None, usage.output_tokens if usage else None)

    def _stream(self, messages, sampling) -> Generator[str, None, ChatResult]:
        stream = self._client.messages.create(**self._request(messages, sampling), stream=True)
        text, stop_reason, prompt_tokens, completion_tokens = [], None, None, None
        with stream:
            for event in stream:
                if event.type == "message_start":
                    prompt_tokens = event.message.usage.input_tokens
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    text.append(event.delta.text)
                    yield event.delta.text
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    completion_tokens = event.usage.output_tokens if event.usage else completion_tokens
        return ChatResult("".join(text), FINISH_REASONS.get(stop_reason or "end_turn", "stop"), prompt_tokens,
                          completion_tokens)

    def _error(self, exc):
        import anthropic

        return sdk_error(self.label, self._client.base_url, exc, anthropic)
