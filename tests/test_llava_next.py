"""LLaVA-NeXT (1.6) against transformers on tiny random configs saved by transformers itself.

The model: LlavaNextForConditionalGeneration's logits for a left-padded batch of images of different sizes and
aspect ratios (different crop grids, bands cut above or beside), greedy generation token for token, each row of the
batch equal to that row alone, a Mistral decoder without a window, the round trip back into transformers, strict
loading, and clear errors for image sizes, pixels and image tokens that disagree.

The processor: against transformers' LlavaNextProcessor (its default torchvision image processor, and the PIL one)
with the tiny byte-level tokenizer of tests/test_llava_processor.py, on scikit-image photos of several aspect
ratios: the same ids, mask and image_sizes, pixels within 1e-5; the refusals before anything is decoded.
"""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_llava_processor import PHOTOS, TEMPLATE, ask, tiny_tokenizer

import polymodal as pm
from polymodal.models.llava_next import LlavaNext
from polymodal.processing.llava_next import LlavaNextProcessor, crop_grid

transformers = pytest.importorskip("transformers")

# fp32 on CPU: the two implementations order their reductions differently (~1e-6 seen on logits of size ~1-10);
# 1e-4 leaves room without hiding a wrong formula, which shows at 1e-2 and above
ATOL = 1e-4
IMAGE = 100  # the image token id
S, PATCH = 32, 8  # the tower's size and patch: 4 x 4 = 16 features per crop, [CLS] dropped
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# (height, width): a 2 x 2 grid cut above and below, 1 x 2 and 2 x 1 grids, a 3 x 1 grid cut beside, a 1 x 1 square
SIZES = [(50, 70), (30, 80), (90, 40), (200, 60), (20, 20)]


def reference(text: str = "llama") -> "transformers.LlavaNextForConditionalGeneration":
    common = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text_config = (transformers.MistralConfig(**common, sliding_window=None, rope_theta=1e6) if text == "mistral"
                   else transformers.LlamaConfig(**common))
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=4, image_size=S, patch_size=PATCH),
        text_config=text_config, image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' N(0, 0.02) init makes a tiny model repeat one token: draw wider weights
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
            elif "embed" in name or "newline" in name:
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = reference()
    path = tmp_path_factory.mktemp("llava-next")
    ref.save_pretrained(path)
    return ref, pm.load(path), path


def count(size) -> int:
    """transformers' processor's count for an image of `size` at this tower (its _get_number_of_features)."""
    proc = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = PATCH, 1, "default"
    proc.image_processor = type("P", (), {"image_grid_pinpoints": PINPOINTS})()
    return proc._get_number_of_features(*size, S, S) - 1


def prompt(*parts) -> list[int]:
    """Token ids from parts: an int list is text, a (height, width) an image slot expanded to its count."""
    ids = [1]
    for p in parts:
        ids += [IMAGE] * count(p) if isinstance(p, tuple) else list(p)
    return ids


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def pixels(sizes, seed: int = 0) -> torch.Tensor:
    """(N, n_max, 3, S, S) random crops for images of `sizes`, as the processor lays them out (zero after each
    image's last crop)."""
    n = [1 + r * c for r, c in (crop_grid(h, w, PINPOINTS, S) for h, w in sizes)]
    px = torch.randn(len(sizes), max(n), 3, S, S, generator=torch.Generator().manual_seed(seed))
    for i, k in enumerate(n):
        px[i, k:] = 0
    return px


def test_loads_as_llava_next_and_counts_as_transformers(pair):
    _, ours, _ = pair
    assert isinstance(ours, LlavaNext) and ours.config.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    for size in [*SIZES, (33, 47), (1000, 1), (1, 1000), (64, 64), (65, 64)]:
        assert ours.config.tokens(*size) == count(size), size
    assert len({count(s) for s in SIZES}) == len(SIZES)  # the sizes exercise different grids and cuts


