"""Generation on a busy machine: `pipe(...)` (the calling thread) against `pipe.stream(...)` (a worker thread), with
another process holding one core the whole time, under polymodal's OpenMP wait policy and under libgomp's default.

    python benchmarks/bench_busy.py                    # the embedded SmolLM2, 100 new tokens, 5 rounds each
    python benchmarks/bench_busy.py --rounds 3 --new 50 --no-hog

Each policy runs in a fresh interpreter (the policy is read when torch loads its OpenMP runtime):
  polymodal        `import polymodal` first: OMP_WAIT_POLICY=PASSIVE unless the environment sets it
  libgomp default  `import torch` first with OMP_WAIT_POLICY unset: worker threads spin between parallel regions
Per round the two calls alternate which goes first; printed: the median seconds of each call and the median paired
ratio non-streaming / streaming (1.0: both paths equally fast). Greedy, so both produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
if sys.argv[1] == "default":
    import torch  # noqa: F401  (loads libgomp before polymodal can choose its wait policy)
import polymodal as pm

rounds, new = int(sys.argv[2]), int(sys.argv[3])
pipe = pm.pipeline("text-generation")
msg = [{"role": "user", "content": "Tell me a long story about a dragon."}]
opts = dict(max_new_tokens=new, repetition_penalty=1.0)

def call():
    t = time.perf_counter(); pipe(msg, **opts); return time.perf_counter() - t

def stream():
    t = time.perf_counter(); "".join(pipe.stream(msg, **opts)); return time.perf_counter() - t

call(); stream()  # warm-up
calls, streams = [], []
for i in range(rounds):
    if i % 2:
        s = stream(); c = call()
    else:
        c = call(); s = stream()
    calls.append(c); streams.append(s)
print(json.dumps({"call": statistics.median(calls), "stream": statistics.median(streams),
                  "ratio": statistics.median(c / s for c, s in zip(calls, streams))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=100, help="new tokens per call")
    ap.add_argument("--no-hog", action="store_true", help="no busy process (a quiet machine)")
    args = ap.parse_args()
    hog = None if args.no_hog else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    try:
        where = "one core busy" if hog else "quiet"
        print(f"{'policy':<16} {'pipe() s':>9} {'stream() s':>11} {'ratio':>6}   ({where})")
        for policy in ("polymodal", "default"):
            out = subprocess.run([sys.executable, "-c", CHILD, policy, str(args.rounds), str(args.new)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            name = "polymodal" if policy == "polymodal" else "libgomp default"
            print(f"{name:<16} {r['call']:>9.2f} {r['stream']:>11.2f} {r['ratio']:>6.2f}")
    finally:
        if hog is not None:
            hog.kill()


if __name__ == "__main__":
    main()
