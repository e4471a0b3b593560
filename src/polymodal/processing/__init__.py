"""Turning raw inputs into model inputs: safe image opening, image preprocessing, CLIP tokenization, text tokenizers,
chat templates, video reading, and vision-language chat (LLaVA's, Qwen2-VL's and BLIP-2's processors)."""

from polymodal.processing.blip2 import Blip2Processor
from polymodal.processing.chat import ChatTemplateError, render_chat_template
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor
from polymodal.processing.text import StreamDecoder, TextTokenizer
from polymodal.processing.tokenizer import CLIPTokenizer
from polymodal.processing.video import VideoError, read_video
from polymodal.processing.vlm import ChatProcessor, LlavaProcessor

__all__ = ["Blip2Processor", "CLIPTokenizer", "ChatProcessor", "ChatTemplateError", "ImageError", "ImageProcessor",
           "LlavaProcessor", "Qwen2VLImageProcessor", "Qwen2VLProcessor", "StreamDecoder", "TextTokenizer",
           "VideoError", "open_image", "read_video", "render_chat_template"]
