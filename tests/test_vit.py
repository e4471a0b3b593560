"""ViT: parity with transformers (`ViTModel`, `ViTForImageClassification`) and timm (`VisionTransformer`) on
tiny random models saved by those libraries, round trips back into them, the paper's variants, strict
loading, and the ViT-B/16 preset's shapes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification, ViTModel

import polymodal as pm
from polymodal.models.vit import PRESETS, ViT, ViTConfig

# fp32 parity tolerance. We compute the same math in another order (one fused qkv matmul instead of three,
# possibly another SDPA kernel), which moves fp32 results by ~1e-6; 1e-4 leaves room for that and still fails
# on any real mismatch (a wrong weight, eps or activation moves these outputs by 1e-3 or more).
ATOL = 1e-4

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
TIMM_TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def hf_dir(tmp_path, cls=ViTModel, **overrides):
    """A tiny random transformers ViT saved with `save_pretrained` -> (reference model, directory)."""
    model = cls(HFViTConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def timm_dir(tmp_path, arch: str = "vit_tiny_patch16_224", **kwargs):
    """A tiny random timm ViT saved with timm's own `save_for_hf` -> (reference model, directory)."""
    model = timm.create_model(arch, pretrained=False, **{**TIMM_TINY, **kwargs}).eval()
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    return model, tmp_path / "timm"


# --------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_new"}, {"hidden_act": "relu"}, {"qkv_bias": False}],
                         ids=["gelu", "gelu_new", "relu", "no_qkv_bias"])
@torch.no_grad()
def test_matches_transformers_vitmodel(tmp_path, overrides):
    ref, path = hf_dir(tmp_path, **overrides)
    ours = pm.load(path)
    assert ours.config.pooler and ours.config.layer_norm_eps == 1e-12  # ViTModel's pooler and eps came along
    x = images(2, 3, 32, 32)
    close(ours(x), ref(x).last_hidden_state)


@torch.no_grad()
def test_matches_transformers_classifier(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "owl", 3: "fox", 4: "eel"}
    ref, path = hf_dir(tmp_path, ViTForImageClassification, num_labels=5, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    ours = pm.load(path)
    assert ours.config.num_labels == 5 and ours.config.id2label == ("cat", "dog", "owl", "fox", "eel")
    x = images(3, 3, 32, 32)
    close(ours.classify(x), ref(x).logits)
    close(ours(x), ref.vit(x).last_hidden_state)


@pytest.mark.parametrize("size", [(48, 40), (16, 24), (32, 64)], ids=["up", "down", "wide"])
@torch.no_grad()
def test_other_resolutions_match_transformers_interpolation(tmp_path, size):
    # transformers interpolates bicubically with align_corners=False and no antialiasing, as we do
    ref, path = hf_dir(tmp_path)
    ours = pm.load(path)
    x = images(2, 3, *size)
    out = ours(x)
    assert out.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 32)
    close(out, ref(x, interpolate_pos_encoding=True).last_hidden_state)


@torch.no_grad()
def test_batched_equals_unbatched(tmp_path):
    _, path = hf_dir(tmp_path)
    ours = pm.load(path)
    x = images(3, 3, 32, 32)
    close(ours(x)[1:2], ours(x[1:2]))


@pytest.mark.parametrize("keep_cls", [True, False], ids=["with_cls", "patches"])
@pytest.mark.parametrize("layer", [0, 1, -1, -2])
@torch.no_grad()
def test_features_match_transformers_hidden_states(tmp_path, layer, keep_cls):
    ref, path = hf_dir(tmp_path, num_hidden_layers=3)  # three blocks keep layers 0, 1, -2 and -1 apart
    ours = pm.load(path)
    x = images(3, 3, 32, 32)
    want = ref(x, output_hidden_states=True).hidden_states[layer]
    got = ours.features(x, layer=layer, keep_cls=keep_cls)
    assert got.shape == (3, 17 if keep_cls else 16, 32)
    close(got, want if keep_cls else want[:, 1:])
    close(ours.features(x[2:], layer=layer, keep_cls=keep_cls), got[2:])  # a row of the batch is that image alone


def test_features_refuse_a_layer_the_encoder_lacks():
    model = pm.build("vit", "vit-tiny-test")
    with pytest.raises(ValueError, match="layer -4 does not exist in an encoder of 2 blocks"):
        model.features(images(1, 3, 32, 32), layer=-4)
    with pytest.raises(ValueError, match=r"pixel_values \(B, 3, H, W\)"):
        model.features(images(3, 32, 32))


# ------------------------------------------------------------------------------------------------------ timm

TIMM_VARIANTS = {
    "token": dict(num_classes=5),
    "avg": dict(num_classes=5, global_pool="avg"),  # timm's fc_norm: LayerNorm after pooling
    "avg_no_cls": dict(num_classes=5, global_pool="avg", class_token=False),
    "no_pos": dict(num_classes=0, pos_embed="none"),
    "gelu_tanh_no_head": dict(num_classes=0, act_layer="gelu_tanh", qkv_bias=False),
}


