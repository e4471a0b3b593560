"""LLaVA's chat processor: polymodal's LlavaProcessor vs transformers' LlavaProcessor with its fast (torchvision)
CLIP image processor, one process, paired rounds.

    .venv/bin/python benchmarks/bench_llava_processor.py [--rounds 9] [--batch 4]

Each call is a batch of conversations, one 1024x1024 photo each (scikit-image's astronaut, coffee, chelsea and
rocket, resized with PIL), given as PIL images, with a question: the chat template, the token expansion of each
<image> to LLaVA-1.5's 576 features, tokenization, padding and the 336-px CLIP preprocessing (transformers' side:
`apply_chat_template(conversations, tokenize=True, return_dict=True, ...)`, which does all of it). Both processors are
loaded from the same directory, saved by transformers (a small byte-level BPE tokenizer with "<image>" and
LLaVA-1.5's chat template); their ids, masks and pixel values are compared before anything is timed. Reported: the
median per-batch times and the median of the paired ratios (transformers' time / ours), rounds alternating which
side runs first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from PIL import Image

TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


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
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    transformers.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=TEMPLATE).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    import transformers
    from skimage import data

    from polymodal.processing import LlavaProcessor

    photos = [Image.fromarray(getattr(data, n)()).resize((1024, 1024), Image.BICUBIC)
              for n in ("astronaut", "coffee", "chelsea", "rocket")]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": photos[i % 4]},
                                                    {"type": "text", "text": "What is shown in this image?"}]}]
                     for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as d:
        save_processor(d)
        ours = LlavaProcessor.from_pretrained(d)
        theirs = transformers.AutoProcessor.from_pretrained(d, backend="torchvision")
    def run_theirs():  # the same work as ours: the chat template, tokenization, expansion, padding, pixels
        return theirs.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt",
                                          processor_kwargs={"padding": True, "padding_side": "left"})

    def run_ours():
        return ours(conversations)

    want, got = run_theirs(), run_ours()
    same = torch.equal(want["input_ids"], got["input_ids"]) and torch.equal(want["attention_mask"],
                                                                            got["attention_mask"])
    diff = (want["pixel_values"] - got["pixel_values"]).abs().max().item()
    backend = getattr(theirs.image_processor, "backend", "?")
    print(f"{type(theirs.image_processor).__name__} ({backend}) vs polymodal LlavaProcessor: ids and masks "
          f"{'identical' if same else 'DIFFER'}, max |pixel difference| {diff:.3g}")
    ratios, t_ours, t_theirs = [], [], []
    for r in range(args.rounds):
        sides = [("theirs", run_theirs), ("ours", run_ours)]
        if r % 2:
            sides.reverse()
        t = {}
        for name, fn in sides:
            start = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - start
        t_theirs.append(t["theirs"])
        t_ours.append(t["ours"])
        ratios.append(t["theirs"] / t["ours"])
    print(f"batch {args.batch} of 1024x1024 photos, torch threads {torch.get_num_threads()}: transformers median "
          f"{statistics.median(t_theirs) * 1e3:.1f} ms, polymodal {statistics.median(t_ours) * 1e3:.1f} ms; paired "
          f"ratio median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
