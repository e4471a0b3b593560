"""Patch embedding: cut an image into P x P patches and project each linearly (ViT, Dosovitskiy et al. 2020).

A convolution with kernel = stride = P is exactly "flatten each patch, multiply by E"."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with N = (H / P) * (W / P); 224x224x3 at P=16 gives 196 x 768 for ViT-B."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        P = self.patch_size
        if x.shape[-2] % P or x.shape[-1] % P:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {P}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
