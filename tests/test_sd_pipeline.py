"""Stable Diffusion 1.x and SDXL text-to-image pipelines against diffusers 0.42 on tiny random components.

diffusers builds each pipeline from tiny random parts (U-Net, VAE, transformers' CLIP text encoders and CLIP
tokenizers on the real vocabulary) and saves it with its own save_pretrained (model_index.json + component
folders); `pm.load` composes polymodal's parts from that folder, and the decoded images must match diffusers' for
the same prompt, seed or initial latents. fp32 tolerance 1e-4 on pixels in [0, 1]: the same operations run on both
sides; fused q/k/v products and SDPA kernel choice reorder sums (differences seen are ~1e-6).
"""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import polymodal as pm  # noqa: E402
from polymodal.models.clip_text import CLIPTextEncoder  # noqa: E402
from polymodal.pipelines.diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from polymodal.processing.tokenizer import NUM_MERGES, bytes_to_unicode  # noqa: E402
from polymodal.weights.checkpoint import CheckpointError  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)  # see the module docstring
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second OpenMP thread adds only barrier waits, which cost seconds per run when the
    machine's other core is busy. Both libraries run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def _jitter(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, GroupNorm/LayerNorm affines included (their init is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """transformers' CLIPTokenizer on the real CLIP vocabulary (from open_clip's BPE file), as SD folders ship it."""
    d = tmp_path_factory.mktemp("bpe")
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return d


def _text_encoder(cls, seed: int, **extra):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=77, **extra)
    return _jitter(cls(cfg), seed)


def _vae(seed: int):
    torch.manual_seed(seed)
    return _jitter(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16), seed)


def _unet(seed: int, **config):
    torch.manual_seed(seed)
    return _jitter(diffusers.UNet2DConditionModel(**{
        "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D",
                                                                                      "CrossAttnUpBlock2D"),
        "attention_head_dim": 2, **config}), seed)


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tokenizer_dir):
    ref = diffusers.StableDiffusionPipeline(
        vae=_vae(1), text_encoder=_text_encoder(transformers.CLIPTextModel, 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        unet=_unet(3, cross_attention_dim=32),
        scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("sd15")
    ref.save_pretrained(d)
    return ref, d


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tokenizer_dir):
    # SDXL's second tokenizer pads with "!"
    tok2 = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!", model_max_length=77)
    ref = diffusers.StableDiffusionXLPipeline(
        vae=_vae(4), text_encoder=_text_encoder(transformers.CLIPTextModel, 5),
        text_encoder_2=_text_encoder(transformers.CLIPTextModelWithProjection, 6, projection_dim=16,
                                     hidden_act="gelu"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77), tokenizer_2=tok2,
        unet=_unet(7, cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                   transformer_layers_per_block=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4)),
        scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading"), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("sdxl")
    ref.save_pretrained(d)
    return ref, d


def _latents(ref, batch=1, size=16, seed=11):
    f = 2 ** (len(ref.vae.config.block_out_channels) - 1)
    return torch.randn(batch, 4, size // f, size // f, generator=torch.Generator().manual_seed(seed))


def test_sd15_text_to_image_matches_diffusers(sd):
    ref, d = sd
    pipe = pm.load(d)
    assert isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.towers[0].encoder, CLIPTextEncoder)
    prompt, z = ["a photo of an astronaut riding a horse", "a cat"], _latents(ref, batch=2)
    kw = dict(num_inference_steps=3, guidance_scale=6.0, height=16, width=16)
    ours = pipe(prompt, negative_prompt=["blurry", "low quality"], latents=z, output_type="np", **kw)
    theirs = ref(prompt, negative_prompt=["blurry", "low quality"], latents=z, output_type="np", **kw).images
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # the seed draws the same initial latents as diffusers from torch.Generator().manual_seed(seed)
    ours = pipe("a cat", seed=3, output_type="np", **kw)
    theirs = ref("a cat", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    np.testing.assert_allclose(ours, theirs, **TOL)
    assert not np.allclose(ours, pipe("a cat", seed=4, output_type="np", **kw))


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_sd15_scheduler_choice_and_batch(sd, scheduler):
    """pipe(..., scheduler=) samples the folder's schedule with another sampler, as diffusers'
    `Scheduler.from_config(pipe.scheduler.config)`; the ancestral sampler's noise comes from the seed's generator."""
    ref, d = sd
    pipe = pm.load(d)
    from polymodal.schedulers import METHODS

    method = next(m for m, cls in METHODS.items() if cls == scheduler)
    other = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": getattr(diffusers, scheduler)
                                                 .from_config(ref.scheduler.config)})
    other.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=16, width=16, num_images_per_prompt=2)
    ours = pipe("a red cube", seed=5, output_type="np", scheduler=method, **kw)
    theirs = other("a red cube", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_sd15_without_guidance_and_pil_output(sd):
    ref, d = sd
    pipe, z = pm.load(d), _latents(ref, size=24)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=24, width=24)
    ours = pipe("a tree", latents=z, **kw)
    theirs = ref("a tree", latents=z, **kw).images
    assert len(ours) == 1 and ours[0].size == theirs[0].size == (24, 24)
    diff = np.abs(np.asarray(ours[0], dtype=int) - np.asarray(theirs[0], dtype=int))
    assert diff.max() <= 1  # rounding to 8 bits may flip a value that sits on a half step


