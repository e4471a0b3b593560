"""Continuous batching for `polymodal serve`: concurrent chat requests share the decoder's forward passes.

Requests join and leave the running batch between decode steps: iteration-level scheduling, from Orca (Yu et
al., OSDI 2022), as vLLM and Hugging Face's text-generation-inference serve. Without it, a request that arrives
while others decode waits for the whole batch to end, and a short request holds its row until the longest is done.
Its outputs are checked against `polymodal.generation.generate` run on each request alone: the same greedy
tokens, and the same sampled tokens for the same seed (tests/test_serve_engine.py).

The running batch is a left-padded ragged batch in the `DecoderState` that `generate` decodes with, so that the
model's own `generation_prefill` and `generation_step` serve it: one `KVCache` per layer, (B, KV, T_cap, Dh), with
one write head shared by every row (the state's length), an attention mask (B, T_cap) whose zeros mark columns a
row does not use, and per-row position offsets.

    columns:   0  1  2  3  4  5  6  7 | head (next step writes here)
    row a:     a  a  a  a  a  a  a  a |   3 prompt tokens, then 5 generated ones
    row b:     .  .  .  .  b  b  b  b |   joined later, with a prompt of 4: right-aligned to the head
    row c:     .  .  c  c  c  c  c  c |

- A new request is prefilled alone by the model's `generation_prefill` (a cache sized to its prompt), its first
  token chosen, and its state inserted right-aligned to the head (`DecoderState.relayout`, `DecoderState.cat`). A
  prompt longer than the head shifts the batch right first. A request's `extras` (a VLM's `pixel_values`) go to
  that prefill only, as in `generate`: the model merges the images there, and its decode steps are plain token
  steps, so image requests and text-only ones share every step.
- Each step feeds every row its last token at the head: one forward for the whole batch; then each row chooses
  its next token with its own settings (greedy, or sampling with its own seeded generator, so a request's sample
  does not depend on what else runs; a repetition penalty over the row's own prompt and answer so far).
- A finished or cancelled row is dropped (rows kept by index); its columns stay masked until the head reaches
  the capacity, when columns that no row uses are dropped, or the cache grows (doubling, at most `max_len`).

Layout changes copy the cache once per join, leave or relayout, never per step. vLLM's paged KV cache avoids
those copies but needs an attention kernel that reads block tables; this layout needs nothing from the models.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from polymodal.generation import CausalLM, DecoderState, _eos_ids, process_logits

log = logging.getLogger(__name__)

# Sampling divides the float32 logits by the temperature: below this, logits / t overflows to inf for ordinary
# logits (and t itself rounds to 0 in float32 below ~1e-45), so the softmax turns NaN. Sampling that cold is greedy
# decoding in all but exact ties, so callers decode greedily there (the server does; vLLM uses the same threshold).
MIN_TEMPERATURE = 1e-5
# The image pixels one request may bring (values of its `pixel_values*` extras / 3 channels): 16 images of 1024 x
# 1024, or 148 at LLaVA-1.5's 336 x 336, far more than any context holds the features of.
MAX_PIXELS = 16 * 1024 * 1024
# What a decoder's forward takes itself; any other keyword of the model's forward is an extra input for the prefill
_DECODER_INPUTS = {"self", "input_ids", "attention_mask", "inputs_embeds", "cache", "position_ids", "logits_to_keep"}


class QueueFull(RuntimeError):
    """Too many requests wait already; try again after `retry_after` seconds (an estimate)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Delta:
    """One generated token and the text it makes final ("" while text is held back: an unfinished character, or
    what may be the start of a stop string). Every generated token gives one Delta."""

    text: str
    token_id: int


@dataclass
class Finished:
    """The last event of a request. reason: "stop" (an end token or a stop string), "length" (max_new_tokens),
    "cancelled" (cancel() or close()), "error" (the model failed; `error` says how)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class EngineRequest:
    """A submitted request: read its events with `events()` (blocking) or `aevents()` (asyncio), once."""

    def __init__(self, engine: ChatEngine, prompt_ids: list[int], *, max_new_tokens: int, do_sample: bool,
                 temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                 generator: torch.Generator | None, stop: list[str], extras: dict[str, Tensor] | None = None):
        self._engine = engine
        self.prompt_ids = prompt_ids
        self.extras = extras or {}  # the prefill's other inputs (pixel_values); dropped once it has run
        self.prompt_tokens = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.repetition_penalty = repetition_penalty
        self.sequence = list(prompt_ids)  # the prompt and the tokens chosen so far: what the penalty looks at
        self.generator = generator
        self.stop = stop
        self.completion_tokens = 0
        self.finished: Finished | None = None
        self.decoder = engine.tokenizer.stream_decoder()
        self._pending = ""  # decoded text not delivered yet (it may begin a stop string)
        self._cancelled = False
        self._lock = threading.Lock()  # orders events against a consumer switching to asyncio
        self._queue: queue.Queue[Delta | Finished] = queue.Queue()  # at most max_new_tokens + 1 events
        self._bridge: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._started = time.monotonic()

    # ---------------------------------------------------------------------------------------- consumer side

    def events(self) -> Iterator[Delta | Finished]:
        """Deltas as they come, then one Finished. Leaving the loop early cancels the request."""
        done = False
        try:
            while not done:
                event = self._queue.get()
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:
                self.cancel()

    async def aevents(self) -> AsyncIterator[Delta | Finished]:
        """As `events()`, without blocking the event loop: the engine thread hands each event to the loop with
        `call_soon_threadsafe`. Leaving early (a client that disconnected) cancels the request."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        with self._lock:  # events that came before: move them over, in order
            while not self._queue.empty():
                inbox.put_nowait(self._queue.get_nowait())
            self._bridge = (loop, inbox)
        done = False
        try:
            while not done:
                event = await inbox.get()
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:
                self.cancel()

    def text(self) -> tuple[str, Finished]:
        """Wait for the end -> (the whole generated text, the Finished event)."""
        pieces = []
        for event in self.events():
            if isinstance(event, Finished):
                return "".join(pieces), event
            pieces.append(event.text)
        raise AssertionError("unreachable: events() ends with Finished")

    def cancel(self) -> None:
        """Stop generating (from any thread): a waiting request ends now, a running one at the next step."""
        self._cancelled = True
        self._engine._cancel(self)

    # ---------------------------------------------------------------------------------------- engine side

    def _emit(self, event: Delta | Finished) -> None:
        with self._lock:
            if self._bridge is None:
                self._queue.put(event)
                return
            loop, inbox = self._bridge
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                self._cancelled = True

    def _finish(self, reason: str, error: str | None = None) -> bool:
        """End the request once; False if it had ended already."""
        with self._lock:
            if self.finished is not None:
                return False
            self.finished = Finished(reason, self.prompt_tokens, self.completion_tokens, error)
        self._emit(self.finished)
        return True

    def _take_text(self, piece: str, final: bool) -> tuple[str, bool]:
        """Add decoded text -> (the text that may be delivered now, whether a stop string ends the request here).
        The text before a stop string is delivered, the stop string and what follows it are not; a tail that may
        be the start of a stop string waits for the next piece (unless this is the last)."""
        self._pending += piece
        found = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if found:
            text, self._pending = self._pending[: min(found)], ""
            return text, True
        hold = 0 if final else _partial_stop(self._pending, self.stop)
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(text):]
        return text, False


