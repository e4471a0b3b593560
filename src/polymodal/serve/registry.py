"""The models a server serves: parsed from `--model` specs, loaded once, looked up by id per request.

    served = load_served(["tiny=./ckpt", "clip=./clip-dir", "openai:gpt-4o"])
    served.get("tiny")          # -> ServedModel(id="tiny", kind="chat", modalities={"text"}, engine=...)

A SPEC is `SOURCE` or `NAME=SOURCE`; SOURCE a checkpoint directory, a .gguf file, a hub id, or a closed model
(`openai:...`, `anthropic:...`, `gemini:...`). Decoder language models are served through a ChatEngine each
(continuous batching, polymodal/serve/engine.py); a vision-language model (LLaVA) too, with its family's processor
turning each request's messages and images into the prompt and the prefill's extra inputs; CLIP checkpoints serve
embeddings through the image-text pipeline; diffusers pipeline folders (model_index.json) generate images through
the text-to-image pipeline, one run at a time (polymodal/serve/images.py); closed models through their provider
(polymodal/providers)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polymodal.providers import is_provider_spec, load_provider
from polymodal.serve.errors import APIError

log = logging.getLogger("polymodal.serve")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass
class ServedModel:
    """One served model. Exactly one of `engine` (local decoder), `provider` (closed model), `embedder`
    (CLIP pipeline) or `images` (text-to-image pipeline) is set."""

    id: str
    kind: Literal["chat", "embedding", "image", "speech", "tts"]
    modalities: frozenset[str]
    source: str
    engine: Any = None  # polymodal.serve.engine.ChatEngine
    tokenizer: Any = None  # polymodal.processing.text.TextTokenizer (with engine)
    # a vision-language model's processor (with engine): canonical messages -> {"input_ids", "attention_mask",
    # "pixel_values"}, e.g. polymodal.processing.vlm.LlavaProcessor; None for a text-only decoder
    processor: Any = None
    provider: Any = None  # a polymodal.providers ChatProvider
    provider_slots: threading.BoundedSemaphore | None = None  # concurrent calls allowed to a provider
    embedder: Any = None  # polymodal.pipelines.vision.ImageTextPipeline
    images: Any = None  # polymodal.serve.images.ImageWorker over a TextToImagePipeline (kind "image")
    speech: Any = None  # polymodal.serve.speech.SpeechWorker over a speech recognition pipeline (kind "speech")
    voice: Any = None  # polymodal.serve.tts.VoiceWorker over a text-to-speech pipeline (kind "tts")
    owned_by: str = "polymodal"
    created: int = field(default_factory=lambda: int(time.time()))
    # a local chat model's recommended sampling, as request fields (`request_defaults`): what a request that omits
    # them gets. Empty for closed models: their provider applies its own.
    defaults: dict[str, Any] = field(default_factory=dict)

    def card(self, max_tokens: int | None = None) -> dict:
        """The model's entry in GET /v1/models: OpenAI's shape, plus what it serves (`kind`, `modalities`) and, for
        a local chat model, its `context_length` and `generation_defaults`: `defaults` plus a `max_tokens` to start
        from (the server's default answer length `max_tokens`, at most half the context, so that a conversation
        has room to grow)."""
        card = {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "kind": self.kind, "modalities": sorted(self.modalities)}
        if getattr(self.processor, "box_frame", None) is not None:
            card["grounding"] = True  # POST /v1/grounding reads the boxes and points of its answers
        if self.images is not None:  # takes text, makes images: the web UI's image view serves it
            from polymodal.pipelines.text_to_image import DEFAULT_STEPS

            pipe = self.images.pipe
            height, width = pipe.default_size
            card["output_modalities"] = ["image"]
            card["image_defaults"] = {"size": f"{width}x{height}", "steps": DEFAULT_STEPS,
                                      "size_multiple": size_multiple(pipe.model)}
        if self.voice is not None:  # takes text, speaks it: POST /v1/audio/speech
            card["output_modalities"] = ["audio"]
        if self.engine is not None:
            context = self.engine.max_len
            card["context_length"] = context
            card["generation_defaults"] = {**self.defaults, **({"max_tokens": min(max_tokens, context // 2)}
                                                               if max_tokens else {})}
        return card


class ServedModels:
    """The served models by id; starts and closes their engines."""

    def __init__(self, models: list[ServedModel]):
        self.models: dict[str, ServedModel] = {}
        for m in models:
            if m.id in self.models:
                raise ValueError(f"two served models are called {m.id!r}: name one with NAME=SOURCE")
            self.models[m.id] = m
        self._started = False
        self._lock = threading.Lock()

    def ids(self) -> list[str]:
        return list(self.models)

    def limit(self, *, disable: tuple[str, ...] = (), max_visual_tokens: int | None = None) -> None:
        """The server's own limits on what its models take: `disable` switches modalities off for every model
        (a request with such a part is refused with 400 unsupported_modality before anything is fetched);
        `max_visual_tokens` bounds the tokens one request's images and videos may become in a local
        vision-language model's prompt (counted from their headers, before decoding)."""
        unknown = set(disable) - {"image", "video", "audio"}
        if unknown:
            raise ValueError(f"cannot disable {sorted(unknown)}: the media modalities are image, video and audio")
        if max_visual_tokens is not None and max_visual_tokens < 1:
            raise ValueError(f"max_visual_tokens={max_visual_tokens}: at least 1")
        for m in self.models.values():
            m.modalities = m.modalities - set(disable)
            if max_visual_tokens is not None and m.processor is not None:
                m.processor.max_visual_tokens = max_visual_tokens

    def get(self, model_id: str) -> ServedModel:
        """The model, or a 404 `model_not_found` naming the models that are served."""
        try:
            return self.models[model_id]
        except KeyError:
            served = ", ".join(repr(i) for i in self.models) or "none"
            raise APIError(404, f"The model {model_id!r} does not exist on this server (served: {served}).",
                           code="model_not_found", param="model") from None

    def start(self) -> None:
        """Start every engine's background thread (idempotent)."""
        with self._lock:
            if not self._started:
                for m in self.models.values():
                    if m.engine is not None:
                        m.engine.start()
                    if m.images is not None:
                        m.images.start()
                self._started = True

    def close(self) -> None:
        with self._lock:
            for m in self.models.values():
                if m.engine is not None:
                    m.engine.close()
                if m.images is not None:
                    m.images.close()
            self._started = False


