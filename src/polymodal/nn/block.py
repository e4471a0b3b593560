"""The pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT eq. 2-3; CLIP's both towers)."""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import MLP


class Block(nn.Module):
    """(B, T, D) -> (B, T, D). `causal` for decoder-style text towers (CLIP's text transformer)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        act: str = "gelu",
        eps: float = 1e-6,
        qkv_bias: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, bias=qkv_bias, out_bias=True, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden, act)

    def forward(self, x: Tensor, mask: Tensor | None = None, keep_first: int | None = None) -> Tensor:
        """keep_first=n returns only the first n positions (B, n, D), computing nothing else past attention's
        keys and values: for a last block whose other outputs are never read."""
        h = self.attn(self.norm1(x), mask=mask, keep_first=keep_first)
        x = (x if keep_first is None else x[:, :keep_first]) + h
        return x + self.mlp(self.norm2(x))
