"""Weight-only quantized linear layers for CPU decoding: int8 per output channel and int4 in groups of 32.

A decode step at batch 1 multiplies one row by every weight of the model, so its time is the bytes of the weights
over the memory bandwidth: SmolLM2-135M reads 538 MB per token in fp32, 134 MB in int8 and 67 MB in int4
(+ scales). The products here are PyTorch's own packed CPU kernels, picked by measurement (docs/quantization.md):
a whole decode step's products at SmolLM2's shapes, one thread, process CPU time, 2026-12-04 (2 shared cores):
fp32 `F.linear` 51.0 ms, bf16 27.9, int8 `torch._weight_int8pack_mm` 8.5 (an inductor-compiled dequantize-GEMV
7.8: close, but it needs a compile per shape), int4 `torch._weight_int4pack_mm_for_cpu` 5.6 (group 32; group 64
5.8). Both kernels take bf16 activations (in fp32 they were 2-20x slower): a layer casts its input to bf16 and
its output back, so activations between layers stay fp32.

    Int8Linear   w = s[n] * q[n, k],                      q int8 in [-127, 127], s one scale per output row
    Int4Linear   w = scale[n, g] * (q[n, k] - 8) + zero[n, g],  q in [0, 15], g = k // 32

The int4 layout is llama.cpp's Q4_0 (zero = 0) and Q4_1 (scale = d, zero = m + 8 d) blocks, so a GGUF file's
blocks become a layer without going through float (`GGUFTensors.int4_blocks`). `quantize_model(model, "int8" |
"int4")` replaces a model's `nn.Linear` layers in place; an embedding-sized output layer (the tied head) stays
int8 in the int4 mode, as llama.cpp's Q4 files keep it at Q8_0. Off the CPU, or for products with a gradient, the
layers multiply with the dequantized weight (`F.linear`), which means the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int4")
GROUP = 32  # int4 elements sharing one scale and zero: llama.cpp's Q4_0 / Q4_1 block
# Output layers at least this wide (a vocabulary head: SmolLM2's 49152, Llama 3's 128256) stay int8 in the int4
# mode: the logits are where 4-bit error shows most, and llama.cpp's Q4 files keep token_embd/output at Q8_0 too.
HEAD_MIN_OUT_FEATURES = 16384
OUT_MULTIPLE = 16  # the int4 kernel's packing takes output rows in whole tiles of 16


def check_mode(quantize: str | None) -> str | None:
    """`quantize` as given, or a ValueError naming the accepted values (before anything is loaded)."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is not a quantization mode; use one of {', '.join(MODES)} or None "
                         "(the model's float weights)")
    return quantize


# ------------------------------------------------------------------------------------------ quantizers


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (q int8 (out, in), s fp32 (out,)), symmetric per output row: w ~ s[:, None] * q."""
    w = w.detach().float()
    s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) float weight -> (q uint8 (out, in) in [0, 15], scale, zero fp32 (out, in // group)), asymmetric
    per group of `group` inputs (min/max, as llama.cpp's Q4_1): w ~ scale * (q - 8) + zero."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs input features in whole groups of {group}; got {k}")
    g = w.detach().float().reshape(n, k // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, low + 8 * scale


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    return q.float() * s.float()[:, None]


def dequantize_int4(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    n, k = q.shape
    g = (q.float().reshape(n, scale.shape[1], -1) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return g.reshape(n, k)


# ------------------------------------------------------------------------------------------ layers


class QuantLinear(nn.Module):
    """What both layers share: the shape, an optional fp32 bias, the float fallback."""

    # Attention splits a fused q/k/v weight into three products on CPUs unless its layer's own product is the fast
    # one (nn/attention.py); a quantized layer has no float weight to split.
    packed = True

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantized(self) -> Tensor:
        raise NotImplementedError

    def _kernel(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.dequantized().to(x), None if self.bias is None else self.bias.to(x))
        y = self._kernel(x.reshape(-1, self.in_features).to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """int8 weights, one scale per output row; the product is `torch._weight_int8pack_mm` (bf16 activations)."""

    def __init__(self, q: Tensor, s: Tensor, bias: Tensor | None = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", s.float().contiguous())
        self.register_buffer("_scales_bf16", s.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_int8(linear.weight), linear.bias)

    def dequantized(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def _kernel(self, x: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self._scales_bf16)


class Int4Linear(QuantLinear):
    """4-bit weights in groups of 32 with a scale and a zero each; the product is `torch._weight_int4pack_mm_for_cpu`
    on the weight packed once by `torch._convert_weight_to_int4pack_for_cpu` (bf16 activations, scales and zeros)."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None = None):
        n, k = q.shape
        if n % OUT_MULTIPLE or k % GROUP or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"int4 weight {list(q.shape)} needs output rows in tiles of {OUT_MULTIPLE} and scales "
                             f"and zeros of shape {[n, k // GROUP]} (groups of {GROUP}); got {list(scale.shape)} "
                             f"and {list(zero.shape)}")
        super().__init__(k, n, bias)
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2))
        # the kernel's (k // 32, n, 2) table of (scale, zero) pairs
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                             .to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int4Linear:
        return cls(*quantize_int4(linear.weight), linear.bias)

    def dequantized(self) -> Tensor:
        # the packed weight's layout is the kernel's private one: multiply the identity to read the weight back
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self._kernel(eye).float().t()

    def _kernel(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, GROUP, self.scales_and_zeros)


# ------------------------------------------------------------------------------------------ the model

BlockSource = Callable[[str], tuple[Tensor, Tensor, Tensor] | None]


def quantize_model(model: nn.Module, mode: str, *, blocks: BlockSource | None = None) -> nn.Module:
    """Replace every float `nn.Linear` of `model` (its subclasses too) by an `Int8Linear` or `Int4Linear`, in place;
    returns the model.

    mode: "int8" or "int4" (`MODES`). blocks: for a model read from a GGUF file, the weight name
    (`layers.0.mlp.up_proj.weight`) -> the file's int4 quants (q, scale, zero) where its blocks are Q4_0 / Q4_1,
    None otherwise; those layers keep the file's quants in either mode (they are 4-bit already). In the int4 mode
    layers whose inputs are not whole groups of 32 or whose outputs are not whole tiles of 16, and vocabulary-sized
    heads, are int8."""
    check_mode(mode)
    names = {id(m): n for n, m in model.named_modules()}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or not child.weight.is_floating_point():
                continue
            name = f"{names[id(parent)]}.{child_name}".lstrip(".")
            setattr(parent, child_name, _quantized(child, mode, blocks(f"{name}.weight") if blocks else None))
    return model


def _quantized(linear: nn.Linear, mode: str, exact: tuple[Tensor, Tensor, Tensor] | None) -> QuantLinear:
    fits = linear.in_features % GROUP == 0 and linear.out_features % OUT_MULTIPLE == 0
    if exact is not None and fits:
        return Int4Linear(*exact, linear.bias)  # the file's own quants
    if mode == "int4" and fits and linear.out_features < HEAD_MIN_OUT_FEATURES:
        return Int4Linear.from_float(linear)
    return Int8Linear.from_float(linear)


def quantization(model: nn.Module) -> dict[str, int]:
    """How many layers of each kind a model has: {"Int4Linear": 180, "Int8Linear": 1, "Linear": 0}."""
    out = {"Int4Linear": 0, "Int8Linear": 0, "Linear": 0}
    for m in model.modules():
        kind = type(m).__name__ if isinstance(m, QuantLinear) else "Linear" if isinstance(m, nn.Linear) else None
        if kind:
            out[kind] += 1
    return out
