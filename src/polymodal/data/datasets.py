"""Real data: Fashion-MNIST, scikit-learn's digits, easy-VQA, and the user formats (JSONL, tar shards).

Every dataset is a plain torch dataset whose items are dicts: "image" is a uint8 tensor (C, H, W) and the rest are
strings or integer tensors ("label", "text", "caption", "question", "answer"). A `transform` callable, when given,
receives that dict and returns what the DataLoader gets. `collate` batches such dicts.

A missing or corrupt sample never stops an epoch: it is skipped, counted in the dataset's `skipped` attribute and
announced with a warning that carries the count. (A map-style dataset returns None for it, its iterator and
`collate` leave it out; this is the convention of torchvision's `DatasetFolder` users and of webdataset's
`warn_and_continue` handler.)

Formats:
- IDX (Fashion-MNIST, MNIST): LeCun's format; a big-endian header of two zero bytes, a type code, the number of
  dimensions and each dimension as int32, then the data. Read here from plain or gzipped files, header checked.
- JSONL: one JSON object per line, {"image": path relative to the file, "caption": ...} or
  {"image": ..., "question": ..., "answer": ...}.
- tar shards in webdataset's layout: files of one sample share a basename up to the first dot (`0001.jpg`,
  `0001.txt` or `0001.json`), and are stored next to each other.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Transform = Callable[[dict], object] | None

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "gif")


class DataError(ValueError):
    """A data file that cannot be read at all (as opposed to one bad sample, which is skipped)."""


# ------------------------------------------------------------------------------------------- helpers


def image_tensor(image: Image.Image, mode: str = "RGB") -> torch.Tensor:
    """PIL image -> uint8 tensor (C, H, W)."""
    a = np.asarray(image.convert(mode))
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def decode_image(data: bytes | str | Path) -> torch.Tensor:
    """Decode an image file (path or bytes) fully, so that a truncated file fails here, not later."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()
        return image_tensor(im)


