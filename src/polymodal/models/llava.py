"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning") and LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with
Visual Instruction Tuning"): a CLIP vision tower whose grid features enter a LLaMA-family decoder's token stream.

    f = CLIP-ViT(pixels).hidden_states[vision_feature_layer]      layer -2, before the post-norm, unprojected
    f = f[:, 1:]                                                   "default": drop [CLS] (576 tokens at 336 px)
    f = projector(f)                                               LLaVA: one Linear; LLaVA-1.5: Linear-GELU-Linear
    h = embed(ids); h[ids == image_token_index] = f                each <image> token was expanded to the feature
    logits = LLaMA.decode(h) ...                                   count by the processor; then plain decoding

The model is three shared parts: `polymodal.models.clip.VisionTransformer`'s `features`, the projector below and
`polymodal.models.llama.Llama` (decode steps are the decoder's own: the images are merged once, at the prefill).
Checked against transformers' `LlavaForConditionalGeneration` (tests/test_llava.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from polymodal.config import from_dict, show
from polymodal.generation import CausalLM
from polymodal.models.clip import (
    CLIPVisionConfig,
    VisionTransformer,
    hf_vision_key_map,
    read_hf_vision_config,
    write_hf_vision_config,
)
from polymodal.models.llama import Llama, LlamaConfig, hf_key_map, read_hf_config, write_hf_config
from polymodal.models.qwen2 import Qwen2Config
from polymodal.nn import KVCache, activation
from polymodal.processing.vlm import LlavaProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import KeyMap, Rename


@dataclass(frozen=True)
class LlavaConfig:
    vision: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14))
    text: LlamaConfig = field(default_factory=lambda: LlamaConfig(vocab_size=32064, max_position_embeddings=4096,
                                                                  rms_norm_eps=1e-5, pad_token_id=32001))
    text_model_type: Literal["llama", "qwen2"] = "llama"  # which family's config.json `text_config` is
    image_token_index: int = 32000
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"  # LLaVA-1.5's MLP; the original LLaVA's Linear
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = field(default=-2, metadata={"min": -1024})  # negative: from the end
    vision_feature_select_strategy: Literal["default", "full"] = "default"  # default: drop [CLS]

    @property
    def image_tokens(self) -> int:
        """Features per image at the tower's trained resolution: what one <image> token expands to."""
        return self.vision.grid ** 2 + (self.vision_feature_select_strategy == "full")


class Projector(nn.Module):
    """Vision features (N, P, Dv) -> (N, P, D), D the decoder's width."""

    def __init__(self, c: LlavaConfig):
        super().__init__()
        Dv, D, bias = c.vision.hidden_size, c.text.hidden_size, c.multimodal_projector_bias
        self.linear_1 = nn.Linear(Dv, D, bias=bias)
        self.act = activation(c.projector_hidden_act) if c.projector == "mlp2x_gelu" else None
        self.linear_2 = nn.Linear(D, D, bias=bias) if c.projector == "mlp2x_gelu" else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(self.act(x))


