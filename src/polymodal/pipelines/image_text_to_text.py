"""Chat about images: `pm.pipeline("image-text-to-text", model=...)` on a vision-language model (LLaVA, Qwen2-VL,
BLIP-2), with transformers' task name, inputs and output shape.

    pipe = pm.pipeline("image-text-to-text", model="path/to/llava-1.5-7b-hf")
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                             {"type": "text", "text": "What is this?"}]}]
    pipe(messages, max_new_tokens=30)  # [{"generated_text": [*messages, {"role": "assistant", ...}], "finish_reason"}]
    pipe([messages_a, messages_b])     # one left-padded batch, an output list per conversation
    pipe(text="USER: <image>\\nWhat is this? ASSISTANT:", images="cat.jpg")  # a prompt written out, no template
    for piece in pipe.stream(messages):
        print(piece, end="", flush=True)

The model's family owns the processor (`Family.processor`; LLaVA's is `polymodal.processing.vlm.LlavaProcessor`):
it turns the messages into the model's inputs, which go to `generate` unchanged. Everything after that is the
text-generation pipeline's: generation defaults, stop strings, finish_reason, the streaming worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polymodal.pipelines.base import family_processor, to_model
from polymodal.pipelines.text import Messages, TextGenerationPipeline, _is_chat, with_system


@dataclass(frozen=True)
class _Prompt:
    """A prompt written out (one image token per image, no chat template) and its images in reading order."""

    text: str
    images: tuple


class ImageTextToTextPipeline(TextGenerationPipeline):
    """Chat messages whose content parts may be images -> the conversation with the model's answer appended.

    Calls and options as `TextGenerationPipeline` (max_new_tokens, sampling settings left to the model's generation
    defaults, stop, system, return_full_text, ...); inputs are conversations, or `text=` prompts with `images=`."""

    task = "image-text-to-text"
    model_kind = "a vision-language model"
    takes_images = True

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        expected = getattr(self.model.config, "image_tokens", None)
        given = getattr(self.processor, "image_tokens", expected)
        if expected is not None and given != expected:
            raise ValueError(f"the processor expands each image to {given} tokens, but this model gives {expected} "
                             "features per image; check patch_size, vision_feature_select_strategy and "
                             "num_additional_image_tokens in processor_config.json")

    def default_processor(self):
        """The processor the model's family owns, read from the checkpoint directory."""
        processor = family_processor(self.model)
        if processor is None:
            raise ValueError(f"{self.source or 'this model'} is a {self.family} model, not a vision-language model: "
                             "image-text-to-text needs one whose family takes images in a chat (LLaVA)")
        return processor

    # ------------------------------------------------------------------ inputs
    def _request(self, inputs, text, images):
        """The call's inputs as a conversation, a list of them, a written-out prompt or a list of those. As in
        transformers, `text=` may hold the messages, and a prompt's images may come positionally."""
        if text is None:
            if images is not None:
                raise ValueError("images= go with text= (a prompt written out, one image token per image); in chat "
                                 "messages, images are parts of the messages")
            if inputs is None:
                raise TypeError("image-text-to-text takes chat messages, a list of conversations, or text= with "
                                "images=")
            return inputs
        if _is_chat(text) or (isinstance(text, list) and text and all(_is_chat(c) for c in text)):
            if images is not None or inputs is not None:
                raise ValueError("with chat messages, images go inside them as image parts "
                                 "({'type': 'image', 'image': ...})")
            return text
        if inputs is not None:
            if images is not None:
                raise TypeError("images given twice: positionally and as images=")
            images = inputs
        if isinstance(text, str):
            return _Prompt(text, tuple(_listed(images)))
        texts = list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text= takes chat messages, a prompt string, or a list of prompt strings")
        listed = _listed(images)
        if listed and all(isinstance(x, (list, tuple)) for x in listed):  # one list of images per prompt
            if len(listed) != len(texts):
                raise ValueError(f"images=: {len(listed)} lists of images for {len(texts)} prompts; give one per "
                                 "prompt")
            return [_Prompt(t, tuple(group)) for t, group in zip(texts, listed)]
        prompts, start = [], 0  # a flat list, dealt out in reading order
        fixed = getattr(self.processor, "images_per_prompt", None)  # BLIP-2: one each, its tokens not in the text
        for t in texts:
            n = fixed if fixed is not None else t.count(self.processor.image_token)
            prompts.append(_Prompt(t, tuple(listed[start : start + n])))
            start += n
        if start != len(listed):
            if fixed is not None:
                raise ValueError(f"{len(listed)} image(s) given for {len(texts)} prompt(s); this model reads {fixed} "
                                 "image(s) per prompt")
            raise ValueError(f"{len(listed)} image(s) given for {start} {self.processor.image_token} in the prompts; "
                             "write one in the text for each image")
        return prompts

    def _is_one(self, x) -> bool:
        return _is_chat(x) or isinstance(x, _Prompt)

    def _model_inputs(self, items: list, system: str | None) -> dict[str, torch.Tensor]:
        if all(isinstance(x, _Prompt) for x in items):
            inputs = self.processor(text=[p.text for p in items], images=[list(p.images) for p in items])
        elif all(_is_chat(x) for x in items):
            inputs = self.processor([with_system(c, system) for c in items])
        else:
            raise ValueError("image-text-to-text takes chat messages (a list of {'role', 'content'} dicts) or a list "
                             "of such conversations; for a prompt written out, pass text= and images=")
        return to_model(inputs, self.device, self.dtype)

    def _generated_text(self, item, answer: str, return_full_text: bool):
        if isinstance(item, _Prompt):
            return item.text + answer if return_full_text else answer
        return super()._generated_text(item, answer, return_full_text)

    # ------------------------------------------------------------------ calls
    def __call__(self, inputs: Messages | list[Messages] | Any = None, text=None, *, images=None, **options):
        """inputs: one conversation (chat messages whose content parts may be images: `{"type": "image", "image":
        <PIL image, path or bytes>}`, `{"type": "image_url", "image_url": {"url": "data:..."}}`, ...), or a list
        of conversations (generated as one batch); or `text=` a prompt written out with one image token per image
        (or a list of them) and `images=` in reading order. Options as `TextGenerationPipeline.__call__`.
        -> [{"generated_text": conversation + [{"role": "assistant", "content": answer}], "finish_reason"}] per
        conversation (the prompt + answer for a written-out prompt)."""
        return super().__call__(self._request(inputs, text, images), **options)

    def stream(self, inputs: Messages | Any = None, text=None, *, images=None, **options):
        """Yield the answer to one conversation (or one written-out prompt) piece by piece; returns a ChatResult
        when exhausted, as `TextGenerationPipeline.stream`."""
        item = self._request(inputs, text, images)
        if not self._is_one(item):
            raise ValueError("stream() takes one conversation (or one text= prompt)")
        return super().stream(item, **options)


def _listed(images) -> list:
    return [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
