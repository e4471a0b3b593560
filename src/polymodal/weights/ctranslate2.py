"""CTranslate2 import: a converted Whisper model (`model.bin` + `config.json` + `tokenizer.json`, the layout
faster-whisper uses) as a transformers-style config, tensors and generation config.

The model.bin format (CTranslate2's `ModelSpec._serialize`, binary version 6) is a little-endian sequence:

    u32 version | string spec name | u32 revision | u32 count
    count x (string name | u8 rank | rank x u32 dims | u8 dtype | u32 byte count | bytes)
    u32 alias count | alias count x (string alias | string target)

where a string is a u16 length (counting a final NUL byte), the bytes, the NUL; dtype is CTranslate2's DataType
enum (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16). `read_ctranslate2` turns a Whisper one
(`WhisperSpec`) into what transformers' `WhisperForConditionalGeneration` directory would hold, as
`polymodal.weights.gguf` does for llama.cpp files:

    config.json             <- the tensors' shapes and the `num_heads` scalars
    model.safetensors       <- variables renamed (`encoder/layer_0/self_attention/linear_0` is the layer's q, k
                               and v projections fused: split back), float16 widened to float32
    generation_config.json  <- config.json's `suppress_ids`, `suppress_ids_begin`, `lang_ids` and the tokenizer's
                               special tokens

Parsing is our own strict reader over a memory map: every length and range is checked against the file before it
is used, and nothing is read until a tensor is asked for; a file that is cut, lies about its sizes, holds
quantized (int8) weights, another architecture or unexpected variables is a `CheckpointError` naming it.
Checked against the `ctranslate2` package's own model on the same file in tests/test_whisper_ctranslate2.py (when
it is installed there; it is no dependency).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal.weights.checkpoint import CheckpointError, LazyFloatTensors, open_regular, read_json, read_tokenizer_file

VERSION = 6
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # bfloat16 (5): not in Whisper files
_MAX_VARIABLES = 1 << 16
_MAX_RANK = 4
_GELU = 3  # CTranslate2's ActivationType.GELU


@dataclass(frozen=True)
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray  # a view of the memory map (uint8)

    def array(self) -> np.ndarray:
        return self.data.view(self.dtype).reshape(self.shape)

    def scalar(self) -> int:
        return int(self.array().reshape(-1)[0])


class _Corrupt(Exception):
    """Found by the parser; `parse_model_bin` turns it into a CheckpointError naming the file."""


def parse_model_bin(path: str | os.PathLike) -> tuple[str, dict[str, Variable], dict[str, str]]:
    """A model.bin's (spec name, variables by name, aliases {alias: variable}), strictly."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot read the file ({getattr(e, 'strerror', None) or e})") from None
    try:
        return _Reader(buf).model()
    except _Corrupt as e:
        raise CheckpointError(path, f"corrupt or truncated CTranslate2 model ({e})") from None


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.size - start:
            raise _Corrupt(f"{what} at byte {start} needs {n} bytes, the file ends at {self.size}")
        self.pos = start + n
        return start

    def u(self, code: str, what: str) -> int:
        return struct.unpack_from("<" + code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        n = self.u("H", f"length of {what}")
        if n == 0:
            raise _Corrupt(f"{what} at byte {self.pos - 2} has no terminating NUL")
        raw = bytes(self.buf[self.take(n, what) : self.pos])
        if raw[-1] != 0:
            raise _Corrupt(f"{what} at byte {self.pos - n} does not end with NUL")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def model(self) -> tuple[str, dict[str, Variable], dict[str, str]]:
        version = self.u("I", "version")
        if version != VERSION:
            raise _Corrupt(f"binary version {version}; only version {VERSION} (CTranslate2 3.x and 4.x) is read")
        spec = self.string("spec name")
        self.u("I", "spec revision")
        count = self.u("I", "variable count")
        if count > _MAX_VARIABLES:
            raise _Corrupt(f"{count} variables, more than any model has")
        variables: dict[str, Variable] = {}
        for _ in range(count):
            name = self.string("variable name")
            rank = self.u("B", f"rank of {name!r}")
            if rank > _MAX_RANK:
                raise _Corrupt(f"variable {name!r} has {rank} dimensions")
            shape = tuple(self.u("I", f"shape of {name!r}") for _ in range(rank))
            code = self.u("B", f"dtype of {name!r}")
            if code not in _DTYPES:
                raise _Corrupt(f"variable {name!r} has an unsupported data type {code}")
            dtype = np.dtype(_DTYPES[code])
            nbytes = self.u("I", f"byte count of {name!r}")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise _Corrupt(f"variable {name!r}: {nbytes} bytes for shape {list(shape)} of {dtype}")
            start = self.take(nbytes, f"data of {name!r}")
            if name in variables:
                raise _Corrupt(f"variable {name!r} appears twice")
            variables[name] = Variable(name, shape, dtype, np.frombuffer(self.buf, np.uint8, nbytes, start))
        aliases = {}
        for _ in range(self.u("I", "alias count") if self.pos < self.size else 0):
            alias, target = self.string("alias"), self.string("alias target")
            if target not in variables:
                raise _Corrupt(f"alias {alias!r} names a variable that is not in the file ({target!r})")
            aliases[alias] = target
        if self.pos != self.size:
            raise _Corrupt(f"{self.size - self.pos} bytes after the last alias")
        return spec, variables, aliases


# ============================================================================================ Whisper

# CTranslate2 WhisperSpec names -> transformers' (a layer's own part after `layers.{i}.`); `linear_0` of a
# self-attention is q, k, v fused and of a cross-attention (`attention`) the query, with `linear_1` keys and values
_LAYER_PARTS = {
    "self_attention/layer_norm": ["self_attn_layer_norm"],
    "self_attention/linear_0": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attention/linear_1": ["self_attn.out_proj"],
    "attention/layer_norm": ["encoder_attn_layer_norm"],
    "attention/linear_0": ["encoder_attn.q_proj"],
    "attention/linear_1": ["encoder_attn.k_proj", "encoder_attn.v_proj"],
    "attention/linear_2": ["encoder_attn.out_proj"],
    "ffn/layer_norm": ["final_layer_norm"],
    "ffn/linear_0": ["fc1"],
    "ffn/linear_1": ["fc2"],
}
_TOP = {
    "encoder/conv1": "model.encoder.conv1", "encoder/conv2": "model.encoder.conv2",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm": "model.decoder.layer_norm",
}
_KINDS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_LAYER_NAME = re.compile(r"(?P<stack>encoder|decoder)/layer_(?P<i>\d{1,4})/(?P<part>\w+/\w+)/(?P<kind>\w+)")
# flags the spec stores as scalars, and the values a Whisper model has
_FLAGS = {"decoder/activation": _GELU, "decoder/alibi": 0, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0,
          "decoder/start_from_zero_embedding": 0}
_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}  # cross-attention heads for word timestamps
_HEADS = ("encoder/num_heads", "decoder/num_heads")


