"""The multimodal diffusion transformer (MM-DiT) of Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 4 and fig. 2).

    noisy latent (B, C, H, W), timestep t, text tokens (B, S, Dt), pooled text (B, Dp)
      x = patchify(latent) + 2-D sin-cos positions (cropped from a pos_embed_max_size grid)     (B, N, D)
      c = context_embedder(text tokens)                                                           (B, S, D)
      y = MLP(sinusoid(t)) + MLP(pooled text)                                                     (B, D)
      L joint blocks, each modality with its own AdaLN-Zero modulation from y, q/k/v, output projection and MLP,
      one attention over the joined sequence [x; c]:
          x_in, c_in = LN(x) (1 + scale) + shift, LN(c) (1 + scale_c) + shift_c
          a_x, a_c = Attention([x_in; c_in]) split back               (the two streams see each other)
          x = x + gate a_x;  x = x + gate' MLP(LN(x) (1 + scale') + shift')      (likewise c)
      the last block updates x only (context_pre_only: c needs no output any more)
      -> LN(x) (1 + scale) + shift from y (AdaLN continuous), linear to P*P*C, unpatchify -> velocity (B, C, H, W)

SD3.5 adds RMS-normalized queries and keys per head (qk_norm "rms_norm", in every attention) and, in its medium
model's first 13 blocks, a second self-attention over the image tokens alone, modulated by three more chunks of
the block's AdaLN (diffusers' SD35AdaLayerNormZeroX, "MMDiT-X").

Attention is the shared `polymodal.nn.Attention` (fused q/k/v per modality, optional q/k RMSNorm) joined by
`polymodal.nn.attention.joint_attention`; the timestep MLP is `polymodal.nn.diffusion`'s. Module names follow
diffusers' checkpoint keys (`pos_embed.proj`, `time_text_embed.timestep_embedder.linear_1`, `norm1.linear`,
`norm1_context.linear`, `context_embedder`, `norm_out.linear`, `proj_out`), so the key map only fuses q/k/v and
renames the feed-forwards. Checked against diffusers 0.42's `SD3Transformer2DModel` (tests/test_sd3.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, to_dict
from polymodal.nn.attention import Attention, joint_attention
from polymodal.nn.diffusion import TimestepEmbedding, timestep_embedding
from polymodal.nn.mlp import MLP
from polymodal.nn.onednn import use_onednn
from polymodal.nn.patch import PatchEmbed
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename

EPS = 1e-6  # every LayerNorm and q/k RMSNorm of the MM-DiT


@dataclass(frozen=True)
class SD3Transformer2DConfig:
    """diffusers' SD3Transformer2DModel config.json fields."""

    sample_size: int = 128  # latent side at training (1024 px / 8); the pipelines' default size
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # text token width (T5-XXL's 4096; the CLIP features are zero-padded to it)
    caption_projection_dim: int = 1152  # must be the model width, heads * head_dim (the streams attend jointly)
    pooled_projection_dim: int = 2048  # CLIP-L's 768 + CLIP-G's 1280 pooled features
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96  # side of the position grid the patches' positions are cropped from
    # blocks with the second, image-only attention (SD3.5 medium)
    dual_attention_layers: tuple[int, ...] = field(default=(), metadata={"min": 0})
    qk_norm: str | None = None  # "rms_norm" (SD3.5)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def channels_out(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels


