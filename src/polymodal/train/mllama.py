"""Llama 3.2 Vision's adapter recipe in small, `mllama-shapes` (Meta 2024, "Llama 3.2: Revolutionizing edge AI and
vision"; "The Llama 3 Herd of Models", Grattafiori et al. 2024, sec. 7.2-7.4: the image adapter is trained while the
language model stays frozen, so that its text behaviour is kept as it was).

    LLM      a frozen Llama: the packaged SmolLM2-135M-Instruct (`llm=smollm2`, 30 layers of width 576) or any Llama
             checkpoint (`llm=DIR` or a .gguf). Its embeddings, self-attention layers, final norm and head are
             copied into `MllamaText` and never trained (requires_grad False)
    adapter  gated cross-attention layers inserted into its stack (`first_cross`, `cross_every`: one before self
             layers 22 and 26 of SmolLM2's 30 by default; Meta puts one before every 4th of Llama 3.1's from the
             4th on), new q/k/v/o and SwiGLU, both tanh gates at zero as Meta starts them: at step 0 the model is
             the LLM exactly. A small tiled vision encoder (one tile of ShapesWorld's image) and its projector.
             Only these are trained
    tokens   the LLM's tokenizer with <|image|> added as a special token: id vocab_size, the first of the 8
             embedding rows past the vocabulary (Llama 3.2's 128256), set to the mean of the LLM's rows and frozen
             with them (the image enters through the cross layers; its token only marks where)
    template SmolLM2's own ChatML template, adapted: an image part is written as <|image|>, and a conversation with
             images gets no default system message (as Llama 3.2 Vision's template writes none there); a text-only
             conversation renders exactly as SmolLM2's template renders it
    data     ShapesWorld's one-shape scenes and their questions (count, color, shape, existence), through the real
             `MllamaProcessor`; cross-entropy on the answer and <|im_end|> only
    report   greedy answers, exact match, on fresh scenes of seen and never-seen color-shape combinations, per kind of
             question; and the frozen LLM untouched: text-only prompts through the trained model give the original
             LLM's logits (loaded again from its file) bit for bit and its greedy tokens, with the gates open

A text-only prompt never reaches an adapter: `Mllama` skips the cross layers when no image comes, so the trained
model's text path is the LLM's own arithmetic, operation for operation.

Training starts the decoder at the first cross layer: the layers below it are frozen and see only text, so their
output is a fixed function of the token ids, computed once per distinct row and kept (`AdapterTraining.prefix`);
tests/test_train_mllama.py checks the training forward against `Mllama.forward`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.train.config import ConfigError, TrainConfig
from polymodal.train.data import ShuffledBatches
from polymodal.train.distributed import World
from polymodal.train.engine import Task

SMOLLM2 = "smollm2"
IMAGE_TOKEN = "<|image|>"
_SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# SmolLM2-135M-Instruct's chat template (its GGUF's) with image parts written as <|image|>; no default system message
# when the conversation holds an image
SMOLLM2_VISION_CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set ns.images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' and not ns.images %}{{ '" + _SMOLLM2_SYSTEM + "' }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class MllamaShapesConfig(TrainConfig):
    max_steps: int = 400
    batch_size: int = 16
    lr: float = 2e-3  # what the measured run used (docs/training.md)
    default_warmup: ClassVar[int] = 20
    weight_decay: float = 0.05
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 1  # a checkpoint holds the frozen LLM too (~0.5 GB with SmolLM2)
    llm: str = SMOLLM2  # the frozen LLM: the packaged SmolLM2-135M-Instruct, or a Llama checkpoint (directory, .gguf)
    # the self layer the first cross-attention layer goes before, and the self layers between two (Meta's 11B and
    # 90B: from the 4th, every 4th). Higher here: the frozen layers below the first cross layer are computed once
    # per distinct prompt, and only the layers above it run backward (docs/training.md has the step times)
    first_cross: int = 22
    cross_every: int = 4
    image_size: int = 64  # ShapesWorld's images, one tile each
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4  # the local encoder; its middle and last layers' states are kept, as Meta keeps some
    vision_global_layers: int = 1
    vision_heads: int = 4
    train_images: int = 4000  # each with its five questions (a pure function of the index: rendered as drawn)
    eval_images: int = 60  # per split (seen / never-seen combinations), every question of each
    text_checks: int = 3  # text-only prompts compared with the original LLM in the report

    def __post_init__(self):
        super().__post_init__()
        if self.first_cross < 0 or self.cross_every < 1:
            raise ConfigError(f"first_cross must be >= 0 and cross_every >= 1, got {self.first_cross}, "
                              f"{self.cross_every}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_heads < 1 or self.vision_width % self.vision_heads:
            raise ConfigError(f"vision_width {self.vision_width} must be a multiple of vision_heads "
                              f"{self.vision_heads}")
        for name in ("vision_layers", "train_images", "eval_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vision_global_layers < 0 or self.text_checks < 0:
            raise ConfigError("vision_global_layers and text_checks must be >= 0")
        if self.train_images * 5 < self.batch_size:
            raise ConfigError(f"train_images={self.train_images} gives {5 * self.train_images} questions, fewer than "
                              f"one batch of {self.batch_size}")


# ------------------------------------------------------------------------------------- the frozen LLM


def load_llm(source: str):
    """The frozen LLM, as `pm.load` gives it: the packaged SmolLM2 for "smollm2", else a Llama checkpoint."""
    import polymodal as pm
    from polymodal.models.llama import Llama
    from polymodal.pipelines.text import default_chat_model

    try:
        llm = pm.load(default_chat_model() if source == SMOLLM2 else source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"llm={source!r}: {e}") from None
    if type(llm) is not Llama or llm.config.attention_bias or llm.config.mlp_bias:
        raise ConfigError(f"llm={source!r} is a {type(llm).__name__}; Llama 3.2 Vision's decoder is a Llama without "
                          "biases (SmolLM2, Llama 3)")
    return llm.eval()


def vision_tokenizer(tok, vocab_size: int):
    """The LLM's tokenizer with <|image|> as a special token of id `vocab_size` (the first row past the vocabulary)
    and the adapted ChatML template."""
    from tokenizers import AddedToken, Tokenizer

    from polymodal.processing.text import TextTokenizer

    for token in ("<|im_start|>", "<|im_end|>"):
        if tok.token_to_id(token) is None:
            raise ConfigError(f"the LLM's tokenizer has no {token}: the recipe's chat template is SmolLM2's ChatML")
    if tok.vocab_size != vocab_size or tok.token_to_id(IMAGE_TOKEN) is not None:
        raise ConfigError(f"the LLM's tokenizer has {tok.vocab_size} ids for its {vocab_size}-row embedding: "
                          f"{IMAGE_TOKEN} must become id {vocab_size}, the first of the rows past the vocabulary")
    backend = Tokenizer.from_str(tok.backend.to_str())
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return TextTokenizer(backend, **tok.special_tokens, chat_template=SMOLLM2_VISION_CHAT_TEMPLATE,
                         model_max_length=tok.model_max_length, extra_eos_tokens=tok.extra_eos_token_ids, copy=False)


def cross_positions(self_layers: int, first: int, every: int) -> tuple[int, ...]:
    """Where the cross layers sit in the merged stack: one before self layer first, first + every, ... (each
    shifts the ones after it by one)."""
    return tuple(j + k for k, j in enumerate(range(first, self_layers, every)))


def model_config(c: MllamaShapesConfig, llm_config):
    """The Mllama config: the LLM's own fields with the cross layers inserted (untied head: the embedding has 8 rows
    more), and a vision encoder of one `image_size` tile."""
    from polymodal.models.mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    n = llm_config.num_hidden_layers
    if c.first_cross >= n:
        raise ConfigError(f"first_cross={c.first_cross}: the LLM has {n} layers")
    cross = cross_positions(n, c.first_cross, c.cross_every)
    text = MllamaTextConfig(**{**asdict(llm_config), "num_hidden_layers": n + len(cross),
                               "tie_word_embeddings": False, "cross_attention_layers": cross})
    kept = tuple(sorted({max(0, c.vision_layers // 2 - 1), c.vision_layers - 1}))
    vision = MllamaVisionConfig(hidden_size=c.vision_width, num_hidden_layers=c.vision_layers,
                                num_global_layers=c.vision_global_layers, attention_heads=c.vision_heads,
                                intermediate_size=4 * c.vision_width,
                                vision_output_dim=c.vision_width * (1 + len(kept)),
                                image_size=c.image_size, patch_size=c.patch_size, max_num_tiles=1,
                                intermediate_layers_indices=kept, supported_aspect_ratios=((1, 1),))
    return MllamaConfig(vision=vision, text=text, image_token_index=llm_config.vocab_size)


def self_positions(config) -> list[int]:
    """The merged stack's self-attention layers, in the LLM's order."""
    t = config.text
    return [i for i in range(t.num_hidden_layers) if i not in t.cross_attention_layers]


def adapter_model(llm, config):
    """An Mllama holding the LLM's weights (copied, then frozen) and new adapter parts: N(0, 0.02) linear weights,
    zero biases, position and [CLS] embeddings ~ N(0, D^-1/2) as transformers initializes them, gates as built
    (cross-attention gates 0, global-encoder gates pi/4)."""
    import polymodal as pm

    model = pm.build("mllama", config)
    for module in [model.vision_model, model.multi_modal_projector,
                   *(model.language_model.layers[i] for i in config.text.cross_attention_layers)]:
        for m in module.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    v = model.vision_model
    with torch.no_grad():
        scale = config.vision.hidden_size ** -0.5
        v.class_embedding.normal_(0, scale)
        v.gated_positional_embedding.embedding.normal_(0, scale)
        lm, V = model.language_model, llm.config.vocab_size
        positions = self_positions(config)
        state = {}
        for key, value in llm.state_dict().items():
            if key.startswith("layers."):
                j, rest = key[len("layers."):].split(".", 1)
                key = f"layers.{positions[int(j)]}.{rest}"
            state[key] = value
        rows = state.pop("embed_tokens.weight")  # (V, D)
        missing, unexpected = lm.load_state_dict(state, strict=False)
        cross = {f"layers.{i}." for i in config.text.cross_attention_layers}
        if unexpected or any(k != "embed_tokens.weight" and not k.startswith(tuple(cross)) for k in missing):
            raise ConfigError(f"the LLM's weights do not fit the decoder (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
        lm.embed_tokens.weight[:V] = rows
        lm.embed_tokens.weight[V:] = rows.mean(0)  # the 8 new rows (<|image|> first): the mean of the vocabulary's
    freeze_llm(model)
    return model


def freeze_llm(model) -> None:
    """requires_grad False on everything of the decoder but its cross layers."""
    cross = {f"layers.{i}." for i in model.config.text.cross_attention_layers}
    for name, p in model.language_model.named_parameters():
        p.requires_grad_(name.startswith(tuple(cross)))


# ------------------------------------------------------------------------------------------------ the loss


class AdapterTraining(nn.Module):
    """The Mllama being trained; forward(batch) -> (answer loss, {"token_accuracy"}). The decoder runs from its first
    cross layer: below it every layer is frozen and reads only text, so its output for a row is computed once (alone,
    under no_grad) and kept; above it, `Llama.decode`'s loop. Logits only at the answer positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.first = min(model.config.text.cross_attention_layers)
        self._prefix: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) right-padded ids -> the hidden states entering the first cross layer (B, T, D); zeros at padding."""
        lm = self.model.language_model
        rows = []
        for ids, n in zip(input_ids, attention_mask.sum(-1).tolist()):
            key = tuple(ids[:n].tolist())
            if key not in self._prefix:
                h = lm.embed(ids[None, :n])  # (1, n, D)
                positions, mask = lm.decoder_inputs(h, None, None, None)
                rope = lm.rotary(positions, dtype=h.dtype)
                for layer in lm.layers[: self.first]:
                    h = layer(h, mask, rope, None, None)
                self._prefix[key] = h[0]
            rows.append(F.pad(self._prefix[key], (0, 0, 0, input_ids.shape[1] - n)))
        return torch.stack(rows)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pixel_values: Tensor,
                aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor, cross_attention_mask: Tensor):
        from polymodal.models.mllama import CrossContext

        m = self.model
        lm = m.language_model
        m.check_images(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask,
                       *input_ids.shape)
        h = self.prefix(input_ids, attention_mask)  # (B, T, D)
        kv = m.cross_kv(m.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(h.dtype))
        sees, any_ = m.token_masks(cross_attention_mask)
        context = CrossContext(kv, sees[:, None], any_[..., None].to(h.dtype))
        positions, mask = lm.decoder_inputs(h, attention_mask, None, None)
        rope = lm.rotary(positions, dtype=h.dtype)
        for layer in lm.layers[self.first:]:
            h = layer(h, mask, rope, None, context)
        target = labels[:, 1:]
        pick = target != -100
        logits = lm.head(lm.norm(h[:, :-1][pick]))  # (n, V): the positions that predict an answer token
        loss = F.cross_entropy(logits.float(), target[pick])
        return loss, {"token_accuracy": (logits.argmax(-1) == target[pick]).float().mean().detach()}


def answer_loss(model: nn.Module, batch: dict):
    return model(**batch)


# -------------------------------------------------------------------------------------------------- data


def processor(c: MllamaShapesConfig, tok):
    """The real MllamaProcessor over one tile of `image_size` (ShapesWorld's images are square: one tile)."""
    from polymodal.processing.mllama import MllamaImageProcessor, MllamaProcessor

    return MllamaProcessor(tok, MllamaImageProcessor(tile_size=c.image_size, max_image_tiles=1), max_images=1)


def ask(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def example(proc, image, question: str, answer: str) -> dict:
    """One training row: the processor's prompt (user turn with the image, then the assistant's header), the answer
    and <|im_end|>; labels -100 but on the answer; the answer's tokens see the image as the prompt's last one does."""
    inputs = proc(ask(image, question))
    tok = proc.tokenizer
    answer_ids = torch.tensor(tok.encode(answer, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")])
    ids = torch.cat([inputs["input_ids"][0], answer_ids])  # (T,)
    labels = torch.full_like(ids, -100)
    labels[-len(answer_ids):] = answer_ids
    cross = inputs["cross_attention_mask"][0]  # (T_prompt, 1, 1)
    cross = torch.cat([cross, cross[-1:].expand(len(answer_ids), *cross.shape[1:])])
    return {"input_ids": ids, "labels": labels, "cross_attention_mask": cross,
            **{k: inputs[k][0] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}}


def collate_examples(rows: list[dict], pad_id: int) -> dict:
    """Rows -> one right-padded batch (B, T): labels -100 and cross-attention mask 0 at padding; images stacked."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    cross = torch.zeros(B, T, *rows[0]["cross_attention_mask"].shape[1:], dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n], cross[b, :n] = (r["input_ids"], r["labels"], 1,
                                                                r["cross_attention_mask"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "cross_attention_mask": cross}
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        batch[key] = torch.stack([r[key] for r in rows])
    return batch


# -------------------------------------------------------------------------------------------- evaluation


def _question_kind(question: str) -> str:
    return " ".join(question.split()[:2])  # "how many", "what color", "what shape", "is there"


@torch.no_grad()
def answer(model: nn.Module, proc, conversations: list[list[dict]], max_new_tokens: int = 3) -> list[str]:
    """Greedy answers to a batch of conversations (the processor's left-padded batch, the model's generate)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in proc(conversations).items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return [proc.tokenizer.decode(row).strip() for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


TEXT_PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.",
                "what color is the circle?", "Name three fruits.")


@torch.no_grad()
def text_only_check(model: nn.Module, source: str, prompts: tuple[str, ...] = TEXT_PROMPTS,
                    max_new_tokens: int = 16) -> dict:
    """Text-only chats through the trained model against the original LLM, loaded again from `source`: whether the
    logits are equal bit for bit (the largest difference too), and the greedy tokens. The chats are written with the
    LLM's own tokenizer and template."""
    from polymodal.pipelines.text import default_text_tokenizer

    llm = load_llm(source).to(next(model.parameters()).device)
    tok = default_text_tokenizer(llm)
    result = {"prompts": len(prompts), "logits_bit_identical": True, "greedy_identical": True, "max_abs_diff": 0.0,
              "examples": []}
    for prompt in prompts:
        chat = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True) if tok.chat_template else prompt
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=llm.lm_head.weight.device)
        want, got = llm(ids), model(ids)
        result["logits_bit_identical"] &= torch.equal(want, got)
        result["max_abs_diff"] = max(result["max_abs_diff"], float((want - got).abs().max()))
        a = llm.generate(ids, max_new_tokens=max_new_tokens)
        b = model.generate(ids, max_new_tokens=max_new_tokens)
        result["greedy_identical"] &= torch.equal(a, b)
        result["examples"].append([prompt, tok.decode(b[0, ids.shape[1]:].tolist())])
    return result


def gates(model) -> dict[str, list[float]]:
    """Each cross layer's tanh(attention gate), tanh(MLP gate): how far the adapter has opened."""
    layers = model.language_model.layers
    return {str(i): [round(float(layers[i].cross_attn_attn_gate.tanh()), 4),
                     round(float(layers[i].cross_attn_mlp_gate.tanh()), 4)]
            for i in model.config.text.cross_attention_layers}


@torch.no_grad()
def evaluate(model: nn.Module, c: MllamaShapesConfig, tok, batch: int = 32) -> dict:
    """Exact-match greedy answers to every question of `eval_images` fresh scenes per split, "seen" (combinations
    trained on) and "never_seen" (held out of training), overall and per kind; the gates; the text-only check."""
    from polymodal.data import ShapesWorld

    model.eval()
    proc = processor(c, tok)
    result: dict = {}
    for split, name in (("train", "seen"), ("heldout", "never_seen")):
        items = [(ask(s.image, q), q, a) for s in ShapesWorld(c.image_size, seed=1, split=split).batch(0, c.eval_images)
                 for q, a in s.qa]
        hits: dict[str, list[bool]] = {}
        examples = []
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            for (_, q, want), got in zip(chunk, answer(model, proc, [conv for conv, _, _ in chunk])):
                hits.setdefault(_question_kind(q), []).append(got == want)
                if len(examples) < 4:
                    examples.append([q, want, got])
        every = [h for v in hits.values() for h in v]
        result[f"vqa_{name}"] = sum(every) / len(every)
        result[f"vqa_{name}_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        result[f"vqa_{name}_examples"] = examples
    result["gates"] = gates(model)
    if c.text_checks:
        result["text_only"] = text_only_check(model, c.llm, TEXT_PROMPTS[: c.text_checks])
    return result


def results_table(e: dict) -> str:
    """Markdown: accuracy per kind of question on seen and never-seen combinations."""
    kinds = sorted(set(e["vqa_seen_by_kind"]) | set(e["vqa_never_seen_by_kind"]))
    rows = ["| split | all | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, label in (("seen", "seen combinations"), ("never_seen", "**never-seen** combinations")):
        by = e[f"vqa_{name}_by_kind"]
        rows.append(f"| {label} | {100 * e[f'vqa_{name}']:.1f}% | "
                    + " | ".join(f"{100 * by[k]:.1f}%" if k in by else "-" for k in kinds) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ export


def processor_files(c: MllamaShapesConfig) -> dict:
    """transformers' MllamaImageProcessor settings for the recipe's tile (preprocessor_config.json)."""
    from polymodal.processing.image import CLIP_MEAN, CLIP_STD

    return {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
            "size": {"height": c.image_size, "width": c.image_size}, "max_image_tiles": 1, "do_resize": True,
            "do_pad": True, "do_convert_rgb": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def export(model: nn.Module, where: Path, c: MllamaShapesConfig, tok) -> None:
    """transformers' layout: MllamaForConditionalGeneration's config.json and weights, the tokenizer (with <|image|>
    and the chat template) and the image processor's file, which `pm.load`, `MllamaProcessor.from_pretrained` and
    `polymodal chat --image` read."""
    import polymodal as pm

    where = Path(where)
    pm.save(model, where)
    tok.save_pretrained(where)
    config = json.loads((where / "tokenizer_config.json").read_text())
    config["image_token"] = IMAGE_TOKEN
    (where / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (where / "preprocessor_config.json").write_text(json.dumps(processor_files(c), indent=2))


# ------------------------------------------------------------------------------------------------ recipe


def build_mllama_shapes(c: MllamaShapesConfig, world: World) -> Task:
    from polymodal.data import ShapesWorld
    from polymodal.pipelines.text import default_text_tokenizer

    llm = load_llm(c.llm)
    tok = vision_tokenizer(default_text_tokenizer(llm), llm.config.vocab_size)
    model = adapter_model(llm, model_config(c, llm.config))
    del llm
    proc = processor(c, tok)
    scenes = ShapesWorld(c.image_size, seed=0, split="train")
    rows = [(i, q) for i in range(c.train_images) for q in range(5)]  # a one-shape scene has five questions

    def collate(index: Tensor) -> dict:
        made = []
        for k in index.tolist():
            i, q = rows[k]
            s = scenes.sample(i)
            made.append(example(proc, s.image, *s.qa[q % len(s.qa)]))
        return collate_examples(made, tok.pad_token_id)

    data = ShuffledBatches(len(rows), c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)
    done: dict = {}

    def evaluate_and_keep(m: AdapterTraining) -> dict:
        done["eval"] = evaluate(m.model, c, tok)
        return done["eval"]

    def export_and_table(m: AdapterTraining, where: Path) -> None:
        export(m.model, where, c, tok)
        if "eval" in done:
            Path(where).parent.joinpath("results.md").write_text(results_table(done["eval"]) + "\n")

    return Task(AdapterTraining(model), answer_loss, data, evaluate=evaluate_and_keep, export=export_and_table)
