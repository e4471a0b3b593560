"""LLaVA-NeXT's chat processor: polymodal's LlavaNextProcessor vs transformers' LlavaNextProcessor with its default
(torchvision) image processor and with its PIL one, one process, paired rounds.

    .venv/bin/python benchmarks/bench_llava_next_processor.py [--rounds 9] [--batch 4] [--size 1024]

Each call is a batch of conversations, one photo each (scikit-image's astronaut, coffee, chelsea and rocket, resized
with PIL to size x size: a 2 x 2 canvas of 336-px crops plus the whole image, 2,928 tokens each), given as PIL
images, with a question: the chat template, each <image> expanded to its anyres count, tokenization, padding and
the crops (transformers' side: `apply_chat_template(conversations, tokenize=True, return_dict=True, ...)`, which does
all of it). Both processors are loaded from the same directory, saved by transformers (a small byte-level BPE
tokenizer with "<image>" and LLaVA-1.5's chat template, llava-hf v1.6's image settings); their ids, masks,
image_sizes and pixel values are compared before anything is timed. Reported: the median per-batch times and the
median of the paired ratios (transformers' time / ours), rounds alternating which side runs first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from bench_llava_processor import TEMPLATE  # noqa: E402
from timing import paired_rounds  # noqa: E402


def save_processor(path: str):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["USER: What is shown in this image? ASSISTANT: A cat sitting on a table.",
              "Describe the photo in detail, please. What colour is the cup? Where is the rocket going?"]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.LlavaNextImageProcessor(size={"shortest_edge": 336},
                                                  crop_size={"height": 336, "width": 336})
    transformers.LlavaNextProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=TEMPLATE).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    import transformers
    from skimage import data

    from polymodal.processing import LlavaNextProcessor

    photos = [Image.fromarray(getattr(data, n)()).resize((args.size, args.size), Image.BICUBIC)
              for n in ("astronaut", "coffee", "chelsea", "rocket")]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": photos[i % 4]},
                                                    {"type": "text", "text": "What is shown in this image?"}]}]
                     for i in range(args.batch)]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start, torch threads "
          f"{torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        save_processor(d)
        sides = [(LlavaNextProcessor.from_pretrained(d, backend=ours),
                  transformers.AutoProcessor.from_pretrained(d, backend=theirs))
                 for ours, theirs in (("torch", "torchvision"), ("pil", "pil"))]
    for ours, theirs in sides:

        def run_theirs(theirs=theirs):  # the same work as ours: template, tokens, expansion, padding, crops
            return theirs.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt",
                                              processor_kwargs={"padding": True, "padding_side": "left"})

        def run_ours(ours=ours):
            return ours(conversations)

        want, got = run_theirs(), run_ours()
        same = all(torch.equal(want[k], got[k]) for k in ("input_ids", "attention_mask", "image_sizes"))
        diff = (want["pixel_values"] - got["pixel_values"]).abs().max().item()
        print(f"{type(theirs.image_processor).__name__} vs polymodal LlavaNextProcessor ({ours.image_processor.backend}"
              f"): ids, masks and image_sizes {'identical' if same else 'DIFFER'}, max |pixel difference| {diff:.3g}, "
              f"pixel_values {tuple(got['pixel_values'].shape)}")
        if not same or diff > 1e-5:
            raise SystemExit("the outputs differ: nothing is timed")
        ratios, t_theirs, t_ours = paired_rounds(run_theirs, run_ours, args.rounds)
        print(f"  batch {args.batch} of {args.size}x{args.size} photos: transformers median "
              f"{statistics.median(t_theirs) * 1e3:.1f} ms, polymodal {statistics.median(t_ours) * 1e3:.1f} ms; "
              f"paired ratio median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
