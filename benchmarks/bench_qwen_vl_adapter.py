"""Qwen-VL's adapter and vision tower speed: polymodal's `Resampler` / `VisionTower` against a reference reading of
the official code (visual.py on the hub: it is not in transformers), same weights, one process, paired rounds.

    python benchmarks/bench_qwen_vl_adapter.py                          # tiny + the real widths, 1 and 4 images
    python benchmarks/bench_qwen_vl_adapter.py --sizes bigG-2l --parts adapter --images 1 --rounds 3

Each size is a checkpoint with the official tensor names and shapes (random values), written as the hub's files are
(safetensors + config.json) and loaded with `pm.load`, then `pm.optimize_for_inference`, as the pipelines run it.
"bigG-2l" has Qwen-VL's widths: 448-px images of 14-px patches (32 x 32 = 1024 patch tokens), the 1664-wide,
16-head ViT-bigG tower (MLP 8192) with 2 of its 48 layers, and the adapter: 256 learned queries of width 4096
(32 heads of 128) cross-attending once over kv_proj(patches) 1664 -> 4096. The LLM the checkpoint needs beside it
is one 4096-wide layer with a 300-entry vocabulary (never run here). "tiny" is the tests' shape.

The reference is the official computation written out here with torch's own modules:

  adapter = torch.nn.MultiheadAttention (the module the official Resampler holds) on the same in_proj / out_proj
            weights, fed ln_q(query) + pos (sequence-first, the query repeated per image), ln_kv(kv_proj(x)) + pos
            resampled bicubically to the patch grid, and ln_kv(kv_proj(x)). Two rows: "mha" calls it as the official
            code does (torch's default need_weights=True, which also averages the attention weights), "mha-nw" with
            need_weights=False (its fused path).
  tower   = conv1 + the resampled positional_embedding, ln_pre, each block's VisualAttention as visual.py computes it
            (sequence-first, in_proj viewed per head as (heads, 3 * head_dim), q / sqrt(head_dim) @ k^T by bmm,
            softmax, @ v) and its exact-GELU MLP, then the adapter above ("mha"), ln_post, @ proj.

Before anything is timed the outputs are compared (max |difference|, relative to the largest reference value; fp32
should be ~1e-6, and more than 1e-4 stops the run). We print the median over rounds of the paired ratio
reference_time / our_time (> 1: polymodal is faster) with its range, rounds alternating which side runs first, in
wall time and in process CPU time (on a CPU other processes share, the wall time also counts their slices), and the
load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timing import paired_rounds  # benchmarks/timing.py, beside this script

import polymodal as pm

TOLERANCE = 1e-4  # relative to the largest reference value: fp32 reorderings give ~1e-6, a wrong formula 1e-2 and up
SIZES = {
    "tiny": (dict(image_size=56, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2.5, n_queries=9,
                  output_dim=256),
             dict(hidden_size=256, num_attention_heads=4)),
    "bigG-2l": (dict(image_size=448, patch_size=14, width=1664, layers=2, heads=16, mlp_ratio=4.9231, n_queries=256,
                     output_dim=4096),
                dict(hidden_size=4096, num_attention_heads=32)),
}
SIZES["bigG"] = ({**SIZES["bigG-2l"][0], "layers": 48}, SIZES["bigG-2l"][1])  # the checkpoint's depth
VOCAB, START = 300, 290  # the LLM beside the tower: a small vocabulary, <img> = 290


def official_tensors(visual: dict, text: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names (visual.py, modeling_qwen.py), scaled so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    W, D, Q = visual["width"], visual["output_dim"], visual["n_queries"]
    mlp = int(W * visual["mlp_ratio"])

    def r(*shape, scale=None):
        scale = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n, bias=True):
        return {f"{prefix}.weight": 1 + r(n), **({f"{prefix}.bias": r(n)} if bias else {})}

    t = {"conv1.weight": r(W, 3, 14, 14, scale=(3 * 14 * 14) ** -0.5), "positional_embedding": r(256, W, scale=0.5),
         **norm("ln_pre", W)}
    for i in range(visual["layers"]):
        b = f"transformer.resblocks.{i}"
        t.update({**norm(f"{b}.ln_1", W), f"{b}.attn.in_proj.weight": r(3 * W, W), f"{b}.attn.in_proj.bias": r(3 * W),
                  f"{b}.attn.out_proj.weight": r(W, W), f"{b}.attn.out_proj.bias": r(W), **norm(f"{b}.ln_2", W),
                  f"{b}.mlp.c_fc.weight": r(mlp, W), f"{b}.mlp.c_fc.bias": r(mlp), f"{b}.mlp.c_proj.weight": r(W, mlp),
                  f"{b}.mlp.c_proj.bias": r(W)})
    p = "attn_pool"
    t.update({f"{p}.query": r(Q, D, scale=0.5), f"{p}.pos_embed": r(Q, D, scale=0.5), f"{p}.kv_proj.weight": r(D, W),
              f"{p}.attn.in_proj_weight": r(3 * D, D), f"{p}.attn.in_proj_bias": r(3 * D),
              f"{p}.attn.out_proj.weight": r(D, D), f"{p}.attn.out_proj.bias": r(D), **norm(f"{p}.ln_q", D),
              **norm(f"{p}.ln_kv", D), **norm("ln_post", D), "proj": r(D, D)})
    out = {f"transformer.visual.{k}": x for k, x in t.items()}
    inter = 256  # the LLM's MLP halves (w1, w2), small: it is never run here
    out["transformer.wte.weight"] = r(VOCAB, D, scale=0.5)
    h = "transformer.h.0"
    out.update({**norm(f"{h}.ln_1", D, bias=False), f"{h}.attn.c_attn.weight": r(3 * D, D),
                f"{h}.attn.c_attn.bias": r(3 * D), f"{h}.attn.c_proj.weight": r(D, D),
                **norm(f"{h}.ln_2", D, bias=False), f"{h}.mlp.w1.weight": r(inter, D),
                f"{h}.mlp.w2.weight": r(inter, D),
                f"{h}.mlp.c_proj.weight": r(D, inter), **norm("transformer.ln_f", D, bias=False),
                "lm_head.weight": r(VOCAB, D)})
    return out


def write(path: Path, visual: dict, text: dict, tensors: dict) -> Path:
    """The hub's files: model.safetensors and the official config.json (QWenConfig with its `visual` object)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    D, heads = text["hidden_size"], text["num_attention_heads"]
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": VOCAB, "hidden_size": D,
              "intermediate_size": 2 * 256, "num_hidden_layers": 1, "num_attention_heads": heads,
              "kv_channels": D // heads, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
              "no_bias": True, "max_position_embeddings": 8192, "seq_length": 2048, "use_dynamic_ntk": True,
              "use_logn_attn": True, "tie_word_embeddings": False, "visual": {**visual, "image_start_id": START}}
    (path / "config.json").write_text(json.dumps(config))
    return path


