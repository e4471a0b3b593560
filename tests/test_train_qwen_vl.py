"""qwen-vl-shapes (train/qwen_vl.py): Qwen-VL's three stages on a tiny model. What each stage trains and what stays
bit-identical, the box text through the tokenizer and parse_regions, IoU on known boxes, exact resume, the export
in the official layout read by pm.load and drawn by `polymodal chat --draw`."""

import json
import random

import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.processing.grounding import RELATIVE_1000, parse_regions
from polymodal.processing.qwen_vl import QwenVLProcessor
from polymodal.train import qwen_vl as Q
from polymodal.train.config import ConfigError
from polymodal.train.engine import TrainingInterrupted
from polymodal.train.recipes import recipe_config, run

TINY = ["vision_width=32", "vision_layers=1", "vision_heads=2", "layers=1", "heads=2", "queries=4", "train_scenes=8",
        "eval_scenes=1", "batch_size=8", "stage_steps=2,2,2,2", "log_every=1"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny run of all three stages (and stage 0, the LLM's text pretraining)."""
    out = tmp_path_factory.mktemp("qwen-vl") / "run"
    return out, run("qwen-vl-shapes", out, TINY, quiet=True)


def _state(where):
    return {k: v.clone() for k, v in pm.load(where / "model").state_dict().items()}


def test_box_text_round_trips_through_the_tokenizer_and_parse_regions():
    tok = Q.shapes_tokenizer()
    size = 112
    for box in [(0.0, 0.0, 111.9, 111.9), (13.4, 56.0, 40.2, 90.7), (100.0, 3.3, 112.0, 20.0)]:
        text = Q.box_text(box, size)
        for answer in (f"<ref>the red circle</ref>{text}", text):
            ids = tok.encode(answer, add_special_tokens=False)
            assert tok.unk_token_id not in ids
            decoded = tok.decode(ids)
            assert decoded == answer  # the tags are ordinary added tokens: decoding keeps them
            (region,) = parse_regions(decoded, RELATIVE_1000)
            assert region.kind == "box" and region.label == ("the red circle" if "<ref>" in answer else None)
            pixels = region.to_image((size, size)).coords
            # int(v / size * 1000), at most 999: back in pixels within one step of the 0-1000 grid
            assert all(abs(p - min(v, size * 0.999)) <= size / 1000 + 1e-9 for p, v in zip(pixels, box))
            assert Q.grounded_box(decoded, (size, size)) == pixels
    # digits are single tokens (Qwen's split), each piece of the world's language one token
    pieces = [tok.id_to_token(i) for i in tok.encode("<box>(120,340),(56,980)</box>", add_special_tokens=False)]
    assert pieces[:6] == ["<box>", "(", "1", "2", "0", ","] and pieces[-1] == "</box>"
    # every prompt and answer of both formats is in the vocabulary, held-out combinations included
    c = recipe_config("qwen-vl-shapes", ["stage=2"])
    rng = random.Random(0)
    for split in ("train", "heldout"):
        for s in Q.scenes(c, 1, split).batch(0, 5):
            for kind in Q.KINDS:
                for chat in (False, True):
                    for prompt, answer, _ in Q.task_pairs(s, kind, chat, size, rng, count=9):
                        for text in (prompt, answer):
                            assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False), text


def test_iou_on_known_boxes():
    assert Q.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert Q.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert Q.iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    assert Q.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert Q.iou((10, 10, 0, 0), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # corners in either order
    assert Q.iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty boxes overlap in nothing
    # scoring: an answer's box against the true pixel box, through the 0-1000 frame
    truth = (10.0, 20.0, 50.0, 60.0)
    assert Q.score("grounding", f"<ref>x</ref>{Q.box_text(truth, 112)}", truth, 112) == (True, pytest.approx(1.0,
                                                                                                          abs=0.03))
    half = (30.0, 20.0, 70.0, 60.0)  # shifted by half its width: IoU 1/3
    ok, value = Q.score("grounding", Q.box_text(half, 112), truth, 112)
    assert not ok and value == pytest.approx(1 / 3, abs=0.02)
    assert Q.score("grounding", "a red circle", truth, 112) == (False, 0.0)


def test_each_stage_trains_what_the_paper_trains(stages):
    out, summary = stages
    runs = summary["stages"]
    assert list(runs) == ["0", "1", "2", "3"]
    expected = {"0": {"tower": False, "adapter": False, "llm": True},
                "1": {"tower": True, "adapter": True, "llm": False},  # pretraining: the LLM frozen
                "2": {"tower": True, "adapter": True, "llm": True},  # multi-task: everything
                "3": {"tower": False, "adapter": True, "llm": True}}  # SFT: the tower frozen
    for stage, want in expected.items():
        e = runs[stage]["eval"]
        assert e["changed"] == want, stage
        assert e["frozen_bit_identical"] and e["positions_fixed"], stage
    for stage in ("1", "2", "3"):
        for split in ("seen", "never_seen"):
            assert set(runs[stage]["eval"][split]) >= {"grounding", "referring", "vqa", "caption", "mean_iou"}
    # each stage starts from the one before: what it froze is that stage's tensors, bit for bit
    s0, s1, s2, s3 = (_state(out / f"stage{k}") for k in "0123")
    for k in s0:
        if k.startswith("language_model."):
            assert torch.equal(s0[k], s1[k]), k
        elif k.startswith("visual.") and not k.startswith("visual.attn_pool."):
            assert torch.equal(s2[k], s3[k]), k
    assert torch.equal(s0["visual.attn_pool.pos_embed"], s3["visual.attn_pool.pos_embed"])
    assert not torch.equal(s1["visual.conv1.proj.weight"], s2["visual.conv1.proj.weight"])
    # stage 1 at the low resolution, 2-3 at the high one: the same weights read both grids
    assert json.loads((out / "stage1" / "model" / "config.json").read_text())["visual"]["image_size"] == 56
    assert (out / "model").resolve() == (out / "stage3" / "model").resolve()
    assert "| 3 |" in (out / "table.md").read_text()


def test_resume_continues_exactly(stages, tmp_path, monkeypatch):
    out, _ = stages
    args = [*TINY, "stages=3", f"init={out / 'stage2'}", "stage_steps=2,2,2,4", "save_every=2"]
    full = run("qwen-vl-shapes", tmp_path / "full", args, quiet=True)
    monkeypatch.setenv("POLYMODAL_TRAIN_FAULT", "sigint:3")
    with pytest.raises(TrainingInterrupted):
        run("qwen-vl-shapes", tmp_path / "cut", args, quiet=True)
    monkeypatch.delenv("POLYMODAL_TRAIN_FAULT")
    resumed = run("qwen-vl-shapes", tmp_path / "cut", args, resume=True, quiet=True)
    assert resumed["final_loss"] == full["final_loss"]
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_the_official_layout_and_the_cli_draws_the_box(tmp_path, capsys):
    # a tiny stage 3 that learns one scene's answers by heart, so that its answer holds a box to draw
    out = tmp_path / "sft"
    run("qwen-vl-shapes", out, [*TINY, "stages=3", "train_scenes=1", "batch_size=6", "stage_steps=1,1,1,120",
                                "stage_lrs=1e-3,1e-3,1e-3,1e-2", "warmup_steps=5", "log_every=50"], quiet=True)
    where = out / "model"
    config = json.loads((where / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["visual"]["n_queries"] == 4
    from safetensors import safe_open

    with safe_open(str(where / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "transformer.visual.attn_pool.pos_embed" in names and "transformer.wte.weight" in names
    assert all(n.startswith(("transformer.", "lm_head.")) for n in names)
    model = pm.load(where)
    assert type(model).__name__ == "QwenVL"
    processor = QwenVLProcessor.from_pretrained(where)
    assert processor.image_tokens == 4 and processor.image_processor.size == (112, 112)

    c = recipe_config("qwen-vl-shapes", [*TINY, "stage=3"])
    s = Q.scenes(c, 0, "train").sample(0)
    scene, drawn = tmp_path / "scene.png", tmp_path / "drawn.png"
    s.image.save(scene)
    o = s.objects[0]
    rc = main(["chat", "--json", "--model", str(where), "--image", str(scene), "--max-new-tokens", "40",
               "--draw", str(drawn), f"where is {Q.phrase(o)}?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (result,) = json.loads(captured.out)
    answer = result["generated_text"][-1]["content"]
    assert answer.startswith(f"<ref>{Q.phrase(o)}</ref><box>"), answer
    (region,) = result["regions"]
    assert region["label"] == Q.phrase(o) and region["frame"] == "image"
    assert Q.iou(region["bbox_2d"], o.box) >= 0.5
    assert region["bbox_2d"] == [round(v, 2) for v in Q.grounded_box(answer, s.image.size)]
    picture = Image.open(drawn).convert("RGB")
    assert picture.size == s.image.size and picture.tobytes() != s.image.convert("RGB").tobytes()


def test_bad_settings_are_refused(tmp_path):
    for bad in (["stages=2,1"], ["stages=1,3"], ["stages=0"], ["stage_steps=1,2"], ["stage_lrs=1,1,1,0"],
                ["queries=15"], ["width=96"], ["low_res=50"], ["objects_max=6"], ["init=x"]):
        with pytest.raises(ConfigError):
            recipe_config("qwen-vl-shapes", bad)
    with pytest.raises(ConfigError, match="init="):
        run("qwen-vl-shapes", tmp_path / "x", [*TINY, "stages=3", f"init={tmp_path / 'missing'}"], quiet=True)
