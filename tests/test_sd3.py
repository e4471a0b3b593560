"""Stable Diffusion 3 / 3.5 against diffusers 0.42 on tiny random components: the MM-DiT (SD3Transformer2DModel),
the three text encoders' joined embeddings and the whole StableDiffusion3Pipeline.

diffusers and transformers build the parts with random weights and save them with their own save_pretrained;
polymodal loads those folders strictly. fp32 tolerance 1e-4: the same operations run on both sides, fused q/k/v
products and SDPA's kernel choice only reorder sums (differences seen are ~1e-6).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

import polymodal as pm  # noqa: E402
from polymodal.models.sd3_transformer import PRESETS, SD3Transformer2DModel, sincos_grid  # noqa: E402
from polymodal.pipelines.sd3 import StableDiffusion3Pipeline  # noqa: E402
from polymodal.processing.tokenizer import NUM_MERGES, bytes_to_unicode  # noqa: E402
from polymodal.weights.checkpoint import CheckpointError  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)  # see the module docstring
WORDS = ["a", "cat", "photo", "of", "dog", "red", "cube", "the", "an", "astronaut", "riding", "horse", "lighthouse",
         "at", "dusk", "fog", "blurry", "low", "quality", "tree"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second OpenMP thread only waits at barriers on a busy 2-core machine (both libraries run
    under the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jitter(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (AdaLN-Zero's and the norms' initial values would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _mmdit(seed: int, **config):
    torch.manual_seed(seed)
    base = dict(sample_size=8, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=80, caption_projection_dim=32, pooled_projection_dim=64, out_channels=8,
                pos_embed_max_size=12)
    return _jitter(diffusers.SD3Transformer2DModel(**{**base, **config}), seed)


SD35 = dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))  # SD3.5 medium's kind of blocks (and a plain last one)


# ------------------------------------------------------------------------------------------------ the MM-DiT


@pytest.mark.parametrize("config", [{}, SD35], ids=["sd3", "sd3.5"])
def test_mmdit_matches_diffusers_and_round_trips(tmp_path, config):
    ref = _mmdit(1, **config)
    ref.save_pretrained(tmp_path / "ref")
    model = pm.load(tmp_path / "ref")
    assert isinstance(model, SD3Transformer2DModel)
    g = torch.Generator().manual_seed(0)
    context, pooled = torch.randn(2, 7, 80, generator=g), torch.randn(2, 64, generator=g)
    # 8x8 and 10x6 latents (5x3 patches: an off-centre crop of the 12x12 position grid), per-sample, scalar and
    # fractional timesteps (the pipeline passes sigma * 1000)
    for size, t in (((8, 8), torch.tensor([999.0, 3.0])), ((10, 6), torch.tensor(412.37))):
        x = torch.randn(2, 8, *size, generator=g)
        with torch.no_grad():
            theirs = ref(x, context, pooled, t.expand(2)).sample
            ours = model(x, context, pooled, t)
        assert ours.shape == theirs.shape == (2, 8, *size)
        torch.testing.assert_close(ours, theirs, **TOL)
    # the position grid polymodal computes for a fresh model is the one diffusers stores
    torch.testing.assert_close(sincos_grid(32, 12, 4), ref.pos_embed.pos_embed[0], rtol=0, atol=1e-6)
    # pm.save -> diffusers loads identical tensors and config
    pm.save(model, tmp_path / "ours")
    back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "ours").eval()
    def fields(cfg):  # as JSON holds them (tuples are lists there)
        return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))

    assert fields(back.config) == fields(ref.config)
    theirs, mine = ref.state_dict(), back.state_dict()
    assert theirs.keys() == mine.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)


def test_mmdit_strict_load_names_the_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _mmdit(2).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["transformer_blocks.1.attn.add_k_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="add_k_proj"):
        pm.load(tmp_path)


def test_mmdit_refuses_unbuilt_options_and_bad_inputs(tmp_path):
    ref = _mmdit(3)
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"qk_norm": "layer_norm"}, "qk_norm='layer_norm' is not built"),
                            ({"pos_embed_max_size": None}, "pos_embed_max_size"),
                            ({"caption_projection_dim": 48}, "caption_projection_dim")):
        (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(CheckpointError, match=message):
            pm.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = pm.load(tmp_path)
    x, ctx, pooled = torch.zeros(1, 8, 8, 8), torch.zeros(1, 3, 80), torch.zeros(1, 64)
    cases = [((torch.zeros(1, 4, 8, 8), ctx, pooled, 1.0), "hidden_states"),
             ((torch.zeros(1, 8, 7, 8), ctx, pooled, 1.0), "multiples of the patch size 2"),
             ((torch.zeros(1, 8, 26, 8), ctx, pooled, 1.0), "at most 12x12"),
             ((x, torch.zeros(1, 3, 79), pooled, 1.0), "encoder_hidden_states"),
             ((x, ctx, torch.zeros(2, 64), 1.0), "pooled_projections"),
             ((x, ctx, pooled, torch.zeros(3)), "timestep")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)


@pytest.mark.parametrize("name", ["sd3-tiny-test", "sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_preset_parameter_counts_equal_diffusers(name):
    from dataclasses import asdict

    c = PRESETS[name]
    with torch.device("meta"):
        theirs = diffusers.SD3Transformer2DModel(**asdict(c))
        ours = SD3Transformer2DModel(c)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()}.keys() != set()  # built, not empty
    if name == "sd3-medium":  # the published SD3 medium MM-DiT: 2.03B parameters
        assert round(sum(p.numel() for p in ours.parameters()) / 1e9, 2) == 2.03


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """transformers' CLIPTokenizer on the real CLIP vocabulary (from open_clip's BPE file), as SD3 folders ship it."""
    d = tmp_path_factory.mktemp("bpe")
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return d


def _t5_tokenizer():
    """A small T5 (Unigram) tokenizer: whole words, single letters for the rest, </s> appended."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - 0.1 * i) for i, w in
                                                              enumerate(WORDS)]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -3.0)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip(seed: int, hidden: int, **extra):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **extra)
    return _jitter(transformers.CLIPTextModelWithProjection(cfg), seed)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory, clip_tokenizer_dir):
    torch.manual_seed(4)
    vae = _jitter(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4, sample_size=16,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305), 4)
    torch.manual_seed(5)
    t5 = _jitter(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=50, d_model=80, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False)), 5)
    # CLIP-L's and CLIP-G's kinds (G: GELU, its tokenizer pads with "!"); their 32 + 40 features are padded to 80
    ref = diffusers.StableDiffusion3Pipeline(
        transformer=_mmdit(6, **SD35), vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(7, 32), text_encoder_2=_clip(8, 40, hidden_act="gelu"), text_encoder_3=t5,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="!", model_max_length=77),
        tokenizer_3=_t5_tokenizer())
    ref.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("sd3")
    ref.save_pretrained(d)
    return ref, d


