"""Qwen2-VL (Wang et al. 2024, "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any
Resolution"): a ViT that reads images and videos at their own resolution, whose merged patches enter a Qwen2 decoder
that places them with multimodal rotary positions (M-RoPE).

    x = patches (sum t*h*w, 3*2*14*14)             the processor's rows: 2 frames x 14 x 14 pixels, 2x2 blocks adjacent
    x = Linear(x)                                   the Conv3d patch embedding, no bias
    L x: x = x + Attn(LN(x))                        fused qkv with bias, 2-D RoPE over each patch's (row, col),
         x = x + MLP(LN(x))                         attention only within each image / video frame; quick_gelu MLP
    f = MLP(LN(x).view(-1, 4 * D))                  PatchMerger: each 2x2 block of patches -> one LLM token
    h = embed(ids); h[ids == image_token_id] = f    (videos likewise at video_token_id)
    logits = Qwen2.decode(h, positions (3, B, T))   text ids on all three axes, vision tokens (t, row, col) ids

The model is shared parts: `polymodal.nn.Attention` / `MLP` / `LayerNorm` in the tower, `polymodal.models.qwen2`'s
decoder with `polymodal.nn.RoPE`'s M-RoPE, and the one generation loop: the prefill merges the features and starts
the `DecoderState` from the M-RoPE positions, after which every token is the decoder's own step at
offset = rope_deltas. Qwen2.5-VL (`polymodal.models.qwen2_5_vl`) subclasses the tower and the model.
Checked against transformers' `Qwen2VLForConditionalGeneration` (tests/test_qwen2_vl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, show, to_dict
from polymodal.generation import CausalLM, DecoderState
from polymodal.models.llama import hf_key_map, read_hf_config, write_hf_config
from polymodal.models.qwen2 import Qwen2, Qwen2Config
from polymodal.nn import MLP, Attention, KVCache, LayerNorm
from polymodal.nn.attention import SPLIT_MIN_ROWS
from polymodal.processing.qwen2_vl import Qwen2VLProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import KeyMap

KINDS = ("image", "video")


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    depth: int = 32
    embed_dim: int = 1280  # the tower's width
    hidden_size: int = 3584  # the language model's width: what the merger projects to
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0  # the 2-D RoPE's base (transformers: vision `rope_parameters`)

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def out_width(self) -> int:
        return self.hidden_size

    @property
    def mlp_width(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values: channels x frames x pixels."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def _text(**kw) -> Qwen2Config:
    return Qwen2Config(**{"vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                          "bos_token_id": 151643, "eos_token_id": 151645,
                          "rope_scaling": {"rope_type": "mrope", "mrope_section": [16, 24, 24]}, **kw})


@dataclass(frozen=True)
class Qwen2VLConfig:
    vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    text: Qwen2Config = field(default_factory=lambda: _text(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4))
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def token_id(self, kind: str) -> int:
        return self.image_token_id if kind == "image" else self.video_token_id

    @property
    def eos_token_id(self) -> int | tuple[int, ...] | None:
        """The decoder's (generation's default for a model built from a preset, with no generation config)."""
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id


# ------------------------------------------------------------------------------------------ the vision tower


def vision_rope(grids: list[tuple[int, int, int]], merge: int, head_dim: int, theta: float, device=None
                ) -> tuple[Tensor, Tensor]:
    """2-D RoPE of every patch in the processor's order -> (cos, sin) each (sum t*h*w, Dh): the first half of the
    frequency slots rotate by the patch's row, the second by its column, with frequencies over Dh/2 (each axis has
    a quarter of the head's pairs), and the patches of each 2x2 merge block adjacent."""
    rows, cols = [], []
    for t, h, w in grids:
        r = torch.arange(h, device=device)[:, None].expand(h, w)
        c = torch.arange(w, device=device)[None, :].expand(h, w)
        # block-major: (h/m, m, w/m, m) -> the m x m block's patches next to each other, as the merger reads them
        rows.append(r.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten().repeat(t))
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))  # (Dh/4,)
    freqs = torch.cat([torch.cat(rows)[:, None].float() * inv_freq, torch.cat(cols)[:, None].float() * inv_freq], -1)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, Dh)
    return emb.cos(), emb.sin()


