"""What every pipeline shares: turning a source into a model, and finding its processor and tokenizer.

A pipeline composes processor, model and post-processing with the loop written out (STYLE.md, point 13);
the CLI and the server only call pipelines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal import registry
from polymodal.weights.checkpoint import read_json
from polymodal.weights.loader import load
from polymodal.weights.record import record

ImageInput = Any  # a path, bytes, a file object or a PIL image


class Pipeline:
    task: str = ""
    model_kind: str = "a model for this task"  # in the refusal of a family that does not serve `task`
    takes_images: bool = True  # find the model's image processor

    def __init__(self, model: nn.Module | str | os.PathLike, *, processor=None, device=None, dtype=None,
                 optimize: bool = True):
        """optimize: apply `pm.optimize_for_inference` (prepacked weights: faster on CPUs in fp32, at the cost of
        a second copy of each linear weight in memory)."""
        if isinstance(model, (str, os.PathLike)):
            model = load(model, dtype=dtype, device=device)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be a polymodal model or a checkpoint path/hub id, got {type(model).__name__}")
        fam = registry.family_of(model)
        if self.task and self.task not in fam.tasks:  # the family says what its models serve (Family.tasks)
            serves = f"it serves {', '.join(fam.tasks)}" if fam.tasks else "no pipeline serves it: use its Python API"
            raise ValueError(f"{record(model).origin or 'this model'} is a {fam.name} model, not {self.model_kind}: "
                             f"{serves}")
        if self.task and fam.checkpoints:
            check_checkpoint_task(fam, model.config.task, self.task)
        if optimize:
            from polymodal.nn.inference import optimize_for_inference

            optimize_for_inference(model)
        self.model = model.eval()
        self.family = fam.name
        self.source: Path | None = record(model).source
        self.processor = processor or (self.default_processor() if self.takes_images else None)

    def default_processor(self):
        """The processor this pipeline uses when none is given: the model's image processor."""
        return default_image_processor(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_inputs(self, images: list[ImageInput]) -> dict[str, torch.Tensor]:
        """Open every image safely and preprocess the batch -> the processor's model inputs
        (`{"pixel_values": (B, C, H, W), ...}`), floating tensors in the model's dtype, all on its device."""
        from polymodal.processing import open_image

        opened = [open_image(im) for im in images]
        return to_model(self.processor.inputs(opened), self.device, self.dtype)


def check_checkpoint_task(fam: registry.Family, kind: str, task: str) -> None:
    """Refuse a checkpoint of a task-model family (`Family.checkpoints`) that does not serve pipeline `task`, naming
    the checkpoint that would."""
    if task in fam.checkpoints.get(kind, ("", ()))[1]:
        return
    name = fam.name.upper()
    want = [f"a {name} {k} checkpoint ({arch})" for k, (arch, tasks) in fam.checkpoints.items() if task in tasks]
    raise ValueError(f"{task} needs {' or '.join(want)}, got a {name} {kind} checkpoint")


def new_tokens(model: nn.Module, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """What `generate` added (B, N): the tokens after the prompt, or for an encoder-decoder
    (`config.is_encoder_decoder`: T5, a Flan-T5 BLIP-2), whose output is its decoder's sequence, those after the
    decoder's start token."""
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else input_ids.shape[1]
    return generated[:, start:]


def to_model(inputs: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """A processor's dict on the model's device; floating tensors (pixels) in its dtype, ids and grids as they are."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def as_list(x) -> tuple[list, bool]:
    """(items, was_single): pipelines accept one input or a list of them."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("empty input list")
        return list(x), False
    return [x], True


def family_processor(model: nn.Module):
    """The processor the model's family owns (`Family.processor`), read from the checkpoint's files beside the
    weights; None when the family has none."""
    fam = registry.family_of(model)
    if fam.processor is None:
        return None
    source: Path | None = record(model).source
    if source is None:
        raise ValueError(f"this {fam.name} model was not loaded from a checkpoint directory, so there are no "
                         "processor files to read; pass processor=... to the pipeline")
    return fam.processor(source)


def default_image_processor(model: nn.Module):
    """The processor that goes with a model: the checkpoint's own files first, then the family's default."""
    from polymodal.processing import ImageProcessor

    source: Path | None = record(model).source
    if source is not None and ((source / "preprocessor_config.json").exists()
                               or "image_processor" in _json_or_empty(source / "processor_config.json")):
        return ImageProcessor.from_pretrained(source)  # (transformers 5 nests it in processor_config.json)
    if source is not None and (source / "open_clip_config.json").exists():

        cfg = read_json(source / "open_clip_config.json")
        return ImageProcessor.from_open_clip(cfg.get("preprocess_cfg") or {}, size=model.config.vision.image_size)
    default = registry.family_of(model).image_processor  # the family's own, else ImageNet's 224-px one
    return default(model.config) if default is not None else ImageProcessor.imagenet(size=224)


def default_tokenizer(model: nn.Module):
    """The checkpoint's tokenizer files when present, else open_clip's bundled CLIP vocabulary."""
    from polymodal.processing import CLIPTokenizer

    source: Path | None = record(model).source
    if source is not None and any((source / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return CLIPTokenizer.from_pretrained(source)
    return CLIPTokenizer.default()


def _json_or_empty(path: Path) -> dict:
    return read_json(path) if path.exists() else {}
