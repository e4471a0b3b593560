"""The continuous-batching engine of `polymodal serve` on a tiny random LLaMA saved by transformers: requests that
join and leave a running batch get exactly the tokens `polymodal.generation.generate` gives each alone (greedy,
and sampled with a seed), share forward passes, and end as they should (stop, length, cancelled, error)."""

import asyncio
import contextlib
import string
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM

import polymodal as pm
from polymodal.generation import DecoderState, generate
from polymodal.processing import TextTokenizer
from polymodal.serve.engine import ChatEngine, Delta, Finished, QueueFull, _Batch

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# 100 tokens: 3 specials, then single characters and " x" pieces, glued together by the decoder
TOKENS = (["<pad>", "<s>", "</s>"] + list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(string.digits)
          + [" " + c for c in string.ascii_lowercase] + list(".,!?;:-()"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).eval().save_pretrained(path)
    return pm.load(path)


def make_tokenizer(**options) -> TextTokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return TextTokenizer(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **options)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 100, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids: list[int], max_new_tokens: int, **options) -> list[int]:
    """What `generate` gives this prompt on its own (it ends at the model's eos, as the engine does)."""
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, **options)
    return out[0, len(ids):].tolist()


def collect(events) -> tuple[list[int], str, Finished]:
    ids, text = [], []
    for event in events:
        if isinstance(event, Finished):
            return ids, "".join(text), event
        ids.append(event.token_id)
        text.append(event.text)
    raise AssertionError("events ended without Finished")


@contextlib.contextmanager
def hook(model, fn):
    """Run fn(input_ids) before every forward of the model."""
    def pre_hook(module, args):
        fn(args[0])  # returns None: the inputs go on unchanged

    handle = model.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def slow(seconds: float):
    return lambda ids: time.sleep(seconds)  # the tiny model decodes faster than a test can submit


class Gate:
    """Lets the engine thread run a given number of forwards, then holds it before the next: a test adds requests
    to a batch that is certain to be mid-decode, whatever the machine's speed. Records the decode batch sizes."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.free = False
        self.decode_sizes = []

    def __call__(self, ids):
        if not self.free:
            self.permits.acquire()
        if ids.shape[1] == 1:
            self.decode_sizes.append(ids.shape[0])

    def run(self, forwards: int) -> None:
        self.permits.release(forwards)

    def open(self) -> None:
        self.free = True
        self.permits.release(1000)


def test_requests_joining_a_running_batch_match_generate_alone(model, tokenizer):
    """Greedy: prompts of 3, 11, 6 and 20 tokens, joining while others decode (the 11- and 20-token prompts are
    longer than the head when they arrive: the batch shifts right), give exactly `generate`'s tokens."""
    gate = Gate()
    with hook(model, gate), ChatEngine(model, tokenizer) as engine:
        a = engine.submit(prompt(3, 1), max_new_tokens=16)
        gate.run(3)  # a's prefill and two steps
        a_events = a.events()
        first_a = [next(a_events) for _ in range(3)]
        b = engine.submit(prompt(11, 2), max_new_tokens=10)  # b joins a running batch
        gate.run(3)  # a's step under way, b's prefill, one step of both
        b_events = b.events()
        first_b = [next(b_events) for _ in range(2)]
        c = engine.submit(prompt(6, 3), max_new_tokens=14)
        d = engine.submit(prompt(20, 4), max_new_tokens=8)
        gate.open()
        results = [collect(first_a + list(a_events)), collect(first_b + list(b_events)),
                   collect(c.events()), collect(d.events())]
    assert max(gate.decode_sizes) == 4  # all four shared decode steps
    for request, (ids, text, finished), n in zip([a, b, c, d], results, [16, 10, 14, 8]):
        assert ids == alone(model, request.prompt_ids, n)
        assert text == tokenizer.decode(ids)
        assert finished.prompt_tokens == request.prompt_tokens and finished.completion_tokens == len(ids)


def test_churn_through_a_small_context_relayouts_and_still_matches(model, tokenizer, monkeypatch):
    """Many requests through 3 rows and a 40-token context: rows leave and join all the time; the batch shifts
    right for longer prompts, drops columns no row uses and grows, and every request still gets `generate`'s
    tokens."""
    monkeypatch.setattr(_Batch, "headroom", 4)  # a cache that starts small has to grow
    layouts = []
    arrange = _Batch._arrange

    def logged(batch, min_head):
        before = (batch.head, batch.capacity)
        arrange(batch, min_head)
        layouts.append((*before, batch.head, batch.capacity))

    monkeypatch.setattr(_Batch, "_arrange", logged)
    specs = [(3 + 5 * i % 14, 4 + 7 * i % 20) for i in range(10)]  # (prompt length, new tokens)
    engine = ChatEngine(model, tokenizer, max_batch=3, max_len=40)
    requests = [engine.submit(prompt(p, 10 + i), max_new_tokens=n) for i, (p, n) in enumerate(specs)]
    with engine:  # all submitted before the start: the schedule is the same on every run
        results = [collect(r.events()) for r in requests]
    for r, (ids, _, finished), (_, n) in zip(requests, results, specs):
        assert ids == alone(model, r.prompt_ids, n), finished
    assert any(head < new_head for head, cap, new_head, new_cap in layouts if cap)  # shifted right
    assert any(new_head < head for head, cap, new_head, new_cap in layouts)  # dropped unused columns
    assert any(0 < cap < new_cap for head, cap, new_head, new_cap in layouts)  # grew


