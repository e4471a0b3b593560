"""Serving a vision-language model: a tiny random LLaVA saved by transformers, through the continuous-batching
engine (image requests are extra prefill inputs; mixed with text-only ones, each row's greedy tokens equal
`polymodal.generation.generate` on that request alone) and bounds checked before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import LLAVA_IMAGE_TOKENS, save_tiny_llava

import polymodal as pm
from polymodal.generation import generate
from polymodal.pipelines.text import default_text_tokenizer
from polymodal.serve.engine import ChatEngine, Finished

CORPUS = ["Hello there, how are you? I am fine, thank you. What is in this image? A red square on blue."] * 20


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), CORPUS)


@pytest.fixture(scope="module")
def llava(llava_dir):
    return pm.load(llava_dir)


@pytest.fixture(scope="module")
def tokenizer(llava):
    return default_text_tokenizer(llava)


def image_prompt(model, images: int, text: list[int]) -> list[int]:
    """Token ids as the processor lays them out: each image's placeholder expanded to its feature count."""
    return [1] + [model.config.image_token_index] * (LLAVA_IMAGE_TOKENS * images) + text


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def alone(model, ids: list[int], max_new_tokens: int, pixel_values=None) -> list[int]:
    extras = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, **extras)
    return out[0, len(ids):].tolist()


def collect(request) -> tuple[list[int], Finished]:
    ids = []
    for event in request.events():
        if isinstance(event, Finished):
            return ids, event
        ids.append(event.token_id)
    raise AssertionError("events ended without Finished")


class Forwards:
    """Records the batch shape of every forward of the model, and whether images came with it."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def record(module, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            self.calls.append((tuple(ids.shape), kwargs.get("pixel_values") is not None))

        self.handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ the engine
def test_image_and_text_requests_share_a_batch_and_match_generate_alone(llava, tokenizer):
    """Requests with one image, two images and none decode together; each gets exactly the greedy tokens that
    `generate` gives it alone. The images go to the request's prefill only; the decode steps are shared."""
    specs = [(image_prompt(llava, 1, [40, 41, 42]), pixels(1, 0), 14),
             (image_prompt(llava, 0, [43, 44, 45, 46, 47]), None, 12),
             (image_prompt(llava, 2, [48, 49]), pixels(2, 4), 10),
             (image_prompt(llava, 1, [50]), pixels(1, 2), 16)]
    engine = ChatEngine(llava, tokenizer, max_batch=4)
    with Forwards(llava) as forwards:
        requests = [engine.submit(ids, extras=None if px is None else {"pixel_values": px}, max_new_tokens=n)
                    for ids, px, n in specs]
        with engine:  # all four wait before the start: they are prefilled one by one, then decode together
            results = [collect(r) for r in requests]
    for (ids, px, n), (got, finished) in zip(specs, results):
        assert got == alone(llava, ids, n, px)
        assert finished.prompt_tokens == len(ids) and finished.completion_tokens == n
    assert len({tuple(got) for got, _ in results}) == 4
    prefills = [(shape, images) for shape, images in forwards.calls if shape[1] > 1]
    assert prefills == [((1, len(ids)), px is not None) for ids, px, _ in specs]  # images: at their prefill only
    steps = [(shape, images) for shape, images in forwards.calls if shape[1] == 1]
    assert not any(images for _, images in steps) and max(shape[0] for shape, _ in steps) == 4


def test_an_image_request_joining_a_running_text_batch(llava, tokenizer):
    """An image request arrives while text-only rows decode (its prompt is longer than the head: the batch shifts
    right), and a text request joins after it: every row still equals `generate` alone."""
    text_a = image_prompt(llava, 0, [60, 61, 62])
    with ChatEngine(llava, tokenizer) as engine:
        a = engine.submit(text_a, max_new_tokens=20)
        events = a.events()
        first = [next(events) for _ in range(3)]  # a is decoding
        b_ids, b_px = image_prompt(llava, 1, [63, 64]), pixels(1, 3)
        b = engine.submit(b_ids, extras={"pixel_values": b_px}, max_new_tokens=12)
        c_ids = image_prompt(llava, 0, [65, 66, 67, 68])
        c = engine.submit(c_ids, max_new_tokens=8)
        got_a = [e.token_id for e in first] + [e.token_id for e in events if not isinstance(e, Finished)]
        got_b, got_c = collect(b)[0], collect(c)[0]
    assert got_a == alone(llava, text_a, 20)
    assert got_b == alone(llava, b_ids, 12, b_px)
    assert got_c == alone(llava, c_ids, 8)
    assert engine.stats["prefills"] == 3


def test_bad_image_requests_are_refused_at_submit_before_any_forward(llava, tokenizer, llama):
    """Each refusal names what was wrong, comes from `submit` (so a server answers 400, not a failed stream) and
    happens before the model runs or a cache is allocated."""
    engine = ChatEngine(llava, tokenizer, max_pixels=2 * 32 * 32)
    one = image_prompt(llava, 1, [40])
    with Forwards(llava) as forwards, engine:
        with pytest.raises(ValueError, match=r"holds 16 image tokens .* but 2 image\(s\) came with it, which fill 32"):
            engine.submit(one, extras={"pixel_values": pixels(2, 0)})  # more images than image tokens
        with pytest.raises(ValueError, match=r"holds 32 image tokens .* but 1 image\(s\)"):
            engine.submit(image_prompt(llava, 2, [40]), extras={"pixel_values": pixels(1, 0)})  # the reverse
        with pytest.raises(ValueError, match="holds 16 image tokens .* but 0 image"):
            engine.submit(one)  # image tokens without images
        with pytest.raises(ValueError, match="3,072 pixels, over the limit of 2,048 per request"):
            engine.submit(image_prompt(llava, 3, [40]), extras={"pixel_values": pixels(3, 0)})
        with pytest.raises(ValueError, match=r"\(images, channels, height, width\)"):
            engine.submit(one, extras={"pixel_values": torch.zeros(3, 32, 32)})
        with pytest.raises(ValueError, match="Llava takes no input 'image_sizes'; it takes: pixel_values"):
            engine.submit(one, extras={"pixel_values": pixels(1, 0), "image_sizes": torch.tensor([[32, 32]])})
        with pytest.raises(ValueError, match="must be a tensor"):
            engine.submit(one, extras={"pixel_values": [[0.0]]})
        # the prompt after expansion: 12 images fill 192 of the 256 positions, 70 more tokens do not fit
        with pytest.raises(ValueError, match=r"prompt \(195 tokens, 192 of them for its images\) plus max_new_tokens "
                                             r"\(70\) is over the model's context of 256 tokens.*send fewer images"):
            ChatEngine(llava, tokenizer).submit(image_prompt(llava, 12, [40, 41]),
                                                extras={"pixel_values": pixels(12, 0)}, max_new_tokens=70)
        ok = engine.submit(one, extras={"pixel_values": pixels(1, 5)}, max_new_tokens=4)  # the engine goes on
        assert collect(ok)[1].reason == "length"
    assert len([c for c in forwards.calls if c[0][1] > 1]) == 1  # only the good request was prefilled

    # a text-only decoder takes no images at all
    text_engine = ChatEngine(llama, tokenizer)
    with pytest.raises(ValueError, match="Llama takes no input 'pixel_values'; it takes: text only"):
        text_engine.submit([1, 5, 6], extras={"pixel_values": pixels(1, 0)})
    text_engine.close()


@pytest.fixture(scope="module")
def llama(llava):
    return llava.language_model
