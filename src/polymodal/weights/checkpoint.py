"""Reading checkpoint files safely.

* safetensors: the header is checked against the file before anything is read: every tensor's byte range
  must lie inside the file, match its dtype and shape, and not overlap another. A header that lies about
  sizes is refused without allocating what it claims.
* `.bin` / `.pt`: only through `torch.load(weights_only=True)`, which unpickles plain tensors and refuses
  anything else. We never execute code from a checkpoint.
* Every file is opened only if it is a regular file once symlinks are resolved (`open_regular`): a FIFO would block
  the read forever, a device such as /dev/zero never ends. JSON files (config, shard index, generation config) are
  read through `read_json`, which also caps their size and refuses what Python's JSON reader cannot hold.

Tensors are read lazily, one at a time, so the loader can move each straight into a model built on the
meta device (no second copy of the weights in memory).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from polymodal.config import show

_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header (MAX_HEADER_SIZE in its source)
JSON_LIMIT = 16 * 1024 * 1024  # config / index files are kilobytes; an ImageNet-22k label map is ~1.5 MB
TOKENIZER_LIMIT = 256 * 2**20  # tokenizer.json and vocabulary files: the largest real ones are tens of MB
TEMPLATE_LIMIT = 4 * 2**20  # a chat template: real ones are a few KB
_MAX_BYTES = 2**63  # a tensor's bytes, and its strides, must fit torch's 64-bit sizes

_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file once symlinks are resolved; else CheckpointError.

    The file is opened without blocking and checked on its descriptor, so a FIFO is refused rather than waited on,
    and what is checked is what is read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(path, f"cannot open the file ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
        kind = next((name for test, name in kinds if test(mode)), "not a plain file")
        link = " (through a symlink)" if path.is_symlink() else ""
        raise CheckpointError(path, f"not a regular file{link}: {kind}; checkpoint files must be regular files")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(path: str | os.PathLike, *, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, a shard index, generation_config.json) as a dict: a regular file of
    at most `limit` bytes of UTF-8 text holding one JSON object. Raises CheckpointError naming the file."""
    path = Path(path)
    text = read_text(path, limit=limit)
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(path, "JSON nested deeper than Python's JSON reader allows") from None
    except ValueError as e:  # json.JSONDecodeError, and numbers past Python's 4300-digit limit
        raise CheckpointError(path, f"unreadable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"expected a JSON object, got {show(value)}")
    return value


def read_text(path: str | os.PathLike, *, limit: int) -> str:
    """A text file that comes with a checkpoint (a JSON file, tokenizer.json, a chat template) as a string: a regular
    file of at most `limit` bytes of UTF-8. Raises CheckpointError naming the file."""
    path = Path(path)
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(path, f"larger than the {limit // 2**20} MiB such a file may have")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r})") from None


def read_tokenizer_file(path: str | os.PathLike):
    """A `tokenizers` tokenizer.json -> (tokenizers.Tokenizer, its text), read as `read_text` reads; what the library
    cannot parse is a CheckpointError naming the file."""
    from tokenizers import Tokenizer

    text = read_text(path, limit=TOKENIZER_LIMIT)
    try:
        return Tokenizer.from_str(text), text
    except Exception as e:  # the library raises plain Exceptions with serde's message
        raise CheckpointError(Path(path), f"not a tokenizers file ({str(e).strip() or type(e).__name__})") from None


