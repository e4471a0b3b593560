"""BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models").

    v = ViT-g(image)                                  (B, 1+N, Dv) frozen image encoder, after its post-LN
    z = Q-Former(queries, cross = v)                  (B, Q, Dq)   Q learned queries read the image (sec. 3.1)
    generation: p = LLM([W z ; prompt])               the projected queries are a soft visual prompt (sec. 3.3)
    ITC:  s(I, t) = max_q <norm(W_v z_q), norm(W_t Q-Former(t)_[CLS])>   stage 1's contrastive score
    ITM:  p(match) = mean_q W_itm Q-Former([queries ; t], cross = v)_q    queries and text attend to each other

The Q-Former is a BERT whose self-attention layers are shared by the queries and the text, with cross-attention
to the image every `cross_attention_frequency` layers for the query positions only, and a feed-forward of its own
for the queries (`mlp_query`) beside the text's (`mlp`). The generative checkpoints drop the text half.

The language model is polymodal's OPT (decoder-only) or T5 (Flan-T5, encoder-decoder), unchanged. transformers
5.x writes the projected queries into the prompt at the `image_token_index` positions, where the processor put
`num_query_tokens` image tokens (first, before BOS); for T5 the prompt is the encoder's input. A config without
`image_token_index` (transformers 4.x files before the processor expanded image tokens) gets the queries prepended
to the prompt's embeddings, its attention mask extended by ones, as the paper and transformers 4.x do.

Precision: loaded in fp16 (`pm.load(dir, dtype=torch.float16)`), the vision encoder, the projection and the
language model take it, while `query_tokens` and the Q-Former stay in fp32 (`Blip2.keep_in_fp32`, read by the
loader), as transformers keeps them (`_keep_in_fp32_modules`) and LAVIS runs them; the image features enter the
Q-Former in fp32 and its output is cast back before the projection. In bf16, whose range is fp32's, every part
takes bf16, as in transformers.

Checked against transformers' `Blip2ForConditionalGeneration` (OPT and Flan-T5), `Blip2Model.get_qformer_features`
and `Blip2ForImageTextRetrieval` (tests/test_blip2.py): logits, greedy and beam generation token for token, ITM
and ITC scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import from_dict, show
from polymodal.generation import DecoderState, generate
from polymodal.models import opt, t5
from polymodal.models.opt import OPT, OPTConfig
from polymodal.models.t5 import T5, T5Config
from polymodal.models.vit import ViT, ViTConfig
from polymodal.nn import MLP, Attention, padding_mask
from polymodal.processing.blip2 import Blip2Processor
from polymodal.processing.image import ImageProcessor
from polymodal.registry import Family, Layout
from polymodal.weights.keymap import Drop, Fuse, KeyMap, Rename

Task = Literal["generation", "retrieval"]
TASKS: dict[str, str] = {  # transformers' architecture -> task
    "Blip2ForConditionalGeneration": "generation",
    "Blip2Model": "generation",  # the same tensors; saved back as Blip2ForConditionalGeneration
    "Blip2ForImageTextRetrieval": "retrieval",
}


@dataclass(frozen=True)
class QFormerConfig:
    """transformers' `Blip2QFormerConfig` fields and defaults (its `encoder_hidden_size` is the vision width)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2  # layer i cross-attends the image when i % frequency == 0
    use_qformer_text_input: bool = False  # the text feed-forward (intermediate/output): retrieval's text half

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"qformer hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")


def _vit_g(**kw) -> ViTConfig:
    """transformers' `Blip2VisionConfig` defaults: EVA's ViT-g/14 at 224 px without its last layer (39 of 40)."""
    return ViTConfig(**{"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                        "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6, **kw})