@pytest.mark.parametrize("kwargs", TIMM_VARIANTS.values(), ids=TIMM_VARIANTS.keys())
@torch.no_grad()
def test_matches_timm(tmp_path, kwargs):
    ref, path = timm_dir(tmp_path, **kwargs)
    assert json.loads((path / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    ours = pm.load(path)
    x = images(2, 3, 32, 32)
    close(ours(x), ref.forward_features(x))
    if kwargs["num_classes"]:
        close(ours.classify(x), ref(x))
    else:
        close(ours.pooled(x), ref(x))  # no head: timm's forward returns the pooled (and normed) feature


@pytest.mark.parametrize(("arch", "kwargs", "reason"), [
    ("vit_tiny_patch16_224", dict(init_values=1e-5), "init_values"),  # layer scale (DeiT-III, DINOv2)
    ("vit_tiny_patch16_224", dict(reg_tokens=4, class_token=True), "reg_tokens"),
    ("vit_tiny_patch16_224", dict(global_pool="map"), "global_pool='map'"),
    ("vit_base_patch16_clip_224", {}, "not a plain ViT"),  # pre-norm; its quickgelu sibling would load silently
])
def test_timm_variants_we_do_not_build_are_refused(tmp_path, arch, kwargs, reason):
    _, path = timm_dir(tmp_path, arch, **kwargs)
    with pytest.raises(pm.CheckpointError, match=reason):
        pm.load(path)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification])
@torch.no_grad()
def test_round_trip_transformers(tmp_path, cls):
    ref, path = hf_dir(tmp_path, cls, num_labels=4)
    pm.save(pm.load(path), tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(path / "model.safetensors").keys()
    back = cls.from_pretrained(tmp_path / "out").eval()
    x = images(2, 3, 32, 32)
    if cls is ViTModel:
        assert torch.equal(back(x).last_hidden_state, ref(x).last_hidden_state)
        assert torch.equal(back(x).pooler_output, ref(x).pooler_output)
    else:
        assert torch.equal(back(x).logits, ref(x).logits)


@pytest.mark.parametrize("kwargs", TIMM_VARIANTS.values(), ids=TIMM_VARIANTS.keys())
@torch.no_grad()
def test_round_trip_timm(tmp_path, kwargs):
    ref, path = timm_dir(tmp_path, **kwargs)
    pm.save(pm.load(path), tmp_path / "out")
    back = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = images(2, 3, 32, 32)
    assert torch.equal(back(x), ref(x))
    assert torch.equal(back.forward_features(x), ref.forward_features(x))


@torch.no_grad()
def test_fresh_model_saved_for_timm(tmp_path):
    # an odd MLP width (timm sizes it int(dim * mlp_ratio)), a tanh GELU, GAP without [CLS], labels
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100,
                    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=32, patch_size=8,
                    class_token=False, pool="gap", num_labels=3, id2label=("a", "b", "c"))
    ours = ViT(cfg).eval()
    torch.nn.init.normal_(ours.pos_embed)
    pm.record(ours).layout = "timm"
    pm.save(ours, tmp_path / "out")
    ref = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = images(2, 3, 32, 32)
    close(ours(x), ref.forward_features(x))
    close(ours.classify(x), ref(x))
    assert pm.load(tmp_path / "out").config == cfg


# -------------------------------------------------------------------------------- the paper's variants

VARIANTS = {
    "gap": dict(pool="gap"),
    "learned_2d": dict(position="learned_2d"),
    "sincos": dict(position="sincos"),
    "no_positions": dict(position="none"),
    "no_class_token": dict(class_token=False, pool="gap"),
    "hybrid": dict(backbone="resnet-tiny-test", image_size=64, patch_size=1),  # stride-32 map: 2x2 "patches"
}


