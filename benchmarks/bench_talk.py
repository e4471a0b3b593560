"""Spoken dialogue latency: end of the user's speech -> each stage of the cascade (polymodal/speech/dialogue.py),
with the packaged models: Whisper tiny.en, SmolLM2-135M-Instruct (Q4_1 GGUF), the Piper voice (joe).

    python benchmarks/bench_talk.py              # 5 questions x 2 rounds
    python benchmarks/bench_talk.py --quick      # 3 questions x 1 round
    python benchmarks/bench_talk.py --live       # also through Dialogue(realtime=True), fed at the speed of speech

The questions are spoken by the Piper voice (resampled to 16 kHz), each asked in a fresh conversation (a first turn,
the system prompt of `polymodal talk`), after one warm-up run of every model (`Cascade.warm_up`, as `polymodal talk`
does). Stages, in seconds after the end of the user's speech (the VAD's end of speech):
  vad            the end of turn is decided: min_silence_ms of silence heard in real time (+ the deciding window)
  asr            Whisper's transcript is there
  first_token    the chat model's first text piece
  first_sentence its first whole sentence (SentenceBuffer)
  first_audio    the voice has spoken that sentence: the first audio could go out
Per question: `find_turn` on the recording (the VAD over it, with the silence after it), then `Cascade.reply`.
--live feeds each recording, then silence, into a `Dialogue(realtime=True)` one 32-ms window at a time at the pace
of real time and reports when its first output window carried audio (`audio_start - end`): what a person at a
microphone would wait, with the VAD, the models and the feed sharing the CPU (wall clock, from when the end of
speech was due at the microphone to when the first window with audio was ready; a feed that falls behind real time
counts). The Dialogue transcribes ahead in the pause (`speculate`); --no-speculate turns that off.

The machine's load average is printed: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from polymodal.processing.audio import resample
from polymodal.speech.dialogue import STAGES, Cascade, find_turn, replay

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What color is the sky?",
             "Who wrote Romeo and Juliet?", "What is the largest planet?"]
RATE = 16000


def spoken(cascade: Cascade, text: str) -> np.ndarray:
    audio = np.concatenate([c["audio"] for c in cascade.tts.stream(text)]).astype(np.float32) / 32768
    return resample(audio, cascade.sampling_rate, RATE)


def one_turn(cascade: Cascade, samples: np.ndarray, min_silence_ms: float) -> dict:
    cascade.reset()
    speech, heard_for = find_turn(samples, min_silence_ms=min_silence_ms)
    reply = cascade.reply(speech, heard_for=heard_for)
    for _ in reply:
        pass
    return {**reply.latency, "transcript": reply.transcript, "answer": reply.spoken}


def live_turn(cascade: Cascade, samples: np.ndarray, min_silence_ms: float, speculate: bool
              ) -> tuple[float | None, float]:
    """-> (seconds from the end of speech to the first audio out, the feed's worst lag behind real time)."""
    cascade.reset()
    played = replay(cascade, samples, min_silence_ms=min_silence_ms, speculate=speculate, until_first_audio=True)
    if played["turn"] is not None:
        stages = played["turn"].latency
        print("      stages: " + ", ".join(f"{s} {stages[s]:.2f}" for s in STAGES if stages[s] is not None))
    return played["waited"], played["lag"]


def summary(rows: list[dict]) -> str:
    out = [f"{'stage':<16}{'median':>8}{'min':>8}{'max':>8}  (seconds after the end of speech)"]
    for s in STAGES:
        v = [r[s] for r in rows if r[s] is not None]
        out.append(f"{s:<16}{statistics.median(v):8.2f}{min(v):8.2f}{max(v):8.2f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--min-silence-ms", type=float, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--live", action="store_true", help="also measure through Dialogue(realtime=True)")
    ap.add_argument("--no-speculate", action="store_true", help="--live: no transcription ahead, in the pause")
    ap.add_argument("--live-only", action="store_true", help="only the --live measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (polymodal talk's default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions = QUESTIONS[:3] if args.quick else QUESTIONS
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    cascade = Cascade(max_new_tokens=args.max_new_tokens)
    cascade.warm_up()
    print(f"loaded and warmed up in {time.perf_counter() - t:.1f} s; voice {cascade.tts.voice.name}")
    recordings = {q: spoken(cascade, q) for q in questions}
    rows = []
    for r in range(0 if args.live_only else rounds):
        for samples in recordings.values():
            row = one_turn(cascade, samples, args.min_silence_ms)
            rows.append(row)
            print(f"[{r}] {row['transcript']!r} -> {row['answer']!r}: " +
                  ", ".join(f"{s} {row[s]:.2f}" for s in STAGES if row[s] is not None))
    if rows:
        print(summary(rows))
    if args.live or args.live_only:
        waits = []
        for q, samples in recordings.items():
            wait, lag = live_turn(cascade, samples, args.min_silence_ms, not args.no_speculate)
            waits.append(wait)
            print(f"live {q!r}: first audio {wait if wait is None else round(wait, 2)} s after the end of speech "
                  f"(the feed lagged real time by {lag * 1000:.0f} ms at the most)")
        got = [w for w in waits if w is not None]
        if got:
            print(f"live: median {statistics.median(got):.2f} s, min {min(got):.2f}, max {max(got):.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
