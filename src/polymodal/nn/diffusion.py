"""Convolutional blocks of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"; the residual and attention blocks come from Ho et al. 2020, "Denoising Diffusion Probabilistic
Models", App. B): the GroupNorm ResNet block with an optional time embedding, 2x down- and upsampling, the
sinusoidal timestep embedding and its MLP, and self-attention over the pixels of a feature map.

Their users are the VAE (`polymodal.models.autoencoder_kl`), the U-Nets of SD 1.5 / SDXL and the MM-DiT of SD3
(timestep embedding). Module names follow diffusers' checkpoint keys (`norm1`, `conv1`, `time_emb_proj`,
`conv_shortcut`, `linear_1`, ...), so the families' key maps only rename what the structure changes. Checked
against diffusers 0.42's `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `get_timestep_embedding`,
`TimestepEmbedding` and its attention block (tests/test_autoencoder_kl.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import activation


def gaussian_noise(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """N(0, 1) noise of `shape` on `device`, drawn on the generator's device when that is the CPU (and then moved),
    as diffusers' `randn_tensor` draws it: the same generator gives the same numbers as diffusers' samplers."""
    device = torch.device(device or "cpu")
    where = generator.device if generator is not None and generator.device.type == "cpu" else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv3x3 [+ time embedding] -> GroupNorm -> act -> dropout -> conv3x3, plus the input
    (through a 1x1 conv when the channel count changes): x (B, Cin, H, W) [, temb (B, Dt)] -> (B, Cout, H, W).

    time_embedding_norm: "default" adds proj(act(temb)) before the second norm (DDPM); "scale_shift" modulates
    the normed features, h * (1 + scale) + shift (Dhariwal & Nichol 2021, AdaGN).
    output_scale_factor divides the sum (1 in every Stable Diffusion model)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = None,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act: str = "silu",
        time_embedding_norm: Literal["default", "scale_shift"] = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        conv_shortcut_bias: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm must be 'default' or 'scale_shift', got {time_embedding_norm!r}")
        for channels in (in_channels, out_channels):
            if channels % groups or channels % (groups_out or groups):
                raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups")
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            scale_shift = time_embedding_norm == "scale_shift"
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = activation(act)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias)
                              if in_channels != out_channels else None)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResNet block takes a time embedding (temb) and none was given")
            t = self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, Cout or 2 Cout, 1, 1)
            if self.time_embedding_norm == "scale_shift":
                scale, shift = t.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(self.act(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Halve H and W: a 3x3 conv of stride 2, or a 2x2 average pool (use_conv=False).

    padding=0 pads right and bottom by one before the conv, as the LDM VAE was trained (diffusers keeps this
    asymmetric pad for its encoders); the U-Nets use padding=1."""

    def __init__(self, channels: int, out_channels: int | None = None, *, use_conv: bool = True, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("average-pool downsampling keeps the channel count")
        self.padding = padding
        self.conv = (nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding) if use_conv
                     else nn.AvgPool2d(2, stride=2))
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `output_size`, which a U-Net passes when its skip connection has an odd size),
    then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return x if self.conv is None else self.conv(x)


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps (may be fractional) -> (B, dim), in fp32.

    Frequencies w_i = max_period^(-i / (dim/2 - downscale_freq_shift)), i < dim/2; the output is
    [sin(s t w), cos(s t w)] (Vaswani et al. 2017 as DDPM uses it), [cos, sin] with flip_sin_to_cos (what the SD
    U-Nets and SD3 were trained with, with downscale_freq_shift 0); an odd dim gets a zero last channel."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be one value per sample, shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (dim/2,)
    angles = scale * (timesteps[:, None].float() * freqs[None])  # (B, dim/2)
    first, second = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    emb = torch.cat([first, second], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """The MLP on a timestep's sinusoidal embedding: linear_1 -> act -> linear_2, (B, Din) -> (B, Dout)."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, act: str = "silu", out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = activation(act)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class SpatialSelfAttention(nn.Module):
    """Self-attention among the H*W positions of a feature map, with a residual: x (B, C, H, W) -> (B, C, H, W).

    GroupNorm, then the shared `Attention` (SDPA, fused q/k/v) over the (B, H*W, C) sequence; the LDM VAE's mid
    blocks use one head of width C."""

    def __init__(self, channels: int, *, head_dim: int | None = None, groups: int | None = 32, eps: float = 1e-6,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        head_dim = head_dim or channels
        if channels % head_dim:
            raise ValueError(f"{channels} channels are not a whole number of heads of {head_dim}")
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.attn = Attention(channels, channels // head_dim, head_dim=head_dim, bias=True)
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.view(B, C, H * W).transpose(1, 2)  # (B, H*W, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        out = h + x
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor
