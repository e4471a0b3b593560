"""Turning raw inputs into model inputs: safe image opening, image preprocessing, CLIP tokenization, text tokenizers
and chat templates."""

from polymodal.processing.chat import ChatTemplateError, render_chat_template
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.text import StreamDecoder, TextTokenizer
from polymodal.processing.tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "ChatTemplateError", "ImageError", "ImageProcessor", "StreamDecoder", "TextTokenizer",
           "open_image", "render_chat_template"]
