"""blip2-shapes (train/blip2.py): stage 1's three Q-Former masks position by position, the joint forward under the
unimodal mask equal to the model's own separate image and text passes, both stages end to end at a tiny size (the
losses fall, the image encoder and the LLM stay bit-identical, stage 2 starts from stage 1's Q-Former), the
ablation's table, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polymodal as pm
from polymodal.cli import main
from polymodal.processing.text import TextTokenizer
from polymodal.train import ConfigError, recipe_config, run
from polymodal.train.blip2 import (
    ITG_HEAD_FILE,
    Blip2ShapesConfig,
    QFormerPretraining,
    blip2_config,
    init_from_stage1,
    qformer_mask,
    qformer_text,
    shapes_tokenizer,
)

TINY = ["max_steps=25", "batch_size=16", "train_images=96", "eval_images=6", "vision_steps=5", "llm_steps=150",
        "log_every=1", "save_every=25", "width=32", "num_query_tokens=4", "lr=3e-3"]

# ------------------------------------------------------------------------------------------------ masks


def _grid(kind: str) -> list[list[int]]:
    """Two queries and three text tokens, the last one padding: who sees whom (row attends column)."""
    return qformer_mask(kind, 2, torch.tensor([[1, 1, 0]]))[0, 0].int().tolist()


def test_unimodal_mask_keeps_queries_and_text_apart():
    #         q0 q1 t0 t1 pad
    assert _grid("unimodal") == [[1, 1, 0, 0, 0],   # q0: the queries only
                                 [1, 1, 0, 0, 0],   # q1
                                 [0, 0, 1, 1, 0],   # t0: the real text only
                                 [0, 0, 1, 1, 0],   # t1
                                 [0, 0, 1, 1, 0]]   # pad: its output is never read


def test_bidirectional_mask_lets_everything_see_everything_real():
    assert _grid("bidirectional") == [[1, 1, 1, 1, 0]] * 5


def test_multimodal_causal_mask():
    assert _grid("multimodal-causal") == [[1, 1, 0, 0, 0],   # queries: the queries only, never the text
                                          [1, 1, 0, 0, 0],
                                          [1, 1, 1, 0, 0],   # t0: every query and itself
                                          [1, 1, 1, 1, 0],   # t1: every query, t0 and itself
                                          [1, 1, 1, 1, 0]]   # pad: padding keys stay hidden


def test_mask_refusals():
    with pytest.raises(ValueError, match="unimodal, bidirectional or multimodal-causal"):
        qformer_mask("causal", 2, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"text_mask must be \(B, T\)"):
        qformer_mask("unimodal", 2, torch.ones(3))


def _stage1_model(seed: int = 0) -> tuple[QFormerPretraining, object, Blip2ShapesConfig]:
    c = recipe_config("blip2-shapes", ["width=32", "num_query_tokens=4", "image_size=32"])
    tok = shapes_tokenizer()
    torch.manual_seed(seed)
    model = QFormerPretraining(blip2_config(c, tok, 1), tok.token_to_id("[DEC]")).eval()
    for p in model.parameters():  # away from the zero initialisation of query_tokens, so every position differs
        p.data.add_(torch.randn_like(p) * 0.05)
    return model, tok, c


def test_masks_in_the_qformer_mean_what_they_say():
    """Under the unimodal mask the joint forward's queries equal the model's image-only pass
    (get_qformer_features) and its text equals the text-only pass (what encode_text reads); under the
    multimodal-causal mask no query and no earlier text token changes when a later token does; under the
    bidirectional mask the queries read the text."""
    model, tok, _ = _stage1_model()
    m, Q = model.blip2, 4
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    ids, mask = qformer_text(tok, ["a red circle", "a large blue star"])
    image = m.image_embeds(px)
    with torch.no_grad():
        joint = model._joint(image, ids, mask, "unimodal")
        queries = m.get_qformer_features(px)
        text = m.qformer(m.embeddings(ids), 0, mask)
        torch.testing.assert_close(joint[:, :Q], queries, rtol=0, atol=1e-5)  # same math, other batching
        torch.testing.assert_close(joint[:, Q:][mask.bool()], text[mask.bool()], rtol=0, atol=1e-5)

        other = ids.clone()
        other[:, 3] = tok.token_to_id("green")  # change the third word
        a = model._joint(image, ids, mask, "multimodal-causal")
        b = model._joint(image, other, mask, "multimodal-causal")
        assert torch.equal(a[:, : Q + 3], b[:, : Q + 3])  # queries and [CLS] w1 w2: nothing later is seen
        assert not torch.allclose(a[:, Q + 3], b[:, Q + 3])
        c_ = model._joint(image, ids, mask, "bidirectional")
        d = model._joint(image, other, mask, "bidirectional")
        assert not torch.allclose(c_[:, :Q], d[:, :Q])  # ITM's queries read the text


def test_qformer_refuses_a_malformed_full_mask():
    model, tok, _ = _stage1_model()
    ids, mask = qformer_text(tok, ["a red circle"])
    full = qformer_mask("unimodal", 4, mask)
    x = torch.randn(1, 4 + ids.shape[1], 32)
    image = torch.randn(1, 17, 32)
    with pytest.raises(ValueError, match="full Q-Former mask is boolean"):
        model.blip2.qformer(x, 4, full.float(), image)
    with pytest.raises(ValueError, match="full Q-Former mask is boolean"):
        model.blip2.qformer(x, 4, full[..., :-1], image)


# ------------------------------------------------------------------------------------------- end to end


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny ablation run (frozen parts, stage 1, stage 2 from it and from scratch) shared by the tests."""
    out = tmp_path_factory.mktemp("blip2-shapes")
    return out, run("blip2-shapes", out, [*TINY, "ablation=true"], quiet=True)


