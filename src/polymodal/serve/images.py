"""Image generation behind POST /v1/images/generations: a served text-to-image pipeline
(`polymodal.pipelines.text_to_image.TextToImagePipeline`) gets one worker thread and a bounded queue.

    worker = ImageWorker(TextToImagePipeline(pm.load("./sd-folder")), max_queue=32)
    job = worker.submit(prompt="a red bicycle", seed=3, num_inference_steps=20)   # QueueFull when the queue is full
    pngs = job.future.result()                                                    # base64 PNGs, one per image

What runs where: the event loop parses the request, checks it against the pipeline (size, steps) and awaits the job;
the worker thread denoises, then encodes the PNGs. One run at a time per model: a diffusion step already fills the
machine, and batching unequal requests (sizes, step counts) would change each one's images. A client that leaves
cancels its job: a waiting job is dropped, a running one stops after its current step (the pipeline's callback
raises `Cancelled`). With `stream: true` the answer is server-sent events: `image_generation.progress` (our
extension: `step`, `total`) after each step, then OpenAI's `image_generation.completed` per image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from polymodal.serve.engine import QueueFull
from polymodal.serve.errors import APIError

log = logging.getLogger("polymodal.serve")

# The most pixels one request may ask for, all its images together (n x width x height): four SDXL-sized images.
# Checked from the request before anything is queued; a diffusion model's memory grows with the pixels it denoises.
MAX_REQUEST_PIXELS = 4 * 1024 * 1024
MAX_PROMPT_CHARS = 32_000  # OpenAI's limit for gpt-image-1 prompts; CLIP reads the first 77 tokens
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class Cancelled(Exception):
    """The client left: the job stops after the step it is in."""


@dataclass
class ImageJob:
    """One request's run: `future` resolves to its base64 PNGs; `on_step(done, total)` is called from the worker
    after each denoising step."""

    options: dict
    on_step: Callable[[int, int], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()  # only a job still waiting; a running one sees `cancelled` at its next step


class ImageWorker:
    """One thread running a text-to-image pipeline's jobs in order; at most `max_queue` jobs wait (then `submit`
    raises QueueFull, which the route answers 429 with a Retry-After from the last run's duration)."""

    def __init__(self, pipe, *, max_queue: int = 32, name: str = "images"):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.pipe, self.max_queue, self.name = pipe, max_queue, name
        self._waiting: deque[ImageJob] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False
        self._last_seconds = 1.0

    def start(self) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("this image worker is closed; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"polymodal-images-{self.name}", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Cancel every job and stop the thread (the running job stops after its current step)."""
        with self._cond:
            self._closing = True
            for job in self._waiting:
                job.cancel()
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def submit(self, on_step: Callable[[int, int], None] | None = None, **options) -> ImageJob:
        """Queue a run of `pipe(**options)`; QueueFull when `max_queue` jobs wait already."""
        with self._cond:
            if self._closing:
                raise RuntimeError("this image worker is closed")
            if len(self._waiting) >= self.max_queue and (self._busy or self._waiting):
                raise QueueFull(f"{len(self._waiting)} image requests wait already",
                                retry_after=self._last_seconds * (len(self._waiting) + 1))
            job = ImageJob(options, on_step)
            self._waiting.append(job)
            self._cond.notify()
            return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._waiting.popleft()
                self._busy = True
            try:
                if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                    continue
                start = time.monotonic()
                try:
                    job.future.set_result(self._generate(job))
                except BaseException as e:  # Cancelled, or a failure the route reports as a 500
                    job.future.set_exception(e)
                self._last_seconds = max(time.monotonic() - start, 0.1)
            finally:
                with self._cond:
                    self._busy = False

    def _generate(self, job: ImageJob) -> list[str]:
        def step(done: int, total: int) -> None:
            if job.cancelled.is_set() or self._closing:
                raise Cancelled()
            if job.on_step is not None:
                job.on_step(done, total)

        images = self.pipe(**job.options, callback=step)
        out = []
        for image in images:  # PNG: lossless, so the client decodes the pipeline's own pixels
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out


# ------------------------------------------------------------------------------------------------ the route
def image_model(served, model_id: str | None):
    """The served model a request names, or the one text-to-image model when it names none; 400 otherwise."""
    if model_id is not None:
        m = served.get(model_id)
        if m.kind != "image":
            raise APIError(400, f"The model {m.id!r} does not generate images (it is a {m.kind} model); models that "
                           f"do: {_image_ids(served) or 'none'}.", param="model", code="model_not_supported")
        return m
    ids = [m.id for m in served.models.values() if m.kind == "image"]
    if not ids:
        raise APIError(400, "No served model generates images: serve a diffusers pipeline folder (polymodal serve "
                       "--model DIR with model_index.json).", param="model", code="model_not_supported")
    if len(ids) > 1:
        raise APIError(400, f"Several served models generate images ({_image_ids(served)}): name one in 'model'.",
                       param="model", code="missing_required_parameter")
    return served.get(ids[0])


def _image_ids(served) -> str:
    return ", ".join(repr(m.id) for m in served.models.values() if m.kind == "image")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto" / None: the model's default) -> (height, width)."""
    if size is None or size == "auto":
        return None, None
    found = _SIZE.fullmatch(size)
    if not found:
        raise APIError(400, f"Invalid value for 'size': {size!r}; expected WIDTHxHEIGHT in pixels, e.g. '512x512', or "
                       "'auto'.", param="size", code="invalid_value")
    return int(found.group(2)), int(found.group(1))


def request_options(m, req) -> dict:
    """The pipeline's keywords for a request, every one checked against the model before anything is queued."""
    if req.response_format == "url":
        raise APIError(400, "response_format 'url' is not supported: this server keeps no image files to link to; "
                       "ask for 'b64_json' (the images come inline, base64-encoded PNG).", param="response_format",
                       code="invalid_value")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name) or ""
        if len(text) > MAX_PROMPT_CHARS:
            raise APIError(400, f"'{name}' holds {len(text):,} characters; at most {MAX_PROMPT_CHARS:,}.",
                           param=name, code="invalid_value")
    if not req.prompt.strip():
        raise APIError(400, "The prompt must not be empty.", param="prompt", code="invalid_value")
    pipe = m.images.pipe
    height, width = parse_size(req.size)
    try:
        height, width = pipe.resolve_size(height, width)
    except ValueError as e:
        raise APIError(400, f"Invalid value for 'size': {req.size!r}: {e}.", param="size",
                       code="invalid_value") from None
    n = req.n or 1
    if n * height * width > MAX_REQUEST_PIXELS:
        raise APIError(400, f"{n} images of {width}x{height} are {n * height * width:,} pixels; this server makes at "
                       f"most {MAX_REQUEST_PIXELS:,} per request. Ask for fewer or smaller images.", param="size",
                       code="invalid_value")
    from polymodal.pipelines.text_to_image import random_seed

    return dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale, seed=random_seed() if req.seed is None else req.seed,
                height=height, width=width, num_images_per_prompt=n)


