"""BLIP-2 in the pipelines and the CLI, on tiny random BLIP-2 models (OPT and Flan-T5 generation, ITM/ITC retrieval)
saved by transformers with a tokenizer and transformers' Blip2Processor: polymodal's Blip2Processor gives the ids,
mask and pixels of transformers' processor on scikit-image photos (prompts, padded batches, conversations); the
captioning, VQA and chat pipelines answer with transformers' greedy tokens on those inputs; image-text matching
gives transformers' ITM probabilities and ITC scores; the CLI's caption, vqa and chat commands print the pipelines'
outputs; and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_blip2 import QFORMER, VISION, widen

import polymodal as pm
from polymodal.pipelines.text import consume
from polymodal.processing import Blip2Processor, ImageError
from polymodal.processing.blip2 import QA_TEMPLATE

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

Q = 4  # query tokens
NEW = 8
PHOTOS = {name: Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")}
CORPUS = ["Question: what is shown in this image? Answer: a cat sitting on a table.",
          "Question: where is the rocket going? Answer: into space. An astronaut in a white suit.",
          "a photo of a cup of coffee; a tabby cat; a rocket on its launch pad; two blue squares"]


def tokenizer(kind: str):
    """A byte-level BPE over CORPUS (transformers' Blip2Processor adds "<image>"): OPT's framing (`</s>` first,
    BOS = EOS), Flan-T5's (`</s>` last) or BERT's ([CLS] text [SEP], the retrieval Q-Former's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = {"opt": ["<pad>", "</s>"], "t5": ["<pad>", "</s>", "<unk>"], "itm": ["[PAD]", "[CLS]", "[SEP]"]}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    single = {"opt": "</s> $A", "t5": "$A </s>", "itm": "[CLS] $A [SEP]"}[kind]
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.token_to_id(t)) for t in special[1:] if t in single])
    names = ({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"} if kind == "itm" else
             {"pad_token": "<pad>", "eos_token": "</s>", **({"bos_token": "</s>"} if kind == "opt" else {})})
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def save_tiny_blip2(path, kind: str):
    """A tiny random BLIP-2 ("opt", "t5" or "itm") and transformers' Blip2Processor files in `path` -> (model,
    processor), both transformers'."""
    tok = tokenizer(kind)
    processor = transformers.Blip2Processor(transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tok,
                                            num_query_tokens=Q)
    processor.save_pretrained(path)
    image_token, vocab = tok.convert_tokens_to_ids("<image>"), len(tok)
    if kind == "opt":
        text = transformers.OPTConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).to_dict()
    elif kind == "t5":
        text = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                     feed_forward_proj="gated-gelu", decoder_start_token_id=tok.pad_token_id,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).to_dict()
    else:
        text = None
    qformer = {**QFORMER, "use_qformer_text_input": kind == "itm", **({"vocab_size": vocab} if kind == "itm" else {})}
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=qformer, text_config=text, num_query_tokens=Q,
                                   image_token_index=image_token, image_text_hidden_size=16)
    cls = transformers.Blip2ForImageTextRetrieval if kind == "itm" else transformers.Blip2ForConditionalGeneration
    torch.manual_seed(0)
    model = widen(cls(cfg))
    model.save_pretrained(path)
    return model, transformers.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (transformers model, transformers processor, directory)."""
    out = {}
    for kind in ("opt", "t5", "itm"):
        d = tmp_path_factory.mktemp(f"blip2-{kind}")
        out[kind] = (*save_tiny_blip2(d, kind), d)
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, im in PHOTOS.items():
        paths[name] = d / f"{name}.png"
        im.save(paths[name])
    return paths


def ask(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text",
                                                                                            "text": text}]}


def side(kind: str) -> str:
    """The padding a BLIP-2 generates with: left for OPT, right for Flan-T5 (Blip2Processor.padding_side)."""
    return "right" if kind == "t5" else "left"


def hf_inputs(processor, texts: list[str], images: list, padding_side: str = "left") -> dict:
    return dict(processor(images=images, text=texts, padding=True, padding_side=padding_side, return_tensors="pt"))


def assert_same(got: dict, want: dict) -> None:
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    # BLIP's resize and CLIP's normalization on the same uint8 pixels; 1e-5 is the bound asked of a processor
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


def hf_new_tokens(saved, kind: str, inputs: dict, num_beams: int = 1) -> list[list[int]]:
    """transformers' greedy (or beam) tokens after the prompt (T5: after the decoder's start), cut after eos."""
    model, processor, _ = saved[kind]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, num_beams=num_beams)
    start = 1 if kind == "t5" else inputs["input_ids"].shape[1]
    eos = processor.tokenizer.eos_token_id
    return [r[: r.index(eos) + 1] if eos in r else r for r in out[:, start:].tolist()]


def text_of(saved, kind: str, rows) -> list[str]:
    return [saved[kind][1].tokenizer.decode(r, skip_special_tokens=True) for r in rows]


# ------------------------------------------------------------------------------------------------ the processor


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_processor_matches_transformers_on_prompts_and_batches(saved, kind):
    _, ref, d = saved[kind]
    ours = Blip2Processor.from_pretrained(d)
    assert ours.num_query_tokens == Q and ours.image_token_id == ref.tokenizer.convert_tokens_to_ids("<image>")
    assert ours.padding_side == side(kind)
    one = ["Question: what is shown in this image? Answer:"]
    assert_same(ours(text=one, images=[PHOTOS["chelsea"]]), hf_inputs(ref, one, [PHOTOS["chelsea"]]))
    texts = ["Question: where is the rocket going? Answer:", "a photo of", ""]
    photos = [PHOTOS["rocket"], PHOTOS["coffee"], PHOTOS["astronaut"]]
    got = ours(text=texts, images=photos)
    assert_same(got, hf_inputs(ref, texts, photos, side(kind)))
    # the image tokens lead every row, before the padding (transformers' layout), and every row has Q of them
    assert (got["input_ids"][:, :Q] == ours.image_token_id).all() and got["attention_mask"][:, :Q].all()
    assert got["attention_mask"][2, Q:].sum() < got["attention_mask"][0, Q:].sum()  # "" is padded, after them
    assert_same(ours(text=texts, images=[[p] for p in photos]), hf_inputs(ref, texts, photos, side(kind)))


def test_processor_conversations_read_as_blip2_question_answer_prompts(saved):
    _, ref, d = saved["opt"]
    ours = Blip2Processor.from_pretrained(d)
    chat = [ask("Describe the photo.", PHOTOS["astronaut"]), {"role": "assistant", "content": "An astronaut."},
            ask("Where is the rocket going?")]
    prompt = "Question: Describe the photo. Answer: An astronaut. Question: Where is the rocket going? Answer:"
    from polymodal.processing.chat import render_chat_template

    assert render_chat_template(QA_TEMPLATE, [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the photo."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is the rocket going?"}]}],
        add_generation_prompt=True) == prompt
    assert_same(ours(chat), hf_inputs(ref, [prompt], [PHOTOS["astronaut"]]))
    # transformers' apply_chat_template with the same template: the same inputs
    want = ref.apply_chat_template([chat], chat_template=QA_TEMPLATE, add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="pt")
    assert_same(ours(chat), dict(want))
    cat = [ask("What is shown in this image?", PHOTOS["chelsea"])]
    assert_same(ours([cat, chat]), hf_inputs(ref, ["Question: What is shown in this image? Answer:", prompt],
                                            [PHOTOS["chelsea"], PHOTOS["astronaut"]]))


def test_processor_refusals_come_before_any_image_is_decoded(saved, tmp_path):
    _, _, d = saved["opt"]
    ours = Blip2Processor.from_pretrained(d)
    assert ours.context_length == 64  # OPT's positions, from config.json
    cases = {
        "reads exactly one image per prompt": lambda: ours([ask("Compare them.", PHOTOS["coffee"],
                                                                PHOTOS["chelsea"])]),
        "has 0 images": lambda: ours([ask("What is it?")]),
        "writes the image token '<image>' itself": lambda: ours(text=["<image> what?"], images=[PHOTOS["coffee"]]),
        "over the model's context of 64": lambda: ours(text=["a photo of " * 40], images=[PHOTOS["coffee"]]),
        "2 image(s) given for 1 text": lambda: ours(text=["a photo of"], images=[PHOTOS["coffee"]] * 2),
    }
    for says, call in cases.items():
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            call()
    huge = tmp_path / "huge.png"
    Image.new("RGB", (9000, 8000)).save(huge)  # over the default 64-megapixel budget: refused from its header
    with pytest.raises(ImageError, match="images\\[0\\]"):
        ours(text=["a photo of"], images=[str(huge)])
    (tmp_path / "no-count").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-count" / f).write_bytes((d / f).read_bytes())
    with pytest.raises(ValueError, match="num_query_tokens"):
        Blip2Processor.from_pretrained(tmp_path / "no-count")


# ------------------------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_captions_equal_transformers_greedy_tokens(saved, kind):
    _, ref, d = saved[kind]
    pipe = pm.pipeline("image-to-text", model=d)
    photos = [PHOTOS["chelsea"], PHOTOS["rocket"]]
    out = pipe(photos, max_new_tokens=NEW)
    with torch.no_grad():  # no prompt: the image tokens and what the tokenizer makes of "" (OPT: BOS; T5: EOS)
        want = saved[kind][0].generate(**hf_inputs(ref, ["", ""], photos, side(kind)), max_new_tokens=NEW)
    assert [o[0]["generated_text"] for o in out] == [t.strip() for t in text_of(saved, kind, want.tolist())]
    assert len({o[0]["generated_text"] for o in out}) == 2  # the images are told apart
    prompted = pipe(PHOTOS["coffee"], prompt="a photo of", max_new_tokens=NEW, num_beams=2)
    with torch.no_grad():
        want = saved[kind][0].generate(**hf_inputs(ref, ["a photo of"], [PHOTOS["coffee"]]), max_new_tokens=NEW,
                                       num_beams=2)
    assert prompted == [{"generated_text": text_of(saved, kind, want.tolist())[0].strip()}]
    if kind == "opt":  # a decoder-only caption continues its prompt
        assert prompted[0]["generated_text"].startswith("a photo of")


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_vqa_answers_are_transformers_tokens_after_the_question_answer_prompt(saved, kind):
    _, ref, d = saved[kind]
    pipe = pm.pipeline("visual-question-answering", model=d)
    questions = ["what is shown in this image?", "where is the rocket going?"]
    photos = [PHOTOS["chelsea"], PHOTOS["rocket"]]
    out = pipe(photos, questions, max_new_tokens=NEW)
    want = hf_new_tokens(saved, kind, hf_inputs(ref, [f"Question: {q} Answer:" for q in questions], photos,
                                                side(kind)))
    assert out == [[{"answer": t.strip()}] for t in text_of(saved, kind, want)]
    assert out[0] == pipe(photos[0], questions[0], max_new_tokens=NEW)  # a padded batch answers as each alone
    with pytest.raises(ValueError, match="one per image"):
        pipe(photos, ["one question?"])


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_chat_answers_with_transformers_tokens(saved, kind):
    model, ref, d = saved[kind]
    pipe = pm.pipeline("image-text-to-text", model=d)
    assert isinstance(pipe.processor, Blip2Processor)
    cat = [ask("What is shown in this image?", PHOTOS["chelsea"])]
    rocket = [ask("Describe the photo.", PHOTOS["rocket"]), {"role": "assistant", "content": "A rocket."},
              ask("Where is it going?")]
    inputs = dict(ref.apply_chat_template([cat, rocket], chat_template=QA_TEMPLATE, add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt",
                                          processor_kwargs={"padding": True, "padding_side": side(kind)}))
    want_ids = hf_new_tokens(saved, kind, inputs)
    want = text_of(saved, kind, want_ids)
    assert want_ids[0] != want_ids[1] and len(set(want_ids[0] + want_ids[1])) > 2  # the weights tell them apart
    out = pipe([cat, rocket], max_new_tokens=NEW)
    assert [o[0]["generated_text"][-1] for o in out] == [{"role": "assistant", "content": w} for w in want]
    assert out[0] == pipe(cat, max_new_tokens=NEW)  # the batch answers as each conversation alone
    streamed = []
    result = consume(pipe.stream(cat, max_new_tokens=NEW), streamed.append)
    assert "".join(streamed) == result.text == want[0]
    # a prompt written out, its image given beside it (no image token in the text)
    (written,) = pipe(text="Question: What is shown in this image? Answer:", images=PHOTOS["chelsea"],
                      max_new_tokens=NEW)
    assert written["generated_text"] == "Question: What is shown in this image? Answer:" + want[0]


def test_image_text_matching_scores_equal_transformers(saved):
    model, ref, d = saved["itm"]
    pipe = pm.pipeline("image-text-matching", model=d)
    texts = ["a tabby cat", "a rocket on its launch pad", "two blue squares"]
    ranked = pipe(PHOTOS["rocket"], texts)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    inputs = dict(ref(images=[PHOTOS["rocket"]] * 3, text=texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()
    by_text = {r["text"]: r for r in ranked}
    # fp32, the same sums in another order (fused q/k/v, SDPA) as tests/test_blip2.py
    torch.testing.assert_close(torch.tensor([by_text[t]["score"] for t in texts]), itm, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([by_text[t]["similarity"] for t in texts]), itc, atol=1e-4, rtol=0)
    assert len({round(r["score"], 4) for r in ranked}) == 3


def test_pipelines_refuse_a_blip2_checkpoint_of_the_other_kind(saved):
    with pytest.raises(ValueError, match="image-to-text needs a BLIP-2 generation checkpoint "
                                         r"\(Blip2ForConditionalGeneration\), got a BLIP-2 retrieval checkpoint"):
        pm.pipeline("image-to-text", model=saved["itm"][2])
    with pytest.raises(ValueError, match="needs a BLIP-2 retrieval checkpoint.*got a BLIP-2 generation"):
        pm.pipeline("image-text-matching", model=saved["opt"][2])
    with pytest.raises(ValueError, match="needs a BLIP-2 generation checkpoint"):
        pm.pipeline("image-text-to-text", model=saved["itm"][2])
    with pytest.raises(ValueError, match="is a blip-2 model, not a language model"):
        pm.pipeline("text-generation", model=saved["opt"][2])
    pipe = pm.pipeline("image-text-to-text", model=saved["opt"][2])
    with pytest.raises(ValueError, match="reads exactly one image per prompt"):
        pipe([ask("Compare them.", PHOTOS["coffee"], PHOTOS["chelsea"])])


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_caption_vqa_and_chat_with_a_blip2_checkpoint(saved, photo_files, capsys):
    from polymodal.cli import main

    d, cat = str(saved["opt"][2]), str(photo_files["chelsea"])
    caption = pm.pipeline("image-to-text", model=d)(PHOTOS["chelsea"], max_new_tokens=NEW)
    assert main(["caption", "--model", d, "--image", cat, "--max-new-tokens", str(NEW), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == caption
    answer = pm.pipeline("visual-question-answering", model=d)(PHOTOS["chelsea"], "what is it?", max_new_tokens=NEW)
    assert main(["vqa", "--model", d, "--image", cat, "--question", "what is it?", "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == answer[0]["answer"] + "\n"
    chat = pm.pipeline("image-text-to-text", model=d)([ask("What is it?", PHOTOS["chelsea"])], max_new_tokens=NEW)
    assert main(["chat", "--model", d, "--image", cat, "What is it?", "--max-new-tokens", str(NEW), "--json"]) == 0
    (out,) = json.loads(capsys.readouterr().out)
    assert out["generated_text"][-1] == chat[0]["generated_text"][-1]
    assert out["generated_text"][0]["content"][0] == {"type": "image", "path": cat}
    # two images for one prompt, and a retrieval checkpoint asked for a caption: one line, exit 2
    assert main(["chat", "--model", d, "--image", cat, "--image", cat, "Compare them.", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "one image per prompt" in err
    assert main(["caption", "--model", str(saved["itm"][2]), "--image", cat]) == 2
    assert "BLIP-2 generation checkpoint" in capsys.readouterr().err


def test_random_photos_through_file_paths(saved, tmp_path):
    """Images given as paths and bytes give the inputs of the decoded image (the pipelines open them safely)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(path)
    ours = Blip2Processor.from_pretrained(saved["opt"][2])
    decoded = ours(text=["a photo of"], images=[Image.open(path).convert("RGB")])
    for given in (str(path), path.read_bytes()):
        assert_same(ours(text=["a photo of"], images=[given]), decoded)
