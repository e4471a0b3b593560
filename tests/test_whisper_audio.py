"""Audio for Whisper: log-mel features equal to transformers' `WhisperFeatureExtractor` (80 and 128 mels, real
speech and synthetic signals), the Slaney filterbank, WAV decoding of every supported encoding, other formats
through PyAV, resampling, and clear refusals of corrupt, truncated, empty, non-finite and too-long audio."""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from polymodal.processing.audio import AudioError, WhisperFeatures, decode_wav, mel_filters, read_audio, resample

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")  # Debian's pocketsphinx-testdata
CLIPS = sorted(LIBRIVOX.glob("*.wav"))
needs_clips = pytest.mark.skipif(not CLIPS, reason="Debian's pocketsphinx-testdata (LibriVox clips) not installed")

# features: the same float32 STFT and filterbank product as transformers' torch path, in another summation order
# (|X|^2 as re^2 + im^2); measured differences are ~1e-7; 1e-4 is the project's fp32 parity bound (1e-5 also held)
ATOL = 1e-5


def wav_bytes(samples: np.ndarray, rate: int, *, width: int = 2, channels: int = 1, fmt: int = 1) -> bytes:
    """A WAV file written by hand (the `wave` module writes integer PCM only): samples (frames, channels) already
    in the stored dtype."""
    data = samples.tobytes()
    bits = 8 * width
    header = struct.pack("<HHIIHH", fmt, channels, rate, rate * channels * width, channels * width, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(header)) + header + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(seconds: float, rate: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@needs_clips
@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_equal_transformers_on_real_speech(n_mels):
    audio = [read_audio(p) for p in CLIPS]
    want = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000, return_tensors="pt")
    got = WhisperFeatures(n_mels)(audio)["input_features"]
    assert got.shape == (len(CLIPS), n_mels, 3000)
    torch.testing.assert_close(got, want.input_features, atol=ATOL, rtol=0)


def test_features_equal_transformers_on_synthetic_audio():
    """Always runs: a chirp with noise, silence, a clip longer than 30 s (cut) and a very short one."""
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    chirp = (np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    audio = [chirp, np.zeros(8000, np.float32), rng.standard_normal(16000 * 31).astype(np.float32) * 0.1,
             tone(0.01)]
    want = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(WhisperFeatures(80)(audio)["input_features"], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_equals_transformers(n_mels):
    want = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                           sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(n_mels, 400, 16000, 0.0, 8000.0), want, atol=1e-8, rtol=0)


@needs_clips
def test_real_clip_reads_as_the_wave_module_does():
    with wave.open(str(CLIPS[0])) as w:
        assert w.getframerate() == 16000
        want = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    np.testing.assert_array_equal(read_audio(CLIPS[0]), want)


@pytest.mark.parametrize("encoding", ["uint8", "int16", "int24", "int32", "float32", "float64"])
def test_wav_encodings_decode_to_the_same_signal(encoding):
    x = tone(0.1)
    stored = {
        "uint8": lambda: ((x * 127).round() + 128).astype(np.uint8),
        "int16": lambda: (x * 32767).round().astype("<i2"),
        "int32": lambda: (x * (2**31 - 1)).round().astype("<i4"),
        "float32": lambda: x.astype("<f4"),
        "float64": lambda: x.astype("<f8"),
    }
    if encoding == "int24":
        v = (x * (2**23 - 1)).round().astype("<i4")
        raw = np.frombuffer(v.tobytes(), np.uint8).reshape(-1, 4)[:, :3].copy()
        data = wav_bytes(raw, 16000, width=3)
    else:
        arr = stored[encoding]()
        data = wav_bytes(arr, 16000, width=arr.dtype.itemsize, fmt=3 if encoding.startswith("float") else 1)
    got = read_audio(data)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, x, atol=1.0 / 100 if encoding == "uint8" else 1e-4)


def test_stereo_is_averaged_and_other_rates_are_resampled():
    left, right = tone(0.5, 8000, 300), tone(0.5, 8000, 300) * 0.5
    stereo = (np.stack([left, right], 1) * 32767).round().astype("<i2")
    got = read_audio(wav_bytes(stereo, 8000, channels=2))
    assert got.shape == (8000,)  # 0.5 s at 16 kHz
    np.testing.assert_allclose(got[400:-400], tone(0.5, 16000, 300)[400:-400] * 0.75, atol=2e-3)


def test_resampling_keeps_a_tone_and_drops_what_the_new_rate_cannot_hold():
    x = tone(1.0, 44100, 1000)
    y = resample(x, 44100, 16000)
    assert y.shape == (16000,)
    np.testing.assert_allclose(y[200:-200], tone(1.0, 16000, 1000)[200:-200], atol=2e-3)
    high = resample(tone(1.0, 44100, 12000), 44100, 16000)  # above the new Nyquist (8 kHz): filtered out
    assert np.abs(high[200:-200]).max() < 0.01
    odd = resample(tone(0.2, 16001, 500), 16001, 16000)  # no common divisor: the nearest small ratio
    assert abs(odd.size - 3200) <= 1


def test_other_formats_go_through_pyav():
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=22050)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((tone(1.0, 22050) * 32767).round().astype(np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = 22050
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    got = read_audio(buf.getvalue())
    assert got.shape == (16000,)
    np.testing.assert_allclose(got[300:-300], tone(1.0)[300:-300], atol=2e-3)


def test_bad_audio_is_refused_with_the_reason(tmp_path):
    good = wav_bytes((tone(1.0) * 32767).astype("<i2"), 16000)
    with pytest.raises(AudioError, match="empty"):
        read_audio(b"")
    with pytest.raises(AudioError, match="truncated"):
        read_audio(good[: len(good) // 2])
    with pytest.raises(AudioError, match="not a readable audio file|need PyAV"):
        read_audio(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="no such audio file"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="no audio samples"):
        read_audio(wav_bytes(np.zeros(0, "<i2"), 16000))
    with pytest.raises(AudioError, match="NaN"):
        read_audio(wav_bytes(np.array([0.0, np.nan], "<f4"), 16000, width=4, fmt=3))
    bad_block = bytearray(good)
    struct.pack_into("<H", bad_block, 32, 3)  # block align of 3 bytes for 16-bit mono
    with pytest.raises(AudioError, match="block size"):
        read_audio(bytes(bad_block))
    with pytest.raises(AudioError, match="unsupported WAV encoding"):
        read_audio(wav_bytes(np.zeros(4, "<i2"), 16000, fmt=2))  # ADPCM
    with pytest.raises(AudioError, match="channels"):
        read_audio(wav_bytes(np.zeros(4, "<i2"), 16000, channels=0))
    with pytest.raises(AudioError, match="one channel"):
        read_audio(np.zeros((2, 100), np.float32))


def test_too_long_audio_is_refused_before_its_samples_are_converted():
    """20 s of samples against a 10-s limit, and a file over the byte limit: refused from the sizes alone."""
    data = wav_bytes(np.zeros(16000 * 20, "<i2"), 16000)
    with pytest.raises(AudioError, match="more than the 10 s allowed"):
        decode_wav(data, max_seconds=10)
    with pytest.raises(AudioError, match="more than the 100 bytes allowed"):
        read_audio(data, max_bytes=100)


def test_streamed_wav_with_unknown_length_reads_what_is_there():
    data = bytearray(wav_bytes((tone(0.25) * 32767).round().astype("<i2"), 16000))
    struct.pack_into("<I", data, 40, 0xFFFFFFFF)  # the data chunk's size, as a writer to a pipe leaves it
    assert read_audio(bytes(data)).shape == (4000,)
