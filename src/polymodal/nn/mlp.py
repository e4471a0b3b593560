"""Feed-forward blocks: the transformer MLP (GELU, QuickGELU, ReLU, ...) and SwiGLU (LLaMA, Qwen2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with; its checkpoints need it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    """An activation module from its Hugging Face `hidden_act` name."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


class MLP(nn.Module):
    """fc1 -> activation -> fc2: (B, T, D) -> (B, T, D) through a hidden width (ViT-B: 768 -> 3072 -> 768)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", *, bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer"), LLaMA's MLP."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.act, nn.SiLU):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
