"""The models that run on this machine without a download: the embedded chat model, what polymodal's cache holds
(the demo's trained CLIP, recipe exports copied there) and what the Hugging Face hub cache already has.

    polymodal models            # these first, then every family with its presets and hub ids
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_DEPTH = 4  # how deep under a cache folder a checkpoint directory is looked for
MAX_ENTRIES = 2_000  # directories visited per cache folder: a huge or looping cache is cut short, not walked whole


def cache_dir() -> Path:
    """polymodal's own cache ($POLYMODAL_CACHE, else ~/.cache/polymodal): the demo's trained checkpoints live here."""
    return Path(os.environ.get("POLYMODAL_CACHE") or Path.home() / ".cache" / "polymodal")


def local_models() -> list[dict]:
    """Every model that loads here offline -> [{"source", "family", "what"}], `source` being what to pass to
    `--model` / `pm.load`."""
    rows = []
    try:
        from polymodal.pipelines.text import DEFAULT_CHAT_MODEL, default_chat_model

        rows.append({"source": str(default_chat_model()), "family": "llama",
                     "what": f"the default chat model: {DEFAULT_CHAT_MODEL}; used when --model is not given"})
    except FileNotFoundError:
        pass
    for directory in _checkpoints(cache_dir()):
        family = _family(directory)
        if family is not None:
            rows.append({"source": str(directory), "family": family, "what": "in polymodal's cache"})
    rows.extend(_hub_cache())
    return rows


def _checkpoints(root: Path):
    """Directories under `root` (at most MAX_DEPTH deep, MAX_ENTRIES visited) that hold a config and weights."""
    if not root.is_dir():
        return
    todo, seen = [(root, 0)], 0
    while todo and seen < MAX_ENTRIES:
        directory, depth = todo.pop()
        seen += 1
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            continue
        if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
            yield directory
            continue
        if depth < MAX_DEPTH:
            todo.extend((c, depth + 1) for c in reversed(children))


def _family(directory: Path) -> str | None:
    from polymodal.weights.loader import detect

    try:
        return detect(directory)[0].name
    except Exception:  # not a checkpoint polymodal reads: left out of the list
        return None


def _hub_cache() -> list[dict]:
    """Hub repositories already downloaded (huggingface_hub's cache), which load offline by their id."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        family = _family(Path(snapshot.snapshot_path)) if snapshot is not None else None
        if family is not None:
            rows.append({"source": repo.repo_id, "family": family, "what": "downloaded (Hugging Face cache)"})
    return rows