class Segments:
    """Consecutive runs of tokens (L, ...) that attend only among themselves (transformers' cu_seqlens): images,
    video frames, Qwen2.5-VL's windows. Only attention sees them; norms, projections and MLPs run on the L real rows
    (padding every run to the longest would multiply that work: four images of 1024, 768, 384 and 256 patches
    would become 4 x 1024 rows). Runs of one length attend as one batch (S, H, l, Dh) through SDPA with no mask, a
    view when they lie side by side (one image, a video's frames, a frame's full windows), else gathered; runs of
    other lengths are further SDPA calls (a 2.5 frame's cut windows at its right and bottom edges)."""

    def __init__(self, lengths: list[int], device=None):
        self.lengths, self.total = lengths, sum(lengths)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        by_length: dict[int, list[int]] = {}
        for start, n in zip(starts, lengths):
            by_length.setdefault(n, []).append(start)
        # each group: (run length l, runs S, first row if the runs are side by side else a row index (S * l,))
        self.groups: list[tuple[int, int, int | Tensor]] = []
        for n, firsts in by_length.items():
            if firsts == list(range(firsts[0], firsts[0] + n * len(firsts), n)):
                self.groups.append((n, len(firsts), firsts[0]))
            else:
                rows = torch.tensor(firsts, device=device)[:, None] + torch.arange(n, device=device)
                self.groups.append((n, len(firsts), rows.flatten()))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """q, k, v (L, H, Dh) -> (L, H * Dh): each run's queries over its own keys."""
        L, H, Dh = q.shape
        if len(self.groups) == 1 and isinstance(self.groups[0][2], int):  # runs of one length side by side
            n, S, _ = self.groups[0]
            out = F.scaled_dot_product_attention(*(t.view(S, n, H, Dh).transpose(1, 2) for t in (q, k, v)),
                                                 scale=scale)  # (S, H, l, Dh)
            return out.transpose(1, 2).reshape(L, H * Dh)
        out = q.new_empty(L, H, Dh)
        for n, S, rows in self.groups:
            if isinstance(rows, int):
                part = [t[rows:rows + S * n] for t in (q, k, v)]
            else:
                part = [t.index_select(0, rows) for t in (q, k, v)]
            o = F.scaled_dot_product_attention(*(t.view(S, n, H, Dh).transpose(1, 2) for t in part), scale=scale)
            o = o.transpose(1, 2).reshape(S * n, H, Dh)
            if isinstance(rows, int):
                out[rows:rows + S * n] = o
            else:
                out.index_copy_(0, rows, o)
        return out.view(L, H * Dh)


