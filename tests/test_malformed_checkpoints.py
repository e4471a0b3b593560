"""Malformed checkpoints are refused with a CheckpointError that names the file and the field, before any large
allocation, and never hang.

Every input is generated here from tiny valid checkpoints (none are stored): a table of known-bad configs,
safetensors headers, shard indexes, non-regular files and GGUF metadata, then a seeded mutator over tiny
checkpoints of several families and GGUF files written with the `gguf` package. Each input is loaded in one worker
subprocess (`WORKER`), which reports per input what came out, and how much its peak memory (ru_maxrss) and its peak
of Python allocations (tracemalloc) grew; SIGALRM ends an input that runs too long, and the worker's address space
is capped, so a regression fails the test instead of hanging it or exhausting the machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal import registry
from polymodal.config import ConfigError, check, validate
from polymodal.models.llama import LlamaConfig
from polymodal.weights.checkpoint import CheckpointError
from polymodal.weights.loader import build_meta

FAMILIES = ("llama", "qwen2", "opt", "t5", "bert", "vit", "clip", "blip")
MEMORY_BOUND_MIB = 200  # what one refused input may add to the worker's peak; the inputs claim gigabytes to exabytes
CASE_SECONDS = 30  # an input still loading after this is a hang (they all take milliseconds)


# ================================================================================ tiny valid checkpoints


def save_tiny(family: str, directory: Path, **options) -> Path:
    torch.manual_seed(0)
    pm.save(pm.build(family, f"{family}-tiny-test"), directory, **options)
    return directory


def write_gguf(path: Path, metadata: dict[str, tuple], tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF file with exactly `metadata` ({key: (value, GGUFValueType[, element type])}) and float32 tensors."""
    w = gguf.GGUFWriter(path, "llama")
    w.kv_data[0].clear()  # the writer adds general.architecture itself; here every key is chosen
    for key, (value, vtype, *sub) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