class CTranslate2Tensors(LazyFloatTensors):
    """transformers name -> float32 tensor, read from the memory map when asked for (a slice of a fused
    variable for q/k/v). Like `checkpoint.Checkpoint`: `shapes` and `meta()` need no reading."""

    def __init__(self, path: Path, entries: dict[str, tuple[Variable, int, int]]):
        self.path = path
        self._entries = entries  # name -> (variable, first row, rows)
        self.shapes = {k: (n, *v.shape[1:]) for k, (v, _, n) in entries.items()}
        self.dtypes = dict.fromkeys(entries, torch.float32)

    def __getitem__(self, name: str) -> torch.Tensor:
        var, first, rows = self._entries[name]
        return torch.from_numpy(var.array()[first : first + rows].astype(np.float32))



@dataclass
class CTranslate2Content:
    """What a transformers Whisper directory would hold, read from a CTranslate2 model directory."""

    config: dict  # config.json of WhisperForConditionalGeneration
    tensors: CTranslate2Tensors
    generation_config: dict  # generation_config.json: token ids, languages, tasks, suppressed tokens
    tokenizer: Any  # tokenizers.Tokenizer


def is_ctranslate2_dir(path: str | os.PathLike) -> bool:
    """A directory holding a CTranslate2 model.bin (and no transformers config with a model_type)."""
    path = Path(path)
    if not (path.is_dir() and (path / "model.bin").is_file()):
        return False
    cfg = path / "config.json"
    return not cfg.exists() or "model_type" not in read_json(cfg)


