"""Llama 3.2 Vision's processor against transformers' MllamaProcessor, with a tiny byte-level BPE that puts
<|begin_of_text|> first (as Llama 3's tokenizer does), Llama 3's special tokens and the hub's Llama 3.2 Vision chat
template, saved by transformers: the same input_ids, attention_mask, cross_attention_mask, aspect_ratio_ids and
aspect_ratio_mask, pixel values within 1e-5, with the default (torchvision) and the PIL image processor, on
scikit-image photos that are wide, tall, square and small, several images in a prompt and in later turns, batches
with different image counts, written-out prompts (bos after the leading <|image|> tokens); the canvas choice exactly
against transformers' functions; and the refusals, each before anything large is allocated."""

import json
import random
import resource
import shutil

import pytest
import torch
from PIL import Image

from polymodal.processing import ImageError
from polymodal.processing.chat import ChatTemplateError
from polymodal.processing.mllama import (
    LLAMA32_VISION_CHAT_TEMPLATE,
    MllamaImageProcessor,
    MllamaProcessor,
    cross_attention_spans,
    fit_to_canvas,
    optimal_canvas,
    supported_aspect_ratios,
)

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
CORPUS = ["system Cutting Knowledge Date: December 2023 Today Date: user What is shown in this image? assistant A cat.",
          "Describe the photo in detail, please. What colour is the cup? Where is the rocket going? Compare them."]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TILE = 112  # small tiles keep the tests fast; one test runs the checkpoint's 560


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


PHOTOS = {
    "square": _photo("astronaut"),  # 512 x 512: 2 x 2 tiles of 112 (downscaled)
    "wide": _photo("coffee").crop((0, 150, 600, 260)),  # 600 x 110: a 1 x 4 canvas, padded below
    "tall": _photo("rocket").transpose(Image.Transpose.ROTATE_90).crop((0, 0, 160, 600)),  # 160 x 600: 4 x 1
    "small": _photo("chelsea").resize((45, 30)),  # upscaled into one tile
    "gray": Image.fromarray(skimage_data.camera()).resize((300, 200)),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                                pad_token="<|finetune_right_pad_id|>")


