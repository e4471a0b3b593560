"""polymodal: one readable, fast PyTorch codebase for the multimodal stack.

    import polymodal as pm
    model = pm.load("openai/clip-vit-base-patch32")      # or a local Hugging Face / timm / open_clip directory
    pm.save(model, "out/")                               # the same layout; the reference library reads it back
    pm.record(model)                                     # where it came from, its layout, its generation config
    pipe = pm.pipeline("zero-shot-image-classification", model=model)
"""

from __future__ import annotations

import os

# OpenMP's worker threads spin between parallel regions by default. On a machine where another process holds a
# core, a spinning team waits for its descheduled member at every barrier: decoding, thousands of small regions,
# ran 2.5-6x slower in the calling thread (benchmarks/bench_busy.py). Sleeping workers cost nothing measurable
# on a quiet machine. It must be set before torch loads its OpenMP runtime, so import polymodal before torch;
# an OMP_WAIT_POLICY of your own is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from polymodal.nn.inference import optimize_for_inference
from polymodal.weights.checkpoint import CheckpointError
from polymodal.weights.loader import build, load, save
from polymodal.weights.record import ModelRecord, record

__version__ = "0.1.0"


def pipeline(task: str, model=None, **options):
    """A task pipeline (see `polymodal.pipelines`): `pm.pipeline("zero-shot-image-classification", model=...)`."""
    from polymodal.pipelines import pipeline as _pipeline

    return _pipeline(task, model=model, **options)


__all__ = ["CheckpointError", "ModelRecord", "__version__", "build", "load", "optimize_for_inference", "pipeline",
           "record", "save"]
