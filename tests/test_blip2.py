"""BLIP-2 against transformers' `Blip2ForConditionalGeneration` (OPT and Flan-T5), `Blip2Model` and
`Blip2ForImageTextRetrieval` on tiny random models saved by transformers itself: logits, greedy and beam generation
token for token, left-padded batches equal to their rows alone, Q-Former features, ITM/ITC scores, the round trip
back into transformers, the 4.x prefix layout, half precision per part, a golden caption and input errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Blip2Config as HFBlip2Config
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model, OPTConfig, T5Config

import polymodal as pm
from polymodal.models.blip2 import PRESETS, Blip2

# fp32 on CPU: the same math in another order (fused q/k/v, SDPA instead of an explicit softmax) moves logits of
# size ~1-10 by ~1e-6 here; a wrong weight, eps, mask or position moves them by 1e-2 and more
ATOL = 1e-4
Q = 4  # query tokens
IMAGE = 110  # the image token id
BOS, EOS, PAD = 2, 2, 1  # OPT's
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QFORMER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
               cross_attention_frequency=2, max_position_embeddings=64)


def text_config(kind: str):
    if kind == "t5":
        return T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return OPTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def widen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """transformers' init (vision 1e-10, query tokens 0, N(0, 0.02)) gives every image the same near-constant
    output: draw wider weights, so that a wrong mask, norm or slot shows. Word embeddings stay smaller than what
    the layers add (std 0.3), else the tied head mostly predicts the input token again and captions repeat it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                continue
            if any(k in name for k in ("embed_tokens", "shared", "word_embeddings")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # query tokens, positions, the class token, T5's relative position bias
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def reference(kind: str, image_token: int | None = IMAGE, seed: int = 0):
    text = None if kind == "itm" else text_config(kind).to_dict()
    qformer = {**QFORMER, "use_qformer_text_input": kind == "itm"}
    cfg = HFBlip2Config(vision_config=VISION, qformer_config=qformer, text_config=text, num_query_tokens=Q,
                        image_token_index=image_token, image_text_hidden_size=16)
    cls = Blip2ForImageTextRetrieval if kind == "itm" else Blip2ForConditionalGeneration
    torch.manual_seed(seed)
    return widen(cls(cfg), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (transformers model, directory): "opt", "t5", "itm" (with image tokens), "itm-plain" (without)."""
    out = {}
    for name, kind, token in (("opt", "opt", IMAGE), ("t5", "t5", IMAGE), ("itm", "itm", IMAGE),
                              ("itm-plain", "itm", None)):
        ref = reference(kind, token)
        d = tmp_path_factory.mktemp(name)
        ref.save_pretrained(d)
        out[name] = (ref, d)
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {name: pm.load(d) for name, (_, d) in saved.items()}


def images(B: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def prompts(rows: list[list[int]], pad: int = PAD, image: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask; each row gets the processor's Q image tokens first, then BOS and the text."""
    rows = [([IMAGE] * Q if image else []) + [BOS] + r for r in rows]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_loads_each_checkpoint_as_its_task(loaded):
    assert all(isinstance(m, Blip2) for m in loaded.values())
    assert loaded["opt"].config.task == "generation" and not loaded["opt"].config.is_t5
    assert loaded["t5"].config.is_t5 and loaded["t5"].config.image_token_index == IMAGE
    assert loaded["itm"].config.task == "retrieval" and loaded["itm-plain"].config.image_token_index is None


@torch.no_grad()
def test_opt_logits_match_for_a_left_padded_batch(saved, loaded):
    ref, ours = saved["opt"][0], loaded["opt"]
    ids, mask = prompts([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    px = images(3)
    want = ref(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    got = ours(ids, px, mask)
    assert got.shape == (3, ids.shape[1], 120)
    real = mask.bool()
    close(got[real], want[real])


@torch.no_grad()
def test_t5_logits_match_with_a_padded_encoder_input(saved, loaded):
    ref, ours = saved["t5"][0], loaded["t5"]
    ids, mask = prompts([[5, 6, 7, 1], [8, 1]], pad=0)
    dec = torch.tensor([[0, 9, 10, 11], [0, 12, 13, 14]])
    px = images(2)
    want = ref(input_ids=ids, attention_mask=mask, pixel_values=px, decoder_input_ids=dec).logits
    close(ours(ids, px, mask, decoder_input_ids=dec), want)


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_matches_transformers_token_for_token(saved, loaded, kind, num_beams):
    ref, ours = saved[kind][0], loaded[kind]
    pad = 0 if kind == "t5" else PAD
    ids, mask = prompts([[5, 6, 7, 8], [9, 10]], pad=pad)
    px = images(2, seed=3)
    want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, num_beams=num_beams,
                        do_sample=False)
    got = ours.generate(ids, max_new_tokens=8, pixel_values=px, attention_mask=mask, num_beams=num_beams)
    assert got.tolist() == want.tolist()


def test_caption_without_a_prompt_matches_transformers(saved, loaded):
    ref, ours = saved["opt"][0], loaded["opt"]
    px = images(2, seed=4)
    want = ref.generate(pixel_values=px, max_new_tokens=8)
    got = ours.generate(pixel_values=px, max_new_tokens=8)
    assert got.tolist() == want.tolist() and got.shape[1] == Q + 1 + 8


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_left_padded_batch_generates_as_each_row_alone(loaded, kind):
    ours = loaded[kind]
    pad = 0 if kind == "t5" else PAD
    rows = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    ids, mask = prompts(rows, pad=pad)
    px = images(3, seed=5)
    batch = ours.generate(ids, max_new_tokens=6, pixel_values=px, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = ours.generate(prompts([row], pad=pad)[0], max_new_tokens=6, pixel_values=px[i:i + 1])[0].tolist()
        start = 0 if kind == "t5" else int((mask[i] == 0).sum())  # T5 returns decoder sequences: no prompt padding
        got = batch[i, start:].tolist()
        # a row that ends early (EOS) alone is padded in the batch until every row is done
        assert got[: len(alone)] == alone and set(got[len(alone):]) <= {pad}


@torch.no_grad()
def test_sampling_is_seeded_and_stays_in_the_vocabulary(loaded):
    ours = loaded["opt"]
    ids, mask = prompts([[5, 6], [7]])
    px = images(2)
    a = ours.generate(ids, max_new_tokens=6, pixel_values=px, attention_mask=mask, do_sample=True, top_k=20,
                      generator=torch.Generator().manual_seed(7))
    b = ours.generate(ids, max_new_tokens=6, pixel_values=px, attention_mask=mask, do_sample=True, top_k=20,
                      generator=torch.Generator().manual_seed(7))
    assert a.tolist() == b.tolist() and a[:, : ids.shape[1]].tolist() == ids.tolist() and int(a.max()) < 120


@torch.no_grad()
def test_qformer_features_match_blip2model(saved, loaded):
    ref = Blip2Model.from_pretrained(saved["opt"][1]).eval()
    px = images(2, seed=6)
    close(loaded["opt"].get_qformer_features(px), ref.get_qformer_features(pixel_values=px))


@pytest.mark.parametrize("variant", ["itm", "itm-plain"])
@torch.no_grad()
def test_itm_and_itc_scores_match_transformers(saved, loaded, variant):
    ref, ours = saved[variant][0], loaded[variant]
    image = variant == "itm"
    texts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    T = max(map(len, texts)) + 1
    rows = [([IMAGE] * Q if image else []) + [BOS] + t + [0] * (T - 1 - len(t)) for t in texts]  # right-padded
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    px = images(3, seed=7)
    for itm in (True, False):
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask, use_image_text_matching_head=itm)
        got = ours(ids, px, mask, use_image_text_matching_head=itm)
        assert got.shape == ((3, 2) if itm else (3, 3))
        close(got, want.logits_per_image)
    assert not torch.allclose(got, got[:1].expand_as(got))  # the scores tell the images apart


@pytest.mark.parametrize("variant", ["opt", "t5", "itm"])
@torch.no_grad()
def test_round_trip_back_into_transformers(saved, loaded, variant, tmp_path):
    ref, d = saved[variant]
    pm.save(loaded[variant], tmp_path)
    cls = type(ref)
    back, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), (_, b) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "blip-2"
    assert isinstance(pm.load(tmp_path), Blip2)


def test_config_without_image_token_prepends_the_queries(saved, loaded, tmp_path):
    """transformers 4.x files (no image_token_index): the visual prompt goes before the prompt's embeddings, which
    is the 5.x layout with the image tokens written first."""
    shutil.copytree(saved["opt"][1], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["image_token_index"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    legacy, ours = pm.load(tmp_path), loaded["opt"]
    rows = [[5, 6, 7], [8]]
    with_tokens, mask = prompts(rows)
    plain, plain_mask = prompts(rows, image=False)
    px = images(2, seed=8)
    with torch.no_grad():
        got = legacy(plain, px, plain_mask)  # (B, Q + T, V): the queries first, as transformers 4.x returned
        want = ours(with_tokens, px, mask)
    assert got.shape[1] == Q + plain.shape[1]
    real = plain_mask.bool()
    # got: [queries, padding, BOS, text]; want: [padding, image slots, BOS, text]; both Q + T long, so that past
    # the first Q positions the plain prompt's mask picks BOS and the text in both
    close(got[:, Q:][real], want[:, Q:][real])
    a = legacy.generate(plain, max_new_tokens=6, pixel_values=px, attention_mask=plain_mask)
    b = ours.generate(with_tokens, max_new_tokens=6, pixel_values=px, attention_mask=mask)
    assert a[:, plain.shape[1]:].tolist() == b[:, with_tokens.shape[1]:].tolist()


@torch.no_grad()
def test_fp16_keeps_the_qformer_in_fp32_as_transformers(saved):
    d = saved["opt"][1]
    ours = pm.load(d, dtype=torch.float16)
    assert ours.query_tokens.dtype == torch.float32
    assert {p.dtype for p in ours.qformer.parameters()} == {torch.float32}
    assert {p.dtype for p in ours.vision_model.parameters()} == {torch.float16}
    assert {p.dtype for p in ours.language_model.parameters()} == {torch.float16}
    assert ours.language_projection.weight.dtype == torch.float16
    ref = Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.float16).eval()
    assert ref.qformer.layernorm.weight.dtype == torch.float32 and ref.query_tokens.dtype == torch.float32
    ids, mask = prompts([[5, 6, 7], [8]])
    px = images(2)
    got, want = ours(ids, px, mask).float(), ref(input_ids=ids, attention_mask=mask, pixel_values=px).logits.float()
    real = mask.bool()
    # fp16 keeps 11 bits of mantissa: logits of size ~10 round at ~0.005; the same parts in the same precision
    # land within a few such steps, a part run in the wrong dtype (the Q-Former in fp16) or a missed cast farther
    torch.testing.assert_close(got[real], want[real], atol=0.05, rtol=0.01)
    fp32 = pm.load(d)(ids, px, mask)
    assert (got - fp32).abs().max() > 0  # it did run in fp16
    bf16 = pm.load(d, dtype=torch.bfloat16)  # bf16 has fp32's range: every part takes it, as in transformers
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_golden_caption(tmp_path):
    """A fixed tiny checkpoint from a seed: its greedy caption, computed once with transformers 5.25 (torch
    2.14, CPU), checked here against transformers again and against ours."""
    ref = reference("opt", seed=1234)
    ref.save_pretrained(tmp_path)
    px = images(1, seed=99)
    want = ref.generate(pixel_values=px, max_new_tokens=10)[0, Q + 1:].tolist()
    got = pm.load(tmp_path).generate(pixel_values=px, max_new_tokens=10)[0, Q + 1:].tolist()
    assert got == want
    assert got == GOLDEN


GOLDEN = [26, 26, 101, 0, 40, 40, 0, 40, 110, 20]


def test_bad_inputs_are_refused_before_the_vision_encoder(loaded):
    ours = loaded["opt"]
    ran = []
    hook = ours.vision_model.register_forward_hook(lambda *a: ran.append(1))
    ids, mask = prompts([[5, 6]])
    try:
        with pytest.raises(ValueError, match="pixel_values"):
            ours(ids, None, mask)
        with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
            ours(ids, torch.zeros(1, 3, 64, 64), mask)
        with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
            ours.generate(ids, pixel_values=torch.zeros(1, 32, 32))
        with pytest.raises(ValueError, match="one image per prompt"):
            ours(ids, images(2), mask)
        with pytest.raises(ValueError, match=f"{Q} image tokens"):
            ours(prompts([[5, 6]], image=False)[0], images(1))
        assert not ran
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="decoder_input_ids"):
        loaded["t5"](ids, images(1))
    with pytest.raises(ValueError, match="generation model"):
        ours.itm(images(1), ids)
    with pytest.raises(ValueError, match="image tokens"):
        loaded["itm"].itm(images(1), prompts([[5, 6]], image=False)[0])


def test_tiny_preset_generates_and_presets_follow_transformers_defaults():
    model = pm.build("blip-2", "blip2-tiny-test").eval()
    c = model.config
    out = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=3, eos_token_id=[])  # no early stop
    assert out.shape == (2, c.num_query_tokens + 1 + 3)
    hf = HFBlip2Config()
    big = PRESETS["Salesforce/blip2-opt-2.7b"]
    for ours, theirs in ((big.vision_config, hf.vision_config), (big.qformer_config, hf.qformer_config)):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "layer_norm_eps"):
            assert getattr(ours, name) == getattr(theirs, name), name
    assert big.vision_config.image_size == hf.vision_config.image_size
    assert big.vision_config.patch_size == hf.vision_config.patch_size
    assert big.num_query_tokens == hf.num_query_tokens


@torch.no_grad()
def test_hub_files_with_the_tied_head_load_and_a_missing_tensor_is_named(saved, loaded, tmp_path):
    """The hub's 4.x files also store OPT's tied `language_model.lm_head.weight`; a file that lacks a Q-Former
    tensor is refused with its checkpoint name."""
    from safetensors.torch import load_file, save_file

    d = saved["opt"][1]
    tensors = load_file(d / "model.safetensors")
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.decoder.embed_tokens.weight"].clone()
    shutil.copy(d / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    ids, mask = prompts([[5, 6]])
    px = images(1)
    torch.testing.assert_close(pm.load(tmp_path)(ids, px, mask), loaded["opt"](ids, px, mask), atol=0, rtol=0)
    del tensors["qformer.encoder.layer.0.output_query.dense.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*qformer\.encoder\.layer\.0\.output_query\.dense\.weight"):
        pm.load(tmp_path)
