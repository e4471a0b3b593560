"""Qwen-VL-Chat's processor: the prompt ids against the official make_context (role and content tokenized apart,
each image's path bytes padded to 256 between <img> and </img>) on a small byte-level BPE with the official special
tokens, the span replaced by <imgpad>s; pixels against visual.py's torchvision transform; the model fed the
processor's inputs; the qwen.tiktoken conversion against tiktoken's merge rule (and tiktoken itself when installed);
boxes read in the 0-1000 frame and mapped to the image; refusals before any image is decoded."""

import base64
import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import polymodal as pm
from polymodal.processing.grounding import parse_regions
from polymodal.processing.qwen_vl import SPECIAL, QwenVLProcessor, qwen_tiktoken_tokenizer, qwen_vl_image_processor
from polymodal.processing.text import TextTokenizer

CORPUS = ["system You are a helpful assistant. user Picture 1: What is shown in this image? assistant A cat.",
          "Describe the photo in detail, please. Where is the cup? The cat sits on the table."]
SYSTEM = "You are a helpful assistant."


def tiny_tokenizer() -> TextTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return TextTokenizer(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen-vl-processor")
    tok = tiny_tokenizer()
    tok.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen", "seq_length": 2048, "visual": {
        "image_size": 448, "n_queries": 256, "image_start_id": tok.token_to_id("<img>")}}))
    return d, tok


def official_ids(tok: TextTokenizer, query: str, history=(), system: str = SYSTEM) -> list[int]:
    """make_context (chat_format chatml): role and content encoded apart, joined by '\\n' tokens; each
    <img>path</img> becomes <img>, the path's bytes, <imgpad>s up to 256, </img> (tokenization_qwen.py)."""
    nl = tok.encode("\n", add_special_tokens=False)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")

    def content(text):
        out = []
        for i, piece in enumerate(text.split("<img>")):
            if i:
                path, piece = piece.split("</img>", 1)
                span = list(path.encode())
                out += [tok.token_to_id("<img>"), *span, *[tok.token_to_id("<imgpad>")] * (256 - len(span)),
                        tok.token_to_id("</img>")]
            out += tok.encode(piece, add_special_tokens=False) if piece else []
        return out

    def part(role, text):
        return [start, *tok.encode(role, add_special_tokens=False), *nl, *content(text), end]

    ids = part("system", system)
    for q, r in history:
        ids += nl + part("user", q) + nl + part("assistant", r)
    return ids + nl + part("user", query) + nl + [start, *tok.encode("assistant", add_special_tokens=False), *nl]


def as_pads(tok, ids):
    """The official ids with each span's path bytes replaced by <imgpad>: what the model reads there is overwritten."""
    out, inside = [], False
    for t in ids:
        if t == tok.token_to_id("</img>"):
            inside = False
        out.append(tok.token_to_id("<imgpad>") if inside else t)
        if t == tok.token_to_id("<img>"):
            inside = True
    return out


def photo(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_prompt_ids_follow_make_context(saved):
    d, tok = saved
    proc = QwenVLProcessor.from_pretrained(d)
    a, b = photo(300, 200), photo(120, 160, 1)
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                             {"type": "text", "text": "Where is the cup?"}]}]
    out = proc(messages)
    ref = official_ids(tok, "Picture 1: <img>a.jpg</img>\nPicture 2: <img>http://x/b.png</img>\nWhere is the cup?")
    assert out["input_ids"][0].tolist() == as_pads(tok, ref)
    assert out["pixel_values"].shape == (2, 3, 448, 448)
    # a later turn after an answer (pictures numbered within each query, as from_list_format does), a system message
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "And this?"}]}]
    ref = official_ids(tok, "Picture 1: <img>b</img>\nAnd this?", [("Picture 1: <img>a</img>\nWhat is it?", "A cat.")],
                       system="Be brief.")
    assert proc(messages)["input_ids"][0].tolist() == as_pads(tok, ref)


