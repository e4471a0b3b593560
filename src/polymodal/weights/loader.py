"""The one strict loader: `load(source)` and `save(model, directory)`.

The model is built on the meta device, the key map is checked on meta tensors (every name and shape, before
reading any data), then each tensor is read and moved into place one at a time: no second copy of the
weights, and no half-loaded model. Missing, unexpected and mis-shaped tensors are reported together in one
error that names them.

Before that, the config is checked (`polymodal.config.check`: every field's type and range, named in the error) and
the meta build runs under a budget (`_Budget`): a config describing more tensors or values than any real model has
is refused before it can take hours, or overflow torch's sizes, however small the files are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal import registry
from polymodal.config import LAYER_COUNTS, ConfigError, show, validate
from polymodal.nn import quant
from polymodal.weights.checkpoint import CheckpointError, open_checkpoint, read_json
from polymodal.weights.keymap import KeyMap
from polymodal.weights.record import record

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def resolve(source: str | os.PathLike) -> Path:
    """A local path as is; a hub id ("owner/name") through huggingface_hub, which honours HF_HUB_OFFLINE."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not _HUB_ID.fullmatch(text):
        raise CheckpointError(text, "no such file or directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network: all end here
        raise CheckpointError(
            text,
            f"not a local path, and the Hugging Face hub could not provide it ({type(e).__name__}). "
            "Offline? Download it once, or pass a local directory.",
        ) from None


def detect(directory: Path) -> tuple[registry.Family, registry.Layout, dict]:
    """Find a directory's family and layout from its config files."""
    if (directory / "model_index.json").exists():
        raise CheckpointError(directory, "diffusers pipelines are not supported yet by this polymodal version")
    if (directory / "open_clip_config.json").exists():
        fam = registry.family("clip")
        return fam, fam.layouts["open_clip"], read_json(directory / "open_clip_config.json")
    config_path = directory / "config.json"
    if not (config_path.exists() or config_path.is_symlink()):
        raise CheckpointError(directory, "no config.json (or open_clip_config.json): cannot tell the model family")
    cfg = read_json(config_path)
    for key in ("model_type", "architecture", "_class_name"):
        if key in cfg and not isinstance(cfg[key], str):
            raise CheckpointError(config_path, f"field {key!r} must be a string, got {show(cfg[key])}")
    if "model_type" in cfg:
        name = registry.MODEL_TYPES.get(cfg["model_type"])
        if name is None:
            raise CheckpointError(
                config_path,
                f"unknown model_type {show(cfg['model_type'])}; supported: {sorted(registry.MODEL_TYPES)}",
            )
        fam = registry.family(name)
        native = cfg["model_type"].startswith("polymodal-")
        layout = fam.layouts["polymodal" if native else "transformers"]
        return fam, layout, cfg
    if "architecture" in cfg:
        arch = cfg["architecture"]
        for prefix, name in registry.TIMM_ARCHITECTURES.items():
            if arch.startswith(prefix):
                fam = registry.family(name)
                if "timm" in fam.layouts:
                    return fam, fam.layouts["timm"], cfg
        raise CheckpointError(config_path, f"unsupported timm architecture {show(arch)}")
    if "_class_name" in cfg:
        name = registry.DIFFUSERS_CLASSES.get(cfg["_class_name"])
        if name is None:
            raise CheckpointError(config_path, f"diffusers model {show(cfg['_class_name'])} is not supported yet; "
                                               f"supported: {sorted(registry.DIFFUSERS_CLASSES)}")
        fam = registry.family(name)
        return fam, fam.layouts["diffusers"], cfg
    raise CheckpointError(config_path, "cannot tell the model family (no model_type or architecture)")


def build(family: str, preset_or_config: Any, *, device: str | torch.device | None = None) -> nn.Module:
    """A freshly initialized model of a family from a preset name or a config."""
    fam = registry.family(family)
    cfg = fam.presets[preset_or_config] if isinstance(preset_or_config, str) else preset_or_config
    with torch.device(device or "cpu"):
        return fam.model(cfg)


def load(source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
         quantize: str | None = None):
    """Load a checkpoint (local directory, file or hub id) into its family's model, in eval mode. A CTranslate2
    Whisper folder (model.bin, tokenizer.json, config.json, as faster-whisper's) loads too (weights/ctranslate2.py).

    dtype: floating-point weights are cast to it (None keeps the stored dtype); device defaults to CPU.
    quantize: "int8" or "int4" turns the model's linear layers into weight-only quantized ones for fast CPU decoding
    (`polymodal.nn.quant`, docs/quantization.md); a GGUF file's Q4_0 / Q4_1 tensors keep their own quants. None (the
    default): the float weights, the exact path parity is checked on.
    Where it came from, its layout and generation config are in `pm.record(model)`. Hosted models
    ("openai:gpt-4o", ...) are no checkpoints: a ValueError says where they go instead."""
    if isinstance(source, str) and ":" in source:
        from polymodal.providers import is_provider_spec

        if is_provider_spec(source):
            raise ValueError(f"{source!r} is a hosted model, and pm.load loads checkpoints only: chat with it "
                             f"through pm.pipeline('text-generation', model={source!r}) (or polymodal.providers."
                             f"load_provider({source!r})), or serve it with `polymodal serve --model {source}`")
    if quant.check_mode(quantize) and torch.device(device or "cpu").type != "cpu":
        raise ValueError(f"quantize={quantize!r} is a CPU path (its kernels are PyTorch's CPU ones); on "
                         f"{device} load the float weights, e.g. dtype=torch.bfloat16")
    path = resolve(source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, quantize)
    if not path.is_dir():
        raise CheckpointError(path, "expected a checkpoint directory (config.json + weights)")
    from polymodal.weights.ctranslate2 import is_ctranslate2_dir, load_ctranslate2

    if is_ctranslate2_dir(path):  # a CTranslate2 (faster-whisper) Whisper folder: model.bin + tokenizer.json
        model = load_ctranslate2(path, dtype, device)
        if quantize:
            quant.quantize_model(model, quantize)
        return model
    if (path / "model_index.json").exists():  # a diffusers pipeline folder: its components, composed
        if quantize:
            raise ValueError("quantize= applies to language models; a diffusion pipeline folder loads in float")
        from polymodal.pipelines.diffusion import load_pipeline

        return load_pipeline(path, dtype, device)
    fam, layout, raw = detect(path)
    ckpt = open_checkpoint(path, layout.weights_stem)
    model = _build_and_fill(fam, layout, raw, ckpt, dtype, device, path, path / layout.config_file)
    if quantize:
        quant.quantize_model(model, quantize)
    rec = record(model)
    rec.source = path  # pipelines find the processor and tokenizer files beside the weights
    generation_config = path / "generation_config.json"
    if generation_config.exists() or generation_config.is_symlink():
        rec.generation_config = read_json(generation_config)
    return model


def read_config(layout: registry.Layout, raw: dict, shapes: dict[str, tuple[int, ...]], where: Any) -> Any:
    """The layout's config from a config file's JSON, checked field by field (`polymodal.config.check`).
    Raises CheckpointError naming `where` (the config file) and, for a bad value, the field."""
    try:
        cfg = layout.read_config(raw, shapes)
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(where, f"malformed config: {e}") from None
    except CheckpointError:
        raise
    # a family's reader that meets JSON of an unexpected shape (a list where an object belongs, a string where it
    # does arithmetic) fails inside Python; the file is what is wrong
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        raise CheckpointError(where, f"unsupported or malformed config ({type(e).__name__}: {_clip(e)})") from None
    return cfg


def build_meta(fam: registry.Family, cfg: Any, where: Any = None) -> nn.Module:
    """`fam`'s model for `cfg` on the meta device (no memory for weights), under `_Budget`: a config describing
    a model larger than any real one is refused (CheckpointError naming `where` and the sizes) instead of built."""
    try:
        with torch.device("meta"), _QuickMeta(), _Budget():
            return fam.model(cfg)
    except _TooLarge as e:
        raise CheckpointError(where, f"the config describes {e.what}, more than any real model "
                                     f"({_culprits(cfg, e.shape)}); polymodal refuses to build it") from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # e.g. an activation or rope type not supported
        raise CheckpointError(where, f"cannot build a model from this config ({_clip(e)})") from None


def _build_and_fill(fam, layout, raw: dict, ckpt, dtype, device, where, config_where) -> nn.Module:
    cfg = read_config(layout, raw, ckpt.shapes, config_where)
    model = build_meta(fam, cfg, config_where)
    load_weights(model, ckpt, layout.key_map(cfg), dtype=dtype, device=device, where=where)
    record(model).layout = layout.name
    return model.eval()


def _clip(e: BaseException, limit: int = 300) -> str:
    text = str(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _TooLarge(Exception):
    def __init__(self, what: str, shape: tuple[int, ...] = ()):
        self.what, self.shape = what, shape


class _Budget(torch.overrides.TorchFunctionMode):
    """Counts the tensors (and their values) that building a model creates, and stops the build with `_TooLarge`
    once either passes what any real model has; a tensor's size is checked before it is created, so sizes that
    would overflow torch's 64-bit arithmetic never reach it. On the meta device nothing is allocated either way."""

    MAX_VALUES = 2**41  # ~2.2e12: the largest released models hold ~1-2e12 parameters
    MAX_TENSORS = 2**16  # the largest have ~5e4 (DeepSeek-V3: 61 layers x 256 experts x 3 matrices)
    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})

    def __init__(self):
        super().__init__()
        self.values = self.tensors = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            shape = _requested_shape(args, kwargs)
            if shape is not None and math.prod(shape) > self.MAX_VALUES:
                raise _TooLarge(f"a tensor of shape {list(shape)} ({_count(math.prod(shape))} values)", shape)
        out = func(*args, **kwargs)
        if func in self.FACTORIES and isinstance(out, torch.Tensor):
            self.values += out.numel()
            self.tensors += 1
            if self.values > self.MAX_VALUES:
                raise _TooLarge(f"over {_count(self.MAX_VALUES)} values", tuple(out.shape))
            if self.tensors > self.MAX_TENSORS:
                raise _TooLarge(f"over {self.MAX_TENSORS} tensors")
        return out


