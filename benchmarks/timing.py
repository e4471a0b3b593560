"""What the paired benchmarks share: one call timed between device synchronizations, paired rounds of two calls,
and paired rounds of a generation benchmark.

On a CPU shared with other work, a call's wall time also counts the slices the scheduler gave to other processes;
its process CPU time (every thread of this process, `time.process_time`) does not. Pass `cpu={}` to the paired
functions to get CPU seconds of the same calls beside the wall seconds they return."""

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


def timed_both(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`, between device synchronizations."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_rounds(run_ref: Callable[[], object], run_ours: Callable[[], object], rounds: int,
                  sync: Callable[[], None] = lambda: None, cpu: dict | None = None
                  ) -> tuple[list[float], list[float], list[float]]:
    """`rounds` timed calls of each side, alternating which goes first -> (the paired ratios reference / ours, the
    reference's seconds, ours), one entry per round. With `cpu` a dict, the same calls' process CPU seconds go
    into it alike: cpu["ratios"], cpu["ref"], cpu["ours"]."""
    ref_times, our_times, ref_cpu, our_cpu = [], [], [], []
    for r in range(rounds):
        order = [(run_ref, ref_times, ref_cpu), (run_ours, our_times, our_cpu)]
        for fn, times, cpus in order if r % 2 == 0 else order[::-1]:
            wall, used = timed_both(fn, sync)
            times.append(wall)
            cpus.append(used)
    if cpu is not None:
        cpu.update(ratios=[a / b for a, b in zip(ref_cpu, our_cpu)], ref=ref_cpu, ours=our_cpu)
    return [a / b for a, b in zip(ref_times, our_times)], ref_times, our_times


def first_and_per_token(run: Callable[[int], object], new: int, sync: Callable[[], None],
                        cpu: list | None = None) -> tuple[float, float]:
    """(seconds to the first token: run(1), seconds per later token: (run(new) - run(1)) / (new - 1)); with `cpu` a
    list, the same two in process CPU seconds are appended to it."""
    first, first_cpu = timed_both(lambda: run(1), sync)
    full, full_cpu = timed_both(lambda: run(new), sync)
    if cpu is not None:
        cpu.append((first_cpu, (full_cpu - first_cpu) / (new - 1)))
    return first, (full - first) / (new - 1)


def paired_generation(run_ref: Callable[[int], object], run_ours: Callable[[int], object], new: int, rounds: int,
                      sync: Callable[[], None], cpu: dict | None = None
                      ) -> dict[str, tuple[list[float], float, float]]:
    """Rounds of `first_and_per_token` on both sides, alternating which goes first -> {"first" | "token": (the
    paired ratios reference / ours, the reference's median seconds, ours)}. With `cpu` a dict, it gets the same
    two entries in process CPU seconds."""
    pairs, cpu_pairs = [], []
    for r in range(rounds):
        order = [run_ref, run_ours] if r % 2 == 0 else [run_ours, run_ref]
        got, used = {}, {}
        for fn in order:
            spent: list = []
            got[id(fn)] = first_and_per_token(fn, new, sync, spent)
            used[id(fn)] = spent[0]
        pairs.append((got[id(run_ref)], got[id(run_ours)]))
        cpu_pairs.append((used[id(run_ref)], used[id(run_ours)]))
    out = {}
    for k, i in (("first", 0), ("token", 1)):
        for target, source in ((out, pairs), (cpu, cpu_pairs)):
            if target is None:
                continue
            ref, ours = [p[0][i] for p in source], [p[1][i] for p in source]
            target[k] = ([a / b for a, b in zip(ref, ours)], statistics.median(ref), statistics.median(ours))
    return out
