"""The safe media layer of `polymodal serve`: OpenAI request parts -> canonical chat parts.

A chat request may carry images (`image_url`), audio (`input_audio`) and video (our `video_url` extension) as
data: URLs, remote http(s) URLs or local files. Each of them is untrusted input that reaches the network, the
file system and native decoders, so every step is bounded before it is taken:

- where bytes may come from: remote URLs are off by default; when on, only allow-listed domains over http(s),
  every address (after DNS, and again after every redirect) must be public, and the connection goes to the very
  address that was checked (no second lookup a DNS-rebinding attacker could answer differently; SNI and `Host`
  keep the name). Local files only under `local_root`, after resolving symlinks.
- how many bytes: data: URLs are measured before decoding; downloads are counted while streaming
  (Content-Length is only a hint) under a total time limit.
- how much decoding: image pixels (each image's, and all of a request's images together) and frame counts from
  the header before decoding; audio and video durations and frame counts while decoding, which stops as soon as
  a cap is passed.

The threats follow OWASP's SSRF prevention cheat sheet (allow lists, address checks after resolution, pinned
connections, redirects re-checked). Every refusal is a `MediaError` with an HTTP status: 400 malformed or not
allowed, 413 too large or too long, 415 an unsupported or undecodable format. Decoding is blocking: the server
calls `resolve_messages` in a worker thread; nothing here touches asyncio.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import math
import os
import socket
import ssl
import stat
import threading
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
from PIL import Image

from polymodal.processing.data_url import PayloadTooLarge, decode_base64, decode_data_url
from polymodal.processing.image import ImageError, ImageTooLarge, open_image

MiB = 1024 * 1024
AUDIO_RATE = 16_000  # every decoded audio clip comes out at this rate (Whisper-style encoders expect it)
AUDIO_FORMATS = {  # input_audio.format -> the FFmpeg demuxer that reads it (wav uses the stdlib `wave`)
    "wav": None, "mp3": "mp3", "flac": "flac", "ogg": "ogg", "opus": "ogg", "m4a": "mp4", "aac": "aac",
    "webm": "webm",
}
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_DECODED_FPS = 240  # decoded video frames per allowed second, a bound on decoding work for odd timestamps

Resolver = Callable[[str, int], Sequence[str]]


class MediaError(ValueError):
    """A media part that cannot be used. `status`: 400 malformed or not allowed, 413 too large or too long,
    415 unsupported or undecodable format; `message` names the part and the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class MediaPolicy:
    """What the media layer accepts. The defaults refuse remote URLs and local files.

    allow_remote / allowed_domains: fetch http(s) URLs whose host is a listed domain or a subdomain of one.
    allow_private_networks: also let those hosts resolve to private, loopback or carrier-grade NAT addresses (an
    intranet server); link-local (cloud metadata at 169.254.169.254), multicast, reserved and unspecified
    addresses stay refused. local_root: serve `file://` URLs and paths inside this directory (symlinks resolved).
    max_download_bytes bounds data: URLs, downloads, local files and base64 audio; download_timeout_s is the
    total time of a download, redirects included. max_pixels is checked from image headers and video streams
    before decoding; max_request_pixels bounds the images of one request together (each header checked against
    what the earlier images left). Animated images: the first frame is used (max_image_frames must be 1), files
    claiming more than max_animation_frames frames are refused. Video is sampled at video_fps frames per second
    (less when the container's duration times video_fps would pass max_video_frames). max_parts bounds the media
    parts (image, audio, video) of one request. resolver(host, port) -> addresses replaces DNS (tests).

    `polymodal serve` sets allow_remote, allowed_domains and local_root from --allow-remote-media, --allowed-domain
    and --media-root; refusals name those flags, what the person running the server can change.
    """

    allow_remote: bool = False
    allowed_domains: tuple[str, ...] = ()
    allow_private_networks: bool = False
    local_root: str | os.PathLike | None = None
    max_download_bytes: int = 20 * MiB
    download_timeout_s: float = 10.0
    max_redirects: int = 3
    max_pixels: int = 25_000_000
    max_request_pixels: int = 100_000_000  # 300 MB of decoded RGB: four images at max_pixels
    max_image_frames: int = 1
    max_animation_frames: int = 100
    max_audio_seconds: float = 60.0
    max_video_frames: int = 64
    max_video_seconds: float = 120.0
    video_fps: float = 2.0
    max_parts: int = 16
    resolver: Resolver | None = None

    def __post_init__(self):
        if isinstance(self.allowed_domains, str):
            raise ValueError(f"allowed_domains={self.allowed_domains!r}: pass a tuple of domains, not one string")
        domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains)
        if any(not d or "/" in d or ":" in d for d in domains):
            raise ValueError(f"allowed_domains={self.allowed_domains!r}: give bare host names such as 'example.com'")
        object.__setattr__(self, "allowed_domains", domains)
        for name in ("max_download_bytes", "download_timeout_s", "max_pixels", "max_request_pixels",
                     "max_animation_frames",
                     "max_audio_seconds", "max_video_frames", "max_video_seconds", "video_fps", "max_parts"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MediaPolicy.{name}={getattr(self, name)!r} must be positive")
        if self.max_redirects < 0:
            raise ValueError(f"MediaPolicy.max_redirects={self.max_redirects!r} must be 0 or more")
        if self.max_image_frames != 1:
            raise ValueError("MediaPolicy.max_image_frames: only the first frame of an animated image is used; keep 1")


# ------------------------------------------------------------------------------------------------ messages


def resolve_messages(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """OpenAI-style chat messages -> canonical messages (see serve_arch: text, image, audio, video parts).

    Blocking (downloads and decodes): call it from a worker thread. Raises `MediaError` for anything it cannot
    use, with the message and part index in the message (`messages[1].content[2] (image_url): ...`)."""
    if not isinstance(messages, list):
        raise MediaError(400, f"messages: expected a list of messages, got {type(messages).__name__}")
    _count_media_parts(messages, policy)
    out = []
    pixels = [0]  # the request's decoded image pixels so far
    for i, message in enumerate(messages):
        role = _ROLES[message["role"]]
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}] ({part['type']})"
            try:
                parts.append(_resolve_part(part, policy, pixels))
            except MediaError as e:
                raise MediaError(e.status, f"{where}: {e.message}") from None
        out.append({"role": role, "content": parts})
    return out


