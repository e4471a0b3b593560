"""Inline media: RFC 2397 `data:` URLs and base64 text, decoded with their size checked on the encoded length
first, so that an oversized payload is refused before it is decoded. The LLaVA processor and the server's media
layer both read images sent this way."""

from __future__ import annotations

import base64
import binascii
import math
from urllib.parse import unquote_to_bytes


class PayloadTooLarge(ValueError):
    """The payload holds more than the `max_bytes` it was allowed."""


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """data:[<mediatype>][;base64],<payload> -> its bytes. ValueError if malformed, PayloadTooLarge if over
    `max_bytes` (None: no limit)."""
    if not url[:5].lower() == "data:":
        raise ValueError("not a data: URL")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ValueError("malformed data: URL (no ',' before the payload)")
    if header.lower().split(";")[-1].strip() == "base64":
        return decode_base64(payload, max_bytes, "data: URL")
    if max_bytes is not None and len(payload) > 3 * max_bytes:  # each byte takes at most 3 characters (%XX)
        raise PayloadTooLarge(f"data: URL of {len(payload):,} characters, over the limit of {max_bytes:,} bytes")
    data = unquote_to_bytes(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"data: URL holds {len(data):,} bytes, over the limit of {max_bytes:,}")
    return data


def decode_base64(text, max_bytes: int | None = None, what: str = "base64 data") -> bytes:
    """Base64 text (line breaks allowed, as MIME writes it) -> bytes; `what` names it in errors."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a base64 string, got {type(text).__name__}")
    if max_bytes is not None:
        limit = 4 * math.ceil(max_bytes / 3)
        if len(text) > limit + limit // 76 * 2 + 2:  # MIME base64 may carry a line break every 76 characters
            raise PayloadTooLarge(f"{what} of {len(text):,} base64 characters, over the limit of {max_bytes:,} bytes")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: invalid base64 ({e})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"{what} holds {len(data):,} bytes, over the limit of {max_bytes:,}")
    return data