@dataclass(frozen=True)
class Blip2Config:
    vision_config: ViTConfig = field(default_factory=_vit_g)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    text_config: OPTConfig | T5Config | None = field(default_factory=lambda: opt.PRESETS["opt-2.7b"])
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # ITC's shared embedding width (retrieval)
    image_token_index: int | None = None  # None: the queries are prepended (transformers 4.x files)
    task: Task = "generation"

    def __post_init__(self):
        if self.task not in ("generation", "retrieval"):
            raise ValueError(f"task must be 'generation' or 'retrieval', got {self.task!r}")
        v = self.vision_config
        if v.pool != "cls" or not v.class_token or v.position != "learned" or v.backbone or v.num_labels:
            raise ValueError("BLIP-2's vision encoder is a plain ViT with a class token and learned positions")
        if self.task == "generation":
            if not isinstance(self.text_config, (OPTConfig, T5Config)):
                raise ValueError("a generative BLIP-2 needs a text_config (an OPT or T5 language model)")
            if isinstance(self.text_config, OPTConfig) and self.text_config.embed_dim != self.text_config.hidden_size:
                raise ValueError("the projected queries enter OPT's input embeddings: word_embed_proj_dim must equal "
                                 "hidden_size")
            if isinstance(self.text_config, T5Config) and not self.text_config.is_encoder_decoder:
                raise ValueError("BLIP-2's T5 is an encoder-decoder (T5ForConditionalGeneration)")
        elif not self.qformer_config.use_qformer_text_input:
            raise ValueError("image-text retrieval runs the Q-Former on text: qformer_config.use_qformer_text_input "
                             "must be true")

    @property
    def is_t5(self) -> bool:
        return isinstance(self.text_config, T5Config)

    @property
    def is_encoder_decoder(self) -> bool:
        """Flan-T5's generate returns the decoder's sequence, not the prompt continued (the pipelines read it)."""
        return self.is_t5

    @property
    def text_positions(self) -> int:
        """The Q-Former's text positions (retrieval's text encoder): the image-text-matching pipeline truncates to
        them."""
        return self.qformer_config.max_position_embeddings

    @property
    def image_tokens(self) -> int:
        """The visual prompt's length: the image tokens each prompt holds (the chat pipeline checks its processor)."""
        return self.num_query_tokens


# ------------------------------------------------------------------------------------------------ Q-Former


