"""Recipes: a typed config and a builder that turns it into a `Task` (model, loss, data, evaluation).

All recipes live in the one explicit `RECIPES` dict below; `polymodal train NAME` looks them up there.

* `toy-regression`: a small MLP fitting a random teacher network on synthetic data. Seconds on a CPU: it checks
  a set-up (and torchrun) end to end and is what the engine's tests kill and resume.
* `clip-shapes`: polymodal's tiny CLIP trained from scratch on ShapesWorld (the demo's configuration), reported
  as zero-shot accuracy on color-shape combinations never seen in training and image <-> text recall@1/5.
* `blip-shapes`: a small BLIP pretrained with its three objectives (ITC, ITM with hard negatives, LM) on
  ShapesWorld pairs of which 20% carry a wrong caption (the paper's noisy web text), reported as caption exact
  match and ITM accuracy on seen and never-seen combinations, ITC recall@1, recall@1/5 of BLIP's retrieval (ITC
  ranks, ITM re-ranks) both ways, and how well CapFilt's filter (the ITM head) separates the noisy training pairs
  from the clean ones. `itc=momentum` (with `queue`, `momentum`, `alpha`) trains ITC against momentum encoders
  and their feature queue, `share=true` ties the text decoder to the encoder but for self-attention (the paper's
  options; in-batch ITC, unshared towers by default).
* `blip-shapes-vqa`: BLIP's VQA model (question encoder + answer decoder) on ShapesWorld's questions (count,
  color, shape, existence), from scratch or from a `blip-shapes` run (`init=DIR`), reported as exact-match answer
  accuracy on seen and never-seen combinations, per kind of question.
* `blip2-shapes`: BLIP-2's two stages (train/blip2.py) over a frozen image encoder and a frozen tiny OPT: stage 1
  trains the Q-Former with ITC, ITM and ITG under their attention masks, stage 2 makes its queries a soft prompt of
  the OPT (LM loss on captions); `stage=1|2|both`, `init=DIR` (stage 2 from a stage-1 run), `ablation=true` (stage
  2 from stage 1 vs from scratch: caption exact match and zero-shot VQA on seen and never-seen combinations).
* `qwen2-vl-shapes`, `qwen2.5-vl-shapes`: a small random Qwen2-VL / Qwen2.5-VL (train/qwen2_vl.py) answering
  ShapesWorld's image questions and MovingShapes' video questions (what moved, where it went, at what second a
  shape appeared) through the real Qwen2VLProcessor, loss on the answer; exact match on seen and never-seen
  combinations and per frame rate; `compare=true` trains both families and writes the per-rate table.
* `llava-shapes`: LLaVA's two stages (train/llava.py) with the packaged SmolLM2-135M-Instruct and the clip-shapes
  tower: stage 1 trains the projector on captions, stage 2 the projector and the whole LLM on ShapesWorld instruction
  data of LLaVA's three kinds (conversation, detailed description, complex reasoning), loss on the answers;
  `stages=1,2|1|2`, `init=DIR`, `ablation=true`; accuracy per kind on seen and never-seen combinations.
* `mllama-shapes`: Llama 3.2 Vision's adapter recipe (train/mllama.py): the packaged SmolLM2-135M-Instruct frozen,
  gated cross-attention layers (gates from zero) inserted into it and a small tiled vision encoder trained on
  ShapesWorld's questions through the real MllamaProcessor; answer accuracy on seen and never-seen combinations per
  kind, and text-only prompts checked bit for bit against the original LLM.
* `qwen-vl-shapes`: Qwen-VL's three stages (train/qwen_vl.py) on ShapesWorld scenes of several objects, a small
  Qwen-VL from scratch (its LLM first pretrained on the task's text): stage 1 at 56 px with the LLM frozen
  (captions), stage 2 at 112 px with everything trained (captions, VQA, grounding to `<box>`, referring), stage 3
  chat SFT with the tower frozen; grounding accuracy at IoU >= 0.5, referring and VQA on seen and never-seen
  combinations after each stage; exports Qwen-VL's official layout.
* `ldm-shapes`: latent diffusion in small (train/ldm.py): a VAE (32-px images -> 8x8x4 latents), then a U-Net that
  cross-attends to the frozen clip-shapes text tower, trained with LDM's noise-prediction objective
  (`objective=eps`) or SD3's rectified flow (`objective=flow`); exported as a Stable Diffusion pipeline folder and
  judged by the clip-shapes CLIP: color and shape accuracy of generated images on seen and never-seen prompts,
  against unconditional samples (the floor), and a CLIP-feature Frechet distance to real images.
* `lenet-fashion-mnist`: the paper's LeNet-5 (Table I connections, RBF output) on Fashion-MNIST with the paper's
  MAP loss, reported as accuracy on the 10,000 test images.
* `vit-fashion-mnist`: a small ViT on Fashion-MNIST (by default the ViT paper's hybrid: a ResNet stem, then the
  transformer on its 7x7 map; `variant=cls-1d` etc. take 4x4 patches of the 28x28 images), test accuracy; with
  `ablation=true` it trains the ViT paper's variants (CLS vs GAP, 1-D / 2-D / no positions, hybrid ResNet stem)
  one after the other and prints their accuracies as a table.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.train import blip2, ldm, llava, mllama, qwen2_vl, qwen_vl
from polymodal.train.config import ConfigError, TrainConfig, apply_overrides
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World, close_world, init_world
from polymodal.train.engine import Task, check_run_dir, dump_json, fit
from polymodal.train.losses import contrastive_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ toy-regression


@dataclass(frozen=True)
class ToyConfig(TrainConfig):
    max_steps: int = 40
    batch_size: int = 16
    lr: float = 1e-2
    log_every: int = 1
    save_every: int = 10
    samples: int = 512
    in_features: int = 8
    hidden: int = 32


class ToyMLP(nn.Module):
    """(B, in) -> (B,). A LayerNorm and biases so that the no-decay parameter group is exercised."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))).squeeze(-1)


