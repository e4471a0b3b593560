"""Typed training configs and `--set key=value` overrides.

Every recipe's config is a frozen dataclass that extends `TrainConfig`, so every recipe accepts the same loop
settings (max_steps, batch_size, lr, seed, log_every, save_every, ...) next to its own fields. Overrides are
parsed against the field's declared type; a wrong key or value raises `ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal


class ConfigError(ValueError):
    """A bad recipe setting: unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings. `batch_size` is the global batch of one optimizer step (all processes, all
    accumulation micro-steps together), so a run means the same thing on 1 or N processes."""

    max_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 3  # checkpoints kept on disk; the newest complete one is never deleted
    warmup_steps: int | None = None  # None: derived from max_steps (the `warmup` property)
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.01
    grad_accum: int = 1
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a grad scaler (CUDA)
    compile: bool = False  # torch.compile the model's forward (in place: checkpoint keys stay the same)
    checkpointing: tuple[str, ...] = ()  # activation checkpointing of these submodules (a ModuleList: each child)
    freeze: tuple[str, ...] = ()  # parameter-name prefixes that are not trained
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with several processes: DDP, or FSDP2 (fully_shard)

    # the warm-up a recipe was tuned with at its default max_steps (not a setting: `warmup_steps` sets it)
    default_warmup: ClassVar[int] = 0
    WARMUP_FRACTION: ClassVar[float] = 0.1  # derived warm-up: at most this share of the run

    @property
    def warmup(self) -> int:
        """The warm-up steps the schedule uses: `warmup_steps` when set, else the recipe's `default_warmup` capped
        at 10% of `max_steps`, so that a short run (`max_steps=200` of a recipe tuned with 200 warm-up steps) is
        not all warm-up. At every recipe's default `max_steps` the cap changes nothing."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.default_warmup, int(self.WARMUP_FRACTION * self.max_steps))

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "log_every", "save_every", "keep_last", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def _parse(key: str, text: str, tp) -> object:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):  # `int | None`
        if text.lower() in ("", "none", "auto"):
            return None
        (inner,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return _parse(key, text, inner)
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {text!r}")
        return text
    if origin is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false; got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key} must be {'an integer' if tp is int else 'a number'}; got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"{key} cannot be set from the command line")  # a field type this parser does not know


def apply_overrides(config, overrides: list[str]):
    """Return `config` with `["key=value", ...]` applied, each value parsed as its field's type."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}; this recipe has: {', '.join(sorted(fields))}")
        changes[key] = _parse(key, text.strip(), hints[key])
    return dataclasses.replace(config, **changes)