class QFormerLayer(nn.Module):
    """One post-norm BERT layer of the Q-Former: (B, Q + T, D) -> (B, Q + T, D), the first Q positions queries.

    Self-attention over queries and text together; the queries alone then cross-attend the image (in layers that
    have it) and go through their own feed-forward; the text through the other. bert.BertLayer runs one
    feed-forward over every position and cross-attends all of them, so this layer composes the shared blocks."""

    def __init__(self, c: QFormerConfig, context_dim: int | None):
        super().__init__()
        D, H, eps = c.hidden_size, c.num_attention_heads, c.layer_norm_eps
        self.attn = Attention(D, H)
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.cross_attn = Attention(D, H, context_dim=context_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(D, eps=eps) if context_dim else None
        self.mlp_query = MLP(D, c.intermediate_size, c.hidden_act)
        self.norm_query = nn.LayerNorm(D, eps=eps)
        self.mlp = MLP(D, c.intermediate_size, c.hidden_act) if c.use_qformer_text_input else None
        self.norm2 = nn.LayerNorm(D, eps=eps) if c.use_qformer_text_input else None

    def forward(self, x: Tensor, queries: int, mask: Tensor | None, image: Tensor | None) -> Tensor:
        """x (B, Q + T, D) with Q = `queries`; mask (B, 1, 1, Q + T) bool or None; image (B, S, Dv)."""
        x = self.norm1(x + self.attn(x, mask=mask))
        q, text = x[:, :queries], x[:, queries:]  # (B, Q, D), (B, T, D)
        if text.shape[1]:
            text = self.norm2(text + self.mlp(text))
        if not queries:  # ITC's text encoder: the text alone
            return text
        if self.cross_attn is not None:
            q = self.norm_cross(q + self.cross_attn(q, image))  # every image position is real: no mask
        q = self.norm_query(q + self.mlp_query(q))
        return torch.cat([q, text], dim=1) if text.shape[1] else q


class QFormer(nn.Module):
    """Embedded queries and text (B, Q + T, D) -> (B, Q + T, D), transformers' `Blip2QFormerModel` output."""

    def __init__(self, c: QFormerConfig, vision_width: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(c, vision_width if i % c.cross_attention_frequency == 0 else None)
            for i in range(c.num_hidden_layers))

    def forward(self, x: Tensor, queries: int, attention_mask: Tensor | None = None,
                image: Tensor | None = None) -> Tensor:
        """x (B, Q + T, D), queries = Q; attention_mask (B, Q + T) 1 for real positions, or a boolean
        (B, 1, Q + T, Q + T) mask of which position sees which (True: may attend; stage 1's unimodal, bidirectional
        and multimodal-causal masks, `polymodal.train.blip2.qformer_mask`); image (B, S, Dv), needed when Q > 0."""
        if queries and image is None:
            raise ValueError("the Q-Former's queries cross-attend an image: pass its features")
        dtype = self.layernorm.weight.dtype  # fp32 in a half-precision model (see the module docstring)
        x = self.layernorm(x.to(dtype))
        image = None if image is None else image.to(dtype)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            L = x.shape[1]
            if attention_mask.dtype != torch.bool or attention_mask.shape[1:] != (1, L, L):
                raise ValueError(f"a full Q-Former mask is boolean (B, 1, {L}, {L}), got {attention_mask.dtype} "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask
        elif attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask)  # (B, 1, 1, Q + T): both ways, padding keys hidden
        for layer in self.layers:
            x = layer(x, queries, mask, image)
        return x


class TextEmbeddings(nn.Module):
    """Q-Former text input (retrieval): word + absolute position embeddings (B, T) -> (B, T, D); the Q-Former's
    `layernorm` normalizes them together with the queries."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"the text has {T} tokens; the Q-Former holds {self.position_embeddings.num_embeddings}"
                             " positions (truncate it)")
        return self.word_embeddings(input_ids) + self.position_embeddings.weight[:T]


# --------------------------------------------------------------------------------------------------- model


class Blip2(nn.Module):
    """BLIP-2 for `config.task`: "generation" (vision_model, query_tokens, qformer, language_projection,
    language_model: transformers' `Blip2ForConditionalGeneration` / `Blip2Model`) or "retrieval" (vision_model,
    query_tokens, embeddings, qformer, vision_projection, text_projection, itm_head: `Blip2ForImageTextRetrieval`).

    Generation: `model(input_ids, pixel_values, attention_mask=None, *, decoder_input_ids=None)` -> logits
    (B, T, V) (T5: of the decoder); `model.generate(input_ids, pixel_values=...)`. Retrieval: `model(input_ids,
    pixel_values, attention_mask, use_image_text_matching_head=...)` -> transformers' `logits_per_image`."""

    keep_in_fp32 = ("query_tokens", "qformer.")  # stay fp32 when loaded in fp16 (see the module docstring)

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = c = config
        q, Dv = c.qformer_config, c.vision_config.hidden_size
        self.vision_model = ViT(c.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q, Dv)
        if c.task == "generation":
            lm = T5 if c.is_t5 else OPT
            width = c.text_config.d_model if c.is_t5 else c.text_config.hidden_size
            self.language_projection = nn.Linear(q.hidden_size, width)
            self.language_model = lm(c.text_config)
        else:
            self.embeddings = TextEmbeddings(q)
            self.vision_projection = nn.Linear(q.hidden_size, c.image_text_hidden_size)
            self.text_projection = nn.Linear(q.hidden_size, c.image_text_hidden_size)
            self.itm_head = nn.Linear(q.hidden_size, 2)

    # ------------------------------------------------------------------------------ image -> queries

    def image_embeds(self, pixel_values: Tensor | None, batch: int | None = None) -> Tensor:
        """pixel_values (B, 3, H, W) at the encoder's resolution -> its tokens (B, 1+N, Dv), checked first."""
        v = self.config.vision_config
        if pixel_values is None:
            raise ValueError("BLIP-2 reads an image per prompt: pass pixel_values (B, 3, H, W)")
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"expected pixel_values (B, {want[0]}, {want[1]}, {want[2]}) (this encoder's "
                             f"resolution), got {tuple(pixel_values.shape)}")
        if batch is not None and pixel_values.shape[0] != batch:
            raise ValueError(f"expected one image per prompt: {batch} prompts, {pixel_values.shape[0]} images")
        return self.vision_model(pixel_values.to(self.vision_model.patch_embed.proj.weight.dtype))

    def get_qformer_features(self, pixel_values: Tensor) -> Tensor:
        """The Q-Former's output for the queries (B, Q, Dq), transformers' `Blip2Model.get_qformer_features`."""
        image = self.image_embeds(pixel_values)
        return self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), self.config.num_query_tokens,
                            image=image)

    def image_features(self, pixel_values: Tensor, batch: int | None = None) -> Tensor:
        """The soft visual prompt (B, Q, D_lm): the queries' output projected to the language model's width."""
        self._needs("generation")
        image = self.image_embeds(pixel_values, batch)
        z = self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), self.config.num_query_tokens, image=image)
        return self.language_projection(z.to(self.language_projection.weight.dtype))

    def prompt_embeds(self, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
        """The language model's input embeddings (B, T', D) with the visual prompt in, and the mask (B, T') that
        goes with them: at the image tokens (T' = T), or prepended when the config has no image token
        (T' = Q + T, the mask extended by ones)."""
        c = self.config
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"expected input_ids as integer token ids (B, T), got {input_ids.dtype} of shape "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' {(B, T)}")
        if c.image_token_index is not None:
            slots = input_ids == c.image_token_index  # (B, T)
            counts = slots.sum(1)
            if bool((counts != c.num_query_tokens).any()):
                raise ValueError(f"each prompt needs {c.num_query_tokens} image tokens (id {c.image_token_index}) "
                                 f"where the queries go, found {counts.tolist()}; BLIP-2's processor puts them "
                                 "first, before the text")
        features = self.image_features(pixel_values, B)  # (B, Q, D)
        embeds = self.language_model.embed(input_ids)  # (B, T, D)
        features = features.to(embeds.dtype)
        if c.image_token_index is not None:
            return embeds.masked_scatter(slots[..., None], features), attention_mask
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, features.shape[1]), attention_mask], dim=1)
        return torch.cat([features, embeds], dim=1), attention_mask

    # ------------------------------------------------------------------------------ generation

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, attention_mask: Tensor | None = None,
                *, decoder_input_ids: Tensor | None = None, use_image_text_matching_head: bool = False) -> Tensor:
        """Generation: next-token logits (B, T, V), transformers' `Blip2ForConditionalGeneration(...).logits`; for
        T5 those of `decoder_input_ids` (B, T_d); without `image_token_index` (B, Q + T, V), queries first.
        Retrieval: ITM logits (B, 2) or the ITC scores (B_images, B_texts) (`use_image_text_matching_head`),
        transformers' `logits_per_image`."""
        if self.config.task == "retrieval":
            if use_image_text_matching_head:
                return self.itm(pixel_values, input_ids, attention_mask)
            return self.itc(pixel_values, input_ids, attention_mask)
        if self.config.is_t5 and decoder_input_ids is None:
            raise ValueError("a Flan-T5 BLIP-2 scores decoder_input_ids (B, T_d): pass them, or use generate()")
        embeds, mask = self.prompt_embeds(input_ids, attention_mask, pixel_values)
        if self.config.is_t5:
            return self.language_model(decoder_input_ids=decoder_input_ids, attention_mask=mask, inputs_embeds=embeds)
        return self.language_model(attention_mask=mask, inputs_embeds=embeds)

    def generate(self, input_ids: Tensor | None = None, max_new_tokens: int = 20, do_sample: bool = False, *,
                 pixel_values: Tensor, attention_mask: Tensor | None = None, **options) -> Tensor:
        """Continue each image's prompt input_ids (B, T) (left-padded where lengths differ), as transformers'
        `generate`: OPT returns (B, T + N), T5 its decoder sequence (B, 1 + N). Without input_ids the prompt is
        the image tokens and OPT's BOS, as transformers builds it (T5: the image tokens and EOS, what T5's tokenizer
        makes of an empty prompt). Greedy, beams and sampling: `polymodal.generation.generate`."""
        self._needs("generation")
        c, text = self.config, self.config.text_config
        if input_ids is None:
            if pixel_values is None or pixel_values.dim() != 4:
                raise ValueError("BLIP-2 reads an image per prompt: pass pixel_values (B, 3, H, W)")
            start = [text.eos_token_id if c.is_t5 else text.bos_token_id]
            if isinstance(start[0], tuple):
                start = [start[0][0]]
            tokens = [c.image_token_index] * c.num_query_tokens if c.image_token_index is not None else []
            input_ids = torch.tensor([tokens + start], device=pixel_values.device).expand(pixel_values.shape[0], -1)
        options.setdefault("eos_token_id", text.eos_token_id)
        options.setdefault("pad_token_id", text.pad_token_id)
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        pixel_values=pixel_values, **options)

    def generation_prefill(self, input_ids: Tensor, attention_mask: Tensor, max_len: int, *,
                           pixel_values: Tensor | None = None) -> tuple[DecoderState, Tensor]:
        """The visual prompt is computed once and the prompt runs through the language model's prefill; every
        later token is the language model's own step (`generation_step`). See `polymodal.generation`."""
        self._needs("generation")
        lm = self.language_model
        embeds, mask = self.prompt_embeds(input_ids, attention_mask, pixel_values)  # (B, T', D), (B, T')
        if self.config.is_t5:
            return lm.generation_prefill(input_ids, mask, max_len, inputs_embeds=embeds)
        max_len += embeds.shape[1] - input_ids.shape[1]  # the prepended queries take positions too
        cache = lm.new_cache(embeds.shape[0], max_len, dtype=embeds.dtype, device=embeds.device)
        state, positions = DecoderState.start(cache, mask, max_len)
        logits = lm(attention_mask=mask, inputs_embeds=embeds, cache=state.cache, position_ids=positions,
                    logits_to_keep=1)
        return state, logits[:, -1]

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """tokens (B,) -> next-token logits (B, V): the language model's step."""
        return self.language_model.generation_step(tokens, state)

    # ------------------------------------------------------------------------------ retrieval

    def itm(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text matching of image i and text i -> logits (B, 2) (no match, match): the ITM head on every
        query's output, averaged. With `image_token_index` the texts start with the processor's image tokens
        (dropped here) and attention_mask covers them, as transformers reads them."""
        self._needs("retrieval")
        c, Q = self.config, self.config.num_query_tokens
        image = self.image_embeds(pixel_values, input_ids.shape[0] if input_ids.dim() == 2 else None)
        ids = self._text_ids(input_ids)
        mask = attention_mask
        if c.image_token_index is None and mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], Q), mask], dim=1)
        if mask is not None and tuple(mask.shape) != (ids.shape[0], Q + ids.shape[1]):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        return self._itm_logits(image, ids, mask)

    def _itm_logits(self, image: Tensor, ids: Tensor, mask: Tensor | None) -> Tensor:
        """image tokens (B, 1+N, Dv), texts alone (B, T), mask (B, Q + T) or None -> ITM logits (B, 2)."""
        Q = self.config.num_query_tokens
        text = self.embeddings(ids)  # (B, T, D)
        x = torch.cat([self.query_tokens.expand(ids.shape[0], -1, -1).to(text.dtype), text], dim=1)
        h = self.qformer(x, Q, mask, image)[:, :Q]  # (B, Q, D)
        return self.itm_head(h.to(self.itm_head.weight.dtype)).mean(1)

    def match(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both scores of image i and text i from the images' tokens (B, 1+N, Dv) (`image_embeds`, computed once
        for every text) and the texts alone (B, T) (no image tokens: the tokenizer's ids) -> (ITM logits (B, 2),
        ITC cosine (B,): the best over the image's queries), as the image-text-matching pipeline reads them."""
        logits = self.itm_logits(image, input_ids, attention_mask)
        text = self._text_embeds(input_ids, attention_mask)  # (B, E)
        return logits, (self.project_image(image) @ text[:, :, None]).squeeze(-1).amax(dim=1)

    def itm_logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits (B, 2) of image i and text i from the images' tokens (B, 1+N, Dv) and the texts alone (B, T)."""
        self._needs("retrieval")
        ids = input_ids
        if ids.dim() != 2 or ids.is_floating_point() or image.dim() != 3 or image.shape[0] != ids.shape[0]:
            raise ValueError(f"expected image tokens ({ids.shape[0]}, 1+N, D) for texts (B, T) of integer ids, got "
                             f"{tuple(image.shape)} and {tuple(ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' "
                             f"{tuple(ids.shape)}")
        Q = self.config.num_query_tokens
        mask = None if attention_mask is None else torch.cat([attention_mask.new_ones(ids.shape[0], Q),
                                                               attention_mask], dim=1)
        return self._itm_logits(image, ids, mask)

    def project_image(self, image: Tensor) -> Tensor:
        """ITC's image embeddings (B, Q, E), unit length, from the images' tokens (B, 1+N, Dv): one per query."""
        self._needs("retrieval")
        z = self.qformer(self.query_tokens.expand(image.shape[0], -1, -1), self.config.num_query_tokens,
                         image=image)  # (B, Q, D)
        return F.normalize(self.vision_projection(z.to(self.vision_projection.weight.dtype)), dim=-1)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """ITC's image embeddings (B, Q, E), unit length: one per query."""
        self._needs("retrieval")
        z = self.get_qformer_features(pixel_values)
        return F.normalize(self.vision_projection(z.to(self.vision_projection.weight.dtype)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITC's text embeddings (B, E), unit length: the Q-Former on the text alone, its [CLS] projected. With
        `image_token_index` the processor's leading image tokens (and their mask) are dropped, as transformers
        does."""
        self._needs("retrieval")
        ids = self._text_ids(input_ids)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' "
                                 f"{tuple(input_ids.shape)}")
            attention_mask = attention_mask[:, input_ids.shape[1] - ids.shape[1]:]
        return self._text_embeds(ids, attention_mask)

    def _text_embeds(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """The texts alone (B, T) -> ITC's text embeddings (B, E), unit length."""
        h = self.qformer(self.embeddings(ids), 0, mask)  # (B, T, D)
        return F.normalize(self.text_projection(h[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def itc(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text contrastive similarity (B_images, B_texts): for each pair the best cosine over the image's
        queries (the paper's ITC, sec. 3.2)."""
        image, text = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        return (image @ text.T).amax(dim=1)  # (B_i, Q, B_t) -> (B_i, B_t)

    # ------------------------------------------------------------------------------ checks

    def _text_ids(self, input_ids: Tensor) -> Tensor:
        c = self.config
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"expected input_ids as integer token ids (B, T), got {input_ids.dtype} of shape "
                             f"{tuple(input_ids.shape)}")
        if c.image_token_index is None:
            return input_ids
        lead = input_ids[:, : c.num_query_tokens]
        if input_ids.shape[1] <= c.num_query_tokens or not bool((lead == c.image_token_index).all()):
            raise ValueError(f"this checkpoint's texts start with {c.num_query_tokens} image tokens (id "
                             f"{c.image_token_index}), as BLIP-2's processor writes them")
        return input_ids[:, c.num_query_tokens:]

    def _needs(self, task: str) -> None:
        if self.config.task != task:
            raise ValueError(f"this BLIP-2 checkpoint is a {self.config.task} model; this call needs a {task} one")


# ------------------------------------------------------------------------------------------------ presets

_T5_XL = t5.PRESETS["google/flan-t5-xl"]
PRESETS: dict[str, Blip2Config] = {
    "blip2-tiny-test": Blip2Config(
        vision_config=_vit_g(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8),
        qformer_config=QFormerConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64),
        text_config=OPTConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                              max_position_embeddings=256),
        num_query_tokens=4, image_token_index=259),
    # the hub's configs: OPT's and T5's vocabularies hold the added image token
    "Salesforce/blip2-opt-2.7b": Blip2Config(text_config=opt.PRESETS["opt-2.7b"], image_token_index=50265),
    "Salesforce/blip2-opt-6.7b": Blip2Config(text_config=opt.PRESETS["opt-6.7b"], image_token_index=50265),
    "Salesforce/blip2-flan-t5-xl": Blip2Config(text_config=_T5_XL, image_token_index=32100),
    # stage 1's Q-Former with its text half; LAVIS adds [DEC] to BERT's vocabulary
    "Salesforce/blip2-itm-vit-g": Blip2Config(
        qformer_config=QFormerConfig(vocab_size=30523, use_qformer_text_input=True), text_config=None,
        task="retrieval"),
}
HUB_IDS = {name: name for name in PRESETS if name.startswith("Salesforce/")}

# ------------------------------------------------------------------------------------------ checkpoints
# transformers (4.x and 5.x alike): `vision_model.embeddings.*`, `vision_model.encoder.layers.{i}.self_attn.qkv`
# (q, k, v already fused; its bias is q_bias, zeros, v_bias), `query_tokens`, `qformer.layernorm`,
# `qformer.encoder.layer.{i}.{attention,crossattention}.attention.{query,key,value}` (fused here),
# `...{attention,crossattention}.output.{dense,LayerNorm}`, `...{intermediate,output}{_query,}.*`,
# `language_projection`, the language model under `language_model.` (OPTForCausalLM's `model.decoder.*`, or
# `decoder.*` as OPTModel writes it; T5ForConditionalGeneration's names) and the retrieval heads. The parts' own
# maps (OPT's, T5's) are mounted, not restated.


def _vision_map() -> KeyMap:
    layer = "encoder.layers.{i}."
    return KeyMap([
        Rename("embeddings.class_embedding", "cls_token"),
        Rename("embeddings.patch_embedding.{p}", "patch_embed.proj.{p}"),
        Rename("embeddings.position_embedding", "pos_embed"),
        Rename(f"{layer}self_attn.qkv.{{p}}", "blocks.{i}.attn.qkv.{p}"),
        Rename(f"{layer}self_attn.projection.{{p}}", "blocks.{i}.attn.proj.{p}"),
        Rename(f"{layer}layer_norm1.{{p}}", "blocks.{i}.norm1.{p}"),
        Rename(f"{layer}layer_norm2.{{p}}", "blocks.{i}.norm2.{p}"),
        Rename(f"{layer}mlp.{{fc}}.{{p}}", "blocks.{i}.mlp.{fc}.{p}"),
        Rename("post_layernorm.{p}", "norm.{p}"),
    ])


def _qformer_map(c: QFormerConfig) -> KeyMap:
    layer, ours = "encoder.layer.{i}.", "layers.{i}."
    rules = []
    for p in ("weight", "bias"):
        rules += [
            Fuse(tuple(f"{layer}attention.attention.{n}.{p}" for n in ("query", "key", "value")),
                 f"{ours}attn.qkv.{p}"),
            Fuse(tuple(f"{layer}crossattention.attention.{n}.{p}" for n in ("key", "value")),
                 f"{ours}cross_attn.kv.{p}"),
        ]
    rules += [
        Rename(f"{layer}attention.output.dense.{{p}}", f"{ours}attn.proj.{{p}}"),
        Rename(f"{layer}attention.output.LayerNorm.{{p}}", f"{ours}norm1.{{p}}"),
        Rename(f"{layer}crossattention.attention.query.{{p}}", f"{ours}cross_attn.q.{{p}}"),
        Rename(f"{layer}crossattention.output.dense.{{p}}", f"{ours}cross_attn.proj.{{p}}"),
        Rename(f"{layer}crossattention.output.LayerNorm.{{p}}", f"{ours}norm_cross.{{p}}"),
        Rename(f"{layer}intermediate_query.dense.{{p}}", f"{ours}mlp_query.fc1.{{p}}"),
        Rename(f"{layer}output_query.dense.{{p}}", f"{ours}mlp_query.fc2.{{p}}"),
        Rename(f"{layer}output_query.LayerNorm.{{p}}", f"{ours}norm_query.{{p}}"),
    ]
    if c.use_qformer_text_input:
        rules += [Rename(f"{layer}intermediate.dense.{{p}}", f"{ours}mlp.fc1.{{p}}"),
                  Rename(f"{layer}output.dense.{{p}}", f"{ours}mlp.fc2.{{p}}"),
                  Rename(f"{layer}output.LayerNorm.{{p}}", f"{ours}norm2.{{p}}")]
    else:  # stage 1's text feed-forward in a generative file: transformers builds none and ignores it
        rules += [Drop(f"{layer}intermediate.{{rest*}}"), Drop(f"{layer}output.{{rest*}}")]
    return KeyMap(rules)


def hf_key_map(c: Blip2Config) -> KeyMap:
    km = (KeyMap([Drop("embeddings.position_ids")])  # a buffer older files carry; recomputed
          + _vision_map().nested("vision_model.", "vision_model.")
          + _qformer_map(c.qformer_config).nested("qformer.", "qformer."))
    if c.task == "generation":
        lm = t5.hf_key_map(c.text_config) if c.is_t5 else opt.hf_key_map(c.text_config)
        km = km + lm.nested("language_model.", "language_model.")
    return km


# ------------------------------------------------------------------------------------------ config files
# transformers' Blip2Config: `vision_config` (blip_2_vision_model), `qformer_config` (blip_2_qformer),
# `text_config` (an opt or t5 config.json; absent for retrieval), `num_query_tokens`, `image_text_hidden_size`,
# `image_token_index` (`image_token_id` in some files; null in files written before the processor expanded it).

_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
           "hidden_act", "layer_norm_eps", "qkv_bias")


def _task(raw: dict, shapes: dict) -> str:
    archs = raw.get("architectures") or []
    if archs:
        if not isinstance(archs, list) or archs[0] not in TASKS:
            raise ValueError(f"architecture {show(archs[0] if isinstance(archs, list) else archs)} is not "
                             f"supported; BLIP-2 checkpoints here are {', '.join(TASKS)}")
        return TASKS[archs[0]]
    return "retrieval" if "itm_head.weight" in shapes else "generation"


def _read_hf(raw: dict, shapes: dict) -> Blip2Config:
    parts = {k: raw.get(k) or {} for k in ("vision_config", "qformer_config", "text_config")}
    for name, part in parts.items():
        if not isinstance(part, dict):
            raise ValueError(f"{name} must be a JSON object, got {show(part)}")
    vision = dict(parts["vision_config"])
    for key in ("image_size", "patch_size"):
        if isinstance(vision.get(key), list):
            if len(set(vision[key])) != 1:
                raise ValueError(f"vision_config.{key}={show(vision[key])} is not square")
            vision[key] = vision[key][0]
    defaults = _vit_g()
    vision_cfg = from_dict(ViTConfig, {**{k: getattr(defaults, k) for k in _VISION},
                                       **{k: vision[k] for k in _VISION if k in vision}})
    task = _task(raw, shapes)
    text_cfg = None
    if task == "generation":
        kind = parts["text_config"].get("model_type", "opt")
        if kind not in ("opt", "t5"):
            raise ValueError(f"text_config.model_type {show(kind)}: this BLIP-2 takes an opt or t5 language model")
        inner = {k[len("language_model."):]: s for k, s in shapes.items() if k.startswith("language_model.")}
        family = t5 if kind == "t5" else opt
        text_cfg = family.FAMILY.layouts["transformers"].read_config(parts["text_config"], inner)
    token = raw.get("image_token_index", raw.get("image_token_id"))
    vocab = text_cfg.vocab_size if text_cfg is not None else None
    if token is not None and (not isinstance(token, int) or isinstance(token, bool) or token < 0
                              or (vocab is not None and token >= vocab)):
        raise ValueError(f"image_token_index {show(token)} is not a token of the language model's vocabulary")
    return from_dict(Blip2Config, {k: raw[k] for k in ("num_query_tokens", "image_text_hidden_size") if k in raw},
                     vision_config=vision_cfg, qformer_config=from_dict(QFormerConfig, parts["qformer_config"]),
                     text_config=text_cfg, image_token_index=token, task=task)


def _write_hf(c: Blip2Config) -> dict:
    v, q = c.vision_config, c.qformer_config
    if v.num_channels != 3:
        raise ValueError("transformers' BLIP-2 vision encoder reads RGB images (num_channels=3)")
    out = {
        "model_type": "blip-2",
        "architectures": [next(a for a, task in TASKS.items() if task == c.task)],
        "num_query_tokens": c.num_query_tokens, "image_text_hidden_size": c.image_text_hidden_size,
        "image_token_index": c.image_token_index,
        "vision_config": {"model_type": "blip_2_vision_model", **{k: getattr(v, k) for k in _VISION}},
        "qformer_config": {"model_type": "blip_2_qformer", "encoder_hidden_size": v.hidden_size,
                           **{k: getattr(q, k) for k in QFormerConfig.__dataclass_fields__}},
    }
    if c.text_config is not None:
        family = t5 if c.is_t5 else opt
        out["text_config"] = family.FAMILY.layouts["transformers"].write_config(c.text_config)
    return out


FAMILY = Family(
    name="blip-2",
    model=Blip2,
    layouts={"transformers": Layout("transformers", _read_hf, _write_hf, hf_key_map)},
    presets=PRESETS,
    hub_ids=HUB_IDS,
    description="BLIP-2: frozen ViT-g, Q-Former queries as a soft prompt of OPT or Flan-T5; ITM/ITC retrieval",
    image_processor=lambda c: ImageProcessor.blip(size=c.vision_config.image_size),
    processor=Blip2Processor.from_pretrained,
    tasks=("image-to-text", "visual-question-answering", "image-text-to-text", "image-text-matching"),
    checkpoints={"generation": ("Blip2ForConditionalGeneration",
                                ("image-to-text", "visual-question-answering", "image-text-to-text")),
                 "retrieval": ("Blip2ForImageTextRetrieval", ("image-text-matching",))},
)
