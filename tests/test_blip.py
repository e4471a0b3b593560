"""BLIP: parity with transformers' `BlipForConditionalGeneration`, `BlipForImageTextRetrieval` and
`BlipForQuestionAnswering` on tiny random models saved by transformers (logits, ITM/ITC scores, greedy and beam
generation token for token), round trips, batching, the image processor, training and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipConfig as HFBlipConfig
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

import polymodal as pm
from polymodal.generation import DecoderState
from polymodal.models.blip import PRESETS, Blip
from polymodal.pipelines import capfilt
from polymodal.weights.loader import CheckpointError

# fp32 parity tolerance: the same math in another order (fused products, SDPA instead of an explicit softmax)
# moves fp32 results by ~1e-7 here; a wrong weight, eps, mask or activation moves them by 1e-3 or more.
ATOL = 1e-4

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=97, sep_token_id=3, pad_token_id=0, initializer_range=0.2)
# weights drawn at std 0.2: at transformers' defaults (vision 1e-10, text 0.02) every image gets the same caption
VISION = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, initializer_range=0.2)
BOS, SEP = 97, 3
CLASSES = {"captioning": BlipForConditionalGeneration, "retrieval": BlipForImageTextRetrieval,
           "vqa": BlipForQuestionAnswering}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """task -> (transformers model, directory)."""
    out = {}
    for task, cls in CLASSES.items():
        torch.manual_seed(0)
        ref = cls(HFBlipConfig(text_config=TEXT, vision_config=VISION, image_text_hidden_size=16,
                               initializer_range=0.2)).eval()
        d = tmp_path_factory.mktemp(task)
        ref.save_pretrained(d)
        out[task] = (ref, d)
    return out


def images(B: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def texts(B: int = 3, T: int = 7, start: int = BOS, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (row 1 has 4 real tokens), as BLIP's processor pads."""
    ids = torch.randint(4, 90, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = start
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------- captioning


def test_caption_logits_match_transformers(saved):
    ref, d = saved["captioning"]
    model = pm.load(d)
    assert isinstance(model, Blip) and model.config.task == "captioning"
    px, (ids, mask) = images(), texts()
    with torch.no_grad():
        close(model(px, ids, mask), ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits)


def test_other_resolutions_interpolate_positions_as_transformers(saved):
    """At 48x40 pixels the learned positions are resized bicubically: transformers' interpolate_pos_encoding."""
    ref, d = saved["captioning"]
    model = pm.load(d)
    px, (ids, mask) = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(4)), texts()
    with torch.no_grad():
        expected = ref(pixel_values=px, input_ids=ids, attention_mask=mask, interpolate_pos_encoding=True).logits
        close(model(px, ids, mask), expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_match_transformers_token_for_token(saved, num_beams):
    ref, d = saved["captioning"]
    model = pm.load(d)
    px = images()
    expected = ref.generate(pixel_values=px, max_new_tokens=12, num_beams=num_beams, do_sample=False)
    got = model.generate(pixel_values=px, max_new_tokens=12, num_beams=num_beams)
    assert got.tolist() == expected.tolist()
    assert len({tuple(row) for row in got.tolist()}) > 1  # the images matter: not one caption for all


def test_prompted_caption_matches_transformers(saved):
    """The decoder prompt itself ([DEC] first) continues as transformers continues the processor's
    "[CLS] prompt [SEP]" (test_processor_prompts_caption_as_transformers: that form is taken too)."""
    ref, d = saved["captioning"]
    model = pm.load(d)
    px = images()
    prompt = torch.tensor([[BOS, 11, 12, 13]] * 3)
    expected = ref.generate(pixel_values=px, input_ids=torch.cat([prompt, torch.full((3, 1), SEP)], 1),
                            max_new_tokens=8, do_sample=False)
    assert model.generate(prompt, pixel_values=px, max_new_tokens=8).tolist() == expected.tolist()


def test_left_padded_prompts_caption_as_one_by_one(saved):
    model = pm.load(saved["captioning"][1])
    px = images()
    prompts = [[BOS, 11, 12, 13], [BOS], [BOS, 20]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), pixel_values=px[i : i + 1], max_new_tokens=8)[0].tolist()
        row = [t for t, m in zip(batched[i].tolist(), mask[i].tolist() + [1] * 8) if m]
        assert row[: len(alone)] == alone


