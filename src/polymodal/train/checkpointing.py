"""Atomic, resumable training checkpoints.

Layout: `OUT/checkpoints/step-00000120/` holds `state.pt` (model, optimizer, scheduler, grad scaler, step, data
position), one `rng-rank{R}.pt` per process (Python, NumPy, torch CPU and CUDA generators) and `COMPLETE`.
A checkpoint is written into a hidden temp directory, every file is fsynced, the `COMPLETE` marker is written
last, then the directory is renamed into place (atomic on POSIX) and its parent fsynced. A crash at any moment
leaves either the old set of checkpoints or the old set plus a complete new one; temp leftovers are ignored and
removed on the next start. Only complete checkpoints count, and pruning to the newest K runs after a new one is
in place, so the last good checkpoint is never deleted.

Files are read back with `torch.load(weights_only=True)`: no pickled code runs on resume.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fault(kind: str, step: int) -> None:
    """Test hook: POLYMODAL_TRAIN_FAULT="step:N" or "save:N" SIGKILLs this process at that point (the
    resume tests use it to die at a chosen step, or halfway through writing a checkpoint)."""
    if os.environ.get("POLYMODAL_TRAIN_FAULT") == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    """Every generator this process draws from. NumPy's key array is stored as a tensor (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """torch.load returns Python's random state with lists where `random.setstate` wants tuples."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------ directory


class CheckpointDir:
    """The checkpoints of one run. Collective: with several processes every rank calls `save`/`load`."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def clean_leftovers(self) -> None:
        """Remove temp directories of interrupted saves (rank 0, before training starts)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, state: dict | None, rank: int, barrier) -> Path:
        """Write checkpoint `step`. Rank 0 passes the shared `state`; every rank writes its own RNG state."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        _write(tmp / f"rng-rank{rank}.pt", rng_state())
        if rank == 0:
            _write(tmp / "state.pt", state)
            _fault("save", step)
        barrier()
        if rank == 0:
            with open(tmp / MARKER, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path, rank: int) -> tuple[dict, dict | None]:
        """(shared state, this rank's RNG state or None when the run had fewer processes)."""
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng_file = path / f"rng-rank{rank}.pt"
        rng = None
        if rng_file.is_file():
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)
            rng["python"] = _as_tuple(rng["python"])
        return state, rng
