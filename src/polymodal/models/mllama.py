"""Llama 3.2 Vision (Meta 2024, "Llama 3.2: Revolutionizing edge AI and vision"; the architecture of "The Llama 3
Herd of Models", Grattafiori et al. 2024, sec. 7): an image encoder of tiles whose features a Llama 3.1 decoder
reads through gated cross-attention layers interleaved with its self-attention layers.

    x = PatchConv(tile) ; x += tanh(g) E_pre[aspect]           each image: up to max_num_tiles tiles of image_size^2
    x = [CLS, x] ; x += (1 - tanh(g)) E_pos + tanh(g) E_tile[aspect]
    x = LN_pre(x), padded to a multiple of 8 patches           the tiles of one image attend together
    L x:  x = x + Attn(LN(x)) ; x = x + MLP(LN(x))             the local encoder; intermediate_layers_indices kept
    x = LN_post(x) ; x += tanh(g) E_post[aspect]
    G x:  x = x + tanh(a) Attn(LN(x)) ; x = x + tanh(m) MLP(LN(x))    the global encoder, gated
    f = Linear([x, kept states interleaved])                   vision_output_dim -> the decoder's width
    decoder layer i in cross_attention_layers:
          h = h + tanh(a) CrossAttn(RMSNorm(h), f)             q/k RMSNorm, no RoPE; a token sees the images before it
          h = h + tanh(m) row_seen * SwiGLU(RMSNorm(h))        a token that sees no image keeps no MLP output
    other layers: Llama's own (`polymodal.models.llama.DecoderLayer`, Llama 3.1 RoPE scaling)

The decoder is `polymodal.models.llama.Llama` with `make_layer` returning the cross-attention layer at those
indices; the cross keys and values are computed once per prompt and carried in `DecoderState.cross`, with the last
prompt token's image mask (`cross_mask`) and row weight (`cross_gate`) for the decode steps, as transformers extends
its mask. A prompt without images skips the cross layers. Checked against transformers' `MllamaForConditionalGeneration`
(tests/test_mllama.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, show, to_dict
from polymodal.generation import CausalLM, DecoderState, input_embeddings
from polymodal.models.llama import DecoderLayer, Llama, LlamaConfig, hf_key_map, read_hf_config, write_hf_config
from polymodal.nn import MLP, Attention, KVCache, LayerNorm, PatchEmbed, RMSNorm, SwiGLU
from polymodal.processing.mllama import MllamaProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename

_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))  # (rows, cols) of tiles, ids 1..8


@dataclass(frozen=True)
class MllamaVisionConfig:
    hidden_size: int = 1280
    hidden_act: str = "gelu"
    num_hidden_layers: int = 32  # the local encoder
    num_global_layers: int = 8  # the gated global encoder after it
    attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5120
    vision_output_dim: int = 7680  # hidden_size x (1 + len(intermediate_layers_indices))
    image_size: int = 560  # one tile's side
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = field(default=(3, 7, 15, 23, 30), metadata={"min": 0})
    supported_aspect_ratios: tuple[tuple[int, ...], ...] = _ASPECT_RATIOS

    @property
    def num_patches(self) -> int:
        """Positions per tile: the patch grid and [CLS]."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)  # id 0: a padding image


