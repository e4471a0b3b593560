"""A resumable stream of shuffled batches over an indexable dataset.

The order is a pure function of (seed, epoch): every epoch is a fresh permutation drawn from its own generator,
so the position in the stream is just (epoch, offset) and resuming restores it exactly. Each process takes its
contiguous slice of every global batch, so N processes see together exactly the batch one process would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ShuffledBatches:
    """`next_batch()` -> `collate(indices)` for this rank's share of the next global batch of `batch_size`.

    Batches never straddle epochs: the tail of a permutation shorter than a batch is dropped."""

    def __init__(self, size: int, batch_size: int, collate: Callable[[torch.Tensor], object], *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split over {world_size} processes")
        if size < batch_size:
            raise ValueError(f"the dataset has {size} items, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.collate, self.seed = size, batch_size, collate, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def next_indices(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.offset: self.offset + self.batch_size]
        self.offset += self.batch_size
        share = self.batch_size // self.world_size
        return batch[self.rank * share: (self.rank + 1) * share]

    def next_batch(self):
        return self.collate(self.next_indices())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        epoch, offset = state.get("epoch"), state.get("offset")
        if type(epoch) is not int or type(offset) is not int or epoch < 0 or not 0 <= offset <= self.size:
            raise ValueError(f"the saved data position (epoch {epoch!r}, offset {offset!r}) is not one of this "
                             f"dataset of {self.size} items; was the checkpoint written with other data settings?")
        self.epoch, self.offset = epoch, offset
        self._order = self._permutation(self.epoch)
