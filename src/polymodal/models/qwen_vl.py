"""Qwen-VL (Bai et al. 2023, "Qwen-VL: A Versatile Vision-Language Model for Understanding, Localization, Text
Reading, and Beyond"): an OpenCLIP ViT-bigG tower whose patch features a position-aware adapter compresses to 256
queries, placed in the token stream of the Qwen (v1) LLM between <img> and </img>.

    x = conv1(pixels) + interp(positional_embedding)      448 px / 14: 32 x 32 patches; 256 learned positions
                                                          resampled bicubically to the grid (no class token)
    x = ln_pre(x); L x: x = x + Attn(LN(x)), x + MLP(LN(x))  fused qkv laid out per head [q, k, v]; exact GELU
    f = Resampler(x)                                      one cross-attention: 256 learned queries (+ fixed 2-D
                                                          sin-cos positions) over kv_proj(x) (keys + positions,
                                                          values without), torch.nn.MultiheadAttention's math
    f = ln_post(f) @ proj                                 (N, 256, D)
    h = embed(ids); h[row, a+1 : b] = f                    each <img> at a, </img> at b, 256 positions between
    logits = Qwen.decode(h)                                LLaMA-shaped: RMSNorm, RoPE, SwiGLU, biased fused qkv

The model is shared parts: the vision blocks are `polymodal.nn.Block`, the decoder is `polymodal.models.llama.Llama`
mounted on the official names by the key map below, and generation is the one loop (the images are merged once, at
the prefill). The official code (Qwen/Qwen-VL on the hub: modeling_qwen.py, visual.py) is not in transformers; what
is checked and what is read from it is in docs/qwen_vl.md (tests/test_qwen_vl.py: the Resampler against
torch.nn.MultiheadAttention, the per-head qkv against an explicit computation, the decoder against transformers'
Qwen2ForCausalLM on the same weights).

Qwen's dynamic NTK and log-n attention scaling change nothing up to `seq_length` (2048) positions; beyond it they
are not implemented, and a prompt plus its new tokens past `seq_length` is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, show
from polymodal.generation import CausalLM, DecoderState
from polymodal.models.llama import Llama, LlamaConfig
from polymodal.nn import Block, KVCache, LayerNorm, PatchEmbed, interpolate_pos_2d
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import KeyMap, Rename, Transform

# the official tower's learned positions: always 256 (a 16 x 16 grid), resampled to the image's grid (visual.py)
POSITIONS = 256


@dataclass(frozen=True)
class QwenVisionConfig:
    """config.json's `visual` object (the official names)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    n_queries: int = 256
    output_dim: int = 4096  # the adapter's (and the LLM's) width
    image_start_id: int = 151857  # <img>; </img> is +1, the padding between them +2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # 1664 * 4.9231 -> 8192, as the official int() gives

    @property
    def pool_heads(self) -> int:
        return self.output_dim // 128  # the official Resampler's heads: 128 channels each

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


def _text(**kw) -> LlamaConfig:
    """Qwen (v1)'s LLM as our LLaMA: q/k/v biased, o and the MLP not (`no_bias`), untied head."""
    return LlamaConfig(**{"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 11008,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 8192,
                          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": True,
                          "attention_out_bias": False, "bos_token_id": None, "eos_token_id": 151643,
                          "pad_token_id": None, **kw})


@dataclass(frozen=True)
class QwenVLConfig:
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    text: LlamaConfig = field(default_factory=_text)
    seq_length: int = 2048  # the trained context; dynamic NTK and log-n scaling act past it
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    @property
    def eos_token_id(self) -> int | tuple[int, ...] | None:
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    @property
    def max_length(self) -> int | None:
        """The most positions a sequence may hold here (None: no limit below the RoPE's)."""
        return self.seq_length if (self.use_dynamic_ntk or self.use_logn_attn) else None


# ------------------------------------------------------------------------------------------ the vision tower


