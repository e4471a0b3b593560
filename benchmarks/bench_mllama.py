"""Llama 3.2 Vision speed: polymodal vs transformers' `MllamaForConditionalGeneration`, same weights, one process,
paired rounds.

    python benchmarks/bench_mllama.py                                     # tiny + 11B widths with few layers
    python benchmarks/bench_mllama.py --sizes 11b-2l --parts vision --tiles 1,4 --rounds 3
    python benchmarks/bench_mllama.py --sizes 11b --device cuda --dtype bf16 --batches 1 --new 64
                                                                          # Llama-3.2-11B-Vision's real shapes (a GPU)

Each size is built with random weights by transformers (its gates drawn away from their zero init, so the images
matter) and loaded into polymodal from its `save_pretrained` files, then `pm.optimize_for_inference`, as the
pipelines run it. "11b-2l" has Llama-3.2-11B-Vision's widths: the 1280-wide, 16-head vision encoder on 560-px tiles
of 14-px patches (1025 positions a tile, up to 4 tiles) with 2 local + 1 global layers, keeping 5 intermediate
states as the checkpoint does (so the projector is its 7680 -> 4096); the 4096-wide decoder (32 heads, 8 KV heads,
14336 MLP, 128,256 + 8 embedding rows, Llama 3.1 RoPE) with 2 self-attention layers and 1 gated cross-attention
layer. It fits a 2-core CPU with 24 GB (about 7.5 GB a model in fp32). "11b" is the checkpoint's depth (32 + 8 vision
layers, 40 decoder layers of which 8 cross), for a GPU; "tiny" is the tests' shape.

  vision = the vision encoder alone on one image of --tiles tiles (padded to 4, as the processor pads), projected
  TTFT   = time of generate(max_new_tokens=1): the vision encoder, the projector, the cross keys/values, the prefill
  decode = (time of generate(max_new_tokens=N) - TTFT) / (N - 1)    -> generated tokens / s (all rows)

Batch 1 is one image of the first --batch-tiles count; batch 4 is four rows with one image each, of different tile
counts (--batch-tiles: 4, 2, 1, 3 tiles by default), and text prompts of different lengths, left padded. A few
text tokens come before each row's <|image|> (they see no image, as a chat header does). Before anything is timed the
vision states and the prompt's last logits are compared (max |difference| relative to the largest reference value)
and greedy tokens must be identical (end-of-sequence disabled, so both generate --new tokens).

We print the median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster) with its
range, rounds alternating which side runs first, in wall time and in process CPU time (all threads of this
process: on a CPU other processes share, the wall time also counts their slices), and the load average.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_generation, paired_rounds  # benchmarks/timing.py, beside this script
from torch import nn
from transformers import MllamaConfig, MllamaForConditionalGeneration

import polymodal as pm

_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
VISION_11B = dict(hidden_size=1280, intermediate_size=5120, attention_heads=16, image_size=560, patch_size=14,
                  max_num_tiles=4, num_hidden_layers=32, num_global_layers=8,
                  intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680)
TEXT_11B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, num_hidden_layers=40, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                rms_norm_eps=1e-5, max_position_embeddings=131072, rope_parameters=_LLAMA31_ROPE)
SIZES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                  image_size=32, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[1, 3],
                  vision_output_dim=96),
             dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=512,
                  rope_parameters={**_LLAMA31_ROPE, "original_max_position_embeddings": 64})),
    # 2 local layers keep the checkpoint's 5 intermediate states (layers 0, 0, 1, 1, 1): the 7680-wide projector input
    "11b-2l": ({**VISION_11B, "num_hidden_layers": 2, "num_global_layers": 1,
                "intermediate_layers_indices": [0, 0, 1, 1, 1]},
               {**TEXT_11B, "num_hidden_layers": 3, "cross_attention_layers": [1]}),
    "11b": (VISION_11B, TEXT_11B),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ASPECT = {1: 1, 2: 2, 3: 3, 4: 6}  # tiles -> an aspect ratio id of the default list: (1, 1), (1, 2), (1, 3), (2, 2)


def text_weights(ref):
    """transformers' decoder weights that hold most of the memory -> {key: module whose .weight it is}: the embedding,
    the head, and each layer's attention and MLP projections."""
    lm = ref.model.language_model
    out = {("embed",): lm.embed_tokens, ("head",): ref.lm_head}
    for i, layer in enumerate(lm.layers):
        attn = layer.cross_attn if hasattr(layer, "cross_attn") else layer.self_attn
        out.update({(i, n): getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        out.update({(i, n): getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")})
    return out


def our_weight(ours, key) -> torch.Tensor:
    """The tensor of ours that holds the same values as transformers' weight `key` (a row block of a fused one)."""
    lm, c = ours.language_model, ours.config.text
    if key == ("embed",):
        return lm.embed_tokens.weight
    if key == ("head",):
        return lm.lm_head.weight
    i, name = key
    layer = lm.layers[i]
    if name.endswith("proj") and name[:-5] in ("gate", "up", "down"):
        return getattr(layer.mlp, name).weight
    q, kv = c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
    if hasattr(layer, "cross_attn"):
        a = layer.cross_attn
        k, v = a.kv.weight.split(kv)
        parts = {"q_proj": a.q.weight, "k_proj": k, "v_proj": v, "o_proj": a.proj.weight}
    else:
        a = layer.attn
        parts = {"o_proj": a.proj.weight, **dict(zip(("q_proj", "k_proj", "v_proj"), a.qkv.weight.split([q, kv, kv])))}
    return parts[name]


def build(size: str, workdir: Path, dtype: torch.dtype, device: torch.device):
    """-> (transformers' model, ours, the <|image|> id); the weights are transformers' init, gates drawn in [0.3, 1].

    Both models would not fit 24 GB at 11b-2l (7.5 GB each in fp32, and our prepacked copies): once the files are
    written, transformers' decoder weights are dropped and then pointed at ours, which hold the same values (checked:
    each one's sum in float64 before and after). Each side still multiplies in its own layout."""
    vision, text = SIZES[size]
    image = text["vocab_size"]  # <|image|>: the first of the 8 rows past the vocabulary, as the checkpoints have it
    cfg = MllamaConfig(vision_config=vision, text_config={**text, "bos_token_id": 1, "eos_token_id": None,
                                                          "pad_token_id": 0},
                       image_token_index=image)
    torch.manual_seed(0)
    with torch.device(device):
        ref = MllamaForConditionalGeneration(cfg).to(dtype).eval()
        with torch.no_grad():  # at their zero init the cross-attention gates would make the images not matter
            for name, p in ref.named_parameters():
                if "gate" in name:
                    p.uniform_(0.3, 1.0)
    ref.generation_config.eos_token_id = None
    path = workdir / f"mllama-{size}"
    ref.save_pretrained(path, max_shard_size="2GB")  # each shard is serialized in memory before it is written
    shared = text_weights(ref)
    sums = {}
    for key, module in shared.items():
        sums[key] = float(module.weight.detach().double().sum())
        module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    gc.collect()
    ours = pm.optimize_for_inference(pm.load(path, dtype=dtype, device=device))
    with torch.no_grad():
        for key, module in shared.items():
            w = our_weight(ours, key)
            if float(w.double().sum()) != sums[key]:
                raise SystemExit(f"transformers' weight {key} is not ours {tuple(w.shape)}: cannot share it")
            module.weight = nn.Parameter(w.detach(), requires_grad=False)
    return ref, ours, image


def images(tiles: list[int], side: int, g: torch.Generator, dtype, device) -> dict:
    """One image per row, of tiles[b] tiles, padded to 4 with zero tiles -> pixel_values (B, 1, 4, 3, side, side),
    aspect_ratio_ids (B, 1), aspect_ratio_mask (B, 1, 4), as the processor lays them out."""
    B = len(tiles)
    px = torch.zeros(B, 1, 4, 3, side, side)
    mask = torch.zeros(B, 1, 4, dtype=torch.long)
    for b, n in enumerate(tiles):
        px[b, 0, :n] = torch.randn(n, 3, side, side, generator=g)
        mask[b, 0, :n] = 1
    ids = torch.tensor([[ASPECT[n]] for n in tiles])
    return {"pixel_values": px.to(device, dtype), "aspect_ratio_ids": ids.to(device),
            "aspect_ratio_mask": mask.to(device)}


def prompts(tiles: list[int], text: int, image: int, side: int, seed: int, dtype, device) -> dict:
    """Row b: [bos, 4 words, <|image|>, text - 4 - 4 b words], left padded with 0, its image of tiles[b] tiles; the
    cross-attention mask lets the tokens from <|image|> on see that image's real tiles."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(len(tiles)):
        words = torch.randint(3, image, (max(text - 4 * b, 6),), generator=g).tolist()
        rows.append([1] + words[:4] + [image] + words[4:])
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    cam = torch.zeros(len(rows), T, 1, 4, dtype=torch.long)
    for b, (r, n) in enumerate(zip(rows, tiles)):
        cam[b, T - len(r) + r.index(image):, 0, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "cross_attention_mask": cam.to(device),
            **images(tiles, side, g, dtype, device)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def report(name: str, wall: list[float], cpu: list[float], ref_value: str, our_value: str, note: str = "") -> None:
    print(f"{name:<24} wall {statistics.median(wall):5.2f}x ({min(wall):.2f}-{max(wall):.2f})  "
          f"cpu {statistics.median(cpu):5.2f}x ({min(cpu):.2f}-{max(cpu):.2f})   ref {ref_value}   ours {our_value}"
          f"{note}   [{load()}]", flush=True)


@torch.inference_mode()
def bench_vision(label: str, ref, ours, tiles: int, rounds: int, sync) -> None:
    p = next(ours.parameters())
    x = images([tiles], ours.config.vision.image_size, torch.Generator().manual_seed(tiles), p.dtype, p.device)

    def run_ref():
        states = ref.model.vision_model(**x).last_hidden_state
        return ref.model.multi_modal_projector(states)

    def run_ours():
        return ours.image_states(x["pixel_values"], x["aspect_ratio_ids"], x["aspect_ratio_mask"])

    want = run_ref()  # also the warm-up
    diff = relative(run_ours().reshape(want.shape), want)
    cpu: dict = {}
    wall, ref_t, our_t = paired_rounds(run_ref, run_ours, rounds, sync, cpu)
    ms = lambda t: f"{statistics.median(t) * 1e3:8.1f} ms"  # noqa: E731
    report(f"{label} vision {tiles}t", wall, cpu["ratios"], ms(ref_t), ms(our_t), f"   rel diff {diff:.1e}")


@torch.inference_mode()
def bench_generate(label: str, ref, ours, tiles: list[int], image: int, args, sync) -> None:
    p = next(ours.parameters())
    x = prompts(tiles, args.prompt, image, ours.config.vision.image_size, seed=len(tiles), dtype=p.dtype,
                device=p.device)
    diff = relative(ours(**x, logits_to_keep=1), ref(**x, logits_to_keep=1).logits)

    def run_ref(n):
        return ref.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours(n):
        return ours.generate(x["input_ids"], max_new_tokens=n, eos_token_id=[],
                             **{k: v for k, v in x.items() if k != "input_ids"})

    same = run_ref(args.new).tolist() == run_ours(args.new).tolist()  # also the warm-up
    if not same and not args.keep_going:
        raise SystemExit(f"{label} b{len(tiles)}: greedy tokens differ from transformers'; nothing timed")
    cpu: dict = {}
    result = paired_generation(run_ref, run_ours, args.new, args.rounds, sync, cpu)
    B = len(tiles)
    for k, name in (("first", "TTFT"), ("token", "decode")):
        wall, ref_t, our_t = result[k]
        value = (lambda s: f"{s * 1000:8.1f} ms") if k == "first" else (lambda s: f"{B / s:7.2f} tok/s")
        report(f"{label} b{B} {name}", wall, cpu[k][0], value(ref_t), value(our_t),
               f"   logits rel diff {diff:.1e}" + ("" if same else "   (greedy tokens differ!)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,11b-2l", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--parts", default="vision,generate", help="comma-separated: vision, generate")
    p.add_argument("--tiles", default="1,4", help="the vision encoder's images: tiles per image (1-4)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--batch-tiles", default="4,2,1,3", help="batch 4's images' tiles, one per row (batch 1: the first)")
    p.add_argument("--prompt", type=int, default=48, help="text tokens of the first row, besides <|image|>")
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
    batch_tiles = [int(t) for t in args.batch_tiles.split(",")]
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {device} {args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds, "
          f"prompt {args.prompt} text tokens + one image per row, new {args.new}   [{load()}]", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            ref, ours, image = build(size, Path(tmp), dtype, device)
            if "vision" in parts:
                for tiles in map(int, args.tiles.split(",")):
                    bench_vision(size, ref, ours, tiles, args.rounds, sync)
            if "generate" in parts:
                for batch in map(int, args.batches.split(",")):
                    if batch > len(batch_tiles):
                        raise SystemExit(f"batch {batch} needs {batch} --batch-tiles, got {len(batch_tiles)}")
                    bench_generate(size, ref, ours, batch_tiles[:batch], image, args, sync)
            del ref, ours
            gc.collect()


if __name__ == "__main__":
    main()
