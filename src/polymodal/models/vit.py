"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos        (patch embedding, [CLS], learned 1-D positions)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1};  z_l = MLP(LN(z'_l)) + z'_l
    y = LN(z_L)

ViT-B/16 turns a 224x224x3 image into 196 patches of 768, prepends [CLS] (197 x 768) and runs 12 blocks
whose MLP widens 768 -> 3072 -> 768. The paper's tricks are options: global average pooling instead of
[CLS] (`pool="gap"`), 1-D / 2-D / sine-cosine / no position encoding (`position`), and a hybrid stem
(`backbone`: a ResNet feature map cut into 1x1 patches). Positions are interpolated for other resolutions.

Checked against transformers' `ViTModel` / `ViTForImageClassification` and timm's `vit_*` models
(tests/test_vit.py). Module names follow timm's, so timm checkpoints map onto ours one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.nn import Block, LearnedPosition2D, PatchEmbed, interpolate_pos_2d, sincos_2d
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    class_token: bool = True
    pool: Literal["cls", "gap"] = "cls"
    position: Literal["learned", "learned_2d", "sincos", "none"] = "learned"
    num_labels: int = 0  # > 0: a linear classification head on the pooled feature
    pooler: bool = False  # transformers' ViTModel pooler (dense + tanh on [CLS]); kept for round trips
    backbone: str | None = None  # a ResNet preset name: the hybrid stem (the patch embedding then runs on its map)
    id2label: tuple[str, ...] = ()

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.stem_stride // self.patch_size
        return side, side

    @property
    def stem_stride(self) -> int:
        return 1 if self.backbone is None else _backbone_stride(self.backbone)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)


def _backbone(name: str) -> nn.Module:
    from polymodal.models.resnet import PRESETS, ResNetFeatures

    return ResNetFeatures(PRESETS[name])


def _backbone_stride(name: str) -> int:
    from polymodal.models.resnet import PRESETS

    return PRESETS[name].feature_stride