def test_sampling_with_a_seed_does_not_depend_on_the_batch(model, tokenizer):
    options = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    ids = prompt(7, 5)
    with ChatEngine(model, tokenizer) as engine:
        solo = collect(engine.submit(ids, max_new_tokens=12, seed=123, **options).events())[0]
    gate = Gate()
    with hook(model, gate), ChatEngine(model, tokenizer) as engine:
        others = [engine.submit(prompt(4 + i, 20 + i), max_new_tokens=20, seed=i, **options) for i in range(2)]
        others.append(engine.submit(prompt(9, 30), max_new_tokens=20))
        gate.run(4)  # three prefills and a step: the batch is busy when ours joins
        first = others[0].events()  # held, not dropped: a dropped event iterator cancels its request
        next(first)
        ours = engine.submit(ids, max_new_tokens=12, seed=123, **options)
        gate.open()
        busy = collect(ours.events())[0]
        collect(first)
        for r in others[1:]:
            r.text()
    assert max(gate.decode_sizes) == 4
    want = alone(model, ids, 12, generator=torch.Generator().manual_seed(123), **options)
    assert solo == busy == want


def test_repetition_penalty_in_a_shared_batch_matches_generate_alone(model, tokenizer):
    """Each row's penalty looks at its own prompt and answer only: greedy and sampled requests with different
    penalties, next to one without, decode together and each gets `generate`'s tokens with the same settings."""
    specs = [(prompt(5, 40), dict(repetition_penalty=1.3)), (prompt(9, 41), dict(repetition_penalty=0.8)),
             (prompt(7, 42), dict(repetition_penalty=1.2, do_sample=True, temperature=0.9, top_k=20)),
             (prompt(6, 43), {})]
    gate = Gate()
    with hook(model, gate), ChatEngine(model, tokenizer) as engine:
        requests = [engine.submit(ids, max_new_tokens=24, seed=5, **options) for ids, options in specs]
        gate.open()
        results = [collect(r.events())[0] for r in requests]
    assert max(gate.decode_sizes) == 4
    for (ids, options), got in zip(specs, results):
        generator = torch.Generator().manual_seed(5) if options.get("do_sample") else None
        assert got == alone(model, ids, 24, generator=generator, **options), options
    assert results[0] != alone(model, specs[0][0], 24)  # the penalty changed this answer
    with ChatEngine(model, tokenizer) as engine, pytest.raises(ValueError, match="repetition_penalty"):
        engine.submit([5, 6], max_new_tokens=2, repetition_penalty=0.0)


def test_concurrent_requests_share_forward_passes(model, tokenizer):
    calls = []
    with hook(model, lambda ids: calls.append(ids.shape)):
        engine = ChatEngine(model, tokenizer)
        requests = [engine.submit(prompt(5 + i, 40 + i), max_new_tokens=12) for i in range(4)]
        engine.start()  # all four are waiting: they start together
        results = [collect(r.events()) for r in requests]
        engine.close()
    assert sum(f.completion_tokens for _, _, f in results) > 4 * 6
    decode_forwards = [s for s in calls if s[1] == 1]
    assert len(calls) - len(decode_forwards) == 4  # one prefill per request
    assert len(decode_forwards) <= 12  # not 4 x 11: every step serves all rows
    assert engine.stats == {"prefills": 4, "steps": len(decode_forwards)}


def test_the_batch_decodes_through_the_models_own_prefill_and_step(model, tokenizer, monkeypatch):
    """The running batch is the DecoderState that generate decodes with: each request is prefilled by the model's
    generation_prefill (where a VLM merges its images) and every step is one generation_step over all rows."""
    prefill, step = model.generation_prefill, model.generation_step
    prefills, steps = [], []

    def counted_prefill(ids, mask, max_len, **extras):
        state, logits = prefill(ids, mask, max_len, **extras)
        prefills.append(type(state))
        return state, logits

    def counted_step(tokens, state):
        steps.append((type(state), tokens.shape[0]))
        return step(tokens, state)

    monkeypatch.setattr(model, "generation_prefill", counted_prefill)
    monkeypatch.setattr(model, "generation_step", counted_step)
    engine = ChatEngine(model, tokenizer)
    requests = [engine.submit(prompt(4 + 3 * i, 90 + i), max_new_tokens=6 + i) for i in range(3)]
    with engine:
        results = [collect(r.events()) for r in requests]
    assert prefills == [DecoderState] * 3 and engine.stats == {"prefills": 3, "steps": len(steps)}
    assert {kind for kind, _ in steps} == {DecoderState} and max(rows for _, rows in steps) == 3
    monkeypatch.undo()
    for r, (ids, _, _) in zip(requests, results):
        assert ids == alone(model, r.prompt_ids, r.max_new_tokens)


