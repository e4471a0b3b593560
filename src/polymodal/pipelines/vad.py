"""Voice activity: `pm.pipeline("voice-activity-detection")` (audio -> speech segments) and `SpeechDetector`, the
streaming form the dialogue loop uses for end of turn and barge-in.

    audio -> read_audio (16 kHz mono) -> SileroVAD.probabilities (one per 512 samples) -> speech_timestamps
          -> [{"start": seconds, "end": seconds}, ...]

`speech_timestamps` turns per-chunk probabilities into segments with the rules of the silero-vad package's
`get_speech_timestamps` (hysteresis between `threshold` and `neg_threshold`, segments shorter than
`min_speech_duration_ms` dropped, silences shorter than `min_silence_duration_ms` bridged, segments longer than
`max_speech_duration_s` cut at their longest inner silence, `speech_pad_ms` added on each side without overlap);
tests/test_silero_vad.py checks that its segments equal the package's, sample for sample.

`SpeechDetector` takes audio in pieces of any size, runs the model on each whole 512-sample chunk with the previous
chunk's 64-sample tail as context and the LSTM state carried, and reports `SpeechEvent`s: "start" when speech
begins, "end" once it has been followed by `min_silence_duration_ms` of silence (the package's `VADIterator` rules;
its events are checked equal).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from polymodal.pipelines.base import Pipeline, as_list
from polymodal.processing.audio import AudioInput, read_audio

# ------------------------------------------------------------------------------------------ segments


@dataclass(frozen=True)
class SegmentRules:
    """The package's `get_speech_timestamps` options, with its defaults and names."""

    threshold: float = 0.5  # a chunk at or above it is speech
    neg_threshold: float | None = None  # in speech, a chunk below it is silence (None: threshold - 0.15, >= 0.01)
    min_speech_duration_ms: float = 250
    max_speech_duration_s: float = math.inf
    min_silence_duration_ms: float = 100
    speech_pad_ms: float = 30
    min_silence_at_max_speech: float = 98  # ms: the shortest silence a too-long segment may be cut at
    use_max_poss_sil_at_max_speech: bool = True  # cut at the longest such silence (else the latest one)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= 1.0:
            raise ValueError(f"neg_threshold must be within [0, 1], got {self.neg_threshold}")
        for name in ("min_speech_duration_ms", "min_silence_duration_ms", "speech_pad_ms", "min_silence_at_max_speech"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not self.max_speech_duration_s > 0:
            raise ValueError(f"max_speech_duration_s must be positive, got {self.max_speech_duration_s}")

    @property
    def exit_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01) if self.neg_threshold is None else self.neg_threshold


class _Segmenter:
    """One pass over the probabilities. Sample positions are chunk starts; 0 also means "none" for the pending
    silence start and the cut points, as in the package (a silence cannot begin at sample 0 inside speech)."""

    def __init__(self, rules: SegmentRules, window: int, rate: int):
        ms = rate / 1000
        self.rules, self.window = rules, window
        self.min_speech = rules.min_speech_duration_ms * ms
        self.min_silence = rules.min_silence_duration_ms * ms
        self.min_cut_silence = rules.min_silence_at_max_speech * ms
        self.pad = rules.speech_pad_ms * ms
        self.max_speech = rate * rules.max_speech_duration_s - window - 2 * self.pad
        self.segments: list[dict[str, int]] = []
        self.start: int | None = None  # the open segment's start; None: not in speech
        self._reset_silences()

    def _reset_silences(self):
        self.silence_from = 0  # where the current run of silence inside speech began
        self.cut_end = self.cut_next = 0  # the latest usable cut: end one segment there, start the next there
        self.silences: list[tuple[int, int]] = []  # (start, length) of the silences seen inside this segment

    def _close(self, end: int, start_next: int | None = None):
        self.segments.append({"start": self.start, "end": end})
        self.start = start_next
        self._reset_silences()

    def step(self, t: int, p: float):
        r = self.rules
        if p >= r.threshold and self.silence_from:  # speech again after a silence: remember it as a cut point
            gap = t - self.silence_from
            if gap > self.min_cut_silence:
                self.silences.append((self.silence_from, gap))
            self.silence_from = 0
            if self.cut_next < self.cut_end:
                self.cut_next = t
        if p >= r.threshold and self.start is None:
            self.start = t
            return
        if self.start is not None and t - self.start > self.max_speech and self._cut_long(t):
            return
        if p < r.exit_threshold and self.start is not None:
            if not self.silence_from:
                self.silence_from = t
            silent = t - self.silence_from
            if not r.use_max_poss_sil_at_max_speech and silent > self.min_cut_silence:
                self.cut_end = self.silence_from
            if silent >= self.min_silence:
                if self.silence_from - self.start > self.min_speech:
                    self.segments.append({"start": self.start, "end": self.silence_from})
                self.start = None
                self._reset_silences()

    def _cut_long(self, t: int) -> bool:
        """The open segment has reached the longest allowed: end it at a silence (or here). True: this chunk is
        done with."""
        if self.rules.use_max_poss_sil_at_max_speech and self.silences:
            at, length = max(self.silences, key=lambda s: s[1])  # the longest silence (the first of equal ones)
            resume = at + length
            self._close(at, resume if resume < at + t else None)  # speech resumed after it: the next segment
            return False
        if self.cut_end:  # the latest silence long enough (use_max_poss_sil_at_max_speech=False)
            end, resume = self.cut_end, self.cut_next
            self._close(end, None if resume < end else resume)
            return False
        self._close(t)  # no silence to cut at: cut here
        return True

    def finish(self, n_samples: int) -> list[dict[str, int]]:
        if self.start is not None and n_samples - self.start > self.min_speech:
            self.segments.append({"start": self.start, "end": n_samples})
        return _padded(self.segments, self.pad, n_samples)


