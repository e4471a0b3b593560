"""LLaMA and Qwen2 against transformers' LlamaForCausalLM / Qwen2ForCausalLM on tiny random configs: logits,
greedy / sampled / beam generation token for token, left-padded batches, the KV cache, key-map round trips."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import polymodal as pm

# fp32 on CPU: the two implementations order their reductions differently; differences seen are ~1e-7 on
# logits of magnitude ~1, so 1e-4 leaves room without hiding a wrong formula (which shows at 1e-2 and above)
ATOL = 1e-4

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig, {}),
    "llama-mha-tied-bias": (LlamaForCausalLM, LlamaConfig,
                            dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3.1-rope": (LlamaForCausalLM, LlamaConfig,
                      dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-head-dim": (LlamaForCausalLM, LlamaConfig, dict(head_dim=32)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    cls, cfg_cls, extra = VARIANTS[request.param]
    torch.manual_seed(0)
    ref = cls(cfg_cls(**{**TINY, **extra})).eval()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, pm.load(path), path


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_logits_match(pair):
    ref, ours, _ = pair
    ids, mask = padded_batch()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, mask)
        plain = ours(ids)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, ref(ids).logits.detach(), atol=ATOL, rtol=0)


def test_inputs_embeds_and_the_parts(pair):
    """model(inputs_embeds=E) equals transformers' logits for the same embeddings (what a VLM feeds in), and
    head(decode(embed(ids))) is the forward."""
    ref, ours, _ = pair
    ids, mask = padded_batch(2)
    embeds = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(inputs_embeds=embeds, attention_mask=mask).logits
        got = ours(inputs_embeds=embeds, attention_mask=mask)
        positions, mask4 = ours.decoder_inputs(ids, mask, None, None)
        parts = ours.head(ours.decode(ours.embed(ids), mask=mask4, positions=positions))
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(parts, ours(ids, mask), atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        ours(inputs_embeds=ids)


def test_greedy_and_beam_generation_match(pair):
    ref, ours, _ = pair
    ids, mask = padded_batch()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert got.tolist() == want.tolist()
    assert got.shape[1] > ids.shape[1] + 1  # it really generated
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=3)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3)
    assert got.tolist() == want.tolist()


def test_batched_equals_unbatched(pair):
    _, ours, _ = pair
    ids, mask = padded_batch()
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = ours.generate(ids[row:row + 1, start:], max_new_tokens=10, eos_token_id=[])
        assert batched[row, start:].tolist() == alone[0].tolist()


def test_sampling_matches_transformers_under_the_same_seed(pair):
    ref, ours, _ = pair
    ids, mask = padded_batch()
    options = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=10)
    torch.manual_seed(123)
    want = ref.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(123)
    got = ours.generate(ids, attention_mask=mask, **options)
    assert got.tolist() == want.tolist()
    # a seeded generator makes it reproducible without touching the global RNG
    a = ours.generate(ids, attention_mask=mask, **options, generator=torch.Generator().manual_seed(5))
    b = ours.generate(ids, attention_mask=mask, **options, generator=torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()


def test_kv_cache_steps_equal_full_pass(pair):
    _, ours, _ = pair
    ids, _ = padded_batch()
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(3, 16, dtype=torch.float32, device=torch.device("cpu"))
        steps = [ours(ids[:, :4], cache=cache)]
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_round_trip_into_transformers(pair, tmp_path):
    ref, ours, _ = pair
    pm.save(ours, tmp_path)
    back = type(ref).from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_bad_input_is_a_clear_error(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="input_ids must be"):
        ours(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
