"""CLIP's text tower alone (Radford et al. 2021), as diffusion pipelines hold it: transformers' `CLIPTextModel`
(Stable Diffusion 1.x's text encoder, SDXL's first) and `CLIPTextModelWithProjection` (SDXL's second, OpenCLIP
bigG, whose projected pooled output is SDXL's `text_embeds`).

The tower is `polymodal.models.clip.TextTransformer` (same blocks, same key map); what a diffusion model reads
is every token's feature, not only the pooled one:

    input_ids (B, T) -> (last_hidden_state (B, T, D) after the final LayerNorm,   SD 1.x's conditioning
                         penultimate (B, T, D): the second-to-last layer's output,  SDXL's (hidden_states[-2])
                         pooled (B, P or D): the end-of-text token, normed [and projected])

Checked against transformers' CLIPTextModel / CLIPTextModelWithProjection (tests/test_sd_pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polymodal.models import clip
from polymodal.models.clip import CLIPConfig, CLIPTextConfig, TextTransformer
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import KeyMap, Rename


@dataclass(frozen=True)
class CLIPTextEncoderConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    projection_dim: int | None = None  # CLIPTextModelWithProjection's text_projection width; None: CLIPTextModel


class CLIPTextEncoder(nn.Module):
    """`model(input_ids)` -> (last_hidden_state, penultimate hidden state, pooled) (see the module docstring)."""

    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text, config.projection_dim or 1)
        if config.projection_dim is None:
            self.text_model.proj = None  # CLIPTextModel: pooler_output is the normed end-of-text feature itself

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.token_embedding.weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        tower, c = self.text_model, self.config.text
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= c.max_position_embeddings:
            raise ValueError(f"expected input_ids (B, T) with 0 < T <= {c.max_position_embeddings}, got "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        x = tower.token_embedding(input_ids) + tower.positional_embedding[:T]  # (B, T, D)
        mask = None
        if attention_mask is not None:  # as TextTransformer: padding rows keep their own key (no 0/0)
            mask = attention_mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=x.device)
        penultimate = x
        for i, block in enumerate(tower.blocks):
            x = block(x, mask)
            if i == len(tower.blocks) - 2:
                penultimate = x
        last = tower.ln_final(x)
        pooled = last[torch.arange(B, device=x.device), tower.eot_positions(input_ids)]  # (B, D)
        return last, penultimate, pooled if tower.proj is None else tower.proj(pooled)


# ------------------------------------------------------------------------------------------------ checkpoints
# transformers 4.x files (the hub's) hold the tower under `text_model.`, 5.x's CLIPTextModel at the top; both load,
# saving writes the first. `text_projection` is CLIPTextModelWithProjection's.


def _key_map(c: CLIPTextEncoderConfig) -> KeyMap:
    return (KeyMap([Rename("text_projection.weight", "text_model.proj.weight")])
            + clip._hf_text_key_map().nested({"text_model.": "", "": ""}, "text_model."))


def _read(raw: dict, shapes: dict) -> CLIPTextEncoderConfig:
    projection = shapes.get("text_projection.weight")
    # CLIP's own reader settles the pooling rule (eos_token_id 2: transformers' marker for argmax pooling)
    text = clip._read_hf({"text_config": raw}, {}).text
    return CLIPTextEncoderConfig(text=text, projection_dim=None if projection is None else projection[0])


def _write(c: CLIPTextEncoderConfig) -> dict:
    text = clip._write_hf(CLIPConfig(text=c.text))["text_config"]
    text.pop("projection_dim")
    arch = "CLIPTextModel" if c.projection_dim is None else "CLIPTextModelWithProjection"
    extra = {} if c.projection_dim is None else {"projection_dim": c.projection_dim}
    return {"model_type": "clip_text_model", "architectures": [arch], **text, **extra}


PRESETS = {
    # stable-diffusion-v1-5, text_encoder: openai/clip-vit-large-patch14's text tower
    "clip-l-text": CLIPTextEncoderConfig(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                        num_attention_heads=12)),
    # stable-diffusion-xl-base-1.0, text_encoder_2: OpenCLIP ViT-bigG/14's text tower, projected to 1280
    "clip-bigg-text": CLIPTextEncoderConfig(
        CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", pad_token_id=1, pool="eos"), projection_dim=1280),
}

FAMILY = Family(
    name="clip_text",
    model=CLIPTextEncoder,
    layouts={"transformers": Layout("transformers", _read, _write, _key_map)},
    presets=PRESETS,
    description="CLIP's text tower alone (CLIPTextModel / CLIPTextModelWithProjection): diffusion text encoders",
)
