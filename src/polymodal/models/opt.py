"""OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"), BLIP-2's frozen language model.

    h = project_in(embed(ids)) + pos[position + 2]     learned positions, offset by 2 (see below)
    L x:  h = h + Attn(LN(h))       pre-norm (do_layer_norm_before: 125m, 1.3b, 2.7b, 6.7b, ...)
          h = h + MLP(LN(h))        ReLU MLP fc1 -> fc2, biases everywhere
      or  h = LN(h + Attn(h))       post-norm (OPT-350m)
          h = LN(h + MLP(h))
    logits = project_out(LN(h)) @ embed.T        final LN only with pre-norm; lm_head tied to the embedding

OPT-350m's embeddings are 512 wide in a 1024-wide model: `project_in` / `project_out` (no bias) translate.

Positions: fairseq reserved rows 0 and 1 of the position table for its padding index, so the real positions
start at row 2. The position of a token is the count of real (unpadded) tokens before it, so a left-padded row
starts at position 0 like an unpadded one; a padding token takes position -1 (row 1), as transformers' forward
gives it. Its output is never read, but keeping the rule in one place makes `forward` return the same logits
whether or not the caller (e.g. `polymodal.generation`) passes position_ids.

Checked against transformers' `OPTForCausalLM` (`transformers/models/opt/modeling_opt.py`): logits, greedy and
beam `generate`, pre- and post-norm, project_in/out (tests/test_opt.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.generation import CausalLM, input_embeddings
from polymodal.nn import MLP, Attention, KVCache
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename

POSITION_OFFSET = 2  # rows 0 and 1 of fairseq's position table belong to its padding index


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # embedding width; None: hidden_size (OPT-350m: 512 in a 1024 model)
    do_layer_norm_before: bool = True  # pre-norm; False: post-norm, as OPT-350m
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 2

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")


class DecoderLayer(nn.Module):
    """One OPT layer, (B, T, D) -> (B, T, D): pre-norm, or post-norm as OPT-350m."""

    def __init__(self, c: OPTConfig):
        super().__init__()
        self.pre_norm = c.do_layer_norm_before
        affine = c.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=affine)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, bias=c.enable_bias, causal=True)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=affine)
        self.mlp = MLP(c.hidden_size, c.ffn_dim, c.activation_function, bias=c.enable_bias)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask=mask, cache=cache)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask=mask, cache=cache))
        return self.final_layer_norm(x + self.mlp(x))


class OPT(nn.Module, CausalLM):
    """input_ids (B, T) -> logits (B, T, V); with a KV cache for generation (`polymodal.generation`)."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_token_id)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size)
        projected = c.embed_dim != c.hidden_size
        self.project_in = nn.Linear(c.embed_dim, c.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        # post-norm layers end on a LayerNorm already; only pre-norm stacks get a final one
        self.final_layer_norm = (nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)
                                 if c.do_layer_norm_before else None)
        self.project_out = nn.Linear(c.hidden_size, c.embed_dim, bias=False) if projected else None
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, E) input embeddings (E: the embedding width, `word_embed_proj_dim`)."""
        return self.embed_tokens(input_ids)

    def decode(self, h: Tensor, *, mask: Tensor | None, positions: Tensor, cache: list[KVCache] | None = None,
               keep: int = 0) -> Tensor:
        """Input embeddings (B, T, E) -> final hidden states (B, T, E), after the final norm and `project_out`.
        positions (B, T): real tokens counted from 0, padding -1 (see the module docstring); keep=n: only the last
        n positions come out."""
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} is past OPT's learned positions "
                             f"(max_position_embeddings={self.config.max_position_embeddings})")
        if self.project_in is not None:
            h = self.project_in(h)  # (B, T, D)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None)
        if keep:
            h = h[:, -keep:]
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return self.project_out(h) if self.project_out is not None else h  # (B, T, E)

    def head(self, h: Tensor) -> Tensor:
        """Hidden states (B, T, E) -> logits (B, T, V)."""
        return self.lm_head(h)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, cache: list[KVCache] | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """input_ids (B, T), or inputs_embeds (B, T, E) instead -> logits (B, T, V). attention_mask (B, S): 1 for
        real tokens, 0 for (left) padding, covering the cached positions too (S = past + T). position_ids (B, T)
        default to the count of real tokens before each one; padding tokens take position -1 either way (see the
        module docstring). logits_to_keep=n computes logits for the last n positions only (generation needs one)."""
        h = input_embeddings(self, input_ids, inputs_embeds)  # (B, T, E)
        position_ids, mask = self.decoder_inputs(h, attention_mask, cache, position_ids)
        if attention_mask is not None:  # OPT gives padding the position -1 (see the module docstring)
            position_ids = position_ids.masked_fill(attention_mask[:, -h.shape[1]:] == 0, -1)
        return self.head(self.decode(h, mask=mask, positions=position_ids, cache=cache, keep=logits_to_keep))

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.num_attention_heads, max_len, c.head_dim, dtype=dtype, device=device)
                for _ in range(c.num_hidden_layers)]


# ------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, OPTConfig] = {
    "opt-tiny-test": OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               ffn_dim=128, max_position_embeddings=256),
    "opt-125m": OPTConfig(),
    "opt-350m": OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                          word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": OPTConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
}
HUB_IDS = {
    "facebook/opt-125m": "opt-125m",
    "facebook/opt-350m": "opt-350m",
    "facebook/opt-1.3b": "opt-1.3b",
    "facebook/opt-2.7b": "opt-2.7b",
    "facebook/opt-6.7b": "opt-6.7b",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers' OPTForCausalLM: `model.decoder.{embed_tokens, embed_positions, project_in, project_out,
# final_layer_norm}`, `model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj`, `...layers.{i}.{fc1, fc2,
# self_attn_layer_norm, final_layer_norm}`, `lm_head` (absent when tied). The checkpoints on the hub under
# facebook/ were saved from OPTModel: the same names without `model.` and no lm_head; both load.


def decoder_rules(c: OPTConfig, decoder: str = "model.decoder", head: str = "lm_head") -> list:
    """Key-map rules for an OPT whose decoder lives under `decoder` and whose head is `head` in the checkpoint
    (BLIP-2 nests both under `language_model.`)."""
    layer = f"{decoder}.layers.{{i}}"
    params = ("weight", "bias") if c.enable_bias else ("weight",)
    return [
        *[Fuse(tuple(f"{layer}.self_attn.{n}_proj.{p}" for n in "qkv"), f"layers.{{i}}.self_attn.qkv.{p}")
          for p in params],
        Rename(f"{layer}.self_attn.out_proj.{{p}}", "layers.{i}.self_attn.proj.{p}"),
        Rename(f"{layer}.fc{{n}}.{{p}}", "layers.{i}.mlp.fc{n}.{p}"),
        Rename(f"{head}.weight", "lm_head.weight"),
        Rename(f"{decoder}.{{rest*}}", "{rest*}"),
    ]


def hf_key_map(c: OPTConfig) -> KeyMap:
    # saving takes the first rule that matches our name: transformers' OPTForCausalLM names
    return KeyMap(decoder_rules(c) + decoder_rules(c, decoder="decoder"))


def _read_hf(raw: dict, shapes: dict) -> OPTConfig:
    if raw.get("_remove_final_layer_norm"):
        raise ValueError("_remove_final_layer_norm=true (checkpoints fine-tuned before transformers 4.20.1) is not "
                         "supported; re-save the model with a current transformers")
    eos = raw.get("eos_token_id")
    return from_dict(OPTConfig, raw, **({"eos_token_id": tuple(eos)} if isinstance(eos, list) else {}))


def _write_hf(c: OPTConfig) -> dict:
    return {
        "model_type": "opt", "architectures": ["OPTForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "ffn_dim": c.ffn_dim,
        "max_position_embeddings": c.max_position_embeddings, "word_embed_proj_dim": c.embed_dim,
        "do_layer_norm_before": c.do_layer_norm_before, "_remove_final_layer_norm": False,
        "activation_function": c.activation_function, "enable_bias": c.enable_bias,
        "layer_norm_elementwise_affine": c.layer_norm_elementwise_affine,
        "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
    }


FAMILY = Family(
    name="opt",
    model=OPT,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map),
        "polymodal": native_layout("opt", OPTConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="OPT decoder (learned positions, pre- or post-norm, ReLU MLP, project_in/out); BLIP-2's language model",
    tasks=("text-generation",),
)
