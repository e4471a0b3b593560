"""Audio in: safe decoding (WAV by our own bounded reader, other formats through PyAV when it is installed),
resampling to 16 kHz, and Whisper's log-mel features.

`read_audio(source)` -> float32 mono samples at 16 kHz. A file's size and a WAV header's duration are checked
before any sample is converted, so an hour-long or lying file is refused (`AudioError`, naming the limit) rather
than allocated; corrupt, truncated, empty and non-finite audio are refused with the reason.

`WhisperFeatures` equals transformers' `WhisperFeatureExtractor` (its default torch path): audio padded or cut to
30 s, a 400-point STFT with a periodic Hann window every 10 ms (160 samples), the power spectrum through a Slaney
mel filterbank (80 or 128 filters up to 8 kHz, computed here as librosa's `filters.mel(htk=False, norm="slaney")`
defines it), log10 clamped at 1e-10 and at 8 below the maximum, then (x + 4) / 4. tests/test_whisper_audio.py checks
it against transformers on real speech.
"""

from __future__ import annotations

import io
import math
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SAMPLING_RATE = 16000  # what Whisper hears
MAX_SECONDS = 3 * 3600.0  # the longest audio read_audio accepts by default
MAX_BYTES = 2 * 1024**3  # the largest file: 3 h of 16-bit stereo at 48 kHz is ~2 GB
_MAX_CHANNELS = 64
_MAX_RATE = 768_000

AudioInput = Any  # a path, bytes, a binary file object, or samples (a 1-D array / tensor at 16 kHz)


class AudioError(ValueError):
    """Audio that cannot be read: what was wrong, and with which input."""


# ------------------------------------------------------------------------------------------ decoding


