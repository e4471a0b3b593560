"""Atomic, resumable training checkpoints.

Layout: `OUT/checkpoints/step-00000120/` holds `state.pt` (model, optimizer, scheduler, grad scaler, step, data
position), one `rng-rank{R}.pt` per process (Python, NumPy, torch CPU and CUDA generators) and `COMPLETE`.
A checkpoint is written into a hidden temp directory, every file is fsynced, the `COMPLETE` marker is written
last, then the directory is renamed into place (atomic on POSIX) and its parent fsynced. A crash at any moment
leaves either the old set of checkpoints or the old set plus a complete new one; temp leftovers are ignored and
removed on the next start. Only complete checkpoints count, and pruning to the newest K runs after a new one is
in place, so the last good checkpoint is never deleted.

Files are read back with `torch.load(weights_only=True)`: no pickled code runs on resume. A checkpoint whose files
cannot be read, or whose state is not the one its name promises (another step, missing parts, non-finite weights),
is rejected and the next older complete one is tried (`load_newest`): a resume never starts from a damaged state.
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
    resume tests use it to die at a chosen step, or halfway through writing a checkpoint); "sigint:N" and
    "sigterm:N" send it that signal at the start of step N instead. A suffix "@R" (e.g. "sigint:5@1") limits it
    to the process of rank R."""
    spec, _, rank = os.environ.get("POLYMODAL_TRAIN_FAULT", "").partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    what, _, at = spec.partition(":")
    if at != str(step):
        return
    if what == kind:
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "step" and what in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if what == "sigint" else signal.SIGTERM)


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

STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "data", "step", "skipped")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files cannot be read back, or do not hold the training state its name says."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read(file: Path) -> object:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated (PytorchStreamReader), not a torch file, pickled code refused
        raise CorruptCheckpoint(f"{file} cannot be read ({type(e).__name__}: {_first_line(e)})") from None


def check_state(path: Path, state: object) -> None:
    """Raise CorruptCheckpoint unless `state` is a whole training state of the step `path` is named after."""
    where = path / "state.pt"
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{where} holds a {type(state).__name__}, not a training state")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CorruptCheckpoint(f"{where} lacks {', '.join(missing)}")
    step, skipped = state["step"], state["skipped"]
    named = int(_NAME.match(path.name)[1])
    if type(step) is not int or step != named:
        raise CorruptCheckpoint(f"{where} says step {step!r}, but the checkpoint is step {named}")
    if type(skipped) is not int or not 0 <= skipped <= step:
        raise CorruptCheckpoint(f"{where} counts {skipped!r} skipped steps, not a number in 0..{step}")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CorruptCheckpoint(f"{where}: its model state is not a dict of tensors")
    bad = next((k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # checkpoints are only written from finite weights: this one was altered
        raise CorruptCheckpoint(f"{where}: tensor {bad!r} is not finite")
    if not isinstance(state["data"], dict):
        raise CorruptCheckpoint(f"{where}: its data position is not a dict")


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
        """(shared state, this rank's RNG state or None when the run had fewer processes); CorruptCheckpoint
        when a file cannot be read or the state is not whole (see `check_state`)."""
        state = _read(path / "state.pt")
        check_state(path, state)
        rng_file = path / f"rng-rank{rank}.pt"
        rng = None
        if rng_file.is_file() or rank == 0:  # rank 0 always writes one: a missing one is damage
            rng = _read(rng_file)
            if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= rng.keys():
                raise CorruptCheckpoint(f"{rng_file} does not hold the generators' states")
            rng["python"] = _as_tuple(rng["python"])
        return state, rng

    def load_newest(self, rank: int, agree=lambda ok: ok) -> tuple[Path | None, dict | None, dict | None,
                                                                  list[tuple[Path, str]]]:
        """The newest checkpoint that reads back whole: (path, state, this rank's RNG state, [(newer checkpoint,
        why it was rejected)]). `agree(ok) -> bool` makes every process pick the same one (a collective "all
        ok"); the first three are None when none can be used."""
        rejected = []
        for path in reversed(self.complete()):
            state = rng = None
            try:
                state, rng = self.load(path, rank)
                reason = None
            except CorruptCheckpoint as e:
                reason = str(e)
            if agree(reason is None):
                return path, state, rng, rejected
            rejected.append((path, reason or f"{path}: another process could not read its files"))
        return None, None, None, rejected

    def set_aside(self, path: Path) -> Path:
        """Rename a rejected checkpoint to `step-N.rejected` (kept for inspection; it no longer counts as
        complete, so it neither shadows the good ones nor gets pruned in their place)."""
        aside = path.with_name(path.name + ".rejected")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
        return aside
