"""CLIP's text tokenizer (Radford et al. 2021): byte-level BPE with an end-of-word suffix, run by `tokenizers`.

    text -> clean (ftfy, HTML unescape, whitespace, lower case) -> split on CLIP's regex -> bytes as unicode
         -> BPE merges, the last piece of each word ending in "</w>" -> [<|startoftext|>] ids [<|endoftext|>]

The vocabulary is 256 byte symbols, the same 256 with "</w>", 48,894 merges and the two special tokens:
49,408 ids, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407. Checked against open_clip's `SimpleTokenizer`
(`open_clip.tokenize`, the port of OpenAI's `clip/simple_tokenizer.py`) and transformers' `CLIPTokenizer`
built from the same files (tests/test_tokenizer.py).

Two cleanups exist in the wild. OpenAI CLIP and open_clip run `ftfy.fix_text` and a double `html.unescape`
before lower-casing (`clean="openai"`, the default of `CLIPTokenizer.default()`); transformers' tokenizer only
normalizes NFC, whitespace and case (`clean="none"`, the default of `from_pretrained`). They differ on inputs
such as "&amp;", curly quotes or mojibake, and agree elsewhere.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor

from polymodal.weights.checkpoint import TOKENIZER_LIMIT, check_regular, read_json, read_tokenizer_file

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word split: contractions, letter runs, single digits, runs of other non-space characters
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of that file


class CLIPTokenizer:
    """`tok(texts)` -> `(input_ids, attention_mask)`, both LongTensor `(B, T)`.

    bos_token_id / eos_token_id: `<|startoftext|>` / `<|endoftext|>`. pad_token_id: what fills the rows after
    `<|endoftext|>`: 0 in open_clip, the eos id in transformers' OpenAI checkpoints (their `pad_token`).
    The attention mask is 1 on `<|startoftext|>`, the text and `<|endoftext|>`, 0 on padding.
    """

    def __init__(self, tokenizer: Tokenizer, *, pad_token_id: int, clean: Literal["openai", "none"] = "openai"):
        if clean not in ("openai", "none"):
            raise ValueError(f"clean={clean!r}: expected 'openai' or 'none'")
        if clean == "openai" and importlib.util.find_spec("ftfy") is None:
            raise ImportError("clean='openai' needs ftfy (pip install ftfy), as OpenAI CLIP does; or pass clean='none'")
        tok = Tokenizer.from_str(tokenizer.to_str())  # our own copy: we change its settings below
        tok.no_truncation()  # we truncate ourselves, keeping <|endoftext|> last
        tok.no_padding()
        if clean == "openai":
            tok.normalizer = None  # the Python cleanup below already does whitespace and case, exactly as CLIP
        self._tok = tok
        self.clean = clean
        self.bos_token_id = _token_id(tok, BOS)
        self.eos_token_id = _token_id(tok, EOS)
        self.pad_token_id = int(pad_token_id)

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def default(cls, pad_token_id: int = 0) -> CLIPTokenizer:
        """OpenAI CLIP's tokenizer from the BPE file open_clip ships (`bpe_simple_vocab_16e6.txt.gz`),
        padding with 0 and cleaning text as open_clip does."""
        spec = importlib.util.find_spec("open_clip")
        path = Path(next(iter(spec.submodule_search_locations or []), "")) / OPEN_CLIP_BPE if spec else None
        if path is None or not path.is_file():
            raise ImportError(
                f"CLIPTokenizer.default() reads open_clip's bundled {OPEN_CLIP_BPE}; install it "
                "(pip install open_clip_torch) or use CLIPTokenizer.from_pretrained(directory)"
            )
        return cls(_from_open_clip_bpe(str(path)), pad_token_id=pad_token_id, clean="openai")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, clean: Literal["openai", "none"] = "none"
    ) -> CLIPTokenizer:
        """From a transformers checkpoint directory: `tokenizer.json`, or `vocab.json` + `merges.txt`. The pad id
        comes from `pad_token` in `tokenizer_config.json` / `special_tokens_map.json` (transformers' default for
        CLIP is `<|endoftext|>`)."""
        d = Path(directory)
        if os.path.lexists(d / "tokenizer.json"):
            tok = read_tokenizer_file(d / "tokenizer.json")[0]
        elif os.path.lexists(d / "vocab.json") and os.path.lexists(d / "merges.txt"):
            vocab, merges = BPE.read_file(str(check_regular(d / "vocab.json", limit=TOKENIZER_LIMIT)),
                                          str(check_regular(d / "merges.txt", limit=TOKENIZER_LIMIT)))
            tok = _clip_pipeline(vocab, merges)
        else:
            raise FileNotFoundError(
                f"{d}: no tokenizer.json, nor vocab.json + merges.txt; use CLIPTokenizer.default() for OpenAI's"
            )
        pad = _special_token(d, "pad_token") or EOS
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{d}: pad_token {pad!r} is not in the vocabulary")
        return cls(tok, pad_token_id=pad_id, clean=clean)

    # ---------------------------------------------------------------------------------------- running

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without <|startoftext|> / <|endoftext|>."""
        return self._tok.encode(self._clean(text), add_special_tokens=False).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = 77,
        padding: Literal["max_length", "longest"] = "max_length",
        truncate: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Texts -> `(input_ids, attention_mask)` LongTensors `(B, T)`: T is `context_length` ("max_length") or
        the longest row ("longest"). A text too long is cut to `context_length` with <|endoftext|> kept last
        (as open_clip does); with `truncate=False` it is an error instead."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is a {type(items[bad[0]]).__name__}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding={padding!r}: expected 'max_length' or 'longest'")
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: needs room for <|startoftext|> and <|endoftext|>")
        rows = []
        for i, body in enumerate(self._leading_ids(items, context_length - 1)):
            ids = [self.bos_token_id, *body, self.eos_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {i} is longer than context_length={context_length} tokens; "
                        "shorten it or pass truncate=True"
                    )
                ids = ids[: context_length - 1] + [self.eos_token_id]
            rows.append(ids)
        width = context_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        return input_ids, mask

    def _leading_ids(self, texts: list[str], n: int) -> list[list[int]]:
        """Each text's first `n` ids (all of them when it has fewer), without encoding more of a long text than
        that takes: a 10 MB text is not tokenized whole to keep 77 tokens. A text longer than PREFIX_CHARS * n
        characters is encoded from a prefix, which doubles until it yields n tokens from words it holds whole
        (the words before its last one: CLIP's splitting and cleaning are local to a word, so those tokens are the
        ones the whole text gives); its ids are then exactly the whole text's first n."""
        short = [i for i, t in enumerate(texts) if len(t) <= PREFIX_CHARS * n]
        out: list[list[int]] = [[] for _ in texts]
        for i, enc in zip(short, self._tok.encode_batch([self._clean(texts[i]) for i in short],
                                                        add_special_tokens=False)):
            out[i] = enc.ids[:n]
        for i in sorted(set(range(len(texts))) - set(short)):
            text, size = texts[i], PREFIX_CHARS * n
            while True:
                if size >= len(text):
                    out[i] = self._tok.encode(self._clean(text), add_special_tokens=False).ids[:n]
                    break
                enc = self._tok.encode(self._clean(text[:size]), add_special_tokens=False)
                last = max((w for w in enc.word_ids if w is not None), default=None)
                whole = [t for t, w in zip(enc.ids, enc.word_ids) if w is not None and w != last]
                if len(whole) >= n:
                    out[i] = whole[:n]
                    break
                size *= 2
        return out

    def decode(self, ids: Tensor | Sequence[int] | Sequence[Sequence[int]], skip_special_tokens: bool = True):
        """Ids -> text (a list of texts for a batch). With `skip_special_tokens`, <|startoftext|> is dropped and
        the row ends at its first <|endoftext|>, so whatever pads it is never decoded."""
        rows = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if rows and isinstance(rows[0], (list, tuple)):
            return [self.decode(r, skip_special_tokens) for r in rows]
        rows = [int(i) for i in rows]
        if skip_special_tokens:
            if rows and rows[0] == self.bos_token_id:
                rows = rows[1:]
            if self.eos_token_id in rows:
                rows = rows[: rows.index(self.eos_token_id)]
        text = self._tok.decode(rows, skip_special_tokens=False)
        return text.replace("</w>", " ").strip()

    def _clean(self, text: str) -> str:
        if self.clean == "none":
            return text
        import ftfy  # OpenAI CLIP's basic_clean + whitespace_clean + lower()

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, clean={self.clean!r})")


# ---------------------------------------------------------------------------------------------- helpers


PREFIX_CHARS = 32  # characters per token a long text's first prefix allows (CLIP's tokens average ~4)


def _clip_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers` pipeline that is CLIP's tokenizer for this vocabulary."""
    tok = Tokenizer(BPE(vocab, merges, unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),  # keep the matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable unicode
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


@lru_cache(maxsize=2)
def _from_open_clip_bpe(path: str) -> Tokenizer:
    """CLIP's vocabulary from its merges file: bytes, bytes + "</w>", one token per merge, the special tokens."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return _clip_pipeline({t: i for i, t in enumerate(tokens)}, merges)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters: printable Latin-1 bytes
    stand for themselves, the others (controls, space, ...) are moved to code points 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def _token_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token!r} token; is it a CLIP tokenizer?")
    return i


def _special_token(d: Path, key: str) -> str | None:
    """A special token's text from tokenizer_config.json or special_tokens_map.json (a string or {"content"})."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if os.path.lexists(f):
            value = read_json(f).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None