@dataclass(frozen=True)
class MllamaTextConfig(LlamaConfig):
    """Llama 3.1's decoder (LLaMA's fields, 11B's defaults) plus the indices of its gated cross-attention layers."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    bos_token_id: int | None = 128000
    eos_token_id: int | tuple[int, ...] | None = 128001
    pad_token_id: int | None = 128004
    cross_attention_layers: tuple[int, ...] = field(default=(3, 8, 13, 18, 23, 28, 33, 38), metadata={"min": 0})


@dataclass(frozen=True)
class MllamaConfig:
    vision: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text: MllamaTextConfig = field(default_factory=MllamaTextConfig)
    image_token_index: int = 128256  # <|image|>: the first of the 8 embedding rows past the vocabulary

    @property
    def eos_token_id(self) -> int | tuple[int, ...] | None:
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id


def check_config(c: MllamaConfig) -> MllamaConfig:
    """What the fields' own checks cannot see: how they fit together (before anything is built)."""
    v, t = c.vision, c.text
    if v.hidden_size % v.attention_heads:
        raise ValueError(f"vision hidden_size {v.hidden_size} is not a multiple of attention_heads {v.attention_heads}")
    if v.image_size % v.patch_size:
        raise ValueError(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if bad := [i for i in v.intermediate_layers_indices if i >= v.num_hidden_layers]:
        raise ValueError(f"vision intermediate_layers_indices {show(bad)} are past the {v.num_hidden_layers} layers")
    if v.vision_output_dim != v.hidden_size * (1 + len(v.intermediate_layers_indices)):
        raise ValueError(f"vision_output_dim {v.vision_output_dim} must be hidden_size x (1 + intermediate layers) = "
                         f"{v.hidden_size * (1 + len(v.intermediate_layers_indices))}")
    if any(len(r) != 2 or r[0] * r[1] > v.max_num_tiles or min(r) < 1 for r in v.supported_aspect_ratios):
        raise ValueError(f"supported_aspect_ratios {show(v.supported_aspect_ratios)} must be (rows, cols) pairs of at "
                         f"most max_num_tiles={v.max_num_tiles} tiles")
    if t.hidden_size % t.num_attention_heads or t.head_dim not in (None, t.hidden_size // t.num_attention_heads):
        raise ValueError("the text model's head dimension is hidden_size / num_attention_heads")
    if (bad := [i for i in t.cross_attention_layers if i >= t.num_hidden_layers]) or len(
            set(t.cross_attention_layers)) != len(t.cross_attention_layers):
        raise ValueError(f"cross_attention_layers {show(list(t.cross_attention_layers))} must be distinct indices "
                         f"below num_hidden_layers={t.num_hidden_layers}")
    if t.tie_word_embeddings:
        raise ValueError("Llama 3.2 Vision's embedding has 8 rows past the vocabulary; it cannot be tied to lm_head")
    if not 0 <= c.image_token_index < t.vocab_size + 8:
        raise ValueError(f"image_token_index {show(c.image_token_index)} is not a row of the {t.vocab_size + 8}-row "
                         "embedding")
    return c


# ------------------------------------------------------------------------------------------ the vision encoder


class AspectRatioEmbedding(nn.Module):
    """A learned, tanh-gated embedding per tile of each aspect ratio, added to every position of the tile."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.dim = c.max_num_tiles, c.hidden_size
        self.embedding = nn.Embedding(c.max_aspect_ratio_id + 1, c.max_num_tiles * c.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x (M, tiles, P, D), aspect_ratio_ids (M,) -> (M, tiles, P, D)."""
        return x + self.gate.tanh() * self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, self.dim)


class GatedPositionEmbedding(nn.Module):
    """Positions within a tile (shared by every tile) and per tile of each aspect ratio, blended by one tanh gate:
    (1 - tanh g) E_pos + tanh g E_tile[aspect]."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.P, self.dim = c.max_num_tiles, c.num_patches, c.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(c.num_patches, c.hidden_size))
        self.tile_embedding = nn.Embedding(c.max_aspect_ratio_id + 1, c.max_num_tiles * c.num_patches * c.hidden_size)

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x (M, tiles, P, D) -> (M, tiles, P, D)."""
        g = self.gate.tanh()
        tile = self.tile_embedding(aspect_ratio_ids).view(-1, self.tiles, self.P, self.dim)
        return x + (1 - g) * self.embedding + g * tile


class VisionLayer(nn.Module):
    """Pre-norm encoder layer (bias-free attention, GELU MLP): (M, N, D) -> (M, N, D), each image's positions laid out
    real ones first (`real`: how many, per image; see `VisionModel.real_first`)."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        D = c.hidden_size
        self.input_layernorm = LayerNorm(D, eps=c.norm_eps)
        self.self_attn = Attention(D, c.attention_heads, bias=False)
        self.post_attention_layernorm = LayerNorm(D, eps=c.norm_eps)
        self.mlp = MLP(D, c.intermediate_size, c.hidden_act)

    def attend(self, x: Tensor, real: list[int]) -> Tensor:
        """The reference's masked attention, (M, N, D) -> (M, N, D), without its (M, 1, N, N) mask: a real position
        attends to every position and a padding one to the real ones only (its additive mask is finfo.min exactly
        where query and key are both padding, which weighs such keys exp(-3.4e38) = 0), so each image is two unmasked
        products over contiguous slices. A 1-tile image padded to 4 tiles attends over 0.43x the pairs: 1025 x 4128
        and 3103 x 1025, not 4128 x 4128. An image with no real tile (a padding image) gets the reference's even
        weights: there every score plus finfo.min rounds to finfo.min itself."""
        a = self.self_attn
        M, N, _ = x.shape
        # the same choice as Attention.forward: three products on CPUs for wide, unpacked weights
        split = x.device.type == "cpu" and x.shape[-1] >= 512 and not getattr(a.qkv, "packed", False)
        q, k, v = a.project_qkv(x, split=split)  # (M, H, N, Dh) each
        out = q.new_empty(q.shape)
        for m, R in enumerate(real):
            qm, km, vm = q[m:m + 1], k[m:m + 1], v[m:m + 1]
            if R == 0:
                out[m:m + 1] = vm.mean(dim=2, keepdim=True)
                continue
            out[m:m + 1, :, :R] = F.scaled_dot_product_attention(qm[:, :, :R], km, vm)
            if R < N:
                out[m:m + 1, :, R:] = F.scaled_dot_product_attention(qm[:, :, R:], km[:, :, :R], vm[:, :, :R])
        return a.proj(out.transpose(1, 2).reshape(M, N, -1))

    def forward(self, x: Tensor, real: list[int]) -> Tensor:
        x = x + self.attend(self.input_layernorm(x), real)
        return x + self.mlp(self.post_attention_layernorm(x))


class GatedVisionLayer(VisionLayer):
    """The global encoder's layer: attention and MLP outputs each scaled by a learned tanh gate."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__(c)
        self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
        self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: Tensor, real: list[int]) -> Tensor:
        x = x + self.gate_attn.tanh() * self.attend(self.input_layernorm(x), real)
        return x + self.gate_ffn.tanh() * self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    def __init__(self, c: MllamaVisionConfig, depth: int, layer: type):
        super().__init__()
        self.layers = nn.ModuleList(layer(c) for _ in range(depth))


