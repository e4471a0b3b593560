"""Linear layers on oneDNN's matrix product (CPU, fp32, inference), with the weight as it is stored.

`F.linear` on CPUs hands fp32 products to MKL's GEMM. On the AMD EPYC of benchmarks/ (AVX-512, Zen 5) MKL runs
its AVX2 kernels, while oneDNN, which PyTorch also ships, picks its AVX-512 ones: the same product with the same
plain (out, in) weight, no packed copy, ran 2.0-2.5x faster there. Measured 2026-12-04, one thread, process CPU time,
medians of 7 (F.linear / `torch.ops.mkldnn._linear_pointwise`, then with a prepacked weight, the packed copy of
`polymodal.nn.inference`): 128x640 @ 640x5120 (an SDXL GEGLU) 9.17 / 3.71 / 3.34 ms, 154x2048 @ 2048x1280 (SDXL's
cross-attention keys and values) 7.52 / 3.23 / 3.10, 820x1536 @ 1536x1536 (an SD3 projection) 33.4 / 15.3 / 14.7,
820x1536 @ 1536x6144 138.6 / 66.8 / 61.5. So most of what the packed copy gained is the ISA, at no memory cost.

`use_onednn(model)` turns the plain `nn.Linear` layers of a model into `OneDNNLinear` in place (names, parameters,
checkpoints and training unchanged: with a gradient needed, on GPUs, in other dtypes and for products below
`MIN_MACS`, `F.linear`). The diffusion families (U-Net, VAE, MM-DiT) call it in their constructors. These are
private PyTorch ops; where a build lacks them or refuses an input, the product falls back to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.inference import MIN_MACS

_OPS = {"enabled": None}


def _available() -> bool:
    if _OPS["enabled"] is None:
        try:
            _OPS["enabled"] = bool(torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._linear_pointwise is not None)
        except (AttributeError, RuntimeError):
            _OPS["enabled"] = False
    return _OPS["enabled"]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, x (..., in), weight (out, in), computed by oneDNN where that pays (see the
    module docstring): fp32 on the CPU, no gradient needed, at least MIN_MACS multiply-adds."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MACS and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and _available()):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError:  # an input this build's kernel refuses: the plain product, same result
            pass
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose product is `linear` above; made by `use_onednn`, never constructed directly."""

    # Attention (and the VLM towers) split a wide fused q/k/v weight into three MKL products on CPUs unless the layer
    # says its own product is the fast one, as a packed layer does: oneDNN's fused product was faster (820 x 1536 @
    # 1536 x 4608: 82 ms fused, 103 as three)
    packed = True

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn(model: nn.Module) -> nn.Module:
    """Every plain `nn.Linear` of `model` becomes an `OneDNNLinear`, in place (works on the meta device, before
    loading); returns the model."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model
