"""Convolutional blocks of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"; the residual and attention blocks come from Ho et al. 2020, "Denoising Diffusion Probabilistic
Models", App. B): the GroupNorm ResNet block with an optional time embedding, 2x down- and upsampling, the
sinusoidal timestep embedding and its MLP, and self-attention over the pixels of a feature map.

Their users are the VAE (`polymodal.models.autoencoder_kl`), the U-Nets of SD 1.5 / SDXL and the MM-DiT of SD3
(timestep embedding). Module names follow diffusers' checkpoint keys (`norm1`, `conv1`, `time_emb_proj`,
`conv_shortcut`, `linear_1`, ...), so the families' key maps only rename what the structure changes. Checked
against diffusers 0.42's `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `get_timestep_embedding`,
`TimestepEmbedding` and its attention block (tests/test_autoencoder_kl.py).

Their convolutions are `Conv2d`: torch's, except on CPUs in fp32 where oneDNN's convolution is slow for the shapes
of a U-Net's low-resolution stages (see its docstring); those take one matrix product of the weight as it is stored.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import activation
from polymodal.nn.onednn import linear


def gaussian_noise(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """N(0, 1) noise of `shape` on `device`, drawn on the generator's device when that is the CPU (and then moved),
    as diffusers' `randn_tensor` draws it: the same generator gives the same numbers as diffusers' samplers."""
    device = torch.device(device or "cpu")
    where = generator.device if generator is not None and generator.device.type == "cpu" else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


# Where `Conv2d` takes the matrix product. First measured with NCHW maps and MKL's GEMM (2 threads, oneDNN's
# convolution / the product, batch 2): 3x3, 1280 -> 1280 channels on 4x4, 8x8 and 16x16 maps 19.8 / 5.4 ms, 29.0 /
# 13.9, 63.3 / 49.3 (oneDNN reorders the 59 MB weight on every call, which the few output pixels do not repay); but
# 1280 -> 1280 on 32x32 186 / 220 and 320 -> 320 on 64x64 43 / 89. Measured again on channels-last maps and weights
# with the product on oneDNN's matmul (polymodal.nn.onednn), 1 thread, process CPU time, 2026-12-04: 1280 -> 1280 on
# 4x4 / 8x8 / 16x16 39.7 / 6.3, 49.2 / 17.2, 86.8 / 62.8; 2560 -> 1280 on 8x8 95.6 / 33.9; 640 -> 640 on 8x8 6.0 /
# 4.5, 16x16 17.0 / 15.4, but 32x32 59.9 / 82.3; 512 -> 512 on 32x32 (batch 1) 18.9 / 20.6; 320 -> 320 on 16x16 3.8 /
# 4.0. So a k x k conv (k > 1) takes the product when its weight has at least GEMM_MIN_WEIGHT values and its output
# at most out_channels pixels (all images together).
# A 1x1 conv is a product over the channels with no unfolding and took it faster at every map size measured whose
# weight has GEMM_MIN_POINTWISE values or more (NCHW, MKL): 512 -> 256 on 128x128 (batch 1) 31.0 / 16.6 ms, 256 ->
# 128 on 256x256 50.6 / 24.4, 1280 -> 640 on 32x32 17.4 / 10.5, 320 -> 320 on 32x32 1.5 / 1.3, 64x64 6.1 / 5.8.
GEMM_MIN_WEIGHT = 1 << 21
GEMM_MIN_POINTWISE = 1 << 12
_NHWC = torch.channels_last


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (the same parameters, names and checkpoints) with two CPU paths.

    Channels-last: loaded by `pm.load` onto the CPU (`materialize`), a k x k weight (k > 1) is stored channels-last
    (the same values and shape, strides (Cin k k, 1, k Cin, Cin)) and every input is handed over in the weight's
    layout, so feature maps stay channels-last through the network (GroupNorm, SiLU, sums, nearest upsampling and
    `torch.cat` keep the layout): oneDNN's NHWC convolution reads them without converting the input to its blocked
    layout and back, which the NCHW one does on every call (measured, 1 thread: 128 -> 128 channels on 256x256
    122 -> 88 ms, 256 -> 128 on 256x256 203 -> 150, 128 -> 3 on 512x512 98 -> 46, 320 -> 320 on 32x32 at batch 2
    16.0 -> 14.9). Only with the weight channels-last too: a channels-last input against an NCHW weight copies the
    weight on every call (640 -> 640 on 16x16: 18.5 ms NCHW, 29.0 so, 17.2 with both channels-last).

    Product: where it is faster (CPU, fp32, no gradient needed, zero padding, no groups or dilation; the shapes named
    above), out = bias + W (Cout, Cin k k) @ cols(x), with MKL's GEMM reading the weight as stored; elsewhere torch's
    convolution. The result is the same convolution summed in another order (differences of ~1e-6 relative)."""

    def materialize(self, device) -> None:
        """Called by the loader once the weights are in place: on the CPU, a k x k weight (k > 1) channels-last."""
        w = self.weight
        if w.device.type != "cpu" or self.kernel_size == (1, 1) or w.is_contiguous(memory_format=_NHWC):
            return
        src = w.detach()
        if not (w.is_contiguous() and w.untyped_storage().nbytes() == w.numel() * w.element_size()):
            self.weight = nn.Parameter(src.contiguous(memory_format=_NHWC), requires_grad=w.requires_grad)
            return
        # Rewritten in the weight's own memory, which no other tensor shares: a weight memory-mapped from a safetensors
        # file is a private copy-on-write mapping, whose pages the write turns into the process's own (the file is
        # untouched); a new tensor would leave the file's pages resident beside it (SD 1.5's U-Net: 1.9 GB more).
        # Each output channel's (Cin, k, k) block stays where it is, only permuted to (k, k, Cin): a few channels at
        # a time through a small temporary
        nhwc = src.as_strided(w.shape, (w[0].numel(), 1, self.kernel_size[1] * w.shape[1], w.shape[1]))
        step = max(1, (1 << 18) // w[0].numel())
        for o in range(0, w.shape[0], step):
            nhwc[o : o + step].copy_(src[o : o + step].contiguous(memory_format=_NHWC))
        self.weight = nn.Parameter(nhwc, requires_grad=w.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        x = _in_layout_of(x, self.weight)
        if not self._as_product(x):
            return super().forward(x)
        B, C, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if x.is_contiguous(memory_format=_NHWC) and not x.is_contiguous():
            return self._product_nhwc(x, Ho, Wo)
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            cols = x.reshape(B, C, H * W)  # (B, Cin, H*W): a pointwise conv needs no unfolding
        else:
            cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (B, Cin*kh*kw, Ho*Wo)
        w = self.weight.view(self.out_channels, -1)  # (Cout, Cin*kh*kw)
        out = x.new_empty(B, self.out_channels, Ho * Wo)
        for b in range(B):  # one product per image writes in place: no (B, Cout, K) copy of the weight
            if self.bias is None:
                torch.mm(w, cols[b], out=out[b])
            else:
                torch.addmm(self.bias[:, None], w, cols[b], out=out[b])
        return out.view(B, self.out_channels, Ho, Wo)

    def _product_nhwc(self, x: Tensor, Ho: int, Wo: int) -> Tensor:
        """The product on a channels-last input: pixels are rows, (B Ho Wo, kh kw Cin) @ (kh kw Cin, Cout), one GEMM
        for the whole batch whose (B Ho Wo, Cout) result is already the channels-last output."""
        B, Cout = x.shape[0], self.out_channels
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        rows = x.permute(0, 2, 3, 1)  # (B, H, W, Cin), contiguous
        if (kh, kw, sh, sw) != (1, 1, 1, 1):
            rows = F.pad(rows, (0, 0, pw, pw, ph, ph)).unfold(1, kh, sh).unfold(2, kw, sw)  # (B, Ho, Wo, Cin, kh, kw)
            rows = rows.permute(0, 1, 2, 4, 5, 3)  # (B, Ho, Wo, kh, kw, Cin): the weight's channels-last order
        w = self.weight.permute(0, 2, 3, 1).reshape(Cout, -1)  # (Cout, kh*kw*Cin): a view of the stored weight
        out = linear(rows.reshape(B * Ho * Wo, -1), w, self.bias)  # (B*Ho*Wo, Cout), on oneDNN
        return out.view(B, Ho, Wo, Cout).permute(0, 3, 1, 2)  # (B, Cout, Ho, Wo), channels-last

    def _as_product(self, x: Tensor) -> bool:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.ndim != 4
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or w.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return False
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            return w.numel() >= GEMM_MIN_POINTWISE
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        pixels = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
        return w.numel() >= GEMM_MIN_WEIGHT and pixels <= self.out_channels


def _in_layout_of(x: Tensor, weight: Tensor) -> Tensor:
    """x (B, C, H, W) in the memory layout of a conv's weight (channels-last or not); a 1x1 weight is both, and
    takes x as it comes."""
    if weight.is_contiguous(memory_format=_NHWC) and not weight.is_contiguous():
        return x.contiguous(memory_format=_NHWC)
    return x if weight.is_contiguous(memory_format=_NHWC) else x.contiguous()


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
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            scale_shift = time_embedding_norm == "scale_shift"
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = activation(act)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias)
                              if in_channels != out_channels else None)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        # without autograd, the activations and the residual sum overwrite tensors made here and read by nothing
        # else: two fewer (B, C, H, W) allocations per block, the same values
        inplace = not torch.is_grad_enabled() and isinstance(self.act, nn.SiLU)
        act = (lambda t: F.silu(t, inplace=True)) if inplace else self.act
        h = self.conv1(act(self.norm1(x)))
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
        h = self.conv2(self.dropout(act(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = h.add_(skip) if inplace and h.shape == skip.shape else skip + h
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
        self.conv = (Conv2d(channels, out_channels, 3, stride=2, padding=padding) if use_conv
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
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        if output_size is None and self.conv is not None and self._by_phases(x):
            return self._phases(x)
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return x if self.conv is None else self.conv(x)

    def _by_phases(self, x: Tensor) -> bool:
        c = self.conv
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4 and c.kernel_size == (3, 3)
                and c.stride == (1, 1) and c.padding == (1, 1) and c.groups == 1 and c.dilation == (1, 1)
                and c.padding_mode == "zeros" and not (torch.is_grad_enabled() and (x.requires_grad
                                                                                    or c.weight.requires_grad)))

    def _phases(self, x: Tensor) -> Tensor:
        """conv3x3(nearest x2 (x)) without the upsampled map: output pixel (2i + a, 2j + b) sees input rows i-1, i
        (a = 0) or i, i+1 (a = 1), its 3x3 taps summed onto them ([w0, w1 + w2] or [w0 + w1, w2], likewise along
        columns). So each of the 4 phases is a 2x2 conv of the input, 4/9 of the multiply-adds, written into its
        pixels of the output (the same sums in another order, ~1e-6 relative)."""
        w = self.conv.weight  # (Cout, Cin, 3, 3)
        x = _in_layout_of(x, w)  # channels-last where the conv's weight is (see Conv2d)
        B, _, H, W = x.shape
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(B, w.shape[0], 2 * H, 2 * W, dtype=x.dtype, device=x.device, memory_format=layout)
        for a in (0, 1):
            rows = _fold_taps(w, a, dim=2)  # (Cout, Cin, 2, 3)
            for b in (0, 1):
                kernel = _fold_taps(rows, b, dim=3).contiguous(memory_format=layout)  # (Cout, Cin, 2, 2)
                # phase a reads input rows i-1, i (a = 0: one zero row above) or i, i+1 (a = 1: one below)
                xp = F.pad(x, (1 - b, b, 1 - a, a)).contiguous(memory_format=layout)  # (B, Cin, H + 1, W + 1)
                out[:, :, a::2, b::2] = F.conv2d(xp, kernel, self.conv.bias)  # (B, Cout, H, W)
        return out


def _fold_taps(w: Tensor, phase: int, dim: int) -> Tensor:
    """A 3-tap kernel along `dim` seen from the input of a nearest x2 upsampling: [w0, w1 + w2] for the even
    output rows or columns (phase 0), [w0 + w1, w2] for the odd ones."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2] if phase == 0 else [w0 + w1, w2], dim)


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
        # (B, H*W, C) and back by permutes, which are views of a channels-last map (see Conv2d)
        h = self.attn(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, H*W, C)
        out = h.view(B, H, W, C).permute(0, 3, 1, 2) + x
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor
