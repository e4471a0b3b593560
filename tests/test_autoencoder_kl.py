"""AutoencoderKL and the shared diffusion blocks against diffusers 0.42 on tiny random models.

diffusers builds and saves each model (`save_pretrained`: config.json with `_class_name` + safetensors);
polymodal loads the folder strictly and must give the same latent mean, std and decoded image. fp32 tolerance 1e-4:
the same convolutions and norms run on both sides, and only the attention's fused q/k/v product and SDPA kernel
choice reorder the sums (differences seen are ~1e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

import polymodal as pm  # noqa: E402
from polymodal.models.autoencoder_kl import PRESETS, AutoencoderKL  # noqa: E402
from polymodal.nn import diffusion as D  # noqa: E402
from polymodal.weights.checkpoint import CheckpointError  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)  # see the module docstring

TINY = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)


def reference(seed: int = 0, **overrides) -> diffusers.AutoencoderKL:
    """A tiny random diffusers VAE; GroupNorm affines are randomized too (their init is the identity)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def saved(tmp_path, name="vae", **overrides):
    ref = reference(**overrides)
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


VARIANTS = {
    "sd": {},
    "sd3": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                scaling_factor=1.5305),
    "deeper-no-attention": dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                block_out_channels=(8, 16, 16), layers_per_block=2, mid_block_add_attention=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_decode_match_diffusers(tmp_path, variant):
    ref, path = saved(tmp_path, **VARIANTS[variant])
    model = pm.load(path)
    assert isinstance(model, AutoencoderKL) and not model.training
    f = model.config.downscale
    x = torch.rand(2, 3, 6 * f, 4 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        ours = model.encode_distribution(x)
        torch.testing.assert_close(model.encode(x), dist.mean, **TOL)
        torch.testing.assert_close(ours.std, dist.std, **TOL)
        sample = ours.sample(torch.Generator().manual_seed(5))
        torch.testing.assert_close(sample, dist.sample(torch.Generator().manual_seed(5)), **TOL)
        z = torch.randn(2, model.config.latent_channels, 5, 7, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.decode(z), ref.decode(z).sample, **TOL)
        torch.testing.assert_close(model(x), ref(x).sample, **TOL)
    assert model.scaling_factor == ref.config.scaling_factor
    assert model.shift_factor == (ref.config.shift_factor or 0.0)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)


def test_save_round_trip_loads_in_diffusers(tmp_path):
    ref, path = saved(tmp_path)
    model = pm.load(path)
    pm.save(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    theirs, again = ref.state_dict(), back.state_dict()
    assert theirs.keys() == again.keys()
    for k in theirs:
        assert torch.equal(theirs[k], again[k]), k
    assert back.config.sample_size == ref.config.sample_size and back.config.scaling_factor == ref.config.scaling_factor
    # and polymodal reads its own output
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pm.load(tmp_path / "ours").decode(z), model.decode(z), rtol=0, atol=0)


def test_pre_0_14_attention_names_load(tmp_path):
    """Old diffusers files call the mid-block attention query/key/value/proj_attn."""
    ref, path = saved(tmp_path)
    file = path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in load_file(file).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        tensors[k] = v
    save_file(tensors, file)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pm.load(path).decode(z), ref.decode(z).sample, **TOL)