def check_regular(path: str | os.PathLike, *, limit: int) -> Path:
    """`path` if it is a regular file of at most `limit` bytes (for files a library reads by name); else
    CheckpointError."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise CheckpointError(path, f"{size} bytes, more than the {limit // 2**20} MiB such a file may have")
    return path


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and validate a safetensors header -> {name: {"dtype", "shape", "data_offsets"}}.

    The checks are the format's own (those of the `safetensors` library, so that it never meets a header this
    accepted): the header is UTF-8 JSON of at most 100 MB starting with `{`, `__metadata__` maps strings to
    strings, every tensor has a known dtype, a shape of non-negative 64-bit sizes and a byte range of exactly
    dtype x shape, and the ranges tile the data section with no gap, overlap or trailing bytes."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(f.read(8), "little")
        if n > _MAX_HEADER:
            raise CheckpointError(path, f"corrupt safetensors header: claims {n} bytes, over the format's limit "
                                        f"of {_MAX_HEADER}")
        if n > size - 8:
            raise CheckpointError(path, f"corrupt safetensors header: claims {n} bytes, file has {size - 8}")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"corrupt safetensors header: not UTF-8 (byte {8 + e.start})") from None
    if not text:
        raise CheckpointError(path, "corrupt safetensors header: empty (0 bytes)")
    if not text.startswith("{"):
        start = "a UTF-8 byte-order mark" if text.startswith("\ufeff") else show(text[:8])
        raise CheckpointError(path, f"corrupt safetensors header: starts with {start}, not '{{'")
    try:
        header = json.loads(text)
    except RecursionError:
        raise CheckpointError(path, "corrupt safetensors header: JSON nested too deeply") from None
    except ValueError as e:
        raise CheckpointError(path, f"corrupt safetensors header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(path, f"corrupt safetensors header: __metadata__ must map strings to strings, got "
                                    f"{show(metadata)}")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise CheckpointError(path, f"corrupt safetensors header: bad entry for tensor {name!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(dtype, str) and dtype in _DTYPES):
            raise CheckpointError(path, f"tensor {name!r} has unknown dtype {show(dtype)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(path, f"tensor {name!r} has an invalid shape {show(shape)}")
        # torch counts a 0 as 1 in strides: [0, 2**62, 4] overflows its stride arithmetic though it holds nothing
        if math.prod(max(d, 1) for d in shape) * _DTYPES[dtype][1] >= _MAX_BYTES:
            raise CheckpointError(path, f"tensor {name!r} has a shape {show(shape)} beyond 64-bit sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(path, f"tensor {name!r} has invalid data_offsets {show(offsets)}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                path, f"tensor {name!r} claims bytes {start}..{end} but the file holds {data_len} data bytes"
            )
        if end - start != math.prod(shape) * _DTYPES[dtype][1]:
            raise CheckpointError(path, f"tensor {name!r}: byte range does not match {dtype} {shape}")
        spans.append((start, end, name))
    spans.sort()
    for (_s0, e0, a), (s1, _e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(path, f"tensors {a!r} and {b!r} overlap in the file")
        if s1 > e0:
            raise CheckpointError(path, f"{s1 - e0} bytes between tensors {a!r} and {b!r} belong to no tensor")
    covered = spans[-1][1] if spans else 0
    if spans and spans[0][0] > 0:
        raise CheckpointError(path, f"the first {spans[0][0]} data bytes belong to no tensor")
    if covered != data_len:
        raise CheckpointError(path, f"the last {data_len - covered} data bytes belong to no tensor (cut or padded "
                                    "file?)")
    return header


class Checkpoint(Mapping):
    """A read-only mapping name -> tensor over one or more files, read lazily. `shapes` needs no reading."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        for file in files:
            if file.suffix == ".safetensors":
                for name, info in read_safetensors_header(file).items():
                    self._add(file, name, tuple(info["shape"]), _DTYPES[info["dtype"]][0])
            else:
                for name, t in _load_pickle(file).items():
                    self._pickled[name] = t
                    self._add(file, name, tuple(t.shape), t.dtype)

    def _add(self, file: Path, name: str, shape, dtype) -> None:
        if name in self._where:
            raise CheckpointError(file, f"tensor {name!r} also appears in {self._where[name]}")
        self._where[name], self.shapes[name], self.dtypes[name] = file, shape, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        file = self._where[name]
        try:
            if file not in self._handles:
                from safetensors import safe_open

                self._handles[file] = safe_open(str(file), framework="pt")
            return self._handles[file].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file changed since its header was read
            raise CheckpointError(file, f"cannot read tensor {name!r} ({type(e).__name__}: {e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta-device stand-ins with the stored shapes and dtypes (for checking a key map without reading)."""
        return {k: torch.empty(s, dtype=self.dtypes[k], device="meta") for k, s in self.shapes.items()}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open_regular(path) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            path,
            "refused: this pickled checkpoint holds more than plain tensors, and polymodal never runs code "
            f"from a checkpoint ({first}). Convert it to safetensors with a tool you trust.",
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a corrupt zip/pickle
        raise CheckpointError(path, f"cannot read this pickled checkpoint: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "not a state dict (a mapping of names to tensors)")
    return obj


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_files(directory: Path, stem: str = "model") -> list[Path]:
    """The weight files of a directory: single or sharded safetensors, else a pickled `.bin`."""
    for index_name, suffix in ((f"{stem}.safetensors.index.json", ".safetensors"),
                               (f"pytorch_{stem}.bin.index.json", ".bin")):
        index = directory / index_name
        if index.exists() or index.is_symlink():
            shards = _shard_names(index, suffix)
            missing = [s for s in shards if not (directory / s).exists()]
            if missing:
                raise CheckpointError(index, f"missing shard files: {missing[:10]}")
            return [directory / s for s in shards]
    pickled = (f"pytorch_{stem}.bin", f"{stem}.bin", f"{stem}.pt", f"{stem}.pth", "open_clip_pytorch_model.bin")
    for name in (f"{stem}.safetensors", *pickled):
        if (directory / name).exists():
            return [directory / name]
    raise CheckpointError(directory, f"no weights found (looked for {stem}.safetensors and pytorch_{stem}.bin)")


def _shard_names(index: Path, suffix: str) -> list[str]:
    """The shard files a `*.index.json` names: `weight_map` maps tensor names to file names in the same directory."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(index, f"malformed shard index: 'weight_map' must map tensor names to shard files, "
                                     f"got {show(weight_map)}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(index, f"malformed shard index: 'weight_map' gives tensor {show(tensor)} the shard "
                                         f"{show(shard)}, not a file name")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if Path(s).name != s or s in ("", ".", ".."):
            raise CheckpointError(index, f"shard name {show(s)} points outside the checkpoint directory")
        if not s.endswith(suffix):
            raise CheckpointError(index, f"shard name {show(s)} is not a {suffix} file")
    return shards


def open_checkpoint(path: str | os.PathLike, stem: str = "model") -> Checkpoint:
    """A lazy view of a checkpoint file or of a directory's weight files."""
    path = Path(path)
    return Checkpoint(checkpoint_files(path, stem) if path.is_dir() else [path])


class LazyFloatTensors(Mapping):
    """The mapping the single-file readers (GGUF, CTranslate2) hand the strict loader: transformers' names in
    `_entries`, their `shapes` and float32 `dtypes` known without reading, each tensor read (and widened) only in
    the subclass's `__getitem__`."""

    _entries: dict
    shapes: dict[str, tuple[int, ...]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, dtype=torch.float32, device="meta") for k, s in self.shapes.items()}