def parse_spec(spec: str) -> tuple[str | None, str]:
    """`SOURCE` or `NAME=SOURCE` -> (name or None, source). A bad spec raises ValueError with a clear line."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty --model spec: give SOURCE or NAME=SOURCE")
    name, sep, source = spec.partition("=")
    if not sep:
        return None, spec
    name, source = name.strip(), source.strip()
    if not name or not source:
        raise ValueError(f"bad --model spec {spec!r}: expected NAME=SOURCE with both parts non-empty")
    if any(c.isspace() for c in name):
        raise ValueError(f"bad --model spec {spec!r}: the name may not contain spaces")
    return name, source


def default_id(source: str) -> str:
    """The id a model gets without NAME=: a provider's own name, a file's stem, a directory's name, a hub id."""
    if is_provider_spec(source):
        return source
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem
    if path.exists():
        return path.resolve().name
    return source


def load_served(specs: list[str] | None, *, max_batch: int = 8, max_queue: int = 32,
                provider_concurrency: int = 8, quantize: str | None = None) -> ServedModels:
    """Load every spec (the embedded default chat model when there are none). Anything that cannot be loaded
    raises ValueError naming the spec and the reason. quantize: `pm.load`'s, for the local language models (a
    hosted model, a voice or a CTranslate2 folder loads as it is; other folders refuse it by name)."""
    from polymodal.nn import quant

    quant.check_mode(quantize)  # a bad mode: ValueError before anything loads
    if not specs:
        from polymodal.pipelines.text import default_chat_model, load_default_chat_model

        try:
            path = default_chat_model()
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        return ServedModels([serve_model(DEFAULT_MODEL_ID, load_default_chat_model(quantize=quantize), source=str(path),
                                         max_batch=max_batch, max_queue=max_queue)])
    models = []
    for spec in specs:
        name, source = parse_spec(spec)
        try:
            models.append(load_model(name or default_id(source), source, max_batch=max_batch, max_queue=max_queue,
                                     provider_concurrency=provider_concurrency, quantize=quantize))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one line naming what could not be served
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot serve --model {spec!r}: {first}") from e
    return ServedModels(models)


