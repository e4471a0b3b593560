"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

An image tower and a text tower each end in a linear projection to a shared space of width P; the model
scores an (image, text) pair by the cosine of their embeddings times a learned temperature:

    I = f_img(image) W_i    (B, P)        T = f_txt(text) W_t    (B, P)
    logits = exp(t) * normalize(I) @ normalize(T).T

* Image tower, ViT: patch embedding without bias, a learned class embedding and learned positions, a
  LayerNorm *before* the blocks (`ln_pre`, CLIP's addition to ViT), pre-norm blocks, LayerNorm on the class
  token, projection.
* Image tower, ModifiedResNet (paper sec. 2.4): a 3-convolution stem with average pooling, bottlenecks whose
  strided convolutions are replaced by stride-1 convolutions followed by an average pool (anti-aliasing, Zhang
  2019), and attention pooling: the mean of the feature map, plus a positional embedding, queries the whole map
  through one multi-head attention whose output projection is the embedding projection.
* Text tower: token + learned position embeddings, a causal transformer, a final LayerNorm, the feature of the
  end-of-text token, projection.
* OpenAI's checkpoints use QuickGELU (x * sigmoid(1.702 x)); later open_clip models use GELU.

Checked against transformers' `CLIPModel` (`get_image_features` / `get_text_features`) and open_clip's `CLIP`
with both towers (tests/test_clip.py). Module names follow open_clip's (OpenAI's) where a block is CLIP's own
and the shared blocks' names (`blocks.{i}.attn.qkv`, `norm1`, `mlp.fc1`) elsewhere; the key maps at the bottom
translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.models.vit import blocks_for_layer
from polymodal.nn import Attention, Block, PatchEmbed, interpolate_pos_2d
from polymodal.processing.image import ImageProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename, Transform

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image normalization CLIP was trained with
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    # where the text feature is read: "eos" = first position of eos_token_id (transformers since #24773);
    # "argmax" = position of the largest id (OpenAI's rule: <end_of_text> is the last entry of the vocabulary)
    pool: Literal["eos", "argmax"] = "argmax"

    def __post_init__(self):
        if self.pool not in ("eos", "argmax"):
            raise ValueError(f"CLIPTextConfig.pool must be 'eos' or 'argmax', got {self.pool!r}")
        _check_heads("CLIPTextConfig", self.hidden_size, self.num_attention_heads)


@dataclass(frozen=True)
class CLIPVisionConfig:
    tower: Literal["vit", "resnet"] = "vit"
    # ViT tower (transformers' CLIPVisionConfig names)
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # for the ResNet: the heads of the attention pooling
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # ModifiedResNet tower (open_clip's names): bottlenecks per stage and the stem width
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64

    def __post_init__(self):
        if self.tower not in ("vit", "resnet"):
            raise ValueError(f"CLIPVisionConfig.tower must be 'vit' or 'resnet', got {self.tower!r}")
        if self.tower == "vit":
            _check_heads("CLIPVisionConfig", self.hidden_size, self.num_attention_heads)
        else:
            if len(self.layers) != 4:
                raise ValueError(f"a ModifiedResNet has 4 stages; CLIPVisionConfig.layers={self.layers!r}")
            _check_heads("CLIPVisionConfig (attention pooling)", self.feature_dim, self.num_attention_heads)

    @property
    def feature_dim(self) -> int:
        """Width of the ResNet's last feature map: 4 (bottleneck expansion) * 8 (stage 4) * stem width."""
        return self.width * 32

    @property
    def grid(self) -> int:
        """Side of the token grid: image_size / patch_size for the ViT, image_size / 32 for the ResNet."""
        return self.image_size // (self.patch_size if self.tower == "vit" else 32)


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), the paper's initial temperature


def _check_heads(where: str, dim: int, heads: int) -> None:
    if heads <= 0 or dim % heads:
        raise ValueError(f"{where}: width {dim} is not divisible by {heads} attention heads")


# ---------------------------------------------------------------------------------------------- towers