def read_ctranslate2(directory: str | os.PathLike) -> CTranslate2Content:
    """Read a converted Whisper directory (model.bin, tokenizer.json, config.json). Raises `CheckpointError` naming
    the file for anything it cannot load."""
    directory = Path(directory)
    model_bin = directory / "model.bin"
    spec, variables, aliases = parse_model_bin(model_bin)
    if spec != "WhisperSpec":
        raise CheckpointError(model_bin, f"a CTranslate2 {spec!r} model; only Whisper (WhisperSpec) is read")
    extra = {a: t for a, t in aliases.items() if a != "decoder/projection/weight"}
    if extra or aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise CheckpointError(model_bin, f"unexpected aliases {aliases} (Whisper ties only the output projection to "
                                         "the embedding)")
    if "decoder/projection/weight" in variables:
        raise CheckpointError(model_bin, "an untied output projection (decoder/projection/weight); Whisper ties it")
    entries = _entries(model_bin, variables)
    tok_path = directory / "tokenizer.json"
    if not tok_path.exists():
        raise CheckpointError(directory, "no tokenizer.json beside model.bin")
    tokenizer = read_tokenizer_file(tok_path)[0]
    raw = read_json(directory / "config.json") if (directory / "config.json").exists() else {}
    config = _config(model_bin, variables, entries)
    generation = _generation_config(directory, config, raw, tokenizer)
    config.update({k: generation[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                              "decoder_start_token_id")})
    return CTranslate2Content(config, CTranslate2Tensors(model_bin, entries), generation, tokenizer)


def _entries(path: Path, variables: dict[str, Variable]) -> dict[str, tuple[Variable, int, int]]:
    entries: dict[str, tuple[Variable, int, int]] = {}
    unknown = []
    for name, var in variables.items():
        if name in _FLAGS or name in _HEADS or name in _IGNORED:
            if var.shape != () or var.dtype.kind != "i":
                raise CheckpointError(path, f"variable {name!r}: expected an integer scalar, got {var.dtype} "
                                            f"{list(var.shape)}")
            if name in _FLAGS and var.scalar() != _FLAGS[name]:
                raise CheckpointError(path, f"{name} = {var.scalar()}: not a Whisper model ({_FLAGS[name]} expected)")
            continue
        if var.dtype not in (np.float16, np.float32):
            raise CheckpointError(path, f"variable {name!r} is {var.dtype}: quantized models are not supported "
                                        "(convert with --quantization float16 or float32)")
        stem, _, kind = name.rpartition("/")
        if name in _TOP:
            entries[_TOP[name]] = (var, 0, var.shape[0])
            continue
        if stem in _TOP and kind in _KINDS:
            entries[f"{_TOP[stem]}.{_KINDS[kind]}"] = (var, 0, var.shape[0])
            continue
        m = _LAYER_NAME.fullmatch(name)
        parts = _LAYER_PARTS.get(m["part"]) if m else None
        if m is None or parts is None or m["kind"] not in _KINDS or (m["stack"] == "encoder" and "attention/" in
                                                                     m["part"] and "self" not in m["part"]):
            unknown.append(name)
            continue
        rows = var.shape[0] // len(parts) if var.shape else 0
        if not var.shape or rows * len(parts) != var.shape[0]:
            raise CheckpointError(path, f"variable {name!r} of shape {list(var.shape)} cannot hold {len(parts)} "
                                        "equal projections")
        prefix = f"model.{m['stack']}.layers.{int(m['i'])}."
        for j, part in enumerate(parts):
            if part.endswith("k_proj") and m["kind"] == "bias":
                # transformers' Whisper keys have no bias; CTranslate2 stores zeros there. (Any value would do:
                # q.b_k is the same for every key of a query, and the softmax removes it.)
                continue
            entries[f"{prefix}{part}.{_KINDS[m['kind']]}"] = (var, j * rows, rows)
    if unknown:
        raise CheckpointError(path, f"unexpected variables for a Whisper model: {', '.join(unknown[:10])}")
    return entries


