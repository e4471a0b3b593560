"""BERT (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding").

    x0 = LN(E_word[ids] + E_type[token_types] + E_pos[0..T-1])
    a  = LN(x + MSA(x))                        (post-norm: the residual sum is normalized, not the input)
    a' = LN(a + CrossMSA(a, context))          (only in layers with cross-attention, over `encoder_hidden_states`)
    x  = LN(a' + MLP(a'))
    pooled = tanh(W x_[CLS] + b)               (the pooler: next-sentence prediction's feature)

BERT-base: 12 layers of 768, 12 heads, MLP 768 -> 3072 -> 768, a WordPiece vocabulary of 30522, 512 positions,
2 token types (sentence A / B). all-MiniLM-L6-v2 (sentence-transformers) is the same architecture at 6 x 384.

Two variants from transformers' `BertConfig` are built because BLIP's text encoder/decoder and BLIP-2's
Q-Former sit on them: `is_decoder` makes self-attention causal, and `add_cross_attention` gives every layer a
cross-attention block between self-attention and the MLP. transformers only allows cross-attention in a decoder;
polymodal also builds it bidirectional (BLIP's image-grounded text encoder), saved in polymodal's own layout.

Checked against transformers' `BertModel` (tests/test_bert.py), including the real all-MiniLM-L6-v2 weights.
Module names are the shared blocks' (`layers.{i}.attn.qkv`, `norm1`, `mlp.fc1`); the key map at the bottom
translates transformers' `encoder.layer.{i}.attention.self.query` etc., fusing q/k/v (and cross-attention's k/v).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.nn import MLP, Attention, activation, padding_mask
from polymodal.nn.attention import KVCache, causal_padding_mask
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename
from polymodal.weights.record import record

Context = Tensor | tuple[Tensor, Tensor]  # cross-attended states (B, S, Dc), or their keys and values


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = field(default=2, metadata={"min": 0})  # 0: no token-type embeddings (BLIP's text model)
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    is_decoder: bool = False  # causal self-attention
    add_cross_attention: bool = False  # every layer attends to `encoder_hidden_states` after self-attention
    encoder_hidden_size: int | None = None  # width of those states (BLIP's field name); None: hidden_size
    pooler: bool = True  # transformers' BertModel pooler (add_pooling_layer); read from the checkpoint's tensors

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        activation(self.hidden_act)  # an unknown activation fails here, naming the known ones

    @property
    def context_size(self) -> int:
        return self.encoder_hidden_size or self.hidden_size


def _fits_transformers(c: BertConfig) -> bool:
    """transformers' BertModel has cross-attention only in decoders, over states as wide as its own."""
    return (not c.add_cross_attention or c.is_decoder) and c.context_size == c.hidden_size


class BertLayer(nn.Module):
    """One post-norm layer: (B, T, D) [, context (B, S, Dc)] -> (B, T, D).

    Takes explicit arguments (not a config) so that BLIP-2's Q-Former can mix layers with and without
    cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, act: str = "gelu", eps: float = 1e-12,
                 causal: bool = False, context_dim: int | None = None):
        super().__init__()
        self.attn = Attention(dim, num_heads, causal=causal)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, context_dim=context_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if context_dim else None
        self.mlp = MLP(dim, mlp_hidden, act)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Context | None = None,
                context_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """context: the states to cross-attend (B, S, Dc), or their keys and values from `cross_attn.project_kv`
        (what a decoder computes once per input when it generates); cache: self-attention's KV cache."""
        x = self.norm1(x + self.attn(x, mask=mask, cache=cache))
        if self.cross_attn is not None and context is not None:
            x = self.norm_cross(x + self.cross_attn(x, context, mask=context_mask))
        return self.norm2(x + self.mlp(x))


