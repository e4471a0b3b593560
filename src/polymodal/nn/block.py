"""The pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT eq. 2-3; CLIP's both towers).

Inference fast path for small blocks on CPU: when no gradient is needed and the block is plain (width <= 256,
fp32, no mask, no causal attention, exact GELU or ReLU, biases on q/k/v), the whole block runs as PyTorch's
fused native encoder-layer kernel (`torch._transformer_encoder_layer_fwd`, the fast path of
`nn.TransformerEncoderLayer`): one call instead of about fifteen, which matters for small models
(benchmarks/bench_vit.py). It computes the same math on the same weights (agreement ~1e-7 in fp32,
tests/test_nn.py); if a torch build lacks the kernel or refuses the inputs, the block falls back to the module
path for good.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import MLP

_FAST_PATH = {"enabled": hasattr(torch, "_transformer_encoder_layer_fwd")}


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
        # the fused kernel knows exact GELU and ReLU, one LayerNorm eps, full heads of D / H, biased q/k/v
        act_ = self.mlp.act
        plain_act = type(act_) is nn.ReLU or (type(act_) is nn.GELU and act_.approximate == "none")
        # measured on CPU in fp32 (benchmarks/bench_vit.py): the kernel wins where per-op overhead dominates
        # (width 32: 1.4x a block) and loses to the module path's split q/k/v products at ViT-B width; in bf16
        # on a CPU without bf16 units it is slower; on GPUs it has not been measured here yet
        self._fusable = (plain_act and qkv_bias and not causal and self.attn.scale is None and dim <= 256
                         and self.attn.num_kv_heads == num_heads and self.attn.head_dim * num_heads == dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, keep_first: int | None = None) -> Tensor:
        """keep_first=n returns only the first n positions (B, n, D), computing nothing else past attention's
        keys and values: for a last block whose other outputs are never read."""
        if (self._fusable and mask is None and keep_first is None and _FAST_PATH["enabled"] and not self.training
                and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.norm1.weight.requires_grad))):
            try:
                return self._fused(x)
            except (RuntimeError, TypeError):  # a torch build whose kernel differs: use the module path
                _FAST_PATH["enabled"] = False
        h = self.attn(self.norm1(x), mask=mask, keep_first=keep_first)
        x = (x if keep_first is None else x[:, :keep_first]) + h
        return x + self.mlp(self.norm2(x))

    def _fused(self, x: Tensor) -> Tensor:
        a, m = self.attn, self.mlp
        return torch._transformer_encoder_layer_fwd(
            x, x.shape[-1], a.num_heads, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
            isinstance(m.act, nn.GELU), True, self.norm1.eps,  # use_gelu, norm_first, eps
            self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
            m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, None, None,
        )