def mse_loss(model: nn.Module, batch: dict):
    pred = model(batch["x"])  # (B,)
    return F.mse_loss(pred, batch["y"]), {"mae": (pred - batch["y"]).abs().mean().detach()}


def build_toy(c: ToyConfig, world: World) -> Task:
    gen = torch.Generator().manual_seed(c.seed)
    x = torch.randn(c.samples, c.in_features, generator=gen)  # (N, in)
    teacher = torch.randn(c.in_features, generator=gen) / c.in_features**0.5  # (in,), x @ teacher ~ N(0, 1)
    y = torch.sin(x @ teacher) + 0.1 * x[:, 0]  # (N,)
    data = ShuffledBatches(c.samples, c.batch_size // c.grad_accum, lambda i: {"x": x[i], "y": y[i]},
                           seed=c.seed, rank=world.rank, world_size=world.size)
    model = ToyMLP(c.in_features, c.hidden)

    def evaluate(m: nn.Module) -> dict:
        with torch.no_grad():
            return {"train_mse": float(F.mse_loss(m(x.to(next(m.parameters()).device)).cpu(), y))}

    return Task(model, mse_loss, data, evaluate=evaluate)


# ------------------------------------------------------------------------------------------- clip-shapes


@dataclass(frozen=True)
class ClipShapesConfig(TrainConfig):
    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-3
    default_warmup: ClassVar[int] = 100
    weight_decay: float = 0.05
    log_every: int = 50
    save_every: int = 250
    image_size: int = 32
    train_images: int = 20000  # a fixed set generated once (6000 gave 64% on never-seen combinations, 20000 76%)
    eval_images: int = 600  # per split, for zero-shot; retrieval uses half as many


def shapes_clip_config(image_size: int):
    """The tiny CLIP that clip-shapes and the demo train: clip-tiny-test with the real CLIP vocabulary."""
    from polymodal.models.clip import PRESETS

    base = PRESETS["clip-tiny-test"]
    # the real CLIP vocabulary (open_clip's bundled BPE), short captions, small images in 16 patches
    text = replace(base.text, vocab_size=49408, max_position_embeddings=16, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=0)
    return replace(base, text=text, vision=replace(base.vision, image_size=image_size))


def clip_loss(model: nn.Module, batch: dict):
    logits, _ = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])  # (B, B)
    return contrastive_loss(logits, batch["caption"])


def _clamp_temperature(model: nn.Module) -> None:
    model.logit_scale.clamp_(0, 4.6052)  # CLIP clips the learned temperature at 100 = e^4.6052


