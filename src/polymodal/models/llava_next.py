"""LLaVA-NeXT (LLaVA-1.6; Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge"): LLaVA-1.5
over "anyres" inputs. Each image is the whole image at the tower's size plus the crops of a larger canvas chosen for
its aspect ratio (processing/llava_next.py), all through the same CLIP tower and projector; the features are packed

    f = LLaVA-1.5's features(crops)                     (1 + rows * cols, P, D): [whole image, crop 1, crop 2, ...]
    grid = the crops' features laid out as the canvas   (rows * g, cols * g, D), g = image_size // patch_size
    grid = grid without the black bands' rows/columns   the image's own aspect ratio ("spatial_unpad")
    grid = grid with `image_newline` after each row     (h, w + 1, D): the decoder sees where rows end
    features = [f[0], grid row by row]                  what the image's <image> tokens are filled with

and the rest is LLaVA's (`polymodal.models.llava.Llava`, subclassed here: the tower, projector, merge and decoder
are its). llava-v1.6-mistral-7b's decoder is Mistral-7B-Instruct-v0.2, a LLaMA without a sliding window; a Mistral
whose window is shorter than its context is refused by name (the shared decoder attends over the whole context).
Checked against transformers' `LlavaNextForConditionalGeneration` (tests/test_llava_next.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from polymodal.config import from_dict, show
from polymodal.models.clip import CLIPVisionConfig, read_hf_vision_config, write_hf_vision_config
from polymodal.models.llama import LlamaConfig, read_hf_config, write_hf_config
from polymodal.models.llava import Llava, LlavaConfig, hf_key_map_llava
from polymodal.processing.llava_next import (
    DEFAULT_PINPOINTS,
    LlavaNextProcessor,
    check_pinpoints,
    crop_grid,
    image_tokens,
    unpadded,
)
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import KeyMap, Rename


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    text_model_type: Literal["llama", "mistral"] = "llama"  # Mistral without a sliding window is LLaMA
    vision_feature_select_strategy: Literal["default"] = "default"  # the crops' grid has no [CLS] slot
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS  # the canvases (h, w)

    def __post_init__(self):
        object.__setattr__(self, "image_grid_pinpoints",
                           check_pinpoints(self.image_grid_pinpoints, self.vision.image_size))

    def tokens(self, height: int, width: int) -> int:
        """The features an image of (height, width) becomes: what its <image> token expands to."""
        return image_tokens(height, width, self.image_grid_pinpoints, self.vision.image_size, self.vision.patch_size,
                            self.vision.grid ** 2)


class LlavaNext(Llava):
    """input_ids (B, T) with `image_token_index` where image features go, pixel_values (N, n_max, 3, S, S) (or the
    crops of all images concatenated, (sum n_i, 3, S, S)), image_sizes (N, 2) the images' original (height, width)
    -> logits (B, T, V). transformers' names and shapes; `generate(input_ids, pixel_values=, image_sizes=)`."""

    def __init__(self, config: LlavaNextConfig):
        super().__init__(config)
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))  # (D,) ends each row of crops

    def image_sizes(self, pixel_values: Tensor, image_sizes) -> list[tuple[int, int]]:
        """The (height, width) of each image, checked against the pixels' shape (ValueError naming what is wrong)
        before the tower runs."""
        c = self.config
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT's pixel_values come with image_sizes (images, 2): each image's original "
                             "(height, width), which says how its crops are laid out (the processor returns both)")
        sizes = torch.as_tensor(image_sizes).tolist()
        if (not isinstance(sizes, list) or not all(isinstance(s, list) and len(s) == 2 for s in sizes)
                or not all(isinstance(v, int) and v > 0 for s in sizes for v in s)):
            raise ValueError(f"image_sizes must be (images, 2) positive integers (height, width), got "
                             f"{show(sizes)}")
        S = c.vision.image_size
        crops = [1 + r * k for r, k in (crop_grid(h, w, c.image_grid_pinpoints, S) for h, w in sizes)]
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() == 5:
            if shape[0] != len(sizes) or shape[1] < max(crops) or shape[2:] != (3, S, S):
                raise ValueError(f"pixel_values {shape} do not fit image_sizes: {len(sizes)} image(s) of up to "
                                 f"{max(crops)} crops of (3, {S}, {S}) each are (images, crops, 3, {S}, {S})")
        elif pixel_values.dim() == 4:
            if shape[0] != sum(crops) or shape[1:] != (3, S, S):
                raise ValueError(f"pixel_values {shape}: image_sizes make {sum(crops)} crops of (3, {S}, {S})")
        else:
            raise ValueError(f"pixel_values must be (images, crops, 3, {S}, {S}) or (crops, 3, {S}, {S}), got {shape}")
        return [tuple(s) for s in sizes]

    def media_tokens(self, pixel_values: Tensor | None = None, image_sizes=None) -> dict[int, int]:
        """{image token id: the prompt positions these images fill}, from image_sizes alone (the server's check)."""
        n = 0
        if pixel_values is not None:
            n = sum(self.config.tokens(h, w) for h, w in self.image_sizes(pixel_values, image_sizes))
        return {self.config.image_token_index: n}

    def image_features(self, pixel_values: Tensor, image_sizes=None) -> Tensor:
        """pixel_values and image_sizes as `forward` takes them -> (sum of the images' tokens, D), packed."""
        c = self.config
        sizes = self.image_sizes(pixel_values, image_sizes)
        counts = [1 + r * k for r, k in (crop_grid(h, w, c.image_grid_pinpoints, c.vision.image_size)
                                         for h, w in sizes)]
        if pixel_values.dim() == 5:  # each image's crops, the zero rows after them left out
            pixel_values = torch.cat([px[:n] for px, n in zip(pixel_values, counts)])
        f = super().image_features(pixel_values)  # (sum n_i, P, D)
        return torch.cat([self.pack(part, h, w) for part, (h, w) in zip(f.split(counts), sizes)])

    def pack(self, f: Tensor, height: int, width: int) -> Tensor:
        """One image's features (1 + rows * cols, P, D) -> (tokens, D): the whole image's, then its crops' grid
        unpadded to (height, width)'s aspect, each row followed by `image_newline`."""
        c = self.config
        g, D = c.vision.grid, f.shape[-1]
        rows, cols = crop_grid(height, width, c.image_grid_pinpoints, c.vision.image_size)
        grid = f[1:].view(rows, cols, g, g, D).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, D)
        top, bottom, left, right = unpadded(height, width, rows * g, cols * g)
        grid = grid[top:bottom, left:right]  # (h, w, D)
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, D)
        return torch.cat([f[0], torch.cat([grid, newline], dim=1).reshape(-1, D)])

    def merge(self, input_ids: Tensor, embeds: Tensor, pixel_values: Tensor | None, image_sizes=None) -> Tensor:
        """LLaVA's merge with each image's packed features; the image tokens are counted from image_sizes before
        the tower runs."""
        if pixel_values is None:
            return super().merge(input_ids, embeds, None)
        slots = input_ids == self.config.image_token_index  # (B, T)
        count, sizes = int(slots.sum()), self.image_sizes(pixel_values, image_sizes)
        need = [self.config.tokens(h, w) for h, w in sizes]
        if count != sum(need):
            raise ValueError(f"{len(sizes)} image(s) of sizes {sizes} need {' + '.join(map(str, need))} = "
                             f"{sum(need)} image tokens in the prompt, found {count} (token "
                             f"{self.config.image_token_index}); the processor expands each <image> to its count")
        features = self.image_features(pixel_values, sizes).to(embeds.dtype)  # (count, D)
        return embeds.masked_scatter(slots[..., None], features)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_sizes: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, cache=None, position_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> Tensor:
        if pixel_values is not None and inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("LlavaNext takes input_ids (batch, length) with its pixel_values")
            inputs_embeds = self.merge(input_ids, self.language_model.embed(input_ids), pixel_values, image_sizes)
            input_ids, pixel_values = None, None
        elif image_sizes is not None and pixel_values is None:
            raise ValueError("image_sizes came without pixel_values")
        return super().forward(input_ids, attention_mask, pixel_values, inputs_embeds=inputs_embeds, cache=cache,
                               position_ids=position_ids, logits_to_keep=logits_to_keep)