def modalities(messages: list[dict]) -> set[str]:
    """The kinds of content present in canonical messages: a subset of {"text", "image", "audio", "video"}."""
    found = set()
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            if content:
                found.add("text")
            continue
        found.update(part["type"] for part in content or ())
    return found


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_PART_TYPES = ("text", "image_url", "input_audio", "video_url")


def _count_media_parts(messages: list, policy: MediaPolicy) -> None:
    """Check the structure of every message and the media part count before anything is fetched."""
    media = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MediaError(400, f"messages[{i}]: expected an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise MediaError(400, f"messages[{i}].role={role!r}: expected one of {', '.join(_ROLES)}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise MediaError(400, f"messages[{i}].content: expected a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in _PART_TYPES:
                raise MediaError(
                    400, f"messages[{i}].content[{j}]: expected a part with type one of {', '.join(_PART_TYPES)}"
                )
            media += kind != "text"
    if media > policy.max_parts:
        raise MediaError(413, f"messages: {media} media parts, over the limit of {policy.max_parts}")


def _resolve_part(part: dict, policy: MediaPolicy, pixels: list[int]) -> dict:
    """One part, decoded; `pixels` holds the request's image pixels so far, and grows by this image's."""
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise MediaError(400, "'text' must be a string")
        return {"type": "text", "text": text}
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str) or not isinstance(
            spec.get("format"), str
        ):
            raise MediaError(400, "expected {'input_audio': {'data': <base64>, 'format': 'wav' | 'mp3' | ...}}")
        audio, rate = load_audio(spec["data"], spec["format"], policy)
        return {"type": "audio", "audio": audio, "sampling_rate": rate}
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise MediaError(400, f"expected {{'{kind}': {{'url': <data:, http(s) or file URL>}}}}")
    if kind == "image_url":
        left = policy.max_request_pixels - pixels[0]
        if left >= policy.max_pixels:
            image = load_image(url, policy)
        else:  # the earlier images took most of the request's budget: this header is checked against the rest
            try:
                image = load_image(url, replace(policy, max_pixels=max(left, 1)))
            except MediaError as e:
                if e.status != 413 or "pixels" not in e.message:
                    raise
                raise MediaError(413, f"{e.message}. The request's images may hold {policy.max_request_pixels:,} "
                                      f"pixels in all (max_request_pixels), and the earlier ones hold "
                                      f"{pixels[0]:,}: send fewer or smaller images") from None
        pixels[0] += image.width * image.height
        return {"type": "image", "image": image}
    frames, fps = load_video(url, policy)
    return {"type": "video", "frames": frames, "fps": fps}


# -------------------------------------------------------------------------------------------------- loaders


def load_image(url: str, policy: MediaPolicy) -> Image.Image:
    """An RGB image (first frame of an animation, EXIF orientation applied) from a data:, http(s) or local URL."""
    data = fetch_bytes(url, policy)
    try:
        return open_image(data, max_pixels=policy.max_pixels, max_frames=policy.max_animation_frames)
    except ImageTooLarge as e:
        raise MediaError(413, f"image {e}") from None
    except ImageError as e:
        raise MediaError(415, f"image {e}") from None
    except Exception as e:  # PIL's plugins raise many types on hostile input; all mean "cannot decode"
        raise MediaError(415, f"cannot decode the image ({type(e).__name__}: {e})") from None


def load_audio(b64: str, fmt: str, policy: MediaPolicy) -> tuple[np.ndarray, int]:
    """Base64 audio -> (mono float32 samples in [-1, 1], 16000). The sampling rate is always `AUDIO_RATE`
    (16 kHz): clips are resampled. Decoding stops, and the clip is refused, once it passes max_audio_seconds."""
    if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
        raise MediaError(415, f"audio format {fmt!r} is not supported; use one of {', '.join(AUDIO_FORMATS)}")
    fmt = fmt.lower()
    data = _b64decode(b64, policy.max_download_bytes, "audio data")
    try:
        if fmt == "wav":
            samples, rate = _read_wav(data, policy.max_audio_seconds)
            audio = _resample(samples, rate)
        else:
            audio = _decode_audio(data, AUDIO_FORMATS[fmt], policy.max_audio_seconds)
    except MediaError:
        raise
    except Exception as e:  # wave / FFmpeg errors on hostile input, whatever their type
        raise MediaError(415, f"cannot decode the {fmt} audio ({type(e).__name__}: {e})") from None
    if audio.size == 0:
        raise MediaError(415, f"the {fmt} audio holds no samples")
    if audio.size > policy.max_audio_seconds * AUDIO_RATE + AUDIO_RATE // 100:  # resampler rounding: 10 ms
        raise MediaError(413, f"the audio is longer than max_audio_seconds={policy.max_audio_seconds:g}")
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False), AUDIO_RATE


