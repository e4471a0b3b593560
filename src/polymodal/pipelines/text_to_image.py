"""The `text-to-image` and `image-to-image` tasks: `pm.pipeline("text-to-image", model=DIR)` over the Stable
Diffusion pipelines of `polymodal.pipelines.diffusion` (SD 1.x/2.x, SDXL, SD3), returning PIL images.

    pipe = pm.pipeline("text-to-image", model="./sd-folder")              # a diffusers folder (model_index.json)
    images = pipe("a red bicycle", num_inference_steps=20, seed=3, height=512, width=512)    # [PIL.Image]
    edit = pm.pipeline("image-to-image", model="./sd-folder")             # SD 1.x/2.x: img2img with `strength`
    images = edit(photo, "in the style of a woodcut", strength=0.6, seed=3)

A thin wrapper (STYLE.md, point 13: the loop is written out once, in the diffusion pipeline): it loads the folder,
checks what a caller gives before anything is encoded or denoised, takes the samplers by their short names too
(`dpm++`, `plms`, ...) and hooks a progress bar (tqdm, on stderr) or a callback onto the steps. The CLI's
`polymodal generate-image` and the server's `/v1/images/generations` call it.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from polymodal import schedulers as S

DEFAULT_STEPS = 50  # diffusers' default num_inference_steps
MAX_SIDE = 8192  # pixels per side at most: a typo (100000x100000) is refused instead of allocating its latents
# the samplers' short names as people write them (and A1111-style UIs list them) -> polymodal.schedulers.METHODS
SCHEDULER_ALIASES = {"dpm++": "dpmsolver++", "dpmpp": "dpmsolver++", "dpm-solver++": "dpmsolver++",
                     "euler-a": "euler_ancestral", "euler_a": "euler_ancestral", "plms": "pndm",
                     "flow": "flow_match_euler"}


def resolve_scheduler(name: str | None) -> S.Method | None:
    """A sampler's name or alias -> its method in `polymodal.schedulers.METHODS` (None stays None: the folder's)."""
    if name is None:
        return None
    method = SCHEDULER_ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if method not in S.METHODS:
        known = sorted({*S.METHODS, *SCHEDULER_ALIASES})
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(known)}")
    return method


_CHECKED = ("num_inference_steps", "guidance_scale", "seed", "height", "width", "num_images_per_prompt")


def random_seed() -> int:
    """A seed for a run that was given none, so that the run can be reported and repeated (0 .. 2**31 - 1)."""
    return secrets.randbelow(2**31)


class TextToImagePipeline:
    """`pipe(prompt, negative_prompt=None, *, num_inference_steps=50, guidance_scale=None, seed=None, height=None,
    width=None, num_images_per_prompt=1, scheduler=None, callback=None, progress=None)` -> a list of PIL images
    (num_images_per_prompt per prompt, prompts in order), what diffusers' pipeline `.images` holds for the same
    folder, prompt and seed.

    model: a diffusers pipeline folder (model_index.json), a hub id of one, or a loaded Stable Diffusion pipeline
    (`pm.load(dir)`). scheduler: the sampler every call uses unless it names another (default: the folder's).
    progress: a tqdm bar over the steps on stderr (each call may say otherwise)."""

    task = "text-to-image"

    def __init__(self, model, *, scheduler: str | None = None, progress: bool = False, dtype=None, device=None):
        from polymodal.pipelines.diffusion import StableDiffusionPipeline

        if isinstance(model, (str, os.PathLike)):
            path = Path(model).expanduser()
            if path.is_dir() and not (path / "model_index.json").exists():
                raise ValueError(f"{path} is not a diffusers pipeline folder (it has no model_index.json): the "
                                 f"{self.task} pipeline takes a Stable Diffusion folder")
            from polymodal.weights.loader import load

            model = load(str(path) if path.exists() else model, dtype=dtype, device=device)
        if not isinstance(model, StableDiffusionPipeline):
            raise ValueError(f"the {self.task} pipeline takes a diffusers pipeline folder (model_index.json) or a "
                             f"Stable Diffusion pipeline, not a {type(model).__name__}")
        self.model = model
        self.scheduler = self._method(scheduler)
        self.progress = progress

    def use_scheduler(self, scheduler: str | None) -> None:
        """Sample every later call with this sampler (a name or alias; None: the folder's); ValueError when the
        folder's noise schedule cannot take it."""
        self.scheduler = self._method(scheduler)

    def _method(self, scheduler: str | None) -> S.Method | None:
        """The sampler by name or alias, checked against the model (SD3 samples with flow matching only)."""
        method = resolve_scheduler(scheduler)
        if method is not None:
            self.model.schedule(method)  # ValueError: this folder's noise schedule cannot take that sampler
        return method

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of a call that gives none: the denoiser's training size times the VAE factor."""
        return self.model._size(None, None)

    def resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) a call would produce, or the ValueError it would raise (not a positive multiple of the
        VAE factor, or of the factor times the patch size for SD3; over MAX_SIDE)."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIDE:
                raise ValueError(f"{name} {value} is over the {MAX_SIDE} pixels this pipeline takes per side")
        return self.model._size(height, width)

    def check(self, *, num_inference_steps=None, guidance_scale=None, seed=None, height=None, width=None,
              num_images_per_prompt=1) -> tuple[int, int]:
        """Refuse, with a ValueError naming the option, what the call would refuse; -> (height, width). Nothing is
        encoded or allocated: the CLI and the server call it before queueing any work."""
        steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ValueError(f"num_inference_steps must be an integer from 1 to 1000, got {steps!r}")
        if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(
                guidance_scale, (int, float)) or not math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        return self.resolve_size(height, width)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 scheduler: str | None = None, callback: Callable[[int, int], None] | None = None,
                 progress: bool | None = None, **edit) -> list:
        """The images (see the class). callback(done, total) after each step; an exception it raises stops the
        run. seed None draws from torch's global generator (`random_seed()` gives one to report)."""
        self.check(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, height=height,
                   width=width, num_images_per_prompt=num_images_per_prompt)
        method = self._method(scheduler) if scheduler is not None else self.scheduler
        steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        bar = None
        if self.progress if progress is None else progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, leave=False)
        hook = callback

        if bar is not None:
            def hook(done: int, total: int) -> None:
                bar.total = total  # img2img runs the last strength x steps
                bar.update(done - bar.n)
                if callback is not None:
                    callback(done, total)

        try:
            return self.model(prompt, negative_prompt, steps, guidance_scale, seed=seed, height=height, width=width,
                              num_images_per_prompt=num_images_per_prompt, scheduler=method, callback=hook,
                              output_type="pil", **edit)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"


