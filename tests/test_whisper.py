"""Whisper: parity with transformers' `WhisperForConditionalGeneration` on tiny random models saved with
`save_pretrained` (encoder output, logits, greedy `generate` with the forced prompt tokens and language
detection, a batch against its rows alone), the round trip back into transformers, presets' parameter counts, and
refusals of bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperForConditionalGeneration

import polymodal as pm
from polymodal.models.whisper import PRESETS, Whisper, WhisperConfig, ZeroKeyBiasLinear, sinusoids
from polymodal.weights.checkpoint import CheckpointError

# fp32 parity tolerance: the same math in another order (fused q/k/v and k/v products, SDPA instead of an explicit
# softmax) moves fp32 results by ~1e-7 here; 1e-4 still fails on any real mismatch (a missing bias, a wrong position
# or a misplaced weight moves these logits by 1e-2 or more).
ATOL = 1e-4

EOT, SOT, EN, DE, TRANSLATE, TRANSCRIBE, NO_TS = 90, 91, 92, 93, 94, 95, 96
TINY = dict(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=30, max_target_positions=40, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
            decoder_start_token_id=SOT)
FRAMES = 60  # 2 * max_source_positions


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random multilingual-style Whisper saved by transformers, with the generation config a real
    checkpoint has (languages, tasks, <|notimestamps|>, suppressed tokens) -> (reference, directory)."""
    torch.manual_seed(0)
    ref = WhisperForConditionalGeneration(HFWhisperConfig(**TINY)).eval()
    gen = ref.generation_config
    gen.lang_to_id = {"<|en|>": EN, "<|de|>": DE}
    gen.task_to_id = {"translate": TRANSLATE, "transcribe": TRANSCRIBE}
    gen.no_timestamps_token_id = NO_TS
    gen.is_multilingual = True
    gen.suppress_tokens = [5, 6, 40]
    gen.begin_suppress_tokens = [7, EOT]
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json, dropping the above
    path = tmp_path_factory.mktemp("whisper")
    ref.save_pretrained(path)
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), path


@pytest.fixture(scope="module")
def ours(saved):
    return pm.load(saved[1])


def features(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TINY["num_mel_bins"], FRAMES, generator=torch.Generator().manual_seed(seed))


def test_encoder_and_logits_match_transformers(saved, ours):
    ref, _ = saved
    x = features(2)
    ids = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TS, 3, 4], [SOT, DE, TRANSLATE, NO_TS, 8, 9]])
    with torch.no_grad():
        close(ours.encode(x), ref.model.encoder(x).last_hidden_state)
        close(ours(x, ids), ref(input_features=x, decoder_input_ids=ids).logits)


@pytest.mark.parametrize("language, task", [("en", "transcribe"), ("de", "translate"), (None, None)])
def test_greedy_generate_matches_transformers(saved, ours, language, task):
    """The forced prompt (start, language or its detection, task, no timestamps), the suppressed tokens and the
    greedy tokens: transformers' Whisper `generate` returns the tokens after the prompt, and so do we."""
    ref, _ = saved
    x = features(3, seed=2)
    with torch.no_grad():
        want = ref.generate(x, language=language, task=task, max_new_tokens=12)
    got = ours.generate(x, language=language, task=task, max_new_tokens=12)
    assert got.tolist() == want.tolist()
    prompt = ours.prompt_ids(x, language, task)
    if language is not None:
        assert prompt[0] == [SOT, EN if language == "en" else DE, TRANSCRIBE if task == "transcribe" else TRANSLATE,
                             NO_TS]


def test_timestamps_follow_transformers_grammar(saved, ours):
    """With timestamps (97, 98 and 99 after <|notimestamps|> = 96 here) the rules of transformers'
    WhisperTimeStampLogitsProcessor decide the tokens: the first is a timestamp, pairs never go back."""
    ref, _ = saved
    for seed in range(4):
        x = features(2, seed=10 + seed) * 3
        with torch.no_grad():
            want = ref.generate(x, language="en", return_timestamps=True, max_new_tokens=10)
        got = ours.generate(x, language="en", return_timestamps=True, max_new_tokens=10)
        assert got.tolist() == want.tolist()
        assert (got[:, 0] > NO_TS).all()
    assert NO_TS not in ours.prompt_ids(features(1), "en", timestamps=True)[0]


def test_audio_frames_reads_only_the_first_frames(ours):
    """audio_frames (whisper.cpp's audio_ctx): the whole window equals the default; fewer frames give half as many
    encoder states, which the decoder cross-attends; odd or out-of-range counts are refused."""
    x = features(2, seed=7)
    assert ours.generate(x, language="en", audio_frames=FRAMES, max_new_tokens=6).tolist() == ours.generate(
        x, language="en", max_new_tokens=6).tolist()
    with torch.no_grad():
        part = ours.encode(x, 20)
    assert part.shape == (2, 10, TINY["d_model"])
    assert ours.generate(x, language="en", audio_frames=20, max_new_tokens=4).shape[0] == 2
    for bad in (0, 7, FRAMES + 2):
        with pytest.raises(ValueError, match="frames must be even"):
            ours.encode(x, bad)


