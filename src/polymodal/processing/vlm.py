"""Chat messages with images -> a vision-language model's inputs: LLaVA's processor (Liu et al. 2023, "Visual
Instruction Tuning"; LLaVA-1.5, "Improved Baselines with Visual Instruction Tuning").

    [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "What is it?"}]}]
      -> the chat template       "USER: <image>\\nWhat is it? ASSISTANT:"
      -> ids                     [bos, USER, :, <image>, ...]
      -> each <image> expanded   [bos, USER, :, <image> x 576, ...]    the slots the model fills with features
      + pixel values             (N, 3, 336, 336), the images in reading order

`processor(messages)` returns `{"input_ids", "attention_mask", "pixel_values"}` (no "pixel_values" without an
image), a left-padded batch for a list of conversations, which `model.generate(**inputs, max_new_tokens=...)`
takes as it is. Checked against transformers' `LlavaProcessor` (tests/test_llava_processor.py): the same ids and
mask, pixel values within 1e-5.

Image parts are taken as transformers' chat templates take them: `{"type": "image", "image": <PIL image, path or
bytes>}`, `{"type": "image", "path": ...}`, `{"type": "image", "url": "data:..."}`, `{"type": "image", "base64":
...}`, and OpenAI's `{"type": "image_url", "image_url": {"url": "data:..."}}`. Remote URLs are never fetched here
(the server's media layer fetches allow-listed ones). The template sees each image part as `{"type": "image"}`,
and a message whose content is a string as one text part: VLM templates iterate over parts, and LLaVA's drops a
string content without a word.

Every check runs before anything large is allocated: the structure of the messages, one image token per image,
the prompt's length once images are expanded against the decoder's context, and each image's pixel count from
its header (`open_image`), before it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from polymodal.processing.data_url import decode_base64, decode_data_url
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.text import TextTokenizer
from polymodal.weights.checkpoint import CheckpointError, read_json

Conversation = list[dict[str, Any]]

DEFAULT_MAX_PIXELS = 64_000_000  # open_image's default: a 8000 x 8000 photo passes, a decompression bomb does not
IMAGE_KEYS = ("image", "url", "path", "base64")  # where an image part holds its image (transformers' keys)


class LlavaProcessor:
    """Chat messages with image parts -> `{"input_ids", "attention_mask", "pixel_values"}` for LLaVA.

    image_tokens: the features one image becomes, what each `image_token` in the prompt expands to (576 for
    LLaVA-1.5's 336-px ViT-L/14). context_length: the decoder's positions; a longer prompt is refused.
    max_pixels: the largest image accepted, read from its header before it is decoded.
    """

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor, *, image_tokens: int,
                 image_token: str = "<image>", context_length: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        token_id = tokenizer.token_to_id(image_token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {image_token!r} token; LLaVA's processor marks where each image "
                             "goes with it (add it to the tokenizer as a special token)")
        if image_processor.output_size is None:
            raise ValueError("LLaVA's image processor must give every image the same size (a crop_size, or a "
                             "squashed size): each image becomes a fixed number of features")
        if image_tokens < 1:
            raise ValueError(f"image_tokens={image_tokens}: an image becomes at least one feature")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token, self.image_token_id = image_token, token_id
        self.image_tokens = image_tokens
        self.context_length = context_length
        self.max_pixels = max_pixels

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, pad_to_square: bool | None = None,
                        max_pixels: int = DEFAULT_MAX_PIXELS, context_length: int | None = None) -> LlavaProcessor:
        """From what transformers' `LlavaProcessor.save_pretrained` writes beside the model: processor_config.json
        (`patch_size`, `vision_feature_select_strategy`, `num_additional_image_tokens`, `image_token`; transformers
        5 nests the image processor there), else preprocessor_config.json for the image processor; the tokenizer
        files; the chat template (chat_template.jinja, chat_template.json or tokenizer_config.json). config.json,
        when present, gives the context length and the image token id the model expects.

        pad_to_square: None keeps the checkpoint's choice (`do_pad`, off in the llava-hf files, which is what
        transformers does); True pads each image to a square with the mean color first, as the original LLaVA-1.5
        was trained (the crop then keeps the whole image)."""
        d = Path(directory)
        config = _read(d / "processor_config.json")
        model = _read(d / "config.json")
        vision = model.get("vision_config") if isinstance(model.get("vision_config"), dict) else {}
        text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
        images = ImageProcessor.from_pretrained(d)
        if pad_to_square is not None:
            images = images.replace(pad_to_square=pad_to_square)
        tokenizer = TextTokenizer.from_pretrained(d)
        where = d / "processor_config.json"
        patch = config.get("patch_size", vision.get("patch_size"))
        strategy = config.get("vision_feature_select_strategy", model.get("vision_feature_select_strategy", "default"))
        extra = config.get("num_additional_image_tokens", 0)
        if not _is_int(patch) or patch < 1:
            raise CheckpointError(where, f"patch_size {patch!r}: the vision tower's patch size (e.g. 14) is needed "
                                  "to count each image's features")
        if strategy not in ("default", "full"):
            raise CheckpointError(where, f"vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
        if not _is_int(extra) or extra < 0:
            raise CheckpointError(where, f"num_additional_image_tokens {extra!r}: expected an integer >= 0")
        size = images.output_size
        if size is None:
            raise CheckpointError(d, "the image processor gives images of varying size (no crop_size); LLaVA needs "
                                  "one size for all")
        count = (size[0] // patch) * (size[1] // patch) + extra - (strategy == "default")
        token = _token_text(_read(d / "tokenizer_config.json").get("image_token")) or config.get("image_token")
        token = token if isinstance(token, str) else "<image>"
        expected = model.get("image_token_index", model.get("image_token_id"))
        token_id = tokenizer.token_to_id(token)
        if _is_int(expected) and token_id not in (None, expected):
            raise CheckpointError(d, f"the tokenizer's {token!r} is id {token_id}, but config.json's image_token_index "
                                  f"is {expected}: the model would not find the images")
        context = context_length if context_length is not None else text.get("max_position_embeddings")
        return cls(tokenizer, images, image_tokens=count, image_token=token,
                   context_length=context if _is_int(context) else None, max_pixels=max_pixels)

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, conversations: Conversation | Sequence[Conversation] | None = None, *,
                 text: str | Sequence[str] | None = None, images: Any = None, add_generation_prompt: bool = True,
                 chat_template: str | None = None, **template_variables: Any) -> dict[str, Tensor]:
        """One conversation or a list of them -> the model's inputs, rows left-padded, pixel values of all images
        concatenated in reading order. Or `text=` prompts written out (one `image_token` per image, no chat
        template) with `images=` in reading order (a flat list, or one list per text).

        The chat template's prompt is tokenized with the tokenizer's special tokens (LLaVA's Llama tokenizer puts
        `<s>` first) unless it already starts with the bos token, as transformers' processors do."""
        if (conversations is None) == (text is None):
            raise TypeError("pass chat messages (one conversation or a list of them), or text= prompts with images=")
        if conversations is not None:
            if images is not None:
                raise ValueError("with chat messages, images go inside them as image parts "
                                 "({'type': 'image', 'image': ...}), not in images=")
            batch = _conversations(conversations)
            rows, found = [], []
            for k, conversation in enumerate(batch):
                name = f"conversation {k}: " if len(batch) > 1 else ""
                messages, parts = _split_images(conversation, name)
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                            chat_template=chat_template, **template_variables)
                bos = self.tokenizer.bos_token
                rows.append(self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))))
                found.append(parts)
            kind = "conversation"
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("text= takes a prompt string or a non-empty list of them")
            rows = [self.tokenizer.encode(t) for t in texts]
            found = self._text_images(rows, images)
            kind = "text"
        self._check(rows, found, kind)
        sources = [part for parts in found for part in parts]
        out: dict[str, Tensor] = {}
        pixels = self._pixels(sources) if sources else None
        out["input_ids"], out["attention_mask"] = self.tokenizer.pad([self._expand(r) for r in rows])
        if pixels is not None:
            out["pixel_values"] = pixels
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"LlavaProcessor(image_tokens={self.image_tokens}, image_token={self.image_token!r}, "
                f"context_length={self.context_length}, pad_to_square={self.image_processor.pad_to_square})")

    # ---------------------------------------------------------------------------------------- steps

    def _text_images(self, rows: list[list[int]], images: Any) -> list[list[tuple[str, Any]]]:
        """The images of each written-out prompt: one list per text, or a flat list dealt out in reading order,
        as many to each text as it has image tokens."""
        items = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if items and all(isinstance(x, (list, tuple)) for x in items):
            if len(items) != len(rows):
                raise ValueError(f"images=: {len(items)} lists of images for {len(rows)} texts; give one per text")
            return [[(f"images[{k}][{i}]", im) for i, im in enumerate(group)] for k, group in enumerate(items)]
        total = sum(r.count(self.image_token_id) for r in rows)
        if total != len(items):
            raise ValueError(f"{len(items)} image(s) given for {total} {self.image_token} token(s) in the text; write "
                             f"one {self.image_token} in the text for each image")
        out, start = [], 0
        for r in rows:
            n = r.count(self.image_token_id)
            out.append([(f"images[{start + i}]", im) for i, im in enumerate(items[start : start + n])])
            start += n
        return out

    def _check(self, rows: list[list[int]], found: list[list], kind: str) -> None:
        """One image token per image, and the expanded prompt inside the context, for every row."""
        for k, (ids, parts) in enumerate(zip(rows, found)):
            name = f"{kind} {k}" if len(rows) > 1 else f"the {kind}"
            slots = ids.count(self.image_token_id)
            if slots != len(parts):
                hint = ("the chat template writes one per image part, and one typed in the text counts too"
                        if kind == "conversation" else f"write one {self.image_token} in the text for each image")
                raise ValueError(f"{name} has {len(parts)} image(s) but its prompt has {slots} {self.image_token} "
                                 f"token(s) (id {self.image_token_id}); each image needs exactly one ({hint})")
            length = len(ids) + slots * (self.image_tokens - 1)
            if self.context_length is not None and length > self.context_length:
                raise ValueError(f"{name} is {length:,} tokens once its {slots} image(s) are expanded to "
                                 f"{self.image_tokens} tokens each, over the model's context of "
                                 f"{self.context_length:,}; use fewer images or a shorter conversation")

    def _pixels(self, sources: list[tuple[str, Any]]) -> Tensor:
        """Open every image (its header's pixel count checked before decoding), then preprocess the batch."""
        opened = []
        for where, src in sources:
            try:
                opened.append(open_image(src, max_pixels=self.max_pixels))
            except ImageError as e:
                raise type(e)(f"{where}: {e}") from None
        return self.image_processor(opened)

    def _expand(self, ids: list[int]) -> list[int]:
        """Each image token repeated `image_tokens` times: the slots the model fills with that image's features."""
        out: list[int] = []
        for t in ids:
            if t == self.image_token_id:
                out += [t] * self.image_tokens
            else:
                out.append(t)
        return out


