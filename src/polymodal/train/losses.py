"""Losses shared by recipes (and the demo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(logits_per_image: Tensor, groups: Tensor | None = None) -> Tensor:
    """CLIP's symmetric InfoNCE (Radford et al., 2021, Fig. 3) on (B, B) scaled cosine similarities.

    `groups` (B,) marks pairs that share a caption: in a generated world several images of a batch can have
    the same text, and every matching pair then counts as a positive (a soft target spread over them) instead
    of the diagonal alone. Without `groups` the diagonal is the target, as in CLIP."""
    if groups is None:
        target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
    same = (groups[:, None] == groups[None, :]).to(logits_per_image.dtype)  # (B, B)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2
