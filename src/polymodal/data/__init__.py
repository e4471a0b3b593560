"""Data that needs no download: procedurally generated image-text worlds."""

from polymodal.data.shapes import COLORS, SHAPES, ShapesWorld

__all__ = ["COLORS", "SHAPES", "ShapesWorld"]
