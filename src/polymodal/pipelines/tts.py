"""Speech out: `pm.pipeline("text-to-speech", model=None | voice name | voice)` -> {"audio", "sampling_rate"}, the
keys of transformers' text-to-speech pipeline; the audio here is 16-bit PCM (int16), what a WAV file or a sound card
takes.

    text -> checked (not empty, at most MAX_CHARS) -> split_sentences -> the voice, sentence by sentence
         -> float samples -> int16, joined with `pause` seconds of silence between sentences

`stream(text)` yields each sentence's audio as soon as it is spoken, so a dialogue can start talking after the first
sentence; `wav(text)` is the whole answer as a WAV file. The voice is the packaged Piper voice ("joe", through
piper-tts and onnxruntime) when installed, else espeak-ng (polymodal/speech/voices.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from polymodal.speech.sentences import split_sentences
from polymodal.speech.voices import load_voice, to_pcm16, wav_bytes

MAX_CHARS = 100_000  # about two hours of speech: longer texts are refused before any synthesis
SPEEDS = (0.25, 4.0)  # OpenAI's range for `speed`


def check_text(text) -> str:
    """The text to speak, or a ValueError saying why not."""
    if not isinstance(text, str):
        raise ValueError(f"text-to-speech takes a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ValueError(f"the text is {len(text)} characters, more than the {MAX_CHARS} allowed; speak it in parts")
    if not any(ch.isalnum() for ch in text):
        raise ValueError("there is no text to speak (it is empty, blank or only punctuation)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON can carry one): no voice can read it
        raise ValueError(f"the text holds a character that is not valid Unicode at position {e.start}") from None
    return text


class TextToSpeechPipeline:
    task = "text-to-speech"

    def __init__(self, model=None, *, voice=None, pause: float = 0.2, speed: float = 1.0):
        """model / voice: a voice name for `load_voice` (None: the best installed), or a voice object (with
        `synthesize(text, speed=...)` and `sampling_rate`); pause: seconds of silence between sentences."""
        if model is not None and voice is not None:
            raise ValueError("give the voice as model=... or voice=..., not both")
        if not 0 <= pause <= 5:
            raise ValueError(f"pause must be between 0 and 5 seconds, got {pause}")
        self.pause, self.speed = pause, _checked_speed(speed)
        chosen = voice if voice is not None else model
        self.voice = chosen if hasattr(chosen, "synthesize") else load_voice(chosen)

    @property
    def sampling_rate(self) -> int:
        return int(self.voice.sampling_rate)

    def __call__(self, text: str | list[str], *, speed: float | None = None) -> dict | list[dict]:
        """One text -> {"audio": int16 samples, "sampling_rate": Hz}; a list of texts -> a list of them."""
        if isinstance(text, (list, tuple)):
            return [self(t, speed=speed) for t in text]
        parts = [p["audio"] for p in self.stream(text, speed=speed)]
        gap = np.zeros(round(self.pause * self.sampling_rate), np.int16)
        joined = [x for i, p in enumerate(parts) for x in ((gap, p) if i else (p,))]
        return {"audio": np.concatenate(joined) if joined else np.zeros(0, np.int16),
                "sampling_rate": self.sampling_rate}

    def stream(self, text: str, *, speed: float | None = None) -> Iterator[dict]:
        """Each sentence's audio as soon as it is synthesized: {"text": the sentence, "audio": int16 samples,
        "sampling_rate": Hz}. The text is checked before the first sentence is spoken."""
        sentences = split_sentences(check_text(text))
        speed = self.speed if speed is None else _checked_speed(speed)
        return self._speak(sentences, speed)

    def _speak(self, sentences: list[str], speed: float) -> Iterator[dict]:
        for sentence in sentences:
            audio = to_pcm16(self.voice.synthesize(sentence, speed=speed))
            yield {"text": sentence, "audio": audio, "sampling_rate": self.sampling_rate}

    def wav(self, text: str, *, speed: float | None = None) -> bytes:
        """The whole text spoken, as a 16-bit mono WAV file at the voice's rate."""
        out = self(text, speed=speed)
        return wav_bytes(out["audio"], out["sampling_rate"])


def _checked_speed(speed) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not SPEEDS[0] <= speed <= SPEEDS[1]:
        raise ValueError(f"speed must be a number from {SPEEDS[0]} to {SPEEDS[1]}, got {speed!r}")
    return float(speed)
