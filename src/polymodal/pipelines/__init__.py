"""Task pipelines: `pm.pipeline(task, model=...)`. Task names follow transformers' pipelines."""

from __future__ import annotations

import inspect
import os

from torch import nn

from polymodal import registry
from polymodal.pipelines.asr import AutomaticSpeechRecognitionPipeline, word_error_rate
from polymodal.pipelines.image_text import (
    ImageTextMatchingPipeline,
    ImageToTextPipeline,
    VisualQuestionAnsweringPipeline,
    capfilt,
)
from polymodal.pipelines.image_text_to_text import ImageTextToTextPipeline
from polymodal.pipelines.text import DEFAULT_CHAT_MODEL, TextGenerationPipeline, no_images_error
from polymodal.pipelines.text_to_image import ImageToImagePipeline, TextToImagePipeline
from polymodal.pipelines.tts import TextToSpeechPipeline
from polymodal.pipelines.vad import SpeechDetector, VoiceActivityDetectionPipeline
from polymodal.pipelines.vision import (
    ImageClassificationPipeline,
    ImageTextRetrievalPipeline,
    ZeroShotImageClassificationPipeline,
    recall_at_k,
)
from polymodal.providers import is_provider_spec, load_provider

TASKS = {
    "image-classification": ImageClassificationPipeline,
    "zero-shot-image-classification": ZeroShotImageClassificationPipeline,
    "image-text-retrieval": ImageTextRetrievalPipeline,
    "text-generation": TextGenerationPipeline,
    "image-to-text": ImageToTextPipeline,
    "visual-question-answering": VisualQuestionAnsweringPipeline,
    "image-text-matching": ImageTextMatchingPipeline,
    "image-text-to-text": ImageTextToTextPipeline,
    "text-to-image": TextToImagePipeline,  # a diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL, SD3)
    "image-to-image": ImageToImagePipeline,  # SD 1.x/2.x img2img
    "automatic-speech-recognition": AutomaticSpeechRecognitionPipeline,  # Whisper
    "voice-activity-detection": VoiceActivityDetectionPipeline,  # Silero VAD
    "text-to-speech": TextToSpeechPipeline,  # a Piper voice (onnxruntime) or espeak-ng
}
# tasks with a default model (packaged)
DEFAULT_MODELS = {"text-generation", "automatic-speech-recognition", "voice-activity-detection", "text-to-speech"}


HOSTED_TASKS = {"text-generation"}  # what a hosted chat model ("openai:gpt-4o", ...) serves


def pipeline(task: str, model=None, **options):
    """Build the pipeline for `task` around `model` (a polymodal model, a local checkpoint or a hub id).

    A hosted model ("openai:gpt-4o", "anthropic:...", "gemini:..." / "google:...") for "text-generation" is its
    provider's chat object (`polymodal.providers.load_provider`), which has this pipeline's interface (`__call__`,
    `stream`, `chat`); the options then are load_provider's (api_key, base_url, timeout, max_retries)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    if is_provider_spec(model):
        return _hosted(task, model, options)
    if model is None and task not in DEFAULT_MODELS:
        raise ValueError(f"the {task} pipeline needs model=... (a checkpoint directory, hub id or model)")
    return TASKS[task](model, **options)


def _hosted(task: str, spec: str, options: dict):
    if task not in HOSTED_TASKS:
        raise ValueError(f"{spec!r} is a hosted chat model: it serves the {', '.join(sorted(HOSTED_TASKS))} "
                         f"pipeline, not {task}; give {task} a local checkpoint")
    accepted = [name for name in inspect.signature(load_provider).parameters if name != "spec"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{spec!r} is a hosted model, which takes the options {', '.join(accepted)}; not "
                         f"{', '.join(unknown)}")
    return load_provider(spec, **options)


def chat_pipeline(model=None, *, images: bool = False, **options) -> TextGenerationPipeline:
    """The pipeline that chats with `model`, loaded once: "image-text-to-text" when the model's family serves it
    (a vision-language model such as LLaVA), else "text-generation" (the embedded default model when
    `model` is None). images=True: the chat will carry images, and a text-only model is refused with a ValueError
    saying that it takes no images."""
    if model is None:
        if images:
            raise ValueError(f"the default chat model, {DEFAULT_CHAT_MODEL}, takes no images; chat about images "
                             "needs a vision-language model, such as a LLaVA checkpoint")
        return TextGenerationPipeline(None, **options)
    if isinstance(model, (str, os.PathLike)):
        from polymodal.weights.loader import load

        model = load(model, dtype=options.get("dtype"), device=options.get("device"))
    if isinstance(model, nn.Module) and "image-text-to-text" in registry.family_of(model).tasks:
        return ImageTextToTextPipeline(model, **options)
    if images and isinstance(model, nn.Module) and callable(getattr(model, "generation_prefill", None)):
        raise no_images_error(model)  # (a model that is no language model is refused as such below)
    return TextGenerationPipeline(model, **options)


__all__ = [
    "TASKS",
    "AutomaticSpeechRecognitionPipeline",
    "ImageTextMatchingPipeline",
    "ImageTextToTextPipeline",
    "ImageToTextPipeline",
    "ImageToImagePipeline",
    "TextToImagePipeline",
    "VisualQuestionAnsweringPipeline",
    "capfilt",
    "ImageClassificationPipeline",
    "ImageTextRetrievalPipeline",
    "TextGenerationPipeline",
    "SpeechDetector",
    "TextToSpeechPipeline",
    "VoiceActivityDetectionPipeline",
    "ZeroShotImageClassificationPipeline",
    "chat_pipeline",
    "pipeline",
    "recall_at_k",
    "word_error_rate",
]
