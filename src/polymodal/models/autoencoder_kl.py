"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3 and App. G): the VAE of Stable Diffusion 1.x/2.x, SDXL and SD3.

    image (B, 3, H, W) -> Encoder -> [quant_conv] -> moments (B, 2c, H/f, W/f) = (mean, log variance)
    latent (B, c, H/f, W/f) -> [post_quant_conv] -> Decoder -> image (B, 3, H, W)

with f = 2^(stages - 1) (8 in every Stable Diffusion VAE) and c latent channels (4; 16 for SD3, which has no
quant convs). Each encoder stage is ResNet blocks then a stride-2 conv; the middle is ResNet, single-head
self-attention, ResNet; the decoder mirrors it with one more ResNet block per stage and nearest x2 upsampling.
The diffusion model sees `(z - shift_factor) * scaling_factor` (sec. 4.3.2: unit variance latents).

Large images decode (and encode) in overlapping tiles blended linearly across the overlap, as diffusers'
`enable_tiling()` does (same tiles, same blend, the same numbers), so memory follows the tile, not the image.
SDXL's VAE overflows fp16 (its activations pass 65504); a config with `force_upcast` keeps its weights in fp32
when loaded in fp16, so decoding runs in fp32 as diffusers' pipelines upcast it.

Checked against diffusers 0.42's `AutoencoderKL` (tests/test_autoencoder_kl.py); module names follow its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import torch
from torch import Tensor, nn