def read_audio(source: AudioInput, *, sampling_rate: int = SAMPLING_RATE, max_seconds: float = MAX_SECONDS,
               max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode `source` to float32 mono samples at `sampling_rate` (channels averaged, resampled when the file's
    rate differs). Arrays and tensors are taken as samples at `sampling_rate` already."""
    if isinstance(source, (np.ndarray, Tensor)):
        samples = np.asarray(source.detach().cpu() if isinstance(source, Tensor) else source, dtype=np.float32)
        if samples.ndim != 1:
            raise AudioError(f"audio samples must be one channel (a 1-D array), got shape {samples.shape}")
        return _checked(samples, sampling_rate, max_seconds, "the samples")
    data, name = _read_bytes(source, max_bytes)
    if not data:
        raise AudioError(f"{name}: empty file")
    if data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        samples, rate = decode_wav(data, max_seconds=max_seconds, name=name)
    else:
        samples, rate = _decode_with_av(data, max_seconds, name)
    if rate != sampling_rate:
        samples = resample(samples, rate, sampling_rate)
    return _checked(samples, sampling_rate, max_seconds, name)


def _checked(samples: np.ndarray, rate: int, max_seconds: float, name: str) -> np.ndarray:
    if samples.size == 0:
        raise AudioError(f"{name}: no audio samples")
    if samples.size / rate > max_seconds:
        raise AudioError(f"{name}: {samples.size / rate:.0f} s of audio, more than the {max_seconds:.0f} s allowed")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio holds NaN or infinite samples")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read_bytes(source: AudioInput, limit: int) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limit:
            raise AudioError(f"the audio is {len(source)} bytes, more than the {limit} bytes allowed")
        return bytes(source), "the audio"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{path}: no such audio file")
        size = path.stat().st_size
        if size > limit:
            raise AudioError(f"{path}: {size} bytes, more than the {limit} bytes allowed")
        return path.read_bytes(), str(path)
    if hasattr(source, "read"):
        data = source.read(limit + 1)
        if len(data) > limit:
            raise AudioError(f"the audio is more than the {limit} bytes allowed")
        return data, getattr(source, "name", "the audio")
    raise AudioError(f"cannot read audio from a {type(source).__name__} (give a path, bytes, a file or samples)")


_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def decode_wav(data: bytes, *, max_seconds: float = MAX_SECONDS, name: str = "the WAV file") -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file -> (float32 mono samples, sample rate). Integer PCM of 8 (unsigned), 16, 24 or 32 bits and
    IEEE float of 32 or 64 bits, plain or WAVE_FORMAT_EXTENSIBLE; every header field is checked, and the duration
    against max_seconds, before the samples are converted."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{name}: only little-endian RIFF WAVE files are supported (this one starts "
                         f"{data[:4]!r})")
    fmt, pos = None, 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + size > len(data):
                raise AudioError(f"{name}: corrupt WAV: a 'fmt ' chunk of {size} bytes")
            fmt = _wav_format(data[body : body + size], name)
        elif chunk == b"data":
            if fmt is None:
                raise AudioError(f"{name}: corrupt WAV: the 'data' chunk comes before 'fmt '")
            available = len(data) - body
            if size > available:
                if size not in (0xFFFFFFFF, 0):  # a streamed file, whose writer could not know the length
                    raise AudioError(f"{name}: truncated WAV: its 'data' chunk says {size} bytes, the file holds "
                                     f"{available}")
                size = available
            return _wav_samples(data[body : body + size], fmt, max_seconds, name), fmt[1]
        pos = body + size + (size & 1)  # chunks are padded to an even size
    raise AudioError(f"{name}: corrupt WAV: no 'fmt ' and 'data' chunks" if fmt is None else
                     f"{name}: corrupt WAV: no 'data' chunk")


def _wav_format(fmt: bytes, name: str) -> tuple[str, int, int, int]:
    """-> (kind "int" / "uint8" / "float", rate, channels, bytes per sample)."""
    tag, channels, rate, _byte_rate, block, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID begins with the plain format tag
    if not 1 <= channels <= _MAX_CHANNELS:
        raise AudioError(f"{name}: corrupt WAV: {channels} channels")
    if not 1 <= rate <= _MAX_RATE:
        raise AudioError(f"{name}: corrupt WAV: a sample rate of {rate} Hz")
    kinds = {(_PCM, 8): "uint8", (_PCM, 16): "int", (_PCM, 24): "int", (_PCM, 32): "int", (_FLOAT, 32): "float",
             (_FLOAT, 64): "float"}
    kind = kinds.get((tag, bits))
    if kind is None:
        raise AudioError(f"{name}: unsupported WAV encoding (format {tag:#x}, {bits} bits); supported: integer PCM "
                         "of 8/16/24/32 bits and float of 32/64 bits")
    if block != channels * bits // 8:
        raise AudioError(f"{name}: corrupt WAV: block size {block} for {channels} channels of {bits} bits")
    return kind, rate, channels, bits // 8


def _wav_samples(raw: bytes, fmt: tuple[str, int, int, int], max_seconds: float, name: str) -> np.ndarray:
    kind, rate, channels, width = fmt
    frames = len(raw) // (channels * width)
    if frames / rate > max_seconds:
        raise AudioError(f"{name}: {frames / rate:.0f} s of audio, more than the {max_seconds:.0f} s allowed")
    raw = raw[: frames * channels * width]
    if kind == "uint8":
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif kind == "float":
        x = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 3:  # 24-bit: three little-endian bytes, sign-extended from the top one
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2.0**23
    else:
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    return x.reshape(frames, channels).mean(axis=1) if channels > 1 else x


def _decode_with_av(data: bytes, max_seconds: float, name: str) -> tuple[np.ndarray, int]:
    """Any other container (MP3, FLAC, Ogg, M4A, ...) through PyAV (FFmpeg's decoders), stopping as soon as the
    decoded audio passes max_seconds."""
    try:
        import av
    except ImportError:
        raise AudioError(f"{name}: not a WAV file, and other formats need PyAV (pip install av)") from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise AudioError(f"{name}: no audio stream in the file")
            stream = streams[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if not rate or not 1 <= rate <= _MAX_RATE:
                raise AudioError(f"{name}: corrupt audio: a sample rate of {rate} Hz")
            parts, total = [], 0
            for frame in container.decode(stream):
                channels = len(frame.layout.channels)
                x = _to_float(frame.to_ndarray())
                x = x.reshape(channels, -1) if frame.format.is_planar else x.reshape(-1, channels).T
                x = x.mean(axis=0)
                parts.append(x)
                total += x.size
                if total / rate > max_seconds:
                    raise AudioError(f"{name}: more than the {max_seconds:.0f} s of audio allowed")
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors for data that is no audio are of many kinds
        raise AudioError(f"{name}: not a readable audio file ({type(e).__name__})") from None
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), int(rate)


def _to_float(x: np.ndarray) -> np.ndarray:
    """Decoded samples of any of FFmpeg's sample formats -> float32 in [-1, 1]."""
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    return x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))


# ------------------------------------------------------------------------------------------ resampling


_MAX_KERNEL = 1 << 23  # values in a resampling kernel (a 16001 -> 16000 Hz one would need ~2.6e8)