# -------------------------------------------------------------------------------------------- retrieval


def test_itm_and_itc_match_transformers(saved):
    ref, d = saved["retrieval"]
    model = pm.load(d)
    px, (ids, mask) = images(), texts(start=1)
    with torch.no_grad():
        close(model.itm(px, ids, mask), ref(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score)
        close(model(px, ids, mask), ref(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score)
        expected = ref(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        close(model.itc(px, ids, mask), expected)
    assert model.itc(px, ids, mask).shape == (3, 3)


# -------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("num_beams", [1, 2])
def test_answers_match_transformers_token_for_token(saved, num_beams):
    ref, d = saved["vqa"]
    model = pm.load(d)
    px = images()
    question = texts(start=1)[0][:, :4]  # unpadded: transformers attends to a question's padding (see below)
    expected = ref.generate(input_ids=question, pixel_values=px, max_new_tokens=8, num_beams=num_beams)
    got = model.generate(question, pixel_values=px, max_new_tokens=8, num_beams=num_beams)
    assert got.tolist() == expected.tolist()


def test_generation_state_is_the_shared_decoder_state(saved):
    """BLIP generates with polymodal.generation's DecoderState: VQA's [DEC] prompt, the decoder's cross-attention
    keys and values over the encoded question and the question's padding, reordered with the rows."""
    model = pm.load(saved["vqa"][1])
    px, (question, qmask) = images(), texts(start=1)
    with torch.no_grad():
        state, _ = model.generation_prefill(question, qmask, 7 + 4, pixel_values=px)
        assert type(state) is DecoderState and state.prompt.tolist() == [[BOS]] * 3
        assert len(state.cross) == 2 and state.cross[0][0].shape[2] == 7 and state.cross_mask.tolist() == qmask.tolist()
        order = torch.tensor([1, 2, 0])
        state.reorder(order)
        swapped, _ = model.generation_prefill(question[order], qmask[order], 7 + 4, pixel_values=px[order])
        tokens = torch.tensor([5, 6, 7])
        close(model.generation_step(tokens, state), model.generation_step(tokens, swapped))


def test_answer_logits_match_transformers(saved):
    """Padded answers; the questions unpadded, because transformers' BLIP text attention drops the cross-attention
    mask (BlipTextAttention does not hand `encoder_attention_mask` on), so it attends to a question's padding."""
    ref, d = saved["vqa"]
    model = pm.load(d)
    px, question = images(), texts(start=1)[0][:, :4]
    answer, amask = texts(T=5, seed=3)
    with torch.no_grad():
        image = ref.vision_model(pixel_values=px).last_hidden_state
        q = ref.text_encoder(input_ids=question, encoder_hidden_states=image).last_hidden_state
        expected = ref.text_decoder(input_ids=answer, attention_mask=amask, encoder_hidden_states=q).logits
        close(model.answer_logits(px, question, answer, answer_mask=amask), expected)
        close(model(px, question, answer_ids=answer, answer_mask=amask), expected)


def test_padded_questions_answer_as_one_by_one(saved):
    """We mask the question's padding when answering (as the BLIP authors' code trains), so a batch answers as each
    question alone."""
    model = pm.load(saved["vqa"][1])
    px, (question, qmask) = images(), texts(start=1)
    batched = model.generate(question, attention_mask=qmask, pixel_values=px, max_new_tokens=6)
    for i in range(3):
        n = int(qmask[i].sum())
        alone = model.generate(question[i : i + 1, :n], pixel_values=px[i : i + 1], max_new_tokens=6)[0].tolist()
        assert batched[i].tolist()[: len(alone)] == alone


# ------------------------------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("task", list(CLASSES))
def test_round_trip_back_into_transformers(saved, tmp_path, task):
    ref, d = saved[task]
    model = pm.load(d)
    pm.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [CLASSES[task].__name__]
    back = CLASSES[task].from_pretrained(tmp_path / "out").eval()
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, atol=0, rtol=0, msg=name)


def test_polymodal_layout_round_trip(saved, tmp_path):
    model = pm.load(saved["vqa"][1])
    pm.record(model).layout = "polymodal"
    pm.save(model, tmp_path / "pm")
    again = pm.load(tmp_path / "pm")
    px, (q, qm) = images(), texts(start=1)
    assert again.generate(q, attention_mask=qm, pixel_values=px, max_new_tokens=5).tolist() == model.generate(
        q, attention_mask=qm, pixel_values=px, max_new_tokens=5).tolist()


def test_strict_loading_names_the_missing_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    d = saved["captioning"][1]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    del tensors["text_decoder.cls.predictions.transform.dense.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.dense.weight"):
        pm.load(tmp_path)


def test_pooler_tensors_transformers_ignores_are_dropped(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    d = saved["vqa"][1]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    tensors.update({"text_encoder.pooler.dense.weight": torch.zeros(32, 32),
                    "text_encoder.pooler.dense.bias": torch.zeros(32)})
    save_file(tensors, tmp_path / "model.safetensors")
    assert pm.load(tmp_path).config.task == "vqa"


def test_blipmodel_checkpoint_is_refused_by_name(saved, tmp_path):
    d = saved["retrieval"][1]
    raw = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["BlipModel"]}))
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="BlipModel"):
        pm.load(tmp_path)


