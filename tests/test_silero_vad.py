"""Silero VAD: the port against the silero-vad package's own models, chunk for chunk.

The package ships two releases of the weights: `silero_vad_16k.safetensors` (read by its tinygrad model) and the
TorchScript / ONNX files its `load_silero_vad()` runs (their weights differ from the safetensors': a different
release). Our one network loads both strictly; each is compared with the package's model that holds the same weights:
* the TorchScript archive's weights against the TorchScript model and the ONNX model (onnxruntime), per chunk on real
  speech (Debian's LibriVox clips), silence and noise, fed one chunk at a time with the package's context handling;
* the safetensors weights against the package's tinygrad model (when tinygrad runs here).
Then the segments of `speech_timestamps` against the package's `get_speech_timestamps(_from_probs)`, and the streaming
`SpeechDetector`'s events against its `VADIterator`.

Tolerance: 1e-4, the project's fp32 parity bound; the measured differences are ~1e-6 (the same float32 convolutions
and LSTM, summed in another order).
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.models.silero_vad import (
    FAMILY,
    PRESETS,
    SileroVAD,
    load_silero_vad,
    packaged_silero_vad,
    silero_key_map,
)
from polymodal.pipelines.vad import SegmentRules, SpeechDetector, VoiceActivityDetectionPipeline, speech_timestamps
from polymodal.processing.audio import read_audio

ATOL = 1e-4
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")  # Debian's pocketsphinx-testdata
CLIPS = sorted(LIBRIVOX.glob("*.wav"))
SAFETENSORS = packaged_silero_vad()
needs_package = pytest.mark.skipif(SAFETENSORS is None, reason="the silero-vad package is not installed "
                                   "(pip install --no-deps silero-vad)")
needs_clips = pytest.mark.skipif(not CLIPS, reason="Debian's pocketsphinx-testdata (LibriVox clips) not installed")


def _audios() -> dict[str, torch.Tensor]:
    """Real speech, digital silence, low noise, loud noise and a tone: what a microphone gives."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000 * 2) / 16000
    out = {p.stem[-4:]: torch.from_numpy(read_audio(p)) for p in CLIPS}
    out |= {"silence": torch.zeros(16000), "noise": 0.01 * torch.randn(24000, generator=g),
            "loud-noise": 0.5 * torch.randn(16000, generator=g), "tone": 0.3 * torch.sin(2 * math.pi * 440 * t)}
    return out


@pytest.fixture(scope="module")
def package():
    pytest.importorskip("silero_vad")
    import silero_vad

    torch_threads = torch.get_num_threads()  # the package sets one thread on import; keep the suite's setting
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit = silero_vad.load_silero_vad()
    torch.set_num_threads(torch_threads)
    return silero_vad, jit


@pytest.fixture(scope="module")
def jit_path():
    if SAFETENSORS is None:
        pytest.skip("the silero-vad package is not installed")
    return SAFETENSORS.parent / "silero_vad.jit"


def _package_probs(model, x: torch.Tensor) -> torch.Tensor:
    """The package's way: model(chunk, 16000) on each 512-sample chunk in turn, the last one zero-padded."""
    model.reset_states()
    padded = torch.nn.functional.pad(x, (0, (-x.numel()) % 512))
    with torch.no_grad():
        return torch.tensor([float(model(c, 16000)) for c in padded.split(512)])


# ------------------------------------------------------------------------------------------ the network


def test_tiny_shapes_state_and_batch():
    torch.manual_seed(0)
    model = SileroVAD(PRESETS["silero-vad-16k"])
    with torch.no_grad():
        model.stft.basis.normal_()
    x = torch.randn(3, 576)
    probs, state = model(x)
    assert probs.shape == (3,) and state.shape == (2, 3, 128)
    assert ((probs > 0) & (probs < 1)).all()
    for i in range(3):  # each row alone equals the batch
        alone, _ = model(x[i : i + 1])
        torch.testing.assert_close(alone, probs[i : i + 1], atol=1e-6, rtol=0)
    # the whole-clip path equals feeding chunk by chunk with the previous chunk's tail as context
    audio = torch.randn(512 * 5 + 100)
    chunks = model.chunks(audio)
    assert chunks.shape == (6, 576) and (chunks[0, :64] == 0).all() and (chunks[1, :64] == audio[448:512]).all()
    state, one_by_one = None, []
    for c in chunks:
        p, state = model(c[None], state)
        one_by_one.append(p)
    torch.testing.assert_close(model.probabilities(audio), torch.cat(one_by_one), atol=1e-6, rtol=0)
    for block in (2, 5):  # 5: the last block is one chunk, which takes the single-step LSTM cell
        torch.testing.assert_close(model.probabilities(audio, block=block), torch.cat(one_by_one), atol=1e-6, rtol=0)


