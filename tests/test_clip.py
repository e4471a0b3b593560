"""CLIP: parity with transformers' CLIPModel and open_clip's CLIP (ViT and ModifiedResNet towers) on tiny random
models saved by the reference libraries, key-map round trips back into them, and training through the
contrastive loss."""

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.models.clip import (
    PRESETS,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    VisionTransformer,
    hf_vision_model_key_map,
    read_hf_vision_config,
    write_hf_vision_config,
)
from polymodal.weights import CheckpointError
from polymodal.weights.checkpoint import open_checkpoint
from polymodal.weights.loader import load_weights

# fp32 parity tolerance: both sides run the same math in a different order (fused vs separate projections,
# SDPA kernels); differences of 1e-6..1e-5 are rounding, anything near 1e-4 would be a real bug.
ATOL = 1e-4

VOCAB, EOS, CTX = 99, 90, 16  # an end token below other ids: "first EOS" and "argmax" pooling differ


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every weight off its initial value (zero biases, unit norms, zero-initialized bn3) so that a wrong
    mapping of any tensor shows in the outputs; give BatchNorm non-trivial running statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * scale)
            elif name.endswith("running_var"):
                b.copy_(1 + (torch.rand(b.shape, generator=g) - 0.5) * 10 * scale)
    return model


