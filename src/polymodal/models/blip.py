"""BLIP (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language
Understanding and Generation").

    v = ViT(image)                                    (B, 1+N, Dv): [CLS] and patch tokens after the final LN
    ITC:  sim = <norm(W_v v_[CLS]), norm(W_t BERT(text)_[CLS])>        unimodal text encoder, no cross-attention
    ITM:  p(match) = softmax(W_itm BERT(text, cross=v)_[CLS])          image-grounded text encoder
    LM:   p(w_t | w_<t, image) = head(BERT_causal(w_<t, cross=v))        image-grounded text decoder
    VQA:  q = BERT(question, cross=v); answer = BERT_causal(bos, cross=q)

The paper's multimodal mixture of encoder-decoder (MED) is one BERT per role over a ViT: every text layer is
self-attention -> cross-attention to the image -> MLP, post-norm; the encoder attends both ways, the decoder
causally and starts from [DEC] (the `bos_token_id`). CapFilt (the paper's dataset bootstrapping) is a use of
these parts: the captioner writes synthetic captions, the ITM head filters noisy pairs
(`polymodal.pipelines`, `Blip.itm`). Pretraining may share the decoder's weights with the encoder but for
self-attention, and train ITC against momentum encoders and a queue of their features (`BlipPretraining`).

The released checkpoints are task models, as in transformers: `BlipForConditionalGeneration` (captioning: ViT +
decoder), `BlipForImageTextRetrieval` (ViT + encoder + ITC projections + ITM head), `BlipForQuestionAnswering`
(ViT + encoder + decoder). `BlipConfig.task` chooses which parts are built. The vision tower is polymodal's ViT
(`models/vit.py`: pre-norm blocks, learned positions, no LN before the blocks); the text towers are polymodal's
BERT (`models/bert.py`) without token-type embeddings.

Checked against transformers' `BlipForConditionalGeneration`, `BlipForImageTextRetrieval` and
`BlipForQuestionAnswering` (tests/test_blip.py): logits, ITM/ITC scores, and greedy and beam captions and
answers token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict
from polymodal.generation import DecoderState, generate
from polymodal.models.bert import Bert, BertConfig, hf_rules
from polymodal.models.vit import ViT, ViTConfig
from polymodal.nn import activation
from polymodal.nn.attention import KVCache
from polymodal.processing.image import ImageProcessor
from polymodal.registry import Family, Layout, native_layout
from polymodal.weights.keymap import Drop, KeyMap, Rename
from polymodal.weights.record import record

Task = Literal["captioning", "retrieval", "vqa", "pretraining"]
TASKS: dict[str, str] = {  # transformers' architecture -> task
    "BlipForConditionalGeneration": "captioning",
    "BlipForImageTextRetrieval": "retrieval",
    "BlipForQuestionAnswering": "vqa",
}


@dataclass(frozen=True)
class BlipTextConfig:
    """transformers' `BlipTextConfig` fields (and its defaults, so that a config file leaving one out reads the
    same): a BERT-base-shaped text transformer over BERT's uncased WordPiece plus [DEC] and [ENC]."""

    vocab_size: int = 30524
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    bos_token_id: int = 30522  # [DEC]: the decoder's first token
    pad_token_id: int = 0
    sep_token_id: int = 102  # [SEP]: a caption or answer ends here

    def bert(self, *, decoder: bool, context_dim: int) -> BertConfig:
        """The BERT of one role: the causal decoder or the bidirectional encoder, both cross-attending."""
        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
                          max_position_embeddings=self.max_position_embeddings, type_vocab_size=0,
                          layer_norm_eps=self.layer_norm_eps, pad_token_id=self.pad_token_id, is_decoder=decoder,
                          add_cross_attention=True, encoder_hidden_size=context_dim, pooler=False)


def _blip_vit(**kw) -> ViTConfig:
    return ViTConfig(**{"image_size": 384, "layer_norm_eps": 1e-5, **kw})


