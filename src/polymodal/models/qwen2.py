"""Qwen2 (Yang et al. 2024, "Qwen2 Technical Report"): the LLaMA decoder with biases on the q, k and v projections
(not on the output projection), a larger RoPE base and, for the small sizes, tied embeddings. Qwen2-VL and
Qwen2.5-VL put their vision towers in front of it.

The model is `polymodal.models.llama.Llama`; this file holds what differs: the config's defaults, the presets
and transformers' `Qwen2ForCausalLM` layout. Checked against transformers' `Qwen2ForCausalLM` (logits and
greedy `generate`, tests/test_llama.py). Sliding-window attention (`use_sliding_window`, off in every released
Qwen2 checkpoint's config) is not implemented and refused at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.models.llama import Llama, LlamaConfig, hf_key_map, read_hf_config, write_hf_config
from polymodal.registry import Family, Layout, native_layout


@dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    attention_bias: bool = True  # q, k, v
    attention_out_bias: bool | None = False  # o
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None


class Qwen2(Llama):
    """input_ids (B, T) -> logits (B, T, V): LLaMA with biased q/k/v (see the module docstring)."""


PRESETS: dict[str, Qwen2Config] = {
    "qwen2-tiny-test": Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2-0.5b": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                              tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "qwen2-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True,
                              bos_token_id=151643, eos_token_id=151645),
    "qwen2-7b": Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            bos_token_id=151643, eos_token_id=151645),
}
HUB_IDS = {
    "Qwen/Qwen2-0.5B-Instruct": "qwen2-0.5b",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2-0.5b",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2-1.5b",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2-1.5b",
    "Qwen/Qwen2-7B-Instruct": "qwen2-7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2-7b",
}


def _read_hf(raw: dict, shapes: dict) -> Qwen2Config:
    if raw.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    return read_hf_config(Qwen2Config, raw, attention_bias=True, attention_out_bias=False)


def _write_hf(c: Qwen2Config) -> dict:
    if not (c.attention_bias and c.attention_out_bias is False) or c.mlp_bias:
        raise ValueError("transformers' Qwen2 has biases on q/k/v only; save this model in polymodal's layout")
    return {**write_hf_config(c, "qwen2", "Qwen2ForCausalLM"), "use_sliding_window": False}


FAMILY = Family(
    name="qwen2",
    model=Qwen2,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map),
        "polymodal": native_layout("qwen2", Qwen2Config),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="Qwen2 / Qwen2.5 decoder (LLaMA with q/k/v biases); the language model of Qwen2-VL",
    tasks=("text-generation",),
)
