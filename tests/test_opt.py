"""OPT: parity with transformers' `OPTForCausalLM` on tiny random models saved with `save_pretrained` (logits with
left padding, greedy and beam `generate`), pre-norm and the OPT-350m post-norm + project_in/out variant, the KV
cache, round trips back into transformers, the hub's `decoder.*` key names, and the presets' sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTConfig as HFOPTConfig
from transformers import OPTForCausalLM

import polymodal as pm
from polymodal.models.opt import OPT, PRESETS, OPTConfig

# fp32 parity tolerance. We compute the same math in another order (one fused qkv matmul instead of three, the
# softmax scale inside SDPA instead of on q), which moves fp32 results by ~1e-6; 1e-4 leaves room for that and
# still fails on any real mismatch (a wrong weight, norm placement or position moves logits by 1e-2 or more).
ATOL = 1e-4

TINY = dict(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
VARIANTS = {
    "pre-norm": {},  # OPT-125m, 1.3b, 2.7b, 6.7b
    "350m": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # post-norm, project_in/out
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def hf_opt(tmp_path, **overrides):
    """A tiny random transformers OPT saved with `save_pretrained` -> (reference model, directory).

    transformers' init (weights N(0, 0.02), biases 0, LayerNorms 1) makes a tiny tied model repeat one token
    forever, which a broken model can match by luck. We draw every parameter instead: embeddings N(0, 0.5), layers
    with gain 3 (project_in/out 1), nonzero biases and norms. Greedy outputs then vary, logits stay within ~10 (so
    that fp32 rounding stays ~1e-5), and a dropped bias, a swapped norm or a misplaced position row shows."""
    model = OPTForCausalLM(HFOPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 0.5)
            elif "layer_norm" in name:
                p.normal_(1 if name.endswith("weight") else 0, 0.1 if name.endswith("weight") else 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, (1 if "project" in name else 3) / p.shape[1] ** 0.5)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def padded_batch(T: int = 9, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of length T, the second left-padded by `pad` (transformers' OPT tokenizer pads left for
    generation), with OPT's pad id 1 in the padding."""
    ids = torch.randint(3, TINY["vocab_size"], (2, T))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 1, 0
    return ids, mask


# --------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_match_transformers(tmp_path, variant):
    ref, path = hf_opt(tmp_path, **VARIANTS[variant])
    ours = pm.load(path)
    assert isinstance(ours, OPT)
    assert (ours.project_in is not None) == (variant == "350m")
    assert (ours.final_layer_norm is None) == (variant == "350m")  # post-norm stacks have no final LayerNorm
    ids, mask = padded_batch()
    close(ours(ids), ref(ids).logits)
    real = mask.bool()  # padded positions' outputs are never read; compare the real ones
    close(ours(ids, mask)[real], ref(ids, attention_mask=mask).logits[real])


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_inputs_embeds_match_transformers(tmp_path, variant):
    """model(inputs_embeds=E) with E of the embedding width (before project_in), as transformers takes it."""
    ref, path = hf_opt(tmp_path, **VARIANTS[variant])
    ours = pm.load(path)
    ids, mask = padded_batch()
    embeds = ref.get_input_embeddings()(ids) + 0.1 * torch.randn(*ids.shape, ours.config.embed_dim)
    real = mask.bool()
    close(ours(inputs_embeds=embeds, attention_mask=mask)[real],
          ref(inputs_embeds=embeds, attention_mask=mask).logits[real])
    assert torch.equal(ours(inputs_embeds=ours.embed(ids), attention_mask=mask), ours(ids, mask))


@torch.no_grad()
def test_untied_head_without_biases_matches_transformers(tmp_path):
    ref, path = hf_opt(tmp_path, tie_word_embeddings=False, enable_bias=False)
    ours = pm.load(path)
    assert ours.lm_head.weight is not ours.embed_tokens.weight
    assert ours.layers[0].self_attn.qkv.bias is None and ours.layers[0].mlp.fc1.bias is None
    ids, mask = padded_batch()
    real = mask.bool()
    close(ours(ids, mask)[real], ref(ids, attention_mask=mask).logits[real])


