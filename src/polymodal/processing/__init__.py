"""Turning raw inputs into model inputs: safe image opening, image preprocessing, CLIP tokenization."""

from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "ImageError", "ImageProcessor", "open_image"]