class PatchEmbed(nn.Module):
    """(L, C * T * P * P) flattened patches -> (L, D): the checkpoint's Conv3d with kernel = stride = (T, P, P), which
    on patches cut beforehand is one matrix multiply by its flattened weight."""

    def __init__(self, c: Qwen2VLVisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.width, kernel_size=k, stride=k, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionBlock(nn.Module):
    """Pre-norm block with rotary attention within segments: (L, D) rows -> (L, D)."""

    def __init__(self, dim: int, heads: int, norm: type, mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, bias=True)
        self.norm2 = norm(dim, eps=1e-6)
        self.mlp = mlp

    def forward(self, x: Tensor, segments: Segments, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attention(self.norm1(x), segments, rope)
        return x + self.mlp(self.norm2(x))

    def attention(self, x: Tensor, segments: Segments, rope: tuple[Tensor, Tensor]) -> Tensor:
        """The shared Attention's projections and rotary positions over all L rows at once, its softmax within
        each segment: (L, D) -> (L, D)."""
        a = self.attn
        # as Attention.forward decides: three products on CPUs for wide layers (unless prepacked), else one
        split = (x.device.type == "cpu" and x.shape[-1] >= 512 and x.shape[0] > SPLIT_MIN_ROWS
                 and not getattr(a.qkv, "packed", False))
        q, k, v = a.project_qkv(x[None], split=split, rope=rope)  # (1, H, L, Dh) each
        out = segments.attend(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), a.scale)
        return a.proj(out)


class PatchMerger(nn.Module):
    """(L, Dv) -> (L / m^2, D): each m x m block of adjacent patches, normed, concatenated and through an MLP."""

    def __init__(self, dim: int, out_dim: int, merge: int, norm: type):
        super().__init__()
        self.hidden = dim * merge ** 2
        self.ln_q = norm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


class VisionTower(nn.Module):
    """pixel_values (sum t*h*w, C*T*P*P), grid_thw (N, 3) -> features (sum t*h*w / m^2, D), image after image.

    `layout` says in which order the blocks see the patches and which runs attend together; Qwen2-VL keeps the
    processor's order and attends within each frame. Qwen2.5-VL changes the norm, the MLP and `layout`."""

    norm: type = LayerNorm

    def __init__(self, c: Qwen2VLVisionConfig):
        super().__init__()
        if c.width % c.num_heads or (c.width // c.num_heads) % 4:
            raise ValueError(f"the vision width {c.width} over {c.num_heads} heads must give a head dimension "
                             f"divisible by 4 (2-D RoPE rotates a quarter of it per axis)")
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c.width, c.num_heads, self.norm, self.make_mlp(c))
                                    for _ in range(c.depth))
        self.merger = PatchMerger(c.width, c.out_width, c.spatial_merge_size, self.norm)

    def make_mlp(self, c) -> nn.Module:
        return MLP(c.width, c.mlp_width, c.hidden_act)

    def layout(self, grids: list[tuple[int, int, int]], device) -> tuple[Tensor | None, list[Segments]]:
        """-> (a permutation of the merged tokens the blocks see them in, or None; each block's Segments)."""
        frames = Segments([h * w for t, h, w in grids for _ in range(t)], device)
        return None, [frames] * len(self.blocks)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        c = self.config
        grids = [tuple(g) for g in grid_thw.tolist()]
        x = self.patch_embed(pixel_values)  # (L, Dv)
        cos, sin = vision_rope(grids, c.spatial_merge_size, c.width // c.num_heads, c.rope_theta, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        order, segments = self.layout(grids, x.device)
        if order is not None:  # permute whole merge blocks: (L / m^2, m^2, ...) rows in `order`
            unit = c.spatial_merge_size ** 2
            x, cos, sin = (t.reshape(-1, unit, t.shape[-1])[order].reshape(t.shape) for t in (x, cos, sin))
        rope = (cos[None], sin[None])  # (1, L, Dh)
        for block, seg in zip(self.blocks, segments):
            x = block(x, seg, rope)
        out = self.merger(x)  # (L / m^2, D)
        return out if order is None else out[torch.argsort(order)]


# ------------------------------------------------------------------------------------------ the model


_NAMES = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class Qwen2VL(nn.Module, CausalLM):
    """input_ids (B, T) with `image_token_id` / `video_token_id` where the merged patches go, pixel_values
    (sum t*h*w, C*T*P*P) with image_grid_thw (N, 3) (likewise pixel_values_videos / video_grid_thw) -> logits
    (B, T, V). `generate(input_ids, pixel_values=..., image_grid_thw=...)` merges them at the prefill and decodes
    with the decoder's plain steps."""

    fixed_shape_step = True  # decode steps are the decoder's, with M-RoPE positions from the state
    tower: type = VisionTower

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = c = config
        self.visual = self.tower(c.vision)
        self.language_model = Qwen2(c.text)

    def image_tokens(self, grid_thw) -> int:
        """The prompt tokens one image (or video) of grid (t, h, w) patches fills: t*h*w / merge_size^2 (for callers
        that check a prompt before any work)."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.config.vision.spatial_merge_size ** 2

    def video_time_interval(self, index: int, second_per_grid_ts) -> float | Tensor:
        """The temporal position step between a video's frames: Qwen2-VL counts frames (1)."""
        return 1

    # ---------------------------------------------------------------- checks and positions

    def media_tokens(self, pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                     pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None,
                     second_per_grid_ts=None, mm_token_type_ids: Tensor | None = None) -> dict[int, int]:
        """{placeholder token id: the prompt positions these inputs fill}, from the grids (checked against the
        pixel rows), for callers that check a request before any work (the server's engine)."""
        out = {}
        for kind, pixels, grid in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos,
                                                                           video_grid_thw)):
            need = self._grid_tokens(kind, pixels, grid)
            out[self.config.token_id(kind)] = sum(need)
        return out

    def check_token_types(self, input_ids: Tensor | None, types: Tensor | None) -> None:
        """transformers' mm_token_type_ids (0 text, 1 image, 2 video per position) must say what the ids say."""
        if types is None:
            return
        c = self.config
        if input_ids is None or types.shape != input_ids.shape:
            raise ValueError(f"mm_token_type_ids {tuple(types.shape)} must have input_ids' shape "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        derived = (input_ids == c.image_token_id).long() + 2 * (input_ids == c.video_token_id).long()
        if not torch.equal(types.long(), derived):
            raise ValueError("mm_token_type_ids disagrees with input_ids' image and video tokens (it is derived from "
                             "them: leave it out)")

    def check_media(self, input_ids: Tensor, kind: str, pixels: Tensor | None, grid: Tensor | None) -> None:
        """Images (or videos) against their grids and the prompt's tokens: one clear error before the tower runs."""
        c = self.config
        count = int((input_ids == c.token_id(kind)).sum())
        need = self._grid_tokens(kind, pixels, grid)
        if pixels is None:
            if count:
                raise ValueError(f"the prompt has {count} {kind} tokens (token {c.token_id(kind)}) but no "
                                 f"{_NAMES[kind][0]} came with it")
            return
        if count != sum(need):
            raise ValueError(f"{len(need)} {kind}(s) of {show(need)} features need {sum(need)} {kind} tokens in the "
                             f"prompt, found {count} (token {c.token_id(kind)}); the processor expands each {kind} to "
                             f"its feature count")

    def _grid_tokens(self, kind: str, pixels: Tensor | None, grid: Tensor | None) -> list[int]:
        """The tokens each image (or video) fills, its grid checked against the pixel rows; [] without media."""
        c = self.config
        names = _NAMES[kind]
        if pixels is None and grid is None:
            return []
        if pixels is None or grid is None:
            raise ValueError(f"{names[0]} and {names[1]} go together: each {kind}'s (t, h, w) patch grid says how its "
                             f"rows of {names[0]} are laid out")
        m = c.vision.spatial_merge_size
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or bool((grid < 1).any()):
            raise ValueError(f"{names[1]} must be (number of {kind}s, 3) positive integers (t, h, w), got "
                             f"{grid.dtype} of shape {tuple(grid.shape)}")
        if bool((grid[:, 1:] % m).any()):
            raise ValueError(f"{names[1]} {show(grid.tolist())}: h and w must be multiples of the merge size {m}")
        rows = int(grid.prod(-1).sum())
        if pixels.dim() != 2 or tuple(pixels.shape) != (rows, c.vision.patch_dim):
            v = c.vision
            raise ValueError(f"{names[1]} {show(grid.tolist())} describes {rows} patches of {v.patch_dim} values "
                             f"(channels x {v.temporal_patch_size} frames x {v.patch_size}^2 pixels), but {names[0]} "
                             f"has shape {tuple(pixels.shape)}")
        return [self.image_tokens(g) for g in grid.tolist()]

    def get_rope_index(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       image_grid_thw: Tensor | None = None, video_grid_thw: Tensor | None = None,
                       second_per_grid_ts=None) -> tuple[Tensor, Tensor]:
        """M-RoPE positions of a prompt (transformers' `get_rope_index`) -> (position_ids (3, B, T), rope_deltas
        (B, 1)). Over each row's real tokens: text counts on from the running position p on all three axes; an
        image or video of grid (t, h, w) takes (p + t_index * interval, p + row, p + col) over its merged
        (t, h/m, w/m) grid in reading order, and p moves on by max(h, w) / m. rope_deltas = the row's largest
        position + 1 - its real length; padding positions are 0. Grids are taken in reading order, row by row."""
        c = self.config
        m = c.vision.spatial_merge_size
        B, T = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        token = {c.image_token_id: "image", c.video_token_id: "video"}
        grids = {"image": (image_grid_thw.tolist() if image_grid_thw is not None else []),
                 "video": (video_grid_thw.tolist() if video_grid_thw is not None else [])}
        used = {"image": 0, "video": 0}
        position_ids = torch.zeros(3, B, T, dtype=input_ids.dtype, device=input_ids.device)
        deltas = []
        for b in range(B):
            ids = input_ids[b][real[b]].tolist()
            parts, pos, i = [], 0, 0
            while i < len(ids):
                kind = token.get(ids[i])
                if kind is None:  # a run of text
                    j = i
                    while j < len(ids) and ids[j] not in token:
                        j += 1
                    parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
                    pos, i = pos + j - i, j
                    continue
                k = used[kind]
                if k >= len(grids[kind]):
                    raise ValueError(f"row {b} holds more {kind}s than the {len(grids[kind])} {kind}_grid_thw rows")
                t, h, w = grids[kind][k]
                n = t * h * w // m ** 2
                if ids[i:i + n] != [ids[i]] * n:
                    raise ValueError(f"row {b}: {kind} {k} of grid {[t, h, w]} needs {n} consecutive {kind} tokens "
                                     f"from token {i} on")
                interval = self.video_time_interval(used["video"], second_per_grid_ts) if kind == "video" else 1
                tt, hh, ww = torch.meshgrid((torch.arange(t) * interval).long(), torch.arange(h // m),
                                            torch.arange(w // m), indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                used[kind] += 1
                pos, i = pos + max(h, w) // m, i + n
            row = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)  # (3, real length)
            position_ids[:, b, real[b]] = row.to(position_ids)
            deltas.append(int(row.max()) + 1 - len(ids) if len(ids) else 0)
        for kind in KINDS:
            if used[kind] != len(grids[kind]):
                raise ValueError(f"{len(grids[kind])} {kind}_grid_thw rows but {used[kind]} {kind}s in the prompt")
        return position_ids, torch.tensor(deltas, device=input_ids.device)[:, None]

    # ---------------------------------------------------------------- forward and generation

    def merge(self, input_ids: Tensor, embeds: Tensor, kind: str, pixels: Tensor | None, grid: Tensor | None
              ) -> Tensor:
        """The text embeddings (B, T, D) with each image's (or video's) features at its tokens, in reading order."""
        if pixels is None:
            return embeds
        features = self.visual(pixels, grid).to(embeds.dtype)  # (sum t*h*w / m^2, D)
        slots = input_ids == self.config.token_id(kind)  # (B, T)
        return embeds.masked_scatter(slots[..., None], features)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None, *,
                second_per_grid_ts=None, mm_token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, cache: list[KVCache] | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """-> logits (B, T, V). position_ids (3, B, T) default to `get_rope_index` of the prompt; continuing from a
        filled cache needs them given (generation does: the prefill's rope_deltas decide them). mm_token_type_ids
        (what transformers 5's processors may return) is derived from the ids; when given it must agree."""
        self.check_token_types(input_ids, mm_token_type_ids)
        media = {"image": (pixel_values, image_grid_thw), "video": (pixel_values_videos, video_grid_thw)}
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("Qwen2-VL takes input_ids (batch, length) or inputs_embeds (batch, length, width)")
            # a decode step (one new token per row, no media) reads nothing back: it may be a captured graph
            if input_ids.shape[1] > 1 or any(p is not None for p, _ in media.values()):
                for kind, (pixels, grid) in media.items():
                    self.check_media(input_ids, kind, pixels, grid)
                if position_ids is None:
                    if cache and cache[0].length:
                        raise ValueError("continuing from a filled cache needs the M-RoPE position_ids (3, B, T): "
                                         "they follow from the prompt's (generate passes them)")
                    position_ids, _ = self.get_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                                          second_per_grid_ts)
            inputs_embeds = self.language_model.embed(input_ids)
            for kind, (pixels, grid) in media.items():
                inputs_embeds = self.merge(input_ids, inputs_embeds, kind, pixels, grid)
        elif any(p is not None for p, _ in media.values()):
            raise ValueError("pixel values go with input_ids (their image / video tokens say where), not inputs_embeds")
        return self.language_model(attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                                   position_ids=position_ids, logits_to_keep=logits_to_keep)

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                           pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None,
                           second_per_grid_ts=None, mm_token_type_ids: Tensor | None = None
                           ) -> tuple[DecoderState, Tensor]:
        """The prompt with its images into a new cache -> (state, next-token logits (B, V)). The state starts from
        the M-RoPE positions, so each row's next position is its largest + 1 (offset = rope_deltas)."""
        self.check_token_types(input_ids, mm_token_type_ids)
        self.check_media(input_ids, "image", pixel_values, image_grid_thw)
        self.check_media(input_ids, "video", pixel_values_videos, video_grid_thw)
        positions, _ = self.get_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                           second_per_grid_ts)
        p = next(self.parameters())
        cache = self.new_cache(input_ids.shape[0], max_len, dtype=p.dtype, device=p.device)
        state, positions = DecoderState.start(cache, attention_mask, max_len, positions)
        logits = self(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                      second_per_grid_ts=second_per_grid_ts, cache=state.cache, position_ids=positions,
                      logits_to_keep=1)
        return state, logits[:, -1]

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        return self.language_model.new_cache(batch, max_len, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ presets

_VISION = Qwen2VLVisionConfig(hidden_size=3584)
PRESETS: dict[str, Qwen2VLConfig] = {
    "qwen2-vl-tiny-test": Qwen2VLConfig(
        vision=Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2),
        text=Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"rope_type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=255, video_token_id=256, vision_start_token_id=257, vision_end_token_id=258),
    "Qwen/Qwen2-VL-2B-Instruct": Qwen2VLConfig(
        vision=Qwen2VLVisionConfig(hidden_size=1536),
        text=_text(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, tie_word_embeddings=True)),
    "Qwen/Qwen2-VL-7B-Instruct": Qwen2VLConfig(vision=_VISION),
}
HUB_IDS = {"Qwen/Qwen2-VL-2B-Instruct": "Qwen/Qwen2-VL-2B-Instruct",
           "Qwen/Qwen2-VL-7B-Instruct": "Qwen/Qwen2-VL-7B-Instruct"}

# ------------------------------------------------------------------------------------------ checkpoints
# The hub's files (and transformers 5.x's save_pretrained) name `visual.*`, the decoder's `model.*` and `lm_head.*`;
# transformers 5.x's modules are `model.visual.*`, `model.language_model.*`, `lm_head.*`. Both load; saving writes
# the first. The tower's tensors keep the checkpoint's names; the decoder's map is Qwen2's (LLaMA's), mounted.


def hf_key_map_vl(c: Qwen2VLConfig) -> KeyMap:
    tower = {"visual.": "", "model.visual.": ""}  # before the decoder's "model.", which would claim model.visual.*
    language = {"model.": "model.", "lm_head.": "lm_head.", "model.language_model.": "model."}
    return KeyMap().nested(tower, "visual.") + hf_key_map(c.text).nested(language, "language_model.")


# ------------------------------------------------------------------------------------------ config files
# transformers 5.x: `text_config` (a Qwen2 config whose `rope_parameters` hold `mrope_section`) and `vision_config`
# nested; the hub's 4.x files hold the text fields at the top level (`rope_scaling: {"type": "mrope", ...}`) beside
# `vision_config` (whose channels may be `in_chans`).


def read_hf_vl(raw: dict, config_cls: type, vision_cls: type):
    text_raw = raw.get("text_config", raw)
    vision_raw = raw.get("vision_config") or {}
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise ValueError("text_config and vision_config must be JSON objects")
    if text_raw.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    tie = bool(raw.get("tie_word_embeddings") or text_raw.get("tie_word_embeddings"))
    # transformers' Qwen2-VL decoder takes head_dim = hidden_size / heads whatever the file says
    text = read_hf_config(Qwen2Config, text_raw, attention_bias=True, attention_out_bias=False, head_dim=None,
                          tie_word_embeddings=tie)
    rope = vision_raw.get("rope_parameters") or {}
    vision = from_dict(vision_cls, {
        **vision_raw, "in_channels": vision_raw.get("in_channels", vision_raw.get("in_chans", 3)),
        **({"rope_theta": rope["rope_theta"]} if isinstance(rope, dict) and "rope_theta" in rope else {})})
    ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if k in raw}
    for k, v in ids.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < text.vocab_size:
            raise ValueError(f"{k} {show(v)} is not a token of the {text.vocab_size}-entry vocabulary")
    return from_dict(config_cls, ids, vision=vision, text=text)