def _texts(eos: int = EOS, pad: int = 0):
    """A batch with different lengths: right padding after the end-of-text token, one left-padded row, and one
    row that fills the context. Returns (input_ids, attention_mask, eot positions)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((4, CTX), pad, dtype=torch.long)
    mask = torch.zeros(4, CTX, dtype=torch.long)
    spans = [(0, 5), (0, 11), (6, CTX), (0, CTX)]  # [start, end) of the real tokens; row 2 is left-padded
    for row, (a, b) in enumerate(spans):
        tokens = torch.randint(3, VOCAB - 2, (b - a,), generator=g)
        ids[row, a:b] = torch.where(tokens == eos, 3, tokens)  # the end token only at the end
        ids[row, b - 1] = eos
        mask[row, a:b] = 1
    return ids, mask, torch.tensor([b - 1 for _, b in spans])


# ------------------------------------------------------------------------------------------ transformers


def _hf_dir(tmp_path: Path, act: str, eos_token_id: int = EOS, image_size: int = 32) -> tuple:
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    cfg = HFConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CTX, hidden_act=act,
                         eos_token_id=eos_token_id, bos_token_id=97, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, hidden_act=act),
        projection_dim=24,
    )
    ref = _perturb(CLIPModel(cfg)).eval()
    d = tmp_path / f"hf-{act}-{eos_token_id}"
    ref.save_pretrained(d)
    return ref, d


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_parity(tmp_path, act):
    ref, d = _hf_dir(tmp_path, act)
    model = pm.load(d)
    assert model.config.text.pool == "eos" and model.config.text.eos_token_id == EOS
    assert model.config.vision.image_size == 32 and model.config.text.max_position_embeddings == CTX
    pixels = torch.randn(3, 3, 32, 32)
    ids, mask, eot = _texts()
    assert not torch.equal(ids.argmax(-1), eot)  # the batch tells the two pooling rules apart
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=pixels).pooler_output
        want_txt = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
        logits_per_image, logits_per_text = model(pixels, ids, mask)
    assert img.shape == (3, 24) and txt.shape == (4, 24)
    torch.testing.assert_close(img, want_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, want_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_per_image, want.logits_per_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_per_text, want.logits_per_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.logit_scale, ref.logit_scale)


def test_transformers_legacy_eos_pools_at_argmax(tmp_path):
    """eos_token_id == 2 in a transformers config means "pool at the largest id" (the openai/* hub configs)."""
    ref, d = _hf_dir(tmp_path, "quick_gelu", eos_token_id=2)
    model = pm.load(d)
    assert model.config.text.pool == "argmax" and model.config.text.eos_token_id == VOCAB - 1
    ids, mask, _ = _texts()
    ids[0, 1] = 2  # a token 2 before the real end: "first 2" and "argmax" pooling now disagree
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(model.encode_text(ids, mask), want, atol=ATOL, rtol=0)
        out = tmp_path / "legacy-out"
        pm.save(model, out)
    assert json.loads((out / "config.json").read_text())["text_config"]["eos_token_id"] == 2


def test_eot_pooling_and_padding(tmp_path):
    """The text feature is the end-of-text token's: padding ids (masked, or after the end token) change nothing,
    and a right-padded batch equals its rows run one by one. (Left padding shifts the learned absolute
    positions, in transformers as here, so row 2 is only compared with the reference, in the parity tests.)"""
    _, d = _hf_dir(tmp_path, "gelu")
    model = pm.load(d)
    ids, mask, eot = _texts()
    with torch.no_grad():
        batched = model.encode_text(ids, mask)
        for row in (0, 1, 3):
            real = ids[row, mask[row].bool()][None]
            torch.testing.assert_close(batched[row : row + 1], model.encode_text(real), atol=ATOL, rtol=0)
        other = ids.clone()
        other[~mask.bool()] = 7  # different padding ids: masked keys, causal after EOT, never read
        torch.testing.assert_close(model.encode_text(other, mask), batched, atol=ATOL, rtol=0)
        assert not torch.allclose(model.encode_text(other), batched, atol=1e-3)  # unmasked left padding matters
    assert torch.equal(model.text.eot_positions(ids), eot)


def test_transformers_interpolated_positions(tmp_path):
    ref, d = _hf_dir(tmp_path, "quick_gelu")
    model = pm.load(d)
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(model.encode_image(pixels), want, atol=ATOL, rtol=0)


def test_transformers_round_trip(tmp_path):
    from transformers import CLIPModel

    ref, d = _hf_dir(tmp_path, "quick_gelu")
    model = pm.load(d)
    out = tmp_path / "out"
    pm.save(model, out)
    back = CLIPModel.from_pretrained(out).eval()
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k, t in ref_sd.items():
        torch.testing.assert_close(back_sd[k], t, msg=k)
    pixels, (ids, mask, _) = torch.randn(2, 3, 32, 32), _texts()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image,
                                   ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image)


# ------------------------------------------------------- the image tower alone (transformers' CLIPVisionModel)
# LLaVA embeds this tower and reads the tokens of one of its layers; three blocks keep layers 0, 1, -2 and -1 apart.

# Hidden states are tokens of size ~1-10 rather than normalized features: 1e-5 absolute plus 1e-4 relative is the
# same rounding allowance as ATOL, scaled to them (we measure differences of ~1e-6).
FEATURE_TOL = dict(atol=1e-5, rtol=1e-4)


def _hf_vision_dir(tmp_path: Path) -> tuple:
    from transformers import CLIPVisionConfig as HFVisionConfig
    from transformers import CLIPVisionModel

    cfg = HFVisionConfig(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                         image_size=32, patch_size=8, hidden_act="quick_gelu")
    ref = _perturb(CLIPVisionModel(cfg)).eval()
    d = tmp_path / "hf-vision"
    ref.save_pretrained(d)
    return ref, d


def _load_tower(d: Path) -> VisionTransformer:
    """A CLIPVisionModel directory -> our tower, through the pieces a composite family uses."""
    c = read_hf_vision_config(json.loads((d / "config.json").read_text()))
    with torch.device("meta"):
        tower = VisionTransformer(c)
    return load_weights(tower, open_checkpoint(d), hf_vision_model_key_map(c), where=d).eval()


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory):
    ref, d = _hf_vision_dir(tmp_path_factory.mktemp("clip-vision"))
    return ref, _load_tower(d)


@pytest.mark.parametrize("keep_cls", [True, False], ids=["full", "default"])
@pytest.mark.parametrize("layer", [0, 1, -1, -2])
def test_tower_features_match_transformers_hidden_states(vision_pair, layer, keep_cls):
    ref, tower = vision_pair
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(layer % 7))
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        got = tower.features(pixels, layer=layer, keep_cls=keep_cls)
        one = tower.features(pixels[1:2], layer=layer, keep_cls=keep_cls)
    assert ref.config.num_hidden_layers == 3
    assert got.shape == (3, 17 if keep_cls else 16, 48)
    torch.testing.assert_close(got, want if keep_cls else want[:, 1:], **FEATURE_TOL)
    torch.testing.assert_close(one, got[1:2], **FEATURE_TOL)  # a row of the batch is that image alone


def test_tower_features_run_only_the_blocks_they_need(vision_pair):
    _, tower = vision_pair
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(tower.blocks)]
    try:
        with torch.no_grad():
            tower.features(torch.randn(1, 3, 32, 32), layer=-2)
            assert ran == [0, 1]
            ran.clear()
            tower.features(torch.randn(1, 3, 32, 32), layer=0)
            assert ran == []
    finally:
        for h in hooks:
            h.remove()
    for bad in (4, -5):
        with pytest.raises(ValueError, match=f"layer {bad} does not exist in an encoder of 3 blocks"):
            tower.features(torch.randn(1, 3, 32, 32), layer=bad)
    with pytest.raises(ValueError, match=r"pixel_values \(B, 3, H, W\)"):
        tower.features(torch.randn(3, 32, 32))


def test_tower_loads_both_clip_vision_model_layouts_and_saves_what_transformers_reads(tmp_path, vision_pair):
    from transformers import CLIPVisionModel

    ref, tower = vision_pair
    assert tower.proj is None  # CLIPVisionModel has no projection: forward is its pooler_output
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=pixels)
        torch.testing.assert_close(tower(pixels), want.pooler_output, **FEATURE_TOL)
    # transformers 4.x files name the same tensors under `vision_model.`
    _, d = _hf_vision_dir(tmp_path)
    new = _load_tower(d).state_dict()
    sd = load_file(d / "model.safetensors")
    assert "embeddings.class_embedding" in sd
    save_file({f"vision_model.{k}": t for k, t in sd.items()}, d / "model.safetensors")
    old = _load_tower(d).state_dict()
    assert set(old) == set(new)
    for k, t in new.items():
        torch.testing.assert_close(old[k], t, atol=0, rtol=0, msg=k)
    # both spellings of one tensor in a file is an error, not a silent choice
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "embeddings.class_embedding": sd["vision_model.embeddings.class_embedding"].clone()},
              d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 given twice: class_embedding \(from embeddings.class_embedding "
                                              r"and from vision_model.embeddings.class_embedding\)"):
        _load_tower(d)
    # saving: the key map run backwards, config from ours; transformers reads it back whole
    km = hf_vision_model_key_map(tower.config)
    state = tower.state_dict()
    tensors = {n: t.contiguous() for s in km.plan_save(state) for n, t in zip(s.dst, s.fn([state[k] for k in s.src]))}
    assert all(k.startswith("vision_model.") for k in tensors) and len(tensors) == len(ref.state_dict())
    out = tmp_path / "saved"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(write_hf_vision_config(tower.config)))
    back, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=pixels).last_hidden_state, want.last_hidden_state,
                                   **FEATURE_TOL)


# ------------------------------------------------------------------------------------------------ open_clip


def _open_clip_dir(tmp_path: Path, model_cfg: dict, name: str) -> tuple:
    import open_clip

    ref = open_clip.model.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"],
                               quick_gelu=model_cfg.get("quick_gelu", False))
    ref = _perturb(ref).eval()
    d = tmp_path / name
    d.mkdir()
    save_file(ref.state_dict(), d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return ref, d


_OC_TEXT = {"context_length": CTX, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}
_OC_VIT = {"embed_dim": 24, "quick_gelu": True, "text_cfg": {**_OC_TEXT, "pool_type": "eos", "eos_id": 50},
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8}}
_OC_RESNET = {"embed_dim": 24, "text_cfg": _OC_TEXT,
              "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "head_width": 64,
                             "patch_size": None}}


def _open_clip_texts(text_cfg: dict):
    """Pooled at the largest id (OpenAI's <end_of_text> is the last entry), or at the first `eos_id` (then
    larger ids come before it, so the two rules disagree)."""
    ids, _, eot = _texts(eos=text_cfg.get("eos_id", VOCAB - 1) if text_cfg.get("pool_type") == "eos" else VOCAB - 1)
    ids = ids[[0, 1, 3]]  # open_clip pads on the right with 0 and has no attention mask
    return ids, eot[[0, 1, 3]]


@pytest.mark.parametrize(("model_cfg", "size"), [(_OC_VIT, 32), (_OC_RESNET, 64)], ids=["vit", "resnet"])
def test_open_clip_parity_and_round_trip(tmp_path, model_cfg, size):
    import open_clip

    ref, d = _open_clip_dir(tmp_path, model_cfg, "oc")
    model = pm.load(d)
    assert model.config.vision.tower == ("resnet" if isinstance(model_cfg["vision_cfg"]["layers"], list) else "vit")
    pixels = torch.randn(2, 3, size, size)
    ids, eot = _open_clip_texts(model_cfg["text_cfg"])
    if model_cfg["text_cfg"].get("pool_type") == "eos":
        assert not torch.equal(ids.argmax(-1), eot)  # the test tells the two pooling rules apart
    with torch.no_grad():
        want_img, want_txt = ref.encode_image(pixels), ref.encode_text(ids)
        img, txt = model.encode_image(pixels), model.encode_text(ids)
        want_logits = ref.logit_scale.exp() * F.normalize(want_img, dim=-1) @ F.normalize(want_txt, dim=-1).T
        logits, _ = model(pixels, ids)
    torch.testing.assert_close(img, want_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, want_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)
    assert torch.equal(model.text.eot_positions(ids), eot)

    # round trip: our files load strictly into open_clip, through its own config reader too
    out = tmp_path / "out"
    pm.save(model, out)
    back = open_clip.model.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"],
                                quick_gelu=model_cfg.get("quick_gelu", False))
    back.load_state_dict(load_file(out / "open_clip_model.safetensors"), strict=True)
    again = open_clip.create_model(f"local-dir:{out}").eval()
    for m in (back.eval(), again):
        with torch.no_grad():
            torch.testing.assert_close(m.encode_image(pixels), want_img)
            torch.testing.assert_close(m.encode_text(ids), want_txt)


def test_native_round_trip(tmp_path):
    model = pm.build("clip", "clip-resnet-tiny-test")
    _perturb(model).eval()
    pm.record(model).layout = "polymodal"
    pm.save(model, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "polymodal-clip"
    back = pm.load(tmp_path / "native")
    assert back.config == model.config
    pixels, (ids, mask, _) = torch.randn(2, 3, 64, 64), _texts()
    with torch.no_grad():
        torch.testing.assert_close(back(pixels, ids, mask), model(pixels, ids, mask), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("preset", ["clip-tiny-test", "clip-resnet-tiny-test"])
def test_backward_through_contrastive_loss(preset):
    model = pm.build("clip", preset).train()
    size = model.config.vision.image_size
    pixels = torch.randn(4, 3, size, size)
    ids, mask, _ = _texts(eos=model.config.text.eos_token_id)
    logits_per_image, logits_per_text = model(pixels, ids, mask)
    labels = torch.arange(4)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    loss.backward()
    assert torch.isfinite(loss)
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.grad.abs() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # every real token's embedding row gets a gradient; the padding id (masked, or after the end token) none
    grad = model.text.token_embedding.weight.grad
    assert (grad[ids[mask.bool()].unique()].abs().sum(-1) > 0).all()
    assert (grad[0] == 0).all()


# -------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_input(tmp_path):
    model = pm.build("clip", "clip-resnet-tiny-test").eval()
    with pytest.raises(ValueError, match="64 pixels"):
        model.encode_image(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="17 tokens"):
        model.encode_text(torch.zeros(1, CTX + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode_image(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="tower"):
        CLIPVisionConfig(tower="swin")
    with pytest.raises(ValueError, match=r"pm\.record\(model\)\.layout = 'open_clip'"):
        pm.save(model, tmp_path / "x")  # a ResNet tower cannot go into transformers' layout
    cfg = {**_OC_VIT, "vision_cfg": {**_OC_VIT["vision_cfg"], "no_ln_pre": True}}
    _, d = _open_clip_dir(tmp_path, cfg, "bad")
    with pytest.raises(CheckpointError, match="no_ln_pre"):
        pm.load(d)


def test_presets_are_consistent():
    assert PRESETS["RN50"].vision.feature_dim == 2048 and PRESETS["RN50"].vision.num_attention_heads == 32
    assert PRESETS["openai/clip-vit-large-patch14"].vision.grid == 16
    assert CLIPConfig().text == CLIPTextConfig()
    tiny = pm.build("clip", "clip-tiny-test")
    assert sum(p.numel() for p in tiny.parameters()) < 100_000


# ------------------------------------------------------------------------------------------ real sizes


@pytest.mark.slow
@pytest.mark.parametrize(("name", "preset"), [("RN50-quickgelu", "RN50"), ("ViT-B-32", "ViT-B-32")])
def test_open_clip_real_size(tmp_path, name, preset):
    """open_clip's real architectures (random weights: no downloads) give the same features as ours, and
    their configs read back into our presets."""
    import open_clip

    start = time.perf_counter()
    # a smaller perturbation at real depth: at 0.1 the random 50-layer ResNet's features grow to ~1e2, where
    # fp32 rounding alone exceeds the absolute tolerance; at 0.02 they stay near their usual scale (~0.3)
    ref = _perturb(open_clip.create_model(name, pretrained=None), scale=0.02).eval()
    d = tmp_path / name
    d.mkdir()
    save_file(ref.state_dict(), d / "open_clip_model.safetensors")
    cfg = open_clip.get_model_config(name)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = pm.load(d)
    want_cfg = PRESETS[preset]
    assert model.config.vision == want_cfg.vision and model.config.projection_dim == want_cfg.projection_dim
    assert replace(model.config.text, pad_token_id=want_cfg.text.pad_token_id) == want_cfg.text
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :6] = torch.tensor([49406, 320, 1125, 539, 320, 49407])
    ids[1, :3] = torch.tensor([49406, 2368, 49407])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), ref.encode_image(pixels), atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), atol=ATOL, rtol=0)
    assert time.perf_counter() - start < 60


def test_open_clip_pickled_only_folder(tmp_path):
    """A folder with only open_clip's `open_clip_pytorch_model.bin` loads through `weights_only`."""
    ref, d = _open_clip_dir(tmp_path, _OC_VIT, "oc-bin")
    (d / "open_clip_model.safetensors").unlink()
    torch.save(ref.state_dict(), d / "open_clip_pytorch_model.bin")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pm.load(d).encode_image(pixels), ref.encode_image(pixels), atol=ATOL, rtol=0)
