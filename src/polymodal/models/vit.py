"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos        (patch embedding, [CLS], learned 1-D positions)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1};  z_l = MLP(LN(z'_l)) + z'_l
    y = LN(z_L)

ViT-B/16 turns a 224x224x3 image into 196 patches of 768, prepends [CLS] (197 x 768) and runs 12 blocks
whose MLP widens 768 -> 3072 -> 768. The paper's tricks are options: global average pooling instead of
[CLS] (`pool="gap"`), learned 1-D / 2-D or no position encoding (`position`), and a hybrid stem (`backbone`:
a ResNet feature map cut into patches, 1x1 in the paper). Fixed 2-D sine-cosine positions come from later
work (MAE; Beyer et al. 2022, "Better plain ViT baselines"). Positions are interpolated for other resolutions.

Checked against transformers' `ViTModel` / `ViTForImageClassification` and timm's `vit_*` models
(tests/test_vit.py). Module names follow timm's, so timm checkpoints map onto ours one to one.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.nn import Block, LearnedPosition2D, PatchEmbed, interpolate_pos_2d, sincos_2d
from polymodal.processing.image import ImageProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename
from polymodal.weights.record import record


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

    def __post_init__(self):
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
        if self.position not in ("learned", "learned_2d", "sincos", "none"):
            raise ValueError(f"position must be 'learned', 'learned_2d', 'sincos' or 'none', got {self.position!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs the class token; use pool='gap' with class_token=False")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

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


def _resnet_preset(name: str):
    from polymodal.models.resnet import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown hybrid backbone {name!r}; ResNet presets: {sorted(PRESETS)}")
    return PRESETS[name]


def _backbone(name: str) -> nn.Module:
    from polymodal.models.resnet import ResNetFeatures

    return ResNetFeatures(_resnet_preset(name))


def _backbone_stride(name: str) -> int:
    return _resnet_preset(name).feature_stride


def blocks_for_layer(layer: int, depth: int) -> int:
    """How many of an encoder's `depth` blocks produce hidden state `layer`, numbered as transformers'
    `hidden_states`: 0 is the blocks' input, k the output of block k, negative counts from the end (-1 = depth)."""
    layer = operator.index(layer)
    if not -depth - 1 <= layer <= depth:
        raise ValueError(f"layer {layer} does not exist in an encoder of {depth} blocks: its hidden states are 0 "
                         f"(the embeddings) to {depth}, or {-depth - 1} to -1 counted from the end")
    return layer % (depth + 1)


def _fits_transformers(c: ViTConfig) -> bool:
    """transformers' ViT holds only the paper's default: [CLS] pooling, learned 1-D positions, no hybrid stem."""
    return c.pool == "cls" and c.position == "learned" and c.class_token and not c.backbone


