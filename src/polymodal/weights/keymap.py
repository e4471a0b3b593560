"""Declarative key maps between a checkpoint's tensor names and ours.

A family writes a short table of rules beside its model; one shared loader applies it in both directions
(loading and saving). Patterns name their variable parts: `{i}` matches one dotted component, `{rest*}`
matches any remainder. Keys that no rule matches keep their name.

    KeyMap([
        Drop("embeddings.position_ids"),                       # a buffer some old checkpoints carry
        Rename("vit.{rest*}", "{rest*}"),                      # prefix of *ForImageClassification
        Fuse(("blocks.{i}.q.weight", "blocks.{i}.k.weight", "blocks.{i}.v.weight"), "blocks.{i}.qkv.weight"),
        Transform("proj", "proj.weight", to_model=lambda t: t.T, from_model=lambda t: t.T),
    ])

Rules are tried in order; the first whose checkpoint pattern (loading) or model pattern (saving) matches
decides. A `Step` is one application: checkpoint names in, model names out, and a function on tensors.
Because the functions are plain torch ops, the loader first runs them on meta tensors to check every name
and shape before reading a byte.

A composite model mounts its parts' maps under prefixes (`Nest`, `KeyMap.nested`) and states only its own
tensors; each part's map runs whole, in both directions. LLaVA in transformers 4.x files:

    llama_map.nested("language_model.", "language_model.")        # language_model.model.X: LLaMA's model.X
    + clip_tower_map.nested("vision_tower.vision_model.", "vision_tower.")

A `Nest` claims every name under its prefixes, so more specific rules go before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

_PLACEHOLDER = re.compile(r"\{(\w+)(\*?)\}")


def _compile(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^.]+'})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def _fill(pattern: str, groups: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: groups[m.group(1)], pattern)


@dataclass(frozen=True)
class Step:
    """Tensors named `src` become tensors named `dst` through `fn` (list in, list out)."""

    src: tuple[str, ...]
    dst: tuple[str, ...]
    fn: Callable[[list[Tensor]], list[Tensor]] = field(default=lambda ts: ts, repr=False)


@dataclass(frozen=True)
class Rename:
    """One checkpoint tensor is one of ours under another name."""

    ckpt: str
    ours: str


@dataclass(frozen=True)
class Drop:
    """Checkpoint tensors that the model does not use (recomputed buffers, heads we do not build)."""

    ckpt: str


@dataclass(frozen=True)
class Transform:
    """One tensor under another name and a reversible change of layout (transpose, reshape, ...)."""

    ckpt: str
    ours: str
    to_model: Callable[[Tensor], Tensor]
    from_model: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Fuse:
    """Several checkpoint tensors concatenated along `dim` into one of ours (e.g. q, k, v -> qkv).

    Saving splits it again into `sizes` along `dim` (equal parts when sizes is None)."""

    ckpt: tuple[str, ...]
    ours: str
    dim: int = 0
    sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Nest:
    """Another key map mounted under prefixes: checkpoint names under `ckpt` are the inner map's checkpoint names,
    and the inner map's model names are ours under `ours`; the inner map runs whole, in both directions.

    `ckpt` is one prefix (`"vision_tower."`: the checkpoint's `vision_tower.X` is the inner map's `X`) or a table
    {checkpoint prefix: inner prefix}, for a part whose names a composite spreads over several prefixes:
    transformers 5.x LLaVA files hold LLaMA's `model.X` as `model.language_model.X` and its `lm_head.X` at the top,

        Nest({"model.language_model.": "model.", "lm_head.": "lm_head."}, "language_model.", llama_map)

    Loading, the longest checkpoint prefix that matches a name decides, so a table can also accept two spellings
    of one part (`{"vision_model.": "", "": ""}`); saving, the longest inner prefix that matches decides (the
    first listed among equal ones), and an inner name no prefix holds is an error."""

    ckpt: str | Mapping[str, str]
    ours: str
    inner: KeyMap

    def __post_init__(self):
        pairs = tuple({self.ckpt: ""}.items() if isinstance(self.ckpt, str) else dict(self.ckpt).items())
        if not pairs:
            raise ValueError("Nest needs at least one checkpoint prefix")
        object.__setattr__(self, "_pairs", pairs)

    def inner_name(self, key: str) -> str | None:
        """The inner map's checkpoint name for one of the composite's (None: not under this nest)."""
        hits = [(outer, inner) for outer, inner in self._pairs if key.startswith(outer)]
        if not hits:
            return None
        outer, inner = max(hits, key=lambda h: len(h[0]))
        return inner + key[len(outer) :]

    def outer_name(self, key: str) -> str:
        """The composite's checkpoint name for one of the inner map's."""
        hits = [(outer, inner) for outer, inner in self._pairs if key.startswith(inner)]
        if not hits:
            raise ValueError(f"the key map nested under {self.ours!r} writes {key!r}, which none of its checkpoint "
                             f"prefixes holds ({', '.join(repr(i) for _, i in self._pairs)}); add one to the Nest")
        outer, inner = max(hits, key=lambda h: len(h[1]))  # max keeps the first of equal ones
        return outer + key[len(inner) :]


Rule = Rename | Drop | Transform | Fuse | Nest


class KeyMap:
    """An ordered table of rules, applied by `plan_load` (checkpoint -> model) and `plan_save` (model ->
    checkpoint)."""

    def __init__(self, rules: Sequence[Rule] = ()):
        self.rules = list(rules)
        self._ckpt = [[_compile(p) for p in _ckpt_patterns(r)] for r in self.rules]
        self._ours = [_compile(r.ours) if not isinstance(r, (Drop, Nest)) else None for r in self.rules]

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules)

    def nested(self, ckpt: str | Mapping[str, str], ours: str) -> KeyMap:
        """This map mounted under prefixes, as the one rule of a new map (see `Nest`): checkpoint names under
        `ckpt` are this map's checkpoint names, and this map's model names are under `ours`."""
        return KeyMap([Nest(ckpt, ours, self)])

    def plan_load(self, ckpt_keys: Iterable[str]) -> tuple[list[Step], list[str]]:
        """-> (steps, dropped checkpoint keys). Parts of an incomplete Fuse pass through under their own
        names, so the strict check reports them."""
        steps: list[Step] = []
        dropped: list[str] = []
        groups: dict[tuple, dict[int, str]] = {}
        # rule index -> [{inner name: checkpoint name}]; a name a file spells twice (`vision_model.X` and `X`) goes
        # to a second table, so that both reach the model's name and the strict check names the two
        nests: dict[int, list[dict[str, str]]] = {}
        for key in ckpt_keys:
            for ri, (rule, patterns) in enumerate(zip(self.rules, self._ckpt)):
                if isinstance(rule, Nest):
                    if (inner := rule.inner_name(key)) is None:
                        continue
                    tables = nests.setdefault(ri, [])
                    table = next((t for t in tables if inner not in t), None)
                    if table is None:
                        tables.append(table := {})
                    table[inner] = key
                    break
                hit = next(((pi, m) for pi, p in enumerate(patterns) if (m := p.match(key))), None)
                if hit is None:
                    continue
                pi, m = hit
                g = m.groupdict()
                if isinstance(rule, Drop):
                    dropped.append(key)
                elif isinstance(rule, Rename):
                    steps.append(Step((key,), (_fill(rule.ours, g),)))
                elif isinstance(rule, Transform):
                    steps.append(Step((key,), (_fill(rule.ours, g),), lambda ts, f=rule.to_model: [f(ts[0])]))
                else:
                    groups.setdefault((ri, tuple(sorted(g.items()))), {})[pi] = key
                break
            else:
                steps.append(Step((key,), (key,)))
        for (ri, g), parts in groups.items():
            rule = self.rules[ri]
            if len(parts) == len(rule.ckpt):
                src = tuple(parts[i] for i in range(len(rule.ckpt)))
                steps.append(Step(src, (_fill(rule.ours, dict(g)),), lambda ts, d=rule.dim: [torch.cat(ts, d)]))
            else:
                steps.extend(Step((k,), (k,)) for k in parts.values())
        for ri, tables in nests.items():
            rule = self.rules[ri]
            for claimed in tables:
                inner_steps, inner_dropped = rule.inner.plan_load(list(claimed))
                steps += [Step(tuple(claimed[k] for k in s.src), tuple(rule.ours + k for k in s.dst), s.fn)
                          for s in inner_steps]
                dropped += [claimed[k] for k in inner_dropped]
        return steps, dropped

    def plan_save(self, model_keys: Iterable[str]) -> list[Step]:
        """Steps from the model's names to the checkpoint's."""
        steps: list[Step] = []
        nests: dict[int, list[str]] = {}  # rule index -> the inner map's model names
        for key in model_keys:
            for ri, (rule, pattern) in enumerate(zip(self.rules, self._ours)):
                if isinstance(rule, Nest):
                    if not key.startswith(rule.ours):
                        continue
                    nests.setdefault(ri, []).append(key[len(rule.ours) :])
                    break
                if pattern is None or not (m := pattern.match(key)):
                    continue
                g = m.groupdict()
                if isinstance(rule, Rename):
                    steps.append(Step((key,), (_fill(rule.ckpt, g),)))
                elif isinstance(rule, Transform):
                    steps.append(Step((key,), (_fill(rule.ckpt, g),), lambda ts, f=rule.from_model: [f(ts[0])]))
                else:
                    dst = tuple(_fill(p, g) for p in rule.ckpt)
                    steps.append(Step((key,), dst, lambda ts, r=rule: _split(ts[0], r)))
                break
            else:
                steps.append(Step((key,), (key,)))
        for ri, keys in nests.items():
            rule = self.rules[ri]
            steps += [Step(tuple(rule.ours + k for k in s.src), tuple(rule.outer_name(k) for k in s.dst), s.fn)
                      for s in rule.inner.plan_save(keys)]
        return steps


def _ckpt_patterns(rule: Rule) -> tuple[str, ...]:
    if isinstance(rule, Nest):
        return ()
    return rule.ckpt if isinstance(rule, Fuse) else (rule.ckpt,)


def _split(t: Tensor, rule: Fuse) -> list[Tensor]:
    if rule.sizes is None:
        return list(t.chunk(len(rule.ckpt), rule.dim))
    return list(t.split(list(rule.sizes), rule.dim))
