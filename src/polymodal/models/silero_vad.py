"""Silero VAD (Silero Team, "Silero VAD: pre-trained enterprise-grade Voice Activity Detector", v5/v6): a speech
probability for every 32 ms of 16-kHz audio, from a network small enough to run on every chunk of a live stream.

    chunk: 64 samples of context + 512 new ones (B, 576)
      -> reflect-pad 64 on the right -> STFT as a strided conv with a stored basis (256-point, hop 128) -> |X|
         (B, 129, 4)
      -> encoder: four 3-tap convs with ReLU, strides 1, 2, 2, 1 (B, 128, 1)
      -> decoder: an LSTM cell carried from chunk to chunk (B, 128) -> ReLU -> 1x1 conv -> sigmoid   (B,)

The weights are the ones the `silero-vad` package ships as `silero_vad_16k.safetensors` (16 kHz only); they load
strictly through the shared loader with the key map below. The reference is the package's own TorchScript model
(`silero_vad.jit`, the same network as its ONNX files): tests/test_silero_vad.py checks that every chunk's probability
equals it within 1e-4 on real speech, silence and noise.

Two ways to run it, with the same numbers:
* streaming: `model(chunk_with_context, state) -> (probabilities, state)`, one 512-sample chunk at a time (what a
  microphone feeds; `polymodal.pipelines.vad.SpeechDetector` wraps it with the context and state);
* a whole clip: `model.probabilities(samples)` runs the STFT and the encoder over all chunks at once (they do not
  depend on each other) and only the LSTM step by step, inside torch's LSTM kernel.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, to_dict
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, KeyMap, Rename

# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SileroVADConfig:
    sampling_rate: int = 16000
    window_size: int = 512  # new samples per chunk (32 ms)
    context_size: int = 64  # samples of the previous chunk seen again at the start of each chunk
    filter_length: int = 256  # STFT points
    hop_length: int = 128
    stft_padding: int = 64  # reflected on the right of each chunk before the STFT (as the reference's ReflectionPad1d)
    encoder_channels: tuple[int, ...] = (128, 64, 64, 128)
    encoder_strides: tuple[int, ...] = (1, 2, 2, 1)
    kernel_size: int = 3
    hidden_size: int = 128  # the LSTM's

    def __post_init__(self):
        if len(self.encoder_channels) != len(self.encoder_strides) or not self.encoder_channels:
            raise ValueError(f"SileroVADConfig: {len(self.encoder_channels)} encoder channel counts for "
                             f"{len(self.encoder_strides)} strides")
        if self.context_size >= self.window_size or self.filter_length > self.chunk_size + self.stft_padding:
            raise ValueError("SileroVADConfig: the context must be shorter than a window, and the STFT no longer "
                             "than a padded chunk")

    @property
    def n_freqs(self) -> int:
        return self.filter_length // 2 + 1

    @property
    def chunk_size(self) -> int:
        """Samples the network reads per chunk: the context and the new window."""
        return self.context_size + self.window_size


# ------------------------------------------------------------------------------------------ blocks


class STFTMagnitude(nn.Module):
    """|STFT| as one strided convolution with a stored basis: the first n_freqs filters give the real parts, the
    rest the imaginary ones (the checkpoint holds the basis, window included, so it is a loaded buffer)."""

    def __init__(self, filter_length: int, hop_length: int, pad: int):
        super().__init__()
        self.hop_length, self.pad, self.n_freqs = hop_length, pad, filter_length // 2 + 1
        self.register_buffer("basis", torch.empty(2 * self.n_freqs, 1, filter_length))

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x[:, None], (0, self.pad), mode="reflect")  # (B, 1, N + pad)
        spec = F.conv1d(x, self.basis, stride=self.hop_length)  # (B, 2F, frames)
        real, imag = spec[:, : self.n_freqs], spec[:, self.n_freqs :]
        return (real.pow(2) + imag.pow(2)).sqrt()  # (B, F, frames)


# ------------------------------------------------------------------------------------------ the model


class SileroVAD(nn.Module):
    def __init__(self, config: SileroVADConfig):
        super().__init__()
        c = self.config = config
        self.stft = STFTMagnitude(c.filter_length, c.hop_length, c.stft_padding)
        widths = (c.n_freqs, *c.encoder_channels)
        self.encoder = nn.ModuleList(
            nn.Conv1d(widths[i], widths[i + 1], c.kernel_size, stride=s, padding=c.kernel_size // 2)
            for i, s in enumerate(c.encoder_strides))
        self.rnn = nn.LSTM(c.encoder_channels[-1], c.hidden_size, batch_first=True)
        self.head = nn.Conv1d(c.hidden_size, 1, 1)

    def initial_state(self, batch_size: int = 1) -> Tensor:
        """The state before the first chunk: (2, B, H), the LSTM's h and c at zero."""
        p = self.head.weight
        return torch.zeros(2, batch_size, self.config.hidden_size, device=p.device, dtype=p.dtype)

    def features(self, chunks: Tensor) -> Tensor:
        """(N, context + window) chunks -> (N, encoder width): the part of the network without memory."""
        x = self.stft(chunks)
        for conv in self.encoder:
            x = F.relu(conv(x))
        return x.mean(-1)  # (N, C, 1) for the 576-sample chunks: the one frame left

    def decode(self, feats: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, C) features of T consecutive chunks per row and the (2, B, H) state -> ((B, T) speech
        probabilities, the state after them)."""
        if feats.shape[1] == 1:  # one step (streaming): the cell alone, without nn.LSTM's per-call overhead (~6x)
            r = self.rnn
            h_n, c_n = torch.lstm_cell(feats[:, 0], (state[0], state[1]), r.weight_ih_l0, r.weight_hh_l0,
                                       r.bias_ih_l0, r.bias_hh_l0)
            h, h_n, c_n = h_n[:, None], h_n[None], c_n[None]
        else:
            h, (h_n, c_n) = self.rnn(feats, (state[:1].contiguous(), state[1:].contiguous()))  # (B, T, H)
        logits = self.head(F.relu(h).transpose(1, 2))  # (B, 1, T)
        return torch.sigmoid(logits[:, 0]), torch.cat([h_n, c_n])

    def forward(self, chunk: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One chunk per row: (B, context + window) samples (the previous chunk's last `context_size` samples, then
        the new ones) and the state -> ((B,) speech probabilities, the new state)."""
        if chunk.ndim != 2 or chunk.shape[1] != self.config.chunk_size:
            raise ValueError(f"Silero VAD takes chunks of {self.config.context_size} context + "
                             f"{self.config.window_size} new samples, shape (B, {self.config.chunk_size}); got "
                             f"{tuple(chunk.shape)}")
        state = self.initial_state(chunk.shape[0]) if state is None else state
        probs, state = self.decode(self.features(chunk)[:, None], state)
        return probs[:, 0], state

    def chunks(self, samples: Tensor) -> Tensor:
        """(N,) samples -> (ceil(N / window), context + window): zero-padded to whole windows, each with the
        previous window's tail as its context (zeros before the first), as the streaming model sees them."""
        c = self.config
        n = -(-samples.numel() // c.window_size) * c.window_size
        if n == 0:
            return samples.new_zeros(0, c.chunk_size)
        padded = F.pad(samples.reshape(-1), (c.context_size, n - samples.numel()))
        return padded.unfold(0, c.chunk_size, c.window_size)

    @torch.inference_mode()
    def probabilities(self, samples: Tensor, *, block: int = 4096) -> Tensor:
        """(N,) 16-kHz samples -> (ceil(N / window),) speech probabilities, one per 512-sample chunk, equal to
        feeding the chunks one by one from a fresh state. `block` chunks are encoded at a time (bounded memory)."""
        p = self.head.weight
        chunks = self.chunks(samples.to(p.device, p.dtype))
        state, out = self.initial_state(1), []
        for start in range(0, chunks.shape[0], block):
            probs, state = self.decode(self.features(chunks[start : start + block])[None], state)
            out.append(probs[0])
        return torch.cat(out) if out else chunks.new_zeros(0)


# ------------------------------------------------------------------------------------------ presets

PRESETS = {"silero-vad-16k": SileroVADConfig()}


# ------------------------------------------------------------------------------------------ checkpoints
# The package's silero_vad_16k.safetensors: the STFT basis as `stft_conv.weight`, the encoder convs `conv1`..`conv4`,
# an `nn.LSTMCell` (`lstm_cell.*`: one step of torch's LSTM, whose layer-0 tensors carry an `_l0` suffix) and
# `final_conv`.


def silero_key_map(config: SileroVADConfig) -> KeyMap:
    return KeyMap([
        Rename("stft_conv.weight", "stft.basis"),
        *(Rename(f"conv{i + 1}.{{p}}", f"encoder.{i}.{{p}}") for i in range(len(config.encoder_channels))),
        Rename("lstm_cell.{p}", "rnn.{p}_l0"),
        Rename("final_conv.{p}", "head.{p}"),
    ])


def torchscript_key_map(config: SileroVADConfig) -> KeyMap:
    """The names inside the package's TorchScript archive (`silero_vad.jit`, whose weights are those of its ONNX
    files): `_model.*` at 16 kHz; its 8-kHz twin `_model_8k.*` is not built."""
    return KeyMap([
        Drop("_model_8k.{rest*}"),
        Rename("_model.stft.forward_basis_buffer", "stft.basis"),
        Rename("_model.encoder.{i}.reparam_conv.{p}", "encoder.{i}.{p}"),
        Rename("_model.decoder.rnn.{p}", "rnn.{p}_l0"),
        Rename("_model.decoder.decoder.2.{p}", "head.{p}"),
    ])


def _read_silero_config(raw: dict, shapes: dict) -> SileroVADConfig:
    return from_dict(SileroVADConfig, raw)


PACKAGE, PACKAGE_FILE = "silero_vad", "data/silero_vad_16k.safetensors"


def packaged_silero_vad() -> Path | None:
    """The `silero-vad` package's 16-kHz safetensors file when the package is installed, else None (found without
    importing the package, which would set torch's thread count)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FILE
    return path if path.is_file() else None


def load_silero_vad(path: str | Path | None = None, *, device=None, dtype=None) -> SileroVAD:
    """Silero VAD, strictly through the shared loader, from the package's files: `silero_vad_16k.safetensors` (the
    default: the installed package's), or its TorchScript archive `silero_vad.jit` (another release of the weights,
    the one the package's own `load_silero_vad()` runs; only its tensors are read, on the CPU). A directory that
    `pm.save` wrote loads with `pm.load`."""
    from polymodal.weights.checkpoint import open_checkpoint
    from polymodal.weights.loader import build_meta, load_weights
    from polymodal.weights.record import record

    if path is None:
        path = packaged_silero_vad()
        if path is None:
            raise ValueError("Silero VAD's weights come with the silero-vad package, which is not installed "
                             "(pip install --no-deps silero-vad), or pass the path of silero_vad_16k.safetensors")
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    config = PRESETS["silero-vad-16k"]
    model = build_meta(FAMILY, config, path)
    if path.suffix == ".jit":
        ckpt, key_map = _torchscript_tensors(path), torchscript_key_map(config)
    else:
        ckpt, key_map = open_checkpoint(path), silero_key_map(config)
    load_weights(model, ckpt, key_map, dtype=dtype, device=device, where=path)
    record(model).source = path.parent
    return model.eval()


def _torchscript_tensors(path: Path) -> dict[str, Tensor]:
    import warnings

    from polymodal.weights.checkpoint import CheckpointError

    if not path.is_file():
        raise CheckpointError(path, "no such file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(path, f"not a TorchScript archive ({str(e).splitlines()[0][:200]})") from None
    return dict(archive.state_dict())


FAMILY = Family(
    name="silero_vad",
    model=SileroVAD,
    layouts={
        "polymodal": native_layout("silero_vad", SileroVADConfig),
        # the package's tensor names (what its safetensors file holds); load such a file with load_silero_vad
        "silero": Layout("silero", _read_silero_config, lambda c: {"format": "silero-vad", **to_dict(c)},
                         silero_key_map),
    },
    presets=PRESETS,
    description="Silero VAD: speech probability per 32 ms chunk of 16-kHz audio (the silero-vad package's weights)",
    tasks=("voice-activity-detection",),
)
