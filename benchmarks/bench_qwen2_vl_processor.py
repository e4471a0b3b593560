"""Qwen2-VL's chat processor: polymodal's Qwen2VLProcessor vs transformers' Qwen2VLProcessor with its fast
(torchvision) and its PIL image processor, one process, paired rounds.

    .venv/bin/python benchmarks/bench_qwen2_vl_processor.py [--rounds 9] [--batch 4]

Each call is a batch of conversations, one 1024x1024 photo each (scikit-image's astronaut, coffee, chelsea and
rocket, resized with PIL), given as PIL images, with a question: the chat template, the expansion of each
<|image_pad|> to the image's merged patches, tokenization, left padding and the preprocessing (smart_resize within
the hub checkpoints' range, 3136 to 12,845,056 pixels: 1036x1036, 74x74 patches, 1,369 tokens per image; bicubic
resize, normalization, patchify with the temporal duplication). transformers' side runs
`apply_chat_template(conversations, tokenize=True, return_dict=True, ...)`, which does all of it. Both processors
are loaded from the same directory, saved by transformers; their ids, masks, grids and pixel values are compared
before anything is timed. Reported per transformers image processor: the median per-batch times and the median of
the paired ratios (transformers' time / ours), rounds alternating which side runs first (benchmarks/timing.py), in
wall time and in the process's CPU time (all its threads), which other work on a shared machine disturbs less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] "
    "%}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


def save_processor(path: str) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["system You are a helpful assistant. user What is shown in this image? assistant A cat on a table."]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    images = transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)  # the hub's range
    transformers.Qwen2VLProcessor(image_processor=images, video_processor=transformers.Qwen2VLVideoProcessor(),
                                  tokenizer=fast, chat_template=TEMPLATE).save_pretrained(path)


def wait_for_idle(limit: float, window: float = 0.3, busy: float = 0.15) -> None:
    """Return once the machine's CPUs were busy less than `busy` of a `window` (from /proc/stat), or after `limit`
    seconds: on a machine shared with other work, rounds then run in its quiet moments."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:8]]
        return sum(values), values[3]

    end = time.monotonic() + limit
    while time.monotonic() < end:
        total, idle = sample()
        time.sleep(window)
        total2, idle2 = sample()
        if total2 > total and 1 - (idle2 - idle) / (total2 - total) < busy:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each round, wait up to this long for the machine's CPUs to be idle (Linux)")
    args = ap.parse_args()
    import transformers
    from skimage import data

    from polymodal.processing import Qwen2VLProcessor

    photos = [Image.fromarray(getattr(data, n)()).resize((1024, 1024), Image.BICUBIC)
              for n in ("astronaut", "coffee", "chelsea", "rocket")]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": photos[i % 4]},
                                                    {"type": "text", "text": "What is shown in this image?"}]}]
                     for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as d:
        save_processor(d)
        ours = Qwen2VLProcessor.from_pretrained(d)
        fast = transformers.AutoProcessor.from_pretrained(d)
        size = fast.image_processor.size
        pil = transformers.Qwen2VLImageProcessorPil(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        slow = type(fast)(image_processor=pil, video_processor=fast.video_processor, tokenizer=fast.tokenizer,
                          chat_template=fast.chat_template)

    def run_ours():
        return ours(conversations)

    def runner(theirs):
        def run():  # the same work as ours: template, tokenization, expansion, padding, pixels
            return theirs.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt",
                                              processor_kwargs={"padding": True, "padding_side": "left"})
        return run

    def nothing() -> None:
        return None

    got = run_ours()
    for label, theirs in (("fast (torchvision)", fast), ("PIL", slow)):
        run_theirs = runner(theirs)
        want = run_theirs()
        same = all(torch.equal(want[k], got[k]) for k in ("input_ids", "attention_mask", "image_grid_thw"))
        diff = (want["pixel_values"] - got["pixel_values"]).abs().max().item()
        print(f"{type(theirs.image_processor).__name__} [{label}] vs polymodal Qwen2VLProcessor: ids, masks and grids "
              f"{'identical' if same else 'DIFFER'}, max |pixel difference| {diff:.3g}, pixel_values "
              f"{tuple(got['pixel_values'].shape)}")
        wall: dict[str, list[float]] = {"theirs": [], "ours": []}
        cpu: dict[str, list[float]] = {"theirs": [], "ours": []}
        for r in range(args.rounds):
            if args.quiet:
                wait_for_idle(args.quiet)
            sides = [("theirs", run_theirs), ("ours", run_ours)]
            if r % 2:
                sides.reverse()
            for name, fn in sides:
                start = time.process_time()
                wall[name].append(timed(fn, nothing))
                cpu[name].append(time.process_time() - start)
        for label_t, t in (("wall", wall), ("CPU", cpu)):
            ratios = [a / b for a, b in zip(t["theirs"], t["ours"])]
            print(f"  {label_t:>4}: batch {args.batch} of 1024x1024 photos, torch threads {torch.get_num_threads()}: "
                  f"transformers median {statistics.median(t['theirs']) * 1e3:.1f} ms, polymodal "
                  f"{statistics.median(t['ours']) * 1e3:.1f} ms; paired ratio median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")

if __name__ == "__main__":
    main()
