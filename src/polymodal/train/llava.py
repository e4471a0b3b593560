"""LLaVA's two training stages on ShapesWorld with a real LLM, the `llava-shapes` recipe (Liu et al. 2023, "Visual
Instruction Tuning", sec. 4.1 and 5; LLaVA-1.5, Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
for the 2-layer GELU projector).

    LLM      the packaged SmolLM2-135M-Instruct (`llm=smollm2`, a Llama: 30 layers of width 576, 49,152 tokens, tied
             embeddings) or any Llama checkpoint (`llm=DIR` or a .gguf), with its tokenizer and ChatML template;
             <image> is added as a special token of id 49,152 (one embedding row more, the mean of the others)
    tower    the clip-shapes recipe's CLIP image tower (`clip=DIR`; by default the checkpoint the demo trains and
             caches, trained here first when it is missing), always frozen. Its features are read at
             `feature_layer` (-1 here: the tower has 2 blocks, and LLaVA's -2 of ViT-L's 24 would be the first)
    projector LLaVA-1.5's Linear -> GELU -> Linear from the tower's width to the LLM's
    stage 1  feature alignment: only the projector learns, on image-caption pairs ("Describe the image briefly." ->
             the scene's caption), LLM and tower frozen
    stage 2  visual instruction tuning: projector and the whole LLM learn (a full fine-tune of the 135 M, no LoRA),
             loss on the assistant's answers only, on instruction data of LLaVA's three kinds built from
             ShapesWorld's objects and boxes by template (`kinds`):
               conversation  multi-turn Q&A about colors, shapes, counts, positions
               description   every object with size, color, shape and where it is
               reasoning     counting ("how many shapes are not blue?") and relations ("what is left of the red
                             circle?"), with the reasoning written out before the answer
    report   greedy answers on fresh scenes of seen and never-seen color-shape combinations, per kind (each parsed
             back from its template), the frozen parts proven bit-identical (SHA-256 of every tensor before and
             after), and a text-only chat through the trained model next to the original LLM's answer

`stages=1,2` trains stage 1 into OUT/stage1, then stage 2 from its projector into OUT/stage2 (OUT/model links to the
final model); `stages=2` trains stage 2 alone (projector from `init=DIR`, a stage-1 run, or from scratch); `stages=1`
stage 1 alone. `ablation=true` trains stage 1 once and stage 2 six ways (after stage 1, without it, and after it
without each data kind) and writes OUT/ablation.md. Each stage is an ordinary run of the one loop: `--resume`
continues any of them from their checkpoints. The model exports in transformers' `LlavaForConditionalGeneration`
layout with the tokenizer, chat template and image processor beside it (`polymodal chat --model OUT/model --image
scene.png "what color is the circle?"`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
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

SMOLLM2 = "smollm2"
IMAGE_TOKEN = "<image>"
KINDS = ("conversation", "description", "reasoning")
_SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# SmolLM2-135M-Instruct's ChatML template (its GGUF's), taking content parts as VLM templates do: an image part is
# "<image>\n" before the text (LLaVA-1.5's "<image>\n{question}"), and a conversation holding an image gets no default
# system message (20 tokens per training row saved; LLaVA-1.5 trains with a fixed system prompt instead). A text-only
# conversation renders exactly as SmolLM2's own template renders it.
SMOLLM2_LLAVA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set ns.images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' and not ns.images %}{{ '" + _SMOLLM2_SYSTEM + "' }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# LLaVA's stage-1 instructions are a list of "describe briefly" phrasings (the paper's Table 8); four of them
BRIEF = ("Describe the image briefly.", "What is in the picture?", "Give a short description of the image.",
         "Summarize the scene.")


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class LlavaShapesConfig(TrainConfig):
    """`max_steps`, `batch_size`, `lr` are stage 2's; stage 1 has its own (`stage1_*`)."""

    max_steps: int = 10  # docs/training.md: the budget of a shared 2-core machine
    batch_size: int = 4
    lr: float = 1e-4  # LLaVA's stage 2 uses 2e-5 for 3 epochs; this run has ~300 rows, so a larger step
    default_warmup: ClassVar[int] = 1
    weight_decay: float = 0.0  # LLaVA's fine-tuning: no weight decay
    log_every: int = 1
    save_every: int = 5
    keep_last: int = 1  # a checkpoint holds the LLM and its AdamW moments (~1.6 GB with SmolLM2)
    stages: tuple[str, ...] = ("1", "2")
    stage: Literal["", "1", "2"] = ""  # the one stage a run trains (set by the plan from `stages`)
    stage1_steps: int = 16
    stage1_batch_size: int = 8
    stage1_lr: float = 2e-3  # LLaVA's stage 1: 2e-3 for the projector alone
    init: str = ""  # stage 2: a stage-1 run (its model/) whose projector it starts from; empty: a random projector
    kinds: tuple[str, ...] = KINDS  # stage 2's instruction data
    ablation: bool = False
    llm: str = SMOLLM2
    clip: str = ""  # a clip-shapes run's model/ (or any CLIP ViT checkpoint); empty: the demo's cached one
    feature_layer: int = -1
    scene_size: int = 64  # scenes are drawn at this size; the processor resizes them to the tower's
    objects_min: int = 1
    objects_max: int = 3
    train_scenes: int = 2000  # a pure function of the index: rendered as batches are drawn
    eval_scenes: int = 6  # per split (seen / never-seen combinations)

    def __post_init__(self):
        super().__post_init__()
        if not self.stages or any(s not in ("1", "2") for s in self.stages) or list(self.stages) != sorted(
                set(self.stages)):
            raise ConfigError(f"stages must be 1,2 or 1 or 2; got {','.join(self.stages) or 'nothing'}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ConfigError(f"kinds must be some of {', '.join(KINDS)}; got {','.join(self.kinds) or 'nothing'}")
        if not 1 <= self.objects_min <= self.objects_max <= 4:
            raise ConfigError(f"objects must satisfy 1 <= objects_min <= objects_max <= 4 (ShapesWorld's held-out "
                              f"split has 6 combinations); got {self.objects_min}, {self.objects_max}")
        for name in ("stage1_steps", "stage1_batch_size", "train_scenes", "eval_scenes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stage1_lr <= 0:
            raise ConfigError(f"stage1_lr must be positive, got {self.stage1_lr}")
        if self.scene_size < 16:
            raise ConfigError(f"scene_size must be at least 16 pixels, got {self.scene_size}")
        if self.init and self.stages != ("2",) and self.stage != "2":
            raise ConfigError("init= starts stage 2 from a stage-1 run: use it with stages=2")
        rows = self.train_scenes * (1 if self.stage == "1" else len(self.kinds))
        if rows < self.batch_size:
            raise ConfigError(f"train_scenes={self.train_scenes} gives {rows} rows, fewer than one batch of "
                              f"{self.batch_size}")


# ------------------------------------------------------------------------------------------- the world


def vocabulary():
    """ShapesWorld's classic colors and shapes (what clip-shapes' tower was trained on) with its held-out
    combinations, and two size words, so that a description says size, color, shape and place."""
    from polymodal.data.shapes import COLORS, HELD_OUT, SHAPES, Vocabulary

    return Vocabulary(COLORS, SHAPES, HELD_OUT, sizes=("small", "large"))


def scenes(c: LlavaShapesConfig, seed: int, split: str):
    from polymodal.data import ShapesWorld

    return ShapesWorld(c.scene_size, seed=seed, split=split, objects=(c.objects_min, c.objects_max),
                       vocab=vocabulary())


_WHERE = {("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
          ("middle", "left"): "on the left", ("middle", "center"): "in the center",
          ("middle", "right"): "on the right", ("bottom", "left"): "at the bottom left",
          ("bottom", "center"): "at the bottom", ("bottom", "right"): "at the bottom right"}


def where(o, size: int) -> str:
    """The object's place by thirds of the image: 'at the top left', 'in the center', ..."""
    def third(v: float, names: tuple[str, str, str]) -> str:
        return names[min(2, int(3 * v / size))]

    return _WHERE[(third(o.center[1], ("top", "middle", "bottom")), third(o.center[0], ("left", "center", "right")))]


def _reading_order(objs, size: int):
    return sorted(objs, key=lambda o: (min(2, int(3 * o.center[1] / size)), o.center[0]))


def _count(n: int, noun: str = "shape") -> str:
    from polymodal.data.shapes import NUMBER_WORDS

    return f"{NUMBER_WORDS[n]} {noun}{'s' if n != 1 else ''}"


def describe(s, size: int) -> str:
    """Detailed description: the count, then every object in reading order with size, color, shape and place."""
    from polymodal.data.shapes import _a

    k = len(s.objects)
    head = f"There {'is' if k == 1 else 'are'} {_count(k)}."
    parts = [f"{_a(o.name)[0].upper()}{_a(o.name)[1:]} {where(o, size)}." for o in _reading_order(s.objects, size)]
    return " ".join([head, *parts])


def _name_pattern() -> str:
    v = vocabulary()
    return (f"(small|large) ({'|'.join(v.colors)}) ({'|'.join(v.shapes)})")


def parse_description(text: str) -> tuple[str | None, frozenset[tuple[str, str, str, str]]]:
    """A description's count word and its objects as (size, color, shape, place); what `describe` writes reads back
    as it was made. Unparsable text gives (None, the objects found)."""
    places = "|".join(re.escape(w) for w in _WHERE.values())
    count = re.match(r"There (?:is|are) (\w+) shapes?\.", text.strip())
    objs = re.findall(rf"an? {_name_pattern()} ({places})\.", text, flags=re.IGNORECASE)
    return (count.group(1) if count else None), frozenset((a.lower(), b.lower(), c_.lower(), d) for a, b, c_, d in objs)


def description_truth(s, size: int) -> tuple[str, frozenset[tuple[str, str, str, str]]]:
    from polymodal.data.shapes import NUMBER_WORDS

    return NUMBER_WORDS[len(s.objects)], frozenset((o.size, o.color, o.shape, where(o, size)) for o in s.objects)


def conversation_pairs(s, size: int) -> list[tuple[str, str]]:
    """ShapesWorld's own questions (count, color, shape, existence, relative position) and, for each object, its
    place in the image."""
    pairs = list(s.qa)
    for o in s.objects:
        pairs.append((f"where is the {o.color} {o.shape}?", where(o, size).split(" ", 2)[-1]))
    return pairs


RELATIONS = ("left of", "right of", "above", "below")


def reasoning_pairs(s, rng: random.Random) -> list[tuple[str, str, str]]:
    """Two questions that need more than one look: (question, answer with its reasoning, the answer alone).

    counting   "how many shapes are not blue?" -> "There are three shapes and one is blue, so two are not blue."
    relation   "what is left of the red circle?" -> "the small blue square." or "nothing." (ShapesWorld's relation:
               along the axis that separates the two objects most)"""
    from polymodal.data.shapes import NUMBER_WORDS, relation

    objs = s.objects
    colors = sorted({o.color for o in objs})
    color = rng.choice(colors) if rng.random() < 0.7 else rng.choice(list(vocabulary().colors))
    k, n = sum(o.color == color for o in objs), len(objs)
    have = "none is" if k == 0 else f"{NUMBER_WORDS[k]} {'is' if k == 1 else 'are'}"
    rest = f"{NUMBER_WORDS[n - k]} {'is' if n - k == 1 else 'are'}"
    counting = (f"how many shapes are not {color}?",
                f"There {'is' if n == 1 else 'are'} {_count(n)} and {have} {color}, so {rest} not {color}.",
                NUMBER_WORDS[n - k])
    anchor = rng.choice(objs)
    rel = rng.choice(RELATIONS)
    hits = sorted((o for o in objs if o is not anchor and relation(o, anchor) == rel), key=lambda o: o.center[0])
    names = " and ".join(f"the {o.name}" for o in hits) if hits else "nothing"
    relation_q = (f"what is {rel} the {anchor.color} {anchor.shape}?", f"{names[0].upper()}{names[1:]}.",
                  names)
    return [counting, relation_q]


def parse_reasoning(question: str, text: str) -> str | None:
    """The answer alone, read back from a reasoning reply: the count after "so", or the objects named ("nothing")."""
    text = text.strip()
    if question.startswith("how many"):
        m = re.search(r"so (\w+) (?:is|are) not", text)
        return m.group(1).lower() if m else None
    if text.lower().rstrip(".") == "nothing":
        return "nothing"
    names = re.findall(_name_pattern(), text, flags=re.IGNORECASE)
    return " and ".join(f"the {a} {b} {c_}".lower() for a, b, c_ in names) if names else None


def instruction(s, kind: str, size: int, rng: random.Random) -> list[dict]:
    """One training conversation of a kind (LLaVA's three), the image in the first user turn."""
    if kind == "caption":
        turns = [(rng.choice(BRIEF), s.caption)]
    elif kind == "conversation":
        pairs = conversation_pairs(s, size)
        rng.shuffle(pairs)
        turns = pairs[: rng.randint(2, 3)]
    elif kind == "description":
        turns = [(rng.choice(("Describe the image in detail.", "Describe every shape in the picture.")),
                  describe(s, size))]
    elif kind == "reasoning":
        turns = [(q, a) for q, a, _ in reasoning_pairs(s, rng)]
        turns = [rng.choice(turns)]
    else:
        raise ValueError(f"unknown kind {kind!r}; known: caption, {', '.join(KINDS)}")
    messages = []
    for j, (q, a) in enumerate(turns):
        text = {"type": "text", "text": q[0].upper() + q[1:]}
        content = [{"type": "image", "image": s.image}, text] if j == 0 else [text]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text",
                                                                                            "text": a}]}]
    return messages