def test_sd15_long_prompt_is_truncated_with_a_warning(sd, caplog):
    ref, d = sd
    pipe, z = pm.load(d), _latents(ref)
    long = "a very detailed painting of a lighthouse " * 20
    kw = dict(num_inference_steps=2, height=16, width=16, latents=z, output_type="np")
    with caplog.at_level(logging.WARNING, logger="polymodal.pipelines.diffusion"):
        ours = pipe(long, **kw)
    assert any("truncated" in r.getMessage() and "77 tokens" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(ours, ref(long, **kw).images, **TOL)


def test_sdxl_text_to_image_matches_diffusers(sdxl):
    ref, d = sdxl
    pipe = pm.load(d)
    assert isinstance(pipe, StableDiffusionXLPipeline) and len(pipe.towers) == 2
    z = _latents(ref, batch=1)
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np", latents=z)
    # no negative prompt: SDXL's force_zeros_for_empty_prompt guides against zero embeddings
    np.testing.assert_allclose(pipe("a lighthouse at dusk", **kw), ref("a lighthouse at dusk", **kw).images, **TOL)
    # a negative prompt runs both text encoders on it; the default guidance scale is diffusers' SDXL default (5)
    ours = pipe("a lighthouse at dusk", negative_prompt="fog", **kw)
    np.testing.assert_allclose(ours, ref("a lighthouse at dusk", negative_prompt="fog", **kw).images, **TOL)
    ours = pipe(["a fox", "a dog"], seed=2, guidance_scale=3.0, num_inference_steps=2, height=24, width=16,
                output_type="np")
    theirs = ref(["a fox", "a dog"], generator=torch.Generator().manual_seed(2), guidance_scale=3.0,
                 num_inference_steps=2, height=24, width=16, output_type="np").images
    assert ours.shape == (2, 24, 16, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_bad_inputs_are_refused_before_denoising(sd):
    _, d = sd
    pipe = pm.load(d)
    calls = []
    unet_forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: calls.append(1) or unet_forward(*a, **k)
    cases = [
        (dict(height=15, width=16), "multiple of 2"),
        (dict(height=16, width=0), "width must be a positive multiple"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
        (dict(guidance_scale="7.5"), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(latents=torch.zeros(1, 4, 3, 3)), "latents must be a tensor of shape"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 texts for 1 prompts"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(scheduler="heun"), "unknown scheduler"),
        (dict(scheduler="pndm"), "Runge-Kutta warm-up"),  # the folder's Euler config says nothing of skip_prk_steps
        (dict(seed="1"), "seed must be an integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe("a cat", **{"height": 16, "width": 16, "num_inference_steps": 2, **kwargs})
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe(None)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe([])
    assert not calls


def test_unknown_pipeline_and_missing_component_are_refused(sd, tmp_path):
    _, d = sd
    import shutil

    copy = tmp_path / "p"
    shutil.copytree(d, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(CheckpointError, match="KandinskyPipeline.*not built"):
        pm.load(copy)
    (copy / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(copy / "unet")
    with pytest.raises(CheckpointError, match="no unet/ component"):
        pm.load(copy)


def test_pndm_folder_samples_with_plms(sd, tmp_path):
    """SD 1.5 ships PNDM with skip_prk_steps: PLMS, N + 1 model calls for N steps; text-to-image and img2img."""
    ref, _ = sd
    pndm = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": diffusers.PNDMScheduler(
        **SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)})
    pndm.set_progress_bar_config(disable=True)
    pndm.save_pretrained(tmp_path / "pndm")
    pipe = pm.load(tmp_path / "pndm")
    assert pipe.method == "pndm"
    kw = dict(num_inference_steps=4, height=16, width=16, output_type="np", latents=_latents(ref))
    np.testing.assert_allclose(pipe("a boat", **kw), pndm("a boat", **kw).images, **TOL)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pndm.components)
    img2img.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=5, strength=0.5, output_type="np", image=_photo(3))
    np.testing.assert_allclose(pipe("a boat", seed=1, **kw),
                               img2img("a boat", generator=torch.Generator().manual_seed(1), **kw).images, **TOL)


def test_unbuilt_scheduler_falls_back_to_ddim_with_a_warning(sd, tmp_path, caplog):
    ref, _ = sd
    d = tmp_path / "heun"
    heun = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": diffusers.HeunDiscreteScheduler(
        **SCHEDULE)})
    heun.save_pretrained(d)
    with caplog.at_level(logging.WARNING, logger="polymodal.pipelines.diffusion"):
        pipe = pm.load(d)
    assert pipe.method == "ddim"
    assert any("HeunDiscreteScheduler" in r.getMessage() and "DDIM" in r.getMessage() for r in caplog.records)
    # from the saved file, as a user switching the loaded folder's scheduler does (an in-memory config would leave
    # out the values Heun kept at its defaults, its linspace spacing among them)
    saved = diffusers.HeunDiscreteScheduler.from_pretrained(d / "scheduler")
    ddim = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": diffusers.DDIMScheduler.from_config(
        saved.config)})
    ddim.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np", latents=_latents(ref))
    np.testing.assert_allclose(pipe("a boat", **kw), ddim("a boat", **kw).images, **TOL)