class Bert(nn.Module):
    """input_ids (B, T) -> hidden states (B, T, D), transformers' `BertModel(...).last_hidden_state`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, D, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, D) if c.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            BertLayer(D, c.num_attention_heads, c.intermediate_size, act=c.hidden_act, eps=c.layer_norm_eps,
                      causal=c.is_decoder, context_dim=c.context_size if c.add_cross_attention else None)
            for _ in range(c.num_hidden_layers)
        )
        self.pooler = nn.Linear(D, D) if c.pooler else None
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            if emb is not None:  # BERT's initializer (std 0.02): PyTorch's N(0, 1) makes a tied LM head's logits huge
                nn.init.normal_(emb.weight, std=0.02)
                if emb.padding_idx is not None:
                    nn.init.zeros_(emb.weight[emb.padding_idx])
        if not _fits_transformers(c):  # pm.save's default layout (transformers') cannot hold this variant
            record(self).layout = "polymodal"

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        encoder_hidden_states: Tensor | list[tuple[Tensor, Tensor]] | None = None,
        encoder_attention_mask: Tensor | None = None,
        cache: list[KVCache] | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T); attention_mask (B, T), 1 for real tokens, 0 for padding; token_type_ids (B, T),
        zeros by default; encoder_hidden_states (B, S, Dc) for the cross-attention layers, with their padding in
        encoder_attention_mask (B, S). Without encoder_hidden_states the cross-attention blocks are skipped, as in
        transformers.

        Generating (a decoder): `cache` holds each layer's self-attention keys and values; the tokens follow the
        cached ones, attention_mask then covers past and new positions (B, past + T), position_ids (B, T) count
        each row's real tokens, and encoder_hidden_states may be each layer's `cross_attn.project_kv` pair."""
        c = self.config
        self._check(input_ids, attention_mask, token_type_ids, encoder_hidden_states, encoder_attention_mask, cache)
        T = input_ids.shape[1]
        past = cache[0].length if cache else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        x = self.word_embeddings(input_ids)  # (B, T, D)
        if self.token_type_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings(types)
        x = self.embed_norm(x + self.position_embeddings(position_ids))
        if cache:  # the mask covers past and new positions
            padded = attention_mask is not None and not bool(attention_mask.all())
            mask = causal_padding_mask(attention_mask, T) if padded else None
        else:
            mask = self_attention_mask(attention_mask, T, causal=c.is_decoder)
        context_mask = None if encoder_attention_mask is None else padding_mask(encoder_attention_mask)
        for i, layer in enumerate(self.layers):
            context = encoder_hidden_states[i] if isinstance(encoder_hidden_states, list) else encoder_hidden_states
            x = layer(x, mask, context, context_mask, cache[i] if cache else None)
        return x

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
               **cross) -> Tensor:
        """The pooler's output (B, D): tanh(dense(h_[CLS])), transformers' `BertModel(...).pooler_output`."""
        if self.pooler is None:
            raise ValueError("this BERT checkpoint has no pooler (pooler.dense.*); use model(...) and pool yourself")
        x = self(input_ids, attention_mask, token_type_ids, **cross)
        return torch.tanh(self.pooler(x[:, 0]))

    def _check(self, input_ids, attention_mask, token_type_ids, context, context_mask, cache) -> None:
        c = self.config
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(f"expected input_ids as integer token ids (B, T), got {input_ids.dtype} of shape "
                             f"{tuple(input_ids.shape)}; add a batch dimension with input_ids[None]")
        past = cache[0].length if cache else 0
        if past + input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids has {past + input_ids.shape[1]} tokens; this BERT holds "
                             f"{c.max_position_embeddings} positions (truncate the text)")
        if cache and not c.is_decoder:
            raise ValueError("a KV cache is for a causal decoder (is_decoder=True)")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        expected = (input_ids.shape[0], past + input_ids.shape[1])
        if attention_mask is not None and tuple(attention_mask.shape) != expected:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {expected} "
                             f"(batch, {'past + ' if past else ''}length)")
        if context is None:
            if context_mask is not None:
                raise ValueError("encoder_attention_mask was given without encoder_hidden_states")
            return
        if not c.add_cross_attention:
            raise ValueError("encoder_hidden_states were given, but this BERT has no cross-attention layers "
                             "(add_cross_attention=False)")
        if isinstance(context, list):  # per-layer keys and values, made by this model's own cross_attn.project_kv
            if len(context) != len(self.layers):
                raise ValueError(f"expected {len(self.layers)} cross-attention (key, value) pairs, got {len(context)}")
            return
        if context.ndim != 3 or context.shape[0] != input_ids.shape[0] or context.shape[2] != c.context_size:
            raise ValueError(f"expected encoder_hidden_states ({input_ids.shape[0]}, S, {c.context_size}), "
                             f"got {tuple(context.shape)}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"encoder_attention_mask has shape {tuple(context_mask.shape)}; expected "
                             f"{tuple(context.shape[:2])} (B, S)")


def self_attention_mask(attention_mask: Tensor | None, T: int, *, causal: bool) -> Tensor | None:
    """The self-attention mask for `Attention` from a (B, T) padding mask: (B, 1, 1, T) keys, or for a decoder
    (B, 1, T, T) causal and padding together. None leaves it to `Attention` (no mask, or its own causal one).

    In a decoder a query before any real token (left padding) would have no key at all: softmax 0/0 = NaN, which
    reaches real tokens through the next layer's values even at weight 0. Such a row attends to itself instead;
    its output is never read, and every other row is exactly transformers' causal-and-padding mask."""
    if attention_mask is None:
        return None
    keys = padding_mask(attention_mask)  # (B, 1, 1, T)
    if not causal:
        return keys
    allowed = keys & torch.ones(T, T, dtype=torch.bool, device=keys.device).tril()  # (B, 1, T, T)
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    return allowed | (empty & torch.eye(T, dtype=torch.bool, device=keys.device))