@dataclass(frozen=True)
class BlipPretraining:
    """How the pretraining model learns (polymodal's fields: no transformers config holds them; the task models
    that `Blip.part` hands out never carry them).

    itc: "in-batch" contrasts each image with the batch's texts and back; "momentum" is the paper's ITC (sec. 3.2,
    from ALBEF): EMA copies of the vision and text encoders and projections (`momentum` per step) embed the batch,
    a queue of their last `queue_size` features serves as extra negatives, and the targets are softened by the
    momentum model's own similarities (weight `alpha`, raised linearly from 0 over `alpha_ramp` steps, as the
    authors raise it over the first epoch; 0: from the start). share: the text decoder shares every parameter
    with the text encoder except its self-attention and that block's LayerNorm (the paper's best setting, Table 2;
    the authors' `tie_encoder_decoder_weights(..., skip_key='/attention')`)."""

    itc: Literal["in-batch", "momentum"] = "in-batch"
    queue_size: int = 4096
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_ramp: int = 0
    share: bool = False

    def __post_init__(self):
        if self.itc not in ("in-batch", "momentum"):
            raise ValueError(f"itc must be 'in-batch' or 'momentum', got {self.itc!r}")
        if not (isinstance(self.queue_size, int) and self.queue_size >= 1):
            raise ValueError(f"queue_size must be a positive number of features, got {self.queue_size!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (the EMA keeps this share of its weights), got "
                             f"{self.momentum!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (the soft targets' weight) must be in [0, 1], got {self.alpha!r}")
        if self.alpha_ramp < 0:
            raise ValueError(f"alpha_ramp must be >= 0 steps, got {self.alpha_ramp!r}")


@dataclass(frozen=True)
class BlipConfig:
    vision: ViTConfig = field(default_factory=_blip_vit)
    text: BlipTextConfig = field(default_factory=BlipTextConfig)
    task: Task = "captioning"
    image_text_hidden_size: int = 256  # ITC's shared embedding width (retrieval)
    pretraining: BlipPretraining = field(default_factory=BlipPretraining)  # read by task="pretraining" only

    def __post_init__(self):
        if self.task not in ("captioning", "retrieval", "vqa", "pretraining"):
            raise ValueError(f"task must be 'captioning', 'retrieval', 'vqa' or 'pretraining', got {self.task!r}")
        if self.vision.pool != "cls" or not self.vision.class_token or self.vision.backbone:
            raise ValueError("BLIP's vision tower is a plain ViT with a class token (pool='cls', no backbone)")
        if self.task == "vqa" and self.text.hidden_size != self.vision.hidden_size:
            # the answer decoder cross-attends the question encoder through layers sized for the image
            raise ValueError(f"VQA needs text and vision of one width, got {self.text.hidden_size} and "
                             f"{self.vision.hidden_size}")


class LMHead(nn.Module):
    """BERT's masked-LM head (`cls.predictions`): dense -> activation -> LayerNorm -> the tied word embeddings
    plus a bias: (B, T, D) -> (B, T, V)."""

    def __init__(self, dim: int, vocab: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.norm(self.act(self.dense(x))), embedding, self.bias)


def tie_text_towers(encoder: Bert, decoder: Bert) -> None:
    """Make `decoder` share every module of `encoder` except each layer's self-attention (`attn`) and its LayerNorm
    (`norm1`): the embeddings, cross-attention, MLP and their norms become the same modules (BLIP sec. 3.2: "the
    text encoder and text decoder share all parameters except for the SA layers"; the authors skip the modules under
    `attention`, which holds the self-attention and its output LayerNorm)."""
    for name in ("word_embeddings", "position_embeddings", "embed_norm"):
        setattr(decoder, name, getattr(encoder, name))
    for enc, dec in zip(encoder.layers, decoder.layers, strict=True):
        for name in ("cross_attn", "norm_cross", "mlp", "norm2"):
            setattr(dec, name, getattr(enc, name))


def _text_keys(input_ids: Tensor, mask: Tensor) -> Tensor:
    """A 64-bit polynomial hash of each text's real tokens (B, T) -> (B,): equal texts, whatever their padding,
    get equal keys, so that queued features of the same caption count as positives (as the authors' retrieval
    fine-tuning keeps an `idx_queue` of image ids). int64 products wrap around, which is the hash's modulus."""
    tokens = (input_ids.long() + 1) * mask.long()  # padding 0, every real token >= 1
    powers = [pow(0x9E3779B97F4A7C15, i, 1 << 64) for i in range(tokens.shape[1])]
    powers = torch.tensor([p - (1 << 64) if p >= 1 << 63 else p for p in powers], device=tokens.device)
    return (tokens * powers).sum(-1)