# ------------------------------------------------------------------------------------------ presets

_VIT_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
PRESETS: dict[str, LlavaNextConfig] = {
    "llava-next-tiny-test": LlavaNextConfig(
        vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8),
        text=LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
        image_token_index=259, image_grid_pinpoints=((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))),
    "llava-hf/llava-v1.6-vicuna-7b-hf": LlavaNextConfig(vision=_VIT_L_336, text=LlamaConfig(
        vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)),
    "llava-hf/llava-v1.6-vicuna-13b-hf": LlavaNextConfig(vision=_VIT_L_336, text=LlamaConfig(
        vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)),
    # Mistral-7B-Instruct-v0.2: grouped-query heads, a 10^6 rotary base, no sliding window
    "llava-hf/llava-v1.6-mistral-7b-hf": LlavaNextConfig(vision=_VIT_L_336, text_model_type="mistral", text=LlamaConfig(
        vocab_size=32064, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1e6)),
}
HUB_IDS = {name: name for name in PRESETS if name.startswith("llava-hf/")}

# ------------------------------------------------------------------------------------------ checkpoints
# LLaVA's names (hub files: `language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`;
# transformers 5.x: `model.language_model.*`, `model.vision_tower.*`, ...) plus the newline: `image_newline` in the
# files, `model.image_newline` in transformers 5.x's model. Saving writes the files' names, which it reads back.


