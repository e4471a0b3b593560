"""Qwen2-VL and Qwen2.5-VL against transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration
on tiny random configs saved by transformers itself: M-RoPE positions (get_rope_index) and logits for one image, two
images of different grids, a video, an image with a video, no image and a left-padded batch; greedy generation token
for token (padding, a batch, each row alone), the static-cache step and beam search; the round trip back into
transformers, 4.x config and key names, and clear errors for inconsistent inputs before the tower runs. Pixel values
are built as the processor shapes them: (sum t*h*w, 3*2*14*14) flattened patches."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import polymodal as pm
from polymodal.models.qwen2_5_vl import Qwen2_5_VL
from polymodal.models.qwen2_vl import Qwen2VL
from polymodal.registry import family as get_family

# fp32 on CPU: the implementations order their reductions differently (~1e-6 seen on logits of size ~1-10); 1e-4
# leaves room without hiding a wrong formula, which shows at 1e-2 and above
ATOL = 1e-4
IMG, VID, START, END = 150, 151, 152, 153
PATCH = 3 * 2 * 14 * 14
TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
# 2.5's windows: 56 px / 14 / 2 = 2x2 merged tokens, so the grids below hold whole, cut and several windows
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=56,
                       fullatt_block_indexes=[1], tokens_per_second=2),
}
CLASSES = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VL),
           "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VL)}
A, B, V = [1, 4, 6], [1, 8, 6], [2, 4, 4]  # two image grids (6 and 12 tokens) and a video's (8 tokens)


def reference(family: str):
    ref_cls = CLASSES[family][0]
    cfg = ref_cls.config_class(vision_config=VISION[family], text_config=TEXT, **TOKENS)
    torch.manual_seed(0)
    model = ref_cls(cfg).eval()
    with torch.no_grad():  # transformers' N(0, 0.02) init makes a tiny model repeat one token: draw wider weights
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    ref = reference(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, pm.load(path), path


def prompt(*parts) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Token ids from parts (an int list is text, ("img", grid) / ("vid", grid) a vision block expanded to its
    merged-token count) -> (ids, image grids, video grids)."""
    ids, images, videos = [1], [], []
    for p in parts:
        if isinstance(p, tuple):
            kind, grid = p
            ids += [START] + [IMG if kind == "img" else VID] * (grid[0] * grid[1] * grid[2] // 4) + [END]
            (images if kind == "img" else videos).append(grid)
        else:
            ids += list(p)
    return ids, images, videos


def batch(rows, seed=0, seconds=None) -> tuple[dict, dict]:
    """Left-padded prompts with random patches -> (our inputs, transformers' inputs)."""
    T = max(len(r[0]) for r in rows)
    ids = torch.tensor([[0] * (T - len(r[0])) + r[0] for r in rows])
    mask = torch.tensor([[0] * (T - len(r[0])) + [1] * len(r[0]) for r in rows])
    g = torch.Generator().manual_seed(seed)
    ours = {"input_ids": ids, "attention_mask": mask}
    for kind, index in (("image", 1), ("video", 2)):
        grids = [grid for r in rows for grid in r[index]]
        if grids:
            grid = torch.tensor(grids)
            pixels = torch.randn(int(grid.prod(-1).sum()), PATCH, generator=g)
            names = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
            ours.update({names[0]: pixels, names[1]: grid})
    if seconds is not None:
        ours["second_per_grid_ts"] = torch.tensor(seconds)
    ref = {**ours, "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VID).long()}
    return ours, ref


CASES = {
    "one image": [prompt([5, 6], ("img", A), [7, 8, 9])],
    "two images of different grids": [prompt([5], ("img", A), [6, 7], ("img", B), [8])],
    "a video": [prompt([5], ("vid", V), [6, 7])],
    "image and video": [prompt([5], ("img", B), [6], ("vid", V), [7, 8])],
    "no image": [prompt([5, 6, 7, 8, 9, 10])],
    "left-padded batch": [prompt([5], ("img", A), [6, 7, 8, 9, 10, 11, 12]), prompt([9], ("img", B), [10], ("vid", V))],
}


def test_loads_as_its_family(pair):
    ref, ours, _ = pair
    assert type(ours) is CLASSES[ref.config.model_type][1]
    assert [ours.image_tokens(g) for g in (A, B, V)] == [6, 12, 8]
    assert ours.config.text.rope_scaling == {"rope_type": "mrope", "mrope_section": [2, 3, 3]}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_rope_index_and_logits_match(pair, case):
    ref, ours, _ = pair
    mine, theirs = batch(CASES[case], seed=len(case))
    want_pos, want_delta = ref.model.get_rope_index(
        theirs["input_ids"], theirs["mm_token_type_ids"], theirs.get("image_grid_thw"), theirs.get("video_grid_thw"),
        attention_mask=theirs["attention_mask"])
    got_pos, got_delta = ours.get_rope_index(mine["input_ids"], mine["attention_mask"], mine.get("image_grid_thw"),
                                             mine.get("video_grid_thw"))
    assert torch.equal(got_pos, want_pos) and torch.equal(got_delta, want_delta)
    real = mine["attention_mask"].bool()
    want = ref(**theirs).logits
    torch.testing.assert_close(ours(**mine)[real], want[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_video_time_in_seconds(pair):
    """Qwen2.5-VL's temporal ids count tokens_per_second x second_per_grid_ts per frame group (Qwen2-VL: frames)."""
    ref, ours, _ = pair
    mine, theirs = batch([prompt([5], ("vid", [3, 4, 4]), [6]), prompt([7], ("vid", V))], seed=3, seconds=[1.5, 0.25])
    rope_keys = ("input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask", "second_per_grid_ts")
    if isinstance(ours, Qwen2_5_VL):
        want_pos, want_delta = ref.model.get_rope_index(**{k: theirs[k] for k in rope_keys})
        got_pos, got_delta = ours.get_rope_index(mine["input_ids"], mine["attention_mask"], None,
                                                 mine["video_grid_thw"], mine["second_per_grid_ts"])
        assert torch.equal(got_pos, want_pos) and torch.equal(got_delta, want_delta)
        video = mine["input_ids"][0] == VID  # starts at token 3: 3 + (0, 1, 2) * (2 tokens/s * 1.5 s)
        assert got_pos[0, 0][video].unique().tolist() == [3, 6, 9]
    else:
        theirs.pop("second_per_grid_ts")
    real = mine["attention_mask"].bool()
    torch.testing.assert_close(ours(**mine)[real], ref(**theirs).logits[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_token_for_token(pair):
    ref, ours, _ = pair
    rows = [prompt([5], ("img", A), [6, 7, 8, 9, 10, 11]), prompt([9, 10], ("img", B), [11], ("vid", V)),
            prompt([12, 13, 14])]
    mine, theirs = batch(rows, seed=7)
    want = ref.generate(**theirs, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(**mine, max_new_tokens=10, eos_token_id=[])
    assert got.tolist() == want.tolist()
    T = mine["input_ids"].shape[1]
    assert len(set(got[1, T:].tolist())) > 2  # the weights make it say something, not one token
    # each row alone gives what it gives in the batch
    images, videos = mine["pixel_values"], mine["pixel_values_videos"]
    alone = [dict(pixel_values=images[:24], image_grid_thw=torch.tensor([A])),
             dict(pixel_values=images[24:], image_grid_thw=torch.tensor([B]), pixel_values_videos=videos,
                  video_grid_thw=torch.tensor([V])), {}]
    for i, (row, media) in enumerate(zip(rows, alone)):
        out = ours.generate(torch.tensor([row[0]]), **media, max_new_tokens=10, eos_token_id=[])
        assert out[0, len(row[0]):].tolist() == got[i, T:].tolist()


@torch.no_grad()
def test_static_cache_and_beam_search(pair):
    ref, ours, _ = pair
    mine, theirs = batch([prompt([5], ("img", B), [6, 7], ("vid", V), [8])], seed=11)
    want = ref.generate(**theirs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ours.generate(**mine, max_new_tokens=8, eos_token_id=[], static_cache=True).tolist() == want.tolist()
    beams = ref.generate(**theirs, max_new_tokens=8, do_sample=False, num_beams=3, eos_token_id=None)
    assert ours.generate(**mine, max_new_tokens=8, eos_token_id=[], num_beams=3).tolist() == beams.tolist()


@torch.no_grad()
def test_saves_back_into_transformers(pair, tmp_path):
    ref, ours, _ = pair
    pm.save(ours, tmp_path)
    back = type(ref).from_pretrained(tmp_path).eval()
    mine, theirs = batch(CASES["image and video"], seed=5)
    assert torch.equal(back(**theirs).logits, ref(**theirs).logits)
    assert torch.equal(pm.load(tmp_path)(**mine), ours(**mine))


@torch.no_grad()
def test_tied_embeddings_and_polymodal_layout(pair, tmp_path):
    """The 2B / 3B checkpoints tie lm_head to the embedding (the file holds no lm_head); polymodal's own layout
    round-trips too."""
    ref_cls = type(pair[0])
    family = ref_cls.config_class.model_type
    cfg = ref_cls.config_class(vision_config=VISION[family], text_config=TEXT, tie_word_embeddings=True, **TOKENS)
    torch.manual_seed(1)
    ref = ref_cls(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = pm.load(tmp_path / "hf")
    assert ours.config.text.tie_word_embeddings
    mine, theirs = batch(CASES["image and video"], seed=2)
    torch.testing.assert_close(ours(**mine), ref(**theirs).logits, atol=ATOL, rtol=0)
    pm.save(ours, tmp_path / "back")
    assert torch.equal(ref_cls.from_pretrained(tmp_path / "back")(**theirs).logits, ref(**theirs).logits)
    pm.record(ours).layout = "polymodal"
    pm.save(ours, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == f"polymodal-{family}"
    assert torch.equal(pm.load(tmp_path / "native")(**mine), ours(**mine))


@torch.no_grad()
def test_4x_config_and_5x_key_names_load(pair, tmp_path):
    """The hub's 4.x config.json (text fields at the top level, rope_scaling type "mrope", in_chans) and the names
    of transformers 5.x's modules (model.visual.*, model.language_model.*) read as the same model."""
    _, ours, path = pair
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.pop("text_config")
    rope, _ = text.pop("rope_parameters"), text.pop("model_type")  # the flat form keeps the composite's model_type
    cfg.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg["vision_config"]["in_chans"] = cfg["vision_config"].pop("in_channels")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    mine, _ = batch(CASES["two images of different grids"], seed=9)
    assert torch.equal(pm.load(tmp_path)(**mine), ours(**mine))


def test_inconsistent_inputs_fail_before_the_tower(pair, monkeypatch):
    _, ours, _ = pair
    monkeypatch.setattr(ours.visual, "forward", lambda *a: pytest.fail("the tower ran"))
    mine, _ = batch(CASES["image and video"], seed=1)
    ids, px, grid = mine["input_ids"], mine["pixel_values"], mine["image_grid_thw"]
    video = {k: mine[k] for k in ("pixel_values_videos", "video_grid_thw")}
    with pytest.raises(ValueError, match="describes 48 patches of 1176 values.*has shape \\(47, 1176\\)"):
        ours(ids, pixel_values=px[:-1], image_grid_thw=grid, **video)
    with pytest.raises(ValueError, match="1 image\\(s\\) of \\[6\\] features need 6 image tokens.*found 12"):
        ours(ids, pixel_values=px[:24], image_grid_thw=torch.tensor([A]), **video)
    with pytest.raises(ValueError, match="8 video tokens.*no pixel_values_videos"):
        ours(ids, pixel_values=px, image_grid_thw=grid)
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw go together"):
        ours(ids, pixel_values=px, **video)
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        ours(ids, pixel_values=px, image_grid_thw=torch.tensor([[1, 6, 8]]) + torch.tensor([[0, 1, 0]]), **video)
    with pytest.raises(ValueError, match="8 video tokens.*no pixel_values_videos"):
        ours.generate(ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=2)
    # the right count split wrongly between two images: the prompt's runs say where
    two = torch.tensor([prompt([5], ("img", A), [6], ("img", B))[0]])
    with pytest.raises(ValueError, match="image 0 of grid \\[1, 8, 6\\] needs 12 consecutive image tokens"):
        ours(two, pixel_values=torch.randn(72, PATCH), image_grid_thw=torch.tensor([B, A]))


def test_transformers_inputs_with_mm_token_type_ids_are_taken_as_they_are(pair):
    """transformers 5's inputs carry mm_token_type_ids; ours derives it from the ids, takes it when it agrees (the
    same logits and tokens) and refuses one that does not."""
    ref, ours, _ = pair
    mine, theirs = batch(CASES["image and video"], seed=2)
    torch.testing.assert_close(ours(**theirs), ours(**mine), rtol=0, atol=0)
    assert torch.equal(ours.generate(**theirs, max_new_tokens=4), ours.generate(**mine, max_new_tokens=4))
    wrong = theirs["mm_token_type_ids"].clone()
    wrong[0, 3] = 0 if wrong[0, 3] else 1  # one position called text that is an image token, or the reverse
    with pytest.raises(ValueError, match="mm_token_type_ids disagrees"):
        ours(**{**theirs, "mm_token_type_ids": wrong})
    with pytest.raises(ValueError, match="must have input_ids' shape"):
        ours(**{**theirs, "mm_token_type_ids": wrong[:, 1:]})


@pytest.mark.parametrize("family,preset,billions", [
    ("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", 2.209), ("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", 8.291),
    ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", 3.755), ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct", 8.292)])
def test_presets_have_the_real_sizes(family, preset, billions):
    fam = get_family(family)
    with torch.device("meta"):
        model = fam.model(fam.presets[preset])
    total = sum(p.numel() for p in model.parameters())  # tied embeddings count once, as the hub's cards count them
    assert abs(total / 1e9 - billions) < 0.01, total


@pytest.mark.parametrize("family,preset", [("qwen2_vl", "qwen2-vl-tiny-test"), ("qwen2_5_vl", "qwen2.5-vl-tiny-test")])
@torch.no_grad()
def test_tiny_presets_run(family, preset):
    fam = get_family(family)
    model = fam.model(fam.presets[preset]).eval()
    c = model.config
    grid = torch.tensor([[1, 4, 8]])
    ids = torch.tensor([[1, c.vision_start_token_id] + [c.image_token_id] * model.image_tokens(grid[0]) + [3, 4]])
    out = model.generate(ids, pixel_values=torch.randn(32, c.vision.patch_dim), image_grid_thw=grid,
                         max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("family,preset", [("qwen2_vl", "qwen2-vl-tiny-test"), ("qwen2_5_vl", "qwen2.5-vl-tiny-test")])
def test_a_preset_built_model_saves_what_transformers_loads(family, preset, tmp_path):
    """Presets hold float fields (Qwen2-VL's mlp_ratio 4.0) that transformers' strict configs take as ints."""
    fam = get_family(family)
    model = fam.model(fam.presets[preset]).eval()
    pm.save(model, tmp_path)
    back = CLASSES[family][0].from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(back(input_ids=ids).logits, model(ids), atol=ATOL, rtol=0)


def test_mrope_tables_match_transformers_and_refuse_bad_sections():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from polymodal.nn import RoPE

    scaling = {"rope_type": "mrope", "mrope_section": [2, 3, 3]}
    ours = RoPE(16, 10000.0, scaling)
    theirs = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, rope_parameters={
        **scaling, "rope_theta": 10000.0}))
    positions = torch.randint(0, 300, (3, 2, 7))
    for got, want in zip(ours(positions), theirs(torch.zeros(1), positions)):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(ours(positions[0]), RoPE(16, 10000.0)(positions[0])))  # (B, T)
    with pytest.raises(ValueError, match="sums to 7, but the head dimension 16 has 8 rotary frequencies"):
        RoPE(16, 10000.0, {"rope_type": "mrope", "mrope_section": [2, 2, 3]})
    with pytest.raises(ValueError, match="need M-RoPE"):
        RoPE(16, 10000.0)(positions)
