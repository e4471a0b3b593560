"""The CLI: --json prints exactly one JSON document; bad input exits 2 with one line on stderr."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import polymodal as pm


def run(*args):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True, timeout=300)


def test_models_json(tmp_path, clip_dir):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(clip_dir, cache / "demo" / "clip-run" / "model")
    (cache / "junk").mkdir()
    (cache / "junk" / "config.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "models", "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "POLYMODAL_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    names = {row["family"] for row in out["families"]}
    assert {"lenet", "resnet", "vit", "clip"} <= names
    vit = next(row for row in out["families"] if row["family"] == "vit")
    assert "vit-b/16" in vit["presets"] and "google/vit-base-patch16-224" in vit["hub_ids"]
    # what runs offline comes first: the embedded chat model (when installed) and the cache's CLIP, not the junk
    offline = {row["source"]: row["family"] for row in out["offline"]}
    assert offline.get(str(cache / "demo" / "clip-run" / "model")) == "clip"
    assert not any("junk" in source for source in offline)
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "models"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "POLYMODAL_CACHE": str(cache)})
    assert r.stdout.startswith("Runs here offline") and str(cache / "demo" / "clip-run" / "model") in r.stdout


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(p)
    return p


def test_zero_shot_json(clip_dir, image):
    r = run("zero-shot", "--model", str(clip_dir), "--image", str(image), "--labels", "red, green ,blue", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(x["label"] for x in out) == ["blue", "green", "red"]


def test_retrieve_and_embed_json(clip_dir, image):
    r = run("retrieve", "--model", str(clip_dir), "--images", str(image), str(image), "--texts", "a", "b", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["text_to_image"]) == 2
    r = run("embed", "--model", str(clip_dir), "--image", str(image), "--text", "hi", "--json")
    out = json.loads(r.stdout)
    assert len(out["image_embeddings"]) == 1 and len(out["text_embeddings"]) == 1


def test_classify_json(tmp_path, image):
    from polymodal.models.vit import ViTConfig

    model = pm.build("vit", ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, image_size=32, patch_size=8, num_labels=3,
                                      id2label=("cat", "dog", "car")))
    pm.save(model, tmp_path / "vit")
    r = run("classify", "--model", str(tmp_path / "vit"), "--image", str(image), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out) == 2 and {x["label"] for x in out} <= {"cat", "dog", "car"}


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "too_large", "unknown_model", "bad_flag"])
def test_bad_input_exits_2_with_one_line(tmp_path, clip_dir, case):
    from test_processing import _png  # a PNG header claiming 100k x 100k pixels, nothing behind it

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(100_000, 100_000))
    args = {
        "missing_image": ["zero-shot", "--model", str(clip_dir), "--image", str(tmp_path / "nope.png"),
                          "--labels", "a,b"],
        "not_an_image": ["zero-shot", "--model", str(clip_dir), "--image", str(junk), "--labels", "a,b", "--json"],
        "too_large": ["retrieve", "--model", str(clip_dir), "--images", str(bomb), "--texts", "a", "--json"],
        "unknown_model": ["classify", "--model", str(tmp_path / "no-such-model"), "--image", str(junk)],
        "bad_flag": ["zero-shot", "--frobnicate"],
    }[case]
    r = run(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