def _gathered(x: Tensor) -> Tensor:
    """x from every process, concatenated (one process: x), so that each holds the same queue."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


class MomentumEncoders(nn.Module):
    """ITC's momentum model and feature queue (BLIP sec. 3.2, from ALBEF, Li et al. 2021): EMA copies of the
    vision encoder, the unimodal text encoder and both projections (no gradients: `update` moves them), and a
    ring of the last `queue_size` momentum image and text features with each text's key (`_text_keys`).
    Training state, not a task model's: `Blip.part` never hands it out, so exported checkpoints leave it out, and
    the training checkpoint (the model's state_dict) holds it with the queue, so a resumed run continues exactly."""

    PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj")

    def __init__(self, c: BlipConfig):
        super().__init__()
        t, E, K = c.text, c.image_text_hidden_size, c.pretraining.queue_size
        self.vision_model = ViT(c.vision)
        # ITC reads the text alone: the copy has no cross-attention to keep
        self.text_encoder = Bert(replace(t.bert(decoder=False, context_dim=c.vision.hidden_size),
                                         add_cross_attention=False, encoder_hidden_size=None))
        self.vision_proj = nn.Linear(c.vision.hidden_size, E)
        self.text_proj = nn.Linear(t.hidden_size, E)
        self.requires_grad_(False)
        self.register_buffer("image_queue", torch.zeros(K, E))  # (K, E), unit rows once written
        self.register_buffer("text_queue", torch.zeros(K, E))
        self.register_buffer("text_keys", torch.zeros(K, dtype=torch.long))  # (K,)
        self.register_buffer("written", torch.zeros((), dtype=torch.long))  # features enqueued so far
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # EMA steps so far (alpha's ramp)

    def pairs(self, online: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(momentum parameters, the online parameters they follow), matched by name."""
        mine = dict(self.named_parameters())
        return list(mine.values()), [online.get_parameter(name) for name in mine]

    @torch.no_grad()
    def reset(self, online: nn.Module) -> None:
        """Start as a copy of the online model, with an empty queue (the authors' `copy_params`)."""
        for m, p in zip(*self.pairs(online)):
            m.copy_(p)
        for b in self.buffers():
            b.zero_()

    @torch.no_grad()
    def update(self, online: nn.Module, m: float) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta (the authors' `_momentum_update`)."""
        mine, theirs = self.pairs(online)
        torch._foreach_mul_(mine, m)
        torch._foreach_add_(mine, [p.detach() for p in theirs], alpha=1 - m)
        self.updates += 1

    @torch.no_grad()
    def features(self, pixel_values: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The momentum model's unit image and text features (B, E) of a batch of pairs."""
        image = F.normalize(self.vision_proj(self.vision_model.pooled(pixel_values)), dim=-1)
        text = F.normalize(self.text_proj(self.text_encoder(input_ids, mask)[:, 0]), dim=-1)
        return image, text

    def queued(self) -> tuple[Tensor, Tensor, Tensor]:
        """The written part of the queue: image features (n, E), text features (n, E), text keys (n,)."""
        n = min(int(self.written), self.image_queue.shape[0])
        return self.image_queue[:n], self.text_queue[:n], self.text_keys[:n]

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, keys: Tensor) -> None:
        """Write a batch's momentum features over the oldest entries (a ring; every process writes the same)."""
        image, text, keys = _gathered(image), _gathered(text), _gathered(keys)
        K = self.image_queue.shape[0]
        image, text, keys = image[-K:], text[-K:], keys[-K:]  # a batch larger than the queue keeps its last K
        slots = (self.written + torch.arange(len(keys), device=keys.device)) % K
        self.image_queue[slots], self.text_queue[slots], self.text_keys[slots] = image.to(self.image_queue), \
            text.to(self.text_queue), keys
        self.written += len(keys)


class Blip(nn.Module):
    """The parts of `config.task`: captioning (vision_model, text_decoder, lm_head), retrieval (vision_model,
    text_encoder, vision_proj, text_proj, itm_head), VQA (vision_model, text_encoder, text_decoder, lm_head), or
    pretraining (all of them and ITC's temperature: the three objectives at once; `part(task)` then hands out the
    task models, sharing its weights). A pretraining model may also hold ITC's momentum encoders and queue
    (`momentum`) and a decoder that shares the encoder's weights (`config.pretraining`)."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = c = config
        t, Dv = c.text, c.vision.hidden_size
        self.vision_model = ViT(c.vision)
        if c.task != "captioning":
            self.text_encoder = Bert(t.bert(decoder=False, context_dim=Dv))
        if c.task != "retrieval":
            self.text_decoder = Bert(t.bert(decoder=True, context_dim=Dv))
            self.lm_head = LMHead(t.hidden_size, t.vocab_size, t.hidden_act, t.layer_norm_eps)
        if c.task in ("retrieval", "pretraining"):
            self.vision_proj = nn.Linear(Dv, c.image_text_hidden_size)
            self.text_proj = nn.Linear(t.hidden_size, c.image_text_hidden_size)
            self.itm_head = nn.Linear(t.hidden_size, 2)
        if c.task == "pretraining":
            self.temp = nn.Parameter(torch.tensor(0.07))  # ITC's softmax temperature, learned (clamped by training)
            record(self).layout = "polymodal"  # no transformers class holds all parts; part(task) saves as one
            if c.pretraining.share:
                tie_text_towers(self.text_encoder, self.text_decoder)
            if c.pretraining.itc == "momentum":
                with torch.device("meta"):  # no initialization of its own: it starts as a copy (and draws no RNG)
                    momentum = MomentumEncoders(c)
                self.momentum = momentum.to_empty(device=self.temp.device)
                self.momentum.reset(self)

    # ------------------------------------------------------------------------------ the three objectives

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, 3, H, W) -> the ViT's tokens (B, 1+N, Dv), transformers' `last_hidden_state`."""
        return self.vision_model(pixel_values)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                answer_ids: Tensor | None = None, answer_mask: Tensor | None = None):
        """The task's main output for images (B, 3, H, W) and texts (B, T): captioning, the decoder's next-token
        logits (B, T, V) (transformers' `BlipForConditionalGeneration(...).logits`); retrieval, the ITM logits
        (B, 2) of image i with text i; VQA, the answer decoder's logits (B, T_a, V) for the questions input_ids
        and the answers answer_ids ([DEC] first; `answer_logits`); pretraining, the three losses
        (`pretraining_losses`)."""
        if self.config.task == "captioning":
            return self.decode(input_ids, attention_mask, self._checked_image(pixel_values, input_ids))
        if self.config.task == "retrieval":
            return self.itm(pixel_values, input_ids, attention_mask)
        if self.config.task == "pretraining":
            return self.pretraining_losses(pixel_values, input_ids, attention_mask)
        if answer_ids is None:
            raise ValueError("a VQA model's forward needs the answers (answer_ids) too; to answer, use "
                             "generate(pixel_values, question_ids)")
        return self.answer_logits(pixel_values, input_ids, answer_ids, attention_mask, answer_mask)

    def itm(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text matching: logits (B, 2) over (no match, match) for image i and text i."""
        return self.itm_logits(self._checked_image(pixel_values, input_ids), input_ids, attention_mask)

    def itm_logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """`itm` from the images' tokens (B, 1+N, Dv) (`image_embeds`), for a caller that reuses them."""
        self._needs("retrieval", "pretraining")
        if image.ndim != 3 or image.shape[0] != input_ids.shape[0]:
            raise ValueError(f"expected image tokens ({input_ids.shape[0]}, 1+N, D) for {input_ids.shape[0]} texts, "
                             f"got {tuple(image.shape)}")
        grounded = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image)  # (B, T, D)
        return self.itm_head(grounded[:, 0])

    def match(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both scores of image i and text i from the images' tokens (B, 1+N, Dv), computed once for both ->
        (ITM logits (B, 2), ITC cosine (B,))."""
        logits = self.itm_logits(image, input_ids, attention_mask)
        return logits, (self.project_image(image) * self.encode_text(input_ids, attention_mask)).sum(-1)

    def project_image(self, image: Tensor) -> Tensor:
        """ITC's image embedding (B, E), unit length, from the images' tokens (B, 1+N, Dv): their [CLS]."""
        return F.normalize(self.vision_proj(image[:, 0]), dim=-1)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """ITC's image embedding (B, E), unit length (the ViT computes only [CLS] in its last block)."""
        self._needs("retrieval", "pretraining")
        return self.project_image(self.vision_model.pooled(pixel_values)[:, None])

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITC's text embedding (B, E), unit length: the text encoder without the image."""
        self._needs("retrieval", "pretraining")
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)[:, 0]), dim=-1)

    def itc(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text contrastive similarity (B_images, B_texts): cosine of the projected [CLS] features
        (transformers' `use_itm_head=False` score)."""
        return self.encode_image(pixel_values) @ self.encode_text(input_ids, attention_mask).T

    def pretraining_losses(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                           label_smoothing: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
        """The paper's three objectives on a batch of pairs (image i, text i), texts starting with [CLS] ->
        (ITC, ITM, LM) losses, to be summed with equal weights.

        ITC: contrastive image->text and text->image, identical texts counting as positives of each other: over
        the batch (`config.pretraining.itc="in-batch"`), or against the momentum model's features of the batch
        and of its queue with soft targets ("momentum", `itc_momentum`; a model in training mode then enqueues the
        batch's momentum features). ITM: the positive pairs plus one hard negative per image and per text, drawn
        in proportion to the ITC similarity within the batch (sec. 3.2). LM: the decoder reads the text with
        [DEC] first and predicts each next token, with label smoothing 0.1 as in the paper."""
        self._needs("pretraining")
        B = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        image = self._checked_image(pixel_values, input_ids)  # (B, 1+N, Dv)
        same = (input_ids[:, None] == input_ids[None]).all(-1)  # (B, B): equal texts (padded alike)
        if self.config.pretraining.itc == "momentum":
            itc, i2t, t2i = self.itc_momentum(pixel_values, image, input_ids, mask)
        else:
            sim = self.project_image(image) @ self.encode_text(input_ids, mask).T / self.temp  # (B, B)
            targets = same.float() / same.sum(1, keepdim=True)
            itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
            i2t, t2i = sim, sim.T

        with torch.no_grad():  # hard negatives: likely under ITC, yet not the pair's own text
            negative_text = self._hard_negatives(i2t, same)  # (B,) for each image
            negative_image = self._hard_negatives(t2i, same)  # (B,) for each text
        texts = torch.cat([input_ids, input_ids[negative_text], input_ids])
        masks = torch.cat([mask, mask[negative_text], mask])
        images = torch.cat([image, image, image[negative_image]])
        grounded = self.text_encoder(texts, masks, encoder_hidden_states=images)[:, 0]  # (3B, D)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(input_ids.device)
        itm = F.cross_entropy(self.itm_head(grounded), labels)

        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.text.bos_token_id
        logits = self.decode(decoder_ids, mask, image)[:, :-1]  # (B, T-1, V)
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                             label_smoothing=label_smoothing)
        return itc, itm, lm

    @staticmethod
    def _hard_negatives(sim: Tensor, same: Tensor) -> Tensor:
        """One negative per row of in-batch similarities sim (B, B), drawn in proportion to softmax(sim) among the
        columns that are not the row's own text -> indices (B,)."""
        weights = sim.float().softmax(-1).masked_fill(same, 0) + (~same) * 1e-6  # (B, B)
        weights[~weights.any(-1)] = 1.0  # a batch of one text has no negative: then any pair will do
        return torch.multinomial(weights, 1).squeeze(1)

    def itc_momentum(self, pixel_values: Tensor, image: Tensor, input_ids: Tensor,
                     mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ITC with momentum distillation and the queue (BLIP sec. 3.2; the authors' `BLIP_Pretrain.forward`):
        each online image feature is contrasted with the momentum text features of the batch and the queue (n
        of them so far), each online text feature with the momentum image features likewise; the target mixes
        the momentum model's softmax (weight alpha) with the true pairs (texts equal to the query's, by key).
        image: the online ViT's tokens (B, 1+N, Dv) -> (loss, image->text (B, B) and text->image (B, B) online
        similarities within the batch, for ITM's hard negatives)."""
        c, mom = self.config.pretraining, self.momentum
        B = input_ids.shape[0]
        image_feat = self.project_image(image)  # (B, E)
        text_feat = self.encode_text(input_ids, mask)  # (B, E)
        keys = _text_keys(input_ids, mask)  # (B,)
        with torch.no_grad():
            image_m, text_m = mom.features(pixel_values, input_ids, mask)  # (B, E) each
            queue_image, queue_text, queue_keys = mom.queued()
            image_all, text_all = torch.cat([image_m, queue_image]), torch.cat([text_m, queue_text])  # (B+n, E)
            positive = (keys[:, None] == torch.cat([keys, queue_keys])[None]).float()  # (B, B+n)
            hard = positive / positive.sum(1, keepdim=True)
            alpha = c.alpha * (mom.updates.float() / c.alpha_ramp).clamp(max=1) if c.alpha_ramp else c.alpha
            i2t_targets = alpha * (image_m @ text_all.T / self.temp).softmax(1) + (1 - alpha) * hard
            t2i_targets = alpha * (text_m @ image_all.T / self.temp).softmax(1) + (1 - alpha) * hard
        i2t = image_feat @ text_all.T / self.temp  # (B, B+n)
        t2i = text_feat @ image_all.T / self.temp
        loss = (-(i2t.log_softmax(1) * i2t_targets).sum(1).mean() - (t2i.log_softmax(1) * t2i_targets).sum(1).mean())
        if self.training:
            mom.enqueue(image_m, text_m, keys)
        return loss / 2, i2t[:, :B].detach(), t2i[:, :B].detach()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """One EMA step of the momentum encoders towards this model (after each optimizer step); nothing without
        them (`config.pretraining.itc="in-batch"`)."""
        if self.config.task == "pretraining" and self.config.pretraining.itc == "momentum":
            self.momentum.update(self, self.config.pretraining.momentum)

    def part(self, task: str) -> Blip:
        """The `task` model ("captioning", "retrieval", "vqa") made of this pretraining model's parts: the same
        modules, not copies, so it saves in transformers' layout as that BlipFor* checkpoint."""
        self._needs("pretraining")
        if task not in ("captioning", "retrieval", "vqa"):
            raise ValueError(f"part() gives 'captioning', 'retrieval' or 'vqa', not {task!r}")
        with torch.device("meta"):  # a plain task model: the pretraining options (momentum, sharing) stay here
            model = Blip(replace(self.config, task=task, pretraining=BlipPretraining()))
        for name, _ in list(model.named_children()):
            setattr(model, name, getattr(self, name))
        return model.train(self.training)

    def answer_logits(self, pixel_values: Tensor, question_ids: Tensor, answer_ids: Tensor,
                      question_mask: Tensor | None = None, answer_mask: Tensor | None = None) -> Tensor:
        """VQA's decoder logits (B, T_a, V) for answers (B, T_a) that start with [DEC], given the question
        (B, T_q) about each image."""
        self._needs("vqa")
        question = self.text_encoder(question_ids, question_mask,
                                     encoder_hidden_states=self._checked_image(pixel_values, question_ids))
        return self.decode(answer_ids, answer_mask, question, question_mask)

    def decode(self, input_ids: Tensor, attention_mask: Tensor | None, context: Tensor | list[tuple[Tensor, Tensor]],
               context_mask: Tensor | None = None, cache: list[KVCache] | None = None,
               position_ids: Tensor | None = None) -> Tensor:
        """The text decoder and LM head: input_ids (B, T) -> logits (B, T, V), cross-attending `context` (B, S, Dc)
        (or its per-layer keys and values) with padding `context_mask` (B, S)."""
        h = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=context,
                              encoder_attention_mask=context_mask, cache=cache, position_ids=position_ids)
        return self.lm_head(h, self.text_decoder.word_embeddings.weight)

    # ------------------------------------------------------------------------------ generation

    def generate(self, input_ids: Tensor | None = None, max_new_tokens: int = 20, do_sample: bool = False, *,
                 pixel_values: Tensor, attention_mask: Tensor | None = None, **options) -> Tensor:
        """The images `pixel_values` (B, 3, H, W), as every generative model takes its extras (API.md). Captioning:
        continue each image's prompt input_ids (B, T), [DEC] first (default: [DEC] alone; left-padded when prompts
        differ in length) -> (B, T + N). VQA: answer the questions input_ids (B, T) ([CLS] q [SEP], right-padded as
        BLIP's processor pads: the encoder's positions are absolute) -> (B, 1 + N), [DEC] first. Generation ends at
        [SEP]; see `polymodal.generation.generate` for the options (num_beams, ...).

        A captioning prompt may also come as BLIP's processor writes it, `[CLS] prompt [SEP]` (right-padded):
        then, as transformers' `BlipForConditionalGeneration.generate` does, [DEC] replaces its first token and its
        closing [SEP] is dropped, so that `generate(**processor(images, text))` gives transformers' tokens."""
        t = self.config.text
        if input_ids is None:
            if self.config.task == "vqa":
                raise ValueError("a VQA model needs the question: generate(question_ids, pixel_values=...)")
            input_ids = torch.full((pixel_values.shape[0], 1), t.bos_token_id, dtype=torch.long,
                                   device=pixel_values.device)
        elif self.config.task != "vqa":
            input_ids, attention_mask = self._decoder_prompt(input_ids, attention_mask)
        options.setdefault("eos_token_id", t.sep_token_id)
        options.setdefault("pad_token_id", t.pad_token_id)
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        pixel_values=pixel_values, **options)

    def _decoder_prompt(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Captioning prompts (B, T) -> the decoder's prompts, [DEC] first. Rows that start with [DEC] are kept as
        given (left-padded when they differ in length). Rows from BLIP's processor, `[CLS] prompt [SEP]`, become
        `[DEC] prompt`, left-padded: transformers swaps the first token for [DEC] and drops the last column, which
        is the same for unpadded rows; in a right-padded batch that column is padding for the shorter rows, whose
        [SEP] transformers then keeps and decodes after, where each row here continues its prompt as it would
        alone."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"expected prompt ids (B, T), T >= 1, got shape {tuple(input_ids.shape)}")
        t = self.config.text
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]  # each row's real tokens
        if any(not r for r in rows):
            raise ValueError("a captioning prompt has no tokens (its attention_mask is all zeros)")
        if all(r[0] == t.bos_token_id for r in rows):
            return input_ids, attention_mask
        if not all(r[0] != t.bos_token_id and len(r) >= 2 and r[-1] == t.sep_token_id for r in rows):
            raise ValueError(f"captioning prompts start with [DEC] (id {t.bos_token_id}), or are all BLIP "
                             f"processor's '[CLS] prompt [SEP]' (ending with id {t.sep_token_id}); got a mix or "
                             "neither")
        rows = [[t.bos_token_id, *r[1:-1]] for r in rows]
        T = max(map(len, rows))
        ids = torch.tensor([[t.pad_token_id] * (T - len(r)) + r for r in rows], device=input_ids.device)
        new_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=input_ids.device)
        return ids, (None if attention_mask is None else new_mask.to(attention_mask.dtype))

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           pixel_values: Tensor | None = None) -> tuple[DecoderState, Tensor]:
        """See `polymodal.generation`. Captioning: the image is encoded once, every decoder layer's cross-attention
        keys and values are cached, and the prompt is decoded. VQA: the question (input_ids) is encoded against
        the image, and the decoder starts from [DEC] over it."""
        if pixel_values is None:
            raise ValueError("BLIP generates from images: pass pixel_values")
        self._needs("captioning", "vqa", "pretraining")
        (B, S), t, p = input_ids.shape, self.config.text, self.lm_head.bias
        vqa = self.config.task == "vqa"
        if vqa:
            max_len = max_len - S + 1  # the decoder's own sequence: [DEC] and the answer
        if max_len > t.max_position_embeddings:  # refused before any work, not when positions run out
            raise ValueError(f"the prompt and max_new_tokens need {max_len} decoder positions; this BLIP's text "
                             f"decoder holds {t.max_position_embeddings} (ask for fewer new tokens)")
        image = self._checked_image(pixel_values, input_ids)
        prompt = None
        if vqa:
            context = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image)  # (B, S, D)
            context_mask = None if bool(attention_mask.all()) else attention_mask
            prompt = torch.full((B, 1), t.bos_token_id, dtype=torch.long, device=input_ids.device)
            input_ids, attention_mask = prompt, torch.ones_like(prompt)
        else:
            context, context_mask = image, None
        cross = [layer.cross_attn.project_kv(context) for layer in self.text_decoder.layers]
        cache = [KVCache(B, t.num_attention_heads, max_len, t.hidden_size // t.num_attention_heads,
                         dtype=p.dtype, device=p.device) for _ in range(t.num_hidden_layers)]
        state, positions = DecoderState.start(cache, attention_mask, max_len, cross=cross, cross_mask=context_mask,
                                              prompt=prompt)
        return state, self.decode(input_ids, attention_mask, cross, context_mask, cache, positions)[:, -1]

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,) -> next-token logits (B, V)."""
        mask, positions = state.advance()
        return self.decode(tokens[:, None], mask, state.cross, state.cross_mask, state.cache, positions)[:, -1]

    # ------------------------------------------------------------------------------ checks

    def _needs(self, *tasks: str) -> None:
        if self.config.task not in tasks:
            raise ValueError(f"this BLIP checkpoint is a {self.config.task} model; this call needs a "
                             f"{' or '.join(tasks)} one")

    def _checked_image(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"expected token ids (B, T), got shape {tuple(input_ids.shape)}")
        if pixel_values.ndim != 4 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"expected one image per text: pixel_values ({input_ids.shape[0]}, 3, H, W), got "
                             f"{tuple(pixel_values.shape)}")
        return self.vision_model(pixel_values)


# ----------------------------------------------------------------------------------------------- presets

_BASE = _blip_vit()
_LARGE = _blip_vit(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_TEXT = BlipTextConfig(num_attention_heads=12)
PRESETS: dict[str, BlipConfig] = {
    "blip-tiny-test": BlipConfig(
        vision=_blip_vit(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=8),
        text=BlipTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, bos_token_id=97, sep_token_id=3),
        image_text_hidden_size=16),
    "Salesforce/blip-image-captioning-base": BlipConfig(vision=_BASE, text=_TEXT),
    "Salesforce/blip-image-captioning-large": BlipConfig(vision=_LARGE, text=_TEXT),
    "Salesforce/blip-itm-base-coco": BlipConfig(vision=_BASE, text=_TEXT, task="retrieval"),
    "Salesforce/blip-itm-large-coco": BlipConfig(vision=_LARGE, text=_TEXT, task="retrieval"),
    "Salesforce/blip-vqa-base": BlipConfig(vision=_BASE, text=_TEXT, task="vqa"),
}
HUB_IDS = {name: name for name in PRESETS if name.startswith("Salesforce/")}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers: `vision_model.embeddings.*` and `vision_model.encoder.layers.{i}.{self_attn.qkv,...}` (already
# fused), BERT names under `text_decoder.bert.` / `text_encoder.`, the LM head as `text_decoder.cls.predictions.*`
# (its decoder weight and bias are tied to the word embeddings and the head's bias: never stored apart here).


def _hf_key_map(c: BlipConfig) -> KeyMap:
    v, layer = "vision_model.", "vision_model.encoder.layers.{i}."
    vision = [
        Rename(f"{v}embeddings.class_embedding", "vision_model.cls_token"),
        Rename(f"{v}embeddings.patch_embedding.{{p}}", "vision_model.patch_embed.proj.{p}"),
        Rename(f"{v}embeddings.position_embedding", "vision_model.pos_embed"),
        Rename(f"{layer}self_attn.qkv.{{p}}", "vision_model.blocks.{i}.attn.qkv.{p}"),
        Rename(f"{layer}self_attn.projection.{{p}}", "vision_model.blocks.{i}.attn.proj.{p}"),
        Rename(f"{layer}layer_norm1.{{p}}", "vision_model.blocks.{i}.norm1.{p}"),
        Rename(f"{layer}layer_norm2.{{p}}", "vision_model.blocks.{i}.norm2.{p}"),
        Rename(f"{layer}mlp.{{fc}}.{{p}}", "vision_model.blocks.{i}.mlp.{fc}.{p}"),
        Rename(f"{v}post_layernorm.{{p}}", "vision_model.norm.{p}"),
    ]
    head = "text_decoder.cls.predictions."
    decoder = [
        *hf_rules("text_decoder.bert.", "text_decoder."),
        Rename(f"{head}transform.dense.{{p}}", "lm_head.dense.{p}"),
        Rename(f"{head}transform.LayerNorm.{{p}}", "lm_head.norm.{p}"),
        Rename(f"{head}bias", "lm_head.bias"),
        Drop(f"{head}decoder.{{p}}"),  # tied: the word embeddings and lm_head.bias
    ]
    # transformers builds these text towers without a pooler and ignores pooler tensors a checkpoint carries
    unused = [Drop("text_encoder.pooler.{rest*}"), Drop("text_decoder.bert.pooler.{rest*}")]
    return KeyMap([*vision, *unused, *(hf_rules("text_encoder.", "text_encoder.") if c.task != "captioning" else []),
                   *(decoder if c.task != "retrieval" else [])])


_HF_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "pad_token_id", "sep_token_id")
_HF_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "hidden_act", "layer_norm_eps")


def _task(raw: dict, shapes: dict) -> str:
    archs = raw.get("architectures") or []
    if archs:
        if archs[0] not in TASKS:
            raise ValueError(f"architecture {archs[0]!r} is not supported; BLIP checkpoints here are "
                             f"{', '.join(TASKS)}")
        return TASKS[archs[0]]
    if "itm_head.weight" in shapes:
        return "retrieval"
    return "vqa" if any(k.startswith("text_encoder.") for k in shapes) else "captioning"


def _read_hf(raw: dict, shapes: dict) -> BlipConfig:
    vision = dict(raw.get("vision_config") or {})
    for key in ("image_size", "patch_size"):
        size = vision.get(key)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"vision_config.{key}={list(size)} is not square")
            vision[key] = size[0]
    return BlipConfig(
        vision=from_dict(ViTConfig, {k: vision[k] for k in _HF_VISION if k in vision},
                         image_size=vision.get("image_size", 384), layer_norm_eps=vision.get("layer_norm_eps", 1e-5)),
        text=from_dict(BlipTextConfig, raw.get("text_config") or {}),
        task=_task(raw, shapes),
        image_text_hidden_size=raw.get("image_text_hidden_size", 256),
    )


def _write_hf(c: BlipConfig) -> dict:
    if c.task == "pretraining":
        raise ValueError("transformers has no class for BLIP's pretraining model: save model.part('captioning') "
                         "(or 'retrieval', 'vqa') in its layout, or this model in polymodal's")
    if c.vision.position != "learned" or not c.vision.qkv_bias or c.vision.num_channels != 3:
        raise ValueError("transformers' BLIP holds a ViT with learned positions and q/k/v biases over RGB; save "
                         "this variant in polymodal's layout (pm.record(model).layout = 'polymodal')")
    arch = next(a for a, task in TASKS.items() if task == c.task)
    return {
        "model_type": "blip",
        "architectures": [arch],
        "image_text_hidden_size": c.image_text_hidden_size,
        "text_config": {**{k: getattr(c.text, k) for k in _HF_TEXT}, "encoder_hidden_size": c.vision.hidden_size},
        "vision_config": {k: getattr(c.vision, k) for k in _HF_VISION},
    }


FAMILY = Family(
    name="blip",
    model=Blip,
    layouts={
        "transformers": Layout("transformers", _read_hf, _write_hf, _hf_key_map),
        "polymodal": native_layout("blip", BlipConfig),
    },
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="BLIP: ViT + BERT multimodal encoder-decoder; captioning, image-text matching/retrieval, VQA",
    image_processor=lambda c: ImageProcessor.blip(size=c.vision.image_size),
    tasks=("image-to-text", "visual-question-answering", "image-text-matching"),
    checkpoints={"captioning": ("BlipForConditionalGeneration", ("image-to-text",)),
                 "vqa": ("BlipForQuestionAnswering", ("visual-question-answering",)),
                 "retrieval": ("BlipForImageTextRetrieval", ("image-text-matching",))},
)
