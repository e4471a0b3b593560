"""Qwen2-VL and Qwen2.5-VL trained from scratch on ShapesWorld images and MovingShapes videos, the
`qwen2-vl-shapes` and `qwen2.5-vl-shapes` recipes (Wang et al. 2024, "Qwen2-VL"; Bai et al. 2025, "Qwen2.5-VL
Technical Report").

    data    ShapesWorld's one-shape images and their questions (count, color, shape, existence), MovingShapes' clips
            and theirs ("what moved?", "where did the red circle go?", "at what second did the red circle appear?"),
            each clip sampled at one of the rates in `fps`
    inputs  the real `Qwen2VLProcessor` over a word-level tokenizer of the world's language with Qwen's special
            tokens and the hub's Qwen2-VL chat template: <|vision_start|><|image_pad|>...<|vision_end|> (or
            <|video_pad|>) in the user turn, the answer and <|im_end|> in the assistant turn; Qwen2.5-VL's processor
            also gives second_per_grid_ts (2 / fps: the seconds one temporal patch spans)
    model   a small random decoder and vision tower of the family (`model_config`); cross-entropy on the answer
            tokens only (the prompt and the media are context)
    report  greedy answers, exact match: images on seen and never-seen color-shape combinations, clips of fresh
            scenes at every rate, per kind of question

The question the recipe asks (`compare=true`): Qwen2-VL numbers a video's temporal patches 0, 1, 2, ... whatever the
rate, so "second 2" is patch 1 at 1 fps, patch 2 at 2 fps and patch 4 at 4 fps; Qwen2.5-VL's temporal position is
patch * second_per_grid_ts * tokens_per_second, i.e. seconds, the same at every rate. `compare=true` trains both
families on the same data and writes the per-rate table (`OUT/table.md`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.processing.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE
from polymodal.train.config import ConfigError, TrainConfig
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World
from polymodal.train.engine import Task, dump_json

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# ------------------------------------------------------------------------------------------- vocabulary

# Qwen2's special tokens (the hub tokenizer's added tokens), <unk> for words outside the world
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<unk>")
_WORDS = ("system", "you", "are", "a", "an", "helpful", "assistant", "user", ".", "?", ",", "how", "many", "shape",
          "shapes", "is", "there", "what", "color", "object", "the", "where", "relative", "to", "left", "right",
          "above", "below", "up", "down", "yes", "no", "at", "second", "did", "appear", "moved", "go", "of", "and",
          "small", "large")


def shapes_tokenizer():
    """A word-level `TextTokenizer` over ShapesWorld's and MovingShapes' language (the whole seconds 0-59 as words)
    with Qwen2's special tokens (<|im_end|> ends a turn and generation, <|endoftext|> pads) and the hub's Qwen2-VL
    chat template. Whole words keep the answers one or two tokens long, which a small model needs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from polymodal.data.shapes import ALL_COLORS, ALL_SHAPES, NUMBER_WORDS
    from polymodal.processing.text import TextTokenizer

    words = sorted(set(_WORDS) | set(ALL_COLORS) | set(ALL_SHAPES) | set(NUMBER_WORDS) | {str(s) for s in range(60)})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + tuple(words))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "appear?" -> "appear", "?"; "\n" separates only
    tok.add_special_tokens(list(SPECIALS))
    return TextTokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
                         chat_template=QWEN2_VL_CHAT_TEMPLATE, copy=False)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Qwen2VLShapesConfig(TrainConfig):
    family: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl"
    max_steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    default_warmup: ClassVar[int] = 50
    weight_decay: float = 0.05
    log_every: int = 25
    save_every: int = 200
    data: tuple[str, ...] = ("image", "video")  # what the model is trained and evaluated on
    video_kinds: tuple[str, ...] = ("appear", "move")  # MovingShapes' kinds of clip
    fps: tuple[str, ...] = ("1", "2", "4")  # the rates clips are sampled at, in training and evaluation
    duration_min: int = 4  # clip lengths in whole seconds: varying them keeps the frame count from giving the rate
    duration_max: int = 8
    image_size: int = 56  # ShapesWorld images (smart_resize keeps 56: 4x4 patches of 14, 4 tokens)
    frame_size: int = 56  # MovingShapes frames, likewise 4 tokens per temporal patch
    train_images: int = 4000  # fixed sets, rendered as batches are drawn (a pure function of the index)
    train_videos: int = 4000
    eval_images: int = 100  # per split (seen / never-seen combinations), every question of each
    eval_videos: int = 60  # fresh scenes, each at every rate
    width: int = 96  # the decoder
    layers: int = 3
    heads: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    tokens_per_second: int = 2  # Qwen2.5-VL's temporal positions per second (the released checkpoints' 2)
    compare: bool = False  # train both families on the same data into OUT/qwen2_vl and OUT/qwen2_5_vl; OUT/table.md

    def __post_init__(self):
        super().__post_init__()
        if not self.data or any(d not in ("image", "video") for d in self.data):
            raise ConfigError(f"data must be some of image, video; got {','.join(self.data) or 'nothing'}")
        from polymodal.data.moving_shapes import KINDS

        if "video" in self.data and (not self.video_kinds or any(k not in KINDS for k in self.video_kinds)):
            raise ConfigError(f"video_kinds must be some of {', '.join(KINDS)}; got {','.join(self.video_kinds)}")
        try:
            rates = self.rates
        except ValueError:
            rates = ()
        if not rates or any(not r > 0 or r * self.duration_max > 240 for r in rates):
            raise ConfigError(f"fps must be positive rates (at most 240 frames a clip); got {','.join(self.fps)}")
        if not 2 <= self.duration_min <= self.duration_max <= 30:
            raise ConfigError(f"durations must satisfy 2 <= duration_min <= duration_max <= 30 seconds; got "
                              f"{self.duration_min}, {self.duration_max}")
        for name in ("image_size", "frame_size"):
            if getattr(self, name) < 28:
                raise ConfigError(f"{name} must be at least 28 pixels (one merged 2x2 block of 14-pixel patches)")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"width {self.width} over {self.heads} heads must give an even head dimension")
        if self.vision_width % self.vision_heads or (self.vision_width // self.vision_heads) % 4:
            raise ConfigError(f"vision_width {self.vision_width} over {self.vision_heads} heads must give a head "
                              "dimension divisible by 4 (2-D RoPE)")
        if "image" in self.data and min(self.train_images, self.eval_images) < 1 or \
                "video" in self.data and min(self.train_videos, self.eval_videos) < 1:
            raise ConfigError("train_images / eval_images (train_videos / eval_videos) must be at least 1 for the "
                              "data trained on")

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(float(r) for r in self.fps)


@dataclass(frozen=True)
class Qwen25VLShapesConfig(Qwen2VLShapesConfig):
    family: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_5_vl"


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of a head's frequency pairs between (temporal, height, width): [16, 24, 24] of 64 pairs,
    i.e. 3/8 to each spatial axis and the rest to time, at any head size."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def model_config(c: Qwen2VLShapesConfig, tok):
    """The family's config: a `layers`-deep decoder of `width` over the tokenizer's vocabulary, a `vision_layers`-deep
    tower of `vision_width`, the placeholder ids the tokenizer gives."""
    from polymodal.models.qwen2 import Qwen2Config
    from polymodal.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
    from polymodal.models.qwen2_vl import Qwen2VLConfig, Qwen2VLVisionConfig

    text = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=c.width, intermediate_size=2 * c.width,
                       num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
                       max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=None,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       rope_scaling={"rope_type": "mrope", "mrope_section": mrope_section(c.width // c.heads)})
    ids = {"image_token_id": tok.token_to_id("<|image_pad|>"), "video_token_id": tok.token_to_id("<|video_pad|>"),
           "vision_start_token_id": tok.token_to_id("<|vision_start|>"),
           "vision_end_token_id": tok.token_to_id("<|vision_end|>")}
    if c.family == "qwen2_vl":
        vision = Qwen2VLVisionConfig(depth=c.vision_layers, embed_dim=c.vision_width, hidden_size=c.width,
                                     mlp_ratio=2, num_heads=c.vision_heads)
        return Qwen2VLConfig(vision=vision, text=text, **ids)
    vision = Qwen2_5_VLVisionConfig(depth=c.vision_layers, hidden_size=c.vision_width,
                                    intermediate_size=2 * c.vision_width, num_heads=c.vision_heads,
                                    out_hidden_size=c.width, tokens_per_second=c.tokens_per_second,
                                    fullatt_block_indexes=(c.vision_layers - 1,))
    return Qwen2_5_VLConfig(vision=vision, text=text, **ids)


def processor(c: Qwen2VLShapesConfig, tok):
    """The family's `Qwen2VLProcessor`: images and frames at their own size (smart_resize to multiples of 28 within
    [28 x 28, 4 x the frame]), Qwen2.5-VL's with second_per_grid_ts."""
    from polymodal.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=4 * c.image_size ** 2)
    videos = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=4 * c.frame_size ** 2, min_frames=1)
    return Qwen2VLProcessor(tok, images, videos, second_per_grid_ts=c.family == "qwen2_5_vl",
                            context_length=2048)


# -------------------------------------------------------------------------------------------- examples


def _ask(kind: str, media, question: str, fps: float | None = None) -> list[dict]:
    part = {"type": "image", "image": media} if kind == "image" else {"type": "video", "video": list(media), "fps": fps}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def example(proc, kind: str, media, question: str, answer: str, fps: float | None = None) -> dict:
    """One training row: the processor's prompt (the user turn with its media, then the assistant's header), the
    answer's words and <|im_end|>; labels -100 except on the answer (Qwen2-VL's instruction tuning supervises the
    assistant's turn only)."""
    inputs = proc(_ask(kind, media, question, fps))
    tok = proc.tokenizer
    answer_ids = torch.tensor(tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id])
    ids = torch.cat([inputs.pop("input_ids")[0], answer_ids])  # (T,)
    labels = torch.full_like(ids, -100)
    labels[-len(answer_ids):] = answer_ids
    return {"input_ids": ids, "labels": labels, "kind": kind, **inputs}


