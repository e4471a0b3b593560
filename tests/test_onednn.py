"""polymodal.nn.onednn: CPU inference products on oneDNN with the stored weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import polymodal as pm
from polymodal.nn import onednn
from polymodal.nn.inference import MIN_MACS

# fp32 products summed in another order: ~1e-6 relative on these unit-scale values (K <= 1536)
TOL = dict(rtol=1e-4, atol=1e-4)


def test_linear_equals_f_linear_on_the_shapes_of_the_diffusion_models():
    torch.manual_seed(0)
    for shape, out, bias in [((2, 64, 640), 5120, True), ((154, 2048), 1280, False), ((2, 410, 1536), 1536, True)]:
        x, w = torch.randn(shape), torch.randn(out, shape[-1]) / shape[-1] ** 0.5
        b = torch.randn(out) if bias else None
        with torch.inference_mode():
            got = onednn.linear(x, w, b)
        assert x.numel() * out >= MIN_MACS  # the oneDNN path, not the small-product fallback
        torch.testing.assert_close(got, F.linear(x, w, b), **TOL)
    x = torch.randn(3, 2048, 64).transpose(1, 2)  # a non-contiguous input (a view of a chunk or a permute)
    w = torch.randn(512, 2048) / 2048**0.5
    with torch.no_grad():
        torch.testing.assert_close(onednn.linear(x, w), F.linear(x, w), **TOL)


def test_use_onednn_keeps_names_and_weights_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 32, 256)
    with torch.no_grad():
        want = model(x)
    assert onednn.use_onednn(model) is model
    assert all(type(m) is onednn.OneDNNLinear for m in (model[0], model[2]))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL)
    model(x).square().mean().backward()  # with a gradient needed: F.linear, as before
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert pm.optimize_for_inference(model)[0].__class__ is onednn.OneDNNLinear  # not packed a second time


def test_the_diffusion_families_use_it():
    from polymodal.models.sd3_transformer import PRESETS, SD3Transformer2DModel

    model = SD3Transformer2DModel(PRESETS["sd3-tiny-test"])
    assert isinstance(model.transformer_blocks[0].attn.image.qkv, onednn.OneDNNLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())