class VisionTransformer(nn.Module):
    """pixel_values (B, C, H, W) -> image embedding (B, P); without a projection (`projection_dim=None`, the tower
    as transformers' `CLIPVisionModel` and LLaVA hold it) the normed class token (B, D), its `pooler_output`.
    `features` gives the tokens of any layer."""

    def __init__(self, c: CLIPVisionConfig, projection_dim: int | None = None):
        super().__init__()
        self.config = c
        D = c.hidden_size
        self.patch_embed = PatchEmbed(c.num_channels, D, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(c.grid**2 + 1, D) * D**-0.5)
        self.ln_pre = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(D, c.num_attention_heads, c.intermediate_size, act=c.hidden_act, eps=c.layer_norm_eps)
            for _ in range(c.num_hidden_layers)
        )
        self.ln_post = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.proj = nn.Linear(D, projection_dim, bias=False) if projection_dim is not None else None

    def positions(self, h: int, w: int) -> Tensor:
        """(1 + h*w, D); other grids than the trained one are interpolated bicubically (as transformers'
        `interpolate_pos_encoding`)."""
        pos, g = self.positional_embedding, self.config.grid
        if (h, w) == (g, g):
            return pos
        return torch.cat([pos[:1], interpolate_pos_2d(pos[1:], (g, g), (h, w))])

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) -> the tokens the blocks take, (B, 1+N, D): [CLS] and patches, positions, ln_pre."""
        x = pixel_values.to(self.patch_embed.proj.weight.dtype)
        P = self.config.patch_size
        h, w = x.shape[-2] // P, x.shape[-1] // P
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(h, w)  # (B, 1+N, D)
        return self.ln_pre(x)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embed(pixel_values)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, keep_first=1)  # only the class token is read out: the last block computes it alone
        x = self.ln_post(x[:, 0])  # (B, D)
        return x if self.proj is None else self.proj(x)  # (B, P)

    def features(self, pixel_values: Tensor, layer: int = -1, keep_cls: bool = True) -> Tensor:
        """Hidden state `layer` -> (B, 1+N, D), or (B, N, D) without [CLS]: transformers' `CLIPVisionModel(...,
        output_hidden_states=True).hidden_states[layer]`. 0 is the embeddings after ln_pre, k the output of block
        k, negative counts from the end (-1: the last block's); before ln_post and unprojected. Only the blocks up
        to `layer` run. LLaVA reads layer -2, without [CLS] ("default") or with it ("full")."""
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"expected pixel_values (B, {c.num_channels}, H, W), got {tuple(pixel_values.shape)}")
        x = self.embed(pixel_values)
        for block in self.blocks[: blocks_for_layer(layer, len(self.blocks))]:
            x = block(x)
        return x if keep_cls else x[:, 1:]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avg-pool] -> 1x1 (x4 channels), plus a shortcut that pools before its 1x1 convolution.

    Every convolution has stride 1; downsampling is an average pool after the 3x3 convolution (CLIP's
    anti-aliased ResNet, where torchvision would use a strided convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(self.pool(x))
        return F.relu(out + shortcut)


class AttentionPool(nn.Module):
    """(B, C, h, w) -> (B, P): the mean feature (plus position 0) attends over [mean; all h*w features].

    Only the mean token's query is computed, which is all the reference keeps of its full self-attention."""

    def __init__(self, grid: int, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.grid = grid
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) * dim**-0.5)
        self.attn = Attention(dim, num_heads, context_dim=dim, out_dim=out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.grid, self.grid):
            raise ValueError(
                f"the ResNet's attention pooling was built for a {self.grid}x{self.grid} feature map (images of "
                f"{self.grid * 32} pixels); got {tuple(x.shape[-2:])} from an image of {x.shape[-2] * 32} pixels"
            )
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding  # (B, 1+h*w, C)
        return self.attn(x[:, :1], x)[:, 0]  # (B, P)


class ModifiedResNet(nn.Module):
    """pixel_values (B, 3, H, W) -> image embedding (B, P). RN50: layers (3, 4, 6, 3), width 64, 224 px."""

    def __init__(self, c: CLIPVisionConfig, projection_dim: int):
        super().__init__()
        self.config = c
        w = c.width
        self.conv1 = nn.Conv2d(c.num_channels, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for i, n in enumerate(c.layers):
            planes, stride = w * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool(c.grid, c.feature_dim, c.num_attention_heads, projection_dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 w, H/32, W/32)
        return self.attnpool(x)


class TextTransformer(nn.Module):
    """input_ids (B, T) [, attention_mask (B, T)] -> text embedding (B, P)."""

    def __init__(self, c: CLIPTextConfig, projection_dim: int):
        super().__init__()
        self.config = c
        D = c.hidden_size
        self.token_embedding = nn.Embedding(c.vocab_size, D)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(c.max_position_embeddings, D) * 0.01)
        self.blocks = nn.ModuleList(
            Block(D, c.num_attention_heads, c.intermediate_size, act=c.hidden_act, eps=c.layer_norm_eps,
                  causal=True)
            for _ in range(c.num_hidden_layers)
        )
        self.ln_final = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.proj = nn.Linear(D, projection_dim, bias=False)

    def eot_positions(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B,) index of the token whose feature represents the text."""
        if self.config.pool == "argmax":
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # the first end-of-text token

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {T} tokens; this CLIP text tower holds {self.config.max_position_embeddings}"
            )
        pooled = self.eot_positions(input_ids)  # (B,)
        # Attention is causal, so no position after the last pooled one can reach a pooled feature: drop them.
        # (Zero-shot prompts of ~10 tokens padded to 77 cost ~10 positions instead of 77; the result is exact.)
        T = int(pooled.max()) + 1
        input_ids = input_ids[:, :T]
        attention_mask = None if attention_mask is None else attention_mask[:, :T]
        x = self.token_embedding(input_ids) + self.positional_embedding[:T]  # (B, T, D)
        mask = None
        if attention_mask is not None:
            # keys that are real tokens; each query also keeps itself, so that the rows of (left) padding are
            # not fully masked: those would turn to NaN and leak into real tokens through 0 * NaN next layer.
            # Real tokens attend exactly as without the diagonal (the causal mask already includes it).
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            mask = attention_mask.bool()[:, None, None, :] | eye  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        x = x[torch.arange(B, device=x.device), pooled]  # (B, D)
        return self.proj(self.ln_final(x))  # LayerNorm is per token: normalizing only the pooled one is enough


# ----------------------------------------------------------------------------------------------- model


class CLIP(nn.Module):
    """The two towers and the temperature. `encode_*` return unnormalized embeddings (B, P), like
    transformers' `get_image_features` / `get_text_features`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        tower = VisionTransformer if c.vision.tower == "vit" else ModifiedResNet
        self.visual = tower(c.vision, c.projection_dim)
        self.text = TextTransformer(c.text, c.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init_value)))  # log of the scale

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, P)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision.num_channels:
            raise ValueError(
                f"expected pixel_values (B, {self.config.vision.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        return self.visual(pixel_values)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) token ids [, (B, T) mask with 1 for real tokens] -> (B, P)."""
        if input_ids.ndim != 2:
            raise ValueError(f"expected input_ids (B, T), got {tuple(input_ids.shape)}")
        return self.text(input_ids, attention_mask)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)): scaled cosine similarities."""
        image = F.normalize(self.encode_image(pixel_values), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits_per_image = self.logit_scale.exp() * image @ text.T
        return logits_per_image, logits_per_image.T


# ----------------------------------------------------------------------------------------------- presets


def _openai_vit(patch: int, image: int = 224, large: bool = False) -> CLIPConfig:
    if large:
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=image, patch_size=patch)
        return CLIPConfig(text, vision, projection_dim=768)
    return CLIPConfig(CLIPTextConfig(), CLIPVisionConfig(image_size=image, patch_size=patch), projection_dim=512)


def _openai_resnet(layers: tuple[int, ...], width: int, image: int, text_width: int, dim: int) -> CLIPConfig:
    text = CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                          num_attention_heads=text_width // 64)
    vision = CLIPVisionConfig(tower="resnet", layers=layers, width=width, image_size=image,
                              num_attention_heads=width * 32 // 64)
    return CLIPConfig(text, vision, projection_dim=dim)


def _gelu(c: CLIPConfig) -> CLIPConfig:
    """The same architecture with GELU, as open_clip trains its own models (LAION, DataComp)."""
    return replace(c, text=replace(c.text, hidden_act="gelu"), vision=replace(c.vision, hidden_act="gelu"))


_TINY_TEXT = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=97, eos_token_id=98,
                            pad_token_id=0)
PRESETS: dict[str, CLIPConfig] = {
    "clip-tiny-test": CLIPConfig(
        _TINY_TEXT,
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
        projection_dim=16,
    ),
    "clip-resnet-tiny-test": CLIPConfig(
        _TINY_TEXT,
        CLIPVisionConfig(tower="resnet", layers=(1, 1, 1, 1), width=8, num_attention_heads=4, image_size=64),
        projection_dim=16,
    ),
    # OpenAI's released models (QuickGELU); names are the hub ids / open_clip model names
    "openai/clip-vit-base-patch32": _openai_vit(32),
    "openai/clip-vit-base-patch16": _openai_vit(16),
    "openai/clip-vit-large-patch14": _openai_vit(14, large=True),
    "openai/clip-vit-large-patch14-336": _openai_vit(14, 336, large=True),
    "RN50": _openai_resnet((3, 4, 6, 3), 64, 224, 512, 1024),
    "RN101": _openai_resnet((3, 4, 23, 3), 64, 224, 512, 512),
    "RN50x4": _openai_resnet((4, 6, 10, 6), 80, 288, 640, 640),
    "RN50x16": _openai_resnet((6, 8, 18, 8), 96, 384, 768, 768),
    "RN50x64": _openai_resnet((3, 15, 36, 10), 128, 448, 1024, 1024),
    # open_clip's own trainings (GELU)
    "ViT-B-32": _gelu(_openai_vit(32)),
    "ViT-B-16": _gelu(_openai_vit(16)),
    "ViT-L-14": _gelu(_openai_vit(14, large=True)),
    "ViT-H-14": _gelu(CLIPConfig(
        CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         patch_size=14),
        projection_dim=1024,
    )),
}
HUB_IDS = {
    "openai/clip-vit-base-patch32": "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16": "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14": "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "timm/resnet50_clip.openai": "RN50",
    "timm/resnet101_clip.openai": "RN101",
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": "ViT-B-32",
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K": "ViT-L-14",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": "ViT-H-14",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers (CLIPModel): `vision_model.*` / `text_model.*` with q/k/v apart, projections as Linear.


def _hf_only_vit(c: CLIPVisionConfig) -> None:
    if c.tower != "vit":
        raise ValueError("transformers' CLIP holds only ViT image towers; to save a ResNet CLIP set "
                         "pm.record(model).layout = 'open_clip' (or 'polymodal') before pm.save")


def hf_vision_key_map(c: CLIPVisionConfig) -> KeyMap:
    """transformers' CLIP vision transformer -> `VisionTransformer`: `embeddings.*`, `pre_layrnorm`,
    `encoder.layers.{i}.*`, `post_layernorm`. Composites mount it (`KeyMap.nested`): `CLIPModel` under
    `vision_model.`, `CLIPVisionModel` files at the top (5.x) or under `vision_model.` (4.x), LLaVA under
    `vision_tower.vision_model.`."""
    _hf_only_vit(c)
    return KeyMap([
        Drop("embeddings.position_ids"),  # a buffer older checkpoints carry
        Rename("embeddings.class_embedding", "class_embedding"),
        Rename("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
        Rename("embeddings.position_embedding.weight", "positional_embedding"),
        Rename("pre_layrnorm.{p}", "ln_pre.{p}"),  # sic: transformers' spelling
        Rename("post_layernorm.{p}", "ln_post.{p}"),
        *_hf_encoder_rules(),
    ])


def _hf_text_key_map() -> KeyMap:
    return KeyMap([
        Drop("embeddings.position_ids"),
        Rename("embeddings.token_embedding.weight", "token_embedding.weight"),
        Rename("embeddings.position_embedding.weight", "positional_embedding"),
        Rename("final_layer_norm.{p}", "ln_final.{p}"),
        *_hf_encoder_rules(),
    ])


def _hf_encoder_rules() -> list:
    layer = "encoder.layers.{i}"
    return [
        *[Fuse(tuple(f"{layer}.self_attn.{n}_proj.{p}" for n in "qkv"), f"blocks.{{i}}.attn.qkv.{p}")
          for p in ("weight", "bias")],
        Rename(f"{layer}.self_attn.out_proj.{{p}}", "blocks.{i}.attn.proj.{p}"),
        Rename(f"{layer}.layer_norm1.{{p}}", "blocks.{i}.norm1.{p}"),
        Rename(f"{layer}.layer_norm2.{{p}}", "blocks.{i}.norm2.{p}"),
        Rename(f"{layer}.mlp.{{fc}}.{{p}}", "blocks.{i}.mlp.{fc}.{p}"),
    ]


def _hf_key_map(c: CLIPConfig) -> KeyMap:
    projections = KeyMap([Rename("visual_projection.weight", "visual.proj.weight"),
                          Rename("text_projection.weight", "text.proj.weight")])
    return (projections + hf_vision_key_map(c.vision).nested("vision_model.", "visual.")
            + _hf_text_key_map().nested("text_model.", "text."))


def _square(size, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{what} {list(size)} is not square; CLIP towers here take square images")
        size = size[0]
    return int(size)


_HF_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "pad_token_id")
_HF_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "hidden_act", "layer_norm_eps")


def read_hf_vision_config(vision: dict, where: str = "vision_config") -> CLIPVisionConfig:
    """transformers' CLIPVisionConfig as JSON (the `vision_config` of a CLIPModel or a LLaVA, or a CLIPVisionModel's
    config.json) -> ours; `where` names it in errors."""
    extra = {"tower": "vit"}
    for key in ("image_size", "patch_size"):
        if key in vision:
            extra[key] = _square(vision[key], f"{where}.{key}")
    return from_dict(CLIPVisionConfig, vision, **extra)


def write_hf_vision_config(c: CLIPVisionConfig) -> dict:
    """Ours -> transformers' CLIPVisionConfig as JSON (`model_type: clip_vision_model`)."""
    _hf_only_vit(c)
    return {"model_type": "clip_vision_model", **{k: getattr(c, k) for k in _HF_VISION}}


def hf_vision_model_key_map(c: CLIPVisionConfig) -> KeyMap:
    """A transformers `CLIPVisionModel` checkpoint -> `VisionTransformer(c)`: its tensors under `vision_model.`
    (transformers 4.x, which pm.save writes and 5.x reads too) or at the top (files transformers 5.x writes)."""
    return hf_vision_key_map(c).nested({"vision_model.": "", "": ""}, "")


def _read_hf(raw: dict, shapes: dict) -> CLIPConfig:
    # old configs also carry `*_config_dict`, whose values transformers lets win
    text = {**(raw.get("text_config") or {}), **(raw.get("text_config_dict") or {})}
    vision = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
    vocab = text.get("vocab_size", CLIPTextConfig.vocab_size)
    eos = text.get("eos_token_id", CLIPTextConfig.eos_token_id)
    if eos == 2:
        # transformers' legacy marker (before PR #24773, e.g. the openai/* hub configs): pool at the largest id.
        # OpenAI's vocabulary ends in <start_of_text>, <end_of_text>: those are the real ids.
        extra = {"pool": "argmax", "bos_token_id": vocab - 2, "eos_token_id": vocab - 1}
    else:
        extra = {"pool": "eos"}
    return CLIPConfig(
        text=from_dict(CLIPTextConfig, text, **extra),
        vision=read_hf_vision_config(vision),
        projection_dim=raw.get("projection_dim", shapes.get("text_projection.weight", (512,))[0]),
        logit_scale_init_value=raw.get("logit_scale_init_value", CLIPConfig.logit_scale_init_value),
    )


def _write_hf(c: CLIPConfig) -> dict:
    t = c.text
    if t.pool == "eos" and t.eos_token_id == 2:
        raise ValueError("eos_token_id=2 means argmax pooling to transformers; this model pools at the first "
                         "token 2: save it in the open_clip or polymodal layout instead")
    text = {k: getattr(t, k) for k in _HF_TEXT}
    text["eos_token_id"] = 2 if t.pool == "argmax" else t.eos_token_id  # 2: transformers' argmax marker
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": c.projection_dim,
        "logit_scale_init_value": c.logit_scale_init_value,
        "text_config": {**text, "projection_dim": c.projection_dim},
        "vision_config": {**write_hf_vision_config(c.vision), "projection_dim": c.projection_dim},
    }


# open_clip / OpenAI: `visual.*`, `transformer.resblocks.*` with fused `in_proj_*`, projections stored
# (D, P) and applied as `x @ proj`.


def _t(x: Tensor) -> Tensor:
    return x.T


def _open_clip_key_map(c: CLIPConfig) -> KeyMap:
    def blocks(theirs: str, ours: str) -> list:
        b, o = f"{theirs}.resblocks.{{i}}", f"{ours}.blocks.{{i}}"
        return [
            Rename(f"{b}.ln_1.{{p}}", f"{o}.norm1.{{p}}"),
            Rename(f"{b}.ln_2.{{p}}", f"{o}.norm2.{{p}}"),
            Rename(f"{b}.attn.in_proj_weight", f"{o}.attn.qkv.weight"),  # already fused, in q, k, v order
            Rename(f"{b}.attn.in_proj_bias", f"{o}.attn.qkv.bias"),
            Rename(f"{b}.attn.out_proj.{{p}}", f"{o}.attn.proj.{{p}}"),
            Rename(f"{b}.mlp.c_fc.{{p}}", f"{o}.mlp.fc1.{{p}}"),
            Rename(f"{b}.mlp.c_proj.{{p}}", f"{o}.mlp.fc2.{{p}}"),
        ]

    rules: list = [
        Drop("input_resolution"),  # scalars in OpenAI's original state dicts
        Drop("context_length"),
        Drop("vocab_size"),
        Drop("attn_mask"),
        Rename("token_embedding.weight", "text.token_embedding.weight"),
        Rename("positional_embedding", "text.positional_embedding"),
        Rename("ln_final.{p}", "text.ln_final.{p}"),
        Transform("text_projection", "text.proj.weight", to_model=_t, from_model=_t),
        *blocks("transformer", "text"),
    ]
    if c.vision.tower == "vit":
        rules += [
            Rename("visual.conv1.weight", "visual.patch_embed.proj.weight"),
            Transform("visual.proj", "visual.proj.weight", to_model=_t, from_model=_t),
            *blocks("visual.transformer", "visual"),
        ]
    else:
        pool = "visual.attnpool"
        rules += [
            Rename(f"{pool}.q_proj.{{p}}", f"{pool}.attn.q.{{p}}"),
            Fuse((f"{pool}.k_proj.{{p}}", f"{pool}.v_proj.{{p}}"), f"{pool}.attn.kv.{{p}}"),
            Rename(f"{pool}.c_proj.{{p}}", f"{pool}.attn.proj.{{p}}"),
        ]
    return KeyMap(rules)


# open_clip options that change the computation: we build only the value given here
_OPEN_CLIP_FIXED = {
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type":
                   "learnable", "final_ln_after_pool": False, "pool_type": "tok", "timm_model_name": None,
                   "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False, "act_kwargs": None},
    "text_cfg": {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
                 "proj_bias": False, "proj_type": "linear", "hf_model_name": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False, "act_kwargs": None},
    "": {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False},
}


def _read_open_clip(raw: dict, shapes: dict) -> CLIPConfig:
    m = raw.get("model_cfg", raw)
    v, t = dict(m.get("vision_cfg") or {}), dict(m.get("text_cfg") or {})
    for section, fixed in _OPEN_CLIP_FIXED.items():
        got = m if not section else (v if section == "vision_cfg" else t)
        for key, value in fixed.items():
            if got.get(key, value) != value:
                where = f"{section}.{key}" if section else key
                raise ValueError(f"open_clip option {where}={got[key]!r} is not supported by polymodal's CLIP")
    if v.get("block_type") not in (None, "default") or t.get("block_type") not in (None, "default"):
        raise ValueError("open_clip's custom attention blocks (block_type='custom') are not supported")
    if t.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise ValueError(f"open_clip text pool_type={t['pool_type']!r} is not supported (argmax or eos)")
    act = "quick_gelu" if m.get("quick_gelu") else "gelu"
    vocab = t.get("vocab_size", 49408)
    text_eps = (t.get("norm_kwargs") or {}).get("eps", 1e-5)
    text_width = t.get("width", 512)
    argmax = t.get("pool_type", "argmax") == "argmax"
    text = CLIPTextConfig(
        vocab_size=vocab, hidden_size=text_width, intermediate_size=int(text_width * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
        max_position_embeddings=t.get("context_length", 77), hidden_act=act, layer_norm_eps=text_eps,
        # OpenAI's tokenizer: <start_of_text>, <end_of_text> are the last two ids, and pads with 0
        bos_token_id=vocab - 2, eos_token_id=vocab - 1 if argmax else t.get("eos_id", 2), pad_token_id=0,
        pool="argmax" if argmax else "eos",
    )
    image = _square(v.get("image_size", 224), "vision_cfg.image_size")
    layers, width = v.get("layers", 12), v.get("width", 768)
    if isinstance(layers, (list, tuple)):
        vision = CLIPVisionConfig(tower="resnet", layers=tuple(layers), width=width, image_size=image,
                                  num_attention_heads=width * 32 // v.get("head_width", 64), hidden_act=act)
    else:
        vision = CLIPVisionConfig(
            tower="vit", hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
            num_hidden_layers=layers, num_attention_heads=width // v.get("head_width", 64), image_size=image,
            patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size"), hidden_act=act,
            layer_norm_eps=(v.get("norm_kwargs") or {}).get("eps", 1e-5),
        )
    return CLIPConfig(text=text, vision=vision, projection_dim=m.get("embed_dim", 512),
                      logit_scale_init_value=CLIPConfig.logit_scale_init_value)


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio that open_clip's `int(width * mlp_ratio)` turns back into `hidden`."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _write_open_clip(c: CLIPConfig) -> dict:
    v, t = c.vision, c.text
    if v.hidden_act != t.hidden_act or t.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip holds one activation for both towers, GELU or QuickGELU; this model has "
                         f"{v.hidden_act!r} (image) and {t.hidden_act!r} (text)")
    if v.tower == "vit":
        vision = {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                  "head_width": v.hidden_size // v.num_attention_heads, "patch_size": v.patch_size,
                  "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size)}
        if v.layer_norm_eps != 1e-5:
            vision["norm_kwargs"] = {"eps": v.layer_norm_eps}
    else:
        vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width,
                  "head_width": v.feature_dim // v.num_attention_heads, "patch_size": None}
    text = {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
            "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
            "mlp_ratio": _mlp_ratio(t.hidden_size, t.intermediate_size)}
    if t.pool == "eos":
        text.update(pool_type="eos", eos_id=t.eos_token_id)
    if t.layer_norm_eps != 1e-5:
        text["norm_kwargs"] = {"eps": t.layer_norm_eps}
    model_cfg = {"embed_dim": c.projection_dim, "quick_gelu": t.hidden_act == "quick_gelu",
                 "vision_cfg": vision, "text_cfg": text}
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}


# polymodal's own layout: our names, our config


FAMILY = Family(
    name="clip",
    model=CLIP,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "open_clip": Layout("open_clip", _read_open_clip, _write_open_clip, _open_clip_key_map,
                            config_file="open_clip_config.json", weights_stem="open_clip_model"),
        "polymodal": native_layout("clip", CLIPConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="CLIP: ViT or ModifiedResNet image tower, causal text tower, contrastive logits",
    image_processor=lambda c: ImageProcessor.clip(size=c.vision.image_size),
    tasks=("zero-shot-image-classification", "image-text-retrieval"),
)
