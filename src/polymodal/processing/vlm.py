"""Chat messages with images (and videos) -> a vision-language model's inputs: the chat-processor base every VLM
family shares (`ChatProcessor`), and LLaVA's processor (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5,
"Improved Baselines with Visual Instruction Tuning").

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

`ChatProcessor` holds what every family does alike: parsing the conversations, the chat template, tokenizing, the
media parts and where they come from, one placeholder token per image or video, the context-length check, the
expansion of each placeholder, left padding and the returned dict. A family states only how many tokens one image or
video becomes (from its header, before decoding: `_measure`), how its pixels are prepared (`_prepare`), and so which
extra keys it returns; Qwen2-VL's processor (processing/qwen2_vl.py) is the second family on it.

Every check runs before anything large is allocated: the structure of the messages, one image token per image,
the prompt's length once images are expanded against the decoder's context, and each image's pixel count from
its header (`open_image`), before it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from polymodal.processing.data_url import decode_base64, decode_data_url
from polymodal.processing.image import ImageError, ImageProcessor, open_image
from polymodal.processing.text import TextTokenizer
from polymodal.weights.checkpoint import CheckpointError, read_json

Conversation = list[dict[str, Any]]

DEFAULT_MAX_PIXELS = 64_000_000  # open_image's default: a 8000 x 8000 photo passes, a decompression bomb does not
IMAGE_KEYS = ("image", "url", "path", "base64")  # where an image part holds its image (transformers' keys)
VIDEO_KEYS = ("video", "url", "path", "base64")  # and a video part its video (a file, or a list of frames)
# part types -> the kind of media they hold; OpenAI's image_url (and video_url, as vLLM takes it) included
PART_KINDS = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


@dataclass
class Media:
    """One image or video of a prompt: its kind, where it came from (`messages[i].content[j]`, `images[k]`), what the
    part held, the tokens it becomes once measured, and whatever measuring learned (an opened header, a size)."""

    kind: str
    where: str
    source: Any
    tokens: int = 0
    state: Any = None


class ChatProcessor:
    """What every vision-language chat processor does alike; a family subclasses it and states the rest.

    tokens: the placeholder token of each kind of media the family takes (`{"image": "<image>"}`); the chat template
    writes one per media part and each is expanded to the tokens that media becomes. context_length: the decoder's
    positions; a longer prompt is refused before any media is decoded. max_pixels: the largest image (or video frame)
    accepted, read from its header before it is decoded. max_visual_tokens: the most tokens the media of one prompt
    may become together (None: only the context bounds them); a prompt over it is refused before any decoding.

    Subclasses implement `_measure(media)` (set `media.tokens` from the header alone; it may keep what it opened in
    `media.state`) and `_prepare(kind, media) -> dict` (decode and preprocess every media of a kind, in reading order,
    into the model's tensors).
    """

    # string message contents reach the template as one text part (VLM templates iterate over parts); a family
    # whose template reads strings itself (Llama 3.2 Vision's trims a system message's string) keeps them
    string_contents: bool = False

    def __init__(self, tokenizer: TextTokenizer, tokens: dict[str, str], *, context_length: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_visual_tokens: int | None = None):
        if max_visual_tokens is not None and (not _is_int(max_visual_tokens) or max_visual_tokens < 1):
            raise ValueError(f"max_visual_tokens={max_visual_tokens!r}: a positive number of tokens, or None")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_pixels = max_pixels
        self.max_visual_tokens = max_visual_tokens
        self.media_tokens: dict[str, tuple[str, int]] = {}
        for kind, token in tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token!r} token; {type(self).__name__} marks where each {kind} "
                                 "goes with it (add it to the tokenizer as a special token)")
            self.media_tokens[kind] = (token, token_id)

    # ---------------------------------------------------------------------------------------- family hooks

    def _measure(self, media: Media) -> None:
        raise NotImplementedError

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, conversations: Conversation | Sequence[Conversation] | None = None, *,
                 text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None,
                 add_generation_prompt: bool = True, chat_template: str | None = None,
                 **template_variables: Any) -> dict[str, Tensor]:
        """One conversation or a list of them -> the model's inputs, rows left-padded, the pixels of all images (and
        videos) concatenated in reading order. Or `text=` prompts written out (one placeholder token per image or
        video, no chat template) with `images=` / `videos=` in reading order (a flat list, or one list per text).

        The chat template's prompt is tokenized with the tokenizer's special tokens (LLaVA's Llama tokenizer puts
        `<s>` first) unless it already starts with the bos token, as transformers' processors do."""
        if (conversations is None) == (text is None):
            raise TypeError("pass chat messages (one conversation or a list of them), or text= prompts with images=")
        if videos is not None and "video" not in self.media_tokens:
            raise ValueError(f"{type(self).__name__} takes no videos")
        if conversations is not None:
            if images is not None or videos is not None:
                raise ValueError("with chat messages, images go inside them as image parts "
                                 "({'type': 'image', 'image': ...}), not in images=")
            batch = _conversations(conversations)
            rows, found = [], []
            for k, conversation in enumerate(batch):
                name = f"conversation {k}: " if len(batch) > 1 else ""
                messages, parts = _split_media(conversation, name, tuple(self.media_tokens),
                                               keep_strings=self.string_contents)
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                            chat_template=chat_template, **template_variables)
                bos = self.tokenizer.bos_token
                special = not (bos and prompt.startswith(bos))
                rows.append(self.tokenizer.encode(self._prompt(prompt), add_special_tokens=special))
                found.append(parts)
            kind = "conversation"
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("text= takes a prompt string or a non-empty list of them")
            rows = [self.tokenizer.encode(self._prompt(t)) for t in texts]
            found = [[] for _ in rows]
            for media_kind, given in (("image", images), ("video", videos)):
                if media_kind in self.media_tokens:
                    for row, more in zip(found, self._text_media(rows, given, media_kind)):
                        row += more
            kind = "text"
        self._check(rows, found, kind)
        return self._inputs(rows, found)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------- steps

    def _prompt(self, text: str) -> str:
        """A prompt as it is tokenized: the chat template's (or a written-out one) as it is, unless the family's
        processor rewrites it (Llama 3.2 Vision's puts the bos token after leading image tokens)."""
        return text

    def _inputs(self, rows: list[list[int]], found: list[list[Media]]) -> dict[str, Tensor]:
        """The checked rows and their media -> the returned dict: each kind's tensors (`_prepare`, in reading order)
        beside the padded ids and mask (`_batch`). A family whose inputs tie the two together (Llama 3.2 Vision's
        cross-attention mask, per row and image) overrides this."""
        out: dict[str, Tensor] = {}
        for media_kind in self.media_tokens:
            of_kind = [m for parts in found for m in parts if m.kind == media_kind]
            if of_kind:
                out.update(self._prepare(media_kind, of_kind))
        ids, mask = self._batch(rows, found)
        return {"input_ids": ids, "attention_mask": mask, **out}

    def _text_media(self, rows: list[list[int]], given: Any, kind: str) -> list[list[Media]]:
        """The images (or videos) of each written-out prompt: one list per text, or a flat list dealt out in reading
        order, as many to each text as it has placeholder tokens."""
        token, token_id = self.media_tokens[kind]
        arg = f"{kind}s"
        if given is None:
            items = []
        elif kind == "video" and _is_frames(given):
            items = [given]  # one video, given as its frames
        else:
            items = list(given) if isinstance(given, (list, tuple)) else [given]
        grouped = all(isinstance(x, (list, tuple)) and not (kind == "video" and _is_frames(x)) for x in items)
        if items and grouped:
            if len(items) != len(rows):
                raise ValueError(f"{arg}=: {len(items)} lists of {arg} for {len(rows)} texts; give one per text")
            return [[Media(kind, f"{arg}[{k}][{i}]", x) for i, x in enumerate(group)] for k, group in enumerate(items)]
        total = sum(r.count(token_id) for r in rows)
        if total != len(items):
            raise ValueError(f"{len(items)} {kind}(s) given for {total} {token} token(s) in the text; write "
                             f"one {token} in the text for each {kind}")
        out, start = [], 0
        for r in rows:
            n = r.count(token_id)
            out.append([Media(kind, f"{arg}[{start + i}]", x) for i, x in enumerate(items[start:start + n])])
            start += n
        return out

    def _check(self, rows: list[list[int]], found: list[list[Media]], kind: str) -> None:
        """One placeholder token per image (video), each measured, and the expanded prompt inside the context, for
        every row, in that order: a row that cannot fit is refused before any of its media is read further."""
        for k, (ids, parts) in enumerate(zip(rows, found)):
            name = f"{kind} {k}" if len(rows) > 1 else f"the {kind}"
            for media_kind, (token, token_id) in self.media_tokens.items():
                slots = ids.count(token_id)
                n = sum(m.kind == media_kind for m in parts)
                if slots != n:
                    hint = (f"the chat template writes one per {media_kind} part, and one typed in the text counts too"
                            if kind == "conversation" else f"write one {token} in the text for each {media_kind}")
                    raise ValueError(f"{name} has {n} {media_kind}(s) but its prompt has {slots} {token} "
                                     f"token(s) (id {token_id}); each {media_kind} needs exactly one ({hint})")
            for m in parts:
                self._measure(m)
            visual = sum(m.tokens for m in parts)
            if self.max_visual_tokens is not None and visual > self.max_visual_tokens:
                raise ValueError(f"{name}'s {len(parts)} image(s)/video(s) become {visual:,} visual tokens, over the "
                                 f"limit of {self.max_visual_tokens:,} (max_visual_tokens); send fewer or smaller "
                                 "images, or shorter videos")
            length = len(ids) + sum(m.tokens - 1 for m in parts)
            if self.context_length is not None and length > self.context_length:
                counts = " and ".join(f"{sum(m.kind == c for m in parts)} {c}(s)" for c in self.media_tokens
                                      if any(m.kind == c for m in parts))
                each = {m.tokens for m in parts}
                to = f"{each.pop()} tokens each" if len(each) == 1 else f"{sum(m.tokens for m in parts):,} tokens"
                raise ValueError(f"{name} is {length:,} tokens once its {counts} are expanded to {to}, over the "
                                 f"model's context of {self.context_length:,}; use fewer or smaller images or a "
                                 "shorter conversation")

    def _batch(self, rows: list[list[int]], found: list[list[Media]]) -> tuple[Tensor, Tensor]:
        """The checked rows with their media -> (input_ids, attention_mask) (B, T): each placeholder expanded, the
        rows left-padded. A family whose processor lays its rows out otherwise (BLIP-2's image tokens first, before
        the padding) overrides this."""
        return self.tokenizer.pad([self._expand(r, parts) for r, parts in zip(rows, found)])

    def _expand(self, ids: list[int], parts: list[Media]) -> list[int]:
        """Each placeholder token repeated as many times as its media's tokens: the slots the model fills with that
        image's (video's) features, in reading order."""
        counts = {kind: iter([m.tokens for m in parts if m.kind == kind]) for kind in self.media_tokens}
        by_id = {token_id: kind for kind, (_, token_id) in self.media_tokens.items()}
        out: list[int] = []
        for t in ids:
            kind = by_id.get(t)
            if kind is not None:
                out += [t] * next(counts[kind])
            else:
                out.append(t)
        return out


