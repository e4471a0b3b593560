"""Image-grounded text: captioning, visual question answering, image-text matching, and BLIP's CapFilt, with BLIP's
and BLIP-2's checkpoints.

Outputs follow transformers' pipelines: `[{"generated_text": ...}]` per image for "image-to-text",
`[{"answer": ...}]` for "visual-question-answering"; "image-text-matching" ranks texts by the probability that
they describe the image ([{"text", "score", "similarity"}]); its `retrieve` is BLIP's retrieval (ITC ranks, ITM
re-ranks the top k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.pipelines.base import Pipeline, as_list, family_processor, new_tokens, to_model
from polymodal.pipelines.text import default_text_tokenizer


class _ImageTextModelPipeline(Pipeline):
    """A checkpoint that serves this pipeline's task (its family's `Family.checkpoints` say which: BLIP's captioning,
    VQA and retrieval files; BLIP-2's generative and retrieval ones), with its tokenizer. A family that owns a
    processor (BLIP-2's: the image tokens before the text) prepares the prompts and pixels with it
    (`self.prompts`); otherwise the tokenizer and the image processor do (BLIP)."""

    model_kind = "an image-text model (BLIP, BLIP-2)"
    uses_prompts = True  # the family's processor writes the prompts (image-text matching tokenizes texts alone)

    def __init__(self, model, *, tokenizer=None, **kw):
        super().__init__(model, **kw)
        if not hasattr(self, "prompts"):  # (default_processor read it already, unless processor= was given)
            self.prompts = family_processor(self.model) if self.uses_prompts else None
        self.tokenizer = tokenizer or getattr(self.prompts, "tokenizer", None) or default_text_tokenizer(self.model)

    def default_processor(self):
        """The family processor's image processor when the family owns one, else the checkpoint's own."""
        self.prompts = family_processor(self.model) if self.uses_prompts else None
        return self.prompts.image_processor if self.prompts is not None else super().default_processor()

    def _generate(self, images, ids, mask, max_new_tokens, seed, **options):
        if seed is not None:
            options["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        return self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                   max_new_tokens=max_new_tokens, **self.image_inputs(images), **options)

    def _generate_prompted(self, images, texts: list[str], max_new_tokens, seed, **options):
        """Each image with its prompt through the family's processor -> (generate's output, the inputs' ids)."""
        from polymodal.processing import open_image

        if seed is not None:
            options["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        inputs = to_model(self.prompts(text=texts, images=[open_image(im) for im in images]), self.device,
                          self.dtype)
        return self.model.generate(**inputs, max_new_tokens=max_new_tokens, **options), inputs["input_ids"]


class ImageToTextPipeline(_ImageTextModelPipeline):
    """`pipe(image, prompt=None)` -> [{"generated_text"}]: a caption of each image, continuing `prompt` if given
    (BLIP's "a picture of"), which the text then starts with."""

    task = "image-to-text"

    @torch.inference_mode()
    def __call__(self, images, prompt: str | None = None, *, max_new_tokens: int = 30, num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, batch_size: int = 8):
        items, single = as_list(images)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        options = dict(num_beams=num_beams, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty)
        if self.prompts is not None:  # BLIP-2: the processor's image tokens, then the prompt as the tokenizer frames it
            out = []
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                generated, _ = self._generate_prompted(chunk, [prompt or ""] * len(chunk), max_new_tokens, seed,
                                                       **options)
                out += [[{"generated_text": t.strip()}] for t in self.tokenizer.batch_decode(generated.tolist())]
            return out[0] if single else out
        start = [self.model.config.text.bos_token_id]
        row = start + (self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
        out = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            ids, mask = self.tokenizer.pad([row] * len(chunk))
            generated = self._generate(chunk, ids, mask, max_new_tokens, seed, **options)
            out += [[{"generated_text": self.tokenizer.decode(g, skip_special_tokens=True).strip()}]
                    for g in generated.tolist()]
        return out[0] if single else out


class VisualQuestionAnsweringPipeline(_ImageTextModelPipeline):
    """`pipe(image, question)` -> [{"answer"}]; a list of images with one question, or a question per image."""

    task = "visual-question-answering"
    # BLIP-2's prompt for OPT and Flan-T5 (Li et al. 2023, sec. 4.2), for a family that writes prompts (BLIP's VQA
    # model encodes the question itself)
    template = "Question: {} Answer:"

    @torch.inference_mode()
    def __call__(self, image, question, *, max_new_tokens: int = 10, num_beams: int = 1, batch_size: int = 8):
        images, single = as_list(image)
        questions = [question] * len(images) if isinstance(question, str) else list(question)
        if len(questions) != len(images) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError("visual-question-answering takes one non-empty question (a string) for all images, or "
                             f"one per image; got {len(questions)} for {len(images)} image(s)")
        out = []
        if self.prompts is not None:  # BLIP-2: the answer is what the language model adds after the prompt
            for i in range(0, len(images), batch_size):
                texts = [self.template.format(q.strip()) for q in questions[i : i + batch_size]]
                generated, ids = self._generate_prompted(images[i : i + batch_size], texts, max_new_tokens, None,
                                                         num_beams=num_beams)
                answers = self.tokenizer.batch_decode(new_tokens(self.model, generated, ids).tolist())
                out += [[{"answer": a.strip()}] for a in answers]
            return out[0] if single else out
        for i in range(0, len(images), batch_size):
            ids, mask = self.tokenizer(questions[i : i + batch_size], padding_side="right")
            ids, mask = _fit(ids, mask, self.model.config.text.max_position_embeddings)
            generated = self._generate(images[i : i + batch_size], ids, mask, max_new_tokens, None,
                                       num_beams=num_beams)
            out += [[{"answer": self.tokenizer.decode(g, skip_special_tokens=True).strip()}]
                    for g in generated.tolist()]
        return out[0] if single else out


class ImageTextMatchingPipeline(_ImageTextModelPipeline):
    """`pipe(image, texts)` -> [{"text", "score", "similarity"}] sorted by score: `score` is the ITM head's
    probability that the text describes the image, `similarity` the ITC cosine of their embeddings."""

    task = "image-text-matching"
    uses_prompts = False  # texts alone, scored against image tokens encoded once (`model.match`)

    @torch.inference_mode()
    def scores(self, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i with text i, or one image with every text -> (ITM match probability (N,), ITC cosine (N,))."""
        images, texts = list(images), list(texts)
        if len(images) not in (1, len(texts)):
            raise ValueError(f"expected one image, or one per text: {len(images)} images, {len(texts)} texts")
        ids, mask = self.tokenizer(texts, padding_side="right")
        ids, mask = _fit(ids.to(self.device), mask.to(self.device), _text_positions(self.model.config))
        tokens = self.model.image_embeds(**self.image_inputs(images))  # (1 or N, 1+P, D): each image encoded once
        logits, cosine = self.model.match(tokens.expand(len(texts), -1, -1), ids, mask)
        return logits.float().softmax(-1)[:, 1], cosine.float()

    def __call__(self, image, texts):
        items, _ = as_list(texts)
        if not all(isinstance(t, str) for t in items):
            raise TypeError("texts must be strings")
        match, similarity = self.scores([image], items)
        ranked = sorted(zip(items, match.tolist(), similarity.tolist()), key=lambda r: -r[1])
        return [{"text": t, "score": s, "similarity": c} for t, s, c in ranked]


    @torch.inference_mode()
    def retrieve(self, images, texts, *, k: int = 16, batch_size: int = 32) -> Retrieval:
        """Image-text retrieval as BLIP infers it (Li et al. 2022, sec. 4.5; the authors' `evaluation` in
        train_retrieval.py): ITC's cosines rank every text for each image and every image for each text, and the
        ITM head re-ranks each query's top `k` by its match probability (the paper's "k candidates based on the
        image-text feature similarity, then rerank ... based on their pairwise ITM scores"; the authors' code
        sorts by the ITM logit plus the cosine, an order that can differ). images: N_i images; texts: N_t strings."""
        if any(isinstance(x, (list, tuple)) and not x for x in (images, texts)):
            raise ValueError("retrieval needs at least one image and one text; got an empty list")
        (images, _), (texts, _) = as_list(images), as_list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids, mask = self.tokenizer(texts, padding_side="right")
        ids, mask = _fit(ids.to(self.device), mask.to(self.device), _text_positions(self.model.config))
        encode = self.model.encode_text
        text_embeds = torch.cat([encode(ids[i : i + batch_size], mask[i : i + batch_size])
                                 for i in range(0, len(texts), batch_size)])  # (N_t, E)
        tokens, cosines = [], []
        for i in range(0, len(images), batch_size):  # every image decoded, preprocessed and encoded once
            image = self.model.image_embeds(**self.image_inputs(images[i : i + batch_size]))  # (b, 1+P, D)
            tokens.append(image)  # ITM reads the tokens; ITC their projection
            sim = self.model.project_image(image) @ text_embeds.T  # (b, N_t), or (b, Q, N_t) for BLIP-2's queries
            cosines.append(sim.amax(1) if sim.ndim == 3 else sim)
        tokens, similarity = torch.cat(tokens), torch.cat(cosines).float()  # (N_i, 1+P, D), (N_i, N_t)

        def rerank(sim: torch.Tensor, images_ask: bool) -> tuple[torch.Tensor, torch.Tensor]:
            """sim (Q, C) -> ITC's top k of each query's C candidates re-ranked by ITM: indices (Q, k), p (Q, k)."""
            top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k), ITC's order
            queries = torch.arange(sim.shape[0], device=top.device)[:, None].expand_as(top).reshape(-1)
            im, tx = (queries, top.reshape(-1)) if images_ask else (top.reshape(-1), queries)  # the Q*k pairs
            p = torch.cat([self.model.itm_logits(tokens[im[j : j + batch_size]], ids[tx[j : j + batch_size]],
                                                 mask[tx[j : j + batch_size]]).float().softmax(-1)[:, 1]
                           for j in range(0, len(im), batch_size)]).view(top.shape)
            order = p.argsort(dim=1, descending=True, stable=True)  # ties keep ITC's order
            return top.gather(1, order), p.gather(1, order)

        i2t, i2t_p = rerank(similarity, images_ask=True)
        t2i, t2i_p = rerank(similarity.T, images_ask=False)
        return Retrieval(similarity, i2t, i2t_p, t2i, t2i_p)


@dataclass
class Retrieval:
    """`ImageTextMatchingPipeline.retrieve`'s answer: the ITC cosines of every pair, and for each image (text) the
    indices of ITC's top k texts (images) re-ranked by ITM, best first, with their ITM match probabilities."""

    similarity: torch.Tensor  # (N_images, N_texts) ITC cosines
    image_to_text: torch.Tensor  # (N_images, k) text indices
    image_to_text_scores: torch.Tensor  # (N_images, k) ITM p(match)
    text_to_image: torch.Tensor  # (N_texts, k) image indices
    text_to_image_scores: torch.Tensor  # (N_texts, k) ITM p(match)

    def recall(self, text_image, ks=(1, 5, 10)) -> dict[str, float]:
        """Recall@k of both directions, as the paper reports retrieval (COCO, Flickr30K), given `text_image[t]`, the
        image that text t describes: an image counts as found when any of its texts is in its first k, a text when
        its image is. k above the re-ranked list's length reads the whole list."""
        truth = torch.as_tensor(list(text_image), device=self.text_to_image.device)
        n_i, n_t = self.similarity.shape
        if truth.shape != (n_t,) or truth.numel() and not (0 <= int(truth.min()) and int(truth.max()) < n_i):
            raise ValueError(f"text_image needs one image index in [0, {n_i}) per text ({n_t}), got {len(truth)}")
        out = {}
        for k in ks:
            found_i = (truth[self.image_to_text[:, :k]] == torch.arange(n_i, device=truth.device)[:, None]).any(1)
            found_t = (self.text_to_image[:, :k] == truth[:, None]).any(1)
            has_text = torch.bincount(truth, minlength=n_i) > 0  # images no text describes are left out
            out[f"image_to_text_r@{k}"] = found_i[has_text].double().mean().item()
            out[f"text_to_image_r@{k}"] = found_t.double().mean().item()
        return out


def _text_positions(config) -> int:
    """The positions of the model's text encoder: a config's `text_positions` (BLIP-2's Q-Former), else those of its
    text config (BLIP's BERT)."""
    return getattr(config, "text_positions", None) or config.text.max_position_embeddings


def _fit(ids: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate right-padded texts to the model's positions (BLIP's processor truncates as well)."""
    return ids[:, :max_len], mask[:, :max_len]


@dataclass
class CapFiltResult:
    """One image's captions after CapFilt: those kept, with their ITM match probabilities."""

    kept: list[str]
    scores: dict[str, float]
    synthetic: list[str]


def capfilt(captioner: ImageToTextPipeline, matcher: ImageTextMatchingPipeline, images, captions, *,
            num_synthetic: int = 1, threshold: float = 0.5, top_p: float = 0.9, max_new_tokens: int = 30,
            seed: int = 0) -> list[CapFiltResult]:
    """BLIP's dataset bootstrapping (sec. 3.3): the captioner writes `num_synthetic` captions per image with nucleus
    sampling (more diverse than beam search, which the paper found to help), and the filter (the ITM head) keeps
    each original and synthetic caption whose match probability reaches `threshold`.

    images: N images; captions: N web captions (a string or a list of strings per image)."""
    from polymodal.processing import open_image

    items, _ = as_list(images)
    originals = [[c] if isinstance(c, str) else list(c) for c in captions]
    if len(originals) != len(items):
        raise ValueError(f"capfilt needs captions for each image: {len(items)} images, {len(originals)} captions")
    # decoded once: every captioning round and the filter read them again (a file object could be read only once)
    items = [open_image(im) for im in items]
    synthetic = [[] for _ in items]
    for k in range(num_synthetic):
        out = captioner(items, do_sample=True, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + k)
        for s, o in zip(synthetic, out):
            s.append(o[0]["generated_text"])
    pairs = [(i, c) for i in range(len(items)) for c in originals[i] + synthetic[i]]
    match, _ = matcher.scores([items[i] for i, _ in pairs], [c for _, c in pairs])
    results = [CapFiltResult([], {}, synthetic[i]) for i in range(len(items))]
    for (i, c), p in zip(pairs, match.tolist()):
        results[i].scores[c] = p
        if p >= threshold and c not in results[i].kept:
            results[i].kept.append(c)
    return results
