"""Qwen-VL's three training stages in small, with grounding, on ShapesWorld: the `qwen-vl-shapes` recipe (Bai et al.
2023, "Qwen-VL: A Versatile Vision-Language Model for Understanding, Localization, Text Reading, and Beyond", sec. 3
and Fig. 3).

    stage 0  the LLM, a small Qwen (v1) decoder from scratch (`polymodal.models.qwen_vl`'s LLaMA-shaped Qwen), learns
             the task's text alone: every caption, question, answer and box string of the training scenes, in both
             formats below, without images. The paper starts from the pretrained Qwen-7B; this stands in for it
    stage 1  pretraining at low resolution (`low_res`, 56 px): image-caption pairs, the LLM frozen; the vision tower
             and the adapter (the Resampler, its queries reading the patch grid through 2-D sin-cos positions) learn
    stage 2  multi-task pretraining at `high_res` (112 px), everything trained: captions, VQA, grounding
             (`<ref>the red circle</ref>` -> `<box>(x1,y1),(x2,y2)</box>`, the format of Qwen-VL's grounding
             evaluation) and referring (`what is at <box>...</box>? Answer:` -> `the red circle`)
    stage 3  supervised instruction tuning in ChatML (the real `QwenVLProcessor` and its chat template), the vision
             tower frozen, adapter and LLM trained (the official finetune.py's `fix_vit`: `transformer.visual`
             frozen but its `attn_pool`): "where is the red circle?" -> `<ref>the red circle</ref><box>(..)</box>`,
             "what is at <box>(..)</box>?" -> "the red circle", the questions, "Describe the image briefly."

Boxes are written as Qwen-VL writes them: corners normalized to [0, 1000) on each axis whatever the image's size
(`processing.grounding.RELATIVE_1000`), so the adapter's fixed queries can read the 56 px grid of stage 1 and the
112 px grid of stages 2-3 alike (the keys' positions are resampled to the grid; the queries' stay). Scenes hold
`objects_min`-`objects_max` distinct color-shape objects of ShapesWorld's classic vocabulary; six combinations never
appear in training.

Tokens: a word-level tokenizer of the world's language on Qwen's own split pattern (digits one by one, as Qwen's
tokenizer splits them, so "(120,340)" is ( 1 2 0 , 3 4 0 )), decoded by joining the pieces: the text comes back as it
was written, and `parse_regions` reads the answers as it reads the real model's. Qwen-VL's special tokens keep their
order (`<img>`, `</img>`, `<imgpad>` consecutive, as `visual.image_start_id` needs); `<ref>`, `</ref>`, `<box>`,
`</box>` are ordinary added tokens, so decoded answers keep them.

Report, after each stage (1-3), on fresh scenes of seen combinations and of **never-seen** ones: grounding accuracy
at IoU >= 0.5 (the answer parsed with `parse_regions`, converted to the image's pixels, IoU against the true box),
referring and VQA exact match, caption exact match; each stage timed. `stages=1,2,3` runs stage 0 into OUT/stage0
(unless `llm=` names one), then each stage into OUT/stageN from the one before; OUT/model links to the last stage's
model, exported in Qwen-VL's official layout (config.json with `visual`, `transformer.*` names) with tokenizer.json
and generation_config.json: `polymodal chat --model OUT/model --image scene.png --draw out.png "where is the red
circle?"` parses and draws the box.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.train.config import ConfigError, TrainConfig
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World
from polymodal.train.engine import Task, dump_json

STAGES = ("0", "1", "2", "3")
KINDS = ("caption", "vqa", "grounding", "referring")
STAGE_KINDS = {"0": KINDS, "1": ("caption",), "2": KINDS, "3": KINDS}
# rows per scene and kind in a stage's data (a scene has 2-4 objects and 5-7 questions)
REPEATS = {"caption": 1, "vqa": 2, "grounding": 2, "referring": 1}

# Qwen-VL's special tokens in its order (tokenization_qwen.py); <unk> (id 0): text outside the world's language
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>")
TAGS = ("<ref>", "</ref>", "<box>", "</box>")
CAPTION_PROMPT = "Generate the caption in English:"  # Qwen-VL's captioning prompt
CHAT_CAPTION = "Describe the image briefly."


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class QwenVLShapesConfig(TrainConfig):
    """`max_steps` and `lr` are set per stage by the plan from `stage_steps` / `stage_lrs` (stages 0, 1, 2, 3)."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    default_warmup: ClassVar[int] = 20
    weight_decay: float = 0.05
    log_every: int = 25
    save_every: int = 500
    keep_last: int = 1
    stages: tuple[str, ...] = ("1", "2", "3")
    stage: Literal["", "0", "1", "2", "3"] = ""  # the one stage a run trains (set by the plan from `stages`)
    stage_steps: tuple[str, ...] = ("400", "400", "1000", "400")  # docs/training.md: the shared 2-core budget
    stage_lrs: tuple[str, ...] = ("3e-3", "2e-3", "1e-3", "5e-4")
    init: str = ""  # the previous stage's run (its model/); empty: from scratch
    llm: str = ""  # stage 1's LLM: a stage-0 run; empty: stage 0 is trained first into OUT/stage0
    low_res: int = 56  # stage 1's images (4 x 4 patches of 14 px)
    high_res: int = 112  # stages 2-3 (8 x 8 patches); scenes are drawn at this size
    patch_size: int = 14
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    queries: int = 16  # the Resampler's queries (a 4 x 4 grid)
    width: int = 128  # the LLM; the adapter's width too (the official Resampler has width / 128 heads)
    layers: int = 4
    heads: int = 4
    objects_min: int = 2
    objects_max: int = 3
    train_scenes: int = 4000  # a pure function of the index: rendered as batches are drawn
    eval_scenes: int = 40  # per split (seen / never-seen combinations)

    def __post_init__(self):
        super().__post_init__()
        if not self.stages or any(s not in STAGES[1:] for s in self.stages) or list(self.stages) != sorted(
                set(self.stages)) or [int(s) for s in self.stages] != list(range(int(self.stages[0]),
                                                                                int(self.stages[-1]) + 1)):
            raise ConfigError(f"stages must be consecutive stages among 1, 2, 3 in order (1,2,3 or 2,3 or 3 ...); "
                              f"got {','.join(self.stages) or 'nothing'}")
        try:
            steps, lrs = self.steps_of, self.lrs_of
        except ValueError:
            steps, lrs = (), ()
        if len(steps) != 4 or min(steps) < 1 or len(lrs) != 4 or min(lrs) <= 0:
            raise ConfigError("stage_steps and stage_lrs take four values, for stages 0, 1, 2, 3 (steps >= 1, "
                              f"learning rates > 0); got {','.join(self.stage_steps)} and {','.join(self.stage_lrs)}")
        for name in ("low_res", "high_res"):
            if getattr(self, name) % self.patch_size or getattr(self, name) < 2 * self.patch_size:
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of patch_size={self.patch_size} "
                                  "and hold at least 2 x 2 patches")
        side = int(self.queries ** 0.5)
        if side * side != self.queries or self.width % 4:
            raise ConfigError(f"queries={self.queries} must be a square (the adapter's query grid) and width a "
                              "multiple of 4 (2-D sin-cos positions)")
        if self.width % 128 or self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"width={self.width} must be a multiple of 128 (the Resampler has width / 128 heads) "
                              f"and of heads={self.heads}, with an even head size")
        if self.vision_width % self.vision_heads:
            raise ConfigError(f"vision_width {self.vision_width} must be a multiple of vision_heads "
                              f"{self.vision_heads}")
        if not 1 <= self.objects_min <= self.objects_max <= 4:
            raise ConfigError(f"objects must satisfy 1 <= objects_min <= objects_max <= 4 (ShapesWorld's held-out "
                              f"split has 6 combinations); got {self.objects_min}, {self.objects_max}")
        for name in ("train_scenes", "eval_scenes", "vision_layers", "layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.init and self.stage in ("", "0") and self.stages[0] == "1":
            raise ConfigError("init= starts a stage from the previous one's run: use it with stages=2... or 3 "
                              "(stage 1 starts from llm=)")

    @property
    def steps_of(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.stage_steps)

    @property
    def lrs_of(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.stage_lrs)

    @property
    def resolution(self) -> int:
        """The images' size in this run's stage: low in stage 1, high after."""
        return self.low_res if self.stage in ("0", "1") else self.high_res


# ------------------------------------------------------------------------------------------- the world


def scenes(c: QwenVLShapesConfig, seed: int, split: str):
    from polymodal.data import ShapesWorld

    return ShapesWorld(c.high_res, seed=seed, split=split, objects=(c.objects_min, c.objects_max))


def phrase(o) -> str:
    return f"the {o.color} {o.shape}"


def box_text(box: tuple[float, float, float, float], size: int) -> str:
    """A pixel box (x0, y0, x1, y1) of a `size`-pixel image -> `<box>(x1,y1),(x2,y2)</box>`, each coordinate
    int(v / size * 1000) in [0, 1000) as Qwen-VL normalizes them."""
    x0, y0, x1, y1 = (min(999, max(0, int(v / size * 1000))) for v in box)
    return f"<box>({x0},{y0}),({x1},{y1})</box>"


def task_pairs(s, kind: str, chat: bool, size: int, rng: random.Random,
               count: int = 1) -> list[tuple[str, str, object]]:
    """(prompt, answer, truth) triples of one kind about a scene: the pretraining format (stages 1-2: plain prompts
    after the image, Qwen-VL's "Generate the caption in English:", "... Answer:", `<ref>..</ref>` -> `<box>..</box>`)
    or the chat format of stage 3. `count` of them (objects or questions drawn without repeating while they last).
    truth: what a right answer is (grounding: the object's pixel box; caption: every true caption)."""
    if kind == "caption":
        prompt, answer = (CHAT_CAPTION, s.caption) if chat else (CAPTION_PROMPT, " " + s.caption)
        return [(prompt, answer, s.captions)][:count]
    if kind == "vqa":
        qa = list(s.qa)
        rng.shuffle(qa)
        return [(q, a, a) if chat else (f"{q} Answer:", " " + a, a) for q, a in qa[:count]]
    objs = list(s.objects)
    rng.shuffle(objs)
    out = []
    for o in objs[:count]:
        box = box_text(o.box, size)
        if kind == "grounding":
            out.append((f"where is {phrase(o)}?", f"<ref>{phrase(o)}</ref>{box}", o.box) if chat else
                       (f"<ref>{phrase(o)}</ref>", box, o.box))
        elif kind == "referring":
            out.append((f"what is at {box}?", phrase(o), phrase(o)) if chat else
                       (f"what is at {box}? Answer:", " " + phrase(o), phrase(o)))
        else:
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return out


# ------------------------------------------------------------------------------------------- the tokenizer


def _corpus() -> list[str]:
    """Every piece of text the recipe writes: the templates, the world's words (held-out combinations included, so
    their names are words and not <unk>), digits and the box punctuation."""
    from polymodal.data.shapes import COLORS, NUMBER_WORDS, SHAPES, ShapesWorld

    # the chat template's text (QWEN_VL_CHAT_TEMPLATE), the pretraining prompt's, the box punctuation
    texts = ["system\nYou are a helpful assistant.", "\nuser\nPicture 1: ", "\nassistant\n", "\n", CAPTION_PROMPT,
             CHAT_CAPTION, " Answer:", "(0123456789,0123456789),(0123456789,0123456789)", " ".join(NUMBER_WORDS)]
    for color in COLORS:
        for shape in SHAPES:
            for article in ("a", "an", "the"):
                texts += [f"{article} {color} {shape}", f" {article} {color} {shape}", f"is there {article} {color} "
                          f"{shape}?", f"what color is {article} {shape}?", f"what shape is {article} {color} object?"]
    rng = random.Random(0)
    for split in ("train", "heldout"):
        world = ShapesWorld(64, seed=0, split=split, objects=(1, 4))
        for i in range(100):
            s = world.sample(i)
            for chat in (False, True):
                for kind in KINDS:
                    for q, a, _ in task_pairs(s, kind, chat, 64, rng, count=9):
                        texts += [q, a, " " + a, a.strip()]
            texts += list(s.captions)
    return texts


def shapes_tokenizer():
    """The word-level `TextTokenizer` of the world's language with Qwen-VL's special tokens and chat template: Qwen's
    split pattern cuts the text into pieces (a word with its leading space, one digit, a run of punctuation), each
    piece a token; decoding joins them back as they were. <|endoftext|> ends pretraining text and pads,
    <|im_end|> ends a chat turn."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from polymodal.processing.qwen_vl import QWEN_VL_CHAT_TEMPLATE
    from polymodal.processing.text import QWEN2_SPLIT, TextTokenizer

    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    pieces = set()
    for text in _corpus():
        for part in [text] if not any(t in text for t in TAGS) else _untag(text):
            pieces.update(p for p, _ in split.pre_tokenize_str(part))
    vocab = {t: i for i, t in enumerate(["<unk>", *sorted(pieces)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.decoder = decoders.Fuse()  # the pieces cover the text: joined, they are the text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return TextTokenizer(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
                         chat_template=QWEN_VL_CHAT_TEMPLATE, extra_eos_tokens=["<|im_end|>"], copy=False)


def _untag(text: str) -> list[str]:
    """The text between the grounding tags (the tags are added tokens, matched before the split)."""
    import re

    return [p for p in re.split("|".join(re.escape(t) for t in TAGS), text) if p]


# ------------------------------------------------------------------------------------------- the model


def model_config(c: QwenVLShapesConfig, tok, image_size: int):
    """A small Qwen-VL: the tower (`vision_*`, patches of `patch_size`), a Resampler of `queries` queries, and a
    Qwen (v1) LLM of `width` over the tokenizer's vocabulary (q/k/v biased, o and MLP not, untied head, as
    models/qwen_vl.py's Qwen)."""
    from polymodal.models.llama import LlamaConfig
    from polymodal.models.qwen_vl import QwenVisionConfig, QwenVLConfig

    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=c.width, intermediate_size=2 * c.width,
                       num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=True, attention_out_bias=False,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = QwenVisionConfig(image_size=image_size, patch_size=c.patch_size, width=c.vision_width,
                              layers=c.vision_layers, heads=c.vision_heads, mlp_ratio=2.0, n_queries=c.queries,
                              output_dim=c.width, image_start_id=tok.token_to_id("<img>"))
    return QwenVLConfig(vision=vision, text=text)


def new_model(c: QwenVLShapesConfig, tok, image_size: int):
    """Built from scratch with the modules' own initialization (PyTorch's: Kaiming-uniform linear weights, N(0, 1)
    embeddings; the official tower's N(0, width^-1/2) positions and projection), the Resampler's queries ~ N(0, 0.02)
    as visual.py's trunc_normal_ starts them, its 2-D sin-cos positions as built (fixed). Measured here: with
    N(0, 0.02) everywhere instead (BERT's and OPT's initializer_range), the 4-layer LLM had not learned to copy the
    phrase of "where is the red circle?" into its <ref> after 800 steps of stage 0; with this it does after ~300."""
    import polymodal as pm

    model = pm.build("qwen_vl", model_config(c, tok, image_size))
    with torch.no_grad():
        model.visual.attn_pool.query.normal_(0, 0.02)
    return model


def trainable(stage: str, name: str) -> bool:
    """What each stage trains (the paper's Fig. 3; stage 3 as finetune.py's fix_vit). The Resampler's positions
    are fixed in every stage."""
    if name == "visual.attn_pool.pos_embed":
        return False
    if stage == "0":
        return name.startswith("language_model.")
    if stage == "1":
        return name.startswith("visual.")
    if stage == "2":
        return True
    return name.startswith(("language_model.", "visual.attn_pool."))


def part(name: str) -> str:
    """A parameter's part: the vision tower (with ln_post and proj, as the official VisionTransformer holds them),
    the adapter (the Resampler), the LLM."""
    if name.startswith("visual.attn_pool."):
        return "adapter"
    return "tower" if name.startswith("visual.") else "llm"


def digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor's bytes: what "bit-identical" is checked against."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def changed(before: dict[str, str], model: nn.Module) -> dict[str, bool]:
    """Per part (tower, adapter, llm): whether any tensor changed."""
    now = digests(model)
    parts: dict[str, bool] = {}
    for k, d in before.items():
        parts[part(k)] = parts.get(part(k), False) or now[k] != d
    return parts


def start_from(c: QwenVLShapesConfig, tok):
    """The stage's model: `init` (the previous stage's run: its weights, the stage's resolution) or new."""
    import polymodal as pm

    model = new_model(c, tok, c.resolution)
    source = c.llm if c.stage == "1" and c.llm else c.init
    if source:
        try:
            trained = pm.load(Path(source) / "model")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{'llm' if source == c.llm else 'init'}={source!r}: expected a finished qwen-vl-shapes "
                              f"run ({e})") from None
        want = replace(model.config, vision=replace(model.config.vision, image_size=0))
        got = getattr(trained, "config", None)
        if got is None or not hasattr(got, "vision") or replace(got, vision=replace(got.vision, image_size=0)) != want:
            raise ConfigError(f"{source!r} is not a qwen-vl-shapes run of this model's sizes")
        model.load_state_dict(trained.state_dict())
    return model