# ---------------------------------------------------------------------------------------------- messages


def _conversations(value: Any) -> list[Conversation]:
    """One conversation (a list of message dicts) or a list of them -> a list of conversations."""
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(m, dict) for m in value):
            return [list(value)]
        if all(isinstance(c, (list, tuple)) and c for c in value):
            return [list(c) for c in value]
    raise TypeError("expected chat messages ([{'role': ..., 'content': ...}, ...]) or a non-empty list of such "
                    "conversations")


def _split_images(conversation: Conversation, name: str = "") -> tuple[Conversation, list[tuple[str, Any]]]:
    """The conversation as its chat template reads it (image parts as `{"type": "image"}`, string contents as one
    text part) and its images in reading order, each with where it came from."""
    messages, images = [], []
    for i, message in enumerate(conversation):
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{name}messages[{i}]: expected a 'role' (user, assistant, system)")
        content = message.get("content")
        if content is None or isinstance(content, str):
            parts = [{"type": "text", "text": content}] if content else []
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                where = f"{name}messages[{i}].content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"{where}: expected a dict with a 'type' ('text', 'image' or 'image_url')")
                if part["type"] in ("image", "image_url"):
                    images.append((where, _image_source(part, where)))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
        else:
            raise ValueError(f"{name}messages[{i}].content: expected a string or a list of parts, got "
                             f"{type(content).__name__}")
        messages.append({**message, "content": parts})
    return messages, images


