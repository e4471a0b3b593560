"""Chat templates: the Jinja2 templates that turn a list of messages into a chat model's prompt, run in a sandbox.

    [{"role": "user", "content": "Hi"}]  --template-->  "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"

Rendering follows transformers' `apply_chat_template` (transformers/utils/chat_template_utils.py), checked for
equal output in tests/test_chat_template.py: Jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension and transformers' `{% generation %}` tag (a plain block here); the
globals `raise_exception`, `strftime_now`, `namespace`, `dict`; a `tojson` filter that keeps non-ASCII text and takes
`indent` / `separators` / `sort_keys`; the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the
special tokens (`bos_token`, `eos_token`, ...) and any extra keyword. Messages are copied into plain JSON data
first (keys whose value is None dropped, reasoning also offered as `reasoning_content` / `thinking`), as there.

A template comes with a downloaded checkpoint: it is untrusted code. The sandbox already refuses private and
internal attributes (`__class__`, `__globals__`, `func_code`...) and changes to the inputs (`list.append`); we make
those an immediate `ChatTemplateError` instead of an undefined value. The sandbox does not bound time or memory,
so each render also runs under a budget:

| limit | default | enforced by |
|---|---|---|
| time | `time_limit=1.0` s | a deadline checked at every call, lookup, operator, filter and loop step |
| loop steps | 1,000,000 per render | every `for` iterates through a counting guard |
| `range()` | 100,000 numbers | our `range` |
| one value | `max_chars`: max(1,000,000, 4 x the input's text) | sizes computed before `+ * ** %`, `~`, filters and
  string methods run; lists and dicts measured by their printed size, a shared part counted each time it appears |
| all values built | 32 x `max_chars` characters | every output piece and every result above counted |
| nesting | 128 nested calls (macros, `caller`, recursive loops) | a depth counter in the sandbox's `call` |

Loops, `~` and comparisons are not hooks of Jinja's sandbox; before compiling, the template's syntax tree is
rewritten so that each `for` iterates through a step-counting guard, each `a ~ b` and each comparison is a call to
a function that sizes its operands first, and each output statement first reports the size of its literal text.
Those functions live on an extension object (`_BudgetHooks`), which template source has no syntax to reach.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

DEFAULT_TIME_LIMIT = 1.0  # seconds; real templates render in about a millisecond
DEFAULT_MAX_CHARS = 1_000_000
MAX_TOTAL_FACTOR = 32
MAX_LOOP_STEPS = 1_000_000
MAX_RANGE = 100_000  # Jinja's own sandbox limit for range()
MAX_DEPTH = 128
MAX_INT_BITS = 65_536  # results of ** and * on integers


class ChatTemplateError(ValueError):
    """A chat template that does not parse, fails, or was stopped by the sandbox or its limits."""


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    max_chars: int = DEFAULT_MAX_CHARS,
    **variables: Any,
) -> str:
    """Render `template` for `messages` (dicts with "role" and "content"), as transformers'
    `tokenizer.apply_chat_template(messages, tokenize=False, ...)` does. `variables` (the special tokens, and
    template options such as `enable_thinking`) are visible to the template. Raises `ChatTemplateError`."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string of Jinja source, not {type(template).__name__}")
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise TypeError("tools must be a list of JSON-schema dicts")
    context = _plain({"tools": tools, "documents": documents, "add_generation_prompt": add_generation_prompt,
                      **variables})
    context["messages"] = _messages(messages)
    budget = _Budget(time_limit, max(int(max_chars), 4 * _text_size(context)))
    token = _BUDGET.set(budget)
    try:
        pieces = _compile(template).generate(**context)
        try:
            out, size = [], 0
            for piece in pieces:
                size += len(piece)
                if size > budget.max_chars:
                    raise ChatTemplateError(f"the chat template was stopped: its output passed {budget.max_chars:,} "
                                            "characters (max_chars)")
                budget.tick()
                out.append(piece)
        finally:
            pieces.close()
        return "".join(out)
    except ChatTemplateError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from e
    except RecursionError:
        raise ChatTemplateError("the chat template was stopped: it nests too deeply") from None
    except MemoryError:
        raise ChatTemplateError("the chat template was stopped: it ran out of memory") from None
    except Exception as e:  # TypeError, KeyError... from the template's own code
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)


# ---------------------------------------------------------------------------------------------- the budget