class VisionModel(nn.Module):
    """pixel_values (B, N, tiles, C, H, W), aspect_ratio_ids (B, N), aspect_ratio_mask (B, N, tiles) -> per image and
    tile the final and intermediate states (B, N, tiles, P, vision_output_dim), P = patches + [CLS]."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        self.config = c
        D = c.hidden_size
        self.patch_embedding = PatchEmbed(c.num_channels, D, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.gated_positional_embedding = GatedPositionEmbedding(c)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(c)
        self.post_tile_positional_embedding = AspectRatioEmbedding(c)
        self.layernorm_pre = LayerNorm(D)  # torch's default eps (1e-5), not norm_eps: as the checkpoints were trained
        self.layernorm_post = LayerNorm(D)
        self.transformer = Encoder(c, c.num_hidden_layers, VisionLayer)
        self.global_transformer = Encoder(c, c.num_global_layers, GatedVisionLayer)

    def real_first(self, aspect_ratio_mask: Tensor, length: int) -> tuple[Tensor, list[int]]:
        """(M, tiles) real tiles, L = `length` the padded tile length -> (order (M, tiles * L): each image's positions
        with the real ones first, in order, then the padding ones (padded tiles and the positions added to reach a
        multiple of 8); how many are real, per image). Attention does not depend on the order of its keys, and the
        rest of a layer works position by position, so the encoders run on this order and the output is put back."""
        M, tiles = aspect_ratio_mask.shape
        pad = (aspect_ratio_mask == 0)[:, :, None].expand(M, tiles, length).clone()
        pad[:, :, self.config.num_patches:] = True
        pad = pad.reshape(M, tiles * length)
        order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices  # (M, N): real (0) first
        return order, (~pad).sum(1).tolist()

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        c = self.config
        B, N, tiles, C, H, W = pixel_values.shape
        M, P, D = B * N, c.num_patches, c.hidden_size
        ids = aspect_ratio_ids.reshape(M)
        x = self.patch_embedding(pixel_values.reshape(M * tiles, C, H, W).to(self.class_embedding.dtype))
        x = self.pre_tile_positional_embedding(x.view(M, tiles, P - 1, D), ids)  # (M, tiles, P - 1, D)
        x = torch.cat([self.class_embedding.expand(M, tiles, 1, D), x], dim=2)  # [CLS] first in each tile
        x = self.layernorm_pre(self.gated_positional_embedding(x, ids))  # (M, tiles, P, D)
        L = -(-P // 8) * 8  # the reference pads each tile to a multiple of 8 positions (zeros after the norm)
        x = F.pad(x, (0, 0, 0, L - P)).reshape(M, tiles * L, D)
        order, real = self.real_first(aspect_ratio_mask.reshape(M, tiles), L)
        back = order.argsort(dim=1)  # (M, N): where each position of the tile layout went
        index = order[..., None].expand(-1, -1, D)
        x = x.gather(1, index)  # (M, N, D), real positions first
        kept: dict[int, Tensor] = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, real)
            if i in c.intermediate_layers_indices:
                kept[i] = x
        x = self.layernorm_post(x).gather(1, back[..., None].expand(-1, -1, D)).view(M, tiles, L, D)
        x = self.post_tile_positional_embedding(x, ids).view(M, tiles * L, D).gather(1, index)  # per tile: in layout
        for layer in self.global_transformer.layers:
            x = layer(x, real)
        # the intermediate states interleaved per channel (d0 of each layer, d1 of each layer, ...), after the final
        # ones: the order of the reference's stack(dim=-1), which the projector's columns were trained on
        inter = torch.stack([kept[i] for i in c.intermediate_layers_indices], dim=-1).flatten(-2)  # (M, N, D * k)
        out = torch.cat([x, inter], dim=-1)  # (M, N, Dv), real positions first
        # back to the tile layout, the padding positions dropped: (M, tiles, P) positions of the layout
        keep = back.view(M, tiles, L)[:, :, :P].reshape(M, tiles * P)
        out = out.gather(1, keep[..., None].expand(-1, -1, out.shape[-1]))
        return out.reshape(B, N, tiles, P, -1)


# ------------------------------------------------------------------------------------------ the text decoder


@dataclass
class CrossContext:
    """What the cross-attention layers read in one forward: per cross layer its keys and values (B, KV, S, Dh); the
    mask (B, 1, T, S) bool or None (every position); rows (B, T, 1): 1 where a token sees an image, 0 where it sees
    none (its MLP output is dropped), or None."""

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor | None
    rows: Tensor | None


class CrossAttentionLayer(nn.Module):
    """Gated cross-attention to the image states, then a gated SwiGLU: (B, T, D) -> (B, T, D). `slot`: which of the
    context's key/value pairs is this layer's."""

    def __init__(self, c: MllamaTextConfig, slot: int):
        super().__init__()
        self.slot = slot
        D, H, Dh = c.hidden_size, c.num_attention_heads, c.dim_per_head
        self.input_layernorm = RMSNorm(D, eps=c.rms_norm_eps)
        self.cross_attn = Attention(D, H, num_kv_heads=c.kv_heads, head_dim=Dh, context_dim=D, bias=False,
                                    qk_norm_eps=c.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(D, eps=c.rms_norm_eps)
        self.mlp = SwiGLU(D, c.intermediate_size, c.hidden_act)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor | None, rope, cache: KVCache | None,
                context: CrossContext | None = None) -> Tensor:
        if cache is not None:  # no keys of its own: only the length moves on, as every layer's does
            B, T, _ = x.shape
            empty = x.new_empty(B, 0, T, cache.k.shape[-1])
            cache.update(empty, empty)
        if context is None:  # a prompt without images skips the layer, as the reference does
            return x
        h = self.cross_attn(self.input_layernorm(x), context.kv[self.slot], mask=context.mask)
        x = x + self.cross_attn_attn_gate.tanh() * h
        h = self.mlp(self.post_attention_layernorm(x))
        if context.rows is not None:
            h = h * context.rows
        return x + self.cross_attn_mlp_gate.tanh() * h


class MllamaText(Llama):
    """Llama with gated cross-attention layers at `cross_attention_layers` and an embedding of vocab_size + 8 rows
    (<|image|> and the other reserved tokens past the vocabulary)."""

    def __init__(self, config: MllamaTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size)

    def make_layer(self, index: int) -> nn.Module:
        c = self.config
        if index in c.cross_attention_layers:
            return CrossAttentionLayer(c, sorted(c.cross_attention_layers).index(index))
        return DecoderLayer(c)

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        """A self-attention layer's cache as LLaMA's; a cross layer's holds no heads (no memory), only the length."""
        c = self.config
        return [KVCache(batch, 0 if i in c.cross_attention_layers else c.kv_heads, max_len, c.dim_per_head,
                        dtype=dtype, device=device) for i in range(c.num_hidden_layers)]


