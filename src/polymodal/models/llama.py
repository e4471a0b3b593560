"""LLaMA (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"; Llama 2 and 3).

    h = embed(ids)
    L x:  h = h + Attn(RMSNorm(h))      causal, rotary positions, grouped-query heads (Llama 2 70B, Llama 3)
          h = h + SwiGLU(RMSNorm(h))
    logits = lm_head(RMSNorm(h))

Vicuna and SmolLM2 are LLaMA checkpoints; Llama 3.1's long-context RoPE scaling is `rope_scaling` (see
`polymodal.nn.RoPE`). Qwen2 is this model with biased q/k/v projections (`polymodal.models.qwen2`).
Checked against transformers' `LlamaForCausalLM` (logits and greedy `generate`, tests/test_llama.py) and on
the real SmolLM2-135M-Instruct GGUF file against transformers loading the same file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.generation import CausalLM, input_embeddings
from polymodal.nn import Attention, KVCache, RMSNorm, RoPE, SwiGLU
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Fuse, KeyMap, Rename


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None: one per query head
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}; "mrope": positions (3, B, T)
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA: none)
    attention_out_bias: bool | None = None  # bias on o alone, where it differs (Qwen2: q/k/v biased, o not)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = Attention(c.hidden_size, c.num_attention_heads, num_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
                              bias=c.attention_bias, out_bias=c.out_bias, causal=True)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, c.hidden_act, bias=c.mlp_bias)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor], cache: KVCache | None,
                context=None) -> Tensor:
        """context: what a family's cross-attention layers read (Llama 3.2 Vision's image states); a
        self-attention layer ignores it."""
        x = x + self.attn(self.input_layernorm(x), mask=mask, rope=rope, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module, CausalLM):
    """The decoder in three parts, each usable alone (a vision-language model embeds the text, puts image
    features among the embeddings, then decodes):

        h = embed(input_ids)                                        (B, T) -> (B, T, D)
        h = decode(h, mask=, positions=, cache=, context=)          -> final hidden states (B, T, D), normed
        logits = head(h)                                            -> (B, T, V)

    `forward` composes them, from ids or from `inputs_embeds`. Layer i is `make_layer(i)`: a family that
    interleaves other layers (gated cross-attention) overrides that, not the decoder."""

    fixed_shape_step = True  # nothing in forward reads back to the host given positions and a 4-D mask

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rotary = RoPE(c.dim_per_head, c.rope_theta, c.rope_scaling)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_layer(self, index: int) -> nn.Module:
        return DecoderLayer(self.config)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D) input embeddings."""
        return self.embed_tokens(input_ids)

    def decode(self, h: Tensor, *, mask: Tensor | None, positions: Tensor, cache: list[KVCache] | None = None,
               context=None, keep: int = 0) -> Tensor:
        """Input embeddings (B, T, D) -> final hidden states (B, T, D). mask: (B, 1, T, S) or None (causal, no
        padding); positions: the rotary position ids, (B, T) (or what the family's RoPE takes); context: passed
        to every layer (see DecoderLayer.forward); keep=n: only the last n positions come out (every position is
        still decoded: the cache needs them)."""
        rope = self.rotary(positions, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, rope, cache[i] if cache else None, context)
        return self.norm(h[:, -keep:] if keep else h)

    def head(self, h: Tensor) -> Tensor:
        """Hidden states (B, T, D) -> logits (B, T, V)."""
        return self.lm_head(h)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, cache: list[KVCache] | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0) -> Tensor:
        """input_ids (B, T), or inputs_embeds (B, T, D) instead -> logits (B, T, V). attention_mask (B, S): 1 for
        real tokens, 0 for (left) padding, covering the cached positions too (S = past + T). position_ids (B, T)
        default to the count of real tokens before each one. logits_to_keep=n computes logits for the last n
        positions only (generation needs one)."""
        h = input_embeddings(self, input_ids, inputs_embeds)  # (B, T, D)
        position_ids, mask = self.decoder_inputs(h, attention_mask, cache, position_ids)
        return self.head(self.decode(h, mask=mask, positions=position_ids, cache=cache, keep=logits_to_keep))

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.kv_heads, max_len, c.dim_per_head, dtype=dtype, device=device)
                for _ in range(c.num_hidden_layers)]


# ------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny-test": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "llama-2-7b": LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": LlamaConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                              max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                              bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_id=2),
}
HUB_IDS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "lmsys/vicuna-7b-v1.5": "llama-2-7b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "lmsys/vicuna-13b-v1.5": "llama-2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.*`,
# `model.norm`, `lm_head` (absent when tied to the embedding).


def hf_key_map(c: LlamaConfig) -> KeyMap:
    layer = "model.layers.{i}"
    qkv_params = ("weight", "bias") if c.attention_bias else ("weight",)
    q, kv = c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
    return KeyMap([
        *[Fuse(tuple(f"{layer}.self_attn.{n}_proj.{p}" for n in "qkv"), f"layers.{{i}}.attn.qkv.{p}",
               sizes=(q, kv, kv)) for p in qkv_params],
        Rename(f"{layer}.self_attn.o_proj.{{p}}", "layers.{i}.attn.proj.{p}"),
        Rename("lm_head.weight", "lm_head.weight"),
        Rename("model.{rest*}", "{rest*}"),
    ])


def read_hf_config(cls: type, raw: dict, **overrides) -> LlamaConfig:
    """A transformers config.json -> our config; RoPE settings in either the 4.x keys (`rope_theta`,
    `rope_scaling`) or the 5.x `rope_parameters`."""
    raw = dict(raw)
    params = dict(raw.pop("rope_parameters", None) or {})
    if "rope_theta" not in raw and "rope_theta" in params:
        raw["rope_theta"] = params["rope_theta"]
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict) and "mrope_section" in scaling:
        # Qwen2-VL's M-RoPE: 4.x files say {"type": "mrope", ...}, 5.x {"rope_type": "default", "mrope_section"}
        scaling = {"rope_type": "mrope", "mrope_section": scaling["mrope_section"]}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None  # (anything but a dict is left to from_dict's check, which names the field)
    eos = raw.get("eos_token_id")
    return from_dict(cls, raw, rope_scaling=scaling, **({"eos_token_id": tuple(eos)} if isinstance(eos, list) else {}),
                     **overrides)


def write_hf_config(c: LlamaConfig, model_type: str, architecture: str) -> dict:
    out = {
        "model_type": model_type, "architectures": [architecture],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.dim_per_head, "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
    }
    if c.rope_scaling:
        out["rope_scaling"] = dict(c.rope_scaling)
    return out


def _read_hf(raw: dict, shapes: dict) -> LlamaConfig:
    return read_hf_config(LlamaConfig, raw)


def _write_hf(c: LlamaConfig) -> dict:
    if c.attention_out_bias is not None and c.attention_out_bias != c.attention_bias:
        raise ValueError("transformers' LLaMA biases q, k, v and o alike; save this model in polymodal's layout")
    return {**write_hf_config(c, "llama", "LlamaForCausalLM"), "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias}


FAMILY = Family(
    name="llama",
    model=Llama,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map),
        "polymodal": native_layout("llama", LlamaConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="LLaMA 1/2/3 decoder (RoPE incl. Llama 3.1 scaling, grouped-query attention, SwiGLU); Vicuna, SmolLM2",
    tasks=("text-generation",),
)