def test_cancel_frees_the_slot_and_close_ends_everything(model, tokenizer):
    gate = Gate()
    with hook(model, gate):
        engine = ChatEngine(model, tokenizer, max_batch=1)
        engine.start()
        a = engine.submit(prompt(4, 50), max_new_tokens=100)
        b = engine.submit(prompt(4, 51), max_new_tokens=5)
        waiting = engine.submit(prompt(4, 52), max_new_tokens=5)
        gate.run(2)  # a's prefill and one step; then the engine holds before the next
        a_events = a.events()
        assert all(isinstance(next(a_events), Delta) for _ in range(2))
        assert (engine.num_active, engine.num_waiting) == (1, 2)
        waiting.cancel()  # a waiting request ends at once
        assert waiting.finished == Finished("cancelled", 4, 0) and engine.num_waiting == 1
        a.cancel()
        made = a.completion_tokens
        gate.open()
        _, _, finished_a = collect(a_events)
        assert finished_a.reason == "cancelled" and finished_a.completion_tokens <= made + 1  # the step under way
        ids_b, _, finished_b = collect(b.events())  # b takes the freed row
        assert finished_b.reason == "length" and len(ids_b) == 5

        running = [engine.submit(prompt(4, 60 + i), max_new_tokens=100) for i in range(3)]
        next(running[0].events())
        engine.close()
    assert [r.finished.reason for r in running] == ["cancelled"] * 3
    assert all(isinstance(collect(r.events())[2], Finished) for r in running)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(prompt(3, 1), max_new_tokens=4)


def test_queue_limit_and_bad_arguments(model, tokenizer):
    engine = ChatEngine(model, tokenizer, max_queue=2)  # not started: everything waits
    engine.submit(prompt(3, 1), max_new_tokens=4)
    engine.submit(prompt(3, 2), max_new_tokens=4)
    with pytest.raises(QueueFull, match="busy") as e:
        engine.submit(prompt(3, 3), max_new_tokens=4)
    assert e.value.retry_after > 0
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="context of 128"):
        engine.submit(prompt(100, 1), max_new_tokens=29)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([5, 100])
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([5], max_new_tokens=4, do_sample=True, temperature=0)
    engine.close()
    assert engine.num_waiting == 0


def test_stop_strings_end_tokens_and_length(model, tokenizer):
    ids = prompt(6, 70)
    with ChatEngine(model, tokenizer) as engine:
        free_ids, free_text, free = collect(engine.submit(ids, max_new_tokens=12).events())
        assert free.reason == "length" and len(free_ids) == 12 and free_ids == alone(model, ids, 12)
        assert len(free_text) >= 6
        target = free_text[3:6]  # spans tokens: the stop is found in the joined text
        stop_ids, stop_text, stopped = collect(engine.submit(ids, max_new_tokens=12, stop=[target, "@@"]).events())
    assert stopped.reason == "stop" and stop_text == free_text[: free_text.find(target)]
    assert stop_ids == free_ids[: len(stop_ids)] and len(stop_ids) < 12

    k = next(i for i in range(1, 12) if free_ids[i] not in free_ids[:i])  # a token the model first makes at i
    with ChatEngine(model, make_tokenizer(extra_eos_tokens=[TOKENS[free_ids[k]]])) as engine:
        eos_ids, eos_text, ended = collect(engine.submit(ids, max_new_tokens=12).events())
    assert ended.reason == "stop" and eos_ids == free_ids[: k + 1]
    assert eos_text == tokenizer.decode(free_ids[:k])  # the end token's own text is not part of the answer


def test_a_failing_forward_ends_its_request_and_the_engine_goes_on(model, tokenizer):
    calls = []

    def fail_third_call(ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")

    with hook(model, fail_third_call), ChatEngine(model, tokenizer) as engine:
        _, _, failed = collect(engine.submit(prompt(5, 80), max_new_tokens=10).events())
        later = engine.submit(prompt(8, 81), max_new_tokens=6)
        later_ids, _, done = collect(later.events())
    assert failed.reason == "error" and "device lost" in failed.error and failed.completion_tokens == 2
    assert done.reason == "length" and later_ids == alone(model, later.prompt_ids, 6)


def test_aevents_does_not_block_the_event_loop(model, tokenizer):
    async def main(engine):
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.002)

        async def consume(request):
            out = [event async for event in request.aevents()]
            return [e.token_id for e in out[:-1]], out[-1]

        tick = asyncio.create_task(ticker())
        requests = [engine.submit(prompt(5 + i, 90 + i), max_new_tokens=10) for i in range(2)]
        results = await asyncio.gather(*(consume(r) for r in requests))
        stop.set()
        await tick
        return requests, results, ticks

    with hook(model, slow(0.005)), ChatEngine(model, tokenizer) as engine:
        requests, results, ticks = asyncio.run(main(engine))
    assert ticks >= 5  # the loop kept running while the engine thread decoded (~10 steps of 5 ms)
    for r, (ids, finished) in zip(requests, results):
        assert finished.reason == "length" and ids == alone(model, r.prompt_ids, 10)