# ------------------------------------------------------------------------------------------ the model


class Mllama(nn.Module, CausalLM):
    """input_ids (B, T) with one <|image|> per image, pixel_values (B, N, tiles, 3, H, W), aspect_ratio_ids (B, N),
    aspect_ratio_mask (B, N, tiles), cross_attention_mask (B, T, N, tiles) -> logits (B, T, V): transformers' names
    and layout (what its processor returns). `generate(input_ids, pixel_values=..., ...)` encodes the images at the
    prefill; the decode steps cross-attend the state's keys and values."""

    fixed_shape_step = True  # a decode step reads the state's tensors, nothing back to the host

    def __init__(self, config: MllamaConfig):
        super().__init__()
        self.config = c = check_config(config)
        self.vision_model = VisionModel(c.vision)
        self.multi_modal_projector = nn.Linear(c.vision.vision_output_dim, c.text.hidden_size, bias=True)
        self.language_model = MllamaText(c.text)

    # ---------------------------------------------------------------- checks

    def media_tokens(self, pixel_values: Tensor | None = None, aspect_ratio_ids: Tensor | None = None,
                     aspect_ratio_mask: Tensor | None = None, cross_attention_mask: Tensor | None = None
                     ) -> dict[int, int]:
        """{<|image|> id: how many the prompt holds}: one token per image (not expanded), for callers that check a
        request before any work (the server's engine). Padding images (aspect ratio id 0) have no token."""
        n = 0
        if pixel_values is not None:
            self.check_images(None, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
            n = int((aspect_ratio_ids > 0).sum())
        return {self.config.image_token_index: n}

    def check_images(self, input_ids: Tensor | None, pixel_values: Tensor | None, aspect_ratio_ids: Tensor | None,
                     aspect_ratio_mask: Tensor | None, cross_attention_mask: Tensor | None,
                     batch: int | None = None, length: int | None = None) -> int:
        """The image inputs against one another and the prompt -> images per row; one clear ValueError before any
        work. Each row holds as many <|image|> tokens as real images (aspect ratio id > 0; rows with fewer images
        are padded with id 0, as the processor pads them)."""
        v, token = self.config.vision, self.config.image_token_index
        if pixel_values is None:
            if aspect_ratio_ids is not None or aspect_ratio_mask is not None or cross_attention_mask is not None:
                raise ValueError("aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask go with pixel_values")
            if input_ids is not None and input_ids.shape[1] > 1 and (n := int((input_ids == token).sum())):
                raise ValueError(f"the prompt has {n} <|image|> tokens (id {token}) but no pixel_values came with it")
            return 0
        # without cross_attention_mask, transformers' SDPA path makes the cross-attention causal over the image
        # positions (its `is_causal` defaults to True there) and its eager path does not: no meaning to match
        if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids (B, images), aspect_ratio_mask (B, images, tiles) and "
                             "cross_attention_mask (B, length, images, tiles): the processor returns them")
        want = ("batch", "images", f"tiles={v.max_num_tiles}", f"channels={v.num_channels}",
                f"height={v.image_size}", f"width={v.image_size}")
        if (pixel_values.dim() != 6 or tuple(pixel_values.shape[2:]) != (v.max_num_tiles, v.num_channels,
                                                                          v.image_size, v.image_size)
                or not pixel_values.is_floating_point()):
            raise ValueError(f"pixel_values must be floating-point ({', '.join(want)}), got {pixel_values.dtype} of "
                             f"shape {tuple(pixel_values.shape)}")
        B, N = pixel_values.shape[:2]
        if batch is not None and B != batch:
            raise ValueError(f"pixel_values holds images for {B} rows, the prompt has {batch}")
        if tuple(aspect_ratio_ids.shape) != (B, N) or aspect_ratio_ids.is_floating_point():
            raise ValueError(f"aspect_ratio_ids must be integers of shape (batch, images) = {(B, N)} as pixel_values "
                             f"says, got {aspect_ratio_ids.dtype} of shape {tuple(aspect_ratio_ids.shape)}")
        if bool(((aspect_ratio_ids < 0) | (aspect_ratio_ids > v.max_aspect_ratio_id)).any()):
            raise ValueError(f"aspect_ratio_ids must be in 0..{v.max_aspect_ratio_id} (0: a padding image), got "
                             f"{show(aspect_ratio_ids.tolist())}")
        if tuple(aspect_ratio_mask.shape) != (B, N, v.max_num_tiles):
            raise ValueError(f"aspect_ratio_mask must be (batch, images, tiles) = {(B, N, v.max_num_tiles)}, got "
                             f"{tuple(aspect_ratio_mask.shape)}")
        if (cross_attention_mask.dim() != 4 or cross_attention_mask.shape[0] != B
                or tuple(cross_attention_mask.shape[2:]) != (N, v.max_num_tiles)
                or (length is not None and cross_attention_mask.shape[1] != length)):
            raise ValueError(f"cross_attention_mask must be (batch, length, images, tiles) = "
                             f"{(B, length if length is not None else 'T', N, v.max_num_tiles)}, got "
                             f"{tuple(cross_attention_mask.shape)}")
        if input_ids is not None:
            tokens = (input_ids == token).sum(-1).tolist()
            images = (aspect_ratio_ids > 0).sum(-1).tolist()
            for b, (t, n) in enumerate(zip(tokens, images)):
                if t != n:
                    raise ValueError(f"row {b} of the prompt has {t} <|image|> tokens (id {token}) for {n} image(s): "
                                     "each image needs one, where it enters the text")
        return N

    # ---------------------------------------------------------------- images

    def image_states(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """-> the projected image states the decoder cross-attends (B, N * tiles * P, D), image by image, tile by
        tile."""
        f = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # (B, N, tiles, P, Dv)
        return self.multi_modal_projector(f).flatten(1, 3)

    def cross_kv(self, states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each cross layer's keys and values of the image states (B, S, D) -> [(B, KV, S, Dh) x 2], once per prompt."""
        layers = self.language_model.layers
        return [layers[i].cross_attn.project_kv(states) for i in sorted(self.config.text.cross_attention_layers)]

    def token_masks(self, cross_attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, N, tiles), 1 where a token sees a tile -> (what each token attends (B, T, S) bool, whether it sees any
        image (B, T)). A token that sees none attends to every position, as the reference's mask (zeroed over such a
        row) has it; its MLP output is dropped instead."""
        B, T = cross_attention_mask.shape[:2]
        sees = cross_attention_mask.bool().repeat_interleave(self.config.vision.num_patches, dim=3).view(B, T, -1)
        any_ = sees.any(-1)
        return sees | ~any_[..., None], any_

    # ---------------------------------------------------------------- forward and generation

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, aspect_ratio_ids: Tensor | None = None,
                aspect_ratio_mask: Tensor | None = None, cross_attention_mask: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, cache: list[KVCache] | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """-> logits (B, T, V). With a filled cache, cross_attention_mask may cover the past tokens too (B, past + T,
        ...): its last T rows are the new tokens'."""
        lm = self.language_model
        h = input_embeddings(lm, input_ids, inputs_embeds)  # (B, T, D)
        B, T = h.shape[:2]
        past = cache[0].length if cache else 0
        if cross_attention_mask is not None and past and cross_attention_mask.shape[1] == past + T:
            cross_attention_mask = cross_attention_mask[:, past:]
        self.check_images(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, B, T)
        context = None
        if pixel_values is not None:
            kv = self.cross_kv(self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(h.dtype))
            sees, any_ = self.token_masks(cross_attention_mask)
            context = CrossContext(kv, sees[:, None], any_[..., None].to(h.dtype))  # masks (B, 1, T, S), (B, T, 1)
        positions, mask = lm.decoder_inputs(h, attention_mask, cache, position_ids)
        return lm.head(lm.decode(h, mask=mask, positions=positions, cache=cache, context=context,
                                 keep=logits_to_keep))

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           pixel_values: Tensor | None = None, aspect_ratio_ids: Tensor | None = None,
                           aspect_ratio_mask: Tensor | None = None, cross_attention_mask: Tensor | None = None
                           ) -> tuple[DecoderState, Tensor]:
        """The prompt and its images into a new cache -> (state, next-token logits (B, V)). The state carries each
        cross layer's keys and values (B, KV, S, Dh) (S = 0 for a prompt without images: its rows skip them, and
        they join image rows in one batch), and for the decode steps the last prompt token's view: `cross_mask`
        (B, S) and `cross_gate` (B,), 0 where that token sees no image (transformers repeats the last mask row)."""
        lm, c = self.language_model, self.config.text
        B, T = input_ids.shape
        self.check_images(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, B, T)
        p = next(self.parameters())
        cache = self.new_cache(B, max_len, dtype=p.dtype, device=p.device)
        state, positions = DecoderState.start(cache, attention_mask, max_len)
        h = lm.embed(input_ids)
        if pixel_values is None:
            empty = h.new_zeros(B, c.kv_heads, 0, c.dim_per_head)
            context = None
            state.cross = [(empty, empty)] * len(c.cross_attention_layers)
            state.cross_mask, state.cross_gate = input_ids.new_zeros(B, 0), h.new_zeros(B)
        else:
            kv = self.cross_kv(self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(h.dtype))
            sees, any_ = self.token_masks(cross_attention_mask)
            context = CrossContext(kv, sees[:, None], any_[..., None].to(h.dtype))
            state.cross, state.cross_mask, state.cross_gate = kv, sees[:, -1].long(), any_[:, -1].to(h.dtype)
        _, mask = lm.decoder_inputs(h, attention_mask, cache, positions)
        logits = lm.head(lm.decode(h, mask=mask, positions=positions, cache=cache, context=context, keep=1))
        return state, logits[:, -1]

    def decode_step(self, tokens: Tensor, mask: Tensor, positions: Tensor, state: DecoderState) -> Tensor:
        """One token per row, cross-attending the state's image keys and values (a decode step reads nothing back to
        the host: its branches are on shapes)."""
        lm = self.language_model
        context = None
        if state.cross and state.cross[0][0].shape[2]:
            sees = None
            if state.cross_mask is not None:
                sees = state.cross_mask.bool()
                # a row with no position to see (a prompt without images, batched with image rows) attends to its
                # zero padding, which adds nothing
                sees = (sees | ~sees.any(-1, keepdim=True))[:, None, None]  # (B, 1, 1, S)
            rows = None if state.cross_gate is None else state.cross_gate[:, None, None]  # (B, 1, 1)
            context = CrossContext(state.cross, sees, rows)
        h = lm.embed(tokens)
        positions, mask = lm.decoder_inputs(h, mask, state.cache, positions)
        return lm.head(lm.decode(h, mask=mask, positions=positions, cache=state.cache, context=context))[:, -1]

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        return self.language_model.new_cache(batch, max_len, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ presets

_INSTRUCT_EOS = (128001, 128008, 128009)
PRESETS: dict[str, MllamaConfig] = {
    "mllama-tiny-test": MllamaConfig(
        vision=MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_global_layers=2,
                                  attention_heads=4, vision_output_dim=96, image_size=32, patch_size=8,
                                  intermediate_layers_indices=(0, 2)),
        text=MllamaTextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              cross_attention_layers=(1, 3), bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=256),
    "meta-llama/Llama-3.2-11B-Vision": MllamaConfig(),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": MllamaConfig(text=MllamaTextConfig(eos_token_id=_INSTRUCT_EOS)),
    "meta-llama/Llama-3.2-90B-Vision-Instruct": MllamaConfig(text=MllamaTextConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=100, num_attention_heads=64,
        cross_attention_layers=tuple(range(3, 100, 5)), eos_token_id=_INSTRUCT_EOS)),
}
HUB_IDS = {name: name for name in PRESETS if name.startswith("meta-llama/")}

