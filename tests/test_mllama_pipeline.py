"""Llama 3.2 Vision end to end: a tiny random MllamaForConditionalGeneration and transformers' MllamaProcessor files
in one directory, through `pm.pipeline("image-text-to-text")` (answers equal transformers' processor + generate on
the same messages: one image, two images, none), `polymodal chat --image`, and `polymodal serve` with image_url
parts (a bad image refused, the server going on)."""

import base64
import io
import json

import pytest
import torch
from test_mllama_processor import PHOTOS, TILE, ask, reference, save_processor

import polymodal as pm
from polymodal.cli import main

transformers = pytest.importorskip("transformers")
NEW = 8


def save_model(path):
    """A tiny random Llama 3.2 Vision over the processor's 112-px tiles, saved beside its processor files."""
    save_processor(path)
    tok = reference(path).tokenizer
    config = transformers.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=TILE, patch_size=28, max_num_tiles=4, vision_output_dim=96,
                           intermediate_layers_indices=[0, 1]),
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # wider than transformers' init, and open gates, so that the answers depend on the image
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.8)
            elif p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama-chat")
    return path, save_model(path)


def reference_answer(path, model, conversation) -> str:
    proc = reference(path)
    inputs = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


CONVERSATIONS = {
    "one image": [ask("What is shown in this image?", PHOTOS["square"])],
    "two images": [ask("Compare them.", PHOTOS["wide"], PHOTOS["tall"])],
    "text only": [ask("Describe the photo in detail, please.")],
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_pipeline_answers_as_transformers(checkpoint, case):
    path, ref = checkpoint
    pipe = pm.pipeline("image-text-to-text", model=path)
    (out,) = pipe(CONVERSATIONS[case], max_new_tokens=NEW)
    want = reference_answer(path, ref, CONVERSATIONS[case])
    assert len(want) >= NEW // 2  # the random weights say something, not nothing
    assert out["generated_text"][-1]["content"] == want


def test_the_image_changes_the_answer(checkpoint):
    path, _ = checkpoint
    pipe = pm.pipeline("image-text-to-text", model=path)
    answers = {pipe([ask("What is shown in this image?", PHOTOS[name])], max_new_tokens=NEW)[0]
               ["generated_text"][-1]["content"] for name in ("square", "wide", "small")}
    assert len(answers) > 1  # open gates: the model reads its images


def test_cli_chat_with_an_image(checkpoint, tmp_path, capsys):
    path, ref = checkpoint
    photo = tmp_path / "photo.png"
    PHOTOS["square"].save(photo)
    rc = main(["chat", "--json", "--model", str(path), "--image", str(photo), "--max-new-tokens", str(NEW),
               "What is shown in this image?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (result,) = json.loads(captured.out)
    assert result["generated_text"][-2]["content"][0] == {"type": "image", "path": str(photo)}
    from PIL import Image

    want = reference_answer(path, ref, [ask("What is shown in this image?", Image.open(photo).convert("RGB"))])
    assert result["generated_text"][-1]["content"] == want
    assert main(["chat", "--model", str(path), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and len(err.strip().splitlines()) == 1


def test_server_takes_image_url_parts(checkpoint):
    import httpx
    from serve_helpers import running

    from polymodal.serve import ServedModels, create_app
    from polymodal.serve.registry import load_model

    path, _ = checkpoint
    served = ServedModels([load_model("vision", path)])
    assert {"text", "image"} <= set(served.get("vision").modalities)
    png = io.BytesIO()
    PHOTOS["wide"].save(png, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with running(create_app(served)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vision", "max_tokens": NEW,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                                 {"type": "text", "text": "Compare them."}]}]})
        assert r.status_code == 200, r.text
        from PIL import Image

        pipe = pm.pipeline("image-text-to-text", model=path)
        (want,) = pipe([ask("Compare them.", Image.open(io.BytesIO(png.getvalue())))], max_new_tokens=NEW)
        assert r.json()["choices"][0]["message"]["content"] == want["generated_text"][-1]["content"]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vision", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                         {"type": "text", "text": "?"}]}]})
        assert r.status_code in (400, 415) and "image" in r.text.lower()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "vision", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Describe the photo in detail, please."}]})
        assert r.status_code == 200, r.text  # text only, the server goes on