def _photo(seed: int, size=(16, 16)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size=(16, 16)):
    from PIL import Image

    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[4:12, 2:10] = 255  # white: repaint
    return Image.fromarray(m)


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_sd15_img2img_matches_diffusers(sd, scheduler):
    ref, d = sd
    pipe = pm.load(d)
    components = dict(ref.components)
    if scheduler:
        components["scheduler"] = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    other = diffusers.StableDiffusionImg2ImgPipeline(**components)
    other.set_progress_bar_config(disable=True)
    method = "ddim" if scheduler else None
    image = _photo(0, (24, 16))
    kw = dict(num_inference_steps=5, strength=0.6, output_type="np")
    ours = pipe(["a watercolor", "a sketch"], image=image, seed=3, scheduler=method, **kw)
    theirs = other(["a watercolor", "a sketch"], image=image, generator=torch.Generator().manual_seed(3), **kw).images
    assert ours.shape == (2, 16, 24, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # a tensor in [0, 1] is the same image (a permuted, non-contiguous one: the kernels' sums may reorder)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    again = pipe(["a watercolor", "a sketch"], image=tensor, seed=3, scheduler=method, **kw)
    np.testing.assert_allclose(again, ours, **TOL)


def test_sd15_inpainting_matches_diffusers(sd, tmp_path):
    """An inpainting U-Net (9 input channels) from its own folder, and a plain U-Net that puts the known part back."""
    ref, d = sd
    nine = diffusers.StableDiffusionInpaintPipeline(**{**ref.components,
                                                        "unet": _unet(8, cross_attention_dim=32, in_channels=9)})
    nine.set_progress_bar_config(disable=True)
    nine.save_pretrained(tmp_path / "inpaint")
    pipe = pm.load(tmp_path / "inpaint")
    assert pipe.unet.config.in_channels == 9
    image, mask = _photo(1), _mask()
    for strength in (1.0, 0.7):
        kw = dict(num_inference_steps=3, strength=strength, output_type="np", height=16, width=16)
        ours = pipe("a red door", image=image, mask_image=mask, seed=4, **kw)
        theirs = nine("a red door", image=image, mask_image=mask, generator=torch.Generator().manual_seed(4),
                      **kw).images
        np.testing.assert_allclose(ours, theirs, **TOL)
    with pytest.raises(ValueError, match="inpainting model"):
        pipe("a red door", num_inference_steps=2)
    plain = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    plain.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, strength=0.75, output_type="np", height=16, width=16)
    ours = pm.load(d)("a red door", image=image, mask_image=mask, seed=5, **kw)
    theirs = plain("a red door", image=image, mask_image=mask, generator=torch.Generator().manual_seed(5),
                   **kw).images
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_image_editing_inputs_are_refused(sd, sdxl):
    pipe = pm.load(sd[1])
    image = _photo(2)
    cases = [
        (dict(image=image, strength=1.5), "strength must be a number in"),
        (dict(image=image, strength=0.1), "leaves no denoising step"),
        (dict(mask_image=_mask()), "mask_image needs the image"),
        (dict(strength=0.5), "strength applies to img2img"),
        (dict(image=image, height=16), "img2img takes its size from the image"),
        (dict(image=image, latents=torch.zeros(1, 4, 8, 8)), "do not pass both"),
        (dict(image=torch.rand(3, 15, 16)), "expected positive multiples of 2"),
        (dict(image=torch.rand(3, 16, 16) * 2 - 1), r"values in \[0, 1\]"),
        (dict(image="photo.png"), "image must be a PIL image"),
        (dict(image=image, mask_image=torch.ones(8, 8)), "mask tensors must be"),
        (dict(image=[image, image, image], num_images_per_prompt=2), "3 images for 2 images"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe("a cat", num_inference_steps=4, **kwargs)
    with pytest.raises(ValueError, match="does not edit images"):
        pm.load(sdxl[1])("a cat", image=image, num_inference_steps=2)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_plms_steps_match_pndm_scheduler(spacing, prediction):
    """schedulers.plms_step against diffusers' PNDMScheduler (skip_prk_steps) over whole runs with a fake model;
    1 and 2 steps exercise the repeated first step's edge cases."""
    from polymodal import schedulers as S

    for n in (1, 2, 5, 20):
        ref = diffusers.PNDMScheduler(**SCHEDULE, timestep_spacing=spacing, prediction_type=prediction,
                                      skip_prk_steps=True, set_alpha_to_one=False)
        ref.set_timesteps(n)
        method, schedule = S.from_diffusers({**dict(ref.config), "_class_name": "PNDMScheduler"}, "pndm")
        plan = S.make_plan(method, schedule, n)
        assert torch.equal(plan.timesteps, ref.timesteps)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, 4, 4, 4, generator=g)
        y, state, weight = x.clone(), None, torch.randn(4, 4, generator=g) * 0.3

        def model(z, t, w=weight):
            return torch.einsum("oc,bchw->bohw", w, z) * (1 + float(t) / 1000)

        for i, t in enumerate(ref.timesteps):
            y = ref.step(model(y, t), t, y).prev_sample
            x, state = S.step(plan, i, x, model(x, plan.timesteps[i]), state)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        S.from_diffusers({**dict(ref.config), "_class_name": "PNDMScheduler", "skip_prk_steps": False}, "pndm")
