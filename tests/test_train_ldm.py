"""ldm-shapes (train/ldm.py) at a tiny size with a random CLIP of clip-shapes' shape: both stages run through the one
loop, stage 2 leaves the VAE bit-identical, the export is a Stable Diffusion folder that `pm.load` and diffusers'
own StableDiffusionPipeline read into the same images, both objectives, the evaluation's pieces on hand-checked
inputs, the first-use cache of `generate-image`'s default model, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.pipelines.diffusion import StableDiffusionPipeline
from polymodal.train import ConfigError, recipe_config, run
from polymodal.train import ldm as L
from polymodal.train.recipes import shapes_clip_config

TINY = ["train_images=64", "vae_steps=3", "vae_batch_size=8", "max_steps=3", "batch_size=8", "eval_per_prompt=2",
        "eval_steps=2", "log_every=1", "save_every=3", "lr=1e-3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits at barriers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIP of the shape clip-shapes trains (its real vocabulary, 16 text positions, 32-px images)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ldm-clip") / "clip"
    pm.save(pm.build("clip", shapes_clip_config(32)), d)
    return d


@pytest.fixture(scope="module")
def eps_run(tmp_path_factory, clip_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ldm-eps") / "run"
    return out, run("ldm-shapes", out, [*TINY, f"clip={clip_dir}", "objective=eps"], quiet=True)


def test_both_stages_run_and_report(eps_run):
    out, summary = eps_run
    stages = summary["stages"]
    assert set(stages["vae"]["eval"]) == {"mse_seen", "psnr_seen", "mse_never_seen", "psnr_never_seen"}
    e = summary["eval"]
    for kind in ("generated", "unconditional", "real", "reconstructed"):
        for split, images in (("seen", 24 * 2), ("never_seen", 6 * 2)):
            r = e[kind][split]
            assert r["images"] == images and all(0 <= r[m] <= 1 for m in ("color", "shape", "both"))
    assert e["fd_real_vs_real"] >= 0 and e["fd_generated"] >= 0
    assert json.loads((out / "results.json").read_text())["table_file"] == "table.md"
    assert (out / "table.md").read_text().startswith("| images | color | shape | both |")
    per = json.loads((out / "denoiser" / "per_prompt.json").read_text())
    assert len(per) == 30 and sum(not p["seen"] for p in per) == 6 and all(len(p["judged"]) == 2 for p in per)
    from PIL import Image

    assert Image.open(out / "denoiser" / "samples.png").size == ((2 * 2 + 1) * 32, 30 * 32)
    assert (out / "model").resolve() == (out / "denoiser" / "model").resolve()


def test_stage_2_leaves_the_vae_untouched_and_scales_its_latents(eps_run):
    out, _ = eps_run
    stage1, exported = pm.load(out / "vae" / "model"), pm.load(out / "model").vae
    assert stage1.config.scaling_factor != 1.0 and np.isfinite(stage1.config.scaling_factor)
    assert exported.config.scaling_factor == stage1.config.scaling_factor
    a, b = stage1.state_dict(), exported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_export_is_a_diffusers_pipeline_folder(eps_run):
    """pm.load and diffusers' StableDiffusionPipeline read the exported eps folder into the same images (fp32, 1e-4
    on pixels in [0, 1], as tests/test_sd_pipeline.py). (A flow folder names FlowMatchEulerDiscreteScheduler, which
    diffusers' StableDiffusionPipeline cannot drive: its loop scales by `init_noise_sigma`.)"""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    out, _ = eps_run
    ours = pm.load(out / "model")
    assert isinstance(ours, StableDiffusionPipeline)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None).to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="np")
    mine = ours(["a red circle", "a blue star"], seed=5, **kw)
    theirs = ref(["a red circle", "a blue star"], generator=torch.Generator().manual_seed(5), **kw).images
    assert mine.shape == theirs.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


def test_flow_objective_on_a_finished_vae(eps_run, clip_dir, tmp_path):
    out, _ = eps_run
    overrides = [*TINY, f"clip={clip_dir}", "objective=flow", "stages=denoiser", f"vae={out / 'vae' / 'model'}"]
    summary = run("ldm-shapes", tmp_path / "flow", overrides, quiet=True)
    assert "vae" not in summary["stages"] and summary["eval"]["generated"]["seen"]["images"] == 48
    folder = tmp_path / "flow" / "model"
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    images = pm.load(folder)("a green square", seed=0, num_inference_steps=2, height=32, width=32, output_type="np")
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_flow_loss_targets_the_velocity(monkeypatch):
    """objective=flow: x_t = (1 - t) x0 + t e, target e - x0, the U-Net called at 1000 t; eps: x_t on the DDPM
    schedule, target e. A model that records its inputs checks what the loss feeds it."""
    seen = {}

    def model(xt, timestep, context):
        seen.update(xt=xt, t=timestep, context=context)
        return torch.zeros_like(xt)

    B = 3
    batch = {"mean": torch.randn(B, 4, 2, 2), "std": torch.zeros(B, 4, 2, 2), "caption": torch.tensor([0, 1, 0]),
             "contexts": torch.randn(3, 16, 8)}
    torch.manual_seed(0)
    loss, _ = L.denoising_loss("flow", 0.0, 2)(model, batch)
    torch.manual_seed(0)
    _, noise = torch.randn(B, 4, 2, 2), torch.randn(B, 4, 2, 2)  # the loss's draws: posterior noise, then e
    torch.rand(B)
    t = torch.sigmoid(torch.randn(B)).view(B, 1, 1, 1)
    x0 = batch["mean"]
    torch.testing.assert_close(seen["xt"], (1 - t) * x0 + t * noise)
    torch.testing.assert_close(seen["t"], 1000 * t.flatten())
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean())
    torch.testing.assert_close(seen["context"], batch["contexts"][batch["caption"]])
    # caption dropout 1.0 - eps: every caption becomes the empty prompt (the table's last row)
    L.denoising_loss("eps", 0.999999, 2)(model, batch)
    assert torch.equal(seen["context"], batch["contexts"][[2, 2, 2]])
    assert seen["t"].dtype == torch.int64 and seen["t"].max() < 1000


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g)
    assert abs(L.frechet_distance(a, a)) < 1e-8
    # a shift adds |shift|^2; doubling the samples: covariances S and 4 S give Tr(S + 4 S - 2 (4 S^2)^(1/2)) = Tr S,
    # plus the means' |mu|^2
    assert L.frechet_distance(a, a + 3) == pytest.approx(45.0, rel=1e-6)
    d = a.double()
    assert L.frechet_distance(a, 2 * a) == pytest.approx(float(d.mean(0).pow(2).sum() + torch.cov(d.T).trace()),
                                                         rel=1e-6)
    scipy = pytest.importorskip("scipy.linalg")
    b = torch.randn(300, 5, generator=g) @ torch.randn(5, 5, generator=g) + 1
    ca, cb = np.cov(a.numpy().T.astype(np.float64)), np.cov(b.numpy().T.astype(np.float64))
    shift = ((a.double().mean(0) - b.double().mean(0)) ** 2).sum().item()
    ref = shift + np.trace(ca + cb - 2 * scipy.sqrtm(ca @ cb).real)
    assert L.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        L.frechet_distance(a, torch.randn(10, 4))


def test_accuracy_counts_seen_and_never_seen_apart():
    wanted = [("red", "circle", True), ("red", "circle", True), ("red", "triangle", False)]
    judged = [("red", "circle"), ("red", "square"), ("green", "triangle")]
    r = L.accuracy(judged, wanted)
    assert r["seen"] == {"color": 1.0, "shape": 0.5, "both": 0.5, "images": 2}
    assert r["never_seen"] == {"color": 0.0, "shape": 1.0, "both": 0.0, "images": 1}
    table = L.prompts()
    assert len(table) == 30 and sum(not seen for *_, seen in table) == 6


def test_cached_default_trains_once_and_atomically(tmp_path, monkeypatch):
    """generate-image's default model: trained on first use into a scratch folder renamed into the cache, then
    reused; a failed first run leaves no cache behind."""
    import polymodal.demo
    import polymodal.train.recipes as recipes

    monkeypatch.setattr(polymodal.demo, "cache_dir", lambda: tmp_path)
    calls = []

    def fake_run(name, out, overrides, quiet=False):
        calls.append((name, Path(out)))
        if len(calls) == 1:
            raise RuntimeError("killed")
        (Path(out) / "model").mkdir(parents=True)
        (Path(out) / "model" / "model_index.json").write_text("{}")
        return {}

    monkeypatch.setattr(recipes, "run", fake_run)
    said = []
    with pytest.raises(RuntimeError):
        L.cached_default(said.append)
    assert not any((tmp_path / "demo").glob("ldm-shapes-v*/model"))
    model = L.cached_default(said.append)
    assert model.name == "model" and (model / "model_index.json").is_file() and ".partial" not in str(model)
    assert L.cached_default(said.append) == model and len(calls) == 2 and calls[1][0] == "ldm-shapes"
    assert any("first use" in s for s in said)


@pytest.mark.parametrize("overrides, message", [
    (["stages=denoiser,vae"], "stages must be"),
    (["stages=denoiser"], "needs vae="),
    (["vae=/x"], "use it with stages=denoiser"),
    (["image_size=36"], "image_size must be"),
    (["caption_dropout=1"], "caption_dropout"),
    (["guidance=nan"], "guidance"),
    (["train_images=4"], "fewer than one batch"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        recipe_config("ldm-shapes", overrides)


def test_a_vae_that_is_not_an_ldm_shapes_vae_is_refused(clip_dir, tmp_path):
    from polymodal.models.autoencoder_kl import AutoencoderKLConfig

    vae = tmp_path / "vae"
    pm.save(pm.build("autoencoder_kl", AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=(
        "DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)),
        vae)
    with pytest.raises(ConfigError, match="not an ldm-shapes VAE"):
        run("ldm-shapes", tmp_path / "out", [*TINY, f"clip={clip_dir}", "stages=denoiser", f"vae={vae}"], quiet=True)