# ------------------------------------------------------------------------------------------ rows and the loss


def processor(tok, c: QwenVLShapesConfig, size: int):
    """The real QwenVLProcessor: `size` x `size` bicubic images, `queries` <imgpad> between <img> and </img>."""
    from polymodal.processing.qwen_vl import QwenVLProcessor, qwen_vl_image_processor

    return QwenVLProcessor(tok, qwen_vl_image_processor(size), image_tokens=c.queries, context_length=2048)


def plain_prompt(prompt: str) -> str:
    """Pretraining text (stages 1-2): the image as the official tokenizer's from_list_format writes it, then the
    prompt."""
    return f"Picture 1: <img><imgpad></img>\n{prompt}"


def ask(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def example(proc, image, prompt: str, answer: str, chat: bool) -> dict:
    """One training row through the real processor: the prompt (with the image), the answer and its end
    (<|im_end|> in chat, <|endoftext|> in pretraining text); labels -100 except on the answer."""
    tok = proc.tokenizer
    inputs = proc(ask(image, prompt)) if chat else proc(text=plain_prompt(prompt), images=[image])
    end = tok.token_to_id("<|im_end|>" if chat else "<|endoftext|>")
    answer_ids = torch.tensor(tok.encode(answer, add_special_tokens=False) + [end])
    ids = torch.cat([inputs["input_ids"][0], answer_ids])  # (T,)
    labels = torch.full_like(ids, -100)
    labels[-len(answer_ids):] = answer_ids
    return {"input_ids": ids, "labels": labels, "pixel_values": inputs["pixel_values"]}


def text_example(tok, prompt: str, answer: str, chat: bool) -> dict:
    """Stage 0's row: the same text without the image, every token a target (language-model pretraining)."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                       add_generation_prompt=True) + answer + "<|im_end|>"
    else:
        text = prompt + answer + "<|endoftext|>"
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    return {"input_ids": ids, "labels": ids.clone()}


def collate_examples(rows: list[dict], pad_id: int) -> dict:
    """Rows -> one right-padded batch (B, T), labels -100 at padding, the images stacked (N, 3, S, S)."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = r["input_ids"], r["labels"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "pixel_values" in rows[0]:
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    return batch


class AnswerLoss(nn.Module):
    """The QwenVL being trained; forward(batch) -> (loss, {"token_accuracy"}). The arithmetic of `QwenVL.forward`
    (the image features over each <img> span, then the decoder), with logits only where a label is."""

    def __init__(self, qwen):
        super().__init__()
        self.qwen = qwen

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pixel_values: Tensor | None = None):
        m = self.qwen
        lm = m.language_model
        h = m.merge(input_ids, lm.embed(input_ids), pixel_values)  # (B, T, D)
        positions, mask = lm.decoder_inputs(h, attention_mask, None, None)
        h = lm.decode(h, mask=mask, positions=positions)
        target = labels[:, 1:]
        pick = target != -100
        logits = lm.head(h[:, :-1][pick])  # (n, V): the positions that predict a target token
        loss = F.cross_entropy(logits.float(), target[pick])
        return loss, {"token_accuracy": (logits.argmax(-1) == target[pick]).float().mean().detach()}