def load_model(model_id: str, source, *, max_batch: int = 8, max_queue: int = 32,
               provider_concurrency: int = 8, quantize: str | None = None) -> ServedModel:
    """Load one source (or wrap an already loaded model / provider object) as a ServedModel: a hosted model
    ("openai:gpt-4o", ...) through `polymodal.providers.load_provider` (its key from the environment), anything
    else through `pm.load`."""
    import polymodal as pm
    from polymodal.serve.tts import is_voice_spec
    from polymodal.weights.ctranslate2 import is_ctranslate2_dir, load_ctranslate2

    if is_provider_spec(source):
        obj = load_provider(source)
    elif isinstance(source, (str, Path)) and is_ctranslate2_dir(source):  # a CTranslate2 (faster-whisper) folder
        obj = load_ctranslate2(source)
    elif isinstance(source, str) and is_voice_spec(source):  # joe, espeak, piper:<voice.onnx>: a voice
        from polymodal.pipelines.tts import TextToSpeechPipeline

        obj = TextToSpeechPipeline(voice=source)
    else:
        obj = pm.load(source, quantize=quantize) if isinstance(source, (str, Path)) else source
    return serve_model(model_id, obj, source=str(source), max_batch=max_batch, max_queue=max_queue,
                       provider_concurrency=provider_concurrency)


