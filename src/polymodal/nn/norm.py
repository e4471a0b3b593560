"""Normalization layers: LayerNorm (torch's own) and RMSNorm (Zhang & Sennrich 2019; LLaMA, Qwen)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back, as LLaMA's reference does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # `F.rms_norm` is one call for what is otherwise six (x * rsqrt(mean(x^2) + eps), then the weight), which
        # matters at decode time (60 of them per SmolLM2 token); bitwise the same result in fp32
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
