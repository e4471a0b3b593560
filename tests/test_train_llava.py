"""llava-shapes (train/llava.py) on a tiny random LLaMA (transformers' save_pretrained, SmolLM2's real tokenizer) and a
tiny random CLIP tower: stage 1 trains the projector alone and stage 2 projector + LLM (every other tensor
bit-identical), the label mask covers the assistant's answers only, LLaVA's three data kinds are generated and read
back by their parsers, a resumed run ends where an uninterrupted one does, and the export is what pm.load and
transformers' LlavaForConditionalGeneration and AutoProcessor load (the same logits)."""

from __future__ import annotations

import json
import random

import pytest
import torch

import polymodal as pm
from polymodal.train import ConfigError, TrainingInterrupted, recipe_config, run
from polymodal.train import llava as L

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (its 49,152 ids), and a tiny CLIP (32 px, 8 px patches: 16 features)."""
    from polymodal.pipelines.text import default_chat_model, default_text_tokenizer

    root = tmp_path_factory.mktemp("llava-parts")
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2))
    llm.save_pretrained(root / "llm")
    default_text_tokenizer(pm.load(default_chat_model())).save_pretrained(root / "llm")
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 97,
                     "eos_token_id": 98, "pad_token_id": 0}, projection_dim=16))
    clip.save_pretrained(root / "clip")
    return root


def _tiny(parts, *extra: str) -> list[str]:
    return [f"llm={parts / 'llm'}", f"clip={parts / 'clip'}", "train_scenes=16", "eval_scenes=1", "batch_size=4",
            "max_steps=3", "stage1_steps=2", "stage1_batch_size=4", "save_every=1", "log_every=1", "lr=1e-2",
            "stage1_lr=1e-2", *extra]


def test_three_kinds_are_generated_and_parse():
    c = recipe_config("llava-shapes", ["objects_min=2", "objects_max=3"])
    world = L.scenes(c, 0, "train")
    seen = 0
    for i in range(20):
        s = world.sample(i)
        assert L.parse_description(L.describe(s, c.scene_size)) == L.description_truth(s, c.scene_size)
        for q, reply, short in L.reasoning_pairs(s, random.Random(i)):
            assert L.parse_reasoning(q, reply) == short
            seen += short != "nothing"
        conv = L.instruction(s, "conversation", c.scene_size, random.Random(i))
        assert 4 <= len(conv) <= 6 and conv[0]["content"][0]["type"] == "image"
        assert all(m["role"] == ("user" if j % 2 == 0 else "assistant") for j, m in enumerate(conv))
        pairs = dict(L.conversation_pairs(s, c.scene_size))
        assert pairs["how many shapes are there?"] in ("two", "three")
    assert seen > 10  # relations that name objects, and counts, not only "nothing"
    # every held-out scene is made of never-seen combinations only
    assert all((o.color, o.shape) in L.vocabulary().held_out for o in L.scenes(c, 1, "heldout").sample(0).objects)


def test_labels_cover_the_answers_only(parts):
    c = recipe_config("llava-shapes", _tiny(parts, "stage=2"))
    model, tok = L.build_llava(c)
    assert tok.token_to_id(L.IMAGE_TOKEN) == 49152 == model.config.image_token_index
    proc = L.processor(model, tok)
    s = L.scenes(c, 0, "train").sample(5)
    conv = L.instruction(s, "conversation", c.scene_size, random.Random(0))
    row = L.example(proc, conv)
    ids, labels = row["input_ids"], row["labels"]
    assert (ids == 49152).sum() == model.config.image_tokens == 16
    answers = [m["content"][0]["text"] for m in conv if m["role"] == "assistant"]
    end = tok.token_to_id("<|im_end|>")
    want = [t for a in answers for t in tok.encode(a, add_special_tokens=False) + [end]]
    assert labels[labels != -100].tolist() == want
    assert (labels[ids == 49152] == -100).all()  # the image and every prompt token are context
    text = tok.decode(ids[labels == -100].tolist(), skip_special_tokens=False)
    assert "<|im_start|>user" in text and "system" not in text  # no default system message with an image
    batch = L.collate_examples([row, L.example(proc, L.instruction(s, "description", 64, random.Random(1)))],
                               tok.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # the training forward is Llava.forward: its loss from the full logits at the labelled positions
    m = L.InstructionTuning(model)
    loss, _ = m(**batch)
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # a text-only conversation renders as SmolLM2's own template (its default system message)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True).startswith("<|im_start|>system\nYou are")


def _state(run_dir):
    model = pm.load(run_dir / "model")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stages_train_only_their_parts_and_export_loads(parts, tmp_path):
    out = tmp_path / "run"
    summary = run("llava-shapes", out, _tiny(parts), quiet=True)
    s1, s2 = summary["stages"]["stage1"], summary["stages"]["stage2"]
    assert s1["eval"]["changed"] == {"vision_tower": False, "multi_modal_projector": True, "language_model": False}
    assert s2["eval"]["changed"] == {"vision_tower": False, "multi_modal_projector": True, "language_model": True}
    assert s1["eval"]["frozen_bit_identical"] and s2["eval"]["frozen_bit_identical"]
    assert set(s2["eval"]["seen"]) >= {"conversation", "description", "reasoning: counting", "reasoning: relations"}
    assert len(s2["eval"]["text_only"]) == len(L.TEXT_PROMPTS)
    # stage 1's weights outside the projector are the LLM's and the tower's; stage 2 starts from stage 1's projector
    before, after = _state(out / "stage1"), _state(out / "stage2")
    base, _ = L.build_llava(recipe_config("llava-shapes", _tiny(parts, "stage=1")))
    for k, v in base.state_dict().items():
        if not k.startswith("multi_modal_projector"):
            assert torch.equal(before[k], v), k
        if k.startswith("vision_tower"):
            assert torch.equal(after[k], v), k
    # the export: pm.load and transformers' LLaVA + processor read it, the same logits
    where = out / "model"
    assert where.is_symlink() and (where / "processor_config.json").is_file()
    ours = pm.load(where)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(where).eval()
    proc = transformers.AutoProcessor.from_pretrained(where)
    from PIL import Image

    image = Image.open(out / "stage2" / "scene.png")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
    inputs = proc(images=[image], text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == 49152).sum() == 16
    mine = pm.pipeline("image-text-to-text", model=str(where)).processor(
        [{"role": "user", "content": [{"type": "image", "image": image},
                                      {"type": "text", "text": "What color is the circle?"}]}])
    assert torch.equal(mine["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(mine["pixel_values"], inputs["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        want = theirs(**inputs).logits
        got = ours(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32, the decoders' tolerance


def test_resume_continues_exactly(parts, tmp_path, monkeypatch):
    args = _tiny(parts, "stages=2", "max_steps=4", "save_every=2")
    full = run("llava-shapes", tmp_path / "full", args, quiet=True)
    monkeypatch.setenv("POLYMODAL_TRAIN_FAULT", "sigint:3")
    with pytest.raises(TrainingInterrupted):
        run("llava-shapes", tmp_path / "cut", args, quiet=True)
    monkeypatch.delenv("POLYMODAL_TRAIN_FAULT")
    resumed = run("llava-shapes", tmp_path / "cut", args, resume=True, quiet=True)
    assert resumed["final_loss"] == full["final_loss"]
    lines = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_are_refused():
    for bad in (["stages=3"], ["stages=2,1"], ["kinds=jokes"], ["objects_max=7"], ["init=x"],
                ["train_scenes=1", "stage=2"]):
        with pytest.raises(ConfigError):
            recipe_config("llava-shapes", bad)
    with pytest.raises(ConfigError, match="llm="):
        L.load_llm("/nonexistent/model")