def _requested_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The size a factory call asks for: `empty(2, 3)`, `empty((2, 3))`, `full((2, 3), 0.0)`, `empty(size=...)`."""
    size = kwargs.get("size", args[0] if args else None)
    if isinstance(size, int):
        size = tuple(a for a in args if isinstance(a, int))
    if isinstance(size, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in size):
        return tuple(max(int(d), 0) for d in size)
    return None


def _count(n: int) -> str:
    return f"{n:.2e}".replace("e+", "e")


def _culprits(cfg: Any, shape: tuple[int, ...]) -> str:
    """The config fields behind a refused size: those whose values are dimensions of the tensor that crossed the
    budget, else the largest sizes and the layer counts."""
    found: dict[str, int] = {}

    def walk(c: Any, prefix: str) -> None:
        for f in dataclasses.fields(c):
            v = getattr(c, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            elif isinstance(v, int) and not isinstance(v, bool) and not f.name.endswith("_token_id"):
                found[prefix + f.name] = v

    walk(cfg, "")
    named = [k for k, v in found.items() if v > 1 and v in shape]
    if not named:
        layers = [k for k in found if k.rsplit(".", 1)[-1] in LAYER_COUNTS]
        named = sorted((k for k in found if k not in layers), key=lambda k: -found[k])[:3] + layers
    return ", ".join(f"{k}={found[k]}" for k in named) or "see its sizes"


class _QuickMeta(torch.overrides.TorchFunctionMode):
    """Meta-device building and planning without torch's Python meta kernels for the two ops every decoder load
    runs there: `normal_` (nn.Embedding's init; a meta tensor has no values to fill) and `cat` (key maps fusing
    q, k, v; the shape is a sum). The first call of such a kernel imports torch._dynamo: ~2 s of every load."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_ or func is torch.Tensor.normal_:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        if func is torch.cat and set(kwargs) <= {"tensors", "dim"}:
            out = _meta_cat(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _meta_cat(tensors, dim: int = 0) -> torch.Tensor | None:
    """torch.cat of meta tensors of one dtype and matching shapes; None (torch decides) for anything else."""
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return None
    first = tensors[0]
    if first.dim() == 0 or not -first.dim() <= dim < first.dim():
        return None
    dim %= first.dim()
    rest = [s for i, s in enumerate(first.shape) if i != dim]
    for t in tensors:
        if t.dtype != first.dtype or t.dim() != first.dim() or [s for i, s in enumerate(t.shape) if i != dim] != rest:
            return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _load_gguf(path: Path, dtype, device, quantize: str | None = None) -> nn.Module:
    """A llama.cpp GGUF file: config, dequantized weights (transformers' names) and tokenizer come from the file
    (`polymodal.weights.gguf`); the model is then built like a transformers checkpoint of its family. Weights
    come out in fp32 unless `dtype` says otherwise; saving writes the transformers layout."""
    from polymodal.weights.gguf import read_gguf

    content = read_gguf(path)
    model_type = content.config.get("model_type")
    fam = registry.family(registry.MODEL_TYPES[model_type])
    layout = fam.layouts["transformers"]
    model = _build_and_fill(fam, layout, content.config, content.tensors, dtype, device, path, path)
    if quantize:
        quant.quantize_model(model, quantize, blocks=_int4_blocks(content.tensors, layout.key_map(model.config)))
    rec = record(model)
    rec.source = None  # no tokenizer files beside it: the tokenizer travels with the model
    rec.gguf = path
    if content.tokenizer is not None:
        from polymodal.processing.text import TextTokenizer

        rec.tokenizer = TextTokenizer.from_tokenizer(content.tokenizer, content.tokenizer_config)
    return model


def _int4_blocks(tensors, key_map: KeyMap):
    """Model weight name -> the GGUF file's own int4 quants (q, scale, zero) for it, or None: a weight made of Q4_0 /
    Q4_1 tensors by a rename or by stacking their rows (a fused q/k/v). The key map's own step decides which rows go
    where: it is run on probes holding each source row's index, and only a plain stacking of rows is accepted."""
    steps, _ = key_map.plan_load(list(tensors))
    by_name = {step.dst[0]: step for step in steps if len(step.dst) == 1}

    def blocks(name: str):
        step = by_name.get(name)
        parts = [tensors.int4_blocks(k) for k in step.src] if step else [None]
        if any(p is None for p in parts):
            return None
        rows = [p[0].shape[0] for p in parts]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        probes = [torch.arange(s, s + n, dtype=torch.float32)[:, None].expand(n, p[0].shape[1])
                  for s, n, p in zip(starts, rows, parts)]
        (out,) = step.fn(probes)
        if out.dim() != 2 or not torch.equal(out, torch.arange(sum(rows), dtype=torch.float32)[:, None].expand_as(out)):
            return None
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    return blocks


def load_weights(
    model: nn.Module,
    ckpt,
    key_map: KeyMap,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    where: Any = None,
) -> nn.Module:
    """Fill `model` (typically on the meta device) from a checkpoint mapping, strictly."""
    device = torch.device(device or "cpu")
    steps, _dropped = key_map.plan_load(list(ckpt))
    expected = model.state_dict(keep_vars=True)
    # Tied parameters appear under several names; the checkpoint needs to provide any one of them.
    aliases: dict[int, list[str]] = {}
    for k, t in expected.items():
        aliases.setdefault(id(t), []).append(k)

    meta = ckpt.meta() if hasattr(ckpt, "meta") else {k: v.to("meta") for k, v in ckpt.items()}
    produced: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    unbuildable: list[str] = []
    unbuilt: set[str] = set()
    twice: list[str] = []
    for step in steps:
        try:
            with _QuickMeta():
                outs = step.fn([meta[k] for k in step.src])
        except RuntimeError:  # e.g. q, k, v of disagreeing shapes cannot be fused into one qkv
            parts = ", ".join(f"{k} {list(meta[k].shape)}" for k in step.src)
            unbuildable.append(f"{', '.join(step.dst)}: cannot be built from {parts}")
            unbuilt.update(step.dst)
            continue
        for name, t in zip(step.dst, outs):
            if name in produced:  # e.g. `model.norm.weight` renamed onto a `norm.weight` the file also holds
                twice.append(f"{name} (from {', '.join(produced[name][1])} and from {', '.join(step.src)})")
            produced[name] = (tuple(t.shape), step.src)
    covered = {a for k in produced if k in expected for a in aliases[id(expected[k])]}
    missing = [k for k in expected if k not in covered and k not in unbuilt]
    if missing:  # name the checkpoint's key too: that is what a user can look for in the file
        ckpt_names = {s.src[0]: s.dst for s in key_map.plan_save(missing)}
        missing = [k if ckpt_names.get(k, (k,)) == (k,) else f"{k} (checkpoint: {', '.join(ckpt_names[k])})"
                   for k in missing]
    unexpected = [f"{k} (from {', '.join(src)})" if src != (k,) else k for k, (_, src) in produced.items()
                  if k not in expected]
    mismatched = unbuildable + [
        f"{k}: checkpoint {list(shape)} vs model {list(expected[k].shape)}"
        for k, (shape, _) in produced.items()
        if k in expected and tuple(expected[k].shape) != shape
    ]
    if missing or unexpected or mismatched or twice:
        raise CheckpointError(where, _strict_report(missing, unexpected, mismatched, twice))

    # a model may name parts that stay in fp32 when its weights come in fp16 (BLIP-2's Q-Former): `keep_in_fp32`, a
    # tuple of name prefixes. As transformers' `_keep_in_fp32_modules`, fp16 only: its range is what they need,
    # and bf16 has fp32's
    keep = tuple(getattr(model, "keep_in_fp32", ()))
    done: set[int] = set()
    for step in steps:
        for name, t in zip(step.dst, step.fn([ckpt[k] for k in step.src])):
            target = expected[name]
            if id(target) in done:
                continue
            if t.is_floating_point():
                wanted = dtype or t.dtype
                if keep and wanted == torch.float16 and name.startswith(keep):
                    wanted = torch.float32
                t = t.to(device=device, dtype=wanted)
            else:
                t = t.to(device=device)
            new = nn.Parameter(t.contiguous(), requires_grad=target.requires_grad) if isinstance(
                target, nn.Parameter
            ) else t.contiguous()
            for alias in aliases[id(target)]:
                _assign(model, alias, new)
            done.add(id(target))
    for m in model.modules():
        if hasattr(m, "materialize"):
            m.materialize(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(where, f"internal error: tensors left unmaterialized: {left[:10]}")
    return model


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = tensor
    else:
        module._buffers[leaf] = tensor


def _strict_report(missing: list[str], unexpected: list[str], mismatched: list[str], twice: list[str]) -> str:
    parts = ["checkpoint does not match the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched),
                         ("given twice", twice)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {title}: {shown}")
    return "; ".join(parts)


def save(model: nn.Module, directory: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write the model in the layout of its record (`pm.record(model).layout`: the one it was loaded from, or
    chosen), its family's default otherwise, so that the reference library loads it back. Files are written to
    temporary names and renamed into place."""
    from safetensors.torch import save_file

    if any(isinstance(m, quant.QuantLinear) for m in model.modules()):
        raise ValueError("a model loaded with quantize= cannot be saved: its layers hold packed int8/int4 weights that "
                         "no checkpoint layout names; save the model loaded without quantize=")
    fam = registry.family_of(model)
    chosen = record(model).layout
    if chosen is not None and chosen not in fam.layouts:
        raise ValueError(f"pm.record(model).layout is {chosen!r}, which is not a layout of the {fam.name} family; "
                         f"set it to one of {sorted(fam.layouts)}, or to None for the default "
                         f"({fam.default_layout.name!r})")
    layout = fam.layouts[chosen] if chosen is not None else fam.default_layout
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, kept = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():  # a tied weight (lm_head = embedding) is saved once,
        if id(t) not in kept:  # under its first name, as the reference libraries do
            kept.add(id(t))
            state[name] = t.detach()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for step in layout.key_map(model.config).plan_save(list(state)):
        for name, t in zip(step.dst, step.fn([state[k] for k in step.src])):
            t = t.detach().cpu().contiguous()
            if t.data_ptr() in seen and t.numel():  # tied or shared storage: safetensors wants distinct buffers
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
    _atomic_write_text(directory / layout.config_file, json.dumps(layout.write_config(model.config), indent=2))
    shards = _shard(tensors, max_shard_bytes)
    stem = layout.weights_stem
    if len(shards) == 1:
        _atomic(directory / f"{stem}.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
        return directory
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic(directory / fname, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write_text(directory / f"{stem}.safetensors.index.json", json.dumps(index, indent=2))
    return directory


def _shard(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        Path(tmp).write_text(text + "\n", encoding="utf-8")

    _atomic(path, write)
