"""The CLI: --json prints exactly one JSON document; bad input exits 2 with one line on stderr."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import polymodal as pm


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True, timeout=300,
                          input=input)


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


@pytest.mark.parametrize("args", [["generate", "--model", "openai:gpt-4o", "Once upon a time"],
                                  ["chat", "--model", "anthropic:claude-3-5-sonnet-20241022", "Hi"],
                                  ["caption", "--model", "gemini:gemini-1.5-pro", "--image", "cat.png"]])
def test_a_hosted_model_outside_serve_exits_2_with_one_line(args, capsys, monkeypatch):
    from polymodal.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # refused for what it is, key or not
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: --model {args[2]} is a hosted model; this command runs local checkpoints "
                                 f"(serve it with `polymodal serve --model {args[2]}`)\n")


# ------------------------------------------------------------------------------------------ chat about images


@pytest.fixture(scope="module")
def llava_chat(tmp_path_factory):
    """A tiny LLaVA with transformers' processor files, two photos saved as files, and the pipeline on it."""
    from test_llava_pipeline import save_tiny_llava
    from test_llava_processor import PHOTOS

    path = tmp_path_factory.mktemp("llava-cli")
    save_tiny_llava(path / "model")
    photos = {}
    for name in ("chelsea", "rocket"):
        photos[name] = path / f"{name}.png"
        PHOTOS[name].save(photos[name])
    return path / "model", photos, pm.pipeline("image-text-to-text", model=path / "model")


def _ask(text, *paths):
    from polymodal.processing import open_image

    return {"role": "user", "content": [*({"type": "image", "image": open_image(p)} for p in paths),
                                        {"type": "text", "text": text}]}


def _answer(pipe, conversation, max_new_tokens=8) -> str:
    return pipe(conversation, max_new_tokens=max_new_tokens)[0]["generated_text"][-1]["content"]


def test_chat_about_images_once_json_and_streamed(llava_chat):
    model, photos, pipe = llava_chat
    a, b = str(photos["chelsea"]), str(photos["rocket"])
    r = run("chat", "--model", str(model), "--image", a, "--image", b, "Compare them.", "--max-new-tokens", "8",
            "--json")
    assert r.returncode == 0, r.stderr
    (out,) = json.loads(r.stdout)
    answer = _answer(pipe, [_ask("Compare them.", a, b)])
    assert out["generated_text"] == [
        {"role": "user", "content": [{"type": "image", "path": a}, {"type": "image", "path": b},
                                     {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": answer}]
    assert out["finish_reason"] in ("stop", "length")
    r = run("chat", "--model", str(model), "--image", a, "--image", b, "Compare them.", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer + "\n"


def test_interactive_chat_attaches_images_to_later_turns(llava_chat):
    model, photos, pipe = llava_chat
    a, b = str(photos["chelsea"]), str(photos["rocket"])
    session = f"/image {a}\nWhat is it?\n/image {a}.missing\n/image {b}\nAnd this one?\n/exit\n"
    r = run("chat", "--model", str(model), "--max-new-tokens", "8", input=session)
    assert r.returncode == 0, r.stderr
    first = _answer(pipe, [_ask("What is it?", a)])
    second = _answer(pipe, [_ask("What is it?", a), {"role": "assistant", "content": first},
                            _ask("And this one?", b)])
    assert r.stdout == f"{first}\n{second}\n"
    assert f"error: {a}.missing: no such file" in r.stderr  # reported; the session went on
    # --image goes with the first question of an interactive session
    r = run("chat", "--model", str(model), "--image", a, "--max-new-tokens", "8", input="What is it?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n"


def test_chat_with_images_refusals_exit_2_with_one_line(llava_chat, tmp_path):
    from test_llava_pipeline import save_tiny_llama

    model, photos, _ = llava_chat
    image = str(photos["chelsea"])
    (tmp_path / "empty").mkdir()  # no checkpoint: the image is checked before any model loads
    cases = {
        "takes no images": ["--model", str(save_tiny_llama(tmp_path / "llama")), "--image", image, "What is it?"],
        "the default chat model (SmolLM2-135M-Instruct) takes no images": ["--image", image, "What is it?"],
        "no such file": ["--model", str(tmp_path / "empty"), "--image", str(tmp_path / "nope.png"), "Hi"],
        "over the model's context of 1,024": ["--model", str(model), *["--image", image] * 8, "Compare them."],
    }
    for says, args in cases.items():
        r = run("chat", *args, "--json")
        assert r.returncode == 2, (says, r.stderr)
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr
