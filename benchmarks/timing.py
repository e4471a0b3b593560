"""What the paired benchmarks share: one call timed between device synchronizations."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds one call of `fn` takes, with the device's queued work finished before and after (`sync`)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
