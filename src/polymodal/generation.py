"""Text generation: one implementation that every generative model in polymodal uses.

A model takes part by providing two calls (decoder-only families get both from `CausalLM`):

    state, logits = model.generation_prefill(input_ids, attention_mask, max_len, **extras)   # logits (B, V)
    logits = model.generation_step(tokens, state)                                            # tokens (B,) -> (B, V)

with `DecoderState` as the state (below): cache, mask and positions, and for an encoder-decoder what it
cross-attends and `prompt`, the decoder sequence its output starts from (see `_prefill`); `reorder(index)` serves
beam search. Everything else lives here, written out once: greedy decoding, temperature / top-k / top-p sampling
with a seedable generator, repetition penalty, beam search, stop tokens and stop strings, a time limit,
streaming, and batches of left-padded prompts.

Semantics follow transformers' `generate` so that outputs agree token for token (tests/test_generation.py and
each family's parity tests): logits processors in the order repetition penalty -> temperature -> top-k -> top-p;
a finished row keeps emitting the pad token until every row is done; beam search keeps (1 + #eos) x num_beams
candidates a step, scores finished hypotheses by sum(log p) / generated_length ** length_penalty, and stops
early by the same heuristic (`early_stopping` False / True / "never").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.nn.attention import KVCache, StaticKVCache, causal_padding_mask
from polymodal.weights.record import record


@dataclass
class DecoderState:
    """What a decoder carries from one step to the next: every generative family's state, and the serving
    engine's continuous batch (`polymodal.serve.engine`).

    Positions may have leading dimensions: (B,) per row for ordinary decoders, (3, B) for M-RoPE's
    (temporal, height, width) ids (Qwen2-VL). The next token's position is `offset + length` per row, the same
    on every leading axis: after a prompt whose images took 2-D positions, text continues from the largest
    position + 1 (transformers' `rope_deltas`); left padding makes a row's offset smaller by its pad count.
    An encoder-decoder (T5, BLIP) adds what its decoder cross-attends and the decoder prompt its output starts
    from; a decoder-only model leaves them empty."""

    cache: list[KVCache]
    mask: Tensor  # (B, max_len): 1 where a position holds a real token
    length: int  # positions filled so far (between steps, every cache holds as many)
    offset: Tensor  # (B,) the next token's position id is offset + length
    position_dims: tuple[int, ...] = ()  # leading dimensions of position ids: () or (3,) for M-RoPE
    cross: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer: keys, values (B, KV, S, Dh)
    cross_mask: Tensor | None = None  # (B, S) 1 for the cross-attended positions that are real; None: no padding
    # (B,) how much each row's cross-attention output counts, where a family weighs it per row (Llama 3.2 Vision: 0 for
    # a row whose last prompt token sees no image); None: fully
    cross_gate: Tensor | None = None
    prompt: Tensor | None = None  # (B, T') an encoder-decoder's decoder start tokens: the output begins with them

    @classmethod
    def start(cls, cache: list[KVCache], attention_mask: Tensor, max_len: int, position_ids: Tensor | None = None,
              **fields) -> tuple[DecoderState, Tensor]:
        """The state once a prompt with padding `attention_mask` (B, T) is in -> (state, the prompt's position ids
        (..., B, T)). By default positions count each row's real tokens from 0, so left padding changes nothing;
        a model that lays its prompt out otherwise (M-RoPE over image patches) passes its `position_ids`
        (..., B, T), and each row continues from their largest value + 1 over its real tokens. `fields`: the
        optional ones (cross, cross_mask, cross_gate, prompt)."""
        B, T = attention_mask.shape
        if T > max_len:
            raise ValueError(f"the prompt holds {T} positions, more than the {max_len} preallocated")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.dim() < 2 or position_ids.shape[-2:] != (B, T):
            raise ValueError(f"position_ids must be (..., batch, length) = (..., {B}, {T}), "
                             f"got {tuple(position_ids.shape)}")
        mask = torch.zeros(B, max_len, dtype=torch.long, device=attention_mask.device)
        mask[:, :T] = attention_mask
        last = position_ids.masked_fill(attention_mask == 0, 0).amax(dim=-1).reshape(-1, B).amax(dim=0)  # (B,)
        state = cls(cache, mask, T, last + 1 - T, tuple(position_ids.shape[:-2]), **fields)
        return state, position_ids

    @property
    def positions(self) -> Tensor:
        """(..., B) the position ids of each row's next token."""
        return (self.offset + self.length).expand(*self.position_dims, -1)

    def advance(self) -> tuple[Tensor, Tensor]:
        """Take one new token per row -> (the mask over every position so far (B, L), the new tokens' position ids
        (..., B, 1))."""
        positions = self.positions[..., None]
        self.mask[:, self.length] = 1
        self.length += 1
        return self.mask[:, : self.length], positions

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (B',), in that order: beam search regroups its hypotheses every step, the serving
        engine drops finished rows."""
        for c in self.cache:
            c.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.offset = self.offset.index_select(0, index)
        self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)
        if self.cross_gate is not None:
            self.cross_gate = self.cross_gate.index_select(0, index)
        if self.prompt is not None:
            self.prompt = self.prompt.index_select(0, index)

    def relayout(self, first: int, length: int, capacity: int) -> DecoderState:
        """A new state of `capacity` positions holding this one's filled positions from `first` on, moved to end at
        `length` (the new length): the serving engine shifts its batch right, drops the columns no row uses and
        grows this way. Each row's next position id stays what it was; this state is left as it is."""
        span = self.length - first
        if not (0 <= span <= length <= capacity):
            raise ValueError(f"cannot move positions {first}..{self.length - 1} to end at {length} of {capacity}")
        mask = self.mask.new_zeros(self.mask.shape[0], capacity)
        mask[:, length - span : length] = self.mask[:, first : self.length]
        return replace(self, cache=[c.moved(first, length, capacity) for c in self.cache], mask=mask, length=length,
                       offset=self.offset + (self.length - length))

    @staticmethod
    def cat(states: list[DecoderState]) -> DecoderState:
        """The rows of states of one length and capacity, stacked in order (a request joining the serving
        engine's batch). Cross-attended keys and values of different lengths (images of other sizes or counts) are
        padded with zeros to the longest, and `cross_mask` marks the padding."""
        head = states[0]
        for s in states[1:]:
            if (s.length, s.mask.shape[1], s.position_dims) != (head.length, head.mask.shape[1], head.position_dims):
                raise ValueError(f"states of different layouts: length {s.length} of {s.mask.shape[1]} "
                                 f"(positions {s.position_dims}) and {head.length} of {head.mask.shape[1]} "
                                 f"({head.position_dims})")
            if len(s.cross) != len(head.cross) or (s.prompt is None) != (head.prompt is None):
                raise ValueError("states of different kinds: one has cross-attention or a prompt, the other not")
        lengths = [s.cross[0][0].shape[2] if s.cross else 0 for s in states]
        S = max(lengths)

        def pad(t: Tensor) -> Tensor:  # (B, KV, S', Dh) -> (B, KV, S, Dh), zeros after the row's own positions
            return t if t.shape[2] == S else torch.cat([t, t.new_zeros(*t.shape[:2], S - t.shape[2], t.shape[3])], 2)

        cross = [(torch.cat([pad(k) for k, _ in layer]), torch.cat([pad(v) for _, v in layer]))
                 for layer in zip(*(s.cross for s in states))]
        cross_mask = None
        if any(s.cross_mask is not None for s in states) or len(set(lengths)) > 1:
            parts = []
            for s, n in zip(states, lengths):
                own = s.cross_mask if s.cross_mask is not None else s.mask.new_ones(s.mask.shape[0], n)
                parts.append(torch.cat([own, own.new_zeros(own.shape[0], S - n)], 1))
            cross_mask = torch.cat(parts)
        cross_gate = None
        if any(s.cross_gate is not None for s in states):
            cross_gate = torch.cat([s.cross_gate if s.cross_gate is not None else s.offset.new_ones(s.offset.shape[0])
                                    for s in states]).float()
        return DecoderState(
            cache=[KVCache.cat(layer) for layer in zip(*(s.cache for s in states))],
            mask=torch.cat([s.mask for s in states]), length=head.length,
            offset=torch.cat([s.offset for s in states]), position_dims=head.position_dims, cross=cross,
            cross_mask=cross_mask, cross_gate=cross_gate,
            prompt=torch.cat([s.prompt for s in states]) if head.prompt is not None else None,
        )


def input_embeddings(model, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """What a decoder's forward starts from: `model.embed(input_ids)` for ids (B, T), or the input embeddings
    (B, T, D) given instead; exactly one, of that shape."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or not inputs_embeds.is_floating_point()):
        raise ValueError(f"inputs_embeds must be floating-point (batch, length, width), got "
                         f"{inputs_embeds.dtype} of shape {tuple(inputs_embeds.shape)}")
    return model.embed(input_ids) if inputs_embeds is None else inputs_embeds


class CausalLM:
    """Mixin for decoder-only models whose forward is

        forward(input_ids (B, T), attention_mask (B, S) = None, *, cache=None, position_ids=None, logits_to_keep=0)
            -> logits (B, T, V)

    with `new_cache(batch, max_len, dtype, device)`; it provides prefill, step and `generate`.

    A family whose forward reads nothing back to the host when given position ids and a ready 4-D mask sets
    `fixed_shape_step = True`: its decode step can then be captured as a CUDA graph (`FixedShapeStep`)."""

    fixed_shape_step = False

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        raise NotImplementedError

    @staticmethod
    def decoder_inputs(input_ids: Tensor, attention_mask: Tensor | None, cache: list[KVCache] | None,
                       position_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Check a decoder's inputs and derive what every decoder needs from them -> (position_ids (B, T),
        mask (B, 1, T, S) or None). Positions count the real tokens before each one (left padding changes
        nothing); the mask is None when nothing is padded (causal attention then needs no mask). A boolean
        (B, 1, T, S) `attention_mask` with `position_ids` given is taken as it is (the fixed-shape decode step:
        it must not read tensors back to the host). `input_ids` may be the input embeddings (B, T, D) instead: only
        its batch and length are read."""
        if input_ids.dim() not in (2, 3) or (input_ids.dim() == 3 and not input_ids.is_floating_point()):
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is not None:
            return position_ids, attention_mask
        past = cache[0].length if cache else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, past + length) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = causal_padding_mask(attention_mask, T)  # (B, 1, T, S)
        return position_ids, mask

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, **extras
                           ) -> tuple[DecoderState, Tensor]:
        """The prompt (B, T) into a new cache of max_len positions -> (state, next-token logits (B, V)). `extras`
        go to this one forward (a VLM's `pixel_values`, whose features its forward merges into the prompt); the
        decode steps after it are the plain `generation_step`."""
        p = next(self.parameters())
        cache = self.new_cache(input_ids.shape[0], max_len, dtype=p.dtype, device=p.device)
        state, positions = DecoderState.start(cache, attention_mask, max_len)
        logits = self(input_ids, attention_mask, cache=state.cache, position_ids=positions, logits_to_keep=1,
                      **extras)
        return state, logits[:, -1]

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        mask, positions = state.advance()
        return self.decode_step(tokens[:, None], mask, positions, state)

    def decode_step(self, tokens: Tensor, mask: Tensor, positions: Tensor, state: DecoderState) -> Tensor:
        """One decode step's forward: tokens (B, 1), the mask over the positions so far ((B, L), or the fixed-shape
        step's (B, 1, 1, T_max)), their position ids (..., B, 1) -> next-token logits (B, V). A family whose steps
        read more of the state than its cache (Llama 3.2 Vision's cross-attended image states) overrides this."""
        return self(tokens, mask, cache=state.cache, position_ids=positions, logits_to_keep=1)[:, -1]

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, do_sample: bool = False, **options) -> Tensor:
        """input_ids (B, T) -> (B, T + N) token ids; see `polymodal.generation.generate` for the options."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **options)


STATIC_CACHE_BUCKET = 256


class FixedShapeStep:
    """`generation_step` with the same shapes at every token, for a decoder-only model whose family sets
    `fixed_shape_step` (`generate` checks that before the prefill).

    After the prefill the caches become `StaticKVCache`s over the same buffers: each step writes its key and value
    at a position held in a device tensor and attends over the whole preallocated length, masked to the filled
    positions. Inputs are copied into fixed buffers, so nothing the step computes depends on Python-side values.
    On CUDA the step is captured once as a CUDA graph and replayed for every later token: one launch
    instead of a few hundred, which is what bounds small-batch decoding on a GPU. Elsewhere it runs eagerly (the
    same arithmetic; tests compare its tokens with the ordinary step). compile=True first hands the step to
    `torch.compile`, which fuses its small elementwise kernels (norms, rotary, activations) before the capture,
    with inductor's freezing: the weights are taken as constants, so it suits inference on fixed weights."""

    def __init__(self, model, state: DecoderState, compile: bool = False):
        self.model, self.state = model, state
        device = state.mask.device
        self.index = torch.tensor([state.length], device=device)
        state.cache = [StaticKVCache.over(c.k, c.v, c.length) for c in state.cache]
        for c in state.cache:
            c.index = self.index
        self.tokens = torch.zeros(state.mask.shape[0], dtype=torch.long, device=device)
        self.positions = state.positions[..., None].clone()  # (..., B, 1)
        self.graph = torch.cuda.CUDAGraph() if device.type == "cuda" else None
        self.logits: Tensor | None = None  # the captured graph's output buffer
        # freezing: inductor takes the weights as constants (generation runs under inference_mode) and lays them out
        # for its own products (on CPUs, oneDNN-packed); a compiled step is tied to the model it was traced with
        self.run = torch.compile(self._step, dynamic=False, options={"freezing": True}) if compile else self._step

    def _step(self) -> Tensor:
        mask = self.state.mask.bool()[:, None, None, :]  # (B, 1, 1, T_max): the filled positions
        return self.model.decode_step(self.tokens[:, None], mask, self.positions, self.state)

    def __call__(self, tokens: Tensor) -> Tensor:
        state = self.state
        if state.length >= state.mask.shape[1]:
            raise ValueError(f"KV cache full: {state.length + 1} positions requested, "
                             f"{state.mask.shape[1]} preallocated")
        self.index.fill_(state.length)
        self.tokens.copy_(tokens)
        self.positions.copy_(state.advance()[1])
        if self.graph is None:
            return self.run()
        if self.logits is None:
            # warm-up runs on a side stream (the allocator and lazy initialisations settle), then the capture; each
            # warm-up writes this step's own key and value, so running it more than once changes nothing
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.run()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(self.graph):
                self.logits = self.run()
        self.graph.replay()
        return self.logits.clone()


