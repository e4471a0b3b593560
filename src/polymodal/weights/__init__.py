"""Checkpoints: safe reading (safetensors, pickles through `weights_only`), declarative key maps, and the
one strict loader every family uses."""

from polymodal.weights.checkpoint import CheckpointError, open_checkpoint, read_safetensors_header
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Nest, Rename, Transform

__all__ = [
    "CheckpointError",
    "Drop",
    "Fuse",
    "KeyMap",
    "Nest",
    "Rename",
    "Transform",
    "open_checkpoint",
    "read_safetensors_header",
]