def sincos_2d_mae(grid: int, dim: int) -> Tensor:
    """The Resampler's fixed positions (MAE's 2-D sin-cos, as visual.py builds them) -> (grid^2, dim): the first half
    of the channels encodes the column, the second the row (the official meshgrid puts w first), each half
    [sin, cos] of the position times 10000^(-i / (dim/4)). Only for models built from scratch: checkpoints carry
    the tensor (`attn_pool.pos_embed`)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4))  # (dim/4,)
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = np.einsum("m,d->md", pos, omega)  # (grid^2, dim/4)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()


class Resampler(nn.Module):
    """Patch features (N, L, Dv) -> (N, Q, D): Q learned queries attend once over all patches.

    One multi-head cross-attention whose three inputs differ (torch.nn.MultiheadAttention(query, key, value) in the
    official code): queries = ln_q(query) + pos, keys = ln_kv(kv_proj(x)) + pos resampled to the patch grid,
    values = ln_kv(kv_proj(x)) without positions. The shared Attention's projections hold the weights
    (`attn.qkv` = in_proj_weight's [q; k; v] rows, `attn.proj` = out_proj); the three products are taken here on
    their row blocks because each reads another input."""

    def __init__(self, grid: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"the adapter's width {dim} must be a positive multiple of its heads {heads} "
                             f"(output_dim / 128)")
        self.grid = grid
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        pos = torch.empty(grid * grid, dim)  # on the default device: the loader builds on meta, then fills
        if pos.device.type != "meta":
            pos = sincos_2d_mae(grid, dim).to(pos.device)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, but in the checkpoint
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else None
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.ln_q = LayerNorm(dim, eps=1e-6)
        self.ln_kv = LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        N, L, _ = x.shape
        H, D = self.heads, self.query.shape[1]
        side = math.isqrt(L)
        pos_k = interpolate_pos_2d(self.pos_embed, (self.grid, self.grid), (side, side))  # (L, D)
        x = self.ln_kv(x if self.kv_proj is None else self.kv_proj(x))  # (N, L, D)
        w_q, w_k, w_v = self.attn.qkv.weight.chunk(3)
        b_q, b_k, b_v = self.attn.qkv.bias.chunk(3)
        q = F.linear(self.ln_q(self.query) + self.pos_embed, w_q, b_q)  # (Q, D): the queries' positions stay Q
        k = F.linear(x + pos_k.to(x.dtype), w_k, b_k)  # (N, L, D)
        v = F.linear(x, w_v, b_v)
        q = q.view(1, -1, H, D // H).transpose(1, 2).expand(N, -1, -1, -1)  # (N, H, Q, Dh)
        k, v = (t.view(N, L, H, D // H).transpose(1, 2) for t in (k, v))  # (N, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, Q, Dh)
        return self.attn.proj(out.transpose(1, 2).reshape(N, -1, D))


class VisionTower(nn.Module):
    """pixel_values (N, 3, S, S) -> (N, Q, D) features, S a multiple of the patch size (448 as trained)."""

    def __init__(self, c: QwenVisionConfig):
        super().__init__()
        self.config = c
        self.conv1 = PatchEmbed(3, c.width, c.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(POSITIONS, c.width) * c.width ** -0.5)
        self.ln_pre = LayerNorm(c.width, eps=1e-6)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_width, act="gelu", eps=1e-6)
                                                   for _ in range(c.layers))
        side = math.isqrt(c.n_queries)
        if side * side != c.n_queries:
            raise ValueError(f"n_queries {c.n_queries} must be a square (the adapter's queries form a grid)")
        self.attn_pool = Resampler(side, c.output_dim, c.pool_heads, c.width)
        self.ln_post = LayerNorm(c.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(c.output_dim, c.output_dim) * c.output_dim ** -0.5)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.conv1(pixel_values.to(self.proj.dtype))  # (N, g*g, W)
        g = math.isqrt(x.shape[1])
        side = math.isqrt(POSITIONS)
        x = x + interpolate_pos_2d(self.positional_embedding, (side, side), (g, g)).to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(self.attn_pool(x)) @ self.proj  # (N, Q, D)


# ------------------------------------------------------------------------------------------ the model


class QwenVL(nn.Module, CausalLM):
    """input_ids (B, T) with each image's span `<img> ... </img>` (n_queries positions between the marks, whatever
    their ids), pixel_values (N, 3, 448, 448) for the N spans in reading order -> logits (B, T, V).
    `generate(input_ids, pixel_values=...)` merges them at the prefill and decodes like the language model."""

    fixed_shape_step = True  # decode steps are the decoder's

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = c = config
        if c.vision.output_dim != c.text.hidden_size:
            raise ValueError(f"the adapter's output_dim {c.vision.output_dim} must be the LLM's hidden_size "
                             f"{c.text.hidden_size}")
        self.visual = VisionTower(c.vision)
        self.language_model = Llama(c.text)

    def media_tokens(self, pixel_values: Tensor | None = None) -> dict[int, int]:
        """{the token that spans are made of: the positions these images fill}; each image fills n_queries
        positions between its <img> and </img> (the processor writes <imgpad> there)."""
        v = self.config.vision
        n = 0 if pixel_values is None else self._check_pixels(pixel_values)
        return {v.image_pad_id: n * v.n_queries}

    def _check_pixels(self, pixel_values: Tensor) -> int:
        v = self.config.vision
        if (pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]
                or pixel_values.shape[2] % v.patch_size or not pixel_values.is_floating_point()):
            raise ValueError(f"pixel_values must be floating-point (images, 3, size, size) with size a multiple of "
                             f"{v.patch_size} ({v.image_size} as trained), got {pixel_values.dtype} of shape "
                             f"{tuple(pixel_values.shape)}")
        return pixel_values.shape[0]

    def image_spans(self, input_ids: Tensor) -> Tensor:
        """The positions between each <img> and its </img> -> (B, T) bool, every span checked: marks paired in
        order within a row and n_queries positions between them (modeling_qwen.py fills [a + 1, b))."""
        v = self.config.vision
        start, end = input_ids == v.image_start_id, input_ids == v.image_end_id
        depth = start.long().cumsum(1) - end.long().cumsum(1)  # 1 inside a span (and on its <img>), else 0
        if bool(((depth < 0) | (depth > 1)).any()) or bool((depth[:, -1] != 0).any()):
            raise ValueError(f"every <img> (token {v.image_start_id}) needs its </img> (token {v.image_end_id}) "
                             "after it in the same row, with no span inside another")
        starts, ends = start.nonzero(), end.nonzero()  # row-major: reading order
        lengths = (ends[:, 1] - starts[:, 1] - 1).tolist()
        if any(n != v.n_queries for n in lengths):
            raise ValueError(f"each image span holds {v.n_queries} positions between <img> and </img>; found "
                             f"{show(lengths)} (the processor writes {v.n_queries} <imgpad> tokens)")
        return (depth == 1) & ~start

    def merge(self, input_ids: Tensor, embeds: Tensor, pixel_values: Tensor | None) -> Tensor:
        """The text embeddings (B, T, D) with image k's features over the k-th span in reading order."""
        if pixel_values is None:
            if input_ids.shape[1] > 1:  # a prompt (a decode step reads nothing back: it may be a captured graph)
                count = int((input_ids == self.config.vision.image_start_id).sum())
                if count:
                    raise ValueError(f"the prompt has {count} <img> span(s) but no pixel_values came with them "
                                     "(the model does not fetch the paths written there; the processor reads them)")
            return embeds
        n = self._check_pixels(pixel_values)
        slots = self.image_spans(input_ids)
        spans = int((input_ids == self.config.vision.image_start_id).sum())
        if spans != n:
            raise ValueError(f"{n} image(s) in pixel_values but {spans} <img> span(s) in the prompt")
        features = self.visual(pixel_values).to(embeds.dtype)  # (N, Q, D)
        return embeds.masked_scatter(slots[..., None], features.reshape(-1, features.shape[-1]))

    def _check_length(self, positions: int) -> None:
        limit = self.config.max_length
        if limit is not None and positions > limit:
            raise ValueError(f"{positions} positions (prompt and new tokens) are over Qwen-VL's seq_length of {limit}: "
                             "beyond it the official model switches on dynamic NTK and log-n attention scaling, "
                             "which polymodal does not implement; shorten the prompt or max_new_tokens")

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                cache: list[KVCache] | None = None, position_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> Tensor:
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1] if (
            input_ids is not None or inputs_embeds is not None) else 0
        self._check_length((cache[0].length if cache else 0) + T)
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("Qwen-VL takes input_ids (batch, length) or inputs_embeds (batch, length, width)")
            inputs_embeds = self.merge(input_ids, self.language_model.embed(input_ids), pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values go with input_ids (their <img> spans say where), not inputs_embeds")
        return self.language_model(attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                                   position_ids=position_ids, logits_to_keep=logits_to_keep)

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, **extras
                           ) -> tuple[DecoderState, Tensor]:
        self._check_length(max_len)  # before the cache is allocated
        return super().generation_prefill(input_ids, attention_mask, max_len, **extras)

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        return self.language_model.new_cache(batch, max_len, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, QwenVLConfig] = {
    "qwen-vl-tiny-test": QwenVLConfig(
        vision=QwenVisionConfig(image_size=56, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                n_queries=16, output_dim=256, image_start_id=290),
        text=_text(vocab_size=300, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=512, eos_token_id=None)),
    "Qwen/Qwen-VL": QwenVLConfig(),
    "Qwen/Qwen-VL-Chat": QwenVLConfig(),
}
HUB_IDS = {"Qwen/Qwen-VL": "Qwen/Qwen-VL", "Qwen/Qwen-VL-Chat": "Qwen/Qwen-VL-Chat"}