def test_pixels_equal_the_official_transform(saved):
    transforms = pytest.importorskip("torchvision.transforms")
    im = photo(333, 250, 2)
    ref = transforms.Compose([
        transforms.Resize((448, 448), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])(im)
    torch.testing.assert_close(qwen_vl_image_processor()([im])[0], ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_model_reads_the_processors_inputs(tmp_path, saved):
    d, tok = saved
    from polymodal.models.qwen_vl import PRESETS

    base = PRESETS["qwen-vl-tiny-test"]
    from dataclasses import replace

    cfg = replace(base, vision=replace(base.vision, n_queries=256, image_start_id=tok.token_to_id("<img>")),
                  text=replace(base.text, vocab_size=tok.vocab_size))
    model = pm.build("qwen_vl", cfg).eval()
    pm.save(model, tmp_path)
    tok.save_pretrained(tmp_path)
    proc = pm.registry.family("qwen_vl").processor(tmp_path)
    assert proc.image_processor.size == (56, 56) and proc.image_tokens == 256
    inputs = proc([[{"role": "user", "content": [{"type": "image", "image": photo(90, 60)},
                                                 {"type": "text", "text": "What is it?"}]}],
                   [{"role": "user", "content": "Describe the photo in detail, please."}]])
    out = model.generate(**inputs, max_new_tokens=3)
    alone = proc([{"role": "user", "content": [{"type": "image", "image": photo(90, 60)},
                                               {"type": "text", "text": "What is it?"}]}])
    assert out[0, -3:].tolist() == model.generate(**alone, max_new_tokens=3)[0, -3:].tolist()


def test_boxes_in_the_relative_frame(saved):
    proc = QwenVLProcessor.from_pretrained(saved[0])
    answer = "<ref>the cat</ref><box>(100,200),(500,800)</box> and <ref>a cup</ref><box>(0,0),(1000,1000)</box>"
    regions = parse_regions(answer, proc.box_frame())
    assert [(r.label, r.coords) for r in regions] == [("the cat", (100, 200, 500, 800)), ("a cup", (0, 0, 1000, 1000))]
    assert regions[0].to_image((640, 480)).coords == (64.0, 96.0, 320.0, 384.0)


def test_refusals_before_decoding(saved, tmp_path):
    d, tok = saved
    proc = QwenVLProcessor.from_pretrained(d, context_length=300)
    never = {"type": "image", "path": str(tmp_path / "absent.png")}  # would fail if it were opened
    with pytest.raises(ValueError, match="context of 300"):
        proc([{"role": "user", "content": [never, never, {"type": "text", "text": "hi"}]}])
    with pytest.raises(ValueError, match=r"1 image\(s\) given for 0 <imgpad>"):
        proc(text="no image here", images=[photo(10, 10)])
    bare = TextTokenizer(Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match="no '<img>' token"):
        QwenVLProcessor(bare)
    (tmp_path / "config.json").write_text(json.dumps({"visual": {"image_start_id": 5}}))
    tok.save_pretrained(tmp_path)
    with pytest.raises(pm.weights.checkpoint.CheckpointError, match="image_start_id is 5"):
        QwenVLProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ qwen.tiktoken

MERGED = [b"th", b"he", b"the", b" t", b" the", b"at", b"cat", b" c", b" cat", b"in", b"ing", b"ng", b"ca", b"e "]


def tiktoken_file(path):
    ranks = [bytes([b]) for b in range(256)] + MERGED
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return {t: i for i, t in enumerate(ranks)}


def lowest_rank_bpe(ranks, piece: bytes) -> list[int]:
    """tiktoken's rule: merge the adjacent pair whose concatenation has the lowest rank (leftmost first), until none
    is ranked."""
    parts = [bytes([b]) for b in piece]
    while True:
        best = min(((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                    if parts[i] + parts[i + 1] in ranks), default=None)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


TEXTS = ["the cat is eating the thing", "Thethe  cat\n\ncatching 42 cats!", "naïve café — 猫 theing"]


def test_tiktoken_ranks_convert_to_the_same_ids(tmp_path):
    ranks = tiktoken_file(tmp_path / "qwen.tiktoken")
    tok = qwen_tiktoken_tokenizer(tmp_path / "qwen.tiktoken")
    split = pre_tokenizers.Split(__import__("tokenizers").Regex(__import__(
        "polymodal.processing.text", fromlist=["QWEN2_SPLIT"]).QWEN2_SPLIT), behavior="isolated")
    for text in TEXTS:
        ref = [i for piece, _ in split.pre_tokenize_str(text) for i in lowest_rank_bpe(ranks, piece.encode())]
        assert tok.encode(text, add_special_tokens=False) == ref, text
        assert tok.decode(ref) == text
    n = len(ranks)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<img>", "</img>", "<imgpad>")] == [
        n, n + 1, n + 214, n + 215, n + 216]
    assert tok.encode("a<img>b</img>", add_special_tokens=False) == [97, n + 214, 98, n + 215]


def test_tiktoken_itself_when_installed(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = tiktoken_file(tmp_path / "qwen.tiktoken")
    from polymodal.processing.text import QWEN2_SPLIT

    enc = tiktoken.Encoding("qwen-test", pat_str=QWEN2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    tok = qwen_tiktoken_tokenizer(tmp_path / "qwen.tiktoken")
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == enc.encode(text)