# ------------------------------------------------------------------------------------------ the model parts


def load_llm(source: str):
    import polymodal as pm
    from polymodal.models.llama import Llama
    from polymodal.pipelines.text import default_chat_model

    try:
        llm = pm.load(default_chat_model() if source == SMOLLM2 else source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"llm={source!r}: {e}") from None
    if type(llm) is not Llama:
        raise ConfigError(f"llm={source!r} is a {type(llm).__name__}; this LLaVA's decoder is a Llama (SmolLM2)")
    return llm.eval()


def llava_tokenizer(tok):
    """The LLM's tokenizer with <image> as a special token of id `vocab_size` and the LLaVA ChatML template."""
    from tokenizers import AddedToken, Tokenizer

    from polymodal.processing.text import TextTokenizer

    for token in ("<|im_start|>", "<|im_end|>"):
        if tok.token_to_id(token) is None:
            raise ConfigError(f"the LLM's tokenizer has no {token}: the recipe's chat template is SmolLM2's ChatML")
    if tok.token_to_id(IMAGE_TOKEN) is not None:
        raise ConfigError(f"the LLM's tokenizer already has {IMAGE_TOKEN}")
    backend = Tokenizer.from_str(tok.backend.to_str())
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return TextTokenizer(backend, **tok.special_tokens, chat_template=SMOLLM2_LLAVA_CHAT_TEMPLATE,
                         model_max_length=tok.model_max_length, extra_eos_tokens=tok.extra_eos_token_ids, copy=False)


