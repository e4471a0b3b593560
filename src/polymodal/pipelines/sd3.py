"""Text-to-image with Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"): the Stable Diffusion pipeline's loop (`polymodal.pipelines.diffusion`) over the
MM-DiT (`polymodal.models.sd3_transformer`), three text encoders and rectified-flow Euler steps.

    prompt -> CLIP-L and CLIP-G (CLIPTextModelWithProjection): penultimate hidden states (B, 77, 768 | 1280)
              and projected pooled outputs (B, 768 | 1280)
           -> T5-XXL encoder (optional): last hidden state (B, 256, 4096); zeros when the folder has none
      context = [pad_to_4096([CLIP-L; CLIP-G] features) ; T5 tokens]          (B, 77 + 256, 4096), tokens joined
      pooled  = [CLIP-L pooled ; CLIP-G pooled]                                (B, 2048)
    x_1 ~ N(0, I)                                                              (B, 16, H/8, W/8)
    for sigma_i of the shifted schedule: v = MM-DiT(x, context, pooled, 1000 sigma_i), guided
        x = x + (sigma_{i+1} - sigma_i) v                                      schedulers.flow_match_step
    image = VAE.decode(x / scaling_factor + shift_factor)

What diffusers' StableDiffusion3Pipeline computes for the same components, prompt and latents
(tests/test_sd3.py). Not built: prompt_2 / prompt_3 (each encoder reads the prompt), clip_skip, skip-layer
guidance, IP-adapters, dynamic shifting (SD3.5 large turbo files do not use it), img2img / inpainting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal import schedulers as S
from polymodal.pipelines.diffusion import StableDiffusionPipeline, TextTower, clip_tower
from polymodal.processing.text import TextTokenizer
from polymodal.weights.checkpoint import CheckpointError

logger = logging.getLogger("polymodal.pipelines.diffusion")  # the Stable Diffusion pipelines' one logger


@dataclass
class T5Tower:
    """SD3's third text encoder: T5's tokenizer and its encoder (`polymodal.models.t5.T5`, encoder only)."""

    tokenizer: TextTokenizer
    encoder: torch.nn.Module

    def encode(self, texts: list[str], length: int, *, warn: bool) -> Tensor:
        """-> the encoder's last hidden state (B, length, D) for the texts padded (right) or cut to `length` tokens,
        end-of-text kept last as transformers' truncation keeps it; no attention mask, as diffusers runs it."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = []
        for text in texts:
            body, full = tok.encode(text, add_special_tokens=False), tok.encode(text)
            start = next((p for p in range(len(full) - len(body) + 1) if full[p : p + len(body)] == body), 0)
            prefix, suffix = full[:start], full[start + len(body):]
            if len(full) > length:
                keep = max(length - len(prefix) - len(suffix), 0)
                if warn:
                    logger.warning("The following part of your input was truncated because `max_sequence_length` is "
                                   "set to %d tokens: %s", length, tok.decode(body[keep:]))
                full = (prefix + body[:keep] + suffix)[:length]
            rows.append(full + [pad] * (length - len(full)))
        device = next(self.encoder.parameters()).device
        return self.encoder.encode(torch.tensor(rows, dtype=torch.long, device=device))


