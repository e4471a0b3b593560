"""CPU inference with prepacked weights: `pm.optimize_for_inference(model)`.

On CPUs, `F.linear` hands every product to a GEMM that repacks the weight into its blocked layout on each call.
oneDNN can keep a weight in that layout (`torch.ops.mkldnn._reorder_linear_weight`) and multiply with it
directly (`_linear_pointwise`), which is what `torch.compile` does on CPU. On the 2-core AVX2 machine of
benchmarks/ that ran the 197x768 @ 768x2304 and @ 768x3072 products of ViT-B/16 26-28% faster, and a whole
ViT-B/16 forward at batch 1 about 1.2x faster (docs/benchmarks.md).

`optimize_for_inference` turns the wide `nn.Linear` layers of a model into a `PackedLinear` in place. Parameters, names,
`state_dict`, saving and training are untouched: the packed copy is a cache beside the weight, rebuilt when the
weight changes (an optimizer step, `load_state_dict`; for weights created under `torch.inference_mode`,
which keep no version counter, only when the tensor itself is replaced), and used only where it pays and
means the same: fp32 tensors on the CPU with no gradient needed. Elsewhere (GPUs, bf16, training): `F.linear`.
The cost is memory: the packed copy doubles the size of every packed weight. These are private PyTorch ops;
where a torch build lacks them or refuses an input, the layer falls back to `F.linear` with the same result.

One more change serves the matrix-vector products of decoding (one row per sequence, below `MIN_MACS`, so
`F.linear`): a weight with more outputs than inputs is stored column-major (the same values and shape, the
transpose contiguous), which MKL multiplies as a sum of columns, streaming long runs of memory. Measured on that
machine at one row (fp32, 2 threads, weights not in cache): 960x576 and 1536x576 products 1.31x and 1.38x
faster, 576x576 1.08x; narrower outputs (576x1536) are 0.8x that way and keep the row-major layout. No extra memory;
`state_dict` and saving are unchanged (saving writes contiguous tensors). Products of one row with 1024 or more input
features (a decode step at batch 1 of a 7B or 11B model) take `F.linear` as well: they only stream the weight, which
MKL's GEMV does faster than the packed product; from two rows on, the packed product is the faster one again (see
`ONE_ROW_MIN_IN_FEATURES`). That holds where MKL runs its best kernels; on an AVX-512 CPU that is not Intel's (the
AMD EPYC benchmarks/ ran on later), MKL falls back to AVX2 and the packed product wins at one row too, 1.0-1.7x, so
there every product above `MIN_MACS` is packed (`_mkl_lacks_avx512`; benchmarks/bench_linear_kernels.py).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_OPS = {"enabled": None}
# A packed product has a fixed cost of ~60 us here against ~10 us for F.linear on a tiny one; measured on the
# 2-core AVX2 machine (fp32, 2 threads) it wins from about a million multiply-adds when the input width is 256
# or more (256 wide: 1.1-1.25x from 8 rows on; 512 wide: 1.2x already for one row) and loses below width 256
# at any row count (128 wide, 197 rows: 0.9x). Narrower layers stay plain nn.Linear.
MIN_IN_FEATURES = 256
MIN_MACS = 1 << 20
# A product of one row (a decode step at batch 1) only streams the weight from memory; there MKL's GEMV beat oneDNN's
# packed product wherever the rows of the weight are long, and lost where they are short. Measured on the 2-core
# machine (fp32, one thread, process CPU time beside other work, medians; weights out of cache), F.linear / packed,
# one row: 4096x4096 4.1 / 5.3 ms, 6144x4096 5.4 / 8.4, 14336x4096 11.4 / 16.1, 4096x14336 10.5 / 15.6,
# 128256x4096 (Llama 3's vocabulary head) 107 / 151, 8192x1024 2.1 / 2.8, 18944x3584 16.0 / 19.6; but 49152x576
# (SmolLM2's head) 10.4 / 9.0. Earlier, at two threads: 1x3584 @ 3584x152064 259 vs 180 ms, one Qwen2-VL-7B-width
# decode step 264 vs 208 ms. From two rows on (batched decoding) MKL's small-M GEMM was the slow one: 4 rows of
# 14336x4096 41.1 / 20.0 ms, 4 of 128256x4096 416 / 197, 8 of 6144x4096 18.9 / 11.7, 8 of 49152x576 20.4 / 13.6
# (SmolLM2's decode at batch 8 fell from 1.72x to 1.44x of transformers when such calls took F.linear). So one-row
# calls of weights at least this wide take F.linear, and every other call above MIN_MACS the packed product.
# On CPUs with AVX-512 that are not Intel's, MKL runs its AVX2 kernels while oneDNN runs AVX-512 ones, and there the
# packed product beat MKL at one row as well. Measured 2026-12-04 on the AMD EPYC (Zen 5, 2 cores) of benchmarks/
# (benchmarks/bench_linear_kernels.py, process CPU time, medians of 7, weights streamed from memory), F.linear /
# packed, one row, one thread: 3584x18944 11.1 / 6.4 ms, 3584x152064 (Qwen2-VL-7B's head) 88.6 / 51.3, 2560x50272
# 21.8 / 12.0, 4096x14336 9.0 / 5.4; two threads 11.1 / 9.8, 101.9 / 98.1, 30.3 / 24.0, 9.6 / 9.5 (both stream at
# the memory's rate). Three to eight rows 2.3-5.3x, hundreds 2.2-2.5x. So there every call above MIN_MACS is packed.
ONE_ROW_MIN_IN_FEATURES = 1024


def _mkl_lacks_avx512() -> bool:
    """Whether this CPU has AVX-512 that MKL does not use: ATen dispatches AVX-512 kernels and the vendor is not
    Intel (MKL chooses its AVX-512 code paths on Intel CPUs only)."""
    if _OPS.get("mkl_lacks_avx512") is None:
        vendor = ""
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("vendor_id"):
                        vendor = line.split(":", 1)[1].strip()
                        break
        except OSError:  # not Linux: keep the rules measured where MKL is the fast one
            pass
        capability = torch.backends.cpu.get_cpu_capability()
        _OPS["mkl_lacks_avx512"] = capability.startswith("AVX512") and vendor not in ("", "GenuineIntel")
    return _OPS["mkl_lacks_avx512"]


def _available() -> bool:
    if _OPS["enabled"] is None:
        try:
            _OPS["enabled"] = bool(torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._reorder_linear_weight is not None
                                   and torch.ops.mkldnn._linear_pointwise is not None)
        except (AttributeError, RuntimeError):
            _OPS["enabled"] = False
    return _OPS["enabled"]


class PackedLinear(nn.Linear):
    """An `nn.Linear` that multiplies with a oneDNN-packed copy of its weight when that is possible (see module
    docstring); made by `optimize_for_inference`, never constructed directly."""

    packed = True
    _pack: tuple[tuple[int, int], Tensor] | None = None

    def _packed_weight(self) -> Tensor:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
            version = -1
        key = (version, w.data_ptr())
        if self._pack is None or self._pack[0] != key:
            self._pack = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None))
        return self._pack[1]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if torch.compiler.is_compiling():  # inductor lowers the plain product itself (and cannot take a packed one)
            return F.linear(x, w, self.bias)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.numel() * self.out_features >= MIN_MACS
                and not (x.numel() == self.in_features and self.in_features >= ONE_ROW_MIN_IN_FEATURES
                         and not _mkl_lacks_avx512())
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and _available()):
            packed = self._packed_weight()
            try:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            except RuntimeError:  # an input this build's kernel refuses: the plain product, same result
                pass
        return F.linear(x, w, self.bias)


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Turn the `nn.Linear` layers of `model` that are wide enough to gain (`MIN_IN_FEATURES`) into
    `PackedLinear` (in place; returns the model, in eval mode); each call with fewer than `MIN_MACS`
    multiply-adds still takes the plain product, for which CPU weights with more outputs than inputs are laid
    out column-major (see the module docstring).

    Outputs stay those of the plain model (up to fp32 rounding, ~1e-6); names, parameters and checkpoints are
    unchanged. Pays on CPUs in fp32; elsewhere it changes nothing but costs no time either."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if type(module) is nn.Linear and module.in_features >= MIN_IN_FEATURES:
            module.__class__ = PackedLinear
            w = module.weight
            if (w.device.type == "cpu" and w.dtype == torch.float32 and uses[id(w)] == 1
                    and module.in_features < module.out_features and w.numel() < MIN_MACS and w.is_contiguous()):
                with torch.no_grad():  # a tied weight (an embedding's too) keeps its layout
                    w.data = w.data.t().contiguous().t()
    return model.eval()


def is_packed(module: nn.Module) -> bool:
    return getattr(module, "packed", False)