def test_bad_chunks_are_refused():
    model = SileroVAD(PRESETS["silero-vad-16k"])
    with pytest.raises(ValueError, match=r"64 context \+ 512 new samples"):
        model(torch.zeros(1, 512))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(576))
    assert model.probabilities(torch.zeros(0)).shape == (0,)


@needs_package
def test_safetensors_loads_strictly_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    import polymodal as pm
    from polymodal.weights.checkpoint import CheckpointError

    model = load_silero_vad()
    assert isinstance(model, SileroVAD) and not any(p.is_meta for p in model.state_dict().values())
    original = load_file(str(SAFETENSORS))
    # the key map's way back gives the package's file exactly
    steps = silero_key_map(model.config).plan_save(list(model.state_dict()))
    written = {s.dst[0]: s.fn([model.state_dict()[s.src[0]]])[0] for s in steps}
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    # pm.save / pm.load in polymodal's layout
    pm.save(model, tmp_path / "saved")
    again = pm.load(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # strict: a missing and an unexpected tensor are named
    broken = dict(original)
    del broken["conv2.bias"]
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"conv2\.bias[\s\S]*extra\.weight|extra\.weight[\s\S]*conv2\.bias"):
        load_silero_vad(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError):
        load_silero_vad(tmp_path / "nothing.jit")
    assert FAMILY.tasks == ("voice-activity-detection",)


@needs_clips
def test_torchscript_weights_equal_the_package_models(package, jit_path):
    """Our network on the TorchScript archive's weights: the same probability per chunk as the package's TorchScript
    model and its ONNX model, on real speech, silence, noise and a tone."""
    _, jit = package
    ours = load_silero_vad(jit_path)
    onnx = None
    if importlib.util.find_spec("onnxruntime") is not None:
        from silero_vad.utils_vad import OnnxWrapper

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx = OnnxWrapper(str(jit_path.parent / "silero_vad.onnx"), force_onnx_cpu=True)
    worst = 0.0
    for name, x in _audios().items():
        got = ours.probabilities(x)
        want = _package_probs(jit, x)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=name)
        worst = max(worst, (got - want).abs().max().item())
        if onnx is not None:
            torch.testing.assert_close(got, _package_probs(onnx, x), atol=ATOL, rtol=0, msg=f"{name} (ONNX)")
        # the streaming form, one chunk at a time with our own context handling, gives the same numbers
        state, ctx, stream = None, torch.zeros(64), []
        for c in torch.nn.functional.pad(x, (0, (-x.numel()) % 512)).split(512):
            chunk = torch.cat([ctx, c])[None]
            with torch.no_grad():
                p, state = ours(chunk, state)
            ctx = chunk[0, -64:]
            stream.append(p)
        torch.testing.assert_close(torch.cat(stream), want, atol=ATOL, rtol=0, msg=f"{name} (streaming)")
    assert worst < ATOL
    speech = torch.cat([ours.probabilities(torch.from_numpy(read_audio(p))) for p in CLIPS])
    assert (speech > 0.5).float().mean() > 0.7  # real speech is found
    assert ours.probabilities(torch.zeros(16000)).max() < 0.1


