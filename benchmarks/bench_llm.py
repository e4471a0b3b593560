"""Language-model generation speed: polymodal vs transformers' `generate`, same weights, one process.

    python benchmarks/bench_llm.py                      # tiny + SmolLM2-135M shape, batch 1 and 8, CPU fp32
    python benchmarks/bench_llm.py --sizes smollm2 --batches 1 --rounds 5
    python benchmarks/bench_llm.py --sizes 7b --device cuda --dtype bf16 --batches 1 --prompt 128 --new 128

On a GPU ours decodes with `generate(..., static_cache=True)` (the fixed-shape step replayed as a CUDA graph) by
default; `--modes eager,static,compile` compares the ways ours can decode, each against the same reference, in
one run (compile: `compile_step=True`, the step compiled by torch.compile; its compilation is part of the warm-up).
For each size a LLaMA-architecture model is built with random weights by transformers (`LlamaForCausalLM`,
SmolLM2-135M-Instruct's shape, or a 7B shape on a GPU) and loaded into polymodal from its `save_pretrained`
files, so both run identical weights; greedy outputs are compared token for token before anything is timed.
End-of-sequence is disabled so both always generate `--new` tokens.

Measured, per round and alternating which side runs first:
  prefill  = time of generate(max_new_tokens=1) on a `--prompt`-token prompt  -> prompt tokens / s
  decode   = (time of generate(max_new_tokens=N) - prefill time) / (N - 1)   -> generated tokens / s (per row)
and we print the median over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster).
On a GPU it also prints decode as a fraction of the memory-bandwidth ceiling (weights bytes / bandwidth per token).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_generation  # benchmarks/timing.py, beside this script
from transformers import LlamaConfig, LlamaForCausalLM

import polymodal as pm

SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0),  # Qwen2-7B's shape
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, workdir: Path, dtype: torch.dtype, device: torch.device, packed: bool):
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        ref = LlamaForCausalLM(cfg).to(dtype).eval()
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(workdir / size)
    ours = pm.load(workdir / size, dtype=dtype, device=device)
    return ref, pm.optimize_for_inference(ours) if packed else ours


MODES = {"eager": {}, "static": {"static_cache": True}, "compile": {"compile_step": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,smollm2", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=32, help="generated tokens per row in the decode measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--packed", action="store_true",
                   help="run ours after pm.optimize_for_inference, as the text-generation pipeline does")
    p.add_argument("--modes", default=None,
                   help=f"how ours decodes, comma-separated from {sorted(MODES)} (static: generate(static_cache=True), "
                        "a CUDA graph on a GPU; compile: compile_step=True); default: static on a GPU, else eager")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="GPU memory bandwidth, bytes/s (H200: 4.8e12)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = (args.modes or ("static" if device.type == "cuda" else "eager")).split(",")
    for mode in modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds, prompt {args.prompt}, new {args.new}, ours: {', '.join(modes)}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            ref, ours = build(size, Path(tmp), dtype, device, args.packed)
            weight_bytes = sum(t.numel() * t.element_size() for t in ours.state_dict().values())
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(batch)
                ids = torch.randint(3, SIZES[size]["vocab_size"], (batch, args.prompt), generator=g).to(device)
                for mode in modes:
                    compare(size, batch, mode, ref, ours, ids, args, sync, weight_bytes, device)
            del ref, ours


def compare(size, batch, mode, ref, ours, ids, args, sync, weight_bytes, device) -> None:
    """Paired rounds of one (size, batch, mode): print prefill and decode ratios."""
    mask = torch.ones_like(ids)

    def run_ref(n):
        return ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n)

    def run_ours(n):
        return ours.generate(ids, attention_mask=mask, max_new_tokens=n, **MODES[mode])

    same = run_ref(args.new).tolist() == run_ours(args.new).tolist()  # also the warm-up (and compile)
    result = paired_generation(run_ref, run_ours, args.new, args.rounds, sync)
    for k, name in (("first", "prefill"), ("token", "decode")):
        ratios, ref_t, our_t = result[k]
        per = args.prompt * batch if k == "first" else batch
        line = (f"{size:<8} b{batch:<2} {mode:<7} {name:<7} ratio {statistics.median(ratios):5.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f})   ref {per / ref_t:9.1f} tok/s   "
                f"ours {per / our_t:9.1f} tok/s")
        if k == "token" and device.type == "cuda":
            ceiling = args.bandwidth / weight_bytes
            line += f"   ceiling {ceiling:.0f} steps/s: ours {1 / our_t / ceiling:.0%}, ref {1 / ref_t / ceiling:.0%}"
        print(line + ("" if same else "   (outputs differ!)"), flush=True)

if __name__ == "__main__":
    main()
