"""T5: parity with transformers' `T5ForConditionalGeneration` (logits, greedy and beam-search `generate`) and
`T5EncoderModel` on tiny random models saved with `save_pretrained`, both the original variant (ReLU, tied and
scaled head) and T5 v1.1 / Flan-T5 (gated GELU, untied head); round trips back into transformers; the pieces
that make T5 T5 (its layer norm, its relative position buckets); presets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

import polymodal as pm
from polymodal.generation import DecoderState
from polymodal.models.t5 import PRESETS, T5, relative_position_bucket
from polymodal.nn import RMSNorm

# fp32 parity tolerance. We compute the same math in another order (fused q/k/v and k/v products, SDPA instead of
# an explicit softmax), which moves fp32 results by ~1e-6; 1e-4 leaves room for that and still fails on any real
# mismatch (a wrong bucket, a missing scale or a misplaced weight moves these logits by 1e-2 or more).
ATOL = 1e-4

VOCAB = 100
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
VARIANTS = {
    "original": dict(feed_forward_proj="relu"),  # tied head, decoder output scaled by d_model ** -0.5
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # Flan-T5's shape
    "uneven": dict(feed_forward_proj="gated-gelu", num_decoder_layers=3, d_kv=16),  # 3 decoder layers, H*Dh != D
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def hf_dir(path, variant: str, seed: int = 0):
    """A tiny random T5ForConditionalGeneration saved with `save_pretrained` -> (reference read back, directory).

    transformers 5 always ties the head at construction; an untied variant gets its own random head, which
    save_pretrained then writes as `lm_head.weight` (what a real Flan-T5 file holds)."""
    torch.manual_seed(seed)
    cfg = HFT5Config(**{**TINY, **VARIANTS[variant]})
    model = T5ForConditionalGeneration(cfg)
    if VARIANTS[variant].get("tie_word_embeddings") is False:
        model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, cfg.d_model))
    model.save_pretrained(path)
    return T5ForConditionalGeneration.from_pretrained(path).eval(), path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """hf_dir, built once per (variant, seed) for the whole module; tests read these directories, never write."""
    made = {}

    def get(variant: str, seed: int = 0):
        if (variant, seed) not in made:
            made[variant, seed] = hf_dir(tmp_path_factory.mktemp(f"t5-{variant}-{seed}"), variant, seed)
        return made[variant, seed]

    return get


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three encoder inputs (B=3, S=12): full, right-padded, left-padded (T5 reads either; positions are relative)."""
    g = torch.Generator().manual_seed(100)
    ids = torch.randint(2, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :3] = 0
    return ids * mask, mask


# ------------------------------------------------------------------------------------------ the blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_t5_layer_norm(dtype):
    ours, ref = RMSNorm(48, eps=1e-6).to(dtype), T5LayerNorm(48, eps=1e-6).to(dtype)
    w = torch.randn(48).to(dtype)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    assert torch.equal(ours(x), ref(x))  # both square and average in fp32, then cast back: bit for bit


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16)])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_relative_position_buckets_match_transformers(buckets, distance, bidirectional):
    offsets = torch.arange(-300, 301)[None, :] - torch.arange(3)[:, None]  # (3, 601) key - query
    ours = relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
    ref = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional, num_buckets=buckets,
                                                max_distance=distance)
    assert torch.equal(ours, ref)
    assert int(ours.max()) == buckets - 1 and int(ours.min()) == 0  # every bucket range is reached


