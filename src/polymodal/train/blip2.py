"""BLIP-2's two pretraining stages on ShapesWorld (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image
Pre-training with Frozen Image Encoders and Large Language Models"), the `blip2-shapes` recipe.

    stage 0  the frozen parts, built once per run directory (`frozen/`): a ViT pretrained here as an attribute
             classifier (color and shape heads) stands in for the paper's pretrained ViT-g, and a tiny OPT
             (width 64, 2 layers, ~0.1 M parameters) trained on ShapesWorld's text alone stands in for its frozen
             OPT. No packaged real LLM loads as OPT (SmolLM2 is LLaMA-architecture), so the "LLM" knows this
             world's language and nothing else: captions, and captions followed by questions and answers in the
             zero-shot VQA prompt's wording ("Question: ... Answer: ..."), never an image.
    stage 1  representation learning (sec. 3.2): the Q-Former's queries read the frozen image; three objectives
             share one Q-Former, each with its self-attention mask (`qformer_mask`, the paper's Fig. 2):
               ITC  unimodal: queries see queries, text sees text; score = max over queries of the cosine
               ITM  bidirectional: queries and text see each other; hard negatives drawn from ITC's scores
               ITG  multimodal causal: queries see queries, text sees every query and the text before it
    stage 2  generative learning (sec. 3.3): the Q-Former's outputs, projected (`language_projection`), are a
             soft prompt of the frozen OPT; LM loss on the caption. Image encoder and LLM stay frozen.

Stage 1 trains `Blip2` of task "retrieval" (transformers' `Blip2ForImageTextRetrieval` layout: what the
`Salesforce/blip2-itm-vit-g` files hold) plus ITG's LM head over the Q-Former's text side, which transformers
does not have: LAVIS's `Qformer.cls.predictions` (BERT's LM head: dense, activation, LayerNorm, the word
embeddings tied, a bias), `polymodal.models.blip.LMHead` here, exported beside the model under LAVIS's names.
Stage 2 trains `Blip2` of task "generation" (`Blip2ForConditionalGeneration`) and starts its Q-Former from a
stage-1 run (`init=DIR`: queries, shared self-attention, cross-attention and the queries' feed-forward; the text
feed-forward is dropped, as LAVIS's stage 2 drops it) or from scratch (the paper's Fig. 5 ablation).

Evaluation (stage 2): greedy captions (exact match) and zero-shot VQA, the LLM answering "Question: ... Answer:"
after the soft prompt as the paper prompts OPT, on fresh scenes of seen and never-seen color-shape combinations.
`ablation=true` trains stage 2 from stage 1 and from scratch with the same steps and writes OUT/ablation.md.

One word-level vocabulary of the world's words serves the Q-Former and the LLM alike (BLIP-2 uses BERT's
WordPiece for the Q-Former and GPT-2's BPE for OPT; the layouts do not depend on the vocabulary).
"""

from __future__ import annotations

import json
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
from polymodal.train.engine import Task, dump_json, fit

MaskKind = Literal["unimodal", "bidirectional", "multimodal-causal"]

# ------------------------------------------------------------------------------------------- vocabulary

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "[CLS]", "[SEP]", "[DEC]", "[IMG]")  # OPT's first four ids
_FUNCTION_WORDS = ("a", "an", "and", "of", "the", "is", "are", "there", "how", "many", "what", "color", "shape",
                   "shapes", "object", "where", "relative", "to", "left", "right", "above", "below", "yes", "no",
                   "question", "answer", ":", "?", ",", ".")


