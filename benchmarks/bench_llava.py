"""LLaVA-1.5 generation speed: polymodal vs transformers' `LlavaForConditionalGeneration.generate`, same weights,
one process, paired rounds.

    python benchmarks/bench_llava.py                          # tiny + a 7B-width shape with 2 layers, batch 1 and 4
    python benchmarks/bench_llava.py --sizes 7b-2l --batches 1 --rounds 3
    python benchmarks/bench_llava.py --sizes 7b --device cuda --dtype bf16 --batches 1 --prompt 64 --new 64

Each size is a LLaVA-1.5 built with random weights by transformers and loaded into polymodal from its
`save_pretrained` files. "7b-2l" has LLaVA-1.5-7B's widths (ViT-L/14 at 336 px: 576 image tokens; a 4096-wide
Vicuna decoder) with 4 vision and 2 decoder layers so it fits the CPU; "7b" is the real shape (a GPU).
Every row is one image (its 576 or 16 features) and `--prompt` text tokens; greedy outputs are compared token for
token before anything is timed; end-of-sequence is disabled so both generate `--new` tokens.

  TTFT   = time of generate(max_new_tokens=1): the vision tower, the projector, the merge and the prefill
  decode = (time of generate(max_new_tokens=N) - TTFT) / (N - 1)    -> generated tokens / s (per row)

and we print the median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster),
alternating which side runs first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_generation  # benchmarks/timing.py, beside this script
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import polymodal as pm

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
SIZES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8),
             dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "7b-2l": ({**VIT_L_336, "num_hidden_layers": 4}, {**VICUNA_7B, "num_hidden_layers": 2}),
    "7b": ({**VIT_L_336, "num_hidden_layers": 24}, {**VICUNA_7B, "num_hidden_layers": 32}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, workdir: Path, dtype: torch.dtype, device: torch.device):
    vision, text = SIZES[size]
    image_token = text["vocab_size"] - 1
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                      text_config=LlamaConfig(**text, max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                                              pad_token_id=0),
                      image_token_index=image_token)
    torch.manual_seed(0)
    with torch.device(device):
        ref = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(workdir / size)
    ours = pm.optimize_for_inference(pm.load(workdir / size, dtype=dtype, device=device))  # as the pipelines run it
    features = (vision["image_size"] // vision["patch_size"]) ** 2
    return ref, ours, image_token, features, vision["image_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,7b-2l", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt", type=int, default=64, help="text tokens per row, besides the image's")
    p.add_argument("--new", type=int, default=16, help="generated tokens per row in the decode measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--static", action="store_true", help="ours decodes with generate(static_cache=True)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds, text prompt {args.prompt} + one image, new {args.new}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            ref, ours, image_token, features, side = build(size, Path(tmp), dtype, device)
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(batch)
                text = torch.randint(3, image_token, (batch, args.prompt), generator=g)
                ids = torch.cat([text[:, :1], torch.full((batch, features), image_token), text[:, 1:]], 1).to(device)
                px = torch.randn(batch, 3, side, side, generator=g).to(device, dtype)
                compare(size, batch, ref, ours, ids, px, args, sync)
            del ref, ours


def compare(size, batch, ref, ours, ids, px, args, sync) -> None:
    mask = torch.ones_like(ids)

    def run_ref(n):
        return ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n, do_sample=False,
                            min_new_tokens=n)

    def run_ours(n):
        return ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=n, eos_token_id=[],
                             static_cache=args.static)

    same = run_ref(args.new).tolist() == run_ours(args.new).tolist()  # also the warm-up
    result = paired_generation(run_ref, run_ours, args.new, args.rounds, sync)
    for k, name in (("first", "TTFT"), ("token", "decode")):
        ratios, ref_t, our_t = result[k]
        value = (lambda s: f"{s * 1000:8.1f} ms") if k == "first" else (lambda s: f"{batch / s:8.1f} tok/s")
        print(f"{size:<6} b{batch:<2} {name:<6} ratio {statistics.median(ratios):5.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})   ref {value(ref_t)}   ours {value(our_t)}"
              + ("" if same else "   (outputs differ!)"), flush=True)

if __name__ == "__main__":
    main()