# ------------------------------------------------------------------------------------------ checkpoints
# The hub's files (and transformers 5.x's save_pretrained) name `vision_model.*`, `language_model.model.*`,
# `language_model.lm_head.weight`, `multi_modal_projector.*`; transformers 5.x's modules are `model.vision_model.*`,
# `model.language_model.*` (the text model's own names), `model.multi_modal_projector.*` and `lm_head.weight`. Both
# load; saving writes the hub's. LLaMA's map serves the decoder (its cross layers' k/v fused, q/o renamed first).


def hf_text_key_map(c: MllamaTextConfig) -> KeyMap:
    layer = "model.layers.{i}.cross_attn"
    return KeyMap([
        Fuse((f"{layer}.k_proj.weight", f"{layer}.v_proj.weight"), "layers.{i}.cross_attn.kv.weight"),
        Rename(f"{layer}.q_proj.weight", "layers.{i}.cross_attn.q.weight"),
        Rename(f"{layer}.o_proj.weight", "layers.{i}.cross_attn.proj.weight"),
    ]) + hf_key_map(c)


def hf_vision_key_map(c: MllamaVisionConfig) -> KeyMap:
    attn = "{enc}.layers.{i}.self_attn"
    return KeyMap([
        Rename("patch_embedding.weight", "patch_embedding.proj.weight"),
        Fuse(tuple(f"{attn}.{n}_proj.weight" for n in "qkv"), f"{attn}.qkv.weight"),
        Rename(f"{attn}.o_proj.weight", f"{attn}.proj.weight"),
    ])


