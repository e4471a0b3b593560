"""A tiny latent diffusion model trained on ShapesWorld captions, the `ldm-shapes` recipe (Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models"; Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", sec. 2-3, for the flow objective).

    text     the clip-shapes recipe's CLIP text tower (`clip=DIR`; by default the checkpoint the demo trains and
             caches, trained first when it is missing), frozen; the U-Net cross-attends to its last hidden state
             over 16 tokens (B, 16, 32), exported as a `clip_text` CLIPTextModel with CLIP's tokenizer files
    stage 1  the VAE (`AutoencoderKL`, 32-px images -> 8x8x4 latents, downscale 4): L1 + MSE reconstruction of
             the posterior's sample plus `kl_weight` x KL to N(0, 1), no perceptual or adversarial loss (the
             paper's VAE has both); the latents' scaling factor is 1 / their standard deviation over the training
             images (sec. 4.3.2), written into the VAE's config
    stage 2  the denoiser, a small `UNet2DConditionModel` (cross-attention in every stage) on the frozen VAE's
             latents (a fresh posterior sample each step); captions dropped to "" with `caption_dropout` so that
             classifier-free guidance (Ho & Salimans 2022) has an unconditional model to guide from.
             objective=eps: LDM's, the DDPM forward process on SD's scaled-linear betas, x_t = sqrt(a_t) x0 +
               sqrt(1 - a_t) e, t uniform in 0..999, MSE on the noise e; sampled with DPM-Solver++ (2M)
             objective=flow (the default: it learned faster here): SD3's rectified flow, x_t = (1 - t) x0 + t e
               with t = sigmoid(N(0, 1)) (SD3's logit-normal sampling), MSE on the velocity e - x0, the U-Net
               called at 1000 t; sampled with the flow-matching Euler sampler (FlowMatchEulerDiscreteScheduler,
               shift 1)
    export   a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
             scheduler/) that `pm.load`, `pm.pipeline("text-to-image")` and `polymodal generate-image` read
    report   `evaluate`: k images per prompt "a {color} {shape}" for all 30 combinations (24 seen, 6 never seen in
             training), classified zero-shot by the clip-shapes CLIP (the 30 captions as labels, as that recipe's
             evaluation): color, shape and both right, for seen and never-seen prompts; the same for unconditional
             samples scored against the prompt they would have had (the floor) and for real ShapesWorld images and
             their VAE reconstructions (the classifier's ceiling); the Frechet distance between Gaussians fitted to
             the CLIP image embeddings of generated and real images (a CLIP-feature FD, not Inception FID)

`stages=vae,denoiser` (the default) trains stage 1 into OUT/vae, then stage 2 into OUT/denoiser (OUT/model links to
its pipeline folder); `stages=denoiser vae=DIR` reuses a finished stage-1 run's VAE (one VAE for both objectives).
Each stage is an ordinary run of the one loop: `--resume` continues either from its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.train.config import ConfigError, TrainConfig
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World
from polymodal.train.engine import Task, dump_json

STAGES = ("vae", "denoiser")
CONTEXT = 16  # the clip-shapes text tower's positions: every prompt is padded or cut to them
LATENT_CHANNELS = 4
DOWNSCALE = 4  # 32-px images -> 8x8 latents
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # SD's DDPM schedule


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class LdmShapesConfig(TrainConfig):
    """`max_steps`, `batch_size`, `lr` are the denoiser's; the VAE has its own (`vae_*`)."""

    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    default_warmup: ClassVar[int] = 100
    weight_decay: float = 0.0
    log_every: int = 50
    save_every: int = 500
    stages: tuple[str, ...] = STAGES
    stage: Literal["", "vae", "denoiser"] = ""  # the one stage a run trains (set by the plan from `stages`)
    objective: Literal["eps", "flow"] = "flow"  # flow beat eps at equal steps here (docs/diffusion.md)
    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # on the mean KL per latent element against the mean reconstruction error per pixel
    vae: str = ""  # stage 2 alone: a finished stage-1 run (its model/) whose VAE the denoiser uses
    clip: str = ""  # a clip-shapes run's model/; empty: the demo's cached one (trained first when missing)
    image_size: int = 32
    train_images: int = 10000  # a fixed set, generated once
    caption_dropout: float = 0.1
    eval_per_prompt: int = 8  # images per prompt (30 prompts) in the evaluation
    eval_steps: int = 20
    guidance: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if not self.stages or any(s not in STAGES for s in self.stages) or list(self.stages) != [
                s for s in STAGES if s in self.stages]:
            got = ",".join(self.stages) or "nothing"
            raise ConfigError(f"stages must be vae,denoiser or vae or denoiser; got {got}")
        if self.vae and "vae" in self.stages and self.stage != "denoiser":
            raise ConfigError("vae= gives stage 2 a trained VAE: use it with stages=denoiser")
        if (self.stages == ("denoiser",) or self.stage == "denoiser") and not self.vae:
            raise ConfigError("stages=denoiser needs vae=DIR, a finished ldm-shapes stage-1 run (OUT/vae)")
        for name in ("vae_steps", "vae_batch_size", "eval_per_prompt", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vae_lr <= 0:
            raise ConfigError(f"vae_lr must be positive, got {self.vae_lr}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError(f"kl_weight must be a number >= 0, got {self.kl_weight}")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ConfigError(f"guidance must be a number >= 0 (<= 1: no classifier-free guidance), got "
                              f"{self.guidance}")
        if self.image_size % (2 * DOWNSCALE) or not 16 <= self.image_size <= 128:
            raise ConfigError(f"image_size must be a multiple of {2 * DOWNSCALE} from 16 to 128, got {self.image_size}")
        batch = self.vae_batch_size if self.stage == "vae" else self.batch_size
        if self.train_images < batch:
            raise ConfigError(f"train_images={self.train_images} is fewer than one batch of {batch}")


# ------------------------------------------------------------------------------------------------ models


def vae_config(c: LdmShapesConfig):
    """Three stages of one ResNet block (16, 32, 32 channels; attention in the middle): 32 px -> 8x8x4."""
    from polymodal.models.autoencoder_kl import AutoencoderKLConfig

    d, u = "DownEncoderBlock2D", "UpDecoderBlock2D"
    return AutoencoderKLConfig(block_out_channels=(16, 32, 32), down_block_types=(d,) * 3, up_block_types=(u,) * 3,
                               layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                               sample_size=c.image_size, scaling_factor=1.0)


def unet_config(c: LdmShapesConfig, context_dim: int):
    """Two stages (8x8, 4x4) of 32 / 64 channels, each with a spatial transformer that cross-attends to the text,
    4 heads; a mid block at 4x4."""
    from polymodal.models.unet_2d_condition import UNet2DConditionConfig

    x_down, x_up = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    return UNet2DConditionConfig(sample_size=c.image_size // DOWNSCALE, in_channels=LATENT_CHANNELS,
                                 out_channels=LATENT_CHANNELS, down_block_types=(x_down, x_down),
                                 up_block_types=(x_up, x_up), block_out_channels=(32, 64), layers_per_block=1,
                                 norm_num_groups=8, cross_attention_dim=context_dim, attention_head_dim=4)


def scheduler_config(objective: str) -> dict:
    """The exported scheduler/scheduler_config.json: the training schedule with the sampler the pipeline uses."""
    try:
        from importlib import metadata

        version = metadata.version("diffusers")
    except Exception:  # noqa: BLE001 - only the version string written into the file
        version = "0.42.1"
    if objective == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": version,
                "num_train_timesteps": 1000, "shift": 1.0}
    return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": version, "num_train_timesteps": 1000,
            **BETAS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 1,
            "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True}


def text_encoder_from_clip(clip) -> nn.Module:
    """The clip-shapes CLIP's text tower as a `clip_text` CLIPTextModel (no projection: the U-Net reads every token's
    feature after the final LayerNorm)."""
    from polymodal.models.clip_text import CLIPTextEncoder, CLIPTextEncoderConfig

    enc = CLIPTextEncoder(CLIPTextEncoderConfig(text=clip.config.text, projection_dim=None))
    enc.text_model.load_state_dict({k: v for k, v in clip.text.state_dict().items() if not k.startswith("proj.")})
    return enc.eval().requires_grad_(False)


def write_tokenizer(directory: Path, max_length: int = CONTEXT) -> Path:
    """CLIP's BPE (open_clip's bundled file, the vocabulary clip-shapes trained on) as transformers' CLIPTokenizer
    files (vocab.json, merges.txt), padding with "!" (id 0, what clip-shapes pads with) to `max_length` tokens."""
    import gzip

    import open_clip

    from polymodal.processing.tokenizer import NUM_MERGES, bytes_to_unicode

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1: NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in lines),
              "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                         "model_max_length": max_length, **special}, indent=2))
    return d


def text_tower(clip, tokenizer_dir: Path):
    """The pipeline's TextTower (tokenizer read back from its files, the clip-shapes text encoder)."""
    from polymodal.pipelines.diffusion import TextTower
    from polymodal.processing.tokenizer import CLIPTokenizer

    return TextTower(CLIPTokenizer.from_pretrained(tokenizer_dir), text_encoder_from_clip(clip), CONTEXT)


def make_pipeline(unet, vae, tower, objective: str):
    """The Stable Diffusion pipeline over these components (what `pm.load` of the exported folder builds)."""
    from polymodal import schedulers as S
    from polymodal.pipelines.diffusion import StableDiffusionPipeline

    raw = scheduler_config(objective)
    return StableDiffusionPipeline(unet, vae, [tower], raw, S.from_diffusers(raw)[0])


def save_pipeline(pipe, directory: Path, objective: str) -> Path:
    """A diffusers StableDiffusionPipeline folder: model_index.json and the five components."""
    import polymodal as pm

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pm.save(pipe.unet, d / "unet")
    pm.save(pipe.vae, d / "vae")
    pm.save(pipe.towers[0].encoder, d / "text_encoder")
    write_tokenizer(d / "tokenizer", pipe.towers[0].max_length)
    (d / "scheduler").mkdir(exist_ok=True)
    raw = scheduler_config(objective)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(raw, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": raw["_diffusers_version"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", raw["_class_name"]], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    (d / "model_index.json").write_text(json.dumps(index, indent=2))
    return d


# -------------------------------------------------------------------------------------------------- data


def training_pixels(c: LdmShapesConfig) -> tuple[Tensor, list[str]]:
    """The fixed training set: uint8 images (N, 3, H, W) of seen combinations and their captions."""
    from polymodal.data import ShapesWorld

    samples = ShapesWorld(c.image_size, seed=0, split="train").batch(0, c.train_images)
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    return pixels, [s.caption for s in samples]


def to_unit(pixels: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the VAE's range."""
    return pixels.float() / 127.5 - 1.0


def load_clip(c: LdmShapesConfig):
    from polymodal.train.llava import clip_checkpoint, load_tower

    return load_tower(clip_checkpoint(c))


# ----------------------------------------------------------------------------------------- stage 1: VAE


class Reconstruction(nn.Module):
    """The VAE as stage 1 trains it: pixels -> (reconstruction of a posterior sample, mean, log variance)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dist = self.vae.encode_distribution(pixels)  # (B, 4, h, w) each
        return self.vae.decode(dist.sample()), dist.mean, dist.logvar  # torch's generator: checkpointed


def vae_loss(kl_weight: float):
    def loss_fn(model: nn.Module, batch: dict):
        x = to_unit(batch["pixels"])
        rec, mean, logvar = model(x)
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # KL(q(z|x) || N(0, 1)) per element
        return l1 + mse + kl_weight * kl, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}

    return loss_fn


@torch.no_grad()
def latent_scale(vae, pixels: Tensor, n: int = 2000) -> float:
    """1 / the standard deviation of posterior samples of the first n training images (LDM, sec. 4.3.2)."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([vae.encode_distribution(to_unit(pixels[i: i + 250])).sample(g) for i in range(0, n, 250)])
    return float(1.0 / z.std())


@torch.no_grad()
def evaluate_vae(vae, image_size: int, n: int = 200) -> dict:
    """Reconstruction error (through the latent mean) on fresh images of seen and never-seen combinations."""
    from polymodal.data import ShapesWorld

    vae.eval()
    out = {}
    for split in ("train", "heldout"):
        samples = ShapesWorld(image_size, seed=1, split=split).batch(0, n)
        x = to_unit(torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2))
        rec = vae.decode(vae.encode(x)).clamp(-1, 1)
        mse = float((rec - x).pow(2).mean()) / 4  # on [0, 1] pixels
        key = "seen" if split == "train" else "never_seen"
        out[f"mse_{key}"] = mse
        out[f"psnr_{key}"] = 10 * math.log10(1 / mse)
    return out