def _latents(batch=1, side=4, seed=11):
    return torch.randn(batch, 8, side, side, generator=torch.Generator().manual_seed(seed))


def test_prompt_embeddings_match_diffusers_encode_prompt(sd3):
    ref, d = sd3
    pipe = pm.load(d)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.t5 is not None
    prompts = ["a photo of a red cube", "an astronaut riding a horse at dusk"]
    with torch.no_grad():
        theirs = ref.encode_prompt(prompts, None, None, negative_prompt=["blurry", "fog"], max_sequence_length=16)
    pipe.max_sequence_length = 16
    with torch.no_grad():
        context, added = pipe.encode_prompt(prompts, ["blurry", "fog"], guided=True)
    assert context.shape == (4, 77 + 16, 80) and added["pooled_projections"].shape == (4, 64)
    torch.testing.assert_close(context, torch.cat([theirs[1], theirs[0]]), **TOL)
    torch.testing.assert_close(added["pooled_projections"], torch.cat([theirs[3], theirs[2]]), **TOL)


def test_long_prompts_are_cut_as_diffusers_cuts_them(sd3, caplog):
    """Past 77 CLIP tokens and past max_sequence_length T5 tokens, each tokenizer keeps its end-of-text token last;
    the cut parts are named in a warning."""
    ref, d = sd3
    pipe = pm.load(d)
    pipe.max_sequence_length = 12
    prompt = ["a photo of a red cube at dusk " * 12]
    with torch.no_grad():
        theirs = ref.encode_prompt(prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=12)
    with caplog.at_level(logging.WARNING, logger="polymodal.pipelines.diffusion"), torch.no_grad():
        context, added = pipe.encode_prompt(prompt, None, guided=False)
    torch.testing.assert_close(context, theirs[0], **TOL)
    torch.testing.assert_close(added["pooled_projections"], theirs[2], **TOL)
    messages = [r.getMessage() for r in caplog.records]
    assert any("77 tokens" in m for m in messages) and any("`max_sequence_length` is set to 12" in m
                                                           for m in messages)


