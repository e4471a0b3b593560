"""polymodal.generation on a tiny random LLaMA: stop tokens and strings, time limit, streaming, logits
processors against their definitions, and clear errors. (Parity with transformers: tests/test_llama.py.)"""

import dataclasses
import time

import pytest
import torch
from torch import Tensor

import polymodal as pm
from polymodal.generation import DecoderState, apply_repetition_penalty, generate, top_k_filter, top_p_filter
from polymodal.models.llama import Llama
from polymodal.nn.attention import KVCache


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


# ------------------------------------------------------------------------------------------ the decoder state


def test_decoder_state_positions_of_any_leading_shape():
    """Prompt position ids (3, B, T), as M-RoPE lays an image out in 2-D: each row continues from the largest id
    over its real tokens + 1 on every axis (transformers' rope_deltas), and advance() hands out (3, B, 1)."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    # row 0: a 2x2 image at t=1 (ids 1..2 in height and width), then text from 3; row 1: two pads (ids 9 unread)
    pos = torch.tensor([[[0, 1, 1, 1, 3], [9, 9, 0, 1, 2]],
                        [[0, 1, 1, 2, 3], [9, 9, 0, 1, 2]],
                        [[0, 1, 2, 1, 3], [9, 9, 0, 1, 2]]])
    cache = [KVCache(2, 1, 8, 4, dtype=torch.float32, device="cpu")]
    state, prompt_positions = DecoderState.start(cache, mask, 8, position_ids=pos)
    assert prompt_positions is pos and state.position_dims == (3,)
    assert state.positions.tolist() == [[4, 3]] * 3
    seen = []
    for _ in range(2):
        step_mask, step_pos = state.advance()
        assert step_pos.shape == (3, 2, 1)
        seen.append(step_pos[:, :, 0].tolist())
    assert seen == [[[4, 3]] * 3, [[5, 4]] * 3] and step_mask.tolist() == [[1] * 7, [0, 0] + [1] * 5]
    state.reorder(torch.tensor([1, 0]))
    assert state.positions.tolist() == [[5, 6]] * 3

    # without position ids: each row counts its real tokens, (B,) and (B, 1) as every decoder takes them
    state, prompt_positions = DecoderState.start(cache, mask, 8)
    assert prompt_positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert state.positions.tolist() == [5, 3] and state.advance()[1].tolist() == [[5], [3]]
    with pytest.raises(ValueError, match=r"position_ids must be \(\.\.\., batch, length\) = \(\.\.\., 2, 5\)"):
        DecoderState.start(cache, mask, 8, position_ids=pos[:, :, :4])
    with pytest.raises(ValueError, match="prompt holds 5 positions, more than the 4"):
        DecoderState.start(cache, mask, 4)


def _numbered_state(B: int = 3) -> DecoderState:
    """A state with every field set, whose row i holds the value i in every tensor."""
    rows = torch.arange(B, dtype=torch.float32)
    k = rows.view(B, 1, 1, 1).expand(B, 2, 6, 4).clone()
    cross = (rows.view(B, 1, 1, 1).expand(B, 2, 5, 4).clone(), rows.view(B, 1, 1, 1).expand(B, 2, 5, 4).clone())
    return DecoderState(cache=[KVCache.over(k, k.clone(), 4), KVCache.over(k.clone(), k.clone(), 4)],
                        mask=torch.arange(B)[:, None].expand(B, 6).clone(), length=4, offset=torch.arange(B),
                        position_dims=(3,), cross=[cross, tuple(t.clone() for t in cross)],
                        cross_mask=torch.arange(B)[:, None].expand(B, 5).clone(),
                        prompt=torch.arange(B)[:, None].expand(B, 2).clone())


def _batch_tensors(value):
    """Every tensor with a batch dimension that a state field holds."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, KVCache):
        yield value.k
        yield value.v
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _batch_tensors(v)


