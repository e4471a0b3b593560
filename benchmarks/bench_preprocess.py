"""Image preprocessing speed: polymodal's ImageProcessor.clip() vs transformers' default CLIPImageProcessor().

    .venv/bin/python benchmarks/bench_preprocess.py [--rounds 9] [--batch 32] [--threads N]

A batch of real photos from scikit-image (astronaut 512x512, coffee 600x400, chelsea 451x300, rocket
640x427, plus the same photos enlarged 2.5x with PIL to stand in for camera-sized images), as PIL images.
Both processors run in this process, alternately, on the same batch; each round gives a paired ratio
(transformers' time / ours) and the median ratio is reported, which keeps a shared machine's noise out of
the comparison as far as pairing can. Outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from polymodal.processing import ImageProcessor


def photos(batch: int) -> list[Image.Image]:
    from skimage import data

    base = [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    big = [im.resize((im.width * 5 // 2, im.height * 5 // 2), Image.BICUBIC) for im in base]
    pool = base + big
    return [pool[i % len(pool)] for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import CLIPImageProcessor

    images = photos(args.batch)
    ours, theirs = ImageProcessor.clip(), CLIPImageProcessor()
    got, want = ours(images), theirs(images, return_tensors="pt").pixel_values
    print(f"outputs {tuple(got.shape)}, max |ours - transformers| = {(got - want).abs().max().item():.3g}")

    ratios, t_ours, t_theirs = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        theirs(images, return_tensors="pt")
        t1 = time.perf_counter()
        ours(images)
        t2 = time.perf_counter()
        t_theirs.append(t1 - t0)
        t_ours.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    print(f"{type(theirs).__name__} ({theirs.backend}): median {statistics.median(t_theirs) * 1e3:.1f} ms per batch")
    print(f"polymodal ImageProcessor.clip():        median {statistics.median(t_ours) * 1e3:.1f} ms per batch")
    print(f"paired ratio over {args.rounds} rounds (torch threads {torch.get_num_threads()}): "
          f"median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