# ------------------------------------------------------------------------------------------ encoder-decoder


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers(saved, variant):
    ref, path = saved(variant)
    ours = pm.load(path)
    c = ours.config
    assert c.scale_decoder_outputs == (variant != "v1.1")  # transformers scales unless the head was untied
    assert c.tie_word_embeddings == (variant != "v1.1") and (ours.lm_head is None) == c.tie_word_embeddings
    ids, mask = batch()
    dec = torch.randint(2, VOCAB, (3, 7))
    expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    close(ours(ids, dec, attention_mask=mask), expected)
    close(ours.encode(ids, mask), ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    # without a mask every position is real, as in transformers
    close(ours(ids, dec), ref(input_ids=ids, decoder_input_ids=dec).logits)


@torch.no_grad()
def test_inputs_embeds_match_transformers(saved):
    """The encoder from embeddings (what BLIP-2 feeds Flan-T5: query tokens, then the text's embeddings)."""
    ref, path = saved("v1.1")
    ours = pm.load(path)
    ids, mask = batch()
    embeds = ours.embed(ids) + 0.1 * torch.randn(*ids.shape, ours.config.d_model)
    dec = torch.randint(2, VOCAB, (3, 7))
    close(ours(inputs_embeds=embeds, decoder_input_ids=dec, attention_mask=mask),
          ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits)
    close(ours.encode(inputs_embeds=embeds, attention_mask=mask),
          ref.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours.encode(ids, inputs_embeds=embeds)


@pytest.mark.parametrize("seed", [1, 2])
@torch.no_grad()
def test_greedy_generate_matches_transformers(saved, seed):
    ref, path = saved("v1.1", seed)
    ours = pm.load(path)
    ids, mask = batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert got.tolist() == expected.tolist()
    # the output is the decoder sequence: start token + new tokens, and this seed makes it a real test
    assert got.shape == (3, 13) and bool((got[:, 0] == 0).all())
    assert len({tuple(r) for r in got.tolist()}) == 3  # the rows read their own inputs
    assert bool((got[:, 1:] != 0).all(dim=1).any())  # a row ran all 12 steps
    assert bool((got == 1).any())  # and a row ended at EOS (then pads, as transformers does)


@pytest.mark.parametrize("seed", [1, 2])
@torch.no_grad()
def test_beam_search_matches_transformers(saved, seed):
    ref, path = saved("v1.1", seed)
    ours = pm.load(path)
    ids, mask = batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
    got = ours.generate(ids, max_new_tokens=12, num_beams=3, attention_mask=mask)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] >= 11 and bool((got == 1).any())  # long beams, and finished hypotheses among them


@torch.no_grad()
def test_generate_original_variant_matches_transformers(saved):
    ref, path = saved("original")
    ours = pm.load(path)
    ids, mask = batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = ours.generate(ids, max_new_tokens=10, attention_mask=mask)
    assert got.tolist() == expected.tolist() and got.shape == (3, 11)


@torch.no_grad()
def test_batched_generation_equals_one_by_one(saved):
    _, path = saved("v1.1", 2)
    ours = pm.load(path)
    ids, mask = batch()
    together = ours.generate(ids, max_new_tokens=8, attention_mask=mask)
    for row in range(3):
        alone = ours.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=8)
        assert alone[0].tolist() == together[row, : alone.shape[1]].tolist()


@torch.no_grad()
def test_generation_state_is_the_shared_decoder_state(saved):
    """T5 generates with polymodal.generation's DecoderState: the start tokens as its prompt, each layer's
    cross-attention keys and values and the encoder padding, all reordered with the rows (beam search)."""
    ours = pm.load(saved("v1.1", 1)[1])
    ids, mask = batch()
    state, logits = ours.generation_prefill(ids, mask, 12 + 5)
    assert type(state) is DecoderState and state.prompt.tolist() == [[0]] * 3
    assert len(state.cross) == ours.config.decoder_layers and state.cross_mask.tolist() == mask.tolist()
    order = torch.tensor([2, 0, 1])
    state.reorder(order)
    swapped, swapped_logits = ours.generation_prefill(ids[order], mask[order], 12 + 5)
    close(swapped_logits, logits[order])
    tokens = torch.tensor([5, 6, 7])
    close(ours.generation_step(tokens, state), ours.generation_step(tokens, swapped))
    assert state.length == 2 and state.cache[0].length == 2


@pytest.mark.parametrize("variant", ["original", "v1.1"])
@torch.no_grad()
def test_round_trip_back_into_transformers(saved, tmp_path, variant):
    ref, path = saved(variant)
    pm.save(pm.load(path), tmp_path / "out")
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) == (variant == "v1.1")
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask = batch()
    dec = torch.randint(2, VOCAB, (3, 5))
    close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
          ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    again = pm.load(tmp_path / "out")  # and polymodal reads its own file as it read the original
    assert again.config == pm.load(path).config