def variant(name: str) -> ViT:
    model = ViT(ViTConfig(**{**TINY, "num_labels": 3, **VARIANTS[name]}))
    for p in model.parameters():  # away from the zero init, so positions and [CLS] matter
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_backward(name):
    model = variant(name).train()
    c = model.config
    x = images(2, 3, c.image_size, c.image_size)
    out = model(x)
    n = c.grid[0] * c.grid[1]
    assert out.shape == (2, c.num_prefix_tokens + n, 32)
    logits = model.classify(x)
    assert logits.shape == (2, 3)
    (out.square().mean() + logits.square().mean()).backward()
    for key, p in model.named_parameters():
        if key.startswith("pooler"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, f"{key} gets no gradient"


@pytest.mark.parametrize("name", ["gap", "learned_2d", "sincos", "no_positions", "no_class_token"])
@torch.no_grad()
def test_variant_other_resolution(name):
    model = variant(name).eval()
    out = model(images(2, 3, 48, 40))
    assert out.shape == (2, model.config.num_prefix_tokens + 6 * 5, 32)


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_variant_native_round_trip(tmp_path, name):
    model = variant(name).eval()
    pm.save(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "polymodal-vit"
    back = pm.load(tmp_path)
    assert back.config == model.config
    x = images(2, 3, model.config.image_size, model.config.image_size)
    assert torch.equal(back(x), model(x))
    assert torch.equal(back.classify(x), model.classify(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_refuses_transformers_layout(tmp_path, name):
    model = variant(name)
    pm.record(model).layout = "transformers"
    with pytest.raises(ValueError, match="transformers' ViT holds only"):
        pm.save(model, tmp_path)


@pytest.mark.parametrize("name", ["learned_2d", "sincos", "hybrid"])
def test_variant_refuses_timm_layout(tmp_path, name):
    model = variant(name)
    pm.record(model).layout = "timm"
    with pytest.raises(ValueError, match="timm's VisionTransformer holds"):
        pm.save(model, tmp_path)


def test_sincos_positions_are_fixed_and_2d():
    model = variant("sincos")
    pos = model.positions(4, 4, torch.zeros(1))[0]  # (1 + 16, 32)
    assert torch.equal(pos[0], torch.zeros(32))  # the class token gets no position
    # half the channels encode the row, half the column: patches in one row share the first half
    assert torch.equal(pos[1, :16], pos[4, :16]) and not torch.equal(pos[1, 16:], pos[4, 16:])
    assert not any("pos" in k for k in model.state_dict())


# ---------------------------------------------------------------------------------------------- errors


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="pool='cls' needs the class token"):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="position must be"):
        ViTConfig(position="rope")
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        ViTConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="unknown hybrid backbone 'resnet-9000'"):
        ViT(ViTConfig(**TINY, backbone="resnet-9000"))


def test_input_errors_name_the_shape():
    model = ViT(ViTConfig(**TINY))
    with pytest.raises(ValueError, match=r"expected pixel_values \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        model(images(2, 1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(images(2, 3, 30, 32))
    with pytest.raises(ValueError, match="no classification head"):
        model.classify(images(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ strict loading


def _tamper(path, drop=(), add=None, reshape=None):
    tensors = load_file(path / "model.safetensors")
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = torch.zeros(shape)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_strict_missing(tmp_path):
    _, path = hf_dir(tmp_path)
    _tamper(path, drop=["encoder.layer.1.output.dense.bias", "embeddings.cls_token"])
    with pytest.raises(pm.CheckpointError, match="2 missing") as err:
        pm.load(path)
    assert "blocks.1.mlp.fc2.bias (checkpoint: encoder.layer.1.output.dense.bias)" in str(err.value)
    assert "cls_token (checkpoint: embeddings.cls_token)" in str(err.value)


def test_strict_unexpected(tmp_path):
    _, path = hf_dir(tmp_path)
    _tamper(path, add={"encoder.layer.7.output.dense.bias": torch.zeros(32), "extra.thing": torch.zeros(1)})
    with pytest.raises(pm.CheckpointError, match="2 unexpected") as err:
        pm.load(path)
    assert "blocks.7.mlp.fc2.bias" in str(err.value) and "extra.thing" in str(err.value)


def test_strict_wrong_shape(tmp_path):
    _, path = hf_dir(tmp_path)
    _tamper(path, reshape={"layernorm.weight": (31,), "encoder.layer.0.attention.attention.key.weight": (32, 16)})
    with pytest.raises(pm.CheckpointError, match="2 mis-shaped") as err:
        pm.load(path)
    assert "norm.weight: checkpoint [31] vs model [32]" in str(err.value)
    assert "blocks.0.attn.qkv.weight: cannot be built from" in str(err.value)
    assert "encoder.layer.0.attention.attention.key.weight [32, 16]" in str(err.value)
    assert "missing" not in str(err.value)  # reported once, as mis-shaped


def test_strict_all_at_once(tmp_path):
    _, path = timm_dir(tmp_path, num_classes=5)
    _tamper(path, drop=["blocks.1.norm2.bias"], add={"blocks.0.attn.q_norm.weight": torch.zeros(8)},
            reshape={"head.bias": (6,)})
    with pytest.raises(pm.CheckpointError) as err:
        pm.load(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "blocks.1.norm2.bias" in msg and "blocks.0.attn.q_norm.weight" in msg and "head.bias" in msg


# --------------------------------------------------------------------------------------------- the preset


def test_vit_b16_shapes():
    with torch.device("meta"):
        model = ViT(PRESETS["vit-b/16"])
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 197, 768)  # 196 patches of 16x16 + [CLS], width 768
    assert sum(p.numel() for p in model.parameters()) == 85_798_656  # transformers' ViTModel without pooler


@pytest.mark.slow
@torch.no_grad()
def test_vit_b16_real_forward():
    model = ViT(PRESETS["vit-b/16"]).eval()
    out = model(images(1, 3, 224, 224))
    assert out.shape == (1, 197, 768) and torch.isfinite(out).all()
