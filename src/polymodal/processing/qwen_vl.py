"""Qwen-VL-Chat's processor (Bai et al. 2023, "Qwen-VL"): chat messages with images -> `{"input_ids",
"attention_mask", "pixel_values"}` for `polymodal.models.qwen_vl.QwenVL`.

    [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "What is it?"}]}]
      -> ChatML       <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
                      Picture 1: <img><imgpad></img>\\nWhat is it?<|im_end|>\\n<|im_start|>assistant\\n
      -> ids          the <imgpad> expanded to 256: the span the model's features overwrite
      + pixels        (N, 3, 448, 448): bicubic resize to 448 x 448 (no crop), CLIP mean/std

The official tokenizer (tokenization_qwen.py) writes an image's path or URL between <img> and </img> as its bytes
(token id = byte value) padded with <imgpad> to 256 tokens, and modeling_qwen.py fetches the image from those bytes
before overwriting the 256 embeddings; the ids in the span never reach the LLM, so this processor writes 256 <imgpad>
and hands the pixels over instead. The prompt is the one `make_context` (qwen_generation_utils.py) builds for
chat_format "chatml" with the default system message; images are numbered "Picture 1:", "Picture 2:" within each
message, as `tokenizer.from_list_format` numbers them within each query.

Tokenizer: the official one is tiktoken's BPE over `qwen.tiktoken` (151,643 byte-level ranks) plus its special
tokens (<|endoftext|> = 151643, <|im_start|>, <|im_end|>, 205 <|extra_i|>, then <ref> </ref> <box> </box> <quad>
</quad> <img> </img> <imgpad> = 151851..151859). `qwen_tiktoken_tokenizer(path)` converts such a file into the shared
`TextTokenizer` (the ranks as byte-level BPE merges, Qwen's split pattern, NFC); a directory with a tokenizer.json is
read as it is (the tests' small BPE with the same special tokens).

Boxes: Qwen-VL answers `<ref>the cat</ref><box>(x1,y1),(x2,y2)</box>` in a 0-1000 relative frame;
`processing.grounding.parse_regions(answer, processor.box_frame())` reads them and `region.to_image((W, H))` maps
them to the original image's pixels.
"""

from __future__ import annotations

import base64
import os
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor

from polymodal.processing.grounding import RELATIVE_1000, Frame
from polymodal.processing.image import ImageProcessor
from polymodal.processing.text import QWEN2_SPLIT, TextTokenizer
from polymodal.processing.vlm import DEFAULT_MAX_PIXELS, ChatProcessor, Media, _is_int, _read, open_media_image
from polymodal.weights.checkpoint import TOKENIZER_LIMIT, CheckpointError, check_regular

IMAGE_TOKENS = 256  # IMG_TOKEN_SPAN: the positions between <img> and </img>
# the official special tokens, in id order after the ranks (tokenization_qwen.py)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)),
           "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")