def test_sd3_pipeline_matches_diffusers(sd3):
    ref, d = sd3
    pipe = pm.load(d)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=8, width=8, output_type="np")
    prompt, z = ["a photo of a cat", "a red cube"], _latents(batch=2)
    ours = pipe(prompt, negative_prompt=["blurry", "low quality"], latents=z, **kw)
    theirs = ref(prompt, negative_prompt=["blurry", "low quality"], latents=z, **kw).images
    assert ours.shape == theirs.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # the seed draws the initial latents as diffusers does from torch.Generator().manual_seed(seed); the default
    # size is the MM-DiT's sample_size x the VAE factor (16 px), guidance diffusers' default 7.0, and
    # num_images_per_prompt repeats each prompt's conditioning
    ours = pipe("a lighthouse at dusk", seed=3, num_inference_steps=2, num_images_per_prompt=2, output_type="np")
    theirs = ref("a lighthouse at dusk", generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                 num_images_per_prompt=2, output_type="np").images
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, theirs, **TOL)
    # no guidance at scale 1
    ours = pipe("a tree", latents=_latents(side=6), num_inference_steps=2, guidance_scale=1.0, height=12, width=12,
                output_type="np")
    theirs = ref("a tree", latents=_latents(side=6), num_inference_steps=2, guidance_scale=1.0, height=12, width=12,
                 output_type="np").images
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_sd3_folder_without_t5(sd3, tmp_path):
    """diffusers allows text_encoder_3=None: zeros stand for T5's tokens."""
    ref, _ = sd3
    parts = {**ref.components, "text_encoder_3": None, "tokenizer_3": None}
    other = diffusers.StableDiffusion3Pipeline(**parts)
    other.set_progress_bar_config(disable=True)
    other.save_pretrained(tmp_path)
    pipe = pm.load(tmp_path)
    assert pipe.t5 is None
    kw = dict(num_inference_steps=2, height=8, width=8, output_type="np", latents=_latents())
    np.testing.assert_allclose(pipe("a dog", negative_prompt="fog", **kw),
                               other("a dog", negative_prompt="fog", **kw).images, **TOL)


def test_sd3_bad_inputs_are_refused_before_denoising(sd3, tmp_path):
    _, d = sd3
    pipe = pm.load(d)
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    cases = [
        (dict(height=10, width=8), "multiple of 4 .the VAE's downscale factor 2 x the MM-DiT's patch size 2"),
        (dict(width=0), "width must be a positive multiple"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(num_inference_steps=-3), "num_inference_steps must be a positive integer"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents must be a tensor of shape"),
        (dict(scheduler="ddim"), "flow_match_euler"),
        (dict(image=torch.zeros(1, 3, 8, 8)), "SD 1.x/2.x"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe("a cat", **{"height": 8, "width": 8, "num_inference_steps": 2, **kwargs})
    pipe.max_sequence_length = 1000
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipe("a cat", height=8, width=8, num_inference_steps=2)
    assert not calls
    # a folder without a needed component
    shutil.copytree(d, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "text_encoder_2")
    with pytest.raises(CheckpointError, match="no text_encoder_2/ component"):
        pm.load(tmp_path / "p")
