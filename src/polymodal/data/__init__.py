"""Data: ShapesWorld, a generated image-text world that needs no download, and readers for real datasets."""

from polymodal.data.datasets import (
    DataError,
    Digits,
    EasyVQA,
    FashionMNIST,
    JsonlDataset,
    TarShards,
    collate,
    decode_image,
    read_idx,
)
from polymodal.data.shapes import (
    ALL_COLORS,
    ALL_SHAPES,
    COLORS,
    SHAPES,
    Object,
    Sample,
    ShapesWorld,
    Vocabulary,
)

__all__ = ["ALL_COLORS", "ALL_SHAPES", "COLORS", "SHAPES", "DataError", "Digits", "EasyVQA", "FashionMNIST",
           "JsonlDataset", "Object", "Sample", "ShapesWorld", "TarShards", "Vocabulary", "collate", "decode_image",
           "read_idx"]
