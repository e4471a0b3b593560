"""ResNet: shapes and presets, parity with transformers' ResNetModel / ResNetForImageClassification and with
timm's resnet* on tiny random configs (and timm's full-size resnet18), both key maps round trip (pm.save ->
the reference library loads it back), and strict loading of tampered checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.models.resnet import PRESETS, ResNet, ResNetConfig, ResNetFeatures

# fp32 parity tolerance: both sides run the same convolutions and BatchNorms in a possibly different order
# of accumulation; 1e-4 absolute leaves room for that and nothing else.
ATOL = 1e-4

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh BatchNorms are the identity (mean 0, var 1, weight 1, bias 0); give them real statistics so
    parity checks the eval-mode normalization and the mapping of every BN tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _x(batch: int = 2, size: int = 64, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------- shapes and presets


def test_tiny_preset_shapes():
    torch.manual_seed(0)
    cfg = PRESETS["resnet-tiny-test"]
    model = ResNet(cfg).eval()
    assert isinstance(model.features, ResNetFeatures)
    assert cfg.feature_stride == 32 and model.features.out_channels == cfg.hidden_sizes[-1] == 32
    x = _x(batch=3, size=64)
    assert model(x).shape == (3, 32, 2, 2)
    assert model.pooled(x).shape == (3, 32)
    assert model.classify(x).shape == (3, cfg.num_labels)
    torch.testing.assert_close(model.pooled(x), model(x).mean((2, 3)))


def test_features_interface_for_hybrid_stems():
    for name, cfg in PRESETS.items():  # the paper's networks; the vit-fashion-mnist stem stops after one stage
        assert cfg.feature_stride == (4 if name == "resnet-stem-gray" else 32), name
    assert ResNetFeatures(PRESETS["resnet-stem-gray"])(torch.zeros(1, 1, 28, 28)).shape == (1, 64, 7, 7)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), layer_type="basic")
    assert cfg.feature_stride == 8
    assert ResNetConfig(downsample_in_first_stage=True).feature_stride == 64
    feats = ResNetFeatures(cfg)
    assert feats.out_channels == 16
    assert feats(_x(size=32)).shape == (2, 16, 32 // 8, 32 // 8)


@pytest.mark.parametrize(
    "name, params",
    # the parameter counts of torchvision's / timm's ImageNet ResNets (the 1000-way fc included)
    [("resnet-18", 11_689_512), ("resnet-34", 21_797_672), ("resnet-50", 25_557_032),
     ("resnet-101", 44_549_160), ("resnet-152", 60_192_808)],
)
def test_preset_sizes(name, params):
    with torch.device("meta"):
        model = ResNet(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == params


def test_backward():
    torch.manual_seed(0)
    model = ResNet(PRESETS["resnet-tiny-test"]).train()
    loss = torch.nn.functional.cross_entropy(model.classify(_x(batch=4, size=32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_input_is_named():
    model = ResNet(PRESETS["resnet-tiny-test"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="no classification head"):
        ResNet(ResNetConfig(num_labels=0, hidden_sizes=(8,), depths=(1,), embedding_size=4)).classify(_x())
    with pytest.raises(ValueError, match="same, non-zero number of stages"):
        ResNetConfig(hidden_sizes=(8, 16), depths=(1,))


# ------------------------------------------------------------------------------------------ transformers

HF_VARIANTS = {
    "basic": dict(layer_type="basic"),
    "basic-gelu": dict(layer_type="basic", hidden_act="gelu"),
    "bottleneck-v1.5": dict(layer_type="bottleneck"),  # microsoft/resnet-50: stride in the 3x3
    "bottleneck-v1": dict(layer_type="bottleneck", downsample_in_bottleneck=True, downsample_in_first_stage=True),
}


def _hf_reference(variant: str, num_labels: int = 5):
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetForImageClassification, ResNetModel

    torch.manual_seed(0)
    cfg = HFConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_labels=num_labels,
                   **HF_VARIANTS[variant])
    ref = (ResNetForImageClassification(cfg) if num_labels else ResNetModel(cfg)).eval()
    _randomize_batchnorm(ref)
    return ref


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_transformers_parity_and_round_trip(tmp_path, variant):
    from transformers import ResNetForImageClassification

    ref = _hf_reference(variant)
    ref.save_pretrained(tmp_path / "ref")
    model = pm.load(tmp_path / "ref")
    assert isinstance(model, ResNet) and pm.record(model).layout == "transformers"
    x = _x()
    with torch.no_grad():
        out, base = ref(x), ref.resnet(x)
        _close(model(x), base.last_hidden_state)
        _close(model.pooled(x), base.pooler_output.flatten(1))
        _close(model.classify(x), out.logits)

    pm.save(model, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert raw["model_type"] == "resnet" and raw["architectures"] == ["ResNetForImageClassification"]
    back = ResNetForImageClassification.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        _close(back(x).logits, out.logits)


def test_transformers_backbone_without_head(tmp_path):
    from transformers import ResNetModel

    ref = _hf_reference("bottleneck-v1.5", num_labels=0)
    ref.save_pretrained(tmp_path / "ref")
    model = pm.load(tmp_path / "ref")
    assert model.head is None
    x = _x()
    with torch.no_grad():
        expected = ref(x)
        _close(model(x), expected.last_hidden_state)
        _close(model.pooled(x), expected.pooler_output.flatten(1))
    pm.save(model, tmp_path / "ours")
    back = ResNetModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        _close(back(x).last_hidden_state, expected.last_hidden_state)


def test_transformers_tampered_checkpoint(tmp_path):
    _hf_reference("bottleneck-v1.5").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["resnet.encoder.stages.1.layers.0.shortcut.convolution.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    # the loader names the tensor it misses by our name for it
    with pytest.raises(pm.CheckpointError, match=r"missing: features\.stages\.1\.0\.shortcut\.0\.weight"):
        pm.load(tmp_path)


# -------------------------------------------------------------------------------------------------- timm

TIMM_VARIANTS = {
    "resnet18-tiny": ("resnet18", dict(layers=[1, 1, 1, 1], channels=(8, 16, 24, 32))),
    "resnet50-tiny": ("resnet50", dict(layers=[1, 2, 1, 1], channels=(8, 16, 24, 32))),
    "resnet18": ("resnet18", {}),  # the real architecture (random weights)
}


def _timm_reference(variant: str, num_classes: int = 7):
    arch, kwargs = TIMM_VARIANTS[variant]
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs).eval()
    _randomize_batchnorm(ref)
    return ref


def _save_timm(model, directory) -> None:
    from timm.models import save_for_hf

    save_for_hf(model, directory, safe_serialization=True)  # config.json ("architecture") + model.safetensors


@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
def test_timm_parity_and_round_trip(tmp_path, variant):
    ref = _timm_reference(variant)
    _save_timm(ref, tmp_path / "ref")
    model = pm.load(tmp_path / "ref")
    assert isinstance(model, ResNet) and pm.record(model).layout == "timm"
    x = _x()
    with torch.no_grad():
        _close(model(x), ref.forward_features(x))
        _close(model.classify(x), ref(x))

    pm.save(model, tmp_path / "ours")
    back = timm.create_model(f"local-dir:{tmp_path / 'ours'}", pretrained=True).eval()
    assert type(back).__name__ == "ResNet"
    with torch.no_grad():
        _close(back.forward_features(x), ref.forward_features(x))
        _close(back(x), ref(x))


def test_timm_tampered_checkpoint(tmp_path):
    _save_timm(_timm_reference("resnet18-tiny"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["layer3.0.downsample.1.running_var"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(pm.CheckpointError, match=r"missing: features\.stages\.2\.0\.shortcut\.1\.running_var"):
        pm.load(tmp_path)


def test_timm_refuses_variants_it_cannot_hold(tmp_path):
    torch.manual_seed(0)
    deep_stem = timm.create_model("resnet18d", pretrained=False, layers=[1, 1, 1, 1], channels=(8, 16, 24, 32))
    _save_timm(deep_stem, tmp_path / "d")
    with pytest.raises(pm.CheckpointError, match=r"'resnet18d' is not a plain ResNet"):
        pm.load(tmp_path / "d")

    # transformers' ResNet v1 (stride in the first 1x1) has no timm equivalent: saving it there is refused
    _hf_reference("bottleneck-v1").save_pretrained(tmp_path / "hf")
    model = pm.load(tmp_path / "hf")
    pm.record(model).layout = "timm"
    with pytest.raises(ValueError, match="timm's ResNet layout holds"):
        pm.save(model, tmp_path / "timm")


def test_transformers_to_timm_and_native(tmp_path):
    """A transformers checkpoint saved in timm's layout and in polymodal's gives the same outputs."""
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetForImageClassification

    torch.manual_seed(0)
    ref = ResNetForImageClassification(HFConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                layer_type="basic", num_labels=3)).eval()
    _randomize_batchnorm(ref)
    ref.save_pretrained(tmp_path / "hf")
    model = pm.load(tmp_path / "hf")
    x = _x()
    with torch.no_grad():
        expected = ref(x).logits
    pm.record(model).layout = "timm"
    pm.save(model, tmp_path / "timm")
    back = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        _close(back(x), expected)
    pm.record(model).layout = "polymodal"
    pm.save(model, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "polymodal-resnet"
    native = pm.load(tmp_path / "native")
    assert native.config == model.config
    with torch.no_grad():
        _close(native.classify(x), expected)


# -------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_transformers_resnet50_full_size(tmp_path):
    """microsoft/resnet-50's architecture at full size (random weights: no hub here)."""
    from transformers import ResNetConfig as HFConfig
    from transformers import ResNetForImageClassification

    torch.manual_seed(0)
    ref = ResNetForImageClassification(HFConfig(num_labels=1000))  # the defaults are ResNet-50's
    # 16 random blocks with random BN statistics blow activations up to ~1e3; calibrate the statistics on
    # random images instead (cumulative averages), so activations have the scale of a trained network
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        ref.train()(_x(batch=4, size=128, seed=2))
    ref.eval().save_pretrained(tmp_path)
    model = pm.load(tmp_path)
    assert model.config.hidden_sizes == PRESETS["resnet-50"].hidden_sizes
    x = _x(batch=1, size=224)
    with torch.no_grad():
        out = ref(x, output_hidden_states=False)
        _close(model(x), ref.resnet(x).last_hidden_state)
        _close(model.classify(x), out.logits)
