"""Qwen2.5-VL (Bai et al. 2025, "Qwen2.5-VL Technical Report"): Qwen2-VL (`polymodal.models.qwen2_vl`) with a
leaner, windowed vision tower and absolute-time video positions. What differs, and nothing else:

    blocks: RMSNorm and a SwiGLU MLP with biases (Qwen2-VL: LayerNorm, quick_gelu MLP); the merger's norm is RMSNorm
    window attention: merged tokens are reordered so that each window of window_size / patch / merge (112 px: 4x4)
        merged tokens is contiguous, and the blocks attend within windows, except those in `fullatt_block_indexes`,
        which attend within whole frames; the merger's output is put back into the processor's order
    video M-RoPE: the temporal id of frame group k is k * second_per_grid_ts * tokens_per_second (seconds, not
        frame counts: videos sampled at other rates line up in time)

Checked against transformers' `Qwen2_5_VLForConditionalGeneration` (tests/test_qwen2_vl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polymodal.models.qwen2 import Qwen2Config
from polymodal.models.qwen2_vl import (
    Qwen2VL,
    Qwen2VLConfig,
    Segments,
    VisionTower,
    _text,
    hf_key_map_vl,
    read_hf_vl,
    write_hf_vl,
)
from polymodal.nn import RMSNorm, SwiGLU
from polymodal.processing.qwen2_vl import Qwen2VLProcessor
from polymodal.registry import Family, Layout, native_layout


@dataclass(frozen=True)
class Qwen2_5_VLVisionConfig:
    depth: int = 32
    hidden_size: int = 1280  # the tower's width (Qwen2-VL calls it embed_dim)
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4  # transformers' default; the released checkpoints say 2
    window_size: int = 112  # pixels
    out_hidden_size: int = 3584  # the language model's width
    fullatt_block_indexes: tuple[int, ...] = field(default=(7, 15, 23, 31), metadata={"min": 0})
    rope_theta: float = 10000.0

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def out_width(self) -> int:
        return self.out_hidden_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class Qwen2_5_VLConfig(Qwen2VLConfig):
    vision: Qwen2_5_VLVisionConfig = field(default_factory=Qwen2_5_VLVisionConfig)
    text: Qwen2Config = field(default_factory=lambda: _text(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000))


def window_order(grids: list[tuple[int, int, int]], window: int) -> tuple[Tensor, list[int]]:
    """The merged tokens (sum t*h*w / m^2 of them, m the merge size already divided out of the grids) regrouped by
    window -> (their new order, the merged-token count of each window). Per frame, windows go row by row over the
    (h, w) grid, the last row and column of windows cut short, each window's tokens row by row."""
    order, sizes, base = [], [], 0
    for t, h, w in grids:
        index = torch.arange(t * h * w).reshape(t, h, w)
        nh, nw = -(-h // window), -(-w // window)
        padded = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
        padded[:, :h, :w] = index
        wins = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        counts = (wins >= 0).sum(-1)
        order.append(wins[wins >= 0] + base)
        sizes += [n for n in counts.tolist() if n]
        base += t * h * w
    return torch.cat(order), sizes


class WindowedVisionTower(VisionTower):
    """Qwen2-VL's tower with RMSNorm, a biased SwiGLU and window attention (see the module docstring)."""

    norm: type = RMSNorm

    def make_mlp(self, c: Qwen2_5_VLVisionConfig) -> nn.Module:
        return SwiGLU(c.width, c.intermediate_size, c.hidden_act, bias=True)

    def layout(self, grids, device):
        c = self.config
        m = c.spatial_merge_size
        unit = m * m
        order, sizes = window_order([(t, h // m, w // m) for t, h, w in grids], c.window)
        windows = Segments([n * unit for n in sizes], device)
        # frames stay contiguous under the reordering (windows never cross one), so full attention is per frame
        frames = Segments([h * w for t, h, w in grids for _ in range(t)], device)
        full = set(c.fullatt_block_indexes)
        return order.to(device), [frames if i in full else windows for i in range(len(self.blocks))]


class Qwen2_5_VL(Qwen2VL):
    """Qwen2-VL's model over the windowed tower, with absolute-time video positions."""

    tower = WindowedVisionTower

    def video_time_interval(self, index: int, second_per_grid_ts) -> float | Tensor:
        """tokens_per_second x the seconds between the video's frame groups (1 s when not given), as
        transformers' get_rope_index computes it."""
        seconds = 1 if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts)[index]
        return self.config.vision.tokens_per_second * seconds


# ------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, Qwen2_5_VLConfig] = {
    "qwen2.5-vl-tiny-test": Qwen2_5_VLConfig(
        vision=Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, window_size=56,
                                      out_hidden_size=64, fullatt_block_indexes=(1,)),
        text=Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"rope_type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=255, video_token_id=256, vision_start_token_id=257, vision_end_token_id=258),
    "Qwen/Qwen2.5-VL-3B-Instruct": Qwen2_5_VLConfig(
        vision=Qwen2_5_VLVisionConfig(out_hidden_size=2048, tokens_per_second=2),
        text=_text(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, max_position_embeddings=128000, tie_word_embeddings=True)),
    "Qwen/Qwen2.5-VL-7B-Instruct": Qwen2_5_VLConfig(vision=Qwen2_5_VLVisionConfig(tokens_per_second=2)),
}
HUB_IDS = {"Qwen/Qwen2.5-VL-3B-Instruct": "Qwen/Qwen2.5-VL-3B-Instruct",
           "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct"}

FAMILY = Family(
    name="qwen2_5_vl",
    model=Qwen2_5_VL,
    layouts={
        "transformers": Layout(
            "transformers", lambda raw, shapes: read_hf_vl(raw, Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig),
            lambda c: write_hf_vl(c, "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"), hf_key_map_vl),
        "polymodal": native_layout("qwen2_5_vl", Qwen2_5_VLConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Qwen2.5-VL: Qwen2-VL with a windowed RMSNorm/SwiGLU vision tower and absolute-time video M-RoPE",
    processor=Qwen2VLProcessor.from_pretrained,
    tasks=("image-text-to-text",),
)
