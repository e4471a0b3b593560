"""The one explicit registry of model families (STYLE.md, point 14): plain dicts, no decorators, no scanning.

Each family module defines `FAMILY`, a `Family`: how to build the model from its config, its presets, and
the checkpoint layouts it reads and writes (transformers, timm, open_clip, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from polymodal.weights.keymap import KeyMap

# family name -> module defining FAMILY
FAMILIES: dict[str, str] = {
    "lenet": "polymodal.models.lenet",
    "resnet": "polymodal.models.resnet",
    "vit": "polymodal.models.vit",
    "clip": "polymodal.models.clip",
    "bert": "polymodal.models.bert",
    "llama": "polymodal.models.llama",
    "qwen2": "polymodal.models.qwen2",
    "opt": "polymodal.models.opt",
    "t5": "polymodal.models.t5",
    "blip": "polymodal.models.blip",
    "blip-2": "polymodal.models.blip2",
    "llava": "polymodal.models.llava",
    "llava_next": "polymodal.models.llava_next",
    "qwen2_vl": "polymodal.models.qwen2_vl",
    "qwen2_5_vl": "polymodal.models.qwen2_5_vl",
    "mllama": "polymodal.models.mllama",
    "qwen_vl": "polymodal.models.qwen_vl",
    "autoencoder_kl": "polymodal.models.autoencoder_kl",
    "unet_2d_condition": "polymodal.models.unet_2d_condition",
    "clip_text": "polymodal.models.clip_text",
    "sd3_transformer": "polymodal.models.sd3_transformer",
    "whisper": "polymodal.models.whisper",
    "silero_vad": "polymodal.models.silero_vad",
}

# transformers' config.json `model_type` (and polymodal's own) -> family
# (`polymodal-<family>` marks polymodal's own layout, for variants no reference library holds)
MODEL_TYPES: dict[str, str] = {
    "polymodal-lenet": "lenet",
    "polymodal-resnet": "resnet",
    "polymodal-vit": "vit",
    "polymodal-clip": "clip",
    "resnet": "resnet",
    "vit": "vit",
    "clip": "clip",
    "bert": "bert",
    "polymodal-bert": "bert",
    "llama": "llama",
    "qwen2": "qwen2",
    "opt": "opt",
    "t5": "t5",
    "polymodal-llama": "llama",
    "polymodal-qwen2": "qwen2",
    "polymodal-opt": "opt",
    "polymodal-t5": "t5",
    "blip": "blip",
    "polymodal-blip": "blip",
    "blip-2": "blip-2",
    "llava": "llava",
    "polymodal-llava": "llava",
    "llava_next": "llava_next",
    "polymodal-llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "polymodal-qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "polymodal-qwen2_5_vl": "qwen2_5_vl",
    "mllama": "mllama",
    "polymodal-mllama": "mllama",
    "qwen": "qwen_vl",  # Qwen (v1) with `visual` in its config: Qwen-VL
    "polymodal-qwen_vl": "qwen_vl",
    "clip_text_model": "clip_text",  # CLIPTextModel / CLIPTextModelWithProjection (diffusion text encoders)
    "whisper": "whisper",
    "polymodal-whisper": "whisper",
    "polymodal-silero_vad": "silero_vad",
}

# diffusers' component config.json `_class_name` -> family (read through the family's "diffusers" layout)
DIFFUSERS_CLASSES: dict[str, str] = {
    "AutoencoderKL": "autoencoder_kl",
    "UNet2DConditionModel": "unet_2d_condition",
    "SD3Transformer2DModel": "sd3_transformer",
}

# timm's config.json `architecture` prefix -> family
TIMM_ARCHITECTURES: dict[str, str] = {
    "vit_": "vit",
    "resnet": "resnet",
}


@dataclass(frozen=True)
class Layout:
    """How one ecosystem stores a family on disk."""

    name: str  # "transformers", "timm", "open_clip", "polymodal"
    # (the config file's JSON, the checkpoint's {name: shape}) -> the family's config; the shapes settle what
    # a config file leaves open (a pooler present or not, a timm model's depth)
    read_config: Callable[[dict, dict[str, tuple[int, ...]]], Any]
    write_config: Callable[[Any], dict]  # the family's config -> JSON the reference library reads back
    key_map: Callable[[Any], KeyMap]  # config -> the key map for that config
    config_file: str = "config.json"
    weights_stem: str = "model"  # model.safetensors, model.safetensors.index.json, ...


@dataclass(frozen=True)
class Family:
    """A model family: its model class, presets and checkpoint layouts (the first is the default for saving), and
    the processor that turns its users' inputs into its model inputs, when the family owns one."""

    name: str
    model: type[nn.Module]
    layouts: dict[str, Layout]
    presets: dict[str, Any] = field(default_factory=dict)
    hub_ids: dict[str, str] = field(default_factory=dict)  # hub id -> preset name
    description: str = ""
    # checkpoint directory -> the family's processor read from the files beside the weights (a VLM's: chat messages
    # with images -> a dict of model inputs); None: the pipelines' shared tokenizers and image processors serve it
    processor: Callable[[Path], Any] | None = None
    # config -> the family's default ImageProcessor, for a checkpoint that carries no preprocessor files (None:
    # ImageNet's 224-px preprocessing)
    image_processor: Callable[[Any], Any] | None = None
    # the pm.pipeline tasks its models serve (transformers' task names); a pipeline refuses a model of a family that
    # does not list its task, naming the ones it does
    tasks: tuple[str, ...] = ()
    # for a family whose checkpoints are task models (BLIP's captioning, VQA and retrieval files): the config's
    # `task` -> (the transformers class of such a checkpoint, the pipeline tasks it serves); a pipeline refuses a
    # checkpoint of the family that does not serve its task, naming the one that would. Empty: every checkpoint
    # serves all of `tasks`
    checkpoints: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    @property
    def default_layout(self) -> Layout:
        return next(iter(self.layouts.values()))


def native_layout(name: str, config_cls: type) -> Layout:
    """polymodal's own layout, for variants no reference library holds: config.json is the config's fields
    plus `model_type: "polymodal-<name>"`, and the tensors keep our names."""
    from polymodal.config import from_dict, to_dict

    return Layout(
        "polymodal",
        read_config=lambda raw, shapes: from_dict(config_cls, raw),
        write_config=lambda cfg: {"model_type": f"polymodal-{name}", **to_dict(cfg)},
        key_map=lambda cfg: KeyMap(),
    )


def family(name: str) -> Family:
    """The family registered under `name` (imports its module on first use)."""
    try:
        module = FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None
    return importlib.import_module(module).FAMILY


def family_of(model: nn.Module) -> Family:
    """The family a model instance belongs to (the FAMILY of the module its class is defined in)."""
    module = importlib.import_module(type(model).__module__)
    fam = getattr(module, "FAMILY", None)
    if fam is None:
        raise TypeError(f"{type(model).__name__} is not a polymodal family model")
    return fam


def all_families() -> list[Family]:
    return [family(name) for name in FAMILIES]
