"""What polymodal knows about a model beyond its weights: one record per model, `pm.record(model)`.

    model = pm.load("./llama-dir")
    pm.record(model).source              # PosixPath('llama-dir'): the processor and tokenizer files are beside it
    pm.record(model).layout = "polymodal"
    pm.save(model, "out/")               # now in polymodal's layout

The loader fills it in; a model built with `pm.build` or by hand gets an empty one on first use (no source, its
family's default layout, no generation config), so every reader can ask without checking first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ATTRIBUTE = "_pm_record"  # where the record lives on the module


@dataclass
class ModelRecord:
    """Where a model came from and what goes with it.

    source: the checkpoint directory it was loaded from (the pipelines read its processor, tokenizer and
        preprocessor files there); None for a model built in code or read from a .gguf file.
    layout: the checkpoint layout `pm.save` writes ("transformers", "timm", "open_clip", "polymodal"); None: the
        family's default. The loader sets the layout it read; a variant the default cannot hold sets "polymodal".
    generation_config: generation_config.json beside the weights (sampling defaults, eos and pad ids), or None.
    tokenizer: a tokenizer that travels with the model instead of files beside it (a GGUF file's), or None.
    gguf: the .gguf file it was read from, or None.
    """

    source: Path | None = None
    layout: str | None = None
    generation_config: dict[str, Any] | None = None
    tokenizer: Any = None
    gguf: Path | None = None

    @property
    def origin(self) -> Path | None:
        """The file or directory the model was loaded from, for messages; None for a model built in code."""
        return self.source or self.gguf


def record(model) -> ModelRecord:
    """The model's record, created (empty) on first use."""
    attributes = vars(model)
    found = attributes.get(_ATTRIBUTE)
    # setdefault: threads that ask for the first time together (the server's) get one and the same record
    return found if found is not None else attributes.setdefault(_ATTRIBUTE, ModelRecord())