class _Budget:
    """Time, size and step allowances of one render; the sandbox's hooks draw on it."""

    def __init__(self, time_limit: float, max_chars: int):
        self.time_limit = float(time_limit)
        self.deadline = time.monotonic() + self.time_limit
        self.max_chars = max_chars
        self.max_total = MAX_TOTAL_FACTOR * max_chars
        self.total = self.steps = self.depth = 0
        self._sizes: dict[int, int] = {}  # id -> printed size of the lists/tuples/dicts measured so far
        self._keep: list = []  # ...kept alive, so that their ids stay theirs during the render

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template was stopped: it ran longer than {self.time_limit:g} s "
                                    "(time_limit)")

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_LOOP_STEPS:
            raise ChatTemplateError(f"the chat template was stopped: its loops ran more than {MAX_LOOP_STEPS:,} "
                                    "steps")
        self.tick()

    def check(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise ChatTemplateError(f"the chat template was stopped: {what} would be {size:,} characters, over the "
                                    f"limit of {self.max_chars:,} (max_chars)")

    def size(self, value: Any) -> int:
        """About how many characters `value` prints as: strings exactly; lists, tuples and dicts by their items,
        a part shared n times counted n times; anything else 8. Refuses values over `max_chars`."""
        kind = type(value)
        if kind is str:
            return len(value)
        if kind not in _CONTAINERS:
            if isinstance(value, str):
                return len(value)
            if not isinstance(value, _CONTAINERS):
                return 8
        sizes = self._sizes
        if id(value) in sizes:
            return sizes[id(value)]
        todo = [(value, False)]
        while todo:  # post-order over the (acyclic) value, each container once
            obj, children_done = todo.pop()
            if id(obj) in sizes:
                continue
            children = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
            if not children_done:
                todo.append((obj, True))
                todo += [(c, False) for c in children if isinstance(c, (list, tuple, dict)) and id(c) not in sizes]
                continue
            total = 2 + sum(2 + (len(c) if isinstance(c, str) else sizes[id(c)]
                                 if isinstance(c, (list, tuple, dict)) else 8) for c in children)
            self.check(total, f"a {type(obj).__name__}")
            sizes[id(obj)] = total
            self._keep.append(obj)
        return sizes[id(value)]

    def charge(self, value: Any) -> None:
        """Count a newly built value against the per-render total."""
        if type(value) is str:
            self.add(len(value))
        elif isinstance(value, (str, *_CONTAINERS)):
            self.add(self.size(value))

    def add(self, chars: int) -> None:
        self.total += chars
        if self.total > self.max_total:
            raise ChatTemplateError(f"the chat template was stopped: it built more than {self.max_total:,} "
                                    f"characters in all ({MAX_TOTAL_FACTOR} x max_chars)")


_CONTAINERS = (list, tuple, dict)
_BUDGET: ContextVar[_Budget | None] = ContextVar("polymodal_chat_budget", default=None)


def _budget() -> _Budget:
    return _BUDGET.get() or _Budget(DEFAULT_TIME_LIMIT, DEFAULT_MAX_CHARS)


# ---------------------------------------------------------------------------------------------- the sandbox


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every hook it offers charged to the render's budget."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            _check_bits(right * math.log2(abs(left)), "a power")
        elif op == "*":
            if _is_int(left) and _is_int(right):
                _check_bits(left.bit_length() + right.bit_length(), "a product")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(n):
                    budget.check(budget.size(seq) * max(n, 0), f"a {type(seq).__name__} repeated {n:,} times")
        elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.check(budget.size(left) + budget.size(right), f"a {type(left).__name__} sum")
        elif op == "%" and isinstance(left, str):
            _check_printf(budget, left, right)
        result = super().call_binop(context, op, left, right)
        budget.charge(result)
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        if attribute in ("format", "format_map") and isinstance(obj, str):
            _check_format(_budget(), obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        if argument in ("format", "format_map") and isinstance(obj, str):
            _check_format(_budget(), obj)
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise ChatTemplateError(
            f"the chat template reads {type(obj).__name__}.{attribute}, which templates may not touch (the sandbox "
            "refuses private and internal attributes, and methods that change the messages)"
        )

    def call(self, context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        for value in (*args, *kwargs.values()):
            budget.size(value)
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(budget, owner, getattr(obj, "__name__", ""), args)
        if getattr(obj, "__name__", "") in ("format", "format_map") and isinstance(
            getattr(getattr(obj, "__wrapped__", None), "__self__", None), str
        ):  # the sandbox's wrapper of str.format: widths may come from the arguments ("{:{}}")
            for value in (*args, *kwargs.values()):
                if _is_int(value):
                    budget.check(value, "a formatted field")
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise ChatTemplateError(f"the chat template was stopped: calls nest deeper than {MAX_DEPTH} "
                                        "(a recursive macro?)")
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        budget.charge(result)
        return result


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; when
    only rendering, its body is output as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _BudgetHooks(Extension):
    """The functions that the rewritten syntax tree calls (see `_Guards`)."""

    def loop(self, iterable: Any):
        return _loop(iterable)

    def concat(self, *parts: Any) -> str:
        return _concat(*parts)

    def compare(self, first: Any, *rest: Any) -> bool:
        return _compare(first, *rest)

    def charge(self, chars: int) -> str:
        _budget().add(chars)
        return ""


class _Guards(NodeTransformer):
    """Route the steps that Jinja's sandbox cannot see through `_BudgetHooks` (see the module doc)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _hook("loop", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _hook("concat", node.nodes, node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)
        args = [node.expr]
        for operand in node.ops:
            args += [nodes.Const(operand.op), operand.expr]
        return _hook("compare", args, node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        literal = sum(len(n.data) for n in node.nodes if isinstance(n, nodes.TemplateData))
        if literal:  # literal text also piles up in loops inside macros and {% set %} blocks
            node.nodes.insert(0, _hook("charge", [nodes.Const(literal)], node.lineno))
        return node


def _hook(name: str, args: list, lineno: int) -> nodes.Call:
    """A call of `_BudgetHooks.<name>(*args)`: an extension attribute, which template syntax cannot name."""
    return nodes.Call(nodes.ExtensionAttribute(_BudgetHooks.identifier, name), list(args), [], None, None,
                      lineno=lineno)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _environment()
    tree = _Guards().visit(env.parse(source))
    return env.template_class.from_code(env, env.compile(tree), env.make_globals(None), None)


@lru_cache(maxsize=1)
def _environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[loopcontrols, _GenerationTag, _BudgetHooks], finalize=_finalize)
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) would write a book
    env.globals.update({
        "range": _range, "dict": _TemplateDict(), "namespace": _TemplateNamespace,
        "raise_exception": _raise_exception, "strftime_now": _strftime_now,
    })
    env.filters["tojson"] = _tojson
    env.filters["join"] = _join
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _guard_test(f) for name, f in env.tests.items()}
    return env


# ---------------------------------------------------------------------------------------------- template globals


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(f"the chat template refused these messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise ChatTemplateError(f"the chat template asked for a range of {len(r):,} numbers; at most {MAX_RANGE:,}")
    return r


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _TemplateNamespace(Namespace):
    """`namespace(...)`, the only object a template can change, so the only way to carry values across loop
    steps: it refuses private names and values over the size limit."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: namespace(self=...) must work
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _check_namespace_item(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_item(name, value)
        Namespace.__setitem__(self, name, value)


def _check_namespace_item(name: Any, value: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise ChatTemplateError(f"the chat template stores {name!r} on a namespace; names starting with '_' are "
                                "not allowed")
    _budget().size(value)


def _loop(iterable: Any):
    """What every `for` iterates through: one budget step per item."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _concat(*parts: Any) -> str:
    """`a ~ b`: the strings of the parts, joined, if the result fits."""
    budget = _budget()
    budget.tick()
    for part in parts:
        budget.size(part)
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    budget.check(sum(map(len, texts)), "a ~ concatenation")
    result = "".join(texts)
    budget.charge(result)
    return result


_COMPARISONS = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
    "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}


def _compare(first: Any, *rest: Any) -> bool:
    """`a == b`, `a in b`, `a < b < c`...: values are measured first, so comparing nested lists stays bounded."""
    budget = _budget()
    budget.tick()
    budget.size(first)
    left = first
    for i in range(0, len(rest), 2):
        op, right = rest[i], rest[i + 1]
        budget.size(right)
        if not _COMPARISONS[op](left, right):
            return False
        left = right
    return True


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` output passes here before it is turned into text."""
    _budget().charge(value)
    return value


# ---------------------------------------------------------------------------------------------- filters and tests


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: JSON without HTML escaping, non-ASCII kept unless asked."""
    width = len(indent) if isinstance(indent, str) else indent or 0
    if width > 64:
        raise ChatTemplateError(f"the chat template asked tojson for an indent of {width}; at most 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@jinja2.pass_environment
def _join(env: jinja2.Environment, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    """Jinja's `join`, sized before it joins."""
    items = list(value)
    if attribute is not None:
        for part in str(attribute).split("."):
            items = [env.getitem(item, int(part) if part.isdigit() else part) for item in items]
    budget = _budget()
    texts = []
    for item in items:
        budget.size(item)
        texts.append(item if isinstance(item, str) else str(item))
    budget.check(sum(map(len, texts)) + len(str(d)) * max(len(texts) - 1, 0), "a join")
    return str(d).join(texts)


def _filter_checks(budget: _Budget, name: str, args: list, kwargs: dict) -> None:
    """Sizes that filters would build, computed before they run."""
    value, rest = (args[0] if args else None), args[1:]

    def arg(i: int, key: str, default: Any) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    for x in (*rest, *kwargs.values()):  # widths, lengths, counts
        if _is_int(x):
            budget.check(x, f"the {name} filter's argument")
    text = value if isinstance(value, str) else None
    if name == "indent" and text is not None:
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else int(width)
        budget.check(len(text) + (text.count("\n") + 1) * width, "an indent")
    elif name == "wordwrap" and text is not None:
        width, wrap = int(arg(0, "width", 79)), arg(2, "wrapstring", None) or "\n"
        budget.check(len(text) + (len(text) // max(width, 1) + 1) * len(wrap), "a wordwrap")
    elif name == "replace" and text is not None:
        _check_replace(budget, text, str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count", None))
    elif name == "format" and text is not None:
        _check_printf(budget, text, tuple(rest) or kwargs)
    elif name in ("batch", "slice"):
        count = arg(0, "linecount" if name == "batch" else "slices", 0)
        if _is_int(count) and count > MAX_RANGE:
            raise ChatTemplateError(f"the chat template asked {name} for {count:,} pieces; at most {MAX_RANGE:,}")


def _guard_filter(name: str, func):
    offset = 1 if hasattr(func, "jinja_pass_arg") else 0  # context / eval context / environment comes first

    @wraps(func)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        args = list(args)
        if name == "sum" and len(args) > offset:
            args[offset] = list(args[offset])  # sum(start=[]) adds lists: measure them first
        for value in (*args[offset:], *kwargs.values()):
            budget.size(value)
        _filter_checks(budget, name, args[offset:], kwargs)
        result = func(*args, **kwargs)
        budget.charge(result)
        return result

    return guarded


def _guard_test(func):
    offset = 1 if hasattr(func, "jinja_pass_arg") else 0

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        for value in (*args[offset:], *kwargs.values()):
            budget.size(value)
        return func(*args, **kwargs)

    return guarded


# ---------------------------------------------------------------------------------------------- size checks


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_bits(bits: float, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise ChatTemplateError(f"the chat template was stopped: {what} of about {int(bits):,} bits, over the limit "
                                f"of {MAX_INT_BITS:,}")


def _check_replace(budget: _Budget, text: str, old: str, new: str, count: Any) -> None:
    hits = text.count(old) if old else len(text) + 1
    if _is_int(count) and count >= 0:
        hits = min(hits, count)
    budget.check(len(text) + hits * (len(new) - len(old)), "a replace")


def _check_str_method(budget: _Budget, text: str, name: str, args: tuple) -> tuple:
    """Sizes of the str methods that can grow text, computed before they run."""
    if name in ("center", "ljust", "rjust", "zfill") and args and _is_int(args[0]):
        budget.check(args[0], f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args and _is_int(args[0]) else 8
        budget.check(len(text) + text.count("\t") * max(tab, 0), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(budget, text, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "join" and args:
        items = list(args[0])
        budget.check(sum(budget.size(i) for i in items) + len(text) * max(len(items) - 1, 0), "str.join")
        args = (items, *args[1:])
    return args


def _check_format(budget: _Budget, fmt: str) -> None:
    """str.format widths written in the format string ("{:>999999999}")."""
    for field in _FORMAT_FIELD.findall(fmt):
        for digits in _DIGITS.findall(field):
            budget.check(int(digits), "a formatted field")


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """`fmt % args` widths ("%999999999s"), also those taken from the arguments ("%*s")."""
    for width, precision in _PRINTF_FIELD.findall(fmt):
        for digits in (width, precision):
            if digits.isdigit():
                budget.check(int(digits), "a %-formatted field")
    for value in (args if isinstance(args, tuple) else (args,)):
        if _is_int(value):
            budget.check(value, "a %-formatted field")


_FORMAT_FIELD = re.compile(r"\{[^{}]*:[^{}]*\}")
_DIGITS = re.compile(r"\d+")
_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


# ---------------------------------------------------------------------------------------------- input data


def _messages(messages: Any) -> list[dict]:
    """The messages as plain dicts, keys whose value is None dropped, reasoning offered under its three names."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise TypeError(f"message {i} is a {type(message).__name__}; expected a dict with 'role' and 'content'")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING if k in message), None)
        if reasoning is not None:  # templates read `reasoning_content`; gpt-oss reads `thinking`
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """A copy of `value` made of JSON types only; other objects (images, tensors) become "<TypeName>", so the
    template never reaches their methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. the openai client's messages
        return _plain(value.model_dump())
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _text_size(value: Any) -> int:
    """Characters of text in plain data."""
    total, todo = 0, [value]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, dict):
            todo += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple)):
            todo += list(x)
    return total
