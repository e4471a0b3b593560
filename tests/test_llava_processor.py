"""LLaVA's processor against transformers' LlavaProcessor, with a tiny tokenizer (a byte-level BPE with "<image>" and
a LLaVA-1.5 chat template) and a 336-px CLIP image processor saved by transformers: the same ids and mask and pixel
values within 1e-5 on scikit-image photos of several sizes and aspect ratios, one image, several, in later turns,
none, left-padded batches; every image-part form; LLaVA-1.5's pad-to-square against a direct computation; and the
refusals (image tokens and images that disagree, a prompt over the context, an image over the pixel budget, remote
URLs), each raised before anything large is allocated."""

import base64
import io
import json
import resource
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processing import ImageError, ImageProcessor, LlavaProcessor

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

# LLaVA-1.5's template as llava-hf ships it: images of a message first, then its text
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CORPUS = ["USER: What is shown in this image? ASSISTANT: A cat sitting on a table.",
          "Describe the photo in detail, please. What colour is the cup? Where is the rocket going?",
          "An astronaut in a white suit; a cup of coffee; a tabby cat; a rocket on its launch pad."]
PHOTOS = {name: Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")}


def tiny_tokenizer():
    """A byte-level BPE that puts <s> first (as LLaVA's Llama tokenizer does), with "<image>" as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def clip_336(**kw):
    return transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **kw)


def save_processor(path, patch_size: int = 14, image_processor=None, template: str = TEMPLATE):
    """transformers' LlavaProcessor for a 336-px tower, saved to `path` -> that processor (reloaded). As in llava-hf's
    files, num_additional_image_tokens=1 counts the [CLS] that "default" drops: (336 / 14)^2 = 576 per image."""
    proc = transformers.LlavaProcessor(image_processor=image_processor or clip_336(), tokenizer=tiny_tokenizer(),
                                       patch_size=patch_size, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=template)
    proc.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-processor")
    return save_processor(path), path


def ask(text: str, *images, role: str = "user") -> dict:
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def reference(proc, conversations) -> dict:
    out = proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"})
    return dict(out)


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want) & {"input_ids", "attention_mask", "pixel_values"}
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    if "pixel_values" in want:
        # the same uint8 resampling kernel and fused normalization: 0 seen; 1e-5 is the bound asked of a processor
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


CONVERSATIONS = {
    "one image, square": [ask("What is shown in this image?", PHOTOS["astronaut"])],
    "two images, wide": [ask("Compare the cup and the cat.", PHOTOS["coffee"], PHOTOS["chelsea"])],
    "image in a later turn": [ask("Describe the photo.", PHOTOS["chelsea"]),
                              {"role": "assistant", "content": [{"type": "text", "text": "A tabby cat."}]},
                              ask("And this one, where is the rocket going?", PHOTOS["rocket"])],
    "no image": [ask("Describe the photo in detail, please.")],
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_equal_to_transformers(saved, case):
    ref, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    conversation = CONVERSATIONS[case]
    got, want = ours(conversation), reference(ref, conversation)
    assert_same(got, want)
    images = sum(part["type"] == "image" for m in conversation for part in m["content"])
    assert int((got["input_ids"] == ours.image_token_id).sum()) == 576 * images  # (336 / 14)^2, [CLS] dropped
    assert got["input_ids"][0, 0] == ours.tokenizer.bos_token_id  # the Llama tokenizer's <s>, as the reference
    assert ("pixel_values" in got) == bool(images)


def test_batch_left_padded_images_in_reading_order(saved):
    ref, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    batch = [CONVERSATIONS["image in a later turn"], CONVERSATIONS["no image"], CONVERSATIONS["two images, wide"]]
    got = ours(batch)
    assert_same(got, reference(ref, batch))
    assert got["pixel_values"].shape == (4, 3, 336, 336)
    alone = [ours(c) for c in batch]
    each = [a["pixel_values"] for a in alone if "pixel_values" in a]
    assert torch.equal(got["pixel_values"], torch.cat(each))
    for row, a in zip(range(3), alone):  # each row is that conversation alone, left-padded
        n = a["input_ids"].shape[1]
        assert got["input_ids"][row, -n:].tolist() == a["input_ids"][0].tolist()
        assert got["attention_mask"][row].sum() == n


def test_written_out_prompts_with_images(saved):
    ref, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\n<image>\nCompare them. ASSISTANT:"]
    images = [PHOTOS["rocket"], PHOTOS["coffee"], PHOTOS["astronaut"]]
    want = dict(ref(text=texts, images=[images[:1], images[1:]], padding=True, padding_side="left",
                    return_tensors="pt"))
    assert_same(ours(text=texts, images=images), want)
    assert_same(ours(text=texts, images=[images[:1], images[1:]]), want)


def test_every_image_part_form_gives_the_same_inputs(saved, tmp_path):
    _, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    file = tmp_path / "cat.png"
    PHOTOS["chelsea"].save(file)
    data = file.read_bytes()
    b64 = base64.b64encode(data).decode()
    want = ours([ask("What is it?", PHOTOS["chelsea"])])
    forms = [{"type": "image", "image": str(file)}, {"type": "image", "image": data}, {"type": "image", "path": file},
             {"type": "image", "url": f"data:image/png;base64,{b64}"}, {"type": "image", "base64": b64},
             {"type": "image", "image": f"data:image/png;base64,{b64}"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
             {"type": "image_url", "image_url": f"data:image/png;base64,{b64}"}]
    for part in forms:
        got = ours([{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}])
        assert got["input_ids"].tolist() == want["input_ids"].tolist(), part["type"]
        assert torch.equal(got["pixel_values"], want["pixel_values"]), str(part)[:60]


def test_string_contents_are_text_parts(saved):
    # LLaVA's template iterates over parts and would drop a string content without a word
    _, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    as_parts = [ask("Describe it.", PHOTOS["coffee"]), {"role": "assistant", "content": [{"type": "text",
                "text": "A cup of coffee."}]}, ask("What colour is the cup?")]
    as_strings = [as_parts[0], {"role": "assistant", "content": "A cup of coffee."},
                  {"role": "user", "content": "What colour is the cup?"}]
    got = ours(as_strings)
    assert got["input_ids"].tolist() == ours(as_parts)["input_ids"].tolist()
    assert "A cup of coffee." in ours.decode(got["input_ids"][0])


def test_loads_the_hub_layout(saved, tmp_path):
    # llava-hf's files (transformers 4.x): preprocessor_config.json, processor_config.json without the image
    # processor, chat_template.json; without num_additional_image_tokens (0) "default" drops one of the 576 patches
    ref, path = saved
    hub = tmp_path / "hub"
    shutil.copytree(path, hub)
    config = json.loads((hub / "processor_config.json").read_text())
    (hub / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor")))
    del config["num_additional_image_tokens"]
    (hub / "processor_config.json").write_text(json.dumps(config))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": (hub / "chat_template.jinja").read_text()}))
    (hub / "chat_template.jinja").unlink()
    ours = LlavaProcessor.from_pretrained(hub)
    assert ours.image_tokens == 575  # transformers' count: the patches, minus the [CLS] it assumes was there
    conversation = CONVERSATIONS["two images, wide"]
    assert_same(ours(conversation), reference(transformers.AutoProcessor.from_pretrained(hub), conversation))


# ------------------------------------------------------------------------------------------ pad to square


def expand2square(im: Image.Image, color) -> Image.Image:
    """LLaVA-1.5's own preprocessing (llava/mm_utils.py), written out: the image centered on a square canvas."""
    w, h = im.size
    side = max(w, h)
    out = Image.new(im.mode, (side, side), color)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea", "astronaut"])
def test_pad_to_square_equals_llava_15s_expand2square(name):
    clip = ImageProcessor.clip(336)
    mean_color = tuple(int(m * 255) for m in clip.image_mean)
    assert mean_color == (122, 116, 104)
    tall = PHOTOS[name].transpose(Image.Transpose.ROTATE_90)  # a tall image too
    for im in (PHOTOS[name], tall):
        got = clip.replace(pad_to_square=True)(im)
        want = clip(expand2square(im, mean_color))
        assert torch.equal(got, want)
        if im.width != im.height:  # the crop of the unpadded image cuts the sides off
            assert not torch.equal(clip(im), got)
            # the padding is there: the first columns (or rows) of the padded image hold the mean color
            edge = got[0, :, :, 0] if im.width < im.height else got[0, :, 0, :]
            mean = (torch.tensor(mean_color) / 255 - torch.tensor(clip.image_mean)) / torch.tensor(clip.image_std)
            torch.testing.assert_close(edge, mean[:, None].expand_as(edge), atol=0.02, rtol=0)


def test_pad_to_square_from_the_checkpoint_and_the_override(tmp_path):
    ref = save_processor(tmp_path, image_processor=transformers.LlavaImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True))
    conversation = [ask("Compare them.", PHOTOS["rocket"], PHOTOS["coffee"])]
    padded = LlavaProcessor.from_pretrained(tmp_path)
    assert padded.image_processor.pad_to_square
    assert_same(padded(conversation), reference(ref, conversation))  # transformers' do_pad=True
    plain = LlavaProcessor.from_pretrained(tmp_path, pad_to_square=False)
    assert not torch.equal(plain(conversation)["pixel_values"], padded(conversation)["pixel_values"])
    clip = ImageProcessor.clip(336)
    assert torch.equal(plain(conversation)["pixel_values"], clip([PHOTOS["rocket"], PHOTOS["coffee"]]))