# ------------------------------------------------------------------------------------------ the reference


def abs_pos(pos: torch.Tensor, n: int) -> torch.Tensor:
    """visual.py's get_abs_pos: a square grid of positions (M, D) resampled bicubically to sqrt(n) x sqrt(n)."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(n)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def ln(t: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], t[f"{prefix}.weight"], t[f"{prefix}.bias"], 1e-6)


class Reference:
    """The official tower and Resampler written out on the checkpoint's tensors (prefix transformer.visual. cut)."""

    def __init__(self, tensors: dict, visual: dict):
        self.t = {k[len("transformer.visual."):]: v for k, v in tensors.items() if k.startswith("transformer.visual.")}
        self.visual = visual
        D = self.t["attn_pool.query"].shape[1]
        self.mha = torch.nn.MultiheadAttention(D, D // 128).eval()  # the official Resampler's module and heads
        self.mha.load_state_dict({"in_proj_weight": self.t["attn_pool.attn.in_proj_weight"],
                                  "in_proj_bias": self.t["attn_pool.attn.in_proj_bias"],
                                  "out_proj.weight": self.t["attn_pool.attn.out_proj.weight"],
                                  "out_proj.bias": self.t["attn_pool.attn.out_proj.bias"]})

    def resampler(self, x: torch.Tensor, need_weights: bool = True) -> torch.Tensor:
        """(N, L, W) patch features -> (N, Q, D), as the official Resampler.forward."""
        t = self.t
        pos = t["attn_pool.pos_embed"]  # (Q, D)
        pos_k = abs_pos(pos, x.shape[1])  # (L, D)
        kv = ln(t, "attn_pool.ln_kv", F.linear(x, t["attn_pool.kv_proj.weight"])).permute(1, 0, 2)  # (L, N, D)
        q = ln(t, "attn_pool.ln_q", t["attn_pool.query"])  # (Q, D)
        out = self.mha(q[:, None].repeat(1, x.shape[0], 1) + pos[:, None], kv + pos_k[:, None], kv,
                       need_weights=need_weights)[0]  # (Q, N, D)
        return out.permute(1, 0, 2)

    def attention(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """visual.py's VisualAttention on (L, N, W), sequence-first: in_proj viewed (L, N, heads, 3 * hd)."""
        t, heads = self.t, self.visual["heads"]
        L, N, W = x.shape
        hd = W // heads
        mixed = F.linear(x, t[f"{prefix}.in_proj.weight"], t[f"{prefix}.in_proj.bias"]).view(L, N, heads, 3 * hd)
        q, k, v = (y.reshape(L, N * heads, hd).transpose(0, 1) for y in mixed.split(hd, dim=-1))  # (N H, L, hd)
        probs = torch.bmm(q / math.sqrt(hd), k.transpose(-2, -1)).softmax(dim=-1)  # (N H, L, L)
        out = torch.bmm(probs, v).view(N, heads, L, hd).permute(2, 0, 1, 3).reshape(L, N, W)
        return F.linear(out, t[f"{prefix}.out_proj.weight"], t[f"{prefix}.out_proj.bias"])

    def tower(self, px: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, Q, D)."""
        t = self.t
        x = F.conv2d(px, t["conv1.weight"], stride=self.visual["patch_size"]).flatten(2).transpose(1, 2)  # (N, L, W)
        x = ln(t, "ln_pre", x + abs_pos(t["positional_embedding"], x.shape[1])).permute(1, 0, 2)  # (L, N, W)
        for i in range(self.visual["layers"]):
            b = f"transformer.resblocks.{i}"
            x = x + self.attention(f"{b}.attn", ln(t, f"{b}.ln_1", x))
            h = F.gelu(F.linear(ln(t, f"{b}.ln_2", x), t[f"{b}.mlp.c_fc.weight"], t[f"{b}.mlp.c_fc.bias"]))
            x = x + F.linear(h, t[f"{b}.mlp.c_proj.weight"], t[f"{b}.mlp.c_proj.bias"])
        return ln(t, "ln_post", self.resampler(x.permute(1, 0, 2))) @ t["proj"]


# ------------------------------------------------------------------------------------------ timing


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def compare(name: str, run_ref, run_ours, rounds: int) -> None:
    diff = relative(run_ours(), run_ref())  # also the warm-up
    if diff > TOLERANCE:
        raise SystemExit(f"{name}: ours differs from the reference by {diff:.1e} (relative); nothing timed")
    cpu: dict = {}
    wall, ref_t, our_t = paired_rounds(run_ref, run_ours, rounds, cpu=cpu)
    ms = lambda t: f"{statistics.median(t) * 1e3:8.1f} ms"  # noqa: E731
    r = cpu["ratios"]
    print(f"{name:<28} wall {statistics.median(wall):5.2f}x ({min(wall):.2f}-{max(wall):.2f})  "
          f"cpu {statistics.median(r):5.2f}x ({min(r):.2f}-{max(r):.2f})   ref {ms(ref_t)}   ours {ms(our_t)}   "
          f"rel diff {diff:.1e}   [{load()}]", flush=True)


@torch.inference_mode()
def bench(size: str, ours, ref: Reference, parts: list[str], images: list[int], rounds: int) -> None:
    v = ours.config.vision
    L = v.grid ** 2
    for n in images:
        g = torch.Generator().manual_seed(n)
        if "adapter" in parts:
            x = torch.randn(n, L, v.width, generator=g)  # (N, L, W): what ln_pre and the blocks hand the adapter
            for label, nw in (("mha", True), ("mha-nw", False)):
                compare(f"{size} adapter {label} n{n}", lambda x=x, nw=nw: ref.resampler(x, need_weights=nw),
                        lambda x=x: ours.visual.attn_pool(x), rounds)
        if "tower" in parts:
            px = torch.randn(n, 3, v.image_size, v.image_size, generator=g)
            compare(f"{size} tower {v.layers}l n{n}", lambda px=px: ref.tower(px),
                    lambda px=px: ours.visual(px), rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,bigG-2l", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--parts", default="adapter,tower", help="comma-separated: adapter, tower")
    p.add_argument("--images", default="1,4", help="images per call, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu fp32, threads {torch.get_num_threads()}, {args.rounds} rounds   "
          f"[{load()}]", flush=True)
    parts, images = args.parts.split(","), [int(n) for n in args.images.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            visual, text = SIZES[size]
            tensors = official_tensors(visual, text)
            ours = pm.optimize_for_inference(pm.load(write(Path(tmp) / size, visual, text, tensors)))
            bench(size, ours, Reference(tensors, visual), parts, images, args.rounds)
            del ours, tensors
            gc.collect()


if __name__ == "__main__":
    main()
