"""Stable Diffusion's denoisers and VAE: polymodal vs diffusers, same weights, one process, paired rounds.

    python benchmarks/bench_diffusion.py                    # SD 1.5 U-Net, half-width SDXL U-Net, VAE, 4-layer SD3
                                                            # MM-DiT at 256 px (VAE also at 512 px), CPU fp32
    python benchmarks/bench_diffusion.py --quick            # the tiny shapes, a few rounds: under a minute
    python benchmarks/bench_diffusion.py --cases sd15 --rounds 3 --memory
    python benchmarks/bench_diffusion.py --cases sd15 --px 512 --device cuda --dtype bfloat16
    python benchmarks/bench_diffusion.py --cases sdxl,sd3-medium --px 1024 --device cuda --dtype bfloat16

Each case is built with random weights by diffusers from a config (`UNet2DConditionModel`, `AutoencoderKL`,
`SD3Transformer2DModel`), written with `save_pretrained` and loaded into polymodal with `pm.load`, so both sides
run identical weights. Cases (a denoiser call is one classifier-free-guidance step: batch 2, the unconditional
and the conditional half, as the pipelines run it):

  sd15       SD 1.5's U-Net (stable-diffusion-v1-5's config, 860M parameters), text 77 x 768
  sdxl       SDXL base's U-Net (2.57B), text 77 x 2048 (CLIP-L 768 + bigG 1280), pooled 1280, 6 size/crop ids
  sdxl-half  SDXL's structure at half its widths (160/320/640, heads of 32) with transformer depths 1/2/4 instead
             of 1/2/10: text_time added embedding, the 2048-wide concatenated text, linear projections
  vae        SD 1.5's VAE decoder (128/256/512/512, 83.7M parameters with the encoder), one latent of px/8
             (and of --vae-px / 8 for each listed side)
  sd3-medium SD3-medium's MM-DiT (24 blocks, 1536 wide, 24 heads, 16 latent channels, patch 2), text 154 x 4096
             (77 CLIP + 77 T5 tokens), pooled 2048
  sd3-4l     the same with 4 blocks instead of 24
  *-tiny     each kind at a few-channel size that runs in milliseconds (--quick)

Latents are px / 8 a side (SD3: 16 channels, patch 2). Before anything is timed both sides run the same inputs
and the largest |difference| of their outputs is printed beside the largest |reference value|. A round times
the reference and ours back to back, alternating which goes first (drift in a shared machine's load hits both
alike); printed: the median over rounds of the paired ratio diffusers_time / our_time (> 1: polymodal is
faster), its range, both medians in ms, and the same ratio in process CPU time (every thread of this process;
on a CPU shared with other work, wall time also counts other processes' slices).

--memory measures peak memory in a fresh process per side and case: the model is loaded from the saved folder,
every parameter and buffer is read once (so memory-mapped weights are resident on both sides before the
baseline), then on the CPU the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`, 5) and read back as
VmHWM after two calls: printed, the peak RSS of the process (weights included) and the peak above the loaded
model (what the call itself allocates). On CUDA: `torch.cuda.max_memory_allocated` after two calls, and the peak
above the weights.

Everything runs under `torch.inference_mode()`, both sides on SDPA (diffusers' default AttnProcessor2_0).
`--packed` runs ours after `pm.optimize_for_inference` (oneDNN-prepacked linear weights, a second copy of each
one in memory), as polymodal's pipelines do on CPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import paired_rounds  # benchmarks/timing.py, beside this script

import polymodal as pm

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_X, _D, _XU, _U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
_SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=(_D, _X, _X), up_block_types=(_XU, _XU, _U),
             attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816, sample_size=128)
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192)
# name -> (kind, diffusers config, text tokens)
CASES: dict[str, tuple[str, dict, int]] = {
    "sd15": ("unet", dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), 77),
    "sdxl": ("unet", _SDXL, 77),
    "sdxl-half": ("unet", {**_SDXL, "block_out_channels": (160, 320, 640), "transformer_layers_per_block": (1, 2, 4)},
                  77),
    "vae": ("vae", dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512), 0),
    "sd3-medium": ("sd3", _SD3, 154),
    "sd3-4l": ("sd3", {**_SD3, "num_layers": 4}, 154),
    "sd15-tiny": ("unet", dict(block_out_channels=(32, 64), down_block_types=(_X, _D), up_block_types=(_U, _XU),
                               layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                               sample_size=16), 16),
    "sdxl-tiny": ("unet", dict(block_out_channels=(32, 64, 64), down_block_types=(_D, _X, _X),
                               up_block_types=(_XU, _XU, _U), layers_per_block=2, norm_num_groups=8,
                               cross_attention_dim=32, attention_head_dim=(2, 4, 4),
                               transformer_layers_per_block=(1, 1, 2),
                               use_linear_projection=True, addition_embed_type="text_time",
                               addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                               sample_size=16), 16),
    "vae-tiny": ("vae", dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                             latent_channels=4, sample_size=32), 0),
    "sd3-tiny": ("sd3", dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                             attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
                             caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=16), 16),
}
QUICK = "sd15-tiny,sdxl-tiny,vae-tiny,sd3-tiny"
ROUNDS = {"sd15": 5, "sdxl": 10, "sdxl-half": 7, "vae": 3, "sd3-medium": 10, "sd3-4l": 5}


def build(name: str, workdir: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """diffusers' model of case `name` with random weights (seed 0) on `device` in `dtype`, and the folder its
    `save_pretrained` wrote."""
    import diffusers

    kind, cfg, _ = CASES[name]
    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
           "sd3": diffusers.SD3Transformer2DModel}[kind]
    torch.manual_seed(0)
    with torch.device(device):
        ref = cls(**cfg)
    ref = (ref if dtype == torch.float32 else ref.to(dtype)).eval()
    folder = workdir / name
    ref.save_pretrained(folder)
    return ref, folder


def load_reference(name: str, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import diffusers

    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
           "sd3": diffusers.SD3Transformer2DModel}[CASES[name][0]]
    return cls.from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def inputs(name: str, px: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The call's tensors (seeded): a CFG step's batch of 2 for the denoisers, one latent for the VAE."""
    kind, cfg, text = CASES[name]
    g = torch.Generator().manual_seed(px)
    side = px // 8

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if kind == "vae":
        return {"z": randn(1, cfg["latent_channels"], side, side)}
    t = torch.full((2,), 500.0, device=device)
    if kind == "sd3":
        return {"x": randn(2, cfg["in_channels"], side, side), "context": randn(2, text, cfg["joint_attention_dim"]),
                "pooled": randn(2, cfg["pooled_projection_dim"]), "t": t}
    out = {"x": randn(2, cfg.get("in_channels", 4), side, side), "context": randn(2, text, cfg["cross_attention_dim"]),
           "t": t}
    if cfg.get("addition_embed_type") == "text_time":
        ids = cfg["addition_time_embed_dim"]
        out["text_embeds"] = randn(2, cfg["projection_class_embeddings_input_dim"] - 6 * ids)
        out["time_ids"] = torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=dtype, device=device)
    return out