def sincos_grid(dim: int, size: int, base_size: int) -> Tensor:
    """diffusers' `get_2d_sincos_pos_embed(dim, size, base_size)`: a size x size grid -> (size*size, dim) in raster
    order, positions scaled by base_size / size (so a grid larger than the training one spans the same range); the
    first half of the channels encodes the column, the second the row, each as [sin(p w), cos(p w)] with
    w_i = 10000^(-i / (dim/4)) (Vaswani et al. 2017), computed in float64."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    pos = torch.arange(size, dtype=torch.float32) / (size / base_size)  # (M,), fp32 as diffusers rounds it
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    angles = torch.outer(pos.double(), omega)  # (M, D/4)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D/2)
    col = emb[None, :, :].expand(size, size, -1)  # (row, col, D/2): the column's encoding
    row = emb[:, None, :].expand(size, size, -1)
    return torch.cat([col, row], dim=-1).reshape(size * size, dim).float()


class CroppedPatchEmbed(PatchEmbed):
    """Patches (B, C, H, W) -> (B, N, D) plus fixed positions: the centre h x w of a max_size x max_size grid, so
    every resolution up to max_size * P sees the positions around the middle of the grid (SD3's multi-resolution
    training). The grid is a buffer that checkpoints carry (`pos_embed.pos_embed`)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, max_size: int, base_size: int):
        super().__init__(in_channels, dim, patch_size)
        self.max_size = max_size
        self.register_buffer("pos_embed", sincos_grid(dim, max_size, base_size)[None])  # (1, M*M, D)

    def forward(self, x: Tensor) -> Tensor:
        P, M = self.patch_size, self.max_size
        h, w = x.shape[-2] // P, x.shape[-1] // P
        if h > M or w > M:
            raise ValueError(f"a latent of {x.shape[-2]}x{x.shape[-1]} is {h}x{w} patches; this model's positions "
                             f"cover at most {M}x{M} (pos_embed_max_size)")
        top, left = (M - h) // 2, (M - w) // 2
        pos = self.pos_embed.view(M, M, -1)[top : top + h, left : left + w].reshape(1, h * w, -1)  # (1, N, D)
        patches = super().forward(x)
        return (patches + pos).to(patches.dtype)


class AdaLN(nn.Module):
    """Adaptive LayerNorm's modulation (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", sec. 3.2):
    SiLU -> linear of the conditioning y (B, D) -> n chunks (B, D) each (shifts, scales and gates)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, y: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(y)).chunk(self.chunks, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LN(x) (1 + scale) + shift, the LayerNorm without its own affine: x (B, T, D), shift and scale (B, D)."""
    # one fused multiply-add (addcmul) instead of a product and a sum: one pass over the (B, T, D) tensor less
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=EPS), 1 + scale[:, None])