def serve_model(model_id: str, obj, *, source: str = "", tokenizer=None, processor=None, max_batch: int = 8,
                max_queue: int = 32, provider_concurrency: int = 8) -> ServedModel:
    """Wrap a loaded polymodal model or a provider as a ServedModel: decoders get a ChatEngine, CLIP models an
    image-text pipeline, providers a bounded number of concurrent calls. A decoder whose forward takes
    `pixel_values` (a VLM) is served with images, through `processor` (default: the one its family owns, read from
    the checkpoint's files), whose tokenizer is then the one the answers are decoded with."""
    from torch import nn

    from polymodal.generation import CausalLM
    from polymodal.pipelines.diffusion import StableDiffusionPipeline
    from polymodal.pipelines.text_to_image import TextToImagePipeline
    from polymodal.pipelines.tts import TextToSpeechPipeline

    if isinstance(obj, TextToSpeechPipeline):  # a voice
        from polymodal.serve.tts import VoiceWorker

        return ServedModel(model_id, "tts", frozenset({"text"}), source or obj.voice.name,
                           voice=VoiceWorker(obj, max_queue=max_queue))
    if isinstance(obj, (StableDiffusionPipeline, TextToImagePipeline)):  # a diffusers pipeline folder
        from polymodal.serve.images import ImageWorker

        pipe = obj if isinstance(obj, TextToImagePipeline) else TextToImagePipeline(obj)
        return ServedModel(model_id, "image", frozenset({"text"}), source,
                           images=ImageWorker(pipe, max_queue=max_queue, name=model_id))
    if "automatic-speech-recognition" in getattr(_family_or_none(obj), "tasks", ()):  # Whisper
        from polymodal.pipelines.asr import AutomaticSpeechRecognitionPipeline
        from polymodal.serve.speech import SpeechWorker

        worker = SpeechWorker(AutomaticSpeechRecognitionPipeline(obj), max_queue=max_queue)
        return ServedModel(model_id, "speech", frozenset({"audio"}), source, speech=worker)
    if not isinstance(obj, nn.Module) and callable(getattr(obj, "chat", None)):  # a closed-model provider
        return ServedModel(model_id, "chat", frozenset(getattr(obj, "modalities", {"text"})), source or obj.name,
                           provider=obj, provider_slots=threading.BoundedSemaphore(provider_concurrency),
                           owned_by=str(getattr(obj, "name", model_id)).split(":")[0])
    if hasattr(obj, "encode_text") and hasattr(obj, "encode_image"):
        from polymodal.pipelines.vision import ImageTextPipeline

        embedder = ImageTextPipeline(obj, tokenizer=tokenizer, optimize=False)
        return ServedModel(model_id, "embedding", frozenset({"text", "image"}), source, embedder=embedder)
    if isinstance(obj, CausalLM):
        from polymodal.pipelines.base import family_processor
        from polymodal.pipelines.text import default_text_tokenizer
        from polymodal.serve.engine import ChatEngine, extra_inputs

        if processor is None and "pixel_values" in extra_inputs(obj):
            processor = family_processor(obj)
            if processor is None:
                raise ValueError(f"it takes images, but its {type(obj).__name__} family has no processor to turn chat "
                                 "messages into its inputs")
        tokenizer = tokenizer or getattr(processor, "tokenizer", None) or default_text_tokenizer(obj)
        if tokenizer.chat_template is None:
            raise ValueError("its tokenizer has no chat template, so it cannot serve chat completions")
        engine = ChatEngine(obj.eval(), tokenizer, max_batch=max_batch, max_queue=max_queue)
        # a chat processor names the media it places in a prompt (LLaVA: images; Qwen2-VL: images and videos)
        media = set(getattr(processor, "media_tokens", {"image": None})) if processor is not None else set()
        modalities = frozenset({"text", *media})
        return ServedModel(model_id, "chat", modalities, source, engine=engine, tokenizer=tokenizer,
                           processor=processor, defaults=request_defaults(obj, model_id))
    raise ValueError(f"a {type(obj).__name__} can be neither chatted with nor embedded: the server serves decoder "
                     "language models, CLIP models, diffusers pipeline folders (text-to-image) and closed models "
                     "(openai:/anthropic:/gemini:)")


def _family_or_none(obj):
    from polymodal import registry

    try:
        return registry.family_of(obj)
    except (TypeError, ImportError):
        return None


def size_multiple(pipe) -> int:
    """What a diffusion pipeline's height and width must be multiples of (the VAE factor; times the patch size for
    SD3's MM-DiT)."""
    multiple = getattr(pipe, "size_multiple", None)
    return int(multiple[0]) if multiple else int(pipe.vae.config.downscale)


def request_defaults(model, model_id: str = "") -> dict[str, Any]:
    """`polymodal.generation.generation_defaults(model)` as chat-request fields: `temperature` (0: greedy, as in
    OpenAI's API), then `top_p`, `top_k` and `repetition_penalty` where the model recommends them. A value a request
    could not carry (a penalty outside the range the server accepts) is left out, with a warning in the log."""
    from polymodal.generation import generation_defaults
    from polymodal.serve.schemas import REPETITION_PENALTY_RANGE

    gen = generation_defaults(model)
    out: dict[str, Any] = {"temperature": gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0}
    for key in ("top_p", "top_k"):
        if key in gen:
            out[key] = gen[key]
    penalty = gen.get("repetition_penalty")
    if penalty is not None:
        low, high = REPETITION_PENALTY_RANGE
        if low <= penalty <= high:
            out["repetition_penalty"] = penalty
        else:
            log.warning("model %s: its generation config's repetition_penalty %g is outside %g..%g; not applied",
                        model_id, penalty, low, high)
    return out