class LlavaProcessor(ChatProcessor):
    """Chat messages with image parts -> `{"input_ids", "attention_mask", "pixel_values"}` for LLaVA.

    image_tokens: the features one image becomes, what each `image_token` in the prompt expands to (576 for
    LLaVA-1.5's 336-px ViT-L/14). context_length: the decoder's positions; a longer prompt is refused.
    max_pixels: the largest image accepted, read from its header before it is decoded.
    """

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor, *, image_tokens: int,
                 image_token: str = "<image>", context_length: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if tokenizer.token_to_id(image_token) is None:
            raise ValueError(f"the tokenizer has no {image_token!r} token; LLaVA's processor marks where each image "
                             "goes with it (add it to the tokenizer as a special token)")
        if image_processor.output_size is None:
            raise ValueError("LLaVA's image processor must give every image the same size (a crop_size, or a "
                             "squashed size): each image becomes a fixed number of features")
        if image_tokens < 1:
            raise ValueError(f"image_tokens={image_tokens}: an image becomes at least one feature")
        super().__init__(tokenizer, {"image": image_token}, context_length=context_length, max_pixels=max_pixels)
        self.image_processor = image_processor
        self.image_token, self.image_token_id = self.media_tokens["image"]
        self.image_tokens = image_tokens

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
        check_token_id(tokenizer, token, model.get("image_token_index", model.get("image_token_id")), d,
                       "image_token_index")
        context = context_length if context_length is not None else text.get("max_position_embeddings")
        return cls(tokenizer, images, image_tokens=count, image_token=token,
                   context_length=context if _is_int(context) else None, max_pixels=max_pixels)

    def __repr__(self) -> str:
        return (f"LlavaProcessor(image_tokens={self.image_tokens}, image_token={self.image_token!r}, "
                f"context_length={self.context_length}, pad_to_square={self.image_processor.pad_to_square})")

    # ---------------------------------------------------------------------------------------- family hooks

    def _measure(self, media: Media) -> None:
        media.tokens = self.image_tokens  # one size for every image: nothing to read before the context check

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        """Open every image (its header's pixel count checked before decoding), then preprocess the batch."""
        return {"pixel_values": self.image_processor([open_media_image(m, self.max_pixels) for m in media])}


