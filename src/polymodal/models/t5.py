"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer").

    encoder:  h = embed(ids)
              L x:  h = h + SelfAttn(RMSNorm(h), bias = relative position bias (bidirectional) + padding)
                    h = h + FF(RMSNorm(h))
              e = RMSNorm(h)
    decoder:  g = embed(decoder ids)
              L x:  g = g + SelfAttn(RMSNorm(g), bias = relative position bias (causal), causal mask)
                    g = g + CrossAttn(RMSNorm(g), e, encoder padding mask)
                    g = g + FF(RMSNorm(g))
              logits = lm_head(RMSNorm(g) [* d_model ** -0.5 when the head is the tied embedding])

What sets T5 apart from the transformer of "Attention Is All You Need": the layer norm only rescales (no mean,
no bias: RMSNorm, computed in fp32 as T5's own does); attention logits are not divided by sqrt(Dh) (the scale is
folded into the initialization); there are no position embeddings, but a learned scalar per head added to the
attention logits for each bucket of key - query offsets (sec. 2.1): exact buckets for short offsets, log-spaced
ones up to `relative_attention_max_distance`. Only the first layer of each stack holds that table; all layers
reuse its bias.

Two variants share this code. The original T5 (`t5-small`): ReLU feed-forward `wi -> wo`, the output head tied
to the embedding and the decoder output scaled by d_model ** -0.5. T5 v1.1 and Flan-T5: gated-GELU feed-forward
(Shazeer 2020, "GLU Variants Improve Transformer": `wo(gelu(wi_0 x) * wi_1 x)`, our SwiGLU block with GELU), an
untied head and no scaling. `is_encoder_decoder=False` builds the encoder alone (transformers' `T5EncoderModel`:
SD3's third text encoder); `encode(input_ids, attention_mask)` is its output.

Checked against transformers' `T5ForConditionalGeneration` and `T5EncoderModel` (logits, encoder output, greedy
and beam-search `generate`; tests/test_t5.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.generation import DecoderState, generate, input_embeddings
from polymodal.nn import MLP, Attention, KVCache, RMSNorm, SwiGLU, padding_mask
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # width of one head; heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5) or "gated-gelu" (T5 v1.1, Flan-T5); "gated-<act>" in general
    tie_word_embeddings: bool = True  # the output head is the embedding matrix (`shared`)
    scale_decoder_outputs: bool = True  # decoder output * d_model ** -0.5 before the head (original T5 only)
    is_encoder_decoder: bool = True  # False: the encoder alone (transformers' T5EncoderModel)
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token

    def __post_init__(self):
        kind = self.feed_forward_proj.split("-")
        if len(kind) > 2 or (len(kind) == 2 and kind[0] != "gated"):
            raise ValueError(f"feed_forward_proj must be '<act>' or 'gated-<act>' (e.g. 'relu', 'gated-gelu'), "
                             f"got {self.feed_forward_proj!r}")

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        # T5 v1.1 was trained with the tanh approximation of GELU; transformers maps "gated-gelu" to it too
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name


def relative_position_bucket(offset: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's buckets for key - query offsets (any shape, integer) -> bucket ids in [0, num_buckets).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before. Causal (decoder):
    all buckets look back; keys ahead fall into bucket 0 and are masked anyway. Within a half, offsets below half
    its size get a bucket each, farther ones share log-spaced buckets, and everything past max_distance the last.
    (Mesh TensorFlow's `_relative_position_bucket`, the reference transformers follows.)"""
    bucket = torch.zeros_like(offset)
    if bidirectional:
        num_buckets //= 2
        bucket = (offset > 0).long() * num_buckets
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = num_buckets // 2
    # clamp(min=exact) only keeps log() finite where the exact bucket is used anyway
    far = exact + (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class T5Layer(nn.Module):
    """Pre-norm self-attention [+ cross-attention] + feed-forward, residual around each."""

    def __init__(self, c: T5Config, *, decoder: bool):
        super().__init__()
        D, H = c.d_model, c.num_heads
        # no 1/sqrt(Dh) in T5's attention (scale=1), no biases anywhere
        self.self_attn_norm = RMSNorm(D, eps=c.layer_norm_epsilon)
        self.self_attn = Attention(D, H, head_dim=c.d_kv, bias=False, causal=decoder, scale=1.0)
        if decoder:
            self.cross_attn_norm = RMSNorm(D, eps=c.layer_norm_epsilon)
            self.cross_attn = Attention(D, H, head_dim=c.d_kv, context_dim=D, bias=False, scale=1.0)
        self.ff_norm = RMSNorm(D, eps=c.layer_norm_epsilon)
        if c.is_gated:
            self.ff = SwiGLU(D, c.d_ff, c.act, bias=False)
        else:
            self.ff = MLP(D, c.d_ff, c.act, bias=False)

    def forward(self, x: Tensor, bias: Tensor, *, cache: KVCache | None = None,
                context: Tensor | tuple[Tensor, Tensor] | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x (B, T, D); bias: additive (B or 1, H, T, S) for self-attention; context: the encoder output (B, S', D)
        or this layer's cached cross-attention keys and values; context_mask: (B, 1, 1, S') bool."""
        x = x + self.self_attn(self.self_attn_norm(x), mask=bias, cache=cache)
        if context is not None:
            x = x + self.cross_attn(self.cross_attn_norm(x), context, mask=context_mask)
        return x + self.ff(self.ff_norm(x))


class T5Stack(nn.Module):
    """The encoder or the decoder: layers, the shared relative position bias, the final norm."""

    def __init__(self, c: T5Config, *, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        n = c.decoder_layers if decoder else c.num_layers
        self.block = nn.ModuleList(T5Layer(c, decoder=decoder) for _ in range(n))
        self.final_layer_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon)

    def position_bias(self, num_queries: int, num_keys: int, past: int = 0) -> Tensor:
        """(1, H, T, S) for queries at positions past .. past+T-1 and keys at 0 .. S-1."""
        device = self.relative_attention_bias.weight.device
        queries = torch.arange(past, past + num_queries, device=device)[:, None]
        keys = torch.arange(num_keys, device=device)[None, :]
        bucket = relative_position_bucket(keys - queries, bidirectional=not self.decoder,
                                          num_buckets=self.num_buckets, max_distance=self.max_distance)  # (T, S)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # (1, H, T, S)

    def forward(self, h: Tensor, bias: Tensor, *, cache: list[KVCache] | None = None,
                context: Tensor | list[tuple[Tensor, Tensor]] | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """h (B, T, D) embedded tokens -> (B, T, D). context: the encoder output, or a per-layer list of cached
        cross-attention keys and values."""
        for i, layer in enumerate(self.block):
            ctx = context[i] if isinstance(context, list) else context
            h = layer(h, bias, cache=cache[i] if cache else None, context=ctx, context_mask=context_mask)
        return self.final_layer_norm(h)


class T5(nn.Module):
    """input_ids (B, S), decoder_input_ids (B, T) -> logits (B, T, V); `encode` alone for the encoder-only variant."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c, decoder=False)
        if c.is_encoder_decoder:
            self.decoder = T5Stack(c, decoder=True)
            # a tied head is `shared` itself, not a second name for it: saved files then hold no lm_head.weight,
            # which is how a checkpoint says its head is tied (see _read_hf)
            self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, S) token ids -> (B, S, D): the shared embedding both stacks read."""
        return self.shared(input_ids)

    def encode(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
               inputs_embeds: Tensor | None = None) -> Tensor:
        """input_ids (B, S), or inputs_embeds (B, S, D) instead (BLIP-2 puts its query tokens before the text
        there), attention_mask (B, S) with 1 for real tokens (padding on either side) -> (B, S, D)."""
        h = input_embeddings(self, input_ids, inputs_embeds)  # (B, S, D)
        B, S = h.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must match the input's (batch, length) {(B, S)}, "
                             f"got {tuple(attention_mask.shape)}")
        bias = self.encoder.position_bias(S, S).to(h.dtype)  # (1, H, S, S)
        if attention_mask is not None and not bool(attention_mask.all()):
            # padded keys get the dtype's lowest value rather than -inf: a row with no real key stays finite
            bias = bias.masked_fill(~padding_mask(attention_mask), torch.finfo(h.dtype).min)  # (B, H, S, S)
        return self.encoder(h, bias)

    def decode(self, decoder_input_ids: Tensor, context: Tensor | list[tuple[Tensor, Tensor]],
               encoder_mask: Tensor | None = None, cache: list[KVCache] | None = None) -> Tensor:
        """decoder_input_ids (B, T) -> logits (B, T, V), attending to the encoder output (B, S, D) or its cached
        keys and values; encoder_mask (B, 1, 1, S) bool; with a cache, the tokens follow the cached ones."""
        self._needs_decoder()
        T = decoder_input_ids.shape[1]
        past = cache[0].length if cache else 0
        h = self.shared(decoder_input_ids)  # (B, T, D)
        bias = self.decoder.position_bias(T, past + T, past).to(h.dtype)  # (1, H, T, past+T); causal in attention
        h = self.decoder(h, bias, cache=cache, context=context, context_mask=encoder_mask)
        if self.config.scale_decoder_outputs:  # original T5: the tied head reads embedding-scale vectors
            h = h * self.config.d_model**-0.5
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.shared.weight)  # (B, T, V)

    def forward(self, input_ids: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, *, inputs_embeds: Tensor | None = None) -> Tensor:
        """input_ids (B, S) (or inputs_embeds (B, S, D)), decoder_input_ids (B, T), attention_mask (B, S) for the
        encoder -> logits (B, T, V)."""
        self._needs_decoder()
        source = input_ids if input_ids is not None else inputs_embeds
        B = None if source is None else source.shape[0]
        if decoder_input_ids is None or decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != B:
            raise ValueError(f"decoder_input_ids must be (batch={B}, length), got "
                             f"{None if decoder_input_ids is None else tuple(decoder_input_ids.shape)}")
        encoded = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        return self.decode(decoder_input_ids, encoded, _encoder_mask(attention_mask))

    def _needs_decoder(self) -> None:
        if not self.config.is_encoder_decoder:
            raise ValueError("this T5 is an encoder only (T5EncoderModel); use model.encode(input_ids, attention_mask)")

    # ------------------------------------------------------------------------------ generation

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           inputs_embeds: Tensor | None = None) -> tuple[DecoderState, Tensor]:
        """Encode once, cache every layer's cross-attention keys and values, run the start token -> (state, (B, V)).

        max_len counts the encoder input plus the new tokens (polymodal.generation's convention); the decoder's
        own sequence is the start token plus the new tokens, which the state's `prompt` begins. inputs_embeds
        (B, S', D): what the encoder reads instead of input_ids' embeddings, attention_mask (B, S') covering it
        (BLIP-2 writes its visual prompt there); input_ids (B, S) then only size the decoder's cache."""
        self._needs_decoder()
        B, S = input_ids.shape
        if inputs_embeds is None:
            encoded = self.encode(input_ids, attention_mask)  # (B, S, D)
        else:
            encoded = self.encode(attention_mask=attention_mask, inputs_embeds=inputs_embeds)  # (B, S', D)
        cross = [layer.cross_attn.project_kv(encoded) for layer in self.decoder.block]
        p, c = self.shared.weight, self.config
        cache = [KVCache(B, c.num_heads, max_len - S + 1, c.d_kv, dtype=p.dtype, device=p.device)
                 for _ in range(c.decoder_layers)]
        start = torch.full((B, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        cross_mask = None if bool(attention_mask.all()) else attention_mask
        # the decoder's positions go unused: its relative position bias counts the cached positions
        state, _ = DecoderState.start(cache, torch.ones_like(start), max_len - S + 1, cross=cross,
                                      cross_mask=cross_mask, prompt=start)
        return state, self.decode(start, cross, _encoder_mask(cross_mask), cache)[:, -1]

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,) -> next-token logits (B, V)."""
        state.advance()
        mask = None if state.cross_mask is None else padding_mask(state.cross_mask)  # (B, 1, 1, S)
        return self.decode(tokens[:, None], state.cross, mask, state.cache)[:, -1]

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, do_sample: bool = False, **options) -> Tensor:
        """input_ids (B, S) -> decoder token ids (B, 1 + N): the start token, then up to max_new_tokens new ones
        (transformers' output for encoder-decoders); see `polymodal.generation.generate` for the options."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **options)


def _encoder_mask(attention_mask: Tensor | None) -> Tensor | None:
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return padding_mask(attention_mask)  # (B, 1, 1, S)


# ------------------------------------------------------------------------------------------ presets

_FLAN = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
PRESETS: dict[str, T5Config] = {
    "t5-tiny-test": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, relative_attention_max_distance=16, **_FLAN),
    "google/flan-t5-small": T5Config(d_model=512, d_ff=1024, num_layers=8, num_heads=6, **_FLAN),
    "google/flan-t5-base": T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12, **_FLAN),
    "google/flan-t5-xl": T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, **_FLAN),  # BLIP-2
    "google/flan-t5-xxl": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, **_FLAN),  # BLIP-2
    # the v1.1 XXL encoder alone: Stable Diffusion 3's third text encoder
    "google/t5-v1_1-xxl": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, is_encoder_decoder=False,
                                   **_FLAN),
    "t5-small": T5Config(),  # the original: ReLU, tied and scaled head
}
HUB_IDS = {
    "google/flan-t5-small": "google/flan-t5-small",
    "google/flan-t5-base": "google/flan-t5-base",
    "google/flan-t5-xl": "google/flan-t5-xl",
    "google/flan-t5-xxl": "google/flan-t5-xxl",
    "google/t5-v1_1-xxl": "google/t5-v1_1-xxl",
    "google-t5/t5-small": "t5-small",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `shared`, `{encoder,decoder}.block.{i}.layer.{j}.*` where layer 0 is self-attention (q, k, v, o
# apart; block 0 holds `relative_attention_bias`), the decoder's layer 1 cross-attention (`EncDecAttention`) and
# the last layer the feed-forward (`DenseReluDense.wi/wo` or `wi_0/wi_1/wo`); `lm_head` only when untied.
# `{encoder,decoder}.embed_tokens` are `shared` again (older files store them); T5EncoderModel has no decoder.


def hf_key_map(c: T5Config) -> KeyMap:
    ff = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"} if c.is_gated else {"wi": "fc1", "wo": "fc2"}
    rules = []
    for stack in ("encoder", "decoder") if c.is_encoder_decoder else ("encoder",):
        src, dst = f"{stack}.block.{{i}}.layer", f"{stack}.block.{{i}}"
        f = 2 if stack == "decoder" else 1  # index of the feed-forward sub-layer
        rules += [
            Drop(f"{stack}.embed_tokens.weight"),
            Rename(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                   f"{stack}.relative_attention_bias.weight"),
            Fuse(tuple(f"{src}.0.SelfAttention.{n}.weight" for n in "qkv"), f"{dst}.self_attn.qkv.weight"),
            Rename(f"{src}.0.SelfAttention.o.weight", f"{dst}.self_attn.proj.weight"),
            Rename(f"{src}.0.layer_norm.weight", f"{dst}.self_attn_norm.weight"),
            *[Rename(f"{src}.{f}.DenseReluDense.{theirs}.weight", f"{dst}.ff.{ours}.weight")
              for theirs, ours in ff.items()],
            Rename(f"{src}.{f}.layer_norm.weight", f"{dst}.ff_norm.weight"),
        ]
    if c.is_encoder_decoder:
        src, dst = "decoder.block.{i}.layer.1", "decoder.block.{i}"
        rules += [
            Drop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"),  # unused, old files
            Rename(f"{src}.EncDecAttention.q.weight", f"{dst}.cross_attn.q.weight"),
            Fuse((f"{src}.EncDecAttention.k.weight", f"{src}.EncDecAttention.v.weight"), f"{dst}.cross_attn.kv.weight"),
            Rename(f"{src}.EncDecAttention.o.weight", f"{dst}.cross_attn.proj.weight"),
            Rename(f"{src}.layer_norm.weight", f"{dst}.cross_attn_norm.weight"),
        ]
    else:  # as transformers' T5EncoderModel, an encoder read from a full checkpoint ignores the rest
        rules += [Drop("decoder.{rest*}"), Drop("lm_head.weight")]
    return KeyMap(rules)


def _read_hf(raw: dict, shapes: dict) -> T5Config:
    # An encoder-only checkpoint says so in `architectures` (T5EncoderModel); without it, the tensors tell.
    architectures = raw.get("architectures") or []
    if architectures:
        encoder_decoder = "T5EncoderModel" not in architectures
    else:
        encoder_decoder = "decoder.final_layer_norm.weight" in shapes
    # transformers 4 used `tie_word_embeddings` for both the tied head and the scaling; transformers 5 writes
    # `scale_decoder_outputs` apart and always ties, unless the file holds its own `lm_head.weight`.
    scale = raw.get("scale_decoder_outputs", raw.get("tie_word_embeddings", True) is not False)
    start = raw.get("decoder_start_token_id")
    pad = raw.get("pad_token_id")
    eos = raw.get("eos_token_id")
    ids = {"pad_token_id": 0 if pad is None else pad, "eos_token_id": 1 if eos is None else eos}
    ids["decoder_start_token_id"] = ids["pad_token_id"] if start is None else start
    return from_dict(T5Config, raw, is_encoder_decoder=encoder_decoder, scale_decoder_outputs=bool(scale),
                     tie_word_embeddings="lm_head.weight" not in shapes, **ids)


def _write_hf(c: T5Config) -> dict:
    architecture = "T5ForConditionalGeneration" if c.is_encoder_decoder else "T5EncoderModel"
    return {
        "model_type": "t5", "architectures": [architecture],
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.num_layers,
        "num_decoder_layers": c.decoder_layers, "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": c.feed_forward_proj, "dropout_rate": 0.0,
        "tie_word_embeddings": c.tie_word_embeddings, "scale_decoder_outputs": c.scale_decoder_outputs,
        "is_encoder_decoder": c.is_encoder_decoder, "pad_token_id": c.pad_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
    }


FAMILY = Family(
    name="t5",
    model=T5,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map),
        "polymodal": native_layout("t5", T5Config),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="T5 encoder-decoder (original, v1.1, Flan-T5; relative position bias) and the T5 encoder alone",
    tasks=("text-generation",),
)
