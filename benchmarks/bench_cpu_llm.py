"""Quantized CPU decoding: polymodal (fp32, bf16, int8, int4) against llama.cpp and transformers on one GGUF file.

    python benchmarks/bench_cpu_llm.py                          # the packaged SmolLM2-135M-Instruct Q4_1, 2 threads
    python benchmarks/bench_cpu_llm.py --threads 1 --rounds 5 --ppl
    python benchmarks/bench_cpu_llm.py --gguf other.Q4_0.gguf --sides int4,llama.cpp

Sides, all from the same file and run with the same threads in one process:
  fp32       pm.load(gguf): the file dequantized to fp32 (the exact path)
  bf16       pm.load(gguf, dtype=torch.bfloat16)
  int8       the fp32 weights saved and loaded with quantize="int8": int8 per output row
  int4       pm.load(gguf, quantize="int4"): the file's own Q4_0/Q4_1 quants (its Q8_0 head as int8)
  int4-compile  int4 decoding with generate(compile_step=True) (the step compiled by inductor; compiled in warm-up)
  int4-float the fp32 weights re-quantized with quantize="int4" (min/max groups of 32), for the quality table
  transformers  LlamaForCausalLM on the same fp32 weights (pm.save of the dequantized file)
  llama.cpp  llama-cpp-python (a benchmark-only extra, built from source) reading the GGUF file itself

Timing, per round and rotating which side goes first (paired rounds on a shared machine): prefill = a
generation of 1 token from a `--prompt`-token prompt -> prompt tokens/s; decode = (generation of `--new` tokens -
prefill) / (new - 1) -> tokens/s at batch 1, greedy, end-of-sequence never stopping it. Medians over rounds of wall
time and of process CPU time (every thread of this process: what the other jobs of a shared machine do not
inflate). The memory bandwidth is measured in the same run (a 256 MB read, `torch.sum`), and each decode rate is
given as a fraction of its ceiling: bandwidth / bytes the side reads per token (its weights).

--ppl adds perplexity on benchmarks/data/public_domain_en.txt (one window, the same token ids for every side).
--make-q8-0 PATH writes the Q8_0 file of the issue from the packaged Q4_1 one with the `gguf` package (its Q4
tensors dequantized and requantized, the rest and the metadata copied) and exits; run again with --gguf PATH.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import first_and_per_token  # benchmarks/timing.py, beside this script

import polymodal as pm
from polymodal.nn.quant import QuantLinear

TEXT = Path(__file__).parent / "data" / "public_domain_en.txt"
SIDES = ("fp32", "bf16", "int8", "int4", "int4-compile", "int4-float", "transformers", "llama.cpp")


def bandwidth(rounds: int = 7) -> float:
    """GB/s of a 256 MB read (wall time, median)."""
    x = torch.randn(64 * 2**20)
    x.sum()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every linear layer's weights (and scales), the embedding row aside."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if not n.startswith("_"))
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


class Ours:
    def __init__(self, model, compile_step: bool = False):
        self.model, self.bytes, self.compile_step = model, weight_bytes(model), compile_step

    def generate(self, ids: torch.Tensor, new: int):
        return self.model.generate(ids, max_new_tokens=new, eos_token_id=[],  # never stops early
                                   compile_step=self.compile_step)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids)[0].float()


class Transformers:
    def __init__(self, directory: Path):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.bytes = weight_bytes(self.model)

    def generate(self, ids: torch.Tensor, new: int):
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids).logits[0].float()


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         logits_all=True, verbose=False)
        self.bytes = gguf.stat().st_size  # nearly all of the file is weights

    def generate(self, ids: torch.Tensor, new: int):
        self.llm.reset()  # no reuse of a cached prefix: every run prefills
        tokens = ids[0].tolist()
        for _, _token in zip(range(new), self.llm.generate(tokens, top_k=1, temp=0.0, reset=True)):
            pass

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(self.llm.scores[: ids.shape[1]].copy()).float()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits[:-1], ids[0, 1:]).item())


def build(sides: list[str], gguf: Path, workdir: Path, threads: int, context: int) -> tuple[dict, object]:
    """side -> its model, and the file's tokenizer."""
    fp32 = pm.load(gguf)
    float_dir = None
    if {"int8", "int4-float", "transformers"} & set(sides):
        float_dir = workdir / "fp32"
        pm.save(fp32, float_dir)
    out = {}
    for side in sides:
        t = time.perf_counter()
        if side == "fp32":
            out[side] = Ours(fp32)
        elif side == "bf16":
            out[side] = Ours(pm.load(gguf, dtype=torch.bfloat16))
        elif side == "int8":
            out[side] = Ours(pm.load(float_dir, quantize="int8"))
        elif side == "int4":
            out[side] = Ours(pm.load(gguf, quantize="int4"))
        elif side == "int4-compile":
            out[side] = Ours(pm.load(gguf, quantize="int4"), compile_step=True)
        elif side == "int4-float":
            out[side] = Ours(pm.load(float_dir, quantize="int4"))
        elif side == "transformers":
            out[side] = Transformers(float_dir)
        elif side == "llama.cpp":
            out[side] = LlamaCpp(gguf, threads, context)
        print(f"  loaded {side:12s} in {time.perf_counter() - t:5.2f} s, {out[side].bytes / 1e6:6.1f} MB of weights "
              "read per token", flush=True)
    return out, pm.record(fp32).tokenizer