def open_media_image(media: Media, max_pixels: int):
    """`open_image` on an image part, its errors prefixed by where the part is."""
    try:
        return open_image(media.source, max_pixels=max_pixels)
    except ImageError as e:
        raise type(e)(f"{media.where}: {e}") from None


def check_token_id(tokenizer: TextTokenizer, token: str, expected: Any, directory: Path, field: str) -> None:
    """config.json's id for a placeholder token must be the tokenizer's, or the model would not find the media."""
    token_id = tokenizer.token_to_id(token)
    if _is_int(expected) and token_id not in (None, expected):
        raise CheckpointError(directory, f"the tokenizer's {token!r} is id {token_id}, but config.json's {field} "
                              f"is {expected}: the model would not find the {field.split('_')[0]}s")


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


def _split_media(conversation: Conversation, name: str = "", kinds: tuple[str, ...] = ("image",),
                 keep_strings: bool = False) -> tuple[Conversation, list[Media]]:
    """The conversation as its chat template reads it (media parts as `{"type": "image"}` / `{"type": "video"}`,
    string contents as one text part, or kept as strings with `keep_strings`) and its media in reading order, each
    with where it came from. Only the kinds the family takes are media; other parts reach the template as they
    are."""
    messages, media = [], []
    for i, message in enumerate(conversation):
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{name}messages[{i}]: expected a 'role' (user, assistant, system)")
        content = message.get("content")
        if isinstance(content, str) and keep_strings:
            parts = content
        elif content is None or isinstance(content, str):
            parts = [{"type": "text", "text": content}] if content else []
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                where = f"{name}messages[{i}].content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"{where}: expected a dict with a 'type' ('text', 'image' or 'image_url')")
                kind = PART_KINDS.get(part["type"])
                if kind in kinds:
                    source = _media_source(part, where, kind)
                    if kind == "video" and part.get("fps") is not None:  # the rate of a video given as frames
                        source = {"video": source, "fps": part["fps"]}
                    media.append(Media(kind, where, source))
                    parts.append({"type": kind})
                else:
                    parts.append(part)
        else:
            raise ValueError(f"{name}messages[{i}].content: expected a string or a list of parts, got "
                             f"{type(content).__name__}")
        messages.append({**message, "content": parts})
    return messages, media