def collate_examples(rows: list[dict], pad_id: int) -> dict:
    """Rows -> one batch: ids right-padded (B, T) with their mask, labels -100 at padding, every image's patches
    concatenated in row order (pixel_values, image_grid_thw), likewise the videos' (and second_per_grid_ts)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = r["input_ids"], r["labels"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for keys in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")):
        have = [r for r in rows if keys[0] in r]
        for key in keys:
            if have and key in have[0]:
                batch[key] = torch.cat([r[key] for r in have])
    return batch


def answer_loss(model: nn.Module, batch: dict):
    """Next-token cross-entropy on the answer tokens (labels != -100)."""
    labels = batch["labels"]
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    logits = model(batch["input_ids"], batch["attention_mask"], **media)[:, :-1]  # (B, T-1, V)
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
    hit = (logits.argmax(-1) == target)[target != -100].float().mean().detach()
    return loss, {"token_accuracy": hit}


# -------------------------------------------------------------------------------------------------- data


def _worlds(c: Qwen2VLShapesConfig, seed: int, split: str):
    from polymodal.data import ShapesWorld
    from polymodal.data.moving_shapes import MovingShapes

    images = ShapesWorld(c.image_size, seed=seed, split=split)
    videos = MovingShapes(c.frame_size, seed=seed, split=split, fps=c.rates,
                          duration=(c.duration_min, c.duration_max), kinds=c.video_kinds)
    return images, videos


def training_rows(c: Qwen2VLShapesConfig) -> list[tuple[str, int, int]]:
    """(kind, item, question) for every training question: each image's questions (ShapesWorld gives a one-shape image
    five), each clip's (two for a moving shape, one for an appearing one: the row index wraps)."""
    rows = []
    if "image" in c.data:
        rows += [("image", i, q) for i in range(c.train_images) for q in range(5)]
    if "video" in c.data:
        rows += [("video", i, q) for i in range(c.train_videos) for q in range(2)]
    return rows