class ImageToImagePipeline(TextToImagePipeline):
    """`pipe(image, prompt, negative_prompt=None, *, strength=0.8, ...)` with the text-to-image options (not height /
    width: the size is the image's, rounded down to the VAE factor): diffusers' StableDiffusionImg2ImgPipeline on an
    SD 1.x/2.x folder. image: a path, bytes, a file object or a PIL image (opened safely), or a list of them."""

    task = "image-to-image"

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if not getattr(self.model, "edits", False):
            raise ValueError(f"a {type(self.model).__name__} does not edit images: image-to-image is built for "
                             "Stable Diffusion 1.x/2.x folders")

    def __call__(self, image, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 strength: float = 0.8, **options) -> list:
        from polymodal.processing import open_image

        self.check(**{k: v for k, v in options.items() if k in _CHECKED})
        images = [open_image(im) for im in (image if isinstance(image, (list, tuple)) else [image])]
        if not images:
            raise ValueError("image-to-image needs an image")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        return super().__call__(prompt, negative_prompt, image=images if len(images) > 1 else images[0],
                                strength=strength, **options)

    def resolve_size(self, height, width):
        if height is not None or width is not None:
            raise ValueError("image-to-image takes its size from the image; resize it instead of passing height/width")
        return None


__all__ = ["DEFAULT_STEPS", "ImageToImagePipeline", "SCHEDULER_ALIASES", "TextToImagePipeline", "random_seed",
           "resolve_scheduler"]