def test_strict_load_names_the_missing_tensor(tmp_path):
    _, path = saved(tmp_path)
    file = path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    del tensors["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    tensors["encoder.extra.weight"] = torch.zeros(1)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"missing: decoder\.up_blocks\.0\.resample\.conv\.weight \(checkpoint: "
                                              r"decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight\).*unexpected: "
                                              r"encoder\.extra\.weight"):
        pm.load(path)


def test_unknown_diffusers_class_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(CheckpointError, match="diffusers model 'VQModel' is not supported yet; supported: "
                                              r"\['AutoencoderKL'"):
        pm.load(tmp_path)


def test_tiled_decode_and_encode_match_diffusers_tiling(tmp_path):
    ref, path = saved(tmp_path)
    model = pm.load(path)
    ref.enable_tiling()
    z = torch.randn(1, 4, 28, 20, generator=torch.Generator().manual_seed(3))  # tiles of 16 latents every 12
    x = torch.rand(1, 3, 56, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1  # tiles of 32 px every 24
    with torch.no_grad():
        tiled = model.decode(z, tile=True)
        torch.testing.assert_close(tiled, ref.decode(z).sample, **TOL)
        assert (tiled - model.decode(z)).abs().max() > 1e-3  # tiling really happened (tiles see less context)
        torch.testing.assert_close(model.encode(x, tile=True), ref.encode(x).latent_dist.mean, **TOL)
        small = torch.randn(1, 4, 16, 16)  # not larger than a tile: decoded whole, as diffusers does
        torch.testing.assert_close(model.decode(small, tile=True), model.decode(small), rtol=0, atol=0)


_PEAK = textwrap.dedent("""
    import sys, torch, polymodal as pm

    def status(key):  # KiB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    torch.set_num_threads(1)
    model = pm.load(sys.argv[1])
    z = torch.randn(1, 4, 80, 80)
    peaks = {}
    with torch.no_grad():
        for tile in (True, False):  # tiled first: memory the whole decode frees could serve the tiled one
            model.decode(z[:, :, :20, :20], tile=tile)  # kernels and allocator warmed up on a small latent
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident size (VmHWM) to the current one
            before = status("VmRSS")
            out = model.decode(z, tile=tile)
            peaks[tile] = status("VmHWM") - before
            assert out.shape == (1, 3, 160, 160)
    print(peaks[True], peaks[False])
""")


def test_tiling_bounds_peak_memory(tmp_path):
    """The peak resident memory of decoding an 80x80 latent (a 160x160 image; a full-resolution activation of 32
    channels is 3.3 MB) grows by far less in tiles of 32 pixels than decoded whole. Measured in a fresh process,
    whose peak is reset before each decode (Linux's /proc/self/clear_refs)."""
    _, path = saved(tmp_path, block_out_channels=(32, 32), norm_num_groups=8)
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tiled, whole = map(int, done.stdout.split()[-2:])
    assert whole > 10_000, (tiled, whole)  # several full-resolution activations alive at once
    assert tiled < whole / 4, (tiled, whole)


def test_fp16_decode_upcasts_when_the_config_says(tmp_path):
    """SDXL's VAE overflows fp16; with force_upcast its weights stay fp32 when loaded in fp16, so the decode is
    finite. The control (force_upcast false, same weights) shows the overflow is real."""
    images = {}
    z = 2 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for upcast in (True, False):
        ref = reference(force_upcast=upcast)
        with torch.no_grad():
            # weights up to ~3.3e4 (still fp16 numbers), activations of ~1e5: past fp16's 65504
            ref.decoder.conv_in.weight.mul_(2e5)
        ref.save_pretrained(tmp_path / str(upcast))
        model = pm.load(tmp_path / str(upcast), dtype=torch.float16)
        with torch.no_grad():
            images[upcast] = model.decode(z.half())
        if upcast:
            assert model.decoder.conv_in.weight.dtype == torch.float32
            with torch.no_grad():
                expected = ref.decode(z).sample
            assert images[upcast].dtype == torch.float16
            # computed in fp32 as diffusers' is; only the output's rounding to fp16 differs (half an ulp: <= 1e-3
            # for images within [-4, 4])
            torch.testing.assert_close(images[upcast].float(), expected, rtol=1e-3, atol=1e-3)
        else:
            assert model.decoder.conv_in.weight.dtype == torch.float16
    assert torch.isfinite(images[True]).all()
    assert not torch.isfinite(images[False]).all()


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    model = pm.build("autoencoder_kl", "vae-tiny-test")
    huge = dict(device="meta")  # shapes no machine could hold: refused from the shape alone
    with pytest.raises(ValueError, match=r"expected the image as a \(B, 3, H, W\) tensor, got \(1, 4, 64, 64\)"):
        model.encode(torch.empty(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"height and width \(1000000x1000001\) must be positive multiples of 2"):
        model.encode(torch.empty(1, 3, 10**6, 10**6 + 1, **huge))
    with pytest.raises(ValueError, match=r"expected the latent as a \(B, 4, H, W\) tensor, got \(1, 3, 100000, "):
        model.decode(torch.empty(1, 3, 10**5, 10**5, **huge))
    with pytest.raises(ValueError, match=r"got \(4, 8, 8\)"):
        model.decode(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="floating-point latent"):
        model.decode(torch.zeros(1, 4, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("preset", ["sd15-vae", "sdxl-vae", "sd3-vae"])
def test_presets_have_diffusers_shapes(preset):
    """Each full-size preset, built on the meta device, holds exactly the tensors diffusers' model of that config
    has (through the key map)."""
    from polymodal.models.autoencoder_kl import FAMILY

    cfg = PRESETS[preset]
    layout = FAMILY.layouts["diffusers"]
    config = layout.write_config(cfg)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(config)
        ours = AutoencoderKL(cfg)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    state = ours.state_dict()
    written = {}
    for step in layout.key_map(cfg).plan_save(list(state)):
        for name, t in zip(step.dst, step.fn([state[k] for k in step.src])):
            written[name] = tuple(t.shape)
    assert written == shapes
    if preset == "sd15-vae":
        assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # the released SD VAE


# ------------------------------------------------------------------------------------- the shared blocks


def _copy(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """diffusers' weights into ours, whose names are diffusers' where the structure is the same."""
    dst.load_state_dict(src.state_dict(), strict=True)


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_block_with_time_embedding(norm):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, time_embedding_norm=norm).eval()
    ours = D.ResnetBlock2D(8, 16, temb_channels=12, groups=4, time_embedding_norm=norm).eval()
    _copy(ref, ours)
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, temb), ref(x, temb), **TOL)
    with pytest.raises(ValueError, match="takes a time embedding"):
        ours(x)


def test_down_and_upsampling():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    x = torch.randn(1, 8, 7, 9)
    for padding in (0, 1):
        ref = Downsample2D(8, use_conv=True, out_channels=8, padding=padding, name="op")
        ours = D.Downsample2D(8, padding=padding)
        _copy(ref, ours)
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(D.Downsample2D(8, use_conv=False)(x), Downsample2D(8)(x), rtol=0, atol=0)
    ref, ours = Upsample2D(8, use_conv=True), D.Upsample2D(8)
    _copy(ref, ours)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours(x, output_size=(15, 17)), ref(x, output_size=(15, 17)), **TOL)
    with torch.no_grad():  # inference: the conv of the upsampled map computed as 4 phases of 2x2 convs of x
        assert ours._by_phases(x)
        torch.testing.assert_close(ours(x), ref(x), **TOL)
        ours.conv.materialize("cpu")  # and on channels-last maps, as loaded on a CPU
        got = ours(x)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, ref(x), **TOL)
        torch.testing.assert_close(ours(x, output_size=(15, 17)), ref(x, output_size=(15, 17)), **TOL)


def test_timestep_embedding_variants():
    from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    for dim, flip, shift, scale in ((320, True, 0.0, 1.0), (256, True, 0, 1000.0), (33, False, 1.0, 1.0)):
        torch.testing.assert_close(
            D.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale),
            get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale),
            rtol=0, atol=0)
    torch.manual_seed(0)
    ref, ours = TimestepEmbedding(32, 64), D.TimestepEmbedding(32, 64)
    _copy(ref, ours)
    e = torch.randn(3, 32)
    torch.testing.assert_close(ours(e), ref(e), **TOL)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        D.timestep_embedding(torch.zeros(2, 1), 8)


