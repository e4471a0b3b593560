"""The text-conditioned U-Net of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", sec. 3.3 and App. E): the denoiser of Stable Diffusion 1.x/2.x and, with Podell et al. 2023's
added conditioning ("SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", sec. 2.2), of
SDXL base and refiner.

    noisy latent (B, 4, h, w), timestep t, text (B, S, Dc) [, pooled text (B, P), size/crop ids (B, 6 or 5)]
      emb = MLP(sinusoid(t)) [+ MLP([pooled text, sinusoid(ids)])]                        (B, 4 C0)
      conv_in -> down stages: ResNet blocks [each followed by a spatial transformer], 2x down (skips saved)
              -> mid: ResNet, spatial transformer, ResNet
              -> up stages: (ResNet on [x, skip] [+ spatial transformer]) x (layers + 1), 2x up
      -> GroupNorm, SiLU, conv_out -> predicted noise (or v) (B, 4, h, w)

A spatial transformer (diffusers' Transformer2DModel) is GroupNorm, a 1x1 conv or linear projection to tokens,
`transformer_layers_per_block` blocks of self-attention, cross-attention to the text and a GEGLU feed-forward
(Shazeer 2020), then the projection back and a residual. The ResNet blocks, resampling and timestep MLP are the
shared ones of `polymodal.nn.diffusion`; attention is the shared `Attention` (q/k/v fused for self-attention,
k/v for cross-attention).

diffusers' config calls the number of heads `attention_head_dim` (a historical misnomer it keeps for old files):
heads = num_attention_heads or attention_head_dim, and each head is channels // heads wide (64 in SDXL).

Checked against diffusers 0.42's `UNet2DConditionModel` (tests/test_unet.py); module names follow its keys, so the
key map below only fuses q/k/v and renames the feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, to_dict
from polymodal.nn.attention import Attention
from polymodal.nn.diffusion import (
    Conv2d,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)
from polymodal.nn.mlp import activation
from polymodal.nn.onednn import use_onednn
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename

_DOWN, _XDOWN = "DownBlock2D", "CrossAttnDownBlock2D"
_UP, _XUP = "UpBlock2D", "CrossAttnUpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """diffusers' UNet2DConditionModel config.json fields (those SD 1.x/2.x and SDXL use; see `_FIXED` for the
    options whose other values are not built). Per-stage fields take one value or one per down block."""

    sample_size: int | tuple[int, ...] | None = None  # latent side the model was trained at (64 SD 1.5, 128 SDXL)
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (_XDOWN, _XDOWN, _XDOWN, _DOWN)
    mid_block_type: str | None = _MID
    up_block_types: tuple[str, ...] = (_UP, _XUP, _XUP, _XUP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = field(default=1, metadata={"min": 0})
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # the number of heads, unless num_attention_heads is given
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False  # spatial transformers project with Linear (SD 2.x, SDXL), else 1x1 conv
    upcast_attention: bool = False  # diffusers' SDPA path ignores it (attention runs in the input's dtype)
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    addition_embed_type: Literal["text_time"] | None = None  # SDXL: pooled text + sinusoids of the size/crop ids
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.block_out_channels)
        if set(self.down_block_types) - {_DOWN, _XDOWN} or set(self.up_block_types) - {_UP, _XUP}:
            raise ValueError(f"only {_DOWN} / {_XDOWN} down and {_UP} / {_XUP} up blocks are built, got "
                             f"{list(self.down_block_types)} / {list(self.up_block_types)}")
        if self.mid_block_type not in (_MID, None):
            raise ValueError(f"only the {_MID} mid block is built, got {self.mid_block_type!r}")
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"{n} block_out_channels need as many down and up block types, got "
                             f"{len(self.down_block_types)} and {len(self.up_block_types)}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} down blocks")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} cannot be split into norm_num_groups={self.norm_num_groups}")
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise ValueError(f"{c} channels are not a whole number of {h} attention heads")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None
                                                        or self.projection_class_embeddings_input_dim is None):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("conv_in_kernel and conv_out_kernel must be odd (same-size padding)")

    def _per_block(self, value) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each down block's spatial transformers (see the module docstring)."""
        return self._per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._per_block(self.layers_per_block)

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer blocks in each down block's spatial transformers (the mid block takes the last)."""
        return self._per_block(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


# ------------------------------------------------------------------------------------- the spatial transformer


class GEGLU(nn.Module):
    """out(x_a * GELU(x_b)) with [x_a, x_b] = proj(x) (Shazeer 2020, "GLU Variants Improve Transformer"):
    (B, T, D) -> (B, T, D) through a hidden width (4 D in Stable Diffusion)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward, each with a residual
    (diffusers' BasicTransformerBlock): x (B, T, D), context (B, S, Dc) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim=head_dim, bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim=head_dim, context_dim=context_dim, bias=False, out_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, 4 * dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map's pixels as tokens through transformer blocks, with a residual: x (B, C, H, W) -> same
    (diffusers' Transformer2DModel on continuous inputs)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # diffusers fixes this epsilon
        self.proj_in = nn.Linear(channels, inner) if linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if linear else Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, H*W, C or inner)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, h.shape[-1]).permute(0, 3, 1, 2)  # (B, inner or C, H, W), a channels-last view
        if not self.linear:
            h = self.proj_out(h)
        return h + x


# ------------------------------------------------------------------------------------------------- the stages


class DownBlock(nn.Module):
    """ResNet blocks [each followed by a spatial transformer], then a stride-2 conv (not after the last stage).
    Returns the output and the skips the up path concatenates: after every layer and after the downsampling."""

    def __init__(self, cin: int, cout: int, c: UNet2DConditionConfig, i: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cin if j == 0 else cout, cout, c) for j in range(c.layers[i]))
        self.attentions = None
        if c.down_block_types[i] == _XDOWN:
            self.attentions = nn.ModuleList(_transformer(cout, c.heads[i], c.depths[i], c) for _ in self.resnets)
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(cout, padding=c.downsample_padding)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """(ResNet on [x, skip] [+ spatial transformer]) for each of layers + 1 skips, popped from the last, then nearest
    x2 and a conv (not after the last stage)."""

    def __init__(self, prev: int, cout: int, skip_last: int, c: UNet2DConditionConfig, i: int, last: bool):
        super().__init__()
        r = len(c.block_out_channels) - 1 - i  # the down block this stage mirrors
        n = c.layers[r] + 1
        self.resnets = nn.ModuleList(
            _resnet((prev if j == 0 else cout) + (skip_last if j == n - 1 else cout), cout, c) for j in range(n))
        self.attentions = None
        if c.up_block_types[i] == _XUP:
            self.attentions = nn.ModuleList(_transformer(cout, c.heads[r], c.depths[r], c) for _ in self.resnets)
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(cout)])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                size: tuple[int, int] | None = None) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), temb)  # (B, C + C_skip, H, W)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        return x if self.upsamplers is None else self.upsamplers[0](x, size)


class MidBlock(nn.Module):
    """ResNet, spatial transformer(s), ResNet at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, c: UNet2DConditionConfig):
        super().__init__()
        ch = c.block_out_channels[-1]
        self.resnets = nn.ModuleList(_resnet(ch, ch, c, c.mid_block_scale_factor) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(ch, c.heads[-1], c.depths[-1], c)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def _resnet(cin: int, cout: int, c: UNet2DConditionConfig, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, temb_channels=c.time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                         act=c.act_fn, time_embedding_norm=c.resnet_time_scale_shift, output_scale_factor=scale)


def _transformer(channels: int, heads: int, depth: int, c: UNet2DConditionConfig) -> SpatialTransformer:
    return SpatialTransformer(channels, heads, depth, c.cross_attention_dim, c.norm_num_groups,
                              c.use_linear_projection)


# --------------------------------------------------------------------------------------------------- the model


class UNet2DConditionModel(nn.Module):
    """`model(sample, timestep, encoder_hidden_states, *, text_embeds=None, time_ids=None)` -> the prediction
    (B, out_channels, h, w): diffusers' `.sample` (given `added_cond_kwargs={"text_embeds", "time_ids"}`)."""

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        self.config = c = config
        ch = c.block_out_channels
        self.conv_in = Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, act=c.act_fn)
        self.add_embedding = None
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim)
        n = len(ch)
        self.down_blocks = nn.ModuleList(DownBlock(ch[max(i - 1, 0)], ch[i], c, i, i == n - 1) for i in range(n))
        self.mid_block = MidBlock(c) if c.mid_block_type is not None else None
        rev = tuple(reversed(ch))
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], c, i, i == n - 1) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_act = activation(c.act_fn)
        self.conv_out = Conv2d(ch[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)
        use_onednn(self)  # CPU inference products on oneDNN (polymodal.nn.onednn)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor, *,
                text_embeds: Tensor | None = None, time_ids: Tensor | None = None) -> Tensor:
        """sample (B, Cin, h, w); timestep: one for all or (B,); encoder_hidden_states (B, S, cross_attention_dim);
        SDXL: text_embeds (B, P) pooled text, time_ids (B, K) original size, crop corner, target size (base: 6
        numbers) or aesthetic score (refiner: 5)."""
        c = self.config
        context = encoder_hidden_states
        self._check(sample, context, text_embeds, time_ids)
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, B)):
            raise ValueError(f"timestep must be one value or one per sample ({B}), got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(B)
        emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                 downscale_freq_shift=c.freq_shift).to(sample.dtype)
        emb = self.time_embedding(emb)  # (B, 4 C0)
        if self.add_embedding is not None:
            ids = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, flip_sin_to_cos=c.flip_sin_to_cos,
                                     downscale_freq_shift=c.freq_shift).reshape(B, -1)  # (B, K * Dt)
            emb = emb + self.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(emb.dtype))

        x = 2 * sample - 1.0 if c.center_input_sample else sample
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, more = block(x, emb, context)
            skips += more
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        # a latent side that is no multiple of 2^(stages - 1) was rounded up by a stride-2 conv: upsample to the
        # skip's size instead of x2 (diffusers' forward_upsample_size)
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(d % factor for d in sample.shape[-2:])
        for block in self.up_blocks:
            n = len(block.resnets)
            here, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if odd and block.upsamplers is not None else None
            x = block(x, here, emb, context, size)
        # loaded on a CPU, the feature maps were channels-last (see Conv2d); the prediction leaves in the usual layout
        return self.conv_out(self.conv_act(self.conv_norm_out(x))).contiguous()

    def _check(self, sample, context, text_embeds, time_ids) -> None:
        c = self.config
        if not isinstance(sample, Tensor) or sample.ndim != 4 or sample.shape[1] != c.in_channels:
            shape = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
            raise ValueError(f"expected the sample as a (B, {c.in_channels}, h, w) tensor, got {shape}")
        B = sample.shape[0]
        if (not isinstance(context, Tensor) or context.ndim != 3 or context.shape[0] != B
                or context.shape[2] != c.cross_attention_dim):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"expected encoder_hidden_states ({B}, S, {c.cross_attention_dim}), got {shape}")
        if self.add_embedding is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("this U-Net has no added conditioning (addition_embed_type is None): "
                                 "text_embeds and time_ids are SDXL's")
            return
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net (addition_embed_type 'text_time', SDXL) needs text_embeds (B, P) and "
                             "time_ids (B, K): the pooled text embedding and the size/crop conditioning")
        width = c.projection_class_embeddings_input_dim
        if (text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != B or time_ids.shape[0] != B
                or text_embeds.shape[1] + time_ids.shape[1] * c.addition_time_embed_dim != width):
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} do not "
                             f"give this U-Net's {width} added features for batch {B} (P + K * "
                             f"{c.addition_time_embed_dim})")