def answer_loss(model: nn.Module, batch: dict):
    return model(**batch)


# -------------------------------------------------------------------------------------------- evaluation


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1), corners in either order; 0 when both are empty."""
    ax0, ax1, ay0, ay1 = min(a[0], a[2]), max(a[0], a[2]), min(a[1], a[3]), max(a[1], a[3])
    bx0, bx1, by0, by1 = min(b[0], b[2]), max(b[0], b[2]), min(b[1], b[3]), max(b[1], b[3])
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def grounded_box(answer: str, image_size: tuple[int, int]) -> tuple[float, ...] | None:
    """The first box of an answer, read in Qwen-VL's 0-1000 frame and converted to the image's pixels."""
    from polymodal.processing.grounding import RELATIVE_1000, parse_regions

    boxes = [r for r in parse_regions(answer, RELATIVE_1000) if r.kind == "box"]
    return boxes[0].to_image(image_size).coords if boxes else None


MAX_NEW = {"caption": 24, "vqa": 4, "grounding": 32, "referring": 6}


@torch.no_grad()
def answer(model, proc, prompts: list[tuple[object, str]], chat: bool, max_new_tokens: int) -> list[str]:
    """Greedy answers to (image, prompt) pairs as one left-padded batch, each up to its end token."""
    tok = proc.tokenizer
    if chat:
        inputs = proc([ask(image, p) for image, p in prompts])
    else:
        inputs = proc(text=[plain_prompt(p) for _, p in prompts], images=[[image] for image, _ in prompts])
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    ends = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=ends)
    texts = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in ends), len(row))
        texts.append(tok.decode(row[:cut]))
    return texts


def eval_items(c: QwenVLShapesConfig, split: str, chat: bool) -> list[tuple[str, object, str, object]]:
    """(kind, image, prompt, truth) for `eval_scenes` fresh scenes of a split: grounding and referring for every
    object, every question, the caption."""
    items = []
    rng = random.Random(f"eval:{split}")
    for s in scenes(c, 1, split).batch(0, c.eval_scenes):
        for kind in KINDS:
            n = len(s.objects) if kind in ("grounding", "referring") else len(s.qa) if kind == "vqa" else 1
            items += [(kind, s.image, p, truth) for p, _, truth in task_pairs(s, kind, chat, c.high_res, rng, n)]
    return items


def score(kind: str, got: str, truth, size: int) -> tuple[bool, float | None]:
    """(right, IoU for grounding)."""
    if kind == "grounding":
        box = grounded_box(got, (size, size))
        value = 0.0 if box is None else iou(box, truth)
        return value >= 0.5, value
    if kind == "caption":
        return got.strip() in truth, None
    return got.strip() == truth, None


@torch.no_grad()
def evaluate(model, c: QwenVLShapesConfig, tok, batch: int = 64) -> dict:
    """Per split ("seen": combinations trained on; "never_seen": held out of training), in the stage's format and
    resolution: grounding accuracy at IoU >= 0.5 and mean IoU, referring / VQA / caption exact match."""
    model.eval()
    chat = c.stage == "3"
    proc = processor(tok, c, c.resolution)
    result: dict = {}
    for split, name in (("train", "seen"), ("heldout", "never_seen")):
        items = eval_items(c, split, chat)
        hits: dict[str, list[bool]] = {}
        ious: list[float] = []
        examples: dict[str, list] = {}
        for kind in KINDS:
            mine = [it for it in items if it[0] == kind]
            for start in range(0, len(mine), batch):
                chunk = mine[start:start + batch]
                got = answer(model, proc, [(im, p) for _, im, p, _ in chunk], chat, MAX_NEW[kind])
                for (_, _, p, truth), g in zip(chunk, got):
                    ok, value = score(kind, g, truth, c.high_res)
                    hits.setdefault(kind, []).append(ok)
                    if value is not None:
                        ious.append(value)
                    if len(examples.setdefault(kind, [])) < 2:
                        examples[kind].append([p, truth if isinstance(truth, str) else str(truth), g])
        result[name] = {k: sum(v) / len(v) for k, v in hits.items()}
        result[name]["mean_iou"] = sum(ious) / len(ious) if ious else 0.0
        result[name]["counts"] = {k: len(v) for k, v in hits.items()}
        result[f"{name}_examples"] = examples
    return result


# ------------------------------------------------------------------------------------------------ export


def export(model, where: Path, tok) -> None:
    """Qwen-VL's official layout (config.json with `visual`, `transformer.*` tensor names) with tokenizer.json (the
    chat template in tokenizer_config.json) and generation_config.json (ends at <|endoftext|> or <|im_end|>, as the
    official generation_config's eos and chat stop words): what pm.load, QwenVLProcessor.from_pretrained and
    `polymodal chat --image ... --draw` read."""
    import polymodal as pm

    where = Path(where)
    pm.save(model, where)
    tok.save_pretrained(where)
    ends = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    (where / "generation_config.json").write_text(json.dumps({"eos_token_id": ends,
                                                              "pad_token_id": tok.pad_token_id}, indent=2))


# ------------------------------------------------------------------------------------------------ recipe


def build_qwen_vl_shapes(c: QwenVLShapesConfig, world: World) -> Task:
    if not c.stage:
        raise ConfigError("build_qwen_vl_shapes builds one stage (stage=0, 1, 2 or 3); `plan` runs `stages`")
    tok = shapes_tokenizer()
    model = start_from(c, tok)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(c.stage, name))
    before = digests(model)
    proc = processor(tok, c, c.resolution)
    train = scenes(c, 0, "train")
    kinds = STAGE_KINDS[c.stage]
    rows = [(i, kind, j) for i in range(c.train_scenes) for kind in kinds for j in range(REPEATS[kind])]
    chat = c.stage == "3"

    def make(row: tuple[str, int, int]) -> list[dict]:
        i, kind, j = row
        s = train.sample(i)
        rng = random.Random(f"{c.seed}:{i}:{kind}:{j}")
        if c.stage == "0":  # both formats of the text, no image
            return [text_example(tok, *task_pairs(s, kind, fmt, c.high_res, rng)[0][:2], fmt) for fmt in (False, True)]
        return [example(proc, s.image, *task_pairs(s, kind, chat, c.high_res, rng)[0][:2], chat)]

    def collate(index: Tensor) -> dict:
        return collate_examples([r for k in index.tolist() for r in make(rows[k])], tok.pad_token_id)

    if len(rows) < c.batch_size:
        raise ConfigError(f"train_scenes={c.train_scenes} gives {len(rows)} rows, fewer than one batch of "
                          f"{c.batch_size}")
    data = ShuffledBatches(len(rows), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)

    def evaluate_and_check(m: AnswerLoss) -> dict:
        parts = changed(before, m.qwen)
        frozen = {part(n) for n in before} - {part(n) for n in before if trainable(c.stage, n)}
        key = "visual.attn_pool.pos_embed"
        result = {"changed": parts, "frozen": sorted(frozen), "frozen_bit_identical": not any(parts[p] for p in frozen),
                  "positions_fixed": before[key] == digests(m.qwen)[key]}
        if c.stage != "0":
            result.update(evaluate(m.qwen, c, tok))
        return result

    def export_and_scene(m: AnswerLoss, where: Path) -> None:
        export(m.qwen, where, tok)
        scenes(c, 1, "heldout").sample(0).image.save(Path(where).parent / "scene.png")

    return Task(AnswerLoss(model), answer_loss, data, evaluate=evaluate_and_check, export=export_and_scene)


# ----------------------------------------------------------------------------------------- the stages


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].strip() not in keys]


def _stage_overrides(c: QwenVLShapesConfig, stage: str) -> list[str]:
    steps = c.steps_of[int(stage)]
    return [f"stage={stage}", f"max_steps={steps}", f"lr={c.lrs_of[int(stage)]}",
            f"save_every={min(c.save_every, steps)}"]


def plan(name: str, c: QwenVLShapesConfig, out: str | Path, overrides: list[str], resume: bool,
         quiet: bool = False) -> dict | None:
    """How `polymodal train qwen-vl-shapes` runs `stages`: stage 0 into OUT/stage0 when stage 1 runs without `llm=`,
    then each stage an ordinary run of the loop into OUT/stageN from the one before (the first from `init=` when it
    is 2 or 3), OUT/model linking the last one's model; OUT/table.md with each stage's results and times. A single
    stage (`stages=3 init=DIR`) trains into OUT itself. Each run resumes on its own (`--resume`)."""
    from polymodal.train.recipes import run

    if c.stage:
        return None
    out = Path(out)
    base = _without(overrides, "stages", "stage", "init", "llm", "max_steps", "lr")
    runs: list[tuple[str, list[str]]] = []
    previous = c.init
    if c.stages[0] == "1":
        if not c.llm:
            runs.append(("0", []))
        previous = c.llm or str(out / "stage0")
    for stage in c.stages:
        key = "llm" if stage == "1" else "init"
        runs.append((stage, [f"{key}={previous}"] if previous else []))
        previous = str(out / f"stage{stage}")
    if len(runs) == 1:  # one stage (2 or 3, from `init`): an ordinary run into OUT itself
        stage, extra = runs[0]
        return run(name, out, [*base, *extra, *_stage_overrides(c, stage)], resume, quiet)
    results = {}
    for stage, extra in runs:
        t0 = time.perf_counter()
        results[stage] = run(name, out / f"stage{stage}", [*base, *extra, *_stage_overrides(c, stage)], resume,
                             quiet)
        results[stage]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    link = out / "model"
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(Path(f"stage{c.stages[-1]}") / "model", target_is_directory=True)
    table = results_table(results)
    (out / "table.md").write_text(table + "\n")
    summary = {**results[c.stages[-1]], "stages": results, "stages_table": table}
    (out / "results.json").write_text(dump_json(summary, indent=2))
    return summary


def results_table(results: dict) -> str:
    """Markdown: per stage, the accuracies on seen / never-seen scenes and the times."""
    head = ["stage", "grounding @ IoU 0.5", "mean IoU", "referring", "VQA", "caption", "steps", "training s",
            "wall s", "last loss"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, r in results.items():
        e = r.get("eval", {})

        def cell(key: str, e=e) -> str:
            if "seen" not in e:
                return "-"
            return f"{100 * e['seen'].get(key, 0):.1f}% / {100 * e['never_seen'].get(key, 0):.1f}%" if key != \
                "mean_iou" else f"{e['seen']['mean_iou']:.2f} / {e['never_seen']['mean_iou']:.2f}"
        rows.append(f"| {stage} | " + " | ".join(cell(k) for k in ("grounding", "mean_iou", "referring", "vqa",
                                                                    "caption"))
                    + f" | {r.get('steps', '-')} | {r.get('seconds', 0):.0f} | {r.get('wall_seconds', 0):.0f} | "
                    f"{r.get('final_loss', float('nan')):.3f} |")
    return "\n".join(rows)