def test_default_follows_the_checkpoint(saved):
    _, path = saved  # llava-hf's files have no do_pad: no padding, as transformers
    assert not LlavaProcessor.from_pretrained(path).image_processor.pad_to_square
    assert LlavaProcessor.from_pretrained(path, pad_to_square=True).image_processor.pad_to_square


# ------------------------------------------------------------------------------------------ refusals


def test_images_and_image_tokens_must_agree(saved, tmp_path):
    _, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    missing = tmp_path / "never-opened.png"  # the count is checked before any image is opened
    typed = [{"role": "user", "content": [{"type": "image", "path": missing}, {"type": "text", "text": "<image> hi"}]}]
    with pytest.raises(ValueError, match=r"has 1 image\(s\) but its prompt has 2 <image> token\(s\)"):
        ours(typed)
    with pytest.raises(ValueError, match=r"has 0 image\(s\) but its prompt has 1 <image>"):
        ours([ask("<image> where is the picture?")])
    no_slot = LlavaProcessor.from_pretrained(path)
    with pytest.raises(ValueError, match=r"conversation 1 has 1 image\(s\) but its prompt has 0"):
        no_slot([[ask("hi")], [ask("hi", missing)]], chat_template="{% for m in messages %}{{ m['role'] }}"
                "{% endfor %}")
    with pytest.raises(ValueError, match=r"2 image\(s\) given for 1 <image> token"):
        ours(text="USER: <image>\nWhat? ASSISTANT:", images=[missing, missing])
    with pytest.raises(ValueError, match="images go inside them"):
        ours([ask("hi")], images=[PHOTOS["coffee"]])


