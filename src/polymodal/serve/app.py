"""The OpenAI-compatible HTTP server: FastAPI routes over the served models.

    app = create_app(load_served(["tiny=./ckpt"]), api_key="secret")
    serve(served, host="127.0.0.1", port=8000)                      # runs uvicorn

Routes follow OpenAI's API reference (https://platform.openai.com/docs/api-reference) closely enough that the
official `openai` Python client works unchanged (checked in tests/test_serve.py): GET /v1/models,
POST /v1/chat/completions (with server-sent-event streaming), POST /v1/embeddings, POST /v1/images/generations,
plus GET /health. Every refusal is a 4xx with OpenAI's error body (polymodal/serve/errors.py).

What runs where: the event loop only parses, routes and streams. Media decoding (media.resolve_messages), chat
templates, a VLM's processor, embeddings and provider calls run in worker threads; local decoders run in their
ChatEngine's own thread, which batches concurrent requests (continuous batching); a VLM's images are extra inputs
of its request's prefill there. A text-to-image model runs its requests one at a time in its ImageWorker's thread
(polymodal/serve/images.py), from a bounded queue.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymodal.serve.engine import MIN_TEMPERATURE
from polymodal.serve.errors import APIError, error_body
from polymodal.serve.registry import ServedModel, ServedModels
from polymodal.serve.schemas import (
    PART_MODALITY,
    ChatCompletionRequest,
    EmbeddingRequest,
    GroundingRequest,
    ImageGenerationRequest,
)

log = logging.getLogger("polymodal.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_TOKENS = 512  # when a request sets none (and the model's context leaves room for it)
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
# The most UTF-8 bytes of message text a local model reads per token of its context, checked before tokenizing:
# English averages ~4 bytes a token, code and CJK text less; 32 leaves room for long tokens (runs of spaces or
# '=') while a request far over the context is refused at once instead of tokenized whole (10 MB of text took
# SmolLM2's tokenizer 3-8 s and 1.1-1.7 GB on 2 CPU cores, only to be refused for its length).
MAX_BYTES_PER_TOKEN = 32
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


# ------------------------------------------------------------------------------------------------ the app
def create_app(served: ServedModels, *, api_key: str | None = None, cors_origins=(), media_policy=None,
               max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               realtime=None) -> FastAPI:
    """The FastAPI app serving `served`.

    api_key: when set, every route but /health and the web UI's page and files needs `Authorization: Bearer
    <api_key>` (/openapi.json included; the /docs and /redoc pages are off, as a browser cannot send the key).
    cors_origins: origins allowed to call from a browser (no CORS headers at all when empty). media_policy: a
    polymodal.serve.media.MediaPolicy (default: local data URLs only, no remote fetches). max_body_bytes: larger
    request bodies get 413 unread. default_max_tokens: the answer length of a request that sets none. realtime:
    () -> a polymodal.speech.dialogue.Cascade for each connection to WS /v1/realtime (serve/realtime.py; None: that
    route answers that it is not enabled)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.start()  # idempotent; whoever built `served` closes it (serve() does at exit)
        yield

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="polymodal", summary="OpenAI-compatible server for polymodal models", lifespan=lifespan,
                  **docs)
    app.state.served = served
    app.state.media_policy = media_policy
    app.state.default_max_tokens = default_max_tokens
    _add_error_handlers(app)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors_origins:  # added last: the outermost layer, so refusals (401, 413) carry CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": served.ids()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.card(default_max_tokens) for m in served.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        return served.get(model_id).card(default_max_tokens)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        return await _chat(app, request, req)

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request):
        req = await _parse(request, EmbeddingRequest)
        return await _embeddings(app, req)

    @app.post("/v1/images/generations", openapi_extra=_body_schema(ImageGenerationRequest))
    async def image_generations(request: Request):
        from polymodal.serve import images
        from polymodal.serve.engine import QueueFull

        req = await _parse(request, ImageGenerationRequest)
        m = images.image_model(served, req.model)
        try:
            return await images.generate(m, req, request)
        except QueueFull as e:
            raise _busy(m, e.retry_after) from None

    @app.post("/v1/audio/transcriptions")
    async def audio_transcriptions(request: Request):
        """OpenAI's speech-to-text route: a multipart form (file, model, ...) -> {"text"} (serve/speech.py)."""
        from polymodal.serve import speech

        answer = await speech.transcription(served, await request.body(), request.headers.get("content-type", ""))
        return Response(answer, media_type="text/plain") if isinstance(answer, str) else answer

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        """OpenAI's text-to-speech route: {model, input, voice, response_format, speed} -> the audio (serve/tts.py)."""
        from polymodal.serve import tts

        audio, media_type = await tts.speech(served, await request.body())
        if isinstance(audio, bytes):
            return Response(audio, media_type=media_type)
        return StreamingResponse(audio, media_type=media_type)  # pcm: sentence by sentence

    @app.post("/v1/grounding", openapi_extra=_body_schema(GroundingRequest))
    async def grounding(request: Request):
        """The boxes and points a served model wrote about an image (width, height), read in the model's frame
        (`processor.box_frame`) and returned in that image's pixels: what the web UI draws."""
        req = await _parse(request, GroundingRequest)
        m = served.get(req.model)
        frame_of = getattr(m.processor, "box_frame", None)
        if frame_of is None:
            raise APIError(400, f"The model {m.id!r} writes no boxes in a known frame (Qwen2-VL and Qwen2.5-VL do).",
                           param="model", code="model_not_supported")
        from polymodal.processing.grounding import parse_regions

        width, height = req.image_size
        regions = parse_regions(req.text, frame_of(width, height))
        return {"object": "list", "data": [r.to_image((width, height)).as_dict() for r in regions]}

    from polymodal.serve.realtime import add_realtime_route

    add_realtime_route(app, realtime, api_key=api_key)
    _add_ui_routes(app)
    return app


def serve(served: ServedModels, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None, **options) -> None:
    """Run the server with uvicorn until interrupted; `options` go to create_app. Closes the engines at exit.

    sock: a socket from `bind_socket(host, port)` (the CLI binds before loading models, so a port in use fails in
    a second, not after the loading); without it, serve binds one. Either way it is ours, not uvicorn's: uvicorn
    would log a port in use and exit the process with status 3."""
    import uvicorn

    sock = sock or bind_socket(host, port)
    app = create_app(served, **options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        served.close()
    if not server.started:
        raise RuntimeError("the server did not start; its log above says why")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port for `serve` (it listens once the server starts). A port in use, an address
    that is not this machine's or a port it may not use raise OSError with one line naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0..65535
        sock.close()
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            reason = "the address is already in use (another server listens there); choose another port"
        else:
            reason = getattr(e, "strerror", None) or str(e)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(f"cannot listen on {where}: {reason}") from None
    return sock


# ------------------------------------------------------------------------------------------------ web UI
UI_DIR = Path(__file__).parent / "ui"
_UI_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_UI_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _ui_csp(nonce: str) -> str:
    """The page's Content-Security-Policy: only our own script file and styles, fetches to this server only.

    The nonce (new for every page load) is the one way an artifact's scripts can run: an about:srcdoc iframe
    inherits its parent's policy (CSP 3), so app.js gives the nonce to the artifact's <script> tags. Artifacts
    stay in a sandbox without allow-same-origin, under their own policy that forbids all network. frame-src
    'none': srcdoc frames need no source, and it stops an artifact from navigating its frame anywhere."""
    return (f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; media-src 'self' data: blob:; connect-src 'self'; frame-src 'none'; "
            "child-src 'none'; worker-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def _add_ui_routes(app: FastAPI) -> None:
    """GET / -> the web UI's page (ui/index.html, with a fresh CSP nonce); GET /ui/NAME -> its script and style.
    Neither needs the API key: the page asks for it when /v1/* answers 401."""

    @app.get("/", include_in_schema=False)
    async def index():
        nonce = secrets.token_urlsafe(18)
        page = (UI_DIR / "index.html").read_text(encoding="utf-8").replace("__CSP_NONCE__", nonce)
        return HTMLResponse(page, headers={**_UI_HEADERS, "Content-Security-Policy": _ui_csp(nonce),
                                           "Cache-Control": "no-store"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        if name not in _UI_FILES:  # a fixed list: no path from the URL ever reaches the file system
            raise APIError(404, f"The web UI has no file {name!r}.", code="not_found")
        return Response((UI_DIR / name).read_bytes(), media_type=_UI_FILES[name],
                        headers={**_UI_HEADERS, "Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------------------------ chat
async def _chat(app: FastAPI, request: Request, req: ChatCompletionRequest):
    m = app.state.served.get(req.model)
    if m.kind != "chat":
        route = {"embedding": "/v1/embeddings", "image": "/v1/images/generations",
                 "speech": "/v1/audio/transcriptions", "tts": "/v1/audio/speech"}.get(m.kind)
        raise APIError(400, f"The model {m.id!r} does not chat: it is a {m.kind} model"
                       + (f" (use {route})." if route else "."), param="model")
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n} is not supported: this server returns exactly one choice (n=1).", param="n")
    if req.tools:
        raise APIError(400, "tools are not supported by this server.", param="tools")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes at most 4 non-empty strings.", param="stop")
    _check_modalities(m, req)
    _check_image_room(m, req)
    sampling = _sampling(m, req, stop)
    messages = await _canonical_messages(app, req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if m.engine is not None:
        events = await _engine_events(app, m, messages, max_tokens, sampling)
    else:
        events = await _provider_events(m, messages, max_tokens or app.state.default_max_tokens, sampling)
    if req.stream:
        return _SSEResponse(_sse(m.id, events, include_usage), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _completion(m.id, events)


def _sampling(m: ServedModel, req: ChatCompletionRequest, stop: list[str]) -> dict:
    """The request's sampling settings for the model. A field the request sets keeps OpenAI's meaning (temperature
    0 is greedy); one it omits takes the model's generation defaults (`ServedModel.defaults`: a local model's
    generation config, e.g. greedy with a repetition penalty for the embedded SmolLM2), else OpenAI's default.
    Temperatures below MIN_TEMPERATURE decode greedily: they are greedy in all but exact ties, and dividing logits
    by them overflows."""
    d = m.defaults
    temperature = _first(req.temperature, d.get("temperature"), 1.0)  # 1: OpenAI's default, for closed models
    greedy = temperature < MIN_TEMPERATURE
    sampling = dict(do_sample=not greedy, temperature=1.0 if greedy else temperature,
                    top_p=_first(req.top_p, d.get("top_p"), 1.0), seed=req.seed, stop=stop or None)
    for name in ("top_k", "repetition_penalty"):  # our extensions: local models only
        given = getattr(req, name)
        if m.engine is None:
            if given is not None:
                raise APIError(400, f"{name} is not supported by the closed model {m.id!r}; it takes temperature, "
                               "top_p, seed and stop.", param=name)
            continue
        value = _first(given, d.get(name))
        if value is not None:
            sampling[name] = value
    return sampling


def _first(*values):
    return next((v for v in values if v is not None), None)


def _check_modalities(m: ServedModel, req: ChatCompletionRequest) -> None:
    """A part the model cannot take is refused before anything is decoded: 400 naming the modality and model."""
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, str):
            continue
        for j, part in enumerate(msg.content):
            modality = PART_MODALITY[part.type]
            if modality not in m.modalities:
                raise APIError(400, f"The model {m.id!r} does not accept {modality} input (it takes: "
                               f"{', '.join(sorted(m.modalities))}).", param=f"messages[{i}].content[{j}]",
                               code="unsupported_modality")


def _check_image_room(m: ServedModel, req: ChatCompletionRequest) -> None:
    """Refuse, before any image is fetched or decoded, a request whose images alone would fill a local VLM's
    context: each becomes `processor.image_tokens` prompt tokens (576 for LLaVA-1.5). The processor and the engine
    then check the exact prompt."""
    per_image = getattr(m.processor, "image_tokens", None)
    if m.engine is None or not isinstance(per_image, int):
        return
    images = sum(part.type == "image_url" for msg in req.messages if not isinstance(msg.content, str)
                 for part in msg.content)
    context = m.engine.max_len
    if images * per_image >= context:
        raise APIError(400, f"The messages hold {images} images, which take {per_image} tokens each for the model "
                       f"{m.id!r}: {images * per_image:,} tokens, and its context is {context:,}. Send at most "
                       f"{(context - 1) // per_image} images, fewer with a longer conversation.", param="messages",
                       code="context_length_exceeded")


async def _canonical_messages(app: FastAPI, req: ChatCompletionRequest) -> list[dict]:
    """OpenAI messages -> canonical messages (serve_arch.md). Media parts are fetched and decoded by the media
    layer in a worker thread, never on the event loop; text-only requests skip it."""
    raw = [{"role": "system" if msg.role == "developer" else msg.role,
            "content": msg.content if isinstance(msg.content, str) else [p.model_dump(exclude_none=True)
                                                                        for p in msg.content]}
           for msg in req.messages]
    if all(isinstance(msg["content"], str) or all(p["type"] == "text" for p in msg["content"]) for msg in raw):
        return raw
    from polymodal.serve import media

    policy = app.state.media_policy or media.MediaPolicy()
    try:
        return await run_in_threadpool(media.resolve_messages, raw, policy)
    except media.MediaError as e:
        raise APIError(e.status, str(getattr(e, "message", e)), param="messages") from None


def _processor_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages as a chat processor takes them: a video part's sampled frames under "video", with the rate
    the media layer sampled them at."""
    def part(p: dict) -> dict:
        return {"type": "video", "video": p["frames"], "fps": p["fps"]} if p["type"] == "video" else p

    return [msg if isinstance(msg["content"], str) else {**msg, "content": [part(p) for p in msg["content"]]}
            for msg in messages]


def _text_only(messages: list[dict]) -> list[dict]:
    """Canonical messages with text parts joined into one string: what text-only chat templates expect."""
    return [{"role": msg["role"], "content": msg["content"] if isinstance(msg["content"], str)
             else "\n".join(p["text"] for p in msg["content"])} for msg in messages]


def _check_text_size(m: ServedModel, messages: list[dict]) -> None:
    """Refuse, before any tokenizing, messages whose text is far more than the model's context can hold: over
    MAX_BYTES_PER_TOKEN UTF-8 bytes per token of context. What passes costs the tokenizer a bounded amount of time
    and memory; the engine then checks the exact token count."""
    context = m.engine.max_len
    limit = MAX_BYTES_PER_TOKEN * context
    size = 0
    for msg in messages:
        content = msg["content"]
        for text in [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]:
            size += len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise APIError(400, f"The messages hold {size:,} bytes of text, far more than the model {m.id!r} can read: "
                       f"its context is {context:,} tokens, and requests over {limit:,} bytes of text "
                       f"({MAX_BYTES_PER_TOKEN} per token) are refused unread. Shorten the conversation.",
                       param="messages", code="context_length_exceeded")


# Events a chat answer is made of, whatever serves it: ("delta", text) ... then ("finish", reason, usage).
async def _engine_events(app: FastAPI, m: ServedModel, messages: list[dict], max_tokens: int | None,
                         sampling: dict) -> AsyncIterator[tuple]:
    from polymodal.processing.chat import ChatTemplateError
    from polymodal.serve.engine import Delta, QueueFull

    def prompt() -> tuple[list[int], dict]:
        """The prompt's token ids and the prefill's other inputs (a VLM's pixel values)."""
        if m.processor is None:
            text = m.tokenizer.apply_chat_template(_text_only(messages), add_generation_prompt=True)
            return m.tokenizer.encode(text, add_special_tokens=False), {}  # the template placed the special tokens
        inputs = m.processor(_processor_messages(messages))  # one conversation: (1, T) ids, media expanded, pixels
        extras = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return inputs["input_ids"][0].tolist(), extras

    _check_text_size(m, messages)
    given = max_tokens is not None
    try:
        ids, extras = await run_in_threadpool(prompt)
    except ChatTemplateError as e:
        raise APIError(400, f"The model's chat template refused these messages: {e}", param="messages") from None
    except ValueError as e:  # the processor's: images and image tokens that do not match, a prompt over the context
        raise APIError(400, f"The messages cannot be given to the model {m.id!r}: {e}", param="messages",
                       code="context_length_exceeded" if "context" in str(e) else None) from None
    if max_tokens is None:
        room = (getattr(m.engine, "max_len", None) or math.inf) - len(ids)
        max_tokens = int(max(1, min(app.state.default_max_tokens, room)))
    try:
        handle = m.engine.submit(ids, extras=extras, max_new_tokens=max_tokens, **sampling)
    except QueueFull as e:
        raise _busy(m, getattr(e, "retry_after", 1.0)) from None
    except ValueError as e:  # e.g. prompt + max_tokens longer than the model's context
        overflow = "context" in str(e)
        # a prompt that fits leaves the blame with the max_tokens the request asked for
        param = "max_tokens" if overflow and given and len(ids) < m.engine.max_len else "messages"
        raise APIError(400, f"{e}", param=param, code="context_length_exceeded" if overflow else None) from None

    async def events():
        finished = False
        try:
            async for ev in handle.aevents():
                if isinstance(ev, Delta):
                    if ev.text:
                        yield ("delta", ev.text)
                    continue
                finished = True
                if ev.reason == "error":
                    log.error("generation failed for model %s: %s", m.id, ev.error)
                    raise APIError(500, "The model failed while generating; see the server log.")
                usage = _usage(ev.prompt_tokens, ev.completion_tokens)
                yield ("finish", "length" if ev.reason == "length" else "stop", usage)
        finally:
            if not finished:  # the client left (or the stream was closed): free the engine's slot now
                handle.cancel()

    return events()


async def _provider_events(m: ServedModel, messages: list[dict], max_tokens: int,
                           sampling: dict) -> AsyncIterator[tuple]:
    """A provider's `stream` runs in a thread (it blocks on the network); pieces cross to the event loop through
    a queue. At most `provider_slots` calls at once: the next is answered 429."""
    if not m.provider_slots.acquire(blocking=False):
        raise _busy(m, 1.0)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    left = threading.Event()
    done = object()

    def work():
        try:
            stream = m.provider.stream(messages, max_new_tokens=max_tokens, **sampling)
            result = None
            while True:
                try:
                    piece = next(stream)
                except StopIteration as end:  # polymodal's providers return their ChatResult at the end
                    result = end.value
                    break
                if left.is_set():  # the client left: stop the provider's stream
                    getattr(stream, "close", lambda: None)()
                    break
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
            loop.call_soon_threadsafe(pieces.put_nowait, (done, result))
        except BaseException as e:  # handed to the event loop, which answers it
            loop.call_soon_threadsafe(pieces.put_nowait, e)
        finally:
            m.provider_slots.release()

    threading.Thread(target=work, daemon=True, name=f"provider-{m.id}").start()
    first = await pieces.get()  # errors before the first piece (missing key, bad input) get a real status
    if isinstance(first, BaseException):
        raise _provider_error(m, first)

    async def events():
        item = first
        try:
            while not (isinstance(item, tuple) and item[0] is done):
                if isinstance(item, BaseException):
                    raise _provider_error(m, item)
                if item:
                    yield ("delta", item)
                item = await pieces.get()
            result = item[1]  # the provider's ChatResult (None from a plain generator): finish reason, usage
            reason = getattr(result, "finish_reason", None) or "stop"
            prompt, completion = getattr(result, "prompt_tokens", None), getattr(result, "completion_tokens", None)
            yield ("finish", reason if reason in ("stop", "length", "content_filter") else "stop",
                   _usage(prompt, completion))
        finally:
            left.set()

    return events()


def _provider_error(m: ServedModel, e: BaseException) -> APIError:
    status = getattr(e, "status", None)
    message = str(getattr(e, "message", e))
    if isinstance(status, int) and status in (400, 404, 413, 415, 422):
        return APIError(status, f"{m.id}: {message}")
    if status == 429:
        return _busy(m, 1.0)
    log.error("provider %s failed: %r", m.id, e)
    return APIError(502, f"The upstream provider for {m.id!r} failed: {message}", type="server_error")


def _busy(m: ServedModel, retry_after: float) -> APIError:
    seconds = max(1, math.ceil(retry_after or 1))
    return APIError(429, f"The model {m.id!r} is busy: too many requests are waiting. Retry in {seconds} s.",
                    code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


def _usage(prompt: int | None, completion: int | None) -> dict | None:
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _completion(model_id: str, events: AsyncIterator[tuple]) -> dict:
    pieces, reason, usage = [], "stop", None
    async for ev in events:
        if ev[0] == "delta":
            pieces.append(ev[1])
        else:
            reason, usage = ev[1], ev[2]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": reason, "logprobs": None}],
            "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


async def _sse(model_id: str, events: AsyncIterator[tuple], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a first chunk with the role, one per text piece, one with finish_reason, the usage
    chunk when asked for (`stream_options.include_usage`), then `data: [DONE]`."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in events:
            if ev[0] == "delta":
                yield chunk({"content": ev[1]})
                continue
            yield chunk({}, ev[1])
            if include_usage:
                usage = ev[2] or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "system_fingerprint": None, "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
    except APIError as e:  # the status line is already sent: the error goes into the stream, as OpenAI does
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # a client that left: close the stream now, which cancels its engine request
            await self.body_iterator.aclose()


# ------------------------------------------------------------------------------------------------ embeddings
async def _embeddings(app: FastAPI, req: EmbeddingRequest) -> dict:
    m = app.state.served.get(req.model)
    if m.kind != "embedding":
        raise APIError(400, f"The model {m.id!r} is a {m.kind} model: it has no embeddings.", param="model")
    items = [req.input] if isinstance(req.input, str) else list(req.input)
    if not items:
        raise APIError(400, "input must not be empty.", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"input has {len(items)} items; at most {MAX_EMBEDDING_INPUTS} per request.",
                       param="input")
    if any(isinstance(x, str) and not x for x in items):
        raise APIError(400, "input strings must not be empty.", param="input")
    from polymodal.serve import media

    policy = app.state.media_policy if app.state.media_policy is not None else media.MediaPolicy()
    lock = app.state.__dict__.setdefault("embed_lock", threading.Lock())
    try:
        vectors, tokens = await run_in_threadpool(_embed, m, items, policy, lock)
    except media.MediaError as e:
        raise APIError(e.status, str(getattr(e, "message", e)), param="input") from None
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise APIError(400, f"The model {m.id!r} gives {vectors.shape[1]}-dimensional embeddings; dimensions="
                       f"{req.dimensions} is not available.", param="dimensions")
    data = []
    for i, v in enumerate(vectors):
        emb = (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if req.encoding_format == "base64"
               else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": m.id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _embed(m: ServedModel, items: list, policy, lock: threading.Lock):
    """(N, P) float32 numpy embeddings in input order (texts and images L2-normalized, as CLIP compares them) and
    the number of text tokens. Runs in a worker thread: images are fetched and decoded here."""
    import numpy as np

    from polymodal.serve import media

    pipe = m.embedder
    texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
    images = [(i, media.load_image(x.image_url.url, policy)) for i, x in enumerate(items) if not isinstance(x, str)]
    out: list = [None] * len(items)
    tokens = 0
    with lock:
        if texts:
            for (i, _), v in zip(texts, pipe.embed_texts([t for _, t in texts]).numpy()):
                out[i] = v
            ctx = min(77, pipe.model.config.text.max_position_embeddings)
            tokens = int(pipe.tokenizer([t for _, t in texts], context_length=ctx)[1].sum())
        if images:
            for (i, _), v in zip(images, pipe.embed_images([im for _, im in images]).numpy()):
                out[i] = v
    return np.stack(out), tokens


# ------------------------------------------------------------------------------------------------ parsing, errors
async def _parse(request: Request, schema: type[BaseModel]):
    """The JSON body checked against `schema`; anything else is a 400 naming the field (never FastAPI's 422)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise APIError(400, f"We could not parse the JSON body of your request ({_first_line(e)}). The body must "
                       "be one JSON object.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not a JSON {type(data).__name__}.")
    # in UTF-8 only a \uD800-\uDFFF escape puts a surrogate into parsed JSON (raw surrogate bytes fail to decode)
    if json.detect_encoding(raw) != "utf-8" or _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.") from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(data) -> None:
    """A 400 naming the first string (value or key) that holds a lone UTF-16 surrogate. JSON can spell one
    (`"\\ud83d"`), but it is no Unicode character: no tokenizer, template or UTF-8 response can carry it. A pair
    written in one string (`"\\ud83d\\ude00"`) is one character to the JSON parser and passes; halves in two
    strings are two lone surrogates."""
    stack = [(data, [])]
    while stack:  # iterative: the body may be nested as deep as the JSON parser allows
        value, loc = stack.pop()
        if isinstance(value, dict):
            for key in value:
                _check_string(key, loc, what="a key")
            stack.extend((item, [*loc, key]) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((item, [*loc, i]) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            _check_string(value, loc)


def _check_string(text: str, loc: list, what: str = "text") -> None:
    found = _SURROGATE.search(text)
    if found:
        param = _param(loc)
        raise APIError(400, f"'{param}' holds {what} with a lone UTF-16 surrogate (\\u{ord(found.group()):04x} at "
                       f"character {found.start()}), which is not valid Unicode. Send text as UTF-8, and keep both "
                       "halves of a surrogate pair in the same string.", param=param, code="invalid_value")


def _validation_error(errors) -> APIError:
    err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _param([p for p in err.get("loc", ()) if not _is_type_label(p)])
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized parameter: '{param}'.", param=param, code="unknown_parameter")
    return APIError(400, f"Invalid value for '{param}': {err.get('msg', 'invalid')}.", param=param or None,
                    code="invalid_value")


def _is_type_label(p) -> bool:
    """pydantic puts union members' names into error locations ("str", "list[...]"); people need field names."""
    return isinstance(p, str) and ("[" in p or p in _TYPE_LABELS or p.startswith(("function-", "tagged-union")))


def _param(loc: list) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = _validation_error(e.errors())
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"No route {request.method} {request.url.path} on this server." if e.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}." if e.status_code == 405
                   else str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body("The server had an internal error; see its log.", "server_error"),
                            status_code=500)


def _body_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The request body's JSON schema for /docs (the routes read the body themselves, for OpenAI-shaped errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema(
        ref_template="#/components/schemas/{model}")}}}}


# ------------------------------------------------------------------------------------------------ auth, body size
def _is_public(path: str) -> bool:
    """Paths served without the API key: the health check and the web UI's page and files (the page asks for the
    key when /v1/* answers 401). Everything else, /openapi.json and unknown paths included, needs it."""
    return path in ("/", "/health") or path.startswith("/ui/")


class _Guard:
    """ASGI middleware, before any routing or parsing: the API key (constant-time comparison) on every path but
    the public ones (`_is_public`), then the body size limit (413 before the body is parsed, also for chunked
    bodies)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.key and scope["method"] != "OPTIONS" and not _is_public(path):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                msg = ("Incorrect API key provided." if given else
                       "Missing API key: send it as `Authorization: Bearer <key>`.")
                return await _send_error(scope, receive, send, APIError(401, msg, code="invalid_api_key"),
                                         {"WWW-Authenticate": "Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than this server accepts ({self.limit} bytes).",
                             code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(scope, receive, send, too_large if length.isdigit() else
                                     APIError(400, "Malformed Content-Length header."))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_error(scope, receive, send, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the real stream: http.disconnect for streaming responses

        return await self.app(scope, replay, send)


async def _send_error(scope, receive, send, e: APIError, headers: dict | None = None) -> None:
    await JSONResponse(e.body(), status_code=e.status, headers={**e.headers, **(headers or {})})(scope, receive, send)


def api_key_from_env(given: str | None) -> str | None:
    """--api-key, else $POLYMODAL_API_KEY, else none (an open server)."""
    return given or os.environ.get("POLYMODAL_API_KEY") or None
