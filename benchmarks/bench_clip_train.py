"""CLIP training steps: polymodal vs open_clip on the same configuration, weights and synthetic batches.

    python benchmarks/bench_clip_train.py                         # tiny and ViT-B-32, batch 8, 5 rounds, CPU
    python benchmarks/bench_clip_train.py --sizes b32 --batch 32 --device cuda --rounds 20
    python benchmarks/bench_clip_train.py --sizes tiny --memory   # also peak memory, each side in its own process

Both sides start from open_clip's randomly initialized model (ours loads its state dict through `pm.load`), take
the same random images and token ids (right-padded, an end-of-text token at a random position) and run the same
step: forward, CLIP's symmetric contrastive loss on the local batch (open_clip's `ClipLoss`; ours
`polymodal.train.losses.contrastive_loss`), backward, AdamW. The first step's losses are compared before
anything is timed. Each round times a few steps of each side, alternating which goes first; we print the median
of the paired ratios open_clip time / our time (> 1: polymodal is faster). With `--memory`, each side runs in a
fresh process and reports how far its memory peaks above what it holds before the first step (CUDA: max
allocated; CPU: the peak resident set size, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import polymodal as pm
from polymodal.train.losses import contrastive_loss

TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 1000, "width": 128, "heads": 4, "layers": 4}}


def model_cfg(size: str) -> dict:
    import open_clip

    return TINY if size == "tiny" else open_clip.get_model_config("ViT-B-32")


def build(size: str, workdir: Path, device: torch.device):
    """-> (open_clip model, ours) on identical weights, in train mode."""
    import open_clip

    cfg = model_cfg(size)
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu",
                                                                                                          False))
    d = workdir / size
    d.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    ours = pm.load(d, device=device)
    return ref.to(device).train(), ours.train()


def batch(size: str, n: int, device: torch.device, seed: int = 0):
    cfg = model_cfg(size)
    g = torch.Generator().manual_seed(seed)
    side, T, V = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    pixels = torch.randn(n, 3, side, side, generator=g)
    ids = torch.randint(1, V - 1, (n, T), generator=g)
    ends = torch.randint(3, T, (n,), generator=g)
    ids = torch.where(torch.arange(T)[None] < ends[:, None], ids, 0)
    ids[torch.arange(n), ends] = V - 1  # open_clip pools at the largest id: the end-of-text token
    return pixels.to(device), ids.to(device)


def make_step(side: str, model, pixels, ids, lr: float = 1e-4):
    """One training step of one side as a zero-argument callable -> loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    if side == "open_clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()

        def loss_fn():
            image, text, scale = model(pixels, ids)[:3]
            return clip_loss(image, text, scale)
    else:
        mask = (ids != 0).long()

        def loss_fn():
            return contrastive_loss(model(pixels, ids, mask)[0])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Run `--steps` steps of one side in this fresh process and print the rise of its peak memory in MiB over
    the memory held before the first step (gradients, optimizer state, activations)."""
    import gc

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = build(args.sizes, Path(tmp), device)
        model = ref if args.child == "open_clip" else ours
        del ref, ours
        gc.collect()
        pixels, ids = batch(args.sizes, args.batch, device)
        step = make_step(args.child, model, pixels, ids)
        # The weights count as held before the first step. A pm.load-ed model's parameters can still be pages of
        # the memory-mapped checkpoint that nothing has touched (not yet resident); the first step would write
        # them anyway, so write them here (in place, values unchanged) on both sides before taking the baseline.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size
            base = _status_kib("VmRSS") * 1024
        for _ in range(args.steps):
            step()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
        print(json.dumps({"peak_mib": (peak - base) / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,b32", help="comma-separated: tiny, b32 (open_clip's ViT-B-32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per side per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, one process per side")
    p.add_argument("--child", choices=["open_clip", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return memory_child(args)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            ref, ours = build(size, Path(tmp), device)
            pixels, ids = batch(size, args.batch, device)
            step_ref, step_ours = make_step("open_clip", ref, pixels, ids), make_step("ours", ours, pixels, ids)
            first = (step_ref().item(), step_ours().item())  # identical weights and batch: the same loss

            def timed(step):
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                return (time.perf_counter() - start) / args.steps

            times = {"ref": [], "ours": []}
            for r in range(args.rounds):
                order = [("ref", step_ref), ("ours", step_ours)]
                for name, step in order if r % 2 == 0 else order[::-1]:
                    times[name].append(timed(step))
            ratios = [a / b for a, b in zip(times["ref"], times["ours"])]
            line = (f"{size:<5} train step  ratio {statistics.median(ratios):5.2f}x ({min(ratios):.2f}-"
                    f"{max(ratios):.2f})   open_clip {statistics.median(times['ref']) * 1e3:9.1f} ms   ours "
                    f"{statistics.median(times['ours']) * 1e3:9.1f} ms   first loss {first[0]:.5f} / {first[1]:.5f}")
            print(line, flush=True)
        if args.memory:
            peaks = {}
            for side in ("open_clip", "ours"):
                out = subprocess.run([sys.executable, __file__, "--child", side, "--sizes", size, "--batch",
                                      str(args.batch), "--steps", str(args.steps), "--device", args.device],
                                     capture_output=True, text=True, check=True)
                peaks[side] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            print(f"{size:<5} peak memory   open_clip {peaks['open_clip']:8.1f} MiB   ours {peaks['ours']:8.1f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