def test_reorder_covers_every_field():
    """Beam search's reorder keeps rows `index` in every field that has rows, whatever field a family fills."""
    state = _numbered_state()
    index = torch.tensor([2, 0, 0, 1])
    state.reorder(index)
    checked = 0
    for f in dataclasses.fields(DecoderState):
        for t in _batch_tensors(getattr(state, f.name)):
            assert t.shape[0] == 4, f.name
            assert t.reshape(4, -1).float().eq(index[:, None].float()).all(), f.name
            checked += 1
    assert checked == 1 + 4 + 4 + 1 + 1 + 1  # mask, cache k/v x2, cross k/v x2, offset, cross_mask, prompt
    assert state.positions.tolist() == [[6, 4, 4, 5]] * 3  # offset + length


def test_relayout_and_cat_keep_each_rows_positions_and_keys():
    """The serving engine's layout changes: relayout moves a row's filled positions to end at another column of a
    larger buffer, cat stacks rows; each row keeps its keys, mask and next position id."""
    torch.manual_seed(0)
    cache = [KVCache(1, 2, 3, 4, dtype=torch.float32, device="cpu")]
    state, _ = DecoderState.start(cache, torch.ones(1, 3, dtype=torch.long), 3)
    cache[0].update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    moved = state.relayout(0, 5, 8)
    assert (moved.length, moved.cache[0].length, moved.mask.shape) == (5, 5, (1, 8))
    assert torch.equal(moved.cache[0].k[:, :, 2:5], cache[0].k) and not moved.cache[0].k[:, :, :2].any()
    assert moved.mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]] and moved.positions.tolist() == [3]
    assert state.length == 3 and state.cache[0].k.shape[2] == 3  # the original is left as it was
    dropped = moved.relayout(3, 4, 6)  # the columns before 3 go
    assert dropped.mask.tolist() == [[0, 0, 1, 1, 0, 0]] and dropped.positions.tolist() == [3]
    assert torch.equal(dropped.cache[0].v[:, :, 2:4], cache[0].v[:, :, 1:])
    other_cache = [KVCache(1, 2, 2, 4, dtype=torch.float32, device="cpu")]
    other, _ = DecoderState.start(other_cache, torch.ones(1, 2, dtype=torch.long), 2)
    other_cache[0].update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    both = DecoderState.cat([moved, other.relayout(0, 5, 8)])
    assert both.positions.tolist() == [3, 2] and both.mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0],
                                                                         [0, 0, 0, 1, 1, 0, 0, 0]]
    assert torch.equal(both.cache[0].k[1:, :, 3:5], other_cache[0].k) and both.cache[0].length == 5
    with pytest.raises(ValueError, match="cannot move positions 0..2 to end at 2"):
        state.relayout(0, 2, 8)
    with pytest.raises(ValueError, match="different layouts"):
        DecoderState.cat([moved, dropped])
    with pytest.raises(ValueError, match="different layouts"):  # M-RoPE rows with plain ones
        DecoderState.cat([moved, _numbered_state(2).relayout(0, 5, 8)])


# ------------------------------------------------------------------------------------------ extras at the prefill


class Shifted(Llama):
    """A LLaMA whose prompt takes an extra input at the prefill, as a VLM's takes its image features: `shift`
    (B, D) is added to the prompt's embeddings. Its decode steps must not get it, and its prefill needs it."""

    def forward(self, input_ids=None, attention_mask=None, *, shift=None, cache=None, **options):
        prefill = not cache or cache[0].length == 0
        if prefill != (shift is not None):
            raise TypeError(f"shift is the prefill's input and only the prefill's (prefill: {prefill})")
        if shift is None:
            return super().forward(input_ids, attention_mask, cache=cache, **options)
        return super().forward(None, attention_mask, inputs_embeds=self.embed(input_ids) + shift[:, None],
                               cache=cache, **options)


