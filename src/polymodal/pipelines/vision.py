"""Image classification, zero-shot classification (CLIP) and image-text retrieval pipelines.

Outputs follow transformers' pipelines: a list of {"label", "score"} sorted by score, descending."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.pipelines.base import Pipeline, as_list, default_tokenizer
from polymodal.pipelines.templates import resolve_templates


class ImageClassificationPipeline(Pipeline):
    """`pipe(image, top_k=5)` -> [{"label", "score"}, ...] from a classifier (ViT, ResNet, LeNet with a head)."""

    task = "image-classification"
    model_kind = "an image classifier"

    def labels(self) -> list[str]:
        cfg = self.model.config
        names = tuple(getattr(cfg, "id2label", ()) or ())
        n = getattr(cfg, "num_labels", 0) or getattr(cfg, "num_classes", 0) or len(names)
        return list(names) if names else [f"LABEL_{i}" for i in range(n)]

    @torch.inference_mode()
    def __call__(self, images, top_k: int = 5):
        items, single = as_list(images)
        if not hasattr(self.model, "classify"):
            raise ValueError(f"a {self.family} model has no classification head")
        probs = self.model.classify(**self.image_inputs(items)).float().softmax(-1)
        labels = self.labels()
        out = [_ranked(labels, p, top_k) for p in probs]
        return out[0] if single else out


class ImageTextPipeline(Pipeline):
    """What zero-shot classification and retrieval share: a CLIP-like model, its tokenizer, and L2-normalized
    embeddings of images and texts."""

    model_kind = "an image-text model (CLIP)"

    def __init__(self, model, *, tokenizer=None, **kw):
        super().__init__(model, **kw)  # (a family that serves neither task is refused there)
        self.tokenizer = tokenizer or default_tokenizer(self.model)

    @torch.inference_mode()
    def embed_images(self, images, batch_size: int = 32) -> torch.Tensor:
        """(N, P) L2-normalized image embeddings."""
        items, _ = as_list(images)
        chunks = [self.model.encode_image(**self.image_inputs(items[i : i + batch_size]))
                  for i in range(0, len(items), batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts) -> torch.Tensor:
        """(N, P) L2-normalized text embeddings."""
        items, _ = as_list(texts)
        return F.normalize(embed_texts(self.model, self.tokenizer, [str(t) for t in items]).float(), dim=-1)


class ZeroShotImageClassificationPipeline(ImageTextPipeline):
    """CLIP's zero-shot classifier: labels written into prompt templates, the nearest text embedding wins.

    `templates="imagenet80"` (or a list) averages the normalized embeddings of every template per label and
    renormalizes, as CLIP's prompt ensembling does."""

    task = "zero-shot-image-classification"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self._cache: dict = {}

    @torch.inference_mode()
    def label_embeddings(self, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """(L, P) normalized class embeddings, each the renormalized mean over its templates."""
        key = (tuple(labels), templates)
        if key not in self._cache:
            emb = self.embed_texts([t.format(label) for label in labels for t in templates])
            emb = emb.view(len(labels), len(templates), -1).mean(1)
            self._cache = {key: F.normalize(emb, dim=-1)}  # keep the last label set only
        return self._cache[key]

    @torch.inference_mode()
    def __call__(self, images, candidate_labels, template: str = "a photo of a {}.", templates=None, top_k=None):
        items, single = as_list(images)
        labels = [str(lab).strip() for lab in candidate_labels]
        if len(labels) < 1 or any(not lab for lab in labels):
            raise ValueError("candidate_labels must be a non-empty list of non-empty labels")
        text = self.label_embeddings(labels, resolve_templates(template, templates))
        image = self.embed_images(items)
        probs = (self.model.logit_scale.exp().float() * image @ text.T).softmax(-1)
        out = [_ranked(labels, p, top_k or len(labels)) for p in probs]
        return out[0] if single else out


class ImageTextRetrievalPipeline(ImageTextPipeline):
    """Rank a gallery both ways by cosine similarity of CLIP embeddings.

    `pipe(images=[...], texts=[...], top_k=5)` -> {"image_to_text": per image [{"index", "text", "score"}],
    "text_to_image": per text [{"index", "score"}], "similarity": (I, T) list of lists}."""

    task = "image-text-retrieval"

    def __call__(self, images, texts, top_k: int = 5):
        img, txt = self.embed_images(images), self.embed_texts(texts)
        texts = as_list(texts)[0]
        sim = img @ txt.T  # (I, T)
        k_t, k_i = min(top_k, sim.shape[1]), min(top_k, sim.shape[0])
        i2t = [[{"index": int(j), "text": texts[j], "score": float(s)} for s, j in zip(*row.topk(k_t))] for row in sim]
        t2i = [[{"index": int(j), "score": float(s)} for s, j in zip(*col.topk(k_i))] for col in sim.T]
        return {"image_to_text": i2t, "text_to_image": t2i, "similarity": sim.tolist()}


def recall_at_k(similarity: torch.Tensor, targets, ks=(1, 5, 10)) -> dict[str, float]:
    """Fraction of queries (rows) whose correct gallery item (column `targets[i]`, or any of a set of columns)
    ranks within the top k. For text->image, pass `similarity.T`."""
    ranks = similarity.argsort(dim=1, descending=True)
    out = {}
    for k in ks:
        top = ranks[:, :k].tolist()
        hits = [
            bool(set(top[i]) & (set(t) if isinstance(t, (list, tuple, set)) else {int(t)}))
            for i, t in enumerate(targets)
        ]
        out[f"R@{k}"] = sum(hits) / len(hits)
    return out


def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Tokenize with the model's context length and encode -> (N, P), not normalized."""
    device = next(model.parameters()).device
    ctx = min(77, model.config.text.max_position_embeddings)
    outs = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[i : i + batch_size], context_length=ctx)
        outs.append(model.encode_text(ids.to(device), attention_mask=mask.to(device)))
    return torch.cat(outs)


def _ranked(labels: list[str], probs: torch.Tensor, top_k: int) -> list[dict]:
    scores, idx = probs.topk(min(top_k, len(labels)))
    return [{"label": labels[i], "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())]