def build_vae_stage(c: LdmShapesConfig, world: World) -> Task:
    import polymodal as pm

    pixels, _ = training_pixels(c)
    model = Reconstruction(pm.build("autoencoder_kl", vae_config(c)))
    data = ShuffledBatches(len(pixels), c.batch_size // c.grad_accum, lambda i: {"pixels": pixels[i]}, seed=c.seed,
                           rank=world.rank, world_size=world.size)

    def export(m: Reconstruction, where: Path) -> None:
        vae = m.vae.eval()
        vae.config = replace(vae.config, scaling_factor=round(latent_scale(vae, pixels), 5))
        pm.save(vae, where)

    return Task(model, vae_loss(c.kl_weight), data, evaluate=lambda m: evaluate_vae(m.vae, c.image_size),
                export=export)


# ------------------------------------------------------------------------------------- stage 2: denoiser


def denoising_loss(objective: str, dropout: float, empty: int):
    """loss_fn(model, batch) for the U-Net; noise, timesteps and caption dropout from torch's global generator
    (which every checkpoint saves, so a resumed run draws the same)."""
    from polymodal import schedulers as S

    alphas = S.alphas_cumprod(S.NoiseSchedule(**BETAS))  # (1000,)

    def loss_fn(model: nn.Module, batch: dict):
        mean, std, caption, table = batch["mean"], batch["std"], batch["caption"], batch["contexts"]
        B = mean.shape[0]
        x0 = mean + std * torch.randn_like(mean)  # a posterior sample, already scaled
        noise = torch.randn_like(x0)
        drop = torch.rand(B, device=x0.device) < dropout
        context = table[torch.where(drop, torch.full_like(caption, empty), caption)]  # (B, 16, D)
        if objective == "flow":
            t = torch.sigmoid(torch.randn(B, device=x0.device))  # logit-normal(0, 1)
            tt = t.view(B, 1, 1, 1)
            xt, target, timestep = (1 - tt) * x0 + tt * noise, noise - x0, 1000 * t
        else:
            timestep = torch.randint(0, 1000, (B,), device=x0.device)
            a = alphas.to(x0.device)[timestep].view(B, 1, 1, 1)
            xt, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
        loss = F.mse_loss(model(xt, timestep, context), target)
        return loss, {}

    return loss_fn


