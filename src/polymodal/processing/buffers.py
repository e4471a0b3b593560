"""Recycled memory for the processors' large outputs.

A batch of four 1024-px photos becomes ~100 MB of Qwen2-VL patches. An allocation that large is a fresh memory map
on every call (glibc maps anything over 32 MiB apart and unmaps it when freed), and the kernel then faults in and
zeroes every page as it is first written: ~35-50 ms of a ~40 ms preprocessing on a 2-core machine (measured:
`torch.empty(21904, 1176).fill_(0)` 35-48 ms, the same fill on memory already mapped 5.5 ms). Asking for 2 MiB
pages (madvise) made it worse where memory was fragmented: the kernel compacted first, 143 ms.

`empty(shape)` therefore hands out tensors over pooled anonymous maps: a map whose tensor (and every view of it) is
gone is handed out again, already faulted in. Liveness is exact: a tensor made by `torch.frombuffer` holds a
reference to its map for as long as any view of its storage lives, so a map nobody else references is free. The
pool keeps at most `limit` bytes of idle maps; smaller requests go to torch's allocator as usual. The memory is not
zeroed: callers write every element (torch.empty's contract)."""

from __future__ import annotations

import math
import mmap
import sys
import threading

import torch
from torch import Tensor

_PAGE = 1 << 21


class BufferPool:
    """Large uninitialized tensors over recycled maps (see the module's docstring).

    threshold: requests below it (bytes) are plain `torch.empty`; limit: the most bytes of maps kept while idle (a
    larger request is a plain `torch.empty` too)."""

    def __init__(self, threshold: int = 32 << 20, limit: int = 256 << 20):
        self.threshold, self.limit = threshold, limit
        self._maps: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """An uninitialized tensor of `shape` (its memory may hold an earlier output's values)."""
        count = math.prod(shape)
        size = count * torch.empty((), dtype=dtype).element_size()
        if not self.threshold <= size <= self.limit:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            buf = self._take(size)
        return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)

    def _take(self, size: int) -> mmap.mmap:
        idle = _idle(self._maps)
        fits = [m for m in idle if size <= len(m) <= 2 * size]  # a much larger map would strand its rest
        if fits:
            buf = min(fits, key=len)
        else:
            buf = mmap.mmap(-1, -(-size // _PAGE) * _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # maps in use stay (they cost nothing extra until freed); of the other idle ones, the largest that fit the
        # limit beside the one handed out (the large ones are what the page faults cost)
        free = {id(m) for m in idle}
        keep, total = [buf], len(buf)
        keep += [m for m in self._maps if id(m) not in free]
        for m in sorted(idle, key=len, reverse=True):
            if m is not buf and total + len(m) <= self.limit:
                keep.append(m)
                total += len(m)
        self._maps = keep
        return buf

    def idle_bytes(self) -> int:
        """Bytes of maps held that no tensor uses now."""
        with self._lock:
            return sum(len(m) for m in _idle(self._maps))


def _idle(maps: list[mmap.mmap]) -> list[mmap.mmap]:
    """The maps no tensor uses: referenced by the list alone (getrefcount's argument is the other reference; a
    tensor over a map, through any view of its storage, adds one)."""
    return [maps[i] for i in range(len(maps)) if sys.getrefcount(maps[i]) <= 2]


_POOL = BufferPool()


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """`torch.empty(shape)` for the processors' outputs, large ones over the shared pool's recycled maps."""
    return _POOL.empty(*shape, dtype=dtype)