def hf_key_map_llava_next(c: LlavaNextConfig) -> KeyMap:
    return KeyMap([Rename("image_newline", "image_newline"),
                   Rename("model.image_newline", "image_newline")]) + hf_key_map_llava(c)


# ------------------------------------------------------------------------------------------ config files
# transformers' LlavaNextConfig: LlavaConfig's fields plus `image_grid_pinpoints` ([h, w] pairs).


def _read_hf(raw: dict, shapes: dict) -> LlavaNextConfig:
    text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ValueError("text_config and vision_config must be JSON objects")
    kind = text_raw.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise ValueError(f"text_config.model_type {show(kind)}: this LLaVA-NeXT takes a llama or mistral decoder")
    window, context = text_raw.get("sliding_window"), text_raw.get("max_position_embeddings", 4096)
    if kind == "mistral" and window is not None and not (isinstance(window, int) and isinstance(context, int)
                                                         and window >= context):
        raise ValueError(f"text_config.sliding_window {show(window)}: a Mistral decoder that attends over a sliding "
                         f"window shorter than its context ({show(context)}) is not supported: polymodal's decoder "
                         "attends over the whole context (llava-v1.6-mistral-7b-hf's Mistral-7B-Instruct-v0.2 has "
                         "no window)")
    if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision_config.model_type {show(vision_raw.get('model_type'))}: this LLaVA-NeXT takes a "
                         "CLIP vision tower (clip_vision_model)")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"vision_feature_layer {show(layer)}: one layer index is supported (not a list)")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {show(strategy)}: LLaVA-NeXT lays each crop's patch "
                         "features out on the canvas, which has no place for [CLS]; only 'default' is supported")
    text = read_hf_config(LlamaConfig, text_raw)
    vision = read_hf_vision_config(vision_raw)
    token = raw.get("image_token_index", raw.get("image_token_id", 32000))
    if not isinstance(token, int) or not 0 <= token < text.vocab_size:
        raise ValueError(f"image_token_index {show(token)} is not a token of the {text.vocab_size}-entry vocabulary")
    pinpoints = check_pinpoints(raw.get("image_grid_pinpoints") or DEFAULT_PINPOINTS, vision.image_size)
    return from_dict(LlavaNextConfig, {
        "text_model_type": kind, "image_token_index": token, "vision_feature_layer": layer,
        **{k: raw[k] for k in ("projector_hidden_act", "multimodal_projector_bias") if k in raw}},
        vision=vision, text=text, image_grid_pinpoints=pinpoints)


def _write_hf(c: LlavaNextConfig) -> dict:
    if c.projector != "mlp2x_gelu":
        raise ValueError("transformers' LLaVA-NeXT has the two-layer projector only; save this model in polymodal's "
                         "layout (pm.record(model).layout = 'polymodal')")
    text = (write_hf_config(c.text, "mistral", "MistralForCausalLM") | {"sliding_window": None}
            if c.text_model_type == "mistral" else write_hf_config(c.text, "llama", "LlamaForCausalLM"))
    return {
        "model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"],
        "text_config": text, "vision_config": write_hf_vision_config(c.vision),
        "image_token_index": c.image_token_index, "image_seq_length": c.image_tokens,
        "image_grid_pinpoints": [list(p) for p in c.image_grid_pinpoints],
        "projector_hidden_act": c.projector_hidden_act, "multimodal_projector_bias": c.multimodal_projector_bias,
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": c.vision_feature_select_strategy,
        "tie_word_embeddings": c.text.tie_word_embeddings,
    }


FAMILY = Family(
    name="llava_next",
    model=LlavaNext,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map_llava_next),
        "polymodal": native_layout("llava_next", LlavaNextConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="LLaVA-NeXT (1.6): LLaVA-1.5 over 'anyres' crops of a canvas fitted to each image, their features "
                "unpadded to its aspect with a newline per row; LLaMA (Vicuna) or Mistral decoders",
    processor=LlavaNextProcessor.from_pretrained,
    tasks=("image-text-to-text",),
)