def test_prompt_over_the_context_is_refused_before_the_images_are_read(saved, tmp_path):
    _, path = saved
    ours = LlavaProcessor.from_pretrained(path, context_length=1000)
    missing = tmp_path / "never-opened.png"
    with pytest.raises(ValueError, match=r"is 1,1\d\d tokens once its 2 image\(s\) are expanded to 576 tokens each, "
                                         r"over the model's context of 1,000"):
        ours([ask("Compare them.", missing, missing)])
    assert ours([ask("What is it?", PHOTOS["coffee"])])["input_ids"].shape[1] < 1000


def test_image_over_the_pixel_budget(saved):
    from test_processing import _png  # a PNG header claiming a size, nothing behind it

    _, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"messages\[0\].content\[0\]: <\d+ bytes>: the header claims 10000x7000 "
                                         r"= 70,000,000 pixels, over the limit of 64,000,000"):
        ours([ask("What is it?", _png(10_000, 7_000))])  # 210 MB decoded
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200  # MiB: nothing was decoded
    small = LlavaProcessor.from_pretrained(path, max_pixels=100_000)
    with pytest.raises(ImageError, match="over the limit of 100,000"):
        small([ask("What is it?", PHOTOS["astronaut"])])  # 512 x 512, already decoded: checked all the same


def test_remote_urls_are_never_fetched(saved, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("the processor opened a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    _, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    for part in ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                 {"type": "image", "url": "http://example.com/cat.png"},
                 {"type": "image", "image": "https://example.com/cat.png"}):
        with pytest.raises(ValueError, match="remote URL, which is never fetched here"):
            ours([{"role": "user", "content": [part]}])
    with pytest.raises(ValueError, match="only data: URLs"):
        ours([{"role": "user", "content": [{"type": "image", "url": "file:///etc/passwd"}]}])
    with pytest.raises(ValueError, match="invalid base64"):
        ours([{"role": "user", "content": [{"type": "image", "url": "data:image/png;base64,&&&"}]}])
    with pytest.raises(ValueError, match="expected one of 'image'"):
        ours([{"role": "user", "content": [{"type": "image"}]}])


def test_checkpoint_whose_image_token_disagrees_with_the_model(saved, tmp_path):
    _, path = saved
    d = tmp_path / "bad"
    shutil.copytree(path, d)
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "image_token_index": 7,
                                               "text_config": {"max_position_embeddings": 4096}}))
    with pytest.raises(ValueError, match=r"the tokenizer's '<image>' is id 300, but config.json's image_token_index "
                                         r"is 7"):
        LlavaProcessor.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "image_token_index": 300,
                                               "text_config": {"max_position_embeddings": 4096}}))
    assert LlavaProcessor.from_pretrained(d).context_length == 4096


def test_non_rgb_inputs_and_arrays(saved):
    # a grayscale PNG and an RGBA one come out as transformers' convert_to_rgb makes them
    ref, path = saved
    ours = LlavaProcessor.from_pretrained(path)
    gray = Image.fromarray(skimage_data.camera())
    rgba = PHOTOS["coffee"].convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(400 * 600) % 256).astype(np.uint8).reshape(400, 600)))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    conversation = [ask("Two pictures.", gray, Image.open(io.BytesIO(buf.getvalue())))]
    assert_same(ours(conversation), reference(ref, conversation))
