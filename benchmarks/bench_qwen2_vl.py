"""Qwen2-VL / Qwen2.5-VL speed: polymodal vs transformers' `Qwen2VLForConditionalGeneration` and
`Qwen2_5_VLForConditionalGeneration`, same weights, one process, paired rounds.

    python benchmarks/bench_qwen2_vl.py                                   # both families, tiny + 7B widths
    python benchmarks/bench_qwen2_vl.py --families qwen2_5_vl --sizes 7b-4v2l --batches 1 --rounds 3
    python benchmarks/bench_qwen2_vl.py --parts tower                     # the vision towers only
    python benchmarks/bench_qwen2_vl.py --sizes 7b --device cuda --dtype bf16 --batches 1 --grids 1x72x72
                                                                          # the real 7B shapes on a GPU (1008^2 px)

Each size is built with random weights by transformers and loaded into polymodal from its `save_pretrained` files
(then `pm.optimize_for_inference`, as the pipelines run it). "7b-4v2l" has the 7B checkpoints' widths (the 1280-wide,
16-head vision tower and its 5120 -> 3584 merger; the 3584-wide, 28-head / 4-KV-head decoder with its 152,064-entry
vocabulary) with 4 vision and 2 decoder layers, so both models fit a 2-core CPU with 24 GB; Qwen2.5-VL's keeps 112-px
windows and makes its last vision layer a full-attention one (the checkpoints': every 8th). "tiny" is the tests'
shape; "7b" is the checkpoints' full depth (32 vision and 28 decoder layers), for a GPU. Images are
processor-shaped rows of random patches: a 448x448 image is grid (1, 32, 32): 1024 patches, 256 merged tokens.

  tower  = the vision tower alone on one image (patch embedding, blocks, merger), for each --grids entry
  TTFT   = time of generate(max_new_tokens=1): the tower, the merge, the M-RoPE positions and the prefill
  decode = (time of generate(max_new_tokens=N) - TTFT) / (N - 1)    -> generated tokens / s (all rows)

Batch 1 is one image of the first grid and --prompt text tokens; batch 4 is four prompts, each with an image of a
different grid (--batch-grids) and --prompt text tokens, left padded. Before anything is timed, the tower's
features and the prompt's last logits are compared (max |difference|, relative to the largest reference value)
and the greedy tokens must be identical (end-of-sequence disabled, so both generate --new tokens). We print the
median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster) with its range,
alternating which side runs first.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_generation, paired_rounds  # benchmarks/timing.py, beside this script
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import polymodal as pm

PATCH_DIM = 3 * 2 * 14 * 14  # channels x 2 frames x 14 x 14 pixels: one row of pixel_values
# the 7B checkpoints' decoder (Qwen2-VL-7B and Qwen2.5-VL-7B share it), with 2 layers
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, num_hidden_layers=2,
               rope_parameters={"rope_type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
TEXT_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2,
                 rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
VISION = {
    ("qwen2_vl", "tiny"): dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    ("qwen2_vl", "7b-4v2l"): dict(depth=4, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
    ("qwen2_5_vl", "tiny"): dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                                 window_size=112, fullatt_block_indexes=[2], tokens_per_second=2),
    ("qwen2_5_vl", "7b-4v2l"): dict(depth=4, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420,
                                    num_heads=16, window_size=112, fullatt_block_indexes=[3], tokens_per_second=2),
}
VISION[("qwen2_vl", "7b")] = {**VISION[("qwen2_vl", "7b-4v2l")], "depth": 32}
VISION[("qwen2_5_vl", "7b")] = {**VISION[("qwen2_5_vl", "7b-4v2l")], "depth": 32,
                                "fullatt_block_indexes": [7, 15, 23, 31]}
TEXT = {"tiny": TEXT_TINY, "7b-4v2l": TEXT_7B, "7b": {**TEXT_7B, "num_hidden_layers": 28}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def build(family: str, size: str, workdir: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """-> (transformers' model, ours, (image, start, end) token ids); the weights are transformers' init."""
    text = TEXT[size]
    V = text["vocab_size"]
    tokens = dict(image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1)
    cls = CLASSES[family]
    cfg = cls.config_class(vision_config=VISION[family, size],
                           text_config={**text, "max_position_embeddings": 4096, "bos_token_id": 1,
                                        "eos_token_id": None, "pad_token_id": 0}, **tokens)
    torch.manual_seed(0)
    with torch.device(device):
        ref = cls(cfg).to(dtype).eval()
    ref.generation_config.eos_token_id = None
    path = workdir / f"{family}-{size}"
    ref.save_pretrained(path)
    ours = pm.optimize_for_inference(pm.load(path, dtype=dtype, device=device))
    return ref, ours, (tokens["image_token_id"], tokens["vision_start_token_id"], tokens["vision_end_token_id"])


def prompts(grids: list[list[int]], text: int, tokens, vocab: int, seed: int, dtype=torch.float32,
            device="cpu") -> tuple[dict, dict]:
    """One row per grid: [bos, text/2 tokens, start, image tokens, end, text/2 tokens], left padded with 0 ->
    (our inputs, transformers' inputs: ours and mm_token_type_ids)."""
    image, start, end = tokens
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t, h, w in grids:
        words = torch.randint(3, image, (text,), generator=g).tolist()
        rows.append([1] + words[: text // 2] + [start] + [image] * (t * h * w // 4) + [end] + words[text // 2:])
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g).to(device, dtype)
    ids, mask, grid = ids.to(device), mask.to(device), grid.to(device)
    ours = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid}
    return ours, {**ours, "mm_token_type_ids": (ids == image).long()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def report(name: str, ratios: list[float], ref_value: str, our_value: str, note: str = "") -> None:
    print(f"{name:<34} ratio {statistics.median(ratios):5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})   "
          f"ref {ref_value}   ours {our_value}{note}", flush=True)


@torch.inference_mode()
def bench_tower(label: str, ref, ours, grid: list[int], rounds: int, sync=lambda: None) -> None:
    g = torch.Generator().manual_seed(sum(grid))
    p = next(ours.parameters())
    thw = torch.tensor([grid], device=p.device)
    px = torch.randn(int(thw.prod()), PATCH_DIM, generator=g).to(p.device, p.dtype)

    def run_ref():
        return ref.model.visual(px, grid_thw=thw).pooler_output

    def run_ours():
        return ours.visual(px, thw)

    diff = relative(run_ours(), run_ref())  # also the warm-up
    ratios, ref_t, our_t = paired_rounds(run_ref, run_ours, rounds, sync)
    ms = lambda t: f"{statistics.median(t) * 1e3:8.1f} ms"  # noqa: E731
    report(f"{label} tower {'x'.join(map(str, grid))}", ratios, ms(ref_t), ms(our_t), f"   rel diff {diff:.1e}")


@torch.inference_mode()
def bench_generate(label: str, ref, ours, grids: list[list[int]], tokens, args, sync=lambda: None) -> None:
    p = next(ours.parameters())
    mine, theirs = prompts(grids, args.prompt, tokens, ours.config.text.vocab_size, seed=len(grids), dtype=p.dtype,
                           device=p.device)
    want = ref(**theirs, logits_to_keep=8).logits
    got = ours(**mine, logits_to_keep=8)
    diff = relative(got, want)

    def run_ref(n):
        return ref.generate(**theirs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours(n):
        return ours.generate(mine["input_ids"], max_new_tokens=n, eos_token_id=[],
                             **{k: v for k, v in mine.items() if k != "input_ids"})

    same = run_ref(args.new).tolist() == run_ours(args.new).tolist()  # also the warm-up
    result = paired_generation(run_ref, run_ours, args.new, args.rounds, sync)
    B = len(grids)
    for k, name in (("first", "TTFT"), ("token", "decode")):
        ratios, ref_t, our_t = result[k]
        value = (lambda s: f"{s * 1000:8.1f} ms") if k == "first" else (lambda s: f"{B / s:8.1f} tok/s")
        report(f"{label} b{B} {name}", ratios, value(ref_t), value(our_t),
               f"   logits rel diff {diff:.1e}" + ("" if same else "   (greedy tokens differ!)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="qwen2_vl,qwen2_5_vl", help=f"comma-separated, from {sorted(CLASSES)}")
    p.add_argument("--sizes", default="tiny,7b-4v2l", help=f"comma-separated, from {sorted(TEXT)}")
    p.add_argument("--parts", default="tower,generate", help="comma-separated: tower, generate")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--grids", default="1x32x32,1x16x16", help="the tower's images (t x h x w patches)")
    p.add_argument("--batch-grids", default="1x32x32,1x24x32,1x16x24,1x16x16",
                   help="batch 4's images, one per row (batch 1 takes the first)")
    p.add_argument("--prompt", type=int, default=64, help="text tokens per row, besides the image's")
    p.add_argument("--new", type=int, default=16, help="generated tokens per row in the decode measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parse = lambda s: [[int(v) for v in g.split("x")] for g in s.split(",")]  # noqa: E731
    tower_grids, batch_grids = parse(args.grids), parse(args.batch_grids)
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {device} {args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds, "
          f"text prompt {args.prompt} + one image per row, new {args.new}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for size in args.sizes.split(","):
                ref, ours, tokens = build(family, size, Path(tmp), dtype, device)
                label = f"{family} {size}"
                if "tower" in parts:
                    for grid in tower_grids:
                        bench_tower(label, ref, ours, grid, args.rounds, sync)
                if "generate" in parts:
                    for batch in map(int, args.batches.split(",")):
                        if batch > len(batch_grids):
                            raise SystemExit(f"batch {batch} needs {batch} --batch-grids, got {len(batch_grids)}")
                        bench_generate(label, ref, ours, batch_grids[:batch], tokens, args, sync)
                del ref, ours
                gc.collect()


if __name__ == "__main__":
    main()
