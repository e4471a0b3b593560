"""Task pipelines: `pm.pipeline(task, model=...)`. Task names follow transformers' pipelines."""

from __future__ import annotations

from polymodal.pipelines.image_text import (
    ImageTextMatchingPipeline,
    ImageToTextPipeline,
    VisualQuestionAnsweringPipeline,
    capfilt,
)
from polymodal.pipelines.text import TextGenerationPipeline
from polymodal.pipelines.vision import (
    ImageClassificationPipeline,
    ImageTextRetrievalPipeline,
    ZeroShotImageClassificationPipeline,
    recall_at_k,
)

TASKS = {
    "image-classification": ImageClassificationPipeline,
    "zero-shot-image-classification": ZeroShotImageClassificationPipeline,
    "image-text-retrieval": ImageTextRetrievalPipeline,
    "text-generation": TextGenerationPipeline,
    "image-to-text": ImageToTextPipeline,
    "visual-question-answering": VisualQuestionAnsweringPipeline,
    "image-text-matching": ImageTextMatchingPipeline,
}
DEFAULT_MODELS = {"text-generation"}  # tasks with an embedded default model


def pipeline(task: str, model=None, **options):
    """Build the pipeline for `task` around `model` (a polymodal model, a local checkpoint or a hub id)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    if model is None and task not in DEFAULT_MODELS:
        raise ValueError(f"the {task} pipeline needs model=... (a checkpoint directory, hub id or model)")
    return TASKS[task](model, **options)


__all__ = [
    "TASKS",
    "ImageTextMatchingPipeline",
    "ImageToTextPipeline",
    "VisualQuestionAnsweringPipeline",
    "capfilt",
    "ImageClassificationPipeline",
    "ImageTextRetrievalPipeline",
    "TextGenerationPipeline",
    "ZeroShotImageClassificationPipeline",
    "pipeline",
    "recall_at_k",
]