def collate(batch: Sequence[dict | None]) -> dict:
    """Batch a list of sample dicts: skipped samples (None) are left out, tensors of one shape are stacked, ints
    become a tensor, anything else (strings, per-sample lists, boxes of varying count, a key that only some
    samples have) stays a list."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return {}
    out = {}
    for key in dict.fromkeys(k for b in batch for k in b):  # every key, in order; a sample without it gives None
        values = [b.get(key) for b in batch]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
        elif all(isinstance(v, int) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class _Skipping:
    """Counts and announces skipped samples."""

    skipped = 0

    def _skip(self, what: str, why: object) -> None:
        self.skipped += 1
        warnings.warn(f"{type(self).__name__}: skipped {what}: {why} ({self.skipped} skipped so far)", stacklevel=3)


class _MapDataset(_Skipping, torch.utils.data.Dataset):
    """A map-style dataset that may return None for a bad sample; iterating it leaves those out."""

    transform: Transform = None

    def _finish(self, item: dict):
        return self.transform(item) if self.transform else item

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            item = self[i]
            if item is not None:
                yield item


# ----------------------------------------------------------------------------------------------- IDX

IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or .gz) into an array, checking the header against the file's length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file is called
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it ({e}); the download or copy is probably incomplete") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (its first bytes are {raw[:4].hex() or 'missing'}; an IDX file "
                        "starts with two zero bytes, a type code and the number of dimensions)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x} (known: "
                        f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the IDX header announces {ndim} dimensions but the file ends within the header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    want = int(np.prod(dims)) * dtype.itemsize
    have = len(raw) - 4 - 4 * ndim
    if have != want:
        raise DataError(f"{path}: the IDX header announces shape {dims} of {dtype.name} ({want} bytes of data) but "
                        f"the file holds {have}; it is {'truncated' if have < want else 'longer than announced'}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


class FashionMNIST(_MapDataset):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 28x28 grayscale clothes in 10 classes, 60k train / 10k test.

    The files are looked for in `root`, else in $POLYMODAL_FASHION_MNIST, else where Debian's
    `dataset-fashion-mnist` package puts them (/usr/share/datasets/fashion-mnist). Items: {"image": uint8
    (1, 28, 28), "label": int64 tensor, "text": class name}. `images` (N, 28, 28) and `labels` (N,) hold all of it.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path | None = None, split: str = "train", transform: Transform = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        given = "the given folder" if root else "$POLYMODAL_FASHION_MNIST" if os.environ.get(
            "POLYMODAL_FASHION_MNIST") else "the default folder"
        root = Path(root or os.environ.get("POLYMODAL_FASHION_MNIST") or FASHION_MNIST_DIR)
        prefix = "train" if split == "train" else "t10k"
        names = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
        paths = {kind: _find(root, name) for kind, name in names.items()}
        missing = [f"{names[kind]}[.gz]" for kind, p in paths.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files not found in {root} ({given}; missing {', '.join(missing)}). Install "
                "Debian's dataset-fashion-mnist package (it puts them in /usr/share/datasets/fashion-mnist), or "
                "name a folder with the IDX files: `--set data_root=DIR` for the training recipes, "
                "FashionMNIST(root=DIR) in Python, or $POLYMODAL_FASHION_MNIST for both.")
        images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{paths['images']}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{paths['labels']}: expected {len(images)} labels, one per image, got shape "
                            f"{labels.shape}")
        if labels.size and labels.max() >= len(self.classes):
            raise DataError(f"{paths['labels']}: label {labels.max()} is out of range for {len(self.classes)} classes")
        self.images, self.labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        y = self.labels[i]
        return self._finish({"image": self.images[i][None], "label": y, "text": self.classes[int(y)]})


class Digits(_MapDataset):
    """scikit-learn's digits (the UCI optical digits test set): 1,797 8x8 grayscale digits, scaled to 0-255.

    Every fifth image is in "test" (359), the rest in "train" (1,438): a fixed split that needs no seed.
    Items: {"image": uint8 (1, 8, 8), "label": int64 tensor, "text": the digit}.
    """

    def __init__(self, split: str = "train", transform: Transform = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("Digits needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        keep = np.arange(len(d.target)) % 5 == 4 if split == "test" else np.arange(len(d.target)) % 5 != 4
        self.images = torch.from_numpy(np.round(d.images[keep] * (255 / 16)).astype(np.uint8))  # (N, 8, 8)
        self.labels = torch.from_numpy(d.target[keep].astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        y = self.labels[i]
        return self._finish({"image": self.images[i][None], "label": y, "text": str(int(y))})


class EasyVQA(_MapDataset):
    """easy-VQA (Victor Zhou, 2020; the `easy-vqa` package): 64x64 images of one shape, 38,575 train / 9,673 test
    questions about its color and shape, 13 possible answers. Items: {"image": uint8 (3, 64, 64), "question",
    "answer", "answer_id": int64 tensor}; `answers` lists the 13 answers."""

    def __init__(self, split: str = "train", transform: Transform = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        try:
            import easy_vqa
        except ImportError as e:
            raise ImportError("EasyVQA needs the easy-vqa package: pip install easy-vqa") from e
        if split == "train":
            questions, answers, image_ids = easy_vqa.get_train_questions()
            self.paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, image_ids = easy_vqa.get_test_questions()
            self.paths = easy_vqa.get_test_image_paths()
        self.answers = list(easy_vqa.get_answers())
        self.rows = list(zip(questions, answers, image_ids))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        question, answer, image_id = self.rows[i]
        try:
            image = decode_image(self.paths[image_id])
        except (OSError, KeyError, ValueError, SyntaxError) as e:
            return self._skip(f"sample {i} (image {image_id})", e)
        return self._finish({"image": image, "question": question, "answer": answer,
                             "answer_id": torch.tensor(self.answers.index(answer))})


# --------------------------------------------------------------------------------------- user formats


class JsonlDataset(_MapDataset):
    """Image-caption or VQA pairs listed in a JSONL file, one JSON object per line:
    {"image": "images/0001.png", "caption": "..."} or {"image": ..., "question": ..., "answer": ...}; image paths
    are relative to the JSONL file. A line that is not such an object is skipped when the file is read; a missing
    or corrupt image when its sample is read. Items: {"image": uint8 (3, H, W), "caption"} or
    {"image", "question", "answer"}."""

    def __init__(self, path: str | Path, transform: Transform = None):
        self.path, self.transform = Path(path), transform
        self.rows: list[dict] = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self._skip(f"{self.path.name} line {n}", f"not JSON ({e})")
                    continue
                if not isinstance(row, dict) or "image" not in row or not (
                        "caption" in row or ("question" in row and "answer" in row)):
                    self._skip(f"{self.path.name} line {n}", 'expected an object with "image" and "caption", or '
                               '"image", "question" and "answer"')
                    continue
                self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            image = decode_image(self.path.parent / row["image"])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return self._skip(f"{self.path.name} sample {i} ({row['image']})", e)
        keys = ("caption",) if "caption" in row else ("question", "answer")
        return self._finish({"image": image, **{k: str(row[k]) for k in keys}})


class TarShards(_Skipping, torch.utils.data.IterableDataset):
    """Samples streamed from webdataset-style tar shards: members of one sample share a key (the path up to the
    first dot of the file name) and sit next to each other: `0001.jpg` + `0001.txt` (the caption) or `0001.json`
    ({"caption": ...} or {"question": ..., "answer": ...}; other keys are kept) or `0001.cls` (an integer label).

    `shards`: a tar path, a folder (its *.tar files), a glob pattern or a list of paths. With DataLoader workers,
    each worker reads its own shards. A sample with no image, or an undecodable member, is skipped; a truncated
    shard is read up to the damage. Items: {"image": uint8 (3, H, W), "key", and the text fields}."""

    def __init__(self, shards: str | Path | Sequence[str | Path], transform: Transform = None):
        if isinstance(shards, (str, Path)):
            p = Path(shards)
            shards = sorted(p.glob("*.tar")) if p.is_dir() else sorted(glob.glob(str(shards))) or [p]
        self.shards, self.transform = [Path(s) for s in shards], transform
        if not self.shards:
            raise FileNotFoundError("TarShards: no shards given (a folder without *.tar files, or an empty glob)")

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        shards = self.shards[info.id::info.num_workers] if info else self.shards
        for shard in shards:
            for key, files in self._groups(shard):
                item = self._decode(shard, key, files)
                if item is not None:
                    yield self.transform(item) if self.transform else item

    def _groups(self, shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        key, files = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:  # a stream: shards are read front to back, never seeked
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    k = f"{folder}/{stem}" if folder else stem
                    if k != key and files:
                        yield key, files
                        files = {}
                    key, files[ext.lower()] = k, tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            self._skip(f"the rest of shard {shard.name}", e)
            return
        if files:
            yield key, files

    def _decode(self, shard: Path, key: str, files: dict[str, bytes]):
        what = f"sample {key!r} of {shard.name}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            return self._skip(what, f"no image among its files ({', '.join(files)})")
        try:
            item = {"image": decode_image(files[ext]), "key": key}
            if "json" in files:
                meta = json.loads(files["json"])
                if not isinstance(meta, dict):
                    raise ValueError("its .json is not an object")
                item.update(meta)
            if "txt" in files:
                item["caption"] = files["txt"].decode("utf-8").strip()
            if "cls" in files:
                item["label"] = torch.tensor(int(files["cls"].decode().strip()))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return self._skip(what, e)
        return item