def load_video(url: str, policy: MediaPolicy) -> tuple[list[Image.Image], float]:
    """(RGB frames sampled at `fps`, fps) from a data:, http(s) or local URL. fps is policy.video_fps, or lower
    so that a video whose container states its duration fits in max_video_frames."""
    data = fetch_bytes(url, policy)
    demuxer = _sniff_video(data)
    try:
        return _decode_video(data, demuxer, policy)
    except MediaError:
        raise
    except Exception as e:  # FFmpeg errors on hostile input, whatever their type
        raise MediaError(415, f"cannot decode the video ({type(e).__name__}: {e})") from None


def fetch_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes behind a data:, http(s) or file URL or a local path, under the policy's limits."""
    if not isinstance(url, str) or not url:
        raise MediaError(400, "the URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy.max_download_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError(400, "remote media URLs are not fetched by this server: send the media inline as a "
                                  "data: URL, or start the server with --allow-remote-media --allowed-domain DOMAIN")
        return _download(url, policy)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(400, f"file URL with host {parts.netloc!r}: only local files are served")
        return _read_local(unquote(parts.path), policy)
    if scheme == "" or url.startswith(("/", "./", "../")):
        return _read_local(url, policy)
    raise MediaError(400, f"URL scheme {scheme[:20]!r} is not supported; use data:, https: or http:")


# ---------------------------------------------------------------------------------------- data: and base64