class ViT(nn.Module):
    """pixel_values (B, C, H, W) -> tokens (B, 1+N, D) after the final LayerNorm (transformers' `last_hidden_state`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.backbone = _backbone(c.backbone) if c.backbone else None
        in_channels = self.backbone.out_channels if self.backbone is not None else c.num_channels
        self.patch_embed = PatchEmbed(in_channels, D, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.class_token else None
        n_pos = c.grid[0] * c.grid[1] + c.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D)) if c.position == "learned" else None
        self.pos_2d = LearnedPosition2D(c.grid, D) if c.position == "learned_2d" else None
        self.blocks = nn.ModuleList(
            Block(D, c.num_attention_heads, c.intermediate_size, act=c.hidden_act, eps=c.layer_norm_eps,
                  qkv_bias=c.qkv_bias)
            for _ in range(c.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.pooler = nn.Linear(D, D) if c.pooler else None
        self.head = nn.Linear(D, c.num_labels) if c.num_labels else None
        self._sincos: dict = {}

    def positions(self, h: int, w: int, x: Tensor) -> Tensor | None:
        """Position encodings for an h x w patch grid -> (1, prefix + h*w, D), or None."""
        c = self.config
        if c.position == "none":
            return None
        if c.position == "sincos":
            key = (h, w, x.device, x.dtype)
            if key not in self._sincos:
                grid = sincos_2d(h, w, c.hidden_size).to(x)
                prefix = torch.zeros(c.num_prefix_tokens, c.hidden_size).to(x)
                self._sincos[key] = torch.cat([prefix, grid])[None]
            return self._sincos[key]
        if c.position == "learned_2d":
            grid = self.pos_2d(h, w)  # (h*w, D); the class token gets no position, as in the paper's 2-D variant
            return torch.cat([grid.new_zeros(c.num_prefix_tokens, grid.shape[1]), grid])[None]
        pos = self.pos_embed
        if (h, w) != c.grid:  # ViT sec. 3.2: 2-D interpolation for other resolutions
            p = c.num_prefix_tokens
            pos = torch.cat([pos[0, :p], interpolate_pos_2d(pos[0, p:], c.grid, (h, w))])[None]
        return pos

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values
        if x.ndim != 4 or x.shape[1] != self.config.num_channels:
            raise ValueError(f"expected pixel_values (B, {self.config.num_channels}, H, W), got {tuple(x.shape)}")
        if self.backbone is not None:
            x = self.backbone(x)  # (B, C', H/s, W/s)
        P = self.config.patch_size
        h, w = x.shape[-2] // P, x.shape[-1] // P
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        pos = self.positions(h, w, x)
        if pos is not None:
            x = x + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if self.config.pool == "cls" else x

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """The image representation (B, D): the normed [CLS] token, or the normed mean of the patch tokens (GAP)."""
        x = self(pixel_values)
        if self.config.pool == "cls":
            return x[:, 0]
        return self.norm(x[:, self.config.num_prefix_tokens :].mean(1))

    def classify(self, pixel_values: Tensor) -> Tensor:
        """Class logits (B, num_labels)."""
        if self.head is None:
            raise ValueError("this ViT has no classification head (num_labels=0)")
        return self.head(self.pooled(pixel_values))


# ----------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, ViTConfig] = {
    "vit-tiny-test": ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8),
    "vit-ti/16": ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "vit-s/16": ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit-b/16": ViTConfig(),
    "vit-b/32": ViTConfig(patch_size=32),
    "vit-l/16": ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vit-h/14": ViTConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                          patch_size=14),
}
HUB_IDS = {
    "google/vit-base-patch16-224": "vit-b/16",
    "google/vit-base-patch16-224-in21k": "vit-b/16",
    "google/vit-base-patch32-224-in21k": "vit-b/32",
    "google/vit-large-patch16-224": "vit-l/16",
    "google/vit-huge-patch14-224-in21k": "vit-h/14",
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k": "vit-b/16",
    "timm/vit_small_patch16_224.augreg_in21k_ft_in1k": "vit-s/16",
    "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k": "vit-ti/16",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `embeddings.*`, `encoder.layer.{i}.*` with q/k/v apart; ViTForImageClassification adds a
# `vit.` prefix and a `classifier`.


def _hf_key_map(c: ViTConfig) -> KeyMap:
    v, layer = ("vit." if c.num_labels else ""), "encoder.layer.{i}"
    return KeyMap([
        Rename(f"{v}embeddings.cls_token", "cls_token"),
        Rename(f"{v}embeddings.position_embeddings", "pos_embed"),
        Rename(f"{v}embeddings.patch_embeddings.projection.{{p}}", "patch_embed.proj.{p}"),
        Drop(f"{v}embeddings.mask_token"),
        *[Fuse(tuple(f"{v}{layer}.attention.attention.{n}.{p}" for n in ("query", "key", "value")),
               f"blocks.{{i}}.attn.qkv.{p}") for p in ("weight", "bias")],
        Rename(f"{v}{layer}.attention.output.dense.{{p}}", "blocks.{i}.attn.proj.{p}"),
        Rename(f"{v}{layer}.layernorm_before.{{p}}", "blocks.{i}.norm1.{p}"),
        Rename(f"{v}{layer}.layernorm_after.{{p}}", "blocks.{i}.norm2.{p}"),
        Rename(f"{v}{layer}.intermediate.dense.{{p}}", "blocks.{i}.mlp.fc1.{p}"),
        Rename(f"{v}{layer}.output.dense.{{p}}", "blocks.{i}.mlp.fc2.{p}"),
        Rename(f"{v}layernorm.{{p}}", "norm.{p}"),
        Rename("pooler.dense.{p}", "pooler.{p}"),
        Rename("classifier.{p}", "head.{p}"),
    ])


def _read_hf(raw: dict, shapes: dict) -> ViTConfig:
    n = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0
    labels = {str(k): v for k, v in (raw.get("id2label") or {}).items()}
    return from_dict(ViTConfig, raw, pooler="pooler.dense.weight" in shapes, num_labels=n,
                     id2label=tuple(labels.get(str(i), f"LABEL_{i}") for i in range(n)))


def _write_hf(c: ViTConfig) -> dict:
    if c.pool != "cls" or c.position != "learned" or not c.class_token or c.backbone:
        raise ValueError("transformers' ViT layout holds only the [CLS] + learned 1-D position variant; "
                         "save this model in timm's or polymodal's layout instead")
    out = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification" if c.num_labels else "ViTModel"],
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps, "image_size": c.image_size,
        "patch_size": c.patch_size, "num_channels": c.num_channels, "qkv_bias": c.qkv_bias,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    if c.num_labels:
        names = c.id2label or tuple(f"LABEL_{i}" for i in range(c.num_labels))
        out["id2label"] = {str(i): n for i, n in enumerate(names)}
        out["label2id"] = {n: i for i, n in enumerate(names)}
    return out


# timm: our names are timm's. A `vit_*` architecture name gives the size; the shapes give the rest.
def _read_timm(raw: dict, shapes: dict) -> ViTConfig:
    args = dict(raw.get("model_args") or {})
    D = shapes["patch_embed.proj.weight"][0]
    patch = shapes["patch_embed.proj.weight"][-1]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    heads = args.get("num_heads") or _TIMM_HEADS.get(D)
    if heads is None:
        raise ValueError(f"cannot tell the number of heads of a width-{D} timm ViT; add model_args.num_heads")
    pool = raw.get("global_pool") or args.get("global_pool") or "token"
    pre = raw.get("pretrained_cfg") or {}
    n_pos = shapes["pos_embed"][1] if "pos_embed" in shapes else 0
    cls = "cls_token" in shapes
    side = round((n_pos - int(cls)) ** 0.5) if n_pos else (pre.get("input_size") or [3, 224, 224])[-1] // patch
    img = args.get("img_size") or side * patch
    if isinstance(img, (list, tuple)):
        img = img[-1]
    return ViTConfig(
        hidden_size=D, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=shapes["blocks.0.mlp.fc1.weight"][0], hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=img, patch_size=patch, num_channels=shapes["patch_embed.proj.weight"][1],
        qkv_bias="blocks.0.attn.qkv.bias" in shapes, class_token=cls,
        pool="gap" if pool == "avg" else "cls", position="learned" if "pos_embed" in shapes else "none",
        num_labels=shapes["head.weight"][0] if "head.weight" in shapes else 0,
    )


_TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _write_timm(c: ViTConfig) -> dict:
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(c.hidden_size, "base")
    return {
        "architecture": f"vit_{size}_patch{c.patch_size}_{c.image_size}",
        "num_classes": c.num_labels, "num_features": c.hidden_size,
        "global_pool": "avg" if c.pool == "gap" else "token",
        "model_args": {"img_size": c.image_size, "patch_size": c.patch_size, "embed_dim": c.hidden_size,
                       "depth": c.num_hidden_layers, "num_heads": c.num_attention_heads,
                       "mlp_ratio": c.intermediate_size / c.hidden_size, "qkv_bias": c.qkv_bias,
                       "class_token": c.class_token, "num_classes": c.num_labels,
                       "global_pool": "avg" if c.pool == "gap" else "token"},
        "pretrained_cfg": {"input_size": [c.num_channels, c.image_size, c.image_size]},
    }


def _timm_key_map(c: ViTConfig) -> KeyMap:
    # timm's GAP models normalize after pooling, in `fc_norm`; their `norm` is an Identity with no weights
    return KeyMap([Rename("fc_norm.{p}", "norm.{p}")] if c.pool == "gap" else [])


def _read_native(raw: dict, shapes: dict) -> ViTConfig:
    return from_dict(ViTConfig, raw)


def _write_native(c: ViTConfig) -> dict:
    from polymodal.config import to_dict

    return {"model_type": "polymodal-vit", **to_dict(c)}


FAMILY = Family(
    name="vit",
    model=ViT,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "timm": Layout("timm", _read_timm, _write_timm, _timm_key_map),
        "polymodal": Layout("polymodal", _read_native, _write_native, lambda c: KeyMap()),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Vision Transformer (CLS/GAP, 1-D/2-D/sine-cosine/no positions, hybrid ResNet stem)",
)