def write_hf_vl(c, model_type: str, architecture: str) -> dict:
    t = c.text
    if t.head_dim not in (None, t.hidden_size // t.num_attention_heads) or t.mlp_bias or not (
            t.attention_bias and t.attention_out_bias is False):
        raise ValueError(f"transformers' {architecture} has Qwen2's decoder (q/k/v biases only, head_dim = "
                         "hidden_size / heads); save this model in polymodal's layout")
    text = {**write_hf_config(t, f"{model_type}_text", architecture), "use_sliding_window": False}
    del text["architectures"]
    vision = {k: v for k, v in to_dict(c.vision).items() if k != "rope_theta"}
    if "mlp_ratio" in vision:  # transformers' config holds an int (its strict config refuses 4.0)
        if not float(vision["mlp_ratio"]).is_integer():
            raise ValueError(f"transformers' {architecture} takes a whole mlp_ratio, not {vision['mlp_ratio']}; "
                             "save this model in polymodal's layout")
        vision["mlp_ratio"] = int(vision["mlp_ratio"])
    return {
        "model_type": model_type, "architectures": [architecture], "text_config": text,
        "vision_config": {"model_type": f"{model_type}_vision", **vision,
                          "rope_parameters": {"rope_type": "axial", "rope_theta": c.vision.rope_theta}},
        "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
    }


FAMILY = Family(
    name="qwen2_vl",
    model=Qwen2VL,
    layouts={
        "transformers": Layout("transformers", lambda raw, shapes: read_hf_vl(raw, Qwen2VLConfig, Qwen2VLVisionConfig),
                               lambda c: write_hf_vl(c, "qwen2_vl", "Qwen2VLForConditionalGeneration"),
                               hf_key_map_vl),
        "polymodal": native_layout("qwen2_vl", Qwen2VLConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Qwen2-VL: a native-resolution ViT (2-D RoPE, per-frame attention, 2x2 patch merger) for images and "
                "videos into a Qwen2 decoder with M-RoPE",
    processor=Qwen2VLProcessor.from_pretrained,
    tasks=("image-text-to-text",),
)