def _data_url(url: str, max_bytes: int) -> bytes:
    """data:[<mediatype>][;base64],<payload> (RFC 2397), its size checked on the encoded length first."""
    try:
        return decode_data_url(url, max_bytes)
    except PayloadTooLarge as e:
        raise MediaError(413, str(e)) from None
    except ValueError as e:
        raise MediaError(400, str(e)) from None


def _b64decode(text: str, max_bytes: int, what: str) -> bytes:
    try:
        return decode_base64(text, max_bytes, what)
    except PayloadTooLarge as e:
        raise MediaError(413, str(e)) from None
    except ValueError as e:
        raise MediaError(400, str(e)) from None


# -------------------------------------------------------------------------------------------- local files


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    """A regular file inside policy.local_root; symlinks resolved first, so no link or `..` leads outside."""
    if policy.local_root is None:
        raise MediaError(400, "local files and file:// URLs are not served by this server: send the media inline "
                              "as a data: URL, or start the server with --media-root DIR to serve files from DIR")
    try:
        root = Path(policy.local_root).resolve(strict=True)
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
        raise MediaError(400, "no such file under the local root") from None
    if not resolved.is_relative_to(root):
        raise MediaError(400, "the path leads outside the local root; only files inside it are served")
    try:
        # O_NOFOLLOW: the resolved path has no symlink left; one swapped in since is refused, not followed
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise MediaError(400, f"cannot open the file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(400, "not a regular file")
        if info.st_size > policy.max_download_bytes:
            raise MediaError(413, f"the file has {info.st_size:,} bytes, over the limit of "
                                  f"{policy.max_download_bytes:,}")
        data = f.read(policy.max_download_bytes + 1)
    if len(data) > policy.max_download_bytes:
        raise MediaError(413, f"the file is over the limit of {policy.max_download_bytes:,} bytes")
    return data


# ------------------------------------------------------------------------------------------------- remote


def _download(url: str, policy: MediaPolicy) -> bytes:
    """GET `url`, following up to max_redirects redirects, each hop checked (scheme, domain, addresses) and
    connected to the checked address; the body is counted as it streams in, all under one deadline."""
    deadline = time.monotonic() + policy.download_timeout_s
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, target = _check_url(url, policy)
        address = _checked_address(host, port, policy)
        status, location, body = _get(scheme, host, port, address, target, deadline, policy)
        if status not in _REDIRECTS:
            if not 200 <= status < 300:
                raise MediaError(400, f"the server answered HTTP {status} for {_short(url)}")
            return body
        if not location:
            raise MediaError(400, f"HTTP {status} redirect without a Location from {_short(url)}")
        url = urljoin(url, location)
    raise MediaError(400, f"more than max_redirects={policy.max_redirects} redirects")


def _check_url(url: str, policy: MediaPolicy) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise MediaError(400, f"malformed URL {_short(url)} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(400, f"URL scheme {scheme[:20]!r} is not allowed for remote media; use http or https")
    if not host:
        raise MediaError(400, f"URL {_short(url)} has no host")
    if parts.username is not None or parts.password is not None:
        raise MediaError(400, "URLs with credentials (user@host) are not fetched")
    host = host.rstrip(".")
    if not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise MediaError(400, f"host {host[:100]!r} is not in the server's allowed domains (--allowed-domain)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _checked_address(host: str, port: int, policy: MediaPolicy) -> str:
    """One address of `host` that may be connected to; every address it resolves to must pass the check, so a
    name that mixes a public and a private address is refused whichever one a second lookup would return."""
    try:
        ipaddress.ip_address(host)
        addresses: Sequence[str] = [host]
    except ValueError:
        resolve = policy.resolver or _system_resolve
        try:
            addresses = list(resolve(host, port))
        except (OSError, UnicodeError, ValueError) as e:
            raise MediaError(400, f"cannot resolve host {host[:100]!r} ({e})") from None
    if not addresses:
        raise MediaError(400, f"host {host[:100]!r} has no address")
    for address in addresses:
        reason = _refusal(address, policy.allow_private_networks)
        if reason:
            raise MediaError(400, f"host {host[:100]!r} resolves to {address}, {reason}; refusing to connect")
    return addresses[0]


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _refusal(address: str, allow_private: bool) -> str | None:
    """Why `address` may not be connected to, or None. IPv4 embedded in IPv6 (mapped, 6to4) is judged as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if ip.version == 6 and (ip.ipv4_mapped or ip.sixtofour):
        ip = ip.ipv4_mapped or ip.sixtofour
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local:  # also cloud metadata (169.254.169.254): refused even on private networks
        return "a link-local address"
    if ip.is_loopback:
        return None if allow_private else "a loopback address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return None if allow_private else "a private address"
    return None


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed address: `host` still names the server in `Host`, SNI and the TLS
    certificate check, but no lookup happens here, so the address checked before is the one reached."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.tls = tls
        self.default_port = 443 if tls else 80  # `Host` leaves the port out when it is the scheme's default
        self.raw_sock: socket.socket | None = None

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.raw_sock = sock
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def _get(scheme: str, host: str, port: int, address: str, target: str, deadline: float,
         policy: MediaPolicy) -> tuple[int, str | None, bytes]:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _too_slow(policy)
    conn = _PinnedConnection(host, port, address, remaining, tls=scheme == "https")
    watchdog = None
    try:
        conn.connect()
        # A server that drips its headers or body a byte at a time never trips a per-read timeout; the
        # watchdog shuts the socket at the deadline, which ends any read in progress.
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shutdown, (conn.raw_sock,))
        watchdog.daemon = True
        watchdog.start()
        conn.request("GET", target, headers={"User-Agent": "polymodal", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if response.status in _REDIRECTS or not 200 <= response.status < 300:
            return response.status, response.getheader("Location"), b""
        return response.status, None, _read_body(response, deadline, policy)
    except MediaError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if time.monotonic() >= deadline:
            raise _too_slow(policy) from None
        raise MediaError(400, f"cannot fetch from {host[:100]!r} ({type(e).__name__}: {e})") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _read_body(response: http.client.HTTPResponse, deadline: float, policy: MediaPolicy) -> bytes:
    limit = policy.max_download_bytes
    claimed = response.getheader("Content-Length")
    if claimed and claimed.strip().isdigit() and int(claimed) > limit:  # a hint only: the count below decides
        raise MediaError(413, f"the server announces {int(claimed):,} bytes, over the limit of {limit:,}")
    chunks, total = [], 0
    while True:
        if time.monotonic() >= deadline:
            raise _too_slow(policy)
        chunk = response.read1(64 * 1024)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise MediaError(413, f"the download passed the limit of {limit:,} bytes; stopped reading")
        chunks.append(chunk)
    if time.monotonic() >= deadline:  # the watchdog closed the socket: the end of data was not the body's end
        raise _too_slow(policy)
    chunked = "chunked" in (response.getheader("Transfer-Encoding") or "").lower()
    if claimed and claimed.strip().isdigit() and not chunked and total < int(claimed):
        raise MediaError(400, f"the connection closed after {total:,} of {int(claimed):,} bytes")
    return b"".join(chunks)


def _shutdown(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _too_slow(policy: MediaPolicy) -> MediaError:
    return MediaError(413, f"the download took longer than download_timeout_s={policy.download_timeout_s:g}")


def _short(url: str) -> str:
    return repr(url if len(url) <= 100 else url[:100] + "...")


# -------------------------------------------------------------------------------------------------- audio


def _read_wav(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """PCM WAV with the stdlib `wave` -> (mono float32, rate), read one second at a time up to the cap."""
    with wave.open(io.BytesIO(data)) as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        if not (1 <= channels <= 64 and width in (1, 2, 3, 4) and 1_000 <= rate <= 768_000):
            raise MediaError(415, f"unsupported WAV layout ({channels} channels, {8 * width}-bit, {rate} Hz)")
        cap = math.ceil(max_seconds * rate)
        pieces, frames = [], 0
        while True:
            raw = w.readframes(rate)
            raw = raw[: len(raw) - len(raw) % (channels * width)]  # a truncated last frame is dropped
            if not raw:
                break
            frames += len(raw) // (channels * width)
            if frames > cap:
                raise MediaError(413, f"the audio is longer than max_audio_seconds={max_seconds:g}; stopped reading")
            pieces.append(_pcm_to_float(raw, width).reshape(-1, channels).mean(axis=1))
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)).astype(np.float32), rate


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Little-endian PCM -> float in [-1, 1]; 8-bit WAV is unsigned, wider samples are signed."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # 24-bit: place the 3 bytes in the top of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        return ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) / 2.0**31).astype(np.float32)
    dtype = np.int16 if width == 2 else np.int32
    return (np.frombuffer(raw, f"<{np.dtype(dtype).char}").astype(np.float32) / float(2 ** (8 * width - 1)))


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at `rate` -> AUDIO_RATE with FFmpeg's resampler (libswresample, band-limited)."""
    import av

    if rate == AUDIO_RATE or samples.size == 0:
        return samples
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in out]) if out else np.zeros(0, np.float32)


def _decode_audio(data: bytes, demuxer: str, max_seconds: float) -> np.ndarray:
    """Compressed audio with PyAV -> mono float32 at AUDIO_RATE; decoding stops as soon as the cap is passed."""
    import av

    cap = math.ceil(max_seconds * AUDIO_RATE)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    pieces, total = [], 0
    with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
        if not container.streams.audio:
            raise MediaError(415, f"the {demuxer} data holds no audio stream")
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                piece = out.to_ndarray().reshape(-1)
                total += piece.size
                if total > cap:
                    raise MediaError(413, f"the audio is longer than max_audio_seconds={max_seconds:g}; "
                                          "stopped decoding")
                pieces.append(piece)
        pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


# -------------------------------------------------------------------------------------------------- video


def _sniff_video(data: bytes) -> str:
    """The demuxer for `data`, from its magic bytes. We never let FFmpeg probe: some of its demuxers (HLS,
    concat) open further URLs or files named inside the data."""
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[:4] == b"OggS":
        return "ogg"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:
        return "mpegts"
    raise MediaError(415, "not a video container we read (MP4/MOV, WebM/Matroska, AVI, Ogg, MPEG-TS)")


def _decode_video(data: bytes, demuxer: str, policy: MediaPolicy) -> tuple[list[Image.Image], float]:
    import av

    with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
        if not container.streams.video:
            raise MediaError(415, "the file holds no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        _check_video_pixels(w, h, policy, "the container claims")
        claimed = _claimed_seconds(container, stream)
        if claimed is not None and claimed > policy.max_video_seconds:
            raise MediaError(413, f"the container claims {claimed:.1f} s, over max_video_seconds="
                                  f"{policy.max_video_seconds:g}")
        fps = policy.video_fps
        if claimed and claimed * fps > policy.max_video_frames:
            fps = (policy.max_video_frames - 0.5) / claimed  # ceil(claimed * fps) = max_video_frames samples
        frames: list[Image.Image] = []
        start, next_t, decoded = None, 0.0, 0
        rate = float(stream.average_rate or 25)
        for frame in container.decode(stream):
            decoded += 1
            if decoded > policy.max_video_seconds * _MAX_DECODED_FPS:
                raise MediaError(413, "the video holds too many frames for max_video_seconds; stopped decoding")
            _check_video_pixels(frame.width, frame.height, policy, "a frame has")
            t = frame.time if frame.time is not None else (decoded - 1) / rate
            start = t if start is None else start
            t -= start
            if t > policy.max_video_seconds:
                raise MediaError(413, f"the video is longer than max_video_seconds={policy.max_video_seconds:g}; "
                                      "stopped decoding")
            if t + 1e-6 < next_t:
                continue
            if len(frames) >= policy.max_video_frames:
                raise MediaError(413, f"the video needs more than max_video_frames={policy.max_video_frames} "
                                      f"frames at {fps:g} fps; stopped decoding")
            frames.append(frame.to_image().convert("RGB"))
            next_t = (math.floor(t * fps + 1e-6) + 1) / fps
    if not frames:
        raise MediaError(415, "the video holds no decodable frames")
    return frames, fps


def _check_video_pixels(w: int, h: int, policy: MediaPolicy, what: str) -> None:
    if w and h and w * h > policy.max_pixels:
        raise MediaError(413, f"{what} {w}x{h} = {w * h:,} pixels per frame, over max_pixels={policy.max_pixels:,}")


def _claimed_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None