@torch.no_grad()
def test_forward_is_the_same_with_or_without_position_ids(tmp_path):
    """The generation mixin passes position_ids clamped to 0 at padding; OPT's own rule puts padding at -1. The
    model applies the rule either way, so every position (padding too) agrees."""
    _, path = hf_opt(tmp_path)
    ours = pm.load(path)
    ids, mask = padded_batch()
    given = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(ours(ids, mask), ours(ids, mask, position_ids=given))


@torch.no_grad()
def test_kv_cache_matches_full_pass(tmp_path):
    _, path = hf_opt(tmp_path, **VARIANTS["350m"])
    ours = pm.load(path)
    ids, mask = padded_batch(T=10, pad=4)
    full = ours(ids, mask)
    cache = ours.new_cache(2, 10, dtype=torch.float32, device=torch.device("cpu"))
    steps = [ours(ids[:, :5], mask[:, :5], cache=cache)]  # prefill
    for t in range(5, 10):
        steps.append(ours(ids[:, t : t + 1], mask[:, : t + 1], cache=cache))
    real = mask.bool()
    close(torch.cat(steps, dim=1)[real], full[real])


def test_positions_past_the_table_are_refused():
    model = pm.build("opt", "opt-tiny-test")
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


# --------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_matches_transformers(tmp_path, variant):
    ref, path = hf_opt(tmp_path, **VARIANTS[variant])
    ours = pm.load(path)
    ids, mask = padded_batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert got.shape[1] == ids.shape[1] + 12 and len(set(got[:, 9:].flatten().tolist())) > 3  # varied, no eos
    assert torch.equal(got, expected)


def test_beam_search_matches_transformers(tmp_path):
    ref, path = hf_opt(tmp_path)
    ours = pm.load(path)
    ids, mask = padded_batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3)
    assert torch.equal(got, expected)


def test_padded_row_generates_as_it_would_alone(tmp_path):
    _, path = hf_opt(tmp_path)
    ours = pm.load(path)
    ids, mask = padded_batch(T=9, pad=3)
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    alone = ours.generate(ids[1:, 3:], max_new_tokens=12)
    n = alone.shape[1] - 6
    assert n > 1
    assert torch.equal(batched[1, 9 : 9 + n], alone[0, 6:])


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_round_trip_back_into_transformers(tmp_path, variant):
    ref, path = hf_opt(tmp_path, **VARIANTS[variant])
    pm.save(pm.load(path), tmp_path / "ours")
    saved = set(load_file(tmp_path / "ours" / "model.safetensors"))
    original = set(load_file(path / "model.safetensors"))
    assert saved == original  # the tied head is saved once, as the embedding (as transformers does)
    back = OPTForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = padded_batch()
    real = mask.bool()
    close(back(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real])


@torch.no_grad()
def test_preset_saves_into_transformers(tmp_path):
    model = pm.build("opt", "opt-tiny-test").eval()
    pm.save(model, tmp_path / "ours")
    back = OPTForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(3, 256, (2, 7))
    close(model(ids), back(ids).logits)


@torch.no_grad()
def test_polymodal_layout_round_trip(tmp_path):
    model = pm.build("opt", OPTConfig(**TINY, **VARIANTS["350m"])).eval()
    pm.record(model).layout = "polymodal"
    pm.save(model, tmp_path / "ours")
    back = pm.load(tmp_path / "ours")
    assert back.config == model.config
    ids = torch.randint(3, 100, (2, 7))
    assert torch.equal(back(ids), model(ids))


@torch.no_grad()
def test_loads_the_hubs_decoder_key_names(tmp_path):
    """facebook/opt-* on the hub were saved from OPTModel: `decoder.*`, no `model.` prefix and no lm_head."""
    ref, path = hf_opt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, path / "model.safetensors")
    ours = pm.load(path)
    ids = torch.randint(3, 100, (2, 7))
    close(ours(ids), ref(ids).logits)


def test_missing_tensor_is_named(tmp_path):
    _, path = hf_opt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(pm.CheckpointError, match=r"layers\.1\.fc2\.bias"):
        pm.load(path)


@pytest.mark.parametrize(("preset", "millions"), [("opt-125m", 125.2), ("opt-350m", 331.2), ("opt-1.3b", 1315.8)])
def test_preset_sizes(preset, millions):
    """Parameter counts of the released checkpoints (tied head counted once)."""
    with torch.device("meta"):
        model = OPT(PRESETS[preset])
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
