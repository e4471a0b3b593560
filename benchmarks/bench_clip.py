"""CLIP speed: polymodal vs transformers' CLIPModel on identical weights, in one process.

For each size, tower, batch and dtype it times both models in alternating order over several rounds and
prints the median of the paired ratios reference_time / our_time (> 1: polymodal is faster), with the median
times and the largest difference between the two outputs.

    python benchmarks/bench_clip.py                                  # tiny + ViT-B/32, batch 1 and 8, fp32 + bf16
    python benchmarks/bench_clip.py --sizes tiny --rounds 5 --dtypes fp32
    python benchmarks/bench_clip.py --sizes b32 --device cuda --rounds 50
    python benchmarks/bench_clip.py --packed                         # ours after pm.optimize_for_inference
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polymodal.models.clip import CLIP, PRESETS, _hf_key_map, _write_hf
from polymodal.nn.inference import optimize_for_inference
from polymodal.weights.loader import load_weights

SIZES = {"tiny": "clip-tiny-test", "b32": "openai/clip-vit-base-patch32", "b16": "openai/clip-vit-base-patch16",
         "l14": "openai/clip-vit-large-patch14"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_pair(preset: str, device: torch.device, dtype: torch.dtype):
    """transformers' CLIPModel with random weights, and ours holding the very same tensors."""
    from transformers import CLIPConfig, CLIPModel

    cfg = PRESETS[preset]
    ref = CLIPModel(CLIPConfig.from_dict(_write_hf(cfg))).eval()
    with torch.device("meta"):
        ours = CLIP(cfg)
    load_weights(ours, ref.state_dict(), _hf_key_map(cfg))
    return ref.to(device, dtype), ours.eval().to(device, dtype)


PROMPT_LABELS = ("cat", "dog", "golden retriever", "fire truck", "espresso", "astronaut", "rocket", "tabby cat")


def prompt_ids(preset: str, batch: int, device: torch.device):
    """Zero-shot prompts ("a photo of a {label}.") padded to the context, as a classifier sends them."""
    from polymodal.processing import CLIPTokenizer

    c = PRESETS[preset]
    texts = [f"a photo of a {PROMPT_LABELS[i % len(PROMPT_LABELS)]}." for i in range(batch)]
    ids, mask = CLIPTokenizer.default()(texts, context_length=c.text.max_position_embeddings)
    return ids.clamp(max=c.text.vocab_size - 1).to(device), mask.to(device)


def inputs(preset: str, batch: int, device: torch.device, dtype: torch.dtype, masked: bool):
    """Random ids of random lengths (3..T) ending in the end-of-text token."""
    c = PRESETS[preset]
    torch.manual_seed(batch)
    pixels = torch.randn(batch, 3, c.vision.image_size, c.vision.image_size, device=device, dtype=dtype)
    T = c.text.max_position_embeddings
    ids = torch.randint(1, c.text.vocab_size - 2, (batch, T), device=device)
    lengths = torch.randint(3, T + 1, (batch,), device=device)
    pos = torch.arange(T, device=device)[None]
    ids = torch.where(pos < lengths[:, None] - 1, ids, 0)
    ids[torch.arange(batch, device=device), lengths - 1] = c.text.eos_token_id
    mask = (pos < lengths[:, None]).long() if masked else None
    return pixels, ids, mask


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench(name: str, ref_fn, our_fn, device: torch.device, rounds: int, warmup: int = 2) -> None:
    for _ in range(warmup):
        ref_fn(), our_fn()
    ratios, ref_times, our_times, diff = [], [], [], 0.0
    for r in range(rounds):
        order = (ref_fn, our_fn) if r % 2 == 0 else (our_fn, ref_fn)  # alternate: neither always runs first
        (t0, o0), (t1, o1) = timed(order[0], device), timed(order[1], device)
        (t_ref, want), (t_ours, got) = ((t0, o0), (t1, o1)) if r % 2 == 0 else ((t1, o1), (t0, o0))
        ratios.append(t_ref / t_ours)
        ref_times.append(t_ref)
        our_times.append(t_ours)
        diff = max(diff, (got.float() - want.float()).abs().max().item())
    print(f"{name:<36} ratio {statistics.median(ratios):5.2f}x   ref {statistics.median(ref_times) * 1e3:8.2f} ms"
          f"   ours {statistics.median(our_times) * 1e3:8.2f} ms   max|diff| {diff:.1e}", flush=True)


def calls(ref, ours, tower: str, pixels, ids, mask):
    """The two callables to compare for one tower: transformers' features and ours."""
    if tower == "image":
        return (lambda: ref.get_image_features(pixel_values=pixels).pooler_output,
                lambda: ours.encode_image(pixels))
    return (lambda: ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
            lambda: ours.encode_text(ids, mask))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,b32", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--towers", default="image,text,text-masked,text-prompts")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--packed", action="store_true",
                   help="run ours after pm.optimize_for_inference (CPU: oneDNN-prepacked weights)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, rounds {args.rounds}")
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            ref, ours = build_pair(SIZES[size], device, dtype)
            if args.packed:
                optimize_for_inference(ours)
            for batch in map(int, args.batches.split(",")):
                for tower in args.towers.split(","):
                    x = inputs(SIZES[size], batch, device, dtype, tower == "text-masked")
                    if tower == "text-prompts":
                        x = (x[0], *prompt_ids(SIZES[size], batch, device))
                    ref_fn, our_fn = calls(ref, ours, tower, *x)
                    with torch.inference_mode():
                        bench(f"{size} {tower} b{batch} {dname}", ref_fn, our_fn, device, args.rounds)


if __name__ == "__main__":
    main()
