"""Config helpers: family configs are frozen dataclasses whose fields carry the Hugging Face `config.json`
names (STYLE.md, point 7), so reading a config file is filtering its keys."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], **overrides: Any) -> T:
    """Build `cls` from the keys of `data` that are fields of it (lists become tuples); `overrides` win."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass's fields as plain JSON-ready values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