# ----------------------------------------------------------------------------------------------------- presets

_SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=(_DOWN, _XDOWN, _XDOWN),
             up_block_types=(_XUP, _XUP, _UP), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
             cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)
PRESETS: dict[str, UNet2DConditionConfig] = {
    "unet-tiny-test": UNet2DConditionConfig(block_out_channels=(16, 32), down_block_types=(_XDOWN, _DOWN),
                                            up_block_types=(_UP, _XUP), layers_per_block=1, norm_num_groups=8,
                                            cross_attention_dim=16, attention_head_dim=2, sample_size=8),
    # stable-diffusion-v1-5/stable-diffusion-v1-5, subfolder unet (859.5M parameters)
    "sd15-unet": UNet2DConditionConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    # stabilityai/stable-diffusion-2-1, subfolder unet: OpenCLIP-H text (1024), linear projections, 64-wide heads
    "sd21-unet": UNet2DConditionConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                       use_linear_projection=True),
    # stabilityai/stable-diffusion-xl-base-1.0, subfolder unet (2.57B): 2048 = CLIP-L 768 + OpenCLIP-bigG 1280
    # text features; 2816 = bigG's pooled 1280 + 6 ids x 256
    "sdxl-base-unet": UNet2DConditionConfig(**_SDXL),
    # stabilityai/stable-diffusion-xl-refiner-1.0, subfolder unet: bigG text only; 2560 = 1280 + 5 ids x 256
    "sdxl-refiner-unet": UNet2DConditionConfig(
        **{**_SDXL, "block_out_channels": (384, 768, 1536, 1536), "down_block_types": (_DOWN, _XDOWN, _XDOWN, _DOWN),
           "up_block_types": (_UP, _XUP, _XUP, _UP), "attention_head_dim": (6, 12, 24, 24),
           "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
           "projection_class_embeddings_input_dim": 2560}),
}
HUB_IDS: dict[str, str] = {}  # U-Nets ship inside pipeline repositories (their unet/ folder loads as a directory)