def _config(path: Path, variables: dict[str, Variable], entries: dict) -> dict:
    def shape(name: str) -> tuple[int, ...]:
        if name not in entries:
            raise CheckpointError(path, f"no variable for {name} in the file")
        var, _, rows = entries[name]
        return (rows, *var.shape[1:])

    def layers(stack: str) -> int:
        found = {int(m["i"]) for n in variables if (m := _LAYER_NAME.fullmatch(n)) and m["stack"] == stack}
        if found != set(range(len(found))):
            raise CheckpointError(path, f"the {stack}'s layers are not numbered 0..n-1: {sorted(found)[:10]}")
        return len(found)

    for name in _HEADS:
        if name not in variables:
            raise CheckpointError(path, f"no {name} in the file")
    vocab, d_model = shape("model.decoder.embed_tokens.weight")
    return {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": vocab, "d_model": d_model, "num_mel_bins": shape("model.encoder.conv1.weight")[1],
        "encoder_layers": layers("encoder"), "decoder_layers": layers("decoder"),
        "encoder_attention_heads": variables["encoder/num_heads"].scalar(),
        "decoder_attention_heads": variables["decoder/num_heads"].scalar(),
        "encoder_ffn_dim": shape("model.encoder.layers.0.fc1.weight")[0],
        "decoder_ffn_dim": shape("model.decoder.layers.0.fc1.weight")[0],
        "max_source_positions": shape("model.encoder.embed_positions.weight")[0],
        "max_target_positions": shape("model.decoder.embed_positions.weight")[0],
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
    }


def _generation_config(directory: Path, config: dict, raw: dict, tokenizer) -> dict:
    """transformers' generation_config.json of the same checkpoint, from CTranslate2's config.json (suppressed
    tokens, language ids) and the tokenizer's special tokens."""

    def token(text: str) -> int:
        i = tokenizer.token_to_id(text)
        if i is None or not 0 <= i < config["vocab_size"]:
            raise CheckpointError(directory / "tokenizer.json", f"no {text} token in the model's vocabulary")
        return i

    def ids(key: str) -> list[int]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < config["vocab_size"]
                                                  for i in value):
            raise CheckpointError(directory / "config.json", f"{key} must be a list of token ids")
        return value

    eot = token("<|endoftext|>")
    gen = {"decoder_start_token_id": token("<|startoftranscript|>"), "eos_token_id": eot, "pad_token_id": eot,
           "bos_token_id": eot, "no_timestamps_token_id": token("<|notimestamps|>"),
           "suppress_tokens": ids("suppress_ids"), "begin_suppress_tokens": ids("suppress_ids_begin"),
           "max_length": config["max_target_positions"],
           "max_initial_timestamp_index": 50}  # openai's checkpoints' (1 s): the first timestamp starts no later
    # CTranslate2 tells multilingual checkpoints by their vocabulary (51865 and more; English-only ones: 51864)
    if config["vocab_size"] >= 51865:
        langs = {tokenizer.id_to_token(i): i for i in ids("lang_ids")}
        transcribe = token("<|transcribe|>")
        gen.update(is_multilingual=True, lang_to_id=langs, task_to_id={"transcribe": transcribe,
                                                                       "translate": token("<|translate|>")},
                   forced_decoder_ids=[[1, None], [2, transcribe]])
    else:
        gen["is_multilingual"] = False
    return gen


def load_ctranslate2(directory: str | os.PathLike, dtype: torch.dtype | None = None, device=None):
    """A CTranslate2 Whisper directory as our Whisper, in eval mode: built like a transformers checkpoint of the
    family (its strict loader and key map). Weights come out in float32 unless `dtype` says otherwise;
    `pm.save(model, dir)` then writes the transformers layout, which transformers loads."""
    from polymodal import registry
    from polymodal.weights.loader import _build_and_fill
    from polymodal.weights.record import record

    directory = Path(directory)
    content = read_ctranslate2(directory)
    fam = registry.family("whisper")
    model = _build_and_fill(fam, fam.layouts["transformers"], content.config, content.tensors, dtype, device,
                            directory / "model.bin", directory / "model.bin")
    rec = record(model)
    rec.source = directory  # tokenizer.json is beside it
    rec.generation_config = content.generation_config
    return model