def _tinygrad_probs(x: torch.Tensor) -> torch.Tensor:
    """The package's tinygrad model on its safetensors file, chunk by chunk, with the context its docstring shows."""
    from tinygrad import Tensor
    from tinygrad.nn.state import load_state_dict, safe_load

    spec = importlib.util.spec_from_file_location("silero_tinygrad", SAFETENSORS.parent.parent / "tinygrad_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TinySileroVAD()
    load_state_dict(model, safe_load(str(SAFETENSORS)), verbose=False)
    wav = torch.nn.functional.pad(x, (0, (-x.numel()) % 512))
    wav = torch.nn.functional.pad(wav, (64, 0)).numpy()[None]
    state, out = None, []
    for i in range(64, wav.shape[1], 512):
        prob, state = model(Tensor(wav[:, i - 64 : i + 512]), state)
        state = state.realize()
        out.append(float(prob.numpy().reshape(-1)[0]))
    return torch.tensor(out)


@needs_clips
@needs_package
@pytest.mark.slow
def test_safetensors_weights_equal_the_package_tinygrad_model():
    """The safetensors release against the one model of the package that reads it (tinygrad, with clang for its CPU
    device): real speech (the shortest clip, 94 chunks), silence and noise."""
    pytest.importorskip("tinygrad")
    try:
        from tinygrad import Device

        Device.DEFAULT  # noqa: B018 - raises where no tinygrad device works (its CPU device needs clang)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"tinygrad has no usable device here ({type(e).__name__})")
    ours = load_silero_vad()
    audios = _audios()
    shortest = min((k for k in audios if k.isdigit()), key=lambda k: audios[k].numel())
    x = torch.cat([audios[shortest], audios["silence"][:8000], audios["noise"][:8000]])
    torch.testing.assert_close(ours.probabilities(x), _tinygrad_probs(x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ segments


def _random_probs(rng: random.Random, n: int) -> list[float]:
    """Speech-like runs: stretches of high and low probabilities with jitter near the thresholds."""
    out, speech = [], rng.random() < 0.5
    while len(out) < n:
        run = rng.randint(1, 60)
        base = 0.8 if speech else 0.1
        out += [min(1.0, max(0.0, base + rng.uniform(-0.45, 0.2))) for _ in range(run)]
        speech = not speech
    return out[:n]


@needs_package
def test_speech_timestamps_equal_the_package_on_random_probabilities(package):
    silero_vad, _ = package
    rng = random.Random(0)
    options = [{}, {"max_speech_duration_s": 1.0},
               {"max_speech_duration_s": 0.5, "use_max_poss_sil_at_max_speech": False},
               {"max_speech_duration_s": 2.0, "min_silence_duration_ms": 300, "speech_pad_ms": 100},
               {"threshold": 0.6, "neg_threshold": 0.3, "min_speech_duration_ms": 50},
               {"speech_pad_ms": 0, "min_silence_at_max_speech": 30, "max_speech_duration_s": 0.8,
                "use_max_poss_sil_at_max_speech": False}]
    compared = 0
    for trial in range(300):
        probs = _random_probs(rng, rng.randint(1, 400))
        n_samples = len(probs) * 512 - rng.randint(0, 511)
        opts = options[trial % len(options)]
        want = silero_vad.get_speech_timestamps_from_probs(probs, audio_length_samples=n_samples, **opts)
        assert speech_timestamps(probs, n_samples, **opts) == want, (trial, opts)
        compared += len(want)
    assert compared > 500  # the trials did produce segments, cut long ones among them


@needs_clips
def test_pipeline_segments_equal_get_speech_timestamps(package, jit_path):
    silero_vad, jit = package
    pipe = VoiceActivityDetectionPipeline(jit_path)  # a Path to the package file
    for name, x in _audios().items():
        want = silero_vad.get_speech_timestamps(x, jit)
        got = pipe(x.numpy())
        assert [(round(s["start"] * 16000), round(s["end"] * 16000)) for s in got] == \
               [(s["start"], s["end"]) for s in want], name
    with_options = dict(threshold=0.7, min_silence_duration_ms=50, speech_pad_ms=10, max_speech_duration_s=2.0)
    x = torch.cat([torch.from_numpy(read_audio(p)) for p in CLIPS[:2]])
    want = silero_vad.get_speech_timestamps(x, jit, **with_options)
    assert len(want) >= 2
    assert [(round(s["start"] * 16000), round(s["end"] * 16000)) for s in pipe(x.numpy(), **with_options)] == \
           [(s["start"], s["end"]) for s in want]


@needs_clips
@needs_package
def test_default_pipeline_on_files_and_silence():
    import polymodal as pm

    pipe = pm.pipeline("voice-activity-detection")
    segments = pipe([str(p) for p in CLIPS])
    assert all(len(s) >= 1 for s in segments)
    for path, segs in zip(CLIPS, segments):
        seconds = len(read_audio(path)) / 16000
        assert all(0 <= s["start"] < s["end"] <= seconds for s in segs)
        assert sum(s["end"] - s["start"] for s in segs) > 0.6 * seconds  # the clips are mostly speech
    assert pipe(np.zeros(32000, np.float32)) == []


def test_bad_rules_and_audio_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        SegmentRules(threshold=1.5)
    with pytest.raises(ValueError, match="max_speech_duration_s"):
        SegmentRules(max_speech_duration_s=0)
    with pytest.raises(ValueError, match="speech_pad_ms"):
        speech_timestamps([0.9], speech_pad_ms=-1)
    model = SileroVAD(PRESETS["silero-vad-16k"])
    with pytest.raises(ValueError, match="1-D"):
        SpeechDetector(model).feed(np.zeros((2, 512)))
    with pytest.raises(ValueError, match="NaN"):
        SpeechDetector(model).feed(np.full(512, np.nan))
    with pytest.raises(ValueError, match="threshold"):
        SpeechDetector(model, threshold=2)


# ------------------------------------------------------------------------------------------ streaming


@needs_clips
def test_speech_detector_events_equal_vad_iterator(package, jit_path):
    """Fed in pieces of awkward sizes, the detector reports the events the package's VADIterator reports for the
    same audio fed chunk by chunk: speech, then silence, then speech again."""
    silero_vad, jit = package
    ours = load_silero_vad(jit_path)
    clips = [torch.from_numpy(read_audio(p)) for p in CLIPS[:3]]
    x = torch.cat([clips[0], torch.zeros(16000), clips[1], 0.01 * torch.randn(12000), clips[2], torch.zeros(8000)])
    for min_silence in (100, 500):
        iterator = silero_vad.VADIterator(jit, min_silence_duration_ms=min_silence)
        want = []
        for c in x.split(512):
            if c.numel() == 512 and (event := iterator(c)):
                want += list(event.items())
        detector = SpeechDetector(ours, min_silence_duration_ms=min_silence)
        sizes = [1000, 7, 512, 3000, 160]
        pieces, i = [], 0
        while i < x.numel():
            pieces.append(x[i : i + sizes[len(pieces) % len(sizes)]].numpy())
            i += pieces[-1].size
        got = [(e.kind, e.sample) for e in detector.events(pieces)]
        assert got == want and len(got) >= 4, min_silence
        assert not detector.in_speech
        detector.reset()
        assert detector.samples_seen == 0 and detector.feed(np.zeros(100, np.float32)) == []


@needs_package
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_speech_detector_hears_speech_mixed_in_at_known_times():
    """What barge-in and end of turn rely on: espeak-ng speech mixed into low noise at known times, fed in 20-ms
    pieces as a sound card gives them. Measured here: each start reported 0.11-0.14 s after the speech's first loud
    sample, each end 0.31-0.34 s after its last one with min_silence_duration_ms=500 (espeak-ng's own trailing
    quiet counts as silence); the bounds: 0.25 s, and the silence asked for plus 0.25 s."""
    from polymodal.pipelines.tts import TextToSpeechPipeline

    tts = TextToSpeechPipeline("espeak")
    utterances = [read_audio(tts.wav("Stop, wait a moment please.")),
                  read_audio(tts.wav("Actually, tell me about the weather."))]
    x = (0.003 * np.random.default_rng(0).standard_normal(16000 * 8)).astype(np.float32)
    loud = []
    for at, u in zip((16000, 16000 * 5), utterances):
        x[at : at + u.size] += u
        above = np.flatnonzero(np.abs(u) > 0.02)
        loud.append((at + above[0], at + above[-1]))
    detector = SpeechDetector(min_silence_duration_ms=500)
    reported = []  # (kind, sample of the event, samples heard when it was reported)
    for i in range(0, x.size, 320):
        reported += [(e.kind, e.sample, detector.samples_seen) for e in detector.feed(x[i : i + 320])]
    assert [k for k, _, _ in reported] == ["start", "end", "start", "end"]
    for (first, last), (_, start, heard_start), (_, end, heard_end) in zip(loud, reported[::2], reported[1::2]):
        assert first - 0.1 * 16000 <= start and 0 <= heard_start - first <= 0.25 * 16000
        assert end <= last + 0.1 * 16000 and 0 <= heard_end - last <= (0.5 + 0.25) * 16000