def build_denoiser_stage(c: LdmShapesConfig, world: World) -> Task:
    import polymodal as pm

    vae = pm.load(Path(c.vae)).eval().requires_grad_(False)
    if vae.config.latent_channels != LATENT_CHANNELS or vae.config.downscale != DOWNSCALE:
        raise ConfigError(f"vae={c.vae!r} is not an ldm-shapes VAE ({LATENT_CHANNELS} latent channels, downscale "
                          f"{DOWNSCALE})")
    clip = load_clip(c)
    pixels, captions = training_pixels(c)
    with torch.no_grad():  # the frozen VAE's posterior of every training image, once (scaled as the U-Net sees it)
        dists = [vae.encode_distribution(to_unit(pixels[i: i + 500])) for i in range(0, len(pixels), 500)]
        mean = vae.scale_latents(torch.cat([d.mean for d in dists]))  # (N, 4, h, w)
        std = torch.cat([d.std for d in dists]) * vae.scaling_factor
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"ldm-shapes-tokenizer-{os.getpid()}"
    tower = text_tower(clip, write_tokenizer(scratch))
    shutil.rmtree(scratch, ignore_errors=True)
    distinct = sorted(set(captions))
    with torch.no_grad():
        contexts = tower.encode([*distinct, ""], warn=False)[0]  # (K + 1, 16, D): the last row is the empty prompt
    caption_of = torch.tensor([distinct.index(t) for t in captions])
    unet = pm.build("unet_2d_condition", unet_config(c, contexts.shape[-1]))

    def collate(i: Tensor) -> dict:
        return {"mean": mean[i], "std": std[i], "caption": caption_of[i], "contexts": contexts}

    data = ShuffledBatches(len(pixels), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    done: dict = {}

    def run_evaluation(m: nn.Module) -> dict:
        pipe = make_pipeline(m, vae, tower, c.objective)
        result = evaluate(pipe, clip, per_prompt=c.eval_per_prompt, steps=c.eval_steps, guidance=c.guidance,
                          image_size=c.image_size)
        done["images"], done["per_prompt"] = result.pop("images"), result.pop("per_prompt")
        return result

    def export(m: nn.Module, where: Path) -> None:
        save_pipeline(make_pipeline(m, vae, tower, c.objective), where, c.objective)
        if "images" in done:  # the last evaluation's pictures and per-prompt judgements, beside the run's results
            sample_sheet(done["images"]).save(Path(where).parent / "samples.png")
            (Path(where).parent / "per_prompt.json").write_text(dump_json(done["per_prompt"], indent=2))

    return Task(unet, denoising_loss(c.objective, c.caption_dropout, len(distinct)), data, evaluate=run_evaluation,
                export=export)


def build_ldm_shapes(c: LdmShapesConfig, world: World) -> Task:
    if c.stage == "vae":
        return build_vae_stage(c, world)
    if c.stage == "denoiser":
        return build_denoiser_stage(c, world)
    raise ConfigError("build_ldm_shapes builds one stage (stage=vae or denoiser); `plan` runs `stages`")


# --------------------------------------------------------------------------------------------- evaluation


def prompts() -> list[tuple[str, str, str, bool]]:
    """(prompt, color, shape, seen) for every classic color-shape combination, in the captions' wording."""
    from polymodal.data.shapes import COLORS, HELD_OUT, SHAPES

    return [(f"a {c} {s}", c, s, (c, s) not in HELD_OUT) for c in COLORS for s in SHAPES]


class ShapesJudge:
    """The clip-shapes CLIP as a zero-shot judge of images: its best of the 30 captions "a {color} {shape}" (that
    recipe's own zero-shot evaluation) gives the color and the shape it sees."""

    def __init__(self, clip):
        from polymodal.processing import CLIPTokenizer, ImageProcessor

        self.clip = clip.eval()
        self.labels = [(c, s) for _, c, s, _ in prompts()]
        self.proc = ImageProcessor.clip(size=clip.config.vision.image_size)
        ids, mask = CLIPTokenizer.default()([f"a {c} {s}" for c, s in self.labels],
                                            context_length=clip.config.text.max_position_embeddings)
        with torch.no_grad():
            self.text = F.normalize(clip.encode_text(ids, attention_mask=mask), dim=-1)  # (30, P)

    @torch.no_grad()
    def features(self, images: list) -> Tensor:
        """PIL images -> unnormalized CLIP image embeddings (N, P)."""
        return torch.cat([self.clip.encode_image(self.proc(images[i: i + 256])) for i in range(0, len(images), 256)])

    def classify(self, features: Tensor) -> list[tuple[str, str]]:
        return [self.labels[k] for k in (F.normalize(features, dim=-1) @ self.text.T).argmax(1).tolist()]


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets (N, D)
    (Heusel et al. 2017's FID formula; here over whatever features are given). Tr (S_a S_b)^(1/2) is computed as the
    sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), symmetric and PSD, in float64."""
    a, b = a.double(), b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance takes two (N >= 2, D) feature sets of one width, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def accuracy(judged: list[tuple[str, str]], wanted: list[tuple[str, str, bool]]) -> dict:
    """Color, shape and both right, over seen and never-seen prompts; wanted: (color, shape, seen) per image."""
    out = {}
    for key, keep in (("seen", True), ("never_seen", False)):
        pairs = [(j, w) for j, w in zip(judged, wanted) if w[2] == keep]
        n = max(1, len(pairs))
        out[key] = {"color": sum(j[0] == w[0] for j, w in pairs) / n, "shape": sum(j[1] == w[1] for j, w in pairs) / n,
                    "both": sum(j == w[:2] for j, w in pairs) / n, "images": len(pairs)}
    return out


def real_images(image_size: int, per_prompt: int, seed: int) -> list:
    """per_prompt real ShapesWorld images of each prompt's combination, in prompts() order (drawn from the "all"
    split with its own seed: none of them is a training image)."""
    from polymodal.data import ShapesWorld

    world = ShapesWorld(image_size, seed=seed, split="all")
    found: dict[tuple[str, str], list] = {(c, s): [] for _, c, s, _ in prompts()}
    i = 0
    while any(len(v) < per_prompt for v in found.values()):
        s = world.sample(i)
        if len(found[(s.color, s.shape)]) < per_prompt:
            found[(s.color, s.shape)].append(s.image)
        i += 1
    return [im for _, c, s, _ in prompts() for im in found[(c, s)]]


@torch.no_grad()
def evaluate(pipe, clip, *, per_prompt: int = 8, steps: int = 20, guidance: float = 5.0, image_size: int = 32,
             seed: int = 0) -> dict:
    """Do the images follow the prompt? `per_prompt` images for each of the 30 prompts "a {color} {shape}" (24 seen in
    training, 6 never seen), with classifier-free guidance `guidance`, judged zero-shot by the clip-shapes CLIP
    (`ShapesJudge`), against three references judged the same way: unconditional samples (prompt "", no guidance)
    scored against the prompt of their slot (the floor), real ShapesWorld images of each combination and their
    VAE reconstructions (the judge's and the VAE's ceilings). `fd_*`: Frechet distances between CLIP image-embedding
    Gaussians (16-d, unnormalized `encode_image`) of 30 x per_prompt images against as many real ones of the same
    prompts; `fd_real_vs_real` is two disjoint real sets (the measure's own noise at this N).

    -> {"generated", "unconditional", "real", "reconstructed": {"seen"|"never_seen": {"color", "shape", "both"}},
    "fd_*", "per_prompt": [{"prompt", "seen", "color", "shape", "both", "judged"}], "images": {"generated",
    "unconditional": lists of PIL images in prompts() order, per_prompt per prompt}, "seconds"}."""
    t0 = time.perf_counter()
    judge = ShapesJudge(clip)
    table = prompts()
    wanted = [(c, s, seen) for _, c, s, seen in table for _ in range(per_prompt)]
    texts = [p for p, _, _, _ in table]
    generated = pipe(texts, num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="pil",
                     num_images_per_prompt=per_prompt, height=image_size, width=image_size)
    unconditional = pipe([""] * len(texts), num_inference_steps=steps, guidance_scale=1.0, seed=seed + 1,
                         output_type="pil", num_images_per_prompt=per_prompt, height=image_size, width=image_size)
    real, other = real_images(image_size, per_prompt, seed=3), real_images(image_size, per_prompt, seed=4)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in real])).permute(0, 3, 1, 2)
    vae = pipe.vae
    rec = ((vae.decode(vae.encode(to_unit(x))).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    from PIL import Image

    reconstructed = [Image.fromarray(a) for a in rec.permute(0, 2, 3, 1).numpy()]
    feats = {name: judge.features(images) for name, images in (("generated", generated), ("unconditional",
             unconditional), ("real", real), ("reconstructed", reconstructed), ("other", other))}
    judged = {name: judge.classify(f) for name, f in feats.items()}
    result = {name: accuracy(judged[name], wanted) for name in ("generated", "unconditional", "real", "reconstructed")}
    per = []
    for k, (prompt, c, s, seen) in enumerate(table):
        got = judged["generated"][k * per_prompt: (k + 1) * per_prompt]
        per.append({"prompt": prompt, "seen": seen, "color": sum(g[0] == c for g in got) / per_prompt,
                    "shape": sum(g[1] == s for g in got) / per_prompt,
                    "both": sum(g == (c, s) for g in got) / per_prompt, "judged": [f"a {g[0]} {g[1]}" for g in got]})
    result.update({
        "fd_generated": frechet_distance(feats["generated"], feats["real"]),
        "fd_unconditional": frechet_distance(feats["unconditional"], feats["real"]),
        "fd_reconstructed": frechet_distance(feats["reconstructed"], feats["real"]),
        "fd_real_vs_real": frechet_distance(feats["other"], feats["real"]),
        "fd_images": len(real), "per_prompt_images": per_prompt, "steps": steps, "guidance": guidance,
        "per_prompt": per, "images": {"generated": generated, "unconditional": unconditional},
        "seconds": round(time.perf_counter() - t0, 1)})
    return result


def sample_sheet(images: dict, per_prompt: int | None = None):
    """One row per prompt: its generated images, then its unconditional ones (a picture for the docs and the demo)."""
    from PIL import Image

    gen, unc = images["generated"], images["unconditional"]
    rows = len(prompts())
    k = per_prompt or len(gen) // rows
    side = gen[0].width
    sheet = Image.new("RGB", ((2 * k + 1) * side, rows * side), (255, 255, 255))
    for r in range(rows):
        for j in range(k):
            sheet.paste(gen[r * k + j], (j * side, r * side))
            sheet.paste(unc[r * k + j], ((k + 1 + j) * side, r * side))
    return sheet


def summary_table(results: dict) -> str:
    """Markdown: color / shape / both accuracy (seen / never-seen) per kind of image."""
    e = results["eval"] if "eval" in results else results
    rows = ["| images | color | shape | both | ", "|---|---|---|---|"]
    names = {"generated": f"generated (guidance {e['guidance']})", "unconditional": "unconditional (the floor)",
             "real": "real ShapesWorld (the judge's ceiling)", "reconstructed": "real through the VAE"}
    for key, name in names.items():
        r = e[key]
        cells = [f"{100 * r['seen'][m]:.1f}% / {100 * r['never_seen'][m]:.1f}%" for m in ("color", "shape", "both")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- the stages


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].strip() not in keys]


def plan(name: str, c: LdmShapesConfig, out: str | Path, overrides: list[str], resume: bool,
         quiet: bool = False) -> dict | None:
    """How `polymodal train ldm-shapes` runs `stages`: the VAE into OUT/vae, the denoiser into OUT/denoiser (its
    pipeline folder OUT/denoiser/model, linked as OUT/model), each an ordinary run of the loop; the CLIP checkpoint
    is settled first (trained when missing) and named in both runs' configs. OUT/results.json holds both stages."""
    from polymodal.train.llava import clip_checkpoint
    from polymodal.train.recipes import run

    if c.stage:
        return None
    out = Path(out)
    base = _without(overrides, "stages", "stage", "vae", "clip")
    t0 = time.perf_counter()
    clip_dir = clip_checkpoint(c)
    results: dict = {"clip_seconds": round(time.perf_counter() - t0, 1)}
    vae_dir = Path(c.vae) if c.vae else out / "vae" / "model"
    if "vae" in c.stages:
        t0 = time.perf_counter()
        stage1 = ["stage=vae", f"max_steps={c.vae_steps}", f"batch_size={c.vae_batch_size}", f"lr={c.vae_lr}",
                  f"save_every={c.vae_steps}", f"clip={clip_dir}"]
        results["vae"] = run(name, out / "vae", [*_without(base, "max_steps", "batch_size", "lr", "save_every"),
                                                 *stage1], resume, quiet)
        results["vae"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if "denoiser" not in c.stages:
            (out / "results.json").write_text(dump_json(results, indent=2))
            return results
    t0 = time.perf_counter()
    results["denoiser"] = run(name, out / "denoiser", [*base, "stage=denoiser", f"vae={vae_dir}", f"clip={clip_dir}"],
                              resume, quiet)
    results["denoiser"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    link = out / "model"
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(Path("denoiser") / "model", target_is_directory=True)
    summary = {**results["denoiser"], "stages": results}
    if "eval" in results["denoiser"]:
        summary["table"], summary["table_file"] = summary_table(results["denoiser"]), "table.md"
        (out / "table.md").write_text(summary["table"] + "\n")
    (out / "results.json").write_text(dump_json(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------- the project's default model


def cached_default(say=None) -> Path:
    """The pipeline folder of `ldm-shapes` at its defaults: `polymodal generate-image`'s model when none is given.
    Trained on first use (the clip-shapes CLIP first when the demo has not cached it), then kept under the polymodal
    cache dir as the demo keeps its CLIP; a killed first run leaves no half-trained cache. `say(message)` hears what
    happens (default: stderr)."""
    from polymodal import __version__
    from polymodal.demo import cache_dir
    from polymodal.train.recipes import cached_run

    say = say or (lambda m: print(m, file=sys.stderr))
    run_dir = cache_dir() / "demo" / f"ldm-shapes-v{__version__}"
    done = ("model/model_index.json",)
    if (run_dir / done[0]).is_file():
        return run_dir / "model"
    say(f"polymodal's default text-to-image model is not trained yet: training it now on first use with "
        f"`polymodal train ldm-shapes` (about 11 minutes on 2 otherwise idle CPU cores), cached in {run_dir}")
    t0 = time.perf_counter()
    cached_run("ldm-shapes", run_dir, done=done)
    say(f"trained in {time.perf_counter() - t0:.0f} s")
    return run_dir / "model"


__all__ = ["LdmShapesConfig", "ShapesJudge", "build_ldm_shapes", "cached_default", "evaluate", "frechet_distance",
           "make_pipeline", "plan", "save_pipeline", "summary_table"]