def clip_checkpoint(c: LlavaShapesConfig) -> Path:
    """`clip=` or the clip-shapes checkpoint `polymodal demo` trains and caches (trained here, the same way, when
    the cache does not have it yet)."""
    if c.clip:
        return Path(c.clip)
    from polymodal import __version__
    from polymodal.demo import TRAIN_STEPS, cache_dir
    from polymodal.train.recipes import cached_run

    run_dir = cache_dir() / "demo" / f"clip-shapes-{TRAIN_STEPS}-v{__version__}"
    cached_run("clip-shapes", run_dir, done=("model/model.safetensors",))
    return run_dir / "model"


def load_tower(source: Path):
    import polymodal as pm
    from polymodal.models.clip import CLIP

    try:
        clip = pm.load(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"clip={str(source)!r}: {e}") from None
    if not isinstance(clip, CLIP) or clip.config.vision.tower != "vit":
        raise ConfigError(f"clip={str(source)!r} is not a CLIP with a ViT image tower")
    return clip


def build_llava(c: LlavaShapesConfig):
    """(Llava with the LLM's and the tower's weights and a fresh projector, the tokenizer)."""
    import polymodal as pm
    from polymodal.models.llava import LlavaConfig
    from polymodal.pipelines.text import default_text_tokenizer

    llm = load_llm(c.llm)
    clip = load_tower(clip_checkpoint(c))
    tok = llava_tokenizer(default_text_tokenizer(llm))
    V = llm.config.vocab_size
    if tok.token_to_id(IMAGE_TOKEN) != V:
        raise ConfigError(f"the LLM's tokenizer has {tok.vocab_size - 1} ids for its {V}-row embedding: "
                          f"{IMAGE_TOKEN} must become id {V}, the row added past the vocabulary")
    config = LlavaConfig(vision=clip.config.vision, text=replace(llm.config, vocab_size=V + 1),
                         image_token_index=V, vision_feature_layer=c.feature_layer)
    model = pm.build("llava", config)
    with torch.no_grad():
        state = dict(llm.state_dict())
        rows = state.pop("embed_tokens.weight")  # (V, D)
        state.pop("lm_head.weight", None)  # tied (SmolLM2) or its own
        model.language_model.embed_tokens.weight[:V] = rows
        model.language_model.embed_tokens.weight[V:] = rows.mean(0)  # <image>'s row: overwritten by features anyway
        if not llm.config.tie_word_embeddings:
            head = llm.state_dict()["lm_head.weight"]
            model.language_model.lm_head.weight[:V] = head
            model.language_model.lm_head.weight[V:] = head.mean(0)
        missing, unexpected = model.language_model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"embed_tokens.weight", "lm_head.weight"}:
            raise ConfigError(f"the LLM's weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
        tower = {k: v for k, v in clip.visual.state_dict().items() if k in model.vision_tower.state_dict()}
        model.vision_tower.load_state_dict(tower)  # strict: every tower weight but CLIP's projection
    return model, tok


def processor(model, tok):
    """The real LlavaProcessor: CLIP's preprocessing at the tower's size, one <image> -> `image_tokens` slots."""
    from polymodal.processing.image import ImageProcessor
    from polymodal.processing.vlm import LlavaProcessor

    c = model.config
    return LlavaProcessor(tok, ImageProcessor.clip(size=c.vision.image_size), image_tokens=c.image_tokens,
                          image_token=IMAGE_TOKEN, context_length=c.text.max_position_embeddings)


# ------------------------------------------------------------------------------------------ rows and the loss


def example(proc, messages: list[dict]) -> dict:
    """One training row through the real processor: the whole conversation's ids, labels -100 except on each
    assistant answer and its <|im_end|> (LLaVA trains on the assistant's turns only)."""
    inputs = proc(messages, add_generation_prompt=False)
    ids = inputs["input_ids"][0]  # (T,)
    tok = proc.tokenizer
    header = [tok.token_to_id("<|im_start|>"), *tok.encode("assistant\n", add_special_tokens=False)]
    end = tok.token_to_id("<|im_end|>")
    labels = torch.full_like(ids, -100)
    seq = ids.tolist()
    i, n = 0, len(header)
    while i + n <= len(seq):
        if seq[i:i + n] == header:
            j = seq.index(end, i + n)
            labels[i + n: j + 1] = ids[i + n: j + 1]
            i = j + 1
        else:
            i += 1
    return {"input_ids": ids, "labels": labels, "pixel_values": inputs["pixel_values"]}


def collate_examples(rows: list[dict], pad_id: int) -> dict:
    """Rows -> one right-padded batch (B, T), labels -100 at padding, the images stacked (B, 3, H, W)."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.cat([r["pixel_values"] for r in rows])}


class InstructionTuning(nn.Module):
    """The Llava being trained; forward(batch) -> (answer loss, {"token_accuracy"}). The same arithmetic as
    `Llava.forward` (merge, then the decoder), with logits only where a label is: the 49k-wide head on answer tokens
    alone, not on every prompt and image position."""

    def __init__(self, llava):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pixel_values: Tensor):
        m = self.llava
        lm = m.language_model
        h = m.merge(input_ids, lm.embed(input_ids), pixel_values)  # (B, T, D)
        positions, mask = lm.decoder_inputs(h, attention_mask, None, None)
        h = lm.decode(h, mask=mask, positions=positions)
        target = labels[:, 1:]
        pick = target != -100
        logits = lm.head(h[:, :-1][pick])  # (n, V): the positions that predict an answer token
        loss = F.cross_entropy(logits.float(), target[pick])
        return loss, {"token_accuracy": (logits.argmax(-1) == target[pick]).float().mean().detach()}


def answer_loss(model: nn.Module, batch: dict):
    return model(**batch)


def digests(module: nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor's bytes: what "bit-identical" is checked against."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def changed(before: dict[str, str], module: nn.Module) -> dict[str, bool]:
    """Per top-level part (vision_tower, multi_modal_projector, language_model): whether any tensor changed."""
    now = digests(module)
    parts: dict[str, bool] = {}
    for k, d in before.items():
        part = k.split(".")[0]
        parts[part] = parts.get(part, False) or now[k] != d
    return parts


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def answer(model, proc, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of conversations (the processor's left-padded batch, the model's generate)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in proc(conversations).items()}
    end = proc.tokenizer.token_to_id("<|im_end|>")  # the turn's end (LlavaConfig carries no eos of its own)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=end)
    return [_reply(proc.tokenizer, row, end) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


def _reply(tok, ids: list[int], end: int) -> str:
    """The generated ids up to the turn's end, as text."""
    return tok.decode(ids[: ids.index(end)] if end in ids else ids).strip()


def _ask(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": question[0].upper() + question[1:]}]}]


def eval_items(c: LlavaShapesConfig, split: str, stage: str) -> list[tuple[str, list[dict], str, object, int]]:
    """(kind, conversation, question, what a right answer is, max new tokens) for fresh scenes of a split."""
    items = []
    rng = random.Random(f"eval:{split}")
    for s in scenes(c, 1, split).batch(0, c.eval_scenes):
        if stage == "1":
            items.append(("caption", _ask(s.image, BRIEF[0]), BRIEF[0], s.caption, 24))
            continue
        for q, a in conversation_pairs(s, c.scene_size)[:4]:
            items.append(("conversation", _ask(s.image, q), q, a, 4))
        q = "Describe the image in detail."
        items.append(("description", _ask(s.image, q), q, description_truth(s, c.scene_size), 16 * len(s.objects)))
        for q, _, a in reasoning_pairs(s, rng):
            items.append(("reasoning: counting" if q.startswith("how many") else "reasoning: relations",
                          _ask(s.image, q), q, a, 32))
    return items


def _score(kind: str, question: str, want, got: str) -> dict[str, bool]:
    if kind == "description":
        count, objs = parse_description(got)
        return {"description": (count, objs) == want,
                "description: colors and shapes": {o[1:3] for o in objs} == {o[1:3] for o in want[1]}}
    if kind.startswith("reasoning"):
        return {kind: parse_reasoning(question, got) == want}
    return {kind: got.strip().rstrip(".").lower() == want}


TEXT_PROMPTS = ("What is the capital of France?", "Name three fruits.")


@torch.no_grad()
def text_only(model, tok, llm_source: str, max_new_tokens: int = 24) -> list[dict]:
    """Text-only chats (the tokenizer's template, its default system message) through the trained model and through
    the original LLM loaded again: the trained model should still answer in English."""
    llm = load_llm(llm_source)
    out = []
    for prompt in TEXT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        dev = next(model.parameters()).device
        end = tok.token_to_id("<|im_end|>")
        got = model.generate(ids.to(dev), max_new_tokens=max_new_tokens, eos_token_id=end)[0, ids.shape[1]:]
        was = llm.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=end)[0, ids.shape[1]:]
        out.append({"prompt": prompt, "trained": _reply(tok, got.tolist(), end),
                    "original": _reply(tok, was.tolist(), end)})
    return out


@torch.no_grad()
def evaluate(model, c: LlavaShapesConfig, tok, batch: int = 16) -> dict:
    """Greedy answers on `eval_scenes` fresh scenes per split ("seen": combinations trained on, "never_seen": held
    out), scored per kind: stage 1 the caption (exact), stage 2 each instruction kind parsed from its template."""
    model.eval()
    proc = processor(model, tok)
    result: dict = {}
    for split, name in (("train", "seen"), ("heldout", "never_seen")):
        items = eval_items(c, split, c.stage)
        hits: dict[str, list[bool]] = {}
        examples: dict[str, list] = {}
        # similar lengths together: fewer padded positions, and short answers stop early
        order = sorted(range(len(items)), key=lambda i: (items[i][4], items[i][0]))
        for start in range(0, len(order), batch):
            chunk = [items[i] for i in order[start:start + batch]]
            got = answer(model, proc, [conv for _, conv, _, _, _ in chunk], max(it[4] for it in chunk))
            for (kind, _, q, want, _), g in zip(chunk, got):
                for k, ok in (_score(kind, q, want, g) if kind != "caption" else {"caption": g == want}).items():
                    hits.setdefault(k, []).append(ok)
                if len(examples.setdefault(kind, [])) < 2:
                    examples[kind].append([q, want if isinstance(want, str) else describe_want(want), g])
        result[name] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        result[f"{name}_examples"] = examples
    return result


def describe_want(want) -> str:
    count, objs = want
    return f"{count}: " + ", ".join(" ".join(o) for o in sorted(objs))


# ------------------------------------------------------------------------------------------------ export


def processor_files(model) -> dict[str, dict]:
    """transformers' LlavaProcessor and CLIPImageProcessor files for the tower's size."""
    from polymodal.processing.image import CLIP_MEAN, CLIP_STD

    v = model.config.vision
    return {
        "processor_config.json": {"processor_class": "LlavaProcessor", "patch_size": v.patch_size,
                                  "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
                                  "num_additional_image_tokens": 1, "image_token": IMAGE_TOKEN},
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "do_resize": True,
            "size": {"shortest_edge": v.image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": v.image_size, "width": v.image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}}


def export(model, where: Path, tok) -> None:
    """transformers' layout (LlavaForConditionalGeneration) with the tokenizer (<image>, the chat template), the
    processor files and a generation config that ends at <|im_end|>: what pm.load, LlavaProcessor.from_pretrained,
    transformers' AutoProcessor and `polymodal chat --image` read."""
    import polymodal as pm

    where = Path(where)
    pm.save(model, where)
    tok.save_pretrained(where)
    config = json.loads((where / "tokenizer_config.json").read_text())
    config["image_token"] = IMAGE_TOKEN
    (where / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name, content in processor_files(model).items():
        (where / name).write_text(json.dumps(content, indent=2))
    (where / "chat_template.jinja").write_text(tok.chat_template)  # transformers' processors read it here
    (where / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": tok.pad_token_id}, indent=2))


# ------------------------------------------------------------------------------------------------ recipe


def build_llava_shapes(c: LlavaShapesConfig, world: World) -> Task:
    import polymodal as pm

    if not c.stage:
        raise ConfigError("build_llava_shapes builds one stage (stage=1 or 2); `plan` runs `stages`")
    model, tok = build_llava(c)
    if c.stage == "2" and c.init:
        where = Path(c.init) / "model"
        try:
            trained = pm.load(where)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init={c.init!r}: expected a finished llava-shapes stage-1 run ({e})") from None
        if getattr(trained, "multi_modal_projector", None) is None or trained.config != model.config:
            raise ConfigError(f"init={c.init!r} is not a stage-1 run of this LLM and tower")
        model.multi_modal_projector.load_state_dict(trained.multi_modal_projector.state_dict())
        del trained
    frozen = ("vision_tower", "language_model") if c.stage == "1" else ("vision_tower",)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    before = digests(model)
    proc = processor(model, tok)
    world_scenes = scenes(c, 0, "train")
    kinds = ("caption",) if c.stage == "1" else c.kinds
    rows = [(i, kind) for i in range(c.train_scenes) for kind in kinds]

    def collate(index: Tensor) -> dict:
        made = []
        for k in index.tolist():
            i, kind = rows[k]
            rng = random.Random(f"{c.seed}:{i}:{kind}")
            made.append(example(proc, instruction(world_scenes.sample(i), kind, c.scene_size, rng)))
        return collate_examples(made, tok.pad_token_id)

    data = ShuffledBatches(len(rows), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    done: dict = {}

    def evaluate_and_check(m: InstructionTuning) -> dict:
        parts = changed(before, m.llava)
        result = {"changed": parts, "frozen_bit_identical": not any(parts[p] for p in frozen),
                  **evaluate(m.llava, c, tok)}
        if c.stage == "2":
            result["text_only"] = text_only(m.llava, tok, c.llm)
        done["eval"] = result
        return result

    def export_and_scene(m: InstructionTuning, where: Path) -> None:
        export(m.llava, where, tok)
        scenes(c, 1, "train").sample(0).image.save(Path(where).parent / "scene.png")

    return Task(InstructionTuning(model), answer_loss, data, evaluate=evaluate_and_check, export=export_and_scene)


# ----------------------------------------------------------------------------------------- the stages


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].strip() not in keys]


def _stage_overrides(c: LlavaShapesConfig, stage: str) -> list[str]:
    if stage == "1":
        return ["stage=1", f"max_steps={c.stage1_steps}", f"batch_size={c.stage1_batch_size}", f"lr={c.stage1_lr}",
                f"save_every={c.stage1_steps}", "weight_decay=0.0"]
    return ["stage=2"]


ARMS = {"stage2": "stage 2 after stage 1", "stage2-scratch": "stage 2 without stage 1",
        "stage2-no-conversation": "after stage 1, without conversation",
        "stage2-no-description": "after stage 1, without detailed description",
        "stage2-no-reasoning": "after stage 1, without complex reasoning"}


def plan(name: str, c: LlavaShapesConfig, out: str | Path, overrides: list[str], resume: bool,
         quiet: bool = False) -> dict | None:
    """How `polymodal train llava-shapes` runs `stages` (or the ablation): each stage an ordinary run of the loop
    into OUT/stage1, OUT/stage2 (or OUT itself for a single stage), OUT/model linking the last stage's model; with
    ablation=true also OUT/stage2-scratch and OUT/stage2-no-KIND, then OUT/ablation.md and .json. Every run's wall
    time is kept in its summary."""
    from polymodal.train.recipes import run

    if c.stage:
        return None
    out = Path(out)
    base = _without(overrides, "stages", "stage", "ablation", "init")
    if not c.ablation and len(c.stages) == 1:
        keep = [f"init={c.init}"] if c.init else []
        return run(name, out, [*base, *keep, *_stage_overrides(c, c.stages[0])], resume, quiet)
    arms: dict[str, list[str]] = {"stage1": _stage_overrides(c, "1"),
                                  "stage2": ["stage=2", f"init={out / 'stage1'}"]}
    if c.ablation:
        arms["stage2-scratch"] = ["stage=2"]
        for kind in KINDS:
            arms[f"stage2-no-{kind}"] = ["stage=2", f"init={out / 'stage1'}",
                                         "kinds=" + ",".join(k for k in KINDS if k != kind)]
    results = {}
    for arm, extra in arms.items():
        t0 = time.perf_counter()
        results[arm] = run(name, out / arm, [*base, *extra, "ablation=false"], resume, quiet)
        results[arm]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    link = out / "model"
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(Path("stage2") / "model", target_is_directory=True)
    summary = {**results["stage2"], "stages": results}
    if c.ablation:
        summary["table"] = ablation_table(results)
        (out / "ablation.md").write_text(summary["table"] + "\n")
        (out / "ablation.json").write_text(dump_json({k: {"eval": r.get("eval"), "seconds": r.get("seconds"),
                                                          "wall_seconds": r["wall_seconds"]}
                                                      for k, r in results.items()}, indent=2))
    (out / "results.json").write_text(dump_json(summary, indent=2))
    return summary


def ablation_table(results: dict) -> str:
    """Markdown: stage 2's answer accuracy per kind on seen / never-seen scenes, one row per arm."""
    arms = [a for a in ARMS if a in results]
    kinds = sorted({k for a in arms for k in results[a]["eval"]["seen"]})
    rows = ["| stage 2 | " + " | ".join(kinds) + " | training s |", "|---|" + "---|" * (len(kinds) + 1)]
    for arm in arms:
        e = results[arm]["eval"]
        cells = [f"{100 * e['seen'][k]:.0f}% / {100 * e['never_seen'][k]:.0f}%" for k in kinds]
        rows.append(f"| {ARMS[arm]} | " + " | ".join(cells) + f" | {results[arm]['seconds']:.0f} |")
    return "\n".join(rows)