# ------------------------------------------------------------------------------------------ logits processing


def apply_repetition_penalty(scores: Tensor, sequences: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): a token already in the sequence has its score divided by `penalty`
    if positive, multiplied if negative. scores (B, V), sequences (B, L)."""
    seen = scores.gather(1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    k = min(k, scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probability
    reaches p."""
    sorted_scores, order = scores.sort(dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p  # ascending order: the unlikely tail whose mass stays within 1 - p
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def process_logits(scores: Tensor, sequences: Tensor, *, repetition_penalty: float = 1.0, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, sampling: bool = False) -> Tensor:
    """The logits processors, in transformers' order. Temperature, top-k and top-p apply when sampling."""
    if repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, repetition_penalty)
    if sampling:
        if temperature != 1.0:
            scores = scores / temperature
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
    return scores


# ------------------------------------------------------------------------------------------ the loop


class StopStrings:
    """Stops a row once its generated text contains one of `strings` (checked on the decoded tail)."""

    def __init__(self, strings: Iterable[str], decode: Callable[[list[int]], str]):
        self.strings = [s for s in strings if s]
        self.decode = decode
        self.window = 8 + 4 * max((len(s) for s in self.strings), default=0)  # tokens; at least one char each

    def __call__(self, generated: Tensor) -> Tensor:
        """generated (B, N) -> (B,) bool: row has produced a stop string."""
        tails = [self.decode(row[-self.window:].tolist()) for row in generated]
        return torch.tensor([any(s in t for s in self.strings) for t in tails], device=generated.device)


