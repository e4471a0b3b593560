"""Turning raw inputs into model inputs: safe image opening, image preprocessing, CLIP tokenization, text tokenizers,
chat templates, video reading, and vision-language chat (LLaVA's, LLaVA-NeXT's, Qwen2-VL's, BLIP-2's and Llama 3.2
Vision's processors)."""

from polymodal.processing.blip2 import Blip2Processor
from polymodal.processing.chat import ChatTemplateError, render_chat_template
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.llava_next import LlavaNextProcessor
from polymodal.processing.mllama import MllamaImageProcessor, MllamaProcessor
from polymodal.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor
from polymodal.processing.text import StreamDecoder, TextTokenizer
from polymodal.processing.tokenizer import CLIPTokenizer
from polymodal.processing.video import VideoError, read_video
from polymodal.processing.vlm import ChatProcessor, LlavaProcessor

__all__ = ["Blip2Processor", "CLIPTokenizer", "ChatProcessor", "ChatTemplateError", "ImageError", "ImageProcessor",
           "LlavaNextProcessor", "LlavaProcessor", "MllamaImageProcessor", "MllamaProcessor", "Qwen2VLImageProcessor",
           "Qwen2VLProcessor", "StreamDecoder", "TextTokenizer", "VideoError", "open_image", "read_video",
           "render_chat_template"]