def calls(name: str, ref: torch.nn.Module | None, ours: torch.nn.Module | None, x: dict):
    """(the reference's call, ours), each a function of no arguments returning the output tensor."""
    kind = CASES[name][0]
    if kind == "vae":
        return (lambda: ref.decode(x["z"]).sample), (lambda: ours.decode(x["z"]))
    if kind == "sd3":
        return ((lambda: ref(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["pooled"],
                             timestep=x["t"]).sample),
                (lambda: ours(x["x"], x["context"], x["pooled"], x["t"])))
    if "time_ids" in x:
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        return ((lambda: ref(x["x"], x["t"], encoder_hidden_states=x["context"], added_cond_kwargs=added).sample),
                (lambda: ours(x["x"], x["t"], x["context"], **added)))
    return (lambda: ref(x["x"], x["t"], encoder_hidden_states=x["context"]).sample,
            lambda: ours(x["x"], x["t"], x["context"]))


def measure(side: str, name: str, folder: Path, px: int, dtype: torch.dtype, device: torch.device,
            packed: bool) -> dict:
    """In this (fresh) process: load one side, make its weights resident, then the peak memory of two calls."""
    if side == "ours":
        model = pm.load(folder, dtype=dtype, device=device)
        model = pm.optimize_for_inference(model) if packed else model
        fn = calls(name, None, model, inputs(name, px, dtype, device))[1]
    else:
        model = load_reference(name, folder, dtype, device)
        fn = calls(name, model, None, inputs(name, px, dtype, device))[0]
    with torch.inference_mode():
        touched = sum(float(t.float().sum()) for t in (*model.parameters(), *model.buffers()))  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(), fn()
            torch.cuda.synchronize()
            return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                    "above_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        fn(), fn()
        peak = _status("VmHWM")
    return {"peak_mib": peak / 1024, "above_mib": (peak - base) / 1024}


