"""Speech out: voices (Piper through onnxruntime, espeak-ng as the fallback), sentence splitting for speaking while
text is still arriving, and 16-bit PCM / WAV. The pipeline is `pm.pipeline("text-to-speech")`
(polymodal/pipelines/tts.py)."""

from polymodal.speech.sentences import SentenceBuffer, split_sentences
from polymodal.speech.voices import (
    EspeakVoice,
    PiperVoice,
    VoiceError,
    load_voice,
    packaged_piper_voice,
    to_pcm16,
    wav_bytes,
)

__all__ = [
    "EspeakVoice",
    "PiperVoice",
    "SentenceBuffer",
    "VoiceError",
    "load_voice",
    "packaged_piper_voice",
    "split_sentences",
    "to_pcm16",
    "wav_bytes",
]
