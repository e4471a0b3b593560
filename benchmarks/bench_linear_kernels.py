"""fp32 linear products on this CPU: MKL (`F.linear`) against oneDNN with the plain weight and with a packed one.

    python benchmarks/bench_linear_kernels.py [--threads 1] [--rounds 7]

The numbers behind `polymodal.nn.inference`'s choice of kernel (which products `PackedLinear` sends to oneDNN)
and `polymodal.nn.onednn`. Shapes from the families' real sizes: one row (a decode step at batch 1), 3-4 rows
(beams, batched decoding) and hundreds (prefill, vision towers). Each weight is bigger than the caches or made
so by cycling through 4 copies, so a product streams it from memory as in a model. Medians of process CPU time
(the machine may be shared), milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (rows, in, out, where)
    (1, 576, 1536, "SmolLM2 MLP, decode"),
    (1, 3584, 18944, "Qwen2-VL-7B MLP, decode"),
    (1, 3584, 152064, "Qwen2-VL-7B head, decode"),
    (1, 2560, 50272, "OPT-2.7B head, decode"),
    (1, 4096, 14336, "Llama-3.1-8B MLP, decode"),
    (3, 2560, 10240, "OPT-2.7B MLP, 3 beams"),
    (3, 2560, 50272, "OPT-2.7B head, 3 beams"),
    (4, 3584, 18944, "Qwen2-VL-7B MLP, batch 4"),
    (8, 576, 49152, "SmolLM2 head, batch 8"),
    (256, 3584, 3584, "Qwen2-VL-7B projection, prefill"),
    (1024, 1280, 5120, "Qwen2-VL tower MLP"),
    (1025, 1280, 3840, "Mllama tower q/k/v"),
]


def median_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"process CPU time, medians of {args.rounds}")
    print("| product | where | F.linear (MKL) | oneDNN, plain weight | oneDNN, packed | MKL / best oneDNN |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows, k, n, where in SHAPES:
            copies = max(1, min(4, (64 << 20) // (4 * k * n)))  # at least 64 MB of weights in turn
            ws = [torch.randn(n, k) * 0.02 for _ in range(copies)]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
            b = torch.randn(n)
            x = torch.randn(rows, k)
            ref = F.linear(x, ws[0], b)
            for p in (ws[0], packed[0]):
                got = torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (rows, k, n)

            def run(product, weights):
                return lambda: [product(x, w, b) for w in weights]

            mkl = median_ms(run(F.linear, ws), args.rounds) / copies
            plain = median_ms(run(lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), ws),
                              args.rounds) / copies
            pk = median_ms(run(lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
                               packed), args.rounds) / copies
            print(f"| {rows}x{k} @ {k}x{n} | {where} | {mkl:.2f} | {plain:.2f} | {pk:.2f} | "
                  f"{mkl / min(plain, pk):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