def make_q8_0(src: Path, dst: Path) -> None:
    """src's Q4_0 / Q4_1 tensors as Q8_0 (gguf-py's reference quantizer), other tensors and metadata as they are."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if field.types[0] == V.ARRAY
                             else None)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for t in reader.tensors:
        if t.tensor_type in (Q.Q4_0, Q.Q4_1):
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    from polymodal.pipelines.text import default_chat_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="default: the packaged SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--sides", default="fp32,bf16,int8,int4,transformers,llama.cpp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=33)
    p.add_argument("--ppl", action="store_true", help="perplexity on benchmarks/data/public_domain_en.txt")
    p.add_argument("--make-q8-0", type=Path, default=None, metavar="PATH")
    args = p.parse_args()
    if args.make_q8_0:
        make_q8_0(args.gguf or Path(default_chat_model()), args.make_q8_0)
        print(f"wrote {args.make_q8_0}")
        return
    sides = args.sides.split(",")
    if unknown := set(sides) - set(SIDES):
        sys.exit(f"unknown sides {sorted(unknown)}; known: {', '.join(SIDES)}")
    if "llama.cpp" in sides:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed (pip install llama-cpp-python): its side is left out")
            sides.remove("llama.cpp")
    gguf = args.gguf or Path(default_chat_model())
    torch.set_num_threads(args.threads)
    print(f"{gguf.name}, {args.threads} threads, {args.rounds} rounds, prompt {args.prompt}, new {args.new}")
    with tempfile.TemporaryDirectory() as tmp:
        models, tok = build(sides, gguf, Path(tmp), args.threads, context=2048)
        run(models, sides, tok, args)


def run(models: dict, sides: list[str], tok, args) -> None:
    text_ids = torch.tensor([tok.encode(TEXT.read_text())])
    prompt = text_ids[:, : args.prompt]

    gbs = []
    wall: dict[str, list] = {s: [] for s in sides}
    cpu: dict[str, list] = {s: [] for s in sides}
    for s in sides:  # warm-up
        models[s].generate(prompt, 3)
    for r in range(args.rounds):
        gbs.append(bandwidth())
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for s in order:
            spent: list = []
            wall[s].append(first_and_per_token(lambda n, s=s: models[s].generate(prompt, n), args.new, lambda: None,
                                               spent))
            cpu[s].append(spent[0])
    gb = statistics.median(gbs)
    print(f"\nmemory bandwidth (256 MB read, median of rounds): {gb:.1f} GB/s")
    med = {s: tuple(statistics.median(x[i] for x in wall[s]) for i in (0, 1)) for s in sides}
    med_cpu = {s: tuple(statistics.median(x[i] for x in cpu[s]) for i in (0, 1)) for s in sides}
    refs = [r for r in ("llama.cpp", "transformers") if r in sides]
    head = f"{'side':13s} {'prefill tok/s':>14s} {'(cpu)':>8s} {'decode tok/s':>13s} {'(cpu)':>8s} {'ceiling':>8s}"
    print(head + "".join(f" {'vs ' + r:>16s}" for r in refs))
    for s in sides:
        (first, token), (first_c, token_c) = med[s], med_cpu[s]
        ceiling = gb * 1e9 / models[s].bytes
        row = (f"{s:13s} {args.prompt / first:14.1f} {args.prompt / first_c:8.1f} {1 / token:13.1f} {1 / token_c:8.1f}"
               f" {1 / token / ceiling:7.0%}")
        for r in refs:  # decode speed ratio: wall (cpu)
            row += f" {med[r][1] / token:8.2f}x ({med_cpu[r][1] / token_c:.2f}x)"
        print(row)
    print("ceiling: decode tokens/s over bandwidth / weight bytes; vs X: X's seconds per token / ours, wall (cpu)")

    if args.ppl:
        print(f"\nperplexity on {TEXT.name} ({text_ids.shape[1]} tokens, one window)")
        for s in sides:
            print(f"  {s:13s} {perplexity(models[s].logits(text_ids), text_ids):8.3f}")


if __name__ == "__main__":
    main()
