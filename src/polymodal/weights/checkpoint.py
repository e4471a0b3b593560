"""Reading checkpoint files safely.

* safetensors: the header is checked against the file before anything is read: every tensor's byte range
  must lie inside the file, match its dtype and shape, and not overlap another. A header that lies about
  sizes is refused without allocating what it claims.
* `.bin` / `.pt`: only through `torch.load(weights_only=True)`, which unpickles plain tensors and refuses
  anything else. We never execute code from a checkpoint.

Tensors are read lazily, one at a time, so the loader can move each straight into a model built on the
meta device (no second copy of the weights in memory).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header

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


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and validate a safetensors header -> {name: {"dtype", "shape", "data_offsets"}}."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(path, f"corrupt safetensors header: claims {n} bytes, file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt safetensors header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors header: bad entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
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
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta-device stand-ins with the stored shapes and dtypes (for checking a key map without reading)."""
        return {k: torch.empty(s, dtype=self.dtypes[k], device="meta") for k, s in self.shapes.items()}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    for index_name in (f"{stem}.safetensors.index.json", f"pytorch_{stem}.bin.index.json"):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(index, f"malformed shard index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if Path(s).name != s:
                    raise CheckpointError(index, f"shard name {s!r} points outside the checkpoint directory")
            missing = [s for s in shards if not (directory / s).exists()]
            if missing:
                raise CheckpointError(index, f"missing shard files: {missing}")
            return [directory / s for s in shards]
    pickled = (f"pytorch_{stem}.bin", f"{stem}.bin", f"{stem}.pt", f"{stem}.pth", "open_clip_pytorch_model.bin")
    for name in (f"{stem}.safetensors", *pickled):
        if (directory / name).exists():
            return [directory / name]
    raise CheckpointError(directory, f"no weights found (looked for {stem}.safetensors and pytorch_{stem}.bin)")


def open_checkpoint(path: str | os.PathLike, stem: str = "model") -> Checkpoint:
    """A lazy view of a checkpoint file or of a directory's weight files."""
    path = Path(path)
    return Checkpoint(checkpoint_files(path, stem) if path.is_dir() else [path])