def shapes_tokenizer():
    """A word-level `TextTokenizer` over ShapesWorld's language (both vocabularies) with OPT's special ids
    (<s> 0, <pad> 1, </s> 2 as BOS and EOS, <unk> 3), BERT's [CLS]/[SEP], LAVIS's [DEC] and the image token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from polymodal.data.shapes import ALL_COLORS, ALL_SHAPES, NUMBER_WORDS
    from polymodal.processing.text import TextTokenizer

    words = sorted(set(_FUNCTION_WORDS) | set(ALL_COLORS) | set(ALL_SHAPES) | set(NUMBER_WORDS) | {"small", "large"})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + tuple(words))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "answer:" -> "answer", ":"
    tok.add_special_tokens(list(SPECIALS))
    return TextTokenizer(tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         cls_token="[CLS]", sep_token="[SEP]", copy=False)


def _words(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ stage 1 masks


def qformer_mask(kind: MaskKind, queries: int, text_mask: Tensor) -> Tensor:
    """Stage 1's self-attention masks over [queries ; text] (BLIP-2 Fig. 2) -> boolean (B, 1, Q + T, Q + T),
    True where row i may attend to column j. text_mask (B, T): 1 for real text tokens (padding keys are hidden).

    unimodal (ITC): queries see the queries, text sees the text: neither sees the other.
    bidirectional (ITM): every position sees every real position.
    multimodal-causal (ITG): queries see the queries only; text sees every query and the text up to itself."""
    if kind not in ("unimodal", "bidirectional", "multimodal-causal"):
        raise ValueError(f"mask kind must be unimodal, bidirectional or multimodal-causal, got {kind!r}")
    if text_mask.dim() != 2:
        raise ValueError(f"text_mask must be (B, T), got shape {tuple(text_mask.shape)}")
    B, T = text_mask.shape
    L, dev = queries + T, text_mask.device
    is_query = torch.arange(L, device=dev) < queries  # (L,)
    if kind == "bidirectional":
        allowed = torch.ones(L, L, dtype=torch.bool, device=dev)
    elif kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    else:
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()  # j <= i: every query precedes the text
        allowed = torch.where(is_query[:, None], is_query[None, :], causal)
    real = torch.cat([text_mask.new_ones(B, queries), text_mask], dim=1).bool()  # (B, L)
    return allowed[None, None] & real[:, None, None, :]  # (B, 1, L, L)


# ------------------------------------------------------------------------------------------ stage 1 model


class QFormerPretraining(nn.Module):
    """Stage 1: a retrieval `Blip2` (frozen `vision_model`; query_tokens, embeddings, qformer, vision_projection,
    text_projection, itm_head trained), ITG's LM head `lm_head` (LAVIS's `Qformer.cls.predictions`) and ITC's
    learned temperature `temp`. forward(pixel_values, input_ids, attention_mask) -> (itc, itm, itg) losses;
    input_ids (B, T) start with [CLS], right-padded."""

    def __init__(self, config, dec_token_id: int):
        from polymodal.models.blip import LMHead
        from polymodal.models.blip2 import Blip2

        super().__init__()
        if config.task != "retrieval":
            raise ValueError("stage 1 trains the Q-Former with its text half: a retrieval Blip2Config")
        q = config.qformer_config
        self.blip2 = Blip2(config)
        self.lm_head = LMHead(q.hidden_size, q.vocab_size, q.hidden_act, q.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(0.07))  # BLIP-2's initial ITC temperature, learned, clamped
        self.dec_token_id = dec_token_id

    def _joint(self, image: Tensor, ids: Tensor, mask: Tensor, kind: MaskKind) -> Tensor:
        """The Q-Former over [queries ; text] under mask `kind` -> (B, Q + T, D)."""
        m, Q = self.blip2, self.blip2.config.num_query_tokens
        text = m.embeddings(ids)  # (B, T, D)
        x = torch.cat([m.query_tokens.expand(ids.shape[0], -1, -1).to(text.dtype), text], dim=1)
        return m.qformer(x, Q, qformer_mask(kind, Q, mask), image)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, label_smoothing: float = 0.1):
        m, Q = self.blip2, self.blip2.config.num_query_tokens
        B = input_ids.shape[0]
        with torch.no_grad():
            image = m.image_embeds(pixel_values, B)  # (B, 1+N, Dv): the frozen encoder, no graph

        # ITC (unimodal mask): each image's Q query embeddings against the text's [CLS]; the best query scores
        h = self._joint(image, input_ids, attention_mask, "unimodal")
        image_feats = F.normalize(m.vision_projection(h[:, :Q]), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(m.text_projection(h[:, Q]), dim=-1)  # (B, E): [CLS]
        sim = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1) / self.temp  # (B_i, B_t)
        same = (input_ids[:, None] == input_ids[None]).all(-1)  # (B, B): equal captions are positives of each other
        targets = same.float() / same.sum(1, keepdim=True)
        itc = (F.cross_entropy(sim, targets, label_smoothing=label_smoothing)
               + F.cross_entropy(sim.T, targets, label_smoothing=label_smoothing)) / 2

        # ITM (bidirectional mask): positives, and one hard negative text per image and image per text, drawn in
        # proportion to the ITC softmax among the pairs that are not the same caption (BLIP's / BLIP-2's sampling)
        with torch.no_grad():
            weights = sim.float().softmax(-1).masked_fill(same, 0) + (~same) * 1e-6  # (B, B)
            weights[~weights.any(-1)] = 1.0  # one caption in the whole batch: any pair will do
            negative_text = torch.multinomial(weights, 1).squeeze(1)  # (B,)
            negative_image = torch.multinomial(weights.T, 1).squeeze(1)  # (B,)
        texts = torch.cat([input_ids, input_ids[negative_text], input_ids])  # (3B, T)
        masks = torch.cat([attention_mask, attention_mask[negative_text], attention_mask])
        images = torch.cat([image, image, image[negative_image]])
        h = self._joint(images, texts, masks, "bidirectional")[:, :Q]  # (3B, Q, D)
        itm_logits = m.itm_head(h).mean(1)  # (3B, 2): every query's vote, averaged (sec. 3.2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(input_ids.device)
        itm = F.cross_entropy(itm_logits, labels)

        # ITG (multimodal-causal mask): [DEC] replaces [CLS]; each text token predicts the next, reading the image
        # only through the queries
        dec = input_ids.clone()
        dec[:, 0] = self.dec_token_id
        h = self._joint(image, dec, attention_mask, "multimodal-causal")[:, Q:]  # (B, T, D)
        logits = self.lm_head(h, m.embeddings.word_embeddings.weight)[:, :-1]  # (B, T-1, V)
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              label_smoothing=label_smoothing)
        return itc, itm, itg


def stage1_loss(model: nn.Module, batch: dict):
    itc, itm, itg = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return itc + itm + itg, {"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach()}


def _clamp_temperature(model: nn.Module) -> None:
    model.temp.clamp_(0.001, 0.5)  # LAVIS's bounds for the ITC temperature


def stage2_loss(model: nn.Module, batch: dict):
    """The frozen OPT's LM loss on the caption and its end token, given the soft visual prompt; the image
    tokens and BOS are context, not targets (BLIP-2 stage 2 masks the queries out of the labels)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask)[:, :-1]  # (B, T-1, V)
    labels = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | ~batch["target"][:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Blip2ShapesConfig(TrainConfig):
    """`max_steps`, `batch_size`, `lr` apply to each stage; the frozen parts have their own step counts."""

    max_steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    default_warmup: ClassVar[int] = 50
    weight_decay: float = 0.05
    log_every: int = 50
    save_every: int = 500
    stage: Literal["1", "2", "both"] = "both"
    init: str = ""  # stage 2: a stage-1 run directory whose Q-Former it starts from; empty: from scratch
    frozen: str = ""  # the frozen encoder and LLM (trained there when absent); empty: init's, else OUT/frozen
    ablation: bool = False  # stage 1, then stage 2 from it and from scratch (same steps): OUT/ablation.md
    image_size: int = 32  # ShapesWorld's classic world: one shape, 6 colors x 5 shapes, 6 combinations held out
    train_images: int = 10000
    eval_images: int = 200  # per split (seen / never-seen combinations)
    width: int = 64  # the ViT, Q-Former and OPT width
    num_query_tokens: int = 8
    qformer_layers: int = 2
    vision_steps: int = 800  # stage 0: the image encoder's attribute pretraining
    llm_steps: int = 600  # stage 0: the OPT's text pretraining

    def __post_init__(self):
        super().__post_init__()
        for name in ("image_size", "train_images", "eval_images", "width", "num_query_tokens", "qformer_layers",
                     "vision_steps", "llm_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % 4:
            raise ConfigError(f"width must be a multiple of the 4 attention heads, got {self.width}")
        if self.image_size % 8:
            raise ConfigError(f"image_size must be a multiple of the 8-pixel patches, got {self.image_size}")
        if self.init and self.stage != "2":
            raise ConfigError("init= starts stage 2 from a stage-1 run: use it with stage=2")


def vision_config(c: Blip2ShapesConfig):
    from polymodal.models.blip2 import _vit_g

    return _vit_g(hidden_size=c.width, intermediate_size=4 * c.width, num_hidden_layers=3, num_attention_heads=4,
                  image_size=c.image_size, patch_size=8)


def llm_config(c: Blip2ShapesConfig, vocab_size: int):
    from polymodal.models.opt import OPTConfig

    return OPTConfig(vocab_size=vocab_size, hidden_size=c.width, num_hidden_layers=2, num_attention_heads=4,
                     ffn_dim=4 * c.width, max_position_embeddings=64, word_embed_proj_dim=c.width)


def blip2_config(c: Blip2ShapesConfig, tok, stage: int):
    """Stage 1's retrieval model or stage 2's generative one over the same frozen ViT (and OPT)."""
    from polymodal.models.blip2 import Blip2Config, QFormerConfig

    q = QFormerConfig(vocab_size=tok.vocab_size, hidden_size=c.width, num_hidden_layers=c.qformer_layers,
                      num_attention_heads=4, intermediate_size=4 * c.width, max_position_embeddings=32,
                      pad_token_id=tok.pad_token_id, cross_attention_frequency=1,
                      use_qformer_text_input=stage == 1)
    if stage == 1:
        return Blip2Config(vision_config=vision_config(c), qformer_config=q, text_config=None,
                           num_query_tokens=c.num_query_tokens, image_text_hidden_size=c.width, task="retrieval")
    return Blip2Config(vision_config=vision_config(c), qformer_config=q, text_config=llm_config(c, tok.vocab_size),
                       num_query_tokens=c.num_query_tokens, image_text_hidden_size=c.width,
                       image_token_index=tok.token_to_id("[IMG]"))


# ----------------------------------------------------------------------------------------- data


def _world(c: Blip2ShapesConfig, seed: int, split: str, n: int):
    from polymodal.data import ShapesWorld

    return ShapesWorld(c.image_size, seed=seed, split=split).batch(0, n)


def _pixels(c: Blip2ShapesConfig, samples) -> Tensor:
    from polymodal.processing import ImageProcessor

    return ImageProcessor.blip(size=c.image_size)([s.image for s in samples])  # (N, 3, H, W)


def _batches(c: Blip2ShapesConfig, world: World, n: int, collate) -> ShuffledBatches:
    return ShuffledBatches(n, c.batch_size // c.grad_accum, collate, seed=c.seed, rank=world.rank,
                           world_size=world.size)


def qformer_text(tok, captions: list[str]) -> tuple[Tensor, Tensor]:
    """[CLS] caption [SEP], right-padded: the Q-Former's text input (B, T) and its mask."""
    return tok.pad([[tok.token_to_id("[CLS]"), *_words(tok, t), tok.token_to_id("[SEP]")] for t in captions],
                   padding_side="right")


def llm_caption_rows(tok, queries: int, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2's LLM input: [IMG] x Q, BOS, caption, EOS, right-padded -> ids, mask and which positions are
    targets (the caption and its EOS)."""
    rows = [soft_prompt(tok, queries) + _words(tok, t) + [tok.eos_token_id] for t in captions]
    ids, mask = tok.pad(rows, padding_side="right")
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, queries + 1:] = True
    return ids, mask, target & mask.bool()


def soft_prompt(tok, queries: int) -> list[int]:
    """The LLM's prompt start: Q image tokens (where the projected queries go), then BOS, as BLIP-2 feeds OPT."""
    return [tok.token_to_id("[IMG]")] * queries + [tok.bos_token_id]


def vqa_prompt(question: str) -> str:
    """The paper's zero-shot VQA prompt for OPT (sec. 4.2)."""
    return f"Question: {question} Answer:"


# ------------------------------------------------------------------------------------ stage 0: frozen parts


class _AttributeViT(nn.Module):
    """A ViT whose pooled [CLS] feeds a color head and a shape head (one linear layer, split): pretraining the image
    encoder on attributes, never on their combinations."""

    def __init__(self, vit_config, colors: int, shapes: int):
        from polymodal.models.vit import ViT

        super().__init__()
        self.vit = ViT(replace(vit_config, num_labels=colors + shapes))
        self.colors = colors

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.vit.classify(pixel_values)  # (B, colors + shapes)
        return logits[:, : self.colors], logits[:, self.colors:]


def _stage0_config(c: Blip2ShapesConfig, steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=c.batch_size, lr=2e-3, seed=c.seed, log_every=max(1, steps // 5),
                       save_every=steps, weight_decay=0.01, warmup_steps=min(30, steps // 10))


def _train_vision(c: Blip2ShapesConfig, where: Path) -> None:
    from polymodal.data.shapes import COLORS, SHAPES

    samples = _world(c, 0, "train", c.train_images)
    pixels = _pixels(c, samples)
    color = torch.tensor([list(COLORS).index(s.color) for s in samples])
    shape = torch.tensor([SHAPES.index(s.shape) for s in samples])
    model = _AttributeViT(vision_config(c), len(COLORS), len(SHAPES))

    def loss_fn(m, b):
        lc, ls = m(b["pixel_values"])
        acc = ((lc.argmax(1) == b["color"]) & (ls.argmax(1) == b["shape"])).float().mean().detach()
        return F.cross_entropy(lc, b["color"]) + F.cross_entropy(ls, b["shape"]), {"accuracy": acc}

    data = ShuffledBatches(len(samples), c.batch_size,
                           lambda i: {"pixel_values": pixels[i], "color": color[i], "shape": shape[i]}, seed=c.seed)
    fit(Task(model, loss_fn, data), _stage0_config(c, c.vision_steps), where / "vision-run", quiet=True)
    state = {k: v for k, v in model.vit.state_dict().items() if not k.startswith("head.")}
    torch.save(state, where / "vision.pt")


def _llm_documents(c: Blip2ShapesConfig) -> list[str]:
    """The LLM's text: scenes' captions alone, and each caption followed by the scene's questions and answers in
    the VQA prompt's wording: a language model of the world that has read descriptions and questions about them,
    never an image. Its scenes are drawn from every color-shape combination (seed 3), as a real LLM knows the
    words "a red triangle" whether or not a training image showed one; the held-out combinations are held out of
    what the Q-Former sees (stages 1 and 2), which is what the never-seen evaluation measures."""
    docs = []
    for s in _world(c, 3, "all", c.train_images):
        docs.append(s.caption)
        docs += [f"{s.caption}. {vqa_prompt(q)} {a}" for q, a in s.qa]
    return docs


def _train_llm(c: Blip2ShapesConfig, tok, where: Path) -> None:
    import polymodal as pm

    docs = _llm_documents(c)
    ids, mask = tok.pad([[tok.bos_token_id, *_words(tok, d), tok.eos_token_id] for d in docs], padding_side="right")
    # PyTorch's default initialization, not OPT's N(0, 0.02): from that one this tiny LLM came out unable to use a
    # soft prompt (stage 2 stalled at a caption loss of 0.77, blind guessing; 0.30 from this one, 200 steps each)
    model = pm.build("opt", llm_config(c, tok.vocab_size))

    def loss_fn(m, b):
        # every document at a random offset of up to 2Q positions: a real LLM has read text at every position, and
        # stage 2 puts the soft prompt's Q tokens before the text
        mask = b["attention_mask"]
        offset = torch.randint(0, 2 * c.num_query_tokens + 1, (mask.shape[0], 1), device=mask.device)
        positions = mask.cumsum(1) - 1 + offset
        logits = m(b["input_ids"], mask, position_ids=positions)[:, :-1]
        labels = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    data = ShuffledBatches(len(docs), c.batch_size, lambda i: {"input_ids": ids[i], "attention_mask": mask[i]},
                           seed=c.seed)
    fit(Task(model, loss_fn, data), _stage0_config(c, c.llm_steps), where / "llm-run", quiet=True)
    pm.save(model, where / "llm")  # transformers' OPTForCausalLM layout
    tok.save_pretrained(where / "llm")


def frozen_parts(c: Blip2ShapesConfig, tok, where: str | Path) -> tuple[dict, nn.Module]:
    """The frozen image encoder's state dict and the frozen OPT, trained into `where` the first time (each part
    is written last, after its run: a directory holding it is complete) and read back afterwards. The global
    random state is left as it was, so a run's own initialization does not depend on whether they were built."""
    import polymodal as pm

    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(c.seed)
        if not (where / "vision.pt").is_file():
            _train_vision(c, where)
        if not (where / "llm" / "config.json").is_file():
            _train_llm(c, tok, where)
    vision = torch.load(where / "vision.pt", weights_only=True)
    llm = pm.load(where / "llm")
    if llm.config != llm_config(c, tok.vocab_size):
        raise ConfigError(f"{where}/llm was trained with other settings (width, vocabulary); use another frozen=")
    return vision, llm


def init_weights(model: nn.Module) -> nn.Module:
    """BERT's and OPT's initialization (initializer_range 0.02, as LAVIS starts a Q-Former without BERT's weights
    and OPT trains): linear and embedding weights ~ N(0, 0.02), biases 0, the padding row 0, LayerNorms 1 and 0;
    query tokens ~ N(0, 0.02) (LAVIS), never the zeros Blip2 is built with (identical queries stay identical)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("query_tokens"):
            nn.init.normal_(p, std=0.02)
    return model


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_stage1(model: QFormerPretraining, c: Blip2ShapesConfig, tok) -> dict:
    """ITC image->text recall@1 among every caption of the world (seen and never-seen), and ITM accuracy on the
    true caption vs another scene's, on fresh images of seen and never-seen combinations."""
    from polymodal.data.shapes import COLORS, SHAPES

    m = model.blip2.eval()
    device = next(m.parameters()).device
    labels = [f"a {col} {sh}" for col in COLORS for sh in SHAPES]
    ids, mask = qformer_text(tok, labels)
    text = m.encode_text(ids.to(device), mask.to(device))  # (30, E)
    result = {}
    for split in ("train", "heldout"):
        samples = _world(c, 1, split, c.eval_images)
        px = _pixels(c, samples).to(device)
        best = (m.encode_image(px) @ text.T).amax(1).argmax(-1).tolist()  # (n,): max over queries, then captions
        result[f"itc_recall@1_{split}"] = sum(labels[b] == s.caption for b, s in zip(best, samples)) / len(samples)
        wrong = [labels[(labels.index(s.caption) + 7) % len(labels)] for s in samples]  # always another caption
        correct = 0
        for captions, want in (([s.caption for s in samples], 1), (wrong, 0)):
            ids, mask = qformer_text(tok, captions)
            p = m.itm(px, ids.to(device), mask.to(device)).softmax(-1)[:, 1]
            correct += int(((p > 0.5) == bool(want)).sum())
        result[f"itm_accuracy_{split}"] = correct / (2 * len(samples))
    return result


def _question_kind(question: str) -> str:
    return " ".join(question.split()[:2])  # "how many", "what color", "what shape", "is there"


@torch.no_grad()
def evaluate_stage2(model: nn.Module, c: Blip2ShapesConfig, tok) -> dict:
    """Greedy captions (exact match with one of the scene's true captions) and zero-shot VQA (the LLM's greedy
    answer to "Question: ... Answer:", its first word against the answer), on fresh scenes of seen and never-seen
    color-shape combinations; VQA per kind of question too."""
    model.eval()
    device = next(model.parameters()).device
    Q = c.num_query_tokens
    result = {}
    for split in ("train", "heldout"):
        samples = _world(c, 1, split, c.eval_images)
        px = _pixels(c, samples)
        captions = []
        for start in range(0, len(samples), 128):
            n = len(px[start: start + 128])
            prompt = torch.tensor([soft_prompt(tok, Q)] * n, device=device)
            out = model.generate(prompt, pixel_values=px[start: start + 128].to(device), max_new_tokens=8)
            captions += [tok.decode(row[Q + 1:]).strip() for row in out.tolist()]
        result[f"caption_exact_{split}"] = sum(t in s.captions for t, s in zip(captions, samples)) / len(samples)
        result[f"caption_examples_{split}"] = [[s.caption, t] for s, t in zip(samples[:4], captions)]
        rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
        hits: dict[str, list[bool]] = {}
        examples = []
        for start in range(0, len(rows), 128):
            chunk = rows[start: start + 128]
            ids, mask = tok.pad([soft_prompt(tok, Q) + _words(tok, vqa_prompt(q)) for _, q, _ in chunk])
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=3,
                                 pixel_values=px[[i for i, _, _ in chunk]].to(device))
            for (_, q, a), row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                answer = (tok.decode(row).split() or [""])[0]
                hits.setdefault(_question_kind(q), []).append(answer == a)
                if len(examples) < 4:
                    examples.append([q, a, answer])
        every = [h for v in hits.values() for h in v]
        result[f"vqa_accuracy_{split}"] = sum(every) / len(every)
        result[f"vqa_by_kind_{split}"] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
        result[f"vqa_examples_{split}"] = examples
    return result


# ---------------------------------------------------------------------------------------------- export

ITG_HEAD_FILE = "itg_head.safetensors"


def export_stage1(model: QFormerPretraining, out: Path, tok) -> None:
    """The retrieval model in transformers' `Blip2ForImageTextRetrieval` layout, the tokenizer, and ITG's head and
    temperature under LAVIS's names (`Qformer.cls.predictions.*`; its decoder is the tied word embeddings)."""
    from safetensors.torch import save_file

    import polymodal as pm

    pm.save(model.blip2, out)
    tok.save_pretrained(out)
    head = model.lm_head
    tensors = {"Qformer.cls.predictions.transform.dense.weight": head.dense.weight,
               "Qformer.cls.predictions.transform.dense.bias": head.dense.bias,
               "Qformer.cls.predictions.transform.LayerNorm.weight": head.norm.weight,
               "Qformer.cls.predictions.transform.LayerNorm.bias": head.norm.bias,
               "Qformer.cls.predictions.bias": head.bias, "temp": model.temp}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(Path(out) / ITG_HEAD_FILE))


def export_stage2(model: nn.Module, out: Path, tok) -> None:
    """The generative model in transformers' `Blip2ForConditionalGeneration` layout, with the tokenizer."""
    import polymodal as pm

    pm.save(model, out)
    tok.save_pretrained(out)


def init_from_stage1(model: nn.Module, run: str | Path) -> None:
    """Stage 2's start from a stage-1 run: its queries and Q-Former (shared self-attention, cross-attention, the
    queries' feed-forward; the text feed-forward has no place in the generative Q-Former, as in LAVIS)."""
    import polymodal as pm

    where = Path(run) / "model"
    if not (where / "config.json").is_file():
        raise ConfigError(f"init={str(run)!r}: expected a finished blip2-shapes stage-1 run (its model/ directory)")
    source = pm.load(where)
    if source.config.task != "retrieval":
        raise ConfigError(f"init={str(run)!r} holds a {source.config.task} model; stage 2 starts from stage 1's")
    target = model.qformer.state_dict()
    state = {k: v for k, v in source.qformer.state_dict().items() if k in target}
    try:
        model.qformer.load_state_dict(state)
        model.query_tokens.data.copy_(source.query_tokens.data)
    except RuntimeError as e:
        raise ConfigError(f"init={str(run)!r}: its Q-Former does not fit this run's settings ({e})") from None


# ---------------------------------------------------------------------------------------------- build


def build_blip2_shapes(c: Blip2ShapesConfig, world: World) -> Task:
    import polymodal as pm

    if c.stage == "both" or not c.frozen:
        raise ConfigError("build_blip2_shapes builds one stage with its frozen= directory; `run` resolves them")
    tok = shapes_tokenizer()
    samples = _world(c, 0, "train", c.train_images)
    pixels = _pixels(c, samples)
    captions = [s.caption for s in samples]
    if c.stage == "1":
        model = init_weights(QFormerPretraining(blip2_config(c, tok, 1), tok.token_to_id("[DEC]")))
        vision, _ = frozen_parts(c, tok, c.frozen)
        model.blip2.vision_model.load_state_dict(vision)
        _freeze(model.blip2.vision_model)
        ids, mask = qformer_text(tok, captions)
        data = _batches(c, world, len(samples),
                        lambda i: {"pixel_values": pixels[i], "input_ids": ids[i], "attention_mask": mask[i]})
        return Task(model, stage1_loss, data, after_step=_clamp_temperature,
                    evaluate=lambda m: evaluate_stage1(m, c, tok), export=lambda m, d: export_stage1(m, d, tok))
    model = init_weights(pm.build("blip-2", blip2_config(c, tok, 2)))
    vision, llm = frozen_parts(c, tok, c.frozen)
    model.vision_model.load_state_dict(vision)
    model.language_model.load_state_dict(llm.state_dict())
    if c.init:
        init_from_stage1(model, c.init)
    _freeze(model.vision_model)
    _freeze(model.language_model)
    ids, mask, target = llm_caption_rows(tok, c.num_query_tokens, captions)
    data = _batches(c, world, len(samples), lambda i: {"pixel_values": pixels[i], "input_ids": ids[i],
                                                       "attention_mask": mask[i], "target": target[i]})
    return Task(model, stage2_loss, data, evaluate=lambda m: evaluate_stage2(m, c, tok),
                export=lambda m, d: export_stage2(m, d, tok))


# ----------------------------------------------------------------------------------------- the stages


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].strip() not in keys]


def plan(name: str, c: Blip2ShapesConfig, out: str | Path, overrides: list[str], resume: bool,
         quiet: bool = False) -> dict | None:
    """How `polymodal train blip2-shapes` runs: one stage (None: the usual single run, once `frozen=` is
    resolved), both stages one after the other (OUT/stage1, OUT/stage2 from it), or the ablation (also
    OUT/stage2-scratch, then OUT/ablation.md and .json). The frozen parts live in OUT/frozen unless given."""

    out = Path(out)
    if c.stage != "both" and not c.ablation:
        if c.frozen:
            return None
        frozen = out / "frozen"
        if c.init:  # the stage-1 Q-Former learned to read one image encoder: stage 2 keeps it
            recorded = Path(c.init) / "frozen.json"
            if not recorded.is_file():
                raise ConfigError(f"init={c.init!r}: no frozen.json (the frozen parts its stage 1 used) in it; is it "
                                  "a blip2-shapes stage-1 run? Pass frozen=DIR to name them")
            frozen = Path(json.loads(recorded.read_text())["frozen"])
        return _stage(name, out, [*overrides, f"frozen={frozen}"], resume, frozen, quiet)
    base = _without(overrides, "stage", "init", "ablation", "frozen")
    frozen = [f"frozen={c.frozen or out / 'frozen'}"]
    arms = {"stage1": ["stage=1"], "stage2": ["stage=2", f"init={out / 'stage1'}"]}
    if c.ablation:
        arms["stage2-scratch"] = ["stage=2"]
    results = {}
    for arm, extra in arms.items():
        t0 = time.perf_counter()
        results[arm] = _stage(name, out / arm, [*base, *frozen, *extra, "ablation=false"], resume,
                              Path(frozen[0].partition("=")[2]), quiet)
        results[arm]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    # stage 2's summary (steps, losses, evaluation: what `polymodal train` reports) with every stage's beside it
    summary = {**results["stage2"], "stages": results}
    if c.ablation:
        summary["table"] = ablation_table(results, c)
        (out / "ablation.md").write_text(summary["table"] + "\n")
        (out / "ablation.json").write_text(dump_json({k: results[k].get("eval") for k in results}, indent=2))
    (out / "results.json").write_text(dump_json(summary, indent=2))
    return summary


def _stage(name: str, out: Path, overrides: list[str], resume: bool, frozen: Path, quiet: bool) -> dict:
    """One stage's run, then `out/frozen.json` naming the frozen parts it used (stage 2's `init=` reads it)."""
    from polymodal.train.recipes import run

    summary = run(name, out, overrides, resume, quiet)
    (out / "frozen.json").write_text(dump_json({"frozen": str(frozen)}))
    return summary


def ablation_table(results: dict, c: Blip2ShapesConfig) -> str:
    """Markdown: stage 2 from the stage-1 Q-Former vs from scratch, captioning and zero-shot VQA."""
    rows = ["| stage 2 starts from | caption exact, seen | caption exact, **never-seen** | VQA, seen | "
            "VQA, **never-seen** | stage-2 loss (last) | stage-2 training s |", "|---|---|---|---|---|---|---|"]
    for arm, label in (("stage2", f"the stage-1 Q-Former ({c.max_steps} steps of ITC + ITM + ITG)"),
                       ("stage2-scratch", "scratch (no stage 1)")):
        r = results[arm]
        e = r["eval"]
        rows.append(f"| {label} | {100 * e['caption_exact_train']:.1f}% | {100 * e['caption_exact_heldout']:.1f}% | "
                    f"{100 * e['vqa_accuracy_train']:.1f}% | {100 * e['vqa_accuracy_heldout']:.1f}% | "
                    f"{r['final_loss']:.3f} | {r['seconds']:.0f} |")
    kinds = sorted(results["stage2"]["eval"]["vqa_by_kind_heldout"])
    rows += ["", "VQA per kind of question (seen / never-seen):", "",
             "| stage 2 starts from | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm, label in (("stage2", "stage 1"), ("stage2-scratch", "scratch")):
        e = results[arm]["eval"]
        rows.append(f"| {label} | " + " | ".join(
            f"{100 * e['vqa_by_kind_train'][k]:.0f}% / {100 * e['vqa_by_kind_heldout'][k]:.0f}%" for k in kinds) + " |")
    return "\n".join(rows)
