"""Config helpers: family configs are frozen dataclasses whose fields carry the Hugging Face `config.json`
names (STYLE.md, point 7), so reading a config file is filtering its keys."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], **overrides: Any) -> T:
    """Build `cls` from the keys of `data` that are fields of it (lists become tuples, nested configs are built
    from nested dicts); `overrides` win."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints.get(f.name)
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            value = from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass's fields as plain JSON-ready values (nested configs become nested dicts)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