def _partial_stop(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins some stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class _Batch:
    """The running rows: a left-padded ragged batch in one `DecoderState` whose length is the shared KV write head
    (see the module docstring), and the token each row feeds at the next step."""

    headroom = 64  # free columns a new or grown cache gets beyond what it needs now

    def __init__(self, max_len: int):
        self.max_len = max_len  # no row spans more columns: the capacity never needs to pass it
        self.rows: list[EngineRequest] = []
        self.state: DecoderState | None = None  # None while no row runs
        self.tokens: Tensor | None = None  # (B,) the token each row feeds at the next step
        self.relayouts = 0

    @property
    def head(self) -> int:
        return self.state.length if self.state is not None else 0

    @property
    def capacity(self) -> int:
        return self.state.mask.shape[1] if self.state is not None else 0

    def clear(self) -> None:
        self.rows, self.state, self.tokens = [], None, None

    def add(self, request: EngineRequest, row: DecoderState, token: int) -> None:
        """Insert a prefilled request (its state after `generation_prefill`) as the last row, its prompt
        right-aligned to the head."""
        P = row.length
        if self.state is None:
            state, tokens = row.relayout(0, P, self._grown(0, P)), row.offset.new_tensor([token])
        else:
            self._arrange(min_head=P)
            state = DecoderState.cat([self.state, row.relayout(0, self.head, self.capacity)])
            tokens = torch.cat([self.tokens, self.tokens.new_tensor([token])])
        # assigned together at the end: a failure above (out of memory) leaves the batch as it was
        self.state, self.tokens = state, tokens
        self.rows.append(request)

    def keep(self, index: list[int]) -> None:
        """Keep rows `index`, in that order; the others are gone."""
        if not index:
            return self.clear()
        if len(index) == len(self.rows):
            return None
        idx = torch.tensor(index, device=self.tokens.device)
        self.state.reorder(idx)
        self.tokens = self.tokens.index_select(0, idx)
        self.rows = [self.rows[i] for i in index]
        return None

    def step(self, model) -> Tensor:
        """One decode step of every row's last token at the head -> logits (B, V)."""
        self._arrange(min_head=0)
        return model.generation_step(self.tokens, self.state)

    def _grown(self, cap: int, head: int) -> int:
        """The capacity for a head at `head`: doubled (at least head + headroom, at most max_len) when little of
        `cap` would be left; doubling keeps relayouts rare."""
        if cap - head < max(cap // 4, 1) and cap < self.max_len:
            return min(self.max_len, max(2 * cap, head + self.headroom))
        return cap

    def _arrange(self, min_head: int) -> None:
        """Make sure the head is at least `min_head` and has a free column to write: otherwise drop the columns
        left of every row's first token, shift right, and grow the capacity when compacting frees little."""
        head, cap = self.head, self.capacity
        if min_head <= head < cap:
            return
        used = self.state.mask[:, :head].any(dim=0)  # (head,)
        first = int(used.long().argmax()) if bool(used.any()) else head
        new_head = max(head - first, min_head)
        new_cap = self._grown(cap, new_head)
        if new_head >= new_cap:
            raise RuntimeError(f"internal error: the batch needs {new_head + 1} columns, more than max_len "
                               f"{self.max_len}")
        self.state = self.state.relayout(first, new_head, new_cap)
        self.relayouts += 1


class ChatEngine:
    """Serves a polymodal decoder (`polymodal.generation.CausalLM`) to concurrent requests with continuous
    batching. A background thread owns the model; `submit` from any thread.

    max_batch: rows decoded together at most; max_queue: requests waiting for a row at most (then `submit` raises
    QueueFull); max_len: the context (prompt + new tokens) a request may use, by default the model's
    `max_position_embeddings`; max_pixels: the image pixels (`pixel_values` extras) one request may bring.
    Generation ends at the tokenizer's end tokens and the model config's.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 32, max_len: int | None = None,
                 max_pixels: int = MAX_PIXELS):
        if not isinstance(model, CausalLM):
            raise TypeError(f"ChatEngine serves decoder-only language models (polymodal CausalLM); got "
                            f"{type(model).__name__}")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len if max_len is not None else _context_length(model, tokenizer)
        self.eos = set(_eos_ids(model, None)) | set(tokenizer.eos_token_ids)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = getattr(model, "config", None)
        self.vocab_size = getattr(config, "vocab_size", getattr(getattr(config, "text", None), "vocab_size", None))
        self.max_pixels = max_pixels
        self.extra_inputs = extra_inputs(model)
        self.stats = {"prefills": 0, "steps": 0}  # forwards run: prompts prefilled, batched decode steps
        self._batch = _Batch(self.max_len)
        self._waiting: deque[EngineRequest] = deque()
        self._cond = threading.Condition()  # guards _waiting and _closing; wakes the engine thread
        self._closing = False
        self._thread: threading.Thread | None = None
        self._request_seconds = 1.0  # running mean of how long a request holds a row: for retry_after

    @property
    def num_active(self) -> int:
        """Requests decoding now."""
        return len(self._batch.rows)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def start(self) -> None:
        """Start the engine thread (once)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("this engine is closed; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="polymodal-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """End every request (reason "cancelled") and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._end_all("cancelled")  # a thread never started leaves its queue to end here

    def __enter__(self) -> ChatEngine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt_ids: list[int], *, extras: Mapping[str, Tensor] | None = None, max_new_tokens: int = 256,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None
               ) -> EngineRequest:
        """Queue a prompt (token ids) for generation -> its EngineRequest. Raises ValueError for bad arguments and
        QueueFull when `max_queue` requests wait already.

        extras: the prompt's other inputs to the model's prefill, by the names its forward takes (a VLM's
        `pixel_values` (N, 3, H, W), whose image tokens `prompt_ids` hold already, expanded as the processor
        does); the decode steps after it are plain. Checked here, before anything is allocated: names the model
        takes, at most `max_pixels` image pixels, and as many image tokens in the prompt as the images fill."""
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty: there is nothing to continue")
        if self.vocab_size is not None and not all(0 <= i < self.vocab_size for i in prompt_ids):
            bad = next(i for i in prompt_ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        extras = self._check_extras(prompt_ids, extras)
        if len(prompt_ids) + max_new_tokens > self.max_len:
            placeholders = set(media_tokens(self.model, extras))
            images = sum(i in placeholders for i in prompt_ids)
            held = f", {images} of them for its images" if images else ""
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens{held}) plus max_new_tokens ({max_new_tokens}) is "
                             f"over the model's context of {self.max_len} tokens; shorten the prompt"
                             f"{', send fewer images' if images else ''} or ask for fewer tokens")
        if do_sample and not MIN_TEMPERATURE <= temperature < float("inf"):
            raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:g} when sampling, got {temperature} "
                             f"(colder sampling is greedy decoding: use do_sample=False)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {top_k}")
        if not 0 < repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a positive number (1: none), got {repetition_penalty}")
        stop = [s for s in (stop or []) if s]
        if not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a list of strings")
        generator = None
        if do_sample:  # the request's own random stream: its sample does not depend on the rest of the batch
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        request = EngineRequest(self, prompt_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, generator=generator, stop=stop,
                                extras=extras)
        with self._cond:
            if self._closing:
                raise RuntimeError("this engine is closed")
            if len(self._waiting) >= self.max_queue:
                waves = len(self._waiting) // self.max_batch + 1
                retry = round(max(0.1, waves * self._request_seconds), 1)
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests wait already; retry in about "
                                f"{retry} s", retry_after=retry)
            self._waiting.append(request)
            self._cond.notify()
        return request

    def _check_extras(self, prompt_ids: list[int], extras: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """The request's extra prefill inputs, checked against what the model takes and what one request may
        hold (ValueError naming the input otherwise)."""
        extras = dict(extras or {})
        name = type(self.model).__name__
        for key, value in extras.items():
            if key not in self.extra_inputs and "**" not in self.extra_inputs:
                takes = ", ".join(sorted(self.extra_inputs)) or "text only (token ids)"
                raise ValueError(f"{name} takes no input {key!r}; it takes: {takes}")
            if not isinstance(value, Tensor):
                raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
        pixels = sum(v.numel() // 3 for k, v in extras.items() if k.startswith("pixel_values"))
        if pixels > self.max_pixels:
            raise ValueError(f"the request's images hold {pixels:,} pixels, over the limit of {self.max_pixels:,} "
                             f"per request; send fewer or smaller images")
        for token, fill in media_tokens(self.model, extras).items():
            found = sum(i == token for i in prompt_ids)
            if found != fill:
                raise ValueError(f"the prompt holds {found} placeholder tokens (id {token}) but its images fill "
                                 f"{fill}: each image needs exactly one placeholder in the prompt, expanded to as "
                                 "many tokens as its features, as the model's processor does")
        return extras

    # ---------------------------------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closing or self._waiting or self._batch.rows):
                        self._cond.wait()
                    if self._closing:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._batch.rows:
                        self._step()
                except Exception as e:  # a bug here must not stop the server: end the running rows, go on
                    log.exception("engine step failed")
                    for request in self._batch.rows:
                        self._end(request, "error", _describe(e))
                    self._batch.clear()
        self._end_all("cancelled")

    def _drop_cancelled(self) -> None:
        rows = self._batch.rows
        if any(r._cancelled for r in rows):
            for r in rows:
                if r._cancelled:
                    self._end(r, "cancelled")
            self._batch.keep([i for i, r in enumerate(rows) if not r._cancelled])

    def _admit(self) -> None:
        """Prefill waiting requests into free rows."""
        while len(self._batch.rows) < self.max_batch:
            with self._cond:
                if self._closing or not self._waiting:
                    return
                request = self._waiting.popleft()
            request._started = time.monotonic()
            try:
                ids = torch.tensor([request.prompt_ids], device=self.device)  # (1, P)
                extras = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                          for k, v in request.extras.items()}
                request.extras = {}  # the images are merged at the prefill: nothing later needs them
                row, logits = self.model.generation_prefill(ids, torch.ones_like(ids), ids.shape[1],
                                                            **extras)  # (1, V)
                self.stats["prefills"] += 1
                token = self._choose(logits[0], request, int(logits[0].float().argmax()))
                if not self._deliver(request, token):
                    self._batch.add(request, row, token)
            except Exception as e:  # this request alone fails; the batch is untouched
                log.exception("prefill failed")
                self._end(request, "error", _describe(e))

    def _step(self) -> None:
        """One decode step of every row; rows that finish leave the batch."""
        rows = self._batch.rows
        try:
            logits = self._batch.step(self.model)  # (B, V)
        except Exception as e:  # a forward that fails midway leaves the shared cache half-written: all rows end
            log.exception("decode step failed")
            for request in rows:
                self._end(request, "error", _describe(e))
            self._batch.clear()
            return
        self.stats["steps"] += 1
        greedy = logits.float().argmax(dim=-1).tolist()
        tokens, keep = list(greedy), []
        for i, request in enumerate(rows):
            try:
                tokens[i] = self._choose(logits[i], request, greedy[i])
                if not self._deliver(request, tokens[i]):
                    keep.append(i)
            except Exception as e:  # e.g. a tokenizer failing on this row's text: the others go on
                log.exception("request failed")
                self._end(request, "error", _describe(e))
        self._batch.tokens = torch.tensor(tokens, device=self.device)
        self._batch.keep(keep)

    def _choose(self, logits: Tensor, request: EngineRequest, greedy: int) -> int:
        """The next token from one row's logits (V,), as `generate` chooses it for this request alone: the same
        logits processors over the same sequence (its prompt and what it generated), then argmax or a sample."""
        penalized = request.repetition_penalty != 1.0
        if not (request.do_sample or penalized):
            return greedy
        sequence = torch.tensor([request.sequence], device=logits.device) if penalized else None  # (1, L)
        scores = process_logits(logits.float()[None], sequence, repetition_penalty=request.repetition_penalty,
                                temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                                sampling=request.do_sample)  # (1, V)
        if not request.do_sample:
            return int(scores[0].argmax())
        return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=request.generator))

    def _deliver(self, request: EngineRequest, token: int) -> bool:
        """Send the token's Delta; True if the request ends with it (end token, stop string, length)."""
        request.completion_tokens += 1
        request.sequence.append(token)
        end_token = token in self.eos
        at_limit = request.completion_tokens >= request.max_new_tokens
        if end_token:  # its text is not part of the answer
            piece = request.decoder.flush()
        else:
            piece = request.decoder.step(token)
            if at_limit:
                piece += request.decoder.flush()
        text, stopped = request._take_text(piece, final=end_token or at_limit)
        request._emit(Delta(text, token))
        if end_token or stopped or at_limit:
            self._end(request, "length" if at_limit and not (end_token or stopped) else "stop")
            return True
        return False

    def _end(self, request: EngineRequest, reason: str, error: str | None = None) -> None:
        if request._finish(reason, error) and reason in ("stop", "length"):
            self._request_seconds = 0.8 * self._request_seconds + 0.2 * (time.monotonic() - request._started)

    def _cancel(self, request: EngineRequest) -> None:
        with self._cond:
            waiting = request in self._waiting
            if waiting:
                self._waiting.remove(request)
            self._cond.notify()
        if waiting:
            self._end(request, "cancelled")

    def _end_all(self, reason: str) -> None:
        for request in self._batch.rows:
            self._end(request, reason)
        self._batch.clear()
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._end(request, reason)


def extra_inputs(model) -> set[str]:
    """The inputs a model's prefill takes beside the prompt's ids: its forward's other keywords (a VLM's
    `pixel_values`, `image_sizes`, ...); "**" when it takes any. Empty for a text-only decoder."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - _DECODER_INPUTS
    return names | ({"**"} if any(p.kind is p.VAR_KEYWORD for p in params) else set())


def media_tokens(model, extras: Mapping[str, Tensor]) -> dict[int, int]:
    """{placeholder token id: prompt positions} that a request's extras fill, as the model says from their shapes
    (`media_tokens`: LLaVA's images fill `image_tokens` each, Qwen2-VL's as their grids say); {} for a model
    whose prompt holds no placeholders. Raises ValueError for extras of the wrong shape."""
    count = getattr(model, "media_tokens", None)
    return {} if count is None else count(**extras)


def _context_length(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text", None)):  # a VLM's config nests its language model's as `text`
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(part, name, None)
            if isinstance(value, int) and value > 0:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:  # transformers writes ~1e30 for "no limit"
        return value
    raise ValueError("cannot tell this model's context length from its config; pass max_len=")


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