V = gguf.GGUFValueType
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tiny_gguf_parts() -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """The metadata and tensors of the tiny LLaMA preset as llama.cpp names them (values are random; only the
    structure matters here)."""
    fam = registry.family("llama")
    cfg = fam.presets["llama-tiny-test"]
    torch.manual_seed(0)
    state = pm.build("llama", cfg).state_dict()
    tensors = {}
    for step in fam.layouts["transformers"].key_map(cfg).plan_save(list(state)):
        for hf, t in zip(step.dst, step.fn([state[k] for k in step.src])):
            top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
            if hf in top:
                name = top[hf]
            else:
                _, _, i, rest = hf.split(".", 3)
                module, kind = rest.rsplit(".", 1)
                name = f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
            tensors[name] = t.detach().numpy().astype(np.float32)
    metadata = {
        "general.architecture": ("llama", V.STRING),
        "llama.context_length": (cfg.max_position_embeddings, V.UINT32),
        "llama.embedding_length": (cfg.hidden_size, V.UINT32),
        "llama.block_count": (cfg.num_hidden_layers, V.UINT32),
        "llama.feed_forward_length": (cfg.intermediate_size, V.UINT32),
        "llama.attention.head_count": (cfg.num_attention_heads, V.UINT32),
        "llama.attention.head_count_kv": (cfg.kv_heads, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, V.FLOAT32),
        "llama.rope.freq_base": (cfg.rope_theta, V.FLOAT32),
        "llama.vocab_size": (cfg.vocab_size, V.UINT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
    }
    return metadata, tensors


# ====================================================================================== the worker

WORKER = r"""
import json, resource, signal, sys, traceback, tracemalloc

import polymodal as pm
from polymodal.weights.checkpoint import CheckpointError

job = json.loads(sys.stdin.read())
for path in job["warmup"]:  # every family's module and the loader's lazy imports, so that no input pays for them
    pm.load(path)
# Cap the address space well above what the warm worker maps: an input that tries to allocate gigabytes fails
# with MemoryError (reported) instead of exhausting the machine.
with open("/proc/self/status") as f:
    mapped = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 2**30, resource.RLIM_INFINITY))


def too_long(signum, frame):
    raise TimeoutError(f"still loading after {job['seconds']} s")


signal.signal(signal.SIGALRM, too_long)
if job["tracemalloc"]:
    tracemalloc.start()
for case, path in job["cases"]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if job["tracemalloc"]:
        tracemalloc.reset_peak()
        traced = tracemalloc.get_traced_memory()[0]
    signal.alarm(job["seconds"])
    try:
        pm.load(path)
        outcome, message = "loaded", ""
    except CheckpointError as e:
        outcome, message = "CheckpointError", str(e)
    except BaseException as e:
        outcome, message = type(e).__name__, traceback.format_exc()[-3000:]
    finally:
        signal.alarm(0)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB -> MiB
    peak = (tracemalloc.get_traced_memory()[1] - traced) / 2**20 if job["tracemalloc"] else 0.0
    print(json.dumps({"case": case, "outcome": outcome, "message": message, "rss_mib": grown, "traced_mib": peak}),
          flush=True)
"""


def run_worker(cases: list[tuple[str, Path]], warmup: list[Path], *, tracemalloc: bool) -> dict[str, dict]:
    job = {"cases": [(c, str(p)) for c, p in cases], "warmup": [str(p) for p in warmup],
           "seconds": CASE_SECONDS, "tracemalloc": tracemalloc}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps(job), capture_output=True, text=True,
                          env=env, timeout=CASE_SECONDS * 4 + 2 * len(cases))
    results = {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert results or proc.returncode == 0, proc.stderr[-3000:]
    return results


# ======================================================================================= the table


@dataclass(frozen=True)
class Case:
    id: str
    base: str  # a family's tiny checkpoint directory, "sharded" (vit in shards) or "gguf"
    make: Callable[[Path], Path]  # the copied base -> the source to load
    file: str  # the file the message must name
    says: str  # and what it must say about the field


def set_key(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        cfg = cfg[key]
    cfg[leaf] = value


def config(**changes) -> Callable[[Path], Path]:
    """Change config.json's values; a key `a__b` is `a.b` in the file (a nested config)."""

    def make(d: Path) -> Path:
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            set_key(cfg, key.replace("__", "."), value)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return make


def config_text(text: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / "config.json").write_text(text)
        return d

    return make


def replace_file(name: str, how: str) -> Callable[[Path], Path]:
    """`name` becomes a FIFO, a symlink to /dev/zero, a sparse 17 MiB file, or bytes that are not UTF-8."""

    def make(d: Path) -> Path:
        p = d / name
        p.unlink(missing_ok=True)
        if name == "pytorch_model.bin":
            (d / "model.safetensors").unlink()
        if how == "fifo":
            os.mkfifo(p)
        elif how == "dev-zero":
            p.symlink_to("/dev/zero")
        elif how == "huge":
            with open(p, "wb") as f:
                f.write(b'{"model_type": "vit", "pad": "')
                f.truncate(17 * 2**20)
        elif how == "not-utf8":
            p.write_bytes(b'{"model_type": "vit", "name": "\xff\xfe"}')
        return d

    return make


def raw_safetensors(d: Path, header: dict | bytes, data: bytes, *, size: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
        if size is not None:
            f.truncate(size)  # sparse: nothing is written


def stored_header(d: Path) -> tuple[dict, bytes]:
    blob = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def safetensors(how: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        header, data = stored_header(d)
        if how == "bom":
            raw_safetensors(d, b"\xef\xbb\xbf" + json.dumps(header).encode(), data)
        elif how == "over-limit":
            raw = b"{" + b" " * 16
            with open(d / "model.safetensors", "wb") as f:
                f.write(struct.pack("<Q", 100_000_001) + raw)
                f.truncate(8 + 100_000_001 + len(data))
        elif how == "dim-2**70":
            header["empty"] = {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [len(data), len(data)]}
            raw_safetensors(d, header, data)
        elif how == "gap":  # 4 bytes before the first tensor
            for name, entry in header.items():
                if name != "__metadata__":
                    entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
            raw_safetensors(d, header, b"\0" * 4 + data)
        elif how == "metadata":
            header["__metadata__"] = {"format": 1}
            raw_safetensors(d, header, data)
        return d

    return make


def index(change: Callable[[dict], None] | bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        p = d / "model.safetensors.index.json"
        if isinstance(change, bytes):
            p.write_bytes(change)
        else:
            idx = json.loads(p.read_text())
            change(idx)
            p.write_text(json.dumps(idx))
        return d

    return make


def gguf_file(**changes: tuple) -> Callable[[Path], Path]:
    """The tiny GGUF file with metadata keys changed (`llama__block_count` is `llama.block_count`); for
    block_count, the tensors stay those of the file's blocks."""

    def make(d: Path) -> Path:
        metadata, tensors = tiny_gguf_parts()
        metadata.update({k.replace("__", "."): v for k, v in changes.items()})
        return write_gguf(d / "model.gguf", metadata, tensors)

    return make


NAN, INF = float("nan"), float("inf")
CASES = [
    # config.json: types and ranges of its fields, checked against the family's config dataclass
    Case("model_type-list", "llama", config(model_type=["llama"]), "config.json", "'model_type'"),
    Case("hidden_size-zero", "llama", config(hidden_size=0), "config.json", "'hidden_size'"),
    Case("hidden_size-negative", "bert", config(hidden_size=-32), "config.json", "'hidden_size'"),
    Case("ffn_dim-fraction", "opt", config(ffn_dim=127.5), "config.json", "'ffn_dim'"),
    Case("layers-string", "vit", config(num_hidden_layers="2"), "config.json", "'num_hidden_layers'"),
    Case("hidden_size-10**18", "llama", config(hidden_size=10**18), "config.json", "'hidden_size'"),
    Case("layers-10**7", "llama", config(num_hidden_layers=10**7), "config.json", "'num_hidden_layers'"),
    Case("heads-zero", "vit", config(num_attention_heads=0), "config.json", "'num_attention_heads'"),
    Case("text-heads-zero", "clip", config(text_config__num_attention_heads=0), "config.json",
         "'num_attention_heads' of CLIPTextConfig"),
    Case("kv-heads-not-dividing", "qwen2", config(num_key_value_heads=3), "config.json", "'num_key_value_heads'"),
    Case("rope_scaling-string", "llama", config(rope_scaling="linear"), "config.json", "'rope_scaling'"),
    Case("rope_scaling-missing-keys", "llama", config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
         "config.json", "'rope_scaling' of LlamaConfig: lacks 'low_freq_factor'"),
    Case("t5-d_kv-zero", "t5", config(d_kv=0), "config.json", "'d_kv'"),
    Case("t5-layers-float", "t5", config(num_decoder_layers=2.0), "config.json", "'num_decoder_layers'"),
    Case("pad-outside-vocab", "bert", config(pad_token_id=10**6), "config.json", "'pad_token_id'"),
    Case("unknown-activation", "bert", config(hidden_act="sparkle"), "config.json", "'hidden_act'"),
    Case("eps-nan", "blip", config(text_config__layer_norm_eps=NAN), "config.json", "'layer_norm_eps'"),
    Case("blip-vision-patch-zero", "blip", config(vision_config__patch_size=0), "config.json", "'patch_size'"),
    # within every field's range, but the model it describes is larger than any real one: refused by the meta
    # build's budget, naming the field whose value is the refused tensor's dimension
    Case("hidden_size-2**31-1", "llama", config(hidden_size=2**31 - 1), "config.json", "hidden_size=2147483647"),
    Case("json-100000-deep", "llama", config_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000
                                                  + "}"), "config.json", "nested deeper"),
    # files that are not regular, too large or not text
    Case("config-dev-zero", "vit", replace_file("config.json", "dev-zero"), "config.json", "character device"),
    Case("config-17MiB", "vit", replace_file("config.json", "huge"), "config.json", "larger than the 16 MiB"),
    Case("config-not-utf8", "vit", replace_file("config.json", "not-utf8"), "config.json", "not UTF-8"),
    Case("bin-fifo", "vit", replace_file("pytorch_model.bin", "fifo"), "pytorch_model.bin", "a FIFO"),
    Case("weights-dev-zero", "vit", replace_file("model.safetensors", "dev-zero"), "model.safetensors",
         "character device"),
    Case("generation-config-fifo", "llama", replace_file("generation_config.json", "fifo"),
         "generation_config.json", "a FIFO"),
    # safetensors headers the `safetensors` library itself would reject with its own error
    Case("header-bom", "vit", safetensors("bom"), "model.safetensors", "byte-order mark"),
    Case("header-over-100MB", "vit", safetensors("over-limit"), "model.safetensors", "over the format's limit"),
    Case("zero-size-dim-2**70", "vit", safetensors("dim-2**70"), "model.safetensors", "tensor 'empty'"),
    Case("header-gap", "vit", safetensors("gap"), "model.safetensors", "belong to no tensor"),
    Case("header-metadata-int", "vit", safetensors("metadata"), "model.safetensors", "__metadata__"),
    # the shard index
    Case("weight_map-list", "sharded", index(lambda i: i.update(weight_map=list(i["weight_map"]))),
         "model.safetensors.index.json", "'weight_map'"),
    Case("weight_map-values", "sharded", index(lambda i: i["weight_map"].update(dict.fromkeys(i["weight_map"], 3))),
         "model.safetensors.index.json", "'weight_map'"),
    Case("index-not-utf8", "sharded", index(b'{"weight_map": {"a": "\xc3\x28"}}'), "model.safetensors.index.json",
         "not UTF-8"),
    # GGUF metadata
    Case("gguf-architecture-array", "gguf", gguf_file(general__architecture=(["llama"], V.ARRAY, V.STRING)),
         "model.gguf", "'general.architecture'"),
    Case("gguf-block_count-inf", "gguf", gguf_file(llama__block_count=(INF, V.FLOAT32)), "model.gguf",
         "'llama.block_count'"),
    Case("gguf-block_count-10**9", "gguf", gguf_file(llama__block_count=(10**9, V.UINT32)), "model.gguf",
         "'llama.block_count'"),
    Case("gguf-embedding_length-10**12", "gguf", gguf_file(llama__embedding_length=(10**12, V.UINT64)),
         "model.gguf", "'llama.embedding_length'"),
    Case("gguf-head_count-zero", "gguf", gguf_file(llama__attention__head_count=(0, V.UINT32)), "model.gguf",
         "'llama.attention.head_count'"),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out = {family: save_tiny(family, root / family) for family in FAMILIES}
    (out["llama"] / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    out["sharded"] = save_tiny("vit", root / "sharded", max_shard_bytes=20_000)
    out["gguf"] = root / "gguf"
    out["gguf"].mkdir()
    write_gguf(out["gguf"] / "model.gguf", *tiny_gguf_parts())
    return out


def copy_base(base: Path, to: Path) -> Path:
    shutil.copytree(base, to, symlinks=True)
    return to


@pytest.fixture(scope="module")
def table(bases, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("table")
    cases = [(c.id, c.make(copy_base(bases[c.base], root / c.id))) for c in CASES]
    warmup = [bases[b] for b in (*FAMILIES, "sharded")] + [bases["gguf"] / "model.gguf"]
    return run_worker(cases, warmup, tracemalloc=True)


def test_the_bases_load(table):
    """The worker loaded every tiny base (its warm-up) and then reported every input."""
    assert sorted(table) == sorted(c.id for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_refused_clearly(table, case):
    result = table.get(case.id)
    assert result is not None, "the worker died before reporting this input"
    assert result["outcome"] == "CheckpointError", result["message"]
    message = result["message"]
    assert case.file in message and case.says in message, message
    assert "\n" not in message and len(message) < 1000, message
    assert result["rss_mib"] < MEMORY_BOUND_MIB, f"peak memory grew {result['rss_mib']:.0f} MiB"
    assert result["traced_mib"] < MEMORY_BOUND_MIB, f"Python allocations peaked {result['traced_mib']:.0f} MiB higher"


# ============================================================================== a seeded mutator

NASTY = [0, -1, 1, 3, 2**31, 2**63, 10**18, -(10**18), 0.5, 1e308, NAN, INF, "", "x", "relu", True, False, None,
         [], [1], [2, 2], {}, {"a": 1}, {"rope_type": "linear"}, [[[]]]]


def leaves(obj, prefix=()) -> list[tuple]:
    if isinstance(obj, dict):
        out = [prefix] if prefix else []
        for k, v in obj.items():
            out += leaves(v, (*prefix, k))
        return out
    return [prefix]


def mutate_config(d: Path, rng: random.Random) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for _ in range(rng.choice((1, 1, 2, 3))):
        path = rng.choice(leaves(cfg))
        parent = cfg
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.15:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = rng.choice(NASTY)
    (d / "config.json").write_text(json.dumps(cfg))


def mutate_header(d: Path, rng: random.Random) -> None:
    header, data = stored_header(d)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(5)
    if kind == 0:  # one field of one tensor
        entry = header[rng.choice(names)]
        entry[rng.choice(("dtype", "shape", "data_offsets"))] = rng.choice(NASTY + [["F32"], [0, 2**70], [-1, 4]])
    elif kind == 1:  # one dimension of one tensor
        entry = header[rng.choice(names)]
        if entry["shape"]:
            entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice((0, 1, 2**31, 2**62, 2**64 + 1))
    elif kind == 2:  # a tensor dropped or the metadata changed
        header.pop(rng.choice(names)) if rng.random() < 0.5 else header.update(__metadata__=rng.choice(NASTY))
    raw = json.dumps(header).encode()
    if kind == 3:  # bytes of the header flipped
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    blob = struct.pack("<Q", len(raw)) + raw + data
    if kind == 4:  # the file cut short, or its length field changed
        if rng.random() < 0.5:
            blob = blob[: rng.randrange(len(blob))]
        else:
            blob = struct.pack("<Q", rng.choice((0, 1, len(raw) - 1, len(raw) + 1, 2**63))) + blob[8:]
    (d / "model.safetensors").write_bytes(blob)


GGUF_NASTY = [(0, V.UINT32), (1, V.UINT32), (3, V.UINT32), (2**31, V.UINT64), (10**12, V.UINT64), (-1, V.INT32),
              (0.0, V.FLOAT32), (-1.5, V.FLOAT32), (NAN, V.FLOAT32), (INF, V.FLOAT64), (True, V.BOOL), ("", V.STRING),
              ("llama", V.STRING), ("linear", V.STRING), ([1, 2], V.ARRAY, V.INT32), (["a"], V.ARRAY, V.STRING)]
GGUF_EXTRA_KEYS = ["llama.attention.key_length", "llama.rope.dimension_count", "llama.rope.scaling.type",
                   "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                   "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                   "tokenizer.ggml.padding_token_id", "general.alignment"]


def mutate_gguf(d: Path, rng: random.Random) -> None:
    metadata, tensors = tiny_gguf_parts()
    kind = rng.randrange(4)
    if kind == 0:  # metadata values of other types and sizes
        for _ in range(rng.choice((1, 1, 2))):
            metadata[rng.choice(list(metadata) + GGUF_EXTRA_KEYS)] = rng.choice(GGUF_NASTY)
    elif kind == 1:  # a required key or a tensor dropped
        metadata.pop(rng.choice(list(metadata)))
    elif kind == 2:
        tensors.pop(rng.choice(list(tensors)))
    path = write_gguf(d / "model.gguf", metadata, tensors)
    if kind == 3:  # bytes of the header flipped
        blob = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(min(len(blob), 1200))] = rng.randrange(256)
        path.write_bytes(bytes(blob))


def test_mutated_checkpoints_raise_only_checkpoint_error(bases, tmp_path):
    rng = random.Random(20240601)
    cases = []
    for family in FAMILIES:
        for i in range(18):
            d = copy_base(bases[family], tmp_path / f"{family}-config-{i}")
            mutate_config(d, rng)
            cases.append((d.name, d))
        for i in range(8):
            d = copy_base(bases[family], tmp_path / f"{family}-header-{i}")
            mutate_header(d, rng)
            cases.append((d.name, d))
    for i in range(60):
        d = tmp_path / f"gguf-{i}"
        d.mkdir()
        mutate_gguf(d, rng)
        cases.append((d.name, d / "model.gguf"))
    warmup = [bases[f] for f in FAMILIES] + [bases["gguf"] / "model.gguf"]
    results = run_worker(cases, warmup, tracemalloc=False)
    wrong = [f"{c}: {r['outcome']}: {r['message'][-600:]}" for c, r in results.items()
             if r["outcome"] not in ("loaded", "CheckpointError")]
    unnamed = [f"{c}: {r['message']}" for c, r in results.items()
               if r["outcome"] == "CheckpointError" and str(tmp_path / c) not in r["message"]]
    heavy = [f"{c}: {r['rss_mib']:.0f} MiB" for c, r in results.items() if r["rss_mib"] >= MEMORY_BOUND_MIB]
    assert len(results) == len(cases), f"the worker stopped after {len(results)} of {len(cases)} inputs"
    assert not wrong, "\n".join(wrong)
    assert not unnamed, "\n".join(unnamed)
    assert not heavy, "\n".join(heavy)
    refused = sum(r["outcome"] == "CheckpointError" for r in results.values())
    assert refused > len(cases) // 2  # the mutator does make bad inputs


# ===================================================================== the checks themselves, in process


@pytest.mark.parametrize("family", [f.name for f in registry.all_families()])
def test_every_preset_passes_the_checks_and_builds_within_the_budget(family):
    fam = registry.family(family)
    for name, cfg in fam.presets.items():
        validate(cfg)
        model = build_meta(fam, cfg, name)
        assert all(p.is_meta for p in model.parameters())


def test_the_largest_released_dense_model_fits_the_budget():
    """Llama 3.1 405B (its config.json): the checks and the budget leave room for real models of any size."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                      num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})
    validate(cfg)
    model = build_meta(registry.family("llama"), cfg)
    assert 4.0e11 < sum(p.numel() for p in model.parameters()) < 4.1e11


def test_the_budget_stops_a_build_of_too_many_tensors():
    """No validated config of today's families reaches the tensor cap (their layer counts stop first); a family
    whose model builds a tensor per expert would."""

    @dataclass(frozen=True)
    class ExpertsConfig:
        experts: int = 70_000

    family = SimpleNamespace(model=lambda c: [torch.empty(1) for _ in range(c.experts)])
    with pytest.raises(CheckpointError, match=r"over 65536 tensors, more than any real model \(experts=70000\)"):
        build_meta(family, ExpertsConfig(), "config.json")


@pytest.mark.parametrize("values, field, says", [
    ({"hidden_size": True}, "hidden_size", "expected an integer, got True"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps", "not negative"),
    ({"rope_theta": 0.0}, "rope_theta", "positive"),
    ({"eos_token_id": (1, "2")}, "eos_token_id[1]", "expected an integer, got '2'"),
    ({"eos_token_id": "2"}, "eos_token_id", "expected an integer or a list of integers or null, got '2'"),
    ({"eos_token_id": (1, 10**6)}, "eos_token_id", "not a token of the 32000-entry vocabulary"),
    ({"pad_token_id": -2}, "pad_token_id", "a token id is at least -1"),
    ({"head_dim": 0}, "head_dim", "at least 1"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor", "a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling", "larger than low_freq_factor"),
])
def test_check_names_the_field(values, field, says):
    with pytest.raises(ConfigError) as e:
        check(LlamaConfig, values)
    assert e.value.field == field and says in str(e.value), str(e.value)


def test_zero_is_a_size_only_where_the_field_says_so():
    from polymodal.models.bert import BertConfig
    from polymodal.models.vit import ViTConfig

    check(ViTConfig, {"num_labels": 0})  # default 0: no classification head
    check(BertConfig, {"type_vocab_size": 0})  # declared min 0: no token-type embeddings (BLIP's text model)
    with pytest.raises(ConfigError, match="'num_channels' of ViTConfig: 0 is out of range"):
        check(ViTConfig, {"num_channels": 0})