def _media_source(part: dict, where: str, kind: str = "image") -> Any:
    """What a media part holds, as its opener reads it: a PIL image, a path, bytes, a file object (for a video also
    a list of frames)."""
    if part["type"] == f"{kind}_url":
        spec = part.get(f"{kind}_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise ValueError(f"{where} ({kind}_url): expected "
                             f"{{'{kind}_url': {{'url': 'data:{kind}/...;base64,...'}}}}")
        return _from_url(url, where, kind)
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    given = [k for k in keys if part.get(k) is not None]
    if len(given) != 1:
        what = "a PIL image, path or bytes" if kind == "image" else "a path, bytes or a list of frames"
        raise ValueError(f"{where} ({kind}): expected one of '{kind}' ({what}), 'path', 'url' (a "
                         f"data: URL) or 'base64'; got {', '.join(given) or 'none'}")
    key, value = given[0], part[given[0]]
    if key == "base64":
        return decode_base64(value, what=f"{where}: base64 {kind} data")
    if key == "url" or (key == kind and isinstance(value, str) and (value.startswith("data:") or "://" in value)):
        if not isinstance(value, str):
            raise ValueError(f"{where} ({kind}): 'url' must be a string (a data: URL)")
        return _from_url(value, where, kind)
    if key == "path" and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where} ({kind}): 'path' must be a file path, got {type(value).__name__}")
    return value


def _from_url(url: str, where: str, kind: str = "image") -> bytes:
    """The bytes of a data: URL (RFC 2397); any other URL is refused, remote ones without being fetched."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        try:
            return decode_data_url(url)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    shown = url if len(url) <= 80 else url[:77] + "..."
    if scheme in ("http", "https"):
        raise ValueError(f"{where}: {shown} is a remote URL, which is never fetched here; download the {kind} and "
                         "pass its path or bytes, or send it inline as a data: URL")
    raise ValueError(f"{where}: {shown}: only data: URLs are read here; pass a local file as "
                     f"{{'type': '{kind}', 'path': ...}}")


def _is_frames(value: Any) -> bool:
    """A video given as its frames: a non-empty list of PIL images or arrays, or one (T, H, W, C) array."""
    if isinstance(value, np.ndarray):
        return value.ndim == 4
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(f, (Image.Image, np.ndarray)) for f in value))


# ---------------------------------------------------------------------------------------------- files


def _read(path: Path) -> dict:
    return read_json(path) if os.path.lexists(path) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
