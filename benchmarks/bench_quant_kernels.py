"""Candidate kernels for a weight-only GEMV at SmolLM2-135M's shapes: one decode step's products at batch 1.

    python benchmarks/bench_quant_kernels.py 1      # threads

The weights of 30 layers (q/k/v 576->960, o 576->576, gate and up 576->1536, down 1536->576) and the tied
49152x576 head are made once (538 MB in fp32, more than any cache), and one "step" multiplies one row by each in
turn, so every weight streams from memory as in decoding. Medians of 9 steps, wall and process CPU time. The
numbers behind the choice of kernels in polymodal/nn/quant.py and docs/quantization.md.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch._dynamo.config.recompile_limit = 64  # one compile per weight shape and input width
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
L = 30
shapes = [(960, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
head = (49152, 576)


def timeit(fn, n=9):
    fn()
    fn()
    w = []
    c = []
    for _ in range(n):
        t0 = time.perf_counter()
        p0 = time.process_time()
        fn()
        w.append(time.perf_counter() - t0)
        c.append(time.process_time() - p0)
    return statistics.median(w) * 1e3, statistics.median(c) * 1e3


big = torch.randn(64 * 2**20)
bw = timeit(lambda: big.sum())
print(
    f"threads {sys.argv[1]}: read 256 MB: wall {bw[0]:.1f} ms cpu {bw[1]:.1f} -> {0.256 / bw[0] * 1e3:.1f} GB/s "
    f"wall, {0.256 / bw[1] * 1e3:.1f} GB/s per cpu-s"
)
ws = [torch.randn(s) * 0.02 for _ in range(L) for s in shapes] + [torch.randn(head) * 0.02]
xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
P = sum(w.numel() for w in ws)
r = {}
r["fp32 F.linear"] = (timeit(lambda: [F.linear(xs[w.shape[1]], w) for w in ws]), 4 * P)
bws = [w.bfloat16() for w in ws]
xb = {k: v.bfloat16() for k, v in xs.items()}
r["bf16 F.linear"] = (timeit(lambda: [F.linear(xb[w.shape[1]], w) for w in bws]), 2 * P)
q8 = []
for w in ws:
    s = w.abs().amax(1) / 127
    q8.append(((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s))
q8b = [(q, s.bfloat16()) for q, s in q8]
r["int8 _weight_int8pack_mm (bf16 x)"] = (
    timeit(lambda: [torch._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in q8b]),
    P,
)
gemv8 = torch.compile(lambda x, q, s: (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * s, dynamic=False)
r["int8 compiled dequant-GEMV (fp32 x)"] = (timeit(lambda: [gemv8(xs[q.shape[1]], q, s) for q, s in q8]), P)


def q4(w, g):
    N, K = w.shape
    wg = w.reshape(N, K // g, g)
    mn = wg.amin(-1, keepdim=True)
    mx = wg.amax(-1, keepdim=True)
    sc = ((mx - mn) / 15).clamp(min=1e-8)
    q = ((wg - mn) / sc).round().clamp(0, 15)
    sz = torch.stack([sc.squeeze(-1), (mn + 8 * sc).squeeze(-1)], -1).transpose(0, 1).contiguous()
    return q.to(torch.int32).reshape(N, K), sz, sc, mn


for g in (32, 64):
    p4 = []
    c4 = []
    for w in ws:
        q, sz, sc, mn = q4(w, g)
        p4.append((torch._convert_weight_to_int4pack_for_cpu(q, 2), sz.bfloat16()))
        qb = q.to(torch.uint8)
        c4.append(((qb[:, ::2] | (qb[:, 1::2] << 4)).contiguous(), sc.squeeze(-1), mn.squeeze(-1)))
    r[f"int4 g{g} _weight_int4pack_mm_for_cpu (bf16 x)"] = (
        timeit(lambda g=g, p4=p4: [torch._weight_int4pack_mm_for_cpu(xb[sz.shape[0] * g], p, g, sz) for p, sz in p4]),
        P / 2,
    )

    def gemv4(x, p, sc, mn, g=g):
        N = p.shape[0]
        q = torch.stack([p & 15, p >> 4], -1).reshape(N, -1, g).to(x.dtype)
        w = q * sc[..., None] + mn[..., None]
        return (x.reshape(1, -1, g) * w).sum((-1, -2)).unsqueeze(0)

    cg = torch.compile(gemv4, dynamic=False)
    r[f"int4 g{g} compiled dequant-GEMV (fp32 x)"] = (
        timeit(lambda cg=cg, c4=c4: [cg(xs[p.shape[1] * 2], p, sc, mn) for p, sc, mn in c4]),
        P / 2,
    )
for k, ((wl, cp), b) in r.items():
    print(
        f"  {k:44s} wall {wl:7.2f} ms cpu {cp:7.2f} ms  {b / 1e6:6.0f} MB  {b / 1e9 / (cp / 1e3):5.1f} GB/s per cpu-s"
    )