class Baked(Llama):
    """The same model with its shift built in: what generating `Shifted` with shift=... must give."""

    shift: Tensor

    def forward(self, input_ids=None, attention_mask=None, *, cache=None, **options):
        if cache and cache[0].length:
            return super().forward(input_ids, attention_mask, cache=cache, **options)
        return super().forward(None, attention_mask, inputs_embeds=self.embed(input_ids) + self.shift[:, None],
                               cache=cache, **options)


@pytest.fixture(scope="module")
def shifted():
    """(Shifted, Baked, a plain Llama) with one set of weights, and the shift (3, D)."""
    torch.manual_seed(0)
    plain = pm.build("llama", "llama-tiny-test").eval()
    models = [plain]
    for cls in (Shifted, Baked):
        m = cls(plain.config).eval()
        m.load_state_dict(plain.state_dict())
        models.append(m)
    shift = torch.randn(3, plain.config.hidden_size, generator=torch.Generator().manual_seed(5))
    models[2].shift = shift
    return models[1], models[2], plain, shift


def _greedy_by_full_passes(model: Llama, ids, mask, shift, n: int) -> list:
    """Greedy decoding without a cache: every step runs the whole sequence, the shift on the prompt alone."""
    T = ids.shape[1]
    seq = ids
    for _ in range(n):
        h = model.embed(seq)
        h[:, :T] += shift[:, None]
        full = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - T, dtype=mask.dtype)], dim=1)
        logits = Llama.forward(model, None, full, inputs_embeds=h)[:, -1]
        seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
    return seq.tolist()


def test_extras_go_to_the_prefill_in_every_mode(shifted):
    """generate(model, ids, shift=...) hands the extra to the prefill and only there, with greedy decoding,
    sampling, repetition penalty, beam search, the fixed-shape step, streaming, stop strings and no new tokens;
    greedy equals full passes over the whole sequence (no cache) with the shift on the prompt."""
    model, baked, plain, shift = shifted
    ids, mask = _padded_batch()
    greedy = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[], shift=shift)
    assert greedy.tolist() == _greedy_by_full_passes(model, ids, mask, shift, 10)
    assert greedy.tolist() != generate(plain, ids, mask, max_new_tokens=10, eos_token_id=[]).tolist()
    with pytest.raises(TypeError, match="prefill's input"):
        generate(model, ids, mask, max_new_tokens=2)

    text = CharTokenizer().decode(greedy[0, 7:].tolist())
    modes = {
        "sampling": dict(do_sample=True, top_k=20, temperature=0.8),
        "penalty": dict(repetition_penalty=1.3),
        "beams": dict(num_beams=3),
        "sampled beams": dict(num_beams=2, do_sample=True),
        "static cache": dict(static_cache=True),
        "static cache, sampling": dict(static_cache=True, do_sample=True, top_p=0.9),
        "stop strings": dict(stop_strings=[text[4:6]], tokenizer=CharTokenizer()),
        "no new tokens": dict(max_new_tokens=0),
    }
    for name, options in modes.items():
        options = {"max_new_tokens": 10, **options}
        runs = [generate(m, ids, mask, eos_token_id=[], generator=torch.Generator().manual_seed(3), **options, **extra)
                for m, extra in ((model, {"shift": shift}), (baked, {}))]
        assert runs[0].tolist() == runs[1].tolist(), name
    assert runs[0].tolist() == ids.tolist()
    static = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[], static_cache=True, shift=shift)
    assert static.tolist() == greedy.tolist()

    seen = []
    streamed = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[], streamer=seen.append, shift=shift)
    assert torch.stack(seen, dim=1).tolist() == streamed[:, 7:].tolist() == greedy[:, 7:13].tolist()


@pytest.mark.slow  # inductor compiles C++ on the CPU
def test_extras_go_to_the_prefill_of_the_compiled_step(shifted):
    model, _, _, shift = shifted
    ids, mask = _padded_batch()
    runs = [generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], compile_step=c, shift=shift)
            for c in (False, True)]
    assert runs[0].tolist() == runs[1].tolist()
