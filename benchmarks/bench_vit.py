"""polymodal's ViT against transformers' `ViTModel` and timm's `vit_base_patch16_224`, on the same weights.

    python benchmarks/bench_vit.py                 # ViT-B/16 at batch 1 and 8, fp32 and bf16; a tiny ViT
    python benchmarks/bench_vit.py --quick         # fewer rounds, shorter timings, batch 1 only at real size
    python benchmarks/bench_vit.py --rounds 11 --threads 4 --dtypes float32 --batches 1
    python benchmarks/bench_vit.py --packed        # ours after pm.optimize_for_inference (prepacked CPU weights)

On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 is slower than fp32: ViT-B/16 at batch 1 took 7-12 s a
call on our 2-core test machine, so a full CPU run can take an hour; `--dtypes float32` skips bf16.

Each reference model is built randomly, saved in its own layout (`save_pretrained`, timm's `save_for_hf`)
and loaded into polymodal with `pm.load`, so both sides run identical weights; their outputs are compared
before anything is timed. A round times the reference and ours back to back, alternating which goes first
(so drift in a shared machine's load hits both sides alike); we print the median over rounds of the paired
ratio reference_time / our_time: above 1.0 we are faster.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification, ViTModel

import polymodal as pm

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
               patch_size=8)
TINY_TIMM = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)


Pair = tuple[Callable, torch.nn.Module, Callable, torch.nn.Module]


def pairs(size: str, workdir: Path, task: str, packed: bool = False) -> dict[str, Pair]:
    """reference name -> (reference call, reference model, our call, our model on the reference's weights).

    task "tokens": the full token output (`last_hidden_state`, timm's `forward_features`);
    task "classify": class logits (`ViTForImageClassification`, timm's `model(x)` with its head)."""
    tiny = size == "tiny"
    if task == "classify":
        labels = 10 if tiny else 1000
        hf = ViTForImageClassification(HFViTConfig(**(TINY_HF if tiny else {}), num_labels=labels)).eval()
        hf_call, timm_call, our_call = (lambda m, x: m(x).logits), (lambda m, x: m(x)), (lambda m, x: m.classify(x))
        timm_kw = {"num_classes": labels}
    else:
        hf = ViTModel(HFViTConfig(**(TINY_HF if tiny else {})), add_pooling_layer=False).eval()
        hf_call, timm_call, our_call = (lambda m, x: m(x).last_hidden_state), (lambda m, x: m.forward_features(x)), (
            lambda m, x: m(x))
        timm_kw = {}
    hf.save_pretrained(workdir / f"hf-{size}-{task}")
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, **(TINY_TIMM if tiny else {}), **timm_kw)
    save_for_hf(tm.eval(), workdir / f"timm-{size}-{task}", safe_serialization=True)
    prepare = pm.optimize_for_inference if packed else (lambda m: m)
    return {
        "transformers": (hf_call, hf, our_call, prepare(pm.load(workdir / f"hf-{size}-{task}"))),
        "timm": (timm_call, tm, our_call, prepare(pm.load(workdir / f"timm-{size}-{task}"))),
    }


def seconds_per_call(fn: Callable[[], object], min_time: float, sync: Callable[[], None]) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def paired(run_ref: Callable, run_ours: Callable, rounds: int, min_time: float, sync: Callable):
    """-> (median ref seconds, median our seconds, paired ratios), alternating who goes first each round."""
    start = time.perf_counter()
    for _ in range(3):  # warm-up: allocator, kernel selection, lazy inits (once is enough for slow calls)
        run_ref(), run_ours()
        sync()
        if time.perf_counter() - start > 1.0:
            break
    t_ref, t_ours = [], []
    for r in range(rounds):
        first, second = (run_ref, run_ours) if r % 2 == 0 else (run_ours, run_ref)
        a = seconds_per_call(first, min_time, sync)
        b = seconds_per_call(second, min_time, sync)
        t_ref.append(a if r % 2 == 0 else b), t_ours.append(b if r % 2 == 0 else a)
    ratios = [a / b for a, b in zip(t_ref, t_ours)]
    return statistics.median(t_ref), statistics.median(t_ours), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds per case (median is reported)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, short timings, batch 1 at real size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="ViT-B/16 dtypes, comma-separated")
    parser.add_argument("--batches", default="1,8", help="ViT-B/16 batch sizes, comma-separated")
    parser.add_argument("--task", default="tokens", choices=["tokens", "classify"],
                        help="compare the full token output, or class logits (image classification)")
    parser.add_argument("--packed", action="store_true",
                        help="run ours after pm.optimize_for_inference (CPU: oneDNN-prepacked weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    min_time = 0.05 if args.quick else 0.25
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = (1,) if args.quick else [int(b) for b in args.batches.split(",")]
    cases = [("tiny", b, torch.float32) for b in (1, 8)]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cases += [("ViT-B/16", b, dt) for dt in dtypes for b in batches]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {rounds} rounds")
    print(f"{'case':<24} {'reference':<13} {'max|diff|':>9} {'ref ms':>9} {'ours ms':>9} {'ref/ours':>9}  range")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        models = {size: pairs(size, Path(tmp), args.task, args.packed) for size in ("tiny", "ViT-B/16")}
        for size, batch, dtype in cases:
            side = 32 if size == "tiny" else 224
            x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
            for ref_name, (ref_call, ref, our_call, ours) in models[size].items():
                ref, ours = ref.to(device, dtype), ours.to(device, dtype)
                diff = (ref_call(ref, x).float() - our_call(ours, x).float()).abs().max().item()
                t_ref, t_ours, ratios = paired(partial(ref_call, ref, x), partial(our_call, ours, x), rounds, min_time,
                                               sync)
                name = f"{size} b{batch} {str(dtype).removeprefix('torch.')}"
                name += " cls" if args.task == "classify" else ""
                print(f"{name:<24} {ref_name:<13} {diff:>9.1e} {t_ref * 1e3:>9.3f} {t_ours * 1e3:>9.3f} "
                      f"{statistics.median(ratios):>8.2f}x  {min(ratios):.2f}-{max(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