class StableDiffusion3Pipeline(StableDiffusionPipeline):
    """SD3 / SD3.5 text-to-image: `pipe(prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=None,
    latents=None, seed=None, output_type="pil", *, height, width, num_images_per_prompt=1, generator=None)` as the
    Stable Diffusion pipeline's call (guidance 7.0 by default, diffusers' SD3 value; sides multiples of the VAE
    factor times the patch size). `max_sequence_length` (256, at most 512) is the T5 token count."""

    default_guidance_scale = 7.0  # diffusers' StableDiffusion3Pipeline default
    legacy_fixes = False
    edits = False  # SD3's img2img / inpainting pipelines are not built
    max_sequence_length = 256

    def __init__(self, transformer, vae, towers: list[TextTower], t5: T5Tower | None, scheduler_config: dict,
                 method: S.Method):
        self.transformer, self.t5 = transformer, t5
        super().__init__(None, vae, towers, scheduler_config, method)

    def schedule(self, method: S.Method) -> S.NoiseSchedule:
        if method != "flow_match_euler":
            raise ValueError(f"SD3 is a rectified-flow model: it samples with 'flow_match_euler' only, not {method!r}")
        return S.from_diffusers(self.scheduler_config, method)[1]

    def _check_components(self) -> None:
        c = self.transformer.config
        if len(self.towers) != 2 or not all(t.projected for t in self.towers):
            raise ValueError("an SD3 pipeline needs two projected CLIP text encoders (CLIPTextModelWithProjection)")
        pooled = sum(t.encoder.config.projection_dim for t in self.towers)
        if pooled != c.pooled_projection_dim:
            raise ValueError(f"the CLIP encoders give {pooled} pooled features; the MM-DiT takes "
                             f"{c.pooled_projection_dim}")
        if self.t5 is not None and self.t5.encoder.config.d_model != c.joint_attention_dim:
            raise ValueError(f"the T5 encoder gives {self.t5.encoder.config.d_model} features per token; the MM-DiT "
                             f"takes {c.joint_attention_dim}")
        if self.vae.config.latent_channels != c.in_channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels; the MM-DiT takes "
                             f"{c.in_channels}")

    # --------------------------------------------------------------------------------------------- the prompt

    def embed(self, texts: list[str], *, warn: bool = True) -> tuple[Tensor, Tensor]:
        """-> (context (B, 77 + max_sequence_length, joint_attention_dim), pooled (B, pooled_projection_dim)),
        diffusers' `encode_prompt` for one list of texts."""
        n = self.max_sequence_length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512], got {n!r}")
        outs = [t.encode(texts, warn=warn) for t in self.towers]
        clip = torch.cat([o[1] for o in outs], dim=-1)  # penultimate layers (B, 77, 768 + 1280)
        pooled = torch.cat([o[2] for o in outs], dim=-1)  # projected pooled outputs (B, 768 + 1280)
        if self.t5 is None:  # as diffusers: zeros in place of T5's tokens
            t5 = clip.new_zeros(len(texts), n, self.transformer.config.joint_attention_dim)
        else:
            t5 = self.t5.encode(texts, n, warn=warn).to(clip.device, clip.dtype)  # (B, n, 4096)
        # zero-padded to T5's width (diffusers' F.pad, which also cuts when the CLIP features are the wider)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=1), pooled

    def encode_prompt(self, prompts, negatives, guided):
        context, pooled = self.embed(prompts)
        if guided:
            neg_context, neg_pooled = self.embed(negatives or [""] * len(prompts), warn=False)
            context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
        return context, {"pooled_projections": pooled}

    def _edit_inputs(self, image, mask_image, strength, *rest):
        if image is not None or mask_image is not None or strength is not None:
            raise ValueError("img2img and inpainting (image=, mask_image=, strength=) are built for SD 1.x/2.x only, "
                             "not for SD3")
        return None

    # -------------------------------------------------------------------------------------- the denoiser

    def predict(self, x, t, context, added):
        return self.transformer(x, context, added["pooled_projections"].to(context.device, context.dtype), t)

    def _placement(self):
        return self.transformer.device, self.transformer.dtype

    @property
    def sample_size(self):
        return self.transformer.config.sample_size

    @property
    def size_multiple(self):
        f, p = self.vae.config.downscale, self.transformer.config.patch_size
        return f * p, f"the VAE's downscale factor {f} x the MM-DiT's patch size {p}"

    def __repr__(self) -> str:
        c = self.transformer.config
        return (f"{type(self).__name__}(transformer={c.num_layers} blocks x {c.dim}, T5={self.t5 is not None}, "
                f"scheduler={self.method!r})")


def _present(index: dict, d: Path, part: str) -> bool:
    return isinstance(index.get(part), list) and bool(index[part]) and index[part][0] is not None and (
        d / part).is_dir()


def load_sd3_pipeline(d: Path, index: dict, dtype=None, device=None, *, scheduler: S.Method | None = None
                      ) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline folder -> the pipeline, each component loaded strictly; `text_encoder_3` /
    `tokenizer_3` may be absent (null in model_index.json), as diffusers allows."""
    from polymodal.models.sd3_transformer import SD3Transformer2DModel
    from polymodal.weights.checkpoint import read_json
    from polymodal.weights.loader import load

    for part in ("transformer", "vae", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        if not _present(index, d, part):
            raise CheckpointError(d, f"the StableDiffusion3Pipeline folder has no {part}/ component")
    transformer = load(d / "transformer", dtype, device)
    if not isinstance(transformer, SD3Transformer2DModel):
        raise CheckpointError(d / "transformer", f"expected an SD3Transformer2DModel, found "
                                                 f"{type(transformer).__name__}")
    vae = load(d / "vae", dtype, device)
    towers = [clip_tower(d, suffix, dtype, device) for suffix in ("", "_2")]
    t5 = None
    if _present(index, d, "text_encoder_3"):
        if not _present(index, d, "tokenizer_3"):
            raise CheckpointError(d, "the folder has text_encoder_3/ but no tokenizer_3/")
        t5 = T5Tower(TextTokenizer.from_pretrained(d / "tokenizer_3"), load(d / "text_encoder_3", dtype, device))
    for part in ("image_encoder", "feature_extractor"):
        if _present(index, d, part):
            logger.warning("%s: %s/ (IP-adapter) is not built in polymodal and is not loaded", d, part)
    sched_file = d / "scheduler" / "scheduler_config.json"
    raw = read_json(sched_file)
    try:
        method = S.from_diffusers(raw, scheduler)[0]
    except ValueError as e:
        raise CheckpointError(sched_file, str(e)) from None
    try:
        return StableDiffusion3Pipeline(transformer, vae, towers, t5, raw, method)
    except ValueError as e:
        raise CheckpointError(d, str(e)) from None


__all__ = ["StableDiffusion3Pipeline", "T5Tower", "load_sd3_pipeline"]