def image_processor(cls=None, tile=TILE, tiles=4):
    cls = cls or transformers.MllamaImageProcessor
    return cls(size={"height": tile, "width": tile}, max_image_tiles=tiles, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def save_processor(path, tile=TILE, tiles=4):
    transformers.MllamaProcessor(image_processor=image_processor(tile=tile, tiles=tiles), tokenizer=tiny_tokenizer(),
                                 chat_template=LLAMA32_VISION_CHAT_TEMPLATE).save_pretrained(path)


def reference(path, backend: str = "torchvision"):
    ref = transformers.AutoProcessor.from_pretrained(path)
    if backend == "pil":
        ip = ref.image_processor
        pil = transformers.MllamaImageProcessorPil(size=dict(ip.size), max_image_tiles=ip.max_image_tiles,
                                                   image_mean=ip.image_mean, image_std=ip.image_std)
        ref = type(ref)(image_processor=pil, tokenizer=ref.tokenizer, chat_template=ref.chat_template)
    return ref


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama-processor")
    save_processor(path)
    return path


def ask(text: str, *images, role: str = "user") -> dict:
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def run_reference(proc, conversations) -> dict:
    out = proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"})
    return dict(out)


KEYS = ("input_ids", "attention_mask", "cross_attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want) and set(got) <= set(KEYS)
    for key in KEYS:
        if key in want and key != "pixel_values":
            assert got[key].dtype == torch.long, key
            assert got[key].tolist() == torch.as_tensor(want[key]).tolist(), key
    if "pixel_values" in want:
        # the same uint8 resampling kernel and fused normalization as the torchvision processor (0 seen); the PIL
        # processor rescales and normalizes in two steps (~2e-7); 1e-5 is the bound asked of a processor
        assert got["pixel_values"].shape == want["pixel_values"].shape
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ tiling


def test_canvas_and_fit_equal_transformers():
    from transformers.models.mllama.image_processing_mllama import (
        get_all_supported_aspect_ratios,
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    rng = random.Random(0)
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(1500)]
    sizes += [(rng.randint(1, 80), rng.randint(1, 3000)) for _ in range(300)] + [(560, 560), (1, 1), (560, 2240)]
    for tiles, tile in ((4, 560), (6, 224), (1, 448), (9, 56)):
        assert list(supported_aspect_ratios(tiles)) == get_all_supported_aspect_ratios(tiles)
        for h, w in sizes:
            canvas = optimal_canvas(h, w, tiles, tile)
            assert canvas == tuple(int(v) for v in get_optimal_tiled_canvas(h, w, tiles, tile)), (h, w, tiles)
            want = get_image_size_fit_to_canvas(h, w, *canvas, tile)
            assert fit_to_canvas(h, w, *canvas, tile) == tuple(int(v) for v in want), (h, w, tiles)


def test_cross_attention_spans_group_consecutive_images():
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    I = 9
    rows = [[1, 2, 3], [1, I, 2, 3], [I, 1, 2], [1, I, I, 2, 3, I, 4], [I, I, I], [1, I, 2, I, I, 3, I], [I, 1, I]]
    for row in rows:
        want = [(a, len(row) if b == -1 else b) for a, b in get_cross_attention_token_mask(row, I)]
        assert cross_attention_spans(row, I) == want, row


@pytest.mark.parametrize("backend", ["torch", "pil"])
def test_image_processor_alone_equals_transformers(backend):
    cls = transformers.MllamaImageProcessor if backend == "torch" else transformers.MllamaImageProcessorPil
    samples = [[PHOTOS["wide"], PHOTOS["square"]], [PHOTOS["tall"], PHOTOS["small"], PHOTOS["gray"]]]
    for tiles in (4, 6):
        want = image_processor(cls, tiles=tiles)(samples, return_tensors="pt")
        ours = MllamaImageProcessor(tile_size=TILE, max_image_tiles=tiles, image_mean=tuple(CLIP_MEAN),
                                    image_std=tuple(CLIP_STD), backend=backend)
        got = ours(samples)
        assert got.pop("num_tiles") == want.pop("num_tiles")
        assert_same(got, dict(want))
    # (1, 4), (2, 2), (4, 1) and (1, 1) canvases were all met
    assert {tuple(r) for r in supported_aspect_ratios(4)} >= {(1, 4), (2, 2), (4, 1), (1, 1)}
    ids = MllamaImageProcessor(tile_size=TILE, max_image_tiles=4).inputs(samples)["aspect_ratio_ids"]
    assert ids.tolist() == [[4, 6, 0], [8, 1, 6]]  # 1 + index in supported_aspect_ratios(4); 0: no image
    padded = got["pixel_values"][0, 0]  # the wide photo: 1 x 4 tiles, 110 of 112 rows image, then padding
    pad = (0 - torch.tensor(CLIP_MEAN) * 255.0) / (torch.tensor(CLIP_STD) * 255.0)  # transformers' fused constants
    assert torch.equal(padded[0, :, -1, 0], pad)  # the canvas is padded before normalizing, as the reference does


# ------------------------------------------------------------------------------------------ chat

CONVERSATIONS = {
    "one image, square": [ask("What is shown in this image?", PHOTOS["square"])],
    "wide and tall, one prompt": [ask("Compare them.", PHOTOS["wide"], PHOTOS["tall"])],
    "images in later turns": [ask("Describe the photo.", PHOTOS["small"]),
                              {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                              ask("Where is the rocket going?", PHOTOS["tall"]),
                              {"role": "assistant", "content": "Up."},
                              ask("And this one?", PHOTOS["gray"])],
    "no image, a system message": [{"role": "system", "content": "  Be brief.  "},
                                   {"role": "user", "content": "Describe the photo in detail, please."}],
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_chat_equals_transformers(saved, case):
    ours = MllamaProcessor.from_pretrained(saved)
    conversation = CONVERSATIONS[case]
    got = ours(conversation)
    assert_same(got, run_reference(reference(saved), conversation))
    images = sum(p["type"] == "image" for m in conversation if isinstance(m["content"], list) for p in m["content"])
    assert int((got["input_ids"] == ours.image_token_id).sum()) == images  # one token per image, not expanded
    assert got["input_ids"][0, 0] == ours.tokenizer.bos_token_id
    if images:
        assert got["pixel_values"].shape == (1, images, 4, 3, TILE, TILE)
        assert got["cross_attention_mask"].shape == (1, got["input_ids"].shape[1], images, 4)
    else:
        assert "Today Date: " in ours.decode(got["input_ids"][0]) and "Be brief." in ours.decode(got["input_ids"][0])


def test_pil_backend_equals_transformers_pil_processor(saved):
    ours = MllamaProcessor.from_pretrained(saved, backend="pil")
    for case in ("wide and tall, one prompt", "images in later turns"):
        conversation = CONVERSATIONS[case]
        assert_same(ours(conversation), run_reference(reference(saved, backend="pil"), conversation))


def test_batch_with_different_image_counts(saved):
    ours = MllamaProcessor.from_pretrained(saved)
    batch = [CONVERSATIONS["one image, square"], CONVERSATIONS["images in later turns"],
             CONVERSATIONS["wide and tall, one prompt"]]
    got = ours(batch)
    assert_same(got, run_reference(reference(saved), batch))
    assert got["pixel_values"].shape == (3, 3, 4, 3, TILE, TILE)
    for row, conversation in enumerate(batch):  # each row is that conversation alone, left-padded and zero-filled
        alone = ours(conversation)
        n, k = alone["input_ids"].shape[1], alone["pixel_values"].shape[1]
        assert got["input_ids"][row, -n:].tolist() == alone["input_ids"][0].tolist()
        assert torch.equal(got["pixel_values"][row, :k], alone["pixel_values"][0])
        assert not got["pixel_values"][row, k:].any() and not got["aspect_ratio_ids"][row, k:].any()
        assert torch.equal(got["cross_attention_mask"][row, -n:, :k], alone["cross_attention_mask"][0])
        assert not got["cross_attention_mask"][row, :-n].any() and not got["cross_attention_mask"][row, :, k:].any()


def test_a_row_without_images_in_a_batch(saved):
    # transformers' processor mis-shapes this batch (aspect_ratio_ids lose the empty row); ours keeps every row
    ours = MllamaProcessor.from_pretrained(saved)
    got = ours([CONVERSATIONS["no image, a system message"], CONVERSATIONS["one image, square"]])
    alone = ours(CONVERSATIONS["one image, square"])
    assert got["pixel_values"].shape == (2, 1, 4, 3, TILE, TILE) and not got["pixel_values"][0].any()
    assert got["aspect_ratio_ids"].tolist() == [[0], alone["aspect_ratio_ids"][0].tolist()]
    assert got["aspect_ratio_mask"][0].tolist() == [[1, 0, 0, 0]]  # the first tile marked, as for any empty slot
    assert not got["cross_attention_mask"][0].any()
    assert torch.equal(got["pixel_values"][1], alone["pixel_values"][0])


def test_written_out_prompts_get_bos_after_leading_images(saved):
    ours = MllamaProcessor.from_pretrained(saved)
    ref = reference(saved)
    texts = ["<|image|>What is this?", "<|image|><|image|>Compare them.<|image|> And this?"]
    images = [[PHOTOS["square"]], [PHOTOS["wide"], PHOTOS["small"], PHOTOS["tall"]]]
    want = dict(ref(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))
    assert_same(ours(text=texts, images=images), want)
    assert_same(ours(text=texts, images=[im for row in images for im in row]), want)  # a flat list, dealt out
    ids = ours(text="<|image|>What is this?", images=PHOTOS["square"])["input_ids"][0].tolist()
    image, bos = ours.image_token_id, ours.tokenizer.bos_token_id
    assert ids[:3] == [bos, image, bos]  # the tokenizer's bos, then <|image|><|begin_of_text|>, as transformers


def test_checkpoint_tiles_of_560(tmp_path):
    save_processor(tmp_path, tile=560)
    ours = MllamaProcessor.from_pretrained(tmp_path)
    conversation = [ask("Compare.", _photo("coffee"), PHOTOS["small"])]
    got = ours(conversation)
    assert_same(got, run_reference(reference(tmp_path), conversation))
    assert got["aspect_ratio_ids"].tolist() == [[2, 1]]  # 400 x 600 -> (1, 2) tiles of 560; 45 x 30 -> (1, 1)


def test_loads_the_hub_layout(saved, tmp_path):
    # the hub's files (transformers 4.x): preprocessor_config.json, chat_template.json; config.json's ids and sizes
    hub = tmp_path / "hub"
    shutil.copytree(saved, hub)
    config = json.loads((hub / "processor_config.json").read_text())
    (hub / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor")))
    (hub / "processor_config.json").write_text(json.dumps(config))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": (hub / "chat_template.jinja").read_text()}))
    (hub / "chat_template.jinja").unlink()
    image_id = MllamaProcessor.from_pretrained(saved).image_token_id
    model = {"model_type": "mllama", "image_token_index": image_id, "text_config": {"max_position_embeddings": 4096},
             "vision_config": {"image_size": TILE, "max_num_tiles": 4}}
    (hub / "config.json").write_text(json.dumps(model))
    ours = MllamaProcessor.from_pretrained(hub)
    assert ours.context_length == 4096
    conversation = CONVERSATIONS["wide and tall, one prompt"]
    assert_same(ours(conversation), run_reference(reference(saved), conversation))


# ------------------------------------------------------------------------------------------ refusals


def test_too_many_images_refused_before_any_is_read(saved, tmp_path):
    missing = tmp_path / "never-opened.png"
    ours = MllamaProcessor.from_pretrained(saved, max_images=2)
    with pytest.raises(ValueError, match=r"the conversation has 3 images, over the limit of 2 per prompt"):
        ours([ask("Three.", missing, missing, missing)])
    with pytest.raises(ValueError, match=r"text 1 has 3 images, over the limit of 2"):
        ours(text=["<|image|>a", "<|image|><|image|><|image|>b"], images=[[missing], [missing] * 3])
    with pytest.raises(ValueError, match="max_images=0"):
        MllamaProcessor.from_pretrained(saved, max_images=0)


def test_image_over_the_pixel_guard_is_refused_from_its_header(saved):
    from test_processing import _png  # a PNG header claiming a size, nothing behind it

    ours = MllamaProcessor.from_pretrained(saved)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"messages\[0\].content\[1\]: <\d+ bytes>: the header claims 10000x7000 "
                                         r"= 70,000,000 pixels, over the limit of 64,000,000"):
        ours([ask("What is it?", PHOTOS["small"], _png(10_000, 7_000))])
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200  # MiB: nothing was decoded
    with pytest.raises(ImageError, match="over the limit of 100,000"):
        MllamaProcessor.from_pretrained(saved, max_pixels=100_000)([ask("What is it?", _photo("astronaut"))])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: .*not an image"):
        ours([ask("What is it?", b"not an image at all" * 10)])


def test_placeholders_context_and_template_refusals(saved):
    ours = MllamaProcessor.from_pretrained(saved, context_length=40)
    with pytest.raises(ValueError, match=r"has 1 image\(s\) but its prompt has 2 <\|image\|> token"):
        ours([ask("<|image|> here too", PHOTOS["small"])])
    with pytest.raises(ValueError, match=r"2 image\(s\) given for 1 <\|image\|> token"):
        ours(text="<|image|>What?", images=[PHOTOS["small"], PHOTOS["small"]])
    with pytest.raises(ValueError, match=r"over the model's context of 40"):
        ours([ask("Describe the photo in detail, please. " * 4, PHOTOS["small"])])
    with pytest.raises(ChatTemplateError, match="Prompting with images is incompatible with system messages"):
        ours([{"role": "system", "content": "Be brief."}, ask("What?", PHOTOS["small"])])
    with pytest.raises(ValueError, match="remote URL, which is never fetched here"):
        ours([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])


def test_bad_configs_are_refused(saved, tmp_path):
    with pytest.raises(ValueError, match=r"max_image_tiles=0"):
        MllamaImageProcessor(max_image_tiles=0)
    with pytest.raises(ValueError, match=r"max_image_tiles=1000"):
        MllamaImageProcessor(max_image_tiles=1000)
    with pytest.raises(ValueError, match=r"tile_size=-1"):
        MllamaImageProcessor(tile_size=-1)
    with pytest.raises(ValueError, match=r"do_resize / do_pad off"):
        MllamaImageProcessor.from_hf({"do_pad": False})
    with pytest.raises(ValueError, match=r"the square tile"):
        MllamaImageProcessor.from_hf({"size": {"height": 560, "width": 448}})
    with pytest.raises(ValueError, match="got no images"):
        MllamaImageProcessor()([[], []])
    d = tmp_path / "bad"
    shutil.copytree(saved, d)
    (d / "config.json").write_text(json.dumps({"vision_config": {"image_size": 560, "max_num_tiles": 4}}))
    with pytest.raises(ValueError, match=r"vision_config.image_size is 560, but the image processor's is 112"):
        MllamaProcessor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"image_token_index": 3}))
    with pytest.raises(ValueError, match=r"the tokenizer's '<\|image\|>' is id \d+, but config.json's "
                                         "image_token_index is 3"):
        MllamaProcessor.from_pretrained(d)


# ------------------------------------------------------------------------------------------ with the model


def test_our_inputs_drive_the_model_as_transformers_inputs_drive_theirs(saved, tmp_path):
    # a tiny random Llama 3.2 Vision on the processor's 112-px tiles: our processor -> polymodal's model gives
    # transformers' logits and greedy tokens from its processor -> its model, batched with 1 and 2 images
    import polymodal as pm

    ref = reference(saved)
    tok = ref.tokenizer
    config = transformers.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=TILE, patch_size=28, max_num_tiles=4, vision_output_dim=96,
                           intermediate_layers_indices=[0, 1]),
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(0)
    theirs = transformers.MllamaForConditionalGeneration(config).eval()
    theirs.save_pretrained(tmp_path)
    model = pm.load(tmp_path)
    batch = [CONVERSATIONS["one image, square"], CONVERSATIONS["wide and tall, one prompt"]]
    got, want = MllamaProcessor.from_pretrained(saved)(batch), run_reference(ref, batch)
    with torch.no_grad():
        # fp32 on both sides, the same inputs: agreement at float rounding
        torch.testing.assert_close(model(**got), theirs(**want).logits, atol=1e-4, rtol=1e-4)
        want_ids = theirs.generate(**want, max_new_tokens=6, do_sample=False)
    assert model.generate(**got, max_new_tokens=6).tolist() == want_ids.tolist()