# make_context's ChatML with Qwen-VL-Chat's default system message; each image part as from_list_format writes it
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% set count = namespace(value=0) %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set count.value = count.value + 1 %}Picture {{ count.value }}: <img><imgpad></img>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_vl_image_processor(size: int = 448) -> ImageProcessor:
    """visual.py's image_transform: Resize((size, size), BICUBIC) on the PIL image (torchvision hands a PIL image
    to PIL's resize), ToTensor, Normalize with CLIP's mean and std."""
    return ImageProcessor(size=(size, size), resize_mode="squash", resample="bicubic", crop_size=None, backend="pil")


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (the alphabet `tokenizers`' ByteLevel works in): printable
    Latin-1 bytes stand for themselves, the rest for code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def qwen_tiktoken_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The official `qwen.tiktoken` (lines "<base64 token> <rank>") -> a TextTokenizer with the same ids.

    tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank; as BPE merges that is
    every split (a, b) of a ranked token whose halves are ranked, ordered by the token's rank, which `tokenizers`
    then applies lowest first. Special tokens follow the ranks in the official order."""
    p = check_regular(Path(path), limit=TOKENIZER_LIMIT)
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise CheckpointError(p, f"line {n}: expected '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(p, "the ranks must be 0 .. n-1, each once")
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(text(a), text(b)) for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))]
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize normalizes to NFC first
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),  # tiktoken's PAT_STR: Qwen2's split
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return TextTokenizer(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=QWEN_VL_CHAT_TEMPLATE,
                         extra_eos_tokens=["<|im_end|>", "<|im_start|>"], copy=False)


class QwenVLProcessor(ChatProcessor):
    """Chat messages with image parts -> `{"input_ids", "attention_mask", "pixel_values"}` for Qwen-VL(-Chat).

    image_tokens: the span between <img> and </img> (the model's n_queries, 256). context_length: the positions a
    prompt may take (Qwen-VL's seq_length, 2048); a longer prompt is refused before any image is decoded."""

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImageProcessor | None = None, *,
                 image_tokens: int = IMAGE_TOKENS, context_length: int | None = 2048,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        for token in ("<img>", "</img>"):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {token!r} token; Qwen-VL's images sit between <img> and "
                                 "</img> (add them as special tokens)")
        if not _is_int(image_tokens) or image_tokens < 1:
            raise ValueError(f"image_tokens={image_tokens!r}: the positions of one image span, a positive integer")
        super().__init__(tokenizer, {"image": "<imgpad>"}, context_length=context_length, max_pixels=max_pixels)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
        self.image_processor = image_processor or qwen_vl_image_processor()
        self.image_tokens = image_tokens
        self.image_start_id = tokenizer.token_to_id("<img>")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                        context_length: int | None = None) -> QwenVLProcessor:
        """From a Qwen-VL checkpoint directory: `qwen.tiktoken` (the hub's) or a tokenizer.json, and config.json's
        `visual` (image size, n_queries, image_start_id, checked against the tokenizer's <img>) and seq_length."""
        d = Path(directory)
        model = _read(d / "config.json")
        visual = model.get("visual") if isinstance(model.get("visual"), dict) else {}
        if os.path.lexists(d / "tokenizer.json"):
            tokenizer = TextTokenizer.from_pretrained(d)
        elif os.path.lexists(d / "qwen.tiktoken"):
            tokenizer = qwen_tiktoken_tokenizer(d / "qwen.tiktoken")
        else:
            raise FileNotFoundError(f"{d}: no qwen.tiktoken (the official tokenizer's ranks) and no tokenizer.json")
        start = visual.get("image_start_id")
        if _is_int(start) and tokenizer.token_to_id("<img>") != start:
            raise CheckpointError(d, f"the tokenizer's '<img>' is id {tokenizer.token_to_id('<img>')}, but "
                                  f"config.json's visual.image_start_id is {start}: the images would not be found")
        size, queries = visual.get("image_size", 448), visual.get("n_queries", IMAGE_TOKENS)
        if not (_is_int(size) and size > 0 and _is_int(queries) and queries > 0):
            raise CheckpointError(d / "config.json", f"visual.image_size {size!r} / n_queries {queries!r}: positive "
                                  "integers")
        context = context_length if context_length is not None else model.get("seq_length", 2048)
        return cls(tokenizer, qwen_vl_image_processor(size), image_tokens=queries,
                   context_length=context if _is_int(context) else None, max_pixels=max_pixels)

    def box_frame(self, width: int | None = None, height: int | None = None) -> Frame:
        """Qwen-VL writes boxes relative to the image, 0-1000 on each axis, whatever its size."""
        return RELATIVE_1000

    def __repr__(self) -> str:
        return (f"QwenVLProcessor(image_tokens={self.image_tokens}, size={self.image_processor.size}, "
                f"context_length={self.context_length})")

    def _prompt(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)  # QWenTokenizer.tokenize does, before anything else

    def _measure(self, media: Media) -> None:
        media.tokens = self.image_tokens  # every image is resized to one size: its span is fixed

    def _prepare(self, kind: str, media: list[Media]) -> dict[str, Tensor]:
        return {"pixel_values": self.image_processor([open_media_image(m, self.max_pixels) for m in media])}
