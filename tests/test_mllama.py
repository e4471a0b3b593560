"""Llama 3.2 Vision against transformers' MllamaForConditionalGeneration on a tiny random config saved by transformers
itself: logits with one image, two images, rows of different aspect ratios (tile counts) and a prompt without images;
greedy generation and beam search token for token; a left-padded batch equal to its rows alone; a text-only row and
image rows in one decode batch (the serving engine's DecoderState.cat); both checkpoint spellings, the round trip
back into transformers, strict loading, and clear errors for inputs that do not fit together."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration

import polymodal as pm
from polymodal.generation import DecoderState
from polymodal.models.mllama import PRESETS, Mllama
from polymodal.registry import family
from polymodal.weights.loader import build_meta

# fp32 on CPU: the two implementations order their reductions differently (~3e-6 seen on logits of size ~5);
# 1e-4 leaves room without hiding a wrong formula, which shows at 1e-2 and above
ATOL = 1e-4
IMAGE = 110  # <|image|>
TILES = {1: 1, 2: 2, 5: 2, 6: 4}  # aspect ratio id -> tiles: (1, 1), (1, 2), (2, 1), (2, 2) of the default list


def reference() -> MllamaForConditionalGeneration:
    cfg = MllamaConfig(
        # 16 patches + [CLS] = 17 positions a tile, padded to 24: the padding path runs
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
                           attention_heads=4, image_size=32, patch_size=8, max_num_tiles=4,
                           intermediate_layers_indices=[1, 3], vision_output_dim=96),
        text_config=dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3], bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, max_position_embeddings=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
        image_token_index=IMAGE)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers starts every gate at 0 (images would not matter): draw them, and wider weights
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(0.3, 1.0)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = reference()
    path = tmp_path_factory.mktemp("mllama")
    ref.save_pretrained(path)
    return ref, pm.load(path), path


def inputs(rows: list[list[int]], aspects: list[list[int]], seed: int = 0) -> dict:
    """Left-padded ids and the processor's image inputs: each row's images (aspect ratio ids) in order, padded to the
    batch's image count with id 0; image k is seen from its <|image|> token until the next one."""
    T, N = max(map(len, rows)), max(1, max(map(len, aspects)))
    B = len(rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    out = {"input_ids": ids, "attention_mask": mask}
    if not any(aspects):
        return out
    g = torch.Generator().manual_seed(seed)
    px = torch.zeros(B, N, 4, 3, 32, 32)
    ar_ids = torch.zeros(B, N, dtype=torch.long)
    ar_mask = torch.zeros(B, N, 4, dtype=torch.long)
    cam = torch.zeros(B, T, N, 4, dtype=torch.long)
    for b, (row, aspect) in enumerate(zip(rows, aspects)):
        starts = [T - len(row) + i for i, t in enumerate(row) if t == IMAGE]
        for k, a in enumerate(aspect):
            n = TILES[a]
            px[b, k, :n] = torch.randn(n, 3, 32, 32, generator=g)
            ar_ids[b, k], ar_mask[b, k, :n] = a, 1
            end = starts[k + 1] if k + 1 < len(starts) else T
            cam[b, starts[k]:end, k, :n] = 1
    return {**out, "pixel_values": px, "aspect_ratio_ids": ar_ids, "aspect_ratio_mask": ar_mask,
            "cross_attention_mask": cam}


def row(batch: dict, b: int, n_images: int) -> dict:
    """Row b of a batch, alone: its padding and padding images dropped."""
    real = batch["attention_mask"][b].bool()
    out = {"input_ids": batch["input_ids"][b:b + 1, real], "attention_mask": batch["attention_mask"][b:b + 1, real]}
    if n_images:
        out.update(pixel_values=batch["pixel_values"][b:b + 1, :n_images],
                   aspect_ratio_ids=batch["aspect_ratio_ids"][b:b + 1, :n_images],
                   aspect_ratio_mask=batch["aspect_ratio_mask"][b:b + 1, :n_images],
                   cross_attention_mask=batch["cross_attention_mask"][b:b + 1, real, :n_images])
    return out


def test_loads_as_mllama(pair):
    _, ours, _ = pair
    assert isinstance(ours, Mllama)
    c = ours.config
    assert c.image_token_index == IMAGE and c.text.cross_attention_layers == (1, 3)
    assert c.vision.intermediate_layers_indices == (1, 3) and c.text.rope_scaling["rope_type"] == "llama3"
    assert ours.language_model.embed_tokens.weight.shape == (128, 64)  # vocab_size + 8 rows


@torch.no_grad()
def test_logits_one_image_two_images_aspect_ratios_and_text_only(pair):
    ref, ours, _ = pair
    batch = inputs([[1, IMAGE, 5, 6, 7, 8], [1, 9, IMAGE, 10, IMAGE, 11, 12], [1, IMAGE, 13, 14]],
                   [[6], [2, 5], [1]])  # 4 tiles; 2 + 2 tiles; 1 tile (the rest padded)
    want = ref(**batch).logits
    got = ours(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    # the images matter: other pixels, other logits
    other = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    assert (ours(**other)[real] - got[real]).abs().max() > 1e-2
    text = torch.tensor([[1, 5, 6, 7, 8, 9]])
    torch.testing.assert_close(ours(text), ref(input_ids=text).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_and_a_left_padded_batch_equal_to_its_rows_alone(pair):
    ref, ours, _ = pair
    # rows of different image counts match transformers in one batch too...
    batch = inputs([[1, IMAGE, 5, 6, 7], [1, 9, IMAGE, 10, IMAGE, 11, 12, 13]], [[6], [2, 5]], seed=1)
    opts = dict(max_new_tokens=10, do_sample=False)
    want = ref.generate(**batch, **opts, eos_token_id=None, pad_token_id=0)
    assert ours.generate(**batch, **opts, eos_token_id=[]).tolist() == want.tolist()
    # ...but only rows of one image count equal themselves alone: a token that sees no image (<|begin_of_text|>)
    # attends to every image position, a padding image's too, in transformers as here (the engine prefills alone)
    rows, aspects = [[1, IMAGE, 5, 6, 7], [1, 9, 10, IMAGE, 11, 12, 13], [1, IMAGE, 14]], [[6], [2], [1]]
    batch = inputs(rows, aspects, seed=1)
    want = ref.generate(**batch, **opts, eos_token_id=None, pad_token_id=0)
    got = ours.generate(**batch, **opts, eos_token_id=[])
    assert got.tolist() == want.tolist()
    assert len(set(got[0, batch["input_ids"].shape[1]:].tolist())) > 2  # it says something, not one token
    for b, images in enumerate(aspects):
        alone = row(batch, b, len(images))
        out = ours.generate(**alone, **opts, eos_token_id=[])
        assert out[0, alone["input_ids"].shape[1]:].tolist() == got[b, batch["input_ids"].shape[1]:].tolist()
    # the static-cache step (a CUDA graph on GPUs) gives the same tokens
    assert ours.generate(**batch, **opts, eos_token_id=[], static_cache=True).tolist() == got.tolist()
    text = inputs([[1, 5, 6, 7], [1, 8, 9, 10, 11]], [[], []])
    want = ref.generate(**text, **opts, eos_token_id=None, pad_token_id=0)
    assert ours.generate(**text, **opts, eos_token_id=[]).tolist() == want.tolist()


@torch.no_grad()
def test_beam_search_matches(pair):
    ref, ours, _ = pair
    batch = inputs([[1, IMAGE, 5, 6, 7], [1, 9, IMAGE, 10]], [[6], [2]], seed=2)
    opts = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    want = ref.generate(**batch, **opts, eos_token_id=None, pad_token_id=0)
    assert ours.generate(**batch, **opts, eos_token_id=[]).tolist() == want.tolist()


@torch.no_grad()
def test_text_and_image_rows_share_decode_steps(pair):
    """The serving engine prefills requests alone and stacks their states (DecoderState.cat): rows with other image
    counts and a row without images decode together as they do alone."""
    _, ours, _ = pair
    reqs = [row(inputs([[1, IMAGE, 5, 6]], [[6]], seed=3), 0, 1),
            row(inputs([[1, IMAGE, 7, IMAGE]], [[1, 2]], seed=4), 0, 2),
            {"input_ids": torch.tensor([[1, 8, 9, 10]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}]
    alone, states = [], []
    for r in reqs:
        extras = {k: v for k, v in r.items() if k not in ("input_ids", "attention_mask")}
        state, _ = ours.generation_prefill(r["input_ids"], r["attention_mask"], 8, **extras)
        states.append(state)
        s2, _ = ours.generation_prefill(r["input_ids"], r["attention_mask"], 8, **extras)
        alone.append(torch.stack([ours.generation_step(torch.tensor([t]), s2)[0] for t in (11, 12)]))
    batch = DecoderState.cat(states)
    together = torch.stack([ours.generation_step(torch.tensor([t] * 3), batch) for t in (11, 12)], dim=1)
    for b in range(3):
        torch.testing.assert_close(together[b], alone[b], atol=1e-5, rtol=0)
    batch.reorder(torch.tensor([2, 0]))  # beams and leaving rows keep the cross-attention state in step
    assert batch.cross[0][0].shape[0] == 2 and batch.cross_gate.tolist() == [0.0, 1.0]


def test_media_tokens(pair):
    _, ours, _ = pair
    b = inputs([[1, IMAGE, 7, IMAGE]], [[1, 2]])
    extras = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask")}
    assert ours.media_tokens(**extras) == {IMAGE: 2}
    assert ours.media_tokens() == {IMAGE: 0}


@torch.no_grad()
def test_transformers_5_names_load_too(pair, tmp_path):
    """transformers 5.x's module names (`model.language_model.*`, `model.vision_model.*`, `lm_head.*`), besides the
    hub's that its save_pretrained writes (the fixture's file)."""
    ref, ours, path = pair
    names = set(load_file(path / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in names) and "language_model.lm_head.weight" in names
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert any(k.startswith("model.language_model.") for k in load_file(tmp_path / "model.safetensors"))
    again = pm.load(tmp_path)
    batch = inputs([[1, IMAGE, 5, 6]], [[5]])
    torch.testing.assert_close(again(**batch), ours(**batch), atol=0, rtol=0)


@torch.no_grad()
def test_round_trip_into_transformers(pair, tmp_path):
    ref, ours, _ = pair
    pm.save(ours, tmp_path)
    back = MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()
    want = ref.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert back.config.text_config.cross_attention_layers == [1, 3]
    assert back.config.text_config.rope_parameters["rope_type"] == "llama3"


def test_strict_load_names_a_missing_tensor(pair, tmp_path):
    _, _, path = pair
    tensors = load_file(path / "model.safetensors")
    del tensors["language_model.model.layers.1.cross_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(Exception, match="cross_attn.k_norm"):
        pm.load(tmp_path)


def test_config_that_does_not_fit_is_refused(pair, tmp_path):
    _, _, path = pair
    raw = json.loads((path / "config.json").read_text())
    raw["text_config"]["cross_attention_layers"] = [1, 7]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(Exception, match="cross_attention_layers"):
        pm.load(tmp_path)


@torch.no_grad()
def test_bad_inputs_are_refused_before_any_work(pair, monkeypatch):
    _, ours, _ = pair

    def no_work(*args, **kwargs):
        raise AssertionError("the vision encoder ran")

    monkeypatch.setattr(ours.vision_model, "forward", no_work)
    good = inputs([[1, IMAGE, 5, 6]], [[6]])
    cases = [
        ({"aspect_ratio_ids": torch.tensor([[6, 1]])}, "aspect_ratio_ids must be"),
        ({"input_ids": torch.tensor([[1, IMAGE, IMAGE, 6]])}, "2 <|image|> tokens .* for 1 image"),
        ({"input_ids": torch.tensor([[1, 4, 5, 6]])}, "0 <|image|> tokens .* for 1 image"),
        ({"pixel_values": good["pixel_values"][:, :, :2]}, "pixel_values must be"),
        ({"aspect_ratio_mask": None}, "need aspect_ratio_ids"),
        ({"cross_attention_mask": None}, "cross_attention_mask"),
        ({"aspect_ratio_ids": torch.tensor([[9]])}, r"in 0\.\.8"),
        ({"cross_attention_mask": good["cross_attention_mask"][:, :3]}, "cross_attention_mask must be"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(**{**good, **change})
        with pytest.raises(ValueError, match=message):
            ours.generate(**{**good, **change}, max_new_tokens=2)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(good["input_ids"])
    with pytest.raises(ValueError, match="go with pixel_values"):
        ours(torch.tensor([[1, 4, 5]]), cross_attention_mask=good["cross_attention_mask"][:, :3])


def test_presets_count_as_transformers_and_the_tiny_one_runs():
    fam = family("mllama")
    for name in ("meta-llama/Llama-3.2-11B-Vision", "meta-llama/Llama-3.2-90B-Vision-Instruct"):
        ours = build_meta(fam, PRESETS[name])
        raw = fam.default_layout.write_config(PRESETS[name])
        with torch.device("meta"):
            theirs = MllamaForConditionalGeneration(MllamaConfig(**{k: v for k, v in raw.items()
                                                                   if k not in ("model_type", "architectures")}))
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()), name
    tiny = Mllama(PRESETS["mllama-tiny-test"]).eval()
    ids = torch.tensor([[1, 256, 5, 6]])
    px = torch.randn(1, 1, 4, 3, 32, 32)
    cam = torch.tensor([[0, 1, 1, 1]])[:, :, None, None] * torch.tensor([1, 0, 0, 0])  # (1, 4, 1, 4)
    out = tiny.generate(ids, pixel_values=px, aspect_ratio_ids=torch.tensor([[1]]),
                        aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]]]), cross_attention_mask=cam,
                        max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 7)