def test_preset_sizes_match_transformers():
    """Our presets build exactly as many parameters as transformers' models of the hub configs (on meta)."""
    hub = {
        "Salesforce/blip-image-captioning-base": (BlipForConditionalGeneration, {}),
        "Salesforce/blip-itm-large-coco": (BlipForImageTextRetrieval, dict(hidden_size=1024, num_hidden_layers=24,
                                                                          num_attention_heads=16,
                                                                          intermediate_size=4096)),
        "Salesforce/blip-vqa-base": (BlipForQuestionAnswering, {}),
    }
    for name, (cls, vision) in hub.items():
        with torch.device("meta"):
            hf = HFBlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=384, **vision))
            ref = cls(hf)
            ours = Blip(PRESETS[name])
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), name


# ------------------------------------------------------------------------------------- processing, training


def test_image_processor_matches_blip_image_processor():
    from transformers import BlipImageProcessor

    from polymodal.processing import ImageProcessor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)
    ref = BlipImageProcessor()
    expected = torch.as_tensor(np.asarray(ref(image, return_tensors="np")["pixel_values"]))
    ours = ImageProcessor.from_hf(json.loads(ref.to_json_string()))
    assert ours == ImageProcessor.blip()
    torch.testing.assert_close(ours([image]), expected, atol=1e-5, rtol=0)