class JointTransformerBlock(nn.Module):
    """One MM-DiT block: x (B, N, D), c (B, S, D), y (B, D) -> (x, c), c None after the last block.

    context_pre_only: the last block, whose text stream ends at the attention (its AdaLN gives only a scale and a
    shift, diffusers' AdaLayerNormContinuous; no text output projection or MLP). dual: SD3.5's second attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_pre_only: bool, dual: bool,
                 qk_norm_eps: float | None):
        super().__init__()
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaLN(dim, 9 if dual else 6)
        self.norm1_context = AdaLN(dim, 2 if context_pre_only else 6)
        self.attn = nn.Module()
        self.attn.image = Attention(dim, heads, head_dim=head_dim, qk_norm_eps=qk_norm_eps)
        self.attn.text = Attention(dim, heads, head_dim=head_dim, qk_norm_eps=qk_norm_eps)
        if context_pre_only:
            self.attn.text.proj = None  # the text stream's attention output is never read
        self.attn2 = Attention(dim, heads, head_dim=head_dim, qk_norm_eps=qk_norm_eps) if dual else None
        self.ff = MLP(dim, 4 * dim, "gelu_tanh")
        self.ff_context = None if context_pre_only else MLP(dim, 4 * dim, "gelu_tanh")

    def forward(self, x: Tensor, c: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.norm1(y)
        shift, scale, gate, shift_ff, scale_ff, gate_ff = m[:6]
        x_in = modulate(x, shift, scale)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(y)  # AdaLayerNormContinuous: scale first
            c_in = modulate(c, c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = self.norm1_context(y)
            c_in = modulate(c, c_shift, c_scale)
        a_x, a_c = joint_attention([(self.attn.image, x_in), (self.attn.text, c_in)])  # (B, N, D), (B, S, D)
        out = torch.addcmul(x, gate[:, None], a_x)  # x + gate a_x, one pass
        if self.dual:  # MMDiT-X: image-only attention on the block input, with its own modulation
            shift2, scale2, gate2 = m[6:]
            out = torch.addcmul(out, gate2[:, None], self.attn2(modulate(x, shift2, scale2)))
        out = torch.addcmul(out, gate_ff[:, None], self.ff(modulate(out, shift_ff, scale_ff)))
        if self.context_pre_only:
            return out, None
        c = torch.addcmul(c, c_gate[:, None], a_c)
        c = torch.addcmul(c, c_gate_ff[:, None], self.ff_context(modulate(c, c_shift_ff, c_scale_ff)))
        return out, c


class SD3Transformer2DModel(nn.Module):
    """`model(hidden_states, encoder_hidden_states, pooled_projections, timestep)` -> the predicted velocity
    (B, C, H, W), diffusers' `SD3Transformer2DModel(...).sample`. timestep: one value or (B,), on the 0-1000 scale
    (sigma * 1000) the pipelines pass."""

    def __init__(self, config: SD3Transformer2DConfig):
        super().__init__()
        self.config = c = config
        _check_config(c)
        D = c.dim
        self.pos_embed = CroppedPatchEmbed(c.in_channels, D, c.patch_size, max_size=c.pos_embed_max_size,
                                           base_size=c.sample_size // c.patch_size)
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = TimestepEmbedding(256, D)
        self.time_text_embed.text_embedder = TimestepEmbedding(c.pooled_projection_dim, D)  # linear, SiLU, linear
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        eps = EPS if c.qk_norm == "rms_norm" else None
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(D, c.num_attention_heads, c.attention_head_dim,
                                  context_pre_only=i == c.num_layers - 1, dual=i in c.dual_attention_layers,
                                  qk_norm_eps=eps)
            for i in range(c.num_layers)])
        self.norm_out = AdaLN(D, 2)
        self.proj_out = nn.Linear(D, c.patch_size**2 * c.channels_out)
        use_onednn(self)  # CPU inference products on oneDNN (polymodal.nn.onednn)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor | float) -> Tensor:
        t = self._check(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        c, P = self.config, self.config.patch_size
        B, _, H, W = hidden_states.shape
        x = self.pos_embed(hidden_states)  # (B, N, D)
        emb = self.time_text_embed
        sinusoid = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # (B, 256), fp32
        y = emb.timestep_embedder(sinusoid.to(pooled_projections.dtype)) + emb.text_embedder(pooled_projections)
        ctx = self.context_embedder(encoder_hidden_states)  # (B, S, D)
        for block in self.transformer_blocks:
            x, ctx = block(x, ctx, y)
        scale, shift = self.norm_out(y)
        x = self.proj_out(modulate(x, shift, scale))  # (B, N, P*P*C)
        x = x.view(B, H // P, W // P, P, P, c.channels_out).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, P)
        return x.reshape(B, c.channels_out, H, W)

    def _check(self, x, context, pooled, timestep) -> Tensor:
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c.in_channels or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected hidden_states as a floating (B, {c.in_channels}, H, W) tensor, got {shape}")
        B, _, H, W = x.shape
        if H % c.patch_size or W % c.patch_size or H == 0 or W == 0:
            raise ValueError(f"the latent's sides ({H}x{W}) must be positive multiples of the patch size "
                             f"{c.patch_size}")
        if (not isinstance(context, Tensor) or context.ndim != 3 or context.shape[0] != B
                or context.shape[2] != c.joint_attention_dim):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"expected encoder_hidden_states ({B}, S, {c.joint_attention_dim}), got {shape}")
        if not isinstance(pooled, Tensor) or tuple(pooled.shape) != (B, c.pooled_projection_dim):
            shape = tuple(pooled.shape) if isinstance(pooled, Tensor) else type(pooled).__name__
            raise ValueError(f"expected pooled_projections ({B}, {c.pooled_projection_dim}), got {shape}")
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"timestep must be one value or one per sample ({B},), got shape {tuple(t.shape)}")
        return t


def _check_config(c: SD3Transformer2DConfig) -> None:
    if c.pos_embed_max_size is None:
        raise ValueError("SD3Transformer2DModel without pos_embed_max_size (positions interpolated per size) is not "
                         "built in polymodal; every released SD3 / SD3.5 model sets it")
    if c.qk_norm not in (None, "rms_norm"):
        raise ValueError(f"SD3Transformer2DModel qk_norm={c.qk_norm!r} is not built (built: None, 'rms_norm')")
    if c.caption_projection_dim != c.dim:
        raise ValueError(f"caption_projection_dim ({c.caption_projection_dim}) must equal the model width "
                         f"num_attention_heads * attention_head_dim ({c.dim}): the text and image streams attend "
                         f"jointly")
    if c.sample_size < c.patch_size:
        raise ValueError(f"sample_size {c.sample_size} is smaller than the patch size {c.patch_size}")


# ----------------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, SD3Transformer2DConfig] = {
    "sd3-tiny-test": SD3Transformer2DConfig(sample_size=8, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8),
    # stabilityai/stable-diffusion-3-medium-diffusers, subfolder transformer (2.03B parameters)
    "sd3-medium": SD3Transformer2DConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                         pos_embed_max_size=192),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X (image-only attention in blocks 0-12), q/k RMSNorm
    "sd3.5-medium": SD3Transformer2DConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                           pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                           qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-3.5-large (and -large-turbo): 38 blocks of 38 heads, q/k RMSNorm
    "sd3.5-large": SD3Transformer2DConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                          pos_embed_max_size=192, qk_norm="rms_norm"),
}
HUB_IDS: dict[str, str] = {}  # the MM-DiT ships inside pipeline repositories (its transformer/ folder loads)

# ------------------------------------------------------------------------------------------------ checkpoints
# diffusers keeps q, k, v apart per modality (`attn.to_q` for the image tokens, `attn.add_q_proj` for the text),
# names the text output `to_add_out` and the feed-forwards `ff.net.0.proj` / `ff.net.2`; the rest are ours.


def _key_map(c: SD3Transformer2DConfig) -> KeyMap:
    b = "transformer_blocks.{i}"
    rules = []
    for p in ("weight", "bias"):
        rules += [Fuse(tuple(f"{b}.attn.to_{n}.{p}" for n in "qkv"), f"{b}.attn.image.qkv.{p}"),
                  Fuse(tuple(f"{b}.attn.add_{n}_proj.{p}" for n in "qkv"), f"{b}.attn.text.qkv.{p}"),
                  Fuse(tuple(f"{b}.attn2.to_{n}.{p}" for n in "qkv"), f"{b}.attn2.qkv.{p}")]
    rules += [
        Rename(f"{b}.attn.to_out.0.{{p}}", f"{b}.attn.image.proj.{{p}}"),
        Rename(f"{b}.attn.to_add_out.{{p}}", f"{b}.attn.text.proj.{{p}}"),
        Rename(f"{b}.attn.norm_q.weight", f"{b}.attn.image.q_norm.weight"),
        Rename(f"{b}.attn.norm_k.weight", f"{b}.attn.image.k_norm.weight"),
        Rename(f"{b}.attn.norm_added_q.weight", f"{b}.attn.text.q_norm.weight"),
        Rename(f"{b}.attn.norm_added_k.weight", f"{b}.attn.text.k_norm.weight"),
        Rename(f"{b}.attn2.to_out.0.{{p}}", f"{b}.attn2.proj.{{p}}"),
        Rename(f"{b}.attn2.norm_{{n}}.weight", f"{b}.attn2.{{n}}_norm.weight"),
    ]
    for ff in ("ff", "ff_context"):
        rules += [Rename(f"{b}.{ff}.net.0.proj.{{p}}", f"{b}.{ff}.fc1.{{p}}"),
                  Rename(f"{b}.{ff}.net.2.{{p}}", f"{b}.{ff}.fc2.{{p}}")]
    return KeyMap(rules)


def _read(raw: dict, shapes: dict) -> SD3Transformer2DConfig:
    c = from_dict(SD3Transformer2DConfig, raw)
    _check_config(c)
    return c


def _write(c: SD3Transformer2DConfig) -> dict:
    try:
        version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        version = "0.42.1"
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": version, **to_dict(c)}


FAMILY = Family(
    name="sd3_transformer",
    model=SD3Transformer2DModel,
    layouts={"diffusers": Layout("diffusers", _read, _write, _key_map, weights_stem="diffusion_pytorch_model")},
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="The MM-DiT of Stable Diffusion 3 / 3.5 (joint image-text attention, AdaLN-Zero, rectified flow)",
)
