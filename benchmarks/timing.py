"""What the paired benchmarks share: one call timed between device synchronizations, paired rounds of two calls,
and paired rounds of a generation benchmark."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds one call of `fn` takes, with the device's queued work finished before and after (`sync`)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired_rounds(run_ref: Callable[[], object], run_ours: Callable[[], object], rounds: int,
                  sync: Callable[[], None] = lambda: None) -> tuple[list[float], list[float], list[float]]:
    """`rounds` timed calls of each side, alternating which goes first -> (the paired ratios reference / ours, the
    reference's seconds, ours), one entry per round."""
    ref_times, our_times = [], []
    for r in range(rounds):
        order = [(run_ref, ref_times), (run_ours, our_times)]
        for fn, times in order if r % 2 == 0 else order[::-1]:
            times.append(timed(fn, sync))
    return [a / b for a, b in zip(ref_times, our_times)], ref_times, our_times


def first_and_per_token(run: Callable[[int], object], new: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(seconds to the first token: run(1), seconds per later token: (run(new) - run(1)) / (new - 1))."""
    first = timed(lambda: run(1), sync)
    full = timed(lambda: run(new), sync)
    return first, (full - first) / (new - 1)


def paired_generation(run_ref: Callable[[int], object], run_ours: Callable[[int], object], new: int, rounds: int,
                      sync: Callable[[], None]) -> dict[str, tuple[list[float], float, float]]:
    """Rounds of `first_and_per_token` on both sides, alternating which goes first -> {"first" | "token": (the
    paired ratios reference / ours, the reference's median seconds, ours)}."""
    pairs = []
    for r in range(rounds):
        order = [run_ref, run_ours] if r % 2 == 0 else [run_ours, run_ref]
        got = {id(fn): first_and_per_token(fn, new, sync) for fn in order}
        pairs.append((got[id(run_ref)], got[id(run_ours)]))
    out = {}
    for k, i in (("first", 0), ("token", 1)):
        ref, ours = [p[0][i] for p in pairs], [p[1][i] for p in pairs]
        out[k] = ([a / b for a, b in zip(ref, ours)], statistics.median(ref), statistics.median(ours))
    return out