def resample(x: np.ndarray, orig: int, new: int, *, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Band-limited resampling by a windowed sinc: each output sample is a Hann-windowed sinc of `width` zero
    crossings (the lower rate's, times `rolloff`) over the input. The rates' ratio is reduced by their gcd and the
    work is one strided convolution with one kernel per output phase. A ratio that would need a kernel of more than
    _MAX_KERNEL values (rates with no large common divisor) takes the nearest ratio with a denominator of at most
    1000."""
    if orig == new or x.size == 0:
        return x.astype(np.float32)
    ratio = Fraction(new, orig)
    if ratio.numerator * (ratio.denominator + 2 * math.ceil(width / rolloff) + 2) > _MAX_KERNEL:
        ratio = ratio.limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    cutoff = min(up, down) * rolloff  # in units where the input rate is `down`
    half = math.ceil(width * down / cutoff)
    taps = torch.arange(-half, half + down, dtype=torch.float64) / down  # (L,) input offsets, in input samples
    phase = -torch.arange(up, dtype=torch.float64)[:, None] / up  # (up, 1) each output phase's delay
    t = ((taps[None] + phase) * cutoff).clamp(-width, width)  # (up, L) in zero crossings
    window = torch.cos(t * math.pi / width / 2) ** 2
    sinc = torch.sinc(t)  # sin(pi t) / (pi t)
    kernel = (sinc * window * cutoff / down).float()  # (up, L)
    signal = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    padded = torch.nn.functional.pad(signal[None, None], (half, half + down))
    out = torch.nn.functional.conv1d(padded, kernel[:, None], stride=down)  # (1, up, frames)
    out = out[0].t().reshape(-1)
    return out[: math.ceil(up * x.size / down)].numpy()


# ------------------------------------------------------------------------------------------ log-mel features


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * logstep)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(logstep * (m - 15.0)))


def mel_filters(n_mels: int, n_fft: int = 400, sampling_rate: int = SAMPLING_RATE, fmin: float = 0.0,
                fmax: float | None = None) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on Slaney's mel scale between fmin and fmax
    (default: half the sampling rate), each scaled to unit area ("slaney" norm: 2 / its width in Hz)."""
    fmax = sampling_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)  # the STFT bins' frequencies
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]  # (F, n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    tri = np.maximum(0.0, np.minimum(rising, falling))  # (F, n_mels)
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None]


class WhisperFeatures:
    """Audio -> Whisper's log-mel input features (B, n_mels, 3000), as transformers' `WhisperFeatureExtractor`."""

    def __init__(self, n_mels: int = 80, *, sampling_rate: int = SAMPLING_RATE, n_fft: int = 400,
                 hop_length: int = 160, chunk_length: int = 30):
        if n_mels < 1 or n_fft < 2 or hop_length < 1 or chunk_length < 1:
            raise ValueError(f"bad feature settings: n_mels={n_mels}, n_fft={n_fft}, hop_length={hop_length}, "
                             f"chunk_length={chunk_length}")
        self.n_mels, self.sampling_rate, self.n_fft, self.hop_length = n_mels, sampling_rate, n_fft, hop_length
        self.n_samples = chunk_length * sampling_rate  # 480000: every input is padded or cut to this
        self.num_frames = self.n_samples // hop_length  # 3000
        self.filters = torch.from_numpy(mel_filters(n_mels, n_fft, sampling_rate, 0.0, 8000.0)).float().T.contiguous()
        self.window = torch.hann_window(n_fft)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, n_mels: int | None = None) -> WhisperFeatures:
        """From preprocessor_config.json beside the weights when there is one; else the defaults with `n_mels`
        (a CTranslate2 folder has none: its model's mel bins decide)."""
        path = Path(directory) / "preprocessor_config.json"
        if path.exists():
            from polymodal.weights.checkpoint import read_json

            cfg = read_json(path)
            return cls(int(cfg.get("feature_size", n_mels or 80)),
                       sampling_rate=int(cfg.get("sampling_rate", SAMPLING_RATE)),
                       n_fft=int(cfg.get("n_fft", 400)), hop_length=int(cfg.get("hop_length", 160)),
                       chunk_length=int(cfg.get("chunk_length", 30)))
        return cls(n_mels or 80)

    def pad(self, audios: list[np.ndarray]) -> Tensor:
        """Each input zero-padded (or cut) to 30 s -> (B, n_samples) float32."""
        out = torch.zeros(len(audios), self.n_samples)
        for i, a in enumerate(audios):
            a = torch.as_tensor(np.asarray(a, dtype=np.float32))[: self.n_samples]
            out[i, : a.numel()] = a
        return out

    def log_mel(self, waveform: Tensor) -> Tensor:
        """(B, N) samples -> (B, n_mels, N // hop) log-mel features."""
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=self.window.to(waveform.device),
                          return_complex=True)  # (B, F, N // hop + 1), centred frames (reflect padding)
        frames = stft[..., :-1]  # every frame but the last
        power = frames.real.square() + frames.imag.square()  # |X|^2 (half the time of view_as_real(...).pow(2).sum)
        mel = self.filters.to(waveform.device) @ power  # (B, n_mels, frames)
        log = mel.clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)  # an 80 dB range below each row's peak
        return (log + 4.0) / 4.0

    def __call__(self, audios: AudioInput | list[AudioInput]) -> dict[str, Tensor]:
        """One audio input or a list -> {"input_features": (B, n_mels, 3000)}; paths and bytes are decoded by
        `read_audio`, arrays taken as 16-kHz samples."""
        items = audios if isinstance(audios, list) else [audios]
        decoded = [read_audio(a, sampling_rate=self.sampling_rate) for a in items]
        return {"input_features": self.log_mel(self.pad(decoded))}