class ViT(nn.Module):
    """pixel_values (B, C, H, W) -> tokens (B, 1+N, D).

    With [CLS] pooling the tokens come after the final LayerNorm (transformers' `last_hidden_state`, timm's
    `forward_features`). With GAP the LayerNorm is applied after pooling (timm's `fc_norm`), so the tokens
    are returned un-normed, as timm's `forward_features` returns them.
    """

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
        if not _fits_transformers(c):  # pm.save's default layout (transformers') cannot hold this variant
            record(self).layout = "polymodal"

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
        # ViT sec. 3.2: 2-D interpolation for other resolutions. Bicubic, align_corners=False, no antialiasing:
        # transformers' `interpolate_pos_encoding=True` exactly. timm's `dynamic_img_size` antialiases, which
        # changes upsampling too, so a timm checkpoint at another resolution follows transformers' recipe here.
        if (h, w) != c.grid:
            p = c.num_prefix_tokens
            pos = torch.cat([pos[0, :p], interpolate_pos_2d(pos[0, p:], c.grid, (h, w))])[None]
        return pos

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self._tokens(pixel_values)

    def _tokens(self, pixel_values: Tensor, keep_first: int | None = None) -> Tensor:
        """The token sequence; with keep_first=n the last block computes only the first n outputs."""
        x = self._embed(pixel_values)
        for i, block in enumerate(self.blocks):
            x = block(x, keep_first=keep_first if i == len(self.blocks) - 1 else None)
        return self.norm(x) if self.config.pool == "cls" else x

    def _embed(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) -> the tokens the blocks take, (B, prefix + N, D)."""
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
        return x if pos is None else x + pos

    def features(self, pixel_values: Tensor, layer: int = -1, keep_cls: bool = True) -> Tensor:
        """Hidden state `layer` -> (B, 1+N, D), or (B, N, D) without [CLS]: transformers' `ViTModel(...,
        output_hidden_states=True).hidden_states[layer]`. 0 is the embeddings (patches, [CLS], positions), k the
        output of block k, negative counts from the end; before the final LayerNorm. Only the blocks up to `layer`
        run."""
        x = self._embed(pixel_values)
        for block in self.blocks[: blocks_for_layer(layer, len(self.blocks))]:
            x = block(x)
        return x if keep_cls else x[:, self.config.num_prefix_tokens :]

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """The image representation (B, D): the normed [CLS] token, or the normed mean of the patch tokens (GAP)."""
        if self.config.pool == "cls":  # only [CLS] is read out, so the last block computes it alone
            return self._tokens(pixel_values, keep_first=1)[:, 0]
        x = self(pixel_values)
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
    if not _fits_transformers(c):
        raise ValueError(f"transformers' ViT holds only [CLS] pooling with learned 1-D positions and no hybrid "
                         f"stem, not pool={c.pool!r}, position={c.position!r}, class_token={c.class_token}, "
                         f"backbone={c.backbone!r}; save it in polymodal's layout "
                         "(pm.record(model).layout = 'polymodal')")
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


# timm: our module names are timm's, so its keys are ours. A timm `config.json` names a registered
# architecture (`vit_base_patch16_224`) and the `model_args` that override its defaults; the shapes settle
# width, depth, MLP size and grid. Only the plain architectures are read: other `vit_*` factories hide
# defaults (CLIP's pre-norm and QuickGELU, DINOv2's layer scale, SigLIP's attention pooling) that a config
# file does not spell out.
_TIMM_ARCH = re.compile(r"vit_(tiny|small|base|large|huge|giant|gigantic)_patch\d+_\d+")
_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}
_TIMM_SIZES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
               1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}
# timm VisionTransformer arguments this ViT does not have, with the value that means "as in the paper"
_TIMM_PLAIN = {"qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "proj_bias": True,
               "init_values": None, "no_embed_class": False, "reg_tokens": 0, "pre_norm": False,
               "final_norm": True, "pool_include_prefix": False, "dynamic_img_pad": False,
               "embed_norm_layer": None, "norm_layer": None}
_TIMM_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
              "silu": "silu"}  # timm `act_layer` -> transformers `hidden_act`
_TO_TIMM_ACT = {**{v: k for k, v in _TIMM_ACTS.items()}, "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "swish": "silu"}


def _read_timm(raw: dict, shapes: dict) -> ViTConfig:
    arch = str(raw.get("architecture"))
    size = _TIMM_ARCH.fullmatch(arch)
    if size is None:
        raise ValueError(f"timm architecture {arch!r} is not a plain ViT (vit_<size>_patch<P>_<resolution>)")
    args = dict(raw.get("model_args") or {})
    pool = args.get("global_pool", raw.get("global_pool", "token"))
    act = args.get("act_layer") or "gelu"
    odd = [f"{k}={args[k]!r}" for k, plain in _TIMM_PLAIN.items() if args.get(k, plain) != plain]
    odd += [f"global_pool={pool!r}"] if pool not in ("token", "avg") else []
    odd += [f"fc_norm={args['fc_norm']!r}"] if args.get("fc_norm", pool == "avg") != (pool == "avg") else []
    odd += [f"act_layer={act!r}"] if act not in _TIMM_ACTS else []
    if odd:
        raise ValueError(f"timm ViT options polymodal does not build: {', '.join(odd)}")
    D, C, Ph, P = shapes["patch_embed.proj.weight"]
    if Ph != P:
        raise ValueError(f"non-square patches {Ph}x{P} are not supported")
    cls = "cls_token" in shapes
    if "pos_embed" in shapes:
        side = round((shapes["pos_embed"][1] - int(cls)) ** 0.5)
        image = side * P
    else:
        image = args.get("img_size") or (raw.get("pretrained_cfg") or {}).get("input_size", [0, 224])[-1]
    if isinstance(image, (list, tuple)):
        if image[0] != image[-1]:
            raise ValueError(f"non-square img_size {image} is not supported")
        image = image[0]
    return ViTConfig(
        hidden_size=D, num_hidden_layers=len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
        num_attention_heads=args.get("num_heads", _TIMM_HEADS[size.group(1)]),
        intermediate_size=shapes["blocks.0.mlp.fc1.weight"][0], hidden_act=_TIMM_ACTS[act],
        layer_norm_eps=1e-6, image_size=image, patch_size=P, num_channels=C,
        qkv_bias="blocks.0.attn.qkv.bias" in shapes, class_token=cls,
        pool="gap" if pool == "avg" else "cls", position="learned" if "pos_embed" in shapes else "none",
        num_labels=shapes["head.weight"][0] if "head.weight" in shapes else 0,
        id2label=tuple(str(n) for n in raw.get("label_names") or ()),
    )


def _write_timm(c: ViTConfig) -> dict:
    # timm's LayerNorm eps is fixed at 1e-6; a model read with another (transformers' 1e-12) is written as is
    if c.position not in ("learned", "none") or c.backbone or c.pooler or c.hidden_act not in _TO_TIMM_ACT:
        raise ValueError("timm's VisionTransformer holds learned 1-D or no positions, no hybrid stem, no pooler "
                         "and the activations gelu/gelu_tanh/quick_gelu/relu/silu; save this model in "
                         "polymodal's layout instead (pm.record(model).layout = 'polymodal')")
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:  # timm sizes the MLP as int(dim * mlp_ratio)
        ratio = (c.intermediate_size + 0.5) / c.hidden_size
    pool = "avg" if c.pool == "gap" else "token"
    args = {"img_size": c.image_size, "patch_size": c.patch_size, "in_chans": c.num_channels,
            "embed_dim": c.hidden_size, "depth": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "mlp_ratio": ratio, "qkv_bias": c.qkv_bias, "class_token": c.class_token, "global_pool": pool,
            "pos_embed": "learn" if c.position == "learned" else "none", "num_classes": c.num_labels}
    if c.hidden_act != "gelu":
        args["act_layer"] = _TO_TIMM_ACT[c.hidden_act]
    out = {"architecture": _TIMM_SIZES.get(c.hidden_size, "vit_base_patch16_224"), "num_classes": c.num_labels,
           "num_features": c.hidden_size, "global_pool": pool, "model_args": args,
           "pretrained_cfg": {"input_size": [c.num_channels, c.image_size, c.image_size],
                              "num_classes": c.num_labels}}
    if c.id2label:
        out["label_names"] = list(c.id2label)
    return out


def _timm_key_map(c: ViTConfig) -> KeyMap:
    # timm's GAP models normalize after pooling, in `fc_norm`; their `norm` is an Identity with no weights
    return KeyMap([Rename("fc_norm.{p}", "norm.{p}")] if c.pool == "gap" else [])


FAMILY = Family(
    name="vit",
    model=ViT,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "timm": Layout("timm", _read_timm, _write_timm, _timm_key_map),
        "polymodal": native_layout("vit", ViTConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Vision Transformer (CLS/GAP, 1-D/2-D/sine-cosine/no positions, hybrid ResNet stem)",
    image_processor=lambda c: ImageProcessor.vit(size=c.image_size),
    tasks=("image-classification",),
)
