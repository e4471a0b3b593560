"""BLIP pretraining's options (models/blip.py `BlipPretraining`, the blip-shapes recipe's `itc`, `queue`, `momentum`,
`alpha`, `share`): ITC's momentum encoders move by EMA only and get no gradients, the feature queue fills and
wraps, the loss with the queue is finite and trains; the shared encoder/decoder really share tensors through
training; exported task checkpoints load into transformers with the same outputs and without momentum tensors;
a resumed run continues with the same momentum weights and queue."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

import polymodal as pm
from polymodal.models.blip import PRESETS, Blip, BlipPretraining, _text_keys
from polymodal.train import ConfigError, recipe_config, run
from polymodal.train.engine import TrainingInterrupted, param_groups

# fp32 parity tolerance, as tests/test_blip.py: the same math in another order moves results by ~1e-7
ATOL = 1e-4
TINY = ["batch_size=16", "train_images=64", "eval_images=6", "image_size=32", "warmup_steps=1", "log_every=1"]


def pretraining(**options) -> Blip:
    torch.manual_seed(0)
    return Blip(replace(PRESETS["blip-tiny-test"], task="pretraining", pretraining=BlipPretraining(**options))).train()


def batch(B: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, 32, 32) and right-padded distinct texts ([DEC]/[CLS] first; row 1 padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 90, (B, 7), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = 0
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask


def momentum_of(model: Blip) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.momentum.state_dict().items()}


def test_momentum_encoders_move_by_ema_and_get_no_gradients():
    model = pretraining(itc="momentum", queue_size=8, momentum=0.9)
    mom = dict(model.momentum.named_parameters())
    # they start as copies of the online encoders and projections
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in mom.items())
    assert not any(p.requires_grad for p in mom.values())
    trained = {id(p) for group in param_groups(model, 0.1) for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in mom.values())  # the optimizer never sees them
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    px, ids, mask = batch()
    sum(model(px, ids, mask)).backward()
    assert all(p.grad is None for p in mom.values())
    assert model.get_parameter("vision_model.blocks.0.attn.qkv.weight").grad is not None
    before = {n: p.clone() for n, p in mom.items()}
    opt.step()
    model.momentum_update()
    for n, p in mom.items():  # theta_m <- 0.9 theta_m + 0.1 theta
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * model.get_parameter(n), atol=1e-6, rtol=0)
    assert any(not torch.equal(p, before[n]) for n, p in mom.items())
    assert int(model.momentum.updates) == 1
    # the momentum text encoder is the unimodal one: no cross-attention copied
    assert not any("cross_attn" in n for n in mom)


def test_queue_fills_and_wraps():
    model = pretraining(itc="momentum", queue_size=5)
    q = model.momentum
    seen = []
    for step in range(3):  # 3 + 3 + 3 features into 5 slots
        px, ids, mask = batch(seed=step)
        model(px, ids, mask)
        image_m, text_m = q.features(px, ids, mask)
        seen += list(zip(image_m, text_m, _text_keys(ids, mask)))
        assert int(q.written) == 3 * (step + 1)
        assert len(q.queued()[0]) == min(5, 3 * (step + 1))
    # 9 written: slots 0..3 hold features 5..8, slot 4 feature 4
    for slot, i in enumerate([5, 6, 7, 8, 4]):
        torch.testing.assert_close(q.image_queue[slot], seen[i][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(q.text_queue[slot], seen[i][1], atol=1e-6, rtol=0)
        assert q.text_keys[slot] == seen[i][2]
    model.eval()(*batch())  # evaluation enqueues nothing
    assert int(q.written) == 9


def test_text_keys_name_texts_whatever_their_padding():
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 10, 11, 3, 0, 0], [2, 10, 12, 3, 0, 0], [2, 10, 11, 0, 0, 0]])
    mask = (ids != 0).long()
    keys = _text_keys(ids, mask)
    assert keys[0] == keys[1] and len(set(keys.tolist())) == 3
    assert _text_keys(ids[:1, :4], mask[:1, :4]) == keys[0]  # the same text padded less


def test_queued_copies_of_a_text_are_its_positives():
    """A batch of one repeated text: in-batch and queue entries are all positives, so the hard targets are
    uniform over them and the loss stays finite (no negatives at all)."""
    model = pretraining(itc="momentum", queue_size=6, alpha=0.0)
    px, ids, mask = batch()
    ids, mask = ids[:1].expand(3, -1), mask[:1].expand(3, -1)
    for _ in range(3):
        losses = model(px, ids, mask)
        assert all(torch.isfinite(x) for x in losses)
    assert int(model.momentum.written) == 9


def test_shared_weights_are_the_same_tensors_through_training():
    plain, shared = pretraining(), pretraining(share=True)
    enc, dec = shared.text_encoder, shared.text_decoder
    for name in ("word_embeddings", "position_embeddings", "embed_norm"):
        assert getattr(dec, name) is getattr(enc, name)
    for a, b in zip(enc.layers, dec.layers):
        assert b.cross_attn is a.cross_attn and b.mlp is a.mlp and b.norm_cross is a.norm_cross and b.norm2 is a.norm2
        assert b.attn is not a.attn and b.norm1 is not a.norm1  # only self-attention (and its norm) is the decoder's
        assert b.attn.causal and not a.attn.causal
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(plain) - count(shared) == count(plain.text_decoder) - sum(
        p.numel() for layer in dec.layers for p in [*layer.attn.parameters(), *layer.norm1.parameters()])
    opt = torch.optim.AdamW(param_groups(shared, 0.05), lr=1e-2)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    for _ in range(2):
        sum(shared(*batch())).backward()
        opt.step()
        opt.zero_grad()
    after_enc, after_dec = enc.state_dict(), dec.state_dict()
    for k, v in after_dec.items():
        assert not torch.equal(v, before[k]), k  # every decoder tensor trained
        if k in after_enc and ".attn." not in k and ".norm1." not in k:
            assert v.data_ptr() == after_enc[k].data_ptr(), k  # and the shared ones are still one tensor
    assert "layers.0.mlp.fc1.weight" in after_enc and "word_embeddings.weight" in after_enc


def test_exported_parts_load_into_transformers_without_momentum(tmp_path):
    model = pretraining(itc="momentum", queue_size=8, share=True)
    sum(model(*batch())).backward()
    model.momentum_update()
    model.eval()
    px, ids, mask = batch()
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.config.text.bos_token_id
    for task, cls in (("captioning", BlipForConditionalGeneration), ("retrieval", BlipForImageTextRetrieval)):
        part = model.part(task)
        assert part.config.pretraining == BlipPretraining() and not hasattr(part, "momentum")
        pm.save(part, tmp_path / task)
        with safe_open(tmp_path / task / "model.safetensors", "pt") as f:
            names = list(f.keys())
        assert not any("momentum" in n for n in names)
        ref, info = cls.from_pretrained(tmp_path / task, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ref.eval()
        with torch.no_grad():
            if task == "captioning":  # the decoder's shared tensors are written out under its own names
                assert any(n.startswith("text_decoder.bert.encoder.layer.0.output.dense") for n in names)
                ours = model.decode(dec_ids, mask, model.image_embeds(px))
                theirs = ref(pixel_values=px, input_ids=dec_ids, attention_mask=mask).logits
            else:
                ours = model.itm(px, ids, mask)
                theirs = ref(pixel_values=px, input_ids=ids, attention_mask=mask).itm_score
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # the whole pretraining model, in polymodal's layout, keeps its momentum state and its sharing
    pm.save(model, tmp_path / "whole")
    back = pm.load(tmp_path / "whole")
    assert back.text_decoder.layers[1].mlp is back.text_encoder.layers[1].mlp
    assert all(torch.equal(v, momentum_of(model)[k]) for k, v in back.momentum.state_dict().items())
    assert not any(p.requires_grad for p in back.momentum.parameters())


def test_recipe_knobs_are_checked():
    c = recipe_config("blip-shapes", ["itc=momentum", "queue=256", "momentum=0.99", "alpha=0.2", "share=true"])
    p = c.pretraining()
    assert (p.itc, p.queue_size, p.momentum, p.alpha, p.share) == ("momentum", 256, 0.99, 0.2, True)
    assert p.alpha_ramp == 20000 // 64  # one epoch
    assert recipe_config("blip-shapes").pretraining() == BlipPretraining(alpha_ramp=312)  # in-batch by default
    for bad, message in (("queue=0", "queue must be a positive"), ("momentum=1.0", "momentum must be in"),
                         ("alpha=1.5", "alpha .* must be in"), ("itc=queue", "itc must be one of")):
        with pytest.raises(ConfigError, match=message):
            recipe_config("blip-shapes", [bad])
    with pytest.raises(ValueError, match="queue_size must be a positive"):
        BlipPretraining(queue_size=-3)


def _losses(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_momentum_run_trains_exports_and_resumes_exactly(tmp_path, monkeypatch):
    """blip-shapes with itc=momentum and share=true: finite ITC with the queue, the loss goes down, the exports
    load into transformers and the pipelines; a run stopped at step 3 (SIGINT) and resumed logs the same losses
    as the uninterrupted one and ends with the same momentum weights and queue."""
    settings = [*TINY, "max_steps=8", "itc=momentum", "queue=40", "share=true"]
    whole = run("blip-shapes", tmp_path / "whole", [*settings, "save_every=8"], quiet=True)
    records = _losses(tmp_path / "whole")
    assert len(records) == 8 and all(torch.isfinite(torch.tensor(r["itc"])) for r in records)
    assert min(r["loss"] for r in records[-2:]) < records[0]["loss"]
    for key in ("retrieval_image_to_text_r@1_train", "retrieval_text_to_image_r@5_heldout"):
        assert 0.0 <= whole["eval"][key] <= 1.0, key
    BlipForConditionalGeneration.from_pretrained(tmp_path / "whole" / "model" / "captioning")
    BlipForImageTextRetrieval.from_pretrained(tmp_path / "whole" / "model" / "retrieval")
    ranked = pm.pipeline("image-text-matching", model=tmp_path / "whole" / "model" / "retrieval")(
        Image.new("RGB", (32, 32), (255, 0, 0)), ["a red circle"])
    assert 0.0 <= ranked[0]["score"] <= 1.0

    monkeypatch.setenv("POLYMODAL_TRAIN_FAULT", "sigint:3")
    with pytest.raises(TrainingInterrupted):
        run("blip-shapes", tmp_path / "cut", [*settings, "save_every=100"], quiet=True)
    monkeypatch.delenv("POLYMODAL_TRAIN_FAULT")
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)["model"]
    assert int(cut["momentum.written"]) == 3 * 16 and int(cut["momentum.updates"]) == 3  # the queue has wrapped
    run("blip-shapes", tmp_path / "cut", [*settings, "save_every=100"], resume=True, quiet=True)
    assert [(r["step"], r["loss"]) for r in _losses(tmp_path / "cut")] == [(r["step"], r["loss"]) for r in records]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)["model"]
            for d in ("whole", "cut"))
    assert int(a["momentum.written"]) == 8 * 16
    for k in a:
        if k.startswith("momentum."):
            assert torch.equal(a[k], b[k]), k
