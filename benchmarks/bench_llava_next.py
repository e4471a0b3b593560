"""LLaVA-NeXT (1.6) generation speed: polymodal vs transformers' `LlavaNextForConditionalGeneration.generate`, same
weights, one process, paired rounds.

    python benchmarks/bench_llava_next.py                                 # tiny + 7B widths with 2 layers, b1 and b4
    python benchmarks/bench_llava_next.py --sizes 7b-2l --batches 1 --rounds 2
    python benchmarks/bench_llava_next.py --sizes 7b --device cuda --dtype bf16 --batches 1 --new 64   # a GPU

Each size is a LLaVA-NeXT built with random weights by transformers and loaded into polymodal from its
`save_pretrained` files, then `pm.optimize_for_inference`, as the pipelines run it. "7b-2l" has
llava-v1.6-vicuna-7b's widths (CLIP ViT-L/14 at 336 px, 576 features a crop, the checkpoint's five canvases; a
4096-wide Vicuna decoder with its 32,064-entry vocabulary) with 2 vision and 2 decoder layers, so both models fit a
2-core CPU with 24 GB (about 2.8 GB a model in fp32, plus our prepacked copies); "7b" is the real depth (24 + 32
layers, for a GPU); "tiny" is the tests' shape (32-px crops of 8-px patches, five small canvases).

Images are processor-shaped: each image of (height, width) is 1 + rows x cols random 336-px crops, laid out
(images, most crops, 3, S, S) with zero crops after an image's last, and its <image> expanded to the count the
model packs (the whole image's 576 features, then the crops' grid unpadded to the image's aspect, a newline per
row: a 336x336 image is 1176 tokens, a 480x640 photo 2340). Batch 1 is one image of the first --images size;
batch 4 is four rows, each an image of a different size (different crop grids and cuts), and text prompts of
different lengths, left padded.
Before anything is timed the prompt's last logits are compared (max |difference| relative to the largest
reference value) and the greedy tokens must be identical (end-of-sequence disabled, so both generate --new tokens).

  TTFT   = time of generate(max_new_tokens=1): the crops through the tower, the projector, the packing, the merge,
           the prefill
  decode = (time of generate(max_new_tokens=N) - TTFT) / (N - 1)    -> generated tokens / s (all rows)

We print the median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster) with its
range, rounds alternating which side runs first, in wall time and in process CPU time (all threads of this process:
on a CPU other processes share, the wall time also counts their slices), and the load average.

Goals (7b-2l, fp32, CPU): TTFT >= 1.3x and decode >= 1.5x transformers', at batch 1 and 4.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_generation  # benchmarks/timing.py, beside this script
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

import polymodal as pm
from polymodal.processing.llava_next import crop_grid

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 rms_norm_eps=1e-5)
CANVASES_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's image_grid_pinpoints
SIZES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8),
             dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]),
    "7b-2l": ({**VIT_L_336, "num_hidden_layers": 2}, {**VICUNA_7B, "num_hidden_layers": 2}, CANVASES_336),
    "7b": ({**VIT_L_336, "num_hidden_layers": 24}, {**VICUNA_7B, "num_hidden_layers": 32}, CANVASES_336),
}
# (height, width) of the rows' images, per tower size. 336: a square on a 1 x 2 canvas (cut beside), a 3 x 1 grid
# cut beside, a 1 x 3 grid cut above and below, a 1 x 2 grid cut beside: 1176, 1224, 1160, 1464 tokens (a 480x640
# photo's 2 x 2 grid is 2340: twice the prefill, `--images 480x640`). 32: the tests' sizes, the same kinds of cuts
IMAGES = {32: "50x70,20x20,200x60,30x80", 336: "336x336,1000x120,120x1000,200x300"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, workdir: Path, dtype: torch.dtype, device: torch.device):
    """-> (transformers' model, ours, the <image> id); the weights are transformers' init."""
    vision, text, canvases = SIZES[size]
    image = text["vocab_size"] - 1
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision),
                          text_config=LlamaConfig(**text, max_position_embeddings=8192, bos_token_id=1,
                                                  eos_token_id=None, pad_token_id=0),
                          image_token_index=image, image_grid_pinpoints=canvases)
    torch.manual_seed(0)
    with torch.device(device):
        ref = LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    ref.generation_config.eos_token_id = None
    path = workdir / f"llava-next-{size}"
    ref.save_pretrained(path)
    ours = pm.optimize_for_inference(pm.load(path, dtype=dtype, device=device))
    return ref, ours, image


def prompts(sizes: list[tuple[int, int]], ours, text: int, image: int, seed: int, dtype, device) -> dict:
    """Row b: [bos, 4 words, its image's tokens, text - 4 - 4 b words], left padded with 0; pixel_values
    (B, most crops, 3, S, S) with zero crops after each image's last, image_sizes (B, 2)."""
    c = ours.config
    S = c.vision.image_size
    g = torch.Generator().manual_seed(seed)
    rows, crops = [], []
    for b, (h, w) in enumerate(sizes):
        words = torch.randint(3, image, (max(text - 4 * b, 6),), generator=g).tolist()
        rows.append([1] + words[:4] + [image] * c.tokens(h, w) + words[4:])
        rows_, cols = crop_grid(h, w, c.image_grid_pinpoints, S)
        crops.append(1 + rows_ * cols)
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px = torch.zeros(len(sizes), max(crops), 3, S, S)
    for b, n in enumerate(crops):
        px[b, :n] = torch.randn(n, 3, S, S, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": px.to(device, dtype),
            "image_sizes": torch.tensor(sizes).to(device)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def report(name: str, wall: list[float], cpu: list[float], ref_value: str, our_value: str, note: str = "") -> None:
    print(f"{name:<18} wall {statistics.median(wall):5.2f}x ({min(wall):.2f}-{max(wall):.2f})  "
          f"cpu {statistics.median(cpu):5.2f}x ({min(cpu):.2f}-{max(cpu):.2f})   ref {ref_value}   ours {our_value}"
          f"{note}   [{load()}]", flush=True)


@torch.inference_mode()
def bench_generate(label: str, ref, ours, sizes: list[tuple[int, int]], image: int, args, sync) -> None:
    p = next(ours.parameters())
    x = prompts(sizes, ours, args.prompt, image, seed=len(sizes), dtype=p.dtype, device=p.device)
    diff = relative(ours(**x, logits_to_keep=1), ref(**x, logits_to_keep=1).logits)

    def run_ref(n):
        return ref.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours(n):
        return ours.generate(x["input_ids"], max_new_tokens=n, eos_token_id=[],
                             **{k: v for k, v in x.items() if k != "input_ids"})

    same = run_ref(args.new).tolist() == run_ours(args.new).tolist()  # also the warm-up
    if not same and not args.keep_going:
        raise SystemExit(f"{label} b{len(sizes)}: greedy tokens differ from transformers'; nothing timed")
    cpu: dict = {}
    result = paired_generation(run_ref, run_ours, args.new, args.rounds, sync, cpu)
    B, T = x["input_ids"].shape
    for k, name in (("first", "TTFT"), ("token", "decode")):
        wall, ref_t, our_t = result[k]
        value = (lambda s: f"{s * 1000:8.1f} ms") if k == "first" else (lambda s: f"{B / s:7.2f} tok/s")
        report(f"{label} b{B} {name}", wall, cpu[k][0], value(ref_t), value(our_t),
               f"   {T} positions, logits rel diff {diff:.1e}" + ("" if same else "   (greedy tokens differ!)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,7b-2l", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--images", default="", help="the rows' image sizes, HxW comma-separated (batch 1: the first); "
                                                "by default 4 sizes of different crop grids for the tower's size")
    p.add_argument("--prompt", type=int, default=32, help="text tokens of the first row, besides the image's")
    p.add_argument("--new", type=int, default=8, help="generated tokens per row in the decode measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--keep-going", action="store_true", help="time even where the greedy tokens differ")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {device} {args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds, "
          f"prompt {args.prompt} text tokens + one image per row, new {args.new}   [{load()}]", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            ref, ours, image = build(size, Path(tmp), dtype, device)
            spec = args.images or IMAGES[ours.config.vision.image_size]
            images = [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]
            for batch in map(int, args.batches.split(",")):
                if batch > len(images):
                    raise SystemExit(f"batch {batch} needs {batch} --images, got {len(images)}")
                bench_generate(size, ref, ours, images[:batch], image, args, sync)
            del ref, ours
            gc.collect()


if __name__ == "__main__":
    main()