def hf_key_map_mllama(c: MllamaConfig) -> KeyMap:
    language = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                "model.language_model.": "model.", "lm_head.": "lm_head."}
    return (KeyMap([Rename("multi_modal_projector.{p}", "multi_modal_projector.{p}"),
                    Rename("model.multi_modal_projector.{p}", "multi_modal_projector.{p}")])
            + hf_text_key_map(c.text).nested(language, "language_model.")
            + hf_vision_key_map(c.vision).nested({"vision_model.": "", "model.vision_model.": ""}, "vision_model."))


# ------------------------------------------------------------------------------------------ config files
# transformers' MllamaConfig: `vision_config` (mllama_vision_model), `text_config` (mllama_text_model: LLaMA's fields,
# RoPE in 5.x's `rope_parameters` or 4.x's `rope_theta` / `rope_scaling`, and `cross_attention_layers`),
# `image_token_index`.


def _read_hf(raw: dict, shapes: dict) -> MllamaConfig:
    text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ValueError("text_config and vision_config must be JSON objects")
    text = read_hf_config(MllamaTextConfig, text_raw, head_dim=None,
                          tie_word_embeddings=bool(raw.get("tie_word_embeddings")
                                                   or text_raw.get("tie_word_embeddings")))
    ratios = vision_raw.get("supported_aspect_ratios")
    if isinstance(ratios, list) and all(isinstance(r, list) for r in ratios):
        vision_raw = {**vision_raw, "supported_aspect_ratios": tuple(tuple(r) for r in ratios)}
    if "attention_heads" not in vision_raw and "num_attention_heads" in vision_raw:
        vision_raw = {**vision_raw, "attention_heads": vision_raw["num_attention_heads"]}
    vision = from_dict(MllamaVisionConfig, vision_raw)
    token = raw.get("image_token_index", raw.get("image_token_id", 128256))
    if not isinstance(token, int) or isinstance(token, bool):
        raise ValueError(f"image_token_index {show(token)} is not a token id")
    return check_config(MllamaConfig(vision=vision, text=text, image_token_index=token))


def _write_hf(c: MllamaConfig) -> dict:
    t = c.text
    if t.attention_bias or t.mlp_bias or t.attention_out_bias:
        raise ValueError("transformers' Mllama decoder has no biases; save this model in polymodal's layout")
    text = {**write_hf_config(t, "mllama_text_model", "MllamaForCausalLM"),
            "cross_attention_layers": list(t.cross_attention_layers)}
    del text["architectures"], text["head_dim"]
    vision = to_dict(c.vision)
    vision["supported_aspect_ratios"] = [list(r) for r in c.vision.supported_aspect_ratios]
    return {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "text_config": text,
            "vision_config": {"model_type": "mllama_vision_model", **vision},
            "image_token_index": c.image_token_index, "tie_word_embeddings": False}


FAMILY = Family(
    name="mllama",
    model=Mllama,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map_mllama),
        "polymodal": native_layout("mllama", MllamaConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Llama 3.2 Vision: a tiled ViT (local + gated global encoder, intermediate layers kept) read by a "
                "Llama 3.1 decoder through interleaved gated cross-attention layers",
    processor=MllamaProcessor.from_pretrained,
    tasks=("image-text-to-text",),
)