# ------------------------------------------------------------------------------------------ checkpoints
# The official names (modeling_qwen.py, visual.py): `transformer.visual.*` (the tower, its Resampler `attn_pool`),
# `transformer.wte`, `transformer.h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}`,
# `transformer.ln_f`, `lm_head`. The MLP is c_proj(w1(x) * silu(w2(x))): w2 is LLaMA's gate, w1 its up projection.
# c_attn is [q; k; v] as ours; the tower's in_proj is laid out per head ([q, k, v] of head_dim each, VisualAttention
# views it (..., heads, 3 * head_dim)), which the Transform below regroups into [all q; all k; all v].


def _per_head(heads: int):
    """(in_proj rows per head [q_h, k_h, v_h]) <-> ([q; k; v] rows), for the weight (3D, D) and the bias (3D,)."""
    def to_model(t: Tensor) -> Tensor:
        return t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def from_model(t: Tensor) -> Tensor:
        return t.reshape(3, heads, t.shape[0] // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return to_model, from_model


def hf_key_map_qwen_vl(c: QwenVLConfig) -> KeyMap:
    block = "transformer.resblocks.{i}"
    to_model, from_model = _per_head(c.vision.heads)
    tower = KeyMap([
        Rename("conv1.weight", "conv1.proj.weight"),
        *[Transform(f"{block}.attn.in_proj.{p}", f"{block}.attn.qkv.{p}", to_model, from_model)
          for p in ("weight", "bias")],
        Rename(f"{block}.attn.out_proj.{{p}}", f"{block}.attn.proj.{{p}}"),
        Rename(f"{block}.ln_1.{{p}}", f"{block}.norm1.{{p}}"),
        Rename(f"{block}.ln_2.{{p}}", f"{block}.norm2.{{p}}"),
        Rename(f"{block}.mlp.c_fc.{{p}}", f"{block}.mlp.fc1.{{p}}"),
        Rename(f"{block}.mlp.c_proj.{{p}}", f"{block}.mlp.fc2.{{p}}"),
        Rename("attn_pool.attn.in_proj_weight", "attn_pool.attn.qkv.weight"),
        Rename("attn_pool.attn.in_proj_bias", "attn_pool.attn.qkv.bias"),
        Rename("attn_pool.attn.out_proj.{p}", "attn_pool.attn.proj.{p}"),
    ])
    layer, ours = "transformer.h.{i}", "language_model.layers.{i}"
    return tower.nested("transformer.visual.", "visual.") + KeyMap([
        Rename("transformer.wte.weight", "language_model.embed_tokens.weight"),
        Rename(f"{layer}.ln_1.weight", f"{ours}.input_layernorm.weight"),
        Rename(f"{layer}.attn.c_attn.{{p}}", f"{ours}.attn.qkv.{{p}}"),
        Rename(f"{layer}.attn.c_proj.{{p}}", f"{ours}.attn.proj.{{p}}"),
        Rename(f"{layer}.ln_2.weight", f"{ours}.post_attention_layernorm.weight"),
        Rename(f"{layer}.mlp.w1.{{p}}", f"{ours}.mlp.up_proj.{{p}}"),
        Rename(f"{layer}.mlp.w2.{{p}}", f"{ours}.mlp.gate_proj.{{p}}"),
        Rename(f"{layer}.mlp.c_proj.{{p}}", f"{ours}.mlp.down_proj.{{p}}"),
        Rename("transformer.ln_f.weight", "language_model.norm.weight"),
        Rename("lm_head.weight", "language_model.lm_head.weight"),
    ])


# ------------------------------------------------------------------------------------------ config files
# The official config.json (QWenConfig): the LLM's fields at the top (`kv_channels`, `layer_norm_epsilon`,
# `rotary_emb_base`, `rotary_pct`, `no_bias`, `seq_length`, `use_dynamic_ntk`, `use_logn_attn`; `intermediate_size` is
# twice the MLP's width: w1 and w2 are intermediate_size / 2 wide) and the tower's `visual` object.


def _read_hf(raw: dict, shapes: dict) -> QwenVLConfig:
    visual = raw.get("visual")
    if not isinstance(visual, dict):
        raise ValueError("model_type 'qwen' without a `visual` object is Qwen (v1)'s text-only LLM, which polymodal "
                         "does not register; Qwen-VL's config.json holds the tower's settings under `visual`")
    hidden, heads = raw.get("hidden_size", 4096), raw.get("num_attention_heads", 32)
    inter = raw.get("intermediate_size", 22016)
    kv = raw.get("kv_channels", 128)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (hidden, heads, inter, kv)):
        raise ValueError("hidden_size, num_attention_heads, intermediate_size and kv_channels must be positive "
                         "integers")
    if hidden % heads or kv != hidden // heads:
        raise ValueError(f"kv_channels {kv} must be hidden_size / num_attention_heads ({hidden} / {heads}): the "
                         "official attention splits heads by hidden_size")
    if inter % 2:
        raise ValueError(f"intermediate_size {inter} must be even (the MLP's w1 and w2 are half of it wide)")
    if raw.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct {show(raw.get('rotary_pct'))}: only full rotary heads (1.0) are supported")
    bias = not raw.get("no_bias", True)
    text = from_dict(LlamaConfig, {
        "vocab_size": raw.get("vocab_size", 151936), "hidden_size": hidden, "intermediate_size": inter // 2,
        "num_hidden_layers": raw.get("num_hidden_layers", 32), "num_attention_heads": heads,
        "max_position_embeddings": raw.get("max_position_embeddings", 8192),
        "rms_norm_eps": raw.get("layer_norm_epsilon", 1e-6), "rope_theta": raw.get("rotary_emb_base", 10000.0),
        "attention_bias": True, "attention_out_bias": bias, "mlp_bias": bias,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "bos_token_id": None, "pad_token_id": raw.get("pad_token_id"),
        # the official config.json names no eos (generation_config.json does: <|endoftext|>, 151643, which a
        # vocabulary that small has not)
        "eos_token_id": raw.get("eos_token_id", 151643 if raw.get("vocab_size", 151936) > 151643 else None),
    })
    vision = from_dict(QwenVisionConfig, visual)
    if not 0 <= vision.image_start_id <= text.vocab_size - 3:
        raise ValueError(f"visual.image_start_id {vision.image_start_id}: <img>, </img> and the padding (it, +1, +2) "
                         f"must be tokens of the {text.vocab_size}-entry vocabulary")
    return from_dict(QwenVLConfig, {k: raw[k] for k in ("seq_length", "use_dynamic_ntk", "use_logn_attn") if k in raw},
                     vision=vision, text=text)