def test_gaussian_noise_is_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    a = D.gaussian_noise((2, 4, 3, 3), generator=torch.Generator().manual_seed(9), device="cpu", dtype=torch.float32)
    b = randn_tensor((2, 4, 3, 3), generator=torch.Generator().manual_seed(9), device=torch.device("cpu"),
                     dtype=torch.float32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cin, cout, k, stride, side, bias", [
    (1280, 1280, 3, 1, 4, True),   # a U-Net's lowest stage: the product (2M+ weights, few pixels)
    (1024, 512, 3, 2, 8, True),    # stride 2 (Downsample2D)
    (128, 64, 1, 1, 9, False),     # pointwise, no bias (a shortcut conv)
    (64, 64, 3, 1, 8, True),       # too small a weight: torch's convolution
])
def test_conv2d_product_path_equals_torch_convolution(cin, cout, k, stride, side, bias):
    torch.manual_seed(0)
    ours = D.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    ref = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, cin, side, side)
    with torch.no_grad():
        taken = ours._as_product(x)
        assert taken == ((cin, k) != (64, 3))  # the shapes above that the product path is for
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    x.requires_grad_(True)  # training keeps torch's convolution (no unfolded copy saved for backward)
    assert not ours._as_product(x)
    ours(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("cin, cout, k, stride, side", [
    (1280, 1280, 3, 1, 4),   # the product on a channels-last map: pixels as rows, one GEMM for the batch
    (1024, 512, 3, 2, 7),    # stride 2 from an odd side
    (128, 64, 1, 1, 9),      # pointwise: a linear over the channels of the NHWC rows
    (64, 32, 3, 1, 8),       # oneDNN's NHWC convolution
])
def test_conv2d_channels_last_after_loading_equals_torch_convolution(cin, cout, k, stride, side):
    torch.manual_seed(0)
    ours = D.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref.load_state_dict(ours.state_dict())
    ours.materialize("cpu")  # what pm.load does on the CPU
    assert torch.equal(ours.weight, ref.weight)  # the same values, another memory layout
    assert ours.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, cin, side, side)  # an NCHW input is taken over into the weight's layout
    with torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, ref(x), **TOL)
        if k > 1:  # and the output stays channels-last, for the next block
            assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    x.requires_grad_(True)  # and trains
    ours(x).sum().backward()
    assert x.grad is not None and ours.weight.grad is not None


