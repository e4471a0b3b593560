"""qwen2-vl-shapes / qwen2.5-vl-shapes (train/qwen2_vl.py): the training rows as the real processor makes them (loss
on the answer and <|im_end|> only, one placeholder per merged patch, second_per_grid_ts = 2 / fps for Qwen2.5-VL),
both families end to end at a tiny size through `compare=true` (the loss falls, the evaluation returns every
metric, the tables are written, the exported model is what transformers loads: the same logits), and the
refusals."""

from __future__ import annotations

import json

import pytest
import torch

import polymodal as pm
from polymodal.data.moving_shapes import MovingShapes
from polymodal.train import ConfigError, recipe_config, run
from polymodal.train.qwen2_vl import (
    collate_examples,
    example,
    mrope_section,
    processor,
    shapes_tokenizer,
)

TINY = ["max_steps=40", "batch_size=8", "lr=4e-3", "train_images=12", "train_videos=12", "eval_images=3",
        "eval_videos=3", "fps=1,2", "duration_min=2", "duration_max=3", "width=32", "heads=2", "layers=1",
        "vision_width=32", "vision_heads=2", "vision_layers=1", "log_every=1", "save_every=40"]


def test_tokenizer_holds_the_world_and_qwens_special_tokens():
    tok = shapes_tokenizer()
    for word in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "red", "star",
                 "7", "left", "appear"):
        assert tok.token_to_id(word) is not None, word
    ids = tok.encode("at what second did the red circle appear?", add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == "at what second did the red circle appear ?"
    assert mrope_section(16) == [2, 3, 3] and mrope_section(128) == [16, 24, 24]  # the tiny preset's, Qwen2-VL's


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_rows_supervise_the_answer_only(family):
    c = recipe_config("qwen2-vl-shapes", [f"family={family}"])
    tok = shapes_tokenizer()
    proc = processor(c, tok)
    clips = [MovingShapes(56, seed=0, kinds=("appear",), fps=(r,)).sample(i) for i, r in ((0, 1.0), (1, 4.0))]
    rows = [example(proc, "video", clip.frames, *clip.qa[0], clip.fps) for clip in clips]
    from polymodal.data import ShapesWorld

    image = ShapesWorld(56).sample(0)
    rows.append(example(proc, "image", image.image, *image.qa[1]))
    for row, want in zip(rows, [clips[0].qa[0][1], clips[1].qa[0][1], image.qa[1][1]]):
        answer = row["labels"][row["labels"] != -100].tolist()
        assert answer == tok.encode(want, add_special_tokens=False) + [tok.eos_token_id]
        assert row["input_ids"][-len(answer):].tolist() == answer
        prompt = tok.decode(row["input_ids"][:-len(answer)].tolist(), skip_special_tokens=False)
        assert prompt.startswith("<|im_start|> system") and prompt.endswith("<|im_start|> assistant")
    batch = collate_examples(rows, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    grids = batch["video_grid_thw"]
    # 56 x 56 frames: 4 x 4 patches, 4 merged tokens per temporal patch of 2 frames (an odd count repeats the last)
    assert grids.tolist() == [[-(-len(c.frames) // 2), 4, 4] for c in clips]
    assert int((batch["input_ids"] == tok.token_to_id("<|video_pad|>")).sum()) == int(grids.prod(-1).sum()) // 4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    if family == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([2.0, 0.5])
    else:
        assert "second_per_grid_ts" not in batch


def _logged_losses(where) -> list[float]:
    return [json.loads(line)["loss"] for line in (where / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-vl-shapes")
    torch.manual_seed(0)
    return out, run("qwen2-vl-shapes", out, [*TINY, "compare=true"], quiet=True)


def test_both_families_train_and_report(compared):
    out, summary = compared
    for family in ("qwen2_vl", "qwen2_5_vl"):
        losses = _logged_losses(out / family)
        assert len(losses) == 40
        # a dozen images and clips are learned by heart: the loss falls well below its start (ln V ~ 4.9)
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (family, losses[:5], losses[-5:])
        e = summary["runs"][family]["eval"]
        for key in ("image_seen", "image_never_seen", "video_1fps", "video_2fps"):
            assert 0.0 <= e[key] <= 1.0, key
        assert set(e["video_1fps_by_kind"]) <= {"when appeared", "what moved?", "where it went"}
        assert {"how many", "what color", "what shape", "is there"} == set(e["image_seen_by_kind"])
        assert (out / family / "results.md").read_text().startswith("| family |")
        assert family in (out / family / "results.md").read_text()
    table = (out / "table.md").read_text()
    assert "| qwen2_vl |" in table and "| qwen2_5_vl |" in table and "wall time:" in table
    assert "@ 1 fps" in table and "@ 2 fps" in table
    assert set(json.loads((out / "table.json").read_text())) == {"qwen2_vl", "qwen2_5_vl"}


@pytest.mark.parametrize("family, cls", [("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                                         ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")])
def test_exported_model_is_what_transformers_loads(compared, family, cls):
    transformers = pytest.importorskip("transformers")
    out, _ = compared
    ours = pm.load(out / family / "model")
    theirs = getattr(transformers, cls).from_pretrained(out / family / "model").eval()
    c = recipe_config("qwen2-vl-shapes", [*TINY, f"family={family}"])
    clip = MovingShapes(56, seed=5, fps=(2.0,), duration=3).sample(0)  # 6 frames: 3 temporal patches
    inputs = processor(c, shapes_tokenizer())([{"role": "user", "content": [
        {"type": "video", "video": list(clip.frames), "fps": clip.fps}, {"type": "text", "text": clip.qa[0][0]}]}])
    ids = inputs["input_ids"]
    video = shapes_tokenizer().token_to_id("<|video_pad|>")
    # transformers' M-RoPE reads the placeholders from mm_token_type_ids (2: video), which our model reads by id
    with torch.no_grad():
        want = theirs(**inputs, mm_token_type_ids=2 * (ids == video).long()).logits
        got = ours(**inputs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("data=audio", "data must be"),
    ("video_kinds=spin", "video_kinds must be"),
    ("fps=0", "fps must be"),
    ("fps=fast", "fps must be"),
    ("duration_min=9", "durations must"),
    ("frame_size=14", "frame_size must be"),
    ("heads=5", "width 96 over 5 heads"),
    ("vision_heads=3", "vision_width 64 over 3 heads"),
    ("train_videos=0", "train_videos"),
    ("family=llava", "family must be one of"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        recipe_config("qwen2.5-vl-shapes", [override])


def test_a_run_into_a_used_directory_is_refused_before_building(compared):
    out, _ = compared
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run("qwen2-vl-shapes", out / "qwen2_vl", [*TINY, "family=qwen2_vl"])