@torch.no_grad()
def test_logits_match_for_a_padded_batch_of_images_of_different_sizes(pair):
    ref, ours, _ = pair
    sizes = SIZES[:4]
    ids, mask = left_pad([prompt(sizes[0], [5, 6, 7]), prompt([9], sizes[1], [10], sizes[2]),
                          prompt(sizes[3], [11, 12])])
    px, hw = pixels(sizes), torch.tensor(sizes)
    want = ref(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=hw).logits
    got = ours(ids, mask, pixel_values=px, image_sizes=hw)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    # the crops concatenated (4-D, transformers' other form) give the same
    flat = torch.cat([p[: 1 + r * c] for p, (r, c) in zip(px, (crop_grid(*s, PINPOINTS, S) for s in sizes))])
    torch.testing.assert_close(ours(ids, mask, pixel_values=flat, image_sizes=hw), got, atol=0, rtol=0)


@torch.no_grad()
def test_greedy_generation_token_for_token_and_rows_alone(pair):
    ref, ours, _ = pair
    rows = [prompt(SIZES[0], [5, 6, 7, 8]), prompt([9, 10], SIZES[4], [11]), prompt([12, 13, 14])]
    ids, mask = left_pad(rows)
    sizes = [SIZES[0], SIZES[4]]  # the third prompt has no image
    px, hw = pixels(sizes, seed=3), torch.tensor(sizes)
    want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=hw, max_new_tokens=10,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, image_sizes=hw, max_new_tokens=10,
                        eos_token_id=[])
    assert got.tolist() == want.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) > 2  # the weights make it say something, not one token
    for i, (row, k) in enumerate(zip(rows, (0, 1, None))):  # each row alone gives what it gives in the batch
        extras = {} if k is None else {"pixel_values": px[k : k + 1], "image_sizes": hw[k : k + 1]}
        alone = ours.generate(torch.tensor([row]), max_new_tokens=10, eos_token_id=[], **extras)
        assert alone[0, len(row):].tolist() == got[i, ids.shape[1]:].tolist()


@torch.no_grad()
def test_mistral_decoder_without_a_window(tmp_path):
    ref = reference("mistral")
    ref.save_pretrained(tmp_path)
    ours = pm.load(tmp_path)
    assert ours.config.text_model_type == "mistral" and ours.config.text.rope_theta == 1e6
    ids = torch.tensor([prompt(SIZES[1], [5, 6])])
    px, hw = pixels(SIZES[1:2], seed=4), torch.tensor(SIZES[1:2])
    torch.testing.assert_close(ours(ids, pixel_values=px, image_sizes=hw),
                               ref(input_ids=ids, pixel_values=px, image_sizes=hw).logits, atol=ATOL, rtol=0)
    want = ref.generate(input_ids=ids, pixel_values=px, image_sizes=hw, max_new_tokens=6, do_sample=False,
                        eos_token_id=None)
    assert ours.generate(ids, pixel_values=px, image_sizes=hw, max_new_tokens=6, eos_token_id=[]).tolist() == \
        want.tolist()
    pm.save(ours, tmp_path / "back")  # written back as a Mistral, without a window
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back").text_config.sliding_window is None
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["sliding_window"] = 16  # shorter than its 512 positions: refused by name
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window 16: a Mistral decoder that attends over a sliding window"):
        pm.load(tmp_path)


