"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration on tiny random configs saved by transformers
itself: logits, greedy generation token for token (a batch of prompts with different images, a prompt with two
images, a prompt with no image, left padding), each row of a batch equal to that row alone, the round trip back
into transformers, and clear errors for mismatched images and image tokens."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import polymodal as pm
from polymodal.models.llava import Llava

# fp32 on CPU: the two implementations order their reductions differently (~1e-6 seen on logits of size ~1-10);
# 1e-4 leaves room without hiding a wrong formula, which shows at 1e-2 and above
ATOL = 1e-4
IMAGE = 100  # the image token id
FEATURES = 16  # (32 / 8) ** 2 patches per image, [CLS] dropped ("default")


def reference(strategy: str = "default", layer: int = -2) -> LlavaForConditionalGeneration:
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=IMAGE, vision_feature_select_strategy=strategy, vision_feature_layer=layer,
        image_seq_length=FEATURES + (strategy == "full"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' N(0, 0.02) init makes a tiny model repeat one token: draw wider weights
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
            elif "embed" in name:
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = reference()
    path = tmp_path_factory.mktemp("llava")
    ref.save_pretrained(path)
    return ref, pm.load(path), path


def prompt(*parts, n=FEATURES) -> list[int]:
    """Token ids from parts: an int list is text, "img" an image slot expanded to its feature count."""
    ids = [1]
    for p in parts:
        ids += [IMAGE] * n if p == "img" else list(p)
    return ids


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_loads_as_llava(pair):
    _, ours, _ = pair
    assert isinstance(ours, Llava) and ours.config.image_token_index == IMAGE
    assert ours.config.image_tokens == FEATURES


@torch.no_grad()
def test_logits_match_for_a_padded_batch_with_different_images(pair):
    ref, ours, _ = pair
    ids, mask = left_pad([prompt("img", [5, 6, 7, 8]), prompt([9, 10], "img", [11])])
    px = pixels(2)
    want = ref(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    got = ours(ids, mask, pixel_values=px)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_two_images_in_one_prompt_and_a_prompt_without_images(pair):
    ref, ours, _ = pair
    ids = torch.tensor([prompt([5], "img", [6, 7], "img", [8, 9])])
    px = pixels(2, seed=1)
    torch.testing.assert_close(ours(ids, pixel_values=px),
                               ref(input_ids=ids, pixel_values=px).logits, atol=ATOL, rtol=0)
    text = torch.tensor([prompt([5, 6, 7, 8, 9])])
    torch.testing.assert_close(ours(text), ref(input_ids=text).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("strategy,layer", [("full", -1), ("default", 1)])
@torch.no_grad()
def test_feature_layer_and_strategy(tmp_path, strategy, layer):
    ref = reference(strategy, layer)
    ref.save_pretrained(tmp_path)
    ours = pm.load(tmp_path)
    n = FEATURES + (strategy == "full")
    ids = torch.tensor([prompt("img", [5, 6], n=n)])
    px = pixels(1, seed=2)
    torch.testing.assert_close(ours(ids, pixel_values=px), ref(input_ids=ids, pixel_values=px).logits,
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_token_for_token(pair):
    ref, ours, _ = pair
    rows = [prompt("img", [5, 6, 7, 8]), prompt([9, 10], "img", [11]), prompt([12, 13, 14])]
    ids, mask = left_pad(rows)
    px = pixels(2, seed=3)  # the third prompt has no image
    want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=12, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=12, eos_token_id=[])
    assert got.tolist() == want.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) > 2  # the weights make it say something, not one token
    # each row alone gives what it gives in the batch
    for i, (row, images) in enumerate(zip(rows, (px[:1], px[1:], None))):
        alone = ours.generate(torch.tensor([row]), pixel_values=images, max_new_tokens=12, eos_token_id=[])
        assert alone[0, len(row):].tolist() == got[i, ids.shape[1]:].tolist()


@torch.no_grad()
def test_two_images_generate_and_static_cache(pair):
    ref, ours, _ = pair
    ids = torch.tensor([prompt([5], "img", [6, 7], "img", [8, 9])])
    px = pixels(2, seed=4)
    want = ref.generate(input_ids=ids, pixel_values=px, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert ours.generate(ids, pixel_values=px, max_new_tokens=10, eos_token_id=[]).tolist() == want.tolist()
    fixed = ours.generate(ids, pixel_values=px, max_new_tokens=10, eos_token_id=[], static_cache=True)
    assert fixed.tolist() == want.tolist()


@torch.no_grad()
def test_saves_back_into_transformers(pair, tmp_path):
    ref, ours, _ = pair
    pm.save(ours, tmp_path)
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([prompt("img", [5, 6])])
    px = pixels(1, seed=5)
    assert torch.equal(back(input_ids=ids, pixel_values=px).logits, ref(input_ids=ids, pixel_values=px).logits)
    assert torch.equal(pm.load(tmp_path)(ids, pixel_values=px), ours(ids, pixel_values=px))


@torch.no_grad()
def test_images_and_image_tokens_must_agree(pair):
    _, ours, _ = pair
    ids = torch.tensor([prompt("img", [5, 6])])
    with pytest.raises(ValueError, match="2 image\\(s\\) of 16 features each need 32 image tokens.*found 16"):
        ours(ids, pixel_values=pixels(2))
    with pytest.raises(ValueError, match="16 image tokens but no pixel_values"):
        ours(ids)
    with pytest.raises(ValueError, match="found 0"):
        ours(torch.tensor([[1, 5, 6]]), pixel_values=pixels(1))


def test_presets_have_the_real_sizes():
    from polymodal.models.llava import PRESETS

    with torch.device("meta"):
        seven = Llava(PRESETS["llava-hf/llava-1.5-7b-hf"])
    total = sum(p.numel() for p in seven.parameters())
    assert 7.0e9 < total < 7.1e9  # 7,063 M: Vicuna-7B (6,738 M with the 64 extra embeddings), ViT-L/14-336, MLP
    assert PRESETS["llava-hf/llava-1.5-7b-hf"].image_tokens == 576