def _write_hf(c: QwenVLConfig) -> dict:
    t, v = c.text, c.vision
    if t.kv_heads != t.num_attention_heads or t.dim_per_head * t.num_attention_heads != t.hidden_size or (
            t.mlp_bias != t.out_bias) or not t.attention_bias or t.rope_scaling:
        raise ValueError("Qwen-VL's official layout has full heads, biased qkv and one `no_bias` for o and the MLP; "
                         "save this model in polymodal's layout")
    return {
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": 2 * t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "kv_channels": t.dim_per_head, "layer_norm_epsilon": t.rms_norm_eps, "rotary_emb_base": t.rope_theta,
        "rotary_pct": 1.0, "no_bias": not t.out_bias, "max_position_embeddings": t.max_position_embeddings,
        "seq_length": c.seq_length, "use_dynamic_ntk": c.use_dynamic_ntk, "use_logn_attn": c.use_logn_attn,
        "tie_word_embeddings": t.tie_word_embeddings, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "visual": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                   "heads": v.heads, "mlp_ratio": v.mlp_ratio, "n_queries": v.n_queries, "output_dim": v.output_dim,
                   "image_start_id": v.image_start_id},
    }


def _processor(directory):
    from polymodal.processing.qwen_vl import QwenVLProcessor

    return QwenVLProcessor.from_pretrained(directory)


FAMILY = Family(
    name="qwen_vl",
    model=QwenVL,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map_qwen_vl),
        "polymodal": native_layout("qwen_vl", QwenVLConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Qwen-VL (v1): a ViT-bigG tower and a 256-query position-aware adapter into the Qwen (v1) LLM, "
                "images between <img> and </img>",
    processor=_processor,
    tasks=("image-text-to-text",),
)