from polymodal.config import from_dict, to_dict
from polymodal.nn.diffusion import (
    Conv2d,
    Downsample2D,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    gaussian_noise,
)
from polymodal.nn.mlp import activation
from polymodal.nn.onednn import use_onednn
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
_EPS = 1e-6  # every norm of the LDM VAE (diffusers hard-codes it in Encoder/Decoder)
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers' AutoencoderKL config.json fields."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN,)
    up_block_types: tuple[str, ...] = (_UP,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # the image side the VAE was trained at: the tile size of tiled decoding
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if set(self.down_block_types) - {_DOWN} or set(self.up_block_types) - {_UP}:
            raise ValueError(f"only {_DOWN} / {_UP} stages are built, got {list(self.down_block_types)} / "
                             f"{list(self.up_block_types)}")
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"{n} block_out_channels need as many down and up block types, got "
                             f"{len(self.down_block_types)} and {len(self.up_block_types)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} cannot be split into norm_num_groups={self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents, (B, c, h, w) each; log variance clamped to [-30, 20] as
    diffusers does."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * N(0, 1), the noise drawn as diffusers' `randn_tensor` draws it (on the generator's device),
        so the same generator gives the same sample."""
        noise = gaussian_noise(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class MidBlock(nn.Module):
    """ResNet -> self-attention (one head of C) -> ResNet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act: str, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, groups=groups, eps=_EPS, act=act) for _ in range(2))
        self.attention = SpatialSelfAttention(channels, groups=groups, eps=_EPS) if attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Stage(nn.Module):
    """ResNet blocks at one resolution, then a 2x resampling (none after the last encoder / decoder stage)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, act: str, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, eps=_EPS, act=act)
                                     for i in range(layers))
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """image (B, Cin, H, W) -> moments (B, 2c, H/f, W/f)."""

    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        ch, G = c.block_out_channels, c.norm_num_groups
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            # padding=0: the asymmetric (0, 1, 0, 1) pad the LDM VAE was trained with
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block, G, c.act_fn,
                  Downsample2D(ch[i], padding=0) if i < len(ch) - 1 else None)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], G, c.act_fn, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=_EPS)
        self.conv_act = activation("silu")  # diffusers' Encoder/Decoder fix SiLU here whatever act_fn says
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent (B, c, h, w) -> image (B, Cout, h*f, w*f)."""

    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        ch, G = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], G, c.act_fn, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, G, c.act_fn,
                  Upsample2D(ch[i]) if i < len(ch) - 1 else None)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=_EPS)
        self.conv_act = activation("silu")
        self.conv_out = Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """`encode(x)` -> latent mean; `decode(z)` -> image (diffusers' `.latent_dist.mean` / `.sample`).

    Images are in [-1, 1]; latents are unscaled (multiply by `scaling_factor` after subtracting `shift_factor`
    before handing them to a diffusion model: `scale_latents`). `tile=True` processes inputs larger than
    `sample_size` (image side) in overlapping tiles, as diffusers' `enable_tiling()`."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv
                                else None)
        use_onednn(self)  # the mid-block attention's products on oneDNN (polymodal.nn.onednn)

    @property
    def keep_in_fp32(self) -> tuple[str, ...]:
        """Read by the loader: with `force_upcast`, weights asked for in fp16 stay fp32 (see the module docstring)."""
        return ("",) if self.config.force_upcast else ()

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> the diffusion model's: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> what `decode` takes: z / scaling_factor + shift_factor."""
        return z / self.scaling_factor + self.shift_factor

    # ------------------------------------------------------------------------------------------------ encoding

    def encode(self, x: Tensor, *, tile: bool = False) -> Tensor:
        """image (B, Cin, H, W), H and W multiples of the downscale factor -> latent mean (B, c, H/f, W/f)."""
        return self.encode_distribution(x, tile=tile).mean

    def encode_distribution(self, x: Tensor, *, tile: bool = False) -> LatentDistribution:
        """image -> the latent distribution (mean, log variance; `.std`, `.sample(generator)`)."""
        c = self.config
        self._check(x, c.in_channels, "image", c.downscale)
        h = x.to(self._dtype)
        side = c.sample_size
        if tile and max(h.shape[-2:]) > side:
            latent_side = side // c.downscale
            moments = _tiled(self._moments, h, side, latent_side, int(side * (1 - TILE_OVERLAP)),
                             int(latent_side * TILE_OVERLAP))
        else:
            moments = self._moments(h)
        mean, logvar = moments.to(x.dtype).chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        # loaded on a CPU, the feature maps are channels-last (see polymodal.nn.diffusion.Conv2d); results are not
        return (h if self.quant_conv is None else self.quant_conv(h)).contiguous()

    # ------------------------------------------------------------------------------------------------ decoding

    def decode(self, z: Tensor, *, tile: bool = False) -> Tensor:
        """latent (B, c, h, w) -> image (B, Cout, h*f, w*f), in z's dtype (computed in the weights' dtype)."""
        c = self.config
        self._check(z, c.latent_channels, "latent", 1)
        h = z.to(self._dtype)
        latent_side = c.sample_size // c.downscale
        if tile and max(h.shape[-2:]) > latent_side:
            out = _tiled(self._decode, h, latent_side, c.sample_size, int(latent_side * (1 - TILE_OVERLAP)),
                         int(c.sample_size * TILE_OVERLAP))
        else:
            out = self._decode(h)
        return out.to(z.dtype)

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z)).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the latent mean (diffusers' forward without sample_posterior)."""
        return self.decode(self.encode(x))

    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @staticmethod
    def _check(x: Tensor, channels: int, what: str, multiple: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected the {what} as a (B, {channels}, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point {what}, got {x.dtype}")
        H, W = x.shape[-2:]
        if H == 0 or W == 0 or H % multiple or W % multiple:
            raise ValueError(f"the {what}'s height and width ({H}x{W}) must be positive multiples of {multiple}, "
                             f"the VAE's downscale factor; resize or pad it")


def _tiled(fn, x: Tensor, tile_in: int, tile_out: int, stride: int, blend: int) -> Tensor:
    """fn over overlapping tiles of x (B, C, H, W): tiles of side `tile_in` every `stride` input pixels; each
    output tile (side up to `tile_out`) is blended linearly over `blend` pixels with the already blended tile above
    and to its left, then cropped to `tile_out - blend` and placed. diffusers' `tiled_decode` / `_tiled_encode`,
    which hold every tile at once; here only the previous row of tiles is kept."""
    H, W = x.shape[-2:]
    keep = tile_out - blend
    rows_out, above = [], None
    for i in range(0, H, stride):
        row = []
        for j in range(0, W, stride):
            tile = fn(x[:, :, i : i + tile_in, j : j + tile_in])
            if above is not None:
                _blend(above[len(row)], tile, blend, dim=2)
            if row:
                _blend(row[-1], tile, blend, dim=3)
            row.append(tile)
        rows_out.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(rows_out, dim=2)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """b's first `extent` rows (dim=2) or columns (dim=3) := a's last ones * (1 - w) + b's * w, w = k / extent, in
    place (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    w = (torch.arange(extent, dtype=torch.float64, device=b.device) / extent).to(b.dtype)
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)  # (extent, 1) or (1, extent) over (H, W)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)


# ----------------------------------------------------------------------------------------------- presets

_SD_BLOCKS = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
              "down_block_types": (_DOWN,) * 4, "up_block_types": (_UP,) * 4}
PRESETS: dict[str, AutoencoderKLConfig] = {
    "vae-tiny-test": AutoencoderKLConfig(block_out_channels=(8, 16), down_block_types=(_DOWN,) * 2,
                                         up_block_types=(_UP,) * 2, norm_num_groups=4, sample_size=32),
    # stable-diffusion-v1-5/stable-diffusion-v1-5, subfolder vae (also SD 2.x's, at sample_size 768)
    "sd15-vae": AutoencoderKLConfig(**_SD_BLOCKS, sample_size=512, scaling_factor=0.18215),
    # stabilityai/stable-diffusion-xl-base-1.0, subfolder vae: SD's architecture, retrained; overflows fp16
    "sdxl-vae": AutoencoderKLConfig(**_SD_BLOCKS, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    # stabilityai/stable-diffusion-3-medium-diffusers, subfolder vae: 16 latent channels, no quant convs, a shift
    "sd3-vae": AutoencoderKLConfig(**_SD_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                                   shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}
# whole pipeline repositories hold the VAE in their `vae/` folder, which loads as a directory
HUB_IDS = {
    "stabilityai/sd-vae-ft-mse": "sd15-vae",
    "stabilityai/sd-vae-ft-ema": "sd15-vae",
    "stabilityai/sdxl-vae": "sdxl-vae",
}

# ------------------------------------------------------------------------------------------ checkpoints
# diffusers: `{encoder,decoder}.down_blocks.{i}.downsamplers.0`, `up_blocks.{i}.upsamplers.0`, and the mid
# block's attention as `attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (q, k, v fused into our `attn.qkv`).
# Files saved before diffusers 0.14 name the attention `query/key/value/proj_attn`; those load too.


def _key_map(c: AutoencoderKLConfig) -> KeyMap:
    attn, ours = "{part}.mid_block.attentions.0", "{part}.mid_block.attention"
    rules = [
        Rename("{part}.down_blocks.{i}.downsamplers.0.{rest*}", "{part}.down_blocks.{i}.resample.{rest*}"),
        Rename("{part}.up_blocks.{i}.upsamplers.0.{rest*}", "{part}.up_blocks.{i}.resample.{rest*}"),
        Rename(f"{attn}.group_norm.{{p}}", f"{ours}.group_norm.{{p}}"),
    ]
    for q, k, v, out in (("to_q", "to_k", "to_v", "to_out.0"), ("query", "key", "value", "proj_attn")):
        rules += [Fuse(tuple(f"{attn}.{n}.{p}" for n in (q, k, v)), f"{ours}.attn.qkv.{p}") for p in ("weight", "bias")]
        rules.append(Rename(f"{attn}.{out}.{{p}}", f"{ours}.attn.proj.{{p}}"))
    return KeyMap(rules)


def _read(raw: dict, shapes: dict) -> AutoencoderKLConfig:
    return from_dict(AutoencoderKLConfig, raw)


def _write(c: AutoencoderKLConfig) -> dict:
    try:
        version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        version = "0.42.1"
    return {"_class_name": "AutoencoderKL", "_diffusers_version": version, **to_dict(c)}


FAMILY = Family(
    name="autoencoder_kl",
    model=AutoencoderKL,
    layouts={"diffusers": Layout("diffusers", _read, _write, _key_map, weights_stem="diffusion_pytorch_model")},
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Latent diffusion's KL autoencoder (the VAE of Stable Diffusion 1.x/2.x, SDXL, SD3), tiled decoding",
)
