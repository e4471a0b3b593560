"""BLIP captioning speed: polymodal vs transformers' `BlipForConditionalGeneration.generate`, same weights, one process.

    python benchmarks/bench_blip.py                      # tiny + BLIP-base captioning shape, batch 1 and 8, CPU fp32
    python benchmarks/bench_blip.py --sizes tiny --rounds 2
    python benchmarks/bench_blip.py --sizes base --batches 1 --rounds 1 --new 5
    python benchmarks/bench_blip.py --beams 1,3 --packed  # greedy and 3-beam search; ours after optimize_for_inference
    python benchmarks/bench_blip.py --sizes base --device cuda --dtype bf16 --batches 1,8,32 --rounds 10

For each size a captioning model is built with random weights by transformers (`BlipForConditionalGeneration`: a
tiny shape, or Salesforce/blip-image-captioning-base's, a 384x384 ViT-B/16 and a BERT-base decoder cross-attending
it) and loaded into polymodal from its `save_pretrained` files, so both run identical weights; the captions are
compared token for token before anything is timed. The weights' std is 0.2 for tiny and 0.02 for base, so that
different images get different captions (at transformers' default vision std of 1e-10 all get the same one); at
0.2 the 12-layer base is chaotic: fp32 rounding alone (transformers' fp32 against its own fp64) changes the ViT's
output by ~1e-2 and every caption. A caption ends at [SEP] (`sep_token_id`), which transformers' BLIP passes to
generation itself; so after saving, the reference's `sep_token_id` is set to an id outside the vocabulary and ours is
given the same id as `eos_token_id`: neither ever stops early, both always generate `--new` tokens per caption.

Measured, per round and alternating which side runs first:
  caption = time of generate(pixel_values, max_new_tokens=N) for a batch of B random images: the image encoding
            and the whole caption (greedy, or `--beams` > 1 beam search)  -> caption tokens / s (B * N / time)
and we print the median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster),
with the smallest and largest ratio, and both sides' tokens / s and milliseconds at their median time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_rounds  # benchmarks/timing.py, beside this script
from transformers import BlipConfig, BlipForConditionalGeneration
from transformers.utils import logging as hf_logging

import polymodal as pm

SIZES = {  # (text_config, vision_config, the weights' std) as transformers' BlipConfig takes them
    "tiny": (dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1022, sep_token_id=102, pad_token_id=0),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16), 0.2),
    "base": (dict(num_attention_heads=12), dict(image_size=384), 0.02),  # Salesforce/blip-image-captioning-base
}
ROUNDS = {"tiny": 10, "base": 3}  # defaults: both sizes, batch 1 and 8, in a few minutes on 2 CPU cores
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, workdir: Path, dtype: torch.dtype, device: torch.device, packed: bool):
    """transformers' captioner with random weights and ours loaded from its files; the id that ends no caption."""
    text, vision, std = SIZES[size]
    cfg = BlipConfig(text_config={**text, "initializer_range": std}, vision_config={**vision, "initializer_range": std},
                     initializer_range=std)
    torch.manual_seed(0)
    with torch.device(device):
        ref = BlipForConditionalGeneration(cfg).to(dtype).eval()
    ref.save_pretrained(workdir / size)
    ours = pm.load(workdir / size, dtype=dtype, device=device)
    never = ref.config.text_config.vocab_size  # no logit has this index: no caption ends
    ref.config.text_config.sep_token_id = never  # read by BLIP's generate as its eos_token_id
    return ref, pm.optimize_for_inference(ours) if packed else ours, never


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,base", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,8", help="images per generate call, comma-separated")
    p.add_argument("--new", type=int, default=20, help="caption tokens generated per image")
    p.add_argument("--beams", default="1", help="comma-separated num_beams values (1: greedy)")
    per_size = ", ".join(f"{k} {v}" for k, v in ROUNDS.items())
    p.add_argument("--rounds", type=int, default=None, help=f"paired rounds per measurement (default: {per_size})")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--packed", action="store_true",
                   help="run ours after pm.optimize_for_inference, as the image-to-text pipeline does (by default)")
    args = p.parse_args()
    sizes = args.sizes.split(",")
    batches, beams = [int(b) for b in args.batches.split(",")], [int(b) for b in args.beams.split(",")]
    for size in sizes:
        if size not in SIZES:
            p.error(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    if args.new < 1 or (args.rounds is not None and args.rounds < 1) or min(batches) < 1 or min(beams) < 1:
        p.error("--new, --rounds, --batches and --beams must be >= 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"rounds {args.rounds or per_size}, new {args.new}, beams {args.beams}, "
          f"ours {'packed' if args.packed else 'plain'}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            ref, ours, never = build(size, Path(tmp), dtype, device, args.packed)
            image_size = ref.config.vision_config.image_size
            for batch in batches:
                g = torch.Generator().manual_seed(batch)
                px = torch.randn(batch, 3, image_size, image_size, generator=g).to(device, dtype)
                for num_beams in beams:
                    compare(size, batch, num_beams, ref, ours, px, never, args.rounds or ROUNDS[size], args.new,
                            sync)
            del ref, ours


def compare(size, batch, num_beams, ref, ours, px, never, rounds, new, sync) -> None:
    """Paired rounds of one (size, batch, num_beams): print the caption ratio and both sides' speeds."""

    def run_ref():
        return ref.generate(pixel_values=px, max_new_tokens=new, do_sample=False, num_beams=num_beams)

    def run_ours():
        return ours.generate(pixel_values=px, max_new_tokens=new, num_beams=num_beams, eos_token_id=never)

    want, got = run_ref(), run_ours()  # also the warm-up
    same = want.tolist() == got.tolist()
    tokens = batch * (got.shape[1] - 1)  # the [DEC] start token is not generated
    ratios, ref_times, our_times = paired_rounds(run_ref, run_ours, rounds, sync)
    ref_t, our_t = statistics.median(ref_times), statistics.median(our_times)
    print(f"{size:<5} b{batch:<2} beams {num_beams}  caption ratio {statistics.median(ratios):5.2f}x "
          f"({min(ratios):.2f}-{max(ratios):.2f})   ref {tokens / ref_t:8.1f} tok/s {ref_t * 1e3:8.1f} ms   "
          f"ours {tokens / our_t:8.1f} tok/s {our_t * 1e3:8.1f} ms" + ("" if same else "   (outputs differ!)"),
          flush=True)


if __name__ == "__main__":
    main()