@torch.no_grad()
def test_polymodal_layout_round_trip(saved, tmp_path):
    _, path = saved("v1.1")
    ours = pm.load(path)
    pm.record(ours).layout = "polymodal"
    pm.save(ours, tmp_path / "pm")
    assert json.loads((tmp_path / "pm" / "config.json").read_text())["model_type"] == "polymodal-t5"
    back = pm.load(tmp_path / "pm")
    ids, mask = batch()
    dec = torch.randint(2, VOCAB, (3, 5))
    assert torch.equal(back(ids, dec, mask), ours(ids, dec, mask))


def test_strict_loading_names_the_missing_tensor(tmp_path):
    _, path = hf_dir(tmp_path, "v1.1")
    tensors = load_file(path / "model.safetensors")
    del tensors["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pm.CheckpointError, match="EncDecAttention.v.weight"):
        pm.load(path)


# ------------------------------------------------------------------------------------------ encoder alone


@torch.no_grad()
def test_encoder_only_checkpoint_matches_t5_encoder_model(tmp_path):
    torch.manual_seed(0)
    ref = T5EncoderModel(HFT5Config(**TINY, feed_forward_proj="gated-gelu")).eval()
    ref.save_pretrained(tmp_path / "enc")
    ours = pm.load(tmp_path / "enc")
    assert not ours.config.is_encoder_decoder and not hasattr(ours, "decoder")
    ids, mask = batch()
    expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    close(ours.encode(ids, mask), expected)
    with pytest.raises(ValueError, match="encoder only"):
        ours(ids, ids)
    with pytest.raises(ValueError, match="encoder only"):
        ours.generate(ids, max_new_tokens=2)
    pm.save(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    close(T5EncoderModel.from_pretrained(tmp_path / "out").eval()(input_ids=ids, attention_mask=mask)
          .last_hidden_state, expected)


# ------------------------------------------------------------------------------------------ presets and dtypes


@torch.no_grad()
def test_tiny_preset_runs():
    model = pm.build("t5", "t5-tiny-test").eval()
    ids = torch.randint(2, 128, (2, 6))
    assert model(ids, ids[:, :3]).shape == (2, 3, 128)
    out = model.generate(ids, max_new_tokens=4)
    assert out.shape[0] == 2 and 2 <= out.shape[1] <= 5 and bool((out[:, 0] == 0).all())


def test_preset_sizes():
    # Flan-T5-small has 77M parameters (untied head); SD3's T5-XXL encoder 4.76B
    with torch.device("meta"):
        small, xxl = T5(PRESETS["google/flan-t5-small"]), T5(PRESETS["google/t5-v1_1-xxl"])
    assert 76.9e6 < sum(p.numel() for p in small.parameters()) < 77.0e6
    assert not PRESETS["google/t5-v1_1-xxl"].is_encoder_decoder
    assert 4.76e9 < sum(p.numel() for p in xxl.parameters()) < 4.77e9


@torch.no_grad()
def test_bfloat16_runs_close_to_fp32(saved):
    _, path = saved("v1.1")
    full, half = pm.load(path), pm.load(path, dtype=torch.bfloat16)
    ids, mask = batch()
    dec = torch.randint(2, VOCAB, (3, 5))
    low, high = half(ids, dec, mask), full(ids, dec, mask)
    assert low.dtype == torch.bfloat16 and bool(low.isfinite().all())
    # bf16 keeps 8 bits of mantissa (~0.4% a value); through 4 layers the logits (up to ~20 here) move by ~1% of
    # their range: 2% of it bounds that, and a wrong dtype path (e.g. the norm not in fp32) breaks it
    torch.testing.assert_close(low.float(), high, atol=0.02 * float(high.abs().max()), rtol=0)
    assert bool((low.argmax(-1) == high.argmax(-1)).all())


def test_zero_new_tokens_returns_the_decoder_start(tmp_path):
    """With nothing to generate, the output is the decoder prompt transformers would start from."""
    import polymodal as pm

    torch.manual_seed(0)
    model = pm.build("t5", "t5-tiny-test").eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 5))
    out = model.generate(ids, max_new_tokens=0)
    assert out.tolist() == [[model.config.decoder_start_token_id]] * 2
