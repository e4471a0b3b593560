"""Closed, hosted chat models behind polymodal's chat interface: GPT-4o, Claude 3.5 Sonnet, Gemini 1.5 Pro.

    model = load_provider("openai:gpt-4o")           # or pm.pipeline("text-generation", model="openai:gpt-4o")
    model("Describe this.", max_new_tokens=64)       # [{"generated_text": ...}], like the text pipeline
    model.chat([{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image", "image": img}]}])     # ChatResult
    for piece in model.stream("Tell me a story"): ...

Prefixes: `openai:`, `anthropic:`, `gemini:` (or `google:`). Keys and base URLs come from the environment, or
from `api_key=` / `base_url=`; `pm.load` takes checkpoints only, and `polymodal serve --model openai:gpt-4o`
resolves a hosted model here too. The SDKs (`pip install polymodal[providers]`) are
imported only when such a model is loaded. See docs/providers.md for keys, base URLs and message translation.
"""

from __future__ import annotations

from polymodal.providers.base import ChatProvider, ChatResult, ProviderError

PREFIXES = {"openai": "openai_api.OpenAIProvider", "anthropic": "anthropic_api.AnthropicProvider",
            "gemini": "gemini_api.GeminiProvider", "google": "gemini_api.GeminiProvider"}


def is_provider_spec(source) -> bool:
    """"openai:gpt-4o" and the like (a string whose prefix before ":" names a provider)."""
    return isinstance(source, str) and source.partition(":")[0] in PREFIXES and ":" in source


def provider_class(prefix: str) -> type[ChatProvider]:
    import importlib

    module, _, cls = PREFIXES[prefix].partition(".")
    return getattr(importlib.import_module(f"polymodal.providers.{module}"), cls)


def load_provider(spec: str, *, api_key: str | None = None, base_url: str | None = None, timeout: float = 120.0,
                  max_retries: int = 2) -> ChatProvider:
    """"openai:gpt-4o" -> the provider object. The key comes from `api_key` or the provider's environment variable;
    raises ProviderError(401) when there is none, before any request."""
    if not is_provider_spec(spec):
        raise ProviderError(400, f"not a provider model {spec!r}: write PROVIDER:MODEL with PROVIDER one of "
                                 f"{', '.join(PREFIXES)} (e.g. openai:gpt-4o)")
    prefix, _, model = spec.partition(":")
    return provider_class(prefix)(model.strip(), api_key=api_key, base_url=base_url, timeout=timeout,
                                  max_retries=max_retries)


__all__ = ["PREFIXES", "ChatProvider", "ChatResult", "ProviderError", "is_provider_spec", "load_provider",
           "provider_class"]
