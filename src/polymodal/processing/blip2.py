"""BLIP-2's processor on the shared chat-processor base (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models").

    text "Question: what is it? Answer:" + one image
      -> ids                      [bos, Question, :, ...]            the tokenizer's own framing (OPT: BOS first;
                                                                     Flan-T5: EOS last)
      -> rows padded, then        [<image> x Q, pad.., bos, ...]     the Q = num_query_tokens slots the Q-Former's
         the image tokens first                                      projected queries fill, before the padding
      + pixel values              (B, 3, 224, 224) BLIP's resize and CLIP's mean/std

As transformers 5.x's `Blip2Processor` lays its rows out: the image tokens lead every row, ahead of the text's own
padding, so every prompt reads exactly one image and a prompt never writes the image token itself. A conversation
goes through the checkpoint's chat template, or, since the hub's BLIP-2 files carry none, through BLIP-2's own
prompt format (`QA_TEMPLATE`: the paper's "Question: {} Answer:" for OPT and Flan-T5, earlier turns joined before
it, as LAVIS writes a visual conversation's context).

Checked against transformers' `Blip2Processor` (tests/test_blip2_pipeline.py): ids, mask and pixel values on
scikit-image photos, single prompts, padded batches and conversations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.processing.image import ImageProcessor
from polymodal.processing.text import TextTokenizer
from polymodal.processing.vlm import (
    DEFAULT_MAX_PIXELS,
    ChatProcessor,
    Media,
    _is_int,
    _read,
    _token_text,
    check_token_id,
    open_media_image,
)
from polymodal.weights.checkpoint import CheckpointError

# BLIP-2's VQA prompt (sec. 4.2: "Question: {} Answer:"); earlier turns precede it, each answer after its question,
# as LAVIS joins a conversation's context ("Question: {} Answer: {}"). Image parts write nothing: the processor puts
# the image tokens first.
QA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"  # (as transformers passes it)
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}Question: {{ text }} Answer:"
    "{%- else -%}{{ text }}{%- endif -%}"
    "{%- endfor -%}"
)


class Blip2Processor(ChatProcessor):
    """Prompts (chat messages, or `text=` with `images=`) and one image per prompt -> `{"input_ids",
    "attention_mask", "pixel_values"}` for BLIP-2, each row `num_query_tokens` image tokens and then the padded text.

    padding_side: where the text's padding goes, after the image tokens: "left" for OPT, whose generation continues
    each row's last position; "right" for Flan-T5 (from_pretrained chooses), whose relative positions would put the
    image tokens farther from a left-padded text (transformers pads as the tokenizer says: T5's pads right).
    context_length: the language model's positions (OPT's; None for Flan-T5, whose positions are relative)."""

    images_per_prompt = 1  # every prompt reads exactly one image (the pipelines deal images out by it)

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor, *, num_query_tokens: int,
                 image_token: str = "<image>", context_length: int | None = None, padding_side: str = "left",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if not _is_int(num_query_tokens) or num_query_tokens < 1:
            raise ValueError(f"num_query_tokens={num_query_tokens!r}: the Q-Former gives at least one query")
        if image_processor.output_size is None:
            raise ValueError("BLIP-2's image processor must give every image the encoder's one size")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        super().__init__(tokenizer, {"image": image_token}, context_length=context_length, max_pixels=max_pixels)
        self.image_processor = image_processor
        self.image_token, self.image_token_id = self.media_tokens["image"]
        self.image_tokens = self.num_query_tokens = num_query_tokens
        self.padding_side = padding_side

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                        context_length: int | None = None) -> Blip2Processor:
        """From what transformers' `Blip2Processor.save_pretrained` writes beside the model: processor_config.json
        (`num_query_tokens`, the nested image processor) or preprocessor_config.json, the tokenizer files (its
        `image_token`, else "<image>"); config.json gives what the files leave out (num_query_tokens), the image
        token id the model expects, the language model (the padding side) and OPT's context length."""
        d = Path(directory)
        config, model = _read(d / "processor_config.json"), _read(d / "config.json")
        text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
        queries = config.get("num_query_tokens", model.get("num_query_tokens"))
        if not _is_int(queries) or queries < 1:
            raise CheckpointError(d / "processor_config.json", f"num_query_tokens {queries!r}: the number of image "
                                  "tokens each prompt starts with (the Q-Former's queries, 32 in BLIP-2) is needed")
        if model and model.get("image_token_index", model.get("image_token_id")) is None:
            raise CheckpointError(d / "config.json", "no image_token_index: this model prepends its queries to the "
                                  "prompt itself (a transformers 4.x file); add the image token to the tokenizer and "
                                  "image_token_index to config.json, as the hub's BLIP-2 files now have them")
        has_images = any(os.path.lexists(d / f) for f in ("preprocessor_config.json", "processor_config.json"))
        vision = model.get("vision_config") if isinstance(model.get("vision_config"), dict) else {}
        images = (ImageProcessor.from_pretrained(d) if has_images
                  else ImageProcessor.blip(size=vision.get("image_size", 224)))
        tokenizer = TextTokenizer.from_pretrained(d)
        token = _token_text(_read(d / "tokenizer_config.json").get("image_token")) or "<image>"
        check_token_id(tokenizer, token, model.get("image_token_index", model.get("image_token_id")), d,
                       "image_token_index")
        t5 = text.get("model_type") == "t5"
        context = context_length
        if context is None and not t5:
            context = text.get("max_position_embeddings")
        # OPT continues each row's last position: left. Flan-T5's encoder reads the image tokens at a relative
        # distance from the text, which padding between them would change: right, as T5's tokenizer pads
        return cls(tokenizer, images, num_query_tokens=queries, image_token=token,
                   context_length=context if _is_int(context) else None, padding_side="right" if t5 else "left",
                   max_pixels=max_pixels)

    def __repr__(self) -> str:
        return (f"Blip2Processor(num_query_tokens={self.num_query_tokens}, image_token={self.image_token!r}, "
                f"context_length={self.context_length}, padding_side={self.padding_side!r})")

    def __call__(self, conversations=None, *, chat_template: str | None = None, **options: Any) -> dict[str, Tensor]:
        """As `ChatProcessor.__call__`; a conversation without a template of its own (none in the checkpoint, none
        given) reads as BLIP-2's question-answer prompt (`QA_TEMPLATE`)."""
        if chat_template is None and self.tokenizer.chat_template is None:
            chat_template = QA_TEMPLATE
        return super().__call__(conversations, chat_template=chat_template, **options)

    # ---------------------------------------------------------------------------------------- family hooks

    def _measure(self, media: Media) -> None:
        media.tokens = self.num_query_tokens

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        """Open every image (its header's pixel count checked before decoding), then preprocess the batch."""
        return {"pixel_values": self.image_processor([open_media_image(m, self.max_pixels) for m in media])}

    def _text_media(self, rows: list[list[int]], given: Any, kind: str) -> list[list[Media]]:
        """One image per written-out prompt, as transformers' processor pairs them: a flat list (or one image for
        one prompt), or one list per prompt."""
        items = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        if items and all(isinstance(x, (list, tuple)) for x in items):
            if len(items) != len(rows):
                raise ValueError(f"images=: {len(items)} lists of images for {len(rows)} texts; give one per text")
            return [[Media(kind, f"images[{k}][{i}]", x) for i, x in enumerate(group)]
                    for k, group in enumerate(items)]
        if len(items) != len(rows):
            raise ValueError(f"{len(items)} image(s) given for {len(rows)} text(s): BLIP-2 reads one image per prompt")
        return [[Media(kind, f"images[{k}]", x)] for k, x in enumerate(items)]

    def _check(self, rows: list[list[int]], found: list[list[Media]], kind: str) -> None:
        """One image per prompt, no image token written in its text, and the prompt with its Q image tokens inside
        the context, for every row, before any image is decoded."""
        for k, (ids, parts) in enumerate(zip(rows, found)):
            name = f"{kind} {k}" if len(rows) > 1 else f"the {kind}"
            if len(parts) != 1:
                raise ValueError(f"{name} has {len(parts)} images; BLIP-2 reads exactly one image per prompt (its "
                                 f"{self.num_query_tokens} queries lead the prompt)")
            if self.image_token_id in ids:
                raise ValueError(f"{name} writes the image token {self.image_token!r} itself; BLIP-2's processor "
                                 f"puts the {self.num_query_tokens} image tokens first: leave it out of the text")
            self._measure(parts[0])
            length = len(ids) + self.num_query_tokens
            if self.context_length is not None and length > self.context_length:
                raise ValueError(f"{name} is {length:,} tokens with its {self.num_query_tokens} image tokens, over "
                                 f"the model's context of {self.context_length:,}; use a shorter prompt")

    def _batch(self, rows: list[list[int]], found: list[list[Media]]) -> tuple[Tensor, Tensor]:
        """The texts padded, then the Q image tokens put before every row (attended): transformers' layout."""
        ids, mask = self.tokenizer.pad(rows, padding_side=self.padding_side)  # (B, T)
        lead = torch.full((ids.shape[0], self.num_query_tokens), self.image_token_id, dtype=ids.dtype)  # (B, Q)
        return torch.cat([lead, ids], dim=1), torch.cat([torch.ones_like(lead), mask], dim=1)
