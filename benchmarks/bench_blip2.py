"""BLIP-2 captioning and VQA speed: polymodal vs transformers' `Blip2ForConditionalGeneration.generate`, same weights.

    python benchmarks/bench_blip2.py                         # tiny + 2.7b-wide, OPT and T5, batch 1 and 8, CPU fp32
    python benchmarks/bench_blip2.py --sizes tiny --rounds 2
    python benchmarks/bench_blip2.py --sizes wide --lms opt --batches 1 --beams 1 --rounds 3
    python benchmarks/bench_blip2.py --beams 1,3 --packed    # greedy and 3 beams; ours after optimize_for_inference
    python benchmarks/bench_blip2.py --device cuda --dtype bf16 --layers 4 --batches 1,8,32 --rounds 10

For each size and language model a BLIP-2 is built with random weights by transformers and loaded into polymodal
from its `save_pretrained` files, so both run identical weights; the tokens are compared before anything is timed.
Sizes: "tiny" (milliseconds a call), and "wide": Salesforce/blip2-opt-2.7b's widths (ViT-g/14 at 224 px, 1408
wide; the 768-wide Q-Former with 32 queries; OPT-2.7b, 2560 wide over its 50,272-token vocabulary; for "t5",
Flan-T5-XL, 2048 wide over 32,128 tokens) with `--layers` layers in each part instead of 39 / 12 / 32 (24), so that
both copies fit 2 CPU cores and 24 GB while every matrix has the real model's shape. The weights' std is 0.02
(transformers' default vision std of 1e-10 gives every image the same output). Generation never stops early: both
sides get an end token outside the vocabulary, so every call generates `--new` tokens per row.

Tasks, each a generate call on B random images with the processor's prompt layout (the Q image tokens first):
  caption = the image tokens and BOS (Flan-T5: EOS), what an empty prompt becomes;
  vqa     = the image tokens, then a 12-token "Question: ... Answer:" prompt (random ids).
Measured per round, alternating which side runs first: the time of the whole call (vision encoder, Q-Former,
prefill and every new token, greedy or `--beams` beam search) -> new tokens / s (B * N / time); printed: the median
over rounds of the paired ratio reference_time / our_time (> 1: polymodal is faster), its range, and both sides'
tokens / s and milliseconds at their median time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from timing import paired_rounds  # benchmarks/timing.py, beside this script
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config
from transformers.utils import logging as hf_logging

import polymodal as pm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUNDS = {"tiny": 10, "wide": 3}
QUESTION = 12  # the VQA prompt's text tokens after BOS ("Question: what is the man holding? Answer:" is ~12)


def configs(size: str, lm: str, layers: int) -> tuple[dict, dict, dict, int, int]:
    """(vision_config, qformer_config, text_config, num_query_tokens, image_token_index) as transformers takes them."""
    std = {"initializer_range": 0.02}
    if size == "tiny":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=8, **std)
        qformer = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64, **std)
        if lm == "opt":
            text = OPTConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                             max_position_embeddings=256, bos_token_id=2, eos_token_id=2, pad_token_id=1, **std)
        else:
            text = T5Config(vocab_size=260, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                            pad_token_id=0, eos_token_id=1, initializer_factor=1.0)
        return vision, qformer, text.to_dict(), 4, 259
    # blip2-opt-2.7b / blip2-flan-t5-xl widths, `layers` deep
    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, **std)
    qformer = dict(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                   cross_attention_frequency=2, **std)
    if lm == "opt":
        text = OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=layers, num_attention_heads=32,
                         ffn_dim=10240, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2, pad_token_id=1,
                         **std)
        return vision, qformer, text.to_dict(), 32, 50265
    text = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=layers, num_heads=32,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1, initializer_factor=1.0)
    return vision, qformer, text.to_dict(), 32, 32100


def build(size: str, lm: str, layers: int, workdir: Path, dtype, device, packed: bool):
    vision, qformer, text, queries, image_token = configs(size, lm, layers)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                      image_token_index=image_token)
    torch.manual_seed(0)
    with torch.device(device):
        ref = Blip2ForConditionalGeneration(cfg).to(dtype).eval()
    d = workdir / f"{size}-{lm}"
    ref.save_pretrained(d)
    ours = pm.load(d, dtype=dtype, device=device)
    return ref, pm.optimize_for_inference(ours) if packed else ours


def prompts(task: str, lm: str, batch: int, queries: int, image_token: int, vocab: int, seed: int) -> torch.Tensor:
    """(B, Q + 1 [+ QUESTION]) ids: the image tokens, BOS (T5: the question and then EOS, as its tokenizer ends)."""
    start = 1 if lm == "t5" else 2
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(3, min(vocab, image_token), (batch, QUESTION if task == "vqa" else 0), generator=g)
    image = torch.full((batch, queries), image_token)
    mark = torch.full((batch, 1), start)
    return torch.cat([image, question, mark] if lm == "t5" else [image, mark, question], dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,wide", help="comma-separated, from tiny, wide")
    p.add_argument("--lms", default="opt,t5", help="language models: opt, t5")
    p.add_argument("--tasks", default="caption,vqa")
    p.add_argument("--layers", type=int, default=2, help="layers per part for the wide size")
    p.add_argument("--batches", default="1,8", help="images per generate call, comma-separated")
    p.add_argument("--new", type=int, default=20, help="tokens generated per row")
    p.add_argument("--beams", default="1,3", help="comma-separated num_beams values (1: greedy)")
    p.add_argument("--rounds", type=int, default=None, help=f"paired rounds per measurement (default {ROUNDS})")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--packed", action="store_true",
                   help="run ours after pm.optimize_for_inference, as the pipelines do (by default)")
    args = p.parse_args()
    sizes, lms, tasks = args.sizes.split(","), args.lms.split(","), args.tasks.split(",")
    batches, beams = [int(b) for b in args.batches.split(",")], [int(b) for b in args.beams.split(",")]
    if not set(sizes) <= set(ROUNDS) or not set(lms) <= {"opt", "t5"} or not set(tasks) <= {"caption", "vqa"}:
        p.error("--sizes from tiny, wide; --lms from opt, t5; --tasks from caption, vqa")
    if args.new < 2 or args.layers < 1 or min(batches) < 1 or min(beams) < 1:
        p.error("--new must be >= 2; --layers, --batches and --beams >= 1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, threads {torch.get_num_threads()}, new "
          f"{args.new}, wide layers {args.layers}, ours {'packed' if args.packed else 'plain'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for lm in lms:
                ref, ours = build(size, lm, args.layers, Path(tmp), dtype, device, args.packed)
                c = ours.config
                never = c.text_config.vocab_size  # no logit has this index: no row ends
                image_size = c.vision_config.image_size
                for batch in batches:
                    g = torch.Generator().manual_seed(batch)
                    px = torch.randn(batch, 3, image_size, image_size, generator=g).to(device, dtype)
                    for task in tasks:
                        ids = prompts(task, lm, batch, c.num_query_tokens, c.image_token_index, never, batch)
                        for num_beams in beams:
                            compare(f"{size}-{lm}", task, batch, num_beams, ref, ours, px, ids.to(device), never,
                                    args.rounds or ROUNDS[size], args.new, sync)
                del ref, ours


def compare(name, task, batch, num_beams, ref, ours, px, ids, never, rounds, new, sync) -> None:
    mask = torch.ones_like(ids)

    def run_ref():
        return ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=new,
                            min_new_tokens=0, do_sample=False, num_beams=num_beams, eos_token_id=never,
                            pad_token_id=never)

    def run_ours():
        return ours.generate(ids, max_new_tokens=new, pixel_values=px, attention_mask=mask, num_beams=num_beams,
                             eos_token_id=never, pad_token_id=never)

    with torch.inference_mode():
        want, got = run_ref(), run_ours()  # also the warm-up
        same = want.tolist() == got.tolist()
        tokens = batch * new
        ratios, ref_times, our_times = paired_rounds(run_ref, run_ours, rounds, sync)
    ref_t, our_t = statistics.median(ref_times), statistics.median(our_times)
    print(f"{name:<9} {task:<7} b{batch:<2} beams {num_beams}  ratio {statistics.median(ratios):5.2f}x "
          f"({min(ratios):.2f}-{max(ratios):.2f})   ref {tokens / ref_t:8.1f} tok/s {ref_t * 1e3:8.1f} ms   "
          f"ours {tokens / our_t:8.1f} tok/s {our_t * 1e3:8.1f} ms" + ("" if same else "   (outputs differ!)"),
          flush=True)


if __name__ == "__main__":
    main()
