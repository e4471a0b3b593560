"""Voice activity and speech out: polymodal's Silero VAD against the silero-vad package's own models on the same
weights, and the text-to-speech voices' real-time factor.

    python benchmarks/bench_speech.py            # 5 rounds
    python benchmarks/bench_speech.py --quick    # 2 rounds

VAD (the 5 LibriVox clips of Debian's pocketsphinx-testdata, 24.5 s of speech, joined into one clip):
  parity     = the largest per-chunk probability difference: ours on the TorchScript archive's weights vs the
               package's TorchScript and ONNX models, and (with tinygrad) ours on the safetensors vs its tinygrad model
  clip       = probabilities of the whole clip: ours (`SileroVAD.probabilities`: the convolutions over all chunks at
               once, the LSTM inside torch's kernel) vs the package's way (`model(chunk, 16000)` chunk after chunk,
               as `get_speech_timestamps` does), TorchScript and ONNX
  streaming  = the same chunks one call at a time in both (ours: `SpeechDetector.feed` of each 512-sample chunk)
Each is reported as seconds of compute per second of audio, and the paired ratio package / ours (> 1: ours is
faster; median of the rounds, alternating which side runs first). Both sides run with the same torch thread count,
1 by default (`--threads`): what the package sets on import, and what suits these tiny per-chunk ops (on the shared
2 cores, 2 threads made one chunk of ours 80 ms instead of 1.2 ms: the threads wait on each other).

TTS: each voice speaks a 12-sentence text (about 35 s of speech) -> real-time factor, compute / audio seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from timing import paired_rounds  # benchmarks/timing.py, beside this script

from polymodal.models.silero_vad import load_silero_vad, packaged_silero_vad
from polymodal.pipelines.vad import SpeechDetector
from polymodal.processing.audio import read_audio

CLIPS = sorted(Path("/usr/share/pocketsphinx/test/data/librivox").glob("*.wav"))
TEXT = " ".join(["The quick brown fox jumps over the lazy dog.", "She sells sea shells by the sea shore.",
                 "Please call Stella and ask her to bring these things with her from the store.",
                 "What is the capital of France?"] * 3)


def package_probs(model, x: torch.Tensor) -> list[float]:
    model.reset_states()
    with torch.no_grad():
        return [float(model(c, 16000)) for c in torch.nn.functional.pad(x, (0, (-x.numel()) % 512)).split(512)]


def streaming(model, x: torch.Tensor) -> None:
    detector = SpeechDetector(model)
    for c in x.split(512):
        detector.feed(c.numpy())


def report(name: str, ratios: list[float], ref: list[float], ours: list[float], seconds: float) -> None:
    print(f"  {name:<28} package {statistics.median(ref) / seconds * 1000:7.2f} ms/s   ours "
          f"{statistics.median(ours) / seconds * 1000:7.2f} ms/s   package/ours {statistics.median(ratios):6.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    threads = args.threads
    import silero_vad
    from silero_vad.utils_vad import OnnxWrapper

    torch.set_num_threads(threads)  # after the package's import, which sets 1
    jit_path = packaged_silero_vad().parent / "silero_vad.jit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit = silero_vad.load_silero_vad()
        onnx = OnnxWrapper(str(jit_path.parent / "silero_vad.onnx"), force_onnx_cpu=True)
    ours_jit = load_silero_vad(jit_path)
    x = torch.cat([torch.from_numpy(read_audio(p)) for p in CLIPS])
    seconds = x.numel() / 16000
    print(f"VAD: {len(CLIPS)} LibriVox clips, {seconds:.1f} s of audio, {x.numel() // 512 + 1} chunks, "
          f"{threads} torch threads (onnxruntime: 1 thread, as the package sets it)")
    mine = ours_jit.probabilities(x)
    for name, ref in (("TorchScript", jit), ("ONNX", onnx)):
        diff = (mine - torch.tensor(package_probs(ref, x))).abs().max().item()
        print(f"  parity vs the package's {name}: max |difference| {diff:.2e}")
    try:
        from test_silero_vad import _tinygrad_probs  # tests/, when run from the repository root with it on the path
    except ImportError:
        _tinygrad_probs = None
    if _tinygrad_probs is not None:
        short = torch.from_numpy(read_audio(min(CLIPS, key=lambda p: p.stat().st_size)))
        diff = (load_silero_vad().probabilities(short) - _tinygrad_probs(short)).abs().max().item()
        print(f"  parity, safetensors weights vs the package's tinygrad model (shortest clip): {diff:.2e}")
    for name, ref in (("TorchScript", jit), ("ONNX", onnx)):
        ratios, r, o = paired_rounds(lambda ref=ref: package_probs(ref, x), lambda: ours_jit.probabilities(x), rounds)
        report(f"whole clip vs {name}", ratios, r, o, seconds)
        ratios, r, o = paired_rounds(lambda ref=ref: package_probs(ref, x), lambda: streaming(ours_jit, x), rounds)
        report(f"streaming vs {name}", ratios, r, o, seconds)

    import polymodal as pm
    from polymodal.speech.voices import VoiceError

    print("TTS: real-time factor (compute seconds / audio seconds; lower is faster)")
    for voice in ("joe", "espeak"):
        try:
            pipe = pm.pipeline("text-to-speech", model=voice)
        except VoiceError as e:
            print(f"  {voice}: not installed ({e})")
            continue
        pipe(TEXT[:60])  # warm up (onnxruntime's first run)
        times, audio = [], 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            out = pipe(TEXT)
            times.append(time.perf_counter() - start)
            audio = out["audio"].size / out["sampling_rate"]
        first = time.perf_counter()
        next(iter(pipe.stream(TEXT)))
        first = time.perf_counter() - first
        print(f"  {pipe.voice.name:<20} {audio:5.1f} s of speech in {statistics.median(times):5.2f} s: RTF "
              f"{statistics.median(times) / audio:.3f}; first sentence's audio after {first:.2f} s")


if __name__ == "__main__":
    main()