SAMPLING_SETTINGS = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float,
                     "repetition_penalty": float}


def generation_defaults(model) -> dict[str, Any]:
    """The sampling settings the model recommends, from its generation config (`pm.record(model)`: the
    generation_config.json beside the weights; polymodal's own for the embedded chat model): a subset of
    SAMPLING_SETTINGS' keys. Empty: greedy without a repetition penalty. Values of the wrong type or out of range
    are left out, so a bad file falls back to greedy instead of failing every request."""
    gen = record(model).generation_config or {}
    out: dict[str, Any] = {}
    for key, kind in SAMPLING_SETTINGS.items():
        value = gen.get(key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float)):
            continue
        value = kind(value)
        if kind is float and not (0 < value < float("inf")):
            continue
        if (key == "top_p" and value > 1) or (key == "top_k" and value < 0):
            continue
        out[key] = value
    if not out.get("do_sample"):  # greedy: temperature, top-k and top-p would not apply
        out = {k: v for k, v in out.items() if k in ("do_sample", "repetition_penalty")}
    return out


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gen = record(model).generation_config or {}
        eos_token_id = gen.get("eos_token_id", getattr(getattr(model, "config", None), "eos_token_id", None))
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.inference_mode()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Iterable[str] = (),
    tokenizer=None,
    max_time: float | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    static_cache: bool = False,
    compile_step: bool = False,
    **extras,
) -> Tensor:
    """Continue `input_ids` (B, T), left-padded where rows differ in length (`attention_mask` 0 there), and return
    (B, T + N) token ids, N <= max_new_tokens. An encoder-decoder returns its decoder sequence (B, T' + N) instead,
    its start token(s) first, as transformers does.

    do_sample: sample from the processed distribution with `generator` (seed it for reproducible output);
    otherwise greedy. num_beams > 1: beam search. Generation of a row ends at any of `eos_token_id` (default:
    the model's generation config, then its config), at a stop string (needs `tokenizer`), or for all rows when
    `max_time` seconds have passed. `streamer(tokens)` receives each step's new tokens (B,) as they come; if it
returns False, generation stops there (a client that went away).
    static_cache: decode with a fixed-shape step over a static KV cache (`FixedShapeStep`), captured once as a
    CUDA graph on a GPU and run eagerly elsewhere; greedy and sampling (not beam search), for families with
    `fixed_shape_step`. compile_step: the same step compiled by `torch.compile` (implies static_cache; the first
    call for each batch size and length compiles: about a minute for SmolLM2 on 2 CPU cores).
    `extras` go to the model's prefill (pixel values and the like)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature <= 0 and do_sample:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        gen = record(model).generation_config or {}
        pad_token_id = gen.get("pad_token_id", getattr(getattr(model, "config", None), "pad_token_id", None))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    stops = None
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer (tokenizer=...) to read the generated text")
        stops = StopStrings(stop_strings, lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    if max_new_tokens == 0:  # the prompt the output would start from (an encoder-decoder's: its start token)
        return _prefill(model, input_ids, attention_mask, input_ids.shape[1], extras)[2]
    deadline = time.monotonic() + max_time if max_time is not None else None
    max_len = input_ids.shape[1] + max_new_tokens
    options = dict(repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p)
    if num_beams > 1:
        if stops is not None or streamer is not None or static_cache or compile_step:
            raise ValueError("beam search does not support stop_strings, streaming, static_cache or compile_step")
        return _beam_search(model, input_ids, attention_mask, max_len, num_beams, eos, pad, length_penalty,
                            early_stopping, do_sample, generator, deadline, options, extras)
    return _sample(model, input_ids, attention_mask, max_len, eos, pad, do_sample, generator, stops, deadline,
                   streamer, options, extras, static_cache, compile_step)


def _prefill(model, input_ids, attention_mask, max_len, extras) -> tuple[Any, Tensor, Tensor, int]:
    """The model's prefill -> (state, logits (B, V), the sequence the output continues, its length limit).

    A decoder-only model continues `input_ids`. An encoder-decoder reads them with its encoder and continues its
    decoder prompt instead (T5: the start token), which its state hands back as `prompt` (B, T'); the output is
    then that prompt plus the new tokens, as transformers returns it."""
    state, logits = model.generation_prefill(input_ids, attention_mask, max_len, **extras)
    prompt = getattr(state, "prompt", None)
    if prompt is None:
        return state, logits, input_ids, max_len
    return state, logits, prompt, max_len - input_ids.shape[1] + prompt.shape[1]


def _sample(model, input_ids, attention_mask, max_len, eos, pad, do_sample, generator, stops, deadline, streamer,
            options, extras, static_cache=False, compile_step=False) -> Tensor:
    """Greedy decoding or sampling, one token per row per step."""
    static_cache = static_cache or compile_step
    if static_cache and not getattr(model, "fixed_shape_step", False):
        raise ValueError(f"{type(model).__name__} has no fixed-shape decode step (static_cache=True)")
    # a compiled step is specialised to its cache length: lengths rounded up to STATIC_CACHE_BUCKET let calls with
    # other prompt lengths reuse it (the extra positions stay masked)
    cache_len = -(-max_len // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET if compile_step else max_len
    state, logits, input_ids, limit = _prefill(model, input_ids, attention_mask, cache_len, extras)
    max_len = limit - (cache_len - max_len)
    step = (FixedShapeStep(model, state, compile=compile_step) if static_cache
            else lambda t: model.generation_step(t, state))
    B, T = input_ids.shape
    sequences = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, device=input_ids.device)
    while True:
        scores = process_logits(logits.float(), sequences, sampling=do_sample, **options)
        if do_sample:
            probs = scores.softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(unfinished, tokens, pad)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        if streamer is not None and streamer(tokens) is False:  # the consumer is gone (a closed stream)
            return sequences
        if eos:
            unfinished &= ~torch.isin(tokens, eos_t)
        if stops is not None:
            unfinished &= ~stops(sequences[:, T:])
        timed_out = deadline is not None and time.monotonic() >= deadline
        if not unfinished.any() or sequences.shape[1] >= max_len or timed_out:
            return sequences
        logits = step(tokens)


def _beam_search(model, input_ids, attention_mask, max_len, num_beams, eos, pad, length_penalty, early_stopping,
                 do_sample, generator, deadline, options, extras) -> Tensor:
    """Beam search over num_beams hypotheses per row (BLIP's captioning default)."""
    state, logits, input_ids, max_len = _prefill(model, input_ids, attention_mask, max_len, extras)
    B, T = input_ids.shape
    K = num_beams
    keep = max(2, 1 + len(eos)) * K  # candidates a step: enough that K survive even if the best K all end
    dev = input_ids.device
    state.reorder(torch.arange(B, device=dev).repeat_interleave(K))  # (B*K) rows: each prompt K times

    # transformers fills unused places with `pad or eos[0]`, so a pad id of 0 shows as the eos id there
    fill = pad if pad else (eos[0] if eos else -1)
    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = input_ids[:, None]
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = -1e9  # only the first beam is live at first, or all K would pick the same tokens
    finished = running.clone()
    finished_scores = torch.full((B, K), -1e9, device=dev)
    finished_len = torch.full((B, K), T, dtype=torch.long, device=dev)  # length of each finished hypothesis
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    eos_t = torch.tensor(eos, device=dev)
    top_k_mask = torch.arange(keep, device=dev) < K
    logits = logits.repeat_interleave(K, dim=0)
    cur = T
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        log_probs = process_logits(log_probs, running[:, :, :cur].reshape(B * K, cur), sampling=do_sample,
                                   **options)
        V = log_probs.shape[-1]
        total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        if do_sample:
            idx = torch.multinomial(total.softmax(-1), keep, generator=generator)
            cand_scores = total.gather(1, idx)
            cand_scores, order = cand_scores.sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            cand_scores, idx = total.topk(keep, dim=-1)  # (B, keep)
        beam, token = idx // V, idx % V
        cand = running.gather(1, beam[:, :, None].expand(-1, -1, max_len)).clone()  # (B, keep, max_len)
        cand[:, :, cur] = token
        ends = torch.isin(token, eos_t) if eos else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_len:
            ends = torch.ones_like(ends)  # the length limit ends every candidate

        # the best K candidates that did not end keep running
        live_scores = cand_scores - ends.float() * 1e9
        nxt = live_scores.topk(K, dim=-1).indices  # (B, K)
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, max_len))
        running_scores = live_scores.gather(1, nxt)
        parent = beam.gather(1, nxt)  # (B, K) which old beam each survivor continues

        # candidates among the top K that ended become hypotheses if they beat the worst kept one
        just_ended = ends & top_k_mask[None]
        scored = cand_scores / float(cur + 1 - T) ** length_penalty
        closed = is_finished.all(dim=1, keepdim=True) & (early_stopping is True)
        scored = scored - closed.float() * 1e9 - (~improvable).float() * 1e9 - (~just_ended).float() * 1e9
        merged = torch.cat([finished_scores, scored], dim=1)
        best = merged.topk(K, dim=-1).indices
        finished = torch.cat([finished, cand], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_len))
        finished_scores = merged.gather(1, best)
        cand_len = torch.full_like(token, cur + 1)
        finished_len = torch.cat([finished_len, cand_len], dim=1).gather(1, best)
        is_finished = torch.cat([is_finished, just_ended], dim=1).gather(1, best)

        flat_parent = (parent + torch.arange(B, device=dev)[:, None] * K).view(-1)
        state.reorder(flat_parent)
        cur += 1
        # can a running beam still beat the worst finished hypothesis?
        best_len = (max_len - T) if (early_stopping == "never" and length_penalty > 0) else (cur - T)
        best_possible = running_scores[:, :1] / float(best_len) ** length_penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        done = (not improvable.any()) or (is_finished.all() and early_stopping is True) or bool(ends.all())
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:  # out of time: the best running beam counts
            none_yet = finished_scores[:, 0] <= -1e9
            finished[none_yet, 0] = running[none_yet, 0]
            finished_len[none_yet, 0] = cur
            break
        logits = model.generation_step(running[:, :, cur - 1].reshape(B * K), state)
    out_len = int(finished_len[:, 0].max())
    return finished[:, 0, :out_len]