@torch.no_grad()
def test_saves_back_into_transformers_and_loads_strictly(pair, tmp_path):
    ref, ours, path = pair
    pm.save(ours, tmp_path / "back")
    back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([prompt(SIZES[2], [5, 6])])
    px, hw = pixels(SIZES[2:3], seed=5), torch.tensor(SIZES[2:3])
    assert torch.equal(back(input_ids=ids, pixel_values=px, image_sizes=hw).logits,
                       ref(input_ids=ids, pixel_values=px, image_sizes=hw).logits)
    assert torch.equal(pm.load(tmp_path / "back")(ids, pixel_values=px, image_sizes=hw),
                       ours(ids, pixel_values=px, image_sizes=hw))
    # transformers 5.x's own names (model.image_newline, model.language_model.*, ...) load as well
    tensors = load_file(path / "model.safetensors")
    renamed = {("model." + k if k.startswith(("image_newline", "vision_tower", "multi_modal_projector")) else
                k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head",
                                                                                    "lm_head")): v
               for k, v in tensors.items()}
    five = tmp_path / "five"
    five.mkdir()
    (five / "config.json").write_text((path / "config.json").read_text())
    save_file(renamed, five / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(pm.load(five)(ids, pixel_values=px, image_sizes=hw), ours(ids, pixel_values=px, image_sizes=hw))
    # strict: a missing newline is one error naming it
    del renamed["model.image_newline"]
    save_file(renamed, five / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="image_newline"):
        pm.load(five)


@torch.no_grad()
def test_images_sizes_and_tokens_must_agree(pair):
    _, ours, _ = pair
    ids = torch.tensor([prompt(SIZES[0], [5, 6])])
    px, hw = pixels(SIZES[:1]), torch.tensor(SIZES[:1])
    with pytest.raises(ValueError, match="come with image_sizes"):
        ours(ids, pixel_values=px)
    n = count(SIZES[0])
    with pytest.raises(ValueError, match=rf"need {n} = {n} image tokens in the prompt, found 0"):
        ours(torch.tensor([[1, 5, 6]]), pixel_values=px, image_sizes=hw)
    with pytest.raises(ValueError, match=rf"2 image\(s\) of sizes .* found {n}"):
        ours(ids, pixel_values=pixels(SIZES[:2]), image_sizes=torch.tensor(SIZES[:2]))
    # the pixels of a 1 x 2 grid (3 slots) for an image whose 2 x 2 grid needs 5: refused before the tower runs
    with pytest.raises(ValueError, match=r"do not fit image_sizes: 1 image\(s\) of up to 5 crops"):
        ours(ids, pixel_values=pixels(SIZES[4:]), image_sizes=hw)
    with pytest.raises(ValueError, match="image_sizes must be"):
        ours(ids, pixel_values=px, image_sizes=torch.tensor([[50.0, 70.0]]))
    with pytest.raises(ValueError, match="image_sizes came without pixel_values"):
        ours(ids[:, :3], image_sizes=hw)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        ours(ids)
    assert ours.media_tokens(pixel_values=px, image_sizes=hw) == {IMAGE: count(SIZES[0])}


def test_presets_have_the_real_sizes():
    from polymodal.models.llava_next import PRESETS

    with torch.device("meta"):
        seven = LlavaNext(PRESETS["llava-hf/llava-v1.6-vicuna-7b-hf"])
        mistral = LlavaNext(PRESETS["llava-hf/llava-v1.6-mistral-7b-hf"])
    assert 7.0e9 < sum(p.numel() for p in seven.parameters()) < 7.1e9  # LLaVA-1.5-7B's 7,063 M and the newline
    assert 7.5e9 < sum(p.numel() for p in mistral.parameters()) < 7.6e9  # Mistral-7B's 7,242 M, ViT-L/14-336, MLP
    # a 1024 x 1024 photo: 2 x 2 crops of 24 x 24 features, each of the 48 rows with its newline, and the whole 576
    assert PRESETS["llava-hf/llava-v1.6-vicuna-7b-hf"].tokens(1024, 1024) == 576 + 48 * 49


# ------------------------------------------------------------------------------------------ the processor

TILE = 336  # the released tower's size, with its default pinpoints; the tokenizer of tests/test_llava_processor.py
WIDE = PHOTOS["coffee"].resize((1500, 300))  # a 1 x 3 canvas, bands above and below
TALL = PHOTOS["rocket"].transpose(Image.Transpose.ROTATE_90)  # 427 x 640 on a 2 x 1 canvas, bands beside


def save_processor(path, patch_size: int = 14, image_processor=None):
    """transformers' LlavaNextProcessor for a 336-px tower saved to `path` -> that processor (reloaded). As in
    llava-hf's files, num_additional_image_tokens=1 counts the [CLS] that "default" drops."""
    images = image_processor or transformers.LlavaNextImageProcessor(size={"shortest_edge": TILE},
                                                                      crop_size={"height": TILE, "width": TILE})
    proc = transformers.LlavaNextProcessor(image_processor=images, tokenizer=tiny_tokenizer(), patch_size=patch_size,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                           chat_template=TEMPLATE)
    proc.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-next-processor")
    return save_processor(path), path


def processed(proc, conversations) -> dict:
    return dict(proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt",
                                         processor_kwargs={"padding": True, "padding_side": "left"}))


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want) & {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    if "pixel_values" in want:
        assert got["image_sizes"].tolist() == want["image_sizes"].tolist()
        assert got["pixel_values"].shape == want["pixel_values"].shape
        # the same uint8 resampling kernels and fused normalization: 0 seen (PIL's: 2.4e-7, its rescale and
        # normalize are two float32 steps); 1e-5 is the bound asked of a processor
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


BATCH = [[ask("What is shown in this image?", PHOTOS["astronaut"])],  # square: a 2 x 2 canvas
         [ask("Compare the cup and the cat.", PHOTOS["coffee"], PHOTOS["chelsea"])],
         [ask("Describe the photo.", TALL), {"role": "assistant", "content": [{"type": "text", "text": "A rocket."}]},
          ask("And this one?", WIDE)],
         [ask("Describe the photo in detail, please.")]]


def test_processor_equals_transformers(saved):
    ref, path = saved
    ours = LlavaNextProcessor.from_pretrained(path)
    got = ours(BATCH)
    assert_same(got, processed(ref, BATCH))
    assert got["pixel_values"].shape == (5, 5, 3, TILE, TILE)  # 5 images, at most 2 x 2 crops + the whole image
    sizes = [(512, 512), (400, 600), (300, 451), (640, 427), (300, 1500)]
    assert got["image_sizes"].tolist() == [list(s) for s in sizes]
    per_image = [ours.tokens(*s) for s in sizes]
    assert int((got["input_ids"] == ours.image_token_id).sum()) == sum(per_image)
    assert len(set(per_image)) == len(per_image)  # five grids and cuts
    for row, conversation in enumerate(BATCH):  # each row is that conversation alone, left-padded
        alone = ours(conversation)
        n = alone["input_ids"].shape[1]
        assert got["input_ids"][row, -n:].tolist() == alone["input_ids"][0].tolist()


def test_written_out_prompts_and_the_pil_backend(saved):
    ref, path = saved
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\n<image>\nCompare them. ASSISTANT:"]
    images = [WIDE, PHOTOS["chelsea"], TALL]
    want = dict(ref(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))
    assert_same(LlavaNextProcessor.from_pretrained(path)(text=texts, images=images), want)
    pil = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(size={"shortest_edge": TILE},
                                                                crop_size={"height": TILE, "width": TILE}),
        tokenizer=ref.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE)
    ours = LlavaNextProcessor.from_pretrained(path, backend="pil")
    assert_same(ours(BATCH[:3]), processed(pil, BATCH[:3]))


def test_processor_refusals_before_decoding(saved, tmp_path):
    from test_processing import _png  # a PNG header claiming a size, nothing behind it

    _, path = saved
    ours = LlavaNextProcessor.from_pretrained(path, context_length=3000)
    missing = tmp_path / "never-opened.png"
    with pytest.raises(ValueError, match=r"has 0 image\(s\) but its prompt has 1 <image>"):
        ours([ask("<image> where is the picture?")])
    with pytest.raises(ValueError, match=r"2 image\(s\) given for 1 <image> token"):
        ours(text="USER: <image>\nWhat? ASSISTANT:", images=[missing, missing])
    # headers alone: two 1000 x 1000 images are 2 x 2,928 tokens, over a context of 3,000; never decoded (the
    # files hold no pixels, a decode would fail otherwise)
    header = _png(1000, 1000)
    with pytest.raises(ValueError, match=r"once its 2 image\(s\) are expanded to 2928 tokens each, over the "
                                         r"model's context of 3,000"):
        ours([ask("Compare them.", header, header)])
    with pytest.raises(ValueError, match="over the limit of 1,000 \\(max_visual_tokens\\)"):
        LlavaNextProcessor.from_pretrained(path, max_visual_tokens=1000)([ask("What is it?", header)])
    with pytest.raises(ValueError, match=r"the header claims 10000x7000 = 70,000,000 pixels, over the limit"):
        ours([ask("What is it?", _png(10_000, 7_000))])
    # a checkpoint whose canvases are not whole crops, or differ from the model's
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "processor_config.json").read_text())
    config["image_processor"]["image_grid_pinpoints"] = [[336, 500]]
    (bad / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="336x500 is not a grid of whole 336-px crops"):
        LlavaNextProcessor.from_pretrained(bad)
    (bad / "processor_config.json").write_text((path / "processor_config.json").read_text())
    (bad / "config.json").write_text(json.dumps({"model_type": "llava_next", "image_grid_pinpoints": [[336, 672]]}))
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaNextProcessor.from_pretrained(bad)


