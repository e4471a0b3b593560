"""Distributed training on PyTorch's own engine: `torchrun --nproc_per_node N` sets RANK/WORLD_SIZE/MASTER_*;
we join the process group (gloo on CPU, NCCL on GPU) and wrap the model in DDP or FSDP2 (`fully_shard`).
A plain `python` run is a world of one: nothing is initialized and nothing is wrapped."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join the process group that torchrun describes in the environment, or return a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if size == 1:
        return World(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    global _joined
    _joined = True
    return World(dist.get_rank(), dist.get_world_size(), local, device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


_joined = False  # this process has been in a process group (see `end_process`)


def joined() -> bool:
    """Whether this process joined a process group through `init_world` (a torchrun worker)."""
    return _joined


def end_process(code: int) -> None:
    """Leave a torchrun worker with `code` without the interpreter's shutdown: stdio flushed, then `os._exit`.

    Why: gloo's worker threads release a finished collective's tensors after the caller has its result, and
    releasing a tensor that Python has seen takes the GIL. `destroy_process_group` cannot join those threads
    (DDP and FSDP keep references to the group that outlive them), so a worker that reaches interpreter
    shutdown first is killed inside a C++ destructor: "terminate called without an active exception", SIGABRT,
    and torchrun reports the whole run failed after it had finished and saved everything. Nothing is left to
    do at that point but flush what was printed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def mean_across(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (every process gets it)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def wrap(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """DDP or FSDP2 around `model` (already on `world.device`). FSDP2 shards each block of every ModuleList
    (transformer layers) and then the root, the usual per-layer granularity."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