@torch.no_grad()
def evaluate_clip_shapes(model: nn.Module, image_size: int, n: int) -> dict:
    """Zero-shot accuracy over all color-shape labels on seen and never-seen combinations, and image <-> text
    recall@1/5 on fresh images against their distinct captions."""
    from polymodal.data import COLORS, SHAPES, ShapesWorld
    from polymodal.pipelines import recall_at_k
    from polymodal.processing import CLIPTokenizer, ImageProcessor

    device = next(model.parameters()).device
    tok, proc = CLIPTokenizer.default(), ImageProcessor.clip(size=image_size)
    ctx = model.config.text.max_position_embeddings

    def texts(captions):
        ids, mask = tok(captions, context_length=ctx)
        return F.normalize(model.encode_text(ids.to(device), attention_mask=mask.to(device)), dim=-1)

    def images(samples):
        return F.normalize(model.encode_image(proc([s.image for s in samples]).to(device)), dim=-1)

    labels = [f"a {c} {s}" for c in COLORS for s in SHAPES]  # the captions' own wording
    label_emb = texts(labels)
    result = {"labels": len(labels)}
    for split in ("train", "heldout"):
        samples = ShapesWorld(image_size, seed=1, split=split).batch(0, n)
        pred = (images(samples) @ label_emb.T).argmax(1).tolist()
        correct = [labels[p] == f"a {s.color} {s.shape}" for s, p in zip(samples, pred)]
        result[f"zero_shot_{'seen' if split == 'train' else 'heldout'}"] = sum(correct) / n
    samples = ShapesWorld(image_size, seed=2, split="all").batch(0, max(2, n // 2))
    captions = sorted({s.caption for s in samples})
    sim = (images(samples) @ texts(captions).T).cpu()
    i2t = recall_at_k(sim, [captions.index(s.caption) for s in samples], ks=(1, 5))
    t2i = recall_at_k(sim.T, [[i for i, s in enumerate(samples) if s.caption == t] for t in captions], ks=(1, 5))
    result.update({f"image_to_text_{k}": v for k, v in i2t.items()})
    result.update({f"text_to_image_{k}": v for k, v in t2i.items()})
    return result


def build_clip_shapes(c: ClipShapesConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.data import ShapesWorld
    from polymodal.processing import CLIPTokenizer, ImageProcessor

    cfg = shapes_clip_config(c.image_size)
    model = pm.build("clip", cfg)
    # a fixed training set, generated once: ShapesWorld is a pure function of (seed, index)
    samples = ShapesWorld(c.image_size, seed=0, split="train").batch(0, c.train_images)
    pixels = ImageProcessor.clip(size=c.image_size)([s.image for s in samples])  # (N, 3, H, W)
    captions = sorted({s.caption for s in samples})
    ids, mask = CLIPTokenizer.default()(captions, context_length=cfg.text.max_position_embeddings)
    caption_of = torch.tensor([captions.index(s.caption) for s in samples])  # (N,)

    def collate(i: torch.Tensor) -> dict:
        g = caption_of[i]
        return {"pixel_values": pixels[i], "input_ids": ids[g], "attention_mask": mask[g], "caption": g}

    data = ShuffledBatches(len(samples), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    return Task(model, clip_loss, data, after_step=_clamp_temperature,
                evaluate=lambda m: evaluate_clip_shapes(m, c.image_size, c.eval_images),
                export=lambda m, d: pm.save(m, d))


# ------------------------------------------------------------------------------------------- blip-shapes


@dataclass(frozen=True)
class BlipShapesConfig(TrainConfig):
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    default_warmup: ClassVar[int] = 100
    weight_decay: float = 0.05
    log_every: int = 50
    save_every: int = 500
    image_size: int = 64  # 8x8 patches of 8 pixels (at 32x32, 800 steps: 54% exact captions, shapes confused)
    train_images: int = 20000  # a fixed set generated once
    noise: float = 0.2  # the fraction of training pairs given another image's caption: BLIP's noisy web text
    eval_images: int = 400  # per split
    # ITC over the batch, or the paper's momentum encoders with a queue of their features (BlipPretraining)
    itc: Literal["in-batch", "momentum"] = "in-batch"
    queue: int = 4096  # momentum features kept as extra negatives (64 batches of 64)
    momentum: float = 0.995  # the EMA's share of the momentum weights kept at each step
    alpha: float = 0.4  # the soft targets' weight, raised from 0 over the first epoch as the authors do
    share: bool = False  # the text decoder shares all but its self-attention with the text encoder

    def __post_init__(self):
        super().__post_init__()
        self.pretraining()  # a bad itc setting is refused with the others, before any data is made

    def pretraining(self):
        """The model's BlipPretraining; alpha's ramp is the first epoch, as the authors'."""
        from polymodal.models.blip import BlipPretraining

        try:
            return BlipPretraining(itc=self.itc, queue_size=self.queue, momentum=self.momentum, alpha=self.alpha,
                                   alpha_ramp=max(1, self.train_images // self.batch_size), share=self.share)
        except ValueError as e:
            raise ConfigError(str(e).replace("queue_size", "queue")) from None


def shapes_blip_config(image_size: int, pretraining=None):
    """The small BLIP that blip-shapes trains: 3-layer ViT and text transformers of width 96 over BLIP's real
    vocabulary, patches of 8x8 pixels; `pretraining` (a BlipPretraining) chooses its ITC and sharing."""
    from polymodal.models.blip import BlipConfig, BlipPretraining, BlipTextConfig, ViTConfig

    vision = ViTConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
                       image_size=image_size, patch_size=8, layer_norm_eps=1e-5)
    text = BlipTextConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
                          max_position_embeddings=32)
    return BlipConfig(vision=vision, text=text, task="pretraining", image_text_hidden_size=64,
                      pretraining=pretraining or BlipPretraining())


def blip_loss(model: nn.Module, batch: dict):
    itc, itm, lm = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return itc + itm + lm, {"itc": itc.detach(), "itm": itm.detach(), "lm": lm.detach()}


def _blip_after_step(model: nn.Module) -> None:
    model.temp.clamp_(0.001, 0.5)  # BLIP's bounds for the ITC temperature
    model.momentum_update()  # the momentum encoders follow the step just taken (none with in-batch ITC)


@torch.no_grad()
def evaluate_blip_shapes(model: nn.Module, image_size: int, n: int, noisy: list[tuple[object, str, bool]]) -> dict:
    """Greedy captions of fresh images (exact match with a true caption, on seen and never-seen color-shape
    combinations), ITM accuracy on true vs. wrong captions, image -> text recall@1 by ITC, recall@1/5 of BLIP's
    retrieval (ITC ranks, ITM re-ranks its top 16: `ImageTextMatchingPipeline.retrieve`) in both directions over
    one fresh image per distinct caption, and CapFilt's filter on training pairs (how many of the noisy captions
    it removes and of the clean ones it keeps)."""
    from polymodal.data import ShapesWorld
    from polymodal.pipelines.image_text import ImageTextMatchingPipeline
    from polymodal.processing import ImageProcessor
    from polymodal.processing.text import TextTokenizer

    tok, proc = TextTokenizer.blip(), ImageProcessor.blip(size=image_size)
    device = next(model.parameters()).device
    model.eval()
    captioner, matcher = model.part("captioning"), model.part("retrieval")
    # optimize=False: the part shares the trained modules, which the export still saves as they are
    retriever = ImageTextMatchingPipeline(matcher, tokenizer=tok, optimize=False)

    def match_prob(tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """ITM's p(match) of image tokens (N, 1+P, D) with captions (N)."""
        ids, mask = tok(captions, padding_side="right")
        return matcher.itm_logits(tokens, ids.to(device), mask.to(device)).float().softmax(-1)[:, 1].cpu()

    result = {}
    for split in ("train", "heldout"):
        samples = ShapesWorld(image_size, seed=1, split=split, vocab="full").batch(0, n)
        pixels = proc([s.image for s in samples]).to(device)
        out = captioner.generate(pixel_values=pixels, max_new_tokens=12)
        captions = [tok.decode(row).strip() for row in out.tolist()]
        result[f"caption_exact_{split}"] = sum(c in s.captions for c, s in zip(captions, samples)) / n
        result[f"caption_examples_{split}"] = [[s.caption, c] for s, c in zip(samples[:5], captions)]
        tokens = matcher.image_embeds(pixels)  # (n, 1+P, D): once for ITM and ITC
        wrong = [samples[(i + 1) % n].caption for i in range(n)]
        keep = [w not in s.captions for w, s in zip(wrong, samples)]
        p_true, p_wrong = match_prob(tokens, [s.caption for s in samples]), match_prob(tokens, wrong)
        correct = (p_true > 0.5).sum().item() + sum(bool(p < 0.5) for p, k in zip(p_wrong, keep) if k)
        result[f"itm_accuracy_{split}"] = correct / (n + sum(keep))
        distinct = sorted({s.caption for s in samples})
        ids, mask = tok(distinct, padding_side="right")
        sim = matcher.project_image(tokens) @ matcher.encode_text(ids.to(device), mask.to(device)).T  # (n, captions)
        best = sim.argmax(-1).tolist()
        result[f"itc_recall@1_{split}"] = sum(distinct[b] in s.captions for b, s in zip(best, samples)) / n
        # one image per caption (its first), so that each text has one right image and each image one right text
        first = [next(s for s in samples if s.caption == t) for t in distinct]
        found = retriever.retrieve([s.image for s in first], distinct, k=16).recall(range(len(distinct)), ks=(1, 5))
        result.update({f"retrieval_{key}_{split}": v for key, v in found.items()})
    images, captions, is_noise = zip(*noisy)
    kept = (match_prob(matcher.image_embeds(proc(list(images)).to(device)), list(captions)) >= 0.5).tolist()
    noise_kept = [k for k, bad in zip(kept, is_noise) if bad]
    clean_kept = [k for k, bad in zip(kept, is_noise) if not bad]
    result["capfilt_noisy_removed"] = 1 - sum(noise_kept) / max(1, len(noise_kept))
    result["capfilt_clean_kept"] = sum(clean_kept) / max(1, len(clean_kept))
    return result


def save_blip(model: nn.Module, where: Path) -> None:
    """A BLIP task model in transformers' layout with BLIP's tokenizer and image processor files beside it, so
    that the pipelines, the CLI and transformers' BlipProcessor read the directory as a hub checkpoint."""
    import polymodal as pm
    from polymodal.processing.text import TextTokenizer

    where = pm.save(model, where)
    TextTokenizer.blip().save_pretrained(where, tokenizer_class="BertTokenizer")
    size = model.config.vision.image_size
    (Path(where) / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BlipImageProcessor", "size": {"height": size, "width": size}}, indent=2))


def export_blip_shapes(model: nn.Module, out: Path) -> None:
    """The captioning and retrieval models (BlipForConditionalGeneration, BlipForImageTextRetrieval)."""
    for task in ("captioning", "retrieval"):
        save_blip(model.part(task), Path(out) / task)


def build_blip_shapes(c: BlipShapesConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.data import ShapesWorld
    from polymodal.processing import ImageProcessor
    from polymodal.processing.text import TextTokenizer

    model = pm.build("blip", shapes_blip_config(c.image_size, c.pretraining()))
    samples = ShapesWorld(c.image_size, seed=0, split="train", vocab="full").batch(0, c.train_images)
    pixels = ImageProcessor.blip(size=c.image_size)([s.image for s in samples])  # (N, 3, H, W)
    # noisy web text: a fixed fraction of pairs carries another image's caption
    rng = random.Random(c.seed)
    captions = [s.caption for s in samples]
    noisy = set(rng.sample(range(len(samples)), int(c.noise * len(samples))))
    for i in noisy:
        captions[i] = samples[rng.randrange(len(samples))].caption
    ids, mask = TextTokenizer.blip()(captions, padding_side="right")

    def collate(i: torch.Tensor) -> dict:
        return {"pixel_values": pixels[i], "input_ids": ids[i], "attention_mask": mask[i]}

    data = ShuffledBatches(len(samples), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    probe = [(samples[i].image, captions[i], i in noisy and captions[i] not in samples[i].captions)
             for i in range(min(len(samples), 2 * c.eval_images))]
    return Task(model, blip_loss, data, after_step=_blip_after_step,
                evaluate=lambda m: evaluate_blip_shapes(m, c.image_size, c.eval_images, probe),
                export=export_blip_shapes)


# --------------------------------------------------------------------------------------- blip-shapes-vqa


@dataclass(frozen=True)
class BlipShapesVqaConfig(TrainConfig):
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    default_warmup: ClassVar[int] = 100
    weight_decay: float = 0.05
    log_every: int = 50
    save_every: int = 500
    image_size: int = 64
    train_images: int = 20000  # each with its 3-5 question-answer pairs
    eval_images: int = 200  # per split, every question of each
    init: str = ""  # a blip-shapes run directory: start from its pretrained parts, as BLIP fine-tunes VQA


def vqa_loss(model: nn.Module, batch: dict):
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["answer_ids"],
                   batch["answer_mask"])[:, :-1]  # (B, Ta-1, V)
    targets = batch["answer_ids"][:, 1:].masked_fill(batch["answer_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _qa_tensors(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    """Questions as BLIP's processor frames them ([CLS] q [SEP], right-padded) and answers as the decoder reads
    them ([DEC] a [SEP])."""
    q_ids, q_mask = tok([q for q, _ in pairs], padding_side="right")
    a_ids, a_mask = tok([a for _, a in pairs], padding_side="right")
    a_ids[:, 0] = tok.bos_token_id
    return q_ids, q_mask, a_ids, a_mask


def _question_kind(question: str) -> str:
    return " ".join(question.split()[:2])  # "how many", "what color", "what shape", "is there"


@torch.no_grad()
def evaluate_blip_vqa(model: nn.Module, image_size: int, n: int) -> dict:
    """Greedy answers to every question about fresh images, exact match, on seen and never-seen color-shape
    combinations, overall and per kind of question."""
    from polymodal.data import ShapesWorld
    from polymodal.processing import ImageProcessor
    from polymodal.processing.text import TextTokenizer

    tok, proc = TextTokenizer.blip(), ImageProcessor.blip(size=image_size)
    device = next(model.parameters()).device
    model.eval()
    result = {}
    for split in ("train", "heldout"):
        samples = ShapesWorld(image_size, seed=1, split=split, vocab="full").batch(0, n)
        rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
        pixels = proc([s.image for s in samples])
        hits: dict[str, list[bool]] = {}
        examples = []
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            ids, mask = tok([q for _, q, _ in chunk], padding_side="right")
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 pixel_values=pixels[[i for i, _, _ in chunk]].to(device),
                                 max_new_tokens=5)
            for (_, q, a), row in zip(chunk, out.tolist()):
                answer = tok.decode(row).strip()
                hits.setdefault(_question_kind(q), []).append(answer == a)
                if len(examples) < 6:
                    examples.append([q, a, answer])
        every = [h for v in hits.values() for h in v]
        result[f"vqa_accuracy_{split}"] = sum(every) / len(every)
        result[f"vqa_by_kind_{split}"] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        result[f"vqa_examples_{split}"] = examples
    return result


def _init_vqa_from(model: nn.Module, run: str) -> None:
    """BLIP's VQA start: the image-grounded encoder (and ViT) of a pretraining run's retrieval model, the decoder
    and LM head of its captioning model."""
    import polymodal as pm

    where = Path(run) / "model"
    if not (where / "retrieval").is_dir() or not (where / "captioning").is_dir():
        raise ConfigError(f"init={run!r}: expected a finished blip-shapes run (its model/retrieval and "
                          "model/captioning directories)")
    retrieval, captioning = pm.load(where / "retrieval"), pm.load(where / "captioning")
    for name, source in (("vision_model", retrieval), ("text_encoder", retrieval), ("text_decoder", captioning),
                         ("lm_head", captioning)):
        getattr(model, name).load_state_dict(getattr(source, name).state_dict())


def build_blip_shapes_vqa(c: BlipShapesVqaConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.data import ShapesWorld
    from polymodal.processing import ImageProcessor
    from polymodal.processing.text import TextTokenizer

    model = pm.build("blip", replace(shapes_blip_config(c.image_size), task="vqa"))
    if c.init:
        _init_vqa_from(model, c.init)
    samples = ShapesWorld(c.image_size, seed=0, split="train", vocab="full").batch(0, c.train_images)
    pixels = ImageProcessor.blip(size=c.image_size)([s.image for s in samples])  # (N, 3, H, W)
    rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
    image_of = torch.tensor([i for i, _, _ in rows])
    q_ids, q_mask, a_ids, a_mask = _qa_tensors(TextTokenizer.blip(), [(q, a) for _, q, a in rows])

    def collate(i: torch.Tensor) -> dict:
        return {"pixel_values": pixels[image_of[i]], "input_ids": q_ids[i], "attention_mask": q_mask[i],
                "answer_ids": a_ids[i], "answer_mask": a_mask[i]}

    data = ShuffledBatches(len(rows), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)

    return Task(model, vqa_loss, data, evaluate=lambda m: evaluate_blip_vqa(m, c.image_size, c.eval_images),
                export=save_blip)


# ----------------------------------------------------------------------------------- lenet-fashion-mnist


@dataclass(frozen=True)
class LeNetFashionConfig(TrainConfig):
    max_steps: int = 13000  # ~28 epochs of the 60,000 training images: 90.2% test accuracy in 8 min on 2 cores
    batch_size: int = 128
    lr: float = 2e-3
    default_warmup: ClassVar[int] = 200
    weight_decay: float = 0.0
    log_every: int = 100
    save_every: int = 1000
    data_root: str = ""  # the IDX files; empty: $POLYMODAL_FASHION_MNIST, else Debian's folder
    train_images: int = 0  # use the first N training images; 0: all 60,000
    rubbish_j: float = 2.0  # the constant j of the MAP criterion (Eq. 9); "inf" gives plain cross-entropy


def map_loss(logits: torch.Tensor, labels: torch.Tensor, j: float) -> torch.Tensor:
    """The paper's MAP criterion (LeCun et al. 1998, Eq. 9) for RBF outputs y_i = -logits_i:

        E = mean(y_D + log(e^-j + sum_i e^-y_i))

    which is cross-entropy over the class scores plus one "rubbish" class of constant score -j: pushing a wrong
    class's penalty up stops paying once it is well above j, so the RBF centers are not driven apart forever."""
    rubbish = logits.new_full((logits.shape[0], 1), -j)  # (B, 1)
    return F.cross_entropy(torch.cat([logits, rubbish], dim=1), labels)  # (B, N + 1) against labels < N


def _lenet_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 32, 32) through `ImageProcessor.lenet()`, the preprocessing the pipelines use
    with a LeNet, so the exported model classifies images as it saw them in training."""
    from polymodal.processing import ImageProcessor

    return ImageProcessor.lenet()(list(images[:, None]))


def evaluate_lenet(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, j: float) -> dict:
    """Accuracy and MAP loss over held-out images, in batches."""
    return evaluate_classifier(model, pixels, labels, loss=lambda logits, y: map_loss(logits, y, j))


def build_lenet_fashion(c: LeNetFashionConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.data.datasets import FashionMNIST
    from polymodal.models.lenet import PRESETS as LENET_PRESETS

    root = c.data_root or None
    train, test = FashionMNIST(root, split="train"), FashionMNIST(root, split="test")
    n = c.train_images or len(train)
    pixels, labels = _lenet_pixels(train.images[:n]), train.labels[:n]  # (N, 1, 32, 32), (N,)
    test_pixels = _lenet_pixels(test.images)
    model = pm.build("lenet", replace(LENET_PRESETS["lenet-5"], id2label=FashionMNIST.classes))  # names the classes

    def loss_fn(m: nn.Module, batch: dict):
        logits = m(batch["pixel_values"])  # (B, 10): minus the RBF distances
        accuracy = (logits.argmax(1) == batch["label"]).float().mean().detach()
        return map_loss(logits, batch["label"], c.rubbish_j), {"accuracy": accuracy}

    data = ShuffledBatches(n, c.batch_size // c.grad_accum, lambda i: {"pixel_values": pixels[i], "label": labels[i]},
                           seed=c.seed, rank=world.rank, world_size=world.size)
    return Task(model, loss_fn, data, evaluate=lambda m: evaluate_lenet(m, test_pixels, test.labels, c.rubbish_j),
                export=lambda m, d: pm.save(m, d))


# ------------------------------------------------------------------------------------- vit-fashion-mnist

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # the training images' pixel mean and deviation (in [0, 1])
VIT_VARIANTS = ("cls-1d", "gap-1d", "cls-2d", "cls-none", "hybrid")


@dataclass(frozen=True)
class ViTFashionConfig(TrainConfig):
    max_steps: int = 4700  # 10 epochs of the 60,000 training images at batch 128
    batch_size: int = 128
    lr: float = 2e-3
    default_warmup: ClassVar[int] = 300
    weight_decay: float = 0.05
    log_every: int = 100
    save_every: int = 500
    data_root: str = ""  # the IDX files; empty: $POLYMODAL_FASHION_MNIST, else Debian's folder
    train_images: int = 0  # use the first N training images; 0: all 60,000
    test_images: int = 0  # evaluate on the first N test images; 0: all 10,000
    # one of VIT_VARIANTS: the ViT paper's appendix D.4 / D.5 / hybrid choices. The hybrid is the default: it is
    # the variant that reaches 90% in 10 epochs here (90.74%; the pure cls-1d ViT needs 20: 88.45% at 10, 90.48%
    # at 20, docs/training.md)
    variant: str = "hybrid"
    hidden_size: int = 64
    layers: int = 6
    heads: int = 4
    mlp_size: int = 128
    patch_size: int = 4
    augment: bool = True  # random 2-pixel shifts and horizontal flips
    ablation: bool = False  # train every variant (each for max_steps) and print the table
    variants: tuple[str, ...] = VIT_VARIANTS  # the ablation's variants (a subset lets runs share the work)

    def __post_init__(self):
        super().__post_init__()
        for v in (self.variant, *self.variants):
            if v not in VIT_VARIANTS:
                raise ConfigError(f"variant must be one of {', '.join(VIT_VARIANTS)}; got {v!r}")


def fashion_vit_config(c: ViTFashionConfig):
    """The ViT of one ablation variant. The hybrid stem is a one-stage ResNet of stride 4 whose 7x7 map is
    embedded with 1x1 "patches" (the paper's hybrid, section 3.1), so every variant sees 49 tokens."""
    from polymodal.data.datasets import FASHION_MNIST_CLASSES
    from polymodal.models.vit import ViTConfig

    pool, _, position = c.variant.partition("-")
    hybrid = c.variant == "hybrid"
    return ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                     intermediate_size=c.mlp_size, layer_norm_eps=1e-6, image_size=28, num_channels=1,
                     patch_size=1 if hybrid else c.patch_size, num_labels=10,
                     pool="cls" if hybrid else pool, class_token=hybrid or pool == "cls",
                     position={"1d": "learned", "2d": "learned_2d", "none": "none"}.get(position, "learned"),
                     backbone="resnet-stem-gray" if hybrid else None, id2label=FASHION_MNIST_CLASSES)


class Classifier(nn.Module):
    """A model whose `classify` gives logits, with that as its forward (what DDP wraps and the loss calls)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.classify(pixel_values)


def _fashion_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalized float (N, 1, 28, 28)."""
    return ((images.float() / 255 - FASHION_MEAN) / FASHION_STD)[:, None]


def shift_and_flip(x: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """Random translations by up to `shift` pixels (zero padding, as random-crop-with-padding does) and random
    horizontal flips, per image, from torch's global generator (saved and restored with every checkpoint)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=float(-FASHION_MEAN / FASHION_STD))  # the black level
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B)).tolist()
    out = torch.stack([padded[i, :, y: y + H, z: z + W] for i, (y, z) in enumerate(zip(dy, dx))])
    flip = torch.rand(B) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, loss=None) -> dict:
    """Test accuracy (and the mean `loss(logits, labels)` when given) of a model whose forward gives logits, over
    held-out images in batches of 1000."""
    device = next(model.parameters()).device
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(labels), 1000):
        x, y = pixels[start: start + 1000].to(device), labels[start: start + 1000].to(device)
        logits = model(x)  # (b, classes)
        correct += int((logits.argmax(1) == y).sum())
        if loss is not None:
            total_loss += float(loss(logits, y)) * len(y)
    result = {"test_accuracy": correct / len(labels), "test_images": len(labels)}
    if loss is not None:
        result["test_loss"] = total_loss / len(labels)
    return result


def build_vit_fashion(c: ViTFashionConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.data.datasets import FashionMNIST

    root = c.data_root or None
    train, test = FashionMNIST(root, split="train"), FashionMNIST(root, split="test")
    n = c.train_images or len(train)
    pixels, labels = _fashion_pixels(train.images[:n]), train.labels[:n]  # (N, 1, 28, 28), (N,)
    m = c.test_images or len(test)
    test_pixels, test_labels = _fashion_pixels(test.images[:m]), test.labels[:m]
    vit = pm.build("vit", fashion_vit_config(c))
    for p in (vit.cls_token, vit.pos_embed):  # the paper's initialization of the learned tokens
        if p is not None:
            nn.init.trunc_normal_(p, std=0.02)
    model = Classifier(vit)

    def loss_fn(m: nn.Module, batch: dict):
        x = shift_and_flip(batch["pixel_values"]) if c.augment else batch["pixel_values"]
        logits = m(x)  # (B, 10)
        accuracy = (logits.argmax(1) == batch["label"]).float().mean().detach()
        return F.cross_entropy(logits, batch["label"]), {"accuracy": accuracy}

    data = ShuffledBatches(n, c.batch_size // c.grad_accum, lambda i: {"pixel_values": pixels[i], "label": labels[i]},
                           seed=c.seed, rank=world.rank, world_size=world.size)
    return Task(model, loss_fn, data, evaluate=lambda m: evaluate_classifier(m, test_pixels, test_labels),
                export=lambda m, d: pm.save(m.model, d))


def vit_ablation_table(results: dict[str, dict]) -> str:
    """A Markdown table of the ablation: one row per variant with its test accuracy and training time."""
    names = {"cls-1d": "[CLS] token, learned 1-D positions (the paper's default)",
             "gap-1d": "global average pooling (no [CLS]), 1-D positions",
             "cls-2d": "[CLS], learned 2-D positions (row + column embeddings)",
             "cls-none": "[CLS], no position encoding",
             "hybrid": "hybrid: ResNet stem (stride 4), 1x1 patches, [CLS], 1-D positions"}
    rows = ["| variant | what changes | test accuracy | minutes |", "|---|---|---|---|"]
    for v, r in results.items():
        rows.append(f"| `{v}` | {names[v]} | {100 * r['eval']['test_accuracy']:.2f}% | {r['seconds'] / 60:.1f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Recipe:
    config: type[TrainConfig]
    build: Callable[[TrainConfig, World], Task]
    description: str
    # a recipe of several runs (e.g. blip2-shapes' stages): plan(name, config, out, overrides, resume, quiet) runs
    # them and returns the summary, or None for the usual single run
    plan: Callable[..., dict | None] | None = None


RECIPES: dict[str, Recipe] = {
    "toy-regression": Recipe(ToyConfig, build_toy, "a small MLP on synthetic data: checks a set-up in seconds"),
    "clip-shapes": Recipe(ClipShapesConfig, build_clip_shapes,
                          "tiny CLIP from scratch on ShapesWorld; zero-shot on held-out combinations, recall@1/5"),
    "blip-shapes": Recipe(BlipShapesConfig, build_blip_shapes,
                          "small BLIP pretrained (ITC + ITM + LM) on noisy ShapesWorld pairs; captions, ITM, CapFilt"),
    "blip-shapes-vqa": Recipe(BlipShapesVqaConfig, build_blip_shapes_vqa,
                              "BLIP VQA on ShapesWorld's questions (init=a blip-shapes run); answer accuracy"),
    "blip2-shapes": Recipe(blip2.Blip2ShapesConfig, blip2.build_blip2_shapes,
                           "BLIP-2's stage 1 (ITC/ITM/ITG) and 2 (frozen OPT) on ShapesWorld; ablation=true: stage 1's "
                           "effect on captions and VQA", plan=blip2.plan),
    "qwen2-vl-shapes": Recipe(qwen2_vl.Qwen2VLShapesConfig, qwen2_vl.build_qwen2_vl_shapes,
                              "small Qwen2-VL on ShapesWorld images and moving-shapes videos; compare=true: both "
                              "families' 'at what second' accuracy per frame rate", plan=qwen2_vl.plan),
    "qwen2.5-vl-shapes": Recipe(qwen2_vl.Qwen25VLShapesConfig, qwen2_vl.build_qwen2_vl_shapes,
                                "small Qwen2.5-VL (absolute-time video positions) on the same data; compare=true "
                                "as qwen2-vl-shapes", plan=qwen2_vl.plan),
    "llava-shapes": Recipe(llava.LlavaShapesConfig, llava.build_llava_shapes,
                           "LLaVA's two stages with the real SmolLM2-135M and clip-shapes' tower: projector "
                           "alignment, then instruction tuning (conversation, description, reasoning); "
                           "ablation=true: the paper's ablations", plan=llava.plan),
    "mllama-shapes": Recipe(mllama.MllamaShapesConfig, mllama.build_mllama_shapes,
                            "Llama 3.2 Vision's adapter recipe: gated cross-attention layers and a small vision "
                            "encoder trained into the frozen SmolLM2 on ShapesWorld's questions"),
    "qwen-vl-shapes": Recipe(qwen_vl.QwenVLShapesConfig, qwen_vl.build_qwen_vl_shapes,
                             "Qwen-VL's three stages on ShapesWorld scenes (56 px with the LLM frozen; 112 px "
                             "multi-task with grounding; chat SFT with the tower frozen); grounding at IoU 0.5",
                             plan=qwen_vl.plan),
    "ldm-shapes": Recipe(ldm.LdmShapesConfig, ldm.build_ldm_shapes,
                         "a tiny latent diffusion model: a VAE, then a text-conditioned U-Net (objective=eps or "
                         "flow) on ShapesWorld captions; CLIP-judged color/shape accuracy, CLIP-feature FD",
                         plan=ldm.plan),
    "lenet-fashion-mnist": Recipe(LeNetFashionConfig, build_lenet_fashion,
                                  "the paper's LeNet-5 on Fashion-MNIST (MAP loss); test accuracy"),
    "vit-fashion-mnist": Recipe(ViTFashionConfig, build_vit_fashion,
                                "a small ViT on Fashion-MNIST; ablation=true: the paper's variants as a table"),
}


def recipe_config(name: str, overrides: list[str] = ()) -> TrainConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return apply_overrides(RECIPES[name].config(), list(overrides))


def cached_run(name: str, run_dir: str | Path, overrides: list[str] = (), *, done: tuple[str, ...]) -> bool:
    """Recipe `name` trained once into `run_dir` (quietly: notes go to its train.log) unless every path of `done`
    (relative to it) is already there; True when it was. It trains into a scratch folder renamed into place at the
    end, so a killed run leaves no half-trained cache behind (what the demo and the default models keep)."""
    import shutil

    run_dir = Path(run_dir)
    if all((run_dir / d).exists() for d in done):
        return True
    scratch = run_dir.with_name(f"{run_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    run(name, scratch, list(overrides), quiet=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    scratch.rename(run_dir)  # atomic; links inside the run (ldm-shapes' OUT/model) are relative and move with it
    return False


def run(name: str, out: str | Path, overrides: list[str] = (), resume: bool = False, quiet: bool = False) -> dict:
    """Train recipe `name` into `out` (a single process, or each process of a torchrun launch). `out` is
    checked before anything is built: a fresh run into a directory with checkpoints is refused at once, and a
    resumed run that already finished returns its stored results without loading its data. quiet: notes to
    `out/train.log` only (`fit`)."""
    config = recipe_config(name, overrides)
    if RECIPES[name].plan is not None:
        summary = RECIPES[name].plan(name, config, out, list(overrides), resume, quiet)
        if summary is not None:
            return summary
    if getattr(config, "ablation", False):
        return run_ablation(name, out, overrides, resume)
    stored = check_run_dir(out, config, resume, quiet=os.environ.get("RANK", "0") != "0")
    if stored is not None:
        return stored
    world = init_world()
    try:
        seed_everything(config.seed)  # the same initial weights on every process
        task = RECIPES[name].build(config, world)
        seed_everything(config.seed + world.rank)  # per-process streams (dropout, sampling) from here on
        summary = fit(task, config, out, world=world, resume=resume, quiet=quiet)
    finally:
        close_world(world)
    if world.main:
        Path(out, "recipe.json").write_text(dump_json({"recipe": name, "overrides": list(overrides)}))
    return summary


def run_ablation(name: str, out: str | Path, overrides: list[str] = (), resume: bool = False) -> dict:
    """Train every variant of an ablation recipe into `out/VARIANT/` (same seed, data and schedule), then write
    the table (`out/ablation.md`, `out/ablation.json`). A variant already finished is not trained again with
    --resume, so several processes can each train some `variants` into one directory, and a last `--resume` run
    over all of them writes the whole table."""
    import time

    out = Path(out)
    base = [o for o in overrides if not o.replace(" ", "").startswith(("ablation=", "variant=", "variants="))]
    variants = recipe_config(name, overrides).variants
    if not resume:  # refuse a clash before the first variant trains, not after it
        for variant in variants:
            check_run_dir(out / variant, recipe_config(name, [*base, f"variant={variant}"]), resume=False)
    results = {}
    for variant in variants:
        where = out / variant
        done = where / "variant.json"  # written once the variant's run and evaluation are complete
        if resume and done.is_file():
            results[variant] = json.loads(done.read_text())
            continue
        t0 = time.perf_counter()
        summary = run(name, where, [*base, f"variant={variant}"], resume=resume)
        summary["seconds"] = time.perf_counter() - t0
        done.write_text(dump_json(summary, indent=2))
        results[variant] = summary
    table = vit_ablation_table(results)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(dump_json({v: {"test_accuracy": r["eval"]["test_accuracy"],
                                                      "seconds": r["seconds"]} for v, r in results.items()},
                                                 indent=2))
    return {"ablation": results, "table": table}