# ------------------------------------------------------------------------------------------ pipeline and CLI

NEW = 8


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random LlavaNextForConditionalGeneration over a 336-px tower of 28-px patches (12 x 12 features a
    crop), saved by transformers beside its LlavaNextProcessor's files -> (model, processor, path)."""
    path = tmp_path_factory.mktemp("llava-next-chat")
    processor = save_processor(path, patch_size=28)
    tok = processor.tokenizer
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=TILE, patch_size=28),
        text_config=transformers.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=processor.image_token_id, image_seq_length=144)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # wider than transformers' init, so that the answer is not one token repeated
        for name, p in model.named_parameters():
            if p.dim() == 2 or "newline" in name:
                p.normal_(0, 1.0 if "embed" in name or "newline" in name else 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model, processor, path


def test_pipeline_and_cli_chat_answer_as_transformers(chat_model, tmp_path, capsys):
    from polymodal.cli import main

    model, processor, path = chat_model
    conversation = [ask("What is shown in this image?", TALL)]
    inputs = processed(processor, [conversation])
    eos = processor.tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                         pad_token_id=processor.tokenizer.pad_token_id)
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    want = want[: want.index(eos)] if eos in want else want
    assert len(set(want)) > 2  # the weights make it say something
    text = processor.tokenizer.decode(want, skip_special_tokens=True)
    pipe = pm.pipeline("image-text-to-text", model=path)
    assert isinstance(pipe.processor, LlavaNextProcessor)  # found through the family's record
    (answer,) = pipe(conversation, max_new_tokens=NEW)
    assert answer["generated_text"] == [*conversation, {"role": "assistant", "content": text}]
    photo = tmp_path / "rocket.png"
    TALL.save(photo)
    assert main(["chat", "--model", str(path), "--image", str(photo), "What is shown in this image?",
                 "--max-new-tokens", str(NEW), "--json"]) == 0
    (cli,) = json.loads(capsys.readouterr().out)
    assert cli["generated_text"][-1] == {"role": "assistant", "content": text}
    assert main(["chat", "--model", str(path), "--image", str(tmp_path / "missing.png"), "Hi?"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "no such file" in err


def test_serving_engine_batches_image_requests_of_different_sizes(pair, tmp_path):
    """The server's continuous batch takes image_sizes as an extra prefill input: requests with images of different
    grids and a text-only one, decoded together, each equal to `generate` alone; a prompt whose image tokens do not
    match its image's size is refused at submit."""
    from polymodal.generation import generate
    from polymodal.processing import TextTokenizer
    from polymodal.serve.engine import ChatEngine, Finished

    _, ours, _ = pair
    tiny_tokenizer().save_pretrained(tmp_path)
    rows = [prompt(SIZES[0], [5, 6]), prompt([7, 8]), prompt(SIZES[3], [9])]
    extras = [{"pixel_values": pixels(SIZES[:1]), "image_sizes": torch.tensor(SIZES[:1])}, {},
              {"pixel_values": pixels(SIZES[3:4], 2), "image_sizes": torch.tensor(SIZES[3:4])}]
    with ChatEngine(ours, TextTokenizer.from_pretrained(tmp_path), max_batch=4) as engine:
        requests = [engine.submit(r, extras=e, max_new_tokens=6) for r, e in zip(rows, extras)]
        got = [[ev.token_id for ev in r.events() if not isinstance(ev, Finished)] for r in requests]
        with pytest.raises(ValueError, match=rf"holds {count(SIZES[0])} placeholder tokens .* its images fill "
                                             rf"{count(SIZES[3])}"):
            engine.submit(rows[0], extras={"pixel_values": extras[0]["pixel_values"],
                                           "image_sizes": extras[2]["image_sizes"]})
    for ids, e, tokens in zip(rows, extras, got):
        alone = generate(ours, torch.tensor([ids]), max_new_tokens=6, eos_token_id=[], **e)
        assert tokens == alone[0, len(ids):].tolist()
