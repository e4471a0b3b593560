"""Turning raw inputs into model inputs: safe image opening, image preprocessing, CLIP tokenization, text tokenizers,
chat templates, and vision-language chat (LLaVA's processor)."""

from polymodal.processing.chat import ChatTemplateError, render_chat_template
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.text import StreamDecoder, TextTokenizer
from polymodal.processing.tokenizer import CLIPTokenizer
from polymodal.processing.vlm import LlavaProcessor

__all__ = ["CLIPTokenizer", "ChatTemplateError", "ImageError", "ImageProcessor", "LlavaProcessor", "StreamDecoder",
           "TextTokenizer", "open_image", "render_chat_template"]