# ------------------------------------------------------------------------------------------------ checkpoints
# diffusers keeps q, k, v apart (`attn1.to_q`, ...) and names the feed-forward `ff.net.0.proj` / `ff.net.2`; the
# rest of its names are ours.


def _key_map(c: UNet2DConditionConfig) -> KeyMap:
    b = "{pre*}.transformer_blocks.{k}"
    return KeyMap([
        Fuse(tuple(f"{b}.attn1.to_{n}.weight" for n in "qkv"), f"{b}.attn1.qkv.weight"),
        Rename(f"{b}.attn1.to_out.0.{{p}}", f"{b}.attn1.proj.{{p}}"),
        Rename(f"{b}.attn2.to_q.weight", f"{b}.attn2.q.weight"),
        Fuse((f"{b}.attn2.to_k.weight", f"{b}.attn2.to_v.weight"), f"{b}.attn2.kv.weight"),
        Rename(f"{b}.attn2.to_out.0.{{p}}", f"{b}.attn2.proj.{{p}}"),
        Rename(f"{b}.ff.net.0.proj.{{p}}", f"{b}.ff.proj.{{p}}"),
        Rename(f"{b}.ff.net.2.{{p}}", f"{b}.ff.out.{{p}}"),
    ])


# diffusers options whose other values change the computation: only the value given here is built
_FIXED = {
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "dual_cross_attention": False, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "reverse_transformer_layers_per_block": None,
}


