"""UNet2DConditionModel against diffusers 0.42 on tiny random models.

diffusers builds and saves each U-Net (`save_pretrained`: config.json with `_class_name` + safetensors); polymodal
loads the folder strictly and must give the same noise prediction. fp32 tolerance 1e-4: the same convolutions, norms
and attention run on both sides; fused q/k/v products and SDPA kernel choice reorder sums (differences seen
are ~1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

import polymodal as pm  # noqa: E402
from polymodal.config import to_dict  # noqa: E402
from polymodal.models.unet_2d_condition import PRESETS, UNet2DConditionModel  # noqa: E402
from polymodal.weights.checkpoint import CheckpointError  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)  # see the module docstring

SD15 = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=24, attention_head_dim=2, sample_size=8)
# SDXL's layout in small: no attention in the first stage, deeper transformers later, linear projections,
# 6 size/crop ids; the refiner's: attention in the middle stages only, 5 ids (aesthetic score)
SDXL = dict(block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=12 + 6 * 8, sample_size=8)
REFINER = {**SDXL, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": 2,
           "projection_class_embeddings_input_dim": 12 + 5 * 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second OpenMP thread adds only barrier waits, which cost seconds per run when the
    machine's other core is busy. Both libraries run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def saved(tmp_path, config: dict, seed: int = 0, name: str = "unet"):
    """A tiny diffusers U-Net with every weight perturbed (norm affines start as the identity, some convs as 0)."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


def _list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _inputs(B: int, h: int, w: int, ids: int | None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(B, 4, h, w, generator=g), torch.randn(B, 5, 24, generator=g)
    if ids is None:
        return x, ctx, {}, {}
    added = {"text_embeds": torch.randn(B, 12, generator=g),
             "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0][:ids]] * B)}
    return x, ctx, added, {"added_cond_kwargs": added}


@pytest.mark.parametrize("variant,config,ids", [("sd15", SD15, None), ("sdxl", SDXL, 6), ("refiner", REFINER, 5)])
def test_matches_diffusers(tmp_path, variant, config, ids):
    ref, path = saved(tmp_path, config)
    model = pm.load(path)
    assert isinstance(model, UNet2DConditionModel) and not model.training
    # 9x7 latents: not a multiple of the U-Net's 2^(stages-1), so upsampling goes to the skips' sizes
    for (h, w), t in (((8, 8), torch.tensor([999, 10])), ((9, 7), torch.tensor(500)), ((6, 10), 321.5)):
        x, ctx, ours_kw, ref_kw = _inputs(2, h, w, ids)
        with torch.no_grad():
            expected = ref(x, t, ctx, **ref_kw).sample
            torch.testing.assert_close(model(x, t, ctx, **ours_kw), expected, **TOL)


def test_save_round_trip_loads_in_diffusers(tmp_path):
    ref, path = saved(tmp_path, SDXL)
    model = pm.load(path)
    pm.save(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    theirs, again = ref.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for k in theirs:
        assert torch.equal(theirs[k], again[k]), k
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
                "addition_embed_type", "projection_class_embeddings_input_dim", "use_linear_projection"):
        norm = [_list(back.config[key]), _list(ref.config[key])]
        assert norm[0] == norm[1], key
    x, ctx, kw, _ = _inputs(1, 8, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(pm.load(tmp_path / "ours")(x, 10, ctx, **kw), model(x, 10, ctx, **kw),
                                   rtol=0, atol=0)


def test_strict_load_names_the_missing_tensor(tmp_path):
    _, path = saved(tmp_path, SD15)
    file = path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    del tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_file(tensors, file)
    # the fused k/v is incomplete: its remaining half is unexpected and the model's kv is missing, both named
    with pytest.raises(CheckpointError) as info:
        pm.load(path)
    message = str(info.value)
    assert "missing: down_blocks.0.attentions.0.transformer_blocks.0.attn2.kv.weight" in message
    assert "unexpected: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight" in message


def test_unsupported_options_are_refused(tmp_path):
    _, path = saved(tmp_path, SD15)
    config = json.loads((path / "config.json").read_text())
    for key, value in (("class_embed_type", "timestep"), ("time_cond_proj_dim", 8), ("only_cross_attention", True),
                       ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"])):
        (path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=key if key != "down_block_types" else "SimpleCrossAttn"):
            pm.load(path)


@pytest.mark.parametrize("preset", ["sd15-unet", "sd21-unet", "sdxl-base-unet", "sdxl-refiner-unet"])
def test_presets_have_diffusers_parameter_counts(preset):
    with torch.device("meta"):
        ours = UNet2DConditionModel(PRESETS[preset])
        theirs = diffusers.UNet2DConditionModel(**to_dict(PRESETS[preset]))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    known = {"sd15-unet": 859_520_964, "sdxl-base-unet": 2_567_463_684}  # the published checkpoints' sizes
    if preset in known:
        assert count == known[preset]


def test_tiny_preset_runs():
    model = pm.build("unet_2d_condition", "unet-tiny-test").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 3, 16))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_bad_inputs_are_refused():
    sd = UNet2DConditionModel(PRESETS["unet-tiny-test"])
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        sd(torch.randn(1, 3, 8, 8), 1, ctx)
    with pytest.raises(ValueError, match=r"encoder_hidden_states \(1, S, 16\)"):
        sd(x, 1, torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="one value or one per sample"):
        sd(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="no added conditioning"):
        sd(x, 1, ctx, text_embeds=torch.randn(1, 12))
    xl = UNet2DConditionModel(pm.load.__globals__["registry"].family("unet_2d_condition").layouts["diffusers"]
                              .read_config(SDXL, {}))
    ctx = torch.randn(1, 3, 24)
    with pytest.raises(ValueError, match="needs text_embeds"):
        xl(x, 1, ctx)
    with pytest.raises(ValueError, match="added features"):
        xl(x, 1, ctx, text_embeds=torch.randn(1, 12), time_ids=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention heads"):
        type(xl.config)(**{**to_dict(xl.config), "attention_head_dim": (3, 4, 4)})