# -------------------------------------------------------------------------------------------- evaluation


def _question_kind(question: str) -> str:
    if question.startswith("at what second"):
        return "when appeared"
    if question.startswith("where did"):
        return "where it went"
    return " ".join(question.split()[:2])  # "how many", "what color", "what shape", "is there", "what moved?"


@torch.no_grad()
def answer(model: nn.Module, proc, conversations: list[list[dict]], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to a batch of conversations (the processor's left-padded batch, the family's generate)."""
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in proc(conversations).items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [proc.tokenizer.decode(row).strip() for row in new.tolist()]


@torch.no_grad()
def evaluate(model: nn.Module, c: Qwen2VLShapesConfig, tok, batch: int = 32) -> dict:
    """Exact-match greedy answers. Images (`data` has image): every question of `eval_images` fresh images per
    split, "seen" (combinations trained on) and "never_seen" (held out of training). Videos: `eval_videos` fresh
    scenes, each sampled at every rate of `fps`, per rate and kind of question."""
    model.eval()
    proc = processor(c, tok)
    result: dict = {}

    def score(items: list[tuple[list[dict], str, str]]) -> tuple[float, dict, list]:
        hits: dict[str, list[bool]] = {}
        examples = []
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            got = answer(model, proc, [conv for conv, _, _ in chunk])
            for (_, q, want), g in zip(chunk, got):
                hits.setdefault(_question_kind(q), []).append(g == want)
                if len(examples) < 4:
                    examples.append([q, want, g])
        every = [h for v in hits.values() for h in v]
        return sum(every) / len(every), {k: sum(v) / len(v) for k, v in sorted(hits.items())}, examples

    if "image" in c.data:
        for split, name in (("train", "seen"), ("heldout", "never_seen")):
            world, _ = _worlds(c, 1, split)
            items = [(_ask("image", s.image, q), q, a) for s in world.batch(0, c.eval_images) for q, a in s.qa]
            acc, kinds, examples = score(items)
            result[f"image_{name}"], result[f"image_{name}_by_kind"] = acc, kinds
            result[f"image_{name}_examples"] = examples
    if "video" in c.data:
        _, clips = _worlds(c, 1, "train")
        for rate in c.rates:
            items = []
            for i in range(c.eval_videos):
                clip = clips.sample(i, fps=rate)
                items += [(_ask("video", clip.frames, q, rate), q, a) for q, a in clip.qa]
            acc, kinds, examples = score(items)
            key = f"video_{rate:g}fps"
            result[key], result[f"{key}_by_kind"], result[f"{key}_examples"] = acc, kinds, examples
    return result


def results_table(evals: dict[str, dict], c: Qwen2VLShapesConfig) -> str:
    """Markdown: one row per family, the image accuracies and every rate's video accuracy per kind of question."""
    kinds = sorted({k for e in evals.values() for r in c.rates for k in e.get(f"video_{r:g}fps_by_kind", {})})
    head = ["family"]
    if "image" in c.data:
        head += ["images, seen", "images, **never-seen**"]
    head += [f"{k} @ {r:g} fps" for k in kinds for r in c.rates]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, e in evals.items():
        cells = [family]
        if "image" in c.data:
            cells += [f"{100 * e['image_seen']:.1f}%", f"{100 * e['image_never_seen']:.1f}%"]
        cells += [f"{100 * e[f'video_{r:g}fps_by_kind'][k]:.1f}%" if k in e.get(f"video_{r:g}fps_by_kind", {})
                  else "-" for k in kinds for r in c.rates]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ recipe


def build_qwen2_vl_shapes(c: Qwen2VLShapesConfig, world: World) -> Task:
    import polymodal as pm
    from polymodal.train.blip2 import init_weights

    if c.compare:
        raise ConfigError("build_qwen2_vl_shapes builds one family; `run` trains both for compare=true")
    tok = shapes_tokenizer()
    model = init_weights(pm.build(c.family, model_config(c, tok)))  # N(0, 0.02): Qwen2's initializer_range
    proc = processor(c, tok)
    images, clips = _worlds(c, 0, "train")
    rows = training_rows(c)

    def make(row: tuple[str, int, int]) -> dict:
        kind, i, q = row
        if kind == "image":
            s = images.sample(i)
            question, reply = s.qa[q % len(s.qa)]
            return example(proc, "image", s.image, question, reply)
        clip = clips.sample(i)
        question, reply = clip.qa[q % len(clip.qa)]
        return example(proc, "video", clip.frames, question, reply, clip.fps)

    def collate(i: Tensor) -> dict:
        return collate_examples([make(rows[k]) for k in i.tolist()], tok.pad_token_id)

    data = ShuffledBatches(len(rows), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    done: dict = {}

    def evaluate_and_keep(m: nn.Module) -> dict:
        done["eval"] = evaluate(m, c, tok)
        return done["eval"]

    def export(m: nn.Module, where: Path) -> None:
        """The model in transformers' layout with the tokenizer beside it, and the result table in the run
        directory (`results.md`)."""
        pm.save(m, where)
        tok.save_pretrained(where, tokenizer_class="PreTrainedTokenizerFast")
        if "eval" in done:
            Path(where).parent.joinpath("results.md").write_text(results_table({c.family: done["eval"]}, c) + "\n")

    return Task(model, answer_loss, data, evaluate=evaluate_and_keep, export=export)


def plan(name: str, c: Qwen2VLShapesConfig, out: str | Path, overrides: list[str], resume: bool,
         quiet: bool = False) -> dict | None:
    """compare=true: both families, one after the other on the same data and seed, into OUT/qwen2_vl and
    OUT/qwen2_5_vl, then OUT/table.md and OUT/table.json with every run's wall time. Otherwise the usual single
    run (None). quiet: each run's notes to its train.log only."""
    from polymodal.train.recipes import run

    if not c.compare:
        return None
    out = Path(out)
    base = [o for o in overrides if o.partition("=")[0].strip() not in ("family", "compare")]
    results = {}
    for family in FAMILIES:
        t0 = time.perf_counter()
        results[family] = run(name, out / family, [*base, f"family={family}", "compare=false"], resume, quiet=quiet)
        results[family]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    table = results_table({f: r["eval"] for f, r in results.items()}, c)
    times = ", ".join(f"{f} {r['wall_seconds']:.0f} s (training {r['seconds']:.0f} s)" for f, r in results.items())
    text = f"{table}\n\nwall time: {times}\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(dump_json({f: {"eval": r["eval"], "wall_seconds": r["wall_seconds"],
                                                   "final_loss": r["final_loss"]} for f, r in results.items()},
                                              indent=2))
    summary = {"runs": results, "table": table}
    (out / "results.json").write_text(dump_json(summary, indent=2))
    return summary