def _read(raw: dict, shapes: dict) -> UNet2DConditionConfig:
    for key, value in _FIXED.items():
        if raw.get(key, value) != value:
            raise ValueError(f"UNet2DConditionModel option {key}={raw[key]!r} is not supported by polymodal's U-Net "
                             f"(built: {value!r})")
    only_cross = raw.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, list) else only_cross:
        raise ValueError("only_cross_attention=True is not supported by polymodal's U-Net")
    if isinstance(raw.get("cross_attention_dim"), list):
        raise ValueError("a cross_attention_dim per block is not supported by polymodal's U-Net")
    if isinstance(raw.get("transformer_layers_per_block"), list) and any(
            isinstance(v, list) for v in raw["transformer_layers_per_block"]):
        raise ValueError("transformer_layers_per_block with a list per layer is not supported")
    return from_dict(UNet2DConditionConfig, raw)


def _write(c: UNet2DConditionConfig) -> dict:
    try:
        version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        version = "0.42.1"
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **to_dict(c)}


FAMILY = Family(
    name="unet_2d_condition",
    model=UNet2DConditionModel,
    layouts={"diffusers": Layout("diffusers", _read, _write, _key_map, weights_stem="diffusion_pytorch_model")},
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="The text-conditioned U-Net of Stable Diffusion 1.x/2.x and SDXL (base, refiner)",
)