def test_conv2d_channels_last_weight_rewrites_its_own_memory_only(tmp_path):
    """materialize writes the NHWC order into a weight's own storage (a memory-mapped checkpoint's copy-on-write
    pages: no second copy resident), never into memory another tensor shares, and never into the file."""
    from safetensors import safe_open

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    save_file({"w": w}, tmp_path / "w.safetensors")
    conv = D.Conv2d(4, 8, 3, padding=1)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        conv.weight = torch.nn.Parameter(f.get_tensor("w"))
    ptr = conv.weight.data_ptr()
    conv.materialize("cpu")
    assert conv.weight.data_ptr() == ptr and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, w) and torch.equal(load_file(tmp_path / "w.safetensors")["w"], w)
    shared = torch.randn(2, 8, 4, 3, 3)  # a weight that is a view into a larger tensor
    conv.weight = torch.nn.Parameter(shared[1])
    before = shared.clone()
    conv.materialize("cpu")
    assert torch.equal(shared, before) and torch.equal(conv.weight, before[1])


def test_resnet_block_at_unet_width_matches_diffusers():
    """SD 1.5's 1280-channel ResNet block on its 256-px lowest stage (4x4, CFG batch 2): the product path."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=2560, out_channels=1280, temb_channels=64, eps=1e-5).eval()
    ours = D.ResnetBlock2D(2560, 1280, temb_channels=64, eps=1e-5).eval()
    _copy(ref, ours)
    x, temb = torch.randn(2, 2560, 4, 4), torch.randn(2, 64)
    with torch.inference_mode():
        assert ours.conv1._as_product(x)
        torch.testing.assert_close(ours(x, temb), ref(x, temb), **TOL)
