"""polymodal.generation on a tiny random LLaMA: stop tokens and strings, time limit, streaming, logits
processors against their definitions, and clear errors. (Parity with transformers: tests/test_llama.py.)"""

import time

import pytest
import torch

import polymodal as pm
from polymodal.generation import apply_repetition_penalty, generate, top_k_filter, top_p_filter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return pm.build("llama", "llama-tiny-test").eval()


@pytest.fixture
def prompt():
    return torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))


class CharTokenizer:
    """Token i decodes to chr(65 + i % 26): enough to check stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_token_ends_a_row_and_pads_it(model, prompt):
    free = generate(model, prompt, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, 5 + 2])  # the third token row 0 generates
    out = generate(model, prompt, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    assert out[0, 5 + 2] == stop
    after = out[0, 5 + 3:]
    assert (after == 0).all()  # row 0 is padded after its stop token ...
    if stop not in free[1, 5:].tolist():  # ... while row 1 goes on unchanged to the length limit
        assert out[1].tolist() == free[1].tolist()


def test_stop_strings(model, prompt):
    free = generate(model, prompt[:1], max_new_tokens=10, eos_token_id=[])
    text = CharTokenizer().decode(free[0, 5:].tolist())
    target = text[3:5]  # a two-character string the model produces at tokens 4-5
    out = generate(model, prompt[:1], max_new_tokens=10, eos_token_id=[], stop_strings=[target],
                   tokenizer=CharTokenizer())
    got = CharTokenizer().decode(out[0, 5:].tolist())
    assert target in got and got.index(target) + len(target) == len(got)  # stopped right after it
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, stop_strings=["x"])


def test_time_limit(model, prompt):
    start = time.monotonic()
    out = generate(model, prompt, max_new_tokens=100_000, eos_token_id=[], max_time=0.3)
    assert time.monotonic() - start < 5  # generous: a safety bound, not a speed test
    assert 5 < out.shape[1] < 5 + 100_000


def test_streaming_gives_every_token_in_order(model, prompt):
    seen = []
    out = generate(model, prompt, max_new_tokens=6, eos_token_id=[], streamer=seen.append)
    assert torch.stack(seen, dim=1).tolist() == out[:, 5:].tolist()


def test_logits_processors_match_their_definitions():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    seq = torch.tensor([[0, 1]])
    pen = apply_repetition_penalty(scores, seq, 2.0)
    assert pen.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    assert torch.isinf(top_k_filter(scores, 2)).tolist() == [[False, True, True, False, True]]
    probs = scores.softmax(-1)[0]  # 3.0: 0.63, 2.0: 0.23, 0.5: 0.05 ...
    kept = ~torch.isinf(top_p_filter(scores, 0.8))[0]
    assert kept.tolist() == [True, False, False, True, False]
    assert probs[kept].sum() >= 0.8


def test_bad_arguments_are_clear_errors(model, prompt):
    with pytest.raises(ValueError, match="input_ids must be"):
        generate(model, prompt[0])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, do_sample=True, top_p=1.5)
    assert generate(model, prompt, max_new_tokens=0).tolist() == prompt.tolist()


def _padded_batch():
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fixed_shape_step_gives_the_same_tokens(family):
    """static_cache=True decodes with the fixed-shape step (a static cache written at a device-side index, attention
    over the whole buffer under a mask); on the CPU it runs eagerly: the same greedy and seeded-sampling tokens
    as the ordinary step, left padding included."""
    torch.manual_seed(0)
    model = pm.build(family, f"{family}-tiny-test").eval()
    ids, mask = _padded_batch()
    for options in ({}, {"do_sample": True, "top_k": 20, "temperature": 0.8}):
        runs = [generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], static_cache=static,
                         generator=torch.Generator().manual_seed(2), **options) for static in (False, True)]
        assert runs[0].tolist() == runs[1].tolist()
    with pytest.raises(ValueError, match="beam search"):
        generate(model, ids, num_beams=2, static_cache=True)
    with pytest.raises(ValueError, match="fixed-shape"):
        generate(pm.build("opt", "opt-tiny-test").eval(), ids, static_cache=True)


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~40 s
def test_compiled_step_gives_the_same_tokens():
    """compile_step=True: the fixed-shape step compiled by torch.compile (also through prepacked layers, which
    step aside for inductor) decodes the same greedy tokens."""
    from dataclasses import replace

    from polymodal.models.llama import PRESETS
    from polymodal.nn import PackedLinear

    torch.manual_seed(0)
    config = replace(PRESETS["llama-tiny-test"], hidden_size=256, intermediate_size=512)  # wide enough to pack
    model = pm.optimize_for_inference(pm.build("llama", config).eval())
    assert isinstance(model.layers[0].mlp.gate_proj, PackedLinear)
    ids, mask = _padded_batch()
    runs = [generate(model, ids, mask, max_new_tokens=10, eos_token_id=[], compile_step=c) for c in (False, True)]
    assert runs[0].tolist() == runs[1].tolist()
    # the weights are compiled in as constants: another model of the same shape gets its own compiled step
    other = pm.optimize_for_inference(pm.build("llama", config).eval())
    theirs = [generate(other, ids, mask, max_new_tokens=10, eos_token_id=[], compile_step=c) for c in (False, True)]
    assert theirs[0].tolist() == theirs[1].tolist() != runs[0].tolist()


@pytest.mark.slow  # inductor compiles C++ on the CPU
def test_cli_generate_compile_flag(tmp_path, capsys):
    """`polymodal generate --compile` takes the compiled step and prints what the plain one prints."""
    from serve_helpers import save_tiny_chat_llama

    from polymodal.cli import main

    model = save_tiny_chat_llama(tmp_path / "tiny", ["the cat sat on the mat", "a dog ran in the park"] * 20)
    outputs = []
    for flags in ([], ["--compile"]):
        assert main(["generate", "--model", str(model), "--max-new-tokens", "6", *flags, "the cat"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("the cat")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_on_a_gpu():
    """The captured CUDA graph replays the step: greedy tokens equal the eager step's, on the GPU, in fp32."""
    torch.manual_seed(0)
    model = pm.build("llama", "llama-tiny-test").eval().cuda()
    ids, mask = (t.cuda() for t in _padded_batch())
    runs = [generate(model, ids, mask, max_new_tokens=16, eos_token_id=[], static_cache=static)
            for static in (False, True)]
    assert runs[0].tolist() == runs[1].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "t5"])
def test_tiny_presets_train_in_seconds(family):
    """Each language-model family's tiny preset learns: next-token loss on 8 fixed sequences falls by more than
    half in 60 AdamW steps (it memorizes them)."""
    torch.manual_seed(0)
    model = pm.build(family, f"{family}-tiny-test").train()
    vocab = model.config.vocab_size
    seqs = torch.randint(3, vocab, (8, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        if family == "t5":  # encoder-decoder: copy the input, the decoder starts from pad
            start = torch.full((8, 1), model.config.decoder_start_token_id)
            logits = model(seqs, torch.cat([start, seqs[:, :-1]], dim=1))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), seqs.reshape(-1))
        logits = model(seqs[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), seqs[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
