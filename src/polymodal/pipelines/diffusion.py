"""Text-to-image with Stable Diffusion 1.x/2.x and SDXL: a diffusers pipeline folder (model_index.json) composed from
polymodal's components, with the denoising loop written out once (STYLE.md, point 13).

    prompt -> CLIP tokenizer(s) -> text encoder(s) -> context (B, 77, Dc) [+ pooled text, size ids: SDXL]
    x_T ~ N(0, sigma_0^2)                                       (B, 4, H/8, W/8), from `seed` or given `latents`
    for each step i of the sampler's plan:                      schedulers.make_plan / schedulers.step
        eps_u, eps_c = unet([x, x], t_i, [negative, prompt])    classifier-free guidance (Ho & Salimans 2022):
        x = step(x, eps_u + s (eps_c - eps_u))                  eps = eps_u + s (eps_c - eps_u)
    image = VAE.decode(x / scaling_factor)                      -> [0, 1] (B, H, W, 3) or PIL images

`pm.load(dir)` on such a folder reads each component through the one strict loader (`unet/`, `vae/`,
`text_encoder[_2]/` as polymodal families, `tokenizer[_2]/` with the shared `CLIPTokenizer`) and the sampler from
`scheduler/scheduler_config.json` (`schedulers.from_diffusers`); `pipe(prompt, ...)` returns what diffusers'
`StableDiffusionPipeline` / `StableDiffusionXLPipeline(...).images` holds for the same components, prompt and
latents (tests/test_sd_pipeline.py). SD3 (`polymodal.pipelines.sd3`) runs this call and loop over its MM-DiT
through the denoiser seams (`predict`, `_placement`, `sample_size`, `size_multiple`). Not built: the safety
checker (a folder's `safety_checker` is not loaded and images are not filtered), SDXL's invisible watermark, img2img,
inpainting and the refiner's pipeline.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal import schedulers as S
from polymodal.nn.diffusion import gaussian_noise
from polymodal.processing.tokenizer import CLIPTokenizer
from polymodal.weights.checkpoint import CheckpointError, read_json

logger = logging.getLogger(__name__)

OutputType = Literal["pil", "np", "pt", "latent"]


@dataclass
class TextTower:
    """One tokenizer and its text encoder (`polymodal.models.clip_text.CLIPTextEncoder`)."""

    tokenizer: CLIPTokenizer
    encoder: torch.nn.Module
    max_length: int = 77  # tokenizer_config.json's model_max_length

    def encode(self, texts: list[str], *, warn: bool) -> tuple[Tensor, Tensor, Tensor]:
        """-> the encoder's (last_hidden_state, penultimate, pooled) for texts padded/truncated to max_length.
        A text too long is cut, <|endoftext|> kept last, with a warning naming the cut part (as diffusers)."""
        if warn:
            for text in texts:
                body = self.tokenizer.encode(text)
                if len(body) + 2 > self.max_length:
                    cut = self.tokenizer.decode(body[self.max_length - 2:])
                    logger.warning("The following part of your input was truncated because CLIP can only handle "
                                   "sequences up to %d tokens: %s", self.max_length, cut)
        ids, _ = self.tokenizer(texts, context_length=self.max_length, padding="max_length", truncate=True)
        device = next(self.encoder.parameters()).device
        # no attention mask: SD's text encoders were trained on padded rows seen through the causal mask only
        return self.encoder(ids.to(device))

    @property
    def projected(self) -> bool:
        return self.encoder.config.projection_dim is not None


class StableDiffusionPipeline:
    """Text-to-image with one CLIP text encoder (SD 1.x/2.x): the U-Net reads its last hidden state."""

    default_guidance_scale = 7.5  # diffusers' default for this pipeline
    legacy_fixes = True  # see `schedule`
    edits = True  # img2img and inpainting (see __call__)

    def __init__(self, unet, vae, towers: list[TextTower], scheduler_config: dict, method: S.Method, *,
                 force_zeros_for_empty_prompt: bool = False):
        self.unet, self.vae, self.towers = unet, vae, towers
        self.scheduler_config, self.method = dict(scheduler_config), method
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.schedule(method)  # a config this pipeline cannot sample is refused now
        self._check_components()

    def schedule(self, method: S.Method) -> S.NoiseSchedule:
        """The folder's noise schedule for a sampler (fields the file leaves out: that sampler's defaults, as
        diffusers' `Scheduler.from_config(pipe.scheduler.config)`). diffusers' StableDiffusionPipeline rewrites
        two legacy values of any scheduler it is given, steps_offset -> 1 and clip_sample -> False; so does this."""
        schedule = S.from_diffusers(self.scheduler_config, method)[1]
        return replace(schedule, steps_offset=1, clip_sample=False) if self.legacy_fixes else schedule

    def _check_components(self) -> None:
        width = sum(t.encoder.config.text.hidden_size for t in self.towers)
        if width != self.unet.config.cross_attention_dim:
            raise ValueError(f"the text encoders give {width} features per token; the U-Net attends to "
                             f"{self.unet.config.cross_attention_dim}")
        if self.unet.add_embedding is not None:
            raise ValueError("this U-Net takes SDXL's added conditioning; load it with StableDiffusionXLPipeline")

    # ------------------------------------------------------------------------------------------- the prompt

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, guided: bool
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (context (B or 2B, 77, Dc), the U-Net's added keywords), negatives first when guided."""
        tower = self.towers[0]
        context = tower.encode(prompts, warn=True)[0]  # last_hidden_state (B, 77, D)
        if guided:
            negative = tower.encode(negatives or [""] * len(prompts), warn=False)[0]
            context = torch.cat([negative, context])
        return context, {}

    # --------------------------------------------------------------------------------------------- the call

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        latents: Tensor | None = None,
        seed: int | None = None,
        output_type: OutputType = "pil",
        *,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        scheduler: S.Method | None = None,
        guidance_rescale: float = 0.0,
        generator: torch.Generator | None = None,
        image=None,
        mask_image=None,
        strength: float | None = None,
        callback: Callable[[int, int], None] | None = None,
    ):
        """Images for `prompt` (a list of PIL images, or (B, H, W, 3) floats in [0, 1] for "np"; "pt": (B, 3, H, W);
        "latent": the final latents). guidance_scale: None takes diffusers' default (7.5 SD, 5.0 SDXL); <= 1 runs
        without classifier-free guidance. seed draws the initial latents (and a stochastic sampler's noise) from
        torch.Generator().manual_seed(seed), as diffusers draws them from such a generator; `latents` gives them.
        scheduler: a sampler of `polymodal.schedulers.METHODS` on the folder's noise schedule.

        SD 1.x/2.x also edit images (PIL images or (B, 3, H, W) tensors in [0, 1]): `image` alone is img2img
        (diffusers' StableDiffusionImg2ImgPipeline; the size is the image's, `strength` 0.8 by default: the run
        starts that far into the noise), `image` and `mask_image` (white = repaint) inpainting
        (StableDiffusionInpaintPipeline; the size is height/width as for text-to-image, `strength` 1.0 by default),
        with an inpainting U-Net (9 input channels: latents, mask, masked image latents) or a plain one (the
        unmasked part is put back, re-noised, after every step).

        callback(done, total) is called after each denoising step (done = 1 .. total, the steps this run takes): a
        progress bar's hook; an exception it raises stops the run there (a server's cancellation)."""
        prompts, negatives = _texts(prompt, "prompt"), None
        if negative_prompt is not None:
            negatives = _texts(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} texts for {len(prompts)} prompts")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or (
                num_images_per_prompt < 1):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        method = scheduler or self.method
        if method not in S.METHODS:
            raise ValueError(f"unknown scheduler {method!r}; known: {sorted(S.METHODS)}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        batch = len(prompts) * num_images_per_prompt
        edit = self._edit_inputs(image, mask_image, strength, num_inference_steps, height, width, latents, batch)
        H, W = (edit.pixels.shape[-2], edit.pixels.shape[-1]) if edit else self._size(height, width)
        f = self.vae.config.downscale
        shape = (batch, self.vae.config.latent_channels, H // f, W // f)
        if latents is not None and (not isinstance(latents, Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {shape} for {batch} images of {H}x{W}, got {got}")
        plan = S.make_plan(method, self.schedule(method), num_inference_steps)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)

        with torch.inference_mode():
            guided = guidance_scale > 1
            context, added = self.encode_prompt(prompts, negatives, guided)
            context, added = _repeat(context, added, num_images_per_prompt, guided)
            added.update(self.added_conditioning(H, W, context, batch * (2 if guided else 1)))
            device, dtype = self._placement()
            context = context.to(device, dtype)
            start, clean, noise, mask, extra = 0, None, None, None, None
            if edit is None:
                if latents is None:
                    latents = gaussian_noise(shape, generator=generator, device=device, dtype=dtype)
                x = latents.to(device, dtype) * plan.init_noise_sigma
            else:
                start = edit.start
                pixels = edit.pixels.to(device, dtype)  # (N, 3, H, W) in [-1, 1]
                full = edit.mask is not None and edit.strength == 1.0
                if edit.mask is None or self.unet.config.in_channels == 4 or not full:
                    clean = _tile(self._encode(pixels, generator), batch)  # (B, 4, h, w), the VAE's sample
                noise = gaussian_noise(shape, generator=generator, device=device, dtype=dtype)
                # inpainting at full strength starts from pure noise, as text-to-image does
                x = noise * plan.init_noise_sigma if full else S.add_noise(plan, start, clean, noise)
                if edit.mask is not None:
                    # the mask at latent resolution (nearest) and the latents of the image with the hole cut out
                    masked = pixels * (edit.mask.to(device) < 0.5)
                    mask = _tile(F.interpolate(edit.mask.to(device, dtype), size=shape[-2:]), batch)  # (B, 1, h, w)
                    masked = _tile(self._encode(masked, generator), batch)  # drawn for any U-Net, as diffusers
                    if self.unet.config.in_channels == 9:
                        extra = torch.cat([mask, masked], dim=1)  # (B, 1 + 4, h, w)
                        extra = torch.cat([extra, extra]) if guided else extra
            state = None
            for i in range(start, len(plan)):
                inp = plan.scale_model_input(torch.cat([x, x]) if guided else x, i)
                if extra is not None:
                    inp = torch.cat([inp, extra], dim=1)  # (B or 2B, 9, h, w)
                eps = self.predict(inp, plan.timesteps[i], context, added)  # (B or 2B, 4, h, w)
                if guided:
                    uncond, cond = eps.chunk(2)
                    eps = S.classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
                x, state = S.step(plan, i, x, eps, state, generator=generator)
                if mask is not None and extra is None:
                    # a plain U-Net inpaints by putting the known part back, noised to the next step's level
                    known = S.add_noise(plan, i + 1, clean, noise) if i + 1 < len(plan) else clean
                    x = (1 - mask) * known + mask * x
                if callback is not None:
                    callback(i - start + 1, len(plan) - start)
            if output_type == "latent":
                return x
            image = self.vae.decode(self._unscale(x))
        image = (image / 2 + 0.5).clamp(0, 1)  # diffusers' VaeImageProcessor.postprocess: [-1, 1] -> [0, 1]
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        from PIL import Image

        return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]

    def _encode(self, pixels: Tensor, generator) -> Tensor:
        """Images in [-1, 1] -> scaled latents drawn from the VAE's distribution (diffusers' retrieve_latents)."""
        return self.vae.config.scaling_factor * self.vae.encode_distribution(pixels).sample(generator)

    def _edit_inputs(self, image, mask_image, strength, steps, height, width, latents, batch) -> _Edit | None:
        """img2img's or inpainting's inputs checked and preprocessed (None for text-to-image)."""
        if image is None:
            if mask_image is not None:
                raise ValueError("mask_image needs the image it masks (image=...)")
            if strength is not None:
                raise ValueError("strength applies to img2img and inpainting (image=...)")
            if self.unet.config.in_channels != self.vae.config.latent_channels:
                raise ValueError(f"this U-Net takes {self.unet.config.in_channels} input channels (an inpainting "
                                 f"model): pass image= and mask_image=")
            return None
        if not self.edits:
            raise ValueError(f"{type(self).__name__} does not edit images here: img2img and inpainting are built "
                             f"for SD 1.x/2.x")
        if latents is not None:
            raise ValueError("latents come from the image in img2img and inpainting; do not pass both")
        inpaint = mask_image is not None
        strength = (1.0 if inpaint else 0.8) if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        run = min(int(steps * strength), steps)
        if run < 1:
            raise ValueError(f"strength {strength} of {steps} steps leaves no denoising step; raise either")
        c_in = self.unet.config.in_channels
        if inpaint and c_in not in (4, 9):
            raise ValueError(f"inpainting takes a U-Net of 4 or 9 input channels, this one has {c_in}")
        if not inpaint and c_in != self.vae.config.latent_channels:
            raise ValueError(f"this U-Net takes {c_in} input channels (an inpainting model): pass mask_image=")
        f = self.vae.config.downscale
        if inpaint:
            size = self._size(height, width)
        elif height is not None or width is not None:
            raise ValueError("img2img takes its size from the image; resize it instead of passing height/width")
        else:
            size = None
        pixels = _images(image, size, f)  # (N, 3, H, W) in [-1, 1]
        mask = _masks(mask_image, pixels.shape[-2:]) if inpaint else None
        for name, t in (("image", pixels), ("mask_image", mask)):
            if t is not None and batch % t.shape[0]:
                raise ValueError(f"{t.shape[0]} {name}s for {batch} images: give one, or one per prompt")
        return _Edit(pixels, mask, float(strength), steps - run)

    def added_conditioning(self, height: int, width: int, context: Tensor, rows: int) -> dict[str, Tensor]:
        """The U-Net's keywords besides the text (none for SD 1.x/2.x)."""
        return {}

    # the denoiser's seams: a pipeline over another denoiser (SD3's MM-DiT) overrides these four
    def predict(self, x: Tensor, t: Tensor, context: Tensor, added: dict[str, Tensor]) -> Tensor:
        """The denoiser's output for latents x (B, c, h, w) at timestep t, given the text and added keywords."""
        return self.unet(x, t, context, **added)

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        return self.unet.conv_in.weight.device, self.unet.dtype

    @property
    def sample_size(self):
        """The denoiser's latent side at training (diffusers' default size is it times the VAE factor)."""
        return self.unet.config.sample_size

    @property
    def size_multiple(self) -> tuple[int, str]:
        """What height and width must be multiples of, and why."""
        return self.vae.config.downscale, "the VAE's downscale factor"

    def _size(self, height, width) -> tuple[int, int]:
        side = self.sample_size
        default = (side, side) if isinstance(side, int) else tuple(side or (64, 64))
        f = self.vae.config.downscale
        m, why = self.size_multiple
        out = []
        for name, value, fallback in (("height", height, default[0]), ("width", width, default[-1])):
            value = fallback * f if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} ({why}), got {value!r}")
            out.append(value)
        return out[0], out[1]

    def _unscale(self, x: Tensor) -> Tensor:
        """The U-Net's latents -> the VAE's: with latents_mean / latents_std (some SDXL VAEs) x std / s + mean, else
        x / s (+ shift_factor)."""
        c = self.vae.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean = torch.tensor(c.latents_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(c.latents_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            return x * std / c.scaling_factor + mean
        return self.vae.unscale_latents(x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(unet={self.unet.config.block_out_channels}, text encoders="
                f"{len(self.towers)}, scheduler={self.method!r})")


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base: two text encoders whose penultimate hidden states are concatenated (768 + 1280 = 2048), the
    second's projected pooled output and the size/crop ids as the U-Net's added conditioning (Podell et al. 2023,
    sec. 2.2: original size, crop top-left (0, 0), target size = the output size)."""

    default_guidance_scale = 5.0
    legacy_fixes = False
    edits = False  # SDXL's img2img / inpainting (aesthetic score, denoising_start) are not built

    def _check_components(self) -> None:
        width = sum(t.encoder.config.text.hidden_size for t in self.towers)
        c = self.unet.config
        if width != c.cross_attention_dim:
            raise ValueError(f"the text encoders give {width} features per token; the U-Net attends to "
                             f"{c.cross_attention_dim}")
        if self.unet.add_embedding is None or not self.towers[-1].projected:
            raise ValueError("an SDXL pipeline needs a U-Net with addition_embed_type 'text_time' and a projected "
                             "last text encoder (CLIPTextModelWithProjection)")
        added = self.towers[-1].encoder.config.projection_dim + 6 * c.addition_time_embed_dim
        if added != c.projection_class_embeddings_input_dim:
            raise ValueError(f"the pooled text and 6 size/crop ids give {added} added features; the U-Net takes "
                             f"{c.projection_class_embeddings_input_dim} (a refiner's 5 ids: its img2img "
                             f"pipeline is not built)")

    def encode_prompt(self, prompts, negatives, guided):
        outs = [t.encode(prompts, warn=True) for t in self.towers]
        context = torch.cat([o[1] for o in outs], dim=-1)  # penultimate layers, (B, 77, 768 + 1280)
        # the pooled text of the first projected encoder (diffusers keeps the first 2-D output[0])
        pooled = next(o[2] for o, t in zip(outs, self.towers) if t.projected)
        if guided:
            if negatives is None and self.force_zeros_for_empty_prompt:
                neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                neg = [t.encode(negatives or [""] * len(prompts), warn=False) for t in self.towers]
                neg_context = torch.cat([o[1] for o in neg], dim=-1)
                neg_pooled = next(o[2] for o, t in zip(neg, self.towers) if t.projected)
            context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
        return context, {"text_embeds": pooled}

    def added_conditioning(self, height, width, context, rows):
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=context.dtype, device=context.device)
        return {"time_ids": ids.expand(rows, -1)}


@dataclass
class _Edit:
    pixels: Tensor  # (N, 3, H, W) in [-1, 1]
    mask: Tensor | None  # (N, 1, H, W) of 0 / 1 (1 = repaint)
    strength: float
    start: int  # the plan's first step


def _tile(t: Tensor, batch: int) -> Tensor:
    """N rows -> batch rows, repeating the whole stack (diffusers' torch.cat([t] * (batch // N)))."""
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list of images")
        return list(value)
    return [value]


def _images(image, size: tuple[int, int] | None, f: int) -> Tensor:
    """PIL images (resized with Lanczos to `size`, or the first one's size rounded down to a multiple of f) or
    tensors (3, H, W) / (N, 3, H, W) in [0, 1] -> (N, 3, H, W) in [-1, 1] (diffusers' VaeImageProcessor)."""
    from PIL import Image

    items = _as_list(image)
    if all(isinstance(i, Image.Image) for i in items):
        first = items[0]
        w, h = (size[1], size[0]) if size else (first.width - first.width % f, first.height - first.height % f)
        if w <= 0 or h <= 0:
            raise ValueError(f"the image ({first.width}x{first.height}) is smaller than the VAE factor {f}")
        arrays = [np.asarray(i.convert("RGB").resize((w, h), Image.LANCZOS), dtype=np.float32) / 255.0
                  for i in items]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W)
    if all(isinstance(i, Tensor) for i in items):
        t = torch.cat([i if i.ndim == 4 else i[None] for i in items]) if all(i.ndim in (3, 4) for i in items) else None
        if t is None or t.shape[1] != 3 or not t.is_floating_point():
            raise ValueError("image tensors must be floating (3, H, W) or (N, 3, H, W)")
        H, W = t.shape[-2:]
        if (size is not None and (H, W) != tuple(size)) or H % f or W % f or H == 0 or W == 0:
            want = f"{size[0]}x{size[1]}" if size is not None else f"positive multiples of {f}"
            raise ValueError(f"the image tensor is {H}x{W}; expected {want} (resize it first)")
        if t.min() < 0 or t.max() > 1:
            raise ValueError("image tensors must hold values in [0, 1]")
        return t.float() * 2 - 1
    raise ValueError("image must be a PIL image, a tensor in [0, 1] or a list of either")


def _masks(mask_image, size) -> Tensor:
    """PIL images (resized to `size`, then grayscale) or tensors (H, W) / (N, 1, H, W) in [0, 1] -> (N, 1, H, W)
    binarized at 0.5 (1 = repaint), as diffusers' mask processor."""
    from PIL import Image

    items = _as_list(mask_image)
    H, W = int(size[0]), int(size[1])
    if all(isinstance(i, Image.Image) for i in items):
        arrays = [np.asarray(i.resize((W, H), Image.LANCZOS).convert("L"), dtype=np.float32) / 255.0 for i in items]
        m = torch.from_numpy(np.stack(arrays))[:, None]
    elif all(isinstance(i, Tensor) for i in items):
        parts = [i.reshape(-1, 1, *i.shape[-2:]) if i.ndim in (2, 3, 4) else None for i in items]
        if any(p is None for p in parts) or any(p.shape[-2:] != (H, W) for p in parts):
            raise ValueError(f"mask tensors must be (H, W), (1, H, W) or (N, 1, H, W) of the image's {H}x{W}")
        m = torch.cat(parts).float()
        if m.min() < 0 or m.max() > 1:
            raise ValueError("mask tensors must hold values in [0, 1]")
    else:
        raise ValueError("mask_image must be a PIL image, a tensor in [0, 1] or a list of either")
    return (m >= 0.5).float()


def _repeat(context: Tensor, added: dict[str, Tensor], n: int, guided: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Each prompt's conditioning n times in a row (diffusers' num_images_per_prompt), per half when guided."""
    if n == 1:
        return context, added

    def rep(t: Tensor) -> Tensor:
        halves = t.chunk(2) if guided else (t,)
        return torch.cat([h.repeat_interleave(n, dim=0) for h in halves])

    return rep(context), {k: rep(v) for k, v in added.items()}


def _texts(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")
    return list(items)


# ------------------------------------------------------------------------------------------------------ loading

# img2img and inpainting folders hold SD's components (an inpainting U-Net takes 9 channels); one pipeline serves all
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline,
             "StableDiffusionImg2ImgPipeline": StableDiffusionPipeline,
             "StableDiffusionInpaintPipeline": StableDiffusionPipeline,
             "StableDiffusionXLPipeline": StableDiffusionXLPipeline}


def clip_tower(d: Path, suffix: str, dtype, device) -> TextTower:
    """A folder's `tokenizer{suffix}/` and `text_encoder{suffix}/`, the encoder loaded strictly."""
    from polymodal.weights.loader import load

    tok_dir = d / f"tokenizer{suffix}"
    config = read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").exists() else {}
    length = config.get("model_max_length", 77)
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= 77:
        length = 77  # transformers writes a huge sentinel when the file leaves it open; CLIP holds 77
    return TextTower(CLIPTokenizer.from_pretrained(tok_dir), load(d / f"text_encoder{suffix}", dtype, device), length)


def load_pipeline(directory: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, *, scheduler: S.Method | None = None
                  ) -> StableDiffusionPipeline:
    """A diffusers pipeline folder -> its pipeline, each component loaded strictly (see the module docstring).
    scheduler: sample with this method instead of the folder's (where that is not built, DDIM is taken, with a
    warning)."""
    from polymodal.weights.loader import load

    d = Path(directory)
    index = read_json(d / "model_index.json")
    name = index.get("_class_name")
    if name == "StableDiffusion3Pipeline":  # an MM-DiT and three text encoders: see polymodal.pipelines.sd3
        from polymodal.pipelines.sd3 import load_sd3_pipeline

        return load_sd3_pipeline(d, index, dtype, device, scheduler=scheduler)
    if name not in PIPELINES:
        raise CheckpointError(d / "model_index.json", f"diffusers pipeline {name!r} is not built; built: "
                                                      f"{sorted([*PIPELINES, 'StableDiffusion3Pipeline'])}")
    xl = name == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "scheduler", "tokenizer_2" if xl else "tokenizer",
                 "text_encoder_2" if xl else "text_encoder"):
        if not (isinstance(index.get(part), list) and index[part][0] and (d / part).is_dir()):
            raise CheckpointError(d, f"the {name} folder has no {part}/ component")
    unet, vae = load(d / "unet", dtype, device), load(d / "vae", dtype, device)
    towers = []
    for suffix in ("", "_2") if xl else ("",):
        if not (isinstance(index.get(f"text_encoder{suffix}"), list) and index[f"text_encoder{suffix}"][0]):
            continue  # an SDXL folder may hold only the second encoder (the refiner's layout)
        towers.append(clip_tower(d, suffix, dtype, device))
    sched_file = d / "scheduler" / "scheduler_config.json"
    raw = read_json(sched_file)
    if scheduler is None and raw.get("_class_name") == "PNDMScheduler" and raw.get("skip_prk_steps"):
        scheduler = "pndm"  # PLMS alone: what SD 1.5's PNDMScheduler file runs (from_diffusers wants it by name)
    try:
        method = S.from_diffusers(raw, scheduler)[0]
    except ValueError as e:
        if scheduler is not None:
            raise CheckpointError(sched_file, str(e)) from None
        # a sampler schedulers.py does not build (Heun, UniPC, PNDM's Runge-Kutta warm-up, ...): DDIM samples the
        # same noise schedule deterministically; images differ from diffusers' runs with the folder's sampler
        logger.warning("%s: %s; sampling its noise schedule with DDIM (pipe(..., scheduler=...) picks another of "
                       "%s)", sched_file, e, sorted(S.METHODS))
        method = "ddim"
        try:
            S.from_diffusers(raw, method)
        except ValueError as e2:
            raise CheckpointError(sched_file, str(e2)) from None
    if index.get("safety_checker", [None])[0] is not None:
        logger.warning("%s: the safety checker is not built in polymodal; images are not filtered", d)
    try:
        return PIPELINES[name](unet, vae, towers, raw, method,
                               force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", xl)))
    except ValueError as e:
        raise CheckpointError(d, str(e)) from None


__all__ = ["PIPELINES", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "TextTower", "load_pipeline"]
