"""Pipelines on a tiny CLIP saved by transformers: zero-shot (single template and ensembles), retrieval, recall."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import polymodal as pm
from polymodal.pipelines import recall_at_k
from polymodal.pipelines.templates import IMAGENET80, resolve_templates


def _images():
    return [Image.new("RGB", (80, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]


def test_imagenet80_is_clips_list():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET80) == 80
    assert list(IMAGENET80) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    del open_clip


def test_template_resolution_errors():
    assert resolve_templates() == ("a photo of a {}.",)
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates(templates="imagenet81")
    with pytest.raises(ValueError, match="where the label goes"):
        resolve_templates(template="no placeholder")


def test_zero_shot_output_and_ensemble(clip_dir):
    pipe = pm.pipeline("zero-shot-image-classification", model=clip_dir)
    labels = ["red", "green", "blue"]
    out = pipe(_images()[0], candidate_labels=labels)
    assert [set(r) for r in out] == [{"label", "score"}] * 3
    assert sorted(r["label"] for r in out) == sorted(labels)
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    batch = pipe(_images(), candidate_labels=labels, templates="imagenet80")
    assert len(batch) == 3 and all(len(r) == 3 for r in batch)
    # the ensemble is the renormalized mean of the per-template normalized text embeddings
    templates = ("a photo of a {}.", "a drawing of a {}.")
    got = pipe.label_embeddings(labels, templates)
    from polymodal.pipelines.vision import embed_texts

    per = [F.normalize(embed_texts(pipe.model, pipe.tokenizer, [t.format(lab) for t in templates]), dim=-1)
           for lab in labels]
    want = F.normalize(torch.stack([p.mean(0) for p in per]), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="candidate_labels"):
        pipe(_images()[0], candidate_labels=[])


def test_retrieval_and_recall(clip_dir):
    pipe = pm.pipeline("image-text-retrieval", model=clip_dir)
    texts = ["a red square", "a green square", "a blue square", "a cat"]
    out = pipe(images=_images(), texts=texts, top_k=2)
    assert len(out["image_to_text"]) == 3 and len(out["text_to_image"]) == 4
    assert all(len(h) == 2 for h in out["image_to_text"])
    sim = torch.tensor(out["similarity"])
    assert sim.shape == (3, 4)
    assert out["image_to_text"][0][0]["index"] == int(sim[0].argmax())
    emb = pipe.embed_images(_images())
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_pipelines_pass_the_processors_dict_on(clip_dir):
    """A pipeline hands the model what its processor's `inputs` returns, keyed by the model's argument names,
    floating tensors in the model's dtype: a processor that returns more keys needs no pipeline change."""
    from polymodal.processing import ImageProcessor

    pipe = pm.pipeline("image-text-retrieval", model=clip_dir)
    inputs = pipe.processor.inputs(_images())
    assert set(inputs) == {"pixel_values"}
    torch.testing.assert_close(inputs["pixel_values"], pipe.processor(_images()), rtol=0, atol=0)

    class Recording(ImageProcessor):
        calls = []

        def inputs(self, images):
            out = super().inputs(images)
            self.calls.append(len(images))
            return {"pixel_values": out["pixel_values"].double()}  # the pipeline casts to the model's dtype

    recording = Recording(**{f: getattr(pipe.processor, f) for f in pipe.processor.__dataclass_fields__})
    other = pm.pipeline("image-text-retrieval", model=clip_dir, processor=recording)
    torch.testing.assert_close(other.embed_images(_images()), pipe.embed_images(_images()), rtol=0, atol=1e-6)
    assert Recording.calls == [3]


def test_recall_at_k_definition():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.0, 0.8, 0.1]])
    r = recall_at_k(sim, [0, 1, 2], ks=(1, 2))
    assert r == {"R@1": 1 / 3, "R@2": 1.0}  # rows 1 and 2 find their target second
    assert recall_at_k(sim, [[0], [1, 2], [1]], ks=(1,))["R@1"] == 1.0


def test_unknown_task_and_wrong_model(clip_dir):
    with pytest.raises(ValueError, match="unknown task"):
        pm.pipeline("image-to-sound", model=clip_dir)
    vit = pm.build("vit", "vit-tiny-test")
    with pytest.raises(ValueError, match="image-text model"):
        pm.pipeline("zero-shot-image-classification", model=vit)


def test_a_family_serves_the_tasks_it_lists(clip_dir):
    """Family.tasks decide which pipelines take a model; a refusal names the model's family and what it serves."""
    from polymodal import registry

    assert "zero-shot-image-classification" in registry.family("clip").tasks
    with pytest.raises(ValueError, match=r"is a clip model, not a language model: it serves "
                                         r"zero-shot-image-classification, image-text-retrieval"):
        pm.pipeline("text-generation", model=clip_dir)
    with pytest.raises(ValueError, match="is a llama model, not an image classifier: it serves text-generation"):
        pm.pipeline("image-classification", model=pm.build("llama", "llama-tiny-test"))
    with pytest.raises(ValueError, match="is a bert model, not an image-text model .*no pipeline serves it"):
        pm.pipeline("zero-shot-image-classification", model=pm.build("bert", "bert-tiny-test"))
    for fam in registry.all_families():  # every listed task is a pipeline
        assert set(fam.tasks) <= set(pm.pipelines.TASKS), fam.name
