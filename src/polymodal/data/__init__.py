"""Data: ShapesWorld, a generated image-text world that needs no download (and MovingShapes, its short videos), and
readers for real datasets."""

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
from polymodal.data.moving_shapes import Clip, MovingShapes, Track
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

__all__ = ["ALL_COLORS", "ALL_SHAPES", "COLORS", "SHAPES", "Clip", "DataError", "Digits", "EasyVQA", "FashionMNIST",
           "JsonlDataset", "MovingShapes", "Object", "Sample", "ShapesWorld", "TarShards", "Track", "Vocabulary",
           "collate", "decode_image", "read_idx"]
