"""Llama 3.2 Vision's chat processor: polymodal's MllamaProcessor vs transformers' MllamaProcessor with its fast
(torchvision) and its PIL image processor, one process, paired rounds.

    .venv/bin/python benchmarks/bench_mllama_processor.py [--rounds 9] [--batch 4]

Each call is a batch of conversations, one photo each (scikit-image's astronaut, coffee, chelsea and rocket, resized
with PIL to 1024x1024; with --wide, 1280x720), given as PIL images, with a question: the hub's chat template,
tokenization, left padding, the tiling (Llama-3.2-11B-Vision's preprocessor: 560-px tiles, at most 4: a 1024^2 photo
is 2 x 2 tiles, a 1280x720 one 1 x 3, padded) and the cross-attention mask. transformers' side runs
`apply_chat_template(conversations, tokenize=True, return_dict=True, ...)`, which does all of it. Both processors are
loaded from the same directory, saved by transformers; every output is compared before anything is timed. Reported
per transformers image processor: the median per-batch times and the median of the paired ratios (transformers' time
/ ours), rounds alternating which side runs first (benchmarks/timing.py's paired_rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_rounds  # noqa: E402

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
KEYS = ("input_ids", "attention_mask", "cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask")


def save_processor(path: str) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from polymodal.processing.mllama import LLAMA32_VISION_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["user What is shown in this image? assistant A cat on a table."]
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                                pad_token="<|finetune_right_pad_id|>")
    images = transformers.MllamaImageProcessor(  # Llama-3.2-11B-Vision's preprocessor_config.json
        size={"height": 560, "width": 560}, max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    transformers.MllamaProcessor(image_processor=images, tokenizer=fast,
                                 chat_template=LLAMA32_VISION_CHAT_TEMPLATE).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--wide", action="store_true", help="1280x720 photos instead of 1024x1024")
    args = ap.parse_args()
    import transformers
    from skimage import data

    from polymodal.processing import MllamaProcessor

    size = (1280, 720) if args.wide else (1024, 1024)
    photos = [Image.fromarray(getattr(data, n)()).resize(size, Image.BICUBIC)
              for n in ("astronaut", "coffee", "chelsea", "rocket")]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": photos[i % 4]},
                                                    {"type": "text", "text": "What is shown in this image?"}]}]
                     for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as d:
        save_processor(d)
        ours = MllamaProcessor.from_pretrained(d)
        fast = transformers.AutoProcessor.from_pretrained(d)
        ip = fast.image_processor
        pil = transformers.MllamaImageProcessorPil(size=dict(ip.size), max_image_tiles=ip.max_image_tiles,
                                                   image_mean=ip.image_mean, image_std=ip.image_std)
        slow = type(fast)(image_processor=pil, tokenizer=fast.tokenizer, chat_template=fast.chat_template)

    def run_ours():
        return ours(conversations)

    def runner(theirs):
        def run():  # the same work as ours: template, tokenization, padding, tiles, cross-attention mask
            return theirs.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt",
                                              processor_kwargs={"padding": True, "padding_side": "left"})
        return run

    got = run_ours()
    print(f"{args.batch} photos of {size[0]}x{size[1]}, pixel_values {tuple(got['pixel_values'].shape)}, "
          f"torch threads {torch.get_num_threads()}")
    for label, theirs in (("fast (torchvision)", fast), ("PIL", slow)):
        run_theirs = runner(theirs)
        want = run_theirs()
        same = all(torch.equal(torch.as_tensor(want[k]), got[k]) for k in KEYS)
        diff = (want["pixel_values"] - got["pixel_values"]).abs().max().item()
        print(f"{type(theirs.image_processor).__name__} [{label}] vs polymodal MllamaProcessor: ids, masks and aspect "
              f"ratios {'identical' if same else 'DIFFER'}, max |pixel difference| {diff:.3g}")
        ratios, ref_times, our_times = paired_rounds(run_theirs, run_ours, args.rounds)
        print(f"  transformers median {statistics.median(ref_times) * 1e3:.1f} ms, polymodal "
              f"{statistics.median(our_times) * 1e3:.1f} ms; paired ratio median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