# ----------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, BertConfig] = {
    "bert-tiny-test": BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64),
    "bert-base-uncased": BertConfig(),
    "bert-large-uncased": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096),
    "sentence-transformers/all-MiniLM-L6-v2": BertConfig(hidden_size=384, num_hidden_layers=6,
                                                         num_attention_heads=12, intermediate_size=1536),
}
HUB_IDS = {
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "google-bert/bert-large-uncased": "bert-large-uncased",
    "sentence-transformers/all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `embeddings.*`, `encoder.layer.{i}.attention.self.{query,key,value}` (fused into our qkv),
# `...crossattention.self.{query,key,value}` (key and value fused into our kv), `pooler.dense`. The *ForXxx
# models prefix all of it with `bert.` and add task heads (`cls.*`, `classifier`, `qa_outputs`), which we do not
# build: they are dropped, and the encoder saves back as a plain BertModel.

_HEADS = ("cls.{rest*}", "classifier.{rest*}", "qa_outputs.{rest*}")


def hf_rules(prefix: str, ours: str = "") -> list:
    """Key-map rules from transformers' BERT names under `prefix` to ours under `ours` (BLIP's text towers use
    them with their own prefixes)."""
    p, layer, o = prefix, f"{prefix}encoder.layer.{{i}}", ours
    emb = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    return [
        Drop(f"{p}embeddings.position_ids"),  # buffers older checkpoints carry; we recompute them
        Drop(f"{p}embeddings.token_type_ids"),
        *[Rename(f"{p}embeddings.{name}.weight", f"{o}{name}.weight") for name in emb],
        Rename(f"{p}embeddings.LayerNorm.{{p}}", f"{o}embed_norm.{{p}}"),
        *[Fuse(tuple(f"{layer}.attention.self.{n}.{w}" for n in ("query", "key", "value")),
               f"{o}layers.{{i}}.attn.qkv.{w}") for w in ("weight", "bias")],
        Rename(f"{layer}.attention.output.dense.{{p}}", f"{o}layers.{{i}}.attn.proj.{{p}}"),
        Rename(f"{layer}.attention.output.LayerNorm.{{p}}", f"{o}layers.{{i}}.norm1.{{p}}"),
        Rename(f"{layer}.crossattention.self.query.{{p}}", f"{o}layers.{{i}}.cross_attn.q.{{p}}"),
        *[Fuse(tuple(f"{layer}.crossattention.self.{n}.{w}" for n in ("key", "value")),
               f"{o}layers.{{i}}.cross_attn.kv.{w}") for w in ("weight", "bias")],
        Rename(f"{layer}.crossattention.output.dense.{{p}}", f"{o}layers.{{i}}.cross_attn.proj.{{p}}"),
        Rename(f"{layer}.crossattention.output.LayerNorm.{{p}}", f"{o}layers.{{i}}.norm_cross.{{p}}"),
        Rename(f"{layer}.intermediate.dense.{{p}}", f"{o}layers.{{i}}.mlp.fc1.{{p}}"),
        Rename(f"{layer}.output.dense.{{p}}", f"{o}layers.{{i}}.mlp.fc2.{{p}}"),
        Rename(f"{layer}.output.LayerNorm.{{p}}", f"{o}layers.{{i}}.norm2.{{p}}"),
        Rename(f"{p}pooler.dense.{{p}}", f"{o}pooler.{{p}}"),
    ]


def _hf_key_map(c: BertConfig) -> KeyMap:
    # unprefixed rules first: saving takes the first rule that matches, so it writes BertModel's names
    return KeyMap([*hf_rules(""), *hf_rules("bert."), *[Drop(h) for h in _HEADS]])


def _read_hf(raw: dict, shapes: dict) -> BertConfig:
    kind = raw.get("position_embedding_type", "absolute")
    if kind != "absolute":  # older transformers read this field; relative positions change the attention scores
        raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute')")
    pooler = "pooler.dense.weight" in shapes or "bert.pooler.dense.weight" in shapes
    return from_dict(BertConfig, raw, pooler=pooler)


def _write_hf(c: BertConfig) -> dict:
    if not _fits_transformers(c):
        raise ValueError(f"transformers' BertModel holds cross-attention only with is_decoder=True and "
                         f"encoder_hidden_size == hidden_size, not is_decoder={c.is_decoder}, "
                         f"add_cross_attention={c.add_cross_attention}, encoder_hidden_size={c.encoder_hidden_size}; "
                         f"save it in polymodal's layout (pm.record(model).layout = 'polymodal')")
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
              "is_decoder", "add_cross_attention")
    # a checkpoint without a pooler still reads back: BertModel then initializes one, as for BertForMaskedLM's
    return {"model_type": "bert", "architectures": ["BertModel"], **{f: getattr(c, f) for f in fields}}


FAMILY = Family(
    name="bert",
    model=Bert,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "polymodal": native_layout("bert", BertConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="BERT encoder (post-norm), optional causal self-attention and cross-attention layers, pooler",
    tasks=(),
)
