"""Config helpers: family configs are frozen dataclasses whose fields carry the Hugging Face `config.json`
names (STYLE.md, point 7), so reading a config file is filtering its keys.

Every config read from a file passes one validation step, `check`, before a model is built from it. It is driven
by the dataclass's field types (`int`, `float`, `bool`, `str`, `Literal[...]`, `X | None`, `tuple[int, ...]`, a
nested config) and a few shared rules keyed by the Hugging Face field names:

* a size or count is an integer of at least 1 (at least 0 where the field's default is 0, as `num_labels`, or where
  the field declares `metadata={"min": 0}`), and at most `MAX_SIZE`;
* a layer count (`num_hidden_layers`, `num_layers`, `num_decoder_layers`, `layers`, `depths`, summed over stages)
  is at most `MAX_LAYERS`: building a model of ten million layers on the meta device would take hours;
* a token id (`*_token_id`) is -1 (Hugging Face's "none" in some old configs) or an index into `vocab_size`;
* `num_key_value_heads` divides `num_attention_heads`;
* floats are finite; `*_eps` is not negative and `rope_theta` is positive;
* `hidden_act` / `activation_function` name a known activation, and `rope_scaling` holds the keys its
  `rope_type` needs (what `polymodal.nn.RoPE` reads).

A value that breaks one raises `ConfigError` naming the field; the loader turns it into a `CheckpointError` that
names the file too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

MAX_SIZE = 2**31 - 1  # widths, counts, vocabularies: the largest real ones are ~2.6e5 (Gemma's vocabulary)
MAX_LAYERS = 1024  # the deepest released transformers have ~130 layers (Llama 3.1 405B: 126)

LAYER_COUNTS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "layers", "depths")
_ACTIVATION_FIELDS = ("hidden_act", "activation_function")
# rope_scaling: the keys each `rope_type` needs (Hugging Face's format; polymodal.nn.RoPE reads them), and the
# integers among them. Kinds not listed are left to RoPE, which names the ones it supports.
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ROPE_INTEGERS = ("original_max_position_embeddings",)


class ConfigError(ValueError):
    """A config value of the wrong type or out of range: `field` (dotted for nested configs) of class `owner`."""

    def __init__(self, owner: str, field: str, reason: str):
        self.owner, self.field, self.reason = owner, field, reason
        super().__init__(f"field {field!r} of {owner}: {reason}")

    def within(self, owner: str, name: str) -> ConfigError:
        """The same error seen from the config that holds this one as its field `name`."""
        return ConfigError(owner, f"{name}.{self.field}", self.reason)


def from_dict(cls: type[T], data: dict[str, Any], **overrides: Any) -> T:
    """Build `cls` from the keys of `data` that are fields of it (lists become tuples, nested configs are built
    from nested dicts); `overrides` win. Every value is checked first (`check`): a bad one raises `ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(cls.__name__, "(the whole config)", f"expected a JSON object, got {show(data)}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints.get(f.name)
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            try:
                value = from_dict(kind, value)
            except ConfigError as e:
                raise e.within(cls.__name__, f.name) from None
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    kwargs.update(overrides)
    check(cls, kwargs)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass's fields as plain JSON-ready values (nested configs become nested dicts)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def validate(cfg: Any) -> None:
    """`check` a built config (and the configs nested in it): for configs that a reader built directly."""
    check(type(cfg), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def check(cls: type, values: dict[str, Any]) -> None:
    """Check `values` (some or all fields of the config dataclass `cls`, by name) against the fields' types and
    the shared rules (see the module docstring); fields not given count with their defaults. Raises ConfigError."""
    owner = cls.__name__
    fields = _fields(cls)
    for name, value in values.items():
        if name in fields:
            kind, least = fields[name]
            _check(owner, name, value, kind, least)
    merged = {name: values.get(name, default) for name, default in _defaults(cls).items()}
    _check_together(owner, merged)


def show(value: Any, limit: int = 60) -> str:
    """A short repr for error messages: a malformed file may hold a megabyte string or a 10**5-deep list."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 64:
        return f"{'-' if value < 0 else ''}~2**{abs(value).bit_length() - 1}"
    if isinstance(value, (list, tuple, dict)):
        items = list(value.values() if isinstance(value, dict) else value)
        if len(items) > 8 or any(isinstance(v, (list, tuple, dict)) for v in items):
            kind, n = "JSON object" if isinstance(value, dict) else "list", len(items)
            return f"a {kind} of {n} item{'s' if n != 1 else ''}"
        if isinstance(value, dict):
            text = "{" + ", ".join(f"{show(k)}: {show(v)}" for k, v in value.items()) + "}"
        else:
            text = "[" + ", ".join(show(v) for v in items) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- the checks


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, int]]:
    """name -> (type, least allowed size or count)."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        zero = f.default == 0 and type(f.default) is int
        out[f.name] = (hints.get(f.name, Any), f.metadata.get("min", 0 if zero else 1))
    return out


@functools.cache
def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}


def _describe(kind: Any) -> str:
    if kind is type(None):
        return "null"
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin is tuple:
        item = typing.get_args(kind)[0]
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(item, _describe(item))}"
    if dataclasses.is_dataclass(kind):
        return f"a JSON object ({kind.__name__})"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}
    return names.get(origin or kind, str(kind))


def _is(value: Any, kind: Any) -> bool:
    """Whether `value` has the shape of `kind` (ranges aside)."""
    origin = typing.get_origin(kind)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (tuple, list))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(kind))
    if dataclasses.is_dataclass(kind):
        return isinstance(value, kind)
    return True  # a type no rule covers


def _check(owner: str, name: str, value: Any, kind: Any, least: int) -> None:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        arms = typing.get_args(kind)
        for arm in arms:
            if _is(value, arm):
                return _check(owner, name, value, arm, least)
        raise ConfigError(owner, name, f"expected {' or '.join(_describe(a) for a in arms)}, got {show(value)}")
    if not _is(value, kind):
        raise ConfigError(owner, name, f"expected {_describe(kind)}, got {show(value)}")
    if kind is int:
        _check_int(owner, name, name, value, least)
    elif kind is float:
        _check_float(owner, name, value)
    elif kind is str and name in _ACTIVATION_FIELDS:
        from polymodal.nn.mlp import activation

        try:
            activation(value)
        except ValueError as e:
            raise ConfigError(owner, name, str(e)) from None
    elif name == "rope_scaling" and isinstance(value, dict):
        _check_rope_scaling(owner, name, value)
    elif origin is tuple:
        item = typing.get_args(kind)[0]
        for i, v in enumerate(value):
            if not _is(v, item):
                raise ConfigError(owner, f"{name}[{i}]", f"expected {_describe(item)}, got {show(v)}")
            if item is int:
                _check_int(owner, f"{name}[{i}]", name, v, least)
        if name in LAYER_COUNTS and item is int and sum(value) > MAX_LAYERS:
            raise ConfigError(owner, name, f"{sum(value)} layers in all; polymodal builds at most {MAX_LAYERS} "
                                           "(the deepest released models have ~130)")
    elif dataclasses.is_dataclass(kind):
        try:
            validate(value)
        except ConfigError as e:
            raise e.within(owner, name) from None


def _check_int(owner: str, field: str, name: str, value: int, least: int) -> None:
    """`field` is what the message names (`depths[2]`); `name` the field whose rules apply (`depths`)."""
    if name.endswith("_token_id"):
        least = -1
    most = MAX_LAYERS if name in LAYER_COUNTS else MAX_SIZE
    if value < least:
        what = "a token id" if name.endswith("_token_id") else "a size or count"
        raise ConfigError(owner, field, f"{show(value)} is out of range: {what} is at least {least}")
    if value > most:
        beyond = "layers; polymodal builds at most" if most == MAX_LAYERS else "is beyond any real model; at most"
        raise ConfigError(owner, field, f"{show(value)} {beyond} {most}")


def _check_float(owner: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(owner, name, f"{show(value)} is not a finite number")
    if name.endswith(("_eps", "_epsilon")) and value < 0:
        raise ConfigError(owner, name, f"{show(value)} is out of range: an epsilon is not negative")
    if name == "rope_theta" and value <= 0:
        raise ConfigError(owner, name, f"{show(value)} is out of range: the rotary base is positive")


def _check_rope_scaling(owner: str, name: str, value: dict) -> None:
    kind = value.get("rope_type", value.get("type", "default"))
    if not isinstance(kind, str):
        raise ConfigError(owner, f"{name}.rope_type", f"expected a string, got {show(kind)}")
    for key in _ROPE_KEYS.get(kind, ()):
        if key not in value:
            raise ConfigError(owner, name, f"lacks {key!r}, which rope_type {kind!r} needs")
        v = value[key]
        integer = key in _ROPE_INTEGERS
        if not _is(v, int if integer else float) or not math.isfinite(v) or v <= 0:
            what = "a positive integer" if integer else "a positive number"
            raise ConfigError(owner, f"{name}.{key}", f"expected {what}, got {show(v)}")
    if kind == "llama3" and value["high_freq_factor"] <= value["low_freq_factor"]:
        raise ConfigError(owner, name, "high_freq_factor must be larger than low_freq_factor (their difference "
                                       "divides the blend between them)")


def _check_together(owner: str, values: dict[str, Any]) -> None:
    """The rules between fields, on values already of the right types (or None)."""
    vocab = values.get("vocab_size")
    if isinstance(vocab, int):
        for name, value in values.items():
            if not name.endswith("_token_id"):
                continue
            for token in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(token, int) and token >= vocab:
                    raise ConfigError(owner, name, f"{token} is not a token of the {vocab}-entry vocabulary "
                                                   "(vocab_size)")
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ConfigError(owner, "num_key_value_heads", f"{kv} does not divide num_attention_heads={heads}: each "
                                                        "key/value head serves a whole group of query heads")
