"""Shared building blocks. A block lives here once three families use it unchanged (STYLE.md, rule of
three); blocks take explicit arguments, never a family config."""

from polymodal.nn.attention import Attention, KVCache, causal_padding_mask, padding_mask
from polymodal.nn.block import Block
from polymodal.nn.inference import PackedLinear, optimize_for_inference
from polymodal.nn.mlp import MLP, QuickGELU, SwiGLU, activation
from polymodal.nn.norm import LayerNorm, RMSNorm
from polymodal.nn.patch import PatchEmbed
from polymodal.nn.position import (
    LearnedPosition2D,
    RoPE,
    apply_rope,
    interpolate_pos_2d,
    sincos_1d,
    sincos_2d,
)

__all__ = [
    "MLP",
    "PackedLinear",
    "Attention",
    "Block",
    "KVCache",
    "LayerNorm",
    "LearnedPosition2D",
    "PatchEmbed",
    "QuickGELU",
    "RMSNorm",
    "RoPE",
    "SwiGLU",
    "activation",
    "apply_rope",
    "causal_padding_mask",
    "interpolate_pos_2d",
    "optimize_for_inference",
    "padding_mask",
    "sincos_1d",
    "sincos_2d",
]