def test_detect_language_matches_transformers(saved, ours):
    ref, _ = saved
    x = features(4, seed=3)
    with torch.no_grad():
        assert ours.detect_language(x).tolist() == ref.detect_language(x).tolist()


def test_suppressed_tokens_never_come_out(ours):
    """Tokens 5, 6 and 40 are suppressed at every step, 7 and <|endoftext|> at the first: the argmax would
    otherwise pick them for these inputs (the bias below makes them the most likely)."""
    x = features(2, seed=4)
    with torch.no_grad():
        bias = ours.decoder.embed_tokens.weight
        saved_rows = bias[[5, 7, EOT]].clone()
        bias[[5, 7, EOT]] *= 50  # large logits for them wherever the hidden state points their way
        try:
            out = ours.generate(x, language="en", task="transcribe", max_new_tokens=8)
        finally:
            bias[[5, 7, EOT]] = saved_rows
    assert not set(out.flatten().tolist()) & {5, 6, 40}
    assert 7 not in out[:, 0].tolist() and EOT not in out[:, 0].tolist()


def test_batch_equals_rows_alone(ours):
    x = features(3, seed=5)
    batch = ours.generate(x, language="en", max_new_tokens=10)
    for i in range(3):
        alone = ours.generate(x[i : i + 1], language="en", max_new_tokens=10)
        n = alone.shape[1]
        assert batch[i, :n].tolist() == alone[0].tolist()
        assert set(batch[i, n:].tolist()) <= {EOT}  # a row that ended earlier is padded with <|endoftext|>


def test_save_round_trip_into_transformers(saved, ours, tmp_path):
    ref, _ = saved
    pm.save(ours, tmp_path)
    back = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    x, ids = features(1, seed=6), torch.tensor([[SOT, EN, TRANSCRIBE, NO_TS]])
    with torch.no_grad():
        close(back(input_features=x, decoder_input_ids=ids).logits, ref(input_features=x, decoder_input_ids=ids).logits)


def test_key_bias_is_zero_and_fused_projection_equals_separate_ones():
    torch.manual_seed(0)
    lin = ZeroKeyBiasLinear(8, (8, 8, 8), key=1)
    with torch.no_grad():
        lin.nonkey_bias.normal_()
    assert lin.bias[8:16].abs().max() == 0
    x = torch.randn(2, 3, 8)
    q, k, v = lin(x).split(8, dim=-1)
    w = lin.weight.split(8)
    close(k, x @ w[1].T)
    close(v, x @ w[2].T + lin.nonkey_bias[8:])


def test_encoder_positions_are_the_papers_sinusoids(saved):
    ref, _ = saved
    close(sinusoids(TINY["max_source_positions"], TINY["d_model"]), ref.model.encoder.embed_positions.weight)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("openai/")])
def test_preset_parameter_counts_equal_transformers(name):
    c = PRESETS[name]
    fields = {k: getattr(c, k) for k in WhisperConfig.__dataclass_fields__}
    with torch.device("meta"):
        theirs = WhisperForConditionalGeneration(HFWhisperConfig(**fields))
        mine = Whisper(c)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_tiny_preset_runs_and_trains():
    model = pm.build("whisper", "whisper-tiny-test")
    x = torch.randn(2, 16, 60)
    ids = torch.tensor([[91, 1, 2], [91, 3, 4]])
    logits = model(x, ids)
    assert logits.shape == (2, 3, 96)
    logits.logsumexp(-1).sum().backward()
    assert model.encoder.conv1.weight.grad is not None
    assert model.decoder.layers[0].self_attn.qkv.nonkey_bias.grad is not None


def test_bad_inputs_are_refused(ours):
    with pytest.raises(ValueError, match="input_features must be"):
        ours.encode(torch.randn(1, 16, 59))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(features(1), language="en", max_new_tokens=100)
    with pytest.raises(ValueError, match="unknown language"):
        ours.generate(features(1), language="xx")
    with pytest.raises(ValueError, match="task must be"):
        ours.generate(features(1), language="en", task="summarize")


def test_strict_loading_names_a_missing_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.decoder.layers.1.encoder_attn.v_proj.bias"]
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_text((path / f).read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="v_proj.bias"):
        pm.load(tmp_path)


def test_too_deep_config_is_refused(saved, tmp_path):
    import json

    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["decoder_layers"] = 10**7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="decoder_layers"):
        pm.load(tmp_path)