def _padded(segments: list[dict[str, int]], pad: float, n_samples: int) -> list[dict[str, int]]:
    """`pad` samples added on each side; two segments closer than 2 * pad meet halfway between them."""
    for i, seg in enumerate(segments):
        if i == 0:
            seg["start"] = int(max(0, seg["start"] - pad))
        if i + 1 < len(segments):
            nxt = segments[i + 1]
            gap = nxt["start"] - seg["end"]
            if gap < 2 * pad:
                seg["end"] += int(gap // 2)
                nxt["start"] = int(max(0, nxt["start"] - gap // 2))
            else:
                seg["end"] = int(min(n_samples, seg["end"] + pad))
                nxt["start"] = int(max(0, nxt["start"] - pad))
        else:
            seg["end"] = int(min(n_samples, seg["end"] + pad))
    return segments


def speech_timestamps(probabilities, n_samples: int | None = None, *, window: int = 512, sampling_rate: int = 16000,
                      **rules) -> list[dict[str, int]]:
    """Per-chunk speech probabilities (one per `window` samples) -> [{"start", "end"}] in samples. `n_samples`: the
    audio's length (default: whole chunks); `rules`: the fields of `SegmentRules`."""
    opts = SegmentRules(**rules)
    probs = [float(p) for p in (probabilities.tolist() if hasattr(probabilities, "tolist") else probabilities)]
    seg = _Segmenter(opts, window, sampling_rate)
    for i, p in enumerate(probs):
        seg.step(i * window, p)
    return seg.finish(len(probs) * window if n_samples is None else n_samples)


# ------------------------------------------------------------------------------------------ the pipeline


class VoiceActivityDetectionPipeline(Pipeline):
    task = "voice-activity-detection"
    model_kind = "a voice activity model (Silero VAD)"
    takes_images = False

    def __init__(self, model=None, *, device=None, dtype=None, **rules):
        """model: a SileroVAD, a file of its weights, or None for the silero-vad package's; `rules`: the defaults of
        `SegmentRules` for every call."""
        from polymodal.models.silero_vad import load_silero_vad

        if model is None or str(model).endswith((".safetensors", ".jit")):  # the package's files
            model = load_silero_vad(model, device=device, dtype=dtype)
        super().__init__(model, device=device, dtype=dtype, optimize=False)
        self.rules = SegmentRules(**rules)

    def __call__(self, audio: AudioInput | list[AudioInput], **rules) -> list[dict[str, float]] | list[list]:
        """One audio input -> [{"start": s, "end": s}] in seconds; a list of inputs -> a list of them."""
        opts = {**vars(self.rules), **rules}
        items, single = as_list(audio)
        out = [self.segments(read_audio(a), **opts) for a in items]
        return out[0] if single else out

    def segments(self, samples: np.ndarray, **rules) -> list[dict[str, float]]:
        rate = self.model.config.sampling_rate
        probs = self.probabilities(samples)
        found = speech_timestamps(probs, len(samples), window=self.model.config.window_size, sampling_rate=rate,
                                  **rules)
        return [{"start": s["start"] / rate, "end": s["end"] / rate} for s in found]

    def probabilities(self, samples: np.ndarray) -> torch.Tensor:
        """16-kHz samples -> one speech probability per 512-sample chunk."""
        return self.model.probabilities(torch.as_tensor(np.asarray(samples, dtype=np.float32))).cpu()


# ------------------------------------------------------------------------------------------ streaming


@dataclass(frozen=True)
class SpeechEvent:
    kind: Literal["start", "end"]
    sample: int  # where, in samples since the detector started (padded by speech_pad_ms, as the package does)
    sampling_rate: int = 16000

    @property
    def time(self) -> float:
        return self.sample / self.sampling_rate


class SpeechDetector:
    """Streaming voice activity: `feed(samples)` -> the events their whole chunks complete.

        detector = SpeechDetector(min_silence_duration_ms=600)     # a turn ends after 0.6 s of silence
        for piece in microphone:                                   # float32 16-kHz samples, any length
            for event in detector.feed(piece):
                ...                                                # event.kind "start" (barge-in) / "end" (turn over)

    `in_speech` says whether speech is going on; `probability` is the last chunk's. `reset()` starts afresh."""

    def __init__(self, model=None, *, threshold: float = 0.5, min_silence_duration_ms: float = 100,
                 speech_pad_ms: float = 30):
        from polymodal.models.silero_vad import load_silero_vad

        if not 0.0 <= threshold <= 1.0 or min_silence_duration_ms < 0 or speech_pad_ms < 0:
            raise ValueError(f"threshold must be within [0, 1] and the durations at least 0 (got {threshold}, "
                             f"{min_silence_duration_ms}, {speech_pad_ms})")
        self.model = model if isinstance(model, torch.nn.Module) else load_silero_vad(model)
        c = self.model.config
        self.rate, self.window, self.context_size = c.sampling_rate, c.window_size, c.context_size
        self.threshold = threshold
        self.min_silence = c.sampling_rate * min_silence_duration_ms / 1000
        self.pad = c.sampling_rate * speech_pad_ms / 1000
        self.reset()

    def reset(self):
        self.state = self.model.initial_state(1)
        self.context = self.state.new_zeros(self.context_size)  # on the model's device, in its dtype
        self.pending = np.zeros(0, np.float32)  # samples waiting for a whole chunk
        self.samples_seen = 0  # samples of the chunks run so far
        self.in_speech, self.silence_from, self.probability = False, 0, 0.0

    def feed(self, samples) -> list[SpeechEvent]:
        x = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"feed takes one channel of 16-kHz samples (a 1-D array), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the audio holds NaN or infinite samples")
        self.pending = np.concatenate([self.pending, x])
        events = []
        while self.pending.size >= self.window:
            chunk, self.pending = self.pending[: self.window], self.pending[self.window :]
            event = self._chunk(torch.from_numpy(chunk.copy()))
            if event is not None:
                events.append(event)
        return events

    def events(self, pieces) -> Iterator[SpeechEvent]:
        """Every event of a stream of pieces, in order."""
        for piece in pieces:
            yield from self.feed(piece)

    @torch.inference_mode()
    def _chunk(self, chunk: torch.Tensor) -> SpeechEvent | None:
        x = torch.cat([self.context, chunk.to(self.context)])
        prob, self.state = self.model(x[None], self.state)
        self.context = x[-self.context_size :]
        self.samples_seen += self.window
        p = self.probability = float(prob[0])
        if p >= self.threshold:
            self.silence_from = 0
            if not self.in_speech:
                self.in_speech = True
                return SpeechEvent("start", int(max(0, self.samples_seen - self.pad - self.window)), self.rate)
        elif p < self.threshold - 0.15 and self.in_speech:
            self.silence_from = self.silence_from or self.samples_seen
            if self.samples_seen - self.silence_from >= self.min_silence:
                end, self.silence_from, self.in_speech = self.silence_from + self.pad - self.window, 0, False
                return SpeechEvent("end", int(end), self.rate)
        return None