def _image_source(part: dict, where: str) -> Any:
    """What an image part holds, as something `open_image` reads (a PIL image, a path, bytes, a file object)."""
    if part["type"] == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise ValueError(f"{where} (image_url): expected {{'image_url': {{'url': 'data:image/...;base64,...'}}}}")
        return _from_url(url, where)
    given = [k for k in IMAGE_KEYS if part.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"{where} (image): expected one of 'image' (a PIL image, path or bytes), 'path', 'url' (a "
                         f"data: URL) or 'base64'; got {', '.join(given) or 'none'}")
    key, value = given[0], part[given[0]]
    if key == "base64":
        return _b64decode(value, where)
    if key == "url" or (key == "image" and isinstance(value, str) and (value.startswith("data:") or "://" in value)):
        if not isinstance(value, str):
            raise ValueError(f"{where} (image): 'url' must be a string (a data: URL)")
        return _from_url(value, where)
    if key == "path" and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where} (image): 'path' must be a file path, got {type(value).__name__}")
    return value


def _from_url(url: str, where: str) -> bytes:
    """The bytes of a data: URL (RFC 2397); any other URL is refused, remote ones without being fetched."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        try:
            return decode_data_url(url)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    shown = url if len(url) <= 80 else url[:77] + "..."
    if scheme in ("http", "https"):
        raise ValueError(f"{where}: {shown} is a remote URL, which is never fetched here; download the image and "
                         "pass its path or bytes, or send it inline as a data: URL")
    raise ValueError(f"{where}: {shown}: only data: URLs are read here; pass a local file as "
                     "{'type': 'image', 'path': ...}")


def _b64decode(text: Any, where: str) -> bytes:
    return decode_base64(text, what=f"{where}: base64 image data")


# ---------------------------------------------------------------------------------------------- files


def _read(path: Path) -> dict:
    return read_json(path) if os.path.lexists(path) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