def _status(field: str) -> int:
    """A field of /proc/self/status in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_row(name: str, folder: Path, px: int, args) -> dict[str, dict]:
    """{side: measure(...)} for both sides, each in its own process."""
    out = {}
    for side in ("diffusers", "ours"):
        cmd = [sys.executable, __file__, "--measure", side, "--cases", name, "--folder", str(folder), "--px", str(px),
               "--dtype", args.dtype, "--device", args.device] + (["--packed"] if args.packed else [])
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"memory measurement of {side} {name} failed:\n{r.stderr[-2000:]}")
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="sd15,sdxl-half,vae,sd3-4l", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--px", type=int, default=256, help="image side in pixels (latents are px/8 a side)")
    p.add_argument("--vae-px", default="512", help="more image sides for the VAE cases, comma-separated ('' none)")
    p.add_argument("--rounds", type=int, default=None, help=f"paired rounds per case (default {ROUNDS}, tiny 10)")
    p.add_argument("--quick", action="store_true", help=f"cases {QUICK} at 64 px, 3 rounds, memory included")
    p.add_argument("--memory", action="store_true", help="peak memory per side, each in a fresh process")
    p.add_argument("--packed", action="store_true", help="ours after pm.optimize_for_inference")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--measure", choices=["diffusers", "ours"], help=argparse.SUPPRESS)  # the memory child
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.cases, args.px, args.vae_px, args.memory = QUICK, 64, "", True
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    vae_px = [int(v) for v in args.vae_px.split(",") if v]
    if args.px < 16 or args.px % 16 or any(v < 16 or v % 16 for v in vae_px):
        p.error("--px and --vae-px must be positive multiples of 16 (latents of px/8, even for SD3's 2x2 patches)")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, names[0], Path(args.folder), args.px, dtype, device, args.packed)))
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # not its note on casting a model built in fp32 to --dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}, ours "
          f"{'packed' if args.packed else 'plain'}, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'case':<22} {'max|diff|':>9} {'max|ref|':>8} {'ratio (range)':>19} {'diffusers ms':>12} {'ours ms':>10} "
          f"{'CPU ratio':>9}" + (f" {'peak MiB diffusers / ours':>26} {'above loaded':>15}" if args.memory else ""),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ref, folder = build(name, Path(tmp), dtype, device)
            ours = pm.load(folder, dtype=dtype, device=device)
            ours = pm.optimize_for_inference(ours) if args.packed else ours
            sides = [args.px] + (vae_px if CASES[name][0] == "vae" else [])
            for px in dict.fromkeys(sides):
                x = inputs(name, px, dtype, device)
                run_ref, run_ours = calls(name, ref, ours, x)
                with torch.inference_mode():
                    want, got = run_ref(), run_ours()  # also the warm-up
                    diff = (want.float() - got.float()).abs().max().item()
                    scale = want.float().abs().max().item()
                    del want, got
                    rounds = args.rounds or (3 if args.quick else ROUNDS.get(name, 10))
                    cpu: dict = {}
                    ratios, ref_t, our_t = paired_rounds(run_ref, run_ours, rounds, sync, cpu)
                line = (f"{name + ' ' + str(px) + 'px':<22} {diff:>9.1e} {scale:>8.2f} "
                        f"{statistics.median(ratios):>6.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
                        f"{statistics.median(ref_t) * 1e3:>12.1f} {statistics.median(our_t) * 1e3:>10.1f} "
                        f"{statistics.median(cpu['ratios']):>8.2f}x")
                if args.memory:
                    mem = memory_row(name, folder, px, args)
                    line += (f" {mem['diffusers']['peak_mib']:>12.0f} / {mem['ours']['peak_mib']:<11.0f} "
                             f"{mem['diffusers']['above_mib']:>6.0f} / {mem['ours']['above_mib']:<6.0f}")
                print(line + f"  ({rounds} rounds)", flush=True)
            del ref, ours
            gc.collect()


if __name__ == "__main__":
    main()