def test_tiny_preset_trains():
    """A few steps of the captioning loss on one batch drive it down: gradients reach every part."""
    torch.manual_seed(0)
    model = Blip(PRESETS["blip-tiny-test"]).train()
    px, (ids, mask) = images(), texts()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(px, ids, mask)[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------------------------- errors


def test_calls_outside_the_checkpoint_task_say_so(saved):
    caption = pm.load(saved["captioning"][1])
    vqa = pm.load(saved["vqa"][1])
    px, (ids, _) = images(), texts()
    with pytest.raises(ValueError, match="captioning model.*retrieval"):
        caption.itm(px, ids)
    with pytest.raises(ValueError, match="needs the question"):
        vqa.generate(pixel_values=px)
    with pytest.raises(ValueError, match="needs the answers"):
        vqa(px, ids)
    with pytest.raises(ValueError, match="one image per text"):
        caption(px[:2], ids)
    with pytest.raises(ValueError, match="pixel_values"):
        caption.generation_prefill(ids, torch.ones_like(ids), 9)
    with pytest.raises(ValueError, match="need 71 decoder positions; .* holds 64"):
        caption.generate(pixel_values=px, max_new_tokens=70)


# ------------------------------------------------------------------------------------ pipelines and CLI


@pytest.fixture(scope="module")
def with_files(tmp_path_factory):
    """task -> directory of a tiny BLIP over BLIP's real vocabulary, with tokenizer and preprocessor files, as
    the hub's checkpoints come."""
    from transformers import BlipImageProcessor

    from polymodal.processing.text import TextTokenizer

    tok = TextTokenizer.blip()
    text = {**TEXT, "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id, "sep_token_id": 102}
    out = {}
    for task, cls in CLASSES.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(f"{task}-files")
        cls(HFBlipConfig(text_config=text, vision_config=VISION, image_text_hidden_size=16,
                         initializer_range=0.2)).save_pretrained(d)
        tok.save_pretrained(d, tokenizer_class="BertTokenizer")
        BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
        out[task] = d
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(d / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_image_to_text_pipeline_decodes_the_models_captions(with_files, photos):
    pipe = pm.pipeline("image-to-text", model=with_files["captioning"])
    out = pipe(photos, max_new_tokens=6)
    assert len(out) == 3 and all(set(o[0]) == {"generated_text"} for o in out)
    ids = pipe.model.generate(**pipe.image_inputs(photos), max_new_tokens=6)
    assert [o[0]["generated_text"] for o in out] == [pipe.tokenizer.decode(r).strip() for r in ids.tolist()]
    one = pipe(photos[0], prompt="a picture of", max_new_tokens=4)
    assert one[0]["generated_text"].startswith("a picture of")


def test_vqa_pipeline_answers_each_question(with_files, photos):
    pipe = pm.pipeline("visual-question-answering", model=with_files["vqa"])
    out = pipe(photos[:2], ["what color is it?", "how many shapes are there?"], max_new_tokens=5)
    for photo, question, answer in zip(photos, ["what color is it?", "how many shapes are there?"], out):
        alone = pipe(photo, question, max_new_tokens=5)
        assert answer == alone and isinstance(alone[0]["answer"], str)
    with pytest.raises(ValueError, match="non-empty question"):
        pipe(photos[0], "  ")
    with pytest.raises(ValueError, match="one per image"):
        pipe(photos[:2], ["one question?"])


def test_image_text_matching_pipeline_ranks_by_the_itm_head(with_files, photos):
    pipe = pm.pipeline("image-text-matching", model=with_files["retrieval"])
    texts = ["a red circle", "two blue squares", "a photo of noise"]
    ranked = pipe(photos[0], texts)
    assert sorted(r["text"] for r in ranked) == sorted(texts)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    ids, mask = pipe.tokenizer(texts, padding_side="right")
    px = pipe.image_inputs([photos[0]] * 3)["pixel_values"]
    with torch.no_grad():
        expected = pipe.model.itm(px, ids, mask).softmax(-1)[:, 1]
        cosine = pipe.model.itc(px, ids, mask).diagonal()
    by_text = {r["text"]: r for r in ranked}
    close(torch.tensor([by_text[t]["score"] for t in texts]), expected)
    close(torch.tensor([by_text[t]["similarity"] for t in texts]), cosine)


def test_capfilt_keeps_what_the_filter_accepts(with_files, photos):
    captioner = pm.pipeline("image-to-text", model=with_files["captioning"])
    matcher = pm.pipeline("image-text-matching", model=with_files["retrieval"])
    web = ["a red circle", ["a blue square", "a cat"], "noise"]
    everything = capfilt(captioner, matcher, photos, web, num_synthetic=2, threshold=0.0, max_new_tokens=5)
    for r, originals in zip(everything, web):
        assert len(r.synthetic) == 2
        assert set(r.kept) == set(([originals] if isinstance(originals, str) else originals) + r.synthetic)
        assert all(0.0 <= p <= 1.0 for p in r.scores.values())
    strict = capfilt(captioner, matcher, photos, web, threshold=0.5, max_new_tokens=5)
    for r in strict:
        assert r.kept == [c for c, p in r.scores.items() if p >= 0.5]
    with pytest.raises(ValueError, match="captions for each image"):
        capfilt(captioner, matcher, photos, web[:2])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_processor_prompts_caption_as_transformers(with_files, photos, num_beams):
    """BLIP's processor writes "[CLS] prompt [SEP]"; transformers' generate puts [DEC] first and drops the last
    column. The same processor outputs give the same tokens here."""
    from transformers import BlipProcessor

    d = with_files["captioning"]
    ref, model = BlipForConditionalGeneration.from_pretrained(d).eval(), pm.load(d)
    processor = BlipProcessor.from_pretrained(d)
    inputs = processor(images=[Image.open(p) for p in photos], text=["a picture of"] * 3, return_tensors="pt")
    # transformers writes [DEC] into the ids it is given: hand it copies
    expected = ref.generate(**{k: v.clone() for k, v in inputs.items()}, max_new_tokens=6, num_beams=num_beams,
                            do_sample=False)
    got = model.generate(**inputs, max_new_tokens=6, num_beams=num_beams)
    assert got.tolist() == expected.tolist()
    assert got[:, 0].tolist() == [model.config.text.bos_token_id] * 3


def test_right_padded_processor_prompts_caption_as_one_by_one(with_files, photos):
    """In a right-padded batch transformers drops a padding column of the shorter rows and keeps their [SEP];
    here every row continues its prompt as it does alone, which is transformers' answer for that row alone."""
    from transformers import BlipProcessor

    d = with_files["captioning"]
    ref, model = BlipForConditionalGeneration.from_pretrained(d).eval(), pm.load(d)
    processor = BlipProcessor.from_pretrained(d)
    pictures, prompts = [Image.open(p) for p in photos], ["a picture of", "a", "two blue"]
    batch = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # the rows are padded
    got = model.generate(**batch, max_new_tokens=6)
    for i, (picture, prompt) in enumerate(zip(pictures, prompts)):
        alone = processor(images=picture, text=prompt, return_tensors="pt")
        expected = ref.generate(**{k: v.clone() for k, v in alone.items()}, max_new_tokens=6, do_sample=False)
        row = [t for t in got[i].tolist() if t != model.config.text.pad_token_id]
        assert row[: expected.shape[1]] == expected[0].tolist()
    ids = batch["input_ids"].clone()
    ids[0, 0] = model.config.text.bos_token_id  # one row in our form, the others in the processor's: refused
    with pytest.raises(ValueError, match="start with \\[DEC\\]"):
        model.generate(ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


def test_retrieve_reranks_itc_top_k_by_itm(with_files, photos):
    """The paper's retrieval: ITC ranks every candidate, ITM re-ranks each query's top k (computed here by hand
    from the model's itc and itm). A tiny random model: the order is checked, not recall (a trained BLIP is not
    cheap enough for tests/)."""
    pipe = pm.pipeline("image-text-matching", model=with_files["retrieval"])
    texts = ["a red circle", "two blue squares", "a photo of noise", "a green triangle", "nothing at all"]
    before = pipe(photos[0], texts)
    got = pipe.retrieve(photos, texts, k=3, batch_size=2)  # batches smaller than the sets
    assert pipe(photos[0], texts) == before  # the pipeline's own call is unchanged
    ids, mask = pipe.tokenizer(texts, padding_side="right")
    px = pipe.image_inputs(photos)["pixel_values"]
    with torch.no_grad():
        sim = pipe.model.itc(px, ids, mask)  # (3, 5)
        close(got.similarity, sim)
        for i in range(len(photos)):  # image -> texts
            top = sim[i].topk(3).indices
            p = pipe.model.itm(px[i : i + 1].expand(3, -1, -1, -1), ids[top], mask[top]).softmax(-1)[:, 1]
            assert got.image_to_text[i].tolist() == top[p.argsort(descending=True)].tolist()
            close(got.image_to_text_scores[i], p.sort(descending=True).values)
        for t in range(len(texts)):  # text -> images
            top = sim[:, t].topk(3).indices
            p = pipe.model.itm(px[top], ids[t : t + 1].expand(3, -1), mask[t : t + 1].expand(3, -1)).softmax(-1)[:, 1]
            assert got.text_to_image[t].tolist() == top[p.argsort(descending=True)].tolist()
    everything = pipe.retrieve(photos, texts)  # k=16 > 5 texts: every candidate, re-ranked
    assert everything.image_to_text.shape == (3, 5) and everything.text_to_image.shape == (5, 3)
    for bad, message in [(dict(k=0), "k must be a positive"), (dict(texts=[]), "at least one image and one text")]:
        with pytest.raises(ValueError, match=message):
            pipe.retrieve(photos, **{"texts": texts, **bad})


def test_retrieval_recall_at_k():
    """Recall@k from the re-ranked lists: an image is found when one of its texts is in its first k."""
    from polymodal.pipelines.image_text import Retrieval

    i2t = torch.tensor([[1, 0, 2], [0, 2, 1]])  # 2 images, 3 texts; texts 0, 1 describe image 0, text 2 image 1
    t2i = torch.tensor([[0, 1], [1, 0], [1, 0]])
    r = Retrieval(torch.zeros(2, 3), i2t, torch.zeros(2, 3), t2i, torch.zeros(3, 2))
    got = r.recall([0, 0, 1], ks=(1, 2))
    assert got == {"image_to_text_r@1": 0.5, "text_to_image_r@1": 2 / 3, "image_to_text_r@2": 1.0,
                   "text_to_image_r@2": 1.0}
    with pytest.raises(ValueError, match="one image index"):
        r.recall([0, 5, 1])


def test_pipelines_refuse_a_checkpoint_of_another_task(with_files):
    with pytest.raises(ValueError, match="needs a BLIP captioning checkpoint.*got a BLIP vqa checkpoint"):
        pm.pipeline("image-to-text", model=with_files["vqa"])


def test_cli_caption_vqa_and_match(with_files, photos, capsys):
    from polymodal.cli import main

    assert main(["caption", "--model", str(with_files["captioning"]), "--image", str(photos[0]),
                 "--max-new-tokens", "4", "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)
    assert isinstance(caption[0]["generated_text"], str)
    assert main(["vqa", "--model", str(with_files["vqa"]), "--image", str(photos[1]), "--question",
                 "what is it?", "--json"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)[0]
    assert main(["match", "--model", str(with_files["retrieval"]), "--image", str(photos[2]), "--texts", "a dog",
                 "a cat"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and {line.split()[-1] for line in lines} == {"dog", "cat"}


def test_cli_bad_input_is_one_line_and_exit_2(with_files, tmp_path, capsys):
    from polymodal.cli import main

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["caption", "--model", str(with_files["captioning"]), "--image", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert main(["vqa", "--model", str(with_files["captioning"]), "--image", str(broken), "--question", "q?"]) == 2
    assert "broken.png" in capsys.readouterr().err  # the image is checked before the model loads
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (0, 128, 255)).save(good)
    assert main(["vqa", "--model", str(with_files["captioning"]), "--image", str(good), "--question", "q?"]) == 2
    assert "captioning checkpoint" in capsys.readouterr().err


def test_pretraining_objectives_and_parts(tmp_path):
    """The pretraining model's three losses reach every parameter; its task parts share its weights and save as
    transformers' classes; a batch of one repeated text (no negative exists) still trains."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = Blip(replace(PRESETS["blip-tiny-test"], task="pretraining")).train()
    px, (ids, mask) = images(), texts()
    itc, itm, lm = model(px, ids, mask)
    (itc + itm + lm).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    same = model(px, ids[:1].expand(3, -1), mask[:1].expand(3, -1))
    assert all(torch.isfinite(x) for x in same)
    caption = model.part("captioning")
    assert caption.lm_head is model.lm_head and not hasattr(caption, "itm_head")
    pm.save(caption, tmp_path / "caption")
    assert json.loads((tmp_path / "caption" / "config.json").read_text())["architectures"] == \
        ["BlipForConditionalGeneration"]
    BlipForConditionalGeneration.from_pretrained(tmp_path / "caption")
    with pytest.raises(ValueError, match="part\\(\\) gives"):
        model.part("pretraining")
    with pytest.raises(ValueError, match="no class for BLIP's pretraining"):
        pm.record(model).layout = "transformers"
        pm.save(model, tmp_path / "whole")