def test_both_stages_and_the_ablation_end_to_end(ablation):
    out, summary = ablation
    assert set(summary["stages"]) == {"stage1", "stage2", "stage2-scratch"}
    assert summary["steps"] == 25 and summary["eval"] == summary["stages"]["stage2"]["eval"]
    for arm in summary["stages"]:
        losses = _losses(out / arm)
        assert len(losses) == 25
        assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), (arm, losses)  # the loss falls by over 10%
    for part in ("itc", "itm", "itg"):
        assert all(torch.isfinite(torch.tensor(_losses(out / "stage1", part))))

    # the frozen parts: stage 1's image encoder and stage 2's image encoder and LLM, after training, bit for bit
    frozen = out / "frozen"
    vision = torch.load(frozen / "vision.pt", weights_only=True)
    llm = pm.load(frozen / "llm").state_dict()
    stage1 = pm.load(out / "stage1" / "model")
    assert stage1.config.task == "retrieval"
    for arm in ("stage2", "stage2-scratch"):
        model = pm.load(out / arm / "model")
        assert model.config.task == "generation"
        for k, v in vision.items():
            assert torch.equal(model.vision_model.state_dict()[k], v), (arm, k)
            assert torch.equal(stage1.vision_model.state_dict()[k], v), k
        for k, v in llm.items():
            assert torch.equal(model.language_model.state_dict()[k], v), (arm, k)
        tok = TextTokenizer.from_pretrained(out / arm / "model")  # the exported model carries its tokenizer
        assert tok.token_to_id("[IMG]") == model.config.image_token_index
    head = load_file(str(out / "stage1" / "model" / ITG_HEAD_FILE))
    assert {"Qformer.cls.predictions.transform.dense.weight", "Qformer.cls.predictions.bias", "temp"} <= set(head)

    for key in ("caption_exact_train", "caption_exact_heldout", "vqa_accuracy_train", "vqa_accuracy_heldout"):
        assert 0 <= summary["stages"]["stage2"]["eval"][key] <= 1
    table = (out / "ablation.md").read_text()
    assert "the stage-1 Q-Former" in table and "scratch" in table
    assert json.loads((out / "ablation.json").read_text())["stage2"]["caption_exact_heldout"] is not None


def test_stage2_starts_from_a_stage1_run(ablation, tmp_path):
    """init=DIR copies the queries and every Q-Former tensor the generative Q-Former has (not the text
    feed-forward); a stage-2 run alone takes the frozen parts recorded in that stage-1 run."""
    out, _ = ablation
    s1 = out / "stage1"
    assert json.loads((s1 / "frozen.json").read_text())["frozen"] == str(out / "frozen")
    c = recipe_config("blip2-shapes", [*TINY, "stage=2"])
    model = pm.build("blip-2", blip2_config(c, shapes_tokenizer(), 2))
    init_from_stage1(model, s1)
    source = pm.load(s1 / "model")
    assert torch.equal(model.query_tokens, source.query_tokens)
    theirs, ours = source.qformer.state_dict(), model.qformer.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert set(theirs) - set(ours) and all(".mlp." in k or ".norm2." in k for k in set(theirs) - set(ours))

    s2 = tmp_path / "s2"
    summary = run("blip2-shapes", s2, [*TINY, "stage=2", f"init={s1}", "max_steps=2"], quiet=True)
    assert summary["steps"] == 2
    assert json.loads((s2 / "frozen.json").read_text())["frozen"] == str(out / "frozen")
    assert not (s2 / "frozen").exists()  # nothing trained again
    with pytest.raises(ConfigError, match="no frozen.json"):
        run("blip2-shapes", tmp_path / "s3", [*TINY, "stage=2", f"init={tmp_path}"], quiet=True)


def test_cli_reports_both_stages_and_the_ablation(ablation, capsys):
    """`polymodal train blip2-shapes` with stage=both and with ablation=true (here resumed: every stage is
    finished, nothing trains again) ends with its one-line report or the table."""
    out, _ = ablation
    args = ["train", "blip2-shapes", "--out", str(out), *(x for o in TINY for x in ("--set", o)), "--resume"]
    assert main([*args, "--set", "stage=both"]) == 0
    assert "trained blip2-shapes: 25 steps" in capsys.readouterr().out
    assert main([*args, "--set", "ablation=true"]) == 0
    assert "| scratch (no stage 1) |" in capsys.readouterr().out
    assert main(["train", "blip2-shapes", "--out", str(out / "x"), "--set", "stage=2", "--set", "init=nowhere"]) == 2


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="use it with stage=2"):
        recipe_config("blip2-shapes", ["init=somewhere", "stage=1"])
    with pytest.raises(ConfigError, match="stage must be one of"):
        recipe_config("blip2-shapes", ["stage=3"])
    with pytest.raises(ConfigError, match="width must be a multiple"):
        recipe_config("blip2-shapes", ["width=30"])
    c = replace(Blip2ShapesConfig(), width=32, num_query_tokens=4, stage="2")
    model = pm.build("blip-2", blip2_config(c, shapes_tokenizer(), 2))
    with pytest.raises(ConfigError, match="finished blip2-shapes stage-1 run"):
        init_from_stage1(model, tmp_path)
    with pytest.raises(ValueError, match="a retrieval Blip2Config"):
        QFormerPretraining(blip2_config(c, shapes_tokenizer(), 2), 6)
