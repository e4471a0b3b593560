"""The one strict loader: `load(source)` and `save(model, directory)`.

The model is built on the meta device, the key map is checked on meta tensors (every name and shape, before
reading any data), then each tensor is read and moved into place one at a time: no second copy of the
weights, and no half-loaded model. Missing, unexpected and mis-shaped tensors are reported together in one
error that names them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal import registry
from polymodal.weights.checkpoint import CheckpointError, open_checkpoint
from polymodal.weights.keymap import KeyMap

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
        return fam, fam.layouts["open_clip"], _read_json(directory / "open_clip_config.json")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(directory, "no config.json (or open_clip_config.json): cannot tell the model family")
    cfg = _read_json(config_path)
    if "model_type" in cfg:
        name = registry.MODEL_TYPES.get(cfg["model_type"])
        if name is None:
            raise CheckpointError(
                config_path,
                f"unknown model_type {cfg['model_type']!r}; supported: {sorted(registry.MODEL_TYPES)}",
            )
        fam = registry.family(name)
        native = str(cfg["model_type"]).startswith("polymodal-")
        layout = fam.layouts["polymodal" if native else "transformers"]
        return fam, layout, cfg
    if "architecture" in cfg:
        arch = str(cfg["architecture"])
        for prefix, name in registry.TIMM_ARCHITECTURES.items():
            if arch.startswith(prefix):
                fam = registry.family(name)
                if "timm" in fam.layouts:
                    return fam, fam.layouts["timm"], cfg
        raise CheckpointError(config_path, f"unsupported timm architecture {arch!r}")
    if "_class_name" in cfg:
        raise CheckpointError(config_path, f"diffusers model {cfg['_class_name']!r} is not supported yet")
    raise CheckpointError(config_path, "cannot tell the model family (no model_type or architecture)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def build(family: str, preset_or_config: Any, *, device: str | torch.device | None = None) -> nn.Module:
    """A freshly initialized model of a family from a preset name or a config."""
    fam = registry.family(family)
    cfg = fam.presets[preset_or_config] if isinstance(preset_or_config, str) else preset_or_config
    with torch.device(device or "cpu"):
        return fam.model(cfg)


def load(source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a checkpoint (local directory, file or hub id) into its family's model, in eval mode.

    dtype: floating-point weights are cast to it (None keeps the stored dtype); device defaults to CPU.
    "openai:gpt-4o", "anthropic:...", "gemini:..." / "google:...": a hosted chat model (polymodal.providers)."""
    if isinstance(source, str) and ":" in source:
        from polymodal.providers import is_provider_spec, load_provider

        if is_provider_spec(source):
            return load_provider(source)
    path = resolve(source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device)
    if not path.is_dir():
        raise CheckpointError(path, "expected a checkpoint directory (config.json + weights)")
    fam, layout, raw = detect(path)
    ckpt = open_checkpoint(path, layout.weights_stem)
    model = _build_and_fill(fam, layout, raw, ckpt, dtype, device, path, path / layout.config_file)
    model.pm_source = path  # pipelines find the processor and tokenizer files beside the weights
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        model.pm_generation_config = _read_json(generation_config)
    return model


def _build_and_fill(fam, layout, raw: dict, ckpt, dtype, device, where, config_where) -> nn.Module:
    try:
        cfg = layout.read_config(raw, ckpt.shapes)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(config_where, f"unsupported or malformed config ({e})") from None
    with torch.device("meta"), _QuickMeta():
        model = fam.model(cfg)
    load_weights(model, ckpt, layout.key_map(cfg), dtype=dtype, device=device, where=where)
    model.pm_layout = layout.name
    return model.eval()


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


def _load_gguf(path: Path, dtype, device) -> nn.Module:
    """A llama.cpp GGUF file: config, dequantized weights (transformers' names) and tokenizer come from the file
    (`polymodal.weights.gguf`); the model is then built like a transformers checkpoint of its family. Weights
    come out in fp32 unless `dtype` says otherwise; saving writes the transformers layout."""
    from polymodal.weights.gguf import read_gguf

    content = read_gguf(path)
    model_type = content.config.get("model_type")
    fam = registry.family(registry.MODEL_TYPES[model_type])
    model = _build_and_fill(fam, fam.layouts["transformers"], content.config, content.tensors, dtype, device, path,
                            path)
    model.pm_source = None  # no tokenizer files beside it: the tokenizer travels with the model
    model.pm_gguf = path
    if content.tokenizer is not None:
        from polymodal.processing.text import TextTokenizer

        model.pm_tokenizer = TextTokenizer.from_tokenizer(content.tokenizer, content.tokenizer_config)
    return model


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
    if missing or unexpected or mismatched:
        raise CheckpointError(where, _strict_report(missing, unexpected, mismatched))

    done: set[int] = set()
    for step in steps:
        for name, t in zip(step.dst, step.fn([ckpt[k] for k in step.src])):
            target = expected[name]
            if id(target) in done:
                continue
            if t.is_floating_point():
                t = t.to(device=device, dtype=dtype or t.dtype)
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


def _strict_report(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = ["checkpoint does not match the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {title}: {shown}")
    return "; ".join(parts)


def save(model: nn.Module, directory: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write the model in the layout it was loaded from (its family's default otherwise), so that the
    reference library loads it back. Files are written to temporary names and renamed into place."""
    from safetensors.torch import save_file

    fam = registry.family_of(model)
    layout = fam.layouts.get(getattr(model, "pm_layout", ""), fam.default_layout)
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
