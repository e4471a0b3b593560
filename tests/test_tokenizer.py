"""CLIPTokenizer against open_clip's tokenizer and transformers' CLIPTokenizer on the same vocabulary.

Token ids are integers: every comparison here is exact.
"""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
import torch

from polymodal.processing import CLIPTokenizer
from polymodal.processing.tokenizer import NUM_MERGES, bytes_to_unicode

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "a photo of a cat.",
    "Hello,   World!!  ",
    "It's 2024: 3.14159 apples & $5 -- 100% sure?!",
    "naïve café, résumé; Ünïcödé",
    "日本語のテキスト и кириллица",
    "emoji 😀🐱 test",
    "don't won't I'll we've they're she'd I'm",
    "UPPER lower MiXeD",
    "tab\tnew\nline   and\r\nmore",
    "a-b_c/d\\e@f#g",
    "l33t sp34k 1st 2nd",
    "",
    "   ",
    "long " * 100,  # truncated: 100 words > 77 tokens
]
# where OpenAI's cleanup (ftfy, HTML unescape) changes the text, so open_clip and transformers disagree
CLEANUP_TEXTS = ["“curly” ‘quotes’", "&amp; &lt;b&gt;", "ﬁle ligature", "mojibake: cafÃ©"]


@pytest.fixture(scope="module")
def default() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """vocab.json + merges.txt derived from open_clip's BPE file, as transformers' CLIP checkpoints ship them."""
    d = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return transformers.CLIPTokenizer.from_pretrained(hf_dir)


def _hf_ids(hf, texts, context_length=77):
    enc = hf(texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_special_ids(default):
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (49406, 49407, 0)
    assert default.vocab_size == 49408
    assert len(set(bytes_to_unicode().values())) == 256


def test_default_equals_open_clip(default):
    ids, mask = default(TEXTS + CLEANUP_TEXTS)
    assert torch.equal(ids, open_clip.tokenize(TEXTS + CLEANUP_TEXTS))
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(TEXTS + CLEANUP_TEXTS))
    assert torch.equal(mask, (torch.arange(77) <= (ids == 49407).int().argmax(1, keepdim=True)).long())


def test_from_vocab_and_merges_equals_transformers(hf, hf_dir):
    ours = CLIPTokenizer.from_pretrained(hf_dir)
    assert ours.pad_token_id == hf.pad_token_id == 49407  # transformers' CLIP pads with <|endoftext|>
    ids, mask = ours(TEXTS + CLEANUP_TEXTS)
    want_ids, want_mask = _hf_ids(hf, TEXTS + CLEANUP_TEXTS)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_from_tokenizer_json_equals_transformers(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ids, mask = CLIPTokenizer.from_pretrained(tmp_path)(TEXTS, context_length=20)
    want_ids, want_mask = _hf_ids(hf, TEXTS, context_length=20)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_open_clip_and_transformers_agree_off_the_cleanup_cases(default, hf):
    ids, mask = default(TEXTS)
    want_ids, want_mask = _hf_ids(hf, TEXTS)
    assert torch.equal(mask, want_mask)
    assert torch.equal(ids * mask, want_ids * want_mask)  # only the pad id differs (0 vs 49407)
    for text in CLEANUP_TEXTS:  # they really differ there, each one
        (a, am), (b, bm) = default([text]), _hf_ids(hf, [text])
        assert not torch.equal(a * am, b * bm), text


def test_clean_is_a_choice(hf_dir, default):
    openai_style = CLIPTokenizer.from_pretrained(hf_dir, clean="openai")
    assert torch.equal(openai_style(CLEANUP_TEXTS)[0] * openai_style(CLEANUP_TEXTS)[1],
                       default(CLEANUP_TEXTS)[0] * default(CLEANUP_TEXTS)[1])


def test_truncation_keeps_end_of_text(default):
    ids, mask = default(["word " * 200], context_length=16)
    assert ids.shape == (1, 16) and bool(mask.all())
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    with pytest.raises(ValueError, match="text 1 is longer than context_length=16 tokens"):
        default(["ok", "word " * 200], context_length=16, truncate=False)


@pytest.mark.parametrize("clean", ["none", "openai"])
def test_a_long_text_is_not_tokenized_whole(hf_dir, clean):
    """Keeping 77 tokens of a long text encodes a prefix of it, yet the ids are those of the whole text."""
    import random

    tok = CLIPTokenizer.from_pretrained(hf_dir, clean=clean)
    rng = random.Random(0)
    words = ["a", "photo", "of", "dog's", "café", "&amp;", "123", "!!!", "   ", "\n\n", "über", "x" * 50, "日本語",
             "can't", "3.14", "TAB\t"]
    for _ in range(60):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(0, 2000)))
        whole = tok._tok.encode(tok._clean(text), add_special_tokens=False).ids[:75]
        assert tok([text])[0][0, 1:1 + len(whole)].tolist() == whole
    seen = []
    encode = tok._tok.encode
    tok._tok = type("Spy", (), {"encode": lambda self, t, **k: seen.append(len(t)) or encode(t, **k),
                                "encode_batch": tok._tok.encode_batch})()
    ids, mask = tok(["a photo of a dog " * 600_000])  # 10 MB
    assert bool(mask.all()) and ids[0, -1] == 49407 and max(seen) <= 2 * 32 * 76


def test_padding_longest_and_pad_id():
    tok = CLIPTokenizer.default(pad_token_id=49407)
    ids, mask = tok(["a cat", "a photo of a dog"], padding="longest")
    assert ids.shape == (2, 7) and mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert ids[0, 4:].tolist() == [49407] * 3
    full, _ = tok(["a cat", "a photo of a dog"])
    assert torch.equal(full[:, :7], ids) and full.shape == (2, 77)


def test_decode(default, hf):
    ids, _ = default(["A photo of a cat.", "Hello,   World!!"])
    assert default.decode(ids) == ["a photo of a cat .", "hello , world !!"]
    assert default.decode(ids[0]) == hf.decode(_hf_ids(hf, ["A photo of a cat."])[0][0], skip_special_tokens=True)
    assert default.decode(ids[0].tolist(), skip_special_tokens=False).startswith("<|startoftext|>a photo")
    assert default.decode(default.encode("zebra crossing")) == "zebra crossing"


def test_errors(default, tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="item 1 is a int"):
        default(["fine", 3])
    with pytest.raises(ValueError, match="padding="):
        default("x", padding="max")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        CLIPTokenizer.default()
