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