async def generate(m, req, request):
    """Answer one checked request: the JSON body, or with `stream` the event stream (see the module docstring).
    QueueFull propagates (the route answers 429)."""
    options = request_options(m, req)
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue = asyncio.Queue()

    def on_step(done: int, total: int) -> None:
        loop.call_soon_threadsafe(progress.put_nowait, (done, total))

    job = m.images.submit(on_step if req.stream else None, **options)
    created = int(time.time())
    if not req.stream:
        pngs = await _wait(m, job, request)
        return {"created": created, "data": [{"b64_json": b64} for b64 in pngs], "seed": options["seed"]}
    return _events(m, job, request, progress, options, created)


async def _wait(m, job: ImageJob, request) -> list[str]:
    """The job's PNGs; a client that leaves while it waits or runs cancels it."""
    result = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.cancel()
                raise APIError(499, "The client closed the request.", code="client_closed_request")
        return result.result()
    except (Cancelled, asyncio.CancelledError):
        job.cancel()
        raise
    except APIError:
        raise
    except ValueError as e:  # what the pipeline refused after the route's checks (a prompt the tokenizer rejects)
        raise APIError(400, f"The model {m.id!r} refused the request: {e}", param="prompt") from None
    except Exception as e:
        log.error("image generation failed for model %s: %r", m.id, e)
        raise APIError(500, "The model failed while generating; see the server log.") from None


def _events(m, job: ImageJob, request, progress: asyncio.Queue, options: dict, created: int):
    """A StreamingResponse of server-sent events; the job is cancelled when the client leaves."""
    from fastapi.responses import StreamingResponse

    size = f"{options['width']}x{options['height']}"

    async def body() -> AsyncIterator[str]:
        result = asyncio.wrap_future(job.future)
        finished = False
        try:
            while not result.done():
                getter = asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait({result, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    step, total = getter.result()
                    yield _sse({"type": "image_generation.progress", "step": step, "total": total})
                else:
                    getter.cancel()
            while not progress.empty():  # steps reported just before the end
                step, total = progress.get_nowait()
                yield _sse({"type": "image_generation.progress", "step": step, "total": total})
            try:
                pngs = result.result()
            except Exception as e:
                log.error("image generation failed for model %s: %r", m.id, e)
                yield _sse(APIError(500, "The model failed while generating; see the server log.").body())
                finished = True
                return
            for b64 in pngs:
                yield _sse({"type": "image_generation.completed", "b64_json": b64, "created_at": created,
                            "size": size, "quality": "auto", "background": "opaque", "output_format": "png",
                            "seed": options["seed"]})
            finished = True
        finally:
            if not finished:
                job.cancel()

    class _Stream(StreamingResponse):
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:  # a client that left: close the body now, which cancels the job
                await self.body_iterator.aclose()

    return _Stream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                    "X-Accel-Buffering": "no"})


def _sse(event: dict) -> str:
    return f"event: {event.get('type', 'error')}\ndata: {json.dumps(event)}\n\n"


__all__ = ["Cancelled", "ImageJob", "ImageWorker", "MAX_REQUEST_PIXELS", "generate", "image_model", "parse_size"]