class Llava(nn.Module, CausalLM):
    """input_ids (B, T) with `image_token_index` where image features go, pixel_values (N, 3, H, W) for the N
    image slots in reading order -> logits (B, T, V); `generate(input_ids, pixel_values=...)` merges them at the
    prefill and then decodes like the language model."""

    fixed_shape_step = True  # decode steps are the decoder's

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = c = config
        self.vision_tower = VisionTransformer(c.vision, projection_dim=None)
        self.multi_modal_projector = Projector(c)
        self.language_model = Llama(c.text)

    def media_tokens(self, pixel_values: Tensor | None = None) -> dict[int, int]:
        """{placeholder token id: the prompt positions these inputs fill}, from their shapes alone: what callers
        check a request against before any work (the server's engine). Each image fills `image_tokens`."""
        n = 0
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be (images, channels, height, width), got shape "
                                 f"{tuple(pixel_values.shape)}")
            n = pixel_values.shape[0]
        return {self.config.image_token_index: n * self.config.image_tokens}

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, P, D): the tower's features at `vision_feature_layer`, projected."""
        c = self.config
        f = self.vision_tower.features(pixel_values, layer=c.vision_feature_layer,
                                       keep_cls=c.vision_feature_select_strategy == "full")
        return self.multi_modal_projector(f)

    def merge(self, input_ids: Tensor, embeds: Tensor, pixel_values: Tensor | None) -> Tensor:
        """The text embeddings (B, T, D) with each image's features in its slots: the `image_token_index`
        positions, image after image in reading order (row by row)."""
        if pixel_values is None:
            if input_ids.shape[1] > 1:  # a prompt (a decode step reads nothing back: it may be a captured graph)
                count = int((input_ids == self.config.image_token_index).sum())
                if count:
                    raise ValueError(f"the prompt has {count} image tokens but no pixel_values came with it")
            return embeds  # (a decode step that generated the token id keeps it as text, as transformers does)
        slots = input_ids == self.config.image_token_index  # (B, T)
        count = int(slots.sum())
        features = self.image_features(pixel_values).to(embeds.dtype)  # (N, P, D)
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{features.shape[0]} image(s) of {features.shape[1]} features each need "
                f"{features.shape[0] * features.shape[1]} image tokens in the prompt, found {count} "
                f"(token {self.config.image_token_index}); the processor expands each <image> to "
                f"{features.shape[1]}")
        return embeds.masked_scatter(slots[..., None], features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                cache: list[KVCache] | None = None, position_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> Tensor:
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("Llava takes input_ids (batch, length) or inputs_embeds (batch, length, width)")
            inputs_embeds = self.merge(input_ids, self.language_model.embed(input_ids), pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values go with input_ids (their image tokens say where), not inputs_embeds")
        return self.language_model(attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                                   position_ids=position_ids, logits_to_keep=logits_to_keep)

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        return self.language_model.new_cache(batch, max_len, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ presets

_VIT_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
PRESETS: dict[str, LlavaConfig] = {
    "llava-tiny-test": LlavaConfig(
        vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8),
        text=LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=259),
    "llava-hf/llava-1.5-7b-hf": LlavaConfig(vision=_VIT_L_336, text=LlamaConfig(
        vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)),
    "llava-hf/llava-1.5-13b-hf": LlavaConfig(vision=_VIT_L_336, text=LlamaConfig(
        vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)),
}
HUB_IDS = {"llava-hf/llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf":
           "llava-hf/llava-1.5-13b-hf"}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers' LlavaForConditionalGeneration. The hub's files (4.x) name `language_model.model.*`,
# `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`; transformers 5.x holds
# `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*` and saves
# the 4.x names with the tower's `vision_model.` left out. All of them load; saving writes the hub's names, which
# every transformers version reads. The parts' own maps (LLaMA's, CLIP's tower) are mounted, not restated.


def hf_key_map_llava(c: LlavaConfig) -> KeyMap:
    language = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                "model.language_model.": "model.", "lm_head.": "lm_head."}
    tower = {"vision_tower.vision_model.": "", "vision_tower.": "", "model.vision_tower.vision_model.": "",
             "model.vision_tower.": ""}
    return (KeyMap([Rename("multi_modal_projector.{rest*}", "multi_modal_projector.{rest*}"),
                    Rename("model.multi_modal_projector.{rest*}", "multi_modal_projector.{rest*}")])
            + hf_key_map(c.text).nested(language, "language_model.")
            + hf_vision_key_map(c.vision).nested(tower, "vision_tower."))


# ------------------------------------------------------------------------------------------ config files
# transformers' LlavaConfig: `text_config` (a LLaMA or Qwen2 config.json), `vision_config` (a CLIPVisionConfig,
# model_type "clip_vision_model"), `image_token_index` (`image_token_id` in some files), the projector's settings.

def _read_hf(raw: dict, shapes: dict) -> LlavaConfig:
    text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ValueError("text_config and vision_config must be JSON objects")
    kind = text_raw.get("model_type", "llama")
    if kind not in ("llama", "qwen2"):
        raise ValueError(f"text_config.model_type {show(kind)}: this LLaVA takes a llama or qwen2 decoder")
    if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision_config.model_type {show(vision_raw.get('model_type'))}: this LLaVA takes a CLIP "
                         "vision tower (clip_vision_model)")
    text = (read_hf_config(Qwen2Config, text_raw, attention_bias=True, attention_out_bias=False) if kind == "qwen2"
            else read_hf_config(LlamaConfig, text_raw))
    vision = read_hf_vision_config(vision_raw)
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"vision_feature_layer {show(layer)}: one layer index is supported (not a list)")
    token = raw.get("image_token_index", raw.get("image_token_id", 32000))
    if not isinstance(token, int) or not 0 <= token < text.vocab_size:
        raise ValueError(f"image_token_index {show(token)} is not a token of the {text.vocab_size}-entry vocabulary")
    return from_dict(LlavaConfig, {
        "text_model_type": kind, "image_token_index": token, "vision_feature_layer": layer,
        **{k: raw[k] for k in ("projector_hidden_act", "multimodal_projector_bias", "vision_feature_select_strategy")
           if k in raw}}, vision=vision, text=text)


def _write_hf(c: LlavaConfig) -> dict:
    if c.projector != "mlp2x_gelu":
        raise ValueError("transformers' LLaVA has the two-layer projector only; save a linear-projector LLaVA in "
                         "polymodal's layout (pm.record(model).layout = 'polymodal')")
    arch = "Qwen2ForCausalLM" if c.text_model_type == "qwen2" else "LlamaForCausalLM"
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "text_config": write_hf_config(c.text, c.text_model_type, arch),
        "vision_config": write_hf_vision_config(c.vision),
        "image_token_index": c.image_token_index, "image_seq_length": c.image_tokens,
        "projector_hidden_act": c.projector_hidden_act, "multimodal_projector_bias": c.multimodal_projector_bias,
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": c.vision_feature_select_strategy,
        "tie_word_embeddings": c.text.tie_word_embeddings,
    }


FAMILY = Family(
    name="llava",
    model=Llava,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map_llava),
        "polymodal": native_layout("llava", LlavaConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="LLaVA / LLaVA-1.5: CLIP ViT features (layer -2) through a linear or MLP projector into a LLaMA/Qwen2 "
                "decoder's token stream",
    processor=LlavaProcessor.from_pretrained,
    tasks=("image-text-to-text",),
)
